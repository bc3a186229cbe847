"""The oid and (account, cid) indexes: open addressing, linear probing, backward-shift deletion.

Owns: the oid_index, cid_index and index_deletes tables (entries are deleted late, see
_defer_index_delete). May touch: the counters, and read the orders an entry names.
"""

from engine.state import C_UNRESTS, NONE
from engine.views import prefetch
from engine.core.tables import _cid_index, _counters, _index_deletes, _oid_index, _orders, jit


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
