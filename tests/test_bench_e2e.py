"""`perpx bench e2e --json`: one JSON object with the required keys, sane numbers, and
nothing of its exchange left in /dev/shm (it starts and stops its own, in a temp dir)."""

from __future__ import annotations

import json
import os

from perpx.cli import main

REQUIRED = ("orders_per_s", "ack_p50_us", "ack_p99_us", "ack_p999_us", "echo_msgs_per_s",
            "echo_rtt_p50_us", "orders_over_echo", "ack_p50_over_echo_p50",
            "paced_achieved_per_s", "paced_ack_p99_us", "settings")


def test_bench_e2e_json(capsys):
    before = set(os.listdir("/dev/shm"))
    assert main(["bench", "e2e", "--json", "--seconds", "2", "--rate", "2000"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    res = json.loads(lines[0])
    for key in REQUIRED:
        assert key in res, key
    assert res["orders_per_s"] > 0 and res["echo_msgs_per_s"] > 0
    assert res["paced_achieved_per_s"] > 0
    assert 0 < res["ack_p50_us"] <= res["ack_p99_us"] <= res["ack_p999_us"]
    assert 0 < res["echo_rtt_p50_us"] <= res["echo_rtt_p99_us"] <= res["echo_rtt_p999_us"]
    assert res["paced_ack_p50_us"] <= res["paced_ack_p99_us"] <= res["paced_ack_p999_us"]
    assert res["rejects"] == 0, res["first_reject"]
    assert res["settings"]["ack_mode"] == "fast" and res["settings"]["clients"] == 2
    # its exchange removed every shm entry it made, and none of its prefix remains
    assert res["shm_left"] == []
    prefix = res["shm_prefix"].lstrip("/")
    after = set(os.listdir("/dev/shm"))
    assert not [n for n in after - before if prefix in n]
