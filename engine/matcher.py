"""The matcher as a Python object: state tables, an event sink, and the batch entry point.

engine/ does no I/O: the matcher process (and tests, and benchmarks) hand it command records
and a ring of event slots; it only computes. `Matcher.process` is the one call the hot loop
makes per batch.
"""

from collections import namedtuple

import numpy as np

from engine import core
from engine.config import EngineConfig
from engine.records import (BALANCE_EVENT_DTYPE, COMMAND_DTYPE, EVENT_BYTES, EVENT_DTYPE,
                            MARK_EVENT_DTYPE, ORDER_EVENT_DTYPE, TRADE_EVENT_DTYPE,
                            event_to_dict)
from engine.state import C_SEQ, allocate_state, state_hash

# Views of one ring of 128-byte event slots, one per event family, plus the write cursor.
# cursor = [next write position, unused, seq being processed, source ring id]
EventSink = namedtuple("EventSink", [
    "words", "headers", "order_events", "trade_events", "balance_events", "mark_events",
    "mask", "cursor",
])


def event_sink(slots: np.ndarray) -> EventSink:
    """Wrap a power-of-two array of 128-byte slots (any dtype of that itemsize)."""
    raw = slots.view(np.uint8).reshape(-1)
    capacity = len(raw) // EVENT_BYTES
    if capacity & (capacity - 1):
        raise ValueError("event ring capacity must be a power of two")
    return EventSink(
        words=raw.view(np.int64).reshape(capacity, EVENT_BYTES // 8),
        headers=raw.view(EVENT_DTYPE),
        order_events=raw.view(ORDER_EVENT_DTYPE),
        trade_events=raw.view(TRADE_EVENT_DTYPE),
        balance_events=raw.view(BALANCE_EVENT_DTYPE),
        mark_events=raw.view(MARK_EVENT_DTYPE),
        mask=capacity - 1,
        cursor=np.zeros(4, np.int64),
    )


class Matcher:
    def __init__(self, config: EngineConfig, state=None):
        """A fresh matcher; pass `state` (engine.state.state_in_buffer) to place it in shm."""
        self.config = config
        self.state = allocate_state(config) if state is None else state
        self._entries = {}

    def _entry_for(self, args):
        """The compiled batch loop for these argument types, without per-call dispatch.

        numba's dispatcher re-derives the type of every structured array on each call, which
        costs more than matching a whole batch; the compiled entry point skips that.
        """
        commands = args[2]
        key = (id(args[1]), commands.dtype, commands.flags.c_contiguous, commands.flags.aligned)
        entry = self._entries.get(key)
        if entry is None:
            sig = tuple(core.run_batch.typeof_pyval(a) for a in args)
            if sig not in core.run_batch.overloads:
                core.run_batch.compile(sig)
            entry = self._entries[key] = core.run_batch.overloads[sig].entry_point
        return entry

    @property
    def seq(self) -> int:
        return int(self.state.counters[C_SEQ])

    def process(self, commands: np.ndarray, sink: EventSink, write_pos: int, free_slots: int,
                source: int = 0, privileged: bool = False, start: int = 0,
                count: int | None = None) -> tuple[int, int]:
        """Sequence commands[start:start+count] into the sink from write_pos.

        Returns (commands processed, new write position). Fewer than asked are processed when
        free_slots cannot hold the next command's worst case; call again once consumers move.
        """
        # The compiled loop runs without bounds checks: clamp here, once per batch.
        if not 0 <= start <= len(commands):
            raise IndexError(f"start {start} outside a batch of {len(commands)} commands")
        count = len(commands) - start if count is None else min(count, len(commands) - start)
        if free_slots > len(sink.headers):
            raise ValueError("free_slots exceeds the event ring's capacity")
        sink.cursor[0] = write_pos
        sink.cursor[3] = source
        words = commands.view(np.int64).reshape(len(commands), 8)
        args = (self.state, sink, commands, words, start, count, bool(privileged), free_slots)
        done = self._entry_for(args)(*args)
        return done, int(sink.cursor[0])

    def state_hash(self) -> str:
        return state_hash(self.state)


class LocalEvents:
    """An event ring with no other readers: for tests, replay and benchmarks in one process."""

    def __init__(self, capacity: int):
        self.slots = np.zeros(capacity, EVENT_DTYPE)
        self.sink = event_sink(self.slots)
        self.capacity = capacity

    def run(self, matcher: Matcher, commands: np.ndarray, source: int = 0,
            privileged: bool = True, collect: bool = True) -> list:
        """Process every command, draining the ring between calls; returns events as dicts."""
        out = []
        start = 0
        while start < len(commands):
            done, end = matcher.process(commands, self.sink, 0, self.capacity, source,
                                        privileged, start)
            if done == 0:
                raise RuntimeError("event ring too small for one command's worst case")
            if collect:
                out.extend(event_to_dict(self.slots[i]) for i in range(end))
            start += done
        return out


def command_from_dict(fields: dict) -> np.ndarray:
    rec = np.zeros(1, COMMAND_DTYPE)
    for k, v in fields.items():
        rec[k] = v
    return rec
