"""The matcher as a Python object: state tables, an event sink, and the batch entry point.

engine/ does no I/O: the matcher process (and tests, and benchmarks) hand it command records
and a ring of event slots; it only computes. `Matcher.process` is the one call the hot loop
makes per batch.
"""

import numpy as np

from engine import core
from engine.config import EngineConfig
from engine.records import COMMAND_BYTES, COMMAND_DTYPE, EVENT_BYTES, EVENT_DTYPE, event_to_dict
from engine.state import (C_SEQ, D_MASK, D_NEED, D_RING, D_SOURCE, D_WRITE, allocate_state,
                          descriptor, state_hash)

def _taken_as_is(commands: np.ndarray) -> bool:
    """Whether the compiled entry point takes the array as it is (it was looked up for exactly
    that array type); others are copied into one."""
    return (commands.dtype == COMMAND_DTYPE and commands.flags.c_contiguous
            and commands.flags.writeable)


def _words_of(commands: np.ndarray) -> np.ndarray:
    return commands.view(np.int64).reshape(len(commands), COMMAND_BYTES // 8)


def matcher_is_cached() -> bool:
    """Whether loading the compiled matcher reads numba's cache (False: it compiles, about a
    minute). Reads numba's cache index the way the load will (same source stamp and numba
    version); a cache made for another CPU still compiles, which this does not see."""
    try:
        return bool(core.run_batch._cache._cache_file._load_index())
    except (AttributeError, OSError, EOFError, ValueError):
        return False


class EventSink:
    """A power-of-two ring of 128-byte event slots the matcher writes into."""

    def __init__(self, slots: np.ndarray):
        raw = slots.view(np.uint8).reshape(-1)
        capacity = len(raw) // EVENT_BYTES
        if capacity & (capacity - 1) or not raw.flags.c_contiguous:
            raise ValueError("an event ring must be contiguous, with a power-of-two capacity")
        self.slots = slots
        self.capacity = capacity
        self.address = raw.ctypes.data


def event_sink(slots: np.ndarray) -> EventSink:
    return EventSink(slots)


class Matcher:
    def __init__(self, config: EngineConfig, state=None):
        """A fresh matcher; pass `state` (engine.state.state_in_buffer) to place it in shm."""
        self.config = config
        self.state = allocate_state(config) if state is None else state
        self.desc = descriptor(self.state)
        self._sink = None
        self._overflow = None
        self._entry = None
        self._held = {}             # id(array) -> its word view (which keeps the array alive)
        self._last = (None, None)   # the last other array process() was given, its word view

    @property
    def seq(self) -> int:
        return int(self.state.counters[C_SEQ])

    def _entry_for(self, args):
        """The compiled batch loop, called without numba's per-call dispatch.

        The dispatcher re-derives the type of every structured argument on each call (~100 µs
        for the command records); every argument type here is fixed, so look it up once.
        """
        if self._entry is None:
            sig = tuple(core.run_batch.typeof_pyval(a) for a in args)
            if sig not in core.run_batch.overloads:
                core.run_batch.compile(sig)
            self._entry = core.run_batch.overloads[sig].entry_point
        return self._entry

    def _attach_sink(self, sink: EventSink) -> None:
        if sink is not self._sink:
            self.desc[D_RING] = sink.address
            self.desc[D_RING + 1] = sink.capacity
            self.desc[D_RING + 2] = EVENT_BYTES // 8
            self.desc[D_MASK] = sink.capacity - 1
            self._sink = sink   # keeps the ring's memory alive while the descriptor points at it

    def process(self, commands: np.ndarray, sink: EventSink, write_pos: int, free_slots: int,
                source: int = 0, privileged: bool = False, start: int = 0,
                count: int | None = None) -> tuple[int, int]:
        """Sequence commands[start:start+count] into the sink from write_pos.

        Returns (commands processed, new write position). Fewer than asked are processed when
        free_slots cannot hold the next command's worst case; call again once consumers move.
        """
        # The compiled loop runs without bounds checks: validate here, once per batch.
        if not 0 <= start <= len(commands):
            raise IndexError(f"start {start} outside a batch of {len(commands)} commands")
        count = len(commands) - start if count is None else min(count, len(commands) - start)
        if free_slots > sink.capacity:
            raise ValueError("free_slots exceeds the event ring's capacity")
        self._attach_sink(sink)
        self.desc[D_WRITE] = write_pos
        self.desc[D_SOURCE] = source
        words = self._held.get(id(commands))     # held arrays live on: no id is reused
        if words is None:
            if commands is not self._last[0]:
                # callers hand over the same batch buffer call after call: derive its word
                # view once
                if not _taken_as_is(commands):
                    commands = np.array(commands, dtype=COMMAND_DTYPE, order="C", copy=True)
                self._last = (commands, _words_of(commands))
            words = self._last[1]
        args = (self.desc, commands, words, start, count, bool(privileged), free_slots)
        done = self._entry_for(args)(*args)
        return done, int(self.desc[D_WRITE])

    def hold(self, commands: np.ndarray) -> None:
        """Keep the word view of an array that is handed to process() call after call among
        others (each command ring's records, given whole with a start and a count): its view
        is derived once, not whenever another array came in between. Held for good, with the
        array: only for arrays that live as long as the matcher."""
        if not _taken_as_is(commands):
            raise ValueError("hold() takes a C-contiguous, writeable array of COMMAND_DTYPE")
        self._held[id(commands)] = _words_of(commands)

    @property
    def needed_slots(self) -> int:
        """After a batch stopped early: the free slots its next command needs (else 0)."""
        return int(self.desc[D_NEED])

    def process_oversized(self, commands: np.ndarray, index: int, source: int = 0,
                          privileged: bool = False) -> np.ndarray:
        """Sequence commands[index] alone when its worst case exceeds the whole event ring.

        The events go to an overflow buffer sized for any command (allocated on first use);
        returns them as event slots, which the caller feeds into its ring as room appears.
        """
        if self._overflow is None:
            capacity = 1 << (self.config.event_bound() - 1).bit_length()
            self._overflow = event_sink(np.zeros(capacity, EVENT_DTYPE))
        ring = self._sink
        done, end = self.process(commands, self._overflow, 0, self._overflow.capacity, source,
                                 privileged, index, 1)
        if ring is not None:
            self._attach_sink(ring)
        assert done == 1, "the overflow buffer holds any single command's events"
        return self._overflow.slots[:end].copy()

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
        """Process every command; returns the events as dicts."""
        out = []
        for events in drain(matcher, commands, self.sink, source=source, privileged=privileged):
            if collect:
                out.extend(event_to_dict(e) for e in events)
        return out


def drain(matcher: Matcher, commands: np.ndarray, sink: EventSink, batch: int | None = None,
          source: int = 0, privileged: bool = True):
    """Sequence every command through a ring no one else reads; yield each call's events.

    The ring counts as consumed between calls. A command too big for the whole ring goes
    through Matcher.process_oversized.
    """
    start = 0
    while start < len(commands):
        done, end = matcher.process(commands, sink, 0, sink.capacity, source, privileged, start,
                                    batch)
        yield sink.slots[:end]
        start += done
        if done == 0:
            yield matcher.process_oversized(commands, start, source, privileged)
            start += 1
