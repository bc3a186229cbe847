"""Every numbered account report rendered to msgpack by compiled code, byte for byte
what the Python gateway sends.

Contract. `render_into(record, role, idx, account_seq, has_rid, rid, out, start, blob, at,
priced, mk_sym, mk_sym_len, mk_tick, mk_lot, scratch)` writes one report into `out` (uint8)
from byte `start` and returns the end offset, where
- `record` is the 192-byte report record the replay log keeps (uint8): the 64-byte command
  record, then the 128-byte event record;
- `role` (0: the event's own account, 1: a trade's maker), `idx` (the event's position after
  its command, from 1) and `account_seq` are the report's numbering (engine/report_numbering);
- `has_rid`/`rid`: the requester's copy ends with `rid` (gateway/outbox.py `to_account`), the
  other sessions' copies have none; rid is an int64 here (a client's uint64 rid above 2**63-1
  is not handled);
- `blob`, `at`, `priced` come from `render_tables()` and the `mk_*` arrays (indexed by market
  id) from `market_arrays(market_by_id)`; `scratch` is a uint8 work array of SCRATCH_BYTES.
The bytes from `start` to the returned offset equal
`pack(render_record(record, role, idx, account_seq, market_by_id))` (gateway/replay.py), with
`"rid": rid` appended last when has_rid. It returns -1, writing nothing that counts, for a
record the Python renderer has no name for (a side, kind, liquidation kind or event type
outside its tables: it would raise, or index a tuple from its end); the caller renders those
in Python. tests/test_report_render.py proves the byte identity on every report of the engine's
own fuzz streams, with and without rids, plus hand-built records for the rare branches.

Every string is written as msgspec itself encoded it (`pack` at table-building time): the
header (fixstr, str8, str16, nil for None, true) is right by construction. The name tables
(sides, kinds, statuses, reasons, reject texts, type names) are built from codec.py's and
replay.py's tables and builders, and passed as arguments rather than read as globals: numba's
cache freezes globals and is invalidated only when this file changes, so a text edited in
codec.py would otherwise render stale. Record offsets and event/command codes are globals
(from engine/records.py), as in compiled_pass.py: a layout change there needs the cache
cleared.

Integers are written by `_w_int` in the smallest msgpack form, as msgspec writes them.
Decimals by `_w_scaled`, exact for every int64.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.market import Market
from engine.records import (CMD_CANCEL_ALL, CMD_NEW_ORDER, COMMAND_BYTES, COMMAND_DTYPE, EV_ACK,
                            EV_AMENDED, EV_CANCELED, EV_DONE, EV_FUNDING, EV_REJECT, EV_TRADE,
                            EV_TRIGGERED, FLAG_CID_GIVEN, FLAG_ON_DISCONNECT,
                            FUNDING_EVENT_DTYPE, KIND_MARKET,
                            LIQUIDATION_EVENT_DTYPE, ORDER_EVENT_DTYPE, REASON_NAMES,
                            REASON_USER, TRADE_EVENT_DTYPE)
from engine.units import ATOM_EXPONENT, RATE_EXPONENT
from gateway import codec
from gateway.codec import OE_REASON, OE_STATUS, ORDER_EVENT_STRUCT, pack
from gateway.replay import _DISCONNECT, _TYPE_NAMES

NAMES = 256                  # entries per name table: any u8 code
MAX_EXPONENT = 64            # grid exponents market_arrays accepts (scratch holds the padding)
MAX_MANTISSA = 10 ** 17      # _w_scaled multiplies digit by digit: 9 x mantissa + carry < 2**63
SCRATCH_BYTES = 128          # 20 digits of units + 18 of mantissa, or exponent + 1
SYMBOL_BYTES = 40            # a packed symbol: header + at most 32 bytes (engine/market.py)
KEY_BYTES = 16               # a packed key, at most
MAX_ENTRY_BYTES = 256        # a packed name or text (render_tables checks codec's texts fit)
# The most a report takes: a map16 header, 16 keys, and as values at most 5 names (a trigger
# or ack: type, market, side, kind, status), 6 decimals (str8 header, sign, point, digits) and
# the rest 9-byte ints. render_into refuses an `out` with less room than this after `start`.
MAX_REPORT_BYTES = 3 + 16 * KEY_BYTES + 5 * MAX_ENTRY_BYTES + 6 * (4 + SCRATCH_BYTES) + 16 * 9

# --- the pre-packed strings: keys and fixed values first, then the name tables --------------
_LITERALS = ("type", "cid", "oid", "status", "market", "side", "qty", "remaining", "seq", "ts",
             "price", "kind", "account_seq", "rid", "reason", "message", "trade_id", "fee",
             "liquidity", "liquidation", "rate", "payment", "size", "mark_price", "count",
             "fill", "taker", "maker", "reject", "done", True, None)
(K_TYPE, K_CID, K_OID, K_STATUS, K_MARKET, K_SIDE, K_QTY, K_REMAINING, K_SEQ, K_TS, K_PRICE,
 K_KIND, K_ACCOUNT_SEQ, K_RID, K_REASON, K_MESSAGE, K_TRADE_ID, K_FEE, K_LIQUIDITY,
 K_LIQUIDATION, K_RATE, K_PAYMENT, K_SIZE, K_MARK_PRICE, K_COUNT, V_FILL, V_TAKER, V_MAKER,
 V_REJECT, V_DONE, V_TRUE, V_NONE) = range(len(_LITERALS))
# table bases: entry base + code
(SIDE_AT, KIND_AT, STATUS_AT, CANCEL_REASON_AT, REJECT_NAME_AT, REJECT_TEXT_AT, LIQ_KIND_AT,
 TYPE_AT) = range(len(_LITERALS), len(_LITERALS) + 8 * NAMES, NAMES)
V_DISCONNECT = TYPE_AT + NAMES
ENTRIES = V_DISCONNECT + 1

_ABSENT = object()           # a code the Python renderer has no name for (it would raise)


def _probe_order_event(field: int, code: int) -> tuple:
    """An order event of zeros with one field set: fed to codec's builders to read off what
    they render for each code, fallbacks included."""
    ev = [0] * len(ORDER_EVENT_STRUCT.unpack(bytes(ORDER_EVENT_STRUCT.size)))
    ev[field] = code
    return tuple(ev)


def render_tables():
    """(blob, at, priced): every string the renderer writes, msgpack-encoded by `pack` and
    concatenated (entry i is blob[at[i]:at[i+1]], empty where Python has no name), and
    priced[kind] = 1 for the kinds whose ack carries a price."""
    probe = Market("PROBE", 0, "1", "1")
    entries = list(_LITERALS)
    tables = (
        lambda c: codec.SIDE_NAMES[c] if c < len(codec.SIDE_NAMES) else _ABSENT,
        lambda c: codec.KIND_NAMES[c] if c < len(codec.KIND_NAMES) else _ABSENT,
        lambda c: codec.ack_message(_probe_order_event(OE_STATUS, c), probe)["status"],
        REASON_NAMES.get,                                   # canceled: None when unnamed
        lambda c: codec.engine_reject_message(_probe_order_event(OE_REASON, c), None)["reason"],
        lambda c: codec.engine_reject_message(_probe_order_event(OE_REASON, c), None)["message"],
        lambda c: codec.LIQUIDATION_KIND_NAMES.get(c, _ABSENT),
        lambda c: _TYPE_NAMES.get(c, _ABSENT),
    )
    for name_of in tables:
        entries.extend(name_of(c) for c in range(NAMES))
    entries.append(_DISCONNECT)
    assert len(entries) == ENTRIES
    packed = [b"" if e is _ABSENT else pack(e) for e in entries]
    if (max(len(p) for p in packed[:len(_LITERALS)]) > KEY_BYTES
            or max(map(len, packed)) > MAX_ENTRY_BYTES):
        raise ValueError("a key or name is longer than the renderer's bound (MAX_REPORT_BYTES)")
    at = np.zeros(ENTRIES + 1, np.int64)
    at[1:] = np.cumsum([len(p) for p in packed])
    blob = np.frombuffer(b"".join(packed), np.uint8).copy()
    priced = np.array([c in codec.PRICED_KINDS for c in range(NAMES)], np.uint8)
    return blob, at, priced


def market_arrays(market_by_id):
    """(mk_sym, mk_sym_len, mk_tick, mk_lot) indexed by market id from the gateway's list of
    Market-or-None: the packed symbol (length 0: no table, rendered as `market: None`) and each
    grid as (mantissa, exponent). A grid too fine or too coarse for _w_scaled raises."""
    n = len(market_by_id)
    mk_sym = np.zeros((n, SYMBOL_BYTES), np.uint8)
    mk_sym_len = np.zeros(n, np.int64)
    mk_tick = np.zeros((n, 2), np.int64)
    mk_lot = np.zeros((n, 2), np.int64)
    for m, market in enumerate(market_by_id):
        if market is None:
            continue
        for grid, row in ((market.tick, mk_tick[m]), (market.lot, mk_lot[m])):
            if grid.mantissa > MAX_MANTISSA or grid.exponent > MAX_EXPONENT:
                raise ValueError(f"market {market.symbol}: {grid.name} {grid.text} is outside "
                                 f"what the compiled renderer formats")
            row[0], row[1] = grid.mantissa, grid.exponent
        sym = pack(market.symbol)
        mk_sym[m, :len(sym)] = np.frombuffer(sym, np.uint8)
        mk_sym_len[m] = len(sym)
    return mk_sym, mk_sym_len, mk_tick, mk_lot


# built once at import, from codec.py's tables as they are now
BLOB, AT, PRICED = render_tables()


def render(record: bytes, role: int, idx: int, account_seq: int, markets, rid=None):
    """The report's msgpack bytes (rid, an int, appended when given), or None where the Python
    renderer must answer; `markets` is market_arrays(market_by_id). One allocation per call:
    for tests and tools, the gateway's pass calls render_into on its own buffer."""
    out = np.empty(MAX_REPORT_BYTES, np.uint8)
    end = render_into(np.frombuffer(record, np.uint8), role, idx, account_seq, rid is not None,
                      0 if rid is None else rid, out, 0, BLOB, AT, PRICED, *markets,
                      np.empty(SCRATCH_BYTES, np.uint8))
    return None if end < 0 else out[:end].tobytes()


