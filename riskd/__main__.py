"""`python -m riskd --spec exchange.json [--ready-file PATH]`: the riskd process.

Serves until SIGTERM or SIGINT (exit 0). It creates no shared memory: the state, the event ring,
its command ring and the index board exist already (matcher and supervisor create them), so
there is nothing of its own to remove. With --ready-file it writes that file once attached, for
the supervisor's readiness check. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import posix_ipc

from engine.spec import load_spec
from riskd.service import Riskd
from shm.region import ShmError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m riskd")
    p.add_argument("--spec", required=True, help="exchange.json written by `perpx up`")
    p.add_argument("--ready-file", help="written once riskd is attached and about to serve")
    args = p.parse_args(argv)

    signals = []     # the handler only records; the loop notices within one tick
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: signals.append(signum))

    try:
        riskd = Riskd(load_spec(args.spec))
    except (ShmError, posix_ipc.ExistentialError, ValueError, OSError) as e:
        print(f"riskd: cannot start: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        if args.ready_file:
            Path(args.ready_file).write_text(json.dumps({"pid": os.getpid()}))
        riskd.run(lambda: bool(signals))
    finally:
        riskd.log(riskd.summary())
        riskd.close()
    riskd.log(f"stopped ({', '.join(signal.Signals(s).name for s in signals) or 'no signal'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
