"""persistd's store process: everything behind the journal, in a process of its own.

persistd (persistd/service.py) starts this as its child (`python -m persistd --spec FILE
--store`) so that nothing here can delay a durable ack: the replica's compiled calls, DuckDB's
row building and writes and the snapshots hold this process's interpreter lock, never the
journal's. It follows the journal on disk (JournalFollower) up to the `durable_seq` persistd
publishes in shm, so it only ever sees synced records.

Two threads:

store (the main thread)
    Wakes every `flush_s`, reads the journal's new durable records, applies them to a replica
    of the matcher (persistd/replica.py) batch by batch and writes the replica's events to
    DuckDB (persistd/store.py) in one transaction, then publishes `store_seq`. Once a second
    it also fdatasyncs the journal's synced-seq marker (persistd/journal.py), which persistd
    rewrites after each sync without waiting for the disk. Every `snapshot_every` commands it writes a
    snapshot of the replica's tables and publishes `snapshot_seq`; persistd, the journal's only
    writer, retires the segments the snapshots cover (moves them aside), and this thread
    deletes them at its next pass (persistd/journal.py `reclaim_retired`). On start it rebuilds the replica from the
    newest snapshot at or below the store's last seq and replays the journal from there,
    writing only rows the store lacks. Each report to an account among the events gets its row
    in the `reports` table, keyed by (account, account_seq) as engine/reports.py numbers them
    from the replica's counters: the durable source a gateway replays from once its own memory
    no longer holds a report.
sql
    Answers `perpx sql` on a local ZeroMQ socket with read-only queries (the store refuses
    anything else), and records operator commands in admin_log ({"admin_log": row}, from
    perpx.durability.record_admin); this process holds DuckDB's write connection, so nobody
    else opens the file.

It stops on SIGTERM (persistd sends it once it has journaled everything, so the last flush
covers the whole journal), and dies with persistd (PR_SET_PDEATHSIG SIGKILL: the next
persistd needs the DuckDB file at once, and everything here is safe to kill; also a
parent-pid check each flush).
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import msgpack
import numpy as np

from engine.records import (COMMAND_EVENT_WORD, EV_COMMAND, EV_FUNDING, EV_LIQUIDATION,
                            EV_TRADE, EVENT_DTYPE, MARGIN_CROSS, TRADE_EVENT_DTYPE)
from engine.report_numbering import number_events
from engine.spec import ExchangeSpec
from persistd import snapshot
from persistd.journal import SYNCED_MARKER, JournalFollower, reclaim_retired
from persistd.replica import Replica
from persistd.store import BALANCE_ROW_DTYPE, REPORT_ROW_DTYPE, ReadOnlyViolation, Store
from shm.progress import JournalProgress

RETRY_S = 0.5
COMMAND_IN_EVENT_BYTE = COMMAND_EVENT_WORD * 8   # EV_COMMAND: where the command record starts
# The marker's fdatasync is a disk flush of its own, beside the journal's: once a second is
# enough (a marker behind only classifies damage more leniently, never wrongly).
MARKER_SYNC_S = 1.0
# One DuckDB thread: a second one only hands each ~100 ms batch between threads (~20-25% more
# CPU per write). `perpx sql` queries get one too.
STORE_CONFIG = {"threads": 1}
# DuckDB trails the fills by well under a second, also under a full load (`perpx bench
# durability`, target 1 s). The store is SCHED_IDLE, on CPU time nobody else wants, which a
# full load leaves it too little of: its passes fell ~2 s behind. So a pass that starts with
# CATCH_UP_COMMANDS or more durable commands to apply runs as an ordinary process (all its
# threads, SCHED_OTHER at nice CATCH_UP_NICE: the clients and the journal on its CPU still
# weigh about nine times more), and the store wakes for its pass early once that many wait
# (it looks every BACKLOG_POLL_S): under a full load its passes stay small, ordinary and
# frequent; at a lighter one they stay idle-class, once per store_flush_ms.
CATCH_UP_COMMANDS = 4096
CATCH_UP_NICE = 10
BACKLOG_POLL_S = 0.025
# Event types after which _fill_balances has balance rows to read (indexed by etype).
MOVES_BALANCE = np.zeros(256, bool)
MOVES_BALANCE[[EV_TRADE, EV_LIQUIDATION, EV_FUNDING]] = True


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


class StoreProcess:
    def __init__(self, spec: ExchangeSpec, *, snapshot_every: int, snapshots_keep: int,
                 flush_s: float, log):
        self.cfg, self.sd, self.markets = spec.engine, spec.layout, list(spec.markets)
        self.snapshot_every = snapshot_every
        self.snapshots_keep = snapshots_keep
        self.flush_s = flush_s
        self.log = log
        self.parent_pid = os.getppid()
        self.stopping = threading.Event()
        self.stop = threading.Event()
        self.failed: BaseException | None = None
        self.store_error: Exception | None = None
        self.progress = JournalProgress.attach(spec.prefix)
        # wanting the CPU (start-up's catch-up) until the first pass's time is announced; a
        # killed predecessor may have left a promise of quiet behind
        self.progress.set_store_quiet_until_ns(0)
        self.store = Store(self.sd.store_file, self.markets, config=STORE_CONFIG)
        self.progress.set_store_seq(self.store.last_seq)
        self._marker_fd = None
        self._marker_synced_at = 0.0
        self.catching_up = False        # this pass runs SCHED_OTHER (_pace)
        self.pace_refused = False
        self.said_catching_up = False   # the first switch is logged, later ones not

    def run(self) -> None:
        sql = threading.Thread(target=self._guard, args=(self._sql_loop,), name="sql")
        sql.start()
        try:
            self._store_loop()
        finally:
            self.stop.set()
            sql.join(timeout=30)
        if self.failed is not None:
            raise self.failed

    def _guard(self, loop) -> None:
        try:
            loop()
        except BaseException as e:   # a dead helper thread must take the process down, loudly
            self.failed = e
            self.log(f"FATAL in {threading.current_thread().name}: {e!r}")
            self.stop.set()
            self.stopping.set()

    def _store_loop(self) -> None:
        replica = Replica(self.cfg)
        stored = self.store.last_seq
        header = replica.load_snapshot(self.sd.snapshots_dir, max_seq=stored)
        replica.catch_up(self.sd.journal_dir, upto_seq=stored)
        self.log(f"store at seq {stored}; replica rebuilt from "
                 f"{'snapshot ' + str(header['seq']) if header else 'genesis'} to seq "
                 f"{replica.seq}")
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

        follower = JournalFollower(self.sd.journal_dir, replica.seq + 1)
        gc.collect()
        gc.freeze()     # start-up's objects are never collected: later passes skip them
        due_ns = time.monotonic_ns()
        try:
            while True:
                last_round = self.stopping.is_set()   # persistd journaled everything: drain
                # The pass is a burst of CPU beside the journal, which must not yield its CPU
                # to it: a yield hands the CPU to this SCHED_IDLE process until the next tick
                # (4 ms here), while a journal asleep is woken by the matcher and preempts it
                # at once. So the journal is told when the next pass starts (it stops yielding
                # shortly before: it cannot see this timer fire) and that the pass goes on
                # (0) until the next one is announced. A pass woken early by a backlog
                # (_wait_for_pass) says so at once, below.
                self.progress.set_store_quiet_until_ns(due_ns)
                self._wait_for_pass(due_ns, replica)
                self.progress.set_store_quiet_until_ns(0)
                self._pace(self._backlog(replica))
                due_ns = time.monotonic_ns() + round(self.flush_s * 1e9)
                if os.getppid() != self.parent_pid:
                    self.log("persistd is gone: stopping")
                    return
                if last_round or time.monotonic() - self._marker_synced_at >= MARKER_SYNC_S:
                    self._sync_marker()
                # here, not in the journal thread: deleting a segment takes ~15 ms of kernel
                for name in reclaim_retired(self.sd.journal_dir):
                    self.log(f"deleted retired journal segment {name}")
                durable = self.progress.durable_seq()
                while True:
                    if replica.seq - last_snapshot >= self.snapshot_every and \
                            self._flush(replica, pending, balances, reports):
                        last_snapshot = self._snapshot(replica)
                    # never past a due snapshot by more than a journal batch (while its flush
                    # fails, no further)
                    upto = max(replica.seq, last_snapshot + self.snapshot_every)
                    records = follower.read(min(durable, upto))
                    if not len(records):
                        break
                    # balance rows are read from the replica after each compiled call
                    for events in replica.apply(records):
                        collect(events)
                if pending:
                    self._flush(replica, pending, balances, reports)
                if last_round or self.stop.is_set():
                    return
        finally:
            follower.close()

    def _wait_for_pass(self, due_ns: int, replica: Replica) -> None:
        """Until due_ns, stopping, or CATCH_UP_COMMANDS durable commands wait."""
        while not self.stopping.is_set():
            left_s = (due_ns - time.monotonic_ns()) / 1e9
            if left_s <= 0 or self._backlog(replica) >= CATCH_UP_COMMANDS:
                return
            self.stopping.wait(min(left_s, BACKLOG_POLL_S))

    def _backlog(self, replica: Replica) -> int:
        """Durable commands the replica has yet to apply."""
        return self.progress.durable_seq() - replica.seq

    def _pace(self, backlog: int) -> None:
        """This pass's scheduling class: ordinary for a backlog of CATCH_UP_COMMANDS or
        more, else idle. A host that refuses the switch (no privilege to leave SCHED_IDLE)
        keeps the store idle-class: said once, and not asked again."""
        catching_up = backlog >= CATCH_UP_COMMANDS
        if catching_up == self.catching_up or self.pace_refused:
            return
        try:
            set_policy(os.SCHED_OTHER if catching_up else os.SCHED_IDLE)
        except PermissionError as e:
            self.pace_refused = True
            self.log(f"cannot leave SCHED_IDLE to catch up ({e}): under a full load DuckDB "
                     f"may trail the journal by more than a second")
            return
        self.catching_up = catching_up
        if catching_up and not self.said_catching_up:
            self.said_catching_up = True
            self.log(f"{backlog} commands behind the journal: passes of "
                     f"{CATCH_UP_COMMANDS}+ run as an ordinary process")

    def _sync_marker(self) -> None:
        """fdatasync the synced-seq marker persistd rewrites without syncing (a missing marker:
        nothing synced yet)."""
        if self._marker_fd is None:
            try:
                self._marker_fd = os.open(self.sd.journal_dir / SYNCED_MARKER,
                                          os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
        os.fdatasync(self._marker_fd)
        self._marker_synced_at = time.monotonic()

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
                self.log(f"DuckDB WRITE FAILED ({type(e).__name__}: {e}); retrying every "
                         f"{RETRY_S:g} s, rows are kept until it succeeds")
            self.store_error = e
            self._reopen_store()
            pending[:] = [events]
            balances[:] = [extra]
            reports[:] = [numbered]
            self.stop.wait(RETRY_S)
            return False
        if self.store_error is not None:
            self.log("DuckDB writes succeed again")
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
        path = snapshot.write_snapshot(self.sd.snapshots_dir, replica.buffer,
                                       seq=replica.seq, layout_version=replica.layout_version,
                                       state_hash=replica.state_hash())
        snapshot.prune(self.sd.snapshots_dir, self.snapshots_keep)
        self.progress.set_snapshot_seq(replica.seq)   # persistd retires segments it covers
        self.log(f"snapshot at seq {replica.seq} written in {time.monotonic() - t0:.2f} s: "
                 f"{path.name}")
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
        if self._marker_fd is not None:
            os.close(self._marker_fd)
            self._marker_fd = None
        self.progress.close()


def set_policy(policy: int) -> None:
    """Every thread of this process to `policy`, at nice CATCH_UP_NICE (both are per thread;
    DuckDB's threads too; SCHED_IDLE ignores the nice, which is never lowered). Raises
    PermissionError where the host refuses it (leaving SCHED_IDLE needs CAP_SYS_NICE or a
    RLIMIT_NICE that allows nice 0)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), CATCH_UP_NICE)
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))
        except ProcessLookupError:    # a thread that just ended
            pass


