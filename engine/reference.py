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
- Stops and take-profits wait untriggered in their market's trigger book (no margin held),
  and fire after the mark or the last trade price reaches their trigger: one at a time,
  nearest trigger first, each entering as a new order with a fresh time priority; their
  trades can fire more within the same command.
"""

from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, field

from engine import numbers as num
from engine import risk
from engine.reports import NO_ACCOUNT, report_accounts
from engine.config import (ADL_MAX_COUNTERPARTIES, LIQUIDATION_MAX_STEPS, EngineConfig,
                           MAX_BALANCE_ATOMS, MAX_NET_DEPOSITS_ATOMS)
from engine.market_checks import (bracket_leverage, bracket_problem, market_config_problem,
                                  market_filters_problem, market_limits_problem,
                                  market_risk_problem)
from engine.records import *  # noqa: F403 — the codes are the vocabulary of this module


# The commands a client raises its own risk with: after each, the bracket invariant holds for
# the sending account (ReferenceMatcher.check_risk_raised; docs/risk.md).
RISK_RAISING_COMMANDS = (CMD_NEW_ORDER, CMD_AMEND, CMD_WITHDRAW, CMD_SET_MARGIN)


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
    state: int = MARKET_TRADING
    last_trade_ticks: int = 0                     # 0: no trade yet
    triggers: list = field(default_factory=list)  # untriggered orders, placement order
    # price -> FIFO of resting orders; prices kept sorted ascending per side
    levels: tuple = field(default_factory=lambda: ({}, {}))
    prices: tuple = field(default_factory=lambda: ([], []))
    resting: list = field(default_factory=lambda: [0, 0])
    levels_used: list = field(default_factory=lambda: [0, 0])
    liquidation_fee_e9: int = 0
    funding_cap_e9: int = 0
    brackets: list = field(default_factory=list)   # [(floor_atoms, rate_e9, amount_atoms)]
    leverage_caps: list = field(default_factory=list)   # each bracket's max leverage
    min_notional_atoms: int = 0                 # filters, 0: none (SET_MARKET_FILTERS)
    max_stop_orders: int = 0
    open_interest_cap_lots: int = 0

    @property
    def halted(self):
        """No order entry and no triggers: cancel_only, halted, settled."""
        return self.state in (MARKET_CANCEL_ONLY, MARKET_HALTED, MARKET_SETTLED)

    def entry_error(self, reduce_only):
        """Why the market's state refuses an order entering it (new or amended), or 0."""
        if self.max_price_ticks == 0 or self.state == MARKET_HALTED:
            return REASON_MARKET_HALTED
        if self.state == MARKET_CANCEL_ONLY:
            return REASON_MARKET_CANCEL_ONLY
        if self.state == MARKET_SETTLED:
            return REASON_MARKET_SETTLED
        if self.state == MARKET_REDUCE_ONLY and not reduce_only:
            return REASON_MARKET_REDUCE_ONLY
        return 0

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
    liquidation: bool = False    # the liquidation engine closing `account`: no taker fee
    trigger_ticks: int = 0
    trigger_by_last: bool = False
    untriggered: bool = False


@dataclass
class Position:
    size_lots: int = 0
    cost_atoms: int = 0
    open_buy_lots: int = 0
    open_sell_lots: int = 0
    open_orders: int = 0
    isolated_margin_atoms: int = 0
    leverage: int = 0            # 0: the market's max_leverage
    margin_mode: int = MARGIN_CROSS

    @property
    def isolated(self):
        return self.margin_mode == MARGIN_ISOLATED


