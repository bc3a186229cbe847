"""State snapshots on disk: the matcher's tables at one sequence number.

A snapshot is the raw bytes of the state buffer (engine/state.py lays every table out in one
buffer), so loading one is a single copy. persistd takes them from its own replica of the
state (persistd/replica.py), which it advances by replaying the journal: the live matcher never
stops for a snapshot, and a snapshot at seq S is exactly the state the journal implies at S.

File `SNAPSHOTS/<seq:020d>.snapshot`:

    4096-byte header   JSON, space-padded, newline-terminated: magic, seq, layout_version,
                       nbytes, crc32 of the payload, state_hash (engine.state.state_hash)
    payload            nbytes of state buffer

Written as `.tmp`, fsynced, renamed, directory fsynced: a crash leaves either the whole
snapshot or none. Loading checks magic, layout version, size and checksum; a snapshot that
fails any of them is skipped loudly in favour of an older one (or replay from genesis).
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np

MAGIC = "perpx-snapshot-1"
HEADER_BYTES = 4096
SUFFIX = ".snapshot"
_CHUNK = 16 << 20


class SnapshotInvalid(Exception):
    pass


def snapshot_path(directory, seq: int) -> Path:
    return Path(directory) / f"{seq:020d}{SUFFIX}"


def snapshots(directory) -> list[tuple[int, Path]]:
    """(seq, path) of every snapshot file, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if p.suffix == SUFFIX and p.stem.isdigit():
            out.append((int(p.stem), p))
    return sorted(out)


def _crc32(payload: np.ndarray) -> int:
    crc = 0
    view = memoryview(payload)
    for start in range(0, len(view), _CHUNK):
        crc = zlib.crc32(view[start:start + _CHUNK], crc)
    return crc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(directory, payload: np.ndarray, *, seq: int, layout_version: int,
                   state_hash: str) -> Path:
    """Write `payload` (the uint8 state buffer at `seq`) atomically; returns the file's path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    header = {"magic": MAGIC, "seq": int(seq), "layout_version": int(layout_version),
              "nbytes": int(payload.nbytes), "crc32": _crc32(payload), "state_hash": state_hash}
    text = json.dumps(header).encode()
    if len(text) >= HEADER_BYTES:
        raise ValueError("snapshot header too long")
    final = snapshot_path(d, seq)
    tmp = final.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.ljust(HEADER_BYTES - 1) + b"\n")
        view = memoryview(payload)
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:written + _CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    _fsync_dir(d)
    return final


def read_header(path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    try:
        header = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise SnapshotInvalid(f"{path}: unreadable header") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise SnapshotInvalid(f"{path}: not a perpx snapshot")
    return header


def load_snapshot(path, layout_version: int, into: np.ndarray) -> dict:
    """Copy a snapshot's payload into `into` (a uint8 state buffer); returns its header."""
    header = read_header(path)
    if header["layout_version"] != layout_version:
        raise SnapshotInvalid(f"{path}: layout version {header['layout_version']}, this build "
                              f"expects {layout_version} (engine capacities or code changed)")
    if header["nbytes"] != into.nbytes:
        raise SnapshotInvalid(f"{path}: {header['nbytes']} bytes of state, expected {into.nbytes}")
    if os.path.getsize(path) != HEADER_BYTES + into.nbytes:
        raise SnapshotInvalid(f"{path}: truncated")
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        view = memoryview(into)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:got + _CHUNK])
            if not n:
                raise SnapshotInvalid(f"{path}: truncated")
            got += n
    if _crc32(into) != header["crc32"]:
        raise SnapshotInvalid(f"{path}: checksum mismatch")
    return header


def load_newest(directory, layout_version: int, into: np.ndarray, max_seq: int | None = None,
                log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict | None:
    """Load the newest valid snapshot with seq <= max_seq into `into`; None if there is none.

    An invalid snapshot is reported and skipped: an older one (or genesis) plus a longer replay
    gives the same state.
    """
    for seq, path in reversed(snapshots(directory)):
        if max_seq is not None and seq > max_seq:
            continue
        try:
            return load_snapshot(path, layout_version, into)
        except (SnapshotInvalid, OSError) as e:
            log(f"WARNING: skipping snapshot {path}: {e}")
    return None


def prune(directory, keep: int) -> list[Path]:
    """Delete all but the newest `keep` snapshots (and stray .tmp files); returns the deleted."""
    d = Path(directory)
    gone = []
    for _, path in snapshots(d)[:-keep] if keep else snapshots(d):
        path.unlink(missing_ok=True)
        gone.append(path)
    if d.is_dir():
        for tmp in d.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone
