"""The gateway's mirror (gateway/mirror.py) in arrays, applied by compiled code: step 1 of the
compiled pass (docs/tuning.md, "Still open").

The same rules as gateway/mirror.py, which stays the oracle (tests/test_compiled_pass.py feeds
both the same event streams and compares `comparable()`). Three open-addressing tables with
linear probing and backward-shift deletion (no tombstones, so a table never fills with the
dead):
- orders: oid -> [account, cid, market, side, kind, price, remaining, qty, untriggered]
- cids: (account, cid) -> oid (resting and untriggered orders, as Mirror.cid_index)
- levels: (market, side, price) -> qty (a level at 0 is removed)
plus the markets' rows (Mirror.markets' layout), each book's version, the levels changed
since market data last took them, and the admin command awaiting its `done`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.records import (CMD_CREATE_MARKET, CMD_HALT, CMD_RESUME, CMD_SET_MARKET_LIMITS,
                            CMD_SET_MARKET_STATE, CMD_SETTLE_MARKET, EV_ACK, EV_AMENDED,
                            EV_CANCELED, EV_COMMAND, EV_DONE, EV_MARK, EV_TRADE, EV_TRIGGERED,
                            COMMAND_BYTES, COMMAND_DTYPE, EVENT_BYTES, MARK_EVENT_DTYPE,
                            MARKET_CANCEL_ONLY, MARKET_HALTED, MARKET_SETTLED, MARKET_TRADING,
                            ORDER_EVENT_DTYPE, STATUS_OPEN, STATUS_UNTRIGGERED,
                            TRADE_EVENT_DTYPE)
from gateway.mirror import (M_ACTIVE, M_ATPL, M_HALTED, M_LAST, M_LEVERAGE, M_MARK, M_MAX_ORDER,
                            M_MAX_PRICE, M_STATE, Mirror)

# order row columns: Mirror's order list, then whether it waits for a trigger
O_ACCOUNT, O_CID, O_MARKET, O_SIDE, O_KIND, O_PRICE, O_REMAINING, O_QTY, O_UNTRIG = range(9)
# the int state: applied seq, base seq, the admin command's seq, how many dirty levels, how
# many entries each table holds (it grows before a batch could fill it past half), and how
# many times an admin command flagged a market in `changed` since the caller last looked
(S_APPLIED, S_BASE, S_ADMIN_SEQ, S_DIRTY_N, S_ORDERS_N, S_CIDS_N, S_LEVELS_N,
 S_CHANGED_N) = range(8)
_EMPTY = np.int64(0)           # oids and (account + 1) keys are never 0


def _at(dtype, name: str, size: int = 1) -> int:
    """A field's offset in its record, in units of `size` bytes (it must be aligned so)."""
    offset = dtype.fields[name][1]
    assert offset % size == 0, (name, size)
    return offset // size


# where apply_events reads each field: bytes, int16 and int32 slots, int64 words of a record
B_ETYPE, B_STATUS, B_SIDE, B_KIND = (_at(ORDER_EVENT_DTYPE, f) for f in (
    "etype", "status", "side", "kind"))
H_MARKET = _at(ORDER_EVENT_DTYPE, "market", 2)
I_ACCOUNT = _at(ORDER_EVENT_DTYPE, "account", 4)
W_OID, W_CID, W_PRICE, W_QTY, W_REMAINING = (_at(ORDER_EVENT_DTYPE, f, 8) for f in (
    "oid", "cid", "price_ticks", "qty_lots", "remaining_lots"))
WT_PRICE, WT_OID, WT_REMAINING, WT_MAKER_OID, WT_MAKER_REMAINING = (
    _at(TRADE_EVENT_DTYPE, f, 8) for f in ("price_ticks", "oid", "remaining_lots",
                                           "maker_oid", "maker_remaining_lots"))
