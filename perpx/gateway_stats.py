"""The gateways' stats files (run/gateway-N.stats.json), as `perpx status` and the metrics
exporter read them.

A gateway rewrites its file every STATS_INTERVAL_S (gateway/stats_file.py) and leaves it
behind when it dies; the supervisor's replacement writes its own about a second after it
serves. Until then, or for good if the gateway stays down, the file's counts are nobody's
current ones: the file is stale, and the reader says why.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.stats_file import STATS_INTERVAL_S
from perpx.launch import pid_alive

# Three writes missed: the writer is a SCHED_BATCH thread that runs when the serving thread
# waits (gateway/stats_file.py), so on a busy box one write can come a second late while the
# gateway serves. Older than this, the gateway has stopped passing through its loop, or the
# pid in the file now names another process.
STALE_AFTER_S = 3 * STATS_INTERVAL_S


@dataclass(frozen=True)
class GatewayStats:
    stats: dict               # the file's JSON, as the gateway wrote it
    stale: str | None         # why its counts are not current ("pid 12 is not running"), or None


def read_gateway_stats(run_dir) -> dict[str, GatewayStats]:
    """Each gateway's stats file in `run_dir` by gateway name (gateway-N), whole files only."""
    out = {}
    now_s = time.time()
    for path in sorted(Path(run_dir).glob("gateway-*.stats.json")):
        try:
            with open(path) as f:
                # the mtime of the file read, not of one renamed over it meanwhile
                age_s = now_s - os.fstat(f.fileno()).st_mtime
                stats = json.load(f)
        except (OSError, ValueError):
            continue      # being replaced, or from a gateway that died writing it
        if not isinstance(stats, dict):
            continue      # not a stats file: `perpx status` reads the others
        out[path.name.split(".")[0]] = GatewayStats(stats, _stale_reason(stats.get("pid"), age_s))
    return out


def _stale_reason(pid, age_s: float) -> str | None:
    if type(pid) is not int:
        return "it names no pid"
    if not pid_alive(pid):
        return f"pid {pid} is not running"
    if age_s > STALE_AFTER_S:
        return f"last written {age_s:.0f} s ago"
    return None