# --- byte offsets in the 192-byte record (the event's fields after the command's 64) ---------
def _off(dtype, name, base=COMMAND_BYTES):
    return base + dtype.fields[name][1]


C_CID, C_OID = _off(COMMAND_DTYPE, "cid", 0), _off(COMMAND_DTYPE, "oid", 0)
C_CMD, C_FLAGS = _off(COMMAND_DTYPE, "cmd", 0), _off(COMMAND_DTYPE, "flags", 0)
E_SEQ_AT, E_TS_AT = _off(ORDER_EVENT_DTYPE, "seq"), _off(ORDER_EVENT_DTYPE, "ts_ns")
E_ETYPE_AT, E_MARKET_AT = _off(ORDER_EVENT_DTYPE, "etype"), _off(ORDER_EVENT_DTYPE, "market")
O_REASON, O_STATUS, O_SIDE, O_KIND, O_OID, O_CID, O_PRICE, O_QTY, O_REMAINING = (
    _off(ORDER_EVENT_DTYPE, f) for f in ("reason", "status", "side", "kind", "oid", "cid",
                                         "price_ticks", "qty_lots", "remaining_lots"))
(T_SIDE, T_LIQUIDATION, T_TRADE_ID, T_PRICE, T_QTY, T_OID, T_CID, T_REMAINING, T_FEE,
 T_MAKER_OID, T_MAKER_CID, T_MAKER_REMAINING, T_MAKER_FEE) = (
    _off(TRADE_EVENT_DTYPE, f) for f in (
        "side", "liquidation", "trade_id", "price_ticks", "qty_lots", "oid", "cid",
        "remaining_lots", "fee_atoms", "maker_oid", "maker_cid", "maker_remaining_lots",
        "maker_fee_atoms"))
