"""The gateway's copy of the order books, kept exact by applying the event stream.

A gateway consumes every event the matcher emits, so it can follow the books, the resting and
untriggered orders and the markets without asking the matcher: `book` and `open_orders`
queries are answered from here, exact at `applied_seq` (the last command whose events are all
applied), and the market-data deltas are the levels this copy saw change.

Money is not mirrored: balances, positions, isolated margins, funding and liquidations follow
rules that only the matcher applies (engine/risk.py reads them), so the `account` query reads
the matcher's own rows (gateway/account_state.py) instead of re-deriving them here.

It starts from a copy of the matcher's state tables (engine.shared_state.attach_state) taken at a
command boundary (`consistent_state_copy`) and applies only events of later commands. The
arithmetic is the matcher's, in Python integers (exact: the engine's split products are exact
within the bounds every market's config proves).

Order events change it this way (engine/reference.py is the rule book):
- `ack` with status open: the order rests with the ack's `remaining_lots` (its open quantity
  after the fills that follow the ack).
- `ack` with status untriggered: the order waits outside the book (`untriggered`) until its
  `triggered` event, which then counts as the live order's ack (its status and remaining say
  where it ended; its trades follow).
- `trade`: the maker's open quantity becomes `maker_remaining_lots`; the taker's becomes
  `remaining_lots` if the taker rests (an amended order re-matching), so a new order's level
  goes up by its final remainder at the ack and back to it after its fills (deltas are taken
  per batch, so nobody sees the intermediate values).
- `canceled`: the order leaves the book (or the untriggered set). `amended`: new price and
  open quantity. `mark`: the new mark.
- admin commands (create market, limits, halt, resume) apply when their `done` follows.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from engine.book import level_slots, order_slots
from engine.records import (CMD_CREATE_MARKET, CMD_HALT, CMD_RESUME, CMD_SET_MARKET_LIMITS,
                            CMD_SET_MARKET_STATE, CMD_SETTLE_MARKET, EV_ACK, EV_AMENDED,
                            EV_CANCELED, EV_DONE, EV_TRIGGERED, MARKET_CANCEL_ONLY, MARKET_HALTED,
                            MARKET_SETTLED, MARKET_TRADING, STATUS_OPEN, STATUS_UNTRIGGERED)
from engine.state import C_SEQ
from gateway.codec import (CM_CMD, E_ACCOUNT, E_MARKET, MK_MARK, OE_CID, OE_KIND, OE_OID,
                           OE_PRICE, OE_QTY, OE_REMAINING, OE_SIDE, OE_STATUS, TR_MAKER_OID,
                           TR_MAKER_REMAINING, TR_OID, TR_PRICE, TR_REMAINING)

# an order: [account, cid, market, side, kind, price_ticks, remaining_lots, qty_lots]
O_ACCOUNT, O_CID, O_MARKET, O_SIDE, O_KIND, O_PRICE, O_REMAINING, O_QTY = range(8)
# a market: [active, atoms_per_tick_lot, max_leverage, mark_ticks, max_price_ticks,
#            max_order_lots, halted, last_trade_ticks, state (MARKET_TRADING ..)]
(M_ACTIVE, M_ATPL, M_LEVERAGE, M_MARK, M_MAX_PRICE, M_MAX_ORDER, M_HALTED, M_LAST,
 M_STATE) = range(9)

# the events on_order_event folds in (balance, funding, liquidation, insurance: money, not books)
ORDER_EVENTS = frozenset((EV_ACK, EV_CANCELED, EV_AMENDED, EV_DONE, EV_TRIGGERED))
ADMIN_COMMANDS = (CMD_CREATE_MARKET, CMD_SET_MARKET_LIMITS, CMD_HALT, CMD_RESUME,
                  CMD_SET_MARKET_STATE, CMD_SETTLE_MARKET)
_STATE_TABLES = ("counters", "markets", "positions", "accounts", "orders", "levels",
                 "book_keys", "book_levels", "book_counts", "book_dir", "book_nblocks",
                 "book_depth", "trigger_slots", "trigger_depth")


def consistent_state_copy(state, events, timeout_s: float = 10.0, stats: dict | None = None,
                          tables=_STATE_TABLES):
    """Copies of the matcher's tables at a command boundary, and the seq they hold."""
    return consistent_copy(
        state, events, lambda st: {name: np.array(getattr(st, name)) for name in tables},
        timeout_s, stats)


