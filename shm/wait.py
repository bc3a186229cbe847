"""Wait strategies: how a process waits for a condition on shared memory, as in the Disruptor.

Producers and consumers never wait inside compiled code (numba would hoist the cursor load
out of the loop, see DESIGN.md section 2); they wait here, in Python, and then hand the
already-published batch to compiled code. A strategy is built for one waiter and its
doorbell; rings take a factory ``Callable[[Doorbell], WaitStrategy]`` so the choice stays
pluggable. Their default is ``SpinYieldBlockWait``: this box has 2 cores, so nothing may
busy-spin; on a dedicated box pass ``lambda bell: BusySpinWait()``.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Protocol

from shm.doorbell import Doorbell

Condition = Callable[[], bool]

# Measured on the 2-core VM this runs on: one condition check (a cursor load and a compare
# through numpy) ~0.3 µs; os.sched_yield() ~1 µs when nobody else is runnable; waking a
# process blocked on the semaphore ~100-250 µs from ring() to running (test_shm_wait prints it).
# Spinning plus yielding lasts about one wake-up, so a stream with short gaps never pays for
# a sleep, and a long gap costs at most about twice the unavoidable wake-up.
DEFAULT_SPINS = 100  # ~30 µs: short, because a spinning process takes a core another one needs.
DEFAULT_YIELDS = 50  # >= 50 µs: each yield lets whoever is runnable on this core go first.
# The sleeper re-checks at least this often without being rung, so a producer killed between
# its publish and its ring() cannot strand its consumer; idle cost: 20 wake-ups/s.
DEFAULT_BLOCK_SLICE_S = 0.05
# A yield that takes longer than this ran somebody else (an idle CPU's yield: ~1 µs).
HANDED_OVER_S = 20e-6


class WaitStrategy(Protocol):
    def wait_until(self, condition: Condition, timeout_s: float | None = None) -> bool:
        """Return True as soon as ``condition()`` holds, False if ``timeout_s`` passes first."""


class BusySpinWait:
    """Poll without pause: lowest latency, burns a whole core. Only for a box with a core per process."""

    _CLOCK_EVERY = 1024  # reading the clock costs more than a condition check

    def wait_until(self, condition: Condition, timeout_s: float | None = None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        polls = 0
        while not condition():
            polls += 1
            if deadline is not None and polls % self._CLOCK_EVERY == 0 and time.monotonic() >= deadline:
                return condition()
        return True


class SpinYieldBlockWait:
    """Spin, then yield the core, then sleep on the doorbell: the default on a shared box.

    A stream that keeps coming is caught while spinning; a short gap costs a few yields, which
    hand the core to whoever else needs it (2 cores, 4+ processes); a real pause puts the
    waiter to sleep, to be woken by the producer's ``doorbell.ring()``.
    """

    def __init__(
        self,
        doorbell: Doorbell,
        spins: int = DEFAULT_SPINS,
        yields: int = DEFAULT_YIELDS,
        block_slice_s: float = DEFAULT_BLOCK_SLICE_S,
    ):
        self.doorbell = doorbell
        self.spins = spins
        self.yields = yields
        self.block_slice_s = block_slice_s

    def wait_until(self, condition: Condition, timeout_s: float | None = None) -> bool:
        for _ in range(self.spins + 1):
            if condition():
                return True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self._yield_phase(condition):
            return True
        while True:
            slice_s = self.block_slice_s
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return condition()
                slice_s = min(slice_s, remaining)
            if self.doorbell.sleep(condition, slice_s):
                return True

    def _yield_phase(self, condition: Condition) -> bool:
        """Yield the CPU between checks; True as soon as ``condition()`` holds."""
        for _ in range(self.yields):
            os.sched_yield()
            if condition():
                return True
        return False


class IdleCpuYieldWait(SpinYieldBlockWait):
    """Yield for as long as nobody else wants the CPU, then sleep: persistd's journal thread
    between durable passes.

    While the CPU has nothing else to run, a yield returns at once and the waiter stays awake:
    on this VM waking a waiter on another CPU costs ~180 µs of the durable ack. As soon as
    others want the CPU, every yield hands it over for a time slice, and a waiter that stayed
    runnable would take its fair share of the CPU from them while waiting: after ``yields``
    such yields (each longer than HANDED_OVER_S) it sleeps. ``yield_s`` bounds the idle
    yielding. (Tried for the matcher too and not kept: docs/tuning.md, "The matcher's wait".)
    """

    def __init__(self, doorbell: Doorbell, yields: int, yield_s: float,
                 busy_neighbour: Condition | None = None):
        """busy_neighbour: when it returns True, sleep at once: a known CPU hog would get each
        yield's time slice (a SCHED_IDLE one until the next tick, 4 ms here), whereas a sleeper
        that is woken preempts it at once."""
        super().__init__(doorbell, spins=0, yields=yields)
        self.yield_s = yield_s
        self.busy_neighbour = busy_neighbour or (lambda: False)

    def _yield_phase(self, condition: Condition) -> bool:
        busy = self.busy_neighbour
        clock = time.perf_counter
        handed_over = 0
        now = clock()
        until = now + self.yield_s
        # the neighbour is asked before every yield: it may start its burst meanwhile
        while now < until and handed_over < self.yields and not busy():
            os.sched_yield()
            if condition():
                return True
            before, now = now, clock()
            if now - before > HANDED_OVER_S:
                handed_over += 1
        return False


WaitFactory = Callable[[Doorbell], WaitStrategy]

# Yields before sleeping for a waiter whose producer runs on the same CPU: spinning would only
# keep the producer off it (`perpx bench e2e` chose the count: docs/tuning.md).
SHARED_CPU_YIELDS = 20


def shared_cpu_wait(doorbell: Doorbell, yields: int = SHARED_CPU_YIELDS) -> SpinYieldBlockWait:
    """The wait for a consumer that shares its CPU with its producer: yield, then sleep."""
    return SpinYieldBlockWait(doorbell, spins=0, yields=yields)
