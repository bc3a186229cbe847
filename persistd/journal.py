"""The append-only command journal: the source of truth the matcher's state is rebuilt from.

Every sequenced command (an EV_COMMAND event in the event ring) is stored here as one 80-byte
record: its sequence number, the source ring it came from, whether that source was privileged,
and the 64-byte command verbatim. Replaying the records in order through the matcher (same
command, same source, same privilege) rebuilds the same state. Sequence numbers start at 1 and
are contiguous: the journal holds every seq exactly once, in order, and anything else is
corruption. This module stores records; it never interprets the commands inside them.

On-disk format
--------------
A journal is a directory of segment files named `{first_seq:020d}.journal`, where first_seq is
the seq of the first record in that segment; segment k therefore holds seqs
name(k) .. name(k+1) - 1. Other file names in the directory are ignored.

A segment is a sequence of batches, nothing else (no file header). A batch is a 32-byte header
followed by `count` records of 80 bytes (all integers little-endian):

    offset  size  field
         0     4  magic        b"PXJ1"
         4     4  count        u32, number of records, >= 1
         8     8  first_seq    i64, seq of the first record
        16     8  last_seq     i64, == first_seq + count - 1
        24     4  payload_crc  u32, zlib.crc32 of the count * 80 record bytes
        28     4  header_crc   u32, zlib.crc32 of header bytes 0..27
        32  80*n  records      JOURNAL_RECORD_DTYPE

Each record's own `seq` field equals first_seq + its index in the batch. Headers and records
are multiples of 16 bytes, so every batch boundary is 16-byte aligned within its file.

A segment's data ends at the end of the file or at the first batch header that is all zeros
(magic 0; fewer than 32 bytes left, all zeros, count too), whichever comes first. What follows
a zero header must be zeros (the writer's pre-zeroed space, see below; only the last segment
has any, rolling cuts it off); a whole valid batch after it is damage, and other non-zero bytes
a torn batch.

Writing and durability
----------------------
One JournalWriter per directory (enforced with flock on the directory). `append` writes one
batch in a single pwrite() call at an explicit offset and never fsyncs; `sync` fdatasyncs the
current segment (group commit: append several batches, sync once, then publish the returned
seq as durable_seq). Rolling to a new segment first cuts the old one to its data end
(ftruncate) and fdatasyncs it, then fsyncs the directory entry of the new one, so only the LAST
segment can ever hold unsynced bytes, or zeros after its data.

Pre-zeroed space: an fdatasync after a write that grows the file must also commit the file's
size through the filesystem's journal (ext4), behind other files' metadata; one that only
overwrites written blocks carries the data alone (measured here, 1 KiB: p50 ~180 against
~118 us). `start_zero_filler()` starts a thread of the writer that keeps written, fdatasync'ed
zeros (up to DEFAULT_ZERO_AHEAD_BYTES, never past segment_bytes) ahead of the writer's end in
the current segment, so appends land in them. The filler never writes where the writer has
written or is writing: the writer claims its batch's bytes (under a lock) before its pwrite,
the filler claims each 64 KiB piece beyond them before its own and drops its plan if the writer
got there first, rolled or cut; a batch that reaches a piece in flight waits for that one pwrite
(rare: the filler works a gap ahead when it is behind). A writer without the filler (tools,
tests) appends past the zeros as before. The filler's failures (no space) are logged and retried;
appends go on without it. Closing a writer cuts the zeros (a journal closed cleanly ends at its
data); opening one cuts the last segment to its data end (trailing zeros included, a crash's),
and the filler re-zeroes from there.

If a write fails (ENOSPC, EFBIG, EIO...) the OSError propagates and the writer truncates the
segment back to the end of its last whole batch, so a retry of the same records lands where the
failed one should have. If a file-size limit (RLIMIT_FSIZE) can apply, the CALLER must ignore
SIGXFSZ (`signal.signal(signal.SIGXFSZ, signal.SIG_IGN)`), otherwise the kernel kills the
process instead of returning EFBIG. A failed fdatasync leaves the writer unusable (the kernel
may already have dropped the dirty pages, so retrying could falsely report success): close it,
reopen, and do not advance durable_seq past what an earlier sync returned.

Crash recovery
--------------
A crash can leave the end of the last segment torn: an incomplete batch, or a last batch whose
checksum does not match (zeros may follow either). Opening a writer cuts such a tail back to
the last whole batch and reports it in `JournalWriter.repairs` (and one loud line each on
stderr). Those bytes were never
synced, so never acknowledged. A bad batch FOLLOWED by a whole valid batch is not a torn tail
but damage to history that may have been acknowledged, and so is a zero header followed by a
whole valid batch: the writer refuses to open and the reader raises JournalCorrupt(path,
offset, reason); an operator has to decide.

The synced-seq marker
---------------------
A torn tail can only hold bytes that were never synced, hence never acknowledged. To tell it
from damage to acknowledged history, persistd records the last synced seq beside the journal,
in the file `synced_seq` (16 bytes: i64 seq, u32 crc32 of those 8 bytes, 4 zero bytes),
rewritten with `JournalWriter.mark_synced()` after each sync and publish (a 16-byte pwrite;
made durable by persistd's store process, off the journal path). It never runs ahead of the
journal's synced bytes, at worst behind them. A damaged batch at or below it is corruption: the
writer refuses to open and read_journal/journal_info raise JournalCorrupt naming the segment,
the byte offset and the seq. Only `cut_journal` (behind `perpx journal repair --yes`) moves the
marker back. An unreadable marker counts as 0 (no knowledge), reported by `marked_synced_seq`.

Readers (read_journal, journal_info) take no lock: they may run while the writer appends and
then see a torn tail, which read_journal tolerates by default (they re-read damage before
believing it, see _read_and_scan). They read the marker before the segments: what it names
was synced, hence in the files, before they read them; read after, it could name a batch
appended meanwhile and make a live journal look damaged. Segments are retired with
`JournalWriter.retire_through(seq)`, which must only be given a seq covered by a durable
snapshot; a reader racing with retirement may get FileNotFoundError. Retiring moves a
segment into `retired/` (one rename: the journal no longer has it); `reclaim_retired` deletes
what is there, from a process that nothing waits for (persistd's store process). Deleting a
64 MiB segment takes ~15 ms of kernel time here (its cached pages freed, its blocks
discarded), which the journal thread paid before a durable pass could go on.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import struct
import sys
import threading
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from engine.records import COMMAND_DTYPE, COMMAND_EVENT_DTYPE, EV_COMMAND, EVENT_BYTES

JOURNAL_RECORD_DTYPE = np.dtype([
    ("seq", "<i8"),
    ("source", "u1"),        # index of the command ring the command came from
    ("privileged", "u1"),    # 1 if that source may send privileged commands (decided at sequencing)
    ("_pad", "u1", (6,)),
    ("command", COMMAND_DTYPE),
])
RECORD_BYTES = 80
assert JOURNAL_RECORD_DTYPE.itemsize == RECORD_BYTES
_RECORD_FIELDS = np.dtype({
    "names": ["seq", "source", "privileged", "command"],
    "formats": ["<i8", "u1", "u1", (np.void, COMMAND_DTYPE.itemsize)],
    "offsets": [JOURNAL_RECORD_DTYPE.fields[f][1] for f in ("seq", "source", "privileged",
                                                            "command")],
    "itemsize": RECORD_BYTES})

MAGIC = b"PXJ1"
# magic, count, first_seq, last_seq, payload_crc, header_crc
_HEADER = struct.Struct("<4sIqqII")
_HEADER_BODY = struct.Struct("<4sIqqI")      # the 28 bytes header_crc covers
HEADER_BYTES = _HEADER.size
_HEADER_CRC_OFFSET = _HEADER_BODY.size
_HEADER_CRC = struct.Struct("<I")
assert HEADER_BYTES == 32 and _HEADER_CRC_OFFSET == 28
_MAX_BATCH_RECORDS = 0xFFFFFFFF              # count is a u32
_MAX_BYTES_PER_RECORD = HEADER_BYTES + RECORD_BYTES   # a batch of one record

# Batch boundaries are 16-byte aligned (32- and 80-byte pieces), so a segment can be viewed as
# 16-byte units and the records gathered with one boolean mask instead of a per-batch loop.
_UNIT_BYTES = 16
_UNIT = np.dtype((np.void, _UNIT_BYTES))
_HEADER_UNITS = HEADER_BYTES // _UNIT_BYTES

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
# The zero filler (JournalWriter.start_zero_filler) keeps up to this much written, synced zero
# space ahead of the writer, refilling below half of it a chunk at a time (one fdatasync each)
# in pieces (one pwrite each, the most a writer whose batch reaches the piece in flight waits
# for, then written out at once, so a writer's fdatasync meanwhile never has more than a piece
# of the filler's zeros to write). It starts a gap past the writer's end when it is behind, so
# the writer's next batches don't meet it.
DEFAULT_ZERO_AHEAD_BYTES = 2 * 1024 * 1024
_ZERO_CHUNK_BYTES = 1024 * 1024
_ZERO_PIECE_BYTES = 64 * 1024
_ZERO_GAP_BYTES = 256 * 1024
_ZERO_ALIGN_BYTES = 4096
_ZERO_RETRY_S = 1.0
_ZEROS = bytes(_ZERO_PIECE_BYTES)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_RANGE_WRITE_AND_WAIT = 1 | 2 | 4    # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER


def _write_out(fd: int, offset: int, nbytes: int) -> None:
    """Write a range's dirty pages to the disk and wait (sync_file_range: data only)."""
    if _libc.sync_file_range(fd, offset, nbytes, _SYNC_RANGE_WRITE_AND_WAIT) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
