"""The matcher process: drains the command rings into the compiled matcher, publishes events.

This is the only part of engine/ that touches shared memory. Each pass takes, from every
command ring in turn, what is published (up to a batch), sequences it with one compiled call
straight into the event ring, publishes the event cursor and frees the command slots. The
order in which it takes commands IS the sequence; the sequenced commands go to the event ring
ahead of their events, which is what persistd journals.

When every ring is empty the matcher spins briefly, yields, then sleeps on one doorbell that
all producers ring (shm/wait.py), so an idle exchange costs no core on a 2-core box.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.matcher import Matcher, event_sink
from engine.records import COMMAND_DTYPE, EVENT_DTYPE
from engine.state import layout_version, state_in_buffer, state_nbytes
from shm.doorbell import Doorbell
from shm.region import Region
from shm.ring import CommandRing, EventRing
from shm.wait import SpinYieldBlockWait

DEFAULT_BATCH = 256
# 2 MiB of 128-byte slots, a few milliseconds of events at full rate: the producer writes
# every slot once per lap, so a ring that fits the caches makes each event write a cache hit
# (measured: 16384 slots ~10% faster than 65536; a ring sized for the worst single command,
# 2 x max orders, flushed the L3). Bigger commands go through the overflow buffer.
DEFAULT_EVENT_CAPACITY = 1 << 14


@dataclass(frozen=True)
class Source:
    """A producer of commands: its ring name suffix and whether it may send admin commands."""
    name: str
    privileged: bool
    capacity: int = 1 << 14


def state_region_name(prefix: str) -> str:
    return f"{prefix}-state"


def event_ring_name(prefix: str) -> str:
    return f"{prefix}-events"


def command_ring_name(prefix: str, source: str) -> str:
    return f"{prefix}-cmd-{source}"


def attach_state(prefix: str, cfg: EngineConfig):
    """Another process's view of the live state tables (read them via snapshots or copies)."""
    region = Region.attach(state_region_name(prefix), layout_version(cfg))
    return region, state_in_buffer(cfg, region.payload, fresh=False)


class MatcherService:
    """Creates the state region, the event ring and one command ring per source."""

    def __init__(self, cfg: EngineConfig, prefix: str, sources: list[Source],
                 consumers: list[str], event_capacity: int | None = None,
                 batch: int = DEFAULT_BATCH):
        self.cfg = cfg
        self.batch = batch
        capacity = event_capacity or DEFAULT_EVENT_CAPACITY
        self._owned = []
        try:
            self.state_region = self._own(Region.create(
                state_region_name(prefix), layout_version(cfg), state_nbytes(cfg)))
            state = state_in_buffer(cfg, self.state_region.payload, fresh=True)
            self.matcher = Matcher(cfg, state=state)
            self.events = self._own(EventRing.create(event_ring_name(prefix), EVENT_DTYPE,
                                                     capacity, consumers))
            self.bell = self._own(Doorbell.create(f"{prefix}-matcher-bell"))
            self.sources = sources
            self.rings = [self._own(CommandRing.create(command_ring_name(prefix, s.name),
                                                       COMMAND_DTYPE, s.capacity,
                                                       consumer_bell=self.bell.name))
                          for s in sources]
        except BaseException:
            self.close()
            raise
        self.sink = event_sink(self.events.records)
        self._idle = SpinYieldBlockWait(self.bell)

    def _own(self, thing):
        self._owned.append(thing)
        return thing

    def poll_once(self) -> int:
        """One pass over every command ring; returns how many commands were sequenced."""
        total = 0
        for index, (source, ring) in enumerate(zip(self.sources, self.rings)):
            head, _ = ring.peek_views(self.batch)
            n = len(head)
            if n == 0:
                continue
            done, write_pos = self.matcher.process(
                head, self.sink, self.events.write_cursor, self.events.free_slots(),
                source=index, privileged=source.privileged)
            if write_pos != self.events.write_cursor:
                self.events.publish(write_pos)
            if done < n:
                need = self.matcher.needed_slots
                if need > self.events.capacity:
                    self._publish_oversized(head, done, source, index)
                    done += 1
                else:
                    # The slowest consumer holds us back: wait, never overwrite.
                    self.events.wait_for_space(need, timeout_s=0.05)
            ring.advance(done)
            total += done
        return total

    def _publish_oversized(self, commands, index, source, source_index) -> None:
        """A command whose worst case exceeds the event ring: its events go in as room appears."""
        events = self.matcher.process_oversized(commands, index, source_index, source.privileged)
        written = 0
        while written < len(events):
            if not self.events.wait_for_space(1, timeout_s=0.05):
                continue
            written += self.events.write(events[written:])

    def _anything_to_do(self) -> bool:
        return any(ring.available() for ring in self.rings)

    def run(self, should_stop, idle_timeout_s=0.05) -> None:
        """Serve until should_stop() is true (checked at least every idle_timeout_s)."""
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            while not should_stop():
                if self.poll_once() == 0:
                    self._idle.wait_until(self._anything_to_do, idle_timeout_s)
        finally:
            gc.enable()

    def close(self) -> None:
        for thing in reversed(self._owned):
            try:
                thing.close()
                thing.unlink()
            except Exception:
                pass
        self._owned.clear()
