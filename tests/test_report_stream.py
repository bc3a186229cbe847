"""The report stream per account with real processes (`perpx up`, durable acks): account_seq
gap-free and identical from two gateways and after an exchange restart; kill -9 of the
gateway under traffic, after which the client library's replays have delivered every fill in
DuckDB to its owner and every request has an outcome (PROTOCOL.md, "Report sequence and
replay")."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading

import zmq

from gateway.replay import DurableSource
from perpx.client import AsyncClient, Client, ClientError, RequestLost
from tests.durability_helpers import funded_account, sql_rows, wait_store
from tests.test_supervisor import WAIT_S, cli_json, config_text, processes, wait_until

CONFIG = config_text(gateways=2, ack_mode="durable", extra="""
[persistence]
store_flush_ms = 50
""")


def account_of(client: Client) -> int:
    return client.account()["account"]


def gateway_endpoints(sd, index: int, endpoints: dict) -> dict:
    """The endpoints document with gateway-`index`'s order endpoint."""
    own = json.loads((sd.run_dir / f"gateway-{index}.json").read_text())
    return {**endpoints, "orders": own["orders"]}


def fills_in_store(sd, account: int) -> set[tuple[int, str]]:
    rows = sql_rows(sd.path, f"SELECT trade_id, taker_account, maker_account FROM fills "
                             f"WHERE taker_account = {account} OR maker_account = {account}")
    out = set()
    for trade_id, taker, maker in rows:
        if taker == account:
            out.add((trade_id, "taker"))
        if maker == account:
            out.add((trade_id, "maker"))
    return out


def stream_key(msg: dict) -> tuple:
    """What identifies a report (everything but the connection's rid)."""
    return tuple(sorted((k, json.dumps(v)) for k, v in msg.items() if k != "rid"))


def cross(maker: Client, taker: Client, n: int, price: str = "65000") -> None:
    for _ in range(n):
        assert maker.new_order("BTC-PERP", "sell", "limit", "0.001", price)["type"] == "ack"
        assert taker.new_order("BTC-PERP", "buy", "limit", "0.001", price,
                               tif="ioc")["type"] == "ack"


def test_account_seq_same_from_two_gateways_and_after_a_restart(ups):
    up = ups("state", CONFIG)
    endpoints = up.wait_ready()
    sd = up.sd
    maker_cert, taker_cert = funded_account(sd.path), funded_account(sd.path)
    maker = Client.connect(endpoints, maker_cert, timeout_s=WAIT_S)
    taker = Client.connect(gateway_endpoints(sd, 1, endpoints), taker_cert, timeout_s=WAIT_S)
    try:
        assert maker.last_account_seq == 0          # a new account: nothing reported yet
        cross(maker, taker, 30)
        maker.cancel_all()
        assert taker.withdraw("1")["type"] == "done"
        assert taker.cancel(cid=12345)["reason"] == "unknown_order"
        live = maker.reports(1.0)
        wait_until(lambda: maker.sync() == 61, WAIT_S, "the maker's 30 acks, 30 fills, done")
        live += maker.reports()
        seqs = [m["account_seq"] for m in live]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
        # the whole stream again, from each gateway: the same reports, the same numbers
        replays = []
        for index in (0, 1):
            for cert in (maker_cert, taker_cert):
                c = Client.connect(gateway_endpoints(sd, index, endpoints), cert,
                                   timeout_s=WAIT_S, from_account_seq=0)
                try:
                    c.sync()
                    replays.append([stream_key(m) for m in c.reports()])
                finally:
                    c.close()
        assert replays[0] == replays[2] and replays[1] == replays[3]

        async def replay_async():
            c = await AsyncClient.connect(endpoints, maker_cert, timeout_s=WAIT_S,
                                          from_account_seq=0)
            try:
                return [stream_key(m) for m in await c.reports()]
            finally:
                await c.close()
        assert asyncio.run(replay_async()) == replays[0]
        assert len(replays[0]) == 61 and len(replays[1]) == 62
        # live copies carried the same fields (the replies' rid aside)
        assert {stream_key(m) for m in live} <= set(replays[0])
        types = [dict(k)["type"] for k in replays[1]]
        assert types.count('"done"') == 1 and types.count('"reject"') == 1
        account = account_of(taker)
    finally:
        maker.close()
        taker.close()
    before = replays
    up.close()

    # the exchange restarts: gateways remember nothing, replays come from DuckDB
    up = ups("state", CONFIG)
    endpoints = up.wait_ready()
    again = []
    for cert in (maker_cert, taker_cert):
        c = Client.connect(gateway_endpoints(sd, 1, endpoints), cert, timeout_s=WAIT_S,
                           from_account_seq=0)
        try:
            again.append([stream_key(m) for m in c.reports(0.5)])
            if cert == taker_cert:   # and numbering goes on where it stopped
                ack = c.new_order("BTC-PERP", "buy", "limit", "0.001", "60000")
                assert ack["account_seq"] == 63
                assert len(fills_in_store(sd, account)) == 30
        finally:
            c.close()
    assert again == before[:2]