SYNCED_MARKER = "synced_seq"
RETIRED_DIR = "retired"        # retired segments wait here to be deleted (reclaim_retired)
_MARKER = struct.Struct("<qI4x")
SEGMENT_SUFFIX = ".journal"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.journal$")


class JournalError(Exception):
    """A journal cannot be used as asked (locked, or the requested seqs are not in it)."""


class JournalCorrupt(JournalError):
    """Bytes in a segment are not a valid continuation of the journal."""

    def __init__(self, path, offset: int, reason: str):
        self.path = Path(path)
        self.offset = int(offset)
        self.reason = reason
        super().__init__(f"journal corrupt: {self.path} at byte {self.offset}: {reason}")


class Segment(NamedTuple):
    first_seq: int
    path: Path


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def segments(directory) -> list[Segment]:
    """The segment files of a journal, oldest first. Raises FileNotFoundError if no directory."""
    directory = Path(directory)
    found = []
    for name in os.listdir(directory):
        match = _SEGMENT_NAME.match(name)
        if match:
            found.append(Segment(int(match.group(1)), directory / name))
    found.sort()
    return found


def marked_synced_seq(directory) -> int:
    """The seq the synced-seq marker records (0: no marker, or an unreadable one)."""
    try:
        data = (Path(directory) / SYNCED_MARKER).read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) != _MARKER.size:
        return 0
    seq, crc = _MARKER.unpack(data)
    return seq if zlib.crc32(data[:8]) == crc and seq >= 0 else 0


def _marker_bytes(seq: int) -> bytes:
    head = struct.pack("<q", seq)
    return _MARKER.pack(seq, zlib.crc32(head))


def _check_synced(path, scan, synced: int) -> None:
    """The last segment's scan against the marker's seq (read before the segment wherever a
    writer may be appending: see the module docstring): raise JournalCorrupt if the segment
    ends before the synced seq, naming damage to acknowledged history when its tail is torn."""
    if scan.last_seq >= synced:
        return
    if scan.problem is not None:
        raise JournalCorrupt(path, scan.valid_bytes,
                             f"{scan.problem}: seq {scan.last_seq + 1} is at or below the last "
                             f"synced seq {synced}, so this is damage to acknowledged history, "
                             f"not a torn tail")
    raise JournalCorrupt(path, scan.valid_bytes, f"the journal ends at seq {scan.last_seq} but "
                                                 f"seq {synced} was synced: records are missing")


# What journal_records reads of an event slot and writes of a record, as plain fields: the
# command travels as opaque bytes, so numpy copies it whole instead of field by field.
_SLOT_PICK = np.dtype({
    "names": ["seq", "etype", "source", "command"],
    "formats": ["<i8", "u1", "u1", (np.void, COMMAND_DTYPE.itemsize)],
    "offsets": [COMMAND_EVENT_DTYPE.fields[f][1] for f in ("seq", "etype", "source", "command")],
    "itemsize": EVENT_BYTES})


