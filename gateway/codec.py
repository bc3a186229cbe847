"""Wire messages <-> command and event records (PROTOCOL.md, "Order entry").

Requests: `parse_*` take a decoded msgpack map and return the command fields
`(cmd, market, cid, oid, price_ticks, qty_lots, amount_atoms, side, kind, tif, flags, stp)`;
the server stamps `ts_ns`, `account` and `req` and packs them with `COMMAND_STRUCT` straight
into its command buffer (struct packing: no numpy per message). Anything wrong raises
`EdgeReject` with a protocol reason and a text; nothing invalid reaches a ring.

Events: the matcher's 128-byte records are read with `struct` layouts that mirror
engine/records.py field for field (tests/test_gateway_units.py checks them against the numpy
dtypes), and turned into reply/report maps by the `*_message` builders. Amounts are decimal
strings; ids, sequence numbers and `ts` (ns) integers.

Messages beyond PROTOCOL.md (additions, never changes):
- every message the gateway sends carries `ts`; those caused by an event also `seq`.
- `ack` also has `market`, `side`, `price` (limit kinds), `qty` (the accepted quantity: a
  reduce-only order may be clipped to the position), `remaining` (open quantity) and, for the
  stop and take-profit kinds, `kind`.
- `fill` has `liquidation: true` when the liquidation engine made the trade.
- `triggered` has `market`, `side`, `kind`, and as an ack would `status`, `qty` (a reduce-only
  order may be clipped) and `remaining`; `funding` has `size` and `mark_price`; `liquidation`
  has `side`, `fee` and `size` (docs/protocol.md).
- `canceled` also has `market` and `qty` (the quantity canceled).
- `amended` also has `market`; its `qty` is the order's new open quantity.
- `hello` {cancel_on_disconnect: bool} -> `hello` {account, cancel_on_disconnect}: opts a session
  into cancel-on-disconnect (see server.py).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import msgspec

from engine.market import Market, MarketTable
from engine.records import (CMD_AMEND, CMD_CANCEL, CMD_CANCEL_ALL, CMD_NEW_ORDER,
                            CMD_SET_MARGIN, CMD_WITHDRAW, FLAG_REDUCE_ONLY, FLAG_TRIGGER_BY_LAST,
                            KIND_LIMIT, KIND_MARKET, KIND_STOP_LIMIT, KIND_STOP_MARKET,
                            KIND_TAKE_PROFIT_LIMIT, KIND_TAKE_PROFIT_MARKET, LIQ_KIND_ADL,
                            LIQ_KIND_LIQUIDATED, LIQ_KIND_SETTLEMENT, MARGIN_CROSS,
                            MARGIN_ISOLATED,
                            REASON_INVALID_MESSAGE, REASON_INVALID_QTY, REASON_LEVERAGE,
                            REASON_MARGIN_MODE_LOCKED, REASON_NAMES, SIDE_BUY, SIDE_SELL,
                            STATUS_CANCELED, STATUS_FILLED, STATUS_OPEN, STATUS_UNTRIGGERED,
                            STP_CANCEL_BOTH, STP_CANCEL_MAKER, STP_CANCEL_TAKER, TIF_FOK,
                            TIF_GTC, TIF_IOC, TIF_POST_ONLY)
from engine.units import EdgeReject, INT64_MAX, atoms_str, scaled_str, usdc_to_atoms

INT64_MIN = -2 ** 63

# --- record layouts (little-endian, no implicit padding) -----------------------------------
# ts_ns, cid, oid, price_ticks, qty_lots, amount_atoms, account, req, market, cmd, side, kind,
# tif, flags, stp
COMMAND_STRUCT = struct.Struct("<qqqqqqiihBBBBBB")
_H = "<qqBBhi"                                   # seq, ts_ns, etype, source, market, account
HEADER_STRUCT = struct.Struct(_H)
# + req, reason, status, side, kind, oid, cid, price_ticks, qty_lots, remaining_lots
ORDER_EVENT_STRUCT = struct.Struct(_H + "iBBBBqqqqq")
# + req, side, liquidation, trade_id, price_ticks, qty_lots, oid, cid, remaining_lots,
#   fee_atoms, maker_account, maker_oid, maker_cid, maker_remaining_lots, maker_fee_atoms
TRADE_EVENT_STRUCT = struct.Struct(_H + "iBB2xqqqqqqqi4xqqqq")
# + req, amount_atoms, balance_atoms
BALANCE_EVENT_STRUCT = struct.Struct(_H + "i4xqq")
# + req, mark_ticks
MARK_EVENT_STRUCT = struct.Struct(_H + "i4xq")
# + req, rate_e9, size_lots, mark_ticks, payment_atoms, balance_atoms
FUNDING_EVENT_STRUCT = struct.Struct(_H + "i4xqqqqq")
# + req, kind, side, qty_lots, price_ticks, bankruptcy_ticks, fee_atoms, counterparty,
#   size_lots
LIQUIDATION_EVENT_STRUCT = struct.Struct(_H + "iBB2xqqqqqq")
COMMAND_IN_EVENT_OFFSET = 64                     # EV_COMMAND: the command record's byte offset
ETYPE_OFFSET = 16
assert COMMAND_STRUCT.size == 64 and HEADER_STRUCT.size == 24

# --- positions of the fields in the tuples these structs unpack -------------------------------
(CM_TS, CM_CID, CM_OID, CM_PRICE, CM_QTY, CM_AMOUNT, CM_ACCOUNT, CM_REQ, CM_MARKET, CM_CMD,
 CM_SIDE, CM_KIND, CM_TIF, CM_FLAGS, CM_STP) = range(15)
# every event: the header, then req
E_SEQ, E_TS, E_ETYPE, E_SOURCE, E_MARKET, E_ACCOUNT, E_REQ = range(7)
# ORDER_EVENT_STRUCT
(OE_REASON, OE_STATUS, OE_SIDE, OE_KIND, OE_OID, OE_CID, OE_PRICE, OE_QTY,
 OE_REMAINING) = range(7, 16)
# TRADE_EVENT_STRUCT (the taker's fields unprefixed)
(TR_SIDE, TR_LIQUIDATION, TR_TRADE_ID, TR_PRICE, TR_QTY, TR_OID, TR_CID, TR_REMAINING, TR_FEE,
 TR_MAKER_ACCOUNT, TR_MAKER_OID, TR_MAKER_CID, TR_MAKER_REMAINING, TR_MAKER_FEE) = range(7, 21)
MK_MARK = 7                                      # MARK_EVENT_STRUCT
FU_RATE, FU_SIZE, FU_MARK, FU_PAYMENT, FU_BALANCE = range(7, 12)      # FUNDING_EVENT_STRUCT
(LQ_KIND, LQ_SIDE, LQ_QTY, LQ_PRICE, LQ_BANKRUPTCY, LQ_FEE, LQ_COUNTERPARTY,
 LQ_SIZE) = range(7, 15)                         # LIQUIDATION_EVENT_STRUCT

# --- names ----------------------------------------------------------------------------------
SIDES = {"buy": SIDE_BUY, "sell": SIDE_SELL}
SIDE_NAMES = ("buy", "sell")
KINDS = {"limit": KIND_LIMIT, "market": KIND_MARKET, "stop_market": KIND_STOP_MARKET,
         "stop_limit": KIND_STOP_LIMIT, "take_profit_market": KIND_TAKE_PROFIT_MARKET,
         "take_profit_limit": KIND_TAKE_PROFIT_LIMIT}
KIND_NAMES = ("limit", "market", "stop_market", "stop_limit", "take_profit_market",
              "take_profit_limit")
# kinds that carry a limit price (the others enter as market orders)
PRICED_KINDS = frozenset((KIND_LIMIT, KIND_STOP_LIMIT, KIND_TAKE_PROFIT_LIMIT))
TRIGGER_BY = {"mark": 0, "last": FLAG_TRIGGER_BY_LAST}
MARGIN_MODES = {"cross": MARGIN_CROSS, "isolated": MARGIN_ISOLATED}
MARGIN_MODE_NAMES = ("cross", "isolated")
LIQUIDATION_KIND_NAMES = {LIQ_KIND_LIQUIDATED: "liquidated", LIQ_KIND_ADL: "adl",
                          LIQ_KIND_SETTLEMENT: "settlement"}
TIFS = {"gtc": TIF_GTC, "ioc": TIF_IOC, "fok": TIF_FOK, "post_only": TIF_POST_ONLY}
STPS = {"cancel_taker": STP_CANCEL_TAKER, "cancel_maker": STP_CANCEL_MAKER,
        "cancel_both": STP_CANCEL_BOTH}
STATUS_NAMES = {STATUS_OPEN: "open", STATUS_FILLED: "filled", STATUS_CANCELED: "canceled",
                STATUS_UNTRIGGERED: "untriggered"}

# Texts for people, per reject reason the matcher can give.
REASON_TEXT = {
    "invalid_message": "the message is not valid",
    "unknown_market": "no such market",
    "invalid_price": "price out of range",
    "invalid_qty": "quantity out of range",
    "invalid_tick": "price is not on the market's tick grid",
    "invalid_lot": "quantity is not on the market's lot grid",
    "insufficient_margin": "not enough margin (or the position limit is reached)",
    "post_only_would_take": "post-only order would take liquidity",
    "fok_unfilled": "fill-or-kill order cannot fill completely",
    "reduce_only_violation": "reduce-only order would not reduce the position",
    "price_band": "price is outside the band around the mark price",
    "rate_limited": "too many requests",
    "market_halted": "the market is halted",
    "duplicate_cid": "cid is already used by an open order of this account",
    "unknown_order": "no such open order of this account",
    "too_many_orders": "too many open orders (or price levels)",
    "insufficient_balance": "not enough balance",
    "forbidden": "not allowed",
    "account_disabled": "this account is disabled",
    "min_notional": "the order's notional (at its price, or the mark) is below the market's "
                    "min_notional",
    "too_many_stop_orders": "this account has max_stop_orders untriggered stop and "
                            "take-profit orders in this market",
    "open_interest_cap": "the order would raise the market's open interest above its cap",
    "market_cancel_only": "the market takes cancels only",
    "market_reduce_only": "the market takes reduce-only orders only",
    "market_settled": "the market is settled: it takes no orders",
}
# Engine reasons that share a protocol reason but deserve their own text.
ENGINE_REASON_TEXT = {
    REASON_LEVERAGE: "leverage must be an integer from 1 to the max leverage of the bracket "
                     "the position's notional falls in (at most the market's max_leverage)",
    REASON_MARGIN_MODE_LOCKED: "the margin mode cannot change while this market has a "
                               "position or open orders of this account",
}

# msgspec, not msgpack, on the per-message path: the same bytes (msgpack with bin and str8
# types) in about half the time: encoding a reply 0.26 against 0.61 µs, decoding a request
# 0.46 against 1.29 µs. msgpack stays for unpack_lenient.
pack = msgspec.msgpack.Encoder().encode

# A request is a map with string keys, or it does not decode. Allocations are bounded by the
# frame (at most max_message_bytes, checked first): a length that the bytes left cannot hold
# is refused before anything is allocated for it.
unpack = msgspec.msgpack.Decoder(dict[str, Any]).decode


def unpack_lenient(data) -> dict | None:
    """A message refused anyway (too large, several frames, not strictly valid), read as far
    as it goes to find its `rid` and `cid`: the map, or None. msgpack bounds every length by
    the frame's (at most the hard limit), and tuples keep any key hashable."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=False,
                              unicode_errors="replace")
    except Exception:
        return None
    return msg if type(msg) is dict else None


