"""persistd: the journal that acknowledgements wait for; everything else in a child process.

The journal (this process's main thread, and its only busy one)
    Reads the event ring as consumer `persistd`, appends the sequenced commands (EV_COMMAND
    events) to the journal, fsyncs once per pass (group commit: everything the matcher
    published since the last pass goes in one write and one fsync), publishes `durable_seq`
    (shm/progress.py) and wakes the gateways, which release acks and fills up to it; then
    rewrites the journal's synced-seq marker (persistd/journal.py) without syncing it. Only
    then does it advance its ring cursor, so a persistd killed at any point re-reads what it
    had not made durable; commands at or below the journal's last seq are skipped, so nothing
    is journaled twice. A failing write (disk full) sets `journal_errno`, which makes the
    gateways refuse new orders; the pass is retried until the write succeeds. With durable
    acks a pass starts as soon as events arrive; with fast acks (nobody waits) every
    FAST_PASS_S on a timer, without waking the gateways. A thread of the journal writer keeps
    written, synced zeros ahead of it in the segment, so these fsyncs carry data, not a file
    size (persistd/journal.py, "Pre-zeroed space"); the pass never waits for it.
The store process (persistd/storer.py, `python -m persistd --store`, this process's child)
    Follows the journal on disk up to `durable_seq` with a replica of the matcher, writes
    DuckDB, snapshots, serves `perpx sql`. A process of its own so that its compiled calls and
    DuckDB's row building never hold the journal's interpreter lock: the durable ack waits for
    the disk only. It publishes `snapshot_seq`; the journal thread, the journal's only writer,
    retires the segments the snapshots cover (a rename each), and the store process deletes
    them (~15 ms of kernel time each, which a durable ack would wait for here). If it dies,
    persistd stops (the supervisor restarts both); persistd stops it last, once the ring is
    drained; if persistd dies, the kernel kills it (a new persistd waits for the DuckDB
    file's lock until it is gone).

Start-up refuses, with one line naming the segment, byte offset and seq, a journal damaged at or
below its synced-seq marker (acknowledged history: `perpx journal inspect|repair`), and a DuckDB
store ahead of the journal's end (its rows are never deleted to match a shorter journal unless
the operator runs `perpx journal repair --yes`).
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial

import duckdb
import numpy as np

from engine.records import EVENT_DTYPE
from engine.spec import ExchangeSpec, load_spec
from persistd import snapshot
from persistd.journal import JournalError, JournalWriter, check_seqs, journal_records
from persistd.store import Store
from shm import names
from shm.progress import JournalProgress
from shm.ring import EventRing
from shm.wait import SHARED_CPU_YIELDS, IdleCpuYieldWait

READ_BATCH = 1 << 14
FAST_NICE = 5
# 10 ms passes cost ~3x less journal CPU per command but, in 3 alternating unpaced e2e pairs,
# left the order path at 18.9k orders/s against 20.7k with 2 ms (cause not found): keep 2 ms.
FAST_PASS_S = 0.002
# Durable acks: how long the journal thread yields between passes before it sleeps, if its
# CPU is otherwise idle (1 ms: a gap between orders at 1,000 orders/s).
JOURNAL_YIELD_S = 0.001
RETRY_S = 0.5
CHILD_CHECK_S = 0.1      # how often the journal thread checks on the store process
CHILD_STOP_S = 60.0
# A new persistd waits this long for the DuckDB file's lock: the store process of the one
# before may still be on its way out.
STORE_LOCK_WAIT_S = 30.0
PR_SET_PDEATHSIG = 1


def log(msg: str) -> None:
    try:
        print(f"persistd: {msg}", file=sys.stderr, flush=True)
    except OSError:
        pass     # the log may sit on the disk that is full: losing a line beats dying of it


class StartupRefused(Exception):
    """persistd will not start on this state: one line for the operator."""


def _die_with_parent() -> None:
    """In the store process between fork and exec: SIGKILL when persistd dies.

    Not SIGTERM, which asks the store to write everything up to the journal's end first: a
    store behind under load took minutes to, holding the DuckDB file the next persistd needs
    (`test_chaos` timed out on it). Killing it loses nothing: its DuckDB writes are
    transactions, its snapshots renamed into place, and the next store process resumes at
    the store's last seq."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Persistd:
    def __init__(self, spec: ExchangeSpec, spec_path: str | None = None, *,
                 snapshots_keep: int = 2, retire_journal: bool = True):
        """`spec_path`: exchange.json, handed to the store process (None: no store process,
        for tests of the journal alone)."""
        self.spec = spec
        self.sd = spec.layout
        self.prefix = spec.prefix
        self.privileged_sources = np.array([s.privileged for s in spec.sources]
                                           + [False] * (256 - len(spec.sources)), np.uint8)
        self._batch = np.zeros(0, np.uint8)       # each pass's batch, built in place (run)
        self._pack_batch = None
        self.spec_path = spec_path
        self.fast_acks = spec.ack_mode == "fast"
        self.snapshots_keep = snapshots_keep
        self.retire_journal = retire_journal
        self.stopping = threading.Event()    # asked to stop: drain the ring, then stop
        self.stop = threading.Event()
        self.store_process: subprocess.Popen | None = None
        self._snapshot_seq_seen = 0
        self._child_checked = 0.0
        self._zero_filling = False           # the journal's zero filler runs (after the fork)

        self.progress = JournalProgress.attach(self.prefix)
        self.journal = None
        self.progress.set_durable_seq(self._writer().last_seq)
        self._forget_beyond_journal()
        self._check_store()
        # Durable acks: between passes the journal thread yields for up to JOURNAL_YIELD_S
        # while nobody else wants its CPU, so the matcher's next events find it awake (waking
        # it costs ~180 µs of the durable ack's p50 on this VM, docs/tuning.md), and it sleeps
        # after a few yields that ran somebody else: it shares a CPU with riskd, the
        # supervisor and, in the benchmarks, the clients; and it does not yield at all during
        # the store process's pass, nor just before it (store_wants_cpu, shm/progress.py).
        # With fast acks: a timer (run).
        self.events = EventRing.attach(names.event_ring(self.prefix), EVENT_DTYPE,
                                       wait=partial(IdleCpuYieldWait, yields=SHARED_CPU_YIELDS,
                                                    yield_s=JOURNAL_YIELD_S,
                                                    busy_neighbour=self.progress.store_wants_cpu))
        saved = self.events.consumer_cursor("persistd") is not None
        self.consumer = self.events.consumer("persistd", start="saved" if saved else "current")
        self.progress.set_pid(os.getpid())    # ready: the supervisor waits for this

    def _forget_beyond_journal(self) -> None:
        """A repaired (cut) torn tail: snapshots past its end describe commands that are no
        longer in the journal (never acknowledged: the marker vouches), so they go, loudly."""
        last = self.journal.last_seq
        for seq, path in snapshot.snapshots(self.sd.snapshots_dir):
            if seq > last:
                log(f"removing snapshot {path.name}: it is past the journal's end (seq {last})")
                path.unlink()

    def _check_store(self) -> None:
        """DuckDB rows past the journal's end are never deleted here: the operator decides."""
        if not self.sd.store_file.exists():
            return
        store = self._open_store()
        try:
            stored = store.last_seq
        finally:
            store.close()
        if stored > self.journal.last_seq:
            raise StartupRefused(
                f"the DuckDB store {self.sd.store_file} holds rows up to seq {stored} but the "
                f"journal ends at seq {self.journal.last_seq}; see `perpx journal inspect`, "
                f"and `perpx journal repair --yes` to drop the store's rows past the journal")

    def _open_store(self) -> Store:
        """The DuckDB store, waiting up to STORE_LOCK_WAIT_S while another process holds its
        lock (the previous persistd's store process, not yet gone)."""
        deadline = time.monotonic() + STORE_LOCK_WAIT_S
        waiting = False
        while True:
            try:
                return Store(self.sd.store_file, list(self.spec.markets), config={"threads": 1})
            except duckdb.IOException as e:
                if "Could not set lock" not in str(e):
                    raise
                if time.monotonic() > deadline:
                    raise StartupRefused(f"the DuckDB store is still locked after "
                                         f"{STORE_LOCK_WAIT_S:g} s: {e}") from None
                if not waiting:
                    log(f"waiting for the DuckDB store's lock: {e}")
                    waiting = True
                time.sleep(0.1)

    # -- the store process -----------------------------------------------------------------
    def _start_store_process(self) -> None:
        if self.spec_path is None:
            return
        self.store_process = subprocess.Popen(
            [sys.executable, "-m", "persistd", "--spec", str(self.spec_path), "--store"],
            preexec_fn=_die_with_parent, close_fds=True)

    def _check_store_process(self) -> None:
        """The store process must live as long as the journal: its death stops persistd."""
        now = time.monotonic()
        if self.store_process is None or now - self._child_checked < CHILD_CHECK_S:
            return
        self._child_checked = now
        code = self.store_process.poll()
        if code is not None:
            raise RuntimeError(f"the store process (pid {self.store_process.pid}) exited with "
                               f"status {code}")
        self._maybe_retire()

    def _stop_store_process(self) -> None:
        child, self.store_process = self.store_process, None
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)   # it flushes through the journal's end, then exits
        try:
            child.wait(CHILD_STOP_S)
        except subprocess.TimeoutExpired:
            log(f"the store process (pid {child.pid}) did not stop within {CHILD_STOP_S:g} s: "
                f"killing it")
            child.kill()
            child.wait()

    def _maybe_retire(self) -> None:
        """Retire the segments the oldest kept snapshot covers, once the store process has
        written a new one (snapshot_seq moved)."""
        seq = self.progress.snapshot_seq()
        if not self.retire_journal or seq == self._snapshot_seq_seen or self.journal is None:
            return
        self._snapshot_seq_seen = seq
        kept = snapshot.snapshots(self.sd.snapshots_dir)
        if len(kept) < self.snapshots_keep:
            return
        through = kept[0][0]
        for path in self.journal.retire_through(through):
            log(f"retired journal segment {path.name} (covered by the snapshot at seq {through})")

    # -- journal thread -------------------------------------------------------------------
    def run(self) -> None:
        self._start_store_process()
        # The compiled batch (persistd/journal_pack.py) loads here, after the supervisor has
        # seen this process ready: numba's import and cache load take ~0.6 s, which then pass
        # while riskd and the gateways start instead of delaying them; the first pass waits.
        from persistd import journal_pack
        journal_pack.warm()
        self._batch = journal_pack.batch_buffer(READ_BATCH)
        self._pack_batch = journal_pack.pack_batch
        # The journal's fsyncs then overwrite zeros instead of growing the file (see
        # persistd/journal.py, "Pre-zeroed space"). A thread: started after the fork above.
        self._zero_filling = True
        if self.journal is not None:
            self.journal.start_zero_filler()
        if self.fast_acks:
            # Nobody waits for the journal: let the gateways have the CPU, and write bigger
            # groups (one pass, one write, one fsync per FAST_PASS_S at most).
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FAST_NICE)
        # Nothing on the journal path makes reference cycles: start-up's objects are frozen
        # out of the collector and cyclic GC is off, so no collection ever pauses a pass.
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            while not self.stopping.is_set() and not self.stop.is_set():
                started = time.monotonic()
                consumed = self.journal_pass()
                if self.fast_acks:
                    # On a timer, not the doorbell: the matcher never has to ring persistd.
                    self.stop.wait(max(0.0, FAST_PASS_S - (time.monotonic() - started)))
                elif not consumed:
                    self.consumer.wait(1, timeout_s=0.05)
                self._check_store_process()
            # Stopping (the supervisor stops the matcher first): journal what is left.
            while not self.stop.is_set() and self.journal_pass():
                pass
        finally:
            self.stop.set()
            self._stop_store_process()
            gc.enable()

    def journal_pass(self) -> int:
        """Journal what the ring holds; returns how many events were consumed."""
        head, tail = self.consumer.peek_views(READ_BATCH)
        n = len(head) + len(tail)
        if not n:
            return 0
        try:
            journal = self._writer()
        except OSError as e:
            self._journal_failing(e)
            return 0
        last = journal.last_seq
        # one compiled call builds the batch; what it refuses, the numpy path explains
        count, batch = self._pack_batch((head, tail), self.privileged_sources, last,
                                        self._batch)
        if count < 0:
            self._refuse((head, tail), last)
        if count:
            try:
                journal.append_packed(batch, count)
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
            try:
                journal.mark_synced()   # after the publish: a 16-byte write, synced elsewhere
            except OSError as e:        # only behind, never wrong: the next pass rewrites it
                log(f"could not update the synced-seq marker ({e})")
        self.consumer.advance(n)
        return n

    def _refuse(self, event_parts, last: int) -> None:
        """Raise why the events a pass read cannot follow the journal's last seq."""
        seqs = journal_records(event_parts, self.privileged_sources)["seq"]
        seqs = seqs[seqs > last]                             # re-read after a restart
        if int(seqs[0]) != last + 1:
            raise RuntimeError(f"the event ring continues at seq {int(seqs[0])} but the "
                               f"journal ends at seq {last}: commands were sequenced while "
                               f"persistd was not reading")
        check_seqs(seqs, last + 1)      # raises: a seq is skipped inside the pass
        raise RuntimeError("the compiled batch refused commands the journal's checks accept")

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
            if self._zero_filling:
                self.journal.start_zero_filler()
        return self.journal

    def close(self) -> None:
        self._stop_store_process()
        if self.journal is not None:
            self.journal.close()
        if getattr(self, "events", None) is not None:
            self.events.close()
        self.progress.close()


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m persistd")
    p.add_argument("--spec", required=True, help="exchange.json written by `perpx up`")
    p.add_argument("--store", action="store_true",
                   help="run as persistd's store process (persistd starts it)")
    args = p.parse_args(argv)
    spec = load_spec(args.spec)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a file-size limit is an error, not a kill
    opts = spec.section("persistence")
    if args.store:
        from persistd import storer

        def store_log(msg: str) -> None:
            log(f"store: {msg}")
        return storer.serve(spec, opts, store_log)
    try:
        service = Persistd(spec, args.spec, snapshots_keep=int(opts["snapshots_keep"]),
                           retire_journal=bool(opts["retire_journal"]))
    except (JournalError, StartupRefused) as e:
        log(f"NOT STARTING: {e}")      # one line: the operator's cue (perpx journal inspect)
        return 1

    def on_signal(*_):
        service.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"serving (pid {os.getpid()}): journal at seq {service.journal.last_seq}")
    try:
        service.run()
    finally:
        service.close()
    log("stopped")
    return 0