def serve(spec: ExchangeSpec, opts: dict, log) -> int:
    """The store process's main (persistd's `--store`)."""
    # Background work: SCHED_IDLE, so it runs only on CPU time nobody else wants (the journal,
    # riskd, the supervisor share its CPU) and is preempted the moment one of them wakes. First
    # thing, so that every thread (DuckDB's included) inherits it: policies are per thread.
    # Measured (docs/tuning.md, "The store process's CPU"): on the order path's CPU instead it
    # met the durable p99 in clean runs but stalled orders for tens of ms after load bursts.
    set_policy(os.SCHED_IDLE)
    # SIGTERM is taken by a thread of its own (sigwait), never by a handler. A handler runs in
    # the main thread, which may be inside stopping.wait() holding that Event's lock, and its
    # stopping.set() then deadlocked: two store processes were found stuck so for half an
    # hour, holding DuckDB's file. Blocked before any thread starts, so that all inherit it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # persistd decides when the store stops
    # exchange.json carries the whole section, defaults resolved (perpx/config.py)
    service = StoreProcess(spec, snapshot_every=int(opts["snapshot_every"]),
                           snapshots_keep=int(opts["snapshots_keep"]),
                           flush_s=int(opts["store_flush_ms"]) / 1000, log=log)

    def on_sigterm() -> None:
        signal.sigwait({signal.SIGTERM})
        service.stopping.set()
        # Leave quickly: the next persistd needs our DuckDB file, and at SCHED_IDLE under load
        # the last round could take minutes.
        try:
            set_policy(os.SCHED_OTHER)
        except PermissionError:
            pass

    threading.Thread(target=on_sigterm, name="sigterm", daemon=True).start()
    try:
        service.run()
    finally:
        service.close()
    return 0
