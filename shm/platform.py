"""What shm/ assumes about the CPU, stated once and checked at import.

The rings publish by "write the records, then store the cursor (one aligned int64)", and
readers load the cursor, then the records. That is only correct without fences when stores
are seen in program order and loads are not reordered with each other: x86-64's total store
order (TSO). On a weaker memory model (ARM, POWER) a reader could see the new cursor before
the records it covers, so we refuse to run there rather than corrupt state silently.

TSO still lets a load overtake an earlier store to another address. The doorbell needs that
order ("I store that I sleep, then re-check the cursor" against "I store the cursor, then check
who sleeps"), so it calls ``full_fence()``.
"""

from __future__ import annotations

import platform
import threading

from shm.region import ShmError

_TSO_MACHINES = frozenset({"x86_64", "amd64"})


def require_tso() -> None:
    machine = platform.machine().lower()
    if machine not in _TSO_MACHINES:
        raise ShmError(
            f"perpx shared-memory rings assume x86-64 total store order; this machine is {machine!r}. "
            "Publishing records then a cursor without memory fences is unsafe here."
        )


_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier (store-load included), from Python.

    Python has no mfence. CPython's lock is a POSIX semaphore on Linux
    (``sys.thread_info.lock``), which glibc acquires uncontended with ``lock cmpxchg`` and
    releases with ``lock xadd``; every locked instruction is a full barrier on x86-64. Costs ~0.3 µs here, so it is kept off the per-record path: it runs
    once per publish/advance and around going to sleep.
    """
    _fence_lock.acquire()
    _fence_lock.release()
