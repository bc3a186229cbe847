"""Shared by the durability and chaos tests: a durable exchange, traders that remember every
acknowledgement and fill they were sent, and the checks that nothing acknowledged was lost."""

from __future__ import annotations

import json
import threading

from perpx.client import Client, ClientError
from persistd.journal import journal_info, read_journal
from tests.test_supervisor import WAIT_S, cli, cli_json, config_text, wait_until

SQL_WAIT_S = 30.0


def durable_config(snapshot_every: int = 400) -> str:
    """Durable acks, small snapshots (so tests cross snapshot + journal retirement)."""
    return config_text(ack_mode="durable", extra=f"""
[persistence]
snapshot_every = {snapshot_every}
snapshots_keep = 2
store_flush_ms = 50
""")


def funded_account(state_dir, usdc: int = 10_000_000) -> str:
    return cli_json(state_dir, "account", "create", "--deposit", str(usdc))["certificate"]


class Traders:
    """Two accounts crossing small BTC-PERP orders in a background thread.

    Remembers what the exchange acknowledged: every ack (seq, cid) and every fill (trade_id,
    seq) a client received. Requests that time out or fail while a process restarts are
    simply not counted: the exchange owes nothing for what it did not acknowledge.
    """

    def __init__(self, endpoints: dict, maker_cert: str, taker_cert: str):
        self.endpoints = endpoints
        self.certs = (maker_cert, taker_cert)
        self.acks: list[tuple[int, int]] = []       # (seq, cid)
        self.fills: dict[int, int] = {}             # trade_id -> seq
        self.rejects: list[dict] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()

    def _record(self, msg: dict) -> None:
        with self._lock:
            if msg.get("type") == "fill":
                self.fills[msg["trade_id"]] = msg["seq"]

    def _run(self) -> None:
        maker = taker = None
        price = 650000
        while not self._stop.is_set():
            try:
                if maker is None:
                    maker = Client.connect(self.endpoints, self.certs[0], timeout_s=2.0,
                                           on_report=self._record, connect_timeout_s=30)
                    taker = Client.connect(self.endpoints, self.certs[1], timeout_s=2.0,
                                           on_report=self._record, connect_timeout_s=30)
                price = 650000 + (price - 650000 + 1) % 50
                p = f"{price // 10}.{price % 10}"
                for client, side, tif in ((maker, "sell", "gtc"), (taker, "buy", "ioc")):
                    reply = client.new_order("BTC-PERP", side, "limit", "0.001", p, tif=tif)
                    if reply["type"] == "ack":
                        with self._lock:
                            self.acks.append((reply["seq"], reply["cid"]))
                    else:
                        self.rejects.append(reply)
                maker.reports()
                taker.reports()
            except ClientError:
                self.errors += 1
                for c in (maker, taker):
                    if c is not None:
                        c.close()
                maker = taker = None
        for c in (maker, taker):
            if c is not None:
                c.reports(0.2)
                c.close()

    def start(self) -> Traders:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.acks)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


def journaled_commands(state_dir) -> dict[int, tuple[int, int]]:
    """seq -> (account, cid) of every command in the journal."""
    from perpx.statedir import StateDir
    out = {}
    directory = StateDir(state_dir).journal_dir
    for records in read_journal(directory, from_seq=journal_info(directory)["first_seq"]):
        cmd = records["command"]
        for seq, account, cid in zip(records["seq"].tolist(), cmd["account"].tolist(),
                                     cmd["cid"].tolist()):
            out[seq] = (account, cid)
    return out


def sql_rows(state_dir, query: str) -> list:
    return cli_json(state_dir, "sql", query)["rows"]


def wait_store(state_dir, seq: int) -> None:
    wait_until(lambda: (cli_json(state_dir, "status")["journal"] or {}).get("store_seq", 0)
               >= seq, SQL_WAIT_S, f"DuckDB to reach seq {seq}")


def assert_nothing_acknowledged_was_lost(state_dir, traders: Traders) -> None:
    """Every ack is in the journal (same cid at its seq), every fill is in DuckDB, no row twice,
    and the live state equals a clean replay of the journal."""
    status = cli_json(state_dir, "status")
    wait_until(lambda: cli_json(state_dir, "status")["durable_seq"] >= status["seq"], WAIT_S,
               "the journal to catch up")
    journal = journaled_commands(state_dir)
    assert sorted(journal) == list(range(min(journal), max(journal) + 1)), "journal has gaps"
    for seq, cid in traders.acks:
        assert seq in journal, f"acknowledged seq {seq} is not in the journal"
        assert journal[seq][1] == cid, f"journal seq {seq} holds cid {journal[seq][1]}, ack {cid}"
    wait_store(state_dir, max(journal))
    trade_ids = {r[0] for r in sql_rows(state_dir, "SELECT trade_id FROM fills")}
    missing = set(traders.fills) - trade_ids
    assert not missing, f"fills sent to clients but not in DuckDB: {sorted(missing)[:10]}"
    dup = sql_rows(state_dir, "SELECT count(*) - count(DISTINCT trade_id) FROM fills")[0][0]
    assert dup == 0, f"{dup} duplicate fills rows"
    dup = sql_rows(state_dir, "SELECT count(*) FROM (SELECT seq, oid, status, reason, qty, "
                              "count(*) c FROM orders GROUP BY ALL HAVING c > 1)")[0][0]
    assert dup == 0, f"{dup} duplicate orders rows"
    r = cli(state_dir, "--json", "verify")
    assert r.returncode == 0, f"perpx verify failed: {r.stdout}{r.stderr}"
    checks = json.loads(r.stdout)["checks"]
    assert any(c["at"] == "live" and c["ok"] for c in checks), checks