WM_MARK = _at(MARK_EVENT_DTYPE, "mark_ticks", 8)
B_COMMAND = EVENT_BYTES - COMMAND_BYTES          # EV_COMMAND carries its command here
BC_CODE, BC_KIND = (_at(COMMAND_DTYPE, f) for f in ("cmd", "kind"))
BC_ACCOUNT, BC_MARKET = _at(COMMAND_DTYPE, "account"), _at(COMMAND_DTYPE, "market")
WC_PRICE, WC_QTY, WC_AMOUNT = (_at(COMMAND_DTYPE, f, 8) for f in (
    "price_ticks", "qty_lots", "amount_atoms"))
WORDS = EVENT_BYTES // 8

@njit(cache=True, inline="always")
def _mix(x):
    """splitmix64's finalizer: a well-spread hash of an int64 key."""
    z = np.uint64(x) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def _find(keys, k0, k1, k2):
    """Slot of key (k0, k1, k2) (k0 != 0), or -(the free slot where it would go) - 1."""
    mask = keys.shape[0] - 1
    i = np.int64((_mix(k0) ^ _mix(k1 * 31 + k2)) & np.uint64(mask))
    while True:
        if keys[i, 0] == _EMPTY:
            return -i - 1
        if keys[i, 0] == k0 and keys[i, 1] == k1 and keys[i, 2] == k2:
            return i
        i = (i + 1) & mask


@njit(cache=True)
def _home(keys, i):
    mask = keys.shape[0] - 1
    return np.int64((_mix(keys[i, 0]) ^ _mix(keys[i, 1] * 31 + keys[i, 2])) & np.uint64(mask))


@njit(cache=True)
def _delete(keys, vals, i):
    """Empty slot i and shift the entries after it back (linear probing stays exact)."""
    mask = keys.shape[0] - 1
    j = i
    while True:
        j = (j + 1) & mask
        if keys[j, 0] == _EMPTY:
            break
        h = _home(keys, j)
        # entry j may move to i unless its home lies cyclically in (i, j]
        if (i <= j and (h <= i or h > j)) or (i > j and (h <= i and h > j)):
            keys[i] = keys[j]
            vals[i] = vals[j]
            i = j
    keys[i, 0] = _EMPTY
    keys[i, 1] = 0
    keys[i, 2] = 0


@njit(cache=True)
def _level(lv_keys, lv_qty, versions, dirty, st, market, side, price, delta):
    if delta == 0:
        return
    versions[market] += 1
    i = _find(lv_keys, market + 1, side, price)
    if i < 0:
        i = -i - 1
        lv_keys[i, 0] = market + 1
        lv_keys[i, 1] = side
        lv_keys[i, 2] = price
        lv_qty[i, 0] = 0
        st[S_LEVELS_N] += 1
    q = lv_qty[i, 0] + delta
    if q:
        lv_qty[i, 0] = q
    else:
        _delete(lv_keys, lv_qty, i)
        st[S_LEVELS_N] -= 1
    n = st[S_DIRTY_N]         # room made before the batch (ArrayMirror._room)
    dirty[n, 0] = market
    dirty[n, 1] = side
    dirty[n, 2] = price
    st[S_DIRTY_N] = n + 1


@njit(cache=True)
def _add_order(o_keys, o_vals, c_keys, c_vals, st, oid, account, cid, market, side, kind,
               price, remaining, qty, untriggered):
    i = _find(o_keys, oid, 0, 0)
    if i < 0:
        i = -i - 1
        o_keys[i, 0] = oid
        st[S_ORDERS_N] += 1
    v = o_vals[i]
    v[O_ACCOUNT] = account
    v[O_CID] = cid
    v[O_MARKET] = market
    v[O_SIDE] = side
    v[O_KIND] = kind
    v[O_PRICE] = price
    v[O_REMAINING] = remaining
    v[O_QTY] = qty
    v[O_UNTRIG] = untriggered
    j = _find(c_keys, account + 1, cid, 0)
    if j < 0:
        j = -j - 1
        c_keys[j, 0] = account + 1
        c_keys[j, 1] = cid
        st[S_CIDS_N] += 1
    c_vals[j, 0] = oid


