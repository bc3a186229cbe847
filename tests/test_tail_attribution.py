"""scripts/tail-attribution: a short paced run under perf; each slow request is matched with
what ran on each CPU while it waited. Needs perf and the right to trace every CPU: skipped,
saying which is missing, where it cannot run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "tail_attribution.py"
HEADER = re.compile(r"(\d+) requests: p50 \d+ µs, p99 \d+ µs; (\d+) slower than 0 µs")
ROW = re.compile(r"\s+cpu(\d+)\s+(\S+)\s+([\d.]+)\s+(\d+)$")


def why_not_traceable() -> str | None:
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: linux-perf)"
    paranoid = int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())
    if os.geteuid() != 0 and paranoid > -1:
        return f"tracing every CPU needs root or kernel.perf_event_paranoid <= -1 ({paranoid})"
    return None


def test_every_slow_request_is_matched_with_the_order_path_that_served_it():
    why = why_not_traceable()
    if why:
        pytest.skip(why)
    # at a threshold of 0 every request is slow, and each one's wait saw the order path run
    out = subprocess.run([sys.executable, str(SCRIPT), "--rate", "200", "--seconds", "2",
                          "--threshold-us", "0", "--top", "40"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    header = HEADER.match(lines[0])
    assert header, out.stdout
    requests, slow = int(header[1]), int(header[2])
    assert requests >= 350 and slow == requests
    rows = [ROW.match(line) for line in lines[2:]]
    assert rows and all(rows), out.stdout
    seen = {(int(r[1]), r[2]): int(r[4]) for r in rows}
    for role in ("gateway", "matcher"):
        # pinned to one CPU, each in (nearly) every request's wait
        in_requests = max(n for (_, task), n in seen.items() if task == role)
        assert in_requests >= 0.9 * slow, (role, out.stdout)
    assert any(task == "client" or task.startswith("client/") for _, task in seen)
