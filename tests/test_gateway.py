"""The gateway end to end: a real matcher process and gateway process, CURVE clients over
loopback (PROTOCOL.md "Order entry" and "Market data")."""

import os
import random
import threading
import time

import msgpack
import numpy as np
import pytest

from engine.market import MarketTable
from gateway.mirror import Mirror
from tests.gateway_fixtures import (ENGINE, MARKETS, WAIT_S, Exchange,  # noqa: F401
                                    exchange_factory, is_type, order, wait_until)
from tests.shm_workers import shm_prefix  # noqa: F401 — fixture: unique prefix, leak check

TABLE = MarketTable.from_dicts(MARKETS)


@pytest.fixture(params=["compiled", "python"])
def exchange(exchange_factory, request):
    """These tests run against both of the gateway's passes (gateway/compiled_pass.py), the
    other gateway test files against the default, the compiled one."""
    return exchange_factory(order_path=request.param)


def book_dict(book_msg):
    return ({p: q for p, q in book_msg["bids"]}, {p: q for p, q in book_msg["asks"]})


def matcher_book(tables, market_id):
    """The matcher's own book (from its state tables), formatted as the wire does."""
    mirror = Mirror.from_state(tables, 0, ENGINE.max_markets)
    market = TABLE.by_id[market_id]
    bids, asks = mirror.book_levels(market_id)
    return ({market.ticks_to_str(p): market.lots_to_str(q) for p, q in bids},
            {market.ticks_to_str(p): market.lots_to_str(q) for p, q in asks})


# -------------------------------------------------------------------------------------------
def test_two_accounts_trade_and_each_sees_only_its_own_reports(exchange):
    a, b, c = exchange.client(1), exchange.client(2), exchange.client(3)
    for cl in (a, b, c):
        assert cl.request(type="ping")["type"] == "pong"

    ack = a.request(**order(11, "BTC-PERP", "buy", "0.5", "65000", tif="post_only"))
    assert ack["type"] == "ack" and ack["status"] == "open" and ack["cid"] == 11
    assert ack["remaining"] == "0.5" and ack["price"] == "65000" and ack["seq"] > 0
    oid_a = ack["oid"]

    # b sells into a's bid: b is the taker, a the maker; each gets its own side, fee, liquidity
    ack_b = b.request(**order(11, "BTC-PERP", "sell", "0.2", "64990"))
    assert (ack_b["type"], ack_b["status"], ack_b["remaining"]) == ("ack", "filled", "0")
    fill_b = b.wait_for(is_type("fill"))
    fill_a = a.wait_for(is_type("fill"))
    assert "rid" not in fill_a and "rid" not in fill_b
    assert fill_b["trade_id"] == fill_a["trade_id"] and fill_b["seq"] == fill_a["seq"]
    assert {k: fill_b[k] for k in ("cid", "oid", "market", "side", "price", "qty", "remaining",
                                   "fee", "liquidity")} == {
        "cid": 11, "oid": ack_b["oid"], "market": "BTC-PERP", "side": "sell", "price": "65000",
        "qty": "0.2", "remaining": "0", "fee": "6.5", "liquidity": "taker"}
    assert {k: fill_a[k] for k in ("cid", "oid", "side", "price", "qty", "remaining", "fee",
                                   "liquidity")} == {
        "cid": 11, "oid": oid_a, "side": "buy", "price": "65000", "qty": "0.2",
        "remaining": "0.3", "fee": "2.6", "liquidity": "maker"}

    # an IOC that outsizes the book: fills, then its rest is canceled with reason ioc
    ack_b2 = b.request(**order(12, "BTC-PERP", "sell", "0.5", "65000", tif="ioc"))
    assert ack_b2["status"] == "canceled"
    fill_b2 = b.wait_for(is_type("fill", cid=12))
    assert (fill_b2["qty"], fill_b2["remaining"], fill_b2["fee"]) == ("0.3", "0.2", "9.75")
    canceled = b.wait_for(is_type("canceled", cid=12))
    assert (canceled["reason"], canceled["qty"], canceled["oid"]) == ("ioc", "0.2", ack_b2["oid"])
    fill_a2 = a.wait_for(is_type("fill", oid=oid_a))
    assert (fill_a2["qty"], fill_a2["remaining"], fill_a2["fee"], fill_a2["side"]) == \
        ("0.3", "0", "3.9", "buy")

    # a maker rebate is a negative fee
    a.request(**order(14, "ETH-PERP", "buy", "1", "3000"))
    b.request(**order(14, "ETH-PERP", "sell", "1", "3000"))
    assert a.wait_for(is_type("fill", cid=14))["fee"] == "-0.3"
    assert b.wait_for(is_type("fill", cid=14))["fee"] == "1.2"

    # a user cancel
    ack_a3 = a.request(**order(13, "BTC-PERP", "sell", "1", "66000"))
    cxl = a.request(type="cancel", cid=13)
    assert (cxl["type"], cxl["reason"], cxl["oid"], cxl["qty"]) == \
        ("canceled", "user", ack_a3["oid"], "1")

    # queries, exact at the gateway's seq
    acct = a.request(type="account")
    assert acct["type"] == "account_state"
    assert acct["balance"] == "9999993.8"          # 10M - 2.6 - 3.9 + 0.3 rebate
    btc = [p for p in acct["positions"] if p["market"] == "BTC-PERP"][0]
    assert (btc["size"], btc["entry_price"], btc["mark_price"], btc["unrealized_pnl"]) == \
        ("0.5", "65000", "65000", "0")
    acct_b = b.request(type="account")
    assert acct_b["balance"] == "9999982.55"       # 10M - 6.5 - 9.75 - 1.2
    assert [p["size"] for p in acct_b["positions"] if p["market"] == "BTC-PERP"] == ["-0.5"]
    a.request(**order(15, "BTC-PERP", "buy", "0.25", "64000.5"))
    oo = a.request(type="open_orders")
    assert [(o["cid"], o["market"], o["side"], o["price"], o["qty"], o["remaining"])
            for o in oo["orders"]] == [(15, "BTC-PERP", "buy", "64000.5", "0.25", "0.25")]
    assert b.request(type="open_orders")["orders"] == []

    # nobody got anything of another account
    seen = {1: a.log + a.reports(), 2: b.log + b.reports()}
    assert c.reports() == [] and [m["type"] for m in c.log] == ["pong"]
    own_oids = {acct_id: {m["oid"] for m in msgs if m.get("type") == "ack"}
                for acct_id, msgs in seen.items()}
    for acct_id, msgs in seen.items():
        for m in msgs:
            if "oid" in m:
                assert m["oid"] in own_oids[acct_id], (acct_id, m)


