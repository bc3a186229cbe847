"""The compiled matcher: numba code over the state tables in engine/state.py.

It implements exactly the rules of engine/reference.py (read that first; it is the spec) over
preallocated arrays: a slot pool of orders, price levels with FIFO links, one sorted array of
price keys per book side, open-addressing indexes for oid and (account, cid).

`run_batch` takes a batch of command records and writes events straight into the event ring
slots it is given. It never waits: before each command it checks that the ring has room for
the most events that command can cause, and returns early when it has not, so the caller
(Python) can wait for consumers and call again. No wall clock, no randomness, no floats.
"""

import numpy as np
from numba import njit

from engine.numbers import (RATE_ONE_E9, cost_share, fee_atoms, mul_div_ceil, mul_div_floor,
                            position_after_fill)
from engine.config import (ADL_MAX_COUNTERPARTIES, LIQUIDATION_MAX_STEPS, MAX_BALANCE_ATOMS,
                           MAX_NET_DEPOSITS_ATOMS, bracket_leverage, bracket_problem,
                           market_config_problem, market_filters_problem,
                           market_limits_problem, market_risk_problem)
from engine.records import *  # noqa: F403
from engine.reports import NO_ACCOUNT, report_accounts
from engine.state import (ACCOUNT_DTYPE, C_FEES_ATOMS, C_FREE_LEVEL, C_FREE_ORDER,
                          C_INSURANCE_ATOMS, C_NET_DEPOSITS_ATOMS, C_NEXT_OID, C_NEXT_TRADE_ID, C_ORDERS_USED, C_SEQ,
                          C_UNRESTS,
                          D_COUNT, D_MASK, D_NEED, D_RING, D_SEQ, D_SOURCE, D_WRITE, INDEX_DTYPE,
                          LEVEL_DTYPE, MARKET_DTYPE, NONE, ORDER_DTYPE, POSITION_DTYPE,
                          TRIGGER_QUEUES, UNTRIGGERED, table_word)
from engine.views import address_of, descriptor_view, prefetch, table_view

# _nrt=False: nothing here allocates, and without the runtime numba emits no reference
# counting for the arrays inside the state tuple on every call (it cost ~100 ns a call).
jit = njit(cache=True, nogil=True, boundscheck=False, _nrt=False)



# ---- the tables, seen through the descriptor `st` (engine/views.py) -----------------------
# `st` is the descriptor's address; `_desc(st)` is the descriptor itself (its cursor words).
_desc = descriptor_view(D_COUNT)
_counters = table_view(table_word("counters"), np.int64, 1)
_markets = table_view(table_word("markets"), MARKET_DTYPE, 1)
_positions = table_view(table_word("positions"), POSITION_DTYPE, 2)
_accounts = table_view(table_word("accounts"), ACCOUNT_DTYPE, 1)
_orders = table_view(table_word("orders"), ORDER_DTYPE, 1)
_levels = table_view(table_word("levels"), LEVEL_DTYPE, 1)
_book_keys = table_view(table_word("book_keys"), np.int64, 3)
_book_levels = table_view(table_word("book_levels"), np.int32, 3)
_book_depth = table_view(table_word("book_depth"), np.int64, 2)
_cid_index = table_view(table_word("cid_index"), INDEX_DTYPE, 1)
_oid_index = table_view(table_word("oid_index"), INDEX_DTYPE, 1)
_index_deletes = table_view(table_word("index_deletes"), np.int64, 2)
_trigger_ticks = table_view(table_word("trigger_ticks"), np.int64, 1)
_trigger_keys = table_view(table_word("trigger_keys"), np.int64, 3)
_trigger_slots = table_view(table_word("trigger_slots"), np.int32, 3)
_trigger_depth = table_view(table_word("trigger_depth"), np.int64, 2)
_touched = table_view(table_word("touched"), np.int32, 1)
# the event ring: one buffer of 128-byte slots, one view per event family
_ring_words = table_view(D_RING, np.int64, 2)
_ring_headers = table_view(D_RING, EVENT_DTYPE, 1)
_order_events = table_view(D_RING, ORDER_EVENT_DTYPE, 1)
_trade_events = table_view(D_RING, TRADE_EVENT_DTYPE, 1)
_balance_events = table_view(D_RING, BALANCE_EVENT_DTYPE, 1)
_mark_events = table_view(D_RING, MARK_EVENT_DTYPE, 1)
_funding_events = table_view(D_RING, FUNDING_EVENT_DTYPE, 1)
_liquidation_events = table_view(D_RING, LIQUIDATION_EVENT_DTYPE, 1)
_insurance_events = table_view(D_RING, INSURANCE_EVENT_DTYPE, 1)

_report_accounts = jit(report_accounts)


@jit
def _number_reports(st, cmd, first_pos):
    """Advance account_seq by the reports among the command's events, which start after its
    EV_COMMAND at ring position first_pos - 1 (engine/reports.py: the one rule)."""
    desc = _desc(st)
    mask = desc[D_MASK]
    headers = _ring_headers(st)
    trades = _trade_events(st)
    accounts = _accounts(st)
    n_accounts = len(accounts)
    for pos in range(first_pos, desc[D_WRITE]):
        j = pos & mask
        etype = headers[j].etype
        maker = trades[j].maker_account if etype == EV_TRADE else NO_ACCOUNT
        first, second = _report_accounts(cmd.cmd, pos - first_pos + 1, etype,
                                         headers[j].account, maker, n_accounts)
        if first != NO_ACCOUNT:
            accounts[first].account_seq += 1
        if second != NO_ACCOUNT:
            accounts[second].account_seq += 1


# An order flag no command may carry (_new_order rejects unknown flags): the taker is the
# liquidation engine closing its account's position. It pays no taker fee and its trades are
# marked `liquidation`.
FLAG_LIQUIDATION_TAKER = 0x80

# ---- indexes: open addressing, linear probing, backward-shift deletion --------------------
# Deleting an order's two entries is deferred (see _defer_index_delete): until it happens an
# entry may be stale, naming a slot that no longer holds a resting order with its key, so a
# lookup checks the order it finds (_slot_of_oid, _slot_of_cid).
@jit
def _home(owner, key, mask):
    """Consecutive keys of an owner land on consecutive cache lines (4 buckets each).

    Ids come in runs (oids in sequence, cids numbered by clients). Adjacent buckets would
    form runs of occupied buckets that every backward-shift delete scans to their end; a
    random hash would make every insert a cache miss. A stride of one line keeps the walk
    through memory sequential (the hardware prefetcher follows it) and leaves gaps that end
    runs; starting each key on a line boundary keeps the bucket after it, which a delete
    reads, on the same line.
    """
    return ((key + owner * -7046029254386353131) << 2) & mask


@jit
def _index_find(index, owner, key):
    """The first bucket holding (owner, key): of several (stale ones waiting for their
    deferred delete), the oldest, as inserts go after it and deletes keep their order."""
    mask = len(index) - 1
    i = _home(owner, key, mask)
    while index[i].slot != NONE:
        if index[i].key == key and index[i].owner == owner:
            return i
        i = (i + 1) & mask
    return NONE


