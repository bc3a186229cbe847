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

Beside the CPU time, per order and by role: the part spent in ZeroMQ's I/O threads (a task
named `ZMQbg/IO/...`: CURVE, TCP reads and writes); how often a role's threads went to sleep
("waits", voluntary context switches) and were taken off a CPU while they could run
("preempted", involuntary ones); and the box's TCP segments (/proc/net/snmp `OutSegs`, every
socket: on loopback each one is also received). Messages handed over in fewer, bigger bursts
cost fewer wakes and segments on both ends, which is most of what a client spends per order
(docs/tuning.md, "Fifteenth pass").
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


ZMQ_IO_THREAD = "ZMQbg/IO/"      # libzmq names its I/O threads so (task comm)


def _threads(pid: int) -> dict[int, tuple[int, int, int, bool]]:
    """Each of the process's threads: (ns on a CPU, voluntary and involuntary context
    switches, whether it is a ZeroMQ I/O thread). schedstat is exact, where /proc/PID/stat
    counts clock ticks. Empty if the process is gone."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                zmq_io = f.read().startswith(ZMQ_IO_THREAD)
        except OSError:
            continue           # the thread ended meanwhile
        waits = preempted = 0
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                waits = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                preempted = int(line.split()[1])
        out[int(tid)] = (ns, waits, preempted, zmq_io)
    return out


def process_cpu_ns(pid: int) -> int:
    """The ns its threads that run now have spent on a CPU (0 if the process is gone)."""
    return sum(ns for ns, *_ in _threads(pid).values())


def _tcp_out_segments() -> int:
    """The box's TCP segments sent so far (/proc/net/snmp: a header line, then values)."""
    with open("/proc/net/snmp") as f:
        header, values = [line.split() for line in f if line.startswith("Tcp:")]
    return int(values[header.index("OutSegs")])


def cpu_ticks() -> dict[str, list[int]]:
    """/proc/stat's line of each CPU: {"cpuN": [user, nice, system, idle, iowait, irq,
    softirq, steal]}, in USER_HZ ticks since boot (perpx/bench/pauses.py reads steal)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *ticks = line.split()
                out[name] = [int(t) for t in ticks[:8]]
    return out


def _cpu_idle() -> dict[str, tuple[int, int]]:
    """{"cpuN": (idle + iowait ticks, all ticks)}."""
    return {name: (t[3] + t[4], sum(t)) for name, t in cpu_ticks().items()}


class CpuWindow:
    """Reads /proc at `start` (time.monotonic()) and `seconds` later, on its own (daemon)
    thread; a phase that fails leaves it to finish its two readings unread.

    `figures(orders)` (after the window, it waits for the second reading) returns
    {"cpu_us_per_order": {role: µs of CPU per order}, "cpu_busy": {"cpuN": fraction},
    "zmq_io_us_per_order": {role: the part of its µs in ZeroMQ I/O threads},
    "switches_per_order": {role: {"waits": n, "preempted": n}},
    "tcp_segments_per_order": n}; empty maps (and None) when no order was counted."""

    def __init__(self, start: float, seconds: float):
        self._start, self._seconds = start, seconds
        self._readings: list = []
        self._thread = threading.Thread(target=self._run, name="cpu-window", daemon=True)
        self._thread.start()

    def _read(self) -> tuple:
        """({pid: (role, _threads(pid))}, per-CPU idle, TCP segments sent)."""
        return ({pid: (role_of(pid), _threads(pid)) for pid in descendants(os.getpid())},
                _cpu_idle(), _tcp_out_segments())

    def _run(self) -> None:
        for at in (self._start, self._start + self._seconds):
            time.sleep(max(0.0, at - time.monotonic()))
            self._readings.append(self._read())

    def figures(self, orders: int) -> dict:
        self._thread.join()
        if orders <= 0:
            return {"cpu_us_per_order": {}, "cpu_busy": {}, "zmq_io_us_per_order": {},
                    "switches_per_order": {}, "tcp_segments_per_order": None}
        (first, idle0, segments0), (last, idle1, segments1) = self._readings
        spent: dict[str, list[int]] = {}     # role -> [ns, of it ZeroMQ I/O, waits, preempted]
        for pid, (role, threads) in last.items():
            before = first[pid][1] if pid in first else {}
            total = spent.setdefault(role, [0, 0, 0, 0])
            for tid, (ns, waits, preempted, zmq_io) in threads.items():
                ns0, waits0, preempted0, _ = before.get(tid, (0, 0, 0, zmq_io))
                total[0] += ns - ns0
                total[1] += (ns - ns0) if zmq_io else 0
                total[2] += waits - waits0
                total[3] += preempted - preempted0
        busy = {}
        for name, (idle, total) in idle1.items():
            if name in idle0 and total > idle0[name][1]:
                busy[name] = round(1 - (idle - idle0[name][0]) / (total - idle0[name][1]), 3)
        roles = sorted(spent.items())
        return {"cpu_us_per_order": {role: round(t[0] / orders / 1e3, 1) for role, t in roles},
                "cpu_busy": busy,
                "zmq_io_us_per_order": {role: round(t[1] / orders / 1e3, 1)
                                        for role, t in roles if t[1]},
                "switches_per_order": {role: {"waits": round(t[2] / orders, 3),
                                              "preempted": round(t[3] / orders, 3)}
                                       for role, t in roles},
                "tcp_segments_per_order": round((segments1 - segments0) / orders, 3)}