def test_unregistered_key_cannot_connect(exchange):
    stranger_cert = exchange.new_cert("stranger")
    stranger = exchange.client(stranger_cert)
    stranger.send(type="ping")
    stranger.send(**order(1, "BTC-PERP", "buy", "1", "65000"))
    assert stranger.recv(1.5) is None
    assert exchange.client(1).request(type="ping")["type"] == "pong"    # others are served
    assert stranger.recv(0.2) is None and stranger.log == []
    assert exchange.client(1).request(type="open_orders")["orders"] == []

    # registering the key lets it in without a gateway restart; libzmq does not retry a
    # handshake the server refused, so the client connects again
    exchange.register(stranger_cert.with_suffix(".key"), 5)
    stranger.close()
    got = None
    for _ in range(20):
        again = exchange.client(stranger_cert)
        again.send(type="ping")
        got = again.recv(0.5)
        if got is not None:
            break
        again.close()
    assert got is not None and got["type"] == "pong"
    assert again.request(type="hello")["account"] == 5


def test_an_account_cannot_touch_another_accounts_orders(exchange):
    a, b = exchange.client(1), exchange.client(2)
    oid = a.request(**order(21, "BTC-PERP", "buy", "0.1", "64000"))["oid"]
    for msg in (dict(type="cancel", oid=oid), dict(type="cancel", cid=21),
                dict(type="amend", oid=oid, price="64100"), dict(type="amend", cid=21, qty="0.05"),
                dict(type="amend", oid=oid, qty="0.05", market="BTC-PERP")):
        reply = b.request(**msg)
        assert (reply["type"], reply["reason"]) == ("reject", "unknown_order"), (msg, reply)
    done = b.request(type="withdraw", amount="1.5")
    assert done["type"] == "done" and "count" not in done and done["seq"] > 0
    assert b.request(type="account")["balance"] == "9999998.5"
    too_much = b.request(type="withdraw", amount="20000000")
    assert (too_much["type"], too_much["reason"]) == ("reject", "insufficient_balance")
    assert too_much["seq"] > done["seq"]
    assert b.request(type="cancel_all") == {"type": "done", "count": 0, "rid": b._rid,
                                             "seq": b.log[-1]["seq"], "ts": b.log[-1]["ts"],
                                             "account_seq": too_much["account_seq"] + 1}
    forbidden = b.request(type="cancel", oid=oid, account=1)
    assert (forbidden["reason"], forbidden["type"]) == ("forbidden", "reject")
    assert b.request(type="open_orders", account=1)["reason"] == "forbidden"

    orders = a.request(type="open_orders")["orders"]
    assert [(o["oid"], o["price"], o["remaining"]) for o in orders] == [(oid, "64000", "0.1")]
    assert not [m for m in a.reports() if m["type"] in ("canceled", "amended")]

    # the owner can
    amended = a.request(type="amend", oid=oid, price="64100", qty="0.2")
    assert (amended["type"], amended["price"], amended["qty"]) == ("amended", "64100", "0.2")
    assert a.request(type="cancel_all", market="BTC-PERP")["count"] == 1
    assert a.wait_for(is_type("canceled", oid=oid))["reason"] == "user"


