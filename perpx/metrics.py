"""The Prometheus exporter: what an operator watches, read from shared memory, off the hot path.

`perpx up` runs it as threads of the supervisor (Exporter.start) and names its URL in
endpoints.json as `metrics` (port: endpoints.metrics_port). Nothing here writes to shared memory
or joins the event ring as a consumer, so a slow or stopped exporter never holds up the matcher:

- counters, tables and boards are read as they are (a torn read of a moving table is possible,
  so the crossed-book alarm needs two samples in a row before it fires);
- the event ring is read behind the matcher's back: events between the last one seen and the
  published cursor are copied, then kept only if the producer cannot have overwritten them
  meanwhile (see _tail_events); events that went by unseen are counted in
  perpx_events_missed_total instead. From them come rejects by reason and liquidations.
- ack latency: each gateway measures it (gateway/ack_latency.py: its receipt stamp to the
  reply handed to the socket, per request the matcher answered, durable hold included) and
  writes the histogram into its stats file once a second; the sampler adds the gateways' up,
  a restarted gateway's counts on top of what its predecessor had counted.

Metric names (all prefixed perpx_): see METRICS. `perpx top` renders a scrape of the same.
"""

from __future__ import annotations

import os
import threading
import time
from decimal import Decimal

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from engine.book import best_price
from engine.records import (EV_LIQUIDATION, EV_REJECT, EVENT_DTYPE, LIQ_KIND_ADL,
                            LIQ_KIND_LIQUIDATED, LIQUIDATION_EVENT_DTYPE, ORDER_EVENT_DTYPE,
                            REASON_NAMES)
from engine.shared_state import attach_state
from engine.state import C_INSURANCE_ATOMS, C_SEQ
from gateway.ack_latency import ACK_BUCKETS_S
from perpx.config import config_from_resolved
from perpx.gateway_stats import STALE_AFTER_S, read_gateway_stats
from persistd.snapshot import snapshots
from shm import names
from shm.index_board import IndexBoard
from shm.progress import JournalProgress
from shm.ring import EventRing

SAMPLE_INTERVAL_S = 1.0
# The event-ring follower's poll: far inside the time the matcher takes to lap the ring's
# reusable part (14k events) at any rate the gateways feed it, and cheap on the CPU that the
# journal uses (polling every 2 ms for ack latency, as it once did, cost 8% of that CPU and
# 8% of durable throughput in `perpx bench e2e`).
TAIL_INTERVAL_S = 0.01
LIQUIDATION_KINDS = {LIQ_KIND_LIQUIDATED: "liquidated", LIQ_KIND_ADL: "adl"}
WRITE_AHEAD_FRACTION = 8       # see _tail_events

# name -> help text; every one is present in every scrape once the exchange is up
METRICS = {
    "perpx_seq": "sequence number of the last command the matcher processed",
    "perpx_commands_total": "commands sequenced by the matcher (seq)",
    "perpx_commands_per_second": "commands sequenced per second over the last sample interval",
    "perpx_ack_latency_seconds": "gateway receipt to reply sent, per request the matcher "
                                 "answered (durable hold included)",
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
    "perpx_rejects_total": "requests the matcher rejected, by reason",
    "perpx_gateway_refusals_total": "messages a gateway refused before the matcher (rate "
                                    "limit, malformed, ...), by gateway and reason",
    "perpx_gateway_memory_bytes": "a gateway's memory: rss, limit (gateway_memory_limit_mb), "
                                  "and what it holds for clients: queued, held, replay, views",
    "perpx_gateway_up": "1 when a gateway's stats file is live (its pid running, written in "
                        f"the last {STALE_AFTER_S:g} s), 0 when stale or not there",
    "perpx_process_restarts_total": "restarts of each supervised process",
    "perpx_events_missed_total": "events the exporter could not read before they were reused",
}


