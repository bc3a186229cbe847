"""persistd/journal_pack.py against its oracle: the batch `journal_records` + `JournalWriter.append`
write, byte for byte, for any mix of event slots split anywhere between the ring's two views,
and its refusals where the numpy path refuses."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.records import COMMAND_EVENT_DTYPE, EV_ACK, EV_COMMAND, EV_TRADE, EVENT_DTYPE
from persistd.journal import JournalWriter, journal_records, read_journal
from persistd.journal_pack import GAP, batch_buffer, pack_batch


def event_slots(kinds, first_seq: int, seed: int) -> np.ndarray:
    """Event slots: an EV_COMMAND for each True in `kinds` (seqs first_seq, first_seq + 1,
    ..., random source and command bytes), another event type for each False."""
    rng = np.random.default_rng(seed)
    slots = np.zeros(len(kinds), COMMAND_EVENT_DTYPE)
    raw = slots.view(np.uint8).reshape(len(kinds), -1)
    raw[:] = rng.integers(0, 256, raw.shape, dtype=np.uint8)     # the other fields: noise
    seq = first_seq
    for i, is_command in enumerate(kinds):
        if is_command:
            slots["etype"][i] = EV_COMMAND
            slots["seq"][i] = seq
            seq += 1
        else:
            slots["etype"][i] = (EV_ACK, EV_TRADE)[i % 2]
    return slots.view(EVENT_DTYPE)


def read_records(directory) -> list:
    return [part.tobytes() for part in read_journal(directory)]


def segment_bytes(directory) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.glob("*.journal")))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.booleans(), min_size=1, max_size=60), cut=st.integers(0, 60),
       journaled=st.integers(0, 5), seed=st.integers(0, 2**32 - 1),
       privileged=st.lists(st.booleans(), min_size=256, max_size=256))
def test_pack_batch_writes_what_the_numpy_path_writes(tmp_path_factory, kinds, cut,
                                                      journaled, seed, privileged):
    """Commands at or below the journal's last seq (read again after a restart) are skipped
    alike; the rest make one batch with the same header, records and CRCs."""
    commands = sum(kinds)
    journaled = min(journaled, commands)
    slots = event_slots(kinds, 1, seed)
    cut = min(cut, len(slots))
    parts = (slots[:cut], slots[cut:])
    flags = np.array(privileged)
    oracle_dir, packed_dir = tmp_path_factory.mktemp("oracle"), tmp_path_factory.mktemp("packed")
    with JournalWriter(oracle_dir) as oracle, JournalWriter(packed_dir) as packed:
        if journaled:     # both journals already hold the first commands
            done = journal_records((slots,), flags)[:journaled]
            oracle.append(done)
            packed.append(done)
        records = journal_records(parts, flags)
        records = records[records["seq"] > journaled]
        oracle.append(records)
        count, batch = pack_batch(parts, flags.astype(np.uint8), journaled,
                                  batch_buffer(len(slots)))
        assert count == len(records)
        if count:
            assert packed.append_packed(batch, count) == oracle.last_seq
        oracle.sync()
        packed.sync()
    assert segment_bytes(packed_dir) == segment_bytes(oracle_dir)
    assert read_records(packed_dir) == read_records(oracle_dir)


@pytest.mark.parametrize("journaled, seqs", [(5, [7, 8]),        # starts past the next seq
                                             (0, [1, 2, 4])])    # skips one inside
def test_pack_batch_refuses_commands_that_do_not_continue_the_journal(journaled, seqs):
    slots = event_slots([True] * len(seqs), 1, 0)
    slots["seq"] = seqs
    out = batch_buffer(len(slots))
    before = out.copy()
    count, batch = pack_batch((slots, slots[:0]), np.zeros(256, np.uint8), journaled, out)
    assert (count, batch) == (GAP, None)
    assert np.array_equal(out[:32], before[:32])      # no header: nothing to write


def test_pack_batch_of_no_new_command_is_empty():
    slots = event_slots([False, True, False, True], 1, 0)
    assert pack_batch((slots[:1], slots[1:]), np.zeros(256, np.uint8), 2,
                      batch_buffer(4)) == (0, None)
