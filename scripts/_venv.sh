# Sourced by scripts/*: make .venv hold what pyproject.toml asks for, once per change of it.
VENV="${PERPX_VENV:-$PWD/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.perpx-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# The numba cache dir is chosen by the engine package itself (engine/__init__.py).