def _malformed(resting_oid):
    """(message or raw frames, expected reject reason or None for undecodable) pairs."""
    good = order(1, "BTC-PERP", "buy", "1", "65000")
    bad_fields = {
        "cid": ["1", 1.5, True, [1], {"a": 1}, 2 ** 63, 2 ** 64 - 1],
        "market": ["DOGE-PERP", "", 0, 1.0, b"BTC-PERP", ["BTC-PERP"], "BTC-PERP" * 10],
        "side": ["BUY", "long", 0, "", None, b"buy"],
        "kind": ["stop_market", "take_profit_limit", "limit_maker", 1, ""],
        "qty": ["0", "-1", "0.0001", "1e3", "NaN", "inf", 1.0, "1" * 39, 2 ** 63, 10 ** 18, "",
                " 1", True, [], "1.0001", "101"],
        "price": ["65000.05", "0", "-65000", "nan", 65000.0, "99999999999", 2 ** 64 - 1,
                  "6.5e4", "200000.1", "٦٥٠٠٠", None],
        "tif": ["day", 0, "GTC"],
        "stp": ["none", 3],
        "reduce_only": [1, "true", None],
        "trigger_price": ["65000"],
    }
    cases = []
    for name, values in bad_fields.items():
        for v in values:
            msg = dict(good)
            if v is None and name in ("price",):
                del msg[name]
            else:
                msg[name] = v
            cases.append(msg)
    for name in ("cid", "market", "side", "qty"):
        msg = dict(good)
        del msg[name]
        cases.append(msg)
    cases += [
        dict(good, type="new_orders"), dict(good, type=5), {k: v for k, v in good.items() if k != "type"},
        dict(good, account=2), dict(good, rid="x"), dict(good, rid=1.5),
        dict(good, kind="market"),                       # a market order with a price
        {"type": "cancel"}, {"type": "cancel", "oid": "5"}, {"type": "cancel", "oid": 0},
        {"type": "cancel", "oid": -1}, {"type": "cancel", "cid": "x"},
        {"type": "amend", "oid": resting_oid}, {"type": "amend", "oid": resting_oid, "price": "64000.05"},
        {"type": "amend", "oid": resting_oid, "qty": "0"}, {"type": "amend", "oid": resting_oid, "qty": 0.5},
        {"type": "amend", "oid": resting_oid, "price": "1e9"}, {"type": "amend", "oid": resting_oid + 999, "qty": "1"},
        {"type": "cancel_all", "market": "DOGE"}, {"type": "cancel_all", "market": 1},
        {"type": "withdraw"}, {"type": "withdraw", "amount": "1.0000001"}, {"type": "withdraw", "amount": "-5"},
        {"type": "withdraw", "amount": 5.5}, {"type": "withdraw", "amount": "0"},
        {"type": "withdraw", "amount": "99999999999999999999"},
        {"type": "book"}, {"type": "book", "market": "DOGE"}, {"type": "book", "market": "BTC-PERP", "depth": -1},
        {"type": "book", "market": "BTC-PERP", "depth": "5"}, {"type": "open_orders", "market": 5},
        {"type": "set_margin", "market": "BTC-PERP", "mode": "portfolio", "leverage": 5},
        {"type": "set_margin", "market": "BTC-PERP", "mode": "cross", "leverage": 0},
        {"type": "set_margin", "market": "BTC-PERP", "mode": "cross", "leverage": "5"},
        {"type": "set_margin", "market": "DOGE", "mode": "cross", "leverage": 5},
        {"type": "set_margin", "mode": "cross", "leverage": 5},
        dict(good, kind="stop_limit", trigger_price="65000.05"),
        dict(good, kind="stop_limit", trigger_price="65000", trigger_by="index"),
        dict(good, kind="take_profit_market", trigger_price="65000"),    # with a price
        {"type": "hello", "cancel_on_disconnect": "yes"},
    ]
    out = [(msg, True) for msg in cases]
    raw = [[b""], [b"\xff\xff\xff"], [b"\xc1"], [msgpack.packb([1, 2, 3])], [msgpack.packb(7)],
           [msgpack.packb("new_order")], [msgpack.packb(None)], [b"\x91" * 3000],
           [b"\x91" * 500 + b"\x01"], [msgpack.packb({1: 2})], [b"\x81\xa4type\xa3\xff\xfe\xfd"],
           [msgpack.packb({"type": "ping"}), msgpack.packb({"type": "ping"})],
           [b"", msgpack.packb({"type": "ping"})],
           [msgpack.packb({"type": "new_order", "pad": "x" * 2000})],
           [msgpack.packb(dict(order(1, "BTC-PERP", "buy", msgpack.ExtType(5, b"1"), "65000")))],
           [msgpack.packb({"type": "ping"}) + b"\x00"]]
    rng = random.Random(3)
    raw += [[bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))] for _ in range(40)]
    out += [(frames, False) for frames in raw]
    return out


