"""Chaos: kill -9 of the matcher, persistd and a gateway at random moments under load, round
after round; afterwards nothing acknowledged may be missing (journal, DuckDB), no row may be
doubled, and the live state must equal a clean replay of the journal.

PERPX_CHAOS_ROUNDS (default 20) and PERPX_CHAOS_SEED choose the run; `scripts/soak` runs this
test with many more rounds.
"""

from __future__ import annotations

import os
import random
import signal
import time

from tests.durability_helpers import (Traders, assert_nothing_acknowledged_was_lost,
                                      durable_config, funded_account)
from tests.test_supervisor import WAIT_S, cli_json, processes, wait_until

ROUNDS = int(os.environ.get("PERPX_CHAOS_ROUNDS", "20"))
SEED = int(os.environ.get("PERPX_CHAOS_SEED", str(int(time.time()))))
VICTIMS = ("matcher", "persistd", "gateway-0")


def all_ready(state_dir) -> dict | None:
    procs = processes(state_dir)
    ok = all(p["alive"] and p["state"] == "ready" for p in procs.values())
    return procs if ok else None


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
            procs = wait_until(lambda: all_ready(sd.path), WAIT_S * 4,
                               f"every process ready before round {round_no}")
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
        wait_until(lambda: all_ready(sd.path), WAIT_S * 4, "every process ready at the end")
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