F_RATE, F_SIZE, F_MARK, F_PAYMENT = (_off(FUNDING_EVENT_DTYPE, f) for f in (
    "rate_e9", "size_lots", "mark_ticks", "payment_atoms"))
L_KIND, L_SIDE, L_QTY, L_PRICE, L_FEE, L_SIZE = (_off(LIQUIDATION_EVENT_DTYPE, f) for f in (
    "kind", "side", "qty_lots", "price_ticks", "fee_atoms", "size_lots"))


# --- compiled writers ------------------------------------------------------------------------
@njit(cache=True)
def _i64(rec, o):
    """The little-endian int64 at rec[o:o+8] (byte by byte: no alignment assumed)."""
    u = np.uint64(0)
    for j in range(7, -1, -1):
        u = (u << np.uint64(8)) | np.uint64(rec[o + j])
    return np.int64(u)


@njit(cache=True)
def _i16(rec, o):
    v = np.int64(rec[o]) | (np.int64(rec[o + 1]) << 8)
    return v - 65536 if v >= 32768 else v


@njit(cache=True)
def _has(at, i):
    return at[i + 1] > at[i]


@njit(cache=True)
def _w_packed(out, o, blob, at, i):
    """Entry i of the pre-packed strings, as msgspec encoded it."""
    n = at[i + 1] - at[i]
    out[o:o + n] = blob[at[i]:at[i + 1]]
    return o + n