def test_malformed_messages_are_rejected_and_change_nothing(exchange):
    a = exchange.client(1)
    resting = a.request(**order(31, "BTC-PERP", "buy", "0.1", "64000"))["oid"]
    book_before = a.request(type="book", market="BTC-PERP")
    seq_before, hash_before, _ = exchange.quiet_state()

    cases = _malformed(resting)
    # 10k messages: the handcrafted ones, then random one-field breakages of a good order
    rng = random.Random(11)
    msgs = [c for c in cases if c[1]]
    while len(cases) < 10_000:
        msg = dict(rng.choice(msgs)[0])
        cid = msg.get("cid")
        if type(cid) is int and -2 ** 63 <= cid < 2 ** 63 and rng.random() < 0.5:
            msg["cid"] = rng.choice([-2 ** 63, 2 ** 63 - 1, 0, rng.randrange(2 ** 40)])
        cases.append((msg, True))
    sent = 0
    replies = []
    for start in range(0, len(cases), 250):
        chunk = cases[start:start + 250]
        for item, is_msg in chunk:
            if is_msg:
                a.sock.send(msgpack.packb(item))
            else:
                a.send_raw(*item)
            sent += 1
        for _ in chunk:
            m = a.recv(WAIT_S)
            assert m is not None, f"no reply to a malformed message ({len(replies)} of {sent})"
            replies.append(m)
    assert len(replies) == len(cases)
    assert all(m["type"] == "reject" for m in replies), [m for m in replies if m["type"] != "reject"][:5]
    assert all("seq" not in m for m in replies), "a malformed message reached the matcher"
    reasons = {m["reason"] for m in replies}
    assert reasons >= {"invalid_message", "unknown_market", "invalid_price", "invalid_qty",
                       "invalid_tick", "invalid_lot", "forbidden", "unknown_order"}, reasons
    # replies carry the request's rid when it had a valid one
    assert sum(1 for m in replies if "rid" in m) == 0   # these requests had none

    # an oversized frame beyond the hard limit drops that connection; the gateway stays up
    big = exchange.client(2)
    big.send_raw(b"\x80" + b"x" * (200 * 1024))
    assert big.recv(0.5) is None

    assert a.request(type="ping")["type"] == "pong"
    assert a.request(type="book", market="BTC-PERP")["bids"] == book_before["bids"]
    seq_after, hash_after, _ = exchange.quiet_state()
    assert (seq_after, hash_after) == (seq_before, hash_before)
    # and still works
    assert a.request(**order(32, "BTC-PERP", "sell", "0.1", "66000"))["type"] == "ack"