def test_the_durable_source_wakes_the_gateway_after_each_answer(ups):
    """A replay the gateway's memory no longer holds is answered from DuckDB by the durable
    source's worker thread, against persistd's real SQL socket; the gateway may be asleep in
    its poll meanwhile, so the worker calls its wake (the gateway's doorbell) once the answer
    is in `done`."""
    up = ups("state", CONFIG)
    endpoints = up.wait_ready()
    sd = up.sd
    trader = Client.connect(endpoints, funded_account(sd.path), timeout_s=WAIT_S)
    try:
        for i in range(5):
            assert trader.new_order("BTC-PERP", "buy", "limit", "0.001",
                                    str(60000 + i))["type"] == "ack"
        account = account_of(trader)
    finally:
        trader.close()
    query = f"SELECT account_seq FROM reports WHERE account = {account}"
    wait_until(lambda: len(sql_rows(sd.path, query)) == 5, WAIT_S, "five reports in DuckDB")
    woken = threading.Event()
    source = DurableSource(f"ipc://{sd.sql_socket}", zmq.Context.instance(), woken.set)
    try:
        source.ask({"account": account, "from": 1, "upto": 5, "max": 100})
        assert woken.wait(WAIT_S), "the worker answered without waking the gateway"
        job = source.done.popleft()
        assert "error" not in job, job
        assert [row[0] for row in job["rows"]] == [2, 3, 4, 5]
    finally:
        source.close()


