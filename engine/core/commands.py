"""The handlers of market, account and order commands: create a market, limits, mark, halt and
resume, deposit, withdraw, account state, new order (plain and conditional), cancel, cancel
all, amend.

Each checks first and rejects, changing nothing, or applies the rule of engine/reference.py
of the same name. May touch any table, through the files below it.
"""

from engine.config import MAX_BALANCE_ATOMS, MAX_NET_DEPOSITS_ATOMS
from engine.market_checks import market_config_problem, market_limits_problem
from engine.records import (EV_ACK, EV_AMENDED, EV_BALANCE, EV_MARK, FLAG_REDUCE_ONLY,
                            FLAG_TRIGGER_BY_LAST, KIND_STOP_MARKET, KIND_TAKE_PROFIT_LIMIT,
                            MARKET_CANCEL_ONLY, MARKET_HALTED, MARKET_REDUCE_ONLY, MARKET_SETTLED,
                            REASON_ACCOUNT_DISABLED, REASON_DUPLICATE_CID,
                            REASON_INSUFFICIENT_BALANCE, REASON_INSUFFICIENT_MARGIN,
                            REASON_INVALID_MARKET_CONFIG, REASON_INVALID_MESSAGE,
                            REASON_INVALID_PRICE, REASON_INVALID_QTY, REASON_MARKET_CANCEL_ONLY,
                            REASON_MARKET_EXISTS, REASON_MARKET_HALTED, REASON_MARKET_REDUCE_ONLY,
                            REASON_MARKET_SETTLED, REASON_MIN_NOTIONAL, REASON_OPEN_INTEREST_CAP,
                            REASON_POST_ONLY_WOULD_TAKE, REASON_PRICE_BAND,
                            REASON_REDUCE_ONLY_VIOLATION, REASON_TOO_MANY_ORDERS,
                            REASON_TOO_MANY_STOP_ORDERS, REASON_UNKNOWN_ACCOUNT,
                            REASON_UNKNOWN_MARKET, REASON_UNKNOWN_ORDER, REASON_USER, SIDE_BUY,
                            SIDE_SELL, STATUS_OPEN, STATUS_UNTRIGGERED, STP_CANCEL_BOTH, TIF_GTC,
                            TIF_IOC, TIF_POST_ONLY)
from engine.state import C_NET_DEPOSITS_ATOMS, C_NEXT_OID, C_ORDERS_USED, C_SEQ, NONE, UNTRIGGERED
from engine.core.tables import (_accounts, _balance_events, _counters, _levels,
                                _mark_events, _markets, _order_events, _orders, _positions,
                                _trigger_keys, jit)
from engine.core.indexes import _slot_of_cid, _slot_of_oid
from engine.core.events import _canceled, _claim, _done, _order_event, _reject, _req_for
from engine.core.book_sides import _best_level, _level_full
from engine.core.orders import _alloc_order, _cancel_resting, _free_order, _shrink, _unrest
from engine.core.margin import (NO_LEVERAGE_CAP, _band_limit, _closing_lots, _crosses,
                                _entry_cost, _equity_and_requirement, _exposure_error,
                                _open_interest_error, _outside_band, _set_mark_ticks,
                                _untriggered_of)
from engine.core.matching import _admit, _take_then_rest
from engine.core.triggers import (_after_trading, _is_market_kind, _park, _trigger_holds,
                                  _trigger_key, _trigger_price, _trigger_queue, _unpark)


@jit
def _market_ok(st, market):
    return 0 <= market < len(_markets(st)) and _markets(st)[market].active != 0


@jit
def _account_ok(st, account):
    return 0 <= account < len(_accounts(st))


@jit
def _create_market(st, cmd):
    m = cmd.market
    if not 0 <= m < len(_markets(st)):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if _markets(st)[m].active != 0:
        return _reject(st, cmd, REASON_MARKET_EXISTS)
    if market_config_problem(cmd.amount_atoms, cmd.price_ticks, cmd.cid, cmd.oid, cmd.qty_lots,
                             cmd.account) != 0:
        return _reject(st, cmd, REASON_INVALID_MARKET_CONFIG)
    mk = _markets(st)[m]
    mk.active = 1
    mk.atoms_per_tick_lot = cmd.amount_atoms
    mk.maker_fee_e9 = cmd.cid
    mk.taker_fee_e9 = cmd.oid
    mk.price_band_e9 = cmd.qty_lots
    mk.max_leverage = cmd.account
    mk.full_leverage_below_atoms = NO_LEVERAGE_CAP
    _set_mark_ticks(mk, cmd.price_ticks)
    _done(st, cmd, 0)


