"""Pauses of the platform itself, measured beside a benchmark run (as jHiccup does).

`PauseMeter` runs one small process per CPU, pinned to it, that sleeps SLEEP_S in a loop and
keeps every sleep that overran by more than MIN_PAUSE_NS, as (start, end) in CLOCK_MONOTONIC
ns (the clock the benchmark's clients stamp requests with).

A meter is an ordinary process: a CPU busy with the exchange may run it late by a scheduler
slice, so what one meter sees may be our own doing. What the meters of every CPU see at the
same moment is the platform's (the hypervisor not running the VM, or the kernel holding all
CPUs): nothing the exchange does on one CPU keeps the other CPU's meter from waking.
`platform_pauses` keeps only those. On this VM, idle, there are none over 5 ms in 30 s; with
both CPUs busy there are 15-60 ms ones every several seconds (docs/tuning.md).

`late_requests(...)` then says how many of the requests whose latency passed LATE_NS were
waiting while the platform paused: the part of a latency tail the exchange could not help.
The meters cost each CPU one wake-up per SLEEP_S, so they run only when asked
(`--pauses` on `perpx bench latency` and `perpx bench e2e`: e2e.run_phases runs them).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np

SLEEP_S = 0.001
MIN_PAUSE_NS = 2_000_000
LATE_NS = 2_000_000


def _meter_main(cpu: int, stop, out) -> None:
    """Sleep SLEEP_S at a time on `cpu` until `stop`: put (cpu, None) once running, then
    (cpu, [(start, end) ns, ...])."""
    os.sched_setaffinity(0, [cpu])
    out.put((cpu, None))
    sleep, clock = time.sleep, time.monotonic_ns
    expected = int(SLEEP_S * 1e9)
    pauses = []
    while not stop.is_set():
        before = clock()
        sleep(SLEEP_S)
        after = clock()
        overrun = after - before - expected
        if overrun > MIN_PAUSE_NS:
            pauses.append((after - overrun, after))
    out.put((cpu, pauses))


class PauseMeter:
    """`with PauseMeter() as meter:` ... `meter.pauses`: {cpu: [(start, end) ns, ...]} once the
    block ends. Entering returns once every meter runs."""

    def __init__(self, cpus=None):
        self.cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        self.pauses: dict[int, list[tuple[int, int]]] = {}
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()
        self._out = self._ctx.Queue()
        self._procs: list = []

    def __enter__(self) -> PauseMeter:
        for cpu in self.cpus:
            p = self._ctx.Process(target=_meter_main, args=(cpu, self._stop, self._out),
                                  daemon=True)
            p.start()
            self._procs.append(p)
        try:
            for _ in self._procs:
                self._out.get(timeout=30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            while len(self.pauses) < len(self._procs):
                cpu, pauses = self._out.get(timeout=10)
                if pauses is not None:
                    self.pauses[cpu] = pauses
        finally:
            for p in self._procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)


def platform_pauses(per_cpu: dict[int, list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """The moments every CPU's meter was paused, for more than MIN_PAUSE_NS at once: the
    intersection of their pause intervals."""
    lists = [sorted(v) for v in per_cpu.values()]
    if not lists:
        return []
    common = lists[0]
    for other in lists[1:]:
        both, i, j = [], 0, 0
        while i < len(common) and j < len(other):
            start = max(common[i][0], other[j][0])
            end = min(common[i][1], other[j][1])
            if start < end:
                both.append((start, end))
            if common[i][1] < other[j][1]:      # drop the one that ends first
                i += 1
            else:
                j += 1
        common = both
    return [(s, e) for s, e in common if e - s > MIN_PAUSE_NS]


def waited_in(pauses: list[tuple[int, int]], due_ns: np.ndarray,
              latency_ns: np.ndarray) -> np.ndarray:
    """Per request, whether it was waiting during one of `pauses` (disjoint, sorted): a
    request waits from its intended send time, due_ns, to its reply."""
    if not pauses:
        return np.zeros(len(due_ns), dtype=bool)
    p = np.asarray(pauses, dtype=np.int64)
    # it overlaps a pause if the last pause starting before its reply ends after its send
    k = np.searchsorted(p[:, 0], due_ns + latency_ns, side="left") - 1
    return (k >= 0) & (p[np.maximum(k, 0), 1] > due_ns)


def late_masks(pauses: list[tuple[int, int]], due_ns: np.ndarray,
               latency_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per request, (later than LATE_NS, that and waiting during one of `pauses`)."""
    late = latency_ns > LATE_NS
    return late, late & waited_in(pauses, due_ns, latency_ns)


def late_requests(pauses: list[tuple[int, int]], due_ns: np.ndarray,
                  latency_ns: np.ndarray) -> tuple[int, int]:
    """(requests later than LATE_NS, those of them waiting during one of `pauses`)."""
    late, in_pause = late_masks(pauses, due_ns, latency_ns)
    return int(late.sum()), int(in_pause.sum())


def pause_figures(per_cpu: dict, shared: list[tuple[int, int]]) -> dict:
    """The meters' figures: each CPU's pauses over 2 ms, and `shared` = platform_pauses(...)."""
    lengths = [(e - s) / 1e6 for s, e in shared]
    return {"per_cpu_over_2ms": {str(c): len(v) for c, v in sorted(per_cpu.items())},
            "platform_pauses": len(shared),
            "platform_pause_max_ms": round(max(lengths), 1) if lengths else 0.0,
            "platform_pause_total_ms": round(sum(lengths), 1)}


def summary(per_cpu: dict, due_ns: np.ndarray, latency_ns: np.ndarray) -> dict:
    """One run's figures for the JSON: the platform's pauses, the late requests and those in
    a pause, and whether the slowest request (if late) waited through one."""
    shared = platform_pauses(per_cpu)
    late, in_pause = late_masks(shared, due_ns, latency_ns)
    return {**pause_figures(per_cpu, shared),
            "late_requests": int(late.sum()),
            "late_requests_in_platform_pauses": int(in_pause.sum()),
            "slowest_in_platform_pause": bool(len(latency_ns))
            and bool(in_pause[np.argmax(latency_ns)])}


def describe(figures: dict) -> str:
    """summary()'s figures in one line of a report."""
    return (f"platform pauses {figures['platform_pauses']} (max "
            f"{figures['platform_pause_max_ms']} ms, {figures['platform_pause_total_ms']} ms in "
            f"all); {figures['late_requests_in_platform_pauses']} of {figures['late_requests']} "
            f"requests later than 2 ms waited in one"
            + ("; so did the slowest" if figures["slowest_in_platform_pause"] else ""))
