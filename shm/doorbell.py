"""Doorbell: lets one process sleep until another has published, at no syscall per publish.

A doorbell is a POSIX semaphore plus two counters in a small shared region:

- ``sleep_seq`` -- written only by the one sleeper. It is odd while the sleeper is (about to
  be) blocked on the semaphore; each sleep uses a fresh odd value.
- ``rung_seq`` -- written by ringers: the ``sleep_seq`` value they last posted for.

A ringer posts the semaphore only if ``sleep_seq`` is odd and nobody has posted for that
sleep yet, so a producer publishing while its consumer is awake costs a fence and a load,
no syscall. Several processes may ring one doorbell (the matcher sleeps on one doorbell for all
its command rings). A post that lands after the sleeper already saw its condition (or a second
ringer's post for the same sleep) stays in the semaphore and makes the next sleep return at
once: a spurious wake-up, never a missed one.

Lost wake-ups are prevented by ordering: the sleeper stores ``sleep_seq``, fences, then
re-checks its condition before blocking; the ringer stores its cursor, fences, then loads
``sleep_seq``. One of the two always sees the other's store. The sleeper still blocks in
bounded slices (see wait.py) so a ringer killed between its publish and its ring cannot
strand it.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable

import posix_ipc

from shm.cursor import CACHE_LINE, Cursor
from shm.platform import full_fence, require_tso
from shm.region import Region, ShmError, check_name, unlink_if_owner

require_tso()

LAYOUT_VERSION = 1
_KIND = b"DOORBELL"
_SLEEP_SEQ = CACHE_LINE
_RUNG_SEQ = 2 * CACHE_LINE
_PAYLOAD_BYTES = 3 * CACHE_LINE


class Doorbell:
    def __init__(self, region: Region, semaphore: posix_ipc.Semaphore, created: bool):
        self.name = region.name
        self._region = region
        self._sem = semaphore
        self._sleep_seq = Cursor.at(region.payload, _SLEEP_SEQ)
        self._rung_seq = Cursor.at(region.payload, _RUNG_SEQ)
        self._finalizer = (
            weakref.finalize(self, unlink_if_owner, posix_ipc.unlink_semaphore, self.name, os.getpid())
            if created
            else None
        )

    @classmethod
    def create(cls, name: str) -> Doorbell:
        check_name(name)
        try:
            semaphore = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
        except posix_ipc.ExistentialError:
            raise ShmError(f"doorbell semaphore {name} already exists — another exchange is running, "
                           "or a crashed one left it behind") from None
        try:
            region = Region.create(name, LAYOUT_VERSION, _PAYLOAD_BYTES)
        except BaseException:
            semaphore.unlink()
            semaphore.close()
            raise
        region.payload[: len(_KIND)] = memoryview(_KIND)
        return cls(region, semaphore, created=True)

    @classmethod
    def attach(cls, name: str) -> Doorbell:
        region = Region.attach(name, LAYOUT_VERSION)
        if bytes(region.payload[: len(_KIND)]) != _KIND:
            region.close()
            raise ShmError(f"shared memory region {name} is not a doorbell")
        try:
            semaphore = posix_ipc.Semaphore(name)
        except posix_ipc.ExistentialError:
            region.close()
            raise ShmError(f"doorbell semaphore {name} does not exist — is the exchange running?") from None
        return cls(region, semaphore, created=False)

    def ring(self) -> None:
        """Wake the sleeper if there is one; call after publishing."""
        full_fence()
        sleep_seq = self._sleep_seq.get()
        if sleep_seq & 1 and self._rung_seq.get() != sleep_seq:
            self._rung_seq.set(sleep_seq)
            self._sem.release()

    def sleep(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Block until rung or ``timeout_s`` passed, unless ``condition()`` already holds.

        Only one process may sleep on a doorbell. Returns ``condition()`` after waking; a
        spurious wake-up simply returns False.
        """
        sleep_seq = (self._sleep_seq.get() + 1) | 1
        self._sleep_seq.set(sleep_seq)
        full_fence()
        try:
            if condition():
                return True
            try:
                self._sem.acquire(timeout_s)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                pass    # timed out, or a signal arrived: the caller re-checks its condition
        finally:
            self._sleep_seq.set(sleep_seq + 1)
        return condition()

    @property
    def sleeping(self) -> bool:
        """True while the sleeper is blocked or about to block."""
        return bool(self._sleep_seq.get() & 1)

    def close(self) -> None:
        self._sleep_seq = self._rung_seq = None
        self._region.close()
        self._sem.close()

    def unlink(self) -> None:
        """Remove the names (semaphore and region); only the creator is expected to."""
        if self._finalizer is None:
            posix_ipc.unlink_semaphore(self.name)
        elif self._finalizer.alive:
            self._finalizer()
        self._region.unlink()

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self._finalizer is not None:
            self.unlink()
