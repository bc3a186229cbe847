"""perpx/client.py and perpx/demo.py against a real exchange (`perpx up` in a subprocess, the
supervisor tests' `Up` helper): order entry with rid matching, reports, queries, a market-data
local book, the asyncio client, and a few seconds of the demo traders."""

from __future__ import annotations

import asyncio
import io
import time
from decimal import Decimal
from pathlib import Path

import pytest
import zmq
import zmq.auth

from perpx.client import (Ack, AccountState, AsyncClient, Book, CertificateInvalid,
                          CertificateMissing, Client, ClientError, Fill, FloatRefused,
                          HandshakeFailed, MarketData,
                          PublicOnlyCertificate, Reject, RequestTimeout, UnknownKey, typed)
from perpx.demo import run_demo
from perpx.ops import Exchange, create_account
from tests.test_supervisor import Up, cli_json, config_text, wait_until

WAIT_S = 10.0


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    up = Up(tmp_path_factory.mktemp("client") / "state", config_text(gateways=1))
    try:
        endpoints = up.wait_ready()
        yield up, endpoints
    finally:
        left = up.close()
        assert not left, f"left in /dev/shm: {left}"


def new_account(up, usdc: int = 1_000_000) -> str:
    ex = Exchange(up.sd)
    account, cert = create_account(up.sd, ex.engine.max_accounts)
    ex.deposit(account, usdc * 10 ** 6)
    return cert


