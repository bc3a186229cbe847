"""Gateway sessions against hostile and careless clients (issue 14): a session is its
connection and its account, never a routing id alone; what a closed session was due is
dropped, never re-routed; cancel-on-disconnect comes after everything the session sent."""

import asyncio
import time

from engine.records import CMD_SET_ACCOUNT_STATE, new_commands
from perpx.client import AsyncClient, Client, RequestTimeout
from tests.gateway_fixtures import (WAIT_S, exchange,  # noqa: F401 — fixtures
                                    exchange_factory, is_type, order, wait_until)
from tests.shm_workers import shm_prefix  # noqa: F401 — fixture: unique prefix, leak check


def settled_open_orders(exchange, client) -> list:
    """The account's open orders once the matcher is quiet and the gateway has applied it all."""
    seq, _, _ = exchange.quiet_state()
    box = {}

    def caught_up():
        box["reply"] = client.request(type="open_orders")
        return box["reply"]["seq"] >= seq

    wait_until(caught_up, WAIT_S, "the gateway to apply every event")
    return box["reply"]["orders"]


def test_cancel_on_disconnect_covers_a_burst_in_flight(exchange):
    """20 rounds: a session opts in, sends a burst of orders and closes with most of them
    unread by the gateway; every order it got acked is canceled (reason disconnect)."""
    watcher = exchange.client(1)
    assert watcher.request(type="ping")["type"] == "pong"
    for round_ in range(20):
        a = exchange.client(1)
        assert a.request(type="hello", cancel_on_disconnect=True)["cancel_on_disconnect"]
        for k in range(150):
            a.send(**order(round_ * 1000 + k + 1, "BTC-PERP", "buy", "0.001",
                           f"{60000 + k}"))
        a.wait_for(is_type("ack"), WAIT_S, "the burst to be under way")
        a.close()
        assert settled_open_orders(exchange, watcher) == [], f"round {round_}"
    acked = {m["oid"] for m in watcher.log if m.get("type") == "ack"}
    canceled = {m["oid"] for m in watcher.log
                if m.get("type") == "canceled" and m.get("reason") == "disconnect"}
    assert len(acked) >= 20 and acked == canceled


def connect_with_id(exchange, account: int, routing_id: bytes):
    """A client with its own routing id, connected again until the gateway takes it: libzmq
    ignores a connection whose routing id is still held by a pipe it has not finished reading
    (ROUTER_HANDOVER off; it even takes the first message for the routing id)."""
    for _ in range(20):
        c = exchange.client(account, routing_id=routing_id)
        c.send(type="ping")
        if c.recv(0.5) is not None:
            return c
        c.close()
    raise AssertionError(f"routing id {routing_id!r} never became free")


def test_a_reused_routing_id_gets_nothing_of_the_old_session(exchange):
    """A session of account 1 with a routing id of its choosing closes mid-burst; a client of
    account 2 connects with the same routing id while account 1 keeps trading: it receives
    only the replies to its own requests."""
    trader = exchange.client(1)
    cid = 1
    rounds = attempts = 0
    while rounds < 5:
        attempts += 1
        assert attempts <= 20, "the routing id was never free for the new connection"
        old = connect_with_id(exchange, 1, b"shared-id")
        for _ in range(1000):
            old.send(**order(cid, "BTC-PERP", "buy", "0.001", "60000"))
            cid += 1
        old.wait_for(is_type("ack"), WAIT_S, "the burst to be under way")
        old.close()
        # a connection arriving meanwhile: the gateway learns of the disconnect while the old
        # connection's messages are still being read
        bystander = exchange.client(3)
        assert bystander.request(type="ping")["type"] == "pong"
        bystander.close()
        exchange.quiet_state()          # the old connection's messages are all read
        new = exchange.client(2, routing_id=b"shared-id", watch_handshake=True)
        new.wait_handshake()
        for _ in range(20):             # account 1's acks: reports to its sessions
            assert trader.request(**order(cid, "ETH-PERP", "sell", "0.01", "3300"))[
                "type"] == "ack"
            cid += 1
        assert trader.request(type="cancel_all")["type"] == "done"
        new.send(type="ping")
        first = new.recv(1.0)
        if first is None:
            assert new.log == []        # ignored by libzmq (connect_with_id): again
            new.close()
            continue
        assert new.log == [first] and first["type"] == "pong", f"round {rounds}: {new.log[:5]}"
        # and the new session is a session of account 2 like any other
        assert new.request(**order(1, "BTC-PERP", "buy", "0.001", "60000"))["type"] == "ack"
        assert new.request(type="cancel_all")["type"] == "done"
        new.close()
        rounds += 1


