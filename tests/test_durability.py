"""Durability with real processes: durable acks, DuckDB rows, kill -9 of the matcher and of
persistd, a restart of the whole exchange, journal corruption, a failing journal write."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from perpx.client import Client
from perpx.launch import pid_alive
from persistd.journal import (HEADER_BYTES, RETIRED_DIR, journal_info, marked_synced_seq,
                              segment_name, segments)
from shm.progress import JournalProgress
from tests.durability_helpers import (Traders, assert_nothing_acknowledged_was_lost,
                                      durable_config, funded_account, sql_rows, wait_store)
from tests.test_supervisor import (WAIT_S, cli, cli_json, processes, store_pid, store_policies,
                                   wait_until)


def restarted(state_dir, name: str, old_pid: int, restarts: int = 1) -> dict:
    return wait_until(
        lambda: (lambda p: p if p["restarts"] == restarts and p["alive"] and p["pid"] != old_pid
                 and p["state"] == "ready" else None)(processes(state_dir)[name]),
        WAIT_S * 4, f"{name} to be restarted and ready")


def test_durable_acks_fills_in_duckdb_and_kill9_recovery(ups):
    up = ups("state", durable_config())
    endpoints = up.wait_ready()
    sd = up.sd
    maker, taker = funded_account(sd.path), funded_account(sd.path)
    traders = Traders(endpoints, maker, taker).start()
    wait_until(lambda: traders.count() >= 300, WAIT_S * 2, "300 acknowledged orders")

    # an ack is never ahead of the journal: what was acknowledged before we look is durable
    acked = max(seq for seq, _ in list(traders.acks))
    status = cli_json(sd.path, "status")
    assert status["durable_seq"] >= acked
    assert {p["name"] for p in status["processes"]} >= {"matcher", "persistd", "gateway-0"}
    # between its passes the store process announces its next one (store_flush_ms = 50), so
    # that the journal stops yielding its CPU to it shortly before
    progress = JournalProgress.attach(sd.prefix)
    try:
        wait_until(lambda: 0 < progress.store_quiet_until_ns() - time.monotonic_ns()
                   <= 50_000_000, WAIT_S, "the store process to announce its next pass")
    finally:
        progress.close()

    # kill -9 the matcher under load: it is restarted and rebuilds from snapshot + journal
    old = processes(sd.path)["matcher"]["pid"]
    os.kill(old, signal.SIGKILL)
    up.child_pids.add(restarted(sd.path, "matcher", old)["pid"])
    before = traders.count()
    wait_until(lambda: traders.count() >= before + 200, WAIT_S * 4, "trading to resume")

    # kill -9 persistd: restarted, it resumes at its cursor without duplicating rows
    old = processes(sd.path)["persistd"]["pid"]
    os.kill(old, signal.SIGKILL)
    up.child_pids.add(restarted(sd.path, "persistd", old)["pid"])
    before = traders.count()
    wait_until(lambda: traders.count() >= before + 200, WAIT_S * 4, "trading to resume")
    traders.stop()

    assert traders.fills, "the traders crossed but saw no fill"
    assert "recovered seq" in (sd.logs_dir / "matcher.log").read_text()
    assert_nothing_acknowledged_was_lost(sd.path, traders)
    check = cli_json(sd.path, "check")
    assert check["ok"], check["problems"]
    # snapshots were taken and old journal segments retired behind them
    assert cli_json(sd.path, "status")["journal"]["snapshot_seq"] > 0


_LOCK_HOLDER = """
import sys, duckdb
sys.stdin.readline()                  # go: the old store process is dead
con = duckdb.connect(sys.argv[1])     # the lock, as a store process on its way out holds it
print("locked", flush=True)
sys.stdin.readline()                  # release
con.close()
"""


def test_a_restarted_persistd_waits_for_the_store_lock_instead_of_dying(ups):
    """After a kill -9 of persistd the DuckDB file may still be locked by the store process it
    had (it dies with its parent, but not always at once): the new persistd waits for the
    lock, once, rather than failing and being restarted with a growing back-off."""
    up = ups("state", durable_config())
    endpoints = up.wait_ready()
    sd = up.sd
    certificate = funded_account(sd.path)
    persistd = processes(sd.path)["persistd"]["pid"]
    with open(f"/proc/{persistd}/task/{persistd}/children") as f:
        (store,) = [int(pid) for pid in f.read().split()]
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(sd.store_file)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        os.kill(store, signal.SIGKILL)
        os.kill(persistd, signal.SIGKILL)
        wait_until(lambda: not pid_alive(store), WAIT_S, "the old store process to be gone")
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "locked"
        log = sd.logs_dir / "persistd.log"
        wait_until(lambda: "waiting for the DuckDB store's lock" in log.read_text(), WAIT_S,
                   "the new persistd to wait for the lock")
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.wait(WAIT_S) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    up.child_pids.add(restarted(sd.path, "persistd", persistd)["pid"])   # restarted once
    with Client.connect(endpoints, certificate, timeout_s=WAIT_S) as client:
        ack = client.new_order("BTC-PERP", "buy", qty="0.001", price="60000")   # durable acks
    assert ack["type"] == "ack", ack
    assert processes(sd.path)["persistd"]["restarts"] == 1


def test_restart_of_the_whole_exchange_keeps_everything(ups):
    up = ups("state", durable_config())
    endpoints = up.wait_ready()
    sd = up.sd
    cert = funded_account(sd.path, 1_000_000)
    with Client.connect(endpoints, cert, timeout_s=WAIT_S) as c:
        ack = c.new_order("BTC-PERP", "buy", "limit", "0.010", "60000.0")
        assert ack["type"] == "ack" and ack["status"] == "open"
        balance = c.account()["balance"]
    seq = cli_json(sd.path, "status")["seq"]

    def data_and_file_bytes():
        path, _, _, data_bytes = journal_info(sd.journal_dir)["segments"][-1]
        return data_bytes, path.stat().st_size
    # persistd's zero filler keeps synced zeros ahead of the journal's data while it runs...
    wait_until(lambda: (lambda d, f: f > d)(*data_and_file_bytes()), WAIT_S,
               "zeroed space ahead of the journal's data")
    r = cli(sd.path, "down")
    assert r.returncode == 0, r.stderr
    assert up.wait_exit(60) == 0, up.stderr
    data_bytes, file_bytes = data_and_file_bytes()      # ...and a clean stop cuts it
    assert file_bytes == data_bytes

    # a segment retired (moved aside) just before a crash: the store process deletes it
    leftover = sd.journal_dir / RETIRED_DIR / segment_name(1)
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(bytes(4096))
    again = ups("state", durable_config())
    endpoints = again.wait_ready()
    assert "genesis" not in again.stderr.split("persistd ready")[-1]
    wait_until(lambda: not leftover.exists(), WAIT_S, "the store process to delete the "
                                                      "retired segment")
    with Client.connect(endpoints, cert, timeout_s=WAIT_S) as c:
        orders = c.open_orders()["orders"]
        assert [(o["oid"], o["price"], o["remaining"]) for o in orders] == \
            [(ack["oid"], "60000", "0.01")]
        assert c.account()["balance"] == balance
        nxt = c.new_order("BTC-PERP", "buy", "limit", "0.001", "60000.0")
        assert nxt["type"] == "ack" and nxt["seq"] == seq + 1
    wait_store(sd.path, seq + 1)
    rows = sql_rows(sd.path, f"SELECT oid, status FROM orders WHERE oid = {ack['oid']}")
    assert rows == [[ack["oid"], "open"]]


def _stopped_exchange_with_journal(ups, name: str, orders: int):
    up = ups(name, durable_config(snapshot_every=10 ** 9))
    endpoints = up.wait_ready()
    cert = funded_account(up.sd.path)
    with Client.connect(endpoints, cert, timeout_s=WAIT_S) as c:
        for i in range(orders):
            ack = c.new_order("ETH-PERP", "buy", "limit", "0.01", f"{3200 + i % 50}.00")
            assert ack["type"] == "ack", ack
            if i % 2:
                assert c.cancel(ack["oid"])["type"] == "canceled"
    assert cli(up.sd.path, "down").returncode == 0
    assert up.wait_exit(60) == 0
    return up


def test_torn_tail_past_the_synced_seq_is_repaired_and_verify_passes(ups):
    """Bytes after the last synced batch (a crash mid-write) are a torn tail: cut, loudly."""
    up = _stopped_exchange_with_journal(ups, "state", 50)
    sd = up.sd
    last_seq = journal_info(sd.journal_dir)["last_seq"]
    assert marked_synced_seq(sd.journal_dir) == last_seq
    path = segments(sd.journal_dir)[-1].path
    size = path.stat().st_size
    with open(path, "ab") as f:          # half a batch header: a write the crash interrupted
        f.write(path.read_bytes()[-HEADER_BYTES - 80:][:20])

    again = ups("state", durable_config(snapshot_every=10 ** 9))
    again.wait_ready()
    log = (sd.logs_dir / "persistd.log").read_text()
    assert "JOURNAL REPAIRED" in log
    assert journal_info(sd.journal_dir)["last_seq"] >= last_seq
    assert path.stat().st_size >= size
    r = cli(sd.path, "--json", "verify")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["checks"][-1]["ok"]


def test_damaged_durable_batch_stops_startup_with_one_line(ups):
    """A flipped byte in the last batch, which was synced (the marker says so): not a torn
    tail. `perpx up` stops with one line naming segment, offset and seq; DuckDB keeps its
    rows until the operator runs `perpx journal repair --yes`; then the exchange starts."""
    up = _stopped_exchange_with_journal(ups, "state", 50)
    sd = up.sd
    last_seq = journal_info(sd.journal_dir)["last_seq"]
    path = segments(sd.journal_dir)[-1].path
    offset = journal_info(sd.journal_dir)["segments"][-1][3] - HEADER_BYTES - 80
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF                     # inside the last batch (one record: seq last_seq)
    path.write_bytes(bytes(data))
    stored = sql_store_seq(sd)

    refused = ups("state", durable_config(snapshot_every=10 ** 9))
    assert refused.wait_exit(120) == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert path.name in lines[0] and f"byte {offset}" in lines[0] and \
        f"seq {last_seq}" in lines[0], lines[0]
    assert "Traceback" not in refused.stderr

    r = cli(sd.path, "journal", "inspect")
    assert r.returncode == 1 and "DAMAGE TO ACKNOWLEDGED HISTORY" in r.stdout, r.stdout
    r = cli(sd.path, "journal", "repair")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--yes" in r.stderr
    assert sql_store_seq(sd) == stored == last_seq       # nothing deleted without --yes
    r = cli(sd.path, "--json", "journal", "repair", "--yes")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["last_seq"] == last_seq - 1 and res["deleted_store_rows"] > 0
    assert sql_store_seq(sd) == last_seq - 1

    again = ups("state", durable_config(snapshot_every=10 ** 9))
    again.wait_ready()
    assert journal_info(sd.journal_dir)["last_seq"] >= last_seq - 1


def sql_store_seq(sd) -> int:
    """meta.last_seq of a stopped exchange's DuckDB file."""
    import duckdb
    con = duckdb.connect(str(sd.store_file), read_only=True)
    try:
        return int(con.execute("SELECT last_seq FROM meta").fetchall()[0][0])
    finally:
        con.close()


