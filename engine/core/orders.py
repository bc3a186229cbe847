"""Resting orders: the order pool's slots, filing an order (account list, indexes), resting it
on its level's FIFO, unresting, shrinking and canceling it.

Owns: the orders table and each order's links. May touch: levels (through book_sides.py),
the indexes, the open-order and open-lots words of its account, position and market, and
cancel events.
"""

from engine.records import FLAG_REDUCE_ONLY, SIDE_BUY
from engine.state import C_FREE_ORDER, C_ORDERS_USED, NONE
from engine.core.tables import (_accounts, _cid_index, _counters, _levels, _markets, _oid_index,
                                _orders, _positions, jit)
from engine.core.indexes import _defer_index_delete, _index_insert
from engine.core.events import _canceled
from engine.core.book_sides import _add_level, _find_level, _remove_level


@jit
def _alloc_order(st):
    slot = _counters(st)[C_FREE_ORDER]
    _counters(st)[C_FREE_ORDER] = _orders(st)[slot].next
    _counters(st)[C_ORDERS_USED] += 1
    return slot


@jit
def _free_order(st, slot):
    _orders(st)[slot].next = _counters(st)[C_FREE_ORDER]
    _counters(st)[C_FREE_ORDER] = slot
    _counters(st)[C_ORDERS_USED] -= 1


@jit
def _copy_order(dst, src):
    dst.oid = src.oid
    dst.cid = src.cid
    dst.price_ticks = src.price_ticks
    dst.remaining_lots = src.remaining_lots
    dst.account = src.account
    dst.market = src.market
    dst.side = src.side
    dst.kind = src.kind
    dst.tif = src.tif
    dst.flags = src.flags
    dst.stp = src.stp


@jit
def _file_order(st, slot):
    """Make an open order (resting or untriggered) its account's latest, findable by oid and
    cid, and count it against the open-order limit."""
    o = _orders(st)[slot]
    acct = _accounts(st)[o.account]
    o.account_prev = acct.last_order
    o.account_next = NONE
    if acct.last_order == NONE:
        acct.first_order = slot
    else:
        _orders(st)[acct.last_order].account_next = slot
    acct.last_order = slot
    acct.open_orders += 1
    _index_insert(_oid_index(st), 0, o.oid, slot)
    _index_insert(_cid_index(st), o.account, o.cid, slot)
    _positions(st)[o.account, o.market].open_orders += 1


@jit
def _unfile_order(st, o):
    acct = _accounts(st)[o.account]
    if o.account_prev == NONE:
        acct.first_order = o.account_next
    else:
        _orders(st)[o.account_prev].account_next = o.account_next
    if o.account_next == NONE:
        acct.last_order = o.account_prev
    else:
        _orders(st)[o.account_next].account_prev = o.account_prev
    acct.open_orders -= 1
    _defer_index_delete(st, o)
    _positions(st)[o.account, o.market].open_orders -= 1


@jit
def _open_lots_change(pos, side, delta):
    if side == SIDE_BUY:
        pos.open_buy_lots += delta
    else:
        pos.open_sell_lots += delta


@jit
def _rest(st, slot):
    """Put an order (already in `slot`) at the tail of its price level."""
    o = _orders(st)[slot]
    market = o.market
    lvl = _find_level(st, market, o.side, o.price_ticks)
    if lvl == NONE:
        lvl = _add_level(st, market, o.side, o.price_ticks)
    lv = _levels(st)[lvl]
    o.level = lvl
    o.prev = lv.last
    o.next = NONE
    if lv.last == NONE:
        lv.first = slot
    else:
        _orders(st)[lv.last].next = slot
    lv.last = slot
    lv.orders += 1
    lv.qty_lots += o.remaining_lots
    _file_order(st, slot)
    mk = _markets(st)[market]
    if o.side == SIDE_BUY:
        mk.resting_buy += 1
    else:
        mk.resting_sell += 1
    pos = _positions(st)[o.account, market]
    _open_lots_change(pos, o.side, o.remaining_lots)
    if o.flags & FLAG_REDUCE_ONLY:
        pos.reduce_only_orders += 1
        mk.resting_reduce_only += 1


@jit
def _unrest(st, slot):
    """Take an order off the book and (deferred) out of the indexes; its slot stays
    allocated."""
    o = _orders(st)[slot]
    market = o.market
    lvl = o.level
    lv = _levels(st)[lvl]
    if o.prev == NONE:
        lv.first = o.next
    else:
        _orders(st)[o.prev].next = o.next
    if o.next == NONE:
        lv.last = o.prev
    else:
        _orders(st)[o.next].prev = o.prev
    lv.orders -= 1
    lv.qty_lots -= o.remaining_lots
    if lv.orders == 0:
        _remove_level(st, market, o.side, lvl)
    o.level = NONE
    _unfile_order(st, o)
    mk = _markets(st)[market]
    if o.side == SIDE_BUY:
        mk.resting_buy -= 1
    else:
        mk.resting_sell -= 1
    pos = _positions(st)[o.account, market]
    _open_lots_change(pos, o.side, -o.remaining_lots)
    if o.flags & FLAG_REDUCE_ONLY:
        pos.reduce_only_orders -= 1
        mk.resting_reduce_only -= 1


@jit
def _shrink(st, slot, new_remaining):
    """Reduce a resting order's open quantity in place; it keeps its time priority."""
    o = _orders(st)[slot]
    delta = o.remaining_lots - new_remaining
    _levels(st)[o.level].qty_lots -= delta
    _open_lots_change(_positions(st)[o.account, o.market], o.side, -delta)
    o.remaining_lots = new_remaining


@jit
def _cancel_resting(st, cmd, slot, reason):
    lots = _orders(st)[slot].remaining_lots
    _unrest(st, slot)
    _canceled(st, cmd, slot, reason, lots)
    _free_order(st, slot)
