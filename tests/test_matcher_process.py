"""The matcher as a real process: commands in through shared-memory rings, events out.

Also the determinism requirement of DESIGN.md §3: the same command stream in fresh processes
yields the same events and the same state hash, bit for bit.
"""

import hashlib
import multiprocessing as mp
import time
import weakref

import numpy as np
import pytest

from engine.matcher import LocalEvents, Matcher
from engine.records import (CMD_DEPOSIT, COMMAND_DTYPE, EV_REJECT, EVENT_DTYPE, REASON_FORBIDDEN,
                            event_to_dict, new_commands)
from engine.service import MatcherService
from engine.shared_state import attach_state
from engine.spec import Source
from shm import names
from engine.state import state_hash
from shm.ring import CommandRing, EventRing
from tests.fuzz_streams import FUZZ_CONFIG, genesis, random_stream
from tests.shm_workers import attach_when_ready, shm_prefix  # noqa: F401 — fixture: prefix, leak check


def sources(command_capacity: int) -> list[Source]:
    return [Source("ops", privileged=True, capacity=command_capacity),
            Source("gw0", privileged=False, capacity=command_capacity)]


def serve_matcher(prefix: str, stop, event_capacity, command_capacity) -> None:
    service = MatcherService(FUZZ_CONFIG, prefix, sources(command_capacity), consumers=["test"],
                             event_capacity=event_capacity)
    try:
        service.run(stop.is_set)
    finally:
        service.close()


# The default rings; or an event ring of 32 slots, where most commands' worst case exceeds
# the ring, so the matcher waits for room and runs big commands through its overflow buffer,
# and command rings of 64, which the stream wraps around hundreds of times (a pass stops at
# a ring's end).
@pytest.fixture(params=[(None, 1 << 14), (32, 64)], ids=["default-rings", "tiny-rings"])
def matcher_process(shm_prefix, request):
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=serve_matcher, args=(shm_prefix, stop, *request.param),
                       daemon=True)
    proc.start()
    try:
        yield shm_prefix, proc
    finally:
        stop.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)


def _exchange(ring: CommandRing, consumer, commands: np.ndarray, n_events: int,
              timeout_s: float = 60.0) -> np.ndarray:
    """Write commands as the ring takes them while draining events (neither side may block)."""
    sent = 0
    received = []
    got = 0
    deadline = time.monotonic() + timeout_s
    while got < n_events:
        if sent < len(commands):
            sent += ring.write(commands[sent:sent + 1000])
        if consumer.available() == 0 and sent == len(commands):
            consumer.wait(1, timeout_s=0.05)
        batch = consumer.peek(n_events - got)
        received.append(batch)
        got += len(batch)
        consumer.advance(len(batch))
        if time.monotonic() > deadline:
            raise AssertionError(f"sent {sent} of {len(commands)} commands, received {got} of "
                                 f"{n_events} events within {timeout_s} s")
    return np.concatenate(received)


def test_matcher_process_sequences_rings_into_events(matcher_process):
    prefix, proc = matcher_process
    commands = np.concatenate([genesis(), random_stream(7, 30_000)])
    local = Matcher(FUZZ_CONFIG)
    expected = LocalEvents(1 << 16).run(local, commands, source=0, privileged=True)

    events = attach_when_ready(lambda: EventRing.attach(names.event_ring(prefix), EVENT_DTYPE))
    consumer = events.consumer("test", start="current")
    ops = CommandRing.attach(names.command_ring(prefix, "ops"), COMMAND_DTYPE)
    gw = CommandRing.attach(names.command_ring(prefix, "gw0"), COMMAND_DTYPE)
    try:
        got = _exchange(ops, consumer, commands, len(expected))
        assert [event_to_dict(e) for e in got] == expected

        region, state = attach_state(prefix, FUZZ_CONFIG)
        try:
            assert state_hash(state) == local.state_hash()
        finally:
            del state
            region.close()

        # an admin command from a gateway ring is refused, and carries its ring as source
        deposit = new_commands(1)
        deposit["cmd"] = CMD_DEPOSIT
        deposit["account"] = 1
        deposit["amount_atoms"] = 10**9
        command_event, reply = (event_to_dict(e) for e in _exchange(gw, consumer, deposit, 2))
        assert command_event["source"] == reply["source"] == 1
        assert reply["etype"] == EV_REJECT and reply["reason"] == REASON_FORBIDDEN
    finally:
        consumer.deregister()
        for ring in (events, ops, gw):
            ring.close()
    assert proc.is_alive()


def replay_digest(seed: int, n: int, results) -> None:
    """Run a stream in this (fresh) process; report a digest of its events and its state hash."""
    commands = np.concatenate([genesis(), random_stream(seed, n)])
    matcher = Matcher(FUZZ_CONFIG)
    ring = LocalEvents(1 << 16)
    digest = hashlib.blake2b()
    start = 0
    while start < len(commands):
        done, end = matcher.process(commands, ring.sink, 0, ring.capacity, 0, True, start, 512)
        digest.update(ring.slots[:end].tobytes())
        start += done
    results.put((digest.hexdigest(), matcher.state_hash()))


def test_same_stream_same_events_and_hash_in_fresh_processes():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=replay_digest, args=(11, 40_000, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        first, second = results.get(timeout=180), results.get(timeout=180)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert first == second
    # and a different stream gives a different hash (the hash sees the state)
    here = Matcher(FUZZ_CONFIG)
    LocalEvents(1 << 16).run(here, np.concatenate([genesis(), random_stream(12, 1000)]),
                             collect=False)
    assert here.state_hash() != first[1]


def test_the_matcher_keeps_only_the_arrays_it_holds_and_the_last():
    """A batch handed to Matcher.process once is not kept alive by it: a replica replaying a
    journal hands over a new array per batch (megabytes each)."""
    matcher = Matcher(FUZZ_CONFIG)
    events = LocalEvents(1 << 12)
    held = genesis()
    matcher.hold(held)
    matcher.process(held, events.sink, 0, events.capacity, 0, True)
    batches = [random_stream(seed, 50) for seed in (1, 2, 3)]
    gone = [weakref.ref(b) for b in batches[:2]]
    for batch in batches:
        matcher.process(batch, events.sink, 0, events.capacity, 0, True)
    del batches
    assert [ref() for ref in gone] == [None, None]
    with pytest.raises(ValueError, match="C-contiguous, writeable"):
        matcher.hold(random_stream(4, 10)[::2])
