"""The price levels of one book side, sorted by key (price for bids, -price for asks: the best
is the largest), in blocks (engine/state.py): `book_dir` lists a side's blocks in key order, the
best block last and always block 2 x market + side; each block's keys ascend. A new or removed
level shifts one block, and the side's block directory when a block splits, merges or empties
(docs/tuning.md, "Deep book sides"), where one sorted array shifted every level between the new
one and the best.

Owns: book_keys, book_levels, book_counts, book_dir, book_nblocks, book_depth, book_free and
the level pool (their free lists in the counters). May touch nothing else.
"""

from engine.records import SIDE_BUY
from engine.state import C_FREE_BLOCKS, C_FREE_LEVEL, C_MAX_LEVELS, NONE
from engine.core.tables import (_book_counts, _book_depth, _book_dir, _book_free, _book_keys,
                                _book_levels, _book_nblocks, _counters, _levels, jit)


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
def _block_lower_bound(keys, block, n, key):
    """First index of the block whose key is >= key; scans down from its end first."""
    k = n
    while k > 0 and k > n - TOP_SCAN and keys[block, k - 1] >= key:
        k -= 1
    if k == 0 or keys[block, k - 1] < key:
        return k
    lo = 0
    hi = k
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[block, mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit
def _top_block(market, side):
    """A side's best block is always the same one (engine/state.py), so the top of the book
    is one load away, as in a flat array."""
    return 2 * market + side


@jit
def _block_of(st, market, side, key):
    """Directory position of the block a key belongs to: the last whose first key is <= key,
    or the first. The top block is tried first; the search below it is out of line."""
    nb = _book_nblocks(st)[market, side]
    if nb == 1 or _book_keys(st)[_top_block(market, side), 0] <= key:
        return nb - 1
    return _search_blocks(st, market, side, nb, key)


@jit
def _search_blocks(st, market, side, nb, key):
    """_block_of below the top block: bisect the directory by the blocks' first keys."""
    dirs = _book_dir(st)
    keys = _book_keys(st)
    lo = 0
    hi = nb - 2
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if keys[dirs[market, side, mid], 0] <= key:
            lo = mid
        else:
            hi = mid - 1
    return lo


@jit
def _find_level(st, market, side, price_ticks):
    """Level slot at this price, or NONE."""
    key = _key(side, price_ticks)
    b = _book_dir(st)[market, side, _block_of(st, market, side, key)]
    keys = _book_keys(st)
    n = _book_counts(st)[b]
    k = _block_lower_bound(keys, b, n, key)
    if k < n and keys[b, k] == key:
        return _book_levels(st)[b, k]
    return NONE


@jit
def _best_level(st, market, side):
    top = _top_block(market, side)
    n = _book_counts(st)[top]
    if n == 0:
        return NONE
    return _book_levels(st)[top, n - 1]


# A walk over a side's levels, best first, holds a position: (directory position, index in
# that block), d < 0 past the worst. Valid while the side does not change.
@jit
def _best_position(st, market, side):
    n = _book_counts(st)[_top_block(market, side)]
    if n == 0:
        return -1, 0
    return _book_nblocks(st)[market, side] - 1, n - 1


@jit
def _level_at(st, market, side, d, i):
    return _book_levels(st)[_book_dir(st)[market, side, d], i]


@jit
def _worse_position(st, market, side, d, i):
    if i > 0:
        return d, i - 1
    d -= 1
    if d < 0:
        return d, 0
    return d, _book_counts(st)[_book_dir(st)[market, side, d]] - 1


@jit
def _level_full(st, market, side, price_ticks):
    return (_book_depth(st)[market, side] >= _counters(st)[C_MAX_LEVELS]
            and _find_level(st, market, side, price_ticks) == NONE)


@jit
def _dir_insert(st, market, side, d):
    """A block from the pool at directory position d (the blocks from d on move up one)."""
    free = _counters(st)[C_FREE_BLOCKS] - 1
    _counters(st)[C_FREE_BLOCKS] = free
    b = _book_free(st)[free]
    dirs = _book_dir(st)
    nb = _book_nblocks(st)[market, side]
    for i in range(nb, d, -1):
        dirs[market, side, i] = dirs[market, side, i - 1]
    dirs[market, side, d] = b
    _book_nblocks(st)[market, side] = nb + 1
    _book_counts(st)[b] = 0
    return b


@jit
def _dir_remove(st, market, side, d):
    """Give the block at directory position d (not the top) back to the pool."""
    dirs = _book_dir(st)
    b = dirs[market, side, d]
    nb = _book_nblocks(st)[market, side]
    for i in range(d, nb - 1):
        dirs[market, side, i] = dirs[market, side, i + 1]
    _book_nblocks(st)[market, side] = nb - 1
    free = _counters(st)[C_FREE_BLOCKS]
    _book_free(st)[free] = b
    _counters(st)[C_FREE_BLOCKS] = free + 1


@jit
def _merge_blocks(st, market, side, d, force):
    """Merge the blocks at directory positions d and d + 1 when they hold at most half a block
    together (the bound on a side's blocks), or when `force` (the top one is empty); the
    merged levels stay in the upper one when it is the top, else in the lower. Returns
    whether they were merged."""
    nb = _book_nblocks(st)[market, side]
    if d < 0 or d + 1 >= nb:
        return False
    dirs = _book_dir(st)
    a = dirs[market, side, d]
    b = dirs[market, side, d + 1]
    counts = _book_counts(st)
    keys = _book_keys(st)
    levels = _book_levels(st)
    na = counts[a]
    nb_ = counts[b]
    if not force and 2 * (na + nb_) > keys.shape[1]:
        return False
    if d + 1 == nb - 1:      # into the top block: its levels move up, a's go in front
        for i in range(nb_ - 1, -1, -1):
            keys[b, na + i] = keys[b, i]
            levels[b, na + i] = levels[b, i]
        for i in range(na):
            keys[b, i] = keys[a, i]
            levels[b, i] = levels[a, i]
        counts[b] = na + nb_
        _dir_remove(st, market, side, d)
    else:
        for i in range(nb_):
            keys[a, na + i] = keys[b, i]
            levels[a, na + i] = levels[b, i]
        counts[a] = na + nb_
        _dir_remove(st, market, side, d + 1)
    return True


@jit
def _split_block(st, market, side, d, key):
    """Split the full block at directory position d; returns the half the key goes to. The
    top block keeps its upper half (it stays the top), another its lower half."""
    keys = _book_keys(st)
    levels = _book_levels(st)
    counts = _book_counts(st)
    size = keys.shape[1]
    half = size // 2
    b = _book_dir(st)[market, side, d]
    if d == _book_nblocks(st)[market, side] - 1:
        c = _dir_insert(st, market, side, d)
        for i in range(half):
            keys[c, i] = keys[b, i]
            levels[c, i] = levels[b, i]
        for i in range(half, size):
            keys[b, i - half] = keys[b, i]
            levels[b, i - half] = levels[b, i]
        counts[c] = half
        counts[b] = size - half
        return c if key < keys[b, 0] else b
    c = _dir_insert(st, market, side, d + 1)
    for i in range(half, size):
        keys[c, i - half] = keys[b, i]
        levels[c, i - half] = levels[b, i]
    counts[c] = size - half
    counts[b] = half
    return c if key >= keys[c, 0] else b


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
    keys = _book_keys(st)
    levels = _book_levels(st)
    counts = _book_counts(st)
    key = _key(side, price_ticks)
    d = _block_of(st, market, side, key)
    b = _book_dir(st)[market, side, d]
    if counts[b] == keys.shape[1]:
        b = _split_block(st, market, side, d, key)
    n = counts[b]
    k = _block_lower_bound(keys, b, n, key)
    for i in range(n, k, -1):
        keys[b, i] = keys[b, i - 1]
        levels[b, i] = levels[b, i - 1]
    keys[b, k] = key
    levels[b, k] = lvl
    counts[b] = n + 1
    _book_depth(st)[market, side] += 1
    return lvl


@jit
def _rebalance(st, market, side, d, n):
    """After a removal left n levels in the block at directory position d: an empty block goes
    back to the pool (the top one takes the block below it instead), and neighbours holding
    half a block or less together merge."""
    if n == 0:
        if d == _book_nblocks(st)[market, side] - 1:
            _merge_blocks(st, market, side, d - 1, True)
        else:
            _dir_remove(st, market, side, d)
            _merge_blocks(st, market, side, d - 1, False)
        return
    if _merge_blocks(st, market, side, d - 1, False):
        d -= 1
    _merge_blocks(st, market, side, d, False)


@jit
def _remove_level(st, market, side, lvl):
    keys = _book_keys(st)
    levels = _book_levels(st)
    counts = _book_counts(st)
    key = _key(side, _levels(st)[lvl].price_ticks)
    d = _block_of(st, market, side, key)
    b = _book_dir(st)[market, side, d]
    n = counts[b]
    k = _block_lower_bound(keys, b, n, key)
    for i in range(k, n - 1):
        keys[b, i] = keys[b, i + 1]
        levels[b, i] = levels[b, i + 1]
    counts[b] = n - 1
    _book_depth(st)[market, side] -= 1
    if _book_nblocks(st)[market, side] > 1 and 2 * (n - 1) <= keys.shape[1]:
        _rebalance(st, market, side, d, n - 1)   # else no neighbour, or more than half
    _levels(st)[lvl].next_free = _counters(st)[C_FREE_LEVEL]
    _counters(st)[C_FREE_LEVEL] = lvl
