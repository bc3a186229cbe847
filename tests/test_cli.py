"""The operator commands of PROTOCOL.md ("Command line") against one running exchange
(`perpx up` in a subprocess, every command a subprocess too), then `perpx down`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from decimal import Decimal

import msgpack
import pytest
import zmq
import zmq.auth

from tests.test_gateway_stats import exited_pid, write_stats
from tests.test_supervisor import (REPO, WAIT_S, Up, _env, cli, cli_fails, cli_json,
                                   config_text, wait_until)


# A market whose index (and so mark) walks on its own: BTC and ETH keep theirs still.
SIM_MARKET = """
[[markets]]
symbol = "SOL-PERP"
tick_size = "0.01"
lot_size = "0.1"
initial_price = "150"
oracle = "sim"
"""
# A market of its own for the lifecycle test: it ends settled.
LIFE_MARKET = """
[[markets]]
symbol = "LIFE-PERP"
tick_size = "0.01"
lot_size = "1"
initial_price = "2"
oracle = "manual"
"""


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    up = Up(tmp_path_factory.mktemp("cli") / "state",
            config_text(gateways=1, more_markets=SIM_MARKET + LIFE_MARKET,
                        extra='[risk]\noracle_max_jump = "0.5"\n'))
    try:
        endpoints = up.wait_ready()
        yield up, endpoints
        # `perpx down` stops it: the supervisor exits 0 and leaves nothing in /dev/shm
        r = cli(up.sd.path, "down")
        assert r.returncode == 0, r.stderr
        assert "stopped" in r.stdout
        assert up.wait_exit(30) == 0, up.stderr
        assert up.sd.shm_leftovers() == []
    finally:
        left = up.close()
        assert not left, f"left in /dev/shm: {left}"


@pytest.fixture(scope="module")
def traders(exchange):
    """Two funded accounts: (id, certificate) each."""
    up, _ = exchange
    out = []
    for _ in range(2):
        a = cli_json(up.sd.path, "account", "create", "--deposit", "100000")
        out.append((a["account"], a["certificate"]))
    return out


class Trader:
    def __init__(self, endpoints, certificate):
        self.ctx = zmq.Context()
        public, secret = zmq.auth.load_certificate(certificate)
        s = self.sock = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.curve_publickey, s.curve_secretkey = public, secret
        s.curve_serverkey = endpoints["server_public_key"].encode()
        s.connect(endpoints["orders"])
        self.rid = 0

    def request(self, **msg) -> dict:
        self.rid += 1
        msg["rid"] = self.rid
        self.sock.send(msgpack.packb(msg))
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                reply = msgpack.unpackb(self.sock.recv())
                if reply.get("rid") == self.rid:
                    return reply
        raise AssertionError(f"no reply to {msg}")

    def close(self):
        self.ctx.destroy(linger=0)


@pytest.fixture
def trader(exchange, traders):
    _, endpoints = exchange
    made = []

    def make(i: int) -> Trader:
        t = Trader(endpoints, traders[i][1])
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


# ---------------------------------------------------------------------------------------------
def test_endpoints_and_status(exchange):
    up, endpoints = exchange
    assert {"orders", "market_data", "server_public_key"} <= set(endpoints)
    assert len(endpoints["server_public_key"]) == 40

    def settled():
        # riskd keeps sequencing marks: a status read between a command's sequencing and its
        # journaling shows durable_seq one behind seq; the journal catches up in milliseconds
        s = cli_json(up.sd.path, "status")
        return s if s["durable_seq"] == s["seq"] else None

    status = wait_until(settled, WAIT_S, "a status with everything sequenced durable")
    assert [(p["name"], p["alive"], p["restarts"]) for p in status["processes"]] == [
        ("matcher", True, 0), ("persistd", True, 0), ("riskd", True, 0), ("gateway-0", True, 0)]
    assert status["seq"] >= 4 and status["durable_seq"] == status["seq"]
    assert status["rings"]["commands"] == {"ops": 0, "riskd": 0, "gateway-0": 0}
    text = cli(up.sd.path, "status").stdout
    assert "matcher" in text and "gateway-0" in text and "seq" in text
    assert "SOL-PERP: index " in text and " UTC)" in text     # riskd's numbers per market
    # the gateway's counts and limits (its stats file, written once a second)
    wait_until(lambda: "gateway-0" in cli_json(up.sd.path, "status")["gateways"], 10.0,
               "the gateway's stats")
    gw = cli_json(up.sd.path, "status")["gateways"]["gateway-0"]
    assert gw["limits"]["max_connections_per_account"] == 8 and gw["rss_bytes"] > 0
    assert gw["limits"]["max_queued_bytes"] == 8 << 20
    # its memory: RSS under the configured bound, what it holds for clients counted
    mem = gw["memory"]
    assert mem["limit_bytes"] == 1024 << 20 and 0 < mem["base_bytes"] < mem["limit_bytes"]
    assert gw["rss_bytes"] < mem["limit_bytes"], mem
    assert mem["accounted_bytes"] == sum(mem[f"{k}_bytes"]
                                         for k in ("queued", "held", "replay", "views"))
    text = cli(up.sd.path, "status").stdout
    assert "gateway-0: " in text and "(limit 1024.0 MB" in text, text
    assert (gw["stale"], gw["stale_reason"]) == (False, None)
    # the stats file a dead gateway left (one this exchange does not run, naming a pid that has
    # exited): stale, and its counts are not shown as current
    pid = exited_pid()
    left = write_stats(up.sd.run_dir, "gateway-9", {**json.loads(
        (up.sd.run_dir / "gateway-0.stats.json").read_text()), "pid": pid})
    try:
        dead = cli_json(up.sd.path, "status")["gateways"]["gateway-9"]
        assert (dead["stale"], dead["stale_reason"]) == (True, f"pid {pid} is not running")
        text = cli(up.sd.path, "status").stdout
    finally:
        left.unlink()
    assert f"gateway-9: STALE stats file (pid {pid} is not running): counts not shown" in text
    assert "gateway-9: rss" not in text


def test_account_create_deposit_and_show(exchange):
    up, _ = exchange
    created = cli_json(up.sd.path, "account", "create", "--deposit", "1000")
    account, cert = created["account"], created["certificate"]
    assert isinstance(account, int) and account >= 1
    public, secret = zmq.auth.load_certificate(cert)
    assert public and secret
    registered, _ = zmq.auth.load_certificate(up.sd.accounts_dir / f"{account}.key")
    assert registered == public
    assert oct(os.stat(cert).st_mode & 0o777) == "0o600"

    shown = cli_json(up.sd.path, "account", "show", account)
    assert (shown["account"], shown["balance"], shown["available"]) == (account, "1000", "1000")
    assert shown["positions"] == [] and shown["open_orders"] == []

    deposit = cli_json(up.sd.path, "deposit", account, "250.5")
    assert deposit["balance"] == "1250.5" and deposit["amount"] == "250.5"
    assert cli_json(up.sd.path, "account", "show", account)["balance"] == "1250.5"
    text = cli(up.sd.path, "account", "show", account).stdout
    assert "balance 1250.5" in text

    # a second account gets the next id
    assert cli_json(up.sd.path, "account", "create")["account"] == account + 1
    # ids are never reused, even once the account's key files are gone
    os.unlink(up.sd.accounts_dir / f"{account + 1}.key")
    os.unlink(up.sd.clients_dir / f"{account + 1}.key_secret")
    assert cli_json(up.sd.path, "account", "create")["account"] == account + 2
    # disable (journaled), then enable again
    off = cli_json(up.sd.path, "account", "disable", account, "--cancel-orders")
    assert (off["disabled"], off["canceled"]) == (True, 0) and off["seq"] > deposit["seq"]
    assert cli_json(up.sd.path, "account", "enable", account)["disabled"] is False


def test_fund_deposit_is_journaled_and_in_duckdb(exchange):
    up, _ = exchange
    doc = cli_json(up.sd.path, "fund", "deposit", "150.25")
    assert doc["amount"] == "150.25" and Decimal(doc["fund"]) >= Decimal("150.25")
    seq = doc["seq"]
    query = f"SELECT reason, CAST(amount AS VARCHAR) FROM insurance_fund WHERE seq = {seq}"
    wait_until(lambda: cli_json(up.sd.path, "sql", query)["rows"] != [], WAIT_S,
               "the fund deposit in DuckDB")
    ((reason, amount),) = cli_json(up.sd.path, "sql", query)["rows"]
    assert (reason, Decimal(amount)) == ("deposit", Decimal("150.25"))
    assert "must be positive" in cli_fails(up.sd.path, "fund", "deposit", "0")


def test_markets(exchange):
    up, _ = exchange
    doc = cli_json(up.sd.path, "markets")
    btc, eth = doc["markets"][:2]
    assert (btc["symbol"], btc["id"], btc["tick_size"], btc["lot_size"], btc["initial_price"]) == (
        "BTC-PERP", 0, "0.1", "0.001", "65000")
    assert (eth["symbol"], eth["oracle"], eth["max_price"]) == ("ETH-PERP", "manual", "35000")
    assert btc["live"]["active"] and not btc["live"]["halted"]
    text = cli(up.sd.path, "markets").stdout
    assert "BTC-PERP" in text and "ETH-PERP" in text


def test_halt_and_resume(exchange, trader):
    up, _ = exchange
    t = trader(0)
    assert cli_json(up.sd.path, "halt", "BTC-PERP")["halted"] is True
    assert cli_json(up.sd.path, "markets")["markets"][0]["live"]["halted"] is True
    order = dict(type="new_order", market="BTC-PERP", side="buy", qty="0.01", price="60000")
    reply = t.request(cid=901, **order)
    assert (reply["type"], reply["reason"]) == ("reject", "market_halted")

    assert cli_json(up.sd.path, "resume", "BTC-PERP")["halted"] is False
    assert cli_json(up.sd.path, "markets")["markets"][0]["live"]["halted"] is False
    reply = t.request(cid=902, **order)
    assert (reply["type"], reply["status"]) == ("ack", "open")
    assert t.request(type="cancel", cid=902)["type"] == "canceled"


def test_market_states_and_settlement(exchange):
    up, endpoints = exchange
    made = [cli_json(up.sd.path, "account", "create", "--deposit", "1000") for _ in range(2)]
    buyer, seller = (Trader(endpoints, m["certificate"]) for m in made)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(endpoints["market_data"])
    sub.setsockopt(zmq.SUBSCRIBE, b"mark.LIFE-PERP")

    def mark_state(want):
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if sub.poll(100):
                _, body = sub.recv_multipart()
                if msgpack.unpackb(body).get("state") == want:
                    return True
        raise AssertionError(f"no mark.LIFE-PERP with state {want}")

    def new(t, side, qty, cid, **kw):
        return t.request(type="new_order", market="LIFE-PERP", side=side, qty=qty,
                         price="2", cid=cid, **kw)

    def live_state():
        doc = cli_json(up.sd.path, "markets")
        return next(m for m in doc["markets"] if m["symbol"] == "LIFE-PERP")["live"]["state"]

    try:
        time.sleep(0.2)      # the SUB connection settles (market data has no snapshot)
        assert new(seller, "sell", "10", 1)["status"] == "open"
        assert new(buyer, "buy", "10", 1)["status"] == "filled"
        assert new(seller, "sell", "5", 2)["status"] == "open"
        assert cli_json(up.sd.path, "market", "state", "LIFE-PERP", "cancel_only")["state"] \
            == "cancel_only"
        mark_state("cancel_only")
        assert live_state() == "cancel_only"
        assert new(buyer, "buy", "1", 2)["reason"] == "market_cancel_only"
        cli_json(up.sd.path, "market", "state", "LIFE-PERP", "reduce_only")
        mark_state("reduce_only")
        assert new(buyer, "buy", "1", 3)["reason"] == "market_reduce_only"
        assert new(buyer, "sell", "1", 4, reduce_only=True)["type"] == "ack"
        assert "state must be one of" in cli_fails(up.sd.path, "market", "state", "LIFE-PERP",
                                                   "settled")
        done = cli_json(up.sd.path, "market", "settle", "LIFE-PERP", "2.5")
        assert (done["state"], done["positions_closed"]) == ("settled", 2)
        mark_state("settled")
        assert live_state() == "settled"
        assert new(buyer, "buy", "1", 5)["reason"] == "market_settled"
        shown = cli_json(up.sd.path, "account", "show", made[0]["account"])
        assert shown["positions"] == [] and shown["open_orders"] == []
        # bought 10 at 2, settled at 2.5: +5 USDC, less the taker fee 0.0005 x 20
        assert shown["balance"] == "1004.99"
        assert "market_settled" in cli_fails(up.sd.path, "market", "state", "LIFE-PERP",
                                             "trading")
    finally:
        ctx.destroy(linger=0)
        buyer.close()
        seller.close()


def test_oracle_set_manual_only(exchange):
    up, _ = exchange
    done = cli_json(up.sd.path, "oracle", "set", "ETH-PERP", "3600.5")
    assert (done["index_price"], done["mark_price"]) == ("3600.5", "3600.5")  # no book, no trades
    assert cli_json(up.sd.path, "markets")["markets"][1]["live"]["mark_price"] == "3600.5"
    status = cli_json(up.sd.path, "status")["risk"]
    assert (status["ETH-PERP"]["index"], status["ETH-PERP"]["mark"]) == ("3600.5", "3600.5")
    # manual, never set: riskd has no index for it (stale, no numbers)
    assert status["BTC-PERP"]["index"] is None and status["BTC-PERP"]["stale"]
    assert float(status["SOL-PERP"]["index"]) > 0
    line = cli_fails(up.sd.path, "oracle", "set", "SOL-PERP", "151")
    assert "'sim' feed" in line and "oracle = \"manual\"" in line
    assert "tick size" in cli_fails(up.sd.path, "oracle", "set", "ETH-PERP", "3600.505")
    # more than oracle_max_jump (50%) from the current index needs --force
    assert "use --force" in cli_fails(up.sd.path, "oracle", "set", "ETH-PERP", "5401")
    assert cli_json(up.sd.path, "oracle", "set", "ETH-PERP", "5401", "--force")["index_price"] \
        == "5401"
    cli_json(up.sd.path, "oracle", "set", "ETH-PERP", "3500", "--force")


def test_trades_show_in_book_positions_and_accounts(exchange, traders, trader):
    up, _ = exchange
    (a_id, _), (b_id, _) = traders
    a, b = trader(0), trader(1)
    assert a.request(type="new_order", cid=1, market="BTC-PERP", side="buy", qty="0.5",
                     price="64000")["status"] == "open"
    assert b.request(type="new_order", cid=1, market="BTC-PERP", side="sell", qty="0.2",
                     price="64000")["status"] == "filled"
    assert b.request(type="new_order", cid=2, market="BTC-PERP", side="sell", qty="1",
                     price="66000.5")["status"] == "open"

    book = cli_json(up.sd.path, "book", "BTC-PERP", "--depth", "5")
    assert book["bids"] == [["64000", "0.3"]] and book["asks"] == [["66000.5", "1"]]
    assert book["market"] == "BTC-PERP" and book["seq"] > 0
    assert "66000.5" in cli(up.sd.path, "book", "BTC-PERP").stdout

    positions = cli_json(up.sd.path, "positions", "BTC-PERP")["positions"]
    assert {(p["account"], p["size"], p["entry_price"]) for p in positions} == {
        (a_id, "0.2", "64000"), (b_id, "-0.2", "64000")}
    assert cli_json(up.sd.path, "positions")["open_interest"]["BTC-PERP"] == "0.2"

    shown = cli_json(up.sd.path, "account", "show", a_id)
    assert shown["positions"][0]["size"] == "0.2"
    assert shown["positions"][0]["unrealized_pnl"] == "200"   # (65000 - 64000) x 0.2
    assert [(o["side"], o["price"], o["remaining"]) for o in shown["open_orders"]] == [
        ("buy", "64000", "0.3")]
    # maker fee 0.0002 on 12800 = 2.56
    assert shown["balance"] == "99997.44"


def test_errors_are_one_line_with_non_zero_exit(exchange, tmp_path):
    up, _ = exchange
    sd = up.sd.path
    assert "not registered" in cli_fails(sd, "deposit", "63", "10")
    assert "more than 6 decimals" in cli_fails(sd, "deposit", "1", "1.0000001", json_mode=True)
    assert "unknown market" in cli_fails(sd, "halt", "DOGE-PERP")
    assert "unknown market" in cli_fails(sd, "book", "DOGE-PERP", json_mode=True)
    assert "outside" in cli_fails(sd, "account", "show", "5000")
    assert "not running" in cli_fails(tmp_path / "nowhere", "status")
    assert "not running" in cli_fails(tmp_path / "nowhere", "deposit", "1", "10")
    r = cli(sd, "deposit", "x", "10")           # usage errors exit 2, one line
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_a_dead_cli_reader_is_freed_by_the_supervisor(exchange):
    """A CLI killed while it reads events as "ops" must not leave the slot holding the matcher."""
    up, _ = exchange
    code = ("import os, signal, sys\n"
            "from perpx.ops import Exchange\n"
            "s = Exchange(sys.argv[1]).session().__enter__()\n"
            "print('joined', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(up.sd.path)], capture_output=True,
                       text=True, timeout=60, env=_env(), cwd=str(REPO))
    assert r.returncode == -signal.SIGKILL and "joined" in r.stdout
    wait_until(lambda: "freed the event ring's \"ops\" reader slot" in up.stderr, WAIT_S,
               "the supervisor to free the ops reader slot")
    assert "ops" not in cli_json(up.sd.path, "status")["rings"]["events"]["consumer_lag"]
    assert cli_json(up.sd.path, "halt", "ETH-PERP")["halted"]
    assert cli_json(up.sd.path, "resume", "ETH-PERP")["halted"] is False
