"""Refusals counted, not logged one by one: a client can send a million bad messages, the log
gets one line per reason per interval with a count (and nothing a client sends writes a
traceback)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("perpx.gateway")

LOG_INTERVAL_S = 10.0


class ReasonLog:
    def __init__(self, interval_s: float = LOG_INTERVAL_S):
        self.interval_s = interval_s
        self.counts: dict[str, int] = {}     # since the last log line
        self.totals: dict[str, int] = {}     # since start (the gateway's stats: metrics)
        self.due = 0.0

    def note(self, reason: str) -> None:
        totals = self.totals
        totals[reason] = totals.get(reason, 0) + 1
        counts = self.counts
        counts[reason] = counts.get(reason, 0) + 1
        if len(counts) == 1 and counts[reason] == 1 and time.monotonic() >= self.due:
            self.flush()      # the first of a quiet spell: at once

    def flush_due(self) -> None:
        if self.counts and time.monotonic() >= self.due:
            self.flush()

    def flush(self) -> None:
        for reason, n in sorted(self.counts.items()):
            log.warning("%d message(s) refused in the last %.0f s: %s", n, self.interval_s,
                        reason)
        self.counts.clear()
        self.due = time.monotonic() + self.interval_s


def where(e: BaseException) -> str:
    """`TypeError at gateway/codec.py:123`: an unexpected error in one line (without its
    text, which may quote the client's data: one line per place, not per message)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(e).__name__
    path = tb.tb_frame.f_code.co_filename
    return f"{type(e).__name__} at {'/'.join(path.split('/')[-2:])}:{tb.tb_lineno}"
