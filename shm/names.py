"""Every shared-memory name of one exchange, in one place.

All regions, rings and doorbells of an exchange share a prefix derived from its state
directory's real path, so every process pointed at the same directory finds the same exchange
and two exchanges in two directories never meet: "/perpx-" + 10 hex digits of
blake2b(realpath).

    <prefix>-state            the matcher's state tables (engine/state.py)
    <prefix>-events           the event ring: one producer (the matcher), N consumers
    <prefix>-matcher-bell     the matcher's doorbell: producers ring it after a write
    <prefix>-cmd-<source>     one command ring per producer (gateway-N, riskd, ops)
    <prefix>-journal          persistd's progress board (shm/progress.py)
    <prefix>-index            the index board (shm/index_board.py)
    <prefix>-supervisor       the heartbeat board (shm/heartbeat.py)
"""

from __future__ import annotations

import hashlib
import os


def prefix_for(state_dir) -> str:
    real = os.path.realpath(os.fspath(state_dir))
    return "/perpx-" + hashlib.blake2b(real.encode(), digest_size=5).hexdigest()


def state_region(prefix: str) -> str:
    return f"{prefix}-state"


def event_ring(prefix: str) -> str:
    return f"{prefix}-events"


def matcher_bell(prefix: str) -> str:
    return f"{prefix}-matcher-bell"


def command_ring(prefix: str, source: str) -> str:
    return f"{prefix}-cmd-{source}"


def progress_board(prefix: str) -> str:
    return f"{prefix}-journal"


def index_board(prefix: str) -> str:
    return f"{prefix}-index"


def heartbeat_board(prefix: str) -> str:
    return f"{prefix}-supervisor"
