"""perpx/bench/pauses.py: the platform's pauses are the moments every CPU's meter stalled at
once, a CPU is gone when its meter woke late without waiting on a runqueue, and late requests
are charged to either only when they waited through one."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from perpx.bench.pauses import PauseMeter, late_requests, platform_pauses, summary, union

MS = 1_000_000


def check_cpu_gone(figures: dict, cpus: int) -> None:
    """pause_figures' per-CPU figures, as the benchmarks report them: every CPU has each, a
    CPU is gone only in some of its overruns, each time for over 2 ms."""
    per_cpu = figures["per_cpu_over_2ms"]
    assert len(per_cpu) == cpus, figures
    for key in ("cpu_gone_over_2ms", "cpu_gone_max_ms", "cpu_gone_total_ms", "steal_ms"):
        assert sorted(figures[key]) == sorted(per_cpu), (key, figures)
    for cpu, gone in figures["cpu_gone_over_2ms"].items():
        longest, total = figures["cpu_gone_max_ms"][cpu], figures["cpu_gone_total_ms"][cpu]
        assert 0 <= gone <= per_cpu[cpu], figures
        assert 2 * gone <= total and longest <= total and (gone > 0 or total == 0), figures
        assert figures["steal_ms"][cpu] >= 0, figures


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
                  np.array([resumed_at - stopped_at], dtype=np.int64), meter.gone,
                  meter.steal_ms)
    assert res["platform_pauses"] >= 1 and res["platform_pause_max_ms"] >= 60
    assert res["late_requests"] == 1 and res["late_requests_in_platform_pauses"] == 1
    assert res["slowest_in_platform_pause"]
    # a stopped meter is not on a runqueue: to the split, its CPU was gone, as with steal
    for cpu in meter.pauses:
        assert any(start < resumed_at and end > stopped_at and end - start >= 60 * MS
                   for start, end in meter.gone[cpu]), (cpu, meter.gone[cpu])
    assert min(res["cpu_gone_max_ms"].values()) >= 60 and res["slowest_in_cpu_gone"]
    assert sorted(res["steal_ms"]) == sorted(res["per_cpu_over_2ms"])
    assert all(ms >= 0 for ms in res["steal_ms"].values())


def _hog(cpu: int, seconds: float, started) -> None:
    """Hold `cpu` for `seconds` at real-time priority: its CFS tasks wait, runnable."""
    os.sched_setaffinity(0, [cpu])
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    started.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_meter_kept_waiting_by_our_own_task_is_not_a_cpu_gone():
    """A real-time task of ours holding a meter's CPU for 60 ms overruns that meter by about
    as much, all of it run_delay: not time the CPU was gone."""
    cpu = max(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    with PauseMeter([cpu]) as meter:
        hog = ctx.Process(target=_hog, args=(cpu, 0.06, started))
        hog.start()
        hog.join(10)
    if hog.exitcode != 0 or not started.is_set():
        pytest.skip(f"no SCHED_FIFO here (exit {hog.exitcode})")
    start, end = max(meter.pauses[cpu], key=lambda p: p[1] - p[0])
    assert end - start >= 40 * MS, meter.pauses
    # the host may take the CPU meanwhile (a few ms at a time here), never most of 40 ms
    gone_ns = sum(min(e, end) - max(s, start) for s, e in meter.gone[cpu]
                  if s < end and e > start)
    assert gone_ns < (end - start) / 2, (start, end, meter.gone)


def test_the_cpus_gone_are_their_union_and_late_requests_are_charged_to_it():
    gone = {0: [(100 * MS, 109 * MS), (300 * MS, 303 * MS)],
            1: [(105 * MS, 120 * MS), (200 * MS, 204 * MS), (303 * MS, 306 * MS)]}
    # 100-109 and 105-120 overlap, 300-303 and 303-306 touch: each becomes one interval
    assert union(gone) == [(100 * MS, 120 * MS), (200 * MS, 204 * MS), (300 * MS, 306 * MS)]
    assert union({0: [], 1: []}) == [] and union({}) == []
    due = np.array([90, 110, 150, 201, 295, 306], dtype=np.int64) * MS
    latency = np.array([15, 1, 30, 3, 4, 9], dtype=np.int64) * MS
    # late: all but 110+1. While a cpu was gone: 90+15 reaches 100-120, 201+3 sits in
    # 200-204; 150+30 is between, 295+4 ends before 300, 306+9 starts when 300-306 ends
    overruns = {0: [(99 * MS, 109 * MS)], 1: [(104 * MS, 120 * MS)]}
    res = summary(overruns, due, latency, gone, {0: 20.0, 1: 0.0})
    assert res["late_requests"] == 5 and res["late_requests_in_cpu_gone"] == 2
    assert not res["slowest_in_cpu_gone"]               # 150+30 waited through none
    # the overruns' intersection, 104-109, is a platform pause; 90+15 waited in it
    assert res["platform_pauses"] == 1 and res["late_requests_in_platform_pauses"] == 1
    assert res["cpu_gone_over_2ms"] == {"0": 2, "1": 3}
    assert res["cpu_gone_max_ms"] == {"0": 9.0, "1": 15.0}
    assert res["cpu_gone_total_ms"] == {"0": 12.0, "1": 22.0}
    assert res["steal_ms"] == {"0": 20, "1": 0}
    slowest = summary(overruns, due[:2], latency[:2], gone, {0: 20.0, 1: 0.0})
    assert slowest["late_requests_in_cpu_gone"] == 1 and slowest["slowest_in_cpu_gone"]
