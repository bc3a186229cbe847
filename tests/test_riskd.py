"""riskd: index feeds, Binance's mark price in ticks, and the riskd process against a real matcher.

The mark formula (riskd/mark.py) is Binance's, as published on
https://www.binance.com/en/support/faq/what-are-mark-price-and-price-index-in-usd%E2%93%A2-margined-futures-360033525071
and https://www.binance.com/en/support/faq/fff6ec1b3f5845d19f1fb924644a0877 :
Mark = Median(Price 1, Price 2, Contract Price); Price 1 = Index x (1 + Last Funding Rate x
(Time Until Funding / 8 h)); Price 2 = Index + Moving Average of ((Bid1 + Ask1)/2 - Index);
"If Price 1 < Price 2 < Contract Price, then take Price 2 as Mark Price".
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.matcher import LocalEvents, Matcher
from engine.records import (COMMAND_DTYPE, EV_MARK, EVENT_DTYPE, MARK_EVENT_DTYPE,
                            MARKET_CANCEL_ONLY, MARKET_TRADING)
from engine.service import MatcherService
from engine.shared_state import attach_state
from engine.spec import ExchangeSpec, Source
from shm import names
from engine.state import C_SEQ
from perpx.cli import _risk_report
from perpx.config import genesis_commands, parse_config
from riskd.feeds import CsvFeedError, CsvReplay, ManualFeed, SimWalk, feed_for
from riskd.mark import MarkCalculator, median
from riskd.service import Riskd, top_of_book
from shm.index_board import IndexBoard, Published
from shm.region import ShmError
from shm.ring import CommandRing, EventRing
from tests.engine_helpers import BTC, CONFIG, USDC, buy, deposit, market_commands, sell
from tests.shm_workers import attach_when_ready, shm_prefix  # noqa: F401 — fixture: prefix, leak check

REPO = Path(__file__).resolve().parent.parent
S = 1_000_000_000
HOUR_NS = 3600 * S
WAIT_S = 20.0
STARTUP_S = 120.0        # a first start compiles the matcher (cached afterwards)


def wait_until(condition, timeout_s: float, what: str, also=None) -> None:
    """Poll condition() until true; `also()` may raise to fail early (a dead child)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if also is not None:
            also()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


def config(tmp_path: Path, csv_rows: str = "0,2000\n"):
    csv_file = tmp_path / "index.csv"
    csv_file.write_text(csv_rows)
    return parse_config(f"""
[engine]
max_accounts = 16
max_markets = 4
max_orders = 1024

[[markets]]
symbol = "SIM-PERP"
tick_size = "0.1"
lot_size = "0.001"
initial_price = "65000"
oracle = "sim"

[[markets]]
symbol = "MAN-PERP"
tick_size = "0.01"
lot_size = "0.01"
initial_price = "3500"
oracle = "manual"

[[markets]]
symbol = "CSV-PERP"
tick_size = "0.5"
lot_size = "0.01"
initial_price = "2000"
oracle = "csv:{csv_file}"
""")


SIM, MAN, CSV = 0, 1, 2


# ---- feeds --------------------------------------------------------------------------------------
def sim_series(seed, times_ns, initial=650_000, max_ticks=6_500_000, vol=1.0):
    walk = SimWalk(initial, seed, vol, max_ticks)
    return [walk.index_ticks(t) for t in times_ns]


def test_sim_walk_is_reproducible_on_the_grid_and_moves():
    times = [10 * S + k * 250_000_000 for k in range(400)]     # 100 s at riskd's cadence
    first, again, other = sim_series(7, times), sim_series(7, times), sim_series(8, times)
    assert first == again
    assert first != other
    assert first[0] == 650_000                                 # starts at the initial price
    assert all(isinstance(p, int) and 1 <= p <= 6_500_000 for p in first)
    assert len(set(first)) > 100                               # it moves
    # The path depends on time, not on how often it is sampled.
    every_second = sim_series(7, times[::4])
    assert every_second == first[::4]


def test_sim_walk_stays_in_bounds_under_wild_volatility():
    times = [k * S for k in range(2000)]
    prices = sim_series(3, times, initial=50, max_ticks=100, vol=5000.0)
    assert min(prices) == 1 and max(prices) == 100
    assert all(1 <= p <= 100 for p in prices)


