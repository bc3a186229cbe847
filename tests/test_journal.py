"""persistd/journal.py on real files: round trips, reopen, torn tails, corruption, retirement,
OS write failures (RLIMIT_FSIZE in a subprocess), and a hypothesis round-trip property."""

import fcntl
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.records import (COMMAND_EVENT_DTYPE, EV_ACK, EV_COMMAND, EVENT_DTYPE)
from perpx.launch import wait_until
from persistd import journal
from persistd.journal import (HEADER_BYTES, JOURNAL_RECORD_DTYPE, RECORD_BYTES, RETIRED_DIR,
                              JournalCorrupt, JournalError, JournalFollower, JournalWriter,
                              cut_journal, inspect_journal, journal_info, journal_records,
                              marked_synced_seq, read_journal, reclaim_retired, segment_name,
                              segments)

REPO = Path(__file__).resolve().parents[1]


def make_records(first_seq: int, count: int, rng_seed: int = 0) -> np.ndarray:
    """Records with every command field filled, so a byte mix-up anywhere shows."""
    rng = np.random.default_rng(rng_seed + first_seq)
    r = np.zeros(count, dtype=JOURNAL_RECORD_DTYPE)
    r["seq"] = np.arange(first_seq, first_seq + count)
    r["source"] = rng.integers(0, 4, count)
    r["privileged"] = r["source"] == 0
    c = r["command"]
    for name in ("ts_ns", "cid", "oid", "price_ticks", "qty_lots", "amount_atoms"):
        c[name] = rng.integers(-2**62, 2**62, count)
    for name in ("account", "req"):
        c[name] = rng.integers(-2**31, 2**31 - 1, count)
    c["market"] = rng.integers(-1, 500, count)
    for name in ("cmd", "side", "kind", "tif", "flags", "stp"):
        c[name] = rng.integers(0, 256, count)
    return r


def write_batches(directory, sizes, segment_bytes=4096, first_seq=1):
    """Append one batch per size; returns the records written, concatenated."""
    written = []
    with JournalWriter(directory, segment_bytes=segment_bytes) as w:
        seq = first_seq
        for n in sizes:
            batch = make_records(seq, n)
            assert w.append(batch) == seq + n - 1
            written.append(batch)
            seq += n
        w.sync()
    return np.concatenate(written) if written else np.zeros(0, JOURNAL_RECORD_DTYPE)


def read_all(directory, **kw) -> np.ndarray:
    parts = list(read_journal(directory, **kw))
    return np.concatenate(parts) if parts else np.zeros(0, JOURNAL_RECORD_DTYPE)


