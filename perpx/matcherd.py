"""The matcher process as the supervisor starts it: `python -m perpx.matcherd --spec FILE`.

FILE is the supervisor's exchange.json (perpx/statedir.py): shm prefix, engine capacities,
command sources (name, privileged, capacity) and event consumers. The process creates every
shared-memory structure of the exchange (engine.service.MatcherService), loads the compiled
matcher (a minute on a cold numba cache), rebuilds the state from the newest snapshot and the
journal (persistd/replica.py; nothing to do on a first start), then reports ready and serves
until SIGTERM/SIGINT, when it removes what it created.

Restart after a crash: the shared memory of the dead matcher is still there, with the gateways
and persistd attached to it. The new matcher maps it again (the rings keep their cursors) and
waits until persistd has journaled every command whose events the dead one published, so that
the journal holds all of them; then it rebuilds its tables from snapshot + journal and carries
on at the next seq. Commands it had taken from a ring but not published are gone, unanswered
(never acknowledged: acks wait for the journal).

Heartbeat: the supervisor's region `<prefix>-supervisor` (shm/heartbeat.py)
holds a slot for the matcher; this process writes its pid there, sets `ready` once it serves,
and bumps `beats` on every pass of its loop (at least every 50 ms, idle or not), so a matcher
that is alive but stuck shows as a heartbeat that stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

from engine.records import COMMAND_DTYPE
from engine.service import MatcherService
from engine.spec import StateLayout, load_spec
from persistd.replica import Replica
from shm.heartbeat import HEARTBEAT_DTYPE, HeartbeatBoard
from shm.progress import JournalProgress
from shm.region import ShmError
from shm.wait import SpinYieldBlockWait, shared_cpu_wait



def main(argv=None) -> int:
    t_main = time.monotonic()
    p = argparse.ArgumentParser(prog="python -m perpx.matcherd")
    p.add_argument("--spec", required=True, help="exchange.json written by `perpx up`")
    p.add_argument("--heartbeat-slot", type=int, default=0)
    args = p.parse_args(argv)
    spec = load_spec(args.spec)

    stop = [False]

    def on_signal(*_):
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


    cfg, sources, prefix = spec.engine, list(spec.sources), spec.prefix
    eng = spec.engine_options
    try:
        hb_board = HeartbeatBoard.attach(prefix)
        beat = hb_board.slot(args.heartbeat_slot)
    except ShmError:
        hb_board = None
        beat = np.zeros(1, HEARTBEAT_DTYPE)
    beat["ready"] = 0     # a predecessor killed while serving left its flag set
    beat["pid"] = os.getpid()

    spinning = spec.doc.get("matcher_spins", True)
    if not spinning:
        share_cpu_with_gateway()
    service = MatcherService(cfg, prefix, sources, consumers=list(spec.consumers),
                             event_capacity=eng.get("event_ring_capacity") or None,
                             batch=int(eng.get("batch", 256)),
                             reattach=MatcherService.exists(prefix),
                             idle_wait=(SpinYieldBlockWait if spinning else shared_cpu_wait))
    try:
        # Load (or compile) the matcher now, not on the first command: an empty batch.
        empty = np.zeros(0, COMMAND_DTYPE)
        service.matcher.process(empty, service.sink, service.events.write_cursor,
                                service.events.free_slots(), source=0, privileged=True)
        log(f"shared memory {'mapped' if service.reattached else 'created'} and the compiled "
            f"matcher loaded in {time.monotonic() - t_main:.2f} s")
        recover(service, cfg, spec.layout, prefix, stop)
        service.mark_start()
        beats = beat["beats"]
        beat["ready"] = 1
        print(f"matcher: serving (pid {os.getpid()}, prefix {prefix}, "
              f"{len(sources)} command rings, event ring of {service.events.capacity} slots)",
              file=sys.stderr, flush=True)

        def should_stop() -> bool:
            beats[0] += 1
            return stop[0]

        if not stop[0]:
            service.run(should_stop)
    finally:
        beat["ready"] = 0
        service.close()
        del beat
        if hb_board is not None:
            hb_board.close()
    print("matcher: stopped", file=sys.stderr, flush=True)
    return 0


def share_cpu_with_gateway() -> None:
    """The matcher shares its CPU with the gateway: SCHED_BATCH, and it sleeps after 20 yields.

    SCHED_BATCH: a matcher woken by the gateway's doorbell does not preempt the gateway in the
    middle of its pass; it runs when the gateway sleeps, takes the whole batch the pass wrote,
    and the gateway's doorbell write costs a syscall, not two context switches. A matcher that
    stays awake instead (1,500 yields before sleeping, the old way to spare the gateway that
    wake-up) keeps its CPU looking busy, so other processes pile onto the other CPU: 4 paced
    clients on this box saw p99 in the hundreds of ms (docs/tuning.md, "The matcher's wait").
    """
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def log(msg: str) -> None:
    print(f"matcher: {msg}", file=sys.stderr, flush=True)


def recover(service, cfg, sd: StateLayout, prefix: str, stop, wait_s: float = 120.0) -> None:
    """Rebuild the state tables from snapshot + journal (see the module docstring)."""

    last = service.last_published_seq() if service.reattached else 0
    if last:
        progress = JournalProgress.attach(prefix)
        deadline = time.monotonic() + wait_s
        while not stop[0] and not progress.wait_durable(last, 5.0):
            if time.monotonic() > deadline:
                raise RuntimeError(f"persistd has not journaled up to seq {last} (the last "
                                   f"event published) within {wait_s:g} s: cannot recover")
            log(f"waiting for persistd to journal up to seq {last} "
                f"(durable_seq {progress.durable_seq()})")
        progress.close()
    if not sd.journal_dir.exists():
        return
    t0 = time.monotonic()
    replica = Replica(cfg, buffer=service.state_buffer, matcher=service.matcher)
    info = replica.rebuild(sd.snapshots_dir, sd.journal_dir)
    if last and replica.seq != last:
        raise RuntimeError(f"the journal ends at seq {replica.seq} but events up to seq {last} "
                           f"were published: the journal is missing commands")
    if info["seq"]:
        log(f"recovered seq {info['seq']} in {time.monotonic() - t0:.2f} s: snapshot at seq "
            f"{info['snapshot_seq']} + {info['replayed']} journaled commands (snapshot of "
            f"{info['snapshot_bytes']} bytes read and checked in {info['snapshot_s']:.2f} s, "
            f"replay in {info['replay_s']:.2f} s, journal end found in "
            f"{info['journal_info_s']:.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
