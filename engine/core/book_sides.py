"""The price levels of one book side: sorted price keys, best (largest key) last.

Owns: book_keys, book_levels, book_depth and the level pool (its free list in the counters).
May touch nothing else.
"""

from engine.records import SIDE_BUY
from engine.state import C_FREE_LEVEL, NONE
from engine.core.tables import _book_depth, _book_keys, _book_levels, _counters, _levels, jit


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