def batch_offsets(path: Path) -> list[tuple[int, int]]:
    """(offset, byte length) of each batch in a segment, parsed independently of the module."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        count = int.from_bytes(data[pos + 4:pos + 8], "little")
        out.append((pos, HEADER_BYTES + count * RECORD_BYTES))
        pos += HEADER_BYTES + count * RECORD_BYTES
    return out


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


# --- record layout -------------------------------------------------------------------------

def test_record_layout_is_80_bytes_with_command_at_16():
    assert JOURNAL_RECORD_DTYPE.itemsize == 80
    assert JOURNAL_RECORD_DTYPE.fields["seq"][1] == 0
    assert JOURNAL_RECORD_DTYPE.fields["source"][1] == 8
    assert JOURNAL_RECORD_DTYPE.fields["privileged"][1] == 9
    assert JOURNAL_RECORD_DTYPE.fields["command"][1] == 16


def test_journal_records_copy_command_bytes_and_privilege():
    n = 300
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, n * 128, dtype=np.uint8)       # garbage everywhere, then set header
    events = raw.view(EVENT_DTYPE)
    events["etype"] = EV_COMMAND
    events["seq"] = np.arange(1000, 1000 + n)
    events["source"] = rng.integers(0, 3, n)
    privileged_sources = np.array([True, False, True])

    recs = journal_records([events], privileged_sources)

    assert recs.dtype == JOURNAL_RECORD_DTYPE and recs.size == n
    assert np.array_equal(recs["seq"], np.arange(1000, 1000 + n))
    assert np.array_equal(recs["source"], events["source"])
    assert np.array_equal(recs["privileged"], privileged_sources[events["source"]].astype(np.uint8))
    # the command is the event's second half, byte for byte
    command_bytes = raw.reshape(n, 128)[:, 64:]
    assert np.array_equal(recs.view(np.uint8).reshape(n, 80)[:, 16:], command_bytes)
    assert not recs["_pad"].any()
    assert np.array_equal(recs["command"], events.view(COMMAND_EVENT_DTYPE)["command"])


def test_journal_records_pick_the_commands_across_parts_in_order():
    rng = np.random.default_rng(8)
    events = rng.integers(0, 256, 40 * 128, dtype=np.uint8).view(EVENT_DTYPE)
    events["etype"] = EV_ACK
    commands = np.sort(rng.choice(40, 15, replace=False))
    events["etype"][commands] = EV_COMMAND
    events["source"] = rng.integers(0, 2, 40)
    privileged_sources = np.array([False, True])
    # a ring's unread records wrap: head and tail views, and an empty part
    recs = journal_records([events[:23], events[:0], events[23:]], privileged_sources)
    whole = events[commands].view(COMMAND_EVENT_DTYPE)
    assert np.array_equal(recs["seq"], whole["seq"])
    assert np.array_equal(recs["command"], whole["command"])
    assert np.array_equal(recs["privileged"], privileged_sources[whole["source"]].astype(np.uint8))
    assert journal_records([events[:0], events[:0]], privileged_sources).size == 0


def test_journal_records_reject_unknown_sources_and_other_slot_sizes():
    events = np.zeros(3, dtype=EVENT_DTYPE)
    events["etype"] = EV_COMMAND
    events["source"][2] = 5
    with pytest.raises(ValueError, match="source 5 has no entry"):
        journal_records([events], np.array([True, False]))
    with pytest.raises(ValueError, match="128-byte slots"):
        journal_records([np.zeros(3, JOURNAL_RECORD_DTYPE)], np.array([True]))


# --- round trips ---------------------------------------------------------------------------

def test_round_trip_many_batches_across_segments(tmp_path):
    rng = np.random.default_rng(1)
    sizes = [int(x) for x in rng.integers(1, 40, 200)]
    segment_bytes = 8192
    written = write_batches(tmp_path, sizes, segment_bytes=segment_bytes)

    got = read_all(tmp_path)
    assert got.tobytes() == written.tobytes()
    segs = segments(tmp_path)
    assert len(segs) > 5
    for seg in segs:
        assert seg.path.name == segment_name(seg.first_seq)
        first = next(read_journal(tmp_path, from_seq=seg.first_seq))
        assert first["seq"][0] == seg.first_seq
    # a segment only exceeds segment_bytes if its first batch alone does (40*80+32 < 8192)
    assert all(seg.path.stat().st_size <= segment_bytes for seg in segs)
    info = journal_info(tmp_path)
    assert info["first_seq"] == 1 and info["last_seq"] == sum(sizes) == info["records"]
    assert [row[1] for row in info["segments"]] == [s.first_seq for s in segs]
    assert info["segments"][-1][2] == sum(sizes) and info["torn_tail"] is None
    assert sum(row[3] for row in info["segments"]) == len(sizes) * HEADER_BYTES + sum(sizes) * 80


def test_read_from_seq_trims_inside_a_segment(tmp_path):
    written = write_batches(tmp_path, [10] * 50, segment_bytes=2048)
    for from_seq in (1, 2, 17, 250, 499, 500):
        parts = list(read_journal(tmp_path, from_seq=from_seq))
        assert parts[0]["seq"][0] == from_seq
        assert np.concatenate(parts).tobytes() == written[from_seq - 1:].tobytes()
    assert list(read_journal(tmp_path, from_seq=501)) == []


def test_empty_journal(tmp_path):
    d = tmp_path / "new" / "journal"
    with JournalWriter(d) as w:
        assert w.last_seq == 0 and w.durable_seq == 0
        assert w.sync() == 0
        assert w.append(np.zeros(0, JOURNAL_RECORD_DTYPE)) == 0
    assert d.is_dir() and segments(d) == []
    assert list(read_journal(d)) == []
    assert journal_info(d) == {"segments": [], "first_seq": 1, "last_seq": 0, "records": 0,
                               "torn_tail": None}


def test_reopen_continues_at_last_seq_plus_one(tmp_path):
    first = write_batches(tmp_path, [5, 7, 3], segment_bytes=1024)
    with JournalWriter(tmp_path, segment_bytes=1024) as w:
        assert w.last_seq == 15 and w.durable_seq == 15 and w.repairs == []
        with pytest.raises(ValueError, match="starts at seq 15, journal expects 16"):
            w.append(make_records(15, 2))
        more = make_records(16, 20)
        assert w.append(more) == 35
        assert w.last_seq == 35 and w.durable_seq == 15
        assert w.sync() == 35 and w.durable_seq == 35
    assert read_all(tmp_path).tobytes() == np.concatenate([first, more]).tobytes()


def test_non_contiguous_batches_are_refused_and_write_nothing(tmp_path):
    with JournalWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="starts at seq 2, journal expects 1"):
            w.append(make_records(2, 3))
        w.append(make_records(1, 3))
        size = w.segment_path.stat().st_size
        with pytest.raises(ValueError, match="starts at seq 6, journal expects 4"):
            w.append(make_records(6, 3))                 # gap
        with pytest.raises(ValueError, match="starts at seq 3, journal expects 4"):
            w.append(make_records(3, 3))                 # repeat
        holey = make_records(4, 5)
        holey["seq"][3] = 99
        with pytest.raises(ValueError, match="record 3 has seq 99, expected 7"):
            w.append(holey)                              # hole inside the batch
        with pytest.raises(TypeError):
            w.append(make_records(4, 2)["command"])
        assert w.last_seq == 3 and w.segment_path.stat().st_size == size
    assert read_all(tmp_path)["seq"].tolist() == [1, 2, 3]


def test_second_writer_on_the_same_directory_is_refused(tmp_path):
    with JournalWriter(tmp_path):
        with pytest.raises(JournalError, match="already open by another writer"):
            JournalWriter(tmp_path)
    with JournalWriter(tmp_path) as w:          # the lock goes with close()
        assert w.last_seq == 0


# --- torn tails ----------------------------------------------------------------------------

@pytest.mark.parametrize("cut", ["inside_header", "after_header", "inside_payload", "one_short"])
def test_torn_tail_cut_mid_batch_is_repaired_on_reopen(tmp_path, capsys, cut):
    written = write_batches(tmp_path, [4, 6, 5])
    [seg] = segments(tmp_path)
    last_offset, last_len = batch_offsets(seg.path)[-1]
    cut_at = {"inside_header": last_offset + 13, "after_header": last_offset + HEADER_BYTES,
              "inside_payload": last_offset + HEADER_BYTES + 100,
              "one_short": last_offset + last_len - 1}[cut]
    os.truncate(seg.path, cut_at)

    # readers: quiet stop by default, loud when asked
    assert read_all(tmp_path).tobytes() == written[:10].tobytes()
    with pytest.raises(JournalCorrupt, match="torn tail") as exc:
        read_all(tmp_path, tolerate_torn_tail=False)
    assert exc.value.path == seg.path and exc.value.offset == last_offset
    assert journal_info(tmp_path)["last_seq"] == 10
    assert f"offset {last_offset}" in journal_info(tmp_path)["torn_tail"]

    with JournalWriter(tmp_path) as w:
        assert w.last_seq == 10
        assert len(w.repairs) == 1
        assert str(seg.path) in w.repairs[0] and f"{cut_at - last_offset} bytes" in w.repairs[0]
        assert seg.path.stat().st_size == last_offset
        w.append(written[10:])
        w.append(make_records(16, 3))
        w.sync()
    assert "JOURNAL REPAIR" in capsys.readouterr().err
    got = read_all(tmp_path, tolerate_torn_tail=False)
    assert got.tobytes() == np.concatenate([written, make_records(16, 3)]).tobytes()


@pytest.mark.parametrize("where", ["payload", "header"])
def test_flipped_byte_in_last_batch_is_a_torn_tail(tmp_path, where):
    written = write_batches(tmp_path, [4, 6, 5])
    [seg] = segments(tmp_path)
    last_offset, _ = batch_offsets(seg.path)[-1]
    flip_byte(seg.path, last_offset + (HEADER_BYTES + 170 if where == "payload" else 10))

    assert read_all(tmp_path).tobytes() == written[:10].tobytes()
    with JournalWriter(tmp_path) as w:
        assert w.last_seq == 10 and len(w.repairs) == 1
        assert "checksum mismatch" in w.repairs[0]
        w.append(written[10:])
    assert read_all(tmp_path, tolerate_torn_tail=False).tobytes() == written.tobytes()


def test_empty_last_segment_is_continued(tmp_path):
    """A crash right after a roll leaves a 0-byte newest segment: the journal ends before it."""
    written = write_batches(tmp_path, [10] * 6, segment_bytes=2000)
    segs = segments(tmp_path)
    assert len(segs) >= 3
    os.truncate(segs[-1].path, 0)
    lost_from = segs[-1].first_seq

    assert read_all(tmp_path).tobytes() == written[:lost_from - 1].tobytes()
    with JournalWriter(tmp_path, segment_bytes=2000) as w:
        assert w.last_seq == lost_from - 1 and w.repairs == []
        w.append(written[lost_from - 1:])
    assert [s.path for s in segments(tmp_path)] == [s.path for s in segs]
    assert read_all(tmp_path, tolerate_torn_tail=False).tobytes() == written.tobytes()


# --- corruption in the middle --------------------------------------------------------------

@pytest.mark.parametrize("where", ["payload", "header_count", "magic"])
def test_corruption_before_valid_batches_is_refused_not_cut(tmp_path, where):
    write_batches(tmp_path, [4, 6, 5, 3])
    [seg] = segments(tmp_path)
    bad_offset, _ = batch_offsets(seg.path)[1]
    flip_byte(seg.path, bad_offset + {"payload": HEADER_BYTES + 90, "header_count": 4,
                                      "magic": 0}[where])
    before = seg.path.read_bytes()

    with pytest.raises(JournalCorrupt) as exc:
        read_all(tmp_path)
    assert exc.value.path == seg.path and exc.value.offset == bad_offset
    assert str(seg.path) in str(exc.value) and f"at byte {bad_offset}" in str(exc.value)

    with pytest.raises(JournalCorrupt, match="refusing to cut history") as exc:
        JournalWriter(tmp_path)
    assert exc.value.offset == bad_offset
    assert seg.path.read_bytes() == before, "acknowledged history must not be truncated"
    # the refused writer released its directory lock
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_corruption_in_an_older_segment_and_missing_segment(tmp_path):
    write_batches(tmp_path, [10] * 12, segment_bytes=2000)
    segs = segments(tmp_path)
    assert len(segs) >= 4
    # a damaged batch in a non-last segment is corruption even if it is that segment's last batch
    last_offset, _ = batch_offsets(segs[1].path)[-1]
    flip_byte(segs[1].path, last_offset + HEADER_BYTES + 5)
    with pytest.raises(JournalCorrupt) as exc:
        read_all(tmp_path)
    assert exc.value.path == segs[1].path and exc.value.offset == last_offset
    assert "checksum" in exc.value.reason
    # reading from a later segment skips the damaged one unread
    assert read_all(tmp_path, from_seq=segs[2].first_seq)["seq"][0] == segs[2].first_seq

    # a missing middle segment is a gap, found when the read reaches the segment after it
    assert len(segs) >= 5
    os.unlink(segs[3].path)
    with pytest.raises(JournalCorrupt, match="gap") as exc:
        read_all(tmp_path, from_seq=segs[2].first_seq + 1)
    assert exc.value.path == segs[4].path and exc.value.offset == 0


# --- retirement ----------------------------------------------------------------------------

def test_retire_through_removes_only_whole_older_segments(tmp_path):
    written = write_batches(tmp_path, [10] * 20, segment_bytes=2000)
    segs = segments(tmp_path)
    assert len(segs) >= 5
    with JournalWriter(tmp_path, segment_bytes=2000) as w:
        # seq inside segment 2: segments 0 and 1 end before it, segment 2 does not
        through = segs[2].first_seq + 3
        contents = {s.path.name: s.path.read_bytes() for s in segs[:2]}
        assert w.retire_through(through) == [segs[0].path, segs[1].path]
        assert segments(tmp_path) == segs[2:]
        # moved aside whole, for the store process to delete (the journal thread never waits
        # for a deletion); the journal's readers no longer see them
        retired = tmp_path / RETIRED_DIR
        assert {n: (retired / n).read_bytes() for n in os.listdir(retired)} == contents
        assert reclaim_retired(tmp_path) == [segs[0].path.name, segs[1].path.name]
        assert os.listdir(retired) == [] and reclaim_retired(tmp_path) == []
        assert w.retire_through(through) == []
        # even retiring everything keeps the current segment
        assert w.retire_through(w.last_seq) == [s.path for s in segs[2:-1]]
        assert segments(tmp_path) == segs[-1:]
        w.append(make_records(w.last_seq + 1, 4))
    got = read_all(tmp_path, from_seq=segs[-1].first_seq + 1)
    everything = np.concatenate([written, make_records(201, 4)])
    assert got.tobytes() == everything[segs[-1].first_seq:].tobytes()
    with pytest.raises(JournalError, match=f"starts at seq {segs[-1].first_seq}"):
        next(read_journal(tmp_path, from_seq=1))
    info = journal_info(tmp_path)
    assert info["first_seq"] == segs[-1].first_seq and info["last_seq"] == 204
    assert info["records"] == 204 - segs[-1].first_seq + 1


# --- OS write failures ---------------------------------------------------------------------

_FSIZE_CHILD = r"""
import errno, json, os, resource, signal, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from tests.test_journal import make_records
from persistd.journal import JournalWriter