@jit
def _set_market_limits(st, cmd):
    if not _market_ok(st, cmd.market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    mk = _markets(st)[cmd.market]
    if mk.max_price_ticks > 0 or market_limits_problem(
            mk.atoms_per_tick_lot, mk.mark_ticks, cmd.price_ticks, cmd.qty_lots,
            cmd.amount_atoms, cmd.account) != 0:
        return _reject(st, cmd, REASON_INVALID_MARKET_CONFIG)
    mk.max_price_ticks = cmd.price_ticks
    mk.max_order_lots = cmd.qty_lots
    mk.max_position_lots = cmd.amount_atoms
    mk.max_open_orders = cmd.account
    _done(st, cmd, 0)


@jit
def _set_mark(st, cmd, scratch):
    if not _market_ok(st, cmd.market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    mk = _markets(st)[cmd.market]
    if cmd.price_ticks < 1 or (mk.max_price_ticks > 0 and cmd.price_ticks > mk.max_price_ticks):
        return _reject(st, cmd, REASON_INVALID_PRICE)
    _set_mark_ticks(mk, cmd.price_ticks)
    j = _claim(st, cmd, EV_MARK, cmd.market, cmd.account)
    e = _mark_events(st)[j]
    e.req = cmd.req
    e.mark_ticks = cmd.price_ticks
    _after_trading(st, cmd, cmd.market, scratch, 0)


@jit
def _entry_error(mk, reduce_only):
    """reference.Market.entry_error: why the market's state refuses an order entering it."""
    if mk.max_price_ticks == 0 or mk.state == MARKET_HALTED:
        return REASON_MARKET_HALTED
    if mk.state == MARKET_CANCEL_ONLY:
        return REASON_MARKET_CANCEL_ONLY
    if mk.state == MARKET_SETTLED:
        return REASON_MARKET_SETTLED
    if mk.state == MARKET_REDUCE_ONLY and not reduce_only:
        return REASON_MARKET_REDUCE_ONLY
    return 0


@jit
def _set_state(st, cmd, state, scratch):
    """HALT, RESUME and SET_MARKET_STATE (state -1: the command's kind)."""
    if not _market_ok(st, cmd.market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if state == -1:
        state = cmd.kind
        if state > MARKET_HALTED:
            return _reject(st, cmd, REASON_INVALID_MESSAGE)
    mk = _markets(st)[cmd.market]
    if mk.state == MARKET_SETTLED:
        return _reject(st, cmd, REASON_MARKET_SETTLED)
    mk.state = state
    mk.halted = 1 if state == MARKET_CANCEL_ONLY or state == MARKET_HALTED else 0
    _done(st, cmd, 0)
    # triggers held back while halted fire on resume, against the prices of then
    _after_trading(st, cmd, cmd.market, scratch, 0)


@jit
def _balance_event(st, cmd, market, account, amount, balance_atoms):
    j = _claim(st, cmd, EV_BALANCE, market, account)
    e = _balance_events(st)[j]
    e.req = _req_for(cmd, account)
    e.amount_atoms = amount
    e.balance_atoms = balance_atoms


@jit
def _deposit(st, cmd):
    if not _account_ok(st, cmd.account):
        return _reject(st, cmd, REASON_UNKNOWN_ACCOUNT)
    acct = _accounts(st)[cmd.account]
    amount = cmd.amount_atoms
    if (amount < 1 or amount > MAX_BALANCE_ATOMS - acct.balance_atoms
            or amount > MAX_NET_DEPOSITS_ATOMS - _counters(st)[C_NET_DEPOSITS_ATOMS]):
        return _reject(st, cmd, REASON_INVALID_MESSAGE)
    acct.balance_atoms += amount
    acct.changed_seq = _counters(st)[C_SEQ]
    _counters(st)[C_NET_DEPOSITS_ATOMS] += amount
    _balance_event(st, cmd, cmd.market, cmd.account, amount, acct.balance_atoms)
    _done(st, cmd, 0)


@jit
def _set_account_state(st, cmd):
    """Disable (qty_lots 1) or enable (0) an account: a disabled one places, amends, withdraws
    and changes margin settings no more (its cancels, fills and liquidations go on)."""
    if not _account_ok(st, cmd.account):
        return _reject(st, cmd, REASON_UNKNOWN_ACCOUNT)
    if cmd.qty_lots != 0 and cmd.qty_lots != 1:
        return _reject(st, cmd, REASON_INVALID_MESSAGE)
    _accounts(st)[cmd.account].disabled = 1 if cmd.qty_lots == 1 else 0
    _done(st, cmd, 0)


@jit
def _withdraw(st, cmd):
    if not _account_ok(st, cmd.account):
        return _reject(st, cmd, REASON_UNKNOWN_ACCOUNT)
    acct = _accounts(st)[cmd.account]
    if acct.disabled != 0:
        return _reject(st, cmd, REASON_ACCOUNT_DISABLED)
    amount = cmd.amount_atoms
    if amount < 1 or amount > MAX_BALANCE_ATOMS:
        return _reject(st, cmd, REASON_INVALID_MESSAGE)
    if amount > acct.balance_atoms:
        return _reject(st, cmd, REASON_INSUFFICIENT_BALANCE)
    equity, required = _equity_and_requirement(st, cmd.account, -1, 0, 0, 0)
    if equity - amount - required < 0:
        return _reject(st, cmd, REASON_INSUFFICIENT_MARGIN)
    acct.balance_atoms -= amount
    acct.changed_seq = _counters(st)[C_SEQ]
    _counters(st)[C_NET_DEPOSITS_ATOMS] -= amount
    _balance_event(st, cmd, cmd.market, cmd.account, -amount, acct.balance_atoms)
    _done(st, cmd, 0)


@jit
def _new_order(st, cmd, scratch):
    market = cmd.market
    account = cmd.account
    side = cmd.side
    kind = cmd.kind
    tif = cmd.tif
    if not _market_ok(st, market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if not _account_ok(st, account):
        return _reject(st, cmd, REASON_UNKNOWN_ACCOUNT)
    if _accounts(st)[account].disabled != 0:
        return _reject(st, cmd, REASON_ACCOUNT_DISABLED)
    conditional = kind >= KIND_STOP_MARKET
    flags_allowed = FLAG_REDUCE_ONLY | (FLAG_TRIGGER_BY_LAST if conditional else 0)
    market_kind = _is_market_kind(kind)
    if (side > SIDE_SELL or kind > KIND_TAKE_PROFIT_LIMIT or tif > TIF_POST_ONLY
            or cmd.stp > STP_CANCEL_BOTH or (cmd.flags & ~flags_allowed) != 0
            or (market_kind and tif == TIF_POST_ONLY)):
        return _reject(st, cmd, REASON_INVALID_MESSAGE)
    if market_kind and tif == TIF_GTC:
        tif = TIF_IOC
    mk = _markets(st)[market]
    err = _entry_error(mk, (cmd.flags & FLAG_REDUCE_ONLY) != 0)
    if err != 0:
        return _reject(st, cmd, err)
    qty = cmd.qty_lots
    if qty < 1 or qty > mk.max_order_lots:
        return _reject(st, cmd, REASON_INVALID_QTY)
    if market_kind:
        price = 0
        limit = _band_limit(mk, side)
    else:
        price = cmd.price_ticks
        if price < 1 or price > mk.max_price_ticks:
            return _reject(st, cmd, REASON_INVALID_PRICE)
        # a conditional limit order meets the band when it fires, against the mark of then
        if not conditional and _outside_band(mk, price):
            return _reject(st, cmd, REASON_PRICE_BAND)
        limit = price
    trigger = cmd.amount_atoms
    if conditional:
        q = _trigger_queue(kind, side, cmd.flags)
        if (trigger < 1 or trigger > mk.max_price_ticks
                or _trigger_holds(q, _trigger_key(q, trigger), _trigger_price(mk, q))):
            return _reject(st, cmd, REASON_INVALID_PRICE)
    reduce_only = (cmd.flags & FLAG_REDUCE_ONLY) != 0
    # Binance's MIN_NOTIONAL: at the order's price, a market kind's at the mark; an order that
    # only reduces is exempt
    if not reduce_only and qty * (price if price != 0 else mk.mark_ticks) * \
            mk.atoms_per_tick_lot < mk.min_notional_atoms:
        return _reject(st, cmd, REASON_MIN_NOTIONAL)
    if _slot_of_cid(st, account, cmd.cid) != NONE:
        return _reject(st, cmd, REASON_DUPLICATE_CID)
    pos = _positions(st)[account, market]
    if conditional:
        if mk.max_stop_orders != 0 and _untriggered_of(st, account, market) >= mk.max_stop_orders:
            return _reject(st, cmd, REASON_TOO_MANY_STOP_ORDERS)
        if (pos.open_orders >= mk.max_open_orders or _counters(st)[C_ORDERS_USED] >= scratch
                or mk.untriggered >= _trigger_keys(st).shape[2]):
            return _reject(st, cmd, REASON_TOO_MANY_ORDERS)
        return _new_conditional(st, cmd, tif, price, trigger)
    if (tif == TIF_GTC or tif == TIF_POST_ONLY) and (
            pos.open_orders >= mk.max_open_orders
            or _counters(st)[C_ORDERS_USED] >= scratch
            or _level_full(st, market, side, price)):
        return _reject(st, cmd, REASON_TOO_MANY_ORDERS)
    err, qty = _admit(st, market, account, side, tif, limit, cmd.stp, qty, reduce_only, 0,
                      market_kind)
    if err != 0:
        return _reject(st, cmd, err)

    oid = _counters(st)[C_NEXT_OID]
    _counters(st)[C_NEXT_OID] = oid + 1
    o = _orders(st)[scratch]
    o.oid = oid
    o.cid = cmd.cid
    o.price_ticks = price
    o.remaining_lots = qty
    o.account = account
    o.market = market
    o.side = side
    o.kind = kind
    o.tif = tif
    o.flags = cmd.flags
    o.stp = cmd.stp
    o.level = NONE
    ack = _order_event(st, cmd, EV_ACK, market, account, cmd.req, 0, 0, side, kind, oid,
                       cmd.cid, price, qty, 0)
    status, n_touched = _take_then_rest(st, cmd, scratch, limit, scratch, 0)
    e = _order_events(st)[ack]
    e.status = status
    if status == STATUS_OPEN:
        e.remaining_lots = o.remaining_lots
    _after_trading(st, cmd, market, scratch, n_touched)


@jit
def _new_conditional(st, cmd, tif, price_ticks, trigger_ticks):
    """A stop or take-profit that passed validation: parked, acked `untriggered`. No margin
    is held and reduce-only is not checked until it fires."""
    oid = _counters(st)[C_NEXT_OID]
    _counters(st)[C_NEXT_OID] = oid + 1
    slot = _alloc_order(st)
    o = _orders(st)[slot]
    o.oid = oid
    o.cid = cmd.cid
    o.price_ticks = price_ticks
    o.remaining_lots = cmd.qty_lots
    o.account = cmd.account
    o.market = cmd.market
    o.side = cmd.side
    o.kind = cmd.kind
    o.tif = tif
    o.flags = cmd.flags
    o.stp = cmd.stp
    _park(st, slot, trigger_ticks)
    _order_event(st, cmd, EV_ACK, cmd.market, cmd.account, cmd.req, 0, STATUS_UNTRIGGERED,
                 cmd.side, cmd.kind, oid, cmd.cid, price_ticks, cmd.qty_lots, cmd.qty_lots)


@jit
def _find_order(st, account, oid, cid):
    slot = _slot_of_oid(st, oid) if oid != 0 else _slot_of_cid(st, account, cid)
    if slot == NONE or _orders(st)[slot].account != account:
        return NONE
    return slot


@jit
def _cancel_open(st, cmd, slot, reason):
    """Cancel a resting or an untriggered order."""
    if _orders(st)[slot].level != UNTRIGGERED:
        return _cancel_resting(st, cmd, slot, reason)
    _unpark(st, slot)
    _canceled(st, cmd, slot, reason, _orders(st)[slot].remaining_lots)
    _free_order(st, slot)


@jit
def _cancel(st, cmd):
    slot = _find_order(st, cmd.account, cmd.oid, cmd.cid)
    if slot == NONE:
        return _reject(st, cmd, REASON_UNKNOWN_ORDER)
    _cancel_open(st, cmd, slot, REASON_USER)


@jit
def _cancel_all(st, cmd):
    if cmd.market != -1 and not _market_ok(st, cmd.market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if not _account_ok(st, cmd.account):
        return _reject(st, cmd, REASON_UNKNOWN_ACCOUNT)
    count = 0
    slot = _accounts(st)[cmd.account].first_order
    while slot != NONE:
        nxt = _orders(st)[slot].account_next
        if cmd.market == -1 or _orders(st)[slot].market == cmd.market:
            _cancel_open(st, cmd, slot, REASON_USER)
            count += 1
        slot = nxt
    _done(st, cmd, count)


@jit
def _amend(st, cmd, scratch):
    slot = _find_order(st, cmd.account, cmd.oid, cmd.cid)
    if slot == NONE:
        return _reject(st, cmd, REASON_UNKNOWN_ORDER)
    if _accounts(st)[cmd.account].disabled != 0:
        return _reject(st, cmd, REASON_ACCOUNT_DISABLED)
    o = _orders(st)[slot]
    mk = _markets(st)[o.market]
    new_price = cmd.price_ticks if cmd.price_ticks != 0 else o.price_ticks
    new_qty = cmd.qty_lots if cmd.qty_lots != 0 else o.remaining_lots
    # an untriggered order is not amended: cancel and place it again
    if (cmd.price_ticks == 0 and cmd.qty_lots == 0) or o.level == UNTRIGGERED:
        return _reject(st, cmd, REASON_INVALID_MESSAGE)
    err = _entry_error(mk, (o.flags & FLAG_REDUCE_ONLY) != 0)
    if err != 0:
        return _reject(st, cmd, err)
    if new_qty < 1 or new_qty > mk.max_order_lots:
        return _reject(st, cmd, REASON_INVALID_QTY)
    if new_price < 1 or new_price > mk.max_price_ticks:
        return _reject(st, cmd, REASON_INVALID_PRICE)
    if new_price != o.price_ticks and _outside_band(mk, new_price):
        return _reject(st, cmd, REASON_PRICE_BAND)
    pos = _positions(st)[o.account, o.market]
    reduce_only = (o.flags & FLAG_REDUCE_ONLY) != 0
    if reduce_only:
        if new_qty > _closing_lots(pos.size_lots, o.side):
            return _reject(st, cmd, REASON_REDUCE_ONLY_VIOLATION)
    elif new_qty * new_price * mk.atoms_per_tick_lot < mk.min_notional_atoms:
        return _reject(st, cmd, REASON_MIN_NOTIONAL)
    elif new_qty > o.remaining_lots and _open_interest_error(mk, pos, o.side, new_qty):
        return _reject(st, cmd, REASON_OPEN_INTEREST_CAP)
    best = _best_level(st, o.market, 1 - o.side)
    crosses = best != NONE and _crosses(o.side, new_price, _levels(st)[best].price_ticks)
    if crosses and o.tif == TIF_POST_ONLY:
        return _reject(st, cmd, REASON_POST_ONLY_WOULD_TAKE)
    if new_price != o.price_ticks and _level_full(st, o.market, o.side, new_price):
        return _reject(st, cmd, REASON_TOO_MANY_ORDERS)
    grow = new_qty - o.remaining_lots
    toward = new_price > o.price_ticks if o.side == SIDE_BUY else new_price < o.price_ticks
    if grow > 0 or toward:
        # more lots, or a price nearer the other side: checked as a new order (moved away
        # with no more lots, its risk only falls: reference._toward_book)
        add = grow if grow > 0 else 0
        err = _exposure_error(st, o.account, o.market, add if o.side == SIDE_BUY else 0,
                              add if o.side == SIDE_SELL else 0, not reduce_only,
                              _entry_cost(st, o.market, o.account, o.side, new_price, new_qty,
                                          o.tif == TIF_GTC or o.tif == TIF_POST_ONLY, False))
        if err != 0:
            return _reject(st, cmd, err)
    _order_event(st, cmd, EV_AMENDED, o.market, o.account, cmd.req, 0, STATUS_OPEN, o.side,
                 o.kind, o.oid, o.cid, new_price, new_qty, new_qty)
    if new_price == o.price_ticks and grow <= 0:
        _shrink(st, slot, new_qty)
        return
    _unrest(st, slot)
    o.price_ticks = new_price
    o.remaining_lots = new_qty
    market = o.market
    status, n_touched = _take_then_rest(st, cmd, slot, new_price, scratch, 0)
    _after_trading(st, cmd, market, scratch, n_touched)
