"""Bounded resources per account and per gateway (issue 14 item 3): connections per account,
an outgoing limit per connection in messages and bytes (a client that does not read is dropped,
its connection shut down, and recovers by replay), the gateway's memory under its configured
bound, and another account unaffected; the counts in the gateway's stats file."""

import json
import subprocess
import sys

import numpy as np
import pytest

from engine.records import CMD_CANCEL, CMD_NEW_ORDER, new_commands
from gateway.memory import MESSAGE_OVERHEAD
from tests.gateway_fixtures import WAIT_S, Exchange, is_type, order, wait_until
from tests.gateway_fixtures import gateway_stats as stats
from tests.shm_workers import shm_prefix  # noqa: F401 — fixture: unique prefix, leak check

PER_ACCOUNT = 4
# Small, to be reached quickly (the config asks for at least 5000 messages and 1 MiB: one
# gateway pass may write 4096 messages to one connection before its client's reads are
# credited). QUEUED messages of ~200 bytes stay under the byte cap: the message limit drops.
QUEUED = 200
QUEUED_BYTES = 256 * 1024
PAIRS = 6000
DROP_QUEUE_FULL = "session dropped: its client does not read (queue full)"
DROP_BYTES = "session dropped: its client does not read (bytes queued)"
DROP_MEMORY = "session dropped: the gateway's memory bound (most bytes queued)"


def order_pairs(account: int, first_cid: int, n: int) -> np.ndarray:
    """n resting buys of `account` and their cancels, as the operator's ring takes them."""
    c = new_commands(2 * n)
    c["account"], c["market"] = account, 0
    c["cmd"][0::2], c["cmd"][1::2] = CMD_NEW_ORDER, CMD_CANCEL
    c["cid"][0::2] = c["cid"][1::2] = np.arange(first_cid, first_cid + n)
    c["price_ticks"][0::2], c["qty_lots"][0::2] = 600_000, 1
    return c


def start(ex, **options) -> None:
    ex.stats_file = ex.tmp / "gateway-0.stats.json"
    options = {"max_connections_per_account": PER_ACCOUNT, "max_queued_messages": QUEUED,
               "max_queued_bytes": QUEUED_BYTES, "stats_file": str(ex.stats_file), **options}
    ex.start_gateway(**options)


@pytest.fixture
def new_exchange(shm_prefix, tmp_path):
    """A matcher, and a gateway for start() to bring up."""
    ex = Exchange(shm_prefix, tmp_path)
    try:
        ex.start_matcher()
        yield ex
    finally:
        ex.close()


@pytest.fixture
def exchange(new_exchange):
    start(new_exchange)
    return new_exchange