def test_kill9_of_the_gateway_under_traffic(ups):
    """Two traders on gateway-0 while it is killed twice (and persistd once, so the reports
    table is numbered again from a snapshot and the journal): afterwards each has received every
    fill DuckDB holds for its account, once, in account_seq order without gaps, and every
    request it made has an outcome (a reply, one found by replay, or RequestLost for one
    never sequenced, which DuckDB confirms)."""
    up = ups("state", CONFIG)
    endpoints = up.wait_ready()
    sd = up.sd
    certs = (funded_account(sd.path), funded_account(sd.path))
    got: dict[int, list] = {0: [], 1: []}
    outcomes = {"reply": 0, "resolved": 0, "lost": []}
    replied: dict[int, list] = {0: [], 1: []}    # account_seq of the replies (not reports)
    stop = threading.Event()
    errors = []
    clients = [Client.connect(endpoints, cert, timeout_s=3.0, on_report=got[i].append,
                              connect_timeout_s=30) for i, cert in enumerate(certs)]
    accounts = [account_of(c) for c in clients]
    sent = []

    def outcome(call, c, cid):
        """The request's outcome (its reply, or what the replay found), None if it was never
        sequenced (RequestLost: only new orders are checked against DuckDB for that)."""
        try:
            reply = call()
        except RequestLost:
            if cid is not None:
                outcomes["lost"].append((c, cid))
            return None
        outcomes["resolved" if reply.get("rid") is None else "reply"] += 1
        if "account_seq" in reply:
            replied[clients.index(c)].append(reply["account_seq"])
        return reply

    def trade():
        price = 650000
        try:
            while not stop.is_set():
                price = 650000 + (price - 650000 + 1) % 50
                p = f"{price // 10}.{price % 10}"
                for c, side, tif in ((clients[0], "sell", "gtc"), (clients[1], "buy", "ioc")):
                    cid = c.next_cid()
                    sent.append((c, cid))
                    reply = outcome(lambda: c.new_order("BTC-PERP", side, "limit", "0.001", p,
                                                        tif=tif, cid=cid), c, cid)
                    if reply is not None:
                        assert reply["type"] in ("ack", "reject") and reply["cid"] == cid
                # now and then an order far from the market, canceled by cid, and a
                # cancel_all: their outcomes, too, must come (by reply or by replay)
                if price % 10 == 0:
                    maker = clients[0]
                    cid = maker.next_cid()
                    sent.append((maker, cid))
                    if outcome(lambda: maker.new_order("BTC-PERP", "sell", "limit", "0.001",
                                                       "70000", cid=cid), maker, cid):
                        reply = outcome(lambda: maker.cancel(cid=cid), maker, None)
                        assert reply is None or (reply["type"], reply["cid"]) in (
                            ("canceled", cid), ("reject", cid)), reply
                    reply = outcome(lambda: clients[1].cancel_all(), clients[1], None)
                    assert reply is None or reply["type"] == "done", reply
                c.reports()
        except (ClientError, AssertionError) as e:
            errors.append(e)

    thread = threading.Thread(target=trade, daemon=True)
    thread.start()
    try:
        for name, restarts in (("gateway-0", 1), ("persistd", 1), ("gateway-0", 2)):
            start = len(sent)
            wait_until(lambda: len(sent) > start + 100, WAIT_S * 2, "orders under traffic")
            os.kill(processes(sd.path)[name]["pid"], signal.SIGKILL)
            wait_until(lambda: processes(sd.path)[name]["restarts"] == restarts,
                       WAIT_S * 2, f"{name} to be restarted")
            wait_until(lambda: processes(sd.path)[name]["state"] == "ready",
                       WAIT_S * 2, f"{name} to be ready again")
        start = len(sent)
        wait_until(lambda: len(sent) > start + 100 or errors, WAIT_S * 2,
                   "trading after the kills")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    try:
        status = cli_json(sd.path, "status")
        wait_store(sd.path, status["seq"])
        for i, c in enumerate(clients):
            c.sync()
            c.reports()
            fills = {(m["trade_id"], m["liquidity"]) for m in got[i] if m["type"] == "fill"}
            stored = fills_in_store(sd, accounts[i])
            assert stored and fills == stored, (i, len(fills), len(stored))
            seqs = [m["account_seq"] for m in got[i] if "account_seq" in m]
            # reports delivered in order, each once; replies (with rid) fill the rest
            assert seqs == sorted(set(seqs))
            # the stream ends at the last report or reply, whichever came last
            assert c.last_account_seq == max(seqs + replied[i])
        # the durable stream: per account 1..N, each once
        for account, n, top, distinct in sql_rows(
                sd.path, "SELECT account, count(*), max(account_seq), "
                         "count(DISTINCT account_seq) FROM reports GROUP BY account"):
            assert n == top == distinct, (account, n, top, distinct)
            if account in accounts:
                assert top == clients[accounts.index(account)].last_account_seq
        # RequestLost means never sequenced
        for c, cid in outcomes["lost"]:
            rows = sql_rows(sd.path, f"SELECT count(*) FROM orders WHERE cid = {cid}")
            assert rows[0][0] == 0, f"cid {cid} was reported lost but is in DuckDB"
        print(f"report stream under kill -9: {outcomes['reply']} replies, "
              f"{outcomes['resolved']} resolved by replay, {len(outcomes['lost'])} never "
              f"sequenced, {sum(len(v) for v in got.values())} reports delivered")
        assert outcomes["reply"] > 200
    finally:
        for c in clients:
            c.close()
