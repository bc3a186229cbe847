"""`perpx bench durability --json` at tiny sizes: one JSON object of the right shape with sane
(not fast) numbers, the `perpx sql` and `perpx verify` checks passed, nothing left in /dev/shm.
Speed is the benchmark's business (run it at full size), never this test's."""

from __future__ import annotations

import json
import os

from perpx.cli import main


def test_bench_durability_json(capsys):
    before = set(os.listdir("/dev/shm"))
    assert main(["bench", "durability", "--json", "--orders", "20000", "--seconds", "1",
                 "--runs", "1", "--clients", "2", "--window", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    res = json.loads(lines[0])
    assert res["benchmark"] == "durability" and "cpus" in res["box"]

    lag = res["lag"]
    for key in ("lag_ms", "lag_from_durable_ms", "target_ms", "meets_target",
                "load_orders_per_s", "fills_per_s", "fill_samples", "sql_check", "settings"):
        assert key in lag, key
    assert lag["load_orders_per_s"] > 0 and lag["fills_per_s"] > 0 and lag["fill_samples"] > 0
    assert 0 <= lag["lag_ms"]["p50"] <= lag["lag_ms"]["p99"] <= lag["lag_ms"]["max"]
    assert lag["rejects"] == 0, lag["first_reject"]
    check = lag["sql_check"]
    assert check["ok"] and check["fill_seqs_in_duckdb"] == check["fill_seqs_seen"] > 0

    rec = res["recovery"]
    for key in ("ready_s", "status_ready_s", "rebuild_s", "snapshot_load_s", "replay_s",
                "matcher_load_s", "snapshot_seq", "snapshot_bytes", "replayed", "target_s",
                "meets_target", "verify", "runs", "load"):
        assert key in rec, key
    assert rec["orders"] == rec["resting"] == 20000 and len(rec["runs"]) == 1
    # a snapshot covers most of the book, the rest is replayed from the journal
    assert 0 < rec["snapshot_seq"] < rec["seq"]
    assert rec["replayed"] == rec["seq"] - rec["snapshot_seq"]
    assert rec["snapshot_bytes"] > 0
    assert 0 < rec["rebuild_s"] < rec["ready_s"] <= rec["status_ready_s"]
    full = rec["without_snapshot"]
    assert full["snapshot_seq"] == 0 and full["replayed"] == rec["seq"]
    verify = rec["verify"]
    assert verify["ok"] and verify["live_checked"] and verify["seq"] == rec["seq"]

    assert res["shm_left"] == []
    after = set(os.listdir("/dev/shm"))
    for prefix in res["shm_prefixes"]:
        assert not [n for n in after - before if prefix.lstrip("/") in n]