directory, limit_bytes = sys.argv[1], int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # EFBIG instead of death
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
out = {}
w = JournalWriter(directory, segment_bytes=1 << 30)
seq = 1
while True:
    batch = make_records(seq, 7)
    size_before = os.path.getsize(w.segment_path) if w.segment_path else 0
    try:
        w.append(batch)
    except OSError as e:
        out["errno"] = e.errno
        out["failed_seq"] = seq
        out["size_before"] = size_before
        out["size_after_failure"] = os.path.getsize(w.segment_path)
        break
    seq += 7
w.sync()
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))   # the limit is lifted
w.append(batch)                                            # retry the very same records
w.append(make_records(seq + 7, 3))
out["last_seq"] = w.sync()
w.close()
print(json.dumps(out))
"""


def test_write_failure_at_file_size_limit_leaves_a_valid_journal_and_retry_works(tmp_path):
    batch_bytes = HEADER_BYTES + 7 * RECORD_BYTES          # 592
    limit_bytes = 5 * batch_bytes + 200                    # the 6th batch is cut mid-payload
    r = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(tmp_path), str(REPO),
                        str(limit_bytes)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["errno"] == 27                              # EFBIG
    assert out["failed_seq"] == 36
    assert out["size_before"] == 5 * batch_bytes
    assert out["size_after_failure"] == 5 * batch_bytes, "the partial batch was cut off"
    assert out["last_seq"] == 45
    expected = np.concatenate([make_records(s, 7) for s in range(1, 43, 7)] + [make_records(43, 3)])
    assert read_all(tmp_path, tolerate_torn_tail=False).tobytes() == expected.tobytes()


_FSIZE_FILLER_CHILD = r"""
import os, resource, signal, sys
sys.path.insert(0, sys.argv[2])
from tests.test_journal import make_records
from persistd.journal import JournalWriter

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, hard))   # the filler goes past it
with JournalWriter(sys.argv[1]) as w:
    w.start_zero_filler()
    for seq in range(1, 2001, 10):
        w.append(make_records(seq, 10))
        w.sync()
    print(w.last_seq)