@njit(cache=True)
def _w_map(out, o, n):
    if n < 16:
        out[o] = 0x80 | n
        return o + 1
    out[o] = 0xde            # map16: a liquidation fill with its rid has 16 keys
    out[o + 1] = n >> 8
    out[o + 2] = n & 0xff
    return o + 3


@njit(cache=True)
def _w_int(out, o, v):
    if 0 <= v <= 0x7f:
        out[o] = v
        return o + 1
    if -32 <= v < 0:
        out[o] = v + 256
        return o + 1
    if v > 0:
        if v <= 0xff:
            out[o] = 0xcc
            n = 1
        elif v <= 0xffff:
            out[o] = 0xcd
            n = 2
        elif v <= 0xffffffff:
            out[o] = 0xce
            n = 4
        else:
            out[o] = 0xcf
            n = 8
    else:
        if v >= -128:
            out[o] = 0xd0
            n = 1
        elif v >= -32768:
            out[o] = 0xd1
            n = 2
        elif v >= -2147483648:
            out[o] = 0xd2
            n = 4
        else:
            out[o] = 0xd3
            n = 8
    u = np.uint64(v)
    for j in range(n):
        out[o + n - j] = np.uint8(u & np.uint64(0xff))
        u >>= np.uint64(8)
    return o + 1 + n


@njit(cache=True)
def _w_str_header(out, o, n):
    """fixstr or str8: a decimal is at most 2 + SCRATCH_BYTES < 256 bytes."""
    if n < 32:
        out[o] = 0xa0 | n
        return o + 1
    out[o] = 0xd9
    out[o + 1] = n
    return o + 2


@njit(cache=True)
def _w_scaled(out, o, units, mantissa, exponent, digits):
    """scaled_str(units x mantissa, exponent) (engine/units.py) as a msgpack str, exact for
    every int64 `units` (mantissa <= MAX_MANTISSA, exponent <= MAX_EXPONENT): the product is
    formed in decimal digits (little-endian in `digits`), never in int64."""
    neg = units < 0
    # |units| as uint64 without negating INT64_MIN in int64
    mag = np.uint64(-(units + 1)) + np.uint64(1) if neg else np.uint64(units)
    k = 0
    while True:
        digits[k] = mag % np.uint64(10)
        mag //= np.uint64(10)
        k += 1
        if mag == 0:
            break
    carry = np.int64(0)
    for j in range(k):
        t = np.int64(digits[j]) * mantissa + carry
        digits[j] = t % 10
        carry = t // 10
    while carry:
        digits[k] = carry % 10
        carry //= 10
        k += 1
    while k <= exponent:     # at least one whole digit: "0.001"
        digits[k] = 0
        k += 1
    f0 = 0                   # fraction digits digits[f0:exponent] survive the stripped zeros
    while f0 < exponent and digits[f0] == 0:
        f0 += 1
    n = (1 if neg else 0) + (k - exponent) + (1 + exponent - f0 if f0 < exponent else 0)
    o = _w_str_header(out, o, n)
    if neg:
        out[o] = 45          # "-"
        o += 1
    for j in range(k - 1, exponent - 1, -1):
        out[o] = 48 + digits[j]
        o += 1
    if f0 < exponent:
        out[o] = 46          # "."
        o += 1
        for j in range(exponent - 1, f0 - 1, -1):
            out[o] = 48 + digits[j]
            o += 1
    return o


