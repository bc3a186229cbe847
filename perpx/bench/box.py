"""`perpx bench box`: what the platform itself costs, with no exchange running.

The exchange's tail is bounded below by the box: a VM that stops its CPUs, a disk whose
`fdatasync` stalls. Four measurements, `seconds` each, one after the other:

- pauses, idle: perpx/bench/pauses.py's meters (one pinned 1 ms sleeper per CPU) alone;
- pauses, busy: the same beside one busy loop per CPU (a host that throttles or deschedules a
  busy VM shows here: both CPUs stalled at once). The meters then compete with the loops, so
  a pause seen by one CPU is mostly the scheduler's: only the part its meter was not kept
  waiting on a runqueue (`cpu_gone_*`) is that CPU gone, and `platform_pauses` (all CPUs
  at once) the whole VM;
- fdatasync, alone: the journal's pattern, a small overwrite (JOURNAL_WRITE_BYTES, in
  pre-zeroed space) then `fdatasync`, RATE_PER_S times a second, on the state directory's
  disk (`--dir`, default a temporary directory);
- fdatasync, beside a writer: the same while another thread writes NEIGHBOUR_BYTES and
  fsyncs them once a second (the DuckDB store's commits, roughly);
- wake-ups, twice: a byte's round trip between a process on the first CPU (the order path's)
  and one on the last, every WAKE_INTERVAL_S (a gap between orders at 1,000 orders/s), so
  both CPUs idle in between and each trip wakes two of them: first with idle CPUs as the
  host has them, then while this process asks for polling idle CPUs (perpx/cpu_latency.py,
  what the supervisor asks for by default). Their difference is what
  `exchange.cpu_latency_us` buys on this box.

Per fsync and wake-up run: p50, p99, p99.9 and max (µs); per fsync run how many took over
2 ms.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from perpx.bench import pauses as platform
from perpx.bench.matcher import percentiles_us
from perpx.cpu_latency import CpuLatencyRequest, current_limit_us

DEFAULT_SECONDS = 10.0
RATE_PER_S = 1_000
JOURNAL_WRITE_BYTES = 192           # a batch header and two records
PREZEROED_BYTES = 64 << 20
NEIGHBOUR_BYTES = 4 << 20
SLOW_NS = 2_000_000
WAKE_INTERVAL_S = 0.001


def _spin(cpu: int, stop) -> None:
    os.sched_setaffinity(0, [cpu])
    while not stop.is_set():
        for _ in range(100_000):
            pass


def _pauses(seconds: float, busy: bool) -> dict:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    loops = [ctx.Process(target=_spin, args=(cpu, stop), daemon=True)
             for cpu in sorted(os.sched_getaffinity(0))] if busy else []
    for p in loops:
        p.start()
    try:
        with platform.PauseMeter() as meter:
            time.sleep(seconds)
    finally:
        stop.set()
        for p in loops:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    shared = platform.platform_pauses(meter.pauses)
    return {"seconds": seconds, "busy_loops": len(loops),
            **platform.pause_figures(meter.pauses, shared, meter.gone, meter.steal_ms),
            "platform_pause_lengths_ms": sorted(round((end - start) / 1e6, 1)
                                                for start, end in shared)}


def _neighbour(directory: Path, stop: threading.Event) -> None:
    fd = os.open(directory / "neighbour", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block, offset = os.urandom(NEIGHBOUR_BYTES), 0
        while not stop.is_set():
            os.pwrite(fd, block, offset)
            offset += NEIGHBOUR_BYTES
            os.fsync(fd)
            stop.wait(1.0)
    finally:
        os.close(fd)


def _fsyncs(directory: Path, seconds: float, neighbour: bool) -> dict:
    path = directory / "journal"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    stop = threading.Event()
    writer = threading.Thread(target=_neighbour, args=(directory, stop), daemon=True)
    try:
        os.pwrite(fd, bytes(PREZEROED_BYTES), 0)
        os.fsync(fd)
        if neighbour:
            writer.start()
        record = b"x" * JOURNAL_WRITE_BYTES
        interval = 1e9 / RATE_PER_S
        took, offset = [], 0
        start = time.monotonic_ns()
        due = start
        while due < start + seconds * 1e9 and offset + len(record) <= PREZEROED_BYTES:
            wait = (due - time.monotonic_ns()) / 1e9
            if wait > 0:
                time.sleep(wait)
            before = time.monotonic_ns()
            os.pwrite(fd, record, offset)
            os.fdatasync(fd)
            took.append(time.monotonic_ns() - before)
            offset += len(record)
            due += interval
    finally:
        stop.set()
        if writer.is_alive():
            writer.join(5)
        os.close(fd)
        path.unlink()
        (directory / "neighbour").unlink(missing_ok=True)
    ns = np.asarray(took, dtype=np.int64)
    return {"seconds": seconds, "neighbour_bytes_per_s": NEIGHBOUR_BYTES if neighbour else 0,
            "syncs": int(len(ns)), **_percentiles(ns), "over_2ms": int((ns > SLOW_NS).sum())}


def _percentiles(ns: np.ndarray) -> dict:
    """p50_us, p99_us, p999_us, max_us, to 0.1 µs."""
    return {f"{name}_us": round(us, 1) for name, us in percentiles_us(ns).items()}


def _echo(cpu: int, conn) -> None:
    os.sched_setaffinity(0, [cpu])
    try:
        while True:
            conn.send_bytes(conn.recv_bytes())
    except EOFError:
        pass


def _ping(cpu: int, conn, seconds: float, results) -> None:
    os.sched_setaffinity(0, [cpu])
    took = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(WAKE_INTERVAL_S)
        before = time.monotonic_ns()
        conn.send_bytes(b"x")
        conn.recv_bytes()
        took.append(time.monotonic_ns() - before)
    results.put(took)


def _wakeups(seconds: float) -> dict:
    """Round trips between the first and the last CPU, both idle between trips, and the
    CPU latency limit in force meanwhile (None where it cannot be read)."""
    ctx = mp.get_context("spawn")
    cpus = sorted(os.sched_getaffinity(0))
    near, far = ctx.Pipe()
    results = ctx.Queue()
    echo = ctx.Process(target=_echo, args=(cpus[0], far), daemon=True)
    ping = ctx.Process(target=_ping, args=(cpus[-1], near, seconds, results), daemon=True)
    echo.start()
    ping.start()
    try:
        took = results.get(timeout=seconds + 60)
    finally:
        for p in (ping, echo):
            p.kill()
            p.join(5)
    try:
        limit_us = current_limit_us()
    except OSError:
        limit_us = None
    ns = np.asarray(took, dtype=np.int64)
    return {"seconds": seconds, "cpus": [cpus[0], cpus[-1]], "trips": int(len(ns)),
            **_percentiles(ns), "cpu_latency_limit_us": limit_us}


def bench_box(seconds: float = DEFAULT_SECONDS, directory=None, progress=None) -> dict:
    say = progress or (lambda msg: None)
    res = {"benchmark": "box", "cpus": len(os.sched_getaffinity(0))}
    for name, busy in (("pauses_idle", False), ("pauses_busy", True)):
        say(f"{name.replace('_', ', ')}: {seconds:g} s")
        res[name] = _pauses(seconds, busy)
    with tempfile.TemporaryDirectory(prefix="perpx-box-", dir=directory) as tmp:
        res["fsync_dir"] = str(Path(tmp).parent)
        for name, neighbour in (("fsync_alone", False), ("fsync_beside_writer", True)):
            say(f"{name.replace('_', ' ')}: {seconds:g} s")
            res[name] = _fsyncs(Path(tmp), seconds, neighbour)
    say(f"wake-ups, idle cpus as the host has them: {seconds:g} s")
    res["wakeups_host_idle"] = _wakeups(seconds)
    with CpuLatencyRequest(0) as polling:
        if polling.held:
            say(f"wake-ups, idle cpus polling: {seconds:g} s")
            res["wakeups_polling"] = _wakeups(seconds)
        else:
            res["wakeups_polling"] = {"refused": polling.refused}
    return res


def _pause_line(p: dict, res: dict) -> str:
    return (f"{p['platform_pauses']} pauses of every cpu at once over 2 ms in {p['seconds']:g} "
            f"s (max {p['platform_pause_max_ms']} ms); per cpu over 2 ms: "
            f"{p['per_cpu_over_2ms']}, of them gone (no run_delay to explain them): "
            f"{p['cpu_gone_over_2ms']}; steal ms {p['steal_ms']}")


def _fsync_line(f: dict, res: dict) -> str:
    return (f"{JOURNAL_WRITE_BYTES} B + fdatasync at {RATE_PER_S:,}/s in {res['fsync_dir']}: "
            f"p50 {f['p50_us']} p99 {f['p99_us']} p99.9 {f['p999_us']} max {f['max_us']} µs, "
            f"{f['over_2ms']} of {f['syncs']} over 2 ms")


def _wakeup_line(w: dict, res: dict) -> str:
    if "refused" in w:
        return f"not measured: {w['refused']}"
    return (f"round trip cpu{w['cpus'][0]} <-> cpu{w['cpus'][1]} every "
            f"{WAKE_INTERVAL_S * 1e3:g} ms: p50 {w['p50_us']} p99 {w['p99_us']} p99.9 "
            f"{w['p999_us']} max {w['max_us']} µs")


REPORT_ROWS = (("pauses, idle", "pauses_idle", _pause_line),
               ("pauses, busy", "pauses_busy", _pause_line),
               ("fsync alone", "fsync_alone", _fsync_line),
               ("fsync beside writer", "fsync_beside_writer", _fsync_line),
               ("wake-ups, host idle", "wakeups_host_idle", _wakeup_line),
               ("wake-ups, polling", "wakeups_polling", _wakeup_line))


def format_report(res: dict) -> str:
    return "\n".join([f"box: {res['cpus']} cpus; nothing of the exchange runs"] +
                     [f"{label:22} {line(res[key], res)}" for label, key, line in REPORT_ROWS])