"""


def test_a_failing_filler_leaves_the_appends_alone(tmp_path):
    r = subprocess.run([sys.executable, "-c", _FSIZE_FILLER_CHILD, str(tmp_path), str(REPO)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2000"]
    assert r.stderr.count("zero-filling") == 1 and "File too large" in r.stderr
    expected = np.concatenate([make_records(s, 10) for s in range(1, 2001, 10)])
    assert read_all(tmp_path, tolerate_torn_tail=False).tobytes() == expected.tobytes()
    path = segments(tmp_path)[-1].path
    assert path.stat().st_size == data_end(path)


# --- property ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 60), min_size=0, max_size=40),
       segment_bytes=st.integers(HEADER_BYTES + RECORD_BYTES, 6000),
       reopen_every=st.integers(1, 50),
       from_seq=st.integers(1, 1000))
def test_property_any_batches_and_segment_sizes_round_trip(sizes, segment_bytes, reopen_every,
                                                           from_seq):
    with tempfile.TemporaryDirectory() as d:
        written, seq = [], 1
        w = JournalWriter(d, segment_bytes=segment_bytes)
        for i, n in enumerate(sizes):
            if i and i % reopen_every == 0:
                w.close()
                w = JournalWriter(d, segment_bytes=segment_bytes)
                assert w.last_seq == seq - 1
            batch = make_records(seq, n)
            w.append(batch)
            written.append(batch)
            seq += n
        w.sync()
        w.close()
        total = seq - 1
        expected = np.concatenate(written) if written else np.zeros(0, JOURNAL_RECORD_DTYPE)
        assert read_all(d, tolerate_torn_tail=False).tobytes() == expected.tobytes()
        assert read_all(d, from_seq=from_seq).tobytes() == expected[from_seq - 1:].tobytes()
        info = journal_info(d)
        assert info["last_seq"] == total == info["records"]
        for path, first, last, nbytes in info["segments"]:
            assert path.stat().st_size == nbytes
            # a segment only outgrows segment_bytes when it holds a single oversized batch
            assert nbytes <= segment_bytes or len(batch_offsets(path)) == 1


# --- the synced-seq marker, the follower, the operator's tools -----------------------------

def test_damage_at_or_below_the_synced_marker_is_refused_above_it_is_a_torn_tail(tmp_path):
    written = write_batches(tmp_path, [4, 6, 5])
    with JournalWriter(tmp_path) as w:
        w.mark_synced()
    assert marked_synced_seq(tmp_path) == 15
    [seg] = segments(tmp_path)
    last_offset, _ = batch_offsets(seg.path)[-1]
    flip_byte(seg.path, last_offset + HEADER_BYTES + 170)
    with pytest.raises(JournalCorrupt) as exc:
        JournalWriter(tmp_path)
    assert exc.value.offset == last_offset and "seq 11" in str(exc.value)
    with pytest.raises(JournalCorrupt):
        read_all(tmp_path)
    with pytest.raises(JournalCorrupt):
        journal_info(tmp_path)
    info = inspect_journal(tmp_path)
    assert info["problem"]["seq"] == 11 and info["problem"]["acknowledged"]
    assert info["problem"]["offset"] == last_offset

    out = cut_journal(tmp_path)             # the operator's knowing repair
    assert out["last_seq"] == 10 and marked_synced_seq(tmp_path) == 10
    assert read_all(tmp_path, tolerate_torn_tail=False).tobytes() == written[:10].tobytes()
    with JournalWriter(tmp_path) as w:
        assert w.last_seq == 10 and w.repairs == []


def test_follower_reads_only_durable_batches_across_segments(tmp_path):
    written = make_records(1, 60)
    with JournalWriter(tmp_path, segment_bytes=700) as w:
        follower = JournalFollower(tmp_path, from_seq=3)
        assert len(follower.read(0)) == 0
        got, at = [], 0
        for n in (5, 7, 1, 9, 20, 18):
            w.append(written[at:at + n])
            at += n
            w.sync()
            # the writer has appended more (unsynced) than the follower is told about
            part = follower.read(at - n) if at > n else follower.read(0)
            got.append(part)
            got.append(follower.read(at))
        follower.close()
    assert len(segments(tmp_path)) > 3
    assert np.concatenate(got).tobytes() == written[2:].tobytes()


# --- pre-zeroed space (the zero filler) -------------------------------------------------------

@pytest.fixture
def small_zero_steps(monkeypatch):
    """The filler's chunk, piece and gap scaled down, so small segments show every case."""
    monkeypatch.setattr(journal, "_ZERO_CHUNK_BYTES", 16384)
    monkeypatch.setattr(journal, "_ZERO_PIECE_BYTES", 4096)
    monkeypatch.setattr(journal, "_ZERO_GAP_BYTES", 4096)


