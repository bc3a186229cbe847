"""Rebuilding the matcher's state from a snapshot and the journal.

The state is a pure function of the journal (DESIGN.md §8.5): the same commands, from the
same sources, in the same order, through the same compiled matcher give the same tables and
the same events. Three users:

- the matcher process on restart (perpx/matcherd.py) rebuilds its shared-memory tables;
- persistd keeps a `Replica` in its own memory that follows the journal: its events become
  the DuckDB rows, and its tables are what snapshots are written from;
- `perpx verify` replays offline and compares state hashes.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np

from engine.config import EngineConfig
from engine.matcher import Matcher, drain, event_sink
from engine.records import EVENT_DTYPE
from engine.state import layout_version, state_hash, state_in_buffer, state_nbytes
from persistd import snapshot
from persistd.journal import journal_info, read_journal

REPLAY_EVENT_CAPACITY = 1 << 14


class ReplayGap(Exception):
    """The journal does not continue where the state is (a retired or missing segment)."""


def replay(matcher: Matcher, records: np.ndarray, sink) -> Iterator[np.ndarray]:
    """Sequence journal records through `matcher`; yields the events of each call (a view of
    the sink's slots, valid until the next step). The records must continue the matcher's seq.
    """
    if not len(records):
        return
    first = int(records["seq"][0])
    if first != matcher.seq + 1:
        raise ReplayGap(f"the journal continues at seq {first}, the state is at {matcher.seq}")
    # The matcher takes one source per call: split the batch where the source changes.
    source = records["source"]
    privileged = records["privileged"]
    cuts = np.flatnonzero((source[1:] != source[:-1]) | (privileged[1:] != privileged[:-1])) + 1
    bounds = [0, *cuts.tolist(), len(records)]
    commands = np.ascontiguousarray(records["command"])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        yield from drain(matcher, commands[lo:hi], sink, source=int(source[lo]),
                         privileged=bool(privileged[lo]))


class Replica:
    """A matcher over a state buffer that follows the journal (its own memory by default)."""

    def __init__(self, cfg: EngineConfig, buffer: np.ndarray | None = None,
                 matcher: Matcher | None = None):
        self.cfg = cfg
        self.layout_version = layout_version(cfg)
        self.buffer = np.zeros(state_nbytes(cfg), np.uint8) if buffer is None else buffer
        self.matcher = matcher or Matcher(cfg, state_in_buffer(cfg, self.buffer, fresh=True))
        self.sink = event_sink(np.zeros(REPLAY_EVENT_CAPACITY, EVENT_DTYPE))

    @property
    def seq(self) -> int:
        return self.matcher.seq

    def state_hash(self) -> str:
        return state_hash(self.matcher.state)

    def reset(self) -> None:
        """Back to the empty state of genesis (in place: the matcher keeps its tables)."""
        state_in_buffer(self.cfg, self.buffer, fresh=True)

    def load_snapshot(self, directory, max_seq: int | None = None) -> dict | None:
        """The newest valid snapshot at or below max_seq, or the empty state if there is none."""
        header = snapshot.load_newest(directory, self.layout_version, self.buffer, max_seq)
        if header is None:
            self.reset()
        return header

    def apply(self, records: np.ndarray) -> Iterator[np.ndarray]:
        """Apply journal records (skipping any at or below the current seq); yields events."""
        if len(records) and int(records["seq"][0]) <= self.seq:
            records = records[records["seq"] > self.seq]
        yield from replay(self.matcher, records, self.sink)

    def catch_up(self, journal_dir, upto_seq: int | None = None,
                 on_events: Callable[[np.ndarray], None] | None = None,
                 on_progress: Callable[[int], None] | None = None) -> int:
        """Replay the journal from the current seq to its end (or upto_seq); returns the seq."""
        for records in read_journal(journal_dir, from_seq=self.seq + 1):
            if upto_seq is not None and int(records["seq"][0]) > upto_seq:
                break
            if upto_seq is not None:
                records = records[records["seq"] <= upto_seq]
            for events in self.apply(records):
                if on_events is not None:
                    on_events(events)
            if on_progress is not None:
                on_progress(self.seq)
        return self.seq

    def rebuild(self, snapshot_dir, journal_dir, upto_seq: int | None = None,
                on_progress: Callable[[int], None] | None = None) -> dict:
        """Newest snapshot + journal replay; returns what was used and how long each part took
        (for the logs and `perpx bench durability`)."""
        t0 = time.monotonic()
        if upto_seq is None:   # a snapshot past the journal's end (a cut tail) is no use
            upto_seq = journal_info(journal_dir)["last_seq"]
        t1 = time.monotonic()
        header = self.load_snapshot(snapshot_dir, upto_seq)
        t2 = time.monotonic()
        from_seq = self.seq
        self.catch_up(journal_dir, upto_seq, on_progress=on_progress)
        return {"snapshot_seq": header["seq"] if header else 0, "replayed": self.seq - from_seq,
                "seq": self.seq, "snapshot_bytes": header["nbytes"] if header else 0,
                "journal_info_s": t1 - t0, "snapshot_s": t2 - t1,
                "replay_s": time.monotonic() - t2}