# --- requests --------------------------------------------------------------------------------
def int_field(msg: dict, name: str, *, required: bool, lo: int = INT64_MIN, hi: int = INT64_MAX,
               default: int = 0) -> int:
    v = msg.get(name)
    if v is None:
        if required:
            raise EdgeReject(REASON_INVALID_MESSAGE, f"{name} is required")
        return default
    if type(v) is not int:
        raise EdgeReject(REASON_INVALID_MESSAGE, f"{name} must be an integer")
    if not lo <= v <= hi:
        raise EdgeReject(REASON_INVALID_MESSAGE, f"{name} out of range [{lo}, {hi}]")
    return v


def parse_new_order(msg: dict, markets: MarketTable):
    """A `new_order` map -> command fields, plus the Market (for the pending-request table).

    Written flat on purpose: this runs for every order. The common case costs a handful of
    dict lookups (prices and sizes hit the market's conversion caches).
    """
    get = msg.get
    cid = get("cid")
    if type(cid) is not int or not INT64_MIN <= cid <= INT64_MAX:
        raise EdgeReject(REASON_INVALID_MESSAGE, "cid is required" if cid is None
                         else "cid must be a 64-bit integer")
    symbol = get("market")
    market = markets.by_symbol.get(symbol) if type(symbol) is str else None
    if market is None:
        markets.get(symbol)      # raises the right reject
    side = get("side")
    side = SIDES.get(side) if type(side) is str else None
    if side is None:
        raise EdgeReject(REASON_INVALID_MESSAGE, "side must be \"buy\" or \"sell\"")
    kind_name = get("kind", "limit")
    kind = KINDS.get(kind_name) if type(kind_name) is str else None
    if kind is None:
        raise EdgeReject(REASON_INVALID_MESSAGE, f"kind must be one of {', '.join(KINDS)}")
    qty = get("qty")
    if qty is None:
        raise EdgeReject(REASON_INVALID_MESSAGE, "qty is required")
    lots = market.qty_to_lots(qty)
    price = get("price")
    tif_name = get("tif")
    priced = kind in PRICED_KINDS
    if tif_name is None:
        tif = TIF_GTC if priced else TIF_IOC
    else:
        tif = TIFS.get(tif_name) if type(tif_name) is str else None
        if tif is None:
            raise EdgeReject(REASON_INVALID_MESSAGE, f"tif must be one of {', '.join(TIFS)}")
    if priced:
        if price is None:
            raise EdgeReject(REASON_INVALID_MESSAGE, f"a {kind_name} order needs a price")
        ticks = market.price_to_ticks(price)
    else:
        if price is not None:
            raise EdgeReject(REASON_INVALID_MESSAGE, f"a {kind_name} order takes no price")
        ticks = 0
        if tif == TIF_GTC:
            tif = TIF_IOC
        elif tif == TIF_POST_ONLY:
            raise EdgeReject(REASON_INVALID_MESSAGE, f"a {kind_name} order cannot be post-only")
    flags = 0
    trigger_ticks = 0
    if kind > KIND_MARKET:
        trigger_ticks, flags = _trigger(msg, market, kind_name)
    elif "trigger_price" in msg or "trigger_by" in msg:
        raise EdgeReject(REASON_INVALID_MESSAGE,
                         "trigger_price/trigger_by apply only to stop and take-profit kinds")
    reduce_only = get("reduce_only", False)
    if reduce_only is not False and reduce_only is not True:
        raise EdgeReject(REASON_INVALID_MESSAGE, "reduce_only must be true or false")
    stp_name = get("stp")
    if stp_name is None:
        stp = STP_CANCEL_TAKER
    else:
        stp = STPS.get(stp_name) if type(stp_name) is str else None
        if stp is None:
            raise EdgeReject(REASON_INVALID_MESSAGE, f"stp must be one of {', '.join(STPS)}")
    if reduce_only:
        flags |= FLAG_REDUCE_ONLY
    return (CMD_NEW_ORDER, market.id, cid, 0, ticks, lots, trigger_ticks, side, kind,
            tif, flags, stp), market


