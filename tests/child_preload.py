"""Imported once, by the tests' forkserver (tests/child_processes.py), so that every child it
forks has the compiled matcher and the gateway's lane loaded, with the types the children
(tests/gateway_fixtures.py) give them. The numba cache is warm by then (tests/conftest.py
compiles first)."""

import tests.gateway_fixtures  # noqa: F401 — the children's targets and all they import
from gateway.compiled_pass import compile_lane
from perpx.progress import load_matcher

load_matcher()
compile_lane()