def pack_header(batch, count: int, first_seq: int) -> None:
    """Write the header of the batch in `batch` (a writable buffer whose `count` records
    already follow the header's HEADER_BYTES): magic, count, seqs and both CRCs."""
    view = memoryview(batch)
    payload_crc = zlib.crc32(view[HEADER_BYTES:HEADER_BYTES + count * RECORD_BYTES])
    _HEADER_BODY.pack_into(batch, 0, MAGIC, count, first_seq, first_seq + count - 1,
                           payload_crc)
    _HEADER_CRC.pack_into(batch, _HEADER_CRC_OFFSET, zlib.crc32(view[:_HEADER_CRC_OFFSET]))


def check_seqs(seqs: np.ndarray, first_seq: int) -> None:
    """Raise ValueError unless `seqs` are first_seq, first_seq + 1, ... (a batch's)."""
    if int(seqs[0]) != first_seq:
        raise ValueError(f"batch starts at seq {int(seqs[0])}, journal expects {first_seq}")
    expected = np.arange(first_seq, first_seq + len(seqs), dtype=np.int64)
    wrong = np.flatnonzero(seqs != expected)
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(f"batch seqs not contiguous: record {i} has seq {int(seqs[i])}, "
                         f"expected {int(expected[i])}")


def journal_records(event_parts, privileged_sources: np.ndarray) -> np.ndarray:
    """Journal records for the EV_COMMAND slots among `event_parts` (arrays of 128-byte event
    slots, such as the two views of a ring's unread records), in order; other events are
    skipped. Built straight from the slots: the command bytes are copied once.

    `privileged_sources[source]` says whether commands from that source ring are privileged;
    the flag is stored per record so replay does not depend on today's configuration.
    """
    picked = []
    for part in event_parts:
        part = np.asarray(part).reshape(-1)
        if part.dtype.itemsize != EVENT_BYTES:
            raise ValueError(f"events must be {EVENT_BYTES}-byte slots, got dtype {part.dtype}")
        if len(part):
            slots = part.view(_SLOT_PICK)
            picked.append(slots[slots["etype"] == EV_COMMAND])
    out = np.zeros(sum(len(p) for p in picked), JOURNAL_RECORD_DTYPE)
    fields = out.view(_RECORD_FIELDS)
    at = 0
    for p in picked:
        into = fields[at:at + len(p)]
        into["seq"] = p["seq"]
        into["source"] = p["source"]
        into["command"] = p["command"]
        at += len(p)
    try:
        fields["privileged"] = np.asarray(privileged_sources, dtype=bool)[fields["source"]]
    except IndexError:
        raise ValueError(f"source {int(fields['source'].max())} has no entry in "
                         f"privileged_sources (length {len(privileged_sources)})") from None
    return out


# --- scanning ------------------------------------------------------------------------------

class _Scan(NamedTuple):
    batch_offsets: list      # byte offset of each whole batch's header
    batch_counts: list
    first_seq: int           # seq the segment starts at (from its name)
    last_seq: int            # seq of the last record in a whole batch; first_seq - 1 if none
    valid_bytes: int         # end of the last whole batch
    problem: str | None      # what is wrong at valid_bytes, None if the segment is clean
    torn: bool               # the problem is a torn tail (nothing whole and valid after it)


def _batch_header_at(data, pos: int):
    """The header fields at pos if pos holds a header whose own checksum is right, else None."""
    if len(data) - pos < HEADER_BYTES:
        return None
    fields = _HEADER.unpack_from(data, pos)
    if fields[0] != MAGIC or zlib.crc32(data[pos:pos + _HEADER_CRC_OFFSET]) != fields[5]:
        return None
    return fields


def _whole_batch_after(data, start: int) -> int | None:
    """Offset of the first complete, checksum-valid batch at or after `start`, else None.

    Demanding a whole valid batch (not just a header) matters: record payloads carry
    client-chosen bytes (cid, price...), so a forged header inside a torn batch's payload must
    not turn a harmless torn tail into a refusal to start.
    """
    mv = memoryview(data)
    pos = data.find(MAGIC, start)
    while pos >= 0:
        fields = _batch_header_at(mv, pos)
        if fields is not None:
            _, count, first_seq, last_seq, payload_crc, _ = fields
            end = pos + HEADER_BYTES + count * RECORD_BYTES
            if (count >= 1 and last_seq - first_seq + 1 == count and end <= len(data)
                    and zlib.crc32(mv[pos + HEADER_BYTES:end]) == payload_crc):
                return pos
        pos = data.find(MAGIC, pos + 1)
    return None


def _all_zero(view) -> bool:
    return not np.frombuffer(view, dtype=np.uint8).any()


def _zero_end(data, pos: int) -> tuple[str | None, bool]:
    """(problem, torn) for a segment whose header at `pos` is all zeros: the end of its data.

    Zeros after the data are the writer's pre-zeroed space (see "Pre-zeroed space"), so the
    normal case is no problem. Non-zero bytes after them are a batch torn before its header
    reached the disk (never synced); a whole valid batch after them is damage.
    """
    if _whole_batch_after(data, pos) is not None:
        return "all-zero batch header with valid batches after it", False
    if not _all_zero(memoryview(data)[pos:]):
        return "all-zero batch header followed by non-zero bytes (a torn batch)", True
    return None, False