@njit(cache=True)
def _w_key_int(out, o, blob, at, key, v):
    o = _w_packed(out, o, blob, at, key)
    return _w_int(out, o, v)


@njit(cache=True)
def _w_key_units(out, o, blob, at, key, units, grid, scratch):
    o = _w_packed(out, o, blob, at, key)
    return _w_scaled(out, o, units, grid[0], grid[1], scratch)


@njit(cache=True)
def _w_key_atoms(out, o, blob, at, key, atoms, scratch):
    o = _w_packed(out, o, blob, at, key)
    return _w_scaled(out, o, atoms, 1, ATOM_EXPONENT, scratch)


@njit(cache=True)
def _w_key_name(out, o, blob, at, key, entry):
    o = _w_packed(out, o, blob, at, key)
    return _w_packed(out, o, blob, at, entry)


# --- the renderer ----------------------------------------------------------------------------
@njit(cache=True)
def render_into(record, role, idx, account_seq, has_rid, rid, out, start, blob, at, priced,
                mk_sym, mk_sym_len, mk_tick, mk_lot, scratch):
    """One report: see the module docstring. Returns the end offset in `out`, or -1 for a
    record the Python renderer has no name for."""
    etype = record[E_ETYPE_AT]
    seq = _i64(record, E_SEQ_AT)
    ts = _i64(record, E_TS_AT)
    if start + MAX_REPORT_BYTES > len(out):
        raise ValueError("no room for a report: out needs MAX_REPORT_BYTES from start")
    tail = 2 if has_rid else 1            # account_seq, then rid
    o = start
    if etype == EV_REJECT:
        reason = record[O_REASON]
        if idx > 1:     # a fired stop/take-profit refused at trigger time: cid and oid its own
            with_cid = with_oid = True
            oid = _i64(record, O_OID)
        else:
            with_cid = (record[C_CMD] == CMD_NEW_ORDER
                        or (record[C_FLAGS] & FLAG_CID_GIVEN) != 0)
            oid = _i64(record, C_OID)
            with_oid = oid != 0
        o = _w_map(out, o, 5 + with_cid + with_oid + tail)
        o = _w_key_name(out, o, blob, at, K_TYPE, V_REJECT)
        o = _w_key_name(out, o, blob, at, K_REASON, REJECT_NAME_AT + reason)
        o = _w_key_name(out, o, blob, at, K_MESSAGE, REJECT_TEXT_AT + reason)
        o = _w_key_int(out, o, blob, at, K_TS, ts)
        if with_cid:
            o = _w_key_int(out, o, blob, at, K_CID, _i64(record, O_CID))
        o = _w_key_int(out, o, blob, at, K_SEQ, seq)
        if with_oid:
            o = _w_key_int(out, o, blob, at, K_OID, oid)
    elif etype == EV_DONE:
        with_count = record[C_CMD] == CMD_CANCEL_ALL
        with_cid = (record[C_FLAGS] & FLAG_CID_GIVEN) != 0
        o = _w_map(out, o, 3 + with_count + with_cid + tail)
        o = _w_key_name(out, o, blob, at, K_TYPE, V_DONE)
        o = _w_seq_ts(out, o, blob, at, seq, ts)
        if with_count:
            o = _w_key_int(out, o, blob, at, K_COUNT, _i64(record, O_QTY))
        if with_cid:
            o = _w_key_int(out, o, blob, at, K_CID, _i64(record, C_CID))
    elif not _has(at, TYPE_AT + etype):
        return -1                         # not an event type render_report knows
    else:
        m = _i16(record, E_MARKET_AT)
        if m < 0 or m >= len(mk_sym_len) or mk_sym_len[m] == 0:
            # a market this gateway has no table for: ids only
            o = _w_map(out, o, 4 + tail)
            o = _w_key_name(out, o, blob, at, K_TYPE, TYPE_AT + etype)
            o = _w_key_name(out, o, blob, at, K_MARKET, V_NONE)
            o = _w_seq_ts(out, o, blob, at, seq, ts)
        else:
            o = _w_market_event(record, etype, role, tail, seq, ts, out, o, blob, at, priced,
                                mk_sym[m, :mk_sym_len[m]], mk_tick[m], mk_lot[m], scratch)
            if o < 0:
                return -1
    o = _w_key_int(out, o, blob, at, K_ACCOUNT_SEQ, account_seq)
    if has_rid:
        o = _w_key_int(out, o, blob, at, K_RID, rid)
    return o


