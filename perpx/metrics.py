"""The Prometheus exporter: what an operator watches, read from shared memory, off the hot path.

`perpx up` runs it as threads of the supervisor (Exporter.start) and names its URL in
endpoints.json as `metrics` (port: endpoints.metrics_port). Nothing here writes to shared memory
or joins the event ring as a consumer, so a slow or stopped exporter never holds up the matcher:

- counters, tables and boards are read as they are (a torn read of a moving table is possible,
  so the crossed-book alarm needs two samples in a row before it fires);
- the event ring is read behind the matcher's back: events between the last one seen and the
  published cursor are copied, then kept only if the producer cannot have overwritten them
  meanwhile (published < first + capacity); events that went by unseen are counted in
  perpx_events_missed_total instead. From them come rejects by reason and liquidations.
- ack latency: the gateways measure none, so a canary client (its own account, reused across
  runs: STATE_DIR/metrics.json) sends a `withdraw` it cannot afford every PROBE_INTERVAL_S;
  the matcher rejects it (insufficient_balance), and the time to that reply is the round trip
  of a sequenced request through gateway, matcher and journal, as a client sees it. Its own
  rejects are left out of perpx_rejects_total. What is missing: the latency of the real
  orders (a gateway-side histogram), and rejects the gateways give before the matcher
  (rate_limited, invalid_message, ...).

Metric names (all prefixed perpx_): see METRICS. `perpx top` renders a scrape of the same.
"""

from __future__ import annotations

import json
import threading
import time
from decimal import Decimal

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.records import (EV_LIQUIDATION, EV_REJECT, EVENT_DTYPE, LIQUIDATION_EVENT_DTYPE,
                            ORDER_EVENT_DTYPE, REASON_NAMES)
from engine.service import attach_state
from engine.state import C_INSURANCE_ATOMS, C_SEQ
from perpx.client import Client, ClientError
from perpx.config import config_from_resolved, write_json_atomic
from perpx.ops import create_account
from persistd.snapshot import snapshots
from shm import names
from shm.index_board import IndexBoard
from shm.progress import JournalProgress
from shm.ring import EventRing

SAMPLE_INTERVAL_S = 1.0
PROBE_INTERVAL_S = 1.0
CANARY_FILE = "metrics.json"
LIQUIDATION_KINDS = {1: "liquidated", 2: "adl"}
# seconds; a durable ack on this box is ~1-3 ms, a stalled journal shows in the top buckets
ACK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# name -> help text; every one is present in every scrape once the exchange is up
METRICS = {
    "perpx_seq": "sequence number of the last command the matcher processed",
    "perpx_commands_total": "commands sequenced by the matcher (seq)",
    "perpx_commands_per_second": "commands sequenced per second over the last sample interval",
    "perpx_ack_latency_seconds": "round trip of the canary's sequenced request (see module doc)",
    "perpx_event_ring_lag_events": "events published but not yet read, per consumer",
    "perpx_durable_lag_commands": "seq minus durable_seq: commands not yet journaled",
    "perpx_duckdb_lag_commands": "seq minus the DuckDB store's seq",
    "perpx_snapshot_age_seconds": "age of the newest state snapshot file",
    "perpx_snapshot_lag_commands": "seq minus the newest snapshot's seq",
    "perpx_book_crossed": "1 when a market's best bid >= best ask in two samples in a row",
    "perpx_open_interest": "open interest per market, in contracts (sum of long sizes)",
    "perpx_insurance_fund_usdc": "the insurance fund",
    "perpx_mark_price": "riskd's mark price per market",
    "perpx_index_price": "riskd's index price per market",
    "perpx_mark_minus_index": "mark minus index per market, in quote units",
    "perpx_liquidations_total": "liquidation and ADL closing steps per market and kind",
    "perpx_rejects_total": "requests the matcher rejected, by reason (canary's excluded)",
    "perpx_process_restarts_total": "restarts of each supervised process",
    "perpx_events_missed_total": "events the exporter could not read before they were reused",
}


def _tail_events(ring: EventRing, start: int) -> tuple[np.ndarray, int, int]:
    """(events published from `start` on, still intact; next position; events missed)."""
    published = ring.published_cursor()
    missed = 0
    first = max(start, published - ring.capacity)
    if first > start:
        missed = first - start
    n = published - first
    if n <= 0:
        return np.zeros(0, EVENT_DTYPE), published, missed
    idx = (np.arange(first, published) & ring.mask)
    copy = ring.records[idx].copy()
    after = ring.published_cursor()
    # slots before after - capacity may have been rewritten while we copied
    lost = max(0, after - ring.capacity - first)
    if lost:
        copy = copy[lost:]
        missed += lost
    return copy, published, missed


