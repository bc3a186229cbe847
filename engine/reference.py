"""The matcher's rules in plain Python: the specification in code, and the oracle in tests.

This model is written for reading, not speed. The compiled matcher (engine/matcher.py) must
produce exactly the same events for the same commands; tests/test_engine_differential.py
fuzzes the two against each other. When the two disagree, decide here what is right first.

Rules in brief (docs/matching.md has the long form):
- Every command gets a sequence number and an EV_COMMAND event, then at least one more event.
- Price-time priority; a taker trades at the maker's price. Market orders are IOC limit orders
  at the edge of the price band around the mark.
- Margin is cross: equity (balance + unrealized PnL at the mark) must cover, per market,
  exposure x ceil(mark x atoms_per_tick_lot / max_leverage): lots times the initial margin
  of one lot, rounded up; exposure is the larger of |size + open buys| and
  |size - open sells| in lots.
- Reduce-only orders may only shrink a position: checked at entry (quantity clipped to the
  position), capped when they trade, and after each command canceled or shrunk to the
  remaining position of every account whose position that command changed.
"""

from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, field

from engine import numbers as num
from engine.config import (EngineConfig, MAX_BALANCE_ATOMS, MAX_NET_DEPOSITS_ATOMS,
                           market_config_problem,
                           market_limits_problem)
from engine.records import *  # noqa: F403 — the codes are the vocabulary of this module


@dataclass
class Market:
    atoms_per_tick_lot: int
    maker_fee_e9: int
    taker_fee_e9: int
    price_band_e9: int
    max_leverage: int
    mark_ticks: int
    max_price_ticks: int = 0
    max_order_lots: int = 0
    max_position_lots: int = 0
    max_open_orders: int = 0
    halted: bool = False
    last_trade_ticks: int = 0
    # price -> FIFO of resting orders; prices kept sorted ascending per side
    levels: tuple = field(default_factory=lambda: ({}, {}))
    prices: tuple = field(default_factory=lambda: ([], []))
    resting: list = field(default_factory=lambda: [0, 0])
    levels_used: list = field(default_factory=lambda: [0, 0])

    @property
    def tradeable(self):
        return self.max_price_ticks > 0 and not self.halted

    def best_price(self, side):
        prices = self.prices[side]
        if not prices:
            return None
        return prices[-1] if side == SIDE_BUY else prices[0]


@dataclass
class Order:
    oid: int
    cid: int
    account: int
    market: int
    side: int
    kind: int
    tif: int
    reduce_only: bool
    stp: int
    price_ticks: int
    remaining_lots: int


@dataclass
class Position:
    size_lots: int = 0
    cost_atoms: int = 0
    open_buy_lots: int = 0
    open_sell_lots: int = 0
    open_orders: int = 0