def data_end(path: Path) -> int:
    return sum(n for _, n in batch_offsets_until_zero(path))


def batch_offsets_until_zero(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos + HEADER_BYTES <= len(data) and data[pos:pos + 4] == b"PXJ1":
        count = int.from_bytes(data[pos + 4:pos + 8], "little")
        out.append((pos, HEADER_BYTES + count * RECORD_BYTES))
        pos += HEADER_BYTES + count * RECORD_BYTES
    return out


def test_records_written_into_pre_zeroed_space_read_back_exactly(tmp_path, small_zero_steps):
    written = make_records(1, 400)
    with JournalWriter(tmp_path, segment_bytes=1 << 20) as w:
        w.start_zero_filler(ahead_bytes=32768)
        w.append(written[:10])
        w.sync()
        path = w.segment_path
        # the filler starts a gap (4096) past the writer's end and fills a chunk (16384)
        wait_until(lambda: path.stat().st_size >= 4096 + 16384, 10,
                   "the filler to zero ahead of the writer")
        zero_start = path.stat().st_size
        follower = JournalFollower(tmp_path, from_seq=1)
        at = 10
        for n in (1, 7, 50, 100, 132, 100):
            w.append(written[at:at + n])
            at += n
            w.sync()
            got = follower.read(at)
            assert got["seq"][-1] == at
        follower.close()
        end = data_end(path)
        assert end == HEADER_BYTES * 7 + 400 * RECORD_BYTES > 4096
        # the appends may have overtaken the filler (they extend the file themselves): it
        # zeroes past them again
        wait_until(lambda: path.stat().st_size > end, 10, "the filler to zero past the data")
        data = path.read_bytes()       # once: the filler may still be extending the file
        assert len(data) > end and data[end:].count(0) == len(data) - end   # zeros follow
        assert zero_start > 4096
        assert read_all(tmp_path, tolerate_torn_tail=False).tobytes() == written.tobytes()
        info = journal_info(tmp_path)
        assert info["last_seq"] == 400 and info["torn_tail"] is None
        assert info["segments"][-1][3] == data_end(path)
        report = inspect_journal(tmp_path)
        assert report["problem"] is None and report["segments"][-1]["bytes"] == data_end(path)
    for from_seq in (1, 300, 400):  # one read brings all, even starting mid-segment
        follower = JournalFollower(tmp_path, from_seq=from_seq)
        assert follower.read(400).tobytes() == written[from_seq - 1:].tobytes()
        follower.close()


def test_trailing_zeros_open_without_repair_and_appends_continue_at_the_data_end(tmp_path):
    first = write_batches(tmp_path, [5, 7, 3], segment_bytes=1 << 20)
    path = segments(tmp_path)[-1].path
    end = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(10000 + 7))       # not a multiple of a header: the end is zeros anyway
    assert journal_info(tmp_path)["last_seq"] == 15
    assert inspect_journal(tmp_path)["problem"] is None
    with JournalWriter(tmp_path, segment_bytes=1 << 20) as w:
        assert w.repairs == [] and w.last_seq == 15
        assert path.stat().st_size == end       # the zeros are cut: only the filler's are trusted
        more = make_records(16, 4)
        w.append(more)
        w.sync()
    assert read_all(tmp_path, tolerate_torn_tail=False).tobytes() == \
        np.concatenate([first, more]).tobytes()


