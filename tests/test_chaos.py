"""Chaos: kill -9 of the matcher, persistd and a gateway at random moments under load, round
after round; afterwards nothing acknowledged may be missing (journal, DuckDB), no row may be
doubled, and the live state must equal a clean replay of the journal.

PERPX_CHAOS_ROUNDS (default 12: four cycles of the three victims) and PERPX_CHAOS_SEED choose
the run; `scripts/soak` runs this test with many more rounds.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from perpx.supervisor import log_tail
from tests.durability_helpers import (Traders, assert_nothing_acknowledged_was_lost,
                                      durable_config, funded_account)
from tests.test_supervisor import WAIT_S, cli_json, processes, wait_until

ROUNDS = int(os.environ.get("PERPX_CHAOS_ROUNDS", "12"))
SEED = int(os.environ.get("PERPX_CHAOS_SEED", str(int(time.time()))))
VICTIMS = ("matcher", "persistd", "gateway-0")


def wait_all_ready(up, what: str) -> dict:
    """Every process alive and ready (their `perpx status` entries); on a timeout the error
    names those that were not, with the end of each one's log and of the supervisor's."""
    last = {}

    def ready():
        last["procs"] = procs = processes(up.sd.path)
        return procs if all(p["alive"] and p["state"] == "ready"
                            for p in procs.values()) else None

    try:
        return wait_until(ready, WAIT_S * 4, what)
    except AssertionError as e:
        status = up.sd.status() or {"processes": []}
        logs = {p["name"]: p.get("log") for p in status["processes"]}
        lagging = [f"{p['name']}: alive {p['alive']}, {p['state']}, {p['restarts']} restarts\n"
                   f"{log_tail(Path(logs[p['name']]), 10) if logs.get(p['name']) else ''}"
                   for p in last.get("procs", {}).values()
                   if not (p["alive"] and p["state"] == "ready")]
        raise AssertionError("\n".join([str(e), *lagging, "supervisor:",
                                         up.stderr[-3000:]])) from None


def test_kill9_rounds_lose_nothing_acknowledged(ups):
    rng = random.Random(SEED)
    print(f"chaos: {ROUNDS} rounds, seed {SEED} (PERPX_CHAOS_SEED={SEED} repeats it)")
    up = ups("state", durable_config(snapshot_every=2000))
    endpoints = up.wait_ready()
    sd = up.sd
    traders = Traders(endpoints, funded_account(sd.path), funded_account(sd.path)).start()
    killed = {name: 0 for name in VICTIMS}
    try:
        for round_no in range(ROUNDS):
            procs = wait_all_ready(up, f"every process ready before round {round_no}")
            before = traders.count()
            wait_until(lambda: traders.count() > before, WAIT_S * 4,
                       f"orders acknowledged before round {round_no}")
            time.sleep(rng.uniform(0.0, 0.5))        # a random moment under load
            if round_no % len(VICTIMS) == 0:          # each victim once per cycle, in random order
                cycle = rng.sample(VICTIMS, len(VICTIMS))
            victim = cycle[round_no % len(VICTIMS)]
            os.kill(procs[victim]["pid"], signal.SIGKILL)
            killed[victim] += 1
            wait_until(lambda: processes(sd.path)[victim]["restarts"] == killed[victim],
                       WAIT_S * 2, f"{victim} to be restarted (round {round_no})")
        wait_all_ready(up, "every process ready at the end")
        before = traders.count()
        wait_until(lambda: traders.count() > before + 20, WAIT_S * 4, "trading after the chaos")
    finally:
        traders.stop()
    up.remember_children()
    print(f"chaos: killed {killed}; {len(traders.acks)} acks, {len(traders.fills)} fills, "
          f"{traders.errors} client timeouts")
    assert traders.fills
    assert min(killed.values()) >= ROUNDS // len(VICTIMS)
    assert_nothing_acknowledged_was_lost(sd.path, traders)
    assert cli_json(sd.path, "check")["ok"]