class ReferenceMatcher:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.seq = 0
        self.next_oid = 1
        self.next_trade_id = 1
        self.markets: dict[int, Market] = {}
        self.balances = [0] * config.max_accounts
        self.positions: dict[tuple[int, int], Position] = {}
        self.orders: dict[int, Order] = {}                 # oid -> order, all resting orders
        self.orders_of: dict[int, dict[int, Order]] = {}    # account -> oid -> order, placement order
        self.by_cid: dict[tuple[int, int], int] = {}       # (account, cid) -> oid
        self.fees_collected_atoms = 0
        self.net_deposits_atoms = 0
        self.events: list[dict] = []

    # ---- entry point -------------------------------------------------------------------
    def process(self, command: dict, source: int, privileged: bool) -> list[dict]:
        """Sequence one command (a dict of COMMAND_DTYPE fields) and return its events."""
        self.seq += 1
        self.events = []
        self.cmd = command
        self.source = source
        self._emit(EV_COMMAND, command["market"], command["account"],
                   command={k: int(command[k]) for k in COMMAND_DTYPE.names})
        code = command["cmd"]
        if code in PRIVILEGED_COMMANDS and not privileged:
            self._reject(REASON_FORBIDDEN)
        else:
            handler = self._handlers.get(code)
            if handler is None:
                self._reject(REASON_INVALID_MESSAGE)
            else:
                handler(self)
        return self.events

    # ---- events ------------------------------------------------------------------------
    def _emit(self, etype, market, account, **fields):
        event = dict(seq=self.seq, ts_ns=self.cmd["ts_ns"], etype=etype, source=self.source,
                     market=market, account=account)
        event.update(fields)
        self.events.append(event)
        return event

    def _order_event(self, etype, market, account, *, req=0, reason=0, status=0, side=0,
                     kind=0, oid=0, cid=0, price_ticks=0, qty_lots=0, remaining_lots=0):
        return self._emit(etype, market, account, req=req, reason=reason, status=status,
                          side=side, kind=kind, oid=oid, cid=cid, price_ticks=price_ticks,
                          qty_lots=qty_lots, remaining_lots=remaining_lots)

    def _reject(self, reason):
        c = self.cmd
        self._order_event(EV_REJECT, c["market"], c["account"], req=c["req"], reason=reason,
                          side=c["side"], kind=c["kind"], oid=c["oid"], cid=c["cid"])

    def _done(self, count=0):
        c = self.cmd
        self._order_event(EV_DONE, c["market"], c["account"], req=c["req"], qty_lots=count)

    def _req_for(self, account):
        return self.cmd["req"] if account == self.cmd["account"] else 0

    def _canceled(self, order, reason, canceled_lots):
        self._order_event(EV_CANCELED, order.market, order.account,
                          req=self._req_for(order.account), reason=reason,
                          status=STATUS_CANCELED, side=order.side, kind=order.kind,
                          oid=order.oid, cid=order.cid, price_ticks=order.price_ticks,
                          remaining_lots=canceled_lots)

    # ---- lookups -----------------------------------------------------------------------
    def _market(self, market_id):
        return self.markets.get(market_id)

    def _valid_account(self, account):
        return 0 <= account < self.config.max_accounts

    def _position(self, account, market_id):
        key = (account, market_id)
        pos = self.positions.get(key)
        if pos is None:
            pos = self.positions[key] = Position()
        return pos

    def _find_order(self, account, oid, cid):
        if oid == 0:
            oid = self.by_cid.get((account, cid), 0)
        order = self.orders.get(oid)
        if order is None or order.account != account:
            return None
        return order

    # ---- margin ------------------------------------------------------------------------
    def _requirement(self, market, pos, open_buy, open_sell):
        exposure = max(abs(pos.size_lots + open_buy), abs(pos.size_lots - open_sell))
        per_lot = num.mul_div_ceil(market.mark_ticks, market.atoms_per_tick_lot,
                                   market.max_leverage)
        return exposure * per_lot

    def _equity_and_requirement(self, account, extra_market=-1, extra_buy=0, extra_sell=0):
        equity = self.balances[account]
        required = 0
        for market_id in sorted(self.markets):
            pos = self.positions.get((account, market_id))
            if pos is None:
                continue
            market = self.markets[market_id]
            equity += pos.size_lots * market.mark_ticks * market.atoms_per_tick_lot - pos.cost_atoms
            buy, sell = pos.open_buy_lots, pos.open_sell_lots
            if market_id == extra_market:
                buy += extra_buy
                sell += extra_sell
            required += self._requirement(market, pos, buy, sell)
        return equity, required

    def _exposure_error(self, account, market_id, market, pos, add_buy, add_sell, check_margin):
        """Position limit, then margin, for adding open quantity; a reason code or 0.

        The position limit binds reduce-only orders too: it is what bounds every exposure
        (and so every int64 product) the margin arithmetic ever forms.
        """
        buy = pos.open_buy_lots + add_buy
        sell = pos.open_sell_lots + add_sell
        if max(abs(pos.size_lots + buy), abs(pos.size_lots - sell)) > market.max_position_lots:
            return REASON_POSITION_LIMIT
        if not check_margin:
            return 0
        equity, required = self._equity_and_requirement(account, market_id, add_buy, add_sell)
        if equity - required < 0:
            return REASON_INSUFFICIENT_MARGIN
        return 0

    # ---- admin commands ----------------------------------------------------------------
    def _create_market(self):
        c = self.cmd
        m = c["market"]
        if not 0 <= m < self.config.max_markets:
            return self._reject(REASON_UNKNOWN_MARKET)
        if m in self.markets:
            return self._reject(REASON_MARKET_EXISTS)
        if market_config_problem(c["amount_atoms"], c["price_ticks"], c["cid"], c["oid"],
                                 c["qty_lots"], c["account"]):
            return self._reject(REASON_INVALID_MARKET_CONFIG)
        self.markets[m] = Market(atoms_per_tick_lot=c["amount_atoms"], maker_fee_e9=c["cid"],
                                 taker_fee_e9=c["oid"], price_band_e9=c["qty_lots"],
                                 max_leverage=c["account"], mark_ticks=c["price_ticks"])
        self._done()

    def _set_market_limits(self):
        c = self.cmd
        market = self._market(c["market"])
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        if market.max_price_ticks > 0 or market_limits_problem(
                market.atoms_per_tick_lot, market.mark_ticks, c["price_ticks"], c["qty_lots"],
                c["amount_atoms"], c["account"]):
            return self._reject(REASON_INVALID_MARKET_CONFIG)
        market.max_price_ticks = c["price_ticks"]
        market.max_order_lots = c["qty_lots"]
        market.max_position_lots = c["amount_atoms"]
        market.max_open_orders = c["account"]
        self._done()

    def _set_mark(self):
        c = self.cmd
        market = self._market(c["market"])
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        if c["price_ticks"] < 1 or (market.max_price_ticks > 0
                                    and c["price_ticks"] > market.max_price_ticks):
            return self._reject(REASON_INVALID_PRICE)
        market.mark_ticks = c["price_ticks"]
        self._emit(EV_MARK, c["market"], c["account"], req=c["req"], mark_ticks=c["price_ticks"])

    def _halt(self, halted):
        market = self._market(self.cmd["market"])
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        market.halted = halted
        self._done()

    def _deposit(self):
        c = self.cmd
        account, amount = c["account"], c["amount_atoms"]
        if not self._valid_account(account):
            return self._reject(REASON_UNKNOWN_ACCOUNT)
        if (amount < 1 or amount > MAX_BALANCE_ATOMS - self.balances[account]
                or amount > MAX_NET_DEPOSITS_ATOMS - self.net_deposits_atoms):
            return self._reject(REASON_INVALID_MESSAGE)
        self.balances[account] += amount
        self.net_deposits_atoms += amount
        self._emit(EV_BALANCE, c["market"], account, req=c["req"], amount_atoms=amount,
                   balance_atoms=self.balances[account])
        self._done()

    def _withdraw(self):
        c = self.cmd
        account, amount = c["account"], c["amount_atoms"]
        if not self._valid_account(account):
            return self._reject(REASON_UNKNOWN_ACCOUNT)
        if amount < 1 or amount > MAX_BALANCE_ATOMS:
            return self._reject(REASON_INVALID_MESSAGE)
        if amount > self.balances[account]:
            return self._reject(REASON_INSUFFICIENT_BALANCE)
        equity, required = self._equity_and_requirement(account)
        if equity - amount - required < 0:
            return self._reject(REASON_INSUFFICIENT_MARGIN)
        self.balances[account] -= amount
        self.net_deposits_atoms -= amount
        self._emit(EV_BALANCE, c["market"], account, req=c["req"], amount_atoms=-amount,
                   balance_atoms=self.balances[account])
        self._done()

    # ---- book mechanics ----------------------------------------------------------------
    def _rest(self, market_id, market, order):
        side_levels = market.levels[order.side]
        queue = side_levels.get(order.price_ticks)
        if queue is None:
            queue = side_levels[order.price_ticks] = deque()
            insort(market.prices[order.side], order.price_ticks)
        queue.append(order)
        market.resting[order.side] += 1
        self.orders[order.oid] = order
        self.orders_of.setdefault(order.account, {})[order.oid] = order
        self.by_cid[(order.account, order.cid)] = order.oid
        pos = self._position(order.account, market_id)
        pos.open_orders += 1
        if order.side == SIDE_BUY:
            pos.open_buy_lots += order.remaining_lots
        else:
            pos.open_sell_lots += order.remaining_lots

    def _unrest(self, order):
        """Take an order off the book (it keeps its fields)."""
        market = self.markets[order.market]
        side_levels = market.levels[order.side]
        queue = side_levels[order.price_ticks]
        queue.remove(order)
        if not queue:
            del side_levels[order.price_ticks]
            prices = market.prices[order.side]
            del prices[bisect_left(prices, order.price_ticks)]
        market.resting[order.side] -= 1
        del self.orders[order.oid]
        del self.orders_of[order.account][order.oid]
        del self.by_cid[(order.account, order.cid)]
        pos = self._position(order.account, order.market)
        pos.open_orders -= 1
        if order.side == SIDE_BUY:
            pos.open_buy_lots -= order.remaining_lots
        else:
            pos.open_sell_lots -= order.remaining_lots

    def _shrink(self, order, new_remaining):
        """Reduce a resting order's open quantity in place (keeps its time priority)."""
        pos = self._position(order.account, order.market)
        delta = order.remaining_lots - new_remaining
        if order.side == SIDE_BUY:
            pos.open_buy_lots -= delta
        else:
            pos.open_sell_lots -= delta
        order.remaining_lots = new_remaining

    def _level_full(self, market, side, price_ticks):
        return (price_ticks not in market.levels[side]
                and len(market.prices[side]) >= self.config.max_levels_per_side)

    @staticmethod
    def _crosses(side, limit_ticks, opposite_ticks):
        return opposite_ticks <= limit_ticks if side == SIDE_BUY else opposite_ticks >= limit_ticks

    def _band_limit(self, market, side):
        dev = num.mul_div_floor(market.mark_ticks, market.price_band_e9, num.RATE_ONE_E9)
        if side == SIDE_BUY:
            return min(market.mark_ticks + dev, market.max_price_ticks)
        return max(market.mark_ticks - dev, 1)

    def _outside_band(self, market, price_ticks):
        dev = num.mul_div_floor(market.mark_ticks, market.price_band_e9, num.RATE_ONE_E9)
        return abs(price_ticks - market.mark_ticks) > dev

    # ---- matching ----------------------------------------------------------------------
    def _fok_fillable(self, market, account, side, limit_ticks, stp, wanted):
        opposite = 1 - side
        prices = market.prices[opposite]
        walk = reversed(prices) if opposite == SIDE_BUY else iter(prices)
        total = 0
        traded_by = {}   # maker account -> lots it would have traded so far in this walk
        for price in walk:
            if not self._crosses(side, limit_ticks, price):
                break
            for maker in market.levels[opposite][price]:
                if maker.account == account:
                    if stp == STP_CANCEL_MAKER:
                        continue
                    return False
                already = traded_by.get(maker.account, 0)
                lots = min(self._maker_tradeable_lots(maker, already), wanted - total)
                traded_by[maker.account] = already + lots
                total += lots
                if total >= wanted:
                    return True
        return False

    def _maker_tradeable_lots(self, maker, already_traded_lots=0):
        """How much a maker can trade now; a reduce-only maker no more than closes its position.

        already_traded_lots: what the same account's orders on this side would trade first.
        """
        if not maker.reduce_only:
            return maker.remaining_lots
        size = self._position(maker.account, maker.market).size_lots
        closing = (-size if maker.side == SIDE_BUY else size) - already_traded_lots
        return min(maker.remaining_lots, max(closing, 0))

    def _match(self, market_id, market, taker: Order, limit_ticks, touched):
        """Trade taker against the opposite side. Returns True if STP stopped the taker."""
        opposite = 1 - taker.side
        while taker.remaining_lots > 0:
            best = market.best_price(opposite)
            if best is None or not self._crosses(taker.side, limit_ticks, best):
                return False
            maker = market.levels[opposite][best][0]
            if maker.account == taker.account:
                if taker.stp in (STP_CANCEL_MAKER, STP_CANCEL_BOTH):
                    self._unrest(maker)
                    self._canceled(maker, REASON_STP, maker.remaining_lots)
                if taker.stp in (STP_CANCEL_TAKER, STP_CANCEL_BOTH):
                    return True
                continue
            tradeable = self._maker_tradeable_lots(maker)
            if tradeable == 0:
                self._unrest(maker)
                self._canceled(maker, REASON_REDUCE_ONLY, maker.remaining_lots)
                continue
            qty = min(taker.remaining_lots, tradeable)
            self._trade(market_id, market, taker, maker, qty, touched)
        return False

    def _trade(self, market_id, market, taker, maker, qty, touched):
        price = maker.price_ticks
        notional = price * qty * market.atoms_per_tick_lot
        taker_fee = num.fee_atoms(notional, market.taker_fee_e9)
        maker_fee = num.fee_atoms(notional, market.maker_fee_e9)
        for order, fee in ((taker, taker_fee), (maker, maker_fee)):
            pos = self._position(order.account, market_id)
            delta = qty if order.side == SIDE_BUY else -qty
            pos.size_lots, pos.cost_atoms, realized = num.position_after_fill(
                pos.size_lots, pos.cost_atoms, delta, price, market.atoms_per_tick_lot)
            self.balances[order.account] += realized - fee
            if order.account not in touched:
                touched.append(order.account)
        self.fees_collected_atoms += taker_fee + maker_fee
        market.last_trade_ticks = price
        taker.remaining_lots -= qty
        if maker.remaining_lots == qty:
            self._unrest(maker)
            maker.remaining_lots = 0
        else:
            self._shrink(maker, maker.remaining_lots - qty)
        trade_id = self.next_trade_id
        self.next_trade_id += 1
        self._emit(EV_TRADE, market_id, taker.account, req=self.cmd["req"], side=taker.side,
                   liquidation=0, trade_id=trade_id, price_ticks=price, qty_lots=qty, oid=taker.oid,
                   cid=taker.cid, remaining_lots=taker.remaining_lots, fee_atoms=taker_fee,
                   maker_account=maker.account, maker_oid=maker.oid, maker_cid=maker.cid,
                   maker_remaining_lots=maker.remaining_lots, maker_fee_atoms=maker_fee)

    def _sweep_reduce_only(self, market_id, touched):
        """Cancel or shrink reduce-only orders that outgrew their account's position."""
        for account in touched:
            size = self._position(account, market_id).size_lots
            for order in list(self.orders_of.get(account, {}).values()):
                if not order.reduce_only or order.market != market_id:
                    continue
                closing = -size if order.side == SIDE_BUY else size
                if closing <= 0:
                    self._unrest(order)
                    self._canceled(order, REASON_REDUCE_ONLY, order.remaining_lots)
                elif order.remaining_lots > closing:
                    self._shrink(order, closing)
                    self._order_event(EV_AMENDED, market_id, account,
                                      req=self._req_for(account), reason=REASON_REDUCE_ONLY,
                                      status=STATUS_OPEN, side=order.side, kind=order.kind,
                                      oid=order.oid, cid=order.cid,
                                      price_ticks=order.price_ticks, qty_lots=closing,
                                      remaining_lots=closing)

    def _take_then_rest(self, market_id, market, order, limit_ticks):
        """Match an incoming (or re-priced) order, then rest or cancel what is left.

        Returns the order's final status.
        """
        touched = []
        stopped = self._match(market_id, market, order, limit_ticks, touched)
        if order.remaining_lots == 0:
            status = STATUS_FILLED
        elif stopped or order.tif in (TIF_IOC, TIF_FOK) or order.kind == KIND_MARKET:
            reason = REASON_STP if stopped else REASON_IOC
            self._canceled(order, reason, order.remaining_lots)
            status = STATUS_CANCELED
        else:
            self._rest(market_id, market, order)
            status = STATUS_OPEN
        self._sweep_reduce_only(market_id, touched)
        return status

    # ---- order commands ----------------------------------------------------------------
    def _new_order(self):
        c = self.cmd
        account, market_id, side, kind, tif = c["account"], c["market"], c["side"], c["kind"], c["tif"]
        market = self._market(market_id)
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        if not self._valid_account(account):
            return self._reject(REASON_UNKNOWN_ACCOUNT)
        if (side > SIDE_SELL or kind > KIND_MARKET or tif > TIF_POST_ONLY
                or c["stp"] > STP_CANCEL_BOTH or c["flags"] & ~FLAG_REDUCE_ONLY
                or (kind == KIND_MARKET and tif == TIF_POST_ONLY)):
            return self._reject(REASON_INVALID_MESSAGE)
        if kind == KIND_MARKET and tif == TIF_GTC:
            tif = TIF_IOC
        if not market.tradeable:
            return self._reject(REASON_MARKET_HALTED)
        qty = c["qty_lots"]
        if not 1 <= qty <= market.max_order_lots:
            return self._reject(REASON_INVALID_QTY)
        if kind == KIND_LIMIT:
            price = c["price_ticks"]
            if not 1 <= price <= market.max_price_ticks:
                return self._reject(REASON_INVALID_PRICE)
            if self._outside_band(market, price):
                return self._reject(REASON_PRICE_BAND)
            limit = price
        else:
            price = 0
            limit = self._band_limit(market, side)
        if (account, c["cid"]) in self.by_cid:
            return self._reject(REASON_DUPLICATE_CID)
        pos = self._position(account, market_id)
        if tif in (TIF_GTC, TIF_POST_ONLY) and (
                pos.open_orders >= market.max_open_orders
                or len(self.orders) >= self.config.max_orders
                or self._level_full(market, side, price)):
            return self._reject(REASON_TOO_MANY_ORDERS)
        reduce_only = bool(c["flags"] & FLAG_REDUCE_ONLY)
        if reduce_only:
            closing = -pos.size_lots if side == SIDE_BUY else pos.size_lots
            if closing <= 0:
                return self._reject(REASON_REDUCE_ONLY_VIOLATION)
            qty = min(qty, closing)
        best = market.best_price(1 - side)
        if tif == TIF_POST_ONLY and best is not None and self._crosses(side, limit, best):
            return self._reject(REASON_POST_ONLY_WOULD_TAKE)
        err = self._exposure_error(account, market_id, market, pos,
                                   qty if side == SIDE_BUY else 0,
                                   qty if side == SIDE_SELL else 0, not reduce_only)
        if err:
            return self._reject(err)
        if tif == TIF_FOK and not self._fok_fillable(market, account, side, limit, c["stp"], qty):
            return self._reject(REASON_FOK_UNFILLED)

        order = Order(oid=self.next_oid, cid=c["cid"], account=account, market=market_id,
                      side=side, kind=kind, tif=tif, reduce_only=reduce_only, stp=c["stp"],
                      price_ticks=price, remaining_lots=qty)
        self.next_oid += 1
        ack = self._order_event(EV_ACK, market_id, account, req=c["req"], side=side, kind=kind,
                                oid=order.oid, cid=order.cid, price_ticks=price, qty_lots=qty)
        ack["status"] = self._take_then_rest(market_id, market, order, limit)
        ack["remaining_lots"] = order.remaining_lots if ack["status"] == STATUS_OPEN else 0

    def _cancel(self):
        c = self.cmd
        order = self._find_order(c["account"], c["oid"], c["cid"])
        if order is None:
            return self._reject(REASON_UNKNOWN_ORDER)
        self._unrest(order)
        self._canceled(order, REASON_USER, order.remaining_lots)

    def _cancel_all(self):
        c = self.cmd
        account, market_id = c["account"], c["market"]
        if market_id != -1 and market_id not in self.markets:
            return self._reject(REASON_UNKNOWN_MARKET)
        if not self._valid_account(account):
            return self._reject(REASON_UNKNOWN_ACCOUNT)
        count = 0
        for order in list(self.orders_of.get(account, {}).values()):
            if market_id == -1 or order.market == market_id:
                self._unrest(order)
                self._canceled(order, REASON_USER, order.remaining_lots)
                count += 1
        self._done(count)

    def _amend(self):
        c = self.cmd
        order = self._find_order(c["account"], c["oid"], c["cid"])
        if order is None:
            return self._reject(REASON_UNKNOWN_ORDER)
        market = self.markets[order.market]
        new_price = c["price_ticks"] or order.price_ticks
        new_qty = c["qty_lots"] or order.remaining_lots
        if c["price_ticks"] == 0 and c["qty_lots"] == 0:
            return self._reject(REASON_INVALID_MESSAGE)
        if not market.tradeable:
            return self._reject(REASON_MARKET_HALTED)
        if not 1 <= new_qty <= market.max_order_lots:
            return self._reject(REASON_INVALID_QTY)
        if not 1 <= new_price <= market.max_price_ticks:
            return self._reject(REASON_INVALID_PRICE)
        if new_price != order.price_ticks and self._outside_band(market, new_price):
            return self._reject(REASON_PRICE_BAND)
        pos = self._position(order.account, order.market)
        if order.reduce_only:
            closing = -pos.size_lots if order.side == SIDE_BUY else pos.size_lots
            if new_qty > closing:
                return self._reject(REASON_REDUCE_ONLY_VIOLATION)
        best = market.best_price(1 - order.side)
        crosses = best is not None and self._crosses(order.side, new_price, best)
        if crosses and order.tif == TIF_POST_ONLY:
            return self._reject(REASON_POST_ONLY_WOULD_TAKE)
        if new_price != order.price_ticks and self._level_full(market, order.side, new_price):
            return self._reject(REASON_TOO_MANY_ORDERS)
        grow = new_qty - order.remaining_lots
        if grow > 0:
            err = self._exposure_error(order.account, order.market, market, pos,
                                       grow if order.side == SIDE_BUY else 0,
                                       grow if order.side == SIDE_SELL else 0,
                                       not order.reduce_only)
            if err:
                return self._reject(err)

        self._order_event(EV_AMENDED, order.market, order.account, req=c["req"],
                          status=STATUS_OPEN, side=order.side, kind=order.kind, oid=order.oid,
                          cid=order.cid, price_ticks=new_price, qty_lots=new_qty,
                          remaining_lots=new_qty)
        if new_price == order.price_ticks and grow <= 0:
            self._shrink(order, new_qty)   # keeps its place in the queue
            return
        self._unrest(order)
        order.price_ticks = new_price
        order.remaining_lots = new_qty
        self._take_then_rest(order.market, market, order, new_price)

    _handlers = {
        CMD_CREATE_MARKET: _create_market,
        CMD_SET_MARKET_LIMITS: _set_market_limits,
        CMD_DEPOSIT: _deposit,
        CMD_WITHDRAW: _withdraw,
        CMD_SET_MARK: _set_mark,
        CMD_NEW_ORDER: _new_order,
        CMD_CANCEL: _cancel,
        CMD_CANCEL_ALL: _cancel_all,
        CMD_AMEND: _amend,
        CMD_HALT: lambda self: self._halt(True),
        CMD_RESUME: lambda self: self._halt(False),
    }

    # ---- invariants (DESIGN.md §8) -----------------------------------------------------
    def check_invariants(self):
        for market_id, market in self.markets.items():
            bid, ask = market.best_price(SIDE_BUY), market.best_price(SIDE_SELL)
            assert bid is None or ask is None or bid < ask, f"book crossed in market {market_id}"
            assert sum(p.size_lots for (a, m), p in self.positions.items() if m == market_id) == 0
            for side in (SIDE_BUY, SIDE_SELL):
                for queue in market.levels[side].values():
                    oids = [o.oid for o in queue]
                    assert all(o.remaining_lots > 0 for o in queue)
                    assert len(oids) == len(set(oids))
        upnl = 0
        for (account, market_id), pos in self.positions.items():
            market = self.markets[market_id]
            upnl += pos.size_lots * market.mark_ticks * market.atoms_per_tick_lot - pos.cost_atoms
        assert (sum(self.balances) + upnl + self.fees_collected_atoms
                == self.net_deposits_atoms), "collateral not conserved"
