"""Matching one taker: its admission (reduce-only, post-only, open interest, position limit
and margin, FOK), the walk of the opposite side in price-time priority, fills and trades,
resting what is left, and the reduce-only sweep.

Owns: fills (positions, balances, fees, open interest) and trade events. May touch: orders
and levels through orders.py, and the `touched` list of the command.
"""

from engine.numbers import cost_share, fee_atoms, position_after_fill
from engine.records import (EV_AMENDED, EV_TRADE, FLAG_REDUCE_ONLY, KIND_MARKET, MARGIN_ISOLATED,
                            REASON_FOK_UNFILLED, REASON_IOC, REASON_OPEN_INTEREST_CAP,
                            REASON_POST_ONLY_WOULD_TAKE, REASON_REDUCE_ONLY,
                            REASON_REDUCE_ONLY_VIOLATION, REASON_STP, SIDE_BUY, SIDE_SELL,
                            STATUS_CANCELED, STATUS_FILLED, STATUS_OPEN, STP_CANCEL_BOTH,
                            STP_CANCEL_MAKER, STP_CANCEL_TAKER, TIF_FOK, TIF_GTC, TIF_IOC,
                            TIF_POST_ONLY)
from engine.state import C_FEES_ATOMS, C_NEXT_TRADE_ID, C_SEQ, NONE, UNTRIGGERED
from engine.core.tables import (FLAG_LIQUIDATION_TAKER, _accounts, _counters, _levels, _markets, _orders, _positions, _touched,
                                _trade_events, jit)
from engine.core.events import _canceled, _claim, _order_event, _req_for
from engine.core.book_sides import _best_level, _best_position, _level_at, _worse_position
from engine.core.orders import (_alloc_order, _cancel_resting, _copy_order, _free_order, _rest,
                                _shrink, _unrest)
from engine.core.margin import (_closing_lots, _crosses, _entry_cost, _exposure_error,
                                _margin_per_lot, _open_interest_error, _upnl)


@jit
def _admit(st, market, account, side, tif, limit_ticks, stp, qty, reduce_only, n_touched,
           market_kind):
    """The checks an order passes on entering the book, new or triggered, in order:
    reduce-only (clips qty), post-only, open-interest cap, position limit and margin, FOK.
    Returns (reason or 0, qty). n_touched: the entries of `touched` in use (a fired order's
    FOK check runs after earlier trades of its command)."""
    pos = _positions(st)[account, market]
    if reduce_only:
        closing = _closing_lots(pos.size_lots, side)
        if closing <= 0:
            return REASON_REDUCE_ONLY_VIOLATION, qty
        if qty > closing:
            qty = closing
    if tif == TIF_POST_ONLY:
        best = _best_level(st, market, 1 - side)
        if best != NONE and _crosses(side, limit_ticks, _levels(st)[best].price_ticks):
            return REASON_POST_ONLY_WOULD_TAKE, qty
    cost = 0
    if not reduce_only:
        if _open_interest_error(_markets(st)[market], pos, side, qty):
            return REASON_OPEN_INTEREST_CAP, qty
        cost = _entry_cost(st, market, account, side, limit_ticks, qty,
                           tif == TIF_GTC or tif == TIF_POST_ONLY, market_kind)
    err = _exposure_error(st, account, market, qty if side == SIDE_BUY else 0,
                          qty if side == SIDE_SELL else 0, not reduce_only, cost)
    if err != 0:
        return err, qty
    if tif == TIF_FOK and not _fok_fillable(st, market, account, side, limit_ticks, stp, qty,
                                            n_touched):
        return REASON_FOK_UNFILLED, qty
    return 0, qty


@jit
def _maker_tradeable_lots(st, slot, already_traded):
    o = _orders(st)[slot]
    if not (o.flags & FLAG_REDUCE_ONLY):
        return o.remaining_lots
    closing = _closing_lots(_positions(st)[o.account, o.market].size_lots, o.side) - already_traded
    if closing < 0:
        closing = 0
    return o.remaining_lots if o.remaining_lots < closing else closing