def _scan(data: bytes, first_seq: int) -> _Scan:
    """Walk the batches of one segment's bytes, checking checksums and seq contiguity."""
    size = len(data)
    mv = memoryview(data)
    unpack = _HEADER.unpack_from
    crc32 = zlib.crc32
    offsets, counts = [], []
    expected_seq = first_seq
    pos = 0
    problem, torn = None, False
    while pos < size:
        if size - pos < HEADER_BYTES:
            if _all_zero(mv[pos:]):
                break                       # the data's end: zeros too few for a header
            problem, torn = f"incomplete batch header ({size - pos} of {HEADER_BYTES} bytes)", True
            break
        magic, count, batch_first, batch_last, payload_crc, header_crc = unpack(mv, pos)
        if magic != MAGIC and _all_zero(mv[pos:pos + HEADER_BYTES]):
            problem, torn = _zero_end(data, pos)
            break
        if magic != MAGIC or crc32(mv[pos:pos + _HEADER_CRC_OFFSET]) != header_crc:
            problem = "bad batch magic" if magic != MAGIC else "batch header checksum mismatch"
            torn = _whole_batch_after(data, pos + 1) is None
            break
        # The header checksum is right, so the writer wrote these fields: inconsistencies are
        # real corruption (or a bug), never a torn write.
        if count < 1 or batch_last - batch_first + 1 != count:
            problem = f"batch header count {count} does not match seqs {batch_first}..{batch_last}"
            break
        if batch_first != expected_seq:
            kind = "gap" if batch_first > expected_seq else "repeat"
            problem = f"batch starts at seq {batch_first}, expected {expected_seq} ({kind})"
            break
        end = pos + HEADER_BYTES + count * RECORD_BYTES
        if end > size:
            problem, torn = f"incomplete batch ({size - pos} of {end - pos} bytes)", True
            break
        if crc32(mv[pos + HEADER_BYTES:end]) != payload_crc:
            problem = f"payload checksum mismatch in batch of seqs {batch_first}..{batch_last}"
            torn = _whole_batch_after(data, end) is None
            break
        offsets.append(pos)
        counts.append(count)
        expected_seq = batch_last + 1
        pos = end
    return _Scan(offsets, counts, first_seq, expected_seq - 1, pos, problem, torn)


def _read_and_scan(seg: Segment) -> tuple[bytes, _Scan]:
    """A segment's bytes and their scan, for readers without the writer's lock. Damage is
    re-read before it is believed: a read racing with the writer's pwrite into pre-zeroed space
    can see a later batch but not yet the one before it (its header still zeros)."""
    for _ in range(3):
        data = seg.path.read_bytes()
        scan = _scan(data, seg.first_seq)
        if scan.problem is None or scan.torn:
            break
    return data, scan