def test_csv_replay_by_offset_and_by_absolute_time(tmp_path):
    path = tmp_path / "btc.csv"
    path.write_text("# BTC index\nts_ns,price\n1000,65000.1\n1000,65000.2\n"
                    "3000000000,65001\n\n5000000000,64999.9\n")
    feed = CsvReplay(path, "0.1", max_ticks=6_500_000)
    t0 = 77 * S
    assert feed.index_ticks(t0) == 650_002                     # last row of the first instant
    assert feed.index_ticks(t0 + 2 * S) == 650_002
    assert feed.index_ticks(t0 + 3 * S) == 650_010
    assert feed.index_ticks(t0 + 10 * S) == 649_999            # the last price holds
    absolute = CsvReplay(path, "0.1", absolute_ts=True)
    assert absolute.index_ticks(999) is None
    assert absolute.index_ticks(3 * S) == 650_010


@pytest.mark.parametrize("rows, message", [
    ("ts_ns,price\n0,65000\n1,65000.05\n",
     "btc.csv:3: price 65000.05 is not a multiple of the tick size 0.1"),
    ("0,65000\n5,65000\n4,65000\n", "btc.csv:3: ts_ns 4 goes back"),
    ("0,65000\n1,-1\n", "btc.csv:2: price -1 is not positive"),
    ("0,65000\n1,1000000.1\n",
     "btc.csv:2: price 1000000.1 is above the market's max price 1000000"),
    ("0,65000\n1,abc\n", "btc.csv:2: price: 'abc' is not a plain decimal number"),
    ("0;65000\n", "btc.csv:1: expected `ts_ns,price`"),
    ("# nothing\n", "no price rows"),
])
def test_csv_replay_rejects_bad_files_naming_the_line(tmp_path, rows, message):
    path = tmp_path / "btc.csv"
    path.write_text(rows)
    with pytest.raises(CsvFeedError) as err:
        CsvReplay(path, "0.1", max_ticks=10_000_000)
    assert message in str(err.value)


def test_index_board_and_manual_feed(shm_prefix, tmp_path):
    cfg = config(tmp_path)
    board = IndexBoard.create(shm_prefix, 4)
    try:
        with pytest.raises(ShmError, match="holds 4 markets"):
            IndexBoard.attach(shm_prefix, 8)
        feed = feed_for(cfg.markets[MAN], shm_prefix, seed=0)
        assert isinstance(feed, ManualFeed)
        assert feed.index_ticks(0) is None and board.get(MAN) == 0
        assert board.set(MAN, 350_050) == 1
        assert feed.index_ticks(0) == 350_050 and feed.applied_version == 1
        assert board.set(MAN, 349_000) == 2 and feed.index_ticks(0) == 349_000
        assert board.get(SIM) == 0 and board.version(SIM) == 0
        with pytest.raises(ValueError):
            board.set(MAN, 0)
        assert board.published(MAN) is None
        values = Published(349_000, 349_010, 0, 8 * HOUR_NS, 123, 2)
        board.publish(MAN, values)
        other = IndexBoard.attach(shm_prefix)
        assert other.published(MAN) == values and other.published(SIM) is None
        other.close()
        feed.close()
    finally:
        board.close()
        board.unlink()


def test_feed_for_picks_the_configured_kind(shm_prefix, tmp_path):
    cfg = config(tmp_path, "0,2000\n10,2000.5\n")
    sim = feed_for(cfg.markets[SIM], shm_prefix, seed=1)
    assert isinstance(sim, SimWalk) and sim.index_ticks(0) == 650_000
    resumed = feed_for(cfg.markets[SIM], shm_prefix, seed=1, start_ticks=651_234)
    assert resumed.index_ticks(0) == 651_234
    csv = feed_for(cfg.markets[CSV], shm_prefix, seed=1)
    assert isinstance(csv, CsvReplay) and csv.index_ticks(0) == 4000
    bogus = dataclasses.replace(cfg.markets[SIM], oracle="pyth:BTC")
    with pytest.raises(ValueError, match="unknown oracle kind 'pyth'"):
        feed_for(bogus, shm_prefix, seed=1)


# ---- the mark ------------------------------------------------------------------------------------
def calc_with_basis(calc, start_ns, seconds, index, bid, ask):
    """Feed one sample a second (riskd ticks 4x a second; extra ticks take no sample)."""
    for k in range(seconds):
        for quarter in range(4):
            calc.mark_ticks(start_ns + k * S + quarter * S // 4, index, bid, ask, None, 0,
                            start_ns + 8 * HOUR_NS, 8 * 3600)


