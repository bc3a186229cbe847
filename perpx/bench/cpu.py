"""Where a benchmark's CPU went: each process's CPU time per order over the timed window, by
role, and how busy each CPU was.

Read from /proc at the window's start and end (a thread waits for both): every descendant of
the benchmark's process, all its threads (utime + stime), and each CPU's idle time from
/proc/stat. A process started inside the window counts from its start; one that ended
inside it is not counted (the benchmarks' processes live through their windows). Roles:
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

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
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


def _process_cpu_s(pid: int) -> float | None:
    """utime + stime of all the process's threads, in seconds (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


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
    """Reads /proc at `start` (time.monotonic()) and `seconds` later, on its own thread.

    `figures(orders)` (after the window, it waits for the second reading) returns
    {"cpu_us_per_order": {role: µs of CPU per order}, "cpu_busy": {"cpuN": fraction}}; empty
    maps if the window was cut short (`cancel()`)."""

    def __init__(self, start: float, seconds: float):
        self._start, self._seconds = start, seconds
        self._stop = threading.Event()
        self._readings: list = []
        self._thread = threading.Thread(target=self._run, name="cpu-window", daemon=True)
        self._thread.start()

    def _read(self) -> tuple:
        cpu = {pid: _process_cpu_s(pid) for pid in descendants(os.getpid())}
        return {pid: (role_of(pid), s) for pid, s in cpu.items() if s is not None}, _cpu_idle()

    def _run(self) -> None:
        for at in (self._start, self._start + self._seconds):
            if self._stop.wait(max(0.0, at - time.monotonic())):
                return
            self._readings.append(self._read())

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self, orders: int) -> dict:
        self._thread.join()
        if len(self._readings) < 2 or orders <= 0:
            return {"cpu_us_per_order": {}, "cpu_busy": {}}
        (first, idle0), (last, idle1) = self._readings
        spent: dict[str, float] = {}
        for pid, (role, s) in last.items():
            spent[role] = spent.get(role, 0.0) + s - (first[pid][1] if pid in first else 0.0)
        busy = {}
        for name, (idle, total) in idle1.items():
            if name in idle0 and total > idle0[name][1]:
                busy[name] = round(1 - (idle - idle0[name][0]) / (total - idle0[name][1]), 3)
        return {"cpu_us_per_order": {role: round(s / orders * 1e6, 1)
                                     for role, s in sorted(spent.items())},
                "cpu_busy": busy}
