"""The durable pass's batch in one compiled call: event slots in, a journal batch out.

persistd's journal thread turns the events a pass reads into one batch (persistd/journal.py,
"On-disk format") before its `fdatasync`, on the durable ack's path. Built with numpy
(`journal_records`, then `JournalWriter.append`) that took ~49 µs a pass in the durable
closed loop, against ~110 µs for the sync itself: after each sync the thread runs from cold
caches and pays every numpy call ~2.5x over (docs/tuning.md, "Twenty-second pass").
`pack_batch` gathers the records in one call, into a buffer whose header
`journal.pack_header` writes (as for `append`) and `JournalWriter.append_packed` appends.

The bytes are exactly those of `journal_records` + `append` (tests/test_journal_pack.py
checks them against that path, the oracle), so replay and scanning read them as before.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.records import COMMAND_DTYPE, COMMAND_EVENT_DTYPE, EV_COMMAND, EVENT_BYTES
from persistd.journal import HEADER_BYTES, JOURNAL_RECORD_DTYPE, RECORD_BYTES, pack_header

_SEQ_AT = COMMAND_EVENT_DTYPE.fields["seq"][1]
_ETYPE_AT = COMMAND_EVENT_DTYPE.fields["etype"][1]
_SOURCE_AT = COMMAND_EVENT_DTYPE.fields["source"][1]
_COMMAND_AT = COMMAND_EVENT_DTYPE.fields["command"][1]
_COMMAND_BYTES = COMMAND_DTYPE.itemsize
# a record's fields (JOURNAL_RECORD_DTYPE); the bytes between privileged and command are zero
_RECORD_SEQ_AT = JOURNAL_RECORD_DTYPE.fields["seq"][1]
_RECORD_SOURCE_AT = JOURNAL_RECORD_DTYPE.fields["source"][1]
_RECORD_PRIVILEGED_AT = JOURNAL_RECORD_DTYPE.fields["privileged"][1]
_RECORD_COMMAND_AT = JOURNAL_RECORD_DTYPE.fields["command"][1]

# pack_batch's refusals: the caller takes the numpy path, whose checks say what is wrong
GAP = -1              # a command's seq is not the next one
UNKNOWN_SOURCE = -2   # a source ring privileged_sources does not cover


@njit(cache=True, nogil=True)
def _pack(slots, privileged, expected, out, count):
    """The EV_COMMAND slots of `slots` (rows of event bytes) with seq >= `expected`, as
    records after the `count` already in `out`; returns the new count, or a refusal."""
    for i in range(slots.shape[0]):
        slot = slots[i]
        if slot[_ETYPE_AT] != EV_COMMAND:
            continue
        seq = np.int64(0)
        for b in range(8):
            seq |= np.int64(slot[_SEQ_AT + b]) << (8 * b)
        if seq < expected:
            continue                 # journaled before a restart: read again, not written again
        if seq != expected + count:
            return GAP
        source = slot[_SOURCE_AT]
        if source >= privileged.shape[0]:
            return UNKNOWN_SOURCE
        at = HEADER_BYTES + count * RECORD_BYTES
        for b in range(8):
            out[at + _RECORD_SEQ_AT + b] = slot[_SEQ_AT + b]
        out[at + _RECORD_SOURCE_AT] = source
        out[at + _RECORD_PRIVILEGED_AT] = privileged[source]
        for b in range(_RECORD_PRIVILEGED_AT + 1, _RECORD_COMMAND_AT):
            out[at + b] = 0
        for b in range(_COMMAND_BYTES):
            out[at + _RECORD_COMMAND_AT + b] = slot[_COMMAND_AT + b]
        count += 1
    return count


@njit(cache=True, nogil=True)
def _pack_parts(head, tail, privileged, after_seq, out):
    count = _pack(head, privileged, after_seq + 1, out, 0)
    if count >= 0:
        count = _pack(tail, privileged, after_seq + 1, out, count)
    return count


def batch_buffer(max_records: int) -> np.ndarray:
    """A buffer pack_batch can fill with up to max_records records."""
    return np.zeros(HEADER_BYTES + max_records * RECORD_BYTES, np.uint8)


def pack_batch(event_parts, privileged: np.ndarray, after_seq: int, out: np.ndarray):
    """The journal batch for the EV_COMMAND slots among `event_parts` (the two views of a
    ring's unread event slots) whose seq is past `after_seq`, written into `out`
    (batch_buffer, room for every slot of the parts).

    Returns (count, batch): the number of records and a memoryview of the whole batch
    (header and records), or (0, None) when no command is past after_seq, or (GAP or
    UNKNOWN_SOURCE, None) when the commands do not continue at after_seq + 1 or name a
    source that `privileged` (one 0/1 byte per source ring) lacks: `out` then holds no
    batch, and the numpy path (`journal_records`) says what is wrong."""
    head, tail = (part.view(np.uint8).reshape(len(part), EVENT_BYTES) for part in event_parts)
    count = _pack_parts(head, tail, privileged, after_seq, out)
    if count <= 0:
        return count, None
    pack_header(out, count, after_seq + 1)
    return count, memoryview(out)[:HEADER_BYTES + count * RECORD_BYTES]


def warm() -> None:
    """Load (or, on a cold numba cache, compile) pack_batch before the first pass needs it."""
    slots = np.zeros(1, COMMAND_EVENT_DTYPE)
    pack_batch((slots, slots[:0]), np.zeros(1, np.uint8), 0, batch_buffer(1))
