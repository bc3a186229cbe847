"""`perpx top`: a live terminal dashboard of the exchange's Prometheus endpoint.

It scrapes endpoints.metrics (perpx/metrics.py) every interval and redraws one screen (rich):
throughput, the ack-latency histogram as bars, each market (mark, index, mark - index, open
interest, crossed-book alarm, liquidations), the pipeline's lags (event ring per reader,
journal, DuckDB, snapshot), rejects by reason and process restarts. It reads nothing else, so
it shows exactly what Prometheus would.
"""

from __future__ import annotations

import math
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

BAR_WIDTH = 30


def scrape(url: str, timeout_s: float = 2.0) -> dict:
    """{sample name: [(labels dict, value), ...]} of one scrape."""
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _one(m: dict, name: str, default=None):
    rows = m.get(name)
    return rows[0][1] if rows else default


def _by(m: dict, name: str, label: str) -> dict:
    return {labels.get(label): v for labels, v in m.get(name, [])}


def _buckets(m: dict) -> list[tuple[float, float]]:
    """(upper bound, count in that bucket) of the ack-latency histogram, in order."""
    cum = sorted(((float(labels["le"]), v) for labels, v in
                  m.get("perpx_ack_latency_seconds_bucket", [])), key=lambda x: x[0])
    out, below = [], 0.0
    for le, c in cum:
        out.append((le, c - below))
        below = c
    return out


def quantile(m: dict, q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile of the ack latency (seconds)."""
    total = _one(m, "perpx_ack_latency_seconds_count", 0.0)
    if not total:
        return None
    seen = 0.0
    for le, n in _buckets(m):
        seen += n
        if seen >= q * total:
            return le
    return None


def _ms(seconds) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "> 5 s"
    return f"<= {seconds * 1000:g} ms"


def _num(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def render(m: dict, title: str = "perpx top") -> Group:
    """One screen of the dashboard from a scrape (see scrape)."""
    head = Text()
    head.append(f"{title}   ", style="bold")
    head.append(f"seq {int(_one(m, 'perpx_seq', 0))}   ")
    head.append(f"commands/s {_one(m, 'perpx_commands_per_second', 0.0):,.0f}   ")
    head.append(f"ack p50 {_ms(quantile(m, 0.5))}  p99 {_ms(quantile(m, 0.99))}   ")
    head.append(f"insurance fund {_num(_one(m, 'perpx_insurance_fund_usdc'), 2)} USDC")

    hist = Table(title="ack latency (receipt to reply sent, requests the matcher answered)",
                 title_justify="left", show_header=True, box=None)
    hist.add_column("bucket", justify="right")
    hist.add_column("count", justify="right")
    hist.add_column("")
    buckets = [(le, n) for le, n in _buckets(m)]
    peak = max([n for _, n in buckets] or [0]) or 1
    for le, n in buckets:
        hist.add_row("+Inf" if math.isinf(le) else f"{le * 1000:g} ms", f"{n:.0f}",
                     "█" * round(BAR_WIDTH * n / peak))

    markets = Table(title="markets", title_justify="left")
    for col in ("market", "mark", "index", "mark - index", "open interest", "book",
                "liquidations"):
        markets.add_column(col, justify="left" if col in ("market", "book") else "right")
    marks, index = _by(m, "perpx_mark_price", "market"), _by(m, "perpx_index_price", "market")
    diff = _by(m, "perpx_mark_minus_index", "market")
    oi, crossed = _by(m, "perpx_open_interest", "market"), _by(m, "perpx_book_crossed", "market")
    liq: dict = {}
    for labels, v in m.get("perpx_liquidations_total", []):
        liq[labels.get("market")] = liq.get(labels.get("market"), 0) + v
    for sym in sorted(oi):
        markets.add_row(sym, _num(marks.get(sym)), _num(index.get(sym)), _num(diff.get(sym)),
                        _num(oi.get(sym)),
                        Text("CROSSED", style="bold red") if crossed.get(sym) else Text("ok"),
                        f"{liq.get(sym, 0):.0f}")

    pipe = Table(title="pipeline", title_justify="left")
    pipe.add_column("what")
    pipe.add_column("lag", justify="right")
    for consumer, v in sorted(_by(m, "perpx_event_ring_lag_events", "consumer").items()):
        pipe.add_row(f"event ring -> {consumer}", f"{v:.0f} events")
    pipe.add_row("journal (durable)", f"{_one(m, 'perpx_durable_lag_commands', 0):.0f} commands")
    pipe.add_row("DuckDB", f"{_one(m, 'perpx_duckdb_lag_commands', 0):.0f} commands")
    age = _one(m, "perpx_snapshot_age_seconds")
    pipe.add_row("snapshot", f"{_one(m, 'perpx_snapshot_lag_commands', 0):.0f} commands, "
                 + ("none yet" if age is None or math.isnan(age) else f"{age:.0f} s old"))

    rejects = Table(title="rejects by reason", title_justify="left")
    rejects.add_column("reason")
    rejects.add_column("count", justify="right")
    for reason, v in sorted(_by(m, "perpx_rejects_total", "reason").items(),
                            key=lambda kv: -kv[1]):
        if v:
            rejects.add_row(reason, f"{v:.0f}")

    procs = Table(title="processes", title_justify="left")
    procs.add_column("process")
    procs.add_column("restarts", justify="right")
    for name, v in _by(m, "perpx_process_restarts_total", "process").items():
        procs.add_row(name, Text(f"{v:.0f}", style="bold red" if v else ""))

    return Group(head, Text(""), hist, Text(""), markets, Text(""), pipe, Text(""), rejects,
                 Text(""), procs)


def run_top(url: str, console, interval_s: float = 1.0, once: bool = False,
            title: str = "perpx top") -> None:
    """Redraw every interval_s until Ctrl-C (once: one frame, printed)."""
    if once:
        console.print(render(scrape(url), title))
        return
    with Live(render(scrape(url), title), console=console, screen=False,
              auto_refresh=False) as live:
        while True:
            time.sleep(interval_s)
            live.update(render(scrape(url), title), refresh=True)