def test_market_data_rebuilds_the_book(exchange):
    a, b = exchange.client(1), exchange.client(2)
    sub = exchange.subscriber("book.", "trade.")
    # the subscription is live once a delta of ours arrives
    for i in range(50):
        a.request(**order(1 + i, "BTC-PERP", "buy", "0.01", str(60000 + i)))
        if sub.poll(200):
            break
    else:
        raise AssertionError("no market data within 10 s")
    while sub.poll(200):
        sub.recv_multipart()

    markets = ["BTC-PERP", "ETH-PERP"]
    start = {m: a.request(type="book", market=m) for m in markets}
    rebuilt = {m: book_dict(start[m]) for m in markets}

    rng = random.Random(7)
    clients = {1: a, 2: b}
    cids = {1: [], 2: []}
    next_cid = 100
    sent = {1: [], 2: []}
    for _ in range(800):
        who = rng.choice((1, 2))
        cl = clients[who]
        market = rng.choice(markets)
        mk = TABLE.by_symbol[market]
        mark = 650_000 if market == "BTC-PERP" else 300_000
        r = rng.random()
        if r < 0.6 or not cids[who]:
            next_cid += 1
            kind = "market" if rng.random() < 0.07 else "limit"
            msg = order(next_cid, market, rng.choice(("buy", "sell")),
                        mk.lots_to_str(rng.randrange(1, 60)),
                        None if kind == "market" else mk.ticks_to_str(mark + rng.randrange(-30, 31) * 10),
                        kind=kind, tif=rng.choice(("gtc", "gtc", "gtc", "ioc", "post_only", "fok"))
                        if kind == "limit" else "ioc")
            cids[who].append(next_cid)
        elif r < 0.8:
            msg = dict(type="cancel", cid=rng.choice(cids[who]))
        elif r < 0.97:
            msg = dict(type="amend", cid=rng.choice(cids[who]), market=market)
            msg["qty" if rng.random() < 0.5 else "price"] = (
                mk.lots_to_str(rng.randrange(1, 60)) if rng.random() < 0.5
                else mk.ticks_to_str(mark + rng.randrange(-30, 31) * 10))
        else:
            msg = dict(type="cancel_all", market=market)
        sent[who].append(cl.send(**msg))
    for who, cl in clients.items():
        for rid in sent[who]:
            cl.wait_for(lambda m, rid=rid: m.get("rid") == rid, WAIT_S, f"reply {rid}")
    final = {m: a.request(type="book", market=m) for m in markets}

    trades = 0
    while sub.poll(300):
        topic, payload = sub.recv_multipart()
        data = msgpack.unpackb(payload)
        kind, market = topic.decode().split(".", 1)
        if kind == "trade":
            trades += 1
            continue
        if data["seq"] <= start[market]["seq"]:
            continue
        for side, levels in ((0, data["bids"]), (1, data["asks"])):
            for price, qty in levels:
                if qty == "0":
                    rebuilt[market][side].pop(price, None)
                else:
                    rebuilt[market][side][price] = qty
    _, _, tables = exchange.quiet_state()
    for m in markets:
        assert rebuilt[m] == book_dict(final[m]), m
        assert book_dict(final[m]) == matcher_book(tables, TABLE.by_symbol[m].id), m
    fills = [x for cl in clients.values() for x in cl.log if x.get("type") == "fill"]
    assert trades > 20 and trades == len({(f["trade_id"]) for f in fills})


