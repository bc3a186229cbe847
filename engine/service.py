"""The matcher process: drains the command rings into the compiled matcher, publishes events.

With engine/shared_state.py (how other processes attach the state), the only part of engine/
that touches shared memory. Each pass takes, from every command ring in turn, what is
published (up to a batch), sequences it with one compiled call straight into the event ring,
publishes the event cursor and frees the command slots. The order in which it takes commands
IS the sequence; the sequenced commands go to the event ring ahead of their events, which is
what persistd journals.

When every ring is empty the matcher spins briefly, yields, then sleeps on one doorbell that
all producers ring (shm/wait.py), so an idle exchange costs no core on a 2-core box. A matcher
that shares its CPU with a gateway is given `shm.wait.shared_cpu_wait` (no spin): the
commands it waits for come from a process that can only run once the matcher lets go of it.
"""

from __future__ import annotations

import gc

from engine.config import EngineConfig
from engine.matcher import Matcher, event_sink
from engine.records import COMMAND_DTYPE, EVENT_DTYPE
from engine.spec import Source
from engine.state import layout_version, state_in_buffer, state_nbytes
from shm import names
from shm.doorbell import Doorbell
from shm.region import Region
from shm.ring import CommandRing, EventRing
from shm.wait import SpinYieldBlockWait, WaitFactory

DEFAULT_BATCH = 256
# 2 MiB of 128-byte slots: small enough that each event write hits the cache (docs/tuning.md);
# commands whose events exceed it go through the overflow buffer.
DEFAULT_EVENT_CAPACITY = 1 << 14


class MatcherService:
    """Creates the state region, the event ring and one command ring per source."""

    def __init__(self, cfg: EngineConfig, prefix: str, sources: list[Source],
                 consumers: list[str], event_capacity: int | None = None,
                 batch: int = DEFAULT_BATCH, reattach: bool = False,
                 idle_wait: WaitFactory = SpinYieldBlockWait):
        """Create the exchange's shared memory, or with reattach=True map what a matcher that
        died left behind (the rings keep their cursors: producers and consumers carry on). A
        reattached state region holds whatever the dead matcher left: rebuild it before use.
        """
        self.cfg = cfg
        self.batch = batch
        self.reattached = reattach
        capacity = event_capacity or DEFAULT_EVENT_CAPACITY
        self._owned = []
        try:
            if reattach:
                self.state_region = self._keep(Region.attach(names.state_region(prefix),
                                                             layout_version(cfg)))
                self.events = self._keep(EventRing.attach(names.event_ring(prefix), EVENT_DTYPE))
                self.bell = self._keep(Doorbell.attach(names.matcher_bell(prefix)))
                self.rings = [self._keep(CommandRing.attach(names.command_ring(prefix, s.name),
                                                            COMMAND_DTYPE)) for s in sources]
            else:
                self.state_region = self._own(Region.create(
                    names.state_region(prefix), layout_version(cfg), state_nbytes(cfg)))
                self.events = self._own(EventRing.create(names.event_ring(prefix), EVENT_DTYPE,
                                                         capacity, consumers))
                self.bell = self._own(Doorbell.create(names.matcher_bell(prefix)))
                self.rings = [self._own(CommandRing.create(names.command_ring(prefix, s.name),
                                                           COMMAND_DTYPE, s.capacity,
                                                           consumer_bell=self.bell.name))
                              for s in sources]
            self.state_buffer = self.state_region.payload[:state_nbytes(cfg)]
            state = state_in_buffer(cfg, self.state_buffer, fresh=not reattach)
            self.matcher = Matcher(cfg, state=state)
            # (ring index, privileged, ring): what a pass drains, in sequencing order
            self._drained = [(index, source.privileged, ring)
                             for index, (source, ring) in enumerate(zip(sources, self.rings))]
            for ring in self.rings:
                self.matcher.hold(ring.records)
        except BaseException:
            self.close()
            raise
        self.sink = event_sink(self.events.records)
        # A pass reads the event consumers' cursors only when fewer slots than this are left
        # of what they last granted: a stale count is low, never high, and a batch it stops
        # short goes through wait_for_space, which reads them.
        self._refresh_free_below = self.events.capacity // 2
        self._idle = idle_wait(self.bell)

    @staticmethod
    def exists(prefix: str) -> bool:
        """Whether a matcher (alive or dead) created this prefix's state region."""
        return Region.exists(names.state_region(prefix))

    def last_published_seq(self) -> int:
        """The seq of the newest event in the event ring (or the one mark_start left)."""
        cursor = self.events.published_cursor()
        return int(self.events.records["seq"][(cursor - 1) & self.events.mask])

    def mark_start(self) -> None:
        """On a ring with no event yet, write the state's seq into the slot behind the cursor:
        readers that copy the state at a command boundary (gateway/mirror.py) compare the
        state's seq with the last event's, and a state recovered from the journal starts past 0.
        """
        if self.events.published_cursor() == 0:
            self.events.records["seq"][self.events.mask] = self.matcher.seq

    def _own(self, thing):
        """Something this process created: closed and unlinked by close()."""
        self._owned.append((thing, True))
        return thing

    def _keep(self, thing):
        """Something another process created: close() only unmaps it."""
        self._owned.append((thing, False))
        return thing

    def poll_once(self) -> int:
        """One pass over every command ring; returns how many commands were sequenced.

        Each ring's commands go to the compiled matcher as its whole record array with a
        start and a count, the same array every pass, which the matcher holds (a slice would
        be a new array, whose views Matcher.process derives afresh: ~5 µs a pass), up to the
        ring's end: what wraps is the next pass's. An empty ring costs a cursor load."""
        total = 0
        events = self.events
        for index, privileged, ring in self._drained:
            if not ring.available():     # a cursor load: most rings are empty most passes
                continue
            start, n, _ = ring.unread_slots(self.batch)
            done, write_pos = self.matcher.process(
                ring.records, self.sink, events.write_cursor,
                events.known_free_slots(self._refresh_free_below),
                source=index, privileged=privileged, start=start, count=n)
            # Free the commands before publishing their events: a matcher killed in between
            # loses commands nobody saw answered, instead of leaving sequenced (and perhaps
            # journaled) commands in the ring for its successor to sequence a second time.
            ring.advance(done)
            if write_pos != events.write_cursor:
                events.publish(write_pos)
            if done < n:
                need = self.matcher.needed_slots
                if need > events.capacity:
                    oversized = self.matcher.process_oversized(ring.records, start + done,
                                                               index, privileged)
                    ring.advance(1)
                    self._publish_oversized(oversized)
                    done += 1
                else:
                    # The slowest consumer holds us back: wait, never overwrite. (This reads
                    # the consumers' cursors, so the next pass sees the room they made.)
                    events.wait_for_space(need, timeout_s=0.05)
            total += done
        return total

    def _publish_oversized(self, events) -> None:
        """A command whose worst case exceeds the event ring: its events go in as room appears."""
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
        for thing, created in reversed(self._owned):
            try:
                thing.close()
                if created:
                    thing.unlink()
            except Exception:
                pass
        self._owned.clear()