def test_mark_worked_example_from_binance_description():
    """BTC at tick 0.1: index 65000.0, last funding rate 0.01%, 2 h to funding of 8 h.
    Price 1 = 65000 x (1 + 0.0001 x 2/8) = 65001.625. Five minutes of books at 64994.0 /
    64996.0: basis -5.0 every second, so Price 2 = 64995.0. Last trade 65020.0.
    Median(65001.625, 64995.0, 65020.0) = 65001.625 = 650016.25 ticks -> 650016 (65001.6)."""
    calc = MarkCalculator(max_price_ticks=6_500_000)
    t0 = 1_700_000_000 * S
    calc_with_basis(calc, t0, 300, 650_000, 649_940, 649_960)
    now = t0 + 300 * S
    mark = calc.mark_ticks(now, 650_000, 649_940, 649_960, 650_200, 100_000,
                           now + 2 * HOUR_NS, 8 * 3600)
    parts = calc.last
    assert parts.price1 == Fraction(65001625, 100)
    assert parts.price2 == 649_950
    assert parts.contract_ticks == 650_200
    assert mark == 650_016


def test_mark_binance_median_rule_price1_lt_price2_lt_contract_takes_price2():
    calc = MarkCalculator(max_price_ticks=6_500_000)
    t0 = 1000 * S
    # mid 65010.0 vs index 65000.0: basis +10.0 -> Price 2 = 65010.0
    calc_with_basis(calc, t0, 10, 650_000, 650_095, 650_105)
    now = t0 + 10 * S
    mark = calc.mark_ticks(now, 650_000, 650_095, 650_105, 650_200, 0, now + HOUR_NS, 8 * 3600)
    assert calc.last.price1 == 650_000 < calc.last.price2 == 650_100 < 650_200
    assert mark == 650_100


def test_basis_moving_average_is_a_five_minute_window_of_second_samples():
    calc = MarkCalculator(max_price_ticks=6_500_000)
    t0 = 5000 * S
    calc_with_basis(calc, t0, 150, 650_000, 650_040, 650_060)     # basis +5.0 (50 ticks)
    calc_with_basis(calc, t0 + 150 * S, 150, 650_000, 650_190, 650_210)  # +20.0 (200 ticks)
    # 300 samples in the window: 150 x 50 + 150 x 200 (ticks) -> average 125 ticks
    now = t0 + 299 * S + S // 2
    calc.mark_ticks(now, 650_000, None, None, None, 0, now + HOUR_NS, 8 * 3600)
    assert calc.last.price2 == 650_125
    # 100 s later the first 100 samples have left the window (no new ones: empty book)
    later = now + 100 * S
    calc.mark_ticks(later, 650_000, None, None, None, 0, later + HOUR_NS, 8 * 3600)
    assert calc.last.price2 == 650_000 + Fraction(50 * 50 + 150 * 200, 200)
    # and five minutes after the last sample, Price 2 drops out: mark = index
    gone = t0 + 600 * S
    assert calc.mark_ticks(gone, 650_000, None, None, None, 0, gone + HOUR_NS, 8 * 3600) == 650_000
    assert calc.last.price2 is None


def test_missing_components_drop_out_and_rounding_is_half_even():
    now, nxt, iv = 10 * S, 10 * S + HOUR_NS, 8 * 3600

    def mark(index, bid=None, ask=None, last=None, max_ticks=6_500_000, rate=0):
        return MarkCalculator(max_ticks).mark_ticks(now, index, bid, ask, last, rate, nxt, iv)

    assert mark(650_000) == 650_000                               # only the index
    assert mark(650_000, last=650_101) == 650_050                 # mean 650050.5 -> even
    assert mark(650_001, last=650_002) == 650_002                 # 650001.5 -> even 650002
    assert mark(650_000, bid=650_000, ask=650_002) == 650_000     # P2 = 650001; mean .5 -> even
    assert mark(650_000, bid=None, ask=650_100) == 650_000        # one-sided book: no sample
    assert mark(650_000, 650_090, 650_110, 651_000) == 650_100    # all three: median
    assert mark(100, bid=180, ask=200, last=200, max_ticks=150) == 150   # clamped to the max
    assert mark(1, rate=-2_000_000_000) == 1                       # clamped to 1 tick
    assert median([3, 1, 2]) == 2 and median([1, 4]) == Fraction(5, 2)


