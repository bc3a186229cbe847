"""Perpetual risk through the gateway, with real processes (a matcher and a gateway, the ops
ring playing riskd and the operator): set_margin, stop and take-profit orders, account_state
against engine/risk.py, funding and liquidation reports and market data, mark.MARKET with
riskd's index board. The DuckDB rows of funding and liquidations are checked through a whole
`perpx up` exchange at the end."""

import time
from decimal import Decimal
from types import SimpleNamespace

import msgpack
import pytest

from engine.market import MarketTable
from engine.records import REASON_LEVERAGE, funding_command, liquidate_command
from gateway.codec import ENGINE_REASON_TEXT
from shm.index_board import IndexBoard, Published
from tests.gateway_fixtures import (BTC, BTC_MARK, ENGINE, ETH, MARKETS, WAIT_S, Exchange,
                                    is_type, order, wait_until)
from tests.shm_workers import shm_prefix  # noqa: F401 — fixture: unique prefix, leak check

TABLE = MarketTable.from_dicts(MARKETS)
D = Decimal
LEVERAGE_TEXT = ENGINE_REASON_TEXT[REASON_LEVERAGE]
LOCKED_TEXT = ("the margin mode cannot change while this market has a position or open orders "
               "of this account")


@pytest.fixture
def exchange(shm_prefix, tmp_path):
    ex = Exchange(shm_prefix, tmp_path)
    try:
        ex.start_matcher()
        ex.start_gateway()
        yield ex
    finally:
        ex.close()


def subscribe(exchange, *topics):
    sub = exchange.subscriber(*topics)
    time.sleep(0.3)                   # the subscription reaches the publisher (slow joiner)
    return sub


