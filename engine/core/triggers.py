"""The trigger book: untriggered stop and take-profit orders in four queues per market, fired
through matching when a price reaches them; and _after_trading, which every command that
may move a price calls.

Owns: trigger_ticks, trigger_keys, trigger_slots, trigger_depth. May touch: the orders it
parks and fires, and what matching touches.
"""

from engine.records import (EV_REJECT, EV_TRIGGERED, FLAG_REDUCE_ONLY, FLAG_TRIGGER_BY_LAST,
                            KIND_MARKET, KIND_STOP_LIMIT, KIND_STOP_MARKET,
                            KIND_TAKE_PROFIT_MARKET, MARKET_REDUCE_ONLY,
                            REASON_MARKET_REDUCE_ONLY, REASON_PRICE_BAND, REASON_REDUCE_ONLY,
                            REASON_REDUCE_ONLY_VIOLATION, REASON_TOO_MANY_ORDERS, SIDE_BUY,
                            STATUS_CANCELED, STATUS_OPEN, TIF_GTC, TIF_POST_ONLY)
from engine.state import NONE, TRIGGER_QUEUES, UNTRIGGERED
from engine.core.tables import (_markets, _order_events, _orders, _trigger_depth,
                                _trigger_keys, _trigger_slots, _trigger_ticks, jit)
from engine.core.events import _canceled, _order_event, _req_for
from engine.core.book_sides import _level_full, _lower_bound
from engine.core.orders import _file_order, _free_order, _unfile_order
from engine.core.margin import _band_limit, _outside_band
from engine.core.matching import _admit, _sweep_reduce_only, _take_then_rest


# An untriggered stop or take-profit holds a slot of the order pool (level UNTRIGGERED, no
# margin, no open lots) and is filed like a resting order (account list, oid and cid indexes,
# open-order count), so cancel, cancel_all, duplicate cids and the open-order limit reach it
# unchanged. Its market keeps it in one of four queues (engine/state.py), each a sorted array
# of keys with the next order to fire last: key -trigger where a rise fires (lowest trigger
# first), +trigger where a fall does (highest first); among equal keys the oldest is last, as
# a new order goes before its equals.
@jit
def _is_market_kind(kind):
    return kind == KIND_MARKET or kind == KIND_STOP_MARKET or kind == KIND_TAKE_PROFIT_MARKET


@jit
def _trigger_queue(kind, side, flags):
    rises = (kind <= KIND_STOP_LIMIT) == (side == SIDE_BUY)
    q = 0 if rises else 1
    if flags & FLAG_TRIGGER_BY_LAST:
        q += 2
    return q


@jit
def _trigger_key(queue, trigger_ticks):
    return trigger_ticks if queue & 1 else -trigger_ticks


@jit
def _trigger_price(mk, queue):
    """The price a queue watches; 0 (nothing fires) for the last price before any trade."""
    return mk.last_trade_ticks if queue >= 2 else mk.mark_ticks


@jit
def _trigger_holds(queue, key, price_ticks):
    if price_ticks == 0:
        return False
    if queue & 1:
        return price_ticks <= key
    return price_ticks >= -key


@jit
def _park(st, slot, trigger_ticks):
    """File the order in `slot` in its market's trigger book."""
    o = _orders(st)[slot]
    market = o.market
    q = _trigger_queue(o.kind, o.side, o.flags)
    key = _trigger_key(q, trigger_ticks)
    keys = _trigger_keys(st)
    slots = _trigger_slots(st)
    n = _trigger_depth(st)[market, q]
    k = _lower_bound(keys, market, q, n, key)
    for i in range(n, k, -1):
        keys[market, q, i] = keys[market, q, i - 1]
        slots[market, q, i] = slots[market, q, i - 1]
    keys[market, q, k] = key
    slots[market, q, k] = slot
    _trigger_depth(st)[market, q] = n + 1
    _trigger_ticks(st)[slot] = trigger_ticks
    o.level = UNTRIGGERED
    _file_order(st, slot)
    _markets(st)[market].untriggered += 1


@jit
def _unpark(st, slot):
    """Take an order out of its trigger book and unfile it; its slot stays allocated."""
    o = _orders(st)[slot]
    market = o.market
    q = _trigger_queue(o.kind, o.side, o.flags)
    keys = _trigger_keys(st)
    slots = _trigger_slots(st)
    n = _trigger_depth(st)[market, q]
    k = _lower_bound(keys, market, q, n, _trigger_key(q, _trigger_ticks(st)[slot]))
    while slots[market, q, k] != slot:
        k += 1
    for i in range(k, n - 1):
        keys[market, q, i] = keys[market, q, i + 1]
        slots[market, q, i] = slots[market, q, i + 1]
    _trigger_depth(st)[market, q] = n - 1
    _trigger_ticks(st)[slot] = 0
    o.level = NONE
    _unfile_order(st, o)
    _markets(st)[market].untriggered -= 1