def _gather_records(data: bytes, scan: _Scan, path) -> np.ndarray:
    """The records of a scanned segment's whole batches as one array (a copy), seq-checked."""
    units = np.frombuffer(data, dtype=_UNIT, count=scan.valid_bytes // _UNIT_BYTES)
    keep = np.ones(units.size, dtype=bool)
    header_units = np.asarray(scan.batch_offsets, dtype=np.int64) // _UNIT_BYTES
    for k in range(_HEADER_UNITS):
        keep[header_units + k] = False
    records = units[keep].view(JOURNAL_RECORD_DTYPE)
    # Checksums prove the bytes are what the writer wrote; this proves the writer wrote what
    # the headers claim (cheap, and replay trusts record seqs).
    expected = np.arange(scan.first_seq, scan.first_seq + records.size, dtype=np.int64)
    wrong = np.flatnonzero(records["seq"] != expected)
    if wrong.size:
        i = int(wrong[0])
        batch = int(np.searchsorted(np.cumsum(scan.batch_counts), i, side="right"))
        index_in_batch = i - (sum(scan.batch_counts[:batch]))
        offset = scan.batch_offsets[batch] + HEADER_BYTES + index_in_batch * RECORD_BYTES
        raise JournalCorrupt(path, offset, f"record has seq {int(records['seq'][i])}, "
                                           f"its batch header says {int(expected[i])}")
    return records


# --- reading -------------------------------------------------------------------------------

def read_journal(directory, from_seq: int = 1,
                 tolerate_torn_tail: bool = True) -> Iterator[np.ndarray]:
    """Yield the journal's records from `from_seq` on, as JOURNAL_RECORD_DTYPE arrays.

    One array per segment (a copy; at most a segment's size in memory), never empty; the first
    record yielded has seq == from_seq. Every checksum and the seq chain across batches and
    segments is verified; segments wholly before from_seq are skipped unread. Raises
    JournalError if the journal starts after from_seq (retired, or lost), JournalCorrupt on
    damage. A torn tail at the end of the last segment ends iteration quietly if
    `tolerate_torn_tail`, else raises JournalCorrupt. If from_seq is past the end, yields
    nothing: callers replaying onto a snapshot should check they reached the seq they expect.
    """
    if from_seq < 1:
        raise ValueError(f"from_seq must be >= 1, got {from_seq}")
    # The marker before the data: the writer marks a seq only once it is synced, so whatever
    # the marker says now is in the files we read next. Read after them, it could name a
    # batch appended since, and a healthy live journal would look damaged.
    synced = marked_synced_seq(directory)
    segs = segments(directory)
    if not segs:
        return
    if segs[0].first_seq > from_seq:
        raise JournalError(f"journal {directory} starts at seq {segs[0].first_seq}, after the "
                           f"requested from_seq {from_seq} (segments retired or missing)")
    start = max(i for i, seg in enumerate(segs) if seg.first_seq <= from_seq)
    expected_seq = segs[start].first_seq
    for i in range(start, len(segs)):
        seg = segs[i]
        is_last = i == len(segs) - 1
        if seg.first_seq != expected_seq:
            kind = "gap" if seg.first_seq > expected_seq else "overlap"
            raise JournalCorrupt(seg.path, 0, f"segment starts at seq {seg.first_seq} but the "
                                 f"journal so far ends at seq {expected_seq - 1} ({kind})")
        data, scan = _read_and_scan(seg)
        if scan.problem is not None:
            if not (is_last and scan.torn):
                raise JournalCorrupt(seg.path, scan.valid_bytes, scan.problem)
            _check_synced(seg.path, scan, synced)
            if not tolerate_torn_tail:
                raise JournalCorrupt(seg.path, scan.valid_bytes, "torn tail: " + scan.problem)
        records = _gather_records(data, scan, seg.path)
        if from_seq > seg.first_seq:
            records = records[from_seq - seg.first_seq:]
        if records.size:
            yield records
        expected_seq = scan.last_seq + 1


def journal_info(directory) -> dict:
    """Segments and seq range, for status displays. Cheap: only the last segment is read.

    Returns {"segments": [(path, first_seq, last_seq, data_bytes)], "first_seq", "last_seq",
    "records", "torn_tail": None or a description}; data_bytes is the end of the last whole
    batch (the last segment's pre-zeroed space is not counted; older segments hold none).
    Non-last segments' last_seq comes from the next segment's name (read_journal verifies it).
    An empty journal has first_seq 1, last_seq 0, records 0. Raises JournalCorrupt if the last
    segment is damaged mid-file.
    """
    synced = marked_synced_seq(directory)     # before the data: see read_journal
    segs = segments(directory)
    if not segs:
        return {"segments": [], "first_seq": 1, "last_seq": 0, "records": 0, "torn_tail": None}
    rows = [(seg.path, seg.first_seq, nxt.first_seq - 1, seg.path.stat().st_size)
            for seg, nxt in zip(segs, segs[1:])]
    last = segs[-1]
    data, scan = _read_and_scan(last)
    if scan.problem is not None and not scan.torn:
        raise JournalCorrupt(last.path, scan.valid_bytes, scan.problem)
    _check_synced(last.path, scan, synced)
    rows.append((last.path, last.first_seq, scan.last_seq, scan.valid_bytes))
    torn_tail = None
    if scan.problem is not None:
        torn_tail = (f"{last.path}: {len(data) - scan.valid_bytes} bytes at offset "
                     f"{scan.valid_bytes}: {scan.problem}")
    return {"segments": rows, "first_seq": segs[0].first_seq, "last_seq": scan.last_seq,
            "records": scan.last_seq - segs[0].first_seq + 1, "torn_tail": torn_tail}


class JournalFollower:
    """Reads, in another process than the writer's, the records the writer has made durable.

    `read(upto_seq)` returns the records after the last one returned, through `upto_seq` (a seq
    the writer published as durable, hence the end of a whole, synced batch), as one array;
    empty if there is nothing new. Keeps its place (segment, byte offset), so each call reads
    only the new bytes; follows the writer into new segments. Damage within what is durable
    raises JournalCorrupt.
    """

    def __init__(self, directory, from_seq: int):
        self.directory = Path(directory)
        self.next_seq = int(from_seq)
        self._fd = None
        self._offset = 0
        self._offset_seq = 0     # the seq of the first record at _offset
        self._segment = None

    def _open_segment(self) -> bool:
        """Open the segment holding next_seq (at its first batch); False if it is not there."""
        segs = [s for s in segments(self.directory) if s.first_seq <= self.next_seq]
        if not segs:
            return False
        seg = segs[-1]
        if self._segment is not None and seg.path == self._segment.path:
            return False                # next_seq is not written yet
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        self._segment, self._offset, self._offset_seq = seg, 0, seg.first_seq
        return True

    def read(self, upto_seq: int, max_bytes: int = 16 << 20) -> np.ndarray:
        # the records' bytes, joined once at the end: np.concatenate of structured arrays
        # promotes their fields in Python per part, ~20 µs per batch, and at 1,000 orders/s
        # every batch holds one record (the store process's pass spent 20 ms a second there)
        chunks = []
        got = 0
        while self.next_seq <= upto_seq and got < max_bytes:
            if self._fd is None and not self._open_segment():
                break
            # Batches that END by upto_seq hold at most this many bytes (>= 1 record each):
            # reading no further keeps the pre-zeroed space ahead of the writer out of most
            # reads. A batch that starts by upto_seq and ends past it is read whole below.
            want = min(max_bytes - got, (upto_seq - self._offset_seq + 1) * _MAX_BYTES_PER_RECORD)
            data = os.pread(self._fd, want, self._offset)
            pos = 0
            while pos + HEADER_BYTES <= len(data) and self.next_seq <= upto_seq:
                fields = _batch_header_at(data, pos)
                if fields is None:
                    if _all_zero(memoryview(data)[pos:pos + HEADER_BYTES]):
                        break    # the end of this segment's data (its pre-zeroed space)
                    raise JournalCorrupt(self._segment.path, self._offset + pos,
                                         "bad batch header inside the durable journal")
                _, count, first, last, payload_crc, _ = fields
                if first > upto_seq:
                    break
                end = pos + HEADER_BYTES + count * RECORD_BYTES
                if end > len(data) == want:
                    # cut by the bound above, not by the file: read this batch whole (the
                    # store's pass stopped for good at a snapshot boundary inside a batch)
                    data = os.pread(self._fd, end, self._offset)
                if end > len(data):
                    break        # the file ends inside this batch (being written): next call
                payload = memoryview(data)[pos + HEADER_BYTES:end]
                if zlib.crc32(payload) != payload_crc:
                    raise JournalCorrupt(self._segment.path, self._offset + pos,
                                         f"payload checksum mismatch in durable batch of seqs "
                                         f"{first}..{last}")
                if last >= self.next_seq:
                    chunks.append(payload[max(0, self.next_seq - first) * RECORD_BYTES:])
                    self.next_seq = last + 1
                self._offset_seq = last + 1
                pos = end
            self._offset += pos
            got += pos
            if pos == 0 and self.next_seq <= upto_seq and not self._open_segment():
                break        # nothing new here, and no later segment yet
        return np.frombuffer(bytearray().join(chunks), JOURNAL_RECORD_DTYPE)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- operator tools ----------------------------------------------------------------------

def inspect_journal(directory) -> dict:
    """Every segment scanned whole: {"segments": [{path, first_seq, last_seq, bytes}],
    "synced_seq", "last_seq", "problem": None or {segment, offset, seq, reason, torn,
    acknowledged}}. The first problem found stops the walk (later segments are listed
    unscanned, last_seq None). `bytes`: a scanned segment's data bytes (the end of its last
    whole batch: pre-zeroed space and a damaged tail not counted), an unscanned one's file
    size. `acknowledged`: the damaged seq is at or below the marker."""
    directory = Path(directory)
    synced = marked_synced_seq(directory)
    rows, problem = [], None
    expected = None
    segs = segments(directory)
    for i, seg in enumerate(segs):
        if problem is not None:
            rows.append({"path": str(seg.path), "first_seq": seg.first_seq, "last_seq": None,
                         "bytes": seg.path.stat().st_size})
            continue
        data = seg.path.read_bytes()
        if expected is not None and seg.first_seq != expected:
            problem = {"segment": str(seg.path), "offset": 0, "seq": expected,
                       "reason": f"segment starts at seq {seg.first_seq}, expected {expected}",
                       "torn": False}
        scan = _scan(data, seg.first_seq)
        rows.append({"path": str(seg.path), "first_seq": seg.first_seq,
                     "last_seq": scan.last_seq, "bytes": scan.valid_bytes})
        if problem is None and scan.problem is not None:
            problem = {"segment": str(seg.path), "offset": scan.valid_bytes,
                       "seq": scan.last_seq + 1, "reason": scan.problem,
                       "torn": scan.torn and i == len(segs) - 1}
        expected = scan.last_seq + 1
    last = rows[-1]["last_seq"] if rows and problem is None else (
        problem["seq"] - 1 if problem else 0)
    if problem is None and last < synced:
        problem = {"segment": str(segs[-1].path) if segs else str(directory),
                   "offset": rows[-1]["bytes"] if rows else 0, "seq": last + 1,
                   "reason": f"the journal ends at seq {last} but seq {synced} was synced",
                   "torn": False}
    if problem is not None:
        problem["acknowledged"] = problem["seq"] <= synced
    return {"segments": rows, "synced_seq": synced, "last_seq": last, "problem": problem}


def cut_journal(directory) -> dict:
    """The operator's repair: cut the journal at its first problem (inspect_journal), delete
    the segments after it, and lower the synced-seq marker to the new end. Records after the
    cut are gone for good, acknowledged or not. Refuses while a writer holds the journal.
    Returns {"last_seq", "cut_bytes", "deleted": [paths], "problem"}."""
    directory = Path(directory)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JournalError(f"journal {directory} is open by a writer (is persistd "
                               f"running? stop the exchange first)") from None
        info = inspect_journal(directory)
        problem = info["problem"]
        out = {"last_seq": info["last_seq"], "cut_bytes": 0, "deleted": [], "problem": problem}
        if problem is None:
            return out
        bad = Path(problem["segment"])
        found = False
        for seg in segments(directory):
            if seg.path == bad:
                found = True
                size = seg.path.stat().st_size
                os.truncate(seg.path, problem["offset"])
                out["cut_bytes"] += size - problem["offset"]
                fd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            elif found:
                out["cut_bytes"] += seg.path.stat().st_size
                os.unlink(seg.path)
                out["deleted"].append(str(seg.path))
        last = problem["seq"] - 1
        marker = directory / SYNCED_MARKER
        tmp = directory / (SYNCED_MARKER + ".tmp")
        tmp.write_bytes(_marker_bytes(min(info["synced_seq"], last)))
        fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, marker)
        os.fsync(dir_fd)
        out["last_seq"] = last
        return out
    finally:
        os.close(dir_fd)


