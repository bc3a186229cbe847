"""persistd: the journal that acknowledgements wait for, and everything written behind it.

Three threads, each with one job:

journal (the main thread)
    Reads the event ring as consumer `persistd`, appends the sequenced commands (EV_COMMAND
    events) to the journal, fsyncs once per pass (group commit: everything the matcher
    published since the last pass goes in one write and one fsync), publishes `durable_seq`
    (shm/progress.py) and wakes the gateways, which release acks and fills up to it. Only
    then does it advance its ring cursor, so a persistd killed at any point re-reads what it
    had not made durable; commands at or below the journal's last seq are skipped, so nothing
    is journaled twice. A failing write (disk full) sets `journal_errno`, which makes the
    gateways refuse new orders; the pass is retried until the write succeeds. With durable
    acks a pass starts as soon as events arrive; with fast acks (nobody waits) every
    FAST_PASS_S on a timer, without waking the gateways.
store
    Follows the journal with a replica of the matcher (persistd/replica.py) and writes the
    replica's events to DuckDB (persistd/store.py) in batches: it wakes every `flush_s`,
    applies the journal batches queued meanwhile (each in its own replica call) and writes
    their rows in one transaction.
    Each report to an account among the events gets its row in the `reports` table, keyed
    by (account, account_seq) as engine/reports.py numbers them from the replica's counters:
    the durable source a gateway replays from once its own memory no longer holds a report.
    Every `snapshot_every` commands it writes a snapshot of the replica's tables (the live
    matcher never pauses for one) and then retires journal segments older than the oldest
    snapshot kept. On start it rebuilds the replica from the newest snapshot at or below the
    store's last seq and replays the journal from there, writing only rows the store lacks.
sql
    Answers `perpx sql` on a local ZeroMQ socket with read-only queries (the store refuses
    anything else), and records operator commands in admin_log ({"admin_log": row}, from
    perpx.durability.record_admin); persistd holds DuckDB's write connection, so nobody else
    opens the file.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import sys
import threading
import time

import msgpack
import numpy as np

from engine.records import (EV_COMMAND, EV_FUNDING, EV_LIQUIDATION, EV_TRADE, EVENT_DTYPE,
                            COMMAND_EVENT_WORD, MARGIN_CROSS, TRADE_EVENT_DTYPE)
from engine.reports import number_events
from engine.spec import ExchangeSpec, load_spec
from persistd import snapshot
from persistd.journal import JournalWriter, journal_records
from persistd.replica import Replica
from persistd.store import BALANCE_ROW_DTYPE, REPORT_ROW_DTYPE, ReadOnlyViolation, Store
from shm import names
from shm.progress import JournalProgress
from shm.ring import EventRing
from shm.wait import shared_cpu_wait

READ_BATCH = 1 << 14
COMMAND_IN_EVENT_BYTE = COMMAND_EVENT_WORD * 8   # EV_COMMAND: where the command record starts
STORE_NICE = 10
FAST_NICE = 5
# 10 ms passes cost ~3x less journal CPU per command but, in 3 alternating unpaced e2e pairs,
# left the order path at 18.9k orders/s against 20.7k with 2 ms (cause not found): keep 2 ms.
FAST_PASS_S = 0.002
RETRY_S = 0.5
# One DuckDB thread: a second one only hands each ~100 ms batch between threads (~20-25% more
# CPU per write), and the other core belongs to the order path. `perpx sql` queries get one too.
STORE_CONFIG = {"threads": 1}
# Event types after which _fill_balances has balance rows to read (indexed by etype).
MOVES_BALANCE = np.zeros(256, bool)
MOVES_BALANCE[[EV_TRADE, EV_LIQUIDATION, EV_FUNDING]] = True


def log(msg: str) -> None:
    try:
        print(f"persistd: {msg}", file=sys.stderr, flush=True)
    except OSError:
        pass     # the log may sit on the disk that is full: losing a line beats dying of it


def report_rows(events: np.ndarray, account_seqs: np.ndarray) -> np.ndarray:
    """`reports` rows for the reports among `events` (whole commands), numbered from
    account_seqs (advanced in place)."""
    found = number_events(events, account_seqs)
    rows = np.zeros(len(found), REPORT_ROW_DTYPE)
    if len(found):
        raw = events.view(np.uint8).reshape(len(events), -1)
        rows["seq"] = events["seq"][found["event"]]
        rows["account_seq"] = found["account_seq"]
        rows["account"] = found["account"]
        rows["idx"] = found["index"]
        rows["role"] = found["role"]
        rows["command"] = raw[found["command"], COMMAND_IN_EVENT_BYTE:]
        rows["event"] = raw[found["event"]]
    return rows


class Persistd:
    def __init__(self, spec: ExchangeSpec, *, snapshot_every: int = 1_000_000,
                 snapshots_keep: int = 2, flush_s: float = 0.1, retire_journal: bool = True):
        self.cfg = spec.engine
        self.sd = spec.layout
        self.prefix = spec.prefix
        self.privileged_sources = np.array([s.privileged for s in spec.sources]
                                           + [False] * (256 - len(spec.sources)))
        self.markets = list(spec.markets)
        self.fast_acks = spec.ack_mode == "fast"
        self.snapshot_every = snapshot_every
        self.snapshots_keep = snapshots_keep
        self.flush_s = flush_s
        self.retire_journal = retire_journal
        self.stopping = threading.Event()    # asked to stop: drain the ring, then stop
        self.stop = threading.Event()        # the threads stop
        self.failed: BaseException | None = None
        self.store_error: Exception | None = None
        self._records = queue.SimpleQueue()
        self._retire_through = 0

        self.progress = JournalProgress.attach(self.prefix)
        self.journal = None
        self.progress.set_durable_seq(self._writer().last_seq)
        self._forget_beyond_journal()
        # Durable acks: the journal thread waits for events on a CPU it shares (on 2 cores with
        # riskd, the supervisor and its own store thread): spinning takes it from them.
        self.events = EventRing.attach(names.event_ring(self.prefix), EVENT_DTYPE,
                                       wait=shared_cpu_wait)
        saved = self.events.consumer_cursor("persistd") is not None
        self.consumer = self.events.consumer("persistd", start="saved" if saved else "current")
        self.store = Store(self.sd.store_file, self.markets, config=STORE_CONFIG)
        if self.store.last_seq > self.journal.last_seq:
            log(f"removing DuckDB rows past the journal's end (seq {self.journal.last_seq}; "
                f"the store had seq {self.store.last_seq}): they were cut with the journal tail")
            self.store.forget_after(self.journal.last_seq)
        self.progress.set_store_seq(self.store.last_seq)
        self.progress.set_pid(os.getpid())    # ready: the supervisor waits for this

    def _forget_beyond_journal(self) -> None:
        """A repaired (cut) journal tail: snapshots and rows past its end describe commands
        that are no longer in the journal, so they go too (loudly)."""
        last = self.journal.last_seq
        for seq, path in snapshot.snapshots(self.sd.snapshots_dir):
            if seq > last:
                log(f"removing snapshot {path.name}: it is past the journal's end (seq {last})")
                path.unlink()

    # -- journal thread -------------------------------------------------------------------
    def run(self) -> None:
        threads = [threading.Thread(target=self._guard, args=(self._store_loop,), name="store"),
                   threading.Thread(target=self._guard, args=(self._sql_loop,), name="sql")]
        for t in threads:
            t.start()
        try:
            if self.fast_acks:
                # Nobody waits for the journal: let the gateways have the CPU, and write
                # bigger groups (one pass, one write, one fsync per FAST_PASS_S at most).
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FAST_NICE)
            while not self.stopping.is_set() and not self.stop.is_set():
                started = time.monotonic()
                consumed = self.journal_pass()
                if self.fast_acks:
                    # On a timer, not the doorbell: the matcher never has to ring persistd.
                    self.stop.wait(max(0.0, FAST_PASS_S - (time.monotonic() - started)))
                elif not consumed:
                    self.consumer.wait(1, timeout_s=0.05)
                if self._retire_through:
                    self._retire()
            # Stopping (the supervisor stops the matcher first): journal what is left.
            while not self.stop.is_set() and self.journal_pass():
                pass
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=30)
        if self.failed is not None:
            raise self.failed

    def journal_pass(self) -> int:
        """Journal what the ring holds; returns how many events were consumed."""
        head, tail = self.consumer.peek_views(READ_BATCH)
        n = len(head) + len(tail)
        if not n:
            return 0
        records = journal_records((head, tail), self.privileged_sources)
        try:
            journal = self._writer()
        except OSError as e:
            self._journal_failing(e)
            return 0
        last = journal.last_seq
        if len(records) and int(records["seq"][0]) <= last:   # re-read after a restart
            records = records[records["seq"] > last]
        if len(records):
            if int(records["seq"][0]) != last + 1:
                raise RuntimeError(f"the event ring continues at seq {int(records['seq'][0])} "
                                   f"but the journal ends at seq {last}: commands were "
                                   f"sequenced while persistd was not reading")
            try:
                journal.append(records)
                journal.sync()
            except OSError as e:
                self._journal_failing(e)
                return 0
            if self.progress.journal_errno():
                log("journal writes succeed again: accepting orders")
                self.progress.set_journal_errno(0)
            self.progress.set_durable_seq(journal.last_seq)
            if not self.fast_acks:     # gateways hold replies until durable_seq passes them
                self.events.wake_consumers()
            self._records.put(records)
        self.consumer.advance(n)
        return n

    def _journal_failing(self, e: OSError) -> None:
        if self.progress.journal_errno() != (e.errno or errno.EIO):
            log(f"JOURNAL WRITE FAILED ({e}): refusing new orders until it succeeds; retrying "
                f"every {RETRY_S:g} s")
            self.progress.set_journal_errno(e.errno or errno.EIO)
            self.events.wake_consumers()
        self.stop.wait(RETRY_S)
        # After a failed fsync the writer refuses to go on (a retried fsync can report success
        # for data the kernel dropped): reopen it, which re-reads and, if needed, cuts the tail.
        try:
            self.journal.close()
        except OSError:
            pass
        self.journal = None

    def _writer(self) -> JournalWriter:
        if self.journal is None:
            self.journal = JournalWriter(self.sd.journal_dir)
            for repair in self.journal.repairs:
                log(f"JOURNAL REPAIRED: {repair}")
        return self.journal

    def _retire(self) -> None:
        through, self._retire_through = self._retire_through, 0
        if self.journal is None:
            return
        for path in self.journal.retire_through(through):
            log(f"retired journal segment {path.name} (covered by the snapshot at seq {through})")

    # -- store thread ----------------------------------------------------------------------
    def _guard(self, loop) -> None:
        try:
            loop()
        except BaseException as e:   # a dead helper thread must take the process down, loudly
            self.failed = e
            log(f"FATAL in {threading.current_thread().name}: {e!r}")
            self.stop.set()

    def _store_loop(self) -> None:
        # Background work: on a 2-core box the gateways and the journal must win the CPU.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), STORE_NICE)
        replica = Replica(self.cfg)
        stored = self.store.last_seq
        header = replica.load_snapshot(self.sd.snapshots_dir, max_seq=stored)
        replica.catch_up(self.sd.journal_dir, upto_seq=stored)
        log(f"store at seq {stored}; replica rebuilt from "
            f"{'snapshot ' + str(header['seq']) if header else 'genesis'} to seq {replica.seq}")
        last_snapshot = max([s for s, _ in snapshot.snapshots(self.sd.snapshots_dir)] or [0])
        self.progress.set_snapshot_seq(last_snapshot)
        pending: list[np.ndarray] = []
        balances: list[np.ndarray] = []
        reports: list[np.ndarray] = []
        # every later event passes through collect(), in order, from this command boundary
        account_seqs = replica.matcher.state.accounts["account_seq"].copy()

        def collect(events: np.ndarray) -> None:
            reports.append(report_rows(events, account_seqs))
            rows = events[events["etype"] != EV_COMMAND]   # a copy: the sink's slots are reused
            if len(rows):
                pending.append(rows)
                balances.append(self._fill_balances(replica, rows))

        replica.catch_up(self.sd.journal_dir, on_events=collect)
        due = time.monotonic() + self.flush_s
        while not self.stop.is_set() or not self._records.empty():
            # The journal's batches wait in the queue until the flush is due: waking for each
            # one (every pass) cost more CPU than applying it.
            self.stop.wait(max(0.0, due - time.monotonic()))
            due = time.monotonic() + self.flush_s
            for _ in range(self._records.qsize()):   # not more: a store behind still flushes
                for events in replica.apply(self._records.get()):
                    collect(events)
                if replica.seq - last_snapshot >= self.snapshot_every and \
                        self._flush(replica, pending, balances, reports):
                    last_snapshot = self._snapshot(replica)
            if pending:
                self._flush(replica, pending, balances, reports)
            if self.stop.is_set() and self.store_error is not None:
                break        # rows the store lacks are rewritten from the journal later

    def _fill_balances(self, replica: Replica, events: np.ndarray) -> np.ndarray:
        """Balance rows for accounts whose balance fills (fees, realized PnL), funding payments
        or liquidation steps (fees) changed: the balance after the command batch, read from the
        replica (those events do not all carry the balance, and isolated positions move money
        between balance and isolated margin without an event of their own). An isolated
        position's funding goes to its isolated margin: no row for that alone."""
        etype = events["etype"]
        if not MOVES_BALANCE[etype].any():
            return np.zeros(0, BALANCE_ROW_DTYPE)    # most batches: no trade, funding or liquidation
        t = events[etype == EV_TRADE].view(TRADE_EVENT_DTYPE)
        liquidated = events[etype == EV_LIQUIDATION]["account"]
        funded = events[etype == EV_FUNDING]
        mode = replica.matcher.state.positions["margin_mode"][funded["account"],
                                                              funded["market"]]
        funded = funded["account"][mode == MARGIN_CROSS]
        if not len(t) and not len(liquidated) and not len(funded):
            return np.zeros(0, BALANCE_ROW_DTYPE)
        accounts = np.unique(np.concatenate([t["account"], t["maker_account"], liquidated,
                                             funded]))
        rows = np.zeros(len(accounts), BALANCE_ROW_DTYPE)
        rows["seq"] = replica.seq
        rows["ts_ns"] = int(events["ts_ns"][-1])
        rows["account"] = accounts
        rows["balance_atoms"] = replica.matcher.state.accounts["balance_atoms"][accounts]
        return rows

    def _flush(self, replica: Replica, pending: list, balances: list, reports: list) -> bool:
        """Write what is pending in one transaction; False (kept for a retry) if it failed."""
        events = np.concatenate(pending) if pending else np.zeros(0, EVENT_DTYPE)
        extra = np.concatenate(balances) if balances else np.zeros(0, BALANCE_ROW_DTYPE)
        numbered = np.concatenate(reports) if reports else np.zeros(0, REPORT_ROW_DTYPE)
        try:
            if self.store is None:
                self.store = Store(self.sd.store_file, self.markets, config=STORE_CONFIG)
            self.store.write(events, extra, upto_seq=replica.seq, reports=numbered)
        except Exception as e:   # disk full, I/O error: DuckDB lags, acks do not wait for it
            if self.store_error is None:
                log(f"DuckDB WRITE FAILED ({type(e).__name__}: {e}); retrying every "
                    f"{RETRY_S:g} s, rows are kept until it succeeds")
            self.store_error = e
            self._reopen_store()
            pending[:] = [events]
            balances[:] = [extra]
            reports[:] = [numbered]
            self.stop.wait(RETRY_S)
            return False
        if self.store_error is not None:
            log("DuckDB writes succeed again")
            self.store_error = None
        pending.clear()
        balances.clear()
        reports.clear()
        self.progress.set_store_seq(replica.seq)
        return True

    def _reopen_store(self) -> None:
        """After a failed write DuckDB may refuse the connection: open a fresh one next time."""
        store, self.store = self.store, None
        try:
            if store is not None:
                store.close()
        except Exception:
            pass

    def _snapshot(self, replica: Replica) -> int:
        t0 = time.monotonic()
        path = snapshot.write_snapshot(self.sd.snapshots_dir, replica.buffer, seq=replica.seq,
                                       layout_version=replica.layout_version,
                                       state_hash=replica.state_hash())
        snapshot.prune(self.sd.snapshots_dir, self.snapshots_keep)
        self.progress.set_snapshot_seq(replica.seq)
        log(f"snapshot at seq {replica.seq} written in {time.monotonic() - t0:.2f} s: {path.name}")
        kept = snapshot.snapshots(self.sd.snapshots_dir)
        if self.retire_journal and len(kept) >= self.snapshots_keep:
            self._retire_through = kept[0][0]
        return replica.seq

    # -- sql thread ------------------------------------------------------------------------
    def _sql_loop(self) -> None:
        import zmq
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        self.sd.run_dir.mkdir(parents=True, exist_ok=True)
        self.sd.sql_socket.unlink(missing_ok=True)
        sock.bind(f"ipc://{self.sd.sql_socket}")
        try:
            while not self.stop.is_set():
                if not sock.poll(100):
                    continue
                sock.send(msgpack.packb(self._answer(sock.recv()), default=str))
        finally:
            sock.close()
            self.sd.sql_socket.unlink(missing_ok=True)

    def _answer(self, raw: bytes) -> dict:
        try:
            request = msgpack.unpackb(raw)
            if isinstance(request, dict) and isinstance(request.get("admin_log"), dict):
                return self._log_admin(request["admin_log"])
            sql = request["sql"]
            if not isinstance(sql, str):
                raise TypeError
        except Exception:
            return {"error": "a request is a msgpack map {\"sql\": \"SELECT ...\"}"}
        store = self.store
        if store is None:
            return {"error": "the DuckDB store is being reopened after a failed write; retry"}
        try:
            columns, rows = store.query(sql)
        except ReadOnlyViolation as e:
            return {"error": str(e)}
        except Exception as e:   # a bad query is the caller's problem, not a reason to die
            return {"error": f"{type(e).__name__}: {e}"}
        return {"columns": columns, "rows": [list(r) for r in rows],
                "store_seq": self.progress.store_seq()}

    def _log_admin(self, row: dict) -> dict:
        """An operator command's who/when for admin_log (perpx.durability.record_admin)."""
        store = self.store
        if store is None:
            return {"error": "the DuckDB store is being reopened after a failed write; retry"}
        try:
            store.log_admin(**{k: row.get(k) for k in ("ts_ns", "operator", "uid", "pid",
                                                       "command", "args", "seq", "outcome")})
        except Exception as e:
            return {"error": f"admin_log: {type(e).__name__}: {e}"}
        return {"ok": True}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.journal is not None:
            self.journal.close()
        self.events.close()
        self.progress.close()


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m persistd")
    p.add_argument("--spec", required=True, help="exchange.json written by `perpx up`")
    args = p.parse_args(argv)
    spec = load_spec(args.spec)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a file-size limit is an error, not a kill
    opts = spec.section("persistence")
    service = Persistd(spec, snapshot_every=int(opts.get("snapshot_every", 1_000_000)),
                       snapshots_keep=int(opts.get("snapshots_keep", 2)),
                       flush_s=float(opts.get("store_flush_ms", 100)) / 1000,
                       retire_journal=bool(opts.get("retire_journal", True)))

    def on_signal(*_):
        service.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"serving (pid {os.getpid()}): journal at seq {service.journal.last_seq}, store at seq "
        f"{service.store.last_seq}")
    try:
        service.run()
    finally:
        service.close()
    log("stopped")
    return 0
