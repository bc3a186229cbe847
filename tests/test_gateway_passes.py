"""The compiled lane against its oracle, the Python pass (gateway/compiled_pass.py): one
matcher, gateway-0 on the lane, gateway-1 on the Python pass, every account connected to
both. Random order flow through either gateway (the lane's common case and what it defers
and hands over alike): each account's reports are the same messages, field for field, on
both gateways and after `replay`, and every reply is its report with the requester's rid."""

import os
import random
import signal
import time

import pytest

from engine.records import COMMAND_DTYPE
from perpx.bench.cpu import process_cpu_ns
from shm import names
from shm.ring import CommandRing
from tests.gateway_fixtures import WAIT_S, exchange_factory, wait_until  # noqa: F401
from tests.shm_workers import shm_prefix  # noqa: F401 — fixture: unique prefix, leak check

ACCOUNTS = (1, 2, 3)
STEPS = 400
# While its command ring is full, a gateway waits for the matcher rather than spinning on a
# ROUTER it cannot read: the matcher that frees the ring may share its CPU.
FULL_RING_WINDOW_S = 1.0
FULL_RING_MAX_CPU_SHARE = 0.25


def _request(rng: random.Random, cids: list) -> dict:
    """One request of the kinds a client sends most, and some the lane defers."""
    roll = rng.random()
    if cids and roll < 0.3:
        return {"type": "cancel", "cid": rng.choice(cids)}
    if cids and roll < 0.38:
        return {"type": "amend", "cid": rng.choice(cids),
                "qty": f"{rng.randint(1, 30) / 100:.2f}"}
    if roll < 0.41:
        return {"type": "cancel_all", "market": "ETH-PERP"}
    if roll < 0.44:
        return {"type": "new_order", "cid": rng.randint(1, 10 ** 6), "market": "ETH-PERP",
                "side": "buy", "qty": "0.015", "price": "3000"}          # off the lot grid
    cid = rng.randint(1, 10 ** 6)
    cids.append(cid)
    msg = {"type": "new_order", "cid": cid, "market": "ETH-PERP",
           "side": rng.choice(("buy", "sell")), "qty": f"{rng.randint(1, 30) / 100:.2f}",
           "price": f"{rng.randint(2990, 3010)}"}
    if rng.random() < 0.15:
        msg["tif"] = rng.choice(("post_only", "ioc"))
    return msg


def test_the_lane_and_the_python_pass_send_the_same_reports(exchange_factory):
    ex = exchange_factory(order_path="compiled")
    python = ex.start_gateway(index=1, source_index=2, order_path="python")
    traders = {(a, g): ex.client(a, endpoints=None if g == "lane" else python)
               for a in ACCOUNTS for g in ("lane", "python")}
    watchers = {(a, g): ex.client(a, endpoints=None if g == "lane" else python)
                for a in ACCOUNTS for g in ("lane", "python")}
    for cl in list(traders.values()) + list(watchers.values()):
        assert cl.request(type="ping")["type"] == "pong"
    rng = random.Random(20261206)
    cids = {a: [] for a in ACCOUNTS}
    replies = {a: [] for a in ACCOUNTS}
    for _ in range(STEPS):
        account = rng.choice(ACCOUNTS)
        reply = traders[account, rng.choice(("lane", "python"))].request(
            **_request(rng, cids[account]))
        replies[account].append(reply)
    for account in ACCOUNTS:
        last = max((m["account_seq"] for m in replies[account] if "account_seq" in m),
                   default=0)
        streams = {}
        for g in ("lane", "python"):
            w = watchers[account, g]
            seen = []
            wait_until(lambda: seen.extend(w.reports()) or
                       (seen and seen[-1].get("account_seq", 0) >= last) or last == 0,
                       WAIT_S, f"account {account}'s reports on the {g} gateway")
            streams[g] = seen
        # the whole stream, numbered without gaps, the same on both gateways
        assert [m["account_seq"] for m in streams["lane"]] == \
            list(range(1, len(streams["lane"]) + 1))
        assert streams["lane"] == streams["python"], account
        by_seq = {m["account_seq"]: m for m in streams["lane"]}
        # each reply that is a report is that report, with the requester's rid
        for reply in replies[account]:
            if "account_seq" in reply:
                assert {k: v for k, v in reply.items() if k != "rid"} == \
                    by_seq[reply["account_seq"]]
        # and `replay` from either gateway gives the same messages again
        for g in ("lane", "python"):
            w = watchers[account, g]
            w.send(type="replay", from_account_seq=0)
            got = []
            wait_until(lambda: got.extend(w.reports()) or
                       (got and got[-1]["type"] == "replayed"), WAIT_S, "the replay")
            assert got[:-1] == streams["lane"], (account, g)
    # the flow reached what the lane hands over: fills, Python-lane commands, edge rejects
    types = {m["type"] for a in ACCOUNTS for m in replies[a]}
    assert {"ack", "canceled", "amended", "done", "reject"} <= types, types


@pytest.mark.parametrize("order_path", ["compiled", "python"])
def test_a_full_command_ring_leaves_the_rest_in_the_router(exchange_factory, order_path):
    """With the matcher stopped, the gateway fills its command ring and reads no further:
    the rest waits in its ROUTER, nothing is answered, dropped or written twice, and the
    gateway sleeps meanwhile. Once the matcher runs again every request is answered once, in
    the order sent."""
    # the whole burst may queue for the test's client, however slowly it reads it
    ex = exchange_factory(order_path=order_path, max_queued_messages=100_000,
                          max_queued_bytes=64 << 20)
    trader = ex.client(ACCOUNTS[0])
    assert trader.request(type="ping")["type"] == "pong"
    ring = CommandRing.attach(names.command_ring(ex.prefix, "gateway-0"), COMMAND_DTYPE)
    try:
        count = ring.capacity + 500
        os.kill(ex.matcher.pid, signal.SIGSTOP)
        try:
            rids = [trader.send(type="cancel", cid=i + 1) for i in range(count)]
            wait_until(lambda: ring.available() == ring.capacity, WAIT_S,
                       "the command ring to fill")
            assert trader.recv(0.2) is None, "answered while the matcher was stopped"
            cpu_before_ns = process_cpu_ns(ex.gateway.pid)
            time.sleep(FULL_RING_WINDOW_S)     # a window to measure, not a wait for a condition
            cpu_share = (process_cpu_ns(ex.gateway.pid) - cpu_before_ns) / \
                (FULL_RING_WINDOW_S * 1e9)
            assert cpu_share < FULL_RING_MAX_CPU_SHARE, \
                f"the gateway spun on a full command ring: {cpu_share:.0%} of a CPU"
            assert ring.available() == ring.capacity
        finally:
            os.kill(ex.matcher.pid, signal.SIGCONT)
        replies = [trader.wait_for(lambda m: "rid" in m, what=f"reply {k} of {count}")
                   for k in range(count)]
    finally:
        ring.close()
    assert [m["rid"] for m in replies] == rids
    assert {(m["type"], m["reason"]) for m in replies} == {("reject", "unknown_order")}
    assert trader.recv(0.3) is None, "a request answered twice"
