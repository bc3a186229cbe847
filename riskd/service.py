"""riskd: computes index and mark prices and feeds the marks to the matcher (DESIGN.md §5).

Every `mark_interval_ms` (exchange.json `risk.mark_interval_ms`, default 250) riskd, for each
active market: asks the market's feed for the index (riskd/feeds.py), reads the best bid, best
ask and last trade from the matcher's state tables, computes the mark (riskd/mark.py), publishes
index and mark on the IndexBoard (`<prefix>-index`, for the gateways' `mark.MARKET` and for
`perpx oracle set`), and, when the mark differs from the last one it sent, writes a SET_MARK
command into its own privileged command ring (`<prefix>-cmd-riskd`). The matcher sequences it
like any command: the mark only ever changes through the journal.

Funding (riskd/funding.py, Binance's method): on ticks at most every `funding_sample_ms` riskd
samples the premium index from the impact bid/ask of the book against the index; the interval's
time-weighted average gives the rate estimate it publishes; when a funding boundary passes
(multiples of the market's funding_interval_s since the epoch) it writes FUNDING(market,
rate_e9) after that tick's marks. Nothing is persisted: see riskd/funding.py for restarts.

Liquidations (riskd/scanner.py): after the marks and fundings of a tick, LIQUIDATE for every
cross account and isolated position the scanner finds at the marks just written (the matcher
applies them first: same ring), so a price shock's liquidations go out in the tick that moves
the mark. The matcher re-checks each one.

riskd only reads state. It takes no event-ring consumer slot (the scanner follows the
accounts' changed_seq in the tables, not the events; the "riskd" slot stays inactive), so it
can never hold the matcher back.

Reading the book. The three values (two book keys behind their depths, and last_trade_ticks)
are read straight from the shared tables, bracketed: note the state's seq, check that the last
published event carries that seq (the matcher is between commands: it bumps seq before a
command touches anything and publishes events after), read, and accept if seq has not moved
and the values are sane (inside [1, max price], bid < ask). That costs a handful of loads, not
a copy of the tables (gateway/mirror.consistent_state_copy copies megabytes). Under heavy load
the matcher is rarely between commands at the moment we look, so after READ_ATTEMPTS we take
the last sane read: at worst it is the book in the middle of one command, which perturbs one
basis sample (1/300 of Price 2) or this tick's contract price, and the next tick corrects it.

Backpressure. A full riskd ring (matcher stalled) is waited on for at most a fraction of a
tick; marks that still do not fit are dropped, not queued: the next tick computes a fresh mark
and sends it if it differs from the last one actually written.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from decimal import Decimal

import numpy as np

from engine.book import best_price, side_levels
from engine.records import (CMD_SET_MARK, COMMAND_DTYPE, EVENT_DTYPE, MARKET_CANCEL_ONLY,
                            MARKET_TRADING, SIDE_BUY, SIDE_SELL, funding_command,
                            liquidate_command, market_state_command, new_commands)
from engine.shared_state import attach_state
from engine.spec import ExchangeSpec
from engine.state import C_SEQ
from riskd.feeds import GuardedFeed, feed_for
from riskd.funding import FundingSchedule, impact_price, premium_e9
from riskd.mark import MarkCalculator
from riskd.scanner import Scanner
from shm import names
from shm.index_board import IndexBoard, Published
from shm.region import attach_retrying
from shm.ring import CommandRing, EventRing

DEFAULT_MARK_INTERVAL_MS = 250
DEFAULT_FUNDING_SAMPLE_MS = 5000
DEFAULT_LIQUIDATION_RETRY_MS = 1000
DEFAULT_FEED_STALE_S = 30
ATTACH_TIMEOUT_S = 30.0
READ_ATTEMPTS = 64
SUMMARY_EVERY_S = 60.0


def top_of_book(state, market: int) -> tuple[int | None, int | None, int | None]:
    """(best bid, best ask, last trade) in ticks, None where absent, straight from the tables.
    No consistency guarantee: see Riskd.read_book."""
    bid = best_price(state, market, SIDE_BUY)
    ask = best_price(state, market, SIDE_SELL)
    last = int(state.markets["last_trade_ticks"][market]) or None
    return bid, ask, last


def book_side(state, market: int, side: int):
    """(price_ticks, qty_lots) of a book side, best first, read lazily from the tables."""
    for price, qty in side_levels(state, market, side):
        if price < 1 or qty < 0:
            return           # a torn read (see Riskd.read_book): the rest is not a book
        yield price, qty


def impact_prices(state, market: int, notional_atoms: int, atoms_per_tick_lot: int):
    """(impact bid, impact ask): riskd/funding.impact_price of each side."""
    return tuple(impact_price(book_side(state, market, side), notional_atoms, atoms_per_tick_lot)
                 for side in (SIDE_BUY, SIDE_SELL))


def _sane(top, max_ticks: int) -> bool:
    bid, ask, last = top
    inside = all(p is None or 1 <= p <= max_ticks for p in top)
    return inside and (bid is None or ask is None or bid < ask)


class _Market:
    """What riskd keeps per market."""

    def __init__(self, spec, feed, last_sent_ticks: int, funding: FundingSchedule):
        self.spec = spec
        self.feed = feed
        self.calc = MarkCalculator(spec.max_price_ticks)
        self.funding = funding
        self.last_sent_ticks = last_sent_ticks
        self.sent = 0
        self.unsent_funding_e9 = None   # a FUNDING the full ring refused: retried next tick
        self.riskd_cancel_only = False  # riskd put the market in cancel_only (stale, breaker)
        self.recent_marks = deque()     # (ts_ns, mark) sent within the breaker's window
        self.breaker_until_ns = 0


class Riskd:
    def __init__(self, spec: ExchangeSpec, log=None, attach_timeout_s: float = ATTACH_TIMEOUT_S):
        self.log = log or (lambda msg: print(f"riskd: {msg}", file=sys.stderr, flush=True))
        self.prefix = prefix = spec.prefix
        risk = spec.section("risk")
        self.interval_s = risk.get("mark_interval_ms", DEFAULT_MARK_INTERVAL_MS) / 1000
        seed = int(risk.get("seed", 0))
        sample_ms = int(risk.get("funding_sample_ms", DEFAULT_FUNDING_SAMPLE_MS))
        self.feed_stale_ns = int(risk.get("feed_stale_s", DEFAULT_FEED_STALE_S) * 1e9)
        self.breaker_move_e9 = int(Decimal(str(risk.get("breaker_move", "0"))) * 10 ** 9)
        self.breaker_window_ns = int(risk.get("breaker_window_s", 60)) * 10 ** 9
        self.breaker_halt_ns = int(risk.get("breaker_halt_s", 60)) * 10 ** 9
        self.fundings_sent = self.liquidations_sent = 0
        self.scanner = None
        engine = spec.engine
        self.dropped = self.unsettled_reads = 0
        self._req = 0
        self._held = []
        self._seq_view = None
        try:
            # The matcher creates the state and the rings, the supervisor the index board:
            # riskd may start before they exist, so it waits for them (ShmError after that).
            region, self.state = attach_retrying(lambda: attach_state(prefix, engine),
                                                 attach_timeout_s)
            self._held.append(region)
            self.events = self._hold(attach_retrying(
                lambda: EventRing.attach(names.event_ring(prefix), EVENT_DTYPE), attach_timeout_s))
            self.ring = self._hold(attach_retrying(
                lambda: CommandRing.attach(names.command_ring(prefix, "riskd"), COMMAND_DTYPE),
                attach_timeout_s))
            self.board = self._hold(attach_retrying(
                lambda: IndexBoard.attach(prefix, engine.max_markets), attach_timeout_s))
            self.markets = []
            for market in spec.markets:
                # A restarted riskd resumes a sim walk where it was, not at the initial price.
                before = self.board.published(market.id)
                start = before.index_ticks if before else None
                feed = self._hold(GuardedFeed(
                    lambda market=market, start=start: feed_for(market, prefix, seed, start),
                    market.symbol, self.log))
                self.markets.append(_Market(market, feed,
                                            int(self.state.markets["mark_ticks"][market.id]),
                                            FundingSchedule(market, sample_ms, time.time_ns())))
        except BaseException:
            self.close()
            raise
        self._seq_view = self.events.records["seq"]
        if risk.get("scan", True):
            self.scanner = Scanner(self.state, [market.id for market in spec.markets],
                                   self._published_seq,
                                   int(risk.get("liquidation_retry_ms",
                                                DEFAULT_LIQUIDATION_RETRY_MS)) * 1_000_000)

    def _hold(self, thing):
        self._held.append(thing)
        return thing

    # -- reading the matcher's state ------------------------------------------------------
    def _published_seq(self) -> int:
        """The seq of the matcher's last published event: that command has finished."""
        published = self.events.published_cursor()
        return int(self._seq_view[(published - 1) & self.events.mask]) if published else 0

    def _between_commands(self, seq: int) -> bool:
        return self._published_seq() == seq

    def read_book(self, mk: _Market, with_impact: bool):
        """(top_of_book, impact prices or None) at a command boundary when we catch one (see
        the module docstring; the impact walk sits inside the same seq bracket)."""
        spec, counters = mk.spec, self.state.counters
        last_sane = None
        for _ in range(READ_ATTEMPTS):
            seq = int(counters[C_SEQ])
            top = top_of_book(self.state, spec.id)
            if _sane(top, spec.max_price_ticks):
                read = (top, impact_prices(self.state, spec.id, mk.funding.impact_notional_atoms,
                                           spec.atoms_per_tick_lot) if with_impact else None)
                if self._between_commands(seq) and int(counters[C_SEQ]) == seq:
                    return read
                last_sane = read
            os.sched_yield()
        self.unsettled_reads += 1
        return last_sane

    # -- one tick -------------------------------------------------------------------------
    def tick(self, now_ns: int) -> int:
        """Compute every active market's index, mark and funding; send the changed marks, then
        the FUNDING of intervals that ended, then publish. Returns how many SET_MARK commands
        went into the ring."""
        computed = []
        active = self.state.markets["active"]
        for mk in self.markets:
            spec = mk.spec
            if not active[spec.id]:
                continue
            rate = mk.funding.settle(now_ns)
            if rate is not None:
                mk.unsent_funding_e9 = rate
            index = mk.feed.index_ticks(now_ns)
            if index is None:
                continue
            sample = mk.funding.sample_due(now_ns)
            read = self.read_book(mk, sample)
            if read is None:
                continue
            top, impacts = read
            if sample:
                mk.funding.sample(now_ns, premium_e9(index, *impacts))
            # Price 1 takes the last funding rate (riskd/mark.py), i.e. the last one settled.
            mark = mk.calc.mark_ticks(now_ns, index, *top, mk.funding.last_rate_e9,
                                      mk.funding.next_funding_ns, spec.funding_interval_s)
            computed.append((mk, Published(index, mark, mk.funding.estimate_e9(),
                                           mk.funding.next_funding_ns, now_ns,
                                           mk.feed.applied_version)))
        # Published before sending: a gateway that sees the SET_MARK's event finds this tick's
        # index and funding estimate on the board (`perpx oracle set` waits for the matcher's
        # mark to equal the published one, so it does not depend on the order).
        for mk, pub in computed:
            self.board.publish(mk.spec.id, pub)
        marks = [(mk, pub.mark_ticks) for mk, pub in computed
                 if pub.mark_ticks != mk.last_sent_ticks]
        if self.breaker_move_e9:
            for mk, mark in marks:
                self._breaker(mk, mark, now_ns)
        # a tripped breaker's cancel_only goes before the mark that tripped it
        self._send_market_states(now_ns)
        written = self._send(marks, now_ns)
        self._send_funding(now_ns)
        if self.scanner is not None:
            self._send_liquidations(now_ns, {mk.spec.id: mark for mk, mark in marks[:written]})
        return written

    def _write(self, batch: np.ndarray) -> int:
        """Stamp fresh req tokens (1 .. 2**31-1, wrapping) and write what the ring takes."""
        reqs = (self._req + np.arange(len(batch))) % (2 ** 31 - 1) + 1
        batch["req"] = reqs
        self._req = int(reqs[-1])
        return self.ring.write(batch)

    def _send(self, commands: list, now_ns: int) -> int:
        if not commands:
            return 0
        batch = new_commands(len(commands))
        batch["cmd"] = CMD_SET_MARK
        batch["ts_ns"] = now_ns
        for i, (mk, mark) in enumerate(commands):
            batch["market"][i] = mk.spec.id
            batch["price_ticks"][i] = mark
        written = self._write(batch)
        if written < len(batch) and self.ring.wait_for_space(len(batch) - written,
                                                             timeout_s=self.interval_s / 4):
            written += self.ring.write(batch[written:])
        for mk, mark in commands[:written]:
            mk.last_sent_ticks = mark
            mk.sent += 1
        if written < len(batch):
            if not self.dropped:
                self.log("the riskd ring is full (matcher stalled?): dropping marks; the next "
                         "tick sends fresh ones")
            self.dropped += len(batch) - written
        return written

    def _breaker(self, mk: _Market, mark: int, now_ns: int) -> None:
        """The circuit breaker: a mark more than breaker_move away from any mark sent within
        the window trips it (cancel_only for breaker_halt_s from now)."""
        recent = mk.recent_marks
        while recent and now_ns - recent[0][0] > self.breaker_window_ns:
            recent.popleft()
        if any(abs(mark - m) * 10 ** 9 > self.breaker_move_e9 * m for _, m in recent):
            if mk.breaker_until_ns <= now_ns:
                self.log(f"{mk.spec.symbol}: circuit breaker: mark {mark} ticks moved more "
                         f"than {self.breaker_move_e9 / 1e7:g}% within "
                         f"{self.breaker_window_ns // 10 ** 9} s")
            mk.breaker_until_ns = now_ns + self.breaker_halt_ns
        recent.append((now_ns, mark))

    def _send_market_states(self, now_ns: int) -> None:
        """A market whose feed has failed for feed_stale_s, or whose circuit breaker tripped,
        goes cancel_only (SET_MARKET_STATE, journaled like any command); once neither holds it
        goes back to trading, unless its state changed meanwhile (an operator's call, which
        riskd leaves alone)."""
        states = self.state.markets["state"]
        for mk in self.markets:
            since = mk.feed.failing_since_ns
            hold = ((since is not None and now_ns - since >= self.feed_stale_ns)
                    or mk.breaker_until_ns > now_ns)
            if hold and not mk.riskd_cancel_only and int(states[mk.spec.id]) == MARKET_TRADING:
                if self._write(market_state_command(mk.spec.id, MARKET_CANCEL_ONLY,
                                                    ts_ns=now_ns)):
                    mk.riskd_cancel_only = True
                    self.log(f"{mk.spec.symbol}: cancel_only ("
                             + ("index stale" if since is not None else "circuit breaker") + ")")
            elif not hold and mk.riskd_cancel_only:
                if int(states[mk.spec.id]) == MARKET_CANCEL_ONLY:
                    if not self._write(market_state_command(mk.spec.id, MARKET_TRADING,
                                                            ts_ns=now_ns)):
                        continue      # the ring is full: next tick
                    self.log(f"{mk.spec.symbol}: trading again")
                mk.riskd_cancel_only = False

    def _send_funding(self, now_ns: int) -> None:
        """FUNDING for each market whose interval ended, after its mark (it settles at the
        mark). One that does not fit is kept and retried next tick."""
        due = [mk for mk in self.markets if mk.unsent_funding_e9 is not None]
        if not due:
            return
        written = self._write(np.concatenate([
            funding_command(mk.spec.id, rate_e9=mk.unsent_funding_e9, ts_ns=now_ns)
            for mk in due]))
        for mk in due[:written]:
            mk.funding.sent(mk.unsent_funding_e9)
            mk.unsent_funding_e9 = None
            self.fundings_sent += 1
            self.log(f"{mk.spec.symbol}: FUNDING at rate {mk.funding.last_rate_e9} e-9")

    def _send_liquidations(self, now_ns: int, marks: dict) -> None:
        """LIQUIDATE for the scanner's targets, judged at the marks just written (the matcher
        applies them first: same ring). What the ring cannot take is found again next tick."""
        targets = self.scanner.cycle(now_ns, marks)
        if not targets:
            return
        batch = np.repeat(liquidate_command(0, ts_ns=now_ns), len(targets))
        batch["account"], batch["market"] = np.array(targets, dtype=np.int64).T
        written = self._write(batch)
        self.scanner.mark_sent(targets[:written], now_ns)
        self.liquidations_sent += written

    # -- the loop -------------------------------------------------------------------------
    def run(self, should_stop) -> None:
        """Tick every interval until should_stop() (checked at least once per interval)."""
        self.log(f"serving {len(self.markets)} markets every {self.interval_s * 1000:g} ms "
                 f"(prefix {self.prefix}, pid {os.getpid()})")
        next_tick = time.monotonic()
        next_summary = next_tick + SUMMARY_EVERY_S
        while not should_stop():
            self.tick(time.time_ns())
            now = time.monotonic()
            if now >= next_summary:
                self.log(self.summary())
                next_summary = now + SUMMARY_EVERY_S
            # Fixed cadence; after a stall (suspended process) skip the missed ticks.
            next_tick = max(next_tick + self.interval_s, now)
            time.sleep(max(0.0, next_tick - time.monotonic()))

    def summary(self) -> str:
        parts = []
        for mk in self.markets:
            pub = self.board.published(mk.spec.id)
            if pub is None:
                parts.append(f"{mk.spec.symbol} no index")
            else:
                parts.append(f"{mk.spec.symbol} index {mk.spec.ticks_to_str(pub.index_ticks)} mark "
                             f"{mk.spec.ticks_to_str(pub.mark_ticks)} ({mk.sent} sent)")
        return "; ".join(parts) + (f"; {self.fundings_sent} fundings, "
                                   f"{self.liquidations_sent} liquidations sent"
                                   f"; dropped {self.dropped}, unsettled reads "
                                   f"{self.unsettled_reads}")

    def close(self) -> None:
        self.state = self._seq_view = None
        for thing in reversed(self._held):
            try:
                thing.close()
            except Exception as e:
                self.log(f"closing {thing!r}: {e}")
        self._held.clear()

