import os
import subprocess
import sys
import time

import numpy as np
import pytest

from shm.doorbell import Doorbell
from shm.region import Region
from shm.wait import BusySpinWait, IdleCpuYieldWait, SpinYieldBlockWait
from tests.shm_workers import children, shm_prefix, wait_for, wait_until_asleep  # noqa: F401  (fixtures)


def test_sleeping_waiter_is_woken_by_the_doorbell(shm_prefix, children):
    with Doorbell.create(shm_prefix + "-bell") as bell, Region.create(shm_prefix + "-flag", 1, 64) as flag:
        # A 10 s block slice: a wake-up well inside it can only come from the ring.
        children.start("doorbell_waiter", bell.name, flag.name, 30.0, 10.0)
        wait_for(lambda: bell.sleeping, 30, "the waiter to go to sleep")
        rung_at = time.monotonic()
        flag.payload[:8].view(np.int64)[0] = 1
        bell.ring()
        [(_, ok, woke_at)] = children.collect(1, timeout_s=30)
    assert ok
    print(f"\nwake-up latency {1e6 * (woke_at - rung_at):.0f} µs")
    assert woke_at - rung_at < 0.5


def test_waiter_times_out_when_nobody_produces(shm_prefix):
    with Doorbell.create(shm_prefix + "-bell") as bell:
        for wait in (SpinYieldBlockWait(bell, block_slice_s=0.05), BusySpinWait()):
            started = time.monotonic()
            assert not wait.wait_until(lambda: False, timeout_s=0.2)
            assert 0.2 <= time.monotonic() - started < 1.0
        assert not bell.sleeping


def test_ringing_with_nobody_asleep_posts_nothing(shm_prefix):
    with Doorbell.create(shm_prefix + "-bell") as bell:
        for _ in range(1000):
            bell.ring()
        fd = os.open(bell.path, os.O_RDWR | os.O_NONBLOCK)
        try:
            with pytest.raises(BlockingIOError):
                os.read(fd, 1)       # no sleeper, so no byte written (and no syscall)
        finally:
            os.close(fd)


def test_a_late_ringers_byte_costs_one_spurious_wake_up_then_is_drained(shm_prefix):
    with Doorbell.create(shm_prefix + "-bell") as bell:
        token = bell.arm()
        bell.ring()                   # claims this sleep ...
        bell.disarm(token, False)     # ... the sleeper wakes for another reason and drains
        # a ringer that claimed the sleep writes its byte after the drain: it stays behind
        late = os.open(bell.path, os.O_WRONLY | os.O_NONBLOCK)
        os.write(late, b"\1")
        os.close(late)
        started = time.monotonic()
        assert not bell.sleep(lambda: False, 1.0)      # returns at once: the stale byte
        assert time.monotonic() - started < 0.5
        started = time.monotonic()
        assert not bell.sleep(lambda: False, 0.2)      # drained: this one blocks its slice
        assert time.monotonic() - started >= 0.19


def test_no_lost_wake_ups_in_a_thousand_sleeps(shm_prefix, children):
    """Ping-pong where neither side spins: half the rounds ring while the other side is on its
    way to sleep, half once it is asleep. A lost wake-up would cost a 5 s block slice."""
    rounds = 1000
    with Doorbell.create(shm_prefix + "-ping") as ping, Doorbell.create(shm_prefix + "-pong") as pong, \
            Region.create(shm_prefix + "-cells", 1, 128) as cells:
        counters = cells.payload.view(np.int64)
        children.start("ping_pong", ping.name, pong.name, cells.name, rounds)
        wait_for(lambda: ping.sleeping, 30, "the child to start and go to sleep")
        wait = SpinYieldBlockWait(pong, spins=0, yields=0, block_slice_s=5.0)
        started = time.monotonic()
        slowest = 0.0
        for i in range(1, rounds + 1):
            if i % 2 == 1:
                wait_until_asleep(ping)
            sent = time.monotonic()
            counters[0] = i
            ping.ring()
            assert wait.wait_until(lambda: counters.item(8) >= i, timeout_s=30)
            slowest = max(slowest, time.monotonic() - sent)
        elapsed = time.monotonic() - started
        children.collect(1, timeout_s=30)
    print(f"\n{rounds} round trips through sleep: {1e6 * elapsed / rounds:.0f} µs each, slowest {1e3 * slowest:.1f} ms")
    assert slowest < 2.5, "a wake-up was lost and only the block slice recovered it"


def test_idle_cpu_yield_wait_sleeps_once_others_want_the_cpu(shm_prefix):
    """IdleCpuYieldWait yields for up to yield_s only while the CPU has nothing else to run:
    with a busy process on its CPU every yield hands the CPU over, and after `yields` of those
    it goes to sleep on its doorbell instead of yielding for all of yield_s."""
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        with Doorbell.create(shm_prefix + "-bell") as bell:
            checks = []
            wait = IdleCpuYieldWait(bell, yields=5, yield_s=30.0)
            started = time.monotonic()
            # it times out asleep: yielding through the 0.5 s it would check ~10^5 times
            assert not wait.wait_until(lambda: checks.append(1) is not None, timeout_s=0.5)
            assert time.monotonic() - started < 10.0
            assert len(checks) < 10_000, len(checks)
    finally:
        os.sched_setaffinity(0, saved)
        busy.kill()
        busy.wait()


def test_idle_cpu_yield_wait_returns_when_the_condition_holds(shm_prefix):
    with Doorbell.create(shm_prefix + "-bell") as bell:
        wait = IdleCpuYieldWait(bell, yields=5, yield_s=1.0)
        calls = []
        assert wait.wait_until(lambda: calls.append(1) or len(calls) >= 50, timeout_s=5.0)
        assert len(calls) == 50
        assert not bell.sleeping


def test_idle_cpu_yield_wait_sleeps_at_once_beside_a_busy_neighbour(shm_prefix):
    """While busy_neighbour() says a CPU hog is running (persistd's store process writing), the
    waiter does not yield to it: it sleeps on its doorbell at once, even on an idle CPU."""
    with Doorbell.create(shm_prefix + "-bell") as bell:
        checks = []
        wait = IdleCpuYieldWait(bell, yields=5, yield_s=0.2, busy_neighbour=lambda: True)
        assert not wait.wait_until(lambda: checks.append(1) is not None, timeout_s=0.3)
        # asleep through the 0.3 s: a few checks per block slice, where yielding through the
        # first 0.2 s on an idle CPU checks ~10^5 times
        assert len(checks) < 1_000, len(checks)


def test_idle_cpu_yield_wait_stops_yielding_when_the_neighbour_turns_busy(shm_prefix):
    """The neighbour is asked before every yield: one that starts its burst while the waiter
    yields (the store process begins a pass) gets no more of them: the waiter sleeps."""
    with Doorbell.create(shm_prefix + "-bell") as bell:
        checks = []
        wait = IdleCpuYieldWait(bell, yields=5, yield_s=30.0,
                                busy_neighbour=lambda: len(checks) >= 100)
        assert not wait.wait_until(lambda: checks.append(1) is not None, timeout_s=0.5)
        # 100 yields on an idle CPU, then asleep: yielding on through the 0.5 s would check
        # ~10^5 times
        assert 100 <= len(checks) < 1_000, len(checks)