@jit
def _index_insert(index, owner, key, slot):
    mask = len(index) - 1
    i = _home(owner, key, mask)
    while index[i].slot != NONE:
        i = (i + 1) & mask
    index[i].key = key
    index[i].owner = owner
    index[i].slot = slot


@jit
def _index_delete(index, i):
    mask = len(index) - 1
    j = i
    while True:
        j = (j + 1) & mask
        if index[j].slot == NONE:
            break
        home = _home(index[j].owner, index[j].key, mask)
        # entry j may move into the hole at i unless its home lies cyclically in (i, j]
        if i <= j:
            stays = i < home <= j
        else:
            stays = home > i or home <= j
        if not stays:
            index[i].key = index[j].key
            index[i].owner = index[j].owner
            index[i].slot = index[j].slot
            i = j
    index[i].slot = NONE


@jit
def _slot_of_oid(st, oid):
    """The slot of the resting order `oid`, or NONE; skips stale entries."""
    index = _oid_index(st)
    mask = len(index) - 1
    i = _home(0, oid, mask)
    while index[i].slot != NONE:
        if index[i].key == oid:
            o = _orders(st)[index[i].slot]
            if o.level != NONE and o.oid == oid:
                return index[i].slot
        i = (i + 1) & mask
    return NONE


@jit
def _slot_of_cid(st, account, cid):
    """The slot of the account's resting order `cid`, or NONE; skips stale entries."""
    index = _cid_index(st)
    mask = len(index) - 1
    i = _home(account, cid, mask)
    while index[i].slot != NONE:
        if index[i].key == cid and index[i].owner == account:
            o = _orders(st)[index[i].slot]
            if o.level != NONE and o.account == account and o.cid == cid:
                return index[i].slot
        i = (i + 1) & mask
    return NONE


@jit
def _defer_index_delete(st, o):
    """Queue the deletion of order `o`'s index entries; do the one queued DEFERRED_DELETES
    unrests ago.

    A delete must find its entry, and that bucket is usually a cache miss (the indexes are
    large and their live entries scattered): done at once it stalled the matcher (~7% of its
    time). Prefetched now and deleted later, it finds the bucket in cache. The queue is part
    of the state (a deterministic function of the commands), so is the index with its stale
    entries.
    """
    oid_index = _oid_index(st)
    cid_index = _cid_index(st)
    prefetch(oid_index, _home(0, o.oid, len(oid_index) - 1))
    prefetch(cid_index, _home(o.account, o.cid, len(cid_index) - 1))
    queue = _index_deletes(st)
    n = _counters(st)[C_UNRESTS]
    k = n & (len(queue) - 1)
    if n >= len(queue):
        _index_delete(oid_index, _index_find(oid_index, 0, queue[k, 0]))
        _index_delete(cid_index, _index_find(cid_index, queue[k, 1], queue[k, 2]))
    queue[k, 0] = o.oid
    queue[k, 1] = o.account
    queue[k, 2] = o.cid
    _counters(st)[C_UNRESTS] = n + 1


