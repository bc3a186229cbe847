"""perpx/bench/pauses.py: the platform's pauses are the moments every CPU's meter stalled at
once, and late requests are charged to them only when they waited through one."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from perpx.bench.pauses import PauseMeter, late_requests, platform_pauses, summary

MS = 1_000_000


def test_platform_pauses_are_where_every_cpu_stalled_at_once():
    per_cpu = {0: [(10 * MS, 40 * MS), (100 * MS, 103 * MS), (200 * MS, 230 * MS)],
               1: [(15 * MS, 50 * MS), (101 * MS, 102 * MS), (300 * MS, 330 * MS)],
               2: [(0, 30 * MS), (99 * MS, 110 * MS)]}
    # 15-30 ms is common to all three; 101-102 ms is too short; 200 and 300 are one CPU's
    assert platform_pauses(per_cpu) == [(15 * MS, 30 * MS)]
    assert platform_pauses({0: per_cpu[0]}) == sorted(per_cpu[0])
    assert platform_pauses({0: per_cpu[0], 1: []}) == []


def test_late_requests_count_only_those_waiting_through_a_pause():
    pauses = [(100 * MS, 130 * MS), (500 * MS, 510 * MS)]
    due = np.array([90, 95, 131, 400, 505, 600], dtype=np.int64) * MS
    latency = np.array([5, 40, 3, 50, 6, 1], dtype=np.int64) * MS
    # late (> 2 ms): all but the last; in a pause: 95+40 spans 100-130, 505+6 sits in
    # 500-510; 90+5 ends before 100, 131+3 starts after 130, 400+50 ends before 500
    assert late_requests(pauses, due, latency) == (5, 2)
    assert late_requests([], due, latency) == (5, 0)


def test_meters_see_a_stall_of_every_cpu_as_a_platform_pause():
    """Stopping every meter at once for 80 ms is what a paused VM looks like to them."""
    with PauseMeter() as meter:
        pids = [p.pid for p in meter._procs]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic_ns()
        time.sleep(0.08)                 # the stall itself, not a wait for a condition
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        resumed_at = time.monotonic_ns()
    assert sorted(meter.pauses) == sorted(os.sched_getaffinity(0))
    shared = platform_pauses(meter.pauses)
    assert any(start < resumed_at and end > stopped_at and end - start >= 60 * MS
               for start, end in shared), (shared, stopped_at, resumed_at)
    res = summary(meter.pauses, np.array([stopped_at], dtype=np.int64),
                  np.array([resumed_at - stopped_at], dtype=np.int64))
    assert res["platform_pauses"] >= 1 and res["platform_pause_max_ms"] >= 60
    assert res["late_requests"] == 1 and res["late_requests_in_platform_pauses"] == 1
    assert res["slowest_in_platform_pause"]
