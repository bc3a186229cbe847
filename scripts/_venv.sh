# Sourced by scripts/*: make .venv hold what pyproject.toml asks for, once per change of it.
VENV="${PERPX_VENV:-$PWD/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.perpx-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "perpx: installing what pyproject.toml asks for into $VENV (a minute or two) ..." >&2
    # pip's own chatter (build warnings) goes to a log; shown only if the install fails
    if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
           "$VENV/bin/python" -m pip install -q -e ".[test]"; } > "$VENV/pip.log" 2>&1; then
        tail -n 30 "$VENV/pip.log" >&2
        echo "perpx: the install failed (full log: $VENV/pip.log)" >&2
        exit 1
    fi
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# The numba cache dir is chosen by the engine package itself (engine/__init__.py).
