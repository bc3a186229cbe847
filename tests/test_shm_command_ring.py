import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shm.doorbell import Doorbell
from shm.region import ShmError
from shm.ring import CommandRing, EventRing
from shm.wait import SpinYieldBlockWait
from tests.shm_workers import RECORD, children, make_records, shm_prefix, verify  # noqa: F401  (fixtures)


def test_ten_million_records_across_processes(shm_prefix, children):
    total = 10_000_000
    name = shm_prefix + "-cmd"
    with CommandRing.create(name, RECORD, capacity=1 << 14):
        # Batch sizes that never line up with the capacity, so writes and reads wrap all the time.
        children.start("command_consumer", name, total, 3001)
        children.start("command_producer", name, total, [4096, 4093, 2047, 509])
        reports = {r[0]: r for r in children.collect(2, timeout_s=60)}
    assert reports["consumed"][1] == total
    assert reports["produced"][1] == total
    print(f"\n10M records: producer {reports['produced'][3]:.2f} s ({reports['produced'][2]} waits for space), "
          f"consumer {reports['consumed'][2]:.2f} s")


def test_wraparound_with_odd_batches(shm_prefix):
    rng = np.random.default_rng(7)
    with CommandRing.create(shm_prefix + "-wrap", RECORD, capacity=64) as ring:
        sent = 0
        for _ in range(3000):
            sent += ring.write(make_records(sent, int(rng.integers(1, 100))))
            assert 0 <= ring.free_slots() == 64 - (sent - ring.cursor)
            batch = ring.peek(int(rng.integers(1, 100)))
            verify(batch, ring.cursor)
            ring.advance(len(batch))
        assert ring.cursor > 50 * 64, "went round the ring many times"


def test_strided_and_contiguous_batches_wrap_alike(shm_prefix):
    # write() copies a contiguous batch as bytes and a strided one record by record.
    with CommandRing.create(shm_prefix + "-strided", RECORD, capacity=16) as ring:
        sent = 0
        for i, n in enumerate((5, 7, 9, 3, 11, 6, 13, 2, 15, 4)):
            if i % 2:
                spread = np.zeros(2 * n, RECORD)
                spread[::2] = make_records(sent, n)
                batch = spread[::2]
                assert not batch.flags.c_contiguous
            else:
                batch = make_records(sent, n)
            assert ring.write(batch) == n
            sent += n
            got = ring.peek(n)
            verify(got, sent - n)
            ring.advance(n)
        assert sent > 4 * 16, "went round the ring several times"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=60), capacity=st.sampled_from([2, 8, 16]))
def test_ring_behaves_like_a_bounded_fifo(shm_prefix, ops, capacity):
    with CommandRing.create(shm_prefix + "-fifo", RECORD, capacity) as ring:
        sent = 0
        for is_write, n in ops:
            if is_write:
                written = ring.write(make_records(sent, n))
                assert written == min(n, capacity - (sent - ring.cursor))
                sent += written
            else:
                head, tail = ring.peek_views(n)
                assert len(head) + len(tail) == min(n, sent - ring.cursor)
                batch = np.concatenate((head, tail))
                verify(batch, ring.cursor)
                ring.advance(len(batch))
            assert ring.available() == sent - ring.cursor


def test_peek_copy_survives_the_producer_reusing_slots(shm_prefix):
    with CommandRing.create(shm_prefix + "-c", RECORD, capacity=8) as ring:
        ring.write(make_records(0, 8))
        batch = ring.peek(8)
        ring.advance(8)
        ring.write(make_records(8, 8))
        verify(batch, 0)


def test_misuse_is_refused(shm_prefix):
    name = shm_prefix + "-m"
    with pytest.raises(ValueError, match="power of two"):
        CommandRing.create(name, RECORD, capacity=100)
    with pytest.raises(ValueError, match="multiple of 64"):
        CommandRing.create(name, np.dtype([("a", "<i8")]), capacity=8)
    with CommandRing.create(name, RECORD, capacity=8) as ring:
        with pytest.raises(ShmError, match="holds 64-byte records, this code's record dtype is 128 bytes"):
            CommandRing.attach(name, np.dtype([("a", "<i8"), ("pad", "V120")]))
        with pytest.raises(ShmError, match="another record layout"):
            CommandRing.attach(name, np.dtype([("b", "<i8"), ("a", "<i8"), ("pad", "V48")]))
        with pytest.raises(ShmError, match="is a command ring, not an event ring"):
            EventRing.attach(name, RECORD)
        with pytest.raises(TypeError):
            ring.write(np.zeros(1, np.dtype([("x", "<i8"), ("pad", "V56")])))
        ring.write(make_records(0, 3))
        with pytest.raises(ValueError, match="advance"):
            ring.advance(4)
        with pytest.raises(ValueError, match="outside"):
            ring.publish(ring.write_cursor + 9)
        with pytest.raises(ShmError, match="already exists"):
            CommandRing.create(name, RECORD, capacity=8)
    with pytest.raises(ShmError, match="does not exist — is the exchange running"):
        CommandRing.attach(name, RECORD)


def test_one_doorbell_wakes_a_consumer_of_several_rings(shm_prefix, children):
    """The matcher drains many command rings and sleeps on one doorbell for all of them."""
    with Doorbell.create(shm_prefix + "-matcher") as bell, \
            CommandRing.create(shm_prefix + "-gw1", RECORD, 16, consumer_bell=bell.name) as gw1, \
            CommandRing.create(shm_prefix + "-gw2", RECORD, 16, consumer_bell=bell.name) as gw2:
        children.start("command_trickle", gw2.name, bell.name, 0)
        wait = SpinYieldBlockWait(bell, spins=10, yields=2, block_slice_s=10.0)
        assert wait.wait_until(lambda: gw1.available() > 0 or gw2.available() > 0, timeout_s=30)
        woke_at = time.monotonic()
        [(_, sent_at)] = children.collect(1, timeout_s=30)
        assert gw2.available() == 1 and gw1.available() == 0
        # The block slice is 10 s, so waking well inside it means the ring, not the timeout, did it.
        assert woke_at - sent_at < 1.0