@jit
def _fok_fillable(st, market, account, side, limit_ticks, stp, wanted, seen_base):
    """Whether a FOK order would fill completely. The makers' accounts it counts lots for
    are noted in `touched` from seen_base on (after the entries the command is using), to be
    reset after."""
    opposite = 1 - side
    total = 0
    ok = False
    n_seen = 0
    d, i = _best_position(st, market, opposite)
    while d >= 0:
        lvl = _level_at(st, market, opposite, d, i)
        d, i = _worse_position(st, market, opposite, d, i)
        if not _crosses(side, limit_ticks, _levels(st)[lvl].price_ticks):
            break
        slot = _levels(st)[lvl].first
        while slot != NONE:
            o = _orders(st)[slot]
            if o.account == account:
                if stp != STP_CANCEL_MAKER:
                    break
            else:
                acct = _accounts(st)[o.account]
                if acct.fok_traded_lots == 0:
                    _touched(st)[seen_base + n_seen] = o.account
                    n_seen += 1
                lots = _maker_tradeable_lots(st, slot, acct.fok_traded_lots)
                if lots > wanted - total:
                    lots = wanted - total
                acct.fok_traded_lots += lots
                total += lots
                if total >= wanted:
                    ok = True
                    break
            slot = o.next
        if ok or slot != NONE:
            break
    for i in range(n_seen):
        _accounts(st)[_touched(st)[seen_base + i]].fok_traded_lots = 0
    return ok


@jit
def _touch(st, account, n_touched):
    acct = _accounts(st)[account]
    if acct.touched_seq == _counters(st)[C_SEQ]:
        return n_touched
    acct.touched_seq = _counters(st)[C_SEQ]
    _touched(st)[n_touched] = account
    return n_touched + 1


@jit
def _apply_fill(st, account, market, side, qty, price, fee):
    mk = _markets(st)[market]
    pos = _positions(st)[account, market]
    before = pos.size_lots
    delta = qty if side == SIDE_BUY else -qty
    size, cost, realized = position_after_fill(before, pos.cost_atoms, delta, price,
                                                mk.atoms_per_tick_lot)
    # open interest = the sum of long positions
    mk.open_interest_lots += (size if size > 0 else 0) - (before if before > 0 else 0)
    pos.size_lots = size
    pos.cost_atoms = cost
    acct = _accounts(st)[account]
    acct.balance_atoms += realized - fee
    acct.changed_seq = _counters(st)[C_SEQ]
    if pos.margin_mode == MARGIN_ISOLATED:
        _isolated_fill(mk, pos, acct, before, qty, side, price)


@jit
def _isolated_fill(mk, pos, acct, before, qty, side, price):
    """Move margin between the balance and an isolated position as a fill changes |size|:
    the closed lots release their share of the margin (all of it on a full close), the
    opened lots post initial margin at the mark and the leverage of the new size's bracket,
    plus the loss the fill took against the mark, or more if that leaves the position below
    its initial margin (a top-up), as far as the balance holds it."""
    closed = 0
    if before != 0 and (before > 0) != (side == SIDE_BUY):
        whole = before if before > 0 else -before
        closed = qty if qty < whole else whole
        release = cost_share(pos.isolated_margin_atoms, closed, whole)
        pos.isolated_margin_atoms -= release
        acct.balance_atoms += release
    opened = qty - closed
    if opened > 0:
        # the margin check covered the margin, not the fee: post no more than the balance holds
        size = pos.size_lots if pos.size_lots >= 0 else -pos.size_lots
        gap = price - mk.mark_ticks if side == SIDE_BUY else mk.mark_ticks - price
        per_lot = _margin_per_lot(mk, pos.leverage, size)
        posted = opened * per_lot
        if gap > 0:
            posted += opened * gap * mk.atoms_per_tick_lot
        top_up = size * per_lot - pos.isolated_margin_atoms - _upnl(mk, pos)
        if top_up > posted:
            posted = top_up
        available = acct.balance_atoms if acct.balance_atoms > 0 else 0
        if posted > available:
            posted = available
        pos.isolated_margin_atoms += posted
        acct.balance_atoms -= posted


@jit
def _trade(st, cmd, taker, maker_slot, qty, n_touched):
    """One fill between the taker (a record) and a resting maker; returns n_touched."""
    market = taker.market
    mk = _markets(st)[market]
    maker = _orders(st)[maker_slot]
    price = maker.price_ticks
    notional = price * qty * mk.atoms_per_tick_lot
    liquidation = (taker.flags & FLAG_LIQUIDATION_TAKER) != 0
    taker_fee = 0 if liquidation else fee_atoms(notional, mk.taker_fee_e9)
    maker_fee = fee_atoms(notional, mk.maker_fee_e9)
    _apply_fill(st, taker.account, market, taker.side, qty, price, taker_fee)
    n_touched = _touch(st, taker.account, n_touched)
    _apply_fill(st, maker.account, market, maker.side, qty, price, maker_fee)
    n_touched = _touch(st, maker.account, n_touched)
    _counters(st)[C_FEES_ATOMS] += taker_fee + maker_fee
    mk.last_trade_ticks = price
    taker.remaining_lots -= qty
    maker_account = maker.account
    maker_oid = maker.oid
    maker_cid = maker.cid
    maker_left = maker.remaining_lots - qty
    if maker_left == 0:
        _unrest(st, maker_slot)
        _free_order(st, maker_slot)
    else:
        _shrink(st, maker_slot, maker_left)
    trade_id = _counters(st)[C_NEXT_TRADE_ID]
    _counters(st)[C_NEXT_TRADE_ID] = trade_id + 1
    j = _claim(st, cmd, EV_TRADE, market, taker.account)
    e = _trade_events(st)[j]
    e.req = _req_for(cmd, taker.account)
    e.side = taker.side
    e.liquidation = liquidation
    e.trade_id = trade_id
    e.price_ticks = price
    e.qty_lots = qty
    e.oid = taker.oid
    e.cid = taker.cid
    e.remaining_lots = taker.remaining_lots
    e.fee_atoms = taker_fee
    e.maker_account = maker_account
    e.maker_oid = maker_oid
    e.maker_cid = maker_cid
    e.maker_remaining_lots = maker_left
    e.maker_fee_atoms = maker_fee
    return n_touched