def _trigger(msg: dict, market: Market, kind_name: str) -> tuple[int, int]:
    """A conditional order's trigger price (ticks, on the grid like any price) and flags."""
    value = msg.get("trigger_price")
    if value is None:
        raise EdgeReject(REASON_INVALID_MESSAGE, f"a {kind_name} order needs a trigger_price")
    ticks = market.price_to_ticks(value, "trigger_price")
    by = msg.get("trigger_by", "mark")
    flags = TRIGGER_BY.get(by) if type(by) is str else None
    if flags is None:
        raise EdgeReject(REASON_INVALID_MESSAGE, "trigger_by must be \"mark\" or \"last\"")
    return ticks, flags


def parse_set_margin(msg: dict, markets: MarketTable):
    """`set_margin` {market, mode, leverage}: the range of leverage is the matcher's check
    (it knows the market's max_leverage), its reject says so."""
    market = markets.get(msg.get("market"))
    mode_name = msg.get("mode")
    mode = MARGIN_MODES.get(mode_name) if type(mode_name) is str else None
    if mode is None:
        raise EdgeReject(REASON_INVALID_MESSAGE, "mode must be \"cross\" or \"isolated\"")
    leverage = int_field(msg, "leverage", required=True, lo=1, hi=INT64_MAX)
    return (CMD_SET_MARGIN, market.id, 0, 0, 0, leverage, 0, 0, mode, 0, 0, 0)


