"""persistd's progress board (shm/progress.py): what the store process announces about its CPU."""

from __future__ import annotations

import time

from shm.progress import STORE_WAKE_LEAD_NS, JournalProgress
from tests.shm_workers import shm_prefix  # noqa: F401  (fixture)


def test_store_wants_cpu_from_shortly_before_its_announced_pass(shm_prefix):
    progress = JournalProgress.create(shm_prefix)
    try:
        # a new board (and a store in its pass) says 0: it wants the CPU now
        assert progress.store_wants_cpu()
        far = time.monotonic_ns() + 10 * STORE_WAKE_LEAD_NS
        progress.set_store_quiet_until_ns(far)
        assert not progress.store_wants_cpu()
        # within the lead of the announced time it counts as busy: its timer may fire during
        # the journal's next yield
        progress.set_store_quiet_until_ns(time.monotonic_ns() + STORE_WAKE_LEAD_NS // 2)
        assert progress.store_wants_cpu()
        progress.set_store_quiet_until_ns(time.monotonic_ns() - 1)   # late: still busy
        assert progress.store_wants_cpu()
        assert progress.as_dict()["store_quiet_until_ns"] > 0
    finally:
        progress.close()
        progress.unlink()