def test_cancel_on_disconnect_and_reports_to_every_session(exchange):
    a1, a2 = exchange.client(1), exchange.client(1)
    assert a1.request(type="hello", cancel_on_disconnect=True) == {
        "type": "hello", "account": 1, "cancel_on_disconnect": True, "rid": a1._rid,
        "ts": a1.log[-1]["ts"]}
    assert a2.request(type="ping")["type"] == "pong"
    o1 = a1.request(**order(41, "BTC-PERP", "buy", "0.1", "64000"))["oid"]
    o2 = a1.request(**order(42, "ETH-PERP", "sell", "2", "3100"))["oid"]
    # the other session of the account sees the acks as reports (no rid)
    for oid in (o1, o2):
        report = a2.wait_for(is_type("ack", oid=oid))
        assert "rid" not in report
    a1.close()
    got = {a2.wait_for(is_type("canceled", oid=oid))["reason"] for oid in (o1, o2)}
    assert got == {"disconnect"}
    assert a2.request(type="open_orders")["orders"] == []
    # a session without the option leaves its orders alone
    o3 = a2.request(**order(43, "BTC-PERP", "buy", "0.1", "64000"))["oid"]
    a2.close()
    a3 = exchange.client(1)
    assert [o["oid"] for o in a3.request(type="open_orders")["orders"]] == [o3]


def test_rate_limit_per_account(exchange_factory):
    ex = exchange_factory(rate_per_s=20.0, burst=10)
    a, b = ex.client(1), ex.client(2)
    for _ in range(30):
        a.send(type="ping")
    replies = [a.wait_for(lambda m: True) for _ in range(30)]
    kinds = [m["type"] if m["type"] == "pong" else m["reason"] for m in replies]
    assert kinds.count("pong") >= 10 and kinds.count("rate_limited") >= 15, kinds
    assert b.request(type="ping")["type"] == "pong"      # another account has its own budget
    wait_until(lambda: a.request(type="ping")["type"] == "pong", 2.0, "tokens to refill")


def test_requests_weigh_what_they_cost(exchange_factory):
    """Binance-style weights: `account` takes 10 tokens, `book` 5, a ping 1 (no refill here)."""
    ex = exchange_factory(rate_per_s=0.001, burst=12)
    a = ex.client(3)
    kinds = [a.request(type=t, market="BTC-PERP") for t in
             ("account", "book", "ping", "ping", "ping")]
    assert [m["type"] if m["type"] != "reject" else m["reason"] for m in kinds] == [
        "account_state", "rate_limited", "pong", "pong", "rate_limited"]


def test_restarted_gateway_resumes_with_the_same_book(exchange):
    a, b = exchange.client(1), exchange.client(2)
    a.request(**order(51, "BTC-PERP", "buy", "0.5", "64900"))
    a.request(**order(52, "BTC-PERP", "sell", "0.5", "65100"))
    b.request(**order(51, "BTC-PERP", "buy", "0.2", "65100"))
    before = a.request(type="book", market="BTC-PERP")
    exchange.restart_gateway(kill=True)
    c = exchange.client(1)
    after = c.request(type="book", market="BTC-PERP")
    assert (after["seq"], after["bids"], after["asks"]) == (before["seq"], before["bids"], before["asks"])
    oo = c.request(type="open_orders")["orders"]
    assert sorted((o["cid"], o["remaining"]) for o in oo) == [(51, "0.5"), (52, "0.3")]
    assert c.request(type="cancel", cid=52)["type"] == "canceled"


def test_durable_mode_holds_replies_until_journaled(exchange_factory):
    ex = exchange_factory(durable=True)
    a = ex.client(1)
    assert a.request(type="ping")["type"] == "pong"          # no event: not held
    rid = a.send(**order(61, "BTC-PERP", "buy", "0.1", "64000"))
    assert a.recv(0.3) is None
    seq = ex.seq()
    ex.durable.value = seq - 1
    assert a.recv(0.2) is None
    ex.durable.value = seq
    ack = a.wait_for(lambda m: m.get("rid") == rid, WAIT_S, "the held ack")
    assert (ack["type"], ack["seq"]) == ("ack", seq)
    # queries are answered at the gateway's seq, once that is durable too
    rid = a.send(type="open_orders")
    assert a.wait_for(lambda m: m.get("rid") == rid)["orders"][0]["cid"] == 61


