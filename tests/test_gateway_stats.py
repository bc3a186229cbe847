"""perpx/gateway_stats.py: a gateway's stats file (written by gateway/stats_file.py) is live
while the pid it names runs and it is rewritten; a dead gateway's or a stuck one's is stale,
with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from gateway.stats_file import StatsFile
from perpx.gateway_stats import STALE_AFTER_S, read_gateway_stats


def write_stats(run_dir, name: str, status: dict):
    """`status` in run_dir/<name>.stats.json, as a gateway writes it."""
    path = run_dir / f"{name}.stats.json"
    stats = StatsFile(path)
    stats.submit(status)
    stats.close()
    return path


def exited_pid() -> int:
    """The pid of a process that has run, exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert child.wait(timeout=30) == 0
    return child.pid


def test_a_running_gateway_with_a_fresh_file_is_live(tmp_path):
    write_stats(tmp_path, "gateway-0", {"pid": os.getpid(), "connections": 3})
    got = read_gateway_stats(tmp_path)
    assert list(got) == ["gateway-0"]
    assert got["gateway-0"].stats == {"pid": os.getpid(), "connections": 3}
    assert got["gateway-0"].stale is None


def test_a_dead_gateways_file_is_stale(tmp_path):
    pid = exited_pid()
    write_stats(tmp_path, "gateway-1", {"pid": pid, "connections": 3})
    got = read_gateway_stats(tmp_path)["gateway-1"]
    assert got.stale == f"pid {pid} is not running"
    assert got.stats["connections"] == 3          # the last counts, for who wants them


def test_a_file_not_rewritten_is_stale_though_its_pid_runs(tmp_path):
    path = write_stats(tmp_path, "gateway-0", {"pid": os.getpid()})
    written_s = time.time() - STALE_AFTER_S - 9
    os.utime(path, (written_s, written_s))
    got = read_gateway_stats(tmp_path)["gateway-0"]
    assert got.stale == f"last written {STALE_AFTER_S + 9:.0f} s ago"
    # just inside the bound it is live
    written_s = time.time() - STALE_AFTER_S + 1
    os.utime(path, (written_s, written_s))
    assert read_gateway_stats(tmp_path)["gateway-0"].stale is None


def test_only_whole_stats_files_are_read(tmp_path):
    write_stats(tmp_path, "gateway-0", {"pid": os.getpid()})
    (tmp_path / "gateway-1.stats.json").write_text('{"pid": 1')       # torn: a died writer
    (tmp_path / "gateway-2.stats.json.tmp").write_text('{"pid": 1}')   # not renamed yet
    assert list(read_gateway_stats(tmp_path)) == ["gateway-0"]


def test_a_file_of_another_shape_neither_breaks_status_nor_passes_as_live(tmp_path):
    (tmp_path / "gateway-0.stats.json").write_text('{"connections": 3}')   # names no pid
    (tmp_path / "gateway-1.stats.json").write_text('[1, 2]')               # not a map
    got = read_gateway_stats(tmp_path)
    assert list(got) == ["gateway-0"]
    assert got["gateway-0"].stale == "it names no pid"
