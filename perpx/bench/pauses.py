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

One CPU gone. A VM also loses one vCPU at a time (the host runs something else on its CPU:
steal), which no intersection shows and which one meter alone cannot tell from our tasks
holding its CPU. So each meter reads its own run_delay (/proc/thread-self/schedstat: ns spent
runnable, waiting on a runqueue) around each sleep. An overrun's run_delay growth is the time
our side kept the meter waiting; the rest is time its wake-up itself came late: its CPU was
not running (host steal) or ran with interrupts off. Where the rest passes MIN_PAUSE_NS,
`PauseMeter.gone` keeps it as a "cpu gone" interval, from the sleep's due end to its actual
end less the run_delay growth: the lengths are measured, the order (late wake-up first, then
the queued wait) is assumed.

The split sees only what delays the wake-up, so "cpu gone" is a lower bound. run_delay runs
on the guest's clock: a CPU that goes once the meter is queued (behind a busy task of ours,
or right after the timer interrupt that woke it) adds to run_delay and counts as ours. On
this VM, idle, CPU 0's perf samples have a ~3 ms gap about once a second that begins just
after such a wake-up, and the meter charges it to run_delay. Steal that falls in a sleep it
does see: with both CPUs busy for 12 s, each of the 5 "cpu gone" intervals (2.3-8.4 ms)
matched a gap in that CPU's `perf record -a -e cpu-clock` samples. A meter that blocks (a
page fault on I/O, a stop signal) is not queued either, and counts as gone.