# ---- events -------------------------------------------------------------------------------
@jit
def _claim(st, cmd, etype, market, account):
    """Next ring slot, zeroed, with the header of the current command written."""
    desc = _desc(st)
    pos = desc[D_WRITE]
    desc[D_WRITE] = pos + 1
    j = pos & desc[D_MASK]
    # a fixed trip count over a view taken once: a few vector stores, where re-deriving the
    # view after each store (it might alias the descriptor) made 16 load-store pairs
    words = _ring_words(st)
    for w in range(EVENT_BYTES // 8):
        words[j, w] = 0
    hdr = _ring_headers(st)[j]
    hdr.seq = desc[D_SEQ]
    hdr.ts_ns = cmd.ts_ns
    hdr.etype = etype
    hdr.source = desc[D_SOURCE]
    hdr.market = market
    hdr.account = account
    return j


@jit
def _order_event(st, cmd, etype, market, account, req, reason, status, side, kind, oid, cid,
                 price_ticks, qty_lots, remaining_lots):
    j = _claim(st, cmd, etype, market, account)
    e = _order_events(st)[j]
    e.req = req
    e.reason = reason
    e.status = status
    e.side = side
    e.kind = kind
    e.oid = oid
    e.cid = cid
    e.price_ticks = price_ticks
    e.qty_lots = qty_lots
    e.remaining_lots = remaining_lots
    return j


@jit
def _reject(st, cmd, reason):
    _order_event(st, cmd, EV_REJECT, cmd.market, cmd.account, cmd.req, reason, 0, cmd.side,
                 cmd.kind, cmd.oid, cmd.cid, 0, 0, 0)


@jit
def _done(st, cmd, count):
    _order_event(st, cmd, EV_DONE, cmd.market, cmd.account, cmd.req, 0, 0, 0, 0, 0, 0, 0,
                 count, 0)


@jit
def _req_for(cmd, account):
    return cmd.req if account == cmd.account else 0


@jit
def _canceled(st, cmd, slot, reason, canceled_lots):
    o = _orders(st)[slot]
    _order_event(st, cmd, EV_CANCELED, o.market, o.account, _req_for(cmd, o.account), reason,
                 STATUS_CANCELED, o.side, o.kind, o.oid, o.cid, o.price_ticks, 0, canceled_lots)


# ---- book sides: sorted price keys, best (largest key) last -------------------------------
@jit
def _key(side, price_ticks):
    return price_ticks if side == SIDE_BUY else -price_ticks


@jit
def _lower_bound(keys, market, side, n, key):
    """First index whose key is >= key (keys ascend, the best price last).

    Most activity is near the top of the book, so scan down from the end first, then bisect.
    """
    k = n
    while k > 0 and k > n - TOP_SCAN and keys[market, side, k - 1] >= key:
        k -= 1
    if k == 0 or keys[market, side, k - 1] < key:
        return k
    lo = 0
    hi = k
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[market, side, mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


TOP_SCAN = 16   # levels from the top scanned linearly before a binary search


@jit
def _find_level(st, market, side, price_ticks):
    """Level slot at this price, or NONE."""
    n = _book_depth(st)[market, side]
    keys = _book_keys(st)
    key = _key(side, price_ticks)
    k = _lower_bound(keys, market, side, n, key)
    if k < n and keys[market, side, k] == key:
        return _book_levels(st)[market, side, k]
    return NONE


@jit
def _best_level(st, market, side):
    n = _book_depth(st)[market, side]
    if n == 0:
        return NONE
    return _book_levels(st)[market, side, n - 1]


@jit
def _level_full(st, market, side, price_ticks, max_levels):
    return (_book_depth(st)[market, side] >= max_levels
            and _find_level(st, market, side, price_ticks) == NONE)


@jit
def _add_level(st, market, side, price_ticks):
    lvl = _counters(st)[C_FREE_LEVEL]
    _counters(st)[C_FREE_LEVEL] = _levels(st)[lvl].next_free
    lv = _levels(st)[lvl]
    lv.price_ticks = price_ticks
    lv.qty_lots = 0
    lv.first = NONE
    lv.last = NONE
    lv.orders = 0
    lv.next_free = NONE
    n = _book_depth(st)[market, side]
    keys = _book_keys(st)
    levels = _book_levels(st)
    key = _key(side, price_ticks)
    k = _lower_bound(keys, market, side, n, key)
    for i in range(n, k, -1):
        keys[market, side, i] = keys[market, side, i - 1]
        levels[market, side, i] = levels[market, side, i - 1]
    keys[market, side, k] = key
    levels[market, side, k] = lvl
    _book_depth(st)[market, side] = n + 1
    return lvl


@jit
def _remove_level(st, market, side, lvl):
    n = _book_depth(st)[market, side]
    keys = _book_keys(st)
    levels = _book_levels(st)
    key = _key(side, _levels(st)[lvl].price_ticks)
    k = _lower_bound(keys, market, side, n, key)
    for i in range(k, n - 1):
        keys[market, side, i] = keys[market, side, i + 1]
        levels[market, side, i] = levels[market, side, i + 1]
    _book_depth(st)[market, side] = n - 1
    _levels(st)[lvl].next_free = _counters(st)[C_FREE_LEVEL]
    _counters(st)[C_FREE_LEVEL] = lvl


# ---- resting orders -----------------------------------------------------------------------
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


# ---- margin -------------------------------------------------------------------------------
@jit
def _exposure_lots(size, open_buy, open_sell):
    a = size + open_buy
    b = size - open_sell
    a = a if a >= 0 else -a
    b = b if b >= 0 else -b
    return a if a > b else b


@jit
def _upnl(mk, pos):
    return pos.size_lots * mk.mark_ticks * mk.atoms_per_tick_lot - pos.cost_atoms


NO_LEVERAGE_CAP = 1 << 62   # MARKET_DTYPE.full_leverage_below_atoms of a market without caps


@jit
def _leverage_cap(mk, notional_atoms):
    """The max leverage of the bracket a notional falls in (the market's max below the floor
    of the first bracket that caps it)."""
    if notional_atoms < mk.full_leverage_below_atoms:
        return mk.max_leverage
    k = mk.n_brackets - 1
    while k > 0 and mk.bracket_floor_atoms[k] > notional_atoms:
        k -= 1
    return mk.bracket_max_leverage[k]


@jit
def _margin_per_lot(mk, leverage, exposure_lots):
    """engine.risk.effective_leverage: initial margin of one lot at the mark, at the leverage
    setting (0: the market's max) capped by the max leverage of the bracket that exposure_lots
    at the mark fall in. Below the first capped bracket's floor no lookup is needed."""
    notional = exposure_lots * mk.mark_ticks * mk.atoms_per_tick_lot
    if notional >= mk.full_leverage_below_atoms:
        cap = _leverage_cap(mk, notional)
        if leverage == 0 or cap < leverage:
            leverage = cap
    if leverage == 0:
        return mk.margin_per_lot_atoms
    return mul_div_ceil(mk.mark_ticks, mk.atoms_per_tick_lot, leverage)


@jit
def _entry_cost(st, market, account, side, limit_ticks, qty, rests, walk):
    """engine.risk.entry_cost_atoms of an order entering the book now, with the furthest
    price its lots can trade at as reference._worst_price finds it (walk: a market order's
    walk of the book; else the limit)."""
    mk = _markets(st)[market]
    opposite = 1 - side
    if not walk:
        best_lvl = _best_level(st, market, opposite)
        best = 0
        if best_lvl != NONE and _crosses(side, limit_ticks, _levels(st)[best_lvl].price_ticks):
            best = _levels(st)[best_lvl].price_ticks
        if best == 0 and not rests:
            return 0
        return _cost_at(mk, side, limit_ticks, best, qty)
    n = _book_depth(st)[market, opposite]
    pos = _positions(st)[account, market]
    # With no reduce-only maker in the market and none of the account's own orders on the
    # other side, a level's total is what the walk would count: no need to visit its orders.
    own = pos.open_sell_lots if side == SIDE_BUY else pos.open_buy_lots
    by_level = mk.resting_reduce_only == 0 and own == 0
    worst = 0
    best = 0
    total = 0
    for k in range(n - 1, -1, -1):
        lvl = _book_levels(st)[market, opposite, k]
        price = _levels(st)[lvl].price_ticks
        if not _crosses(side, limit_ticks, price):
            break
        if worst == 0:
            best = price
        worst = price
        if by_level:
            total += _levels(st)[lvl].qty_lots
        else:
            slot = _levels(st)[lvl].first
            while slot != NONE and total < qty:
                o = _orders(st)[slot]
                if o.account != account and (o.flags & FLAG_REDUCE_ONLY) == 0:
                    total += o.remaining_lots
                slot = o.next
        if total >= qty:
            break
    if total < qty and rests:
        worst = limit_ticks
    if worst == 0:
        return 0
    return _cost_at(mk, side, worst, best, qty)


@jit
def _cost_at(mk, side, worst, best, qty):
    """qty's loss against the mark at worst, plus the taker fee bound when it crosses (best:
    the best crossing price, 0 when none)."""
    gap = worst - mk.mark_ticks if side == SIDE_BUY else mk.mark_ticks - worst
    cost = qty * gap * mk.atoms_per_tick_lot if gap > 0 else 0
    if best != 0 and mk.taker_fee_e9 > 0:
        fee_price = worst if side == SIDE_BUY else best
        cost += mul_div_ceil(qty * fee_price * mk.atoms_per_tick_lot, mk.taker_fee_e9,
                             RATE_ONE_E9) + qty
    return cost


@jit
def _equity_and_requirement(st, account, extra_market, extra_buy, extra_sell, extra_leverage):
    """(cross equity, initial margin required); extra_* as if the account had extra open lots
    (or another leverage, when > 0) in extra_market. An isolated position's own lots are backed
    by its isolated margin: only its open orders beyond the position count here."""
    equity = _accounts(st)[account].balance_atoms
    required = 0
    for m in range(len(_markets(st))):
        mk = _markets(st)[m]
        if mk.active == 0:
            continue
        pos = _positions(st)[account, m]
        buy = pos.open_buy_lots
        sell = pos.open_sell_lots
        leverage = pos.leverage
        if m == extra_market:
            buy += extra_buy
            sell += extra_sell
            if extra_leverage > 0:
                leverage = extra_leverage
        elif pos.size_lots == 0 and buy == 0 and sell == 0:
            continue
        exposure = _exposure_lots(pos.size_lots, buy, sell)
        per_lot = _margin_per_lot(mk, leverage, exposure)
        if pos.margin_mode == MARGIN_ISOLATED:
            required += _isolated_requirement(pos.size_lots, buy, sell,
                                              pos.isolated_margin_atoms + _upnl(mk, pos), per_lot)
        else:
            equity += _upnl(mk, pos)
            required += exposure * per_lot
    return equity, required


@jit
def _isolated_requirement(size, buy, sell, isolated_equity, per_lot):
    """engine.risk.isolated_requirement_atoms: the larger drain on the cross balance of the
    orders growing an isolated position or closing (and maybe flipping) it."""
    growing = buy if size >= 0 else sell
    closing = sell if size >= 0 else buy
    drain = growing * per_lot
    if growing > 0:
        shortfall = (size if size >= 0 else -size) * per_lot - isolated_equity
        if shortfall > 0:
            drain += shortfall
    if closing > 0:
        flip = closing - (size if size >= 0 else -size)
        if flip < 0:
            flip = 0
        closing_drain = flip * per_lot - isolated_equity
        if closing_drain > drain:
            drain = closing_drain
    return drain if drain > 0 else 0


@jit
def _exposure_error(st, account, market, add_buy, add_sell, check_margin, entry_cost):
    mk = _markets(st)[market]
    pos = _positions(st)[account, market]
    if _exposure_lots(pos.size_lots, pos.open_buy_lots + add_buy,
                      pos.open_sell_lots + add_sell) > mk.max_position_lots:
        return REASON_POSITION_LIMIT
    if not check_margin:
        return 0
    equity, required = _equity_and_requirement(st, account, market, add_buy, add_sell, 0)
    if equity - required - entry_cost < 0:
        return REASON_INSUFFICIENT_MARGIN
    return 0


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
def _open_interest_error(mk, pos, side, qty):
    """reference._open_interest_error: would the lots the order opens (beyond closing its
    account's position) raise the open interest above the market's cap?"""
    if mk.open_interest_cap_lots == 0:
        return False
    closing = _closing_lots(pos.size_lots, side)
    opening = qty - (closing if closing > 0 else 0)
    return opening > 0 and mk.open_interest_lots + opening > mk.open_interest_cap_lots


@jit
def _untriggered_of(st, account, market):
    """The account's untriggered orders in the market (a walk of its order list: only stop
    and take-profit placements pay for it)."""
    n = 0
    slot = _accounts(st)[account].first_order
    while slot != NONE:
        o = _orders(st)[slot]
        if o.market == market and o.level == UNTRIGGERED:
            n += 1
        slot = o.account_next
    return n


@jit
def _set_mark_ticks(mk, mark_ticks):
    mk.mark_ticks = mark_ticks
    mk.band_dev_ticks = mul_div_floor(mark_ticks, mk.price_band_e9, RATE_ONE_E9)
    mk.margin_per_lot_atoms = mul_div_ceil(mark_ticks, mk.atoms_per_tick_lot, mk.max_leverage)


@jit
def _outside_band(mk, price_ticks):
    d = price_ticks - mk.mark_ticks
    if d < 0:
        d = -d
    return d > mk.band_dev_ticks


@jit
def _band_limit(mk, side):
    dev = mk.band_dev_ticks
    if side == SIDE_BUY:
        p = mk.mark_ticks + dev
        return p if p < mk.max_price_ticks else mk.max_price_ticks
    p = mk.mark_ticks - dev
    return p if p > 1 else 1


@jit
def _crosses(side, limit_ticks, opposite_ticks):
    if side == SIDE_BUY:
        return opposite_ticks <= limit_ticks
    return opposite_ticks >= limit_ticks


@jit
def _closing_lots(size, side):
    """How much an order on `side` would close of a position of `size` (<= 0: none)."""
    return -size if side == SIDE_BUY else size


# ---- matching -----------------------------------------------------------------------------
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
    n = _book_depth(st)[market, opposite]
    total = 0
    ok = False
    n_seen = 0
    for k in range(n - 1, -1, -1):
        lvl = _book_levels(st)[market, opposite, k]
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


# ---- the trigger book -----------------------------------------------------------------------
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
            st, market, o.side, limit, _book_keys(st).shape[2]):
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


# ---- commands -----------------------------------------------------------------------------
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
def _settle_market(st, cmd):
    """reference._settle_market: cancel the market's orders, close its positions at the
    settlement price (the mark first), cover negative balances from the fund; settled."""
    market = cmd.market
    price = cmd.price_ticks
    if not _market_ok(st, market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    mk = _markets(st)[market]
    if mk.state == MARKET_SETTLED:
        return _reject(st, cmd, REASON_MARKET_SETTLED)
    if price < 1 or price > mk.max_price_ticks:
        return _reject(st, cmd, REASON_INVALID_PRICE)
    _set_mark_ticks(mk, price)
    j = _claim(st, cmd, EV_MARK, market, cmd.account)
    e = _mark_events(st)[j]
    e.req = cmd.req
    e.mark_ticks = price
    mk.state = MARKET_SETTLED
    mk.halted = 1
    n_accounts = len(_accounts(st))
    for account in range(n_accounts):
        slot = _accounts(st)[account].first_order
        while slot != NONE:
            nxt = _orders(st)[slot].account_next
            if _orders(st)[slot].market == market:
                _cancel_open(st, cmd, slot, REASON_HALT)
            slot = nxt
    closed = 0
    for account in range(n_accounts):
        size = _positions(st)[account, market].size_lots
        if size == 0:
            continue
        side = SIDE_SELL if size > 0 else SIDE_BUY
        lots = size if size > 0 else -size
        _apply_fill(st, account, market, side, lots, price, 0)
        _liquidation_event(st, cmd, market, account, LIQ_KIND_SETTLEMENT, side, lots, price,
                           price, 0, -1)
        _cover_deficit(st, cmd, account, -1, 0)
        closed += 1
    _done(st, cmd, closed)


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
            or _level_full(st, market, side, price, _book_keys(st).shape[2])):
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
    if new_price != o.price_ticks and _level_full(st, o.market, o.side, new_price,
                                                  _book_keys(st).shape[2]):
        return _reject(st, cmd, REASON_TOO_MANY_ORDERS)
    grow = new_qty - o.remaining_lots
    if grow > 0 or new_price != o.price_ticks:
        # a re-priced order enters again: its loss against the mark (and the taker fee when
        # it crosses) is checked as for a new order
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


# ---- perpetual risk (engine/reference.py has the same rules in plain Python) --------------
@jit
def _set_market_risk(st, cmd):
    if not _market_ok(st, cmd.market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if market_risk_problem(cmd.cid, cmd.oid) != 0:
        return _reject(st, cmd, REASON_INVALID_MARKET_CONFIG)
    mk = _markets(st)[cmd.market]
    mk.liquidation_fee_e9 = cmd.cid
    mk.funding_cap_e9 = cmd.oid
    _done(st, cmd, 0)


@jit
def _set_bracket(st, cmd):
    if not _market_ok(st, cmd.market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    mk = _markets(st)[cmd.market]
    n = mk.n_brackets
    prev_floor = mk.bracket_floor_atoms[n - 1] if n > 0 else 0
    prev_rate = mk.bracket_rate_e9[n - 1] if n > 0 else 0
    prev_amount = mk.bracket_amount_atoms[n - 1] if n > 0 else 0
    prev_leverage = mk.bracket_max_leverage[n - 1] if n > 0 else mk.max_leverage
    leverage = bracket_leverage(cmd.qty_lots, cmd.price_ticks, prev_leverage)
    if bracket_problem(n, cmd.kind, cmd.amount_atoms, cmd.price_ticks, prev_floor, prev_rate,
                       mk.max_leverage, leverage, prev_leverage) != 0:
        return _reject(st, cmd, REASON_INVALID_MARKET_CONFIG)
    mk.bracket_max_leverage[n] = leverage
    if leverage < mk.max_leverage and mk.full_leverage_below_atoms == NO_LEVERAGE_CAP:
        mk.full_leverage_below_atoms = cmd.amount_atoms
    mk.bracket_floor_atoms[n] = cmd.amount_atoms
    mk.bracket_rate_e9[n] = cmd.price_ticks
    mk.bracket_amount_atoms[n] = prev_amount + mul_div_floor(
        cmd.amount_atoms, cmd.price_ticks - prev_rate, RATE_ONE_E9)
    mk.n_brackets = n + 1
    _done(st, cmd, 0)


@jit
def _set_margin(st, cmd):
    market = cmd.market
    account = cmd.account
    if not _market_ok(st, market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if not _account_ok(st, account):
        return _reject(st, cmd, REASON_UNKNOWN_ACCOUNT)
    if _accounts(st)[account].disabled != 0:
        return _reject(st, cmd, REASON_ACCOUNT_DISABLED)
    mode = cmd.kind
    leverage = cmd.qty_lots
    mk = _markets(st)[market]
    if mode > MARGIN_ISOLATED:
        return _reject(st, cmd, REASON_INVALID_MESSAGE)
    pos = _positions(st)[account, market]
    # not above the max leverage of the bracket the current position falls in
    size = pos.size_lots if pos.size_lots >= 0 else -pos.size_lots
    if leverage < 1 or leverage > _leverage_cap(mk, size * mk.mark_ticks * mk.atoms_per_tick_lot):
        return _reject(st, cmd, REASON_LEVERAGE)
    if mode != pos.margin_mode and (pos.size_lots != 0 or pos.open_orders != 0):
        return _reject(st, cmd, REASON_MARGIN_MODE_LOCKED)
    equity, required = _equity_and_requirement(st, account, -1, 0, 0, 0)
    _, new_required = _equity_and_requirement(st, account, market, 0, 0, leverage)
    if new_required > required and equity - new_required < 0:
        return _reject(st, cmd, REASON_INSUFFICIENT_MARGIN)
    pos.margin_mode = mode
    pos.leverage = leverage
    _accounts(st)[account].changed_seq = _counters(st)[C_SEQ]
    _done(st, cmd, 0)


@jit
def _set_market_filters(st, cmd):
    if not _market_ok(st, cmd.market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if market_filters_problem(cmd.amount_atoms, cmd.qty_lots, cmd.price_ticks) != 0:
        return _reject(st, cmd, REASON_INVALID_MARKET_CONFIG)
    mk = _markets(st)[cmd.market]
    mk.min_notional_atoms = cmd.amount_atoms
    mk.max_stop_orders = cmd.qty_lots
    mk.open_interest_cap_lots = cmd.price_ticks
    _done(st, cmd, 0)


@jit
def _insurance_deposit(st, cmd):
    amount = cmd.amount_atoms
    if (amount < 1 or amount > MAX_BALANCE_ATOMS - _counters(st)[C_INSURANCE_ATOMS]
            or amount > MAX_NET_DEPOSITS_ATOMS - _counters(st)[C_NET_DEPOSITS_ATOMS]):
        return _reject(st, cmd, REASON_INVALID_MESSAGE)
    _counters(st)[C_NET_DEPOSITS_ATOMS] += amount
    _insure(st, cmd, INSURANCE_DEPOSIT, amount, cmd.market, cmd.account)
    _done(st, cmd, 0)


@jit
def _insure(st, cmd, reason, amount, market, account):
    """Change the insurance fund by amount, with its event (none when 0)."""
    if amount == 0:
        return
    fund = _counters(st)[C_INSURANCE_ATOMS] + amount
    _counters(st)[C_INSURANCE_ATOMS] = fund
    j = _claim(st, cmd, EV_INSURANCE, market, account)
    e = _insurance_events(st)[j]
    e.req = _req_for(cmd, account)
    e.reason = reason
    e.amount_atoms = amount
    e.fund_atoms = fund


@jit
def _funding(st, cmd):
    market = cmd.market
    if not _market_ok(st, market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    mk = _markets(st)[market]
    rate = cmd.oid
    magnitude = rate if rate >= 0 else -rate
    if magnitude > mk.funding_cap_e9:
        return _reject(st, cmd, REASON_FUNDING_CAP)
    count = 0
    residue = 0
    seq = _counters(st)[C_SEQ]
    for account in range(len(_accounts(st))):
        pos = _positions(st)[account, market]
        size = pos.size_lots
        if size == 0:
            continue
        notional = (size if size > 0 else -size) * mk.mark_ticks * mk.atoms_per_tick_lot
        if (size > 0) == (rate > 0):
            payment = -mul_div_ceil(notional, magnitude, RATE_ONE_E9)
        else:
            payment = mul_div_floor(notional, magnitude, RATE_ONE_E9)
        residue -= payment
        acct = _accounts(st)[account]
        if pos.margin_mode == MARGIN_ISOLATED:
            pos.isolated_margin_atoms += payment
            after = pos.isolated_margin_atoms
        else:
            acct.balance_atoms += payment
            after = acct.balance_atoms
        acct.changed_seq = seq
        j = _claim(st, cmd, EV_FUNDING, market, account)
        e = _funding_events(st)[j]
        e.req = _req_for(cmd, account)
        e.rate_e9 = rate
        e.size_lots = size
        e.mark_ticks = mk.mark_ticks
        e.payment_atoms = payment
        e.balance_atoms = after
        count += 1
    _insure(st, cmd, INSURANCE_FUNDING_RESIDUE, residue, market, cmd.account)
    _done(st, cmd, count)


@jit
def _maintenance(mk, pos):
    """ceil(notional x rate_k / 1e9) - amount_k, k the highest bracket with floor <= notional."""
    size = pos.size_lots if pos.size_lots >= 0 else -pos.size_lots
    notional = size * mk.mark_ticks * mk.atoms_per_tick_lot
    k = mk.n_brackets - 1
    while k >= 0 and mk.bracket_floor_atoms[k] > notional:
        k -= 1
    if k < 0:
        return 0
    return mul_div_ceil(notional, mk.bracket_rate_e9[k], RATE_ONE_E9) - mk.bracket_amount_atoms[k]


@jit
def _cross_equity(st, account, skip_market):
    equity = _accounts(st)[account].balance_atoms
    for m in range(len(_markets(st))):
        pos = _positions(st)[account, m]
        if pos.size_lots != 0 and pos.margin_mode == MARGIN_CROSS and m != skip_market:
            equity += _upnl(_markets(st)[m], pos)
    return equity


@jit
def _liquidatable(st, account, scope):
    """scope -1: the account's cross positions; else its isolated position in that market."""
    if scope == -1:
        maintenance = 0
        has_position = False
        for m in range(len(_markets(st))):
            pos = _positions(st)[account, m]
            if pos.size_lots != 0 and pos.margin_mode == MARGIN_CROSS:
                has_position = True
                maintenance += _maintenance(_markets(st)[m], pos)
        return has_position and _cross_equity(st, account, -1) < maintenance
    pos = _positions(st)[account, scope]
    if pos.margin_mode != MARGIN_ISOLATED or pos.size_lots == 0:
        return False
    mk = _markets(st)[scope]
    return pos.isolated_margin_atoms + _upnl(mk, pos) < _maintenance(mk, pos)


@jit
def _position_equity(st, account, market):
    """The equity behind one position: cross equity, or isolated margin + uPnL."""
    pos = _positions(st)[account, market]
    if pos.margin_mode == MARGIN_ISOLATED:
        return pos.isolated_margin_atoms + _upnl(_markets(st)[market], pos)
    return _cross_equity(st, account, -1)


@jit
def _bankruptcy_limit(st, account, market):
    """engine.risk.bankruptcy_price_ticks, clamped to the market's prices [1, max]."""
    pos = _positions(st)[account, market]
    mk = _markets(st)[market]
    if pos.margin_mode == MARGIN_ISOLATED:
        other = pos.isolated_margin_atoms
    else:
        other = _cross_equity(st, account, market)
    num = pos.cost_atoms - other
    den = pos.size_lots * mk.atoms_per_tick_lot
    price = -((-num) // den) if pos.size_lots > 0 else num // den
    if price < 1:
        return 1
    return price if price < mk.max_price_ticks else mk.max_price_ticks


@jit
def _cover_deficit(st, cmd, account, scope, balance_before):
    """The fund pays what it can of the realized loss the liquidation left (reference
    ._cover_deficit): the negative balance, or for an isolated position the balance's fall
    since balance_before; at most the scope's negative equity. Credited to the balance."""
    acct = _accounts(st)[account]
    if scope == -1:
        realized = acct.balance_atoms
        equity = _cross_equity(st, account, -1)
    else:
        pos = _positions(st)[account, scope]
        realized = acct.balance_atoms - balance_before
        equity = pos.isolated_margin_atoms + _upnl(_markets(st)[scope], pos) + realized
    cover = -realized if -realized < -equity else -equity
    fund = _counters(st)[C_INSURANCE_ATOMS]
    if fund < cover:
        cover = fund
    if cover <= 0:
        return
    _insure(st, cmd, INSURANCE_DEFICIT, -cover, scope, account)
    acct.balance_atoms += cover
    acct.changed_seq = _counters(st)[C_SEQ]
    _balance_event(st, cmd, scope, account, cover, acct.balance_atoms)


@jit
def _liquidation_event(st, cmd, market, account, kind, side, qty, price, bankrupt, fee,
                       counterparty):
    j = _claim(st, cmd, EV_LIQUIDATION, market, account)
    e = _liquidation_events(st)[j]
    e.req = _req_for(cmd, account)
    e.kind = kind
    e.side = side
    e.qty_lots = qty
    e.price_ticks = price
    e.bankruptcy_ticks = bankrupt
    e.fee_atoms = fee
    e.counterparty = counterparty
    e.size_lots = _positions(st)[account, market].size_lots


@jit
def _liquidate(st, cmd, scratch):
    account = cmd.account
    scope = cmd.market
    if not _account_ok(st, account):
        return _reject(st, cmd, REASON_UNKNOWN_ACCOUNT)
    if scope != -1 and not _market_ok(st, scope):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if not _liquidatable(st, account, scope):
        return _reject(st, cmd, REASON_NOT_LIQUIDATABLE)
    slot = _accounts(st)[account].first_order
    while slot != NONE:
        nxt = _orders(st)[slot].account_next
        if scope == -1 or _orders(st)[slot].market == scope:
            _cancel_open(st, cmd, slot, REASON_LIQUIDATION)
        slot = nxt
    balance_before = _accounts(st)[account].balance_atoms
    closed = 0
    for m in range(len(_markets(st))):
        pos = _positions(st)[account, m]
        if scope == -1:
            if pos.size_lots == 0 or pos.margin_mode != MARGIN_CROSS:
                continue
        elif m != scope:
            continue
        lots, n_touched = _liquidate_position(st, cmd, account, m, scope, scratch,
                                              balance_before)
        closed += lots
        # its trades moved the last price: the market's triggers may fire, then the sweep
        n_touched = _after_trading(st, cmd, m, scratch, n_touched)
        # the next market's sweep starts a fresh list of touched accounts
        for t in range(n_touched):
            _accounts(st)[_touched(st)[t]].touched_seq = 0
    _cover_deficit(st, cmd, account, scope, balance_before)
    _done(st, cmd, closed)


@jit
def _liquidate_position(st, cmd, account, market, scope, scratch, balance_before):
    """Close into the book by IOC steps at the bankruptcy price while the scope stays
    liquidatable; when the book takes no more, the fund covers the realized loss so far, and
    the rest is auto-deleveraged. Returns (lots closed, n_touched)."""
    mk = _markets(st)[market]
    pos = _positions(st)[account, market]
    acct = _accounts(st)[account]
    closed = 0
    n_touched = 0
    for _ in range(LIQUIDATION_MAX_STEPS):
        if pos.size_lots == 0 or not _liquidatable(st, account, scope):
            return closed, n_touched
        bankrupt = _bankruptcy_limit(st, account, market)
        side = SIDE_SELL if pos.size_lots > 0 else SIDE_BUY
        size = pos.size_lots if pos.size_lots > 0 else -pos.size_lots
        qty = size if size < mk.max_order_lots else mk.max_order_lots
        o = _orders(st)[scratch]
        o.oid = 0
        o.cid = 0
        o.price_ticks = bankrupt
        o.remaining_lots = qty
        o.account = account
        o.market = market
        o.side = side
        o.kind = KIND_LIMIT
        o.tif = TIF_IOC
        o.flags = FLAG_LIQUIDATION_TAKER
        o.stp = STP_CANCEL_MAKER
        o.level = NONE
        balance_before = acct.balance_atoms
        _, n_touched = _match(st, cmd, scratch, bankrupt, n_touched)
        filled = qty - o.remaining_lots
        if filled == 0:
            _cover_deficit(st, cmd, account, scope, balance_before)
            lots, n_touched = _auto_deleverage(st, cmd, account, market, n_touched)
            return closed + lots, n_touched
        closed += filled
        # the equity the fee may take: an isolated position's closed part was paid out to the
        # balance (released margin and realized PnL)
        if scope == -1:
            equity = _cross_equity(st, account, -1)
        else:
            equity = (pos.isolated_margin_atoms + _upnl(mk, pos) + acct.balance_atoms
                      - balance_before)
        fee = fee_atoms(filled * mk.mark_ticks * mk.atoms_per_tick_lot, mk.liquidation_fee_e9)
        if equity < 0:
            equity = 0
        if fee > equity:
            fee = equity
        acct.balance_atoms -= fee
        _liquidation_event(st, cmd, market, account, LIQ_KIND_LIQUIDATED, side, filled,
                           mk.last_trade_ticks, bankrupt, fee, -1)
        _insure(st, cmd, INSURANCE_LIQUIDATION_FEE, fee, market, account)
    return closed, n_touched


@jit
def _auto_deleverage(st, cmd, account, market, n_touched):
    """Close the position at its bankruptcy price against the best-ranked opposite positions
    (BitMEX's ranking), at most ADL_MAX_COUNTERPARTIES of them. Returns (lots, n_touched)."""
    pos = _positions(st)[account, market]
    bankrupt = _bankruptcy_limit(st, account, market)
    closed = 0
    for _ in range(ADL_MAX_COUNTERPARTIES):
        if pos.size_lots == 0:
            break
        other = _adl_counterparty(st, account, market, pos.size_lots)
        if other == NONE:
            break
        size = pos.size_lots if pos.size_lots > 0 else -pos.size_lots
        other_size = _positions(st)[other, market].size_lots
        if other_size < 0:
            other_size = -other_size
        qty = size if size < other_size else other_size
        side = SIDE_SELL if pos.size_lots > 0 else SIDE_BUY
        _apply_fill(st, account, market, side, qty, bankrupt, 0)
        _apply_fill(st, other, market, 1 - side, qty, bankrupt, 0)
        n_touched = _touch(st, other, n_touched)
        _liquidation_event(st, cmd, market, account, LIQ_KIND_ADL, side, qty, bankrupt,
                           bankrupt, 0, other)
        _liquidation_event(st, cmd, market, other, LIQ_KIND_ADL, 1 - side, qty, bankrupt,
                           bankrupt, 0, account)
        closed += qty
    return closed, n_touched


@jit
def _adl_factors(st, account, market):
    """engine.risk.adl_score as (profitable, a, b, c, d): the score is a*b/(c*d) when
    profitable, else -(a*b)/(c*d); all four factors >= 0 (< 2**63)."""
    mk = _markets(st)[market]
    pos = _positions(st)[account, market]
    size = pos.size_lots if pos.size_lots >= 0 else -pos.size_lots
    upnl = _upnl(mk, pos)
    entry = pos.cost_atoms if pos.cost_atoms >= 0 else -pos.cost_atoms
    entry = entry if entry > 1 else 1
    equity = _position_equity(st, account, market)
    equity = equity if equity > 1 else 1
    notional = size * mk.mark_ticks * mk.atoms_per_tick_lot
    notional = notional if notional > 1 else 1
    if upnl > 0:
        return True, upnl, notional, entry, equity
    return False, -upnl, equity, entry, notional


@jit
def _adl_counterparty(st, account, market, size_lots):
    """The best-ranked position opposite size_lots (ties: the lower account), or NONE."""
    best = NONE
    b_up = False
    b_a = b_b = b_c = b_d = 0
    for other in range(len(_accounts(st))):
        size = _positions(st)[other, market].size_lots
        if other == account or size == 0 or (size > 0) == (size_lots > 0):
            continue
        up, a, b, c, d = _adl_factors(st, other, market)
        if best == NONE:
            better = True
        elif up != b_up:
            better = up
        else:
            # compare a*b/(c*d) with the best's by cross-multiplying, exactly
            order = _compare_products(a, b, b_c, b_d, b_a, b_b, c, d)
            better = order > 0 if up else order < 0
        if better:
            best = other
            b_up = up
            b_a = a
            b_b = b
            b_c = c
            b_d = d
    return best


_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)


@jit
def _mul_wide(x, y):
    """(high, low) 64-bit words of x * y for uint64 x, y."""
    x0 = x & _LOW32
    x1 = x >> _SHIFT32
    y0 = y & _LOW32
    y1 = y >> _SHIFT32
    p00 = x0 * y0
    p01 = x0 * y1
    p10 = x1 * y0
    mid = (p00 >> _SHIFT32) + (p01 & _LOW32) + (p10 & _LOW32)
    low = (p00 & _LOW32) | ((mid & _LOW32) << _SHIFT32)
    high = x1 * y1 + (p01 >> _SHIFT32) + (p10 >> _SHIFT32) + (mid >> _SHIFT32)
    return high, low


@jit
def _product4(a, b, c, d):
    """a*b*c*d for int64 a..d >= 0 as four 64-bit words, most significant first."""
    h1, l1 = _mul_wide(np.uint64(a), np.uint64(b))
    h2, l2 = _mul_wide(np.uint64(c), np.uint64(d))
    c1, c0 = _mul_wide(l1, l2)
    d1, d0 = _mul_wide(l1, h2)
    e1, e0 = _mul_wide(h1, l2)
    f1, f0 = _mul_wide(h1, h2)
    w1 = c1 + d0
    carry = _ONE if w1 < d0 else _ZERO
    w1 = w1 + e0
    carry += _ONE if w1 < e0 else _ZERO
    w2 = d1 + e1
    carry2 = _ONE if w2 < e1 else _ZERO
    w2 = w2 + f0
    carry2 += _ONE if w2 < f0 else _ZERO
    w2 = w2 + carry
    carry2 += _ONE if w2 < carry else _ZERO
    return f1 + carry2, w2, w1, c0


@jit
def _compare_products(a, b, c, d, e, f, g, h):
    """Sign of a*b*c*d - e*f*g*h for int64 factors >= 0, exactly (256-bit products)."""
    x3, x2, x1, x0 = _product4(a, b, c, d)
    y3, y2, y1, y0 = _product4(e, f, g, h)
    if x3 != y3:
        return 1 if x3 > y3 else -1
    if x2 != y2:
        return 1 if x2 > y2 else -1
    if x1 != y1:
        return 1 if x1 > y1 else -1
    if x0 != y0:
        return 1 if x0 > y0 else -1
    return 0


# ---- the batch loop -----------------------------------------------------------------------
@jit
def _taker_bound(st, account, market, side, qty):
    """Most events an order of `qty` lots can cause when it takes.

    Each trade fills at least a lot; each of the account's own resting orders it meets is
    canceled at most once (STP); each resting reduce-only order adds at most one event besides
    its trades (canceled while matching, or shrunk/canceled by the sweep after). Plus the
    command, the reply and the taker's own cancel.
    """
    mk = _markets(st)[market]
    opposite = mk.resting_sell if side == SIDE_BUY else mk.resting_buy
    if side > SIDE_SELL:
        opposite = mk.resting_buy + mk.resting_sell
    fills = qty if 0 <= qty < opposite else (opposite if qty >= 0 else 0)
    own = _positions(st)[account, market].open_orders
    stp = own if own < opposite else opposite
    return 8 + fills + stp + mk.resting_reduce_only


@jit
def _event_bound(st, cmd):
    """Most events this command can cause (checked against the ring's free slots)."""
    code = cmd.cmd
    if code == CMD_NEW_ORDER:
        if not (0 <= cmd.market < len(_markets(st)) and 0 <= cmd.account < len(_accounts(st))):
            return 4
        need = _taker_bound(st, cmd.account, cmd.market, cmd.side, cmd.qty_lots)
        if _markets(st)[cmd.market].untriggered != 0:
            return max(need, _trigger_bound(st, cmd.market))
        return need
    if code == CMD_AMEND:
        slot = _find_order(st, cmd.account, cmd.oid, cmd.cid)
        if slot == NONE:
            return 4
        o = _orders(st)[slot]
        qty = cmd.qty_lots if cmd.qty_lots > o.remaining_lots else o.remaining_lots
        need = _taker_bound(st, o.account, o.market, o.side, qty)
        return max(need, _trigger_bound(st, o.market))
    if code == CMD_SET_MARK or code == CMD_RESUME:
        if 0 <= cmd.market < len(_markets(st)):
            return 4 + _trigger_bound(st, cmd.market)
        return 4
    if code == CMD_CANCEL_ALL:
        if 0 <= cmd.account < len(_accounts(st)):
            return 4 + _accounts(st)[cmd.account].open_orders
        return 4
    if code == CMD_FUNDING:
        return 6 + len(_accounts(st))
    if code == CMD_SETTLE_MARKET:
        if not 0 <= cmd.market < len(_markets(st)):
            return 4
        mk = _markets(st)[cmd.market]
        return 8 + mk.resting_buy + mk.resting_sell + mk.untriggered + 3 * len(_accounts(st))
    if code == CMD_SET_MARKET_STATE:
        if 0 <= cmd.market < len(_markets(st)):
            return 4 + _trigger_bound(st, cmd.market)
        return 4
    if code == CMD_LIQUIDATE:
        return _liquidation_bound(st, cmd)
    return 4


@jit
def _liquidation_bound(st, cmd):
    """Most events a LIQUIDATE can cause (EngineConfig.event_bound() covers any of them).

    Its own orders canceled; per market liquidated: each resting order traded out or
    canceled (reduce-only) at most once, a partly filled one more per step, each reduce-only
    order swept once, per step a liquidation and an insurance event, per ADL counterparty two
    events; a deficit cover before its ADL and one at the end (an insurance and a balance
    event each).
    """
    if not 0 <= cmd.account < len(_accounts(st)):
        return 4
    n = 8 + _accounts(st)[cmd.account].open_orders
    for m in range(len(_markets(st))):
        if cmd.market == -1 or cmd.market == m:
            mk = _markets(st)[m]
            n += (mk.resting_buy + mk.resting_sell + mk.resting_reduce_only
                  + 3 * LIQUIDATION_MAX_STEPS + 2 * ADL_MAX_COUNTERPARTIES + 4
                  + _trigger_bound(st, m))
    return n


PREFETCH_AHEAD = 4


@jit
def _privileged_only(code):
    for privileged in PRIVILEGED_COMMANDS:
        if code == privileged:
            return True
    return False


@jit
def _prefetch_for(st, cmd):
    """Start loading what a later command reads first (likely cache misses): its position
    (the event bound and the margin check read it), its account row (the margin check's
    balance, a resting order's account list) and the index bucket it probes first.

    A prefetch never faults: a command naming a bad account or market costs a useless load.
    """
    positions = _positions(st)
    prefetch(positions, cmd.account * positions.shape[1] + cmd.market)
    prefetch(_accounts(st), cmd.account)
    if cmd.cmd == CMD_NEW_ORDER or ((cmd.cmd == CMD_CANCEL or cmd.cmd == CMD_AMEND)
                                    and cmd.oid == 0):
        index = _cid_index(st)
        prefetch(index, _home(cmd.account, cmd.cid, len(index) - 1))
    elif cmd.cmd == CMD_CANCEL or cmd.cmd == CMD_AMEND:
        index = _oid_index(st)
        prefetch(index, _home(0, cmd.oid, len(index) - 1))


@jit
def run_batch(desc, commands, command_words, start, count, privileged, free_slots):
    """Sequence commands[start:start+count]. Returns how many were processed.

    Stops early (returns fewer) when the ring lacks room for a command's worst case.
    The descriptor's cursor words carry the ring position, seq and source (engine/state.py).
    """
    st = address_of(desc)
    scratch = len(_orders(st)) - 1
    ring_words = _ring_words(st)
    used_before = desc[D_WRITE]
    desc[D_NEED] = 0
    end = start + count
    for i in range(start, start + count):
        if i + PREFETCH_AHEAD < end:
            _prefetch_for(st, commands[i + PREFETCH_AHEAD])
        cmd = commands[i]
        need = _event_bound(st, cmd)
        if need > free_slots - (desc[D_WRITE] - used_before):
            desc[D_NEED] = need
            return i - start
        seq = _counters(st)[C_SEQ] + 1
        _counters(st)[C_SEQ] = seq
        desc[D_SEQ] = seq
        command_pos = desc[D_WRITE]
        j = _claim(st, cmd, EV_COMMAND, cmd.market, cmd.account)
        for w in range(COMMAND_BYTES // 8):
            ring_words[j, COMMAND_EVENT_WORD + w] = command_words[i, w]
        code = cmd.cmd
        if not privileged and _privileged_only(code):
            _reject(st, cmd, REASON_FORBIDDEN)
        elif code == CMD_NEW_ORDER:
            _new_order(st, cmd, scratch)
        elif code == CMD_CANCEL:
            _cancel(st, cmd)
        elif code == CMD_AMEND:
            _amend(st, cmd, scratch)
        elif code == CMD_CANCEL_ALL:
            _cancel_all(st, cmd)
        elif code == CMD_DEPOSIT:
            _deposit(st, cmd)
        elif code == CMD_WITHDRAW:
            _withdraw(st, cmd)
        elif code == CMD_SET_MARK:
            _set_mark(st, cmd, scratch)
        elif code == CMD_CREATE_MARKET:
            _create_market(st, cmd)
        elif code == CMD_SET_MARKET_LIMITS:
            _set_market_limits(st, cmd)
        elif code == CMD_HALT:
            _set_state(st, cmd, MARKET_HALTED, scratch)
        elif code == CMD_RESUME:
            _set_state(st, cmd, MARKET_TRADING, scratch)
        elif code == CMD_SET_MARGIN:
            _set_margin(st, cmd)
        elif code == CMD_FUNDING:
            _funding(st, cmd)
        elif code == CMD_LIQUIDATE:
            _liquidate(st, cmd, scratch)
        elif code == CMD_SET_MARKET_RISK:
            _set_market_risk(st, cmd)
        elif code == CMD_SET_BRACKET:
            _set_bracket(st, cmd)
        elif code == CMD_SET_ACCOUNT_STATE:
            _set_account_state(st, cmd)
        elif code == CMD_INSURANCE_DEPOSIT:
            _insurance_deposit(st, cmd)
        elif code == CMD_SET_MARKET_FILTERS:
            _set_market_filters(st, cmd)
        elif code == CMD_SET_MARKET_STATE:
            _set_state(st, cmd, -1, scratch)
        elif code == CMD_SETTLE_MARKET:
            _settle_market(st, cmd)
        else:
            _reject(st, cmd, REASON_INVALID_MESSAGE)
        _number_reports(st, cmd, command_pos + 1)
    return count