@jit
def _next_to_fire(st, market):
    """The slot of the untriggered order to fire next, or NONE: mark queues before last-price
    ones, a rise's queue before a fall's, the trigger nearest the old price first."""
    mk = _markets(st)[market]
    for q in range(TRIGGER_QUEUES):
        n = _trigger_depth(st)[market, q]
        if n > 0 and _trigger_holds(q, _trigger_keys(st)[market, q, n - 1],
                                    _trigger_price(mk, q)):
            return _trigger_slots(st)[market, q, n - 1]
    return NONE


@jit
def _fire(st, cmd, slot, scratch, n_touched):
    """Enter a triggered order as a new market or limit order with its own tif, behind every
    order already resting at its price. EV_TRIGGERED first (its status, like an ack's, says
    where the order ended), then its reject, reduce-only cancel or trades."""
    o = _orders(st)[slot]
    _unpark(st, slot)
    market = o.market
    account = o.account
    mk = _markets(st)[market]
    req = _req_for(cmd, account)
    j = _order_event(st, cmd, EV_TRIGGERED, market, account, req, 0, STATUS_CANCELED, o.side,
                     o.kind, o.oid, o.cid, o.price_ticks, o.remaining_lots, 0)
    err = 0
    qty = o.remaining_lots
    if _is_market_kind(o.kind):
        limit = _band_limit(mk, o.side)
    else:
        limit = o.price_ticks
        if _outside_band(mk, limit):
            err = REASON_PRICE_BAND
    if err == 0 and mk.state == MARKET_REDUCE_ONLY and (o.flags & FLAG_REDUCE_ONLY) == 0:
        err = REASON_MARKET_REDUCE_ONLY
    if err == 0 and (o.tif == TIF_GTC or o.tif == TIF_POST_ONLY) and _level_full(
            st, market, o.side, limit):
        err = REASON_TOO_MANY_ORDERS
    if err == 0:
        err, qty = _admit(st, market, account, o.side, o.tif, limit, o.stp, qty,
                          (o.flags & FLAG_REDUCE_ONLY) != 0, n_touched, _is_market_kind(o.kind))
    if err == REASON_REDUCE_ONLY_VIOLATION:
        _canceled(st, cmd, slot, REASON_REDUCE_ONLY, qty)
    elif err != 0:
        _order_event(st, cmd, EV_REJECT, market, account, req, err, 0, o.side, o.kind, o.oid,
                     o.cid, 0, 0, 0)
    if err != 0:
        _free_order(st, slot)
        return n_touched
    o.remaining_lots = qty
    status, n_touched = _take_then_rest(st, cmd, slot, limit, scratch, n_touched)
    e = _order_events(st)[j]
    e.status = status
    e.qty_lots = qty
    if status == STATUS_OPEN:
        e.remaining_lots = o.remaining_lots
    return n_touched


@jit
def _run_triggers(st, cmd, market, scratch, n_touched):
    """Fire, one at a time, every untriggered order whose condition holds; a fired order's
    trades move the last price, so each pick looks at the prices as they are then. Nothing
    fires in a halted market (RESUME looks again)."""
    if _markets(st)[market].halted != 0:
        return n_touched
    while True:
        slot = _next_to_fire(st, market)
        if slot == NONE:
            return n_touched
        n_touched = _fire(st, cmd, slot, scratch, n_touched)



@jit
def _after_trading(st, cmd, market, scratch, n_touched):
    """What follows a command that may have moved a market's prices: fire the untriggered
    orders whose condition now holds (a counter check when there are none), then sweep the
    reduce-only orders of every account whose position the command changed, once.
    Returns n_touched."""
    if _markets(st)[market].untriggered != 0:
        n_touched = _run_triggers(st, cmd, market, scratch, n_touched)
    _sweep_reduce_only(st, cmd, market, n_touched)
    return n_touched


@jit
def _trigger_bound(st, market):
    """Most events the trigger book of a market can add to a command (0 when it is empty).

    Every trade fills its taker or its maker, or is a reduce-only maker's capped trade (its
    cancel follows at once). So per taker (the command's order and each fired one): its
    EV_TRIGGERED, the trade that fills it, its reject or cancel. Per order that rests at some
    point (the R resting now, the fired ones and the command's own): the trade that fills it,
    or a capped trade and its cancel, or a cancel; else, still resting, one reduce-only sweep.
    Two more for the command and its reply: 2 + 3(T + 1) + 2(R + T + 1) <= 8 + 2R + 5T.
    """
    mk = _markets(st)[market]
    if mk.untriggered == 0:
        return 0
    return 8 + 2 * (mk.resting_buy + mk.resting_sell) + 5 * mk.untriggered
