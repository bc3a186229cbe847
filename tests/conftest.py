"""Fixtures shared by the tests that run whole exchanges."""

from __future__ import annotations

import sys

import pytest

from perpx.progress import ensure_compiled
from tests.test_supervisor import Up, config_text


def pytest_sessionstart(session):
    """On a cold numba cache (a fresh checkout), compile the matcher and the gateway's lane
    first, side by side, with a clock on the terminal, rather than silently inside whichever
    test loads them first (a gateway compiling its lane keeps its clients waiting for
    minutes)."""
    if not session.config.option.collectonly:
        ensure_compiled(sys.__stderr__)


@pytest.fixture
def ups(tmp_path):
    """Start exchanges with ups(name, config); all are stopped (and checked) at the end, the
    newest first (a name used twice restarts the exchange in the same state dir)."""
    started: list[Up] = []

    def start(name: str = "state", config: str | None = None, *extra) -> Up:
        up = Up(tmp_path / name, config if config is not None else config_text(), *extra)
        started.append(up)
        return up

    yield start
    leftovers = {}
    for up in reversed(started):
        leftovers[up.sd.prefix] = leftovers.get(up.sd.prefix, []) + up.close()
    assert not any(leftovers.values()), f"left in /dev/shm: {leftovers}"