@jit
def _match(st, cmd, taker_slot, limit_ticks, n_touched):
    """Trade the taker against the opposite side; accounts whose position changed are added to
    the first n_touched of `touched`. Returns (stopped_by_stp, n_touched)."""
    taker = _orders(st)[taker_slot]
    market = taker.market
    opposite = 1 - taker.side
    while taker.remaining_lots > 0:
        lvl = _best_level(st, market, opposite)
        if lvl == NONE or not _crosses(taker.side, limit_ticks, _levels(st)[lvl].price_ticks):
            return False, n_touched
        maker_slot = _levels(st)[lvl].first
        maker = _orders(st)[maker_slot]
        if maker.account == taker.account:
            if taker.stp == STP_CANCEL_MAKER or taker.stp == STP_CANCEL_BOTH:
                _cancel_resting(st, cmd, maker_slot, REASON_STP)
            if taker.stp == STP_CANCEL_TAKER or taker.stp == STP_CANCEL_BOTH:
                return True, n_touched
            continue
        tradeable = _maker_tradeable_lots(st, maker_slot, 0)
        if tradeable == 0:
            _cancel_resting(st, cmd, maker_slot, REASON_REDUCE_ONLY)
            continue
        qty = taker.remaining_lots if taker.remaining_lots < tradeable else tradeable
        n_touched = _trade(st, cmd, taker, maker_slot, qty, n_touched)
    return False, n_touched


@jit
def _sweep_reduce_only(st, cmd, market, n_touched):
    for t in range(n_touched):
        account = _touched(st)[t]
        pos = _positions(st)[account, market]
        if pos.reduce_only_orders == 0:
            continue
        slot = _accounts(st)[account].first_order
        while slot != NONE:
            o = _orders(st)[slot]
            nxt = o.account_next
            if (o.flags & FLAG_REDUCE_ONLY) and o.market == market and o.level != UNTRIGGERED:
                closing = _closing_lots(pos.size_lots, o.side)
                if closing <= 0:
                    _cancel_resting(st, cmd, slot, REASON_REDUCE_ONLY)
                elif o.remaining_lots > closing:
                    _shrink(st, slot, closing)
                    _order_event(st, cmd, EV_AMENDED, market, account, _req_for(cmd, account),
                                 REASON_REDUCE_ONLY, STATUS_OPEN, o.side, o.kind, o.oid, o.cid,
                                 o.price_ticks, closing, closing)
            slot = nxt


@jit
def _take_then_rest(st, cmd, slot, limit_ticks, scratch, n_touched):
    """Match an order in `slot`, then rest or cancel what is left; returns its final status
    and n_touched (the accounts whose position changed, for _after_trading).

    `slot` is the taker scratch slot for a new order (copied to a real slot if it rests) or
    the order's own slot when an amend re-prices it or a trigger fires it (freed unless it
    rests).
    """
    stopped, n_touched = _match(st, cmd, slot, limit_ticks, n_touched)
    o = _orders(st)[slot]
    if o.remaining_lots == 0:
        status = STATUS_FILLED
    elif stopped or o.tif == TIF_IOC or o.tif == TIF_FOK or o.kind == KIND_MARKET:
        _canceled(st, cmd, slot, REASON_STP if stopped else REASON_IOC, o.remaining_lots)
        status = STATUS_CANCELED
    else:
        status = STATUS_OPEN
        if slot == scratch:
            real = _alloc_order(st)
            _copy_order(_orders(st)[real], o)
            _rest(st, real)
        else:
            _rest(st, slot)
    if status != STATUS_OPEN and slot != scratch:
        _free_order(st, slot)
    return status, n_touched