def test_corruption_mid_journal_fails_verify_clearly(ups):
    up = _stopped_exchange_with_journal(ups, "state", 300)
    sd = up.sd
    path = segments(sd.journal_dir)[0].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    r = cli(sd.path, "verify")
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "journal corrupt" in line and path.name in line, line


def test_failing_journal_write_stops_acks_until_it_recovers(ups):
    up = ups("state", durable_config())
    endpoints = up.wait_ready()
    sd = up.sd
    cert = funded_account(sd.path)
    persistd = processes(sd.path)["persistd"]["pid"]

    def journal_errno() -> int:
        return cli_json(sd.path, "status")["journal"]["journal_errno"]

    with Client.connect(endpoints, cert, timeout_s=WAIT_S) as c, \
            Client.connect(endpoints, cert, timeout_s=WAIT_S) as waiting, \
            ThreadPoolExecutor(1) as pool:
        assert c.new_order("BTC-PERP", "buy", "limit", "0.001", "60000.0")["type"] == "ack"
        # A real OS limit: persistd may not grow any file, so the next journal write fails.
        resource.prlimit(persistd, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
        # sequenced but not durable: its ack is held while the journal cannot be written
        held = pool.submit(waiting.new_order, "BTC-PERP", "buy", "limit", "0.001", "60000.1")
        wait_until(lambda: journal_errno() != 0, WAIT_S, "persistd to report the failing journal")
        reply = c.new_order("BTC-PERP", "buy", "limit", "0.001", "60000.2")
        assert reply["type"] == "reject" and reply["reason"] == "market_halted"
        assert "journal" in reply["message"]
        assert not held.done()
        resource.prlimit(persistd, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        wait_until(lambda: journal_errno() == 0, WAIT_S, "the journal to recover")
        # the retried write made it durable: the held ack comes, nothing was lost
        first = held.result(timeout=WAIT_S)
        assert first["type"] == "ack"
        ack = c.new_order("BTC-PERP", "buy", "limit", "0.001", "60000.3")
        assert ack["type"] == "ack"
        assert cli_json(sd.path, "status")["durable_seq"] >= ack["seq"] > first["seq"]
    r = cli(sd.path, "--json", "verify")
    assert r.returncode == 0, r.stdout + r.stderr


def test_sql_is_read_only(ups):
    up = ups("state", durable_config())
    up.wait_ready()
    for query in ("DELETE FROM fills", "CREATE TABLE x (a INT)", "SELECT 1; DROP TABLE fills",
                  "ATTACH 'other.duckdb'", "COPY fills TO 'out.csv'"):
        r = cli(up.sd.path, "sql", query)
        assert r.returncode == 1, query
        assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert cli_json(up.sd.path, "sql", "SELECT count(*) FROM fills")["rows"] == [[0]]
    tables = {r[0] for r in cli_json(up.sd.path, "sql", "SHOW TABLES")["rows"]}
    assert {"fills", "orders", "funding_payments", "liquidations", "balances"} <= tables


def test_a_backlog_makes_the_store_an_ordinary_process_until_it_caught_up(ups):
    """persistd/storer.py: a store pass that starts CATCH_UP_COMMANDS or more durable commands
    behind runs as an ordinary process (SCHED_OTHER, every thread): a full load leaves an
    idle-class process too little CPU for DuckDB to trail the fills by under a second. Caught
    up, it is idle-class again. The backlog is made by stopping the store (SIGSTOP) while
    resting orders go straight into gateway-0's command ring, as `perpx bench durability`
    writes them."""
    from engine.records import COMMAND_DTYPE
    from perpx.bench.durability import (ACCOUNTS, _Live, _write_sequenced, recovery_config,
                                        resting_orders)
    from perpx.bench.e2e import _funded_accounts
    from persistd.storer import CATCH_UP_COMMANDS
    from shm import names
    from shm.ring import CommandRing

    orders = CATCH_UP_COMMANDS + 1000
    up = ups("state", recovery_config(orders))
    up.wait_ready()
    sd = up.sd
    _funded_accounts(sd, ACCOUNTS, usdc="1000000000")
    accounts = sd.registered_accounts()[-ACCOUNTS:]
    start_seq = cli_json(sd.path, "status")["seq"]
    store = store_pid(processes(sd.path)["persistd"]["pid"])
    assert store_policies(store) == {os.SCHED_IDLE}
    os.kill(store, signal.SIGSTOP)
    try:
        ring = CommandRing.attach(names.command_ring(sd.prefix, "gateway-0"), COMMAND_DTYPE)
        live = _Live(sd)
        try:
            _write_sequenced(ring, live, resting_orders(orders, accounts, time.time_ns()),
                             start_seq)
        finally:
            live.close()
            ring.close()
        wait_until(lambda: cli_json(sd.path, "status")["durable_seq"] >= start_seq + orders,
                   WAIT_S * 2, "the orders to be journaled")
    finally:
        os.kill(store, signal.SIGCONT)
    log = sd.logs_dir / "persistd.log"
    wait_until(lambda: "as an ordinary process" in log.read_text(), WAIT_S,
               "the store to say it catches up as an ordinary process")
    wait_store(sd.path, start_seq + orders)
    wait_until(lambda: store_policies(store) == {os.SCHED_IDLE}, WAIT_S,
               "the store to be idle-class again once caught up")
    assert sql_rows(sd.path, f"SELECT count(DISTINCT oid) FROM orders WHERE seq > {start_seq}") \
        == [[orders]]