def order_ref(msg: dict) -> tuple[int, int]:
    """(oid, cid) of a cancel/amend: oid if given (it wins), else cid."""
    oid = int_field(msg, "oid", required=False, lo=1)
    has_cid = msg.get("cid") is not None
    cid = int_field(msg, "cid", required=False)
    if oid == 0 and not has_cid:
        raise EdgeReject(REASON_INVALID_MESSAGE, "oid or cid is required")
    return oid, cid


def cancel_fields(oid: int, cid: int, market_id: int):
    return (CMD_CANCEL, market_id, cid, oid, 0, 0, 0, 0, 0, 0, 0, 0)


def amend_fields(msg: dict, oid: int, cid: int, market: Market):
    """`amend`: price and/or qty (qty = the order's new open quantity; 0 is not allowed)."""
    price, qty = msg.get("price"), msg.get("qty")
    if price is None and qty is None:
        raise EdgeReject(REASON_INVALID_MESSAGE, "amend needs a price and/or a qty")
    ticks = market.price_to_ticks(price) if price is not None else 0
    lots = market.qty_to_lots(qty) if qty is not None else 0
    if qty is not None and lots == 0:
        raise EdgeReject(REASON_INVALID_QTY, "qty must be positive")
    return (CMD_AMEND, market.id, cid, oid, ticks, lots, 0, 0, 0, 0, 0, 0)