class Sampler:
    """One reading of the exchange's numbers per sample(): shared memory only."""

    def __init__(self, sd, doc: dict, restarts=None):
        self.sd = sd
        self.doc = doc
        self.config = config_from_resolved(doc)
        self.markets = list(self.config.markets)
        self.restarts = restarts or (lambda: {})
        prefix = doc["prefix"]
        self._region, self.state = attach_state(prefix, sd.engine_config(doc))
        self.events = EventRing.attach(names.event_ring(prefix), EVENT_DTYPE)
        self.progress = JournalProgress.attach(prefix)
        self.board = IndexBoard.attach(prefix)
        self.canary_account = None
        self._event_pos = self.events.published_cursor()
        self._last = None          # (monotonic, seq) of the previous sample
        self._crossed_before: set[str] = set()
        self.rejects: dict[str, int] = {}
        self.liquidations: dict[tuple[str, str], int] = {}
        self.missed = 0
        self.values: dict = {}

    def close(self) -> None:
        self.state = None
        for thing in (self.events, self.progress, self.board, self._region):
            thing.close()

    def _count_events(self) -> None:
        ev, self._event_pos, missed = _tail_events(self.events, self._event_pos)
        self.missed += missed
        if not len(ev):
            return
        rej = ev[ev["etype"] == EV_REJECT].view(ORDER_EVENT_DTYPE)
        if self.canary_account is not None:
            rej = rej[rej["account"] != self.canary_account]
        for code, n in zip(*np.unique(rej["reason"], return_counts=True)):
            name = REASON_NAMES.get(int(code), str(int(code)))
            self.rejects[name] = self.rejects.get(name, 0) + int(n)
        liq = ev[ev["etype"] == EV_LIQUIDATION].view(LIQUIDATION_EVENT_DTYPE)
        for market, kind in zip(liq["market"].tolist(), liq["kind"].tolist()):
            key = (self._symbol(market), LIQUIDATION_KINDS.get(kind, str(kind)))
            self.liquidations[key] = self.liquidations.get(key, 0) + 1

    def _symbol(self, market_id: int) -> str:
        for m in self.markets:
            if m.id == market_id:
                return m.symbol
        return str(market_id)

    def _books(self) -> dict[str, bool]:
        st = self.state
        crossed = {}
        for m in self.markets:
            nb, na = int(st.book_depth[m.id, 0]), int(st.book_depth[m.id, 1])
            if nb and na:
                bid = int(st.book_keys[m.id, 0, nb - 1])
                ask = -int(st.book_keys[m.id, 1, na - 1])
                now = bid >= ask
            else:
                now = False
            crossed[m.symbol] = now and m.symbol in self._crossed_before
            if now:
                self._crossed_before.add(m.symbol)
            else:
                self._crossed_before.discard(m.symbol)
        return crossed

    def sample(self) -> dict:
        now = time.monotonic()
        st = self.state
        seq = int(st.counters[C_SEQ])
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (seq - self._last[1]) / (now - self._last[0])
        self._last = (now, seq)
        self._count_events()
        lags = {}
        published = self.events.published_cursor()
        for name in self.events.consumer_names:
            cursor = self.events.consumer_cursor(name)
            if cursor is not None:
                lags[name] = max(published - cursor, 0)
        snaps = snapshots(self.sd.snapshots_dir)
        snap_age = time.time() - snaps[-1][1].stat().st_mtime if snaps else None
        sizes = st.positions["size_lots"]
        markets = {}
        for m in self.markets:
            col = sizes[:, m.id]
            pub = self.board.published(m.id)
            row = {"open_interest": float(Decimal(int(col[col > 0].sum())) * m.lot_size)}
            if pub is not None:
                mark = Decimal(int(pub.mark_ticks)) * m.tick_size
                index = Decimal(int(pub.index_ticks)) * m.tick_size
                row.update(mark=float(mark), index=float(index), mark_minus_index=float(mark - index))
            markets[m.symbol] = row
        for symbol, crossed in self._books().items():
            markets[symbol]["crossed"] = int(crossed)
        self.values = {
            "seq": seq, "commands_per_second": rate, "event_ring_lag": lags,
            "durable_lag": max(seq - self.progress.durable_seq(), 0),
            "duckdb_lag": max(seq - self.progress.store_seq(), 0),
            "snapshot_age": snap_age,
            "snapshot_lag": max(seq - self.progress.snapshot_seq(), 0),
            "insurance_fund": int(st.counters[C_INSURANCE_ATOMS]) / 1e6,
            "markets": markets, "rejects": dict(self.rejects),
            "liquidations": dict(self.liquidations), "restarts": self.restarts(),
            "events_missed": self.missed,
        }
        return self.values