@njit(cache=True)
def _remove_order(o_keys, o_vals, c_keys, c_vals, st, i):
    j = _find(c_keys, o_vals[i, O_ACCOUNT] + 1, o_vals[i, O_CID], 0)
    if j >= 0:
        _delete(c_keys, c_vals, j)
        st[S_CIDS_N] -= 1
    _delete(o_keys, o_vals, i)
    st[S_ORDERS_N] -= 1


@njit(cache=True)
def _set_remaining(o_keys, o_vals, c_keys, c_vals, lv_keys, lv_qty, versions, dirty, st,
                   oid, remaining):
    i = _find(o_keys, oid, 0, 0)
    if i < 0 or o_vals[i, O_UNTRIG]:
        return
    v = o_vals[i]
    _level(lv_keys, lv_qty, versions, dirty, st, v[O_MARKET], v[O_SIDE], v[O_PRICE],
           remaining - v[O_REMAINING])
    v[O_REMAINING] = remaining
    if remaining == 0:
        _remove_order(o_keys, o_vals, c_keys, c_vals, st, i)


@njit(cache=True)
def _ack(o_keys, o_vals, c_keys, c_vals, lv_keys, lv_qty, versions, dirty, st, ev8, ev64, e,
         account, market):
    status = ev8[e * EVENT_BYTES + B_STATUS]
    if status != STATUS_OPEN and status != STATUS_UNTRIGGERED:
        return
    q = e * WORDS
    side = np.int64(ev8[e * EVENT_BYTES + B_SIDE])
    kind = np.int64(ev8[e * EVENT_BYTES + B_KIND])
    _add_order(o_keys, o_vals, c_keys, c_vals, st, ev64[q + W_OID], account, ev64[q + W_CID],
               market, side, kind, ev64[q + W_PRICE], ev64[q + W_REMAINING], ev64[q + W_QTY],
               0 if status == STATUS_OPEN else 1)
    if status == STATUS_OPEN:
        _level(lv_keys, lv_qty, versions, dirty, st, market, side, ev64[q + W_PRICE],
               ev64[q + W_REMAINING])


