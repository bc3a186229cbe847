"""`perpx bench latency --json --plot --pauses`: a tiny open-loop run against one real exchange;
the JSON has a row per (clients, rate) with ordered percentiles from the intended send time,
the part spent before the gateway read each request and the pause meters' figures, the PNG
exists and is a PNG, and nothing is left in /dev/shm."""

from __future__ import annotations

import json
import os
import struct

from perpx.bench.latency import format_report
from perpx.cli import main
from tests.test_bench_pauses import check_cpu_gone


def test_bench_latency_json_and_plot(capsys, tmp_path):
    before = set(os.listdir("/dev/shm"))
    png = tmp_path / "latency.png"
    assert main(["bench", "latency", "--json", "--seconds", "0.6", "--rates", "200",
                 "--clients", "1,2", "--ack-mode", "durable", "--plot", str(png),
                 "--pauses"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["benchmark"] == "latency" and res["plot"] == str(png)
    assert res["settings"]["ack_modes"] == ["durable"] and res["settings"]["clients"] == [1, 2]
    # 200/s and the sustained maximum, for 1 and for 2 clients
    assert [(r["clients"], r["rate"]) for r in res["runs"]] == \
        [(1, "200"), (1, "max"), (2, "200"), (2, "max")]
    for r in res["runs"]:
        assert r["ack_mode"] == "durable" and r["samples"] > 0, r
        assert r["unanswered"] == 0 and r["rejected"] == 0, r
        assert 0 < r["p50_us"] <= r["p90_us"] <= r["p99_us"] <= r["p999_us"] <= r["max_us"], r
        # the way to the gateway: part of each request's latency, measured from its actual
        # send (never later than the intended one)
        assert 0 < r["to_gateway_p50_us"] <= r["to_gateway_p99_us"] <= r["max_us"], r
        assert r["to_gateway_p50_us"] < r["p50_us"], r
        assert r["achieved_per_s"] > 0
        # the pause meters ran beside every rate, one per CPU
        p = r["pauses"]
        check_cpu_gone(p, len(os.sched_getaffinity(0)))
        assert 0 <= p["late_requests_in_platform_pauses"] <= p["late_requests"] <= r["samples"]
        assert 0 <= p["late_requests_in_cpu_gone"] <= p["late_requests"], p
        assert p["late_requests_in_cpu_gone"] >= p["slowest_in_cpu_gone"], p
    maxed = [r for r in res["runs"] if r["rate"] == "max"]
    assert all(r["rate_per_s"] > 200 for r in maxed)
    assert res["targets"] == {}          # the targets compare fast and durable: one was run
    # CPU per order by process over each run's window (perpx/bench/cpu.py)
    for r in res["runs"]:
        spent = r["cpu_us_per_order"]
        assert spent["gateway"] > 0 and spent["matcher"] > 0 and spent["persistd"] > 0, r
    # the text report: a row per run, its way to the gateway, then the gateway's and the
    # matcher's CPU per order, in the last four columns
    text = format_report(res).splitlines()
    assert text[1].split()[-10:] == ["to", "gw", "p50", "to", "gw", "p99", "gw", "cpu", "mt",
                                     "cpu"], text[1]
    rows = [line.split() for line in text if line.startswith("durable ")]
    assert [(int(row[1]), float(row[-4]), float(row[-2])) for row in rows] == \
        [(r["clients"], r["to_gateway_p50_us"], r["cpu_us_per_order"]["gateway"])
         for r in res["runs"]]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400
    after = set(os.listdir("/dev/shm"))
    [prefix] = res["shm_prefixes"]
    assert not [n for n in after - before if prefix.lstrip("/") in n]
