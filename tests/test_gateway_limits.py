"""Bounded resources per account and per gateway (issue 14 item 3): connections per account,
a queue limit per connection (a client that does not read is dropped, not buffered without
end), and another account unaffected; the counts in the gateway's stats file."""

import json

import numpy as np
import pytest

from engine.records import CMD_CANCEL, CMD_NEW_ORDER, new_commands
from tests.gateway_fixtures import WAIT_S, Exchange, is_type, order, wait_until
from tests.shm_workers import shm_prefix  # noqa: F401 — fixture: unique prefix, leak check

PER_ACCOUNT = 4
# Small, to be reached quickly; keep the real one well above the gateway's event batch (4096
# messages a pass may write to one connection before its client's reads are credited).
QUEUED = 200
PAIRS = 6000


def order_pairs(account: int, first_cid: int, n: int) -> np.ndarray:
    """n resting buys of `account` and their cancels, as the operator's ring takes them."""
    c = new_commands(2 * n)
    c["account"], c["market"] = account, 0
    c["cmd"][0::2], c["cmd"][1::2] = CMD_NEW_ORDER, CMD_CANCEL
    c["cid"][0::2] = c["cid"][1::2] = np.arange(first_cid, first_cid + n)
    c["price_ticks"][0::2], c["qty_lots"][0::2] = 600_000, 1
    return c


@pytest.fixture
def exchange(shm_prefix, tmp_path):
    ex = Exchange(shm_prefix, tmp_path)
    ex.stats_file = tmp_path / "gateway-0.stats.json"
    try:
        ex.start_matcher()
        ex.start_gateway(max_connections_per_account=PER_ACCOUNT,
                         max_queued_messages=QUEUED, stats_file=str(ex.stats_file))
        yield ex
    finally:
        ex.close()


def stats(ex) -> dict:
    wait_until(ex.stats_file.exists, WAIT_S, "the stats file")
    return json.loads(ex.stats_file.read_text())


def test_silent_connections_are_bounded_and_another_account_is_unaffected(exchange):
    ex = exchange
    silent = []
    for _ in range(PER_ACCOUNT):
        c = ex.client(1, slow_reader=True)
        assert c.request(type="hello", cancel_on_disconnect=False)["account"] == 1
        silent.append(c)
    # one more of account 1: refused at the handshake (or answered `forbidden`)
    extra = ex.client(1)
    extra.send(type="ping")
    reply = extra.recv(1.0)
    assert reply is None or (reply["type"], reply["reason"]) == ("reject", "forbidden"), reply
    extra.close()
    rss_before = stats(ex)["rss_bytes"]

    # account 1's orders placed and canceled by the operator's ring: each ack and canceled is
    # a report to its four connections, none of which reads
    other = ex.client(2)
    acked_2 = 0
    for k in range(0, PAIRS, 500):
        ex.submit(order_pairs(1, k + 1, 500))
        # meanwhile account 2's orders are answered as always
        assert other.request(**order(10_000 + k, "ETH-PERP", "sell", "0.01", "3100"))[
            "type"] == "ack"
        acked_2 += 1
    wait_until(lambda: stats(ex)["dropped_sessions"] >= PER_ACCOUNT, WAIT_S,
               "the gateway to drop the sessions that do not read")
    st = stats(ex)
    assert st["limits"]["max_queued_messages"] == QUEUED
    assert st["rss_bytes"] - rss_before < 64 * 2 ** 20, (rss_before, st["rss_bytes"])
    # account 2 saw every reply, in order, and none of account 1's
    assert acked_2 == PAIRS // 500
    assert all(m.get("rid") for m in other.log) and len(other.log) == acked_2
    assert other.request(type="ping")["type"] == "pong"

    # a dropped session gets nothing more, even once it reads (what was queued before, at most)
    late = silent[0]
    late.sock.rcvhwm = 100_000
    got = late.reports(quiet_s=0.5)
    assert len(got) <= QUEUED + 2000, len(got)       # its queue plus the kernel's buffers
    late.send(type="ping")
    assert late.recv(0.5) is None
    # the client recovers by connecting again (the dropped sessions count no more)
    for c in silent:
        c.close()
    fresh = ex.client(1)
    wait_until(lambda: fresh.request(type="ping", timeout_s=1.0)["type"] == "pong", WAIT_S,
               "a new connection of account 1")
    assert fresh.request(type="open_orders")["orders"] == []
    assert fresh.request(type="cancel_all")["type"] == "done"
    wait_until(lambda: stats(ex)["sessions"] == 2, WAIT_S, "the stats to show 2 sessions")
    assert is_type("pong")(fresh.request(type="ping"))


def test_a_query_flood_costs_views_not_copies_and_orders_go_on(exchange):
    """Account 1 floods `account`, `open_orders` and `book` queries while account 2 trades:
    each view is built once per change (not per query) and account 2's orders are acked."""
    ex = exchange
    flooder, trader = ex.client(1), ex.client(2)
    assert flooder.request(**order(1, "BTC-PERP", "buy", "0.001", "60000"))["type"] == "ack"
    kinds = ("account", "open_orders", "book")
    sent = 0
    for k in range(40):
        for _ in range(25):
            flooder.send(type=kinds[sent % 3], market="BTC-PERP") if sent % 3 else \
                flooder.send(type="account")
            sent += 1
        ack = trader.request(**order(100 + k, "ETH-PERP", "sell", "0.01", f"{3100 + k}"))
        assert ack["type"] == "ack", ack
    replies = [flooder.wait_for(lambda m: "rid" in m) for _ in range(sent)]
    by_type = {}
    for m in replies:
        by_type[m["type"]] = by_type.get(m["type"], 0) + 1
    assert by_type == {"account_state": 334, "open_orders": 333, "book": 333}, by_type
    assert {m["balance"] for m in replies if m["type"] == "account_state"} == {"10000000"}
    assert all(len(m["orders"]) == 1 for m in replies if m["type"] == "open_orders")
    # account 1's views did not change: built once each; BTC's book did not change either
    wait_until(lambda: stats(ex)["view_hits"] >= sent - 5, WAIT_S, "the stats of the flood")
    st = stats(ex)
    assert st["view_builds"] <= 5 and st["connections"] == 2, st
