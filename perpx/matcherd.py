"""The matcher process as the supervisor starts it: `python -m perpx.matcherd --spec FILE`.

FILE is the supervisor's exchange.json (perpx/statedir.py): shm prefix, engine capacities,
command sources (name, privileged, capacity) and event consumers. The process creates every
shared-memory structure of the exchange (engine.service.MatcherService), loads the compiled
matcher (a minute on a cold numba cache), then reports ready and serves until SIGTERM/SIGINT,
when it removes what it created.

Heartbeat: the supervisor's region `<prefix>-supervisor` (perpx/statedir.py, HEARTBEAT_DTYPE)
holds a slot for the matcher; this process writes its pid there, sets `ready` once it serves,
and bumps `beats` on every pass of its loop (at least every 50 ms, idle or not), so a matcher
that is alive but stuck shows as a heartbeat that stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perpx.matcherd")
    p.add_argument("--spec", required=True, help="exchange.json written by `perpx up`")
    p.add_argument("--heartbeat-slot", type=int, default=0)
    args = p.parse_args(argv)
    doc = json.loads(Path(args.spec).read_text())

    stop = [False]

    def on_signal(*_):
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from engine.config import EngineConfig
    from engine.records import COMMAND_DTYPE
    from engine.service import MatcherService, Source
    from perpx.statedir import HEARTBEAT_DTYPE, HEARTBEAT_LAYOUT, heartbeat_region_name
    from shm.region import Region, ShmError

    eng = doc["engine"]
    cfg = EngineConfig(**{k: eng[k] for k in EngineConfig.__dataclass_fields__})
    sources = [Source(s["name"], bool(s["privileged"]), int(s["capacity"]))
               for s in doc["sources"]]
    prefix = doc["prefix"]
    try:
        hb_region = Region.attach(heartbeat_region_name(prefix), HEARTBEAT_LAYOUT)
        beat = hb_region.payload.view(HEARTBEAT_DTYPE)[args.heartbeat_slot:args.heartbeat_slot + 1]
    except ShmError:
        hb_region = None
        beat = np.zeros(1, HEARTBEAT_DTYPE)
    beat["pid"] = os.getpid()

    service = MatcherService(cfg, prefix, sources, consumers=list(doc["consumers"]),
                             event_capacity=eng.get("event_ring_capacity") or None,
                             batch=int(eng.get("batch", 256)))
    try:
        # Load (or compile) the matcher now, not on the first command: an empty batch.
        empty = np.zeros(0, COMMAND_DTYPE)
        service.matcher.process(empty, service.sink, service.events.write_cursor,
                                service.events.free_slots(), source=0, privileged=True)
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
        if hb_region is not None:
            hb_region.close()
    print("matcher: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