def account_state(account: int, disabled: int):
    c = new_commands(1)
    c["cmd"], c["account"], c["qty_lots"] = CMD_SET_ACCOUNT_STATE, account, disabled
    return c


def test_a_disabled_account_is_refused_and_its_sessions_closed(exchange):
    a, b = exchange.client(1), exchange.client(2)
    assert a.request(**order(1, "BTC-PERP", "buy", "0.001", "60000"))["type"] == "ack"
    exchange.submit(account_state(1, 1))            # the operator's journaled command
    note = a.wait_for(is_type("reject", reason="account_disabled"))
    assert "rid" not in note
    a.send(type="ping")
    assert a.recv(0.5) is None                      # its session is closed: nothing more
    refused = exchange.client(1)                    # its keys are refused at the handshake
    refused.send(type="ping")
    assert refused.recv(0.5) is None
    assert b.request(**order(2, "BTC-PERP", "buy", "0.001", "60000"))["type"] == "ack"
    exchange.submit(account_state(1, 0))
    again = exchange.client(1)
    assert again.request(type="ping")["type"] == "pong"
    # its order rested through it all (the CLI's --cancel-orders would have canceled it)
    assert [o["cid"] for o in again.request(type="open_orders")["orders"]] == [1]
    assert again.request(**order(3, "BTC-PERP", "buy", "0.001", "60000"))["type"] == "ack"


def test_the_client_library_says_hello_again_on_a_new_connection(exchange):
    """perpx.client's Client and AsyncClient opt in to cancel_on_disconnect; the gateway
    restarts on the same endpoint (its sessions forgotten) and both reconnect: orders placed
    on the new connections are canceled when the clients go, so each new session was told
    its hello again (and its answer is no report)."""
    ex = exchange
    orders = ex.endpoints["orders"]
    endpoints = {"orders": orders, "market_data": None,
                 "server_public_key": ex.server_public.decode()}

    def answers(ping) -> bool:
        try:
            return ping(timeout_s=0.5)["type"] == "pong"
        except RequestTimeout:
            return False

    async def answers_async(ping) -> bool:
        try:
            return (await ping(timeout_s=0.5))["type"] == "pong"
        except RequestTimeout:
            return False

    async def run():
        sync = Client.connect(endpoints, ex.certs[1], timeout_s=WAIT_S,
                              cancel_on_disconnect=True)
        aio = await AsyncClient.connect(endpoints, ex.certs[3], timeout_s=WAIT_S,
                                        cancel_on_disconnect=True)
        try:
            await asyncio.to_thread(ex.restart_gateway, kill=False, orders_endpoint=orders)
            wait_until(lambda: answers(sync.ping), WAIT_S, "the sync client to reconnect")
            deadline = time.monotonic() + WAIT_S
            while not await answers_async(aio.ping):
                assert time.monotonic() < deadline, "the asyncio client did not reconnect"
            assert sync.new_order("BTC-PERP", "buy", "limit", "0.001", "60000")["type"] == "ack"
            assert (await aio.new_order("BTC-PERP", "buy", "limit", "0.001", "60001"))[
                "type"] == "ack"
            assert not [m for m in sync.reports() + await aio.reports() if m["type"] == "hello"]
        finally:
            sync.close()
            await aio.close()

    asyncio.run(run())
    for account in (1, 3):
        assert settled_open_orders(ex, ex.client(account)) == [], account
