"""Imported once, by the tests' forkserver (tests/child_processes.py), so that every child it
forks has the compiled matcher and the gateway's lane loaded, with the types the children
(tests/gateway_fixtures.py) give them. The numba cache is warm by then (tests/conftest.py
compiles first)."""

import numpy as np

import tests.gateway_fixtures  # noqa: F401 — the children's targets and all they import
from engine.config import EngineConfig
from engine.matcher import Matcher
from engine.records import COMMAND_DTYPE, EVENT_DTYPE
from gateway.compiled_pass import compile_lane
from perpx.progress import event_sink

_slots = np.zeros(16, EVENT_DTYPE)
Matcher(EngineConfig()).process(np.zeros(0, COMMAND_DTYPE), event_sink(_slots), 0, len(_slots))
compile_lane()
