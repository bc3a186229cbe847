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
# One numba cache for the checkout: a fresh clone compiles the matcher once, later runs load it.
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.venv/numba-cache}"