def rss_of(pid: int) -> int:
    """The process's resident set, from /proc (not from its own report)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def answers(client, timeout_s: float = 0.5) -> bool:
    """A ping answered (messages sent while a connection goes down are lost with it)."""
    rid = client.send(type="ping")
    try:
        client.wait_for(lambda m: m.get("rid") == rid, timeout_s)
    except AssertionError:
        return False
    return True


def last_account_seq(client) -> int:
    replayed = client.request(type="replay", from_account_seq=2 ** 62)
    assert replayed["type"] == "replayed", replayed
    return replayed["last_account_seq"]


def silent_and_refused(ex, account: int) -> list:
    """PER_ACCOUNT connections of `account` that read nothing after their hello; one more is
    refused at the handshake (or answered `forbidden`)."""
    silent = []
    for _ in range(PER_ACCOUNT):
        c = ex.client(account, slow_reader=True)
        assert c.request(type="hello", cancel_on_disconnect=False)["account"] == account
        silent.append(c)
    extra = ex.client(account)
    extra.send(type="ping")
    reply = extra.recv(1.0)
    assert reply is None or (reply["type"], reply["reason"]) == ("reject", "forbidden"), reply
    extra.close()
    return silent


def flood_while_trading(ex, account: int, other, pairs: int, watch_pid: int,
                        first_cid: int = 1) -> int:
    """`pairs` orders and cancels of `account` through the operator's ring (an ack and a
    canceled each, to every connection of the account) while `other` trades; every reply of
    `other` is its ack. Returns the highest RSS of watch_pid seen meanwhile."""
    peak = 0
    for k in range(0, pairs, 500):
        ex.submit(order_pairs(account, first_cid + k, 500))
        reply = other.request(**order(first_cid + k, "ETH-PERP", "sell", "0.01", "3100"))
        assert reply["type"] == "ack", reply
        peak = max(peak, rss_of(watch_pid))
    return peak


def test_silent_connections_are_bounded_and_another_account_is_unaffected(exchange):
    ex = exchange
    silent = silent_and_refused(ex, 1)
    other = ex.client(2)
    flood_while_trading(ex, 1, other, PAIRS, ex.gateway.pid)
    wait_until(lambda: stats(ex)["dropped_sessions"] >= PER_ACCOUNT, WAIT_S,
               "the gateway to drop the sessions that do not read")
    st = stats(ex)
    assert st["limits"]["max_queued_messages"] == QUEUED
    assert st["refused_by_reason"][DROP_QUEUE_FULL] == PER_ACCOUNT, st["refused_by_reason"]
    # account 2 saw every reply, in order, and none of account 1's
    assert all(m.get("rid") for m in other.log) and len(other.log) == PAIRS // 500
    assert other.request(type="ping")["type"] == "pong"

    # a dropped connection is shut down: its libzmq reconnects, as a new session that gets
    # what it asks and the account's reports from then on, not what the old one missed
    late = silent[0]
    got = late.reports(quiet_s=0.5)
    assert len(got) <= QUEUED + 2000, len(got)       # its queue plus the kernel's buffers
    wait_until(lambda: answers(late), WAIT_S, "the dropped connection to come back")
    for c in silent[1:]:
        c.close()
    wait_until(lambda: stats(ex)["sessions"] == 2, WAIT_S, "the stats to show 2 sessions")
    assert late.request(type="open_orders")["orders"] == []
    assert late.request(type="cancel_all")["type"] == "done"
    assert is_type("pong")(late.request(type="ping"))


def test_a_client_over_the_byte_limit_is_dropped_and_recovers_by_replay(new_exchange):
    """One connection that never reads: dropped at max_queued_bytes (its message limit is far
    away), its libzmq reconnects, and `replay` gives it everything it missed."""
    ex = new_exchange
    start(ex, max_queued_messages=1_000_000, replay_keep=20_000)
    slow = ex.client(1, slow_reader=True)
    assert slow.request(type="hello", cancel_on_disconnect=False)["account"] == 1
    first = last_account_seq(slow)
    # one big batch: ~4 MB of acks and cancels (~300 bytes each, as counted) for a client
    # that takes a few kB
    ex.submit(order_pairs(1, 1, 6000))
    wait_until(lambda: stats(ex)["refused_by_reason"].get(DROP_BYTES) == 1, WAIT_S,
               "the gateway to drop the connection at its byte limit")
    st = stats(ex)
    assert st["dropped_sessions"] == 1 and DROP_QUEUE_FULL not in st["refused_by_reason"]
    assert st["memory"]["queued_bytes"] == 0        # its count went with it
    assert st["limits"]["max_queued_bytes"] == QUEUED_BYTES
    # what it was sent before the drop, at most the limit's worth (and the kernel's buffers)
    before = [m for m in slow.reports(quiet_s=0.5) if "account_seq" in m]
    assert 0 < len(before) < 12_000
    assert len(before) * (200 + MESSAGE_OVERHEAD) < 4 * QUEUED_BYTES + 2 ** 20, len(before)
    # the same socket: libzmq reconnected it; a new session asks for the rest
    wait_until(lambda: answers(slow), WAIT_S, "the dropped connection to come back")
    last = last_account_seq(slow)
    assert last == first + 12_000
    replayed = []
    start_at = first
    while True:
        rid = slow.send(type="replay", from_account_seq=start_at)
        while True:
            m = slow.wait_for(lambda m: m.get("rid") == rid or "account_seq" in m)
            if m.get("type") == "replayed":
                break
            replayed.append(m)
        if not m["more"]:
            break
        start_at = m["last_account_seq"]
    assert [m["account_seq"] for m in replayed] == list(range(first + 1, last + 1))
    # the reports it got live are the replayed ones, field for field
    by_seq = {m["account_seq"]: m for m in replayed}
    assert all(by_seq[m["account_seq"]] == m for m in before)
    assert [m["type"] for m in replayed[:2]] == ["ack", "canceled"]


def test_silent_connections_keep_the_gateway_under_its_memory_bound(new_exchange):
    """A gateway whose memory limit leaves it 16 MB above what it needs to run, per-connection
    limits far above that: as silent connections of two accounts queue up, the memory bound
    drops the largest (only as many as it must), RSS (from /proc) stays under the limit
    throughout, what it holds stays under what the limit leaves, another account trades on."""
    ex = new_exchange
    start(ex, max_queued_messages=1_000_000, max_queued_bytes=1 << 30)
    limit_mb = (stats(ex)["memory"]["base_bytes"] >> 20) + 16
    ex.restart_gateway(kill=False, max_connections_per_account=PER_ACCOUNT,
                       max_queued_messages=1_000_000, max_queued_bytes=1 << 30,
                       memory_limit_mb=limit_mb, stats_file=str(ex.stats_file))
    wait_until(lambda: stats(ex)["pid"] == ex.gateway.pid, WAIT_S, "the new gateway's stats")
    silent = silent_and_refused(ex, 1) + silent_and_refused(ex, 3)
    other = ex.client(2)
    peak = 0
    for k in range(4):        # ~3 MB to each connection a round
        for account in (1, 3):
            peak = max(peak, flood_while_trading(ex, account, other, 3000, ex.gateway.pid,
                                                 first_cid=1 + 10_000 * (2 * k + account // 3)))
        if stats(ex)["dropped_sessions"] >= 2:
            break
    wait_until(lambda: stats(ex)["dropped_sessions"] >= 2, WAIT_S,
               "the memory bound to drop silent connections")
    st = stats(ex)
    drops = {r for r in st["refused_by_reason"] if r.startswith("session dropped")}
    assert drops == {DROP_MEMORY}, st["refused_by_reason"]
    assert st["refused_by_reason"][DROP_MEMORY] == st["dropped_sessions"] < len(silent)
    limit = limit_mb << 20
    mem = st["memory"]
    assert mem["limit_bytes"] == limit and mem["accounted_bytes"] <= mem["headroom_bytes"], mem
    assert peak < limit and rss_of(ex.gateway.pid) < limit, (peak >> 20, limit_mb)
    assert all(m.get("rid") for m in other.log)
    assert other.request(type="ping")["type"] == "pong"


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


def test_gateway_refuses_a_spec_without_its_limits(tmp_path):
    """The gateway takes its limits from exchange.json as `perpx up` resolved them
    (perpx/config.py is their one home): a spec that lacks one is refused by name, at once,
    without a traceback and before anything is attached."""
    from perpx.config import load_config
    doc = {**load_config().to_dict(), "prefix": "/perpx-no-such-exchange",
           "state_dir": str(tmp_path),
           "sources": [{"name": "gateway-0", "privileged": False, "capacity": 1024}],
           "consumers": ["gateway-0"]}
    del doc["exchange"]["max_queued_bytes"]
    spec = tmp_path / "exchange.json"
    spec.write_text(json.dumps(doc))
    done = subprocess.run([sys.executable, "-m", "gateway", "--spec", str(spec), "--index", "0",
                           "--server-key", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "lacks max_queued_bytes" in done.stderr and "Traceback" not in done.stderr
