"""Market data's book deltas (gateway/market_data.py, `book.MARKET`) rendered by compiled code
from the array mirror, byte for byte what MarketData's Python path packs.

Contract. `book_delta_into(dirty, st, lv_keys, lv_qty, market, seq, tick, lot, keys, keys_at,
out, scratch)` takes the levels of `market` changed since its last take off the array mirror's
dirty list (gateway/mirror_arrays.py `take_dirty_levels`, bids then asks) and writes
`pack({"seq": seq, "bids": [[price, qty], ...], "asks": [[price, qty], ...]})` into `out`
from byte 0, returning the end offset. Levels come best first with their quantity now (0: the
level is gone); prices and quantities are written as Market.ticks_to_str and lots_to_str
write them (`tick` and `lot` are the grids as (mantissa, exponent); _w_scaled in
gateway/report_render.py). `out` must hold delta_bytes(levels) for the dirty list's length.
The keys come pre-packed (KEYS, KEYS_AT), as report_render passes its texts: numba's cache
freezes globals.

`book_deltas_into` empties the dirty list in one call: every dirty market's delta, markets
ascending (as Mirror.dirty_markets lists them), one after the other in `out`, each as
(market, start, end) in `spans`; a market without a table is taken and dropped. One call per
event batch instead of one per market plus the question which are dirty: in the gateway's
pass those Python steps cost several times what they do alone (docs/tuning.md).
tests/test_book_render.py proves the byte identity on the fuzzers' streams.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from gateway.codec import pack
from gateway.mirror_arrays import S_DIRTY_N, take_dirty_levels
from gateway.report_render import SCRATCH_BYTES, _w_int, _w_packed, _w_scaled, market_arrays

_KEYS = (pack("seq"), pack("bids"), pack("asks"))
KEYS = np.frombuffer(b"".join(_KEYS), np.uint8).copy()
KEYS_AT = np.cumsum([0] + [len(k) for k in _KEYS]).astype(np.int64)
K_SEQ, K_BIDS, K_ASKS = range(3)
# a map header, its keys and a 9-byte seq; two array32 headers
HEAD_BYTES = 1 + len(KEYS) + 9 + 2 * 5
# a fixarray of two decimals, each a str8 header and at most SCRATCH_BYTES characters
LEVEL_BYTES = 1 + 2 * (2 + SCRATCH_BYTES)


def delta_bytes(levels: int) -> int:
    """The most a delta of `levels` levels takes."""
    return HEAD_BYTES + levels * LEVEL_BYTES


def deltas_bytes(dirty_entries: int) -> int:
    """The most book_deltas_into writes for a dirty list of that length: each entry may be a
    market of its own, with one level."""
    return dirty_entries * delta_bytes(1)


@njit(cache=True)
def _w_array(out, o, n):
    if n < 16:
        out[o] = 0x90 | n
        return o + 1
    if n <= 0xffff:
        out[o] = 0xdc
        out[o + 1] = n >> 8
        out[o + 2] = n & 0xff
        return o + 3
    out[o] = 0xdd
    for j in range(4):
        out[o + 4 - j] = (n >> (8 * j)) & 0xff
    return o + 5


@njit(cache=True)
def _w_levels(out, o, prices, qtys, tick, lot, scratch):
    o = _w_array(out, o, len(prices))
    for j in range(len(prices)):
        out[o] = 0x92
        o = _w_scaled(out, o + 1, prices[j], tick[0], tick[1], scratch)
        o = _w_scaled(out, o, qtys[j], lot[0], lot[1], scratch)
    return o


@njit(cache=True)
def book_delta_into(dirty, st, lv_keys, lv_qty, market, seq, tick, lot, keys, keys_at, out,
                    scratch):
    bid_prices, bid_qtys = take_dirty_levels(dirty, st, lv_keys, lv_qty, market, 0)
    ask_prices, ask_qtys = take_dirty_levels(dirty, st, lv_keys, lv_qty, market, 1)
    out[0] = 0x83
    o = _w_packed(out, 1, keys, keys_at, K_SEQ)
    o = _w_int(out, o, seq)
    o = _w_packed(out, o, keys, keys_at, K_BIDS)
    o = _w_levels(out, o, bid_prices, bid_qtys, tick, lot, scratch)
    o = _w_packed(out, o, keys, keys_at, K_ASKS)
    return _w_levels(out, o, ask_prices, ask_qtys, tick, lot, scratch)


@njit(cache=True)
def book_deltas_into(dirty, st, lv_keys, lv_qty, seq, mk_tick, mk_lot, mk_sym_len, keys,
                     keys_at, out, scratch, spans):
    k = 0
    o = 0
    while st[S_DIRTY_N]:
        m = dirty[0, 0]
        for i in range(1, st[S_DIRTY_N]):
            m = min(m, dirty[i, 0])
        if not mk_sym_len[m]:                  # no table to say them with: dropped
            take_dirty_levels(dirty, st, lv_keys, lv_qty, m, 0)
            take_dirty_levels(dirty, st, lv_keys, lv_qty, m, 1)
            continue
        end = book_delta_into(dirty, st, lv_keys, lv_qty, m, seq, mk_tick[m], mk_lot[m], keys,
                              keys_at, out[o:], scratch)
        spans[k, 0] = m
        spans[k, 1] = o
        spans[k, 2] = o + end
        o += end
        k += 1
    return k


class BookDeltas:
    """MarketData.dirty_book_deltas over an ArrayMirror: [(Market, delta bytes)] of every
    market with changed levels, in one compiled call."""

    def __init__(self, arrays, market_by_id):
        self.a = arrays
        self.market_by_id = market_by_id
        self.out = np.zeros(deltas_bytes(64), np.uint8)
        self.spans = np.zeros((64, 3), np.int64)
        self.scratch = np.zeros(SCRATCH_BYTES, np.uint8)
        self.load_markets()

    def load_markets(self) -> None:
        """The grids of market_by_id (its markets and Nones): at start, and after an admin
        command changed a market (the gateway's _markets_changed)."""
        _, self.mk_sym_len, self.mk_tick, self.mk_lot = market_arrays(self.market_by_id)

    def warm(self) -> None:
        """Load the machine code now (as the lane's warm: before the memory base), on an
        empty copy of the dirty list's count, so that nothing is taken."""
        a = self.a
        st = a.st.copy()
        st[S_DIRTY_N] = 0
        book_deltas_into(a.dirty, st, a.lv_keys, a.lv_qty, 0, self.mk_tick, self.mk_lot,
                         self.mk_sym_len, KEYS, KEYS_AT, self.out, self.scratch, self.spans)

    def __call__(self, seq: int) -> list:
        a = self.a
        n = int(a.st[S_DIRTY_N])
        if len(self.out) < deltas_bytes(n):
            self.out = np.zeros(2 * deltas_bytes(n), np.uint8)
        if len(self.spans) < n:
            self.spans = np.zeros((2 * n, 3), np.int64)
        k = book_deltas_into(a.dirty, a.st, a.lv_keys, a.lv_qty, seq, self.mk_tick,
                             self.mk_lot, self.mk_sym_len, KEYS, KEYS_AT, self.out,
                             self.scratch, self.spans)
        out, market_by_id = self.out, self.market_by_id
        return [(market_by_id[m], out[start:end].tobytes())
                for m, start, end in self.spans[:k].tolist()]