def next_md(sub, topic: str, timeout_s: float = WAIT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sub.poll(100):
            t, payload = sub.recv_multipart()
            if t.decode() == topic:
                return msgpack.unpackb(payload)
    raise AssertionError(f"nothing on {topic} within {timeout_s} s")


def no_md(sub, quiet_s: float = 0.3) -> list:
    out = []
    while sub.poll(int(quiet_s * 1000)):
        out.append(sub.recv_multipart())
    return out


# ---- validation at the edge -------------------------------------------------------------------
def test_conditional_orders_are_validated_at_the_gateway(exchange):
    a = exchange.client(1)
    seq_before = exchange.seq()
    cases = [
        (order(1, "BTC-PERP", "buy", "0.1", kind="stop_market"), "invalid_message",
         "trigger_price"),
        (order(2, "BTC-PERP", "buy", "0.1", kind="stop_market", trigger_price="65100.05"),
         "invalid_tick", "trigger_price"),
        (order(3, "BTC-PERP", "buy", "0.1", kind="stop_limit", trigger_price="65100"),
         "invalid_message", "price"),
        (order(4, "BTC-PERP", "buy", "0.1", "65000", trigger_price="65100"), "invalid_message",
         "trigger_price"),
        (order(5, "BTC-PERP", "buy", "0.1", kind="market", trigger_by="last"),
         "invalid_message", "trigger"),
        (order(6, "BTC-PERP", "buy", "0.1", kind="take_profit_market", trigger_price="64000",
               trigger_by="index"), "invalid_message", "trigger_by"),
    ]
    for msg, reason, word in cases:
        reply = a.request(**msg)
        assert (reply["type"], reply["reason"], reply["cid"]) == ("reject", reason, msg["cid"])
        assert word in reply["message"] and "seq" not in reply, reply
    assert exchange.seq() == seq_before          # nothing reached the matcher


# ---- set_margin -------------------------------------------------------------------------------
def test_set_margin_accepted_and_rejected_with_reasons(exchange):
    a = exchange.client(1)
    done = a.request(type="set_margin", market="ETH-PERP", mode="isolated", leverage=5)
    assert done["type"] == "done" and done["seq"] > 0, done
    tables = exchange.quiet_state()[2]
    pos = tables["positions"][1, ETH]
    assert (int(pos["margin_mode"]), int(pos["leverage"])) == (1, 5)

    too_high = a.request(type="set_margin", market="ETH-PERP", mode="isolated", leverage=21)
    assert (too_high["type"], too_high["reason"], too_high["message"]) == (
        "reject", "invalid_message", LEVERAGE_TEXT)
    assert a.request(**order(1, "ETH-PERP", "buy", "1", "2990"))["status"] == "open"
    locked = a.request(type="set_margin", market="ETH-PERP", mode="cross", leverage=5)
    assert (locked["type"], locked["reason"], locked["message"]) == (
        "reject", "invalid_message", LOCKED_TEXT)
    # the same mode with another leverage is not a mode change
    assert a.request(type="set_margin", market="ETH-PERP", mode="isolated",
                     leverage=10)["type"] == "done"
    assert a.request(type="cancel", cid=1)["type"] == "canceled"
    assert a.request(type="set_margin", market="ETH-PERP", mode="cross",
                     leverage=20)["type"] == "done"


# ---- account_state against engine/risk.py -----------------------------------------------------
def expected_state(tables, account: int) -> dict:
    from engine.risk import account_risk
    return account_risk(SimpleNamespace(**tables), account)


def check_account_state(msg: dict, risk: dict) -> None:
    usd = D(1) / 10 ** 6
    assert D(msg["balance"]) == risk["balance_atoms"] * usd
    assert D(msg["equity"]) == risk["equity_atoms"] * usd
    assert D(msg["available"]) == risk["available_atoms"] * usd
    assert D(msg["maintenance_margin"]) == risk["maintenance_atoms"] * usd
    want = [p for p in risk["positions"] if p["size_lots"]]
    assert len(msg["positions"]) == len(want)
    for got, p in zip(msg["positions"], want):
        market = TABLE.by_id[p["market"]]
        assert got["market"] == market.symbol
        assert D(got["size"]) == p["size_lots"] * market.lot_size
        assert D(got["mark_price"]) == p["mark_ticks"] * market.tick_size
        assert D(got["unrealized_pnl"]) == p["upnl_atoms"] * usd
        assert got["mode"] == ("cross", "isolated")[p["margin_mode"]]
        assert got["leverage"] == p["leverage"]
        assert p["liquidation_price_ticks"] is not None
        assert D(got["liquidation_price"]) == p["liquidation_price_ticks"] * market.tick_size
        entry = D(p["cost_atoms"]) / (p["size_lots"] * market.atoms_per_tick_lot) \
            * market.tick_size
        assert abs(D(got["entry_price"]) - entry) < market.tick_size / 10 ** 6


def test_account_state_equals_engine_risk_cross_and_isolated(exchange):
    a, b, c = exchange.client(1), exchange.client(2), exchange.client(3)
    # account 2 trades ETH isolated at 5x, account 1 BTC cross at 50x (both long), 3 is the
    # other side; 2 and 1 withdraw most of their money so the liquidation prices are near
    assert b.request(type="set_margin", market="ETH-PERP", mode="isolated",
                     leverage=5)["type"] == "done"
    assert a.request(type="withdraw", amount="9998000")["type"] == "done"
    assert b.request(type="withdraw", amount="9990000")["type"] == "done"
    assert c.request(**order(1, "BTC-PERP", "sell", "1", "65000"))["status"] == "open"
    assert c.request(**order(2, "ETH-PERP", "sell", "10", "3000"))["status"] == "open"
    assert a.request(**order(1, "BTC-PERP", "buy", "1", "65000"))["status"] == "filled"
    assert b.request(**order(1, "ETH-PERP", "buy", "10", "3000"))["status"] == "filled"
    exchange.set_mark(BTC, BTC_MARK - 3000)        # 64700
    for client, account in ((a, 1), (b, 2), (c, 3)):
        msg = client.request(type="account")
        seq, _, tables = exchange.quiet_state()
        assert msg["type"] == "account_state" and msg["seq"] == seq
        check_account_state(msg, expected_state(tables, account))
    a_state = a.request(type="account")
    assert [(p["market"], p["mode"], p["leverage"]) for p in a_state["positions"]] == [
        ("BTC-PERP", "cross", 50)]
    b_state = b.request(type="account")
    (eth,) = b_state["positions"]
    assert (eth["mode"], eth["leverage"], eth["margin"]) == ("isolated", 5, "6000")
    # what a query costs the gateway: the consistent copy of the rows, then engine/risk.py
    from engine.shared_state import attach_state
    from shm import names
    from engine.records import EVENT_DTYPE
    from gateway.account_state import account_state_fields, account_tables
    from shm.ring import EventRing
    region, state = attach_state(exchange.prefix, ENGINE)
    events = EventRing.attach(names.event_ring(exchange.prefix), EVENT_DTYPE)
    try:
        markets = [TABLE.by_id.get(m) for m in range(ENGINE.max_markets)]
        t0 = time.perf_counter()
        for _ in range(200):
            tables, _ = account_tables(state, events, 1)
        t1 = time.perf_counter()
        for _ in range(200):
            account_state_fields(tables, 0, markets)
        t2 = time.perf_counter()
    finally:
        del state
        region.close()
        events.close()
    print(f"\n[account_state] copy {(t1 - t0) / 200 * 1e6:.0f} µs + engine/risk.py and "
          f"formatting {(t2 - t1) / 200 * 1e6:.0f} µs per query ({ENGINE.max_markets} markets)")


# ---- stops and take-profits -------------------------------------------------------------------
def test_stop_untriggered_then_triggered_and_filled_on_a_mark_move(exchange):
    a, b = exchange.client(1), exchange.client(2)
    assert b.request(**order(1, "BTC-PERP", "sell", "0.5", "65200"))["status"] == "open"
    ack = a.request(**order(7, "BTC-PERP", "buy", "0.2", kind="stop_market",
                            trigger_price="65100"))
    assert (ack["type"], ack["status"], ack["cid"]) == ("ack", "untriggered", 7), ack
    # the band is checked when it fires, not at placement
    wide = a.request(**order(6, "BTC-PERP", "buy", "0.1", "72000", kind="stop_limit",
                             trigger_price="65100"))
    assert wide["status"] == "untriggered"
    listed = a.request(type="open_orders")["orders"]
    assert sorted((o["cid"], o["kind"], o["status"]) for o in listed) == [
        (6, "stop_limit", "untriggered"), (7, "stop_market", "untriggered")]
    exchange.set_mark(BTC, 651_000)                    # 65100: both buy stops fire
    refused = a.wait_for(is_type("triggered", cid=6))
    assert refused["status"] == "canceled"
    reject = a.wait_for(is_type("reject", cid=6))
    assert (reject["reason"], reject["oid"], reject["seq"]) == (
        "price_band", wide["oid"], refused["seq"])
    assert "rid" not in reject
    trig = a.wait_for(is_type("triggered", cid=7))
    assert trig["oid"] == ack["oid"] and trig["market"] == "BTC-PERP"
    fill = a.wait_for(is_type("fill", cid=7))
    assert (fill["price"], fill["qty"], fill["side"]) == ("65200", "0.2", "buy")
    assert a.request(type="open_orders")["orders"] == []

    # by the last trade price: a take-profit limit sell that rests once fired
    tp = a.request(**order(8, "BTC-PERP", "sell", "0.1", "65300", kind="take_profit_limit",
                           trigger_price="65250", trigger_by="last"))
    assert (tp["type"], tp["status"], tp["price"], tp["kind"]) == (
        "ack", "untriggered", "65300", "take_profit_limit"), tp
    amend = a.request(type="amend", cid=8, price="65400")
    assert (amend["type"], amend["reason"]) == ("reject", "invalid_message")
    assert "cancel it" in amend["message"]
    exchange.set_mark(BTC, 652_600)                  # the mark alone does not fire it
    assert a.request(type="open_orders")["orders"][0]["status"] == "untriggered"
    assert b.request(**order(2, "BTC-PERP", "sell", "0.1", "65250"))["status"] == "open"
    # takes the 0.3 left at 65200, then 0.1 at 65250: the last price reaches the trigger
    assert a.request(**order(9, "BTC-PERP", "buy", "0.4", "65250"))["status"] == "filled"
    fired = a.wait_for(is_type("triggered", cid=8))
    assert (fired["status"], fired["remaining"], fired["kind"]) == ("open", "0.1",
                                                                    "take_profit_limit")
    (resting,) = a.request(type="open_orders")["orders"]
    assert (resting["cid"], resting["status"], resting["price"]) == (8, "open", "65300")
    book = a.request(type="book", market="BTC-PERP")
    assert ["65300", "0.1"] in book["asks"]


# ---- funding ----------------------------------------------------------------------------------
def test_funding_reports_and_market_data(exchange):
    a, b = exchange.client(1), exchange.client(2)
    sub = subscribe(exchange, "funding.BTC-PERP")
    assert b.request(**order(1, "BTC-PERP", "sell", "1.5", "65000"))["status"] == "open"
    assert a.request(**order(1, "BTC-PERP", "buy", "1.5", "65000"))["status"] == "filled"
    seq = exchange.submit(funding_command(BTC, rate_e9=100_000))      # 0.0001
    paid = a.wait_for(is_type("funding", market="BTC-PERP"))
    got = b.wait_for(is_type("funding", market="BTC-PERP"))
    # 1.5 BTC at the mark 65000 x 0.0001 = 9.75 USDC: longs pay shorts
    assert (paid["rate"], paid["payment"], paid["seq"]) == ("0.0001", "-9.75", seq)
    assert (got["rate"], got["payment"]) == ("0.0001", "9.75")
    md = next_md(sub, "funding.BTC-PERP")
    assert (md["rate"], md["seq"]) == ("0.0001", seq)
    assert no_md(sub) == []                         # once per command, not per payment


# ---- liquidation ------------------------------------------------------------------------------
def test_liquidation_reports_market_data_and_fills(exchange):
    a, victim = exchange.client(1), exchange.client(4)
    sub = subscribe(exchange, "liquidation.BTC-PERP")
    assert victim.request(type="withdraw", amount="9998000")["type"] == "done"   # 2000 left
    assert a.request(**order(1, "BTC-PERP", "sell", "1", "65000"))["status"] == "open"
    assert victim.request(**order(1, "BTC-PERP", "buy", "1", "65000"))["status"] == "filled"
    assert victim.request(**order(2, "BTC-PERP", "buy", "0.001", "60000"))["status"] == "open"
    assert a.request(**order(2, "BTC-PERP", "buy", "1", "63150"))["status"] == "open"
    exchange.set_mark(BTC, 632_000)    # equity 2000 - 1800 - 32.5 fee < maintenance 266
    seq = exchange.submit(liquidate_command(4))
    canceled = victim.wait_for(is_type("canceled", cid=2))
    assert canceled["reason"] == "liquidation"
    liq = victim.wait_for(is_type("liquidation", market="BTC-PERP"))
    assert (liq["qty"], liq["price"], liq["kind"], liq["seq"]) == ("1", "63150", "liquidated", seq)
    fill = victim.wait_for(is_type("fill", market="BTC-PERP", seq=seq))
    assert (fill["side"], fill["price"], fill["liquidation"]) == ("sell", "63150", True)
    maker = a.wait_for(is_type("fill", cid=2))
    assert (maker["side"], maker["liquidation"], maker["liquidity"]) == ("buy", True, "maker")
    md = next_md(sub, "liquidation.BTC-PERP")
    assert (md["side"], md["qty"], md["price"], md["kind"], md["seq"]) == (
        "sell", "1", "63150", "liquidated", seq)
    assert no_md(sub) == []
    assert victim.request(type="account")["positions"] == []


def test_adl_publishes_the_liquidated_half_only(exchange):
    """No bid to close into: the liquidated long is deleveraged against the short that took
    the other side, at the bankruptcy price; both get an `adl` liquidation, market data one."""
    a, victim = exchange.client(1), exchange.client(4)
    sub = subscribe(exchange, "liquidation.BTC-PERP")
    assert victim.request(type="withdraw", amount="9998000")["type"] == "done"   # 2000 left
    assert a.request(**order(1, "BTC-PERP", "sell", "1", "65000"))["status"] == "open"
    assert victim.request(**order(1, "BTC-PERP", "buy", "1", "65000"))["status"] == "filled"
    exchange.set_mark(BTC, 632_000)
    seq = exchange.submit(liquidate_command(4))
    mine = victim.wait_for(is_type("liquidation", seq=seq))
    theirs = a.wait_for(is_type("liquidation", seq=seq))
    assert (mine["kind"], mine["side"], theirs["kind"], theirs["side"]) == (
        "adl", "sell", "adl", "buy")
    assert mine["price"] == theirs["price"] and mine["qty"] == theirs["qty"] == "1"
    md = next_md(sub, "liquidation.BTC-PERP")
    assert (md["kind"], md["side"], md["qty"], md["price"], md["seq"]) == (
        "adl", "sell", "1", mine["price"], seq)
    assert no_md(sub) == []
    assert victim.request(type="account")["positions"] == []
    assert a.request(type="account")["positions"] == []


# ---- mark.MARKET with riskd's board ------------------------------------------------------------
def test_mark_market_data_carries_riskd_index_and_funding(exchange):
    sub = subscribe(exchange, "mark.BTC-PERP")
    seq = exchange.set_mark(BTC, 650_010)
    md = next_md(sub, "mark.BTC-PERP")
    assert (md["seq"], md["mark"]) == (seq, "65001")
    assert md["index"] is None and md["funding_rate"] is None and md["next_funding_ts"] is None

    board = IndexBoard.create(exchange.prefix, ENGINE.max_markets)
    try:
        next_ns = 1_800_000_000 * 10 ** 9

        def publish(rate_e9):
            board.publish(BTC, Published(index_ticks=649_990, mark_ticks=650_020,
                                         funding_rate_e9=rate_e9, next_funding_ns=next_ns,
                                         ts_ns=time.time_ns(), applied_version=0))

        publish(-125_000)
        # the gateway finds the board (it looks at most once a second) and, without a new
        # mark, publishes the changed line with the matcher's mark
        md = next_md(sub, "mark.BTC-PERP")
        assert (md["seq"], md["mark"], md["index"], md["funding_rate"],
                md["next_funding_ts"]) == (seq, "65001", "64999", "-0.000125", next_ns)
        seq = exchange.set_mark(BTC, 650_020)
        md = next_md(sub, "mark.BTC-PERP")
        assert (md["seq"], md["mark"], md["index"], md["funding_rate"]) == (
            seq, "65002", "64999", "-0.000125")
        assert no_md(sub, 1.5) == []                # nothing changed: nothing more
        publish(310_000)
        md = next_md(sub, "mark.BTC-PERP")
        assert (md["seq"], md["mark"], md["funding_rate"]) == (seq, "65002", "0.00031")
    finally:
        board.close()
        board.unlink()


# ---- DuckDB through a whole exchange -----------------------------------------------------------
def test_funding_and_liquidation_rows_in_duckdb(ups):
    from perpx.client import Client
    from perpx.ops import Exchange as Ops, create_account
    from tests.test_supervisor import cli_json, config_text

    up = ups("risk", config_text(gateways=1))
    endpoints = up.wait_ready()
    ops = Ops(up.sd)
    accounts, clients = [], []
    for usdc in (1_000_000, 2_000, 100_000):
        account, cert = create_account(up.sd, ops.engine.max_accounts)
        ops.deposit(account, usdc * 10 ** 6)
        accounts.append(account)
        clients.append(Client.connect(endpoints, cert, timeout_s=WAIT_S))
    maker, victim, isolated = clients

    def rows(sql):
        return cli_json(up.sd.path, "sql", sql)["rows"]

    try:
        # an isolated long in ETH: its funding goes to the isolated margin, not the balance
        assert isolated.set_margin("ETH-PERP", "isolated", 5)["type"] == "done"
        assert maker.new_order("ETH-PERP", "sell", "limit", "2", "3500")["status"] == "open"
        assert isolated.new_order("ETH-PERP", "buy", "limit", "2", "3500")["status"] == "filled"
        # (balance rows carry the seq of persistd's batch: the fill's must be in before)
        wait_until(lambda: rows("SELECT count(*) FROM fills WHERE market = 'ETH-PERP'") == [[1]],
                   30, "the ETH fill in DuckDB")
        eth_funding = ops.submit_one(funding_command(ETH, rate_e9=100_000), "funding")
        isolated.wait_for(lambda m: m.get("type") == "funding")
        assert maker.new_order("BTC-PERP", "sell", "limit", "1", "65000")["status"] == "open"
        assert victim.new_order("BTC-PERP", "buy", "limit", "1", "65000")["status"] == "filled"
        funding = ops.submit_one(funding_command(BTC, rate_e9=100_000), "funding")
        victim.wait_for(lambda m: m.get("type") == "funding")
        assert maker.new_order("BTC-PERP", "buy", "limit", "1", "63150")["status"] == "open"
        (liq,) = ops.submit(liquidate_command(accounts[1]))
        if liq.rejected:
            # healthy at riskd's mark: move the index far enough that the mark (a median with
            # the last trade, 65000) goes below the liquidation price ~63300
            cli_json(up.sd.path, "oracle", "set", "BTC-PERP", "61000")
            ops.submit(liquidate_command(accounts[1]))    # unless riskd's scanner was first
        report = victim.wait_for(lambda m: m.get("type") == "liquidation", timeout_s=30)

        wait_until(lambda: rows("SELECT count(*) FROM liquidations")[0][0] >= 1, 30,
                   "the liquidation in DuckDB")
        def decimals(row):
            return [D(str(v)) if k else v for k, v in enumerate(row)]

        assert [decimals(r) for r in rows(
            f"SELECT market, account, rate, payment FROM funding_payments "
            f"WHERE seq = {funding.seq} ORDER BY account")] == [
            ["BTC-PERP", D(accounts[0]), D("0.0001"), D("6.5")],
            ["BTC-PERP", D(accounts[1]), D("0.0001"), D("-6.5")]]
        (liq_row,) = rows(f"SELECT kind, qty, price FROM liquidations "
                          f"WHERE account = {accounts[1]}")
        assert decimals(liq_row) == ["liquidated", D("1"), D("63150")]
        # the clearance fee: in the report, in DuckDB, in the fund, and the balance adds up to
        # the atom: 2000 deposited - 32.5 taker fee - 6.5 funding - 1850 realized - the fee
        ((fee,),) = rows(f"SELECT fee FROM liquidations WHERE account = {accounts[1]}")
        assert D(report["fee"]) == D(str(fee)) > 0
        assert [D(report["fee"])] in [[D(str(r[0]))] for r in rows(
            "SELECT amount FROM insurance_fund WHERE reason = 'liquidation_fee'")]
        assert D(victim.account()["balance"]) == (D("2000") - D("32.5") - D("6.5")
                                                 - D("1850") - D(report["fee"]))
        assert rows("SELECT count(*) FROM fills WHERE liquidation")[0][0] == 1
        balances = rows(f"SELECT seq FROM balances WHERE account = {accounts[1]} "
                        f"ORDER BY seq")
        assert [funding.seq] in balances            # the funding payment changed the balance
        assert rows(f"SELECT account, payment FROM funding_payments "
                    f"WHERE seq = {eth_funding.seq} ORDER BY account")[1][0] == accounts[2]
        assert rows(f"SELECT count(*) FROM balances WHERE account = {accounts[2]} "
                    f"AND seq = {eth_funding.seq}") == [[0]]
        assert rows("SELECT count(*) FROM insurance_fund WHERE reason = 'liquidation_fee'")[
            0][0] >= 1
    finally:
        for c in clients:
            c.close()