def consistent_copy(state, events, take, timeout_s: float = 10.0, stats: dict | None = None,
                    pause_s: float = 0.0005):
    """take(state) -> dict of arrays, taken at a command boundary; returns (copies, seq).

    The matcher bumps the seq counter before a command touches anything and publishes the
    command's events after it is done. So: if the last published event belongs to the seq the
    counter shows, the matcher is between commands; if the counter is the same after the copy
    (and a second copy equals the first), nothing moved while we copied. x86-64 TSO keeps the
    stores in that order for our loads (shm/platform.py).
    """
    deadline = time.monotonic() + timeout_s
    seq_view = events.records["seq"]
    mask = events.capacity - 1
    while True:
        if stats is not None:
            stats["attempts"] = stats.get("attempts", 0) + 1
        s0 = int(state.counters[C_SEQ])
        published = events.published_cursor()
        # Before the first event, the slot behind the cursor holds the seq the matcher's state
        # started at (MatcherService.mark_start): 0, or the seq it recovered to.
        last = int(seq_view[(published - 1) & mask])
        if last == s0:
            first = take(state)
            second = take(state)
            # bytes, not fields: comparing record arrays field by field costs ~100x more
            if int(state.counters[C_SEQ]) == s0 and all(
                    np.array_equal(first[n].view(np.uint8), second[n].view(np.uint8))
                    for n in first):
                return first, s0
        if time.monotonic() > deadline:
            raise TimeoutError("could not take a consistent copy of the matcher's state "
                               f"within {timeout_s} s (the matcher never paused)")
        if pause_s:
            time.sleep(pause_s)