def parse_cancel_all(msg: dict, markets: MarketTable):
    symbol = msg.get("market")
    market_id = -1 if symbol is None else markets.get(symbol).id
    return (CMD_CANCEL_ALL, market_id, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def parse_withdraw(msg: dict):
    amount = msg.get("amount")
    if amount is None:
        raise EdgeReject(REASON_INVALID_MESSAGE, "amount is required")
    atoms = usdc_to_atoms(amount)
    if atoms == 0:
        raise EdgeReject(REASON_INVALID_MESSAGE, "amount must be positive")
    return (CMD_WITHDRAW, 0, 0, 0, 0, 0, atoms, 0, 0, 0, 0, 0)


# --- replies and reports ---------------------------------------------------------------------
def reject_message(reason_name: str, text: str, cid=None, seq=None, ts=0) -> dict:
    msg = {"type": "reject", "reason": reason_name, "message": text, "ts": ts}
    if cid is not None:
        msg["cid"] = cid
    if seq is not None:
        msg["seq"] = seq
    return msg


def engine_reject_message(ev, cid) -> dict:
    """EV_REJECT (ORDER_EVENT_STRUCT tuple) -> `reject`; cid only if the request had one."""
    name = REASON_NAMES.get(ev[OE_REASON], "invalid_message")
    text = ENGINE_REASON_TEXT.get(ev[OE_REASON]) or REASON_TEXT.get(name, name)
    return reject_message(name, text, cid, ev[E_SEQ], ev[E_TS])


def ack_message(ev, market: Market) -> dict:
    seq, ts, _, _, _, _, _, _, status, side, kind, oid, cid, price, qty, remaining = ev
    msg = {"type": "ack", "cid": cid, "oid": oid, "status": STATUS_NAMES.get(status, "open"),
           "market": market.symbol, "side": SIDE_NAMES[side], "qty": market.lots_to_str(qty),
           "remaining": market.lots_to_str(remaining), "seq": seq, "ts": ts}
    if kind in PRICED_KINDS:
        msg["price"] = market.ticks_to_str(price)
    if kind > KIND_MARKET:
        msg["kind"] = KIND_NAMES[kind]
    return msg


def canceled_message(ev, market: Market, reason_name: str) -> dict:
    return {"type": "canceled", "cid": ev[OE_CID], "oid": ev[OE_OID], "reason": reason_name,
            "market": market.symbol, "qty": market.lots_to_str(ev[OE_REMAINING]),
            "seq": ev[E_SEQ], "ts": ev[E_TS]}


def amended_message(ev, market: Market) -> dict:
    return {"type": "amended", "cid": ev[OE_CID], "oid": ev[OE_OID], "market": market.symbol,
            "price": market.ticks_to_str(ev[OE_PRICE]),
            "qty": market.lots_to_str(ev[OE_REMAINING]), "seq": ev[E_SEQ], "ts": ev[E_TS]}


def open_order_row(oid: int, order: list, status: str, market: Market) -> dict:
    """One `open_orders` entry from a mirror order (gateway/mirror.py's list layout)."""
    _, cid, _, side, kind, price, remaining, qty = order
    return {"oid": oid, "cid": cid, "market": market.symbol, "side": SIDE_NAMES[side],
            "kind": KIND_NAMES[kind], "price": market.ticks_to_str(price) if price else None,
            "qty": market.lots_to_str(qty), "remaining": market.lots_to_str(remaining),
            "status": status}


def triggered_message(ev, market: Market) -> dict:
    """EV_TRIGGERED: the fired order's ack, in effect (no other ack follows)."""
    return {"type": "triggered", "cid": ev[OE_CID], "oid": ev[OE_OID], "market": market.symbol,
            "side": SIDE_NAMES[ev[OE_SIDE]], "kind": KIND_NAMES[ev[OE_KIND]],
            "status": STATUS_NAMES.get(ev[OE_STATUS], "open"),
            "qty": market.lots_to_str(ev[OE_QTY]),
            "remaining": market.lots_to_str(ev[OE_REMAINING]), "seq": ev[E_SEQ], "ts": ev[E_TS]}


def funding_message(ev, market: Market) -> dict:
    """EV_FUNDING (FUNDING_EVENT_STRUCT tuple) -> `funding` to the account."""
    return {"type": "funding", "market": market.symbol, "rate": rate_to_str(ev[FU_RATE]),
            "payment": atoms_str(ev[FU_PAYMENT]), "size": market.lots_to_str(ev[FU_SIZE]),
            "mark_price": market.ticks_to_str(ev[FU_MARK]), "seq": ev[E_SEQ], "ts": ev[E_TS]}


def liquidation_message(ev, market: Market) -> dict:
    """EV_LIQUIDATION (LIQUIDATION_EVENT_STRUCT tuple) -> `liquidation` to the account."""
    return {"type": "liquidation", "market": market.symbol,
            "qty": market.lots_to_str(ev[LQ_QTY]), "price": market.ticks_to_str(ev[LQ_PRICE]),
            "kind": LIQUIDATION_KIND_NAMES[ev[LQ_KIND]], "side": SIDE_NAMES[ev[LQ_SIDE]],
            "fee": atoms_str(ev[LQ_FEE]), "size": market.lots_to_str(ev[LQ_SIZE]),
            "seq": ev[E_SEQ], "ts": ev[E_TS]}


def rate_to_str(rate_e9: int) -> str:
    return scaled_str(rate_e9, 9)


def done_message(ev, count=None) -> dict:
    msg = {"type": "done", "seq": ev[E_SEQ], "ts": ev[E_TS]}
    if count is not None:
        msg["count"] = count
    return msg


def fill_messages(tr, market: Market):
    """EV_TRADE -> (taker's fill, maker's fill): each with its own side, fee and remaining."""
    (seq, ts, _, _, _, _, _, side, liquidation, trade_id, price, qty, oid, cid, remaining,
     fee, _, maker_oid, maker_cid, maker_remaining, maker_fee) = tr
    price_s = market.ticks_to_str(price)
    qty_s = market.lots_to_str(qty)
    taker = {"type": "fill", "cid": cid, "oid": oid, "trade_id": trade_id,
             "market": market.symbol, "side": SIDE_NAMES[side], "price": price_s, "qty": qty_s,
             "remaining": market.lots_to_str(remaining), "fee": atoms_str(fee),
             "liquidity": "taker", "seq": seq, "ts": ts}
    maker = {"type": "fill", "cid": maker_cid, "oid": maker_oid, "trade_id": trade_id,
             "market": market.symbol, "side": SIDE_NAMES[1 - side], "price": price_s,
             "qty": qty_s, "remaining": market.lots_to_str(maker_remaining),
             "fee": atoms_str(maker_fee), "liquidity": "maker", "seq": seq, "ts": ts}
    if liquidation:
        taker["liquidation"] = maker["liquidation"] = True
    return taker, maker
