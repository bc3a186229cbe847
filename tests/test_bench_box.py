"""`perpx bench box --json`: the platform's own pauses (idle and beside busy loops) and the
journal's fdatasync pattern (alone and beside a writer), each measured for real, briefly."""

from __future__ import annotations

import json
import os

from perpx.cli import main


def test_bench_box_json(capsys, tmp_path):
    assert main(["bench", "box", "--json", "--seconds", "0.5", "--dir", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out)
    cpus = len(os.sched_getaffinity(0))
    assert res["benchmark"] == "box" and res["cpus"] == cpus
    for name, loops in (("pauses_idle", 0), ("pauses_busy", cpus)):
        p = res[name]
        assert p["busy_loops"] == loops and len(p["per_cpu_over_2ms"]) == cpus, p
        assert p["platform_pauses"] == len(p["platform_pause_lengths_ms"])
    for name in ("fsync_alone", "fsync_beside_writer"):
        f = res[name]
        # ~1,000 a second for 0.5 s, each timed, in the directory asked for
        assert f["syncs"] > 50, f
        assert 0 < f["p50_us"] <= f["p99_us"] <= f["p999_us"] <= f["max_us"], f
    assert res["fsync_beside_writer"]["neighbour_bytes_per_s"] > 0
    assert res["fsync_dir"] == str(tmp_path)
    assert list(tmp_path.iterdir()) == []          # its files are gone
