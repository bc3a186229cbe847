"""The gateway's copy of the trading state, kept exact by applying the event stream.

A gateway consumes every event the matcher emits, so it can follow the book, the resting
orders and each account's balance and positions without asking the matcher: `book`,
`open_orders` and `account` queries are answered from here, exact at `applied_seq` (the last
command whose events are all applied), and the market-data deltas are the levels this copy
saw change.

It starts from a copy of the matcher's state tables (engine.service.attach_state) taken at a
command boundary (`consistent_state_copy`) and applies only events of later commands. The
arithmetic is the matcher's, in Python integers (exact: the engine's split products are exact
within the bounds every market's config proves).

Order events change it this way (engine/reference.py is the rule book):
- `ack` with status open: the order rests with the ack's `remaining_lots` (its open quantity
  after the fills that follow the ack).
- `trade`: the maker's open quantity becomes `maker_remaining_lots`; the taker's becomes
  `remaining_lots` if the taker rests (an amended order re-matching), so a new order's level
  goes up by its final remainder at the ack and back to it after its fills (deltas are taken
  per batch, so nobody sees the intermediate values). Positions and balances move with the
  fill, fees from the event.
- `canceled`: the order leaves the book. `amended`: new price and open quantity.
- `balance`: the event carries the new balance. `mark`: the new mark.
- admin commands (create market, limits, halt, resume) apply when their `done` follows.
"""

from __future__ import annotations

import time

import numpy as np

from engine.records import (CMD_CREATE_MARKET, CMD_HALT, CMD_RESUME, CMD_SET_MARKET_LIMITS,
                            SIDE_BUY, STATUS_OPEN)
from engine.numbers import position_after_fill
from engine.records import EV_ACK, EV_AMENDED, EV_CANCELED, EV_DONE
from engine.state import C_SEQ, NONE

# an order: [account, cid, market, side, kind, price_ticks, remaining_lots, qty_lots]
O_ACCOUNT, O_CID, O_MARKET, O_SIDE, O_KIND, O_PRICE, O_REMAINING, O_QTY = range(8)
# a market: [active, atoms_per_tick_lot, max_leverage, mark_ticks, max_price_ticks,
#            max_order_lots, halted, last_trade_ticks]
M_ACTIVE, M_ATPL, M_LEVERAGE, M_MARK, M_MAX_PRICE, M_MAX_ORDER, M_HALTED, M_LAST = range(8)

ADMIN_COMMANDS = (CMD_CREATE_MARKET, CMD_SET_MARKET_LIMITS, CMD_HALT, CMD_RESUME)
_STATE_TABLES = ("counters", "markets", "positions", "accounts", "orders", "levels",
                 "book_keys", "book_levels", "book_depth")


