"""Published state tables: one writer, any number of readers that never see a torn table.

The writer keeps two copies of every table (double buffer) and a seqlock per copy: it fills
the copy readers are not pointed at, with that copy's sequence odd while it writes, then
points ``current`` at it. A reader loads ``current``, the copy's sequence, copies the tables,
loads the sequence again and retries if it was odd or changed. Readers never block the
writer, and a writer that dies mid-publish leaves ``current`` on the last complete copy.

Ordering relies on x86-64 TSO (platform.py): the writer's stores (sequence, tables,
sequence, current) become visible in program order, and the reader's loads happen in order.

A reader only fails an attempt if the writer starts writing the copy it is reading, which
takes two publishes during one copy. So publish at a pace (the matcher: every few hundred µs
or slower), not flat out: a writer that publishes twice in every reader's copy time starves
that reader.
"""

from __future__ import annotations

import ast
import json
import os
import time
from typing import Callable, Mapping

import numpy as np

from shm.cursor import CACHE_LINE, Cursor
from shm.platform import require_tso
from shm.region import Region, ShmError

require_tso()

LAYOUT_VERSION = 1
_KIND = b"SNAPSHOT"
_META = np.dtype([("kind", "S8"), ("spec_bytes", "<i8"), ("buffer_bytes", "<i8"), ("reserved", "V40")])
# Byte offsets in the payload: meta, current, then per copy a line holding (sequence, version).
_CURRENT = CACHE_LINE
_COPY_LINES = (2 * CACHE_LINE, 3 * CACHE_LINE)
_SPEC_AT = 4 * CACHE_LINE

Spec = Mapping[str, tuple]
Tables = dict[str, np.ndarray]


def _align(n: int) -> int:
    return -(-n // CACHE_LINE) * CACHE_LINE


def _normalize(spec: Spec) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    tables = []
    for name, (dtype, shape) in spec.items():
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        if not name or dtype.hasobject or any(d < 0 for d in shape):
            raise ValueError(f"table {name!r}: needs a name, plain-data dtype and non-negative shape, got {dtype} {shape}")
        tables.append((name, dtype, shape))
    if not tables:
        raise ValueError("a snapshot needs at least one table")
    return tables


def _encode(tables) -> bytes:
    return json.dumps(
        [[name, repr(np.lib.format.dtype_to_descr(dtype)), list(shape)] for name, dtype, shape in tables]
    ).encode()


def _decode(raw: bytes):
    return [
        (name, np.lib.format.descr_to_dtype(ast.literal_eval(descr)), tuple(shape))
        for name, descr, shape in json.loads(raw)
    ]


class _Snapshot:
    def __init__(self, region: Region, tables, spec_bytes: int):
        self.name = region.name
        self._region = region
        payload = region.payload
        self._current = Cursor.at(payload, _CURRENT)
        self._seq = [Cursor.at(payload, at) for at in _COPY_LINES]
        self._version = [payload[at + 8 : at + 16].view(np.int64) for at in _COPY_LINES]
        buffers_at = _SPEC_AT + _align(spec_bytes)
        buffer_bytes = _buffer_bytes(tables)
        self._copies = []
        for copy in range(2):
            at = buffers_at + copy * buffer_bytes
            views = {}
            for name, dtype, shape in tables:
                size = dtype.itemsize * int(np.prod(shape))
                views[name] = payload[at : at + size].view(dtype).reshape(shape)
                at += _align(size)
            self._copies.append(views)

    def close(self) -> None:
        self._copies = self._seq = self._version = self._current = None
        self._region.close()

    def unlink(self) -> None:
        self._region.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self._region.created_here:
            self.unlink()


def _buffer_bytes(tables) -> int:
    return sum(_align(dtype.itemsize * int(np.prod(shape))) for _, dtype, shape in tables)


class SnapshotWriter(_Snapshot):
    @classmethod
    def create(cls, name: str, arrays_spec: Spec) -> SnapshotWriter:
        """``arrays_spec``: table name -> (dtype, shape). Tables start zeroed, at version 0."""
        tables = _normalize(arrays_spec)
        spec = _encode(tables)
        buffer_bytes = _buffer_bytes(tables)
        region = Region.create(name, LAYOUT_VERSION, _SPEC_AT + _align(len(spec)) + 2 * buffer_bytes)
        meta = region.payload[:CACHE_LINE].view(_META)
        meta["spec_bytes"] = len(spec)
        meta["buffer_bytes"] = buffer_bytes
        region.payload[_SPEC_AT : _SPEC_AT + len(spec)] = np.frombuffer(spec, np.uint8)
        meta["kind"] = _KIND
        del meta
        return cls(region, tables, len(spec))

    @property
    def version(self) -> int:
        """Version of the last publish (0 before the first)."""
        return self._version[self._current.get()].item(0)

    def publish(self, tables: Mapping[str, np.ndarray] | Callable[[Tables], None]) -> int:
        """Publish a new version of every table; return its number.

        Either a mapping with every table (copied in), or a callback that fills the back copy in
        place. The back copy holds the tables as of two publishes ago, so the callback must
        write every element it cares about, not only what changed.
        """
        back = 1 - self._current.get()
        views = self._copies[back]
        if not callable(tables) and set(tables) != set(views):
            raise ValueError(f"publish needs exactly the tables {sorted(views)}, got {sorted(tables)}")
        version = self.version + 1
        seq = self._seq[back]
        seq.set(seq.get() + 1)
        if callable(tables):
            tables(views)
        else:
            for name, view in views.items():
                np.copyto(view, tables[name], casting="safe")
        self._version[back][0] = version
        seq.set(seq.get() + 1)
        self._current.set(back)
        return version


class SnapshotReader(_Snapshot):
    @classmethod
    def attach(cls, name: str) -> SnapshotReader:
        region = Region.attach(name, LAYOUT_VERSION)
        meta = region.payload[:CACHE_LINE].view(_META)[0]
        kind, spec_bytes, buffer_bytes = bytes(meta["kind"]), int(meta["spec_bytes"]), int(meta["buffer_bytes"])
        del meta
        if kind != _KIND:
            region.close()
            raise ShmError(f"shared memory region {name} is not a snapshot (or is still being created)")
        tables = _decode(bytes(region.payload[_SPEC_AT : _SPEC_AT + spec_bytes]))
        if _buffer_bytes(tables) != buffer_bytes or _SPEC_AT + _align(spec_bytes) + 2 * buffer_bytes != region.payload.size:
            region.close()
            raise ShmError(f"snapshot {name} has an inconsistent header")
        reader = cls(region, tables, spec_bytes)
        reader.retries = 0
        return reader

    def read(self, timeout_s: float = 1.0) -> tuple[int, Tables]:
        """A consistent copy of every table and its version (0 and zeros before the first publish).

        Retries (counted in ``retries``) while the writer overwrites the copy being read; gives up
        after ``timeout_s``, which only happens if the writer publishes twice during every copy.
        """
        deadline = time.monotonic() + timeout_s
        attempts = 0
        while True:
            current = self._current.get()
            seq = self._seq[current]
            before = seq.get()
            if not before & 1:
                tables = {name: view.copy() for name, view in self._copies[current].items()}
                version = self._version[current].item(0)
                if seq.get() == before:
                    return version, tables
            attempts += 1
            self.retries += 1
            if attempts % 16 == 0:
                if time.monotonic() > deadline:
                    raise ShmError(f"snapshot {self.name}: no consistent read within {timeout_s} s")
                # The writer keeps lapping us; on a 2-core box let it finish instead of racing it.
                os.sched_yield()