# --- writing -------------------------------------------------------------------------------

def _fsync_directory(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reclaim_retired(directory) -> list[str]:
    """Delete the segments JournalWriter.retire_through moved aside; returns their names.
    Costly (see the module docstring), so never run where a durable ack waits for it."""
    retired = Path(directory) / RETIRED_DIR
    try:
        names = sorted(os.listdir(retired))
    except FileNotFoundError:
        return []
    if names:
        _fsync_directory(directory)         # the renames first (see retire_through)
    for name in names:
        try:
            os.unlink(retired / name)
        except FileNotFoundError:
            pass
    return names


class JournalWriter:
    """The single writer of a journal directory. See the module docstring for the protocol."""

    def __init__(self, directory, segment_bytes: int = DEFAULT_SEGMENT_BYTES):
        if segment_bytes < HEADER_BYTES + RECORD_BYTES:
            raise ValueError(f"segment_bytes must hold at least one batch of one record "
                             f"({HEADER_BYTES + RECORD_BYTES}), got {segment_bytes}")
        self.directory = Path(directory)
        self.segment_bytes = int(segment_bytes)
        self.repairs: list[str] = []
        self._dir_fd = None
        self._fd = None                     # current (last) segment; None: journal empty
        self._segment_path = None
        self._segment_used_bytes = 0        # end of the last whole batch in the current segment
        self._last_seq = 0
        self._durable_seq = 0               # last seq covered by a successful fdatasync
        self._unusable = None               # why, after a failed fdatasync
        self._pending_truncate_bytes = None  # a failed write's leftovers not yet cut off
        self._marker_fd = None
        # Shared with the zero filler thread, under _fill_lock: the segment it may fill (None
        # while there is none or while rolling), a generation bumped whenever that changes or
        # the writer cuts it (the filler drops its plan), the end of what the writer has written
        # or is writing there, the end of what the filler has filled or is filling, and the
        # filler's pwrite in flight (start, end).
        self._fill_lock = threading.Condition(threading.Lock())
        self._fill_path = None
        self._fill_generation = 0
        self._reserved_bytes = 0
        self._filled_bytes = 0
        self._zero_piece = None
        self._zero_ahead_bytes = 0
        self._filler = None
        self._filler_stop = False
        created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JournalError(f"journal {self.directory} is already open by another writer")
            if created:
                _fsync_directory(self.directory.parent)
            self._open_last_segment()
        except BaseException:
            self.close()
            raise

    def _open_last_segment(self) -> None:
        segs = segments(self.directory)
        if not segs:
            synced = marked_synced_seq(self.directory)
            if synced:
                raise JournalCorrupt(self.directory, 0, f"no segments, but seq {synced} was "
                                                        f"synced: the journal is missing")
            return
        seg = segs[-1]
        data = seg.path.read_bytes()
        scan = _scan(data, seg.first_seq)
        if scan.problem is not None and not scan.torn:
            raise JournalCorrupt(seg.path, scan.valid_bytes,
                                 scan.problem + "; valid batches follow, refusing to cut history")
        synced = marked_synced_seq(self.directory)
        _check_synced(seg.path, scan, synced)
        _gather_records(data, scan, seg.path)   # seq-checks the records we will build on
        fd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if scan.problem is not None:
                self._report_repair(
                    f"JOURNAL REPAIR: cut torn tail of {seg.path}: {len(data) - scan.valid_bytes} "
                    f"bytes at offset {scan.valid_bytes} ({scan.problem}); journal now ends at "
                    f"seq {scan.last_seq}")
            if len(data) > scan.valid_bytes:
                # A torn tail, or pre-zeroed space (cut too: the filler re-zeroes ahead of the
                # writer, and only zeros it wrote and synced itself are vouched for).
                os.ftruncate(fd, scan.valid_bytes)
            # Whatever a crashed predecessor left in the page cache (and our cut) becomes durable
            # now, so everything up to last_seq may be reported as durable.
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._segment_path = seg.path
        self._segment_used_bytes = scan.valid_bytes
        self._last_seq = self._durable_seq = scan.last_seq
        self._fill_segment(seg.path, scan.valid_bytes)

    def _report_repair(self, message: str) -> None:
        self.repairs.append(message)
        print(message, file=sys.stderr, flush=True)

    @property
    def last_seq(self) -> int:
        """Seq of the last appended record (0 for an empty journal); not necessarily durable."""
        return self._last_seq

    @property
    def durable_seq(self) -> int:
        """Seq of the last record known to be on stable storage."""
        return self._durable_seq

    @property
    def segment_path(self) -> Path | None:
        return self._segment_path

    def _check_usable(self) -> None:
        if self._dir_fd is None:
            raise ValueError("journal writer is closed")
        if self._unusable is not None:
            raise OSError(errno.EIO, f"journal writer unusable: {self._unusable}; reopen it")
        if self._pending_truncate_bytes is not None:
            # A failed append left bytes we could not cut; building on them would hide a
            # partial batch in the middle of the journal.
            os.ftruncate(self._fd, self._pending_truncate_bytes)
            self._fill_segment(self._segment_path, self._pending_truncate_bytes)
            self._pending_truncate_bytes = None

    def append(self, records: np.ndarray) -> int:
        """Append one batch whose seqs are last_seq+1, last_seq+2, ... Returns the new last_seq.

        Does not fsync (call sync()). An empty array is a no-op. On an OSError the segment is
        cut back to the last whole batch and the same records may be retried.
        """
        self._check_usable()
        if not isinstance(records, np.ndarray) or records.dtype != JOURNAL_RECORD_DTYPE:
            raise TypeError("append takes a numpy array of JOURNAL_RECORD_DTYPE")
        records = np.ascontiguousarray(records).reshape(-1)
        count = records.size
        if count == 0:
            return self._last_seq
        if count > _MAX_BATCH_RECORDS:
            raise ValueError(f"a batch holds at most {_MAX_BATCH_RECORDS} records, got {count}")
        first_seq = self._last_seq + 1
        check_seqs(records["seq"], first_seq)
        batch = np.empty(HEADER_BYTES + records.nbytes, np.uint8)
        batch[HEADER_BYTES:] = records.view(np.uint8)
        pack_header(batch, count, first_seq)
        return self.append_packed(batch, count)

    def append_packed(self, batch, count: int) -> int:
        """Append one whole batch, header and `count` records, already built for seqs
        last_seq+1 .. last_seq+count (persistd/journal_pack.py builds them; `append` from
        records). Returns the new last_seq. As `append`: no fsync, cut back on an OSError."""
        self._check_usable()
        first_seq = self._last_seq + 1
        if self._fd is None or (self._segment_used_bytes > 0 and
                                self._segment_used_bytes + len(batch) > self.segment_bytes):
            self._roll(first_seq)
        self._write_batch(batch)
        self._last_seq = first_seq + count - 1
        return self._last_seq

    def _write_batch(self, batch) -> None:
        start = self._segment_used_bytes
        if self._filler is not None:
            self._reserve(start + len(batch))
        view = memoryview(batch)
        written = 0
        try:
            # One pwrite normally; a short write (e.g. at RLIMIT_FSIZE) is continued so the
            # next call reports the actual error.
            while written < len(batch):
                n = os.pwrite(self._fd, view[written:], start + written)
                if n <= 0:
                    raise OSError(errno.EIO, f"pwrite to {self._segment_path} wrote nothing")
                written += n
        except BaseException:
            self._cut_back_to(start)
            raise
        self._segment_used_bytes = start + len(batch)

    def _cut_back_to(self, offset: int) -> None:
        self._fill_segment(None, offset)
        try:
            os.ftruncate(self._fd, offset)
        except OSError as e:
            self._pending_truncate_bytes = offset
            print(f"JOURNAL: could not cut {self._segment_path} back to {offset} bytes after a "
                  f"failed write ({e}); appends refused until it can", file=sys.stderr, flush=True)
            return
        self._fill_segment(self._segment_path, offset)

    def _roll(self, first_seq: int) -> None:
        """Start a new segment whose first record will be first_seq."""
        if self._fd is not None:
            # The old segment ends at its data: its pre-zeroed space is cut (the filler is
            # stopped on it first, so none lands after the cut).
            self._fill_segment(None, 0)
            if os.fstat(self._fd).st_size > self._segment_used_bytes:
                os.ftruncate(self._fd, self._segment_used_bytes)
            # The old segment must be durable before a later one exists, or a crash could
            # leave a hole in the middle of the journal rather than a torn tail at its end.
            self._sync_current()
        path = self.directory / segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.fsync(self._dir_fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._segment_path = path
        self._segment_used_bytes = 0
        self._fill_segment(path, 0)

    def _sync_current(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            self._unusable = f"fdatasync of {self._segment_path} failed ({e})"
            raise
        self._durable_seq = self._last_seq

    def sync(self) -> int:
        """fdatasync the current segment; returns the seq now durable (publish as durable_seq)."""
        self._check_usable()
        if self._fd is not None:
            self._sync_current()
        return self._durable_seq

    def mark_synced(self) -> None:
        """Record durable_seq in the synced-seq marker (one 16-byte pwrite, no fsync: whoever
        fdatasyncs `marker_path` makes it durable; until then it is merely behind)."""
        if self._marker_fd is None:
            self._marker_fd = os.open(self.marker_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                                      0o644)
        os.pwrite(self._marker_fd, _marker_bytes(self._durable_seq), 0)

    @property
    def marker_path(self) -> Path:
        return self.directory / SYNCED_MARKER

    def retire_through(self, seq: int) -> list[Path]:
        """Retire the oldest segments whose every record has seq <= `seq`, never the current
        one: each is moved into `retired/` (a rename), for reclaim_retired to delete.

        Only pass a seq covered by a durable snapshot. Returns the retired segments' paths in
        the journal, oldest first.
        """
        if self._dir_fd is None:
            raise ValueError("journal writer is closed")
        segs = segments(self.directory)
        retired = []
        for seg, following in zip(segs, segs[1:]):       # the last segment is never a candidate
            if following.first_seq - 1 > seq or seg.path == self._segment_path:
                break
            retired.append(seg.path)
        if retired:
            os.makedirs(self.directory / RETIRED_DIR, exist_ok=True)
        # not fsynced here (a directory fsync is a filesystem commit, 1-3 ms): a rename that a
        # crash loses leaves an old, whole segment in the journal, retired again later;
        # reclaim_retired makes the renames durable before it deletes anything
        for path in retired:
            os.rename(path, self.directory / RETIRED_DIR / path.name)
        return retired

    # -- the zero filler ---------------------------------------------------------------------
    def start_zero_filler(self, ahead_bytes: int = DEFAULT_ZERO_AHEAD_BYTES) -> None:
        """Keep up to `ahead_bytes` of written, fdatasync'ed zeros ahead of the writer in the
        current segment (never past segment_bytes), from a thread of this writer, so that the
        append path's fdatasync overwrites allocated blocks and carries no size change. Appends
        never wait for it, except a batch reaching a piece of zeros being written (one
        64 KiB pwrite). Stopped by close(). Start it after forking children: it is a thread."""
        if self._dir_fd is None:
            raise ValueError("journal writer is closed")
        if ahead_bytes <= 0 or self._filler is not None:
            return
        self._zero_ahead_bytes = int(ahead_bytes)
        self._fill_segment(self._segment_path, self._segment_used_bytes)
        self._filler = threading.Thread(target=self._zero_fill_loop, name="journal-zero-filler",
                                        daemon=True)
        self._filler.start()

    def _fill_segment(self, path, used_bytes: int) -> None:
        """Point the filler at `path` (None: nowhere), whose data ends at used_bytes; waits for
        its pwrite in flight, so no zeros it planned before land after this returns."""
        with self._fill_lock:
            while self._zero_piece is not None:
                self._fill_lock.wait()
            self._fill_path = path
            self._fill_generation += 1
            self._reserved_bytes = self._filled_bytes = used_bytes
            self._fill_lock.notify_all()

    def _reserve(self, end_bytes: int) -> None:
        """Claim the current segment up to end_bytes for a batch, before writing it there."""
        with self._fill_lock:
            while self._zero_piece is not None and self._zero_piece[0] < end_bytes:
                self._fill_lock.wait()      # rare: the batch reaches zeros being written
            self._reserved_bytes = end_bytes
            if self._filled_bytes - end_bytes < self._zero_ahead_bytes // 2:
                self._fill_lock.notify_all()

    def _next_zero_chunk(self):
        """Under _fill_lock: (generation, path, start, end) of the next chunk to fill, or None."""
        if self._fill_path is None:
            return None
        want_end = min(self.segment_bytes, self._reserved_bytes + self._zero_ahead_bytes)
        start = self._filled_bytes
        if start < self._reserved_bytes + _ZERO_GAP_BYTES:
            # Behind (a new segment, or a writer faster than the filler): start a gap ahead,
            # so the batches that follow don't reach the zeros being written.
            start = -(-(self._reserved_bytes + _ZERO_GAP_BYTES) // _ZERO_ALIGN_BYTES) \
                * _ZERO_ALIGN_BYTES
        if start >= want_end or self._filled_bytes - self._reserved_bytes >= \
                min(self._zero_ahead_bytes // 2, want_end - self._reserved_bytes):
            return None     # enough ahead: fill in big chunks, each one size change, not many
        return (self._fill_generation, self._fill_path, start,
                min(want_end, start + _ZERO_CHUNK_BYTES))

    def _zero_fill_loop(self) -> None:
        # The filler writes through its own open file description: a failed writeback is then
        # reported to the writer's next fdatasync as well (Linux reports it once per file
        # description), never consumed by the filler's alone.
        fd, fd_path = None, None
        failing = False
        try:
            while True:
                with self._fill_lock:
                    while not self._filler_stop and (chunk := self._next_zero_chunk()) is None:
                        self._fill_lock.wait(1.0)
                    if self._filler_stop:
                        return
                generation, path, start, end = chunk
                try:
                    if fd_path != path:
                        if fd is not None:
                            os.close(fd)
                            fd = None
                        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                        fd_path = path
                    self._zero_fill(fd, generation, start, end)
                    failing = False
                except OSError as e:
                    # No space, or the segment was rolled away: appends go on, past the zeros.
                    if not failing:     # once per streak: the disk may be full for a while
                        failing = True
                        try:
                            print(f"JOURNAL: zero-filling {path} ahead of the writer failed "
                                  f"({e}); retrying every {_ZERO_RETRY_S:g} s", file=sys.stderr,
                                  flush=True)
                        except OSError:
                            pass        # stderr on the full disk: losing the line is fine
                    with self._fill_lock:
                        self._fill_lock.wait_for(lambda: self._filler_stop, _ZERO_RETRY_S)
        finally:
            if fd is not None:
                os.close(fd)

    def _zero_fill(self, fd: int, generation: int, start: int, end: int) -> None:
        pos = start
        while pos < end:
            piece_end = min(end, pos + _ZERO_PIECE_BYTES)
            with self._fill_lock:
                if (self._filler_stop or self._fill_generation != generation
                        or pos < self._reserved_bytes):
                    break                   # the writer got here, rolled, or cut: re-plan
                self._zero_piece = (pos, piece_end)
                self._filled_bytes = max(self._filled_bytes, piece_end)
            try:
                written = os.pwrite(fd, _ZEROS[:piece_end - pos], pos)
                if written <= 0:
                    raise OSError(errno.EIO, "pwrite of zeros wrote nothing")
            finally:
                with self._fill_lock:
                    self._zero_piece = None
                    self._fill_lock.notify_all()
            _write_out(fd, pos, written)
            pos += written
        os.fdatasync(fd)

    def close(self) -> None:
        """Close the files and release the lock. Does not sync: call sync() first. Cuts the
        pre-zeroed space, so a journal closed cleanly ends at its data (a crash leaves it)."""
        if self._filler is not None:
            with self._fill_lock:
                self._filler_stop = True
                self._fill_lock.notify_all()
            self._filler.join()
            self._filler = None
            if (self._fd is not None and self._unusable is None
                    and self._pending_truncate_bytes is None):
                try:
                    if os.fstat(self._fd).st_size > self._segment_used_bytes:
                        os.ftruncate(self._fd, self._segment_used_bytes)
                except OSError:
                    pass        # zeros after the data are valid: the next open cuts them
        if self._marker_fd is not None:
            os.close(self._marker_fd)
            self._marker_fd = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)      # releases the flock
            self._dir_fd = None

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