@pytest.fixture
def clients(exchange):
    up, endpoints = exchange
    made = []

    def make(**kw) -> Client:
        c = Client.connect(endpoints, new_account(up), timeout_s=WAIT_S, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def is_type(kind, **fields):
    return lambda m: m.get("type") == kind and all(m.get(k) == v for k, v in fields.items())


def test_resting_order_taken_by_another_account(clients):
    seen = []
    a, b = clients(on_report=seen.append), clients()
    assert a.ping()["type"] == "pong"

    ack = a.new_order("BTC-PERP", "buy", "limit", "0.5", "64000", cid=101)
    assert (ack["type"], ack["status"], ack["cid"]) == ("ack", "open", 101)
    oid = ack["oid"]
    # rid matching: the reply carries the rid the client gave the request
    assert ack["rid"] == a.last_rid

    taken = b.new_order("BTC-PERP", "sell", "market", "0.2")
    assert taken["type"] == "ack" and taken["status"] == "filled"
    fill_b = b.wait_for(is_type("fill"))
    fill_a = a.wait_for(is_type("fill", oid=oid))
    assert "rid" not in fill_a and "rid" not in fill_b
    assert fill_a["trade_id"] == fill_b["trade_id"]
    assert (fill_a["cid"], fill_a["side"], fill_a["price"], fill_a["qty"], fill_a["remaining"],
            fill_a["liquidity"]) == (101, "buy", "64000", "0.2", "0.3", "maker")
    assert (fill_b["cid"], fill_b["oid"], fill_b["side"], fill_b["liquidity"]) == \
        (taken["cid"], taken["oid"], "sell", "taker")
    assert any(m is fill_a for m in seen)            # the callback saw it too

    # open orders, account, book snapshot
    orders = a.open_orders("BTC-PERP")
    assert orders["type"] == "open_orders"
    assert [(o["oid"], o["cid"], o["remaining"]) for o in orders["orders"]] == [(oid, 101, "0.3")]
    acct = a.account()
    assert acct["type"] == "account_state"
    assert [(p["market"], p["size"]) for p in acct["positions"]] == [("BTC-PERP", "0.2")]
    book = b.book("BTC-PERP", 5)
    assert book["type"] == "book" and ["64000", "0.3"] in book["bids"]

    # amend by cid, cancel by oid; a second cancel is rejected
    amended = a.amend(cid=101, price="64100")
    assert (amended["type"], amended["oid"], amended["price"]) == ("amended", oid, "64100")
    canceled = a.cancel(oid=oid)
    assert (canceled["type"], canceled["reason"], canceled["cid"]) == ("canceled", "user", 101)
    again = a.cancel(cid=101)
    assert (again["type"], again["reason"]) == ("reject", "unknown_order")
    assert a.open_orders()["orders"] == []

    # cancel_all counts; reports() drains the queue
    for i in range(3):
        assert a.new_order("ETH-PERP", "sell", "limit", "1", f"{3600 + i}")["status"] == "open"
    done = a.cancel_all("ETH-PERP")
    assert (done["type"], done["count"]) == ("done", 3)
    a.reports(0.05)
    assert a.reports() == []

    # a reject echoes the cid and a reason
    bad = a.new_order("BTC-PERP", "buy", "limit", "0.0001", "64000", cid=7)
    assert (bad["type"], bad["reason"], bad["cid"]) == ("reject", "invalid_lot", 7)
    with pytest.raises(RequestTimeout):
        a.wait_for(is_type("fill"), timeout_s=0.1)


def test_market_data_local_book_matches_snapshot(clients, exchange):
    _, endpoints = exchange
    a, b = clients(), clients()
    md = MarketData.connect(endpoints, ["ETH-PERP"], snapshot_client=a)
    try:
        a.new_order("ETH-PERP", "buy", "limit", "2", "3400")
        a.new_order("ETH-PERP", "buy", "limit", "1", "3399.5")
        ask = a.new_order("ETH-PERP", "sell", "limit", "3", "3410")
        b.new_order("ETH-PERP", "sell", "limit", "1.5", "3420")
        b.new_order("ETH-PERP", "sell", "market", "0.5")            # takes part of 3400
        assert a.amend(cid=ask["cid"], qty="2")["type"] == "amended"     # 3 -> 2
        snap = b.book("ETH-PERP", 0)

        def caught_up():
            md.poll(0.05)
            return md.books["ETH-PERP"].seq >= snap["seq"]
        wait_until(caught_up, WAIT_S, "market data to reach the snapshot's seq")
        local = md.book("ETH-PERP")
        assert local["seq"] == snap["seq"]
        assert (local["bids"], local["asks"]) == (snap["bids"], snap["asks"])
        assert ["3400", "1.5"] in local["bids"] and ["3410", "2"] in local["asks"]
        assert md.trades >= 1 and md.last_price["ETH-PERP"] == "3400"
    finally:
        md.close()
        a.cancel_all()
        b.cancel_all()


def test_set_margin_conditional_orders_and_risk_reports(clients, exchange):
    """set_margin, a stop order's untriggered ack, and the funding report / market data
    delivered to handlers registered with on() and MarketData(on_funding=...)."""
    from engine.records import funding_command
    up, endpoints = exchange
    a, b = clients(), clients()
    assert a.set_margin("ETH-PERP", "isolated", 4)["type"] == "done"
    bad = a.set_margin("ETH-PERP", "isolated", 1000)
    assert (bad["type"], bad["reason"]) == ("reject", "invalid_message")
    assert "max_leverage" in bad["message"]


    fundings, rates = [], []
    a.on("funding", fundings.append)
    md = MarketData.connect(endpoints, ["ETH-PERP"], on_funding=lambda m, msg: rates.append(msg))
    try:
        assert b.new_order("ETH-PERP", "sell", "limit", "2", "3500")["status"] == "open"
        assert a.new_order("ETH-PERP", "buy", "limit", "2", "3500")["status"] == "filled"
        Exchange(up.sd).submit_one(funding_command(1, rate_e9=-200_000), "funding")  # shorts pay
        report = a.wait_for(is_type("funding"))
        assert fundings == [report]
        assert (report["market"], report["rate"], report["payment"]) == (
            "ETH-PERP", "-0.0002", "1.4")              # 2 ETH x 3500 x 0.0002, received

        def got_rate():
            md.poll(0.05)
            return bool(rates)
        wait_until(got_rate, WAIT_S, "funding.ETH-PERP")
        assert rates[0]["rate"] == "-0.0002" and md.funding["ETH-PERP"] is rates[0]
    finally:
        md.close()

    stop = a.new_order("BTC-PERP", "sell", "stop_market", "0.01", trigger_price="60000")
    assert (stop["type"], stop["status"]) == ("ack", "untriggered"), stop
    assert a.cancel(oid=stop["oid"])["type"] == "canceled"


def test_async_client(exchange):
    up, endpoints = exchange
    cert = new_account(up)

    async def main():
        c = await AsyncClient.connect(endpoints, cert, timeout_s=WAIT_S)
        try:
            assert (await c.ping())["type"] == "pong"
            acks = await asyncio.gather(*(c.new_order("BTC-PERP", "sell", "limit", "0.01",
                                                      str(66000 + i)) for i in range(5)))
            assert [a["status"] for a in acks] == ["open"] * 5
            assert len({a["oid"] for a in acks}) == 5
            assert len((await c.open_orders())["orders"]) == 5
            assert (await c.cancel_all())["count"] == 5
        finally:
            await c.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_demo_trades(exchange):
    up, _ = exchange
    out = io.StringIO()
    t0 = time.monotonic()
    result = run_demo(up.sd.path, seconds=3, out=out, seed=7)
    assert time.monotonic() - t0 < 20
    assert result["errors"] == []
    assert result["trades"] > 0 and result["taker_fills"] > 0 and result["orders"] > 10
    text = out.getvalue()
    assert "orders/s" in text and "trades/s" in text and "stopped after" in text
    positions = cli_json(up.sd.path, "positions")
    demo_accounts = set(result["accounts"])
    assert any(p["account"] in demo_accounts for p in positions["positions"])
    # the maker canceled its quotes on the way out
    book = cli_json(up.sd.path, "book", "BTC-PERP", "--depth", "0")
    maker = result["accounts"][0]
    view = cli_json(up.sd.path, "account", "show", maker)
    assert view["open_orders"] == [], book


# ---- set-up failures: typed, fast, nothing left hanging -----------------------------------------
FAIL_FAST_S = 2.0


def _fails_fast(error, connect):
    """connect() raises `error` within FAIL_FAST_S (and returns, so nothing blocked in close)."""
    t0 = time.monotonic()
    with pytest.raises(error) as info:
        connect()
    elapsed = time.monotonic() - t0
    assert elapsed < FAIL_FAST_S, f"{error.__name__} after {elapsed:.2f} s"
    return str(info.value)


def test_certificate_failures_raise_typed_errors_within_two_seconds(exchange, tmp_path):
    up, endpoints = exchange
    missing = tmp_path / "nope.key_secret"
    assert "no such certificate file" in _fails_fast(
        CertificateMissing, lambda: Client.connect(endpoints, missing))
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("this is not a certificate\n")
    _fails_fast(CertificateInvalid, lambda: Client.connect(endpoints, garbage))
    cert = new_account(up)
    account = Path(cert).name.split(".")[0]
    public_only = up.sd.accounts_dir / f"{account}.key"
    assert "only a public key" in _fails_fast(
        PublicOnlyCertificate, lambda: Client.connect(endpoints, public_only))
    # a well-formed key the exchange never registered: refused at the handshake
    _, stranger = zmq.auth.create_certificates(str(tmp_path), "stranger")
    assert "not a registered account" in _fails_fast(
        UnknownKey, lambda: Client.connect(endpoints, stranger))

    # the right key, but another exchange's server key (an old endpoints.json)
    other_server, _ = zmq.curve_keypair()
    assert "server_public_key" in _fails_fast(
        HandshakeFailed, lambda: Client.connect(dict(endpoints,
                                                     server_public_key=other_server.decode()),
                                                cert))

    async def async_stranger():
        await AsyncClient.connect(endpoints, stranger)
    _fails_fast(UnknownKey, lambda: asyncio.run(async_stranger()))
    # ... and all of them are ClientErrors; the account's own certificate still connects
    assert issubclass(UnknownKey, ClientError) and issubclass(PublicOnlyCertificate, ClientError)
    with Client.connect(endpoints, cert) as c:
        assert c.ping()["type"] == "pong"


def test_a_fresh_account_gets_in_at_once(exchange):
    """The unknown-key grace covers a key registered a moment ago (gateway re-scan)."""
    up, endpoints = exchange
    t0 = time.monotonic()
    with Client.connect(endpoints, new_account(up)) as c:
        assert c.ping()["type"] == "pong"
    assert time.monotonic() - t0 < FAIL_FAST_S


def test_floats_are_refused_before_sending(clients):
    c = clients()
    rid = c.last_rid
    for call in (lambda: c.new_order("BTC-PERP", "buy", "limit", 0.01, "64000"),
                 lambda: c.new_order("BTC-PERP", "buy", "limit", "0.01", 64000.0),
                 lambda: c.amend(cid=1, price=64000.5),
                 lambda: c.withdraw(1.5)):
        with pytest.raises(FloatRefused, match="float"):
            call()
    assert c.last_rid == rid                  # nothing was sent
    assert c.new_order("BTC-PERP", "buy", "limit", Decimal("0.01"), 64000)["type"] == "ack"
    c.cancel_all()


def test_typed_reports(clients):
    a, b = clients(), clients()
    book = typed(a.book("ETH-PERP"))
    assert isinstance(book, Book) and book.market == "ETH-PERP"
    # the best bid, so that b's market sell meets it whatever earlier tests left resting
    price = max([p for p, _ in book.bids], default=Decimal("3400")) + Decimal("0.01")
    assert not book.asks or price < book.asks[0][0]
    ack = typed(a.new_order("ETH-PERP", "buy", "limit", "0.01", str(price), cid=7))
    assert isinstance(ack, Ack) and (ack.cid, ack.status) == (7, "open")
    assert ack.raw["type"] == "ack"
    taken = typed(b.new_order("ETH-PERP", "sell", "market", "0.01"))
    assert isinstance(taken, Ack) and taken.status == "filled"
    fill = a.wait_for(is_type("fill", cid=7))
    tf = typed(fill)
    assert isinstance(tf, Fill)
    assert (tf.price, tf.qty, tf.side, tf.liquidity) == (price, Decimal("0.01"), "buy", "maker")
    state = typed(a.account())
    assert isinstance(state, AccountState)
    assert [(p.market, p.size) for p in state.positions] == [("ETH-PERP", Decimal("0.01"))]
    reject = typed(a.new_order("NOPE-PERP", "buy", "limit", "1", "1"))
    assert isinstance(reject, Reject) and reject.reason == "unknown_market"
