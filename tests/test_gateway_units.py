"""The gateway's pure parts, in-process: decimal conversions, record layouts, request parsing,
the mirror (books, resting and untriggered orders) kept exact from the event stream, and what
it keeps for replay and queries, counted."""

import os
from decimal import Decimal

import numpy as np
import pytest

from engine.matcher import LocalEvents, Matcher
from engine.records import (FUNDING_EVENT_DTYPE, LIQUIDATION_EVENT_DTYPE,
                            FLAG_REDUCE_ONLY, FLAG_TRIGGER_BY_LAST, KIND_STOP_LIMIT,
                            KIND_STOP_MARKET, KIND_TAKE_PROFIT_LIMIT, KIND_TAKE_PROFIT_MARKET,
                            CMD_SET_MARGIN, MARGIN_CROSS, MARGIN_ISOLATED, TIF_GTC,
                            BALANCE_EVENT_DTYPE, COMMAND_DTYPE, MARK_EVENT_DTYPE, ORDER_EVENT_DTYPE,
                            REASON_INVALID_LOT, REASON_INVALID_MESSAGE, REASON_INVALID_PRICE,
                            REASON_INVALID_QTY, REASON_INVALID_TICK, REASON_UNKNOWN_MARKET,
                            TRADE_EVENT_DTYPE, TIF_IOC, KIND_MARKET, CMD_NEW_ORDER)
from gateway import codec
from engine.market import Market, MarketTable
from engine.units import EdgeReject, atoms_str, scaled_str, usdc_to_atoms
from gateway.memory import ENTRY_BYTES, rss_bytes
from gateway.mirror import Mirror, apply_events, comparable
from gateway.replay import ReportLog
from gateway.views import PackedMap, Views
from tests.fuzz_streams import FUZZ_CONFIG, genesis, random_stream

BTC = Market("BTC-PERP", 0, Decimal("0.1"), Decimal("0.001"), max_price_ticks=2_000_000,
             max_order_lots=100_000)
ETH = Market("ETH-PERP", 1, "0.01", "0.01")
ODD = Market("ODD", 2, "0.5", "2")


def reason(fn, *args):
    with pytest.raises(EdgeReject) as e:
        fn(*args)
    return e.value.reason


def test_prices_and_quantities_convert_exactly():
    assert BTC.atoms_per_tick_lot == 100 and ETH.atoms_per_tick_lot == 100
    assert BTC.price_to_ticks("65000.5") == 650005
    assert BTC.price_to_ticks("65000") == 650000
    assert BTC.price_to_ticks("65000.50000") == 650005
    assert BTC.price_to_ticks(65000) == 650000
    assert BTC.qty_to_lots("0.001") == 1 and BTC.qty_to_lots("1.5") == 1500
    assert ODD.price_to_ticks("1.5") == 3 and ODD.qty_to_lots("10") == 5
    assert ODD.atoms_per_tick_lot == 1_000_000
    assert BTC.ticks_to_str(650005) == "65000.5" and BTC.ticks_to_str(650000) == "65000"
    assert BTC.lots_to_str(1) == "0.001" and BTC.lots_to_str(1500) == "1.5"
    assert ODD.lots_to_str(5) == "10" and ODD.ticks_to_str(3) == "1.5"
    assert scaled_str(-5, 3) == "-0.005" and atoms_str(-2_600_000) == "-2.6"
    assert atoms_str(0) == "0" and usdc_to_atoms("100.000001") == 100_000_001
    for ticks in (1, 9, 10, 11, 650005, 1999999):
        assert BTC.price_to_ticks(BTC.ticks_to_str(ticks)) == ticks


def test_bad_numbers_are_rejected_never_rounded():
    assert reason(BTC.price_to_ticks, "65000.05") == REASON_INVALID_TICK
    assert reason(BTC.qty_to_lots, "0.0015") == REASON_INVALID_LOT
    assert reason(ODD.qty_to_lots, "3") == REASON_INVALID_LOT
    assert reason(BTC.price_to_ticks, 65000.5) == REASON_INVALID_MESSAGE      # float
    assert reason(BTC.price_to_ticks, True) == REASON_INVALID_MESSAGE
    assert reason(BTC.price_to_ticks, None) == REASON_INVALID_MESSAGE
    assert reason(BTC.price_to_ticks, b"65000") == REASON_INVALID_MESSAGE
    assert reason(BTC.price_to_ticks, ["1"]) == REASON_INVALID_MESSAGE
    for bad in ("NaN", "nan", "inf", "-inf", "Infinity", "1e5", "6.5E4", "-1", "+1", " 1",
                "1 ", "", ".5", "5.", "1,5", "0x10", "١٢", "1_000", "--1", "9" * 41):
        assert reason(BTC.price_to_ticks, bad) == REASON_INVALID_PRICE, bad
        assert reason(BTC.qty_to_lots, bad) == REASON_INVALID_QTY, bad
    for zero in ("0", "0.0", 0, "0.000"):
        assert reason(BTC.price_to_ticks, zero) == REASON_INVALID_PRICE
        assert reason(BTC.qty_to_lots, zero) == REASON_INVALID_QTY
    assert reason(BTC.price_to_ticks, -5) == REASON_INVALID_PRICE
    assert reason(BTC.price_to_ticks, "200000.1") == REASON_INVALID_PRICE    # above max
    assert BTC.price_to_ticks("200000") == 2_000_000
    assert reason(BTC.qty_to_lots, "100.001") == REASON_INVALID_QTY
    assert reason(BTC.price_to_ticks, 2 ** 64) == REASON_INVALID_PRICE
    assert reason(ETH.price_to_ticks, "9" * 40) == REASON_INVALID_PRICE       # no max known: int64
    assert reason(usdc_to_atoms, "0.0000001") == REASON_INVALID_MESSAGE
    with pytest.raises(ValueError):
        Market("BAD", 3, "0.001", "0.0001")     # 1e-7 USDC per tick x lot: not whole atoms