def consistent_state_copy(state, events, timeout_s: float = 10.0, stats: dict | None = None,
                          tables=_STATE_TABLES):
    """Copies of the matcher's tables at a command boundary, and the seq they hold.

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
            first = {name: np.array(getattr(state, name)) for name in tables}
            second = {name: np.array(getattr(state, name)) for name in tables}
            if int(state.counters[C_SEQ]) == s0 and all(
                    np.array_equal(first[n], second[n]) for n in tables):
                return first, s0
        if time.monotonic() > deadline:
            raise TimeoutError("could not take a consistent copy of the matcher's state "
                               f"within {timeout_s} s (the matcher never paused)")
        time.sleep(0.0005)


class Mirror:
    def __init__(self, max_markets: int, track_dirty: bool = False):
        self.max_markets = max_markets
        self.base_seq = 0        # the state copy this mirror started from holds commands <= this
        self.applied_seq = 0
        self.orders: dict[int, list] = {}
        self.acct_orders: dict[int, dict[int, list]] = {}
        self.cid_index: dict[tuple[int, int], int] = {}
        self.books = [({}, {}) for _ in range(max_markets)]
        self.markets = [[0, 0, 0, 0, 0, 0, 0, 0] for _ in range(max_markets)]
        self.balances: dict[int, int] = {}
        self.positions: dict[tuple[int, int], list] = {}   # (account, market) -> [size, cost]
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
                               int(r["halted"]), int(r["last_trade_ticks"])]
        accounts = get("accounts")
        balances = accounts["balance_atoms"]
        for a in np.flatnonzero(balances):
            self.balances[int(a)] = int(balances[a])
        pos = get("positions")
        for a, m in zip(*np.nonzero((pos["size_lots"] != 0) | (pos["cost_atoms"] != 0))):
            p = pos[a, m]
            self.positions[(int(a), int(m))] = [int(p["size_lots"]), int(p["cost_atoms"])]
        orders, levels = get("orders"), get("levels")
        depth, book_levels = get("book_depth"), get("book_levels")
        for m in range(max_markets):
            for side in (0, 1):
                book = self.books[m][side]
                for k in range(int(depth[m, side]) - 1, -1, -1):   # best first
                    lvl = levels[int(book_levels[m, side, k])]
                    book[int(lvl["price_ticks"])] = int(lvl["qty_lots"])
                    slot = int(lvl["first"])
                    while slot != NONE:
                        o = orders[slot]
                        self._add(int(o["oid"]), [int(o["account"]), int(o["cid"]), m, side,
                                                  int(o["kind"]), int(o["price_ticks"]),
                                                  int(o["remaining_lots"]),
                                                  int(o["remaining_lots"])])
                        slot = int(o["next"])
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
        qty = book.get(price, 0) + delta
        if qty:
            book[price] = qty
        else:
            del book[price]
        if self.track_dirty:
            self.dirty[market][side].add(price)
            self.any_dirty = True

    def _fill(self, account: int, market: int, delta: int, price: int, atpl: int, fee: int):
        key = (account, market)
        pos = self.positions.get(key)
        if pos is None:
            pos = self.positions[key] = [0, 0]
        pos[0], pos[1], realized = position_after_fill(pos[0], pos[1], delta, price, atpl)
        self.balances[account] = self.balances.get(account, 0) + realized - fee

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
        self._admin = (seq, command) if command[9] in ADMIN_COMMANDS else None

    def on_done(self, seq: int) -> int | None:
        """EV_DONE; returns the market id an admin command changed, if one did."""
        admin = self._admin
        if admin is None or admin[0] != seq:
            return None
        self._admin = None
        (_, cid, oid, price, qty, amount, account, _, market, code) = admin[1][:10]
        if not 0 <= market < self.max_markets:
            return None
        mk = self.markets[market]
        if code == CMD_CREATE_MARKET:
            self.markets[market] = [1, amount, account, price, 0, 0, 0, 0]
        elif code == CMD_SET_MARKET_LIMITS:
            mk[M_MAX_PRICE], mk[M_MAX_ORDER] = price, qty
        elif code == CMD_HALT:
            mk[M_HALTED] = 1
        elif code == CMD_RESUME:
            mk[M_HALTED] = 0
        return market

    def on_order_event(self, etype: int, ev: tuple, seq: int):
        """Fold an order event (ack, canceled, amended, done) in; on_done's result for done."""
        if etype == EV_ACK:
            self.on_ack(ev)
        elif etype == EV_CANCELED:
            self.on_canceled(ev)
        elif etype == EV_AMENDED:
            self.on_amended(ev)
        elif etype == EV_DONE:
            return self.on_done(seq)
        return None

    def on_ack(self, ev) -> None:
        if ev[8] == STATUS_OPEN:
            # seq ts etype source market account req reason status side kind oid cid price qty rem
            order = [ev[5], ev[12], ev[4], ev[9], ev[10], ev[13], ev[15], ev[14]]
            self._add(ev[11], order)
            self._level(ev[4], ev[9], ev[13], ev[15])

    def on_trade(self, tr) -> None:
        (_, _, _, _, market, taker, _, side, _, _, price, qty, oid, _, remaining, fee,
         maker, maker_oid, _, maker_remaining, maker_fee) = tr
        self._set_remaining(maker_oid, maker_remaining)
        self._set_remaining(oid, remaining)
        mk = self.markets[market]
        atpl = mk[M_ATPL]
        mk[M_LAST] = price
        if side == SIDE_BUY:
            self._fill(taker, market, qty, price, atpl, fee)
            self._fill(maker, market, -qty, price, atpl, maker_fee)
        else:
            self._fill(taker, market, -qty, price, atpl, fee)
            self._fill(maker, market, qty, price, atpl, maker_fee)

    def on_canceled(self, ev) -> None:
        order = self.orders.get(ev[11])
        if order is not None:
            self._level(order[O_MARKET], order[O_SIDE], order[O_PRICE], -order[O_REMAINING])
            self._remove(ev[11], order)

    def on_amended(self, ev) -> None:
        order = self.orders.get(ev[11])
        if order is None:
            return
        market, side = order[O_MARKET], order[O_SIDE]
        self._level(market, side, order[O_PRICE], -order[O_REMAINING])
        order[O_PRICE], order[O_QTY], order[O_REMAINING] = ev[13], ev[14], ev[15]
        self._level(market, side, ev[13], ev[15])

    def on_balance(self, ev) -> None:
        self.balances[ev[5]] = ev[8]

    def on_mark(self, ev) -> None:
        if 0 <= ev[4] < self.max_markets:
            self.markets[ev[4]][M_MARK] = ev[7]

    # -- queries ------------------------------------------------------------------------
    def book_levels(self, market: int, depth: int = 0):
        """(bids, asks) as [(price_ticks, qty_lots)], best first, at most depth each (0: all)."""
        bids, asks = self.books[market]
        b = sorted(bids.items(), reverse=True)
        a = sorted(asks.items())
        if depth:
            b, a = b[:depth], a[:depth]
        return b, a

    def take_dirty(self, market: int):
        """Changed levels since the last call: (bids, asks) as [(price, qty)], best first."""
        bids_dirty, asks_dirty = self.dirty[market]
        bids, asks = self.books[market]
        b = [(p, bids.get(p, 0)) for p in sorted(bids_dirty, reverse=True)]
        a = [(p, asks.get(p, 0)) for p in sorted(asks_dirty)]
        bids_dirty.clear()
        asks_dirty.clear()
        return b, a

    def account_numbers(self, account: int):
        """balance, equity, initial requirement (with open orders), position requirement,
        and per market (market, size, cost, mark, upnl) — the matcher's margin arithmetic."""
        balance = self.balances.get(account, 0)
        equity = balance
        required = 0
        position_required = 0
        open_lots = {}
        for order in self.acct_orders.get(account, {}).values():
            key = (order[O_MARKET], order[O_SIDE])
            open_lots[key] = open_lots.get(key, 0) + order[O_REMAINING]
        positions = []
        for m in range(self.max_markets):
            pos = self.positions.get((account, m))
            buy, sell = open_lots.get((m, 0), 0), open_lots.get((m, 1), 0)
            if pos is None and not buy and not sell:
                continue
            size, cost = pos if pos is not None else (0, 0)
            mk = self.markets[m]
            mark, atpl, lev = mk[M_MARK], mk[M_ATPL], mk[M_LEVERAGE] or 1
            upnl = size * mark * atpl - cost
            equity += upnl
            exposure = max(abs(size + buy), abs(size - sell))
            required += -(-(exposure * mark * atpl) // lev)
            position_required += -(-(abs(size) * mark * atpl) // lev)
            if size or cost:
                positions.append((m, size, cost, mark, upnl, lev, atpl))
        return balance, equity, required, position_required, positions


def apply_events(mirror: Mirror, raw: bytes | memoryview, count: int) -> None:
    """Apply `count` 128-byte event records (as the ring holds them) to a mirror: the same
    per-event calls the gateway makes, without the routing (for tests and tools)."""
    from engine.records import EV_BALANCE, EV_COMMAND, EV_MARK, EV_TRADE
    from gateway.codec import (BALANCE_EVENT_STRUCT, COMMAND_IN_EVENT_OFFSET, COMMAND_STRUCT,
                               ETYPE_OFFSET, MARK_EVENT_STRUCT, ORDER_EVENT_STRUCT,
                               TRADE_EVENT_STRUCT)
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
        elif etype == EV_BALANCE:
            mirror.on_balance(BALANCE_EVENT_STRUCT.unpack_from(mv, off))
        elif etype == EV_MARK:
            mirror.on_mark(MARK_EVENT_STRUCT.unpack_from(mv, off))
        else:
            mirror.on_order_event(etype, ORDER_EVENT_STRUCT.unpack_from(mv, off), seq)


def comparable(mirror: Mirror) -> dict:
    """What must agree between a mirror fed with events and one built from the state tables."""
    return {
        "orders": {oid: tuple(o[:7]) for oid, o in mirror.orders.items()},
        "books": [(dict(b), dict(a)) for b, a in mirror.books],
        "balances": {a: v for a, v in mirror.balances.items() if v},
        "positions": {k: tuple(v) for k, v in mirror.positions.items() if v != [0, 0]},
        "markets": [list(m) for m in mirror.markets],
        "cids": dict(mirror.cid_index),
    }
