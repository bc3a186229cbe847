"""Rings of fixed-size records in shared memory: one producer, one or more consumers.

Layout of the region payload (every part starts on a 64-byte cache line)::

    meta            kind, capacity, itemsize, record dtype fingerprint, consumer count
    producer slot   the producer cursor: next sequence to be published
    consumer slots  one line per consumer: cursor, active flag, owner pid, name
    bell names      the doorbell of the producer, then one per consumer
    records         capacity records; sequence s lives in slot s & mask

Cursors are int64 sequence numbers that only grow; ``producer cursor - consumer cursor`` is
what that consumer may read, ``capacity - (producer cursor - slowest active consumer cursor)``
what the producer may write. Publishing is "write the records, then store the cursor" and
reading is "load the cursor, then the records", correct without fences on x86-64 (see
platform.py). Each slot line has one writer, so no cross-process atomic instruction is needed.

A consumer slot is *active* from the moment a consumer joins it until ``deregister()``. Only
active slots hold the producer back. A consumer that dies stays active, so the producer stops
when the ring is full instead of overwriting what it has not read; restarted with
``start="saved"`` it resumes at its cursor. Whoever gives up on it deregisters the slot.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from shm.cursor import CACHE_LINE, Cursor
from shm.doorbell import Doorbell
from shm.platform import full_fence, require_tso
from shm.region import Region, ShmError
from shm.wait import SpinYieldBlockWait, WaitFactory

require_tso()

LAYOUT_VERSION = 1

_META = np.dtype(
    [
        ("kind", "S8"),
        ("capacity", "<i8"),
        ("itemsize", "<i8"),
        ("dtype_fingerprint", "<u8"),
        ("n_consumers", "<i8"),
        ("reserved", "V24"),
    ]
)
_SLOT = np.dtype(
    [
        ("cursor", "<i8"),
        ("active", "<i8"),
        ("owner_pid", "<i8"),
        ("name", "S32"),
        ("reserved", "V8"),
    ]
)
_BELL_NAME = np.dtype("S64")
assert _META.itemsize == _SLOT.itemsize == _BELL_NAME.itemsize == CACHE_LINE
_KIND_LABELS = {b"CMDRING": "a command ring", b"EVTRING": "an event ring"}


def _fingerprint(dtype: np.dtype) -> int:
    """Identifies a record layout, so two processes compiled against different records fail at attach."""
    digest = hashlib.blake2b(repr(dtype.descr).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _check_dtype(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.itemsize == 0 or dtype.itemsize % CACHE_LINE:
        raise ValueError(f"ring records must be plain data of a multiple of {CACHE_LINE} bytes (64 or 128), got {dtype}")
    return dtype


class _Ring:
    """Layout plus the producer side, shared by both kinds of ring."""

    _KIND: bytes

    def __init__(self, region: Region, dtype: np.dtype, bells: list[Doorbell], owned_bells: list[Doorbell],
                 wait: WaitFactory):
        self.name = region.name
        self._region = region
        payload = region.payload
        meta = payload[:CACHE_LINE].view(_META)[0]
        self.capacity = int(meta["capacity"])
        self.mask = self.capacity - 1
        self.dtype = dtype
        n = int(meta["n_consumers"])
        self._producer_cursor = Cursor.at(payload, CACHE_LINE)
        self._slots = payload[2 * CACHE_LINE : (2 + n) * CACHE_LINE].view(_SLOT)
        self._gates = [(self._slots["active"][i : i + 1], Cursor(self._slots["cursor"][i : i + 1])) for i in range(n)]
        records_at = (3 + 2 * n) * CACHE_LINE
        self._record_bytes = payload[records_at : records_at + self.capacity * dtype.itemsize]
        self.records = self._record_bytes.view(dtype)
        self._producer_bell, self._consumer_bells = bells[0], bells[1:]
        self._owned_bells = owned_bells
        self._wait_factory = wait
        self._space_wait = wait(self._producer_bell)
        self.write_cursor = self._producer_cursor.get()
        self._limit = self.write_cursor

    # -- construction -------------------------------------------------------------------

    @classmethod
    def _create(cls, name: str, dtype, capacity: int, consumer_names: Sequence[str],
                consumer_bells: Sequence[str | None], active: bool, wait: WaitFactory):
        dtype = _check_dtype(dtype)
        if capacity < 2 or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two >= 2, got {capacity}")
        n = len(consumer_names)
        bell_names = [f"{name}.bell-p"] + [bell or f"{name}.bell-c{i}" for i, bell in enumerate(consumer_bells)]
        for bell in bell_names:
            if len(bell.encode()) > _BELL_NAME.itemsize:
                raise ValueError(f"doorbell name {bell!r} is longer than {_BELL_NAME.itemsize} bytes; use a shorter ring name")
        created: list[Doorbell] = []
        region = None
        try:
            bells = []
            for bell, given in zip(bell_names, [None] + list(consumer_bells)):
                if given is None:
                    created.append(Doorbell.create(bell))
                    bells.append(created[-1])
                else:
                    bells.append(Doorbell.attach(bell))
            region = Region.create(name, LAYOUT_VERSION, (3 + 2 * n) * CACHE_LINE + capacity * dtype.itemsize)
            payload = region.payload
            meta = payload[:CACHE_LINE].view(_META)
            meta["capacity"] = capacity
            meta["itemsize"] = dtype.itemsize
            meta["dtype_fingerprint"] = _fingerprint(dtype)
            meta["n_consumers"] = n
            slots = payload[2 * CACHE_LINE : (2 + n) * CACHE_LINE].view(_SLOT)
            slots["name"] = [c.encode() for c in consumer_names]
            slots["active"] = active
            payload[(2 + n) * CACHE_LINE : (3 + 2 * n) * CACHE_LINE].view(_BELL_NAME)[:] = [b.encode() for b in bell_names]
            meta["kind"] = cls._KIND
            del meta, slots, payload
            return cls(region, dtype, bells, owned_bells=created, wait=wait)
        except BaseException:
            if region is not None:
                region.close()
                region.unlink()
            for bell in created:
                bell.close()
                bell.unlink()
            raise

    @classmethod
    def _attach(cls, name: str, dtype, wait: WaitFactory):
        dtype = _check_dtype(dtype)
        region = Region.attach(name, LAYOUT_VERSION)
        bells: list[Doorbell] = []
        try:
            meta = region.payload[:CACHE_LINE].view(_META)[0]
            kind, capacity, itemsize = bytes(meta["kind"]), int(meta["capacity"]), int(meta["itemsize"])
            fingerprint, n = int(meta["dtype_fingerprint"]), int(meta["n_consumers"])
            del meta
            if kind != cls._KIND:
                raise ShmError(f"shared memory region {name} is {_KIND_LABELS.get(kind, 'not a finished ring')}, "
                               f"not {_KIND_LABELS[cls._KIND]}")
            if itemsize != dtype.itemsize:
                raise ShmError(f"ring {name} holds {itemsize}-byte records, this code's record dtype is {dtype.itemsize} bytes")
            if fingerprint != _fingerprint(dtype):
                raise ShmError(f"ring {name} was created with another record layout than {dtype}")
            if capacity < 2 or capacity & (capacity - 1) or (3 + 2 * n) * CACHE_LINE + capacity * itemsize != region.payload.size:
                raise ShmError(f"ring {name} has an inconsistent header (capacity {capacity}, {n} consumers)")
            names = region.payload[(2 + n) * CACHE_LINE : (3 + 2 * n) * CACHE_LINE].view(_BELL_NAME)
            for bell in names:
                bells.append(Doorbell.attach(bytes(bell).decode()))
            del names
            return cls(region, dtype, bells, owned_bells=[], wait=wait)
        except BaseException:
            for bell in bells:
                bell.close()
            region.close()
            raise

    # -- producer -----------------------------------------------------------------------

    def free_slots(self) -> int:
        """How many records the producer may write now without overwriting unread ones."""
        slowest = self.write_cursor
        for active, cursor in self._gates:
            # Active flag first, then cursor: pairs with a joining consumer, which stores its
            # cursor before its flag.
            if active.item(0):
                slowest = min(slowest, cursor.get())
        self._limit = slowest + self.capacity
        return self._limit - self.write_cursor

    def known_free_slots(self, refresh_below: int) -> int:
        """Free slots as the consumers' cursors last granted them, read afresh
        (``free_slots``) only when fewer than ``refresh_below`` are left. Never more than
        ``free_slots()`` would say: consumers only move on. For a producer that asks once per
        batch, where reading every consumer's cursor costs more than its batch (the
        matcher's event ring: ~2 µs for four consumers)."""
        free = self._limit - self.write_cursor
        return free if free >= refresh_below else self.free_slots()

    def room(self, wanted: int) -> int:
        """How many of ``wanted`` records fit now (0 to ``wanted``). Reads the consumers'
        cursors only when fewer than ``wanted`` slots are left of what they last granted. A
        producer that writes ``records`` itself, from ``write_cursor`` on, may fill that
        many slots before it publishes them."""
        return max(0, min(wanted, self.known_free_slots(wanted)))

    def publish(self, new_write_cursor: int) -> None:
        """Make records up to ``new_write_cursor`` (exclusive) visible, then wake sleeping consumers.

        The records must already be in ``records[s & mask]``, and the producer must have seen
        room for them in ``free_slots()``.
        """
        if not self.write_cursor <= new_write_cursor <= self._limit:
            raise ValueError(
                f"publish({new_write_cursor}) outside [{self.write_cursor}, {self._limit}]: "
                "a cursor only grows, and only into slots free_slots() granted"
            )
        self.write_cursor = new_write_cursor
        self._producer_cursor.set(new_write_cursor)
        full_fence()
        for bell in self._consumer_bells:
            bell.ring_after_fence()

    def write(self, records: np.ndarray) -> int:
        """Copy as many of ``records`` as fit, publish them once; return how many were written."""
        if records.dtype != self.dtype:
            raise TypeError(f"records have dtype {records.dtype}, ring {self.name} holds {self.dtype}")
        n = self.room(len(records))
        if n <= 0:
            return 0
        start = self.write_cursor & self.mask
        first = min(n, self.capacity - start)
        # As bytes: numpy's structured-record assignment resolves a cast per field on every
        # call (~3 µs per slice, paid twice per write, for a gateway's batch of one or two).
        size = self.dtype.itemsize
        src = np.ascontiguousarray(records[:n]).view(np.uint8)
        self._record_bytes[start * size : (start + first) * size] = src[: first * size]
        self._record_bytes[: (n - first) * size] = src[first * size :]
        self.publish(self.write_cursor + n)
        return n

    def published_cursor(self) -> int:
        """Sequence up to which records are published, as any process sees it (``write_cursor`` is
        the producer's own copy)."""
        return self._producer_cursor.get()

    def wait_for_space(self, n: int = 1, timeout_s: float | None = None) -> bool:
        """Wait until ``n`` records fit; False on timeout."""
        return self._space_wait.wait_until(lambda: self.free_slots() >= n, timeout_s)

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        self.records = self._record_bytes = self._slots = self._producer_cursor = self._gates = None
        self._region.close()
        for bell in [self._producer_bell, *self._consumer_bells]:
            bell.close()

    def unlink(self) -> None:
        """Remove the ring's names; only the creator is expected to."""
        self._region.unlink()
        for bell in self._owned_bells:
            bell.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self._region.created_here:
            self.unlink()