def _tail_events(ring: EventRing, start: int) -> tuple[np.ndarray, int, int]:
    """(events published from `start` on, still intact; next position; events missed).

    The matcher reuses a slot once every consumer has passed it, and writes a batch's slots
    before it publishes them, so a slot can be rewritten while published < its position +
    capacity. Kept are the slots the writer cannot have reached, with a margin of
    WRITE_AHEAD_FRACTION of the ring for its unpublished batch, and only events whose seq
    is not past the last published one (a rewritten slot holds a newer seq)."""
    published = ring.published_cursor()
    missed = 0
    first = max(start, published - ring.capacity + ring.capacity // WRITE_AHEAD_FRACTION)
    if first > start:
        missed = first - start
    if published <= first:
        return np.zeros(0, EVENT_DTYPE), published, missed
    newest_seq = int(ring.records[(published - 1) & ring.mask]["seq"])
    start = first & ring.mask
    end = start + (published - first)            # past the ring's end when the range wraps
    copy = ring.records[start:end].copy() if end <= ring.capacity else \
        np.concatenate((ring.records[start:], ring.records[:end - ring.capacity]))
    after = ring.published_cursor()
    lost = min(max(0, after + ring.capacity // WRITE_AHEAD_FRACTION - ring.capacity - first),
               len(copy))
    copy = copy[lost:]
    fresh = copy["seq"] <= newest_seq
    missed += lost + int(len(copy) - fresh.sum())
    return copy[fresh], published, missed


class AckHistogram:
    """perpx_ack_latency_seconds: the gateways' histograms (their stats files) added up. Each
    gateway counts from its start; a gateway whose pid changed is a new one, and its counts
    add to what the previous ones counted, so the sum only grows."""

    def __init__(self):
        self.bounds = ACK_BUCKETS_S
        self.counts = np.zeros(len(ACK_BUCKETS_S) + 1, np.int64)   # the last: above them all
        self.sum_s = 0.0
        self._seen: dict[str, tuple[int, np.ndarray, float]] = {}  # gateway -> pid, counts, sum

    def update(self, gateway: str, pid: int, histogram: dict) -> None:
        counts = np.array(histogram["counts"], np.int64)
        if tuple(histogram["le_s"]) != self.bounds or len(counts) != len(self.counts):
            return                       # another version's buckets: not comparable
        pid_before, counts_before, sum_before = self._seen.get(gateway, (pid, 0, 0.0))
        if pid != pid_before:
            counts_before, sum_before = 0, 0.0
        self.counts += counts - counts_before
        self.sum_s += histogram["sum_s"] - sum_before
        self._seen[gateway] = (pid, counts, histogram["sum_s"])

    def family(self) -> HistogramMetricFamily:
        cumulative = np.cumsum(self.counts).tolist()
        return HistogramMetricFamily(
            "perpx_ack_latency_seconds", METRICS["perpx_ack_latency_seconds"],
            buckets=[(repr(float(b)), n) for b, n in zip(self.bounds, cumulative)]
            + [("+Inf", cumulative[-1])], sum_value=self.sum_s)


class Sampler:
    """The exchange's numbers, from shared memory and the gateways' stats files: sample()
    reads the gauges (once a second), follow() the event ring's new events (every
    TAIL_INTERVAL_S)."""

    def __init__(self, sd, doc: dict, restarts=None):
        self.sd = sd
        self.doc = doc
        self.config = config_from_resolved(doc)
        self.markets = list(self.config.markets)
        self.restarts = restarts or (lambda: {})
        self.ack_latency = AckHistogram()
        prefix = doc["prefix"]
        self._region, self.state = attach_state(prefix, sd.engine_config(doc))
        self.events = EventRing.attach(names.event_ring(prefix), EVENT_DTYPE)
        self.progress = JournalProgress.attach(prefix)
        self.board = IndexBoard.attach(prefix)
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

    def follow(self) -> None:
        """Read the events published since the last call: rejects and liquidations."""
        ev, self._event_pos, missed = _tail_events(self.events, self._event_pos)
        self.missed += missed
        if len(ev):
            self._count(ev)

    def _count(self, ev: np.ndarray) -> None:
        etype = ev["etype"]
        is_reject = etype == EV_REJECT
        if is_reject.any():
            rej = ev[is_reject].view(ORDER_EVENT_DTYPE)
            for code, n in zip(*np.unique(rej["reason"], return_counts=True)):
                name = REASON_NAMES.get(int(code), str(int(code)))
                self.rejects[name] = self.rejects.get(name, 0) + int(n)
        is_liquidation = etype == EV_LIQUIDATION
        if not is_liquidation.any():
            return
        liq = ev[is_liquidation].view(LIQUIDATION_EVENT_DTYPE)
        for market, kind in zip(liq["market"].tolist(), liq["kind"].tolist()):
            key = (self._symbol(market), LIQUIDATION_KINDS.get(kind, str(kind)))
            self.liquidations[key] = self.liquidations.get(key, 0) + 1

    def _symbol(self, market_id: int) -> str:
        for m in self.markets:
            if m.id == market_id:
                return m.symbol
        return str(market_id)

    def _gateway_stats(self) -> tuple[dict, dict, dict]:
        """From the stats file each gateway writes once a second (run/gateway-N.stats.json; a
        restarted gateway counts afresh): (gateway, reason) -> messages it refused itself,
        (gateway, part) -> bytes of its memory, and gateway -> 1 if its file is live, 0 if
        stale or not there; its ack latency goes into ack_latency. A stale file's refusals and
        memory are left out: they are a dead or stuck gateway's last ones, not current."""
        refusals = {}
        limit_mb = self.config.gateway_limits["gateway_memory_limit_mb"]
        configured = [f"gateway-{i}" for i in range(self.config.gateways)]
        # the limit of each gateway from the config, so the family is there before any stats
        memory = {(gateway, "limit"): limit_mb << 20 for gateway in configured}
        up = dict.fromkeys(configured, 0)
        for gateway, g in read_gateway_stats(self.sd.run_dir).items():
            stats = g.stats
            # a dead gateway's last histogram still belongs in the sum (its pid's counts are
            # taken once, whatever the file's age)
            if "ack_latency" in stats:
                self.ack_latency.update(gateway, stats.get("pid"), stats["ack_latency"])
            up[gateway] = int(g.stale is None)
            if g.stale is not None:
                continue
            for reason, n in stats.get("refused_by_reason", {}).items():
                refusals[(gateway, reason)] = int(n)
            mem = stats.get("memory", {})
            for part in ("rss", "limit", "queued", "held", "replay", "views"):
                value = stats.get("rss_bytes") if part == "rss" else mem.get(f"{part}_bytes")
                if value is not None:
                    memory[(gateway, part)] = int(value)
        return refusals, memory, up

    def _books(self) -> dict[str, bool]:
        st = self.state
        crossed = {}
        for m in self.markets:
            bid, ask = best_price(st, m.id, 0), best_price(st, m.id, 1)
            now = bid is not None and ask is not None and bid >= ask
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
                row.update(mark=float(mark), index=float(index),
                           mark_minus_index=float(mark - index))
            markets[m.symbol] = row
        for symbol, crossed in self._books().items():
            markets[symbol]["crossed"] = int(crossed)
        refusals, gateway_memory, gateway_up = self._gateway_stats()
        self.values = {
            "seq": seq, "commands_per_second": rate, "event_ring_lag": lags,
            "durable_lag": max(seq - self.progress.durable_seq(), 0),
            "duckdb_lag": max(seq - self.progress.store_seq(), 0),
            "snapshot_age": snap_age,
            "snapshot_lag": max(seq - self.progress.snapshot_seq(), 0),
            "insurance_fund": int(st.counters[C_INSURANCE_ATOMS]) / 1e6,
            "markets": markets, "rejects": dict(self.rejects),
            "gateway_refusals": refusals, "gateway_memory": gateway_memory,
            "gateway_up": gateway_up,
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
            ack_latency = self.sampler.ack_latency.family()
        yield ack_latency
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
        yield counter("perpx_gateway_refusals", ["gateway", "reason"],
                      [((g, r), n) for (g, r), n in v["gateway_refusals"].items()]
                      or [(("gateway-0", "none"), 0)])
        yield gauge("perpx_gateway_memory_bytes", ["gateway", "part"],
                    [((g, part), n) for (g, part), n in v["gateway_memory"].items()])
        yield gauge("perpx_gateway_up", ["gateway"],
                    [((g,), x) for g, x in v["gateway_up"].items()])
        yield counter("perpx_process_restarts", ["process"],
                      [((p,), n) for p, n in v["restarts"].items()])
        yield counter("perpx_events_missed", value=v["events_missed"])


class Exporter:
    """The sampler, the event-ring follower and the HTTP server, as daemon threads of the
    caller (the supervisor)."""

    def __init__(self, sd, doc: dict, restarts=None,
                 sample_interval_s: float = SAMPLE_INTERVAL_S,
                 tail_interval_s: float = TAIL_INTERVAL_S, log=None):
        self.sample_interval_s = sample_interval_s
        self.tail_interval_s = tail_interval_s
        self.log = log or (lambda msg: None)
        self.lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.sampler = Sampler(sd, doc, restarts)
        self.registry.register(_Collector(self.sampler, self.lock))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._httpd = None

    def start(self, host: str, port: int) -> str:
        """Serve on host:port; returns the URL of /metrics."""
        with self.lock:
            self.sampler.sample()
            self.sampler.follow()
        self._httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        self._threads.append(thread)
        for step, interval_s, name in (
                (self.sampler.sample, self.sample_interval_s, "metrics-sampler"),
                (self.sampler.follow, self.tail_interval_s, "metrics-follower")):
            t = threading.Thread(target=self._loop, args=(step, interval_s), name=name,
                                 daemon=True)
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

    def _loop(self, step, interval_s: float) -> None:
        """step() every interval_s, on SCHED_BATCH: woken by its timer (the follower 100 times
        a second) this thread does not preempt what runs on its CPU, where the journal thread
        and the benchmarks' clients wait for their turn with latency at stake."""
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))    # this thread only
        except (AttributeError, OSError):
            pass
        failed = None
        while not self._stop.wait(interval_s):
            try:
                with self.lock:
                    step()
                failed = None
            except Exception as e:      # keep the exporter alive; say why once per cause
                if repr(e) != failed:
                    failed = repr(e)
                    self.log(f"metrics: {step.__name__} failed: {type(e).__name__}: {e}")
