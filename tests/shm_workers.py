"""Helpers for the shm tests: child-process entry points and the fixtures that clean up after them.

Children are started with the "spawn" method and report through a queue, so a failure in a
child arrives in the test as its traceback instead of as a timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import secrets
import time
import traceback

import numpy as np
import posix_ipc
import pytest

from shm.doorbell import Doorbell
from shm.region import Region
from shm.ring import CommandRing, EventRing
from shm.snapshot import SnapshotReader, SnapshotWriter
from shm.wait import SpinYieldBlockWait

# A 64-byte record carrying its sequence number and a second word derived from it, so a
# record read before it was completely written (or a stale one) is caught.
RECORD = np.dtype([("seq", "<i8"), ("check", "<i8"), ("pad", "V48")])
_SALT = 0x5DEECE66D
WAIT_S = 20.0  # deadline for any single wait in a child; a healthy run waits milliseconds


def check_of(seq: np.ndarray) -> np.ndarray:
    return seq ^ _SALT


def make_records(start: int, n: int) -> np.ndarray:
    records = np.zeros(n, RECORD)
    records["seq"] = np.arange(start, start + n)
    records["check"] = check_of(records["seq"])
    return records


def verify(batch: np.ndarray, expected: int) -> None:
    seq = batch["seq"]
    if not np.array_equal(seq, np.arange(expected, expected + len(batch))):
        bad = int(np.flatnonzero(seq != np.arange(expected, expected + len(batch)))[0])
        raise AssertionError(f"expected seq {expected + bad}, got {seq[bad]} (batch starting at {expected})")
    if not np.array_equal(batch["check"], check_of(seq)):
        raise AssertionError(f"torn record in batch starting at {expected}")


# -- fixtures -------------------------------------------------------------------------------


def _leftovers(prefix: str) -> list[str]:
    base = prefix.lstrip("/")
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith(base) or e.startswith("sem." + base))


@pytest.fixture(autouse=True)
def shm_prefix():
    """A unique name prefix per test; afterwards nothing under it may remain in /dev/shm."""
    prefix = f"/perpx-t{secrets.token_hex(4)}"
    yield prefix
    left = _leftovers(prefix)
    for entry in left:
        try:
            if entry.startswith("sem."):
                posix_ipc.unlink_semaphore("/" + entry[4:])
            else:
                posix_ipc.unlink_shared_memory("/" + entry)
        except posix_ipc.ExistentialError:
            pass
    assert not left, f"test left shared memory behind: {left}"


class Children:
    """Starts workers in spawned processes; kills whatever still runs when the test ends.
    Spawned, not forked: some workers test what a process does as it exits (atexit), which a
    forked child skips."""

    def __init__(self):
        self._ctx = mp.get_context("spawn")
        self.results = self._ctx.Queue()
        self._procs: list[mp.Process] = []

    def event(self):
        return self._ctx.Event()

    def start(self, worker: str, *args) -> mp.Process:
        proc = self._ctx.Process(target=run, args=(worker, self.results, *args), name=worker, daemon=True)
        proc.start()
        self._procs.append(proc)
        return proc

    def collect(self, n: int, timeout_s: float) -> list[tuple]:
        """The next n reports, failing on the first error a child reports."""
        deadline = time.monotonic() + timeout_s
        out = []
        while len(out) < n:
            try:
                report = self.results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"only {len(out)} of {n} reports within {timeout_s} s: {out}") from None
            if report[0] == "error":
                raise AssertionError(f"worker {report[1]} failed:\n{report[2]}")
            out.append(report)
        return out

    def stop_all(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
        self.results.close()
        self.results.join_thread()


@pytest.fixture
def children():
    kids = Children()
    try:
        yield kids
    finally:
        kids.stop_all()


def attach_when_ready(attach, timeout_s: float = 120.0):
    """Retry `attach()` until the process creating the region has made it (a first start
    compiles the matcher: up to a minute)."""
    from shm.region import ShmError
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return attach()
        except ShmError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.001)


# -- child entry points -----------------------------------------------------------------------


def run(worker: str, results, *args) -> None:
    try:
        results.put(globals()[worker](*args))
    except BaseException:
        results.put(("error", worker, traceback.format_exc()))


def region_writer(name: str, layout_version: int, value: int):
    with Region.attach(name, layout_version) as region:
        region.payload[:8].view(np.int64)[0] = value
        return ("wrote", region.creator_pid, os.getpid())


def command_producer(name: str, total: int, batch_sizes: list[int]):
    ring = CommandRing.attach(name, RECORD)
    sent = full_waits = 0
    step = 0
    started = time.monotonic()
    while sent < total:
        n = min(batch_sizes[step % len(batch_sizes)], total - sent)
        step += 1
        batch = make_records(sent, n)
        while len(batch):
            written = ring.write(batch)
            sent += written
            batch = batch[written:]
            if len(batch):
                full_waits += 1
                if not ring.wait_for_space(1, WAIT_S):
                    raise AssertionError(f"no space for {WAIT_S} s at seq {sent}")
    ring.close()
    return ("produced", sent, full_waits, time.monotonic() - started)


def command_consumer(name: str, total: int, max_batch: int):
    ring = CommandRing.attach(name, RECORD)
    started = time.monotonic()
    while ring.cursor < total:
        if not ring.wait(1, WAIT_S):
            raise AssertionError(f"nothing to read for {WAIT_S} s at seq {ring.cursor}")
        batch = ring.peek(max_batch)
        verify(batch, ring.cursor)
        ring.advance(len(batch))
    seen = ring.cursor
    ring.close()
    return ("consumed", seen, time.monotonic() - started)


def event_producer(name: str, total: int, batch: int):
    """Produces the way the matcher does: write into ``records`` directly, then ``publish``."""
    ring = EventRing.attach(name, RECORD)
    offsets = np.arange(batch)
    full_waits = 0
    started = time.monotonic()
    while ring.write_cursor < total:
        free = ring.free_slots()
        if free == 0:
            full_waits += 1
            if not ring.wait_for_space(1, WAIT_S):
                raise AssertionError(f"no space for {WAIT_S} s at seq {ring.write_cursor}")
            continue
        n = min(batch, free, total - ring.write_cursor)
        seq = ring.write_cursor + offsets[:n]
        slots = seq & ring.mask
        ring.records["seq"][slots] = seq
        ring.records["check"][slots] = check_of(seq)
        ring.publish(ring.write_cursor + n)
    ring.close()
    return ("produced", total, full_waits, time.monotonic() - started)


def event_consumer(name: str, which: str, start: str, total: int, max_batch: int, zero_copy: bool,
                   joined, slow_from: int | None = None):
    """Reads until ``total``; from ``slow_from`` on it dawdles (1 ms per batch of 64)."""
    ring = EventRing.attach(name, RECORD)
    consumer = ring.consumer(which, start=start)
    first = consumer.cursor
    joined.set()
    started = time.monotonic()
    while consumer.cursor < total:
        if not consumer.wait(1, WAIT_S):
            raise AssertionError(f"{which}: nothing to read for {WAIT_S} s at seq {consumer.cursor}")
        slow = slow_from is not None and consumer.cursor >= slow_from
        limit = 64 if slow else max_batch
        if zero_copy:
            for part in consumer.peek_views(limit):
                verify(part, consumer.cursor)
                consumer.advance(len(part))
        else:
            batch = consumer.peek(limit)
            verify(batch, consumer.cursor)
            consumer.advance(len(batch))
        if slow:
            time.sleep(0.001)
    ring.close()
    return ("consumed", which, first, consumer.cursor - first, time.monotonic() - started)


SNAPSHOT_SPEC = {
    "balances": (np.int64, 8192),
    "positions": (np.dtype([("qty", "<i8"), ("cost", "<i8"), ("mark", "<f8"), ("pad", "V8")]), (512, 4)),
    "stamp": (np.int64, ()),
}


def snapshot_writer(name: str, stop):
    """Publishes until told to stop; in every version every element equals the version."""
    with SnapshotWriter.create(name, SNAPSHOT_SPEC) as writer:

        def fill(tables):
            version = writer.version + 1
            tables["balances"][:] = version
            tables["positions"]["qty"] = version
            tables["positions"]["cost"] = version
            tables["positions"]["mark"] = version
            tables["stamp"][...] = version

        while not stop.is_set():
            # Bursts of back-to-back publishes catch readers mid-copy (the seqlock must reject
            # those copies); the pauses between bursts let them finish, since a writer that
            # never pauses starves readers (see snapshot.py).
            for _ in range(20):
                writer.publish(fill)
            time.sleep(0.0005)
        return ("published", writer.version)


def snapshot_reader(name: str, reads: int):
    reader = SnapshotReader.attach(name)
    versions = set()
    last = 0
    for _ in range(reads):
        version, tables = reader.read()
        if version < last:
            raise AssertionError(f"version went back from {last} to {version}")
        last = version
        for table, column in (("balances", None), ("positions", "qty"), ("positions", "cost"),
                              ("positions", "mark"), ("stamp", None)):
            values = tables[table] if column is None else tables[table][column]
            if not (values == version).all():
                raise AssertionError(f"torn read: {table}{'.' + column if column else ''} has "
                                     f"{np.unique(values)[:5]} in version {version}")
        versions.add(version)
    reader.close()
    return ("read", reads, len(versions), reader.retries)


def doorbell_waiter(bell_name: str, flag_name: str, timeout_s: float, block_slice_s: float):
    """Sleeps (after a token spin) until the flag is set; reports when it woke."""
    with Doorbell.attach(bell_name) as bell, Region.attach(flag_name, 1) as flag:
        cell = flag.payload[:8].view(np.int64)
        wait = SpinYieldBlockWait(bell, spins=10, yields=2, block_slice_s=block_slice_s)
        ok = wait.wait_until(lambda: cell.item(0) != 0, timeout_s)
        return ("woke", ok, time.monotonic())


def wait_until_asleep(bell: Doorbell) -> None:
    deadline = time.monotonic() + WAIT_S
    while not bell.sleeping:
        if time.monotonic() > deadline:
            raise AssertionError(f"{bell.name} never went to sleep")
        os.sched_yield()


def ping_pong(bell_ping: str, bell_pong: str, cells_name: str, rounds: int):
    """Answers each ping with a pong, never spinning: on odd rounds at once (racing the other
    side going to sleep), on even rounds only once the other side is asleep."""
    with Doorbell.attach(bell_ping) as ping, Doorbell.attach(bell_pong) as pong, Region.attach(cells_name, 1) as cells:
        counters = cells.payload[: 2 * 64].view(np.int64)
        wait = SpinYieldBlockWait(ping, spins=0, yields=0, block_slice_s=5.0)
        for i in range(1, rounds + 1):
            if not wait.wait_until(lambda: counters.item(0) >= i, WAIT_S):
                raise AssertionError(f"ping {i} never came")
            if i % 2 == 0:
                wait_until_asleep(pong)
            counters[8] = i
            pong.ring()
        return ("ponged", rounds)


def command_trickle(ring_name: str, bell_name: str, seq: int):
    """Writes one record once the consumer's doorbell shows it asleep."""
    ring = CommandRing.attach(ring_name, RECORD)
    with Doorbell.attach(bell_name) as bell:
        wait_until_asleep(bell)
        sent_at = time.monotonic()
        ring.write(make_records(seq, 1))
    ring.close()
    return ("trickled", sent_at)


def forgetful_creator(prefix: str):
    """Creates one of everything and exits without closing: the exit-time safety net must clean up."""
    keep = [
        CommandRing.create(prefix + "-cmd", RECORD, 8),
        EventRing.create(prefix + "-ev", RECORD, 8, ["a"]),
        SnapshotWriter.create(prefix + "-snap", SNAPSHOT_SPEC),
        Doorbell.create(prefix + "-bell"),
        Region.create(prefix + "-region", 1, 64),
    ]
    return ("created", len(keep), sorted(e for e in os.listdir("/dev/shm") if prefix[1:] in e))
