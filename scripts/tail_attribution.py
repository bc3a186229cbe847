"""Who held the CPUs while the slow requests waited (scripts/tail-attribution runs this).

Runs the clients of `perpx bench latency` (paced at --rate orders/s, one client) or, with
--rate 0, of `perpx bench e2e`'s closed loop (two clients, window 8) against a fresh exchange,
while `perf record` keeps every context switch on every CPU, stamped with the monotonic clock
the clients stamp their requests with. Then, for each request slower than --threshold-us
(from its intended send time to its reply), it adds up what ran on each CPU meanwhile, and
prints the tasks that held the CPUs longest during the slow requests, and in how many of them.

A CPU idle during a slow request means that request waited for something else: another
CPU, the disk, or a task that could not run. The exchange's processes and the clients are
named by role (`gateway`, `matcher`, `persistd`, `store`, `riskd`, `supervisor`, `client`,
with a thread's name after a slash when it is not the main one); anything else (kernel
threads, the host's agents) by its command name.

Needs perf (Debian: linux-perf) and the right to trace every CPU (root, or
kernel.perf_event_paranoid <= -1). docs/tuning.md reads its output.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from perpx.bench import e2e  # noqa: E402
from perpx.bench.cpu import descendants, role_of  # noqa: E402

SWITCH = re.compile(r"\[(\d+)\]\s+([\d.]+):.*prev_pid=(\d+).*==> next_comm=(.*?) next_pid=(\d+)")


def name_threads(names: dict) -> None:
    """tid -> role (and thread name) of this process's descendants, as they run now."""
    for pid in descendants(os.getpid()):
        role = role_of(pid)
        if role == "other":
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                continue
            names[tid] = role if tid == str(pid) else f"{role}/{comm}"


def cpu_runs(data: str, names: dict) -> dict[int, list]:
    """Per CPU, (start_ns, end_ns, task) of everything that ran, from perf's switches."""
    script = subprocess.run(["perf", "script", "-i", data, "-F", "cpu,time,trace"],
                            capture_output=True, text=True, check=True).stdout
    runs, current = collections.defaultdict(list), {}
    for line in script.splitlines():
        m = SWITCH.search(line)
        if not m:
            continue
        cpu, t_ns = int(m.group(1)), round(float(m.group(2)) * 1e9)
        comm, tid = m.group(4), m.group(5)
        task = "idle" if tid == "0" else names.get(tid, comm)
        if cpu in current:
            runs[cpu].append((current[cpu][0], t_ns, current[cpu][1]))
        current[cpu] = (t_ns, task)
    return runs


def attribute(runs: dict, starts_ns: np.ndarray, waits_ns: np.ndarray):
    """(time, count) per (cpu, task) over the requests given: what ran during each wait."""
    held, seen = collections.Counter(), collections.Counter()
    run_ends = {cpu: [e for _, e, _ in cpu_list] for cpu, cpu_list in runs.items()}
    for start, wait in zip(starts_ns.tolist(), waits_ns.tolist()):
        end = start + wait
        during = collections.Counter()
        for cpu, cpu_list in runs.items():
            # a CPU's runs follow one another: the first that ends after the request began
            for k in range(bisect.bisect_right(run_ends[cpu], start), len(cpu_list)):
                s, e, task = cpu_list[k]
                if s >= end:
                    break
                during[(cpu, task)] += min(e, end) - max(s, start)
        held.update(during)
        seen.update(during.keys())
    return held, seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="orders/s of one paced client; 0: the closed loop (two clients)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threshold-us", type=float, default=900.0)
    ap.add_argument("--ack-mode", choices=("fast", "durable"), default="fast")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    clients = 1 if args.rate else 2
    phase = {"name": "run", "seconds": args.seconds, "warmup_s": 0.5,
             "window": 4096 if args.rate else e2e.DEFAULT_WINDOW, "rate": args.rate}
    root = Path(tempfile.mkdtemp(prefix="perpx-tail-"))
    try:
        data, names, shm_left = str(root / "sched.data"), {}, []
        with e2e.running_exchange(root / "exchange", e2e.exchange_config(clients, args.ack_mode),
                                  lambda m: None, shm_left) as (exchange, endpoints):
            target = {"endpoints": endpoints,
                      "certificates": e2e._funded_accounts(exchange.sd, clients)}
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "sched:sched_switch", "-a",
                                     "-k", "mono", "-o", data], stdout=subprocess.DEVNULL)
            namer = threading.Timer(1.0, name_threads, (names,))     # the clients are up by then
            namer.start()
            try:
                summary = e2e.run_phases(target, [phase], clients, lambda m: None)["run"]
            finally:
                namer.join()
                perf.send_signal(signal.SIGINT)
                perf.wait()
        waits = summary["sched_ns"] if args.rate else summary["lat_ns"]
        slow = np.flatnonzero(waits > args.threshold_us * 1e3)
        print(f"{len(waits)} requests: p50 {np.percentile(waits, 50) / 1e3:.0f} µs, "
              f"p99 {np.percentile(waits, 99) / 1e3:.0f} µs; {len(slow)} slower than "
              f"{args.threshold_us:g} µs")
        if len(slow):
            held, seen = attribute(cpu_runs(data, names), summary["due_ns"][slow], waits[slow])
            print(f"what ran during them, summed (ms), and in how many of the {len(slow)}:")
            for (cpu, task), ns in held.most_common(args.top):
                print(f"  cpu{cpu}  {task:28s} {ns / 1e6:9.1f}  {seen[(cpu, task)]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
