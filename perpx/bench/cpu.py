"""Where a benchmark's CPU went: each process's CPU time per order over the timed window, by
role, and how busy each CPU was.

Read from /proc at the window's start and end (a thread waits for both): the time on a CPU
of every thread of every descendant of the benchmark's process (schedstat, in ns), and each
CPU's idle time from /proc/stat. A thread started inside the window counts from its start;
one that ended inside it is not counted (the benchmarks' processes and their threads live
through their windows). Roles:
- the exchange's processes by their command line (`-m perpx.matcherd` is "matcher", `-m
  persistd --store` "store", ...: see ROLES);
- the benchmark's own spawned processes by the name they give themselves (`name_process`):
  the clients ("client"), the floors' servers ("echo", "relay-gateway", "relay-matcher");
- anything else "other" (the pause meters, multiprocessing's helpers).

The figures say why two runs differ in throughput: a closed loop with CPU 0 busy all the
time is bound by the CPU per order spent there, one with CPU to spare by its round trip
(docs/tuning.md, "Seventh pass").
"""

from __future__ import annotations

import os
import threading
import time

# `python -m MODULE` -> role, for the exchange's processes (perpx/supervisor.py starts them)
ROLES = {"perpx.matcherd": "matcher", "gateway": "gateway", "persistd": "persistd",
         "riskd": "riskd", "perpx.cli": "supervisor"}
NAMED = ("client", "echo", "relay-gateway", "relay-matcher")


def name_process(name: str) -> None:
    """Give this process (its main thread) one of NAMED as its `comm`, which `role_of` reads;
    threads started afterwards inherit it."""
    with open("/proc/self/comm", "w") as f:
        f.write(name)


def role_of(pid: int) -> str:
    """The role of a running process (see the module docstring); "other" if unknown or
    gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        if comm in NAMED:
            return comm
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "other"
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        if module == "persistd" and "--store" in argv:
            return "store"
        return ROLES.get(module, "other")
    return "other"


def descendants(root: int) -> list[int]:
    """The pids of root's children, their children, and so on, as they run now."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(
                int(name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def _thread_cpu_ns(pid: int) -> dict[int, int]:
    """ns on a CPU of each of the process's threads (/proc/PID/task/TID/schedstat: exact,
    where /proc/PID/stat counts clock ticks); empty if it is gone."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except OSError:
            continue           # the thread ended meanwhile
    return out


def _cpu_idle() -> dict[str, tuple[int, int]]:
    """{"cpuN": (idle + iowait ticks, all ticks)}."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *ticks = line.split()
                values = [int(t) for t in ticks[:8]]
                out[name] = (values[3] + values[4], sum(values))
    return out


class CpuWindow:
    """Reads /proc at `start` (time.monotonic()) and `seconds` later, on its own (daemon)
    thread; a phase that fails leaves it to finish its two readings unread.

    `figures(orders)` (after the window, it waits for the second reading) returns
    {"cpu_us_per_order": {role: µs of CPU per order}, "cpu_busy": {"cpuN": fraction}}; empty
    maps when no order was counted."""

    def __init__(self, start: float, seconds: float):
        self._start, self._seconds = start, seconds
        self._readings: list = []
        self._thread = threading.Thread(target=self._run, name="cpu-window", daemon=True)
        self._thread.start()

    def _read(self) -> tuple:
        """({pid: (role, {tid: ns})}, per-CPU idle)."""
        return ({pid: (role_of(pid), _thread_cpu_ns(pid)) for pid in descendants(os.getpid())},
                _cpu_idle())

    def _run(self) -> None:
        for at in (self._start, self._start + self._seconds):
            time.sleep(max(0.0, at - time.monotonic()))
            self._readings.append(self._read())

    def figures(self, orders: int) -> dict:
        self._thread.join()
        if orders <= 0:
            return {"cpu_us_per_order": {}, "cpu_busy": {}}
        (first, idle0), (last, idle1) = self._readings
        spent: dict[str, int] = {}
        for pid, (role, threads) in last.items():
            before = first[pid][1] if pid in first else {}
            spent[role] = spent.get(role, 0) + sum(ns - before.get(tid, 0)
                                                   for tid, ns in threads.items())
        busy = {}
        for name, (idle, total) in idle1.items():
            if name in idle0 and total > idle0[name][1]:
                busy[name] = round(1 - (idle - idle0[name][0]) / (total - idle0[name][1]), 3)
        return {"cpu_us_per_order": {role: round(ns / orders / 1e3, 1)
                                     for role, ns in sorted(spent.items())},
                "cpu_busy": busy}