class Mirror:
    def __init__(self, max_markets: int, track_dirty: bool = False):
        self.max_markets = max_markets
        self.base_seq = 0        # the state copy this mirror started from holds commands <= this
        self.applied_seq = 0
        self.orders: dict[int, list] = {}
        self.acct_orders: dict[int, dict[int, list]] = {}
        self.cid_index: dict[tuple[int, int], int] = {}
        self.untriggered: dict[int, list] = {}    # conditional orders waiting for a trigger
        self.books = [({}, {}) for _ in range(max_markets)]
        self.markets = [[0] * 9 for _ in range(max_markets)]
        self.versions = [0] * max_markets         # counts the changes of each book's levels
        self.track_dirty = track_dirty
        self.dirty = [(set(), set()) for _ in range(max_markets)] if track_dirty else None
        self.any_dirty = False
        self._admin = None   # (seq, command tuple) of an admin command awaiting its `done`

    # -- start-up -----------------------------------------------------------------------
    @classmethod
    def from_state(cls, tables, seq: int, max_markets: int, track_dirty: bool = False) -> Mirror:
        """Build from state tables (a dict or namedtuple of arrays) holding commands <= seq."""
        get = tables.__getitem__ if isinstance(tables, dict) else lambda n: getattr(tables, n)
        self = cls(max_markets, track_dirty)
        self.base_seq = self.applied_seq = seq
        mk = get("markets")
        for m in range(max_markets):
            r = mk[m]
            self.markets[m] = [int(r["active"]), int(r["atoms_per_tick_lot"]),
                               int(r["max_leverage"]), int(r["mark_ticks"]),
                               int(r["max_price_ticks"]), int(r["max_order_lots"]),
                               int(r["halted"]), int(r["last_trade_ticks"]), int(r["state"])]
        orders, levels = get("orders"), get("levels")
        book_tables = SimpleNamespace(**{n: get(n) for n in ("orders", "levels", "book_levels",
                                                             "book_counts", "book_dir",
                                                             "book_nblocks")})
        for m in range(max_markets):
            for side in (0, 1):
                book = self.books[m][side]
                for lvl in level_slots(book_tables, m, side):
                    book[int(levels[lvl]["price_ticks"])] = int(levels[lvl]["qty_lots"])
                    for slot in order_slots(book_tables, lvl):
                        o = orders[slot]
                        self._add(int(o["oid"]), [int(o["account"]), int(o["cid"]), m, side,
                                                  int(o["kind"]), int(o["price_ticks"]),
                                                  int(o["remaining_lots"]),
                                                  int(o["remaining_lots"])])
        slots, depth = get("trigger_slots"), get("trigger_depth")
        for m in range(max_markets):
            for queue in range(depth.shape[1]):
                for slot in slots[m, queue, :int(depth[m, queue])].tolist():
                    o = orders[slot]
                    oid, account, cid = int(o["oid"]), int(o["account"]), int(o["cid"])
                    self.untriggered[oid] = [account, cid, m, int(o["side"]), int(o["kind"]),
                                             int(o["price_ticks"]), int(o["remaining_lots"]),
                                             int(o["remaining_lots"])]
                    self.cid_index[(account, cid)] = oid
        return self

    # -- helpers ------------------------------------------------------------------------
    def _add(self, oid: int, order: list) -> None:
        self.orders[oid] = order
        account = order[O_ACCOUNT]
        mine = self.acct_orders.get(account)
        if mine is None:
            mine = self.acct_orders[account] = {}
        mine[oid] = order
        self.cid_index[(account, order[O_CID])] = oid

    def _remove(self, oid: int, order: list) -> None:
        del self.orders[oid]
        account = order[O_ACCOUNT]
        del self.acct_orders[account][oid]
        del self.cid_index[(account, order[O_CID])]

    def _level(self, market: int, side: int, price: int, delta: int) -> None:
        if delta == 0:
            return
        book = self.books[market][side]
        self.versions[market] += 1
        qty = book.get(price, 0) + delta
        if qty:
            book[price] = qty
        else:
            del book[price]
        if self.track_dirty:
            self.dirty[market][side].add(price)
            self.any_dirty = True

    def _set_remaining(self, oid: int, remaining: int) -> None:
        order = self.orders.get(oid)
        if order is None:
            return
        self._level(order[O_MARKET], order[O_SIDE], order[O_PRICE], remaining - order[O_REMAINING])
        order[O_REMAINING] = remaining
        if remaining == 0:
            self._remove(oid, order)

    # -- events (tuples as gateway.codec unpacks them) -----------------------------------
    def on_command(self, seq: int, command: tuple) -> None:
        """EV_COMMAND: remember an admin command until its `done` says it applied."""
        self._admin = (seq, command) if command[CM_CMD] in ADMIN_COMMANDS else None

    def on_done(self, seq: int) -> int | None:
        """EV_DONE; returns the market id an admin command changed, if one did."""
        admin = self._admin
        if admin is None or admin[0] != seq:
            return None
        self._admin = None
        (_, cid, oid, price, qty, amount, account, _, market, code, _, kind) = admin[1][:12]
        if not 0 <= market < self.max_markets:
            return None
        mk = self.markets[market]
        if code == CMD_CREATE_MARKET:
            self.markets[market] = [1, amount, account, price, 0, 0, 0, 0, MARKET_TRADING]
        elif code == CMD_SET_MARKET_LIMITS:
            mk[M_MAX_PRICE], mk[M_MAX_ORDER] = price, qty
        else:
            state = {CMD_HALT: MARKET_HALTED, CMD_RESUME: MARKET_TRADING,
                     CMD_SETTLE_MARKET: MARKET_SETTLED}.get(code, kind)
            mk[M_STATE] = state
            mk[M_HALTED] = int(state in (MARKET_CANCEL_ONLY, MARKET_HALTED, MARKET_SETTLED))
        return market

    def on_order_event(self, etype: int, ev: tuple, seq: int):
        """Fold an order event (ack, canceled, amended, done, triggered) in; on_done's result
        for done."""
        if etype == EV_ACK:
            self.on_ack(ev)
        elif etype == EV_CANCELED:
            self.on_canceled(ev)
        elif etype == EV_AMENDED:
            self.on_amended(ev)
        elif etype == EV_DONE:
            return self.on_done(seq)
        elif etype == EV_TRIGGERED:
            self._take_untriggered(ev[OE_OID])
            self.on_ack(ev)          # it says where the live order ended, as an ack does
        return None

    def on_ack(self, ev) -> None:
        status = ev[OE_STATUS]
        if status == STATUS_OPEN or status == STATUS_UNTRIGGERED:
            order = [ev[E_ACCOUNT], ev[OE_CID], ev[E_MARKET], ev[OE_SIDE], ev[OE_KIND],
                     ev[OE_PRICE], ev[OE_REMAINING], ev[OE_QTY]]
            if status == STATUS_OPEN:
                self._add(ev[OE_OID], order)
                self._level(ev[E_MARKET], ev[OE_SIDE], ev[OE_PRICE], ev[OE_REMAINING])
            else:
                self.untriggered[ev[OE_OID]] = order
                self.cid_index[(ev[E_ACCOUNT], ev[OE_CID])] = ev[OE_OID]

    def _take_untriggered(self, oid: int) -> list | None:
        order = self.untriggered.pop(oid, None)
        if order is not None:
            del self.cid_index[(order[O_ACCOUNT], order[O_CID])]
        return order

    def on_trade(self, tr) -> None:
        self._set_remaining(tr[TR_MAKER_OID], tr[TR_MAKER_REMAINING])
        self._set_remaining(tr[TR_OID], tr[TR_REMAINING])
        self.markets[tr[E_MARKET]][M_LAST] = tr[TR_PRICE]

    def on_canceled(self, ev) -> None:
        oid = ev[OE_OID]
        order = self.orders.get(oid)
        if order is not None:
            self._level(order[O_MARKET], order[O_SIDE], order[O_PRICE], -order[O_REMAINING])
            self._remove(oid, order)
        elif self.untriggered:
            self._take_untriggered(oid)

    def on_amended(self, ev) -> None:
        order = self.orders.get(ev[OE_OID])
        if order is None:
            return
        market, side = order[O_MARKET], order[O_SIDE]
        self._level(market, side, order[O_PRICE], -order[O_REMAINING])
        order[O_PRICE], order[O_QTY], order[O_REMAINING] = \
            ev[OE_PRICE], ev[OE_QTY], ev[OE_REMAINING]
        self._level(market, side, ev[OE_PRICE], ev[OE_REMAINING])

    def on_mark(self, ev) -> None:
        if 0 <= ev[E_MARKET] < self.max_markets:
            self.markets[ev[E_MARKET]][M_MARK] = ev[MK_MARK]

    # -- queries: what the gateway reads (gateway/mirror_arrays.py answers the same) ----------
    # `applied_seq` and `any_dirty` (levels changed since dirty_markets() last ran) are read
    # as attributes.
    def order_of(self, account: int, oid: int, cid: int):
        """The row of this account's resting order `oid` (by `cid` if oid is 0), or None."""
        if oid:
            return self.acct_orders.get(account, {}).get(oid)
        found = self.cid_index.get((account, cid))
        return self.orders.get(found) if found is not None else None

    def untriggered_of(self, account: int, oid: int, cid: int):
        """The row of this account's untriggered order `oid` (by `cid` if oid is 0), or None."""
        order = self.untriggered.get(oid or self.cid_index.get((account, cid)))
        return order if order is not None and order[O_ACCOUNT] == account else None

    def book_version(self, market: int) -> int:
        """How many times the market's levels changed since this mirror was built."""
        return self.versions[market]

    def market_row(self, market: int) -> list:
        """The market's 9 ints (M_* columns); read only."""
        return self.markets[market]

    def book_levels(self, market: int, depth: int = 0):
        """(bids, asks) as [(price_ticks, qty_lots)], best first, at most depth each (0: all)."""
        bids, asks = self.books[market]
        b = sorted(bids.items(), reverse=True)
        a = sorted(asks.items())
        if depth:
            b, a = b[:depth], a[:depth]
        return b, a

    def open_orders(self, account: int, market: int | None = None):
        """(oid, order, status word) of the account's resting, then untriggered, orders."""
        for oid, o in self.acct_orders.get(account, {}).items():
            if market is None or o[O_MARKET] == market:
                yield oid, o, "open"
        for oid, o in self.untriggered.items():
            if o[O_ACCOUNT] == account and (market is None or o[O_MARKET] == market):
                yield oid, o, "untriggered"

    def dirty_markets(self) -> list:
        """Markets with levels changed since they were last taken, ascending; the caller
        takes each (take_dirty), so any_dirty turns false."""
        self.any_dirty = False
        return [m for m, (b, a) in enumerate(self.dirty) if b or a]

    def take_dirty(self, market: int):
        """Changed levels since the last call: (bids, asks) as [(price, qty)], best first."""
        bids_dirty, asks_dirty = self.dirty[market]
        bids, asks = self.books[market]
        b = [(p, bids.get(p, 0)) for p in sorted(bids_dirty, reverse=True)]
        a = [(p, asks.get(p, 0)) for p in sorted(asks_dirty)]
        bids_dirty.clear()
        asks_dirty.clear()
        return b, a