def test_top_of_book_reads_the_matchers_tables():
    matcher, ring = Matcher(CONFIG), LocalEvents(1 << 12)
    ring.run(matcher, np.concatenate([market_commands(), deposit(1, 10 ** 6 * USDC),
                                      deposit(2, 10 ** 6 * USDC)]))
    assert top_of_book(matcher.state, BTC) == (None, None, None)
    ring.run(matcher, np.concatenate([buy(1, 10, 649_900, cid=1), buy(1, 10, 649_950, cid=2),
                                      sell(2, 10, 650_100, cid=1), sell(2, 10, 650_200, cid=2)]),
             source=1, privileged=False)
    assert top_of_book(matcher.state, BTC) == (649_950, 650_100, None)
    ring.run(matcher, buy(1, 10, 650_100, cid=3), source=1, privileged=False)   # takes the best ask
    assert top_of_book(matcher.state, BTC) == (649_950, 650_200, 650_100)


# ---- the process --------------------------------------------------------------------------------
SOURCES = [Source("ops", privileged=True), Source("riskd", privileged=True)]
RISKD_SOURCE = 1
CONSUMERS = ["riskd", "test"]


def serve_matcher(prefix: str, engine: dict, stop) -> None:
    service = MatcherService(EngineConfig(**engine), prefix, SOURCES, consumers=CONSUMERS)
    try:
        service.run(stop.is_set)
    finally:
        service.close()


def shm_entries(prefix: str) -> set:
    return {e for e in os.listdir("/dev/shm") if prefix.lstrip("/") in e}


class MarkLog:
    """EV_MARK events read from the event ring as consumer "test": {market: [(source, mark)]}."""

    def __init__(self, consumer):
        self.consumer = consumer
        self.marks = {SIM: [], MAN: [], CSV: []}

    def drain(self) -> None:
        n = self.consumer.available()
        if not n:
            return
        batch = self.consumer.peek(n)
        self.consumer.advance(n)
        for e in batch[batch["etype"] == EV_MARK].view(MARK_EVENT_DTYPE):
            self.marks[int(e["market"])].append((int(e["source"]), int(e["mark_ticks"])))

    def from_riskd(self, market: int) -> list[int]:
        return [mark for source, mark in self.marks[market] if source == RISKD_SOURCE]


@dataclass
class RiskdRig:
    """A matcher process, the IndexBoard and a `python -m riskd` process (see riskd_rig)."""
    cfg: object
    ops: CommandRing
    consumer: object            # the event ring's "test" reader, from before the setup
    state: object
    board: IndexBoard
    riskd: subprocess.Popen
    log_path: Path
    shm_before_riskd: set

    def check_alive(self) -> None:
        if self.riskd.poll() is not None:
            raise AssertionError(f"riskd exited with {self.riskd.returncode}:\n"
                                 f"{self.log_path.read_text()}")