@pytest.mark.parametrize("tear", ["cut_payload", "zero_header"])
def test_torn_batch_followed_by_zeros_is_cut_as_a_torn_tail(tmp_path, tear):
    written = write_batches(tmp_path, [5, 7, 3], segment_bytes=1 << 20)
    path = segments(tmp_path)[-1].path
    last_offset, last_len = batch_offsets(path)[-1]
    data = bytearray(path.read_bytes())
    if tear == "cut_payload":       # the batch's end never reached the disk: zeros there
        data[last_offset + last_len - 100:] = bytes(100)
    else:                           # its header never did, its payload did
        data[last_offset:last_offset + HEADER_BYTES] = bytes(HEADER_BYTES)
    path.write_bytes(bytes(data) + bytes(5000))
    assert read_all(tmp_path).tobytes() == written[:12].tobytes()
    with pytest.raises(JournalCorrupt, match="torn tail"):
        read_all(tmp_path, tolerate_torn_tail=False)
    with JournalWriter(tmp_path, segment_bytes=1 << 20) as w:
        assert len(w.repairs) == 1 and f"offset {last_offset}" in w.repairs[0]
        assert w.last_seq == 12
    assert path.stat().st_size == last_offset


def test_zero_header_followed_by_a_valid_batch_is_damage(tmp_path):
    write_batches(tmp_path, [5, 7, 3], segment_bytes=1 << 20)
    path = segments(tmp_path)[-1].path
    middle_offset, _ = batch_offsets(path)[1]
    data = bytearray(path.read_bytes())
    data[middle_offset:middle_offset + HEADER_BYTES] = bytes(HEADER_BYTES)
    path.write_bytes(bytes(data) + bytes(4096))
    with pytest.raises(JournalCorrupt, match="valid batches") as e:
        JournalWriter(tmp_path, segment_bytes=1 << 20)
    assert e.value.offset == middle_offset
    with pytest.raises(JournalCorrupt):
        read_all(tmp_path)
    with pytest.raises(JournalCorrupt):
        journal_info(tmp_path)
    problem = inspect_journal(tmp_path)["problem"]
    assert problem["offset"] == middle_offset and problem["torn"] is False
    assert path.read_bytes()[middle_offset + HEADER_BYTES:] != bytes(len(data) - middle_offset
                                                                    - HEADER_BYTES + 4096)