def apply_events(mirror: Mirror, raw: bytes | memoryview, count: int) -> None:
    """Apply `count` 128-byte event records (as the ring holds them) to a mirror: the same
    per-event calls the gateway makes, without the routing (for tests and tools)."""
    from engine.records import EV_COMMAND, EV_MARK, EV_TRADE
    from gateway.codec import (COMMAND_IN_EVENT_OFFSET, COMMAND_STRUCT, ETYPE_OFFSET,
                               MARK_EVENT_STRUCT, ORDER_EVENT_STRUCT, TRADE_EVENT_STRUCT)
    mv = memoryview(raw).cast("B")
    for i in range(count):
        off = i * 128
        etype = mv[off + ETYPE_OFFSET]
        seq = int.from_bytes(mv[off:off + 8], "little", signed=True)
        if seq <= mirror.base_seq:
            continue
        if etype == EV_COMMAND:
            mirror.on_command(seq, COMMAND_STRUCT.unpack_from(mv, off + COMMAND_IN_EVENT_OFFSET))
            mirror.applied_seq = seq
        elif etype == EV_TRADE:
            mirror.on_trade(TRADE_EVENT_STRUCT.unpack_from(mv, off))
        elif etype == EV_MARK:
            mirror.on_mark(MARK_EVENT_STRUCT.unpack_from(mv, off))
        elif etype in ORDER_EVENTS:
            mirror.on_order_event(etype, ORDER_EVENT_STRUCT.unpack_from(mv, off), seq)


def comparable(mirror: Mirror) -> dict:
    """What must agree between a mirror fed with events and one built from the state tables."""
    return {
        "orders": {oid: tuple(o[:7]) for oid, o in mirror.orders.items()},
        "untriggered": {oid: tuple(o[:7]) for oid, o in mirror.untriggered.items()},
        "books": [(dict(b), dict(a)) for b, a in mirror.books],
        "markets": [list(m) for m in mirror.markets],
        "cids": dict(mirror.cid_index),
    }
