"""Market data on the PUB socket (one gateway only): trades as they come, book deltas per
event batch, marks with riskd's index and funding estimate, funding rates, liquidations
(PROTOCOL.md "Market data"; every message carries the seq it is exact at)."""

from __future__ import annotations

import time

from engine.records import MARKET_STATE_NAMES, MARKET_TRADING
from gateway import codec
from gateway.codec import (E_MARKET, E_SEQ, E_TS, LQ_KIND, LQ_PRICE, LQ_QTY, LQ_SIDE,
                           MK_MARK, TR_PRICE, TR_QTY, TR_SIDE, TR_TRADE_ID, pack)
from gateway.mirror import M_ACTIVE, M_MARK, M_STATE
from shm.index_board import IndexBoard
from shm.region import ShmError

# How often to look for index/funding changes riskd published without a new mark.
BOARD_REPUBLISH_S = 1.0
NO_BOARD_LINE = (None, None, None)


class MarketData:
    def __init__(self, prefix: str, mirror, market_by_id, outbox, closers: list):
        self.prefix = prefix
        self.mirror = mirror
        self.market_by_id = market_by_id
        self.outbox = outbox
        self._closers = closers
        self.index_board = None
        self._index_board_retry = 0.0
        self._board_sent: dict[int, tuple] = {}    # market -> (index, rate, next) last published
        self._state_sent: dict[int, int] = {}      # market -> its state in the last mark.MARKET
        self.board_due = 0.0
        self.dirty_book_deltas = self.packed_book_deltas

    def trade(self, tr, market) -> None:
        self.outbox.publish(market.topic_trade, pack(
            {"seq": tr[E_SEQ], "trade_id": tr[TR_TRADE_ID],
             "price": market.ticks_to_str(tr[TR_PRICE]), "qty": market.lots_to_str(tr[TR_QTY]),
             "taker_side": codec.SIDE_NAMES[tr[TR_SIDE]], "ts": tr[E_TS]}), tr[E_SEQ])

    def liquidation(self, ev, market) -> None:
        """One message per closing step: the liquidated account's half of it."""
        self.outbox.publish(market.topic_liquidation, pack(
            {"seq": ev[E_SEQ], "side": codec.SIDE_NAMES[ev[LQ_SIDE]],
             "qty": market.lots_to_str(ev[LQ_QTY]), "price": market.ticks_to_str(ev[LQ_PRICE]),
             "kind": codec.LIQUIDATION_KIND_NAMES[ev[LQ_KIND]], "ts": ev[E_TS]}), ev[E_SEQ])

    def funding(self, market, seq: int, rate_e9: int, ts: int) -> None:
        self.outbox.publish(market.topic_funding, pack(
            {"seq": seq, "rate": codec.rate_to_str(rate_e9), "ts": ts}), seq)

    def mark(self, ev) -> None:
        """`mark.MARKET` for a mark the matcher took (EV_MARK)."""
        m = ev[E_MARKET]
        market = self.market_by_id[m] if 0 <= m < len(self.market_by_id) else None
        if market is not None:
            self._mark_line(market, ev[E_SEQ], ev[MK_MARK], ev[E_TS], self._board_line(market))

    def book_deltas(self) -> None:
        """The levels that changed in the last batch of events, per market."""
        seq = self.mirror.applied_seq
        for market, payload in self.dirty_book_deltas(seq):
            self.outbox.publish(market.topic_book, payload, seq)

    def packed_book_deltas(self, seq: int) -> list:
        """[(Market, `book.MARKET` bytes)] of every market with changed levels, ascending,
        each taken off the mirror's dirty list (a market without a table: dropped). The
        compiled lane's gateway sets `dirty_book_deltas` to gateway/book_render.py's, which
        writes the same bytes from the array mirror in one call."""
        mirror = self.mirror
        deltas = []
        for m in mirror.dirty_markets():
            market = self.market_by_id[m]
            if market is None:
                mirror.take_dirty(m)
                continue
            deltas.append((market, self.packed_book_delta(m, market, seq)))
        return deltas

    def packed_book_delta(self, m: int, market, seq: int) -> bytes:
        """`book.MARKET`: the market's changed levels, taken off the mirror's dirty list."""
        bids, asks = self.mirror.take_dirty(m)
        t, l = market.ticks_to_str, market.lots_to_str
        return pack({"seq": seq, "bids": [[t(p), l(q)] for p, q in bids],
                     "asks": [[t(p), l(q)] for p, q in asks]})

    def board_changes(self) -> None:
        """riskd re-sends no unchanged mark, but its index and funding estimate move on: once
        a second, `mark.MARKET` again for each market whose board line changed since the last
        one published (the mark as the matcher has it, at the mirror's seq)."""
        self.board_due = time.monotonic() + BOARD_REPUBLISH_S
        for m, market in enumerate(self.market_by_id):
            if market is None or not self.mirror.market_row(m)[M_ACTIVE]:
                continue
            line = self._board_line(market)
            if line is not None and self._board_sent.get(m) != line:
                self._mark_line(market, self.mirror.applied_seq,
                                self.mirror.market_row(m)[M_MARK], time.time_ns(), line)

    def _mark_line(self, market, seq: int, mark_ticks: int, ts: int, line) -> None:
        """`mark.MARKET`: the matcher's mark; index, funding estimate and next funding time
        from riskd's IndexBoard (null while riskd has published nothing for the market)."""
        line = line or NO_BOARD_LINE
        self._board_sent[market.id] = line
        state = self.mirror.market_row(market.id)[M_STATE]
        self._state_sent[market.id] = state
        self.outbox.publish(market.topic_mark, pack(
            {"seq": seq, "mark": market.ticks_to_str(mark_ticks), "index": line[0],
             "funding_rate": line[1], "next_funding_ts": line[2], "ts": ts,
             "state": MARKET_STATE_NAMES[state]}), seq)

    def state_changed(self, market) -> None:
        """A market state change (halt, cancel_only, settlement...) shows in `mark.MARKET`."""
        mk = self.mirror.market_row(market.id)
        if mk[M_STATE] != self._state_sent.get(market.id, MARKET_TRADING):
            self._mark_line(market, self.mirror.applied_seq, mk[M_MARK], time.time_ns(),
                            self._board_line(market))

    def _board_line(self, market):
        """(index, funding_rate, next_funding_ts) as the wire says them, None before riskd
        published for the market."""
        published = self._index_board_values(market.id)
        if published is None:
            return None
        return (market.ticks_to_str(published.index_ticks) if published.index_ticks else None,
                codec.rate_to_str(published.funding_rate_e9), published.next_funding_ns or None)

    def _index_board_values(self, market_id: int):
        """riskd's published line for a market; the board is attached on first need (riskd
        may start after the gateway), retried at most once a second while it does not exist."""
        board = self.index_board
        if board is None:
            now = time.monotonic()
            if now < self._index_board_retry:
                return None
            self._index_board_retry = now + 1.0
            try:
                board = self.index_board = IndexBoard.attach(self.prefix)
            except (ShmError, FileNotFoundError, OSError):
                return None
            self._closers.append(board.close)
        if market_id >= board.max_markets:
            return None
        return board.published(market_id)