def test_state_copy_under_load_then_events_equals_the_matcher(exchange):
    """What a (re)starting gateway does while the matcher is busy: copy the state at a command
    boundary, then apply only later events; it must end equal to the matcher's own state."""
    from engine.records import (CMD_CANCEL, CMD_NEW_ORDER, EVENT_DTYPE, KIND_LIMIT,
                                new_commands)
    from engine.shared_state import attach_state
    from shm import names
    from gateway.mirror import apply_events, comparable, consistent_state_copy
    from shm.ring import EventRing
    from tests.gateway_fixtures import ENGINE as CFG

    rng = np.random.default_rng(5)
    n = 60_000
    c = new_commands(n)
    c["cmd"] = np.where(rng.random(n) < 0.75, CMD_NEW_ORDER, CMD_CANCEL)
    c["account"] = rng.integers(1, 5, n)
    c["market"] = rng.integers(0, 2, n)
    c["price_ticks"] = np.where(c["market"] == 0, 650_000, 300_000) + rng.integers(-20, 21, n) * 10
    c["qty_lots"] = rng.integers(1, 40, n)
    c["side"] = rng.integers(0, 2, n)
    c["kind"] = KIND_LIMIT
    c["tif"] = rng.choice([0, 0, 1, 3], n)
    c["cid"] = rng.integers(0, 50, n)
    c["oid"] = np.maximum(np.arange(n) // 2 - rng.integers(0, 40, n), 1)

    events = EventRing.attach(names.event_ring(exchange.prefix), EVENT_DTYPE)
    consumers = []
    done = threading.Event()

    def write():
        sent = 0
        while sent < n:
            sent += exchange.ops.write(c[sent:sent + 64])
            time.sleep(0.0002)
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    region, state = attach_state(exchange.prefix, CFG)
    try:
        consumer = events.consumer("test", start="current")
        consumers.append(consumer)
        writer.start()
        mirrors = []
        stats = {}
        while not done.is_set() or consumer.available():
            if len(mirrors) < 4 and not done.is_set() and rng.random() < 0.01:
                tables, seq = consistent_state_copy(state, events, WAIT_S, stats)
                mirrors.append(Mirror.from_state(tables, seq, CFG.max_markets))
            batch = consumer.peek(4096)
            for m in mirrors:
                apply_events(m, batch.tobytes(), len(batch))
            consumer.advance(len(batch))
            if not len(batch):
                time.sleep(0.0005)
        writer.join(WAIT_S)
    finally:
        for cons in consumers:
            cons.deregister()
        del state
        region.close()
        events.close()
    _, _, final = exchange.quiet_state()
    truth = comparable(Mirror.from_state(final, 0, CFG.max_markets))
    assert len(mirrors) >= 2
    print("copies", len(mirrors), "attempts", stats, "at seqs", [m.base_seq for m in mirrors],
          "of", final["counters"][0])
    for m in mirrors:
        assert comparable(m) == truth
    assert truth["orders"]


def test_two_gateways_share_the_matcher(exchange):
    """gateway-1 has its own ring and event cursor; replies go back through the gateway that
    took the request, reports through every gateway an account is connected to."""
    second = exchange.start_gateway(index=1, source_index=2)
    assert second["market_data"] is None
    a0 = exchange.client(1)                      # account 1 on gateway-0
    a1 = exchange.client(1, endpoints=second)    # account 1 on gateway-1 too
    b1 = exchange.client(2, endpoints=second)    # account 2 on gateway-1
    for cl in (a0, a1, b1):
        assert cl.request(type="ping")["type"] == "pong"
    # many requests at once through both gateways: each reply comes back where it was asked
    rids = {cl: [cl.send(type="new_order", cid=100 + i, market="ETH-PERP",
                         side="buy" if cl is a0 else "sell", qty="0.1",
                         price="2990" if cl is a0 else "3010") for i in range(20)]
            for cl in (a0, b1)}
    for cl, sent in rids.items():
        for rid in sent:
            assert cl.wait_for(lambda m, rid=rid: m.get("rid") == rid)["type"] == "ack"
    oid = a0.request(**order(71, "BTC-PERP", "buy", "0.3", "65000"))["oid"]
    report = a1.wait_for(is_type("ack", oid=oid))             # a report on the other gateway
    assert "rid" not in report
    ack = b1.request(**order(71, "BTC-PERP", "sell", "0.1", "65000"))
    assert ack["status"] == "filled"
    assert b1.wait_for(is_type("fill", cid=71))["liquidity"] == "taker"
    for cl in (a0, a1):
        fill = cl.wait_for(is_type("fill", oid=oid))
        assert (fill["liquidity"], fill["remaining"], "rid" in fill) == ("maker", "0.2", False)
    cxl = a1.request(type="cancel", oid=oid)                   # cancel through the other one
    assert (cxl["type"], cxl["qty"]) == ("canceled", "0.2")
    assert "rid" not in a0.wait_for(is_type("canceled", oid=oid))
    assert [m for m in b1.reports() if m.get("oid") == oid] == []


def test_report_stream_every_session_gap_free_and_replay_from_memory(exchange_factory):
    """Two connections of one account both see the whole stream (rejects and `done` too),
    numbered 1, 2, 3, ...; `replay` from the gateway's memory (4 reports per account here)
    returns the same messages; older ones need a durable source this gateway has not."""
    ex = exchange_factory(replay_keep=4)
    a, a2 = ex.client(1), ex.client(1)
    assert a2.request(type="ping")["type"] == "pong"      # a2's session exists
    ack = a.request(**order(1, "BTC-PERP", "buy", "0.1", "64000"))
    rej = a.request(**order(1, "BTC-PERP", "buy", "0.1", "64000"))   # duplicate cid
    assert rej["reason"] == "duplicate_cid"
    cancel = a.request(type="cancel", oid=ack["oid"], cid=1)
    edge = a.request(type="cancel")                       # refused by the gateway: no number
    done = a.request(type="withdraw", amount="1", cid=77)
    wrong = a.request(type="cancel", oid=ack["oid"])
    assert "account_seq" not in edge and done["cid"] == 77
    assert (wrong["reason"], wrong["oid"]) == ("unknown_order", ack["oid"])
    live = [ack, rej, cancel, done, wrong]
    assert [m["account_seq"] for m in live] == [1, 2, 3, 4, 5]
    seen = a2.reports()
    assert [m["account_seq"] for m in seen] == [1, 2, 3, 4, 5]
    strip = [{k: v for k, v in m.items() if k != "rid"} for m in live]
    assert seen == strip                                  # the same messages, without rid
    assert ex.client(2).request(type="replay", from_account_seq=0)["last_account_seq"] == 0

    a.send(type="replay", from_account_seq=2)
    got = a.reports()
    assert got[:3] == strip[2:]
    assert got[3]["type"] == "replayed" and (got[3]["last_account_seq"], got[3]["more"]) == \
        (5, False)
    beyond = a.request(type="replay", from_account_seq=10 ** 9)
    assert (beyond["type"], beyond["last_account_seq"]) == ("replayed", 5)
    old = a.request(type="replay", from_account_seq=0)    # report 1 is no longer in memory
    assert (old["type"], old["reason"]) == ("reject", "invalid_message")
    bad = a.request(type="replay", from_account_seq=-1)
    assert (bad["type"], bad["reason"]) == ("reject", "invalid_message")


def test_the_gateways_io_thread_does_not_preempt_it(exchange):
    """libzmq's I/O thread runs SCHED_BATCH (gateway/server.py gateway_context), the gateway's
    own thread the default policy; and the gateway answers through it."""
    c = exchange.client(1)
    assert c.request(type="ping")["type"] == "pong"      # the I/O thread has run (and named itself)
    pid = exchange.gateway.pid
    policies = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            policies.setdefault(f.read().strip(), []).append(os.sched_getscheduler(int(tid)))
    assert policies["ZMQbg/IO/0"] == [os.SCHED_BATCH], policies
    assert os.sched_getscheduler(pid) == os.SCHED_OTHER


def test_an_amend_by_cid_right_behind_its_order_finds_it(exchange):
    """An amend by cid sent right behind its new order, before the ack can have come back,
    amends it: the gateway knows the order it has sent the matcher (either pass's pending
    table), not only the ones the mirror has."""
    c = exchange.client(1)
    for k in range(20):
        cid = 500 + k
        placed = c.send(**order(cid, "ETH-PERP", "buy", "0.1", "2900"))
        amended = c.send(type="amend", cid=cid, qty="0.2")
        ack = c.wait_for(lambda m, rid=placed: m.get("rid") == rid)
        reply = c.wait_for(lambda m, rid=amended: m.get("rid") == rid)
        assert (ack["type"], reply["type"], reply.get("qty")) == ("ack", "amended", "0.2"), \
            reply