@njit(cache=True)
def apply_events(ev, count, st, markets, versions, admin, changed, o_keys, o_vals, c_keys,
                 c_vals, lv_keys, lv_qty, dirty):
    """Apply `count` event records (EVENT_BYTES each) (`ev`, uint8, as the ring holds them). A market an
    admin command changed is flagged in `changed` and counted in st[S_CHANGED_N] (the gateway
    looks at one int per batch, not at the flags). Returns how many were applied (later than
    the state the mirror started from)."""
    applied = 0
    n_markets = markets.shape[0]
    ev8 = ev[:count * EVENT_BYTES]
    ev16 = ev8.view(np.int16)
    ev32 = ev8.view(np.int32)
    ev64 = ev8.view(np.int64)
    for e in range(count):
        q = e * WORDS                  # the record's first int64 word
        seq = ev64[q]
        if seq <= st[S_BASE]:
            continue
        applied += 1
        etype = ev8[e * EVENT_BYTES + B_ETYPE]
        market = np.int64(ev16[e * (EVENT_BYTES // 2) + H_MARKET])
        account = np.int64(ev32[e * (EVENT_BYTES // 4) + I_ACCOUNT])
        if etype == EV_COMMAND:
            st[S_APPLIED] = seq
            code = ev8[e * EVENT_BYTES + B_COMMAND + BC_CODE]
            if code == CMD_CREATE_MARKET or code == CMD_SET_MARKET_LIMITS or \
                    code == CMD_HALT or code == CMD_RESUME or \
                    code == CMD_SET_MARKET_STATE or code == CMD_SETTLE_MARKET:
                st[S_ADMIN_SEQ] = seq
                admin[:] = ev8[e * EVENT_BYTES + B_COMMAND:(e + 1) * EVENT_BYTES]
            else:
                st[S_ADMIN_SEQ] = 0
        elif etype == EV_TRADE:
            _set_remaining(o_keys, o_vals, c_keys, c_vals, lv_keys, lv_qty, versions, dirty,
                           st, ev64[q + WT_MAKER_OID], ev64[q + WT_MAKER_REMAINING])
            _set_remaining(o_keys, o_vals, c_keys, c_vals, lv_keys, lv_qty, versions, dirty,
                           st, ev64[q + WT_OID], ev64[q + WT_REMAINING])
            markets[market, M_LAST] = ev64[q + WT_PRICE]
        elif etype == EV_MARK:
            if 0 <= market < n_markets:
                markets[market, M_MARK] = ev64[q + WM_MARK]
        elif etype == EV_ACK:
            _ack(o_keys, o_vals, c_keys, c_vals, lv_keys, lv_qty, versions, dirty, st, ev8,
                 ev64, e, account, market)
        elif etype == EV_TRIGGERED:
            i = _find(o_keys, ev64[q + W_OID], 0, 0)
            if i >= 0 and o_vals[i, O_UNTRIG]:
                _remove_order(o_keys, o_vals, c_keys, c_vals, st, i)
            _ack(o_keys, o_vals, c_keys, c_vals, lv_keys, lv_qty, versions, dirty, st, ev8,
                 ev64, e, account, market)
        elif etype == EV_CANCELED:
            i = _find(o_keys, ev64[q + W_OID], 0, 0)
            if i >= 0:
                v = o_vals[i]
                if not v[O_UNTRIG]:
                    _level(lv_keys, lv_qty, versions, dirty, st, v[O_MARKET], v[O_SIDE],
                           v[O_PRICE], -v[O_REMAINING])
                _remove_order(o_keys, o_vals, c_keys, c_vals, st, i)
        elif etype == EV_AMENDED:
            i = _find(o_keys, ev64[q + W_OID], 0, 0)
            if i >= 0 and not o_vals[i, O_UNTRIG]:
                v = o_vals[i]
                _level(lv_keys, lv_qty, versions, dirty, st, v[O_MARKET], v[O_SIDE],
                       v[O_PRICE], -v[O_REMAINING])
                v[O_PRICE] = ev64[q + W_PRICE]
                v[O_QTY] = ev64[q + W_QTY]
                v[O_REMAINING] = ev64[q + W_REMAINING]
                _level(lv_keys, lv_qty, versions, dirty, st, v[O_MARKET], v[O_SIDE],
                       ev64[q + W_PRICE], ev64[q + W_REMAINING])
        elif etype == EV_DONE:
            if st[S_ADMIN_SEQ] != seq:
                continue
            st[S_ADMIN_SEQ] = 0
            a64 = admin.view(np.int64)
            a_account = np.int64(admin[BC_ACCOUNT:BC_ACCOUNT + 4].view(np.int32)[0])
            a_market = np.int64(admin[BC_MARKET:BC_MARKET + 2].view(np.int16)[0])
            code = admin[BC_CODE]
            kind = np.int64(admin[BC_KIND])
            if not 0 <= a_market < n_markets:
                continue
            mk = markets[a_market]
            if code == CMD_CREATE_MARKET:
                mk[:] = 0
                mk[M_ACTIVE] = 1
                mk[M_ATPL] = a64[WC_AMOUNT]
                mk[M_LEVERAGE] = a_account     # create_market carries it there
                mk[M_MARK] = a64[WC_PRICE]
                mk[M_STATE] = MARKET_TRADING
            elif code == CMD_SET_MARKET_LIMITS:
                mk[M_MAX_PRICE] = a64[WC_PRICE]
                mk[M_MAX_ORDER] = a64[WC_QTY]
            else:
                if code == CMD_HALT:
                    state = MARKET_HALTED
                elif code == CMD_RESUME:
                    state = MARKET_TRADING
                elif code == CMD_SETTLE_MARKET:
                    state = MARKET_SETTLED
                else:
                    state = kind
                mk[M_STATE] = state
                mk[M_HALTED] = 1 if (state == MARKET_CANCEL_ONLY or state == MARKET_HALTED
                                     or state == MARKET_SETTLED) else 0
            changed[a_market] = 1
            st[S_CHANGED_N] += 1
    return applied


@njit(cache=True)
def _rehash(keys, vals, new_keys, new_vals):
    for i in range(keys.shape[0]):
        if keys[i, 0] != _EMPTY:
            j = -_find(new_keys, keys[i, 0], keys[i, 1], keys[i, 2]) - 1
            new_keys[j] = keys[i]
            new_vals[j] = vals[i]


def _grown(keys, vals, need: int):
    """The table, or a copy at least twice `need` in size (half full at most)."""
    size = keys.shape[0]
    if 2 * need <= size:
        return keys, vals
    while 2 * need > size:
        size *= 2
    new_keys = np.zeros((size, keys.shape[1]), np.int64)
    new_vals = np.zeros((size, vals.shape[1]), np.int64)
    _rehash(keys, vals, new_keys, new_vals)
    return new_keys, new_vals


class ArrayMirror:
    """The arrays, and the calls Python makes on them."""

    def __init__(self, max_markets: int, initial: int = 1024):
        self.max_markets = max_markets
        self.st = np.zeros(S_CHANGED_N + 1, np.int64)
        self.markets = np.zeros((max_markets, 9), np.int64)
        self.versions = np.zeros(max_markets, np.int64)
        self.admin = np.zeros(64, np.uint8)
        self.changed = np.zeros(max_markets, np.int8)
        # the tables start small and double: memory follows what is open, and stays warm
        self.o_keys = np.zeros((initial, 3), np.int64)
        self.o_vals = np.zeros((initial, 9), np.int64)
        self.c_keys = np.zeros((initial, 3), np.int64)
        self.c_vals = np.zeros((initial, 1), np.int64)
        self.lv_keys = np.zeros((initial, 3), np.int64)
        self.lv_qty = np.zeros((initial, 1), np.int64)
        self.dirty = np.zeros((initial, 3), np.int64)    # (market, side, price), grows

    @classmethod
    def from_mirror(cls, mirror: Mirror, initial: int = 1024) -> ArrayMirror:
        """The same content as a Python mirror (boot builds that one from the state tables)."""
        self = cls(mirror.max_markets, initial)
        self._room(len(mirror.orders) + len(mirror.untriggered),
                   sum(len(b) + len(a) for b, a in mirror.books))
        self.st[S_BASE] = mirror.base_seq
        self.st[S_APPLIED] = mirror.applied_seq
        self.markets[:] = np.asarray(mirror.markets, np.int64)
        for table, untrig in ((mirror.orders, 0), (mirror.untriggered, 1)):
            for oid, o in table.items():
                _add_order(self.o_keys, self.o_vals, self.c_keys, self.c_vals, self.st, oid,
                           *o, untrig)
        for m, (bids, asks) in enumerate(mirror.books):
            for side, book in enumerate((bids, asks)):
                for price, qty in book.items():
                    _level(self.lv_keys, self.lv_qty, self.versions, self.dirty, self.st, m,
                           side, price, qty)
        self.versions[:] = mirror.versions      # its count, not the rebuild's
        self.st[S_DIRTY_N] = 0    # built at boot, before market data took anything
        return self

    @property
    def applied_seq(self) -> int:
        return int(self.st[S_APPLIED])

    def _room(self, orders: int, levels: int) -> None:
        st = self.st
        self.o_keys, self.o_vals = _grown(self.o_keys, self.o_vals, st[S_ORDERS_N] + orders)
        self.c_keys, self.c_vals = _grown(self.c_keys, self.c_vals, st[S_CIDS_N] + orders)
        self.lv_keys, self.lv_qty = _grown(self.lv_keys, self.lv_qty, st[S_LEVELS_N] + levels)
        need = st[S_DIRTY_N] + 2 * levels        # an amend dirties two levels
        if need > len(self.dirty):
            dirty = np.zeros((max(need, 2 * len(self.dirty)), 3), np.int64)
            dirty[:st[S_DIRTY_N]] = self.dirty[:st[S_DIRTY_N]]
            self.dirty = dirty

    def take_changed(self):
        """The markets admin commands changed since the last take, ascending; their flags
        clear. Per batch, where there are seldom any: one int read."""
        if not self.st[S_CHANGED_N]:
            return ()
        self.st[S_CHANGED_N] = 0
        markets = np.flatnonzero(self.changed).tolist()
        self.changed[:] = 0
        return markets

    def forget_dirty(self) -> None:
        """Drop the changed levels kept for market data (a gateway that publishes none)."""
        self.st[S_DIRTY_N] = 0

    def apply(self, ev: np.ndarray, count: int) -> int:
        # each event adds at most one order and (an amend) one level: room before the call
        self._room(count, count)
        return apply_events(ev, count, self.st, self.markets, self.versions, self.admin,
                            self.changed, self.o_keys, self.o_vals, self.c_keys, self.c_vals,
                            self.lv_keys, self.lv_qty, self.dirty)

    def comparable(self) -> dict:
        """gateway.mirror.comparable's shape, read from the arrays."""
        orders, untriggered, cids = {}, {}, {}
        for i in np.flatnonzero(self.o_keys[:, 0]):
            v = self.o_vals[i].tolist()
            (untriggered if v[O_UNTRIG] else orders)[int(self.o_keys[i, 0])] = tuple(v[:7])
        for i in np.flatnonzero(self.c_keys[:, 0]):
            cids[(int(self.c_keys[i, 0]) - 1, int(self.c_keys[i, 1]))] = int(self.c_vals[i, 0])
        books = [({}, {}) for _ in range(self.max_markets)]
        for i in np.flatnonzero(self.lv_keys[:, 0]):
            m, side, price = (int(x) for x in self.lv_keys[i])
            books[m - 1][side][price] = int(self.lv_qty[i, 0])
        return {"orders": orders, "untriggered": untriggered, "books": books,
                "markets": self.markets.tolist(), "cids": cids}


# ---- queries (the Python mirror's, read from the arrays) -------------------------------------
@njit(cache=True)
def _side_levels(lv_keys, lv_qty, market, side):
    """(prices, qtys) of one side of a market's book, best first (bids high to low)."""
    n = 0
    for i in range(lv_keys.shape[0]):
        if lv_keys[i, 0] == market + 1 and lv_keys[i, 1] == side:
            n += 1
    prices = np.empty(n, np.int64)
    qtys = np.empty(n, np.int64)
    k = 0
    for i in range(lv_keys.shape[0]):
        if lv_keys[i, 0] == market + 1 and lv_keys[i, 1] == side:
            prices[k] = lv_keys[i, 2]
            qtys[k] = lv_qty[i, 0]
            k += 1
    order = np.argsort(prices)
    if side == 0:
        order = order[::-1]
    return prices[order], qtys[order]


@njit(cache=True)
def _orders_of(o_keys, o_vals, account, market):
    """Slots of the account's orders (market < 0: every market), by oid."""
    n = 0
    for i in range(o_keys.shape[0]):
        if o_keys[i, 0] != _EMPTY and o_vals[i, O_ACCOUNT] == account and \
                (market < 0 or o_vals[i, O_MARKET] == market):
            n += 1
    slots = np.empty(n, np.int64)
    k = 0
    for i in range(o_keys.shape[0]):
        if o_keys[i, 0] != _EMPTY and o_vals[i, O_ACCOUNT] == account and \
                (market < 0 or o_vals[i, O_MARKET] == market):
            slots[k] = i
            k += 1
    return slots[np.argsort(o_keys[slots, 0])]


@njit(cache=True)
def take_dirty_levels(dirty, st, lv_keys, lv_qty, market, side):
    """The levels of (market, side) changed since the last take, best first, with their
    quantities now (0: gone); they leave the dirty list, the other markets' stay."""
    n = st[S_DIRTY_N]
    prices = np.empty(n, np.int64)
    k = 0
    keep = 0
    for i in range(n):
        if dirty[i, 0] == market and dirty[i, 1] == side:
            prices[k] = dirty[i, 2]
            k += 1
        else:
            dirty[keep] = dirty[i]
            keep += 1
    st[S_DIRTY_N] = keep
    prices = np.unique(prices[:k])
    if side == 0:
        prices = prices[::-1]
    qtys = np.zeros(len(prices), np.int64)
    for j in range(len(prices)):
        i = _find(lv_keys, market + 1, side, prices[j])
        if i >= 0:
            qtys[j] = lv_qty[i, 0]
    return prices, qtys


class ArrayMirrorQueries:
    """Mirror's queries (gateway/mirror.py, "queries"), read from the arrays. Order rows are
    Mirror's lists: [account, cid, market, side, kind, price, remaining, qty]. open_orders
    lists by oid (the Python mirror lists in the order it learned them: the same for orders
    placed while it runs)."""

    def __init__(self, arrays: ArrayMirror):
        self.a = arrays

    @property
    def applied_seq(self) -> int:
        return self.a.applied_seq

    @property
    def any_dirty(self) -> bool:
        return bool(self.a.st[S_DIRTY_N])

    def _row(self, account: int, oid: int, cid: int, untriggered: int):
        """This account's order by oid (by cid if oid is 0), if it waits or not as asked."""
        a = self.a
        if not oid:
            j = _find(a.c_keys, account + 1, cid, 0)
            if j < 0:
                return None
            oid = a.c_vals[j, 0]
        i = _find(a.o_keys, oid, 0, 0)
        if i < 0 or a.o_vals[i, O_UNTRIG] != untriggered or a.o_vals[i, O_ACCOUNT] != account:
            return None
        return a.o_vals[i, :8].tolist()

    def order_of(self, account: int, oid: int, cid: int):
        return self._row(account, oid, cid, 0)

    def untriggered_of(self, account: int, oid: int, cid: int):
        return self._row(account, oid, cid, 1)

    def book_version(self, market: int) -> int:
        return int(self.a.versions[market])

    def market_row(self, market: int) -> list:
        return self.a.markets[market].tolist()

    def warm(self) -> None:
        """Load the queries' machine code now (numba loads it at the first call), so that
        the gateway's memory base (gateway/memory.py) counts it."""
        self.book_levels(0)
        list(self.open_orders(0))
        self.order_of(0, 0, 0)
        self.order_of(0, 1, 0)
        self.dirty_markets()
        if not self.any_dirty:
            self.take_dirty(0)
        # a table's first growth (ArrayMirror._room) would load its rehash mid-batch
        empty = np.full((2, 3), _EMPTY, np.int64)
        _rehash(empty, np.zeros((2, 1), np.int64), empty.copy(), np.zeros((2, 1), np.int64))

    def book_levels(self, market: int, depth: int = 0):
        a = self.a
        out = []
        for side in (0, 1):
            prices, qtys = _side_levels(a.lv_keys, a.lv_qty, market, side)
            if depth:
                prices, qtys = prices[:depth], qtys[:depth]
            out.append(list(zip(prices.tolist(), qtys.tolist())))
        return out[0], out[1]

    def open_orders(self, account: int, market: int | None = None):
        a = self.a
        slots = _orders_of(a.o_keys, a.o_vals, account, -1 if market is None else market)
        rows = [(int(a.o_keys[i, 0]), a.o_vals[i].tolist()) for i in slots]
        for oid, v in rows:
            if not v[O_UNTRIG]:
                yield oid, v[:8], "open"
        for oid, v in rows:
            if v[O_UNTRIG]:
                yield oid, v[:8], "untriggered"

    def dirty_markets(self) -> list:
        a = self.a
        return np.unique(a.dirty[:a.st[S_DIRTY_N], 0]).tolist()

    def take_dirty(self, market: int):
        a = self.a
        out = []
        for side in (0, 1):
            prices, qtys = take_dirty_levels(a.dirty, a.st, a.lv_keys, a.lv_qty, market, side)
            out.append(list(zip(prices.tolist(), qtys.tolist())))
        return out[0], out[1]