class _Collector:
    """Turns the Sampler's latest values into metric families at each scrape."""

    def __init__(self, sampler: Sampler, lock: threading.Lock):
        self.sampler = sampler
        self.lock = lock

    def collect(self):
        with self.lock:
            v = dict(self.sampler.values)
        if not v:
            return

        def gauge(name, labels=(), rows=None, value=None):
            g = GaugeMetricFamily(name, METRICS[name], labels=list(labels))
            if rows is None:
                g.add_metric([], value)
            else:
                for lv, x in rows:
                    g.add_metric(list(lv), x)
            return g

        def counter(name, labels=(), rows=None, value=None):
            # CounterMetricFamily adds the _total suffix to the family's name
            c = CounterMetricFamily(name, METRICS[name + "_total"], labels=list(labels))
            if rows is None:
                c.add_metric([], value)
            else:
                for lv, x in rows:
                    c.add_metric(list(lv), x)
            return c

        mk = v["markets"]
        yield gauge("perpx_seq", value=v["seq"])
        yield counter("perpx_commands", value=v["seq"])
        yield gauge("perpx_commands_per_second", value=v["commands_per_second"])
        yield gauge("perpx_event_ring_lag_events", ["consumer"],
                    [((k,), x) for k, x in v["event_ring_lag"].items()])
        yield gauge("perpx_durable_lag_commands", value=v["durable_lag"])
        yield gauge("perpx_duckdb_lag_commands", value=v["duckdb_lag"])
        yield gauge("perpx_snapshot_age_seconds",
                    value=v["snapshot_age"] if v["snapshot_age"] is not None else float("nan"))
        yield gauge("perpx_snapshot_lag_commands", value=v["snapshot_lag"])
        yield gauge("perpx_book_crossed", ["market"], [((s,), r["crossed"]) for s, r in mk.items()])
        yield gauge("perpx_open_interest", ["market"],
                    [((s,), r["open_interest"]) for s, r in mk.items()])
        yield gauge("perpx_insurance_fund_usdc", value=v["insurance_fund"])
        for key, name in (("mark", "perpx_mark_price"), ("index", "perpx_index_price"),
                          ("mark_minus_index", "perpx_mark_minus_index")):
            yield gauge(name, ["market"], [((s,), r[key]) for s, r in mk.items() if key in r])
        yield counter("perpx_liquidations", ["market", "kind"],
                      [((s, k), n) for (s, k), n in v["liquidations"].items()]
                      or [((s, "liquidated"), 0) for s in mk])
        yield counter("perpx_rejects", ["reason"], [((r,), n) for r, n in v["rejects"].items()]
                      or [(("none",), 0)])
        yield counter("perpx_process_restarts", ["process"],
                      [((p,), n) for p, n in v["restarts"].items()])
        yield counter("perpx_events_missed", value=v["events_missed"])


class Exporter:
    """The sampler, the canary and the HTTP server, as daemon threads of the caller."""

    def __init__(self, sd, doc: dict, endpoints: dict, restarts=None,
                 sample_interval_s: float = SAMPLE_INTERVAL_S,
                 probe_interval_s: float = PROBE_INTERVAL_S, log=None):
        self.sd, self.doc, self.endpoints = sd, doc, endpoints
        self.sample_interval_s = sample_interval_s
        self.probe_interval_s = probe_interval_s
        self.log = log or (lambda msg: None)
        self.lock = threading.Lock()
        self.sampler = Sampler(sd, doc, restarts)
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self.sampler, self.lock))
        self.ack_latency = Histogram("perpx_ack_latency_seconds",
                                     METRICS["perpx_ack_latency_seconds"],
                                     buckets=ACK_BUCKETS, registry=self.registry)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._httpd = None

    def start(self, host: str, port: int) -> str:
        """Serve on host:port; returns the URL of /metrics."""
        with self.lock:
            self.sampler.sample()
        self._httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        self._threads.append(thread)
        for target, name in ((self._sample_loop, "metrics-sampler"),
                             (self._probe_loop, "metrics-canary")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        connect_host = "127.0.0.1" if host in ("*", "0.0.0.0", "") else host
        return f"http://{connect_host}:{self._httpd.server_port}/metrics"

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self.sampler.close()

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            try:
                with self.lock:
                    self.sampler.sample()
            except Exception as e:      # keep the exporter alive; the log says why
                self.log(f"metrics: sample failed: {type(e).__name__}: {e}")

    def _canary_certificate(self) -> str:
        """The canary's account, one per state dir (recorded in STATE_DIR/metrics.json)."""
        record = self.sd.path / CANARY_FILE
        try:
            account = int(json.loads(record.read_text())["canary_account"])
            cert = self.sd.clients_dir / f"{account}.key_secret"
            if account in self.sd.registered_accounts() and cert.exists():
                self.sampler.canary_account = account
                return str(cert)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        account, cert = create_account(self.sd, self.sd.engine_config(self.doc).max_accounts)
        write_json_atomic(record, {"canary_account": account})
        self.sampler.canary_account = account
        return cert

    def _probe_loop(self) -> None:
        try:
            cert = self._canary_certificate()
        except Exception as e:
            self.log(f"metrics: no canary account, so no ack latency: {e}")
            return
        client = None
        while not self._stop.wait(self.probe_interval_s):
            try:
                if client is None:
                    client = Client.connect(self.endpoints, cert, timeout_s=5.0,
                                            connect_timeout_s=5.0)
                t0 = time.perf_counter()
                reply = client.withdraw("1")
                if reply.get("type") == "reject":
                    self.ack_latency.observe(time.perf_counter() - t0)
            except ClientError:
                if client is not None:
                    client.close()
                client = None     # the gateway is restarting: connect again next round
        if client is not None:
            client.close()
