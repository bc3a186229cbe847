"""gateway/stats_file.py: the stats file is written off the serving thread, whole, newest last,
by a thread that does not preempt the serving one."""

from __future__ import annotations

import json
import os

from gateway.stats_file import StatsFile
from tests.test_supervisor import WAIT_S, wait_until


def test_the_newest_submitted_status_is_what_the_file_holds(tmp_path):
    path = tmp_path / "gateway-0.json"
    stats = StatsFile(path)
    try:
        # woken by submit, the writer waits for the serving thread instead of preempting it
        wait_until(lambda: os.sched_getscheduler(stats._thread.native_id) == os.SCHED_BATCH,
                   WAIT_S, "the writer thread on SCHED_BATCH")
        for i in range(200):
            stats.submit({"n": i, "pad": "x" * 4000})
            # every read finds a whole file: the rename replaces it at once
            if path.exists():
                assert json.loads(path.read_text())["n"] <= i
        wait_until(lambda: path.exists() and json.loads(path.read_text())["n"] == 199, WAIT_S,
                   "the newest text in the file")
        stats.submit({"n": "last"})
    finally:
        stats.close()
    # close writes what was submitted last, and leaves no temporary file behind
    assert json.loads(path.read_text()) == {"n": "last"}
    assert [p.name for p in tmp_path.iterdir()] == ["gateway-0.json"]