def test_the_filler_never_overwrites_records_and_roll_cuts_its_zeros(tmp_path, small_zero_steps):
    """Writes race the filler (small pieces, a small gap, small segments) across many rolls;
    every record reads back, and every finished segment ends at its data."""
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 120, 1500)
    written = make_records(1, int(sizes.sum()))
    with JournalWriter(tmp_path, segment_bytes=65536) as w:
        w.start_zero_filler(ahead_bytes=24576)
        at, zeros_ahead = 0, 0
        for i, n in enumerate(sizes):
            w.append(written[at:at + n])
            at += int(n)
            if i % 5 == 0:
                w.sync()
            if i % 50 == 0:
                path = w.segment_path
                zeros_ahead += path.stat().st_size > data_end(path)
        w.sync()
        assert zeros_ahead > 0          # the filler did work ahead of the writer
        segs = segments(tmp_path)
        assert len(segs) > 10
        for seg in segs[:-1]:
            size = seg.path.stat().st_size
            assert size == data_end(seg.path) and size == sum(n for _, n in batch_offsets(seg.path))
    # closing cut the zeros: a journal closed cleanly ends at its data
    assert segs[-1].path.stat().st_size == data_end(segs[-1].path)
    assert read_all(tmp_path, tolerate_torn_tail=False).tobytes() == written.tobytes()
    with JournalWriter(tmp_path, segment_bytes=65536) as w:
        assert w.repairs == [] and w.last_seq == len(written)