class ReferenceMatcher:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.seq = 0
        self.next_oid = 1
        self.next_trade_id = 1
        self.markets: dict[int, Market] = {}
        self.balances = [0] * config.max_accounts
        self.account_seqs = [0] * config.max_accounts   # last account_seq per account
        self.disabled = set()          # accounts CMD_SET_ACCOUNT_STATE disabled
        self.positions: dict[tuple[int, int], Position] = {}
        # open orders: resting ones and untriggered stops / take-profits
        self.orders: dict[int, Order] = {}                 # oid -> order
        self.orders_of: dict[int, dict[int, Order]] = {}    # account -> oid -> order, placement order
        self.by_cid: dict[tuple[int, int], int] = {}       # (account, cid) -> oid
        self.fees_collected_atoms = 0
        self.net_deposits_atoms = 0
        self.insurance_atoms = 0
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
        self._number_reports()
        return self.events

    def _number_reports(self):
        """Advance each account's account_seq by the reports this command caused."""
        code = self.cmd["cmd"]
        for index, ev in enumerate(self.events[1:], start=1):
            for account in report_accounts(code, index, ev["etype"], ev["account"],
                                           ev.get("maker_account", NO_ACCOUNT),
                                           self.config.max_accounts):
                if account != NO_ACCOUNT:
                    self.account_seqs[account] += 1

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
        # a command's reject is its only event (engine/reports.py counts on it being first)
        assert len(self.events) == 1, "a command is rejected before anything happens"
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
    @staticmethod
    def _margin_per_lot(market, pos, exposure_lots, leverage=None):
        """Initial margin of one lot at the mark, at the position's leverage setting capped by
        the max leverage of the bracket that exposure_lots at the mark fall in."""
        return risk.initial_margin_per_lot_atoms(
            market.mark_ticks, market.atoms_per_tick_lot, risk.effective_leverage(
                pos.leverage if leverage is None else leverage, market.max_leverage,
                exposure_lots * market.mark_ticks * market.atoms_per_tick_lot,
                market.brackets, market.leverage_caps))

    def _requirement(self, market, pos, open_buy, open_sell, leverage=None):
        """Initial margin the cross balance must cover: the whole exposure of a cross position;
        for an isolated one what its open orders would drain from the balance (the position
        itself is backed by its isolated margin; risk.isolated_requirement_atoms)."""
        exposure = max(abs(pos.size_lots + open_buy), abs(pos.size_lots - open_sell))
        per_lot = self._margin_per_lot(market, pos, exposure, leverage)
        if pos.isolated:
            return risk.isolated_requirement_atoms(
                pos.size_lots, open_buy, open_sell,
                pos.isolated_margin_atoms + self._upnl(market, pos), per_lot)
        return exposure * per_lot

    @staticmethod
    def _upnl(market, pos):
        return pos.size_lots * market.mark_ticks * market.atoms_per_tick_lot - pos.cost_atoms

    def _cross_equity(self, account, skip_market=-1):
        """Balance plus the uPnL at mark of the cross positions (but skip_market's)."""
        equity = self.balances[account]
        for market_id in sorted(self.markets):
            pos = self.positions.get((account, market_id))
            if pos is not None and not pos.isolated and market_id != skip_market:
                equity += self._upnl(self.markets[market_id], pos)
        return equity

    def _equity_and_requirement(self, account, extra_market=-1, extra_buy=0, extra_sell=0,
                                extra_leverage=None):
        required = 0
        for market_id in sorted(self.markets):
            pos = self.positions.get((account, market_id))
            if pos is None:
                continue
            buy, sell = pos.open_buy_lots, pos.open_sell_lots
            leverage = None
            if market_id == extra_market:
                buy += extra_buy
                sell += extra_sell
                leverage = extra_leverage
            required += self._requirement(self.markets[market_id], pos, buy, sell, leverage)
        return self._cross_equity(account), required

    def _maintenance(self, market, pos):
        notional = abs(pos.size_lots) * market.mark_ticks * market.atoms_per_tick_lot
        return risk.maintenance_atoms(notional, market.brackets)

    def _liquidatable(self, account, scope):
        """scope -1: the account's cross positions; else its isolated position in that market."""
        if scope == -1:
            mm = 0
            has_position = False
            for market_id in sorted(self.markets):
                pos = self.positions.get((account, market_id))
                if pos is not None and not pos.isolated and pos.size_lots != 0:
                    has_position = True
                    mm += self._maintenance(self.markets[market_id], pos)
            return has_position and self._cross_equity(account) < mm
        pos = self.positions.get((account, scope))
        if pos is None or not pos.isolated or pos.size_lots == 0:
            return False
        market = self.markets[scope]
        return pos.isolated_margin_atoms + self._upnl(market, pos) < self._maintenance(market, pos)

    def _position_equity(self, account, market_id):
        """The equity behind one position: cross equity, or isolated margin + uPnL."""
        pos = self.positions[(account, market_id)]
        if pos.isolated:
            return pos.isolated_margin_atoms + self._upnl(self.markets[market_id], pos)
        return self._cross_equity(account)

    def _equity_other(self, account, market_id):
        """What backs a position besides its own PnL (the bankruptcy price's other side)."""
        pos = self.positions[(account, market_id)]
        if pos.isolated:
            return pos.isolated_margin_atoms
        return self._cross_equity(account, skip_market=market_id)

    def _exposure_error(self, account, market_id, market, pos, add_buy, add_sell, check_margin,
                        entry_cost=0):
        """Position limit, then margin, for adding open quantity; a reason code or 0.

        The position limit binds reduce-only orders too: it is what bounds every exposure
        (and so every int64 product) the margin arithmetic ever forms. entry_cost: what the
        order may cost at once beyond its margin (risk.entry_cost_atoms).
        """
        buy = pos.open_buy_lots + add_buy
        sell = pos.open_sell_lots + add_sell
        if max(abs(pos.size_lots + buy), abs(pos.size_lots - sell)) > market.max_position_lots:
            return REASON_POSITION_LIMIT
        if not check_margin:
            return 0
        equity, required = self._equity_and_requirement(account, market_id, add_buy, add_sell)
        if equity - required - entry_cost < 0:
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
        self._after_trading(c["market"], market, [])

    def _set_state(self, state):
        """HALT, RESUME and SET_MARKET_STATE (state in the command's kind)."""
        market = self._market(self.cmd["market"])
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        if state is None:
            state = self.cmd["kind"]
            if state > MARKET_HALTED:
                return self._reject(REASON_INVALID_MESSAGE)
        if market.state == MARKET_SETTLED:
            return self._reject(REASON_MARKET_SETTLED)
        market.state = state
        self._done()
        self._after_trading(self.cmd["market"], market, [])   # resume: held-back triggers

    def _settle_market(self):
        """Cancel every order of the market, close every position at the settlement price
        (the mark first becomes that price, so the payments are the uPnL at it: collateral is
        conserved), the fund covers a balance it leaves negative, and the market is settled."""
        c = self.cmd
        market_id, price = c["market"], c["price_ticks"]
        market = self._market(market_id)
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        if market.state == MARKET_SETTLED:
            return self._reject(REASON_MARKET_SETTLED)
        if not 1 <= price <= market.max_price_ticks:
            return self._reject(REASON_INVALID_PRICE)
        market.mark_ticks = price
        self._emit(EV_MARK, market_id, c["account"], req=c["req"], mark_ticks=price)
        market.state = MARKET_SETTLED
        for account in range(self.config.max_accounts):
            for order in list(self.orders_of.get(account, {}).values()):
                if order.market == market_id:
                    self._cancel_open(order, REASON_HALT)
        closed = 0
        for account in range(self.config.max_accounts):
            pos = self.positions.get((account, market_id))
            if pos is None or pos.size_lots == 0:
                continue
            size = pos.size_lots
            self._apply_fill(account, market_id, market, -size, price, 0)
            self._liquidation_event(market_id, account, LIQ_KIND_SETTLEMENT,
                                    SIDE_SELL if size > 0 else SIDE_BUY, abs(size), price, price,
                                    0, -1)
            self._cover_deficit(account, -1, 0)
            closed += 1
        self._done(closed)

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

    def _set_account_state(self):
        """Disable (qty_lots 1) or enable (0): a disabled account places, amends, withdraws and
        changes margin settings no more; its cancels, fills and liquidations go on."""
        c = self.cmd
        if not self._valid_account(c["account"]):
            return self._reject(REASON_UNKNOWN_ACCOUNT)
        if c["qty_lots"] not in (0, 1):
            return self._reject(REASON_INVALID_MESSAGE)
        if c["qty_lots"]:
            self.disabled.add(c["account"])
        else:
            self.disabled.discard(c["account"])
        self._done()

    def _withdraw(self):
        c = self.cmd
        account, amount = c["account"], c["amount_atoms"]
        if not self._valid_account(account):
            return self._reject(REASON_UNKNOWN_ACCOUNT)
        if account in self.disabled:
            return self._reject(REASON_ACCOUNT_DISABLED)
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
        pos = self._file(order)
        if order.side == SIDE_BUY:
            pos.open_buy_lots += order.remaining_lots
        else:
            pos.open_sell_lots += order.remaining_lots

    def _file(self, order):
        """An open order (resting or untriggered): its account's latest, findable by oid and
        cid, counted against the open-order limit. Returns its position."""
        self.orders[order.oid] = order
        self.orders_of.setdefault(order.account, {})[order.oid] = order
        self.by_cid[(order.account, order.cid)] = order.oid
        pos = self._position(order.account, order.market)
        pos.open_orders += 1
        return pos

    def _unfile(self, order):
        del self.orders[order.oid]
        del self.orders_of[order.account][order.oid]
        del self.by_cid[(order.account, order.cid)]
        pos = self._position(order.account, order.market)
        pos.open_orders -= 1
        return pos

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
        pos = self._unfile(order)
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

    @staticmethod
    def _toward_book(side, old_ticks, new_ticks):
        """Is new_ticks nearer the other side of the book than old_ticks (a bid up, an ask
        down)?"""
        return new_ticks > old_ticks if side == SIDE_BUY else new_ticks < old_ticks

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

    def _apply_fill(self, account, market_id, market, delta, price, fee):
        """A fill of delta lots (+: bought) at price: position, realized PnL and fee to the
        balance. An isolated position posts initial margin (at the mark and its leverage) from
        the balance for the lots it opens, as far as the balance holds it, and releases its
        margin's share of the lots it closes (all of it on a full close)."""
        pos = self._position(account, market_id)
        before = pos.size_lots
        pos.size_lots, pos.cost_atoms, realized = num.position_after_fill(
            pos.size_lots, pos.cost_atoms, delta, price, market.atoms_per_tick_lot)
        self.balances[account] += realized - fee
        if pos.isolated:
            closed = 0
            if before != 0 and (before > 0) != (delta > 0):
                closed = min(abs(delta), abs(before))
                release = num.cost_share(pos.isolated_margin_atoms, closed, abs(before))
                pos.isolated_margin_atoms -= release
                self.balances[account] += release
            opened = abs(delta) - closed
            if opened:
                # initial margin at the bracket of the new size, plus the loss the fill took
                # against the mark, or a top-up to the new size's initial margin if more (the
                # entry check covered all), so the position is at least at its initial margin;
                # but no more than the balance holds, so an isolated fill never leaves the
                # balance negative
                gap = (price - market.mark_ticks) if delta > 0 else (market.mark_ticks - price)
                per_lot = self._margin_per_lot(market, pos, abs(pos.size_lots))
                top_up = (abs(pos.size_lots) * per_lot - pos.isolated_margin_atoms
                          - self._upnl(market, pos))
                posted = min(max(opened * per_lot + opened * max(gap, 0)
                                 * market.atoms_per_tick_lot, top_up),
                             max(self.balances[account], 0))
                pos.isolated_margin_atoms += posted
                self.balances[account] -= posted

    def _trade(self, market_id, market, taker, maker, qty, touched):
        price = maker.price_ticks
        notional = price * qty * market.atoms_per_tick_lot
        taker_fee = 0 if taker.liquidation else num.fee_atoms(notional, market.taker_fee_e9)
        maker_fee = num.fee_atoms(notional, market.maker_fee_e9)
        for order, fee in ((taker, taker_fee), (maker, maker_fee)):
            self._apply_fill(order.account, market_id, market,
                             qty if order.side == SIDE_BUY else -qty, price, fee)
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
        self._emit(EV_TRADE, market_id, taker.account, req=self._req_for(taker.account),
                   side=taker.side, liquidation=int(taker.liquidation), trade_id=trade_id,
                   price_ticks=price, qty_lots=qty, oid=taker.oid,
                   cid=taker.cid, remaining_lots=taker.remaining_lots, fee_atoms=taker_fee,
                   maker_account=maker.account, maker_oid=maker.oid, maker_cid=maker.cid,
                   maker_remaining_lots=maker.remaining_lots, maker_fee_atoms=maker_fee)

    def _sweep_reduce_only(self, market_id, touched):
        """Cancel or shrink reduce-only orders that outgrew their account's position."""
        for account in touched:
            size = self._position(account, market_id).size_lots
            for order in list(self.orders_of.get(account, {}).values()):
                if not order.reduce_only or order.market != market_id or order.untriggered:
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

    def _take_then_rest(self, market_id, market, order, limit_ticks, touched):
        """Match an incoming (re-priced, triggered) order, then rest or cancel what is left.

        Returns the order's final status; appends the accounts whose position changed to
        `touched` (for _after_trading).
        """
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
        return status

    def _after_trading(self, market_id, market, touched):
        """Fire the triggers the command's prices set off, then sweep reduce-only orders of
        every account whose position it changed, once."""
        self._run_triggers(market_id, market, touched)
        self._sweep_reduce_only(market_id, touched)

    def _admit(self, market_id, market, account, side, tif, limit_ticks, stp, qty, reduce_only,
               market_kind):
        """Checks on entering the book, new or triggered: reduce-only (clips qty), post-only,
        open-interest cap, position limit and margin (with the entry cost: market_kind walks
        the book for it), FOK. Returns (reason or 0, qty)."""
        pos = self._position(account, market_id)
        if reduce_only:
            closing = -pos.size_lots if side == SIDE_BUY else pos.size_lots
            if closing <= 0:
                return REASON_REDUCE_ONLY_VIOLATION, qty
            qty = min(qty, closing)
        best = market.best_price(1 - side)
        if tif == TIF_POST_ONLY and best is not None and self._crosses(side, limit_ticks, best):
            return REASON_POST_ONLY_WOULD_TAKE, qty
        if not reduce_only:
            err = self._open_interest_error(market_id, market, pos, side, qty)
            if err:
                return err, qty
        err = self._exposure_error(account, market_id, market, pos,
                                   qty if side == SIDE_BUY else 0,
                                   qty if side == SIDE_SELL else 0, not reduce_only,
                                   self._entry_cost(market, account, side, limit_ticks, qty,
                                                    tif in (TIF_GTC, TIF_POST_ONLY),
                                                    market_kind))
        if err:
            return err, qty
        if tif == TIF_FOK and not self._fok_fillable(market, account, side, limit_ticks, stp, qty):
            return REASON_FOK_UNFILLED, qty
        return 0, qty

    def _worst_price(self, market, account, side, limit_ticks, qty, rests, walk):
        """The furthest price any lot of an order entering now can trade at; None when it
        cannot trade at all. A limit order's is its limit (when it rests or crosses). A market
        order (walk) has no limit of its own (the band's edge): its worst is the level where
        the crossing book holds qty lots (the account's own orders and reduce-only makers not
        counted, so the walk goes at least as deep as the match), else the deepest crossing
        level (the rest is canceled)."""
        opposite = 1 - side
        if not walk:
            best = market.best_price(opposite)
            takes = best is not None and self._crosses(side, limit_ticks, best)
            return limit_ticks if rests or takes else None
        prices = market.prices[opposite]
        walk = reversed(prices) if opposite == SIDE_BUY else iter(prices)
        total = 0
        worst = None
        for price in walk:
            if not self._crosses(side, limit_ticks, price):
                break
            worst = price
            total += sum(o.remaining_lots for o in market.levels[opposite][price]
                         if o.account != account and not o.reduce_only)
            if total >= qty:
                return price
        return limit_ticks if rests else worst

    def _entry_cost(self, market, account, side, limit_ticks, qty, rests, walk=False):
        """risk.entry_cost_atoms of an order entering the book now."""
        best = market.best_price(1 - side)
        takes = best is not None and self._crosses(side, limit_ticks, best)
        worst = self._worst_price(market, account, side, limit_ticks, qty, rests, walk)
        if worst is None:
            return 0
        fee_price = worst if side == SIDE_BUY else (best if takes else limit_ticks)
        return risk.entry_cost_atoms(side, worst, qty, market.mark_ticks, fee_price,
                                     market.atoms_per_tick_lot, market.taker_fee_e9, takes)

    # ---- the trigger book --------------------------------------------------------------
    @staticmethod
    def _rises(order_kind, side):
        """Buy stops and sell take-profits fire when the price rises to the trigger."""
        return (order_kind in (KIND_STOP_MARKET, KIND_STOP_LIMIT)) == (side == SIDE_BUY)

    @staticmethod
    def _watched_price(market, by_last):
        return market.last_trade_ticks if by_last else market.mark_ticks

    def _holds(self, rises, trigger_ticks, price_ticks):
        if price_ticks == 0:          # no last trade yet: nothing fires
            return False
        return price_ticks >= trigger_ticks if rises else price_ticks <= trigger_ticks

    def _next_to_fire(self, market):
        """Mark-triggered before last-triggered, rises before falls, the trigger nearest the
        old price first (lowest for a rise, highest for a fall), then placement order."""
        for by_last in (False, True):
            price = self._watched_price(market, by_last)
            for rises in (True, False):
                due = [o for o in market.triggers
                       if o.trigger_by_last == by_last and self._rises(o.kind, o.side) == rises
                       and self._holds(rises, o.trigger_ticks, price)]
                if due:
                    return min(due, key=lambda o: (o.trigger_ticks if rises else -o.trigger_ticks,
                                                   o.oid))
        return None

    def _unpark(self, order):
        self.markets[order.market].triggers.remove(order)
        self._unfile(order)
        order.untriggered = False

    def _run_triggers(self, market_id, market, touched):
        if market.halted:
            return
        while (order := self._next_to_fire(market)) is not None:
            self._fire(market_id, market, order, touched)

    def _fire(self, market_id, market, order, touched):
        """A fired order enters as a new order (market or limit, its own tif) behind every
        order already resting at its price."""
        self._unpark(order)
        req = self._req_for(order.account)
        triggered = self._order_event(EV_TRIGGERED, market_id, order.account, req=req,
                                      status=STATUS_CANCELED, side=order.side, kind=order.kind,
                                      oid=order.oid, cid=order.cid,
                                      price_ticks=order.price_ticks,
                                      qty_lots=order.remaining_lots)
        err, qty = 0, order.remaining_lots
        if order.kind in (KIND_STOP_MARKET, KIND_TAKE_PROFIT_MARKET):
            limit = self._band_limit(market, order.side)
        else:
            limit = order.price_ticks
            if self._outside_band(market, limit):
                err = REASON_PRICE_BAND
        if not err and market.state == MARKET_REDUCE_ONLY and not order.reduce_only:
            err = REASON_MARKET_REDUCE_ONLY
        if (not err and order.tif in (TIF_GTC, TIF_POST_ONLY)
                and self._level_full(market, order.side, limit)):
            err = REASON_TOO_MANY_ORDERS
        if not err:
            err, qty = self._admit(market_id, market, order.account, order.side, order.tif,
                                   limit, order.stp, qty, order.reduce_only,
                                   order.kind in (KIND_STOP_MARKET, KIND_TAKE_PROFIT_MARKET))
        if err == REASON_REDUCE_ONLY_VIOLATION:
            return self._canceled(order, REASON_REDUCE_ONLY, qty)
        if err:
            return self._order_event(EV_REJECT, market_id, order.account, req=req, reason=err,
                                     side=order.side, kind=order.kind, oid=order.oid,
                                     cid=order.cid)
        order.remaining_lots = qty
        triggered["qty_lots"] = qty
        triggered["status"] = self._take_then_rest(market_id, market, order, limit, touched)
        if triggered["status"] == STATUS_OPEN:
            triggered["remaining_lots"] = order.remaining_lots

    # ---- order commands ----------------------------------------------------------------
    def _new_order(self):
        c = self.cmd
        account, market_id, side, kind, tif = c["account"], c["market"], c["side"], c["kind"], c["tif"]
        market = self._market(market_id)
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        if not self._valid_account(account):
            return self._reject(REASON_UNKNOWN_ACCOUNT)
        if account in self.disabled:
            return self._reject(REASON_ACCOUNT_DISABLED)
        conditional = kind in (KIND_STOP_MARKET, KIND_STOP_LIMIT, KIND_TAKE_PROFIT_MARKET,
                               KIND_TAKE_PROFIT_LIMIT)
        market_kind = kind in (KIND_MARKET, KIND_STOP_MARKET, KIND_TAKE_PROFIT_MARKET)
        flags_allowed = FLAG_REDUCE_ONLY | (FLAG_TRIGGER_BY_LAST if conditional else 0)
        if (side > SIDE_SELL or kind > KIND_TAKE_PROFIT_LIMIT or tif > TIF_POST_ONLY
                or c["stp"] > STP_CANCEL_BOTH or c["flags"] & ~flags_allowed
                or (market_kind and tif == TIF_POST_ONLY)):
            return self._reject(REASON_INVALID_MESSAGE)
        if market_kind and tif == TIF_GTC:
            tif = TIF_IOC
        err = market.entry_error(bool(c["flags"] & FLAG_REDUCE_ONLY))
        if err:
            return self._reject(err)
        qty = c["qty_lots"]
        if not 1 <= qty <= market.max_order_lots:
            return self._reject(REASON_INVALID_QTY)
        if market_kind:
            price = 0
            limit = self._band_limit(market, side)
        else:
            price = c["price_ticks"]
            if not 1 <= price <= market.max_price_ticks:
                return self._reject(REASON_INVALID_PRICE)
            # a conditional limit order meets the band when it fires, against the mark of then
            if not conditional and self._outside_band(market, price):
                return self._reject(REASON_PRICE_BAND)
            limit = price
        trigger = c["amount_atoms"]
        by_last = bool(c["flags"] & FLAG_TRIGGER_BY_LAST)
        if conditional and (not 1 <= trigger <= market.max_price_ticks or self._holds(
                self._rises(kind, side), trigger, self._watched_price(market, by_last))):
            return self._reject(REASON_INVALID_PRICE)   # Binance: "would immediately trigger"
        reduce_only = bool(c["flags"] & FLAG_REDUCE_ONLY)
        # Binance's MIN_NOTIONAL: at the order's price, a market kind's at the mark; an order
        # that only reduces is exempt
        if not reduce_only and qty * (price or market.mark_ticks) * market.atoms_per_tick_lot \
                < market.min_notional_atoms:
            return self._reject(REASON_MIN_NOTIONAL)
        if (account, c["cid"]) in self.by_cid:
            return self._reject(REASON_DUPLICATE_CID)
        pos = self._position(account, market_id)
        if conditional:
            if market.max_stop_orders and sum(
                    o.account == account for o in market.triggers) >= market.max_stop_orders:
                return self._reject(REASON_TOO_MANY_STOP_ORDERS)
            if (pos.open_orders >= market.max_open_orders
                    or len(self.orders) >= self.config.max_orders
                    or len(market.triggers) >= self.config.max_trigger_orders):
                return self._reject(REASON_TOO_MANY_ORDERS)
            order = Order(oid=self.next_oid, cid=c["cid"], account=account, market=market_id,
                          side=side, kind=kind, tif=tif, reduce_only=reduce_only, stp=c["stp"],
                          price_ticks=price, remaining_lots=qty, trigger_ticks=trigger,
                          trigger_by_last=by_last, untriggered=True)
            self.next_oid += 1
            market.triggers.append(order)
            self._file(order)
            self._order_event(EV_ACK, market_id, account, req=c["req"],
                              status=STATUS_UNTRIGGERED, side=side, kind=kind, oid=order.oid,
                              cid=order.cid, price_ticks=price, qty_lots=qty, remaining_lots=qty)
            return
        if tif in (TIF_GTC, TIF_POST_ONLY) and (
                pos.open_orders >= market.max_open_orders
                or len(self.orders) >= self.config.max_orders
                or self._level_full(market, side, price)):
            return self._reject(REASON_TOO_MANY_ORDERS)
        err, qty = self._admit(market_id, market, account, side, tif, limit, c["stp"], qty,
                               reduce_only, market_kind)
        if err:
            return self._reject(err)

        order = Order(oid=self.next_oid, cid=c["cid"], account=account, market=market_id,
                      side=side, kind=kind, tif=tif, reduce_only=reduce_only, stp=c["stp"],
                      price_ticks=price, remaining_lots=qty)
        self.next_oid += 1
        ack = self._order_event(EV_ACK, market_id, account, req=c["req"], side=side, kind=kind,
                                oid=order.oid, cid=order.cid, price_ticks=price, qty_lots=qty)
        touched = []
        ack["status"] = self._take_then_rest(market_id, market, order, limit, touched)
        ack["remaining_lots"] = order.remaining_lots if ack["status"] == STATUS_OPEN else 0
        self._after_trading(market_id, market, touched)

    def _cancel_open(self, order, reason):
        """Cancel a resting or an untriggered order."""
        if order.untriggered:
            self._unpark(order)
        else:
            self._unrest(order)
        self._canceled(order, reason, order.remaining_lots)

    def _cancel(self):
        c = self.cmd
        order = self._find_order(c["account"], c["oid"], c["cid"])
        if order is None:
            return self._reject(REASON_UNKNOWN_ORDER)
        self._cancel_open(order, REASON_USER)

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
                self._cancel_open(order, REASON_USER)
                count += 1
        self._done(count)

    def _amend(self):
        c = self.cmd
        order = self._find_order(c["account"], c["oid"], c["cid"])
        if order is None:
            return self._reject(REASON_UNKNOWN_ORDER)
        if c["account"] in self.disabled:
            return self._reject(REASON_ACCOUNT_DISABLED)
        market = self.markets[order.market]
        new_price = c["price_ticks"] or order.price_ticks
        new_qty = c["qty_lots"] or order.remaining_lots
        # an untriggered order is not amended: cancel and place it again
        if (c["price_ticks"] == 0 and c["qty_lots"] == 0) or order.untriggered:
            return self._reject(REASON_INVALID_MESSAGE)
        err = market.entry_error(order.reduce_only)
        if err:
            return self._reject(err)
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
        elif new_qty * new_price * market.atoms_per_tick_lot < market.min_notional_atoms:
            return self._reject(REASON_MIN_NOTIONAL)
        elif new_qty > order.remaining_lots and self._open_interest_error(
                order.market, market, pos, order.side, new_qty):
            return self._reject(REASON_OPEN_INTEREST_CAP)
        best = market.best_price(1 - order.side)
        crosses = best is not None and self._crosses(order.side, new_price, best)
        if crosses and order.tif == TIF_POST_ONLY:
            return self._reject(REASON_POST_ONLY_WOULD_TAKE)
        if new_price != order.price_ticks and self._level_full(market, order.side, new_price):
            return self._reject(REASON_TOO_MANY_ORDERS)
        grow = new_qty - order.remaining_lots
        if grow > 0 or self._toward_book(order.side, order.price_ticks, new_price):
            # more lots, or a price nearer the other side (its loss against the mark and the
            # taker fee when it crosses can only grow): checked as a new order. Moved away
            # with no more lots, the order's risk only falls: not checked, as a shrink is not
            grow = max(grow, 0)
            err = self._exposure_error(order.account, order.market, market, pos,
                                       grow if order.side == SIDE_BUY else 0,
                                       grow if order.side == SIDE_SELL else 0,
                                       not order.reduce_only,
                                       self._entry_cost(market, order.account, order.side,
                                                        new_price, new_qty,
                                                        order.tif in (TIF_GTC, TIF_POST_ONLY)))
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
        touched = []
        self._take_then_rest(order.market, market, order, new_price, touched)
        self._after_trading(order.market, market, touched)

    # ---- perpetual risk (docs/risk.md) ---------------------------------------------------
    def _set_market_risk(self):
        c = self.cmd
        market = self._market(c["market"])
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        if market_risk_problem(c["cid"], c["oid"]):
            return self._reject(REASON_INVALID_MARKET_CONFIG)
        market.liquidation_fee_e9 = c["cid"]
        market.funding_cap_e9 = c["oid"]
        self._done()

    def _set_market_filters(self):
        c = self.cmd
        market = self._market(c["market"])
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        if market_filters_problem(c["amount_atoms"], c["qty_lots"], c["price_ticks"]):
            return self._reject(REASON_INVALID_MARKET_CONFIG)
        market.min_notional_atoms = c["amount_atoms"]
        market.max_stop_orders = c["qty_lots"]
        market.open_interest_cap_lots = c["price_ticks"]
        self._done()

    def open_interest_lots(self, market_id):
        """The market's open interest: the sum of its long positions (= of its shorts)."""
        return sum(p.size_lots for (a, m), p in self.positions.items()
                   if m == market_id and p.size_lots > 0)

    def _open_interest_error(self, market_id, market, pos, side, qty):
        """An order that would open lots (beyond closing its account's position) while they
        would raise the open interest above the cap is refused; closing lots always pass."""
        if market.open_interest_cap_lots == 0:
            return 0
        opening = qty - max(-pos.size_lots if side == SIDE_BUY else pos.size_lots, 0)
        if opening > 0 and (self.open_interest_lots(market_id) + opening
                            > market.open_interest_cap_lots):
            return REASON_OPEN_INTEREST_CAP
        return 0

    def _set_bracket(self):
        c = self.cmd
        market = self._market(c["market"])
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        index, floor_atoms, rate_e9 = c["kind"], c["amount_atoms"], c["price_ticks"]
        prev_floor, prev_rate, prev_amount = market.brackets[-1] if market.brackets else (0, 0, 0)
        prev_leverage = market.leverage_caps[-1] if market.leverage_caps else market.max_leverage
        leverage = bracket_leverage(c["qty_lots"], rate_e9, prev_leverage)
        if bracket_problem(len(market.brackets), index, floor_atoms, rate_e9, prev_floor,
                           prev_rate, market.max_leverage, leverage, prev_leverage):
            return self._reject(REASON_INVALID_MARKET_CONFIG)
        amount = prev_amount + num.mul_div_floor(floor_atoms, rate_e9 - prev_rate,
                                                 num.RATE_ONE_E9)
        market.brackets.append((floor_atoms, rate_e9, amount))
        market.leverage_caps.append(leverage)
        self._done()

    def _set_margin(self):
        c = self.cmd
        account, market_id, mode, leverage = c["account"], c["market"], c["kind"], c["qty_lots"]
        market = self._market(market_id)
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        if not self._valid_account(account):
            return self._reject(REASON_UNKNOWN_ACCOUNT)
        if account in self.disabled:
            return self._reject(REASON_ACCOUNT_DISABLED)
        if mode not in (MARGIN_CROSS, MARGIN_ISOLATED):
            return self._reject(REASON_INVALID_MESSAGE)
        pos = self._position(account, market_id)
        # not above the max leverage of the bracket the current position falls in
        if not 1 <= leverage <= risk.effective_leverage(
                0, market.max_leverage,
                abs(pos.size_lots) * market.mark_ticks * market.atoms_per_tick_lot,
                market.brackets, market.leverage_caps):
            return self._reject(REASON_LEVERAGE)
        if mode != pos.margin_mode and (pos.size_lots != 0 or pos.open_orders != 0):
            return self._reject(REASON_MARGIN_MODE_LOCKED)
        # Only a change that raises the requirement can be refused: lowering it always helps.
        equity, required = self._equity_and_requirement(account)
        _, new_required = self._equity_and_requirement(account, market_id, 0, 0, leverage)
        if new_required > required and equity - new_required < 0:
            return self._reject(REASON_INSUFFICIENT_MARGIN)
        pos.margin_mode = mode
        pos.leverage = leverage
        self._done()

    def _funding(self):
        c = self.cmd
        market_id, rate = c["market"], c["oid"]
        market = self._market(market_id)
        if market is None:
            return self._reject(REASON_UNKNOWN_MARKET)
        if abs(rate) > market.funding_cap_e9:
            return self._reject(REASON_FUNDING_CAP)
        count = residue = 0
        for account in range(self.config.max_accounts):
            pos = self.positions.get((account, market_id))
            if pos is None or pos.size_lots == 0:
                continue
            notional = abs(pos.size_lots) * market.mark_ticks * market.atoms_per_tick_lot
            if (pos.size_lots > 0) == (rate > 0):
                payment = -num.mul_div_ceil(notional, abs(rate), num.RATE_ONE_E9)
            else:
                payment = num.mul_div_floor(notional, abs(rate), num.RATE_ONE_E9)
            residue -= payment
            if pos.isolated:
                pos.isolated_margin_atoms += payment
                after = pos.isolated_margin_atoms
            else:
                self.balances[account] += payment
                after = self.balances[account]
            self._emit(EV_FUNDING, market_id, account, req=self._req_for(account), rate_e9=rate,
                       size_lots=pos.size_lots, mark_ticks=market.mark_ticks,
                       payment_atoms=payment, balance_atoms=after)
            count += 1
        self._insure(INSURANCE_FUNDING_RESIDUE, residue, market_id, c["account"])
        self._done(count)

    def _insurance_deposit(self):
        c = self.cmd
        amount = c["amount_atoms"]
        if (amount < 1 or amount > MAX_BALANCE_ATOMS - self.insurance_atoms
                or amount > MAX_NET_DEPOSITS_ATOMS - self.net_deposits_atoms):
            return self._reject(REASON_INVALID_MESSAGE)
        self.net_deposits_atoms += amount
        self._insure(INSURANCE_DEPOSIT, amount, c["market"], c["account"])
        self._done()

    def _insure(self, reason, amount, market_id, account):
        """Change the insurance fund by amount (an event unless 0)."""
        if amount == 0:
            return
        self.insurance_atoms += amount
        self._emit(EV_INSURANCE, market_id, account, req=self._req_for(account), reason=reason,
                   amount_atoms=amount, fund_atoms=self.insurance_atoms)

    def _cover_deficit(self, account, scope, balance_before):
        """The fund pays what it can of the realized loss the liquidation left: the negative
        balance (cross), or what an isolated position's closing took from the balance beyond
        its margin (the balance's change since balance_before); never more than the scope's
        negative equity (an open rest with a profit pays first). Credited to the balance."""
        realized = self.balances[account] - (balance_before if scope != -1 else 0)
        if scope == -1:
            equity = self._cross_equity(account)
        else:
            pos = self._position(account, scope)
            equity = (pos.isolated_margin_atoms + self._upnl(self.markets[scope], pos)
                      + self.balances[account] - balance_before)
        cover = min(-realized, -equity, self.insurance_atoms)
        if cover <= 0:
            return
        self._insure(INSURANCE_DEFICIT, -cover, scope, account)
        self.balances[account] += cover
        self._emit(EV_BALANCE, scope, account, req=self._req_for(account), amount_atoms=cover,
                   balance_atoms=self.balances[account])

    def _bankruptcy_limit(self, account, market_id):
        market = self.markets[market_id]
        pos = self.positions[(account, market_id)]
        price = risk.bankruptcy_price_ticks(self._equity_other(account, market_id),
                                            pos.size_lots, pos.cost_atoms,
                                            market.atoms_per_tick_lot)
        return min(max(price, 1), market.max_price_ticks)

    def _liquidation_event(self, market_id, account, kind, side, qty, price, bankrupt, fee,
                           counterparty):
        self._emit(EV_LIQUIDATION, market_id, account, req=self._req_for(account), kind=kind,
                   side=side, qty_lots=qty, price_ticks=price, bankruptcy_ticks=bankrupt,
                   fee_atoms=fee, counterparty=counterparty,
                   size_lots=self._position(account, market_id).size_lots)

    def _liquidate(self):
        c = self.cmd
        account, scope = c["account"], c["market"]
        if not self._valid_account(account):
            return self._reject(REASON_UNKNOWN_ACCOUNT)
        if scope != -1 and scope not in self.markets:
            return self._reject(REASON_UNKNOWN_MARKET)
        if not self._liquidatable(account, scope):
            return self._reject(REASON_NOT_LIQUIDATABLE)
        for order in list(self.orders_of.get(account, {}).values()):
            if scope == -1 or order.market == scope:
                self._cancel_open(order, REASON_LIQUIDATION)
        balance_before = self.balances[account]
        if scope == -1:
            targets = [m for m in sorted(self.markets)
                       if (account, m) in self.positions
                       and not self.positions[(account, m)].isolated
                       and self.positions[(account, m)].size_lots != 0]
        else:
            targets = [scope]
        closed = 0
        for market_id in targets:
            touched = []
            closed += self._liquidate_position(account, market_id, scope, touched,
                                               balance_before)
            # its trades moved the last price: the market's triggers may fire, then the sweep
            self._after_trading(market_id, self.markets[market_id], touched)
        self._cover_deficit(account, scope, balance_before)
        self._done(closed)

    def _liquidate_position(self, account, market_id, scope, touched, balance_before):
        """Close into the book by IOC steps at the bankruptcy price while the scope stays
        liquidatable; when the book takes no more, the fund covers the realized loss so far,
        and the rest is auto-deleveraged. Returns the lots closed."""
        market = self.markets[market_id]
        pos = self.positions[(account, market_id)]
        closed = 0
        for _ in range(LIQUIDATION_MAX_STEPS):
            if pos.size_lots == 0 or not self._liquidatable(account, scope):
                return closed
            bankrupt = self._bankruptcy_limit(account, market_id)
            side = SIDE_SELL if pos.size_lots > 0 else SIDE_BUY
            qty = min(abs(pos.size_lots), market.max_order_lots)
            taker = Order(oid=0, cid=0, account=account, market=market_id, side=side,
                          kind=KIND_LIMIT, tif=TIF_IOC, reduce_only=False, stp=STP_CANCEL_MAKER,
                          price_ticks=bankrupt, remaining_lots=qty, liquidation=True)
            balance_before = self.balances[account]
            self._match(market_id, market, taker, bankrupt, touched)
            filled = qty - taker.remaining_lots
            if filled == 0:
                self._cover_deficit(account, scope, balance_before)
                return closed + self._auto_deleverage(account, market_id, touched)
            closed += filled
            # the equity the fee may take: an isolated position's closed part was paid out to
            # the balance (released margin and realized PnL)
            if scope == -1:
                equity = self._cross_equity(account)
            else:
                equity = (pos.isolated_margin_atoms + self._upnl(market, pos)
                          + self.balances[account] - balance_before)
            fee = min(num.fee_atoms(filled * market.mark_ticks * market.atoms_per_tick_lot,
                                    market.liquidation_fee_e9), max(equity, 0))
            self.balances[account] -= fee
            self._liquidation_event(market_id, account, LIQ_KIND_LIQUIDATED, side, filled,
                                    market.last_trade_ticks, bankrupt, fee, -1)
            self._insure(INSURANCE_LIQUIDATION_FEE, fee, market_id, account)
        return closed

    def _auto_deleverage(self, account, market_id, touched):
        """Close the position at its bankruptcy price against the best-ranked opposite
        positions (BitMEX), at most ADL_MAX_COUNTERPARTIES of them."""
        market = self.markets[market_id]
        pos = self.positions[(account, market_id)]
        bankrupt = self._bankruptcy_limit(account, market_id)
        closed = 0
        for _ in range(ADL_MAX_COUNTERPARTIES):
            if pos.size_lots == 0:
                break
            other = self._adl_counterparty(account, market_id, pos.size_lots)
            if other is None:
                break
            other_pos = self.positions[(other, market_id)]
            qty = min(abs(pos.size_lots), abs(other_pos.size_lots))
            delta = -qty if pos.size_lots > 0 else qty
            self._apply_fill(account, market_id, market, delta, bankrupt, 0)
            self._apply_fill(other, market_id, market, -delta, bankrupt, 0)
            if other not in touched:
                touched.append(other)
            side = SIDE_BUY if delta > 0 else SIDE_SELL
            self._liquidation_event(market_id, account, LIQ_KIND_ADL, side, qty, bankrupt,
                                    bankrupt, 0, other)
            self._liquidation_event(market_id, other, LIQ_KIND_ADL, 1 - side, qty, bankrupt,
                                    bankrupt, 0, account)
            closed += qty
        return closed

    def _adl_counterparty(self, account, market_id, size_lots):
        market = self.markets[market_id]
        best = None
        for other in range(self.config.max_accounts):
            pos = self.positions.get((other, market_id))
            if other == account or pos is None or pos.size_lots == 0 or (
                    (pos.size_lots > 0) == (size_lots > 0)):
                continue
            score = risk.adl_score(
                self._upnl(market, pos), pos.cost_atoms,
                abs(pos.size_lots) * market.mark_ticks * market.atoms_per_tick_lot,
                self._position_equity(other, market_id))
            if best is None or score > best[0]:
                best = (score, other)
        return None if best is None else best[1]

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
        CMD_HALT: lambda self: self._set_state(MARKET_HALTED),
        CMD_RESUME: lambda self: self._set_state(MARKET_TRADING),
        CMD_SET_MARKET_STATE: lambda self: self._set_state(None),
        CMD_SETTLE_MARKET: _settle_market,
        CMD_SET_MARKET_RISK: _set_market_risk,
        CMD_SET_BRACKET: _set_bracket,
        CMD_SET_MARGIN: _set_margin,
        CMD_FUNDING: _funding,
        CMD_LIQUIDATE: _liquidate,
        CMD_SET_ACCOUNT_STATE: _set_account_state,
        CMD_INSURANCE_DEPOSIT: _insurance_deposit,
        CMD_SET_MARKET_FILTERS: _set_market_filters,
    }

    # ---- invariants (DESIGN.md §8) -----------------------------------------------------
    def risk_snapshot(self, account):
        """What check_risk_raised compares against: the account's positions and balance."""
        return ({m: p.size_lots for (a, m), p in self.positions.items() if a == account},
                self.balances[account])

    def check_risk_raised(self, account, before):
        """The bracket invariant (docs/risk.md): a command that raised the account's risk (a
        position grew or flipped, or its balance fell by a withdrawal) leaves each scope it
        raised with equity at the mark above its maintenance margin. Returns the violations."""
        sizes, balance = before
        raised = set()
        for (a, m), pos in self.positions.items():
            old = sizes.get(m, 0)
            if a == account and (abs(pos.size_lots) > abs(old) or pos.size_lots * old < 0):
                raised.add(m if pos.isolated else -1)
        if self.balances[account] < balance and self.cmd["cmd"] == CMD_WITHDRAW:
            raised.add(-1)
        problems = []
        for scope in sorted(raised):
            if scope == -1:
                equity = self._cross_equity(account)
                mm = sum(self._maintenance(self.markets[m], p)
                         for (a, m), p in self.positions.items()
                         if a == account and not p.isolated and p.size_lots != 0)
            else:
                pos = self.positions[(account, scope)]
                equity = pos.isolated_margin_atoms + self._upnl(self.markets[scope], pos)
                mm = self._maintenance(self.markets[scope], pos)
            if mm > 0 and equity <= mm:
                problems.append(f"seq {self.seq}: account {account} scope {scope} raised its "
                                f"risk to equity {equity} <= maintenance {mm}")
        return problems

    def check_invariants(self):
        for market_id, market in self.markets.items():
            bid, ask = market.best_price(SIDE_BUY), market.best_price(SIDE_SELL)
            assert bid is None or ask is None or bid < ask, f"book crossed in market {market_id}"
            assert sum(p.size_lots for (a, m), p in self.positions.items() if m == market_id) == 0
            # the cap is set at genesis: trades never raise the open interest above it
            assert (not market.open_interest_cap_lots
                    or self.open_interest_lots(market_id) <= market.open_interest_cap_lots)
            for side in (SIDE_BUY, SIDE_SELL):
                for queue in market.levels[side].values():
                    oids = [o.oid for o in queue]
                    assert all(o.remaining_lots > 0 for o in queue)
                    assert len(oids) == len(set(oids))
        held = 0
        for (account, market_id), pos in self.positions.items():
            held += self._upnl(self.markets[market_id], pos) + pos.isolated_margin_atoms
            assert pos.size_lots != 0 or pos.isolated_margin_atoms == 0 or not pos.isolated
        assert (sum(self.balances) + held + self.fees_collected_atoms + self.insurance_atoms
                == self.net_deposits_atoms), "collateral not conserved"