class Consumer:
    """One consumer's view of a ring: its cursor, what it may read, and its doorbell."""

    def __init__(self, ring: _Ring, index: int, cursor: int):
        self._ring = ring
        self.index = index
        self._cursor = cursor
        self._slot = ring._slots[index : index + 1]
        self._stored = Cursor(self._slot["cursor"])
        self._wait = ring._wait_factory(ring._consumer_bells[index])

    @property
    def cursor(self) -> int:
        """Next sequence this consumer will read; everything before it is done."""
        return self._cursor

    def available(self) -> int:
        return self._ring.published_cursor() - self._cursor

    def unread_slots(self, max_n: int) -> tuple[int, int, int]:
        """Up to ``max_n`` unread records as slots of ``records``: (start, first, wrapped) for
        ``records[start:start + first]`` then ``records[:wrapped]`` (0 unless they wrap around
        the end of the ring). For a reader that hands a run of slots on without a view of
        them (the matcher: the whole ring's array, a start and a count)."""
        ring = self._ring
        n = min(max_n, self.available())
        start = self._cursor & ring.mask
        first = min(n, ring.capacity - start)
        return start, first, n - first

    def peek_views(self, max_n: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``max_n`` unread records as two zero-copy views (the second is non-empty when
        the records wrap around the end of the ring). Valid only until ``advance()``: after that
        the producer may overwrite them."""
        start, first, wrapped = self.unread_slots(max_n)
        records = self._ring.records
        return records[start : start + first], records[:wrapped]

    def peek(self, max_n: int) -> np.ndarray:
        """Up to ``max_n`` unread records, in order, as one contiguous copy (stays valid after advance)."""
        head, tail = self.peek_views(max_n)
        return np.concatenate((head, tail)) if len(tail) else head.copy()

    def advance(self, n: int) -> None:
        """Mark ``n`` more records done; the producer may reuse their slots."""
        if n < 0 or n > self.available():
            raise ValueError(f"advance({n}) with {self.available()} records available")
        self._cursor += n
        self._stored.set(self._cursor)
        self._ring._producer_bell.ring()

    def wait(self, min_n: int = 1, timeout_s: float | None = None) -> int:
        """Wait until at least ``min_n`` records are available; return how many are (0 on timeout)."""
        if self._wait.wait_until(lambda: self.available() >= min_n, timeout_s):
            return self.available()
        return 0


class CommandRing(_Ring):
    """Single producer, single consumer: one per gateway, riskd and ops, drained by the matcher.

    The one consumer slot is active from creation, so the producer is held back from the start
    even if the consumer is not running yet. Producer API: ``write``, ``free_slots``,
    ``wait_for_space``. Consumer API: ``available``, ``peek``, ``peek_views``,
    ``unread_slots``, ``advance``, ``wait``, ``cursor``.
    """

    _KIND = b"CMDRING"

    @classmethod
    def create(cls, name: str, dtype, capacity: int, consumer_bell: str | None = None,
               wait: WaitFactory = SpinYieldBlockWait) -> CommandRing:
        """Create the ring and its doorbells.

        ``consumer_bell`` names an existing doorbell to ring instead of a ring-owned one: a
        consumer draining several rings (the matcher) sleeps on one doorbell for all of them.
        """
        return cls._create(name, dtype, capacity, ["consumer"], [consumer_bell], True, wait)

    @classmethod
    def attach(cls, name: str, dtype, wait: WaitFactory = SpinYieldBlockWait) -> CommandRing:
        return cls._attach(name, dtype, wait)

    def __init__(self, region: Region, dtype: np.dtype, bells: list[Doorbell], owned_bells: list[Doorbell],
                 wait: WaitFactory):
        super().__init__(region, dtype, bells, owned_bells, wait)
        self._consumer = Consumer(self, 0, int(self._slots["cursor"][0]))

    @property
    def cursor(self) -> int:
        return self._consumer.cursor

    def available(self) -> int:
        return self._consumer.available()

    def peek(self, max_n: int) -> np.ndarray:
        return self._consumer.peek(max_n)

    def unread_slots(self, max_n: int) -> tuple[int, int, int]:
        return self._consumer.unread_slots(max_n)

    def peek_views(self, max_n: int) -> tuple[np.ndarray, np.ndarray]:
        return self._consumer.peek_views(max_n)

    def advance(self, n: int) -> None:
        self._consumer.advance(n)

    def wait(self, min_n: int = 1, timeout_s: float | None = None) -> int:
        return self._consumer.wait(min_n, timeout_s)


class EventRing(_Ring):
    """Single producer (the matcher), a fixed set of named consumers, backpressure never loss.

    The matcher's compiled code writes straight into ``records`` at ``(write_cursor + i) & mask``
    for ``i < free_slots()``, then Python calls ``publish(write_cursor + n)``.
    """

    _KIND = b"EVTRING"

    @classmethod
    def create(cls, name: str, dtype, capacity: int, consumers: Sequence[str],
               wait: WaitFactory = SpinYieldBlockWait) -> EventRing:
        """Create the ring with one slot per consumer name (the set is fixed for the ring's life)."""
        if not consumers or len(set(consumers)) != len(consumers):
            raise ValueError(f"consumers must be distinct names, got {consumers!r}")
        for consumer in consumers:
            if not consumer or len(consumer.encode()) > 32:
                raise ValueError(f"consumer name {consumer!r} must be 1..32 bytes")
        return cls._create(name, dtype, capacity, list(consumers), [None] * len(consumers), False, wait)

    @classmethod
    def attach(cls, name: str, dtype, wait: WaitFactory = SpinYieldBlockWait) -> EventRing:
        return cls._attach(name, dtype, wait)

    @property
    def consumer_names(self) -> list[str]:
        return [bytes(name).decode() for name in self._slots["name"]]

    def _index(self, which: str | int) -> int:
        if isinstance(which, str):
            names = self.consumer_names
            if which not in names:
                raise ShmError(f"ring {self.name} has no consumer {which!r} (it has {names})")
            return names.index(which)
        if not 0 <= which < len(self._slots):
            raise ShmError(f"ring {self.name} has no consumer slot {which} (it has {len(self._slots)})")
        return which

    def consumer(self, which: str | int, start: str = "current") -> EventConsumer:
        """Take a consumer slot.

        ``start="current"``: join at the producer's current position (what was published
        before is not for us). ``start="saved"``: resume at the slot's saved cursor; the slot
        must be active, i.e. a consumer joined it before and never deregistered.
        """
        index = self._index(which)
        slot = self._slots[index : index + 1]
        owner = int(slot["owner_pid"][0])
        if slot["active"][0] and owner != os.getpid() and _alive(owner):
            raise ShmError(f"consumer {self.consumer_names[index]!r} of ring {self.name} is in use by live pid {owner}")
        stored = Cursor(slot["cursor"])
        if start == "saved":
            if not slot["active"][0]:
                raise ShmError(f"consumer {self.consumer_names[index]!r} of ring {self.name} is not active, "
                               "so nothing was saved for it; join with start='current'")
            slot["owner_pid"] = os.getpid()
            cursor = stored.get()
        elif start == "current":
            stored.set(self._producer_cursor.get())
            slot["owner_pid"] = os.getpid()
            slot["active"] = 1
            # A producer that sized a batch before it saw us active based it on a cursor it had
            # already published (publish fences in Doorbell.ring before it reads our slot), so
            # that cursor is <= the one we load after this fence, and the batch can only have
            # overwritten sequences before it: start there and miss nothing.
            full_fence()
            cursor = self._producer_cursor.get()
            stored.set(cursor)
        else:
            raise ValueError(f"start must be 'current' or 'saved', got {start!r}")
        return EventConsumer(self, index, cursor)

    def wake_consumers(self) -> None:
        """Ring every consumer's doorbell: for a process other than the producer whose progress
        the consumers also wait on (their wait conditions say what they wait for)."""
        full_fence()
        for bell in self._consumer_bells:
            bell.ring_after_fence()

    def consumer_cursor(self, which: str | int) -> int | None:
        """A consumer's saved cursor, or None if its slot is inactive (for monitoring lag)."""
        index = self._index(which)
        return int(self._slots["cursor"][index]) if self._slots["active"][index] else None


class EventConsumer(Consumer):
    def deregister(self) -> None:
        """Give up the slot: the producer stops waiting for it, and its cursor means nothing any more."""
        self._slot["active"] = 0
        self._slot["owner_pid"] = 0
        self._ring._producer_bell.ring()


def _alive(pid: int) -> bool:
    # A killed child counts as alive until its parent reaps it; the supervisor does.
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