`summary(...)` says how many late requests waited while any CPU was gone (the union of the
CPUs' intervals), and gives each CPU's steal over the run from /proc/stat, read at the
meter's start and end: the kernel's own figure, in USER_HZ ticks (10 ms), so it comes
rounded.

The meters cost each CPU one wake-up and one schedstat read per SLEEP_S, so they run only
when asked (`--pauses` on `perpx bench latency` and `perpx bench e2e`: e2e.run_phases runs
them; `perpx bench box`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np

from perpx.bench.cpu import cpu_ticks

SLEEP_S = 0.001
MIN_PAUSE_NS = 2_000_000
LATE_NS = 2_000_000


def _steal_ms(cpu: int) -> float:
    """The time the host has taken `cpu` from this VM since boot (/proc/stat's steal column,
    in USER_HZ ticks)."""
    ticks = cpu_ticks().get(f"cpu{cpu}")
    if ticks is None:
        raise LookupError(f"cpu{cpu} not in /proc/stat")
    return ticks[7] * 1000 / os.sysconf("SC_CLK_TCK")


def _meter_main(cpu: int, stop, out) -> None:
    """Sleep SLEEP_S at a time on `cpu` until `stop`: put (cpu, None) once running, then
    (cpu, overruns, cpu gone, steal ms), the first two as [(start, end) ns, ...]."""
    os.sched_setaffinity(0, [cpu])
    schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def run_delay_ns() -> int:
        return int(os.pread(schedstat, 64, 0).split()[1])

    steal_start_ms = _steal_ms(cpu)
    sleep, clock = time.sleep, time.monotonic_ns
    expected = int(SLEEP_S * 1e9)
    pauses, gone = [], []

    def note(before: int, after: int, slept_ns: int, queued_ns: int) -> None:
        """Keep the stretch before..after if it overran slept_ns by more than MIN_PAUSE_NS,
        and the part of it not spent queued if that passes MIN_PAUSE_NS too."""
        overrun = after - before - slept_ns
        if overrun > MIN_PAUSE_NS:
            pauses.append((after - overrun, after))
            if overrun - queued_ns > MIN_PAUSE_NS:
                gone.append((after - overrun, after - queued_ns))

    # Each sleep is timed from the end of the one before, so that a stall between two still
    # lands in an overrun (the bookkeeping's few µs count too, far below MIN_PAUSE_NS); the
    # first from before "running" is put, so that a stall right after the caller's `with`
    # began is seen; and once `stop` is seen, the stretch since the last wake-up is timed
    # too (it slept nothing), so that a stall during the last pass's bookkeeping, which
    # the caller's `with` may end right after, is not lost.
    queued_before_ns = run_delay_ns()
    before = clock()
    out.put((cpu, None))
    while not stop.is_set():
        sleep(SLEEP_S)
        after = clock()
        queued_after_ns = run_delay_ns()
        note(before, after, expected, queued_after_ns - queued_before_ns)
        before, queued_before_ns = after, queued_after_ns
    note(before, clock(), 0, run_delay_ns() - queued_before_ns)
    os.close(schedstat)
    out.put((cpu, pauses, gone, _steal_ms(cpu) - steal_start_ms))


class PauseMeter:
    """`with PauseMeter() as meter:` ... once the block ends, per cpu: `meter.pauses`, its
    overruns, and `meter.gone`, the part of them its CPU was gone, as [(start, end) ns, ...];
    `meter.steal_ms`, what the host took of it meanwhile. Entering returns once every meter
    runs."""

    def __init__(self, cpus=None):
        self.cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        self.pauses: dict[int, list[tuple[int, int]]] = {}
        self.gone: dict[int, list[tuple[int, int]]] = {}
        self.steal_ms: dict[int, float] = {}
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
                cpu, *found = self._out.get(timeout=10)
                if found != [None]:
                    self.pauses[cpu], self.gone[cpu], self.steal_ms[cpu] = found
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


def union(per_cpu: dict[int, list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """The moments any CPU's intervals cover: sorted, disjoint (what `waited_in` takes)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(i for v in per_cpu.values() for i in v):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


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


def _ms(intervals: list[tuple[int, int]]) -> list[float]:
    return [(e - s) / 1e6 for s, e in intervals]


def pause_figures(per_cpu: dict, shared: list[tuple[int, int]], gone: dict,
                  steal_ms: dict) -> dict:
    """The meters' figures: each CPU's pauses over 2 ms, `shared` = platform_pauses(...),
    and per CPU its `gone` intervals (PauseMeter.gone) and its steal."""
    lengths = _ms(shared)
    gone_ms = {str(c): _ms(v) for c, v in sorted(gone.items())}
    return {"per_cpu_over_2ms": {str(c): len(v) for c, v in sorted(per_cpu.items())},
            "platform_pauses": len(shared),
            "platform_pause_max_ms": round(max(lengths), 1) if lengths else 0.0,
            "platform_pause_total_ms": round(sum(lengths), 1),
            "cpu_gone_over_2ms": {c: len(v) for c, v in gone_ms.items()},
            "cpu_gone_max_ms": {c: round(max(v, default=0.0), 1) for c, v in gone_ms.items()},
            "cpu_gone_total_ms": {c: round(sum(v), 1) for c, v in gone_ms.items()},
            "steal_ms": {str(c): round(ms) for c, ms in sorted(steal_ms.items())}}


def summary(per_cpu: dict, due_ns: np.ndarray, latency_ns: np.ndarray, gone: dict,
            steal_ms: dict) -> dict:
    """One run's figures for the JSON: the platform's pauses and the CPUs gone one at a time,
    the late requests, those in a platform pause and those while any CPU was gone, and
    whether the slowest request (if late) waited through each."""
    shared = platform_pauses(per_cpu)
    late, in_pause = late_masks(shared, due_ns, latency_ns)
    in_gone = late & waited_in(union(gone), due_ns, latency_ns)
    slowest = np.argmax(latency_ns) if len(latency_ns) else None
    return {**pause_figures(per_cpu, shared, gone, steal_ms),
            "late_requests": int(late.sum()),
            "late_requests_in_platform_pauses": int(in_pause.sum()),
            "slowest_in_platform_pause": slowest is not None and bool(in_pause[slowest]),
            "late_requests_in_cpu_gone": int(in_gone.sum()),
            "slowest_in_cpu_gone": slowest is not None and bool(in_gone[slowest])}


def describe(figures: dict) -> str:
    """summary()'s figures in one line of a report."""
    gone = ", ".join(f"cpu{c} {n} (max {figures['cpu_gone_max_ms'][c]} ms, "
                     f"{figures['cpu_gone_total_ms'][c]} ms in all; steal "
                     f"{figures['steal_ms'][c]} ms)"
                     for c, n in figures["cpu_gone_over_2ms"].items())
    return (f"platform pauses {figures['platform_pauses']} (max "
            f"{figures['platform_pause_max_ms']} ms, {figures['platform_pause_total_ms']} ms in "
            f"all); {figures['late_requests_in_platform_pauses']} of {figures['late_requests']} "
            f"requests later than 2 ms waited in one"
            + ("; so did the slowest" if figures["slowest_in_platform_pause"] else "")
            + f". cpu gone: {gone}; {figures['late_requests_in_cpu_gone']} of "
              f"{figures['late_requests']} waited while one was"
            + ("; so did the slowest" if figures["slowest_in_cpu_gone"] else ""))