def test_record_layouts_match_engine_dtypes():
    rng = np.random.default_rng(1)

    def random_record(dtype):
        raw = rng.integers(0, 256, dtype.itemsize, dtype=np.uint8)
        return raw, raw.view(dtype)[0]

    cases = [(ORDER_EVENT_DTYPE, codec.ORDER_EVENT_STRUCT), (TRADE_EVENT_DTYPE, codec.TRADE_EVENT_STRUCT),
             (BALANCE_EVENT_DTYPE, codec.BALANCE_EVENT_STRUCT), (MARK_EVENT_DTYPE, codec.MARK_EVENT_STRUCT),
             (COMMAND_DTYPE, codec.COMMAND_STRUCT),
             (FUNDING_EVENT_DTYPE, codec.FUNDING_EVENT_STRUCT),
             (LIQUIDATION_EVENT_DTYPE, codec.LIQUIDATION_EVENT_STRUCT)]
    for dtype, st in cases:
        names = [n for n in dtype.names if not n.startswith("_")]
        for _ in range(20):
            raw, rec = random_record(dtype)
            assert st.unpack_from(raw.tobytes()) == tuple(int(rec[n]) for n in names), dtype


def test_new_order_parsing():
    table = MarketTable([BTC, ETH])
    fields, market = codec.parse_new_order(
        {"type": "new_order", "cid": 7, "market": "BTC-PERP", "side": "sell", "qty": "0.5",
         "price": "65000.5", "tif": "post_only", "reduce_only": True, "stp": "cancel_both"}, table)
    assert market is BTC
    assert fields == (CMD_NEW_ORDER, 0, 7, 0, 650005, 500, 0, 1, 0, 3, 1, 2)
    fields, _ = codec.parse_new_order({"cid": 1, "market": "ETH-PERP", "side": "buy",
                                       "kind": "market", "qty": "1"}, table)
    assert fields[8] == KIND_MARKET and fields[9] == TIF_IOC and fields[4] == 0
    bad = [
        ({"market": "BTC-PERP", "side": "buy", "qty": "1", "price": "1"}, REASON_INVALID_MESSAGE),
        ({"cid": "1", "market": "BTC-PERP", "side": "buy", "qty": "1", "price": "1"}, REASON_INVALID_MESSAGE),
        ({"cid": 2 ** 63, "market": "BTC-PERP", "side": "buy", "qty": "1", "price": "1"}, REASON_INVALID_MESSAGE),
        ({"cid": 1, "market": "DOGE", "side": "buy", "qty": "1", "price": "1"}, REASON_UNKNOWN_MARKET),
        ({"cid": 1, "market": 0, "side": "buy", "qty": "1", "price": "1"}, REASON_INVALID_MESSAGE),
        ({"cid": 1, "market": "BTC-PERP", "side": "long", "qty": "1", "price": "1"}, REASON_INVALID_MESSAGE),
        ({"cid": 1, "market": "BTC-PERP", "side": "buy", "price": "1"}, REASON_INVALID_MESSAGE),
        ({"cid": 1, "market": "BTC-PERP", "side": "buy", "qty": "1"}, REASON_INVALID_MESSAGE),
        ({"cid": 1, "market": "BTC-PERP", "side": "buy", "qty": "1", "price": "1", "kind": "stop"}, REASON_INVALID_MESSAGE),
        ({"cid": 1, "market": "BTC-PERP", "side": "buy", "qty": "1", "price": "1", "tif": "day"}, REASON_INVALID_MESSAGE),
        ({"cid": 1, "market": "BTC-PERP", "side": "buy", "qty": "1", "price": "1", "reduce_only": 1}, REASON_INVALID_MESSAGE),
        ({"cid": 1, "market": "BTC-PERP", "side": "buy", "qty": "1", "kind": "market", "price": "1"}, REASON_INVALID_MESSAGE),
        ({"cid": 1, "market": "BTC-PERP", "side": "buy", "qty": "1", "kind": "market", "tif": "post_only"}, REASON_INVALID_MESSAGE),
        ({"cid": 1, "market": "BTC-PERP", "side": "buy", "qty": "1", "price": "1.05"}, REASON_INVALID_TICK),
        ({"cid": 1, "market": "BTC-PERP", "side": "buy", "qty": 1.0, "price": "1"}, REASON_INVALID_MESSAGE),
    ]
    for msg, want in bad:
        assert reason(codec.parse_new_order, msg, table) == want, msg