@njit(cache=True)
def _w_seq_ts(out, o, blob, at, seq, ts):
    o = _w_key_int(out, o, blob, at, K_SEQ, seq)
    return _w_key_int(out, o, blob, at, K_TS, ts)


@njit(cache=True)
def _w_head(record, etype, cid_at, oid_at, out, o, blob, at):
    """type, cid, oid: how every order report starts."""
    o = _w_key_name(out, o, blob, at, K_TYPE, TYPE_AT + etype)
    o = _w_key_int(out, o, blob, at, K_CID, _i64(record, cid_at))
    return _w_key_int(out, o, blob, at, K_OID, _i64(record, oid_at))


@njit(cache=True)
def _w_symbol(out, o, blob, at, symbol):
    o = _w_packed(out, o, blob, at, K_MARKET)
    n = len(symbol)
    out[o:o + n] = symbol
    return o + n


@njit(cache=True)
def _w_market_event(record, etype, role, tail, seq, ts, out, o, blob, at, priced, symbol, tick,
                    lot, scratch):
    """A report on a market with a table, up to its account_seq (codec.py's builders, key
    for key); -1 for a side or kind Python has no name for."""
    if etype == EV_TRADE:
        side = record[T_SIDE]
        if role > 1 or side > 1:
            return -1
        maker = role == 1
        liquidation = record[T_LIQUIDATION] != 0
        o = _w_map(out, o, 13 + liquidation + tail)
        o = _w_head(record, etype, T_MAKER_CID if maker else T_CID,
                    T_MAKER_OID if maker else T_OID, out, o, blob, at)
        o = _w_key_int(out, o, blob, at, K_TRADE_ID, _i64(record, T_TRADE_ID))
        o = _w_symbol(out, o, blob, at, symbol)
        o = _w_key_name(out, o, blob, at, K_SIDE, SIDE_AT + (1 - side if maker else side))
        o = _w_key_units(out, o, blob, at, K_PRICE, _i64(record, T_PRICE), tick, scratch)
        o = _w_key_units(out, o, blob, at, K_QTY, _i64(record, T_QTY), lot, scratch)
        o = _w_key_units(out, o, blob, at, K_REMAINING,
                         _i64(record, T_MAKER_REMAINING if maker else T_REMAINING), lot, scratch)
        o = _w_key_atoms(out, o, blob, at, K_FEE,
                         _i64(record, T_MAKER_FEE if maker else T_FEE), scratch)
        o = _w_key_name(out, o, blob, at, K_LIQUIDITY, V_MAKER if maker else V_TAKER)
        o = _w_seq_ts(out, o, blob, at, seq, ts)
        if liquidation:
            o = _w_key_name(out, o, blob, at, K_LIQUIDATION, V_TRUE)
    elif etype == EV_ACK:
        side = record[O_SIDE]
        kind = record[O_KIND]
        with_kind = kind > KIND_MARKET
        if side > 1 or (with_kind and not _has(at, KIND_AT + kind)):
            return -1
        o = _w_map(out, o, 10 + priced[kind] + with_kind + tail)
        o = _w_head(record, etype, O_CID, O_OID, out, o, blob, at)
        o = _w_key_name(out, o, blob, at, K_STATUS, STATUS_AT + record[O_STATUS])
        o = _w_symbol(out, o, blob, at, symbol)
        o = _w_key_name(out, o, blob, at, K_SIDE, SIDE_AT + side)
        o = _w_key_units(out, o, blob, at, K_QTY, _i64(record, O_QTY), lot, scratch)
        o = _w_key_units(out, o, blob, at, K_REMAINING, _i64(record, O_REMAINING), lot, scratch)
        o = _w_seq_ts(out, o, blob, at, seq, ts)
        if priced[kind]:
            o = _w_key_units(out, o, blob, at, K_PRICE, _i64(record, O_PRICE), tick, scratch)
        if with_kind:
            o = _w_key_name(out, o, blob, at, K_KIND, KIND_AT + kind)
    elif etype == EV_CANCELED:
        reason = record[O_REASON]
        if (reason == REASON_USER and record[C_CMD] == CMD_CANCEL_ALL
                and (record[C_FLAGS] & FLAG_ON_DISCONNECT) != 0):
            name = V_DISCONNECT           # a gateway's cancel-on-disconnect
        else:
            name = CANCEL_REASON_AT + reason
        o = _w_map(out, o, 8 + tail)
        o = _w_head(record, etype, O_CID, O_OID, out, o, blob, at)
        o = _w_key_name(out, o, blob, at, K_REASON, name)
        o = _w_symbol(out, o, blob, at, symbol)
        o = _w_key_units(out, o, blob, at, K_QTY, _i64(record, O_REMAINING), lot, scratch)
        o = _w_seq_ts(out, o, blob, at, seq, ts)
    elif etype == EV_AMENDED:
        o = _w_map(out, o, 8 + tail)
        o = _w_head(record, etype, O_CID, O_OID, out, o, blob, at)
        o = _w_symbol(out, o, blob, at, symbol)
        o = _w_key_units(out, o, blob, at, K_PRICE, _i64(record, O_PRICE), tick, scratch)
        o = _w_key_units(out, o, blob, at, K_QTY, _i64(record, O_REMAINING), lot, scratch)
        o = _w_seq_ts(out, o, blob, at, seq, ts)
    elif etype == EV_TRIGGERED:
        side = record[O_SIDE]
        kind = record[O_KIND]
        if side > 1 or not _has(at, KIND_AT + kind):
            return -1
        o = _w_map(out, o, 11 + tail)
        o = _w_head(record, etype, O_CID, O_OID, out, o, blob, at)
        o = _w_symbol(out, o, blob, at, symbol)
        o = _w_key_name(out, o, blob, at, K_SIDE, SIDE_AT + side)
        o = _w_key_name(out, o, blob, at, K_KIND, KIND_AT + kind)
        o = _w_key_name(out, o, blob, at, K_STATUS, STATUS_AT + record[O_STATUS])
        o = _w_key_units(out, o, blob, at, K_QTY, _i64(record, O_QTY), lot, scratch)
        o = _w_key_units(out, o, blob, at, K_REMAINING, _i64(record, O_REMAINING), lot, scratch)
        o = _w_seq_ts(out, o, blob, at, seq, ts)
    elif etype == EV_FUNDING:
        o = _w_map(out, o, 8 + tail)
        o = _w_key_name(out, o, blob, at, K_TYPE, TYPE_AT + etype)
        o = _w_symbol(out, o, blob, at, symbol)
        o = _w_packed(out, o, blob, at, K_RATE)
        o = _w_scaled(out, o, _i64(record, F_RATE), 1, RATE_EXPONENT, scratch)
        o = _w_key_atoms(out, o, blob, at, K_PAYMENT, _i64(record, F_PAYMENT), scratch)
        o = _w_key_units(out, o, blob, at, K_SIZE, _i64(record, F_SIZE), lot, scratch)
        o = _w_key_units(out, o, blob, at, K_MARK_PRICE, _i64(record, F_MARK), tick, scratch)
        o = _w_seq_ts(out, o, blob, at, seq, ts)
    else:                                 # EV_LIQUIDATION (the last type with a name)
        side = record[L_SIDE]
        kind = record[L_KIND]
        if side > 1 or not _has(at, LIQ_KIND_AT + kind):
            return -1
        o = _w_map(out, o, 10 + tail)
        o = _w_key_name(out, o, blob, at, K_TYPE, TYPE_AT + etype)
        o = _w_symbol(out, o, blob, at, symbol)
        o = _w_key_units(out, o, blob, at, K_QTY, _i64(record, L_QTY), lot, scratch)
        o = _w_key_units(out, o, blob, at, K_PRICE, _i64(record, L_PRICE), tick, scratch)
        o = _w_key_name(out, o, blob, at, K_KIND, LIQ_KIND_AT + kind)
        o = _w_key_name(out, o, blob, at, K_SIDE, SIDE_AT + side)
        o = _w_key_atoms(out, o, blob, at, K_FEE, _i64(record, L_FEE), scratch)
        o = _w_key_units(out, o, blob, at, K_SIZE, _i64(record, L_SIZE), lot, scratch)
        o = _w_seq_ts(out, o, blob, at, seq, ts)
    return o
