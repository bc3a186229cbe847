"""What persistd has made safe, in shared memory for the matcher, the gateways and `perpx status`.

One small region, `<prefix>-journal`, created by the supervisor (it outlives a persistd that is
killed and restarted) and written only by persistd. Each value is a cursor on its own cache
line (shm/cursor.py):

    durable_seq     every command up to this seq is in the journal and fsynced: gateways release
                    acks and fills up to here; a restarting matcher waits for it to reach the
                    last seq in the event ring before it rebuilds its state from the journal
    journal_errno   0, or the errno of the journal write that is failing right now (disk full):
                    gateways refuse new orders while it is set, rather than ack what is not durable
    store_seq       events up to this seq are in DuckDB (`perpx sql` sees them)
    snapshot_seq    the seq of the newest state snapshot on disk
    pid             persistd's pid
    store_quiet_until_ns
                    CLOCK_MONOTONIC ns before which the store process wants no CPU: the time
                    of its next pass while it sleeps between passes, 0 during a pass (journal
                    read, replica, DuckDB write, snapshot: a burst of CPU on the journal's CPU)
                    and before its first. From shortly before that time until the pass ends
                    the journal sleeps between passes instead of yielding its CPU to it
                    (persistd/service.py, `store_wants_cpu`)
"""

from __future__ import annotations

import time

from shm import names
from shm.cursor import CACHE_LINE, Cursor
from shm.region import Region

PROGRESS_LAYOUT = 0x5045_5250_4A52_0003    # "PERPJR" v3
_FIELDS = ("durable_seq", "journal_errno", "store_seq", "snapshot_seq", "pid",
           "store_quiet_until_ns")
# How long before the store's announced pass `store_wants_cpu` turns true: its timer fires
# late, never early, so this only has to cover a yield in flight when it fires.
STORE_WAKE_LEAD_NS = 1_000_000


class JournalProgress:
    """Named cursors over the progress region (see the module docstring)."""

    def __init__(self, region: Region):
        self.region = region
        for i, name in enumerate(_FIELDS):
            setattr(self, f"_{name}", Cursor.at(region.payload, i * CACHE_LINE))

    @classmethod
    def create(cls, prefix: str) -> JournalProgress:
        return cls(Region.create(names.progress_board(prefix), PROGRESS_LAYOUT,
                                 len(_FIELDS) * CACHE_LINE))

    @classmethod
    def attach(cls, prefix: str) -> JournalProgress:
        return cls(Region.attach(names.progress_board(prefix), PROGRESS_LAYOUT))

    def durable_seq(self) -> int:
        return self._durable_seq.get()

    def journal_errno(self) -> int:
        return self._journal_errno.get()

    def store_seq(self) -> int:
        return self._store_seq.get()

    def snapshot_seq(self) -> int:
        return self._snapshot_seq.get()

    def pid(self) -> int:
        return self._pid.get()

    def store_quiet_until_ns(self) -> int:
        return self._store_quiet_until_ns.get()

    def store_wants_cpu(self) -> bool:
        """Whether the store process is in a pass or starts one within STORE_WAKE_LEAD_NS."""
        return time.monotonic_ns() + STORE_WAKE_LEAD_NS >= self._store_quiet_until_ns.get()

    def wait_durable(self, seq: int, timeout_s: float, poll_s: float = 0.001) -> bool:
        """Whether durable_seq reached seq within timeout_s (polled: a reader outside the
        hot path, such as an operator command or a recovering matcher)."""
        deadline = time.monotonic() + timeout_s
        while self._durable_seq.get() < seq:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_s)
        return True

    # -- persistd only ------------------------------------------------------------------
    def set_durable_seq(self, seq: int) -> None:
        self._durable_seq.set(seq)

    def set_journal_errno(self, err: int) -> None:
        self._journal_errno.set(err)

    def set_store_seq(self, seq: int) -> None:
        self._store_seq.set(seq)

    def set_snapshot_seq(self, seq: int) -> None:
        self._snapshot_seq.set(seq)

    def set_pid(self, pid: int) -> None:
        self._pid.set(pid)

    def set_store_quiet_until_ns(self, monotonic_ns: int) -> None:
        self._store_quiet_until_ns.set(monotonic_ns)

    def as_dict(self) -> dict:
        return {name: getattr(self, name)() for name in _FIELDS}

    def close(self) -> None:
        for name in _FIELDS:
            setattr(self, f"_{name}", None)
        self.region.close()

    def unlink(self) -> None:
        self.region.unlink()