def test_conditional_order_parsing():
    """Trigger price in amount_atoms (ticks, on the grid like any price), trigger_by as a flag."""
    table = MarketTable([BTC, ETH])
    base = {"cid": 3, "market": "BTC-PERP", "side": "sell", "qty": "0.002"}

    def parse(**extra):
        return codec.parse_new_order(dict(base, **extra), table)[0]

    f = parse(kind="stop_market", trigger_price="64000.5")
    assert (f[4], f[6], f[8], f[9], f[10]) == (0, 640005, KIND_STOP_MARKET, TIF_IOC, 0)
    f = parse(kind="stop_limit", price="63990", trigger_price="64000", trigger_by="last",
              reduce_only=True)
    assert (f[4], f[6], f[8], f[9], f[10]) == (639900, 640000, KIND_STOP_LIMIT, TIF_GTC,
                                               FLAG_TRIGGER_BY_LAST | FLAG_REDUCE_ONLY)
    f = parse(kind="take_profit_market", trigger_price="66000", trigger_by="mark")
    assert (f[6], f[8], f[10]) == (660000, KIND_TAKE_PROFIT_MARKET, 0)
    f = parse(kind="take_profit_limit", price="66000", trigger_price="66000", tif="post_only")
    assert (f[4], f[6], f[8], f[9]) == (660000, 660000, KIND_TAKE_PROFIT_LIMIT, 3)
    bad = [
        (dict(kind="stop_market"), REASON_INVALID_MESSAGE),                   # no trigger
        (dict(kind="stop_market", trigger_price="64000.05"), REASON_INVALID_TICK),
        (dict(kind="stop_market", trigger_price="0"), REASON_INVALID_PRICE),
        (dict(kind="stop_market", trigger_price=64000.5), REASON_INVALID_MESSAGE),
        (dict(kind="stop_market", trigger_price="64000", trigger_by="index"),
         REASON_INVALID_MESSAGE),
        (dict(kind="stop_market", trigger_price="64000", price="64000"), REASON_INVALID_MESSAGE),
        (dict(kind="stop_limit", trigger_price="64000"), REASON_INVALID_MESSAGE),  # no price
        (dict(kind="stop_market", trigger_price="64000", tif="post_only"),
         REASON_INVALID_MESSAGE),
        (dict(kind="limit", price="64000", trigger_price="64000"), REASON_INVALID_MESSAGE),
        (dict(kind="market", trigger_by="mark"), REASON_INVALID_MESSAGE),
        (dict(kind="stop", trigger_price="64000"), REASON_INVALID_MESSAGE),
    ]
    for extra, want in bad:
        assert reason(lambda: parse(**extra)) == want, extra


def test_set_margin_parsing():
    table = MarketTable([BTC, ETH])
    assert codec.parse_set_margin({"market": "ETH-PERP", "mode": "isolated", "leverage": 7},
                                  table) == (CMD_SET_MARGIN, 1, 0, 0, 0, 7, 0, 0,
                                             MARGIN_ISOLATED, 0, 0, 0)
    assert codec.parse_set_margin({"market": "BTC-PERP", "mode": "cross", "leverage": 50},
                                  table)[8] == MARGIN_CROSS
    bad = [({"mode": "cross", "leverage": 5}, REASON_INVALID_MESSAGE),
           ({"market": "DOGE", "mode": "cross", "leverage": 5}, REASON_UNKNOWN_MARKET),
           ({"market": "BTC-PERP", "leverage": 5}, REASON_INVALID_MESSAGE),
           ({"market": "BTC-PERP", "mode": "portfolio", "leverage": 5}, REASON_INVALID_MESSAGE),
           ({"market": "BTC-PERP", "mode": "cross"}, REASON_INVALID_MESSAGE),
           ({"market": "BTC-PERP", "mode": "cross", "leverage": 0}, REASON_INVALID_MESSAGE),
           ({"market": "BTC-PERP", "mode": "cross", "leverage": "5"}, REASON_INVALID_MESSAGE),
           ({"market": "BTC-PERP", "mode": "cross", "leverage": 2.5}, REASON_INVALID_MESSAGE)]
    for msg, want in bad:
        assert reason(codec.parse_set_margin, msg, table) == want, msg


