"""`perpx bench box --json`: the platform's own pauses (idle and beside busy loops), the
journal's fdatasync pattern (alone and beside a writer) and the wake-up of idle CPUs (as the
host has them, then polling), each measured for real, briefly."""

from __future__ import annotations

import json
import os

from perpx.cli import main
from perpx.cpu_latency import DEVICE as CPU_LATENCY_DEVICE
from tests.test_bench_pauses import check_cpu_gone


def test_bench_box_json(capsys, tmp_path):
    assert main(["bench", "box", "--json", "--seconds", "0.5", "--dir", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out)
    cpus = len(os.sched_getaffinity(0))
    assert res["benchmark"] == "box" and res["cpus"] == cpus
    for name, loops in (("pauses_idle", 0), ("pauses_busy", cpus)):
        p = res[name]
        assert p["busy_loops"] == loops, p
        check_cpu_gone(p, cpus)
        assert p["platform_pauses"] == len(p["platform_pause_lengths_ms"])
    for name in ("fsync_alone", "fsync_beside_writer"):
        f = res[name]
        # ~1,000 a second for 0.5 s, each timed, in the directory asked for
        assert f["syncs"] > 50, f
        assert 0 < f["p50_us"] <= f["p99_us"] <= f["p999_us"] <= f["max_us"], f
    assert res["fsync_beside_writer"]["neighbour_bytes_per_s"] > 0
    assert res["fsync_dir"] == str(tmp_path)
    assert list(tmp_path.iterdir()) == []          # its files are gone
    cpu_ids = sorted(os.sched_getaffinity(0))
    host = res["wakeups_host_idle"]
    # a round trip every ms for 0.5 s, between the first and the last CPU
    assert host["trips"] > 100 and host["cpus"] == [cpu_ids[0], cpu_ids[-1]], host
    assert 0 < host["p50_us"] <= host["p99_us"] <= host["p999_us"] <= host["max_us"], host
    polling = res["wakeups_polling"]
    if os.access(CPU_LATENCY_DEVICE, os.W_OK):
        assert polling["trips"] > 100 and polling["cpu_latency_limit_us"] == 0, polling
        assert 0 < polling["p50_us"] <= polling["max_us"], polling
    else:
        assert CPU_LATENCY_DEVICE in polling["refused"], polling
