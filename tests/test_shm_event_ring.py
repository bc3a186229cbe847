import os
import signal

import pytest

from shm.region import ShmError
from shm.ring import EventRing
from tests.shm_workers import RECORD, children, make_records, shm_prefix, verify, wait_for  # noqa: F401  (fixtures)


def _start_consumers(children, name, specs):
    """Start consumer processes and wait until each has joined, so none misses the first record."""
    procs = {}
    for which, start, total, max_batch, zero_copy, *slow in specs:
        joined = children.event()
        procs[which] = children.start("event_consumer", name, which, start, total, max_batch, zero_copy, joined, *slow)
        assert joined.wait(30), f"consumer {which} never joined"
    return procs


def test_three_consumers_each_see_ten_million_records(shm_prefix, children):
    total = 10_000_000
    name = shm_prefix + "-ev"
    with EventRing.create(name, RECORD, capacity=1 << 16, consumers=["persistd", "gateway", "riskd"]):
        _start_consumers(children, name, [
            ("persistd", "current", total, 8192, True),
            ("gateway", "current", total, 4096, False),
            ("riskd", "current", total, 3001, True),
        ])
        children.start("event_producer", name, total, 4096)
        reports = children.collect(4, timeout_s=60)
    consumed = {r[1]: r for r in reports if r[0] == "consumed"}
    assert set(consumed) == {"persistd", "gateway", "riskd"}
    for which, (_, _, first, count, elapsed) in consumed.items():
        assert (first, count) == (0, total), which
    [produced] = [r for r in reports if r[0] == "produced"]
    print(f"\n10M events to 3 consumers: producer {produced[3]:.2f} s ({produced[2]} waits for space)")


def test_killed_consumer_resumes_exactly_where_it_stopped(shm_prefix, children):
    total = 1_000_000
    kill_after = 300_000
    name = shm_prefix + "-ev"
    with EventRing.create(name, RECORD, capacity=1 << 14, consumers=["persistd", "gateway"]) as ring:
        procs = _start_consumers(children, name, [
            ("persistd", "current", total, 4096, True, kill_after),
            ("gateway", "current", total, 4096, False),
        ])
        children.start("event_producer", name, total, 4096)
        wait_for(lambda: ring.consumer_cursor("persistd") >= kill_after, 30, "persistd to get going")
        victim = procs["persistd"]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        saved = ring.consumer_cursor("persistd")
        assert kill_after <= saved < total, "killed mid-stream"
        # Dead, it still holds the producer back: the producer stops a ring's length ahead.
        wait_for(lambda: ring.published_cursor() == saved + ring.capacity, 30, "producer to hit the dead consumer")
        assert ring.consumer_cursor("persistd") == saved
        _start_consumers(children, name, [("persistd", "saved", total, 4096, True)])
        reports = children.collect(3, timeout_s=60)
    consumed = {r[1]: r for r in reports if r[0] == "consumed"}
    assert consumed["persistd"][2:4] == (saved, total - saved), "resumed at its cursor and saw every later record once, in order"
    assert consumed["gateway"][2:4] == (0, total)


def test_slow_consumer_holds_the_producer_back_without_loss(shm_prefix, children):
    total = 20_000
    name = shm_prefix + "-ev"
    with EventRing.create(name, RECORD, capacity=1024, consumers=["slow", "fast"]):
        _start_consumers(children, name, [
            ("slow", "current", total, 4096, True, 0),  # 64 records per ms
            ("fast", "current", total, 4096, False),
        ])
        children.start("event_producer", name, total, 4096)
        reports = children.collect(3, timeout_s=60)
    consumed = {r[1]: r[2:4] for r in reports if r[0] == "consumed"}
    assert consumed == {"slow": (0, total), "fast": (0, total)}
    [produced] = [r for r in reports if r[0] == "produced"]
    assert produced[2] > 0, "the producer found the ring full and waited"


def test_consumer_slots(shm_prefix):
    with EventRing.create(shm_prefix + "-ev", RECORD, capacity=8, consumers=["a", "b"]) as ring:
        assert ring.consumer_cursor("a") is None, "slots start inactive"
        assert ring.free_slots() == 8
        assert ring.write(make_records(0, 20)) == 8, "nobody registered: nothing to hold the producer back"
        with pytest.raises(ShmError, match="not active, so nothing was saved"):
            ring.consumer("a", start="saved")
        a = ring.consumer("a")
        assert a.cursor == 8 and a.available() == 0, "joins at the current position"
        assert ring.write(make_records(8, 20)) == 8 and ring.free_slots() == 0
        verify(a.peek(3), 8)
        a.advance(3)
        assert ring.free_slots() == 3 and ring.consumer_cursor(0) == 11
        b = ring.consumer(1)
        assert ring.write(make_records(16, 5)) == 3
        assert b.cursor == 16 and ring.free_slots() == 0
        a.deregister()
        assert ring.consumer_cursor("a") is None
        assert ring.free_slots() == 5, "only b holds the producer back now"
        resumed = ring.consumer("b", start="saved")
        assert resumed.cursor == 16 and resumed.available() == 3
        with pytest.raises(ShmError, match="has no consumer 'c'"):
            ring.consumer("c")
        with pytest.raises(ValueError):
            ring.consumer("b", start="latest")



def test_known_free_slots_reads_the_consumers_only_below_its_threshold(shm_prefix):
    """The matcher asks for its room once per batch: a count the consumers granted before
    (never more than they allow) until it runs low, then their cursors again."""
    with EventRing.create(shm_prefix + "-ev", RECORD, capacity=8, consumers=["a"]) as ring:
        a = ring.consumer("a")
        assert ring.write(make_records(0, 6)) == 6
        a.advance(4)
        assert ring.free_slots() == 6
        assert ring.write(make_records(6, 1)) == 1
        assert ring.known_free_slots(refresh_below=5) == 5, "as granted, without the cursor"
        a.advance(3)
        assert ring.known_free_slots(refresh_below=5) == 5, "stale: low, never high"
        assert ring.known_free_slots(refresh_below=6) == 8, "below the threshold: read afresh"
        assert ring.room(8) == 8 and ring.room(20) == 8, "room() is its capped form"

def test_slot_held_by_a_live_process_cannot_be_taken(shm_prefix, children):
    name = shm_prefix + "-ev"
    with EventRing.create(name, RECORD, capacity=8, consumers=["a"]) as ring:
        # Consumer that joins, then waits forever for records that never come.
        procs = _start_consumers(children, name, [("a", "current", 1, 1, False)])
        with pytest.raises(ShmError, match=rf"in use by live pid {procs['a'].pid}"):
            ring.consumer("a", start="saved")
        procs["a"].kill()
        procs["a"].join(10)
        assert ring.consumer("a", start="saved").cursor == 0