def test_mirror_follows_the_matcher_exactly():
    """Feed a matcher's events to a mirror; it must equal one built from the state tables,
    also when it starts from a state copy in the middle of the stream."""
    commands = np.concatenate([genesis(), random_stream(5, 6000)])
    matcher = Matcher(FUZZ_CONFIG)
    ring = LocalEvents(1 << 14)
    fed = Mirror(FUZZ_CONFIG.max_markets)
    late = None
    waited = False          # conditional orders were untriggered at some point
    start = 0
    while start < len(commands):
        done, end = matcher.process(commands, ring.sink, 0, ring.capacity, 0, True, start, 64)
        apply_events(fed, ring.slots[:end].tobytes(), end)
        if late is not None:
            apply_events(late, ring.slots[:end].tobytes(), end)
        start += done
        if late is None and start >= 3000:
            late = Mirror.from_state(matcher.state, matcher.seq, FUZZ_CONFIG.max_markets)
        waited = waited or bool(fed.untriggered)
        if start % 1024 < 64:
            assert comparable(fed) == comparable(
                Mirror.from_state(matcher.state, matcher.seq, FUZZ_CONFIG.max_markets))
    final = Mirror.from_state(matcher.state, matcher.seq, FUZZ_CONFIG.max_markets)
    assert fed.applied_seq == late.applied_seq == matcher.seq
    assert comparable(fed) == comparable(final) == comparable(late)
    assert fed.orders and any(b or a for b, a in fed.books) and waited   # something to compare


def test_what_the_gateway_keeps_is_counted_and_bounded():
    """gateway/memory.py's parts: the ReportLog keeps logs for a bounded number of accounts
    (the oldest made is forgotten: its replays then go to the durable store) and counts its
    bytes; the views count the answers they keep, replaced or forgotten."""
    log = ReportLog(keep=4, max_bytes=2 * 4 * ENTRY_BYTES)
    record = bytes(192)
    for n in range(1, 7):
        log.append(1, n, n, 0, 0, record)
    log.append(2, 1, 7, 0, 0, record)
    assert log.bytes() == (4 + 1) * ENTRY_BYTES
    assert [e[0] for e in log.after(1, 2, 6)] == [3, 4, 5, 6]
    log.append(3, 1, 8, 0, 0, record)              # a third account: account 1 is forgotten
    assert sorted(log.by_account) == [2, 3] and log.after(1, 2, 6) is None
    assert log.bytes() == 2 * ENTRY_BYTES
    for n in range(2, 10):                         # the count follows full logs and forgetting
        log.append(2 + n % 2, n, 8 + n, 0, 0, record)
        log.append(4 + n % 3, n, 8 + n, 0, 0, record)
        assert log.bytes() == ENTRY_BYTES * sum(len(q) for q in log.by_account.values())
    views = Views()
    views.keep_book(0, 0, 1, PackedMap({"type": "book", "bids": [["1", "2"]] * 10}))
    views.keep_book(0, 0, 2, PackedMap({"type": "book", "bids": []}))      # replaces it
    assert views.bytes == len(PackedMap({"type": "book", "bids": []}).body)


def test_rss_is_each_process_own_after_a_fork():
    """rss_bytes keeps /proc/self/statm open: a forked child, whose inherited fd still names its
    parent, must read its own."""
    rss_bytes()                       # the parent's file is open now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                      # the child: grow by 64 MB, touched, and say what it sees
        try:
            os.close(r)
            before = rss_bytes()
            grown = bytearray(64 << 20)
            grown[::4096] = b"\1" * len(grown[::4096])
            os.write(w, str(rss_bytes() - before).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        grown_by = int(f.read())
    os.waitpid(pid, 0)
    assert grown_by >= 60 << 20


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    """gateway/sessions.py TokenBucket, the budget both lanes share (the compiled recv_pass
    applies the same rule to the same arrays)."""
    from gateway.sessions import TokenBucket
    bucket = TokenBucket(1000.0, 3, 2)       # a token a millisecond, 3 at most
    t0 = 5_000_000_000
    assert [bucket.take(1, t0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0, t0)                         # accounts do not share a budget
    assert not bucket.take(1, t0 + 900_000)           # 0.9 of a token back
    assert bucket.take(1, t0 + 1_500_000)             # 1.5: one taken, 0.5 left
    assert not bucket.take(1, t0 + 2_500_000, weight=2)   # 1.5 of the 2
    assert bucket.take(1, t0 + 10_000_000, weight=3)  # refilled to the burst, not past it
    assert not bucket.take(1, t0 + 10_000_000)
    assert not bucket.take(2, t0) and not bucket.take(-1, t0)   # no such account