def test_follower_reads_a_batch_that_runs_past_upto_seq(tmp_path):
    """A batch that starts by upto_seq but holds more records than the bounded read brings
    (the store's pass reading up to its next snapshot seq) is read whole, not left for ever."""
    written = make_records(1, 40)
    with JournalWriter(tmp_path) as w:
        w.append(written[:30])           # one batch of seqs 1..30
        w.sync()
        w.append(written[30:])
        w.sync()
        follower = JournalFollower(tmp_path, from_seq=1)
        first = follower.read(5)         # 5 is inside the first batch
        rest = follower.read(40)
        follower.close()
    assert first.tobytes() == written[:30].tobytes()
    assert rest.tobytes() == written[30:].tobytes()


def _append_and_mark(directory, stop, grown):
    """A writer as persistd runs one: append, fdatasync, then the synced-seq marker, until
    `stop`; `grown` once the segment holds enough for a reader's scan to take a while."""
    seq = 1
    with JournalWriter(directory) as w:
        while not stop.is_set():
            w.append(make_records(seq, 16))
            seq += 16
            w.sync()
            w.mark_synced()
            if seq > 20_000:
                grown.set()


def test_readers_of_a_live_journal_never_see_the_marker_ahead_of_the_data(tmp_path):
    """`perpx verify`, the supervisor and the store read a journal that persistd keeps
    appending to. A reader that read the segment and then the marker could find the marker
    past the data it had read (the writer synced and marked in between) and call a healthy
    journal corrupt: "the journal ends at seq N but seq N+1 was synced". Readers take the
    marker first: whatever it says was in the file before they read it."""
    ctx = mp.get_context("spawn")
    stop, grown = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_append_and_mark, args=(str(tmp_path), stop, grown))
    writer.start()
    try:
        assert grown.wait(60), "the writer did not get going"
        deadline = time.monotonic() + 3.0
        reads = 0
        while time.monotonic() < deadline:
            info = journal_info(tmp_path)
            assert info["first_seq"] == 1 and info["last_seq"] >= 20_000
            last = 0
            for records in read_journal(tmp_path, tolerate_torn_tail=True):
                assert records["seq"][0] == last + 1
                last = int(records["seq"][-1])
            assert last >= info["last_seq"]
            reads += 1
        assert reads > 10
    finally:
        stop.set()
        writer.join(30)
        if writer.is_alive():
            writer.kill()
            writer.join()
    assert writer.exitcode == 0