@contextmanager
def riskd_rig(shm_prefix: str, tmp_path: Path, cfg, risk: dict, setup=None):
    """Start a matcher process (rings ops and riskd), sequence genesis and `setup` through
    ops, create the IndexBoard (the supervisor's part) and start riskd with `risk` as its
    [risk] section. Everything is stopped, closed and unlinked afterwards."""
    engine = {k: cfg.engine[k] for k in EngineConfig.__dataclass_fields__}
    doc = {**cfg.to_dict(), "prefix": shm_prefix, "state_dir": str(tmp_path),
           "sources": [{"name": s.name, "privileged": s.privileged, "capacity": s.capacity}
                       for s in SOURCES],
           "consumers": CONSUMERS, "risk": {**cfg.risk, **risk}}
    spec = tmp_path / "exchange.json"
    spec.write_text(json.dumps(doc))
    log_path = tmp_path / "riskd.log"
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    matcher = ctx.Process(target=serve_matcher, args=(shm_prefix, engine, stop), daemon=True)
    matcher.start()
    riskd = ops = events = consumer = board = region = state = None
    try:
        ops = attach_when_ready(lambda: CommandRing.attach(names.command_ring(shm_prefix, "ops"),
                                                           COMMAND_DTYPE), STARTUP_S)
        events = EventRing.attach(names.event_ring(shm_prefix), EVENT_DTYPE)
        consumer = events.consumer("test", start="current")
        region, state = attach_state(shm_prefix, EngineConfig(**engine))
        commands = genesis_commands(cfg)
        if setup is not None:
            commands = np.concatenate([commands, setup])
        assert ops.write(commands) == len(commands)
        wait_until(lambda: int(state.counters[C_SEQ]) >= len(commands), STARTUP_S, "the setup")
        board = IndexBoard.create(shm_prefix, engine["max_markets"])
        before = shm_entries(shm_prefix)
        with open(log_path, "wb") as log_file:
            riskd = subprocess.Popen([sys.executable, "-m", "riskd", "--spec", str(spec)],
                                     cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        yield RiskdRig(cfg, ops, consumer, state, board, riskd, log_path, before)
    finally:
        if riskd is not None and riskd.poll() is None:
            riskd.kill()
            riskd.wait(timeout=WAIT_S)
        if consumer is not None:
            consumer.deregister()
        state = None
        for thing in (region, ops, events, board):
            if thing is not None:
                thing.close()
        if board is not None:
            board.unlink()
        stop.set()
        matcher.join(timeout=WAIT_S)
        if matcher.is_alive():
            matcher.kill()
            matcher.join(timeout=WAIT_S)


def test_riskd_process_feeds_marks_to_a_real_matcher(shm_prefix, tmp_path):
    cfg = config(tmp_path, "0,2000\n300000000,2001.5\n600000000,2003\n")
    with riskd_rig(shm_prefix, tmp_path, cfg, {"mark_interval_ms": 50}) as rig:
        log, board, riskd = MarkLog(rig.consumer), rig.board, rig.riskd

        def alive():
            log.drain()
            rig.check_alive()

        # The sim market's mark moves over time, on the grid and in bounds.
        wait_until(lambda: len(set(log.from_riskd(SIM))) >= 5, WAIT_S,
                   "five different sim marks from riskd", alive)
        sim_max = cfg.markets[SIM].max_price_ticks
        assert all(1 <= m <= sim_max for m in log.from_riskd(SIM))
        assert board.published(SIM).index_ticks > 0

        # The CSV market replays its rows (the first equals the genesis mark: nothing to send).
        wait_until(lambda: log.from_riskd(CSV)[-1:] == [4006], WAIT_S, "the CSV's last row",
                   alive)
        assert log.from_riskd(CSV) == [4003, 4006]

        # The manual market: nothing until the operator sets an index, then it follows.
        assert log.from_riskd(MAN) == []
        for ticks in (351_234, 349_999):
            version = board.set(MAN, ticks)
            wait_until(lambda: log.from_riskd(MAN)[-1:] == [ticks], WAIT_S,
                       f"the manual mark {ticks}", alive)
            published = board.published(MAN)
            assert (published.index_ticks, published.mark_ticks) == (ticks, ticks)
            assert published.applied_version == version
        assert int(rig.state.markets["mark_ticks"][MAN]) == 349_999

        riskd.send_signal(signal.SIGTERM)
        assert riskd.wait(timeout=WAIT_S) == 0, rig.log_path.read_text()
        assert shm_entries(shm_prefix) == rig.shm_before_riskd   # riskd created nothing
        assert "riskd: stopped" in rig.log_path.read_text()


def test_a_bad_csv_row_stops_only_its_own_market(shm_prefix, tmp_path):
    """The CSV market's file has an unparsable row: riskd keeps serving the other markets, the
    CSV market has no index (reported stale), goes cancel_only after feed_stale_s (a journaled
    SET_MARKET_STATE from riskd's ring), and trades again once the file is fixed."""
    cfg = config(tmp_path, "0,2000\n1,abc\n")
    with riskd_rig(shm_prefix, tmp_path, cfg, {"mark_interval_ms": 50, "feed_stale_s": 1}) as rig:
        log = MarkLog(rig.consumer)

        def alive():
            log.drain()
            rig.check_alive()

        wait_until(lambda: len(set(log.from_riskd(SIM))) >= 3, WAIT_S,
                   "sim marks while the CSV feed fails", alive)
        rig.board.set(MAN, 351_234)
        wait_until(lambda: log.from_riskd(MAN)[-1:] == [351_234], WAIT_S,
                   "the manual market's mark while the CSV feed fails", alive)
        assert rig.board.published(CSV) is None and log.from_riskd(CSV) == []
        doc = json.loads((tmp_path / "exchange.json").read_text())
        report = _risk_report(doc)
        assert report["CSV-PERP"]["stale"] and not report["SIM-PERP"]["stale"]
        wait_until(lambda: int(rig.state.markets["state"][CSV]) == MARKET_CANCEL_ONLY, WAIT_S,
                   "the CSV market in cancel_only", alive)
        assert int(rig.state.markets["state"][SIM]) == MARKET_TRADING
        text = rig.log_path.read_text()
        assert "CSV-PERP: index feed failing" in text and "'abc'" in text
        # the operator fixes the file: the feed recovers, the market trades again
        (tmp_path / "index.csv").write_text("0,2000\n100000000,2001.5\n")
        wait_until(lambda: int(rig.state.markets["state"][CSV]) == MARKET_TRADING, WAIT_S,
                   "the CSV market trading again", alive)
        wait_until(lambda: log.from_riskd(CSV)[-1:] == [4003], WAIT_S, "the fixed CSV's mark",
                   alive)
        assert not _risk_report(doc)["CSV-PERP"]["stale"]
        assert "CSV-PERP: index feed recovered" in rig.log_path.read_text()


def test_circuit_breaker_puts_a_jumping_market_in_cancel_only_for_a_while(shm_prefix,
                                                                          tmp_path):
    """breaker_move 10% within 60 s: the manual market's index jumps 14%: riskd sends
    cancel_only (journaled, before the mark), the mark still goes out, and after
    breaker_halt_s the market trades again. A 5% move does not trip it."""
    cfg = config(tmp_path)
    risk = {"mark_interval_ms": 50, "breaker_move": "0.1", "breaker_window_s": 60,
            "breaker_halt_s": 1}
    with riskd_rig(shm_prefix, tmp_path, cfg, risk) as rig:
        log = MarkLog(rig.consumer)

        def alive():
            log.drain()
            rig.check_alive()

        def state():
            return int(rig.state.markets["state"][MAN])

        for ticks in (351_000, 368_000):          # +4.8%: no trip
            rig.board.set(MAN, ticks)
            wait_until(lambda: log.from_riskd(MAN)[-1:] == [ticks], WAIT_S, f"mark {ticks}",
                       alive)
        assert state() == MARKET_TRADING
        rig.board.set(MAN, 420_000)                # +14% of 368,000 (+20% of 351,000)
        wait_until(lambda: log.from_riskd(MAN)[-1:] == [420_000], WAIT_S, "the jumped mark",
                   alive)
        assert state() == MARKET_CANCEL_ONLY
        assert "MAN-PERP: circuit breaker" in rig.log_path.read_text()
        wait_until(lambda: state() == MARKET_TRADING, WAIT_S, "trading after breaker_halt_s",
                   alive)
        assert int(rig.state.markets["state"][SIM]) == MARKET_TRADING


def test_riskd_drops_marks_its_full_ring_cannot_take(shm_prefix, tmp_path):
    """A stalled matcher: riskd waits a fraction of a tick, drops what does not fit, and sends
    a fresh mark once the ring drains (in one process: the matcher polled by hand)."""
    cfg = config(tmp_path)
    engine = cfg.engine_config()
    sources = [Source("ops", privileged=True), Source("riskd", privileged=True, capacity=2)]
    service = MatcherService(engine, shm_prefix, sources, consumers=CONSUMERS)
    board = riskd = None
    try:
        genesis = genesis_commands(cfg)
        service.rings[0].write(genesis)
        while service.matcher.seq < len(genesis):
            service.poll_once()
        board = IndexBoard.create(shm_prefix, engine.max_markets)
        doc = {**cfg.to_dict(), "prefix": shm_prefix, "state_dir": str(tmp_path),
               "risk": {"mark_interval_ms": 20}}
        riskd = Riskd(ExchangeSpec.from_dict(doc), log=lambda msg: None)
        t0 = 1_700_000_000 * S
        # The walk starts at the genesis mark (nothing to send), then moves (a minute a tick).
        sent = [riskd.tick(t0 + k * 60 * S) for k in range(5)]
        assert sent == [0, 1, 1, 0, 0] and riskd.dropped == 2
        wanted = riskd.markets[SIM].calc.last.mark_ticks
        assert service.poll_once() == 2                        # the matcher catches up
        assert int(service.matcher.state.markets["mark_ticks"][SIM]) != wanted
        assert riskd.tick(t0 + 4 * 60 * S) == 1                # same time: the same fresh mark
        service.poll_once()
        assert int(service.matcher.state.markets["mark_ticks"][SIM]) == wanted
        assert board.published(SIM).mark_ticks == wanted
    finally:
        if riskd is not None:
            riskd.close()
        if board is not None:
            board.close()
            board.unlink()
        service.close()
