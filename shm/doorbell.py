"""Doorbell: lets one process sleep until another has published, at no syscall per publish.

A doorbell is a FIFO (named pipe, beside the regions in /dev/shm) plus two counters in a small
shared region:

- ``sleep_seq`` -- written only by the one sleeper. It is odd while the sleeper is (about to
  be) blocked on the FIFO; each sleep uses a fresh odd value.
- ``rung_seq`` -- written by ringers: the ``sleep_seq`` value they last wrote a byte for.

A ringer writes a byte only if ``sleep_seq`` is odd and nobody has written for that sleep yet,
so a producer publishing while its consumer is awake costs a fence and a load, no syscall.
Several processes may ring one doorbell (the matcher sleeps on one doorbell for all its command
rings). A byte that lands after the sleeper already saw its condition (or a second ringer's
byte for the same sleep) stays in the FIFO and makes the next sleep return at once: a spurious
wake-up, never a missed one.

Lost wake-ups are prevented by ordering: the sleeper stores ``sleep_seq``, fences, then
re-checks its condition before blocking; the ringer stores its cursor, fences, then loads
``sleep_seq``. One of the two always sees the other's store. The sleeper still blocks in
bounded slices (see wait.py) so a ringer killed between its publish and its ring cannot
strand it.

Why a FIFO and not a semaphore: a FIFO is a file descriptor, so a process that also waits for
sockets (a gateway: clients on ZeroMQ, events on the ring) blocks in one poll() on both —
``arm()``, poll ``fileno()`` with its sockets, ``disarm()`` — instead of parking a thread on a
semaphore to forward the wake-up.
"""

from __future__ import annotations

import errno
import math
import os
import select
import weakref
from typing import Callable

from shm.cursor import CACHE_LINE, Cursor
from shm.platform import full_fence, require_tso
from shm.region import Region, ShmError, check_name

require_tso()

LAYOUT_VERSION = 2
_KIND = b"DOORBELL"
_SLEEP_SEQ = CACHE_LINE
_RUNG_SEQ = 2 * CACHE_LINE
_PAYLOAD_BYTES = 3 * CACHE_LINE


def fifo_path(name: str) -> str:
    """Where a doorbell's FIFO lives: beside the shared-memory objects (tmpfs), same prefix."""
    return f"/dev/shm/{name.lstrip('/')}.fifo"


def _unlink_if_owner(path: str, creator_pid: int) -> None:
    # a forked child inherits the finalizer but does not own the name
    if os.getpid() == creator_pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class Doorbell:
    def __init__(self, region: Region, created: bool):
        self.name = region.name
        self.path = fifo_path(region.name)
        self._region = region
        self._created = created
        self._sleep_seq = Cursor.at(region.payload, _SLEEP_SEQ)
        self._rung_seq = Cursor.at(region.payload, _RUNG_SEQ)
        self._read_fd = None     # the sleeper's end, opened on first use
        self._write_fd = None    # a ringer's end, opened on first ring
        self._poll = None
        # The creator owns the FIFO's name, as Region owns its region's (see region.py).
        self._finalizer = (weakref.finalize(self, _unlink_if_owner, self.path, os.getpid())
                           if created else None)

    @classmethod
    def create(cls, name: str) -> Doorbell:
        check_name(name)
        path = fifo_path(name)
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            raise ShmError(f"doorbell {path} already exists — another exchange is running, "
                           "or a crashed one left it behind") from None
        try:
            region = Region.create(name, LAYOUT_VERSION, _PAYLOAD_BYTES)
        except BaseException:
            os.unlink(path)
            raise
        region.payload[: len(_KIND)] = memoryview(_KIND)
        return cls(region, created=True)

    @classmethod
    def attach(cls, name: str) -> Doorbell:
        region = Region.attach(name, LAYOUT_VERSION)
        if bytes(region.payload[: len(_KIND)]) != _KIND:
            region.close()
            raise ShmError(f"shared memory region {name} is not a doorbell")
        if not os.path.exists(fifo_path(name)):
            region.close()
            raise ShmError(f"doorbell {fifo_path(name)} does not exist — is the exchange running?")
        return cls(region, created=False)

    # -- ringer -------------------------------------------------------------------------
    def ring(self) -> None:
        """Wake the sleeper if there is one; call after publishing."""
        full_fence()
        self.ring_after_fence()

    def ring_after_fence(self) -> None:
        """ring() for a ringer that has fenced (``full_fence``) since it published: one
        fence serves every doorbell a publish rings (an event ring's consumers)."""
        sleep_seq = self._sleep_seq.get()
        if sleep_seq & 1 and self._rung_seq.get() != sleep_seq:
            self._rung_seq.set(sleep_seq)
            self._post()

    def _post(self) -> None:
        try:
            if self._write_fd is None:
                self._write_fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            os.write(self._write_fd, b"\1")
        except BlockingIOError:
            pass             # the FIFO is full of wake-ups already
        except OSError as e:
            # ENXIO/EPIPE: the sleeper is gone (it opens its end before it ever sleeps).
            if e.errno not in (errno.ENXIO, errno.EPIPE, errno.ENOENT):
                raise
            if self._write_fd is not None:
                os.close(self._write_fd)
                self._write_fd = None

    # -- sleeper ------------------------------------------------------------------------
    def fileno(self) -> int:
        """The sleeper's end of the FIFO: readable when rung (for poll() with other fds)."""
        if self._read_fd is None:
            # read-write, so the FIFO never reads as "end of file" when no ringer has it open
            self._read_fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        return self._read_fd

    def arm(self) -> int:
        """About to block on fileno(): from here ringers write. Check the condition after
        this, then block, then disarm(token, readable)."""
        self.fileno()
        token = (self._sleep_seq.get() + 1) | 1
        self._sleep_seq.set(token)
        full_fence()
        return token

    def disarm(self, token: int, readable: bool) -> None:
        """Awake again: drain the wake-ups and stop ringers from writing.

        `readable`: poll() reported the FIFO readable (False if the caller did not poll). No
        default: a caller that polled and did not say so would never drain a late byte, and
        every later poll() would return at once. The FIFO is read only then or when a
        ringer claimed this sleep, which saves a syscall on every wake-up by something else (a
        gateway wakes for its sockets far more often than for events). A byte a late ringer
        writes after this check stays in the FIFO: the next poll() reports it readable, and
        that disarm drains it (a spurious wake-up, as above)."""
        if readable or self._rung_seq.get() == token:
            try:
                # one read takes every byte: ringers write one per sleep they claim, and
                # a FIFO read returns all it holds up to the size asked for
                os.read(self._read_fd, 4096)
            except BlockingIOError:
                pass
        self._sleep_seq.set(token + 1)

    def sleep(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Block until rung or ``timeout_s`` passed, unless ``condition()`` already holds.

        Only one process may sleep on a doorbell. Returns ``condition()`` after waking; a
        spurious wake-up simply returns False.
        """
        token = self.arm()
        readable = False
        try:
            if condition():
                return True
            if self._poll is None:
                self._poll = select.poll()
                self._poll.register(self._read_fd, select.POLLIN)
            try:
                # rounded up: poll() counts whole ms, and a timeout rounded down to 0 made the
                # last ms of every timed wait a busy loop of sleeps that return at once
                readable = bool(self._poll.poll(max(0, math.ceil(timeout_s * 1000))))
            except InterruptedError:
                pass     # a signal: the caller re-checks its condition
        finally:
            self.disarm(token, readable)
        return condition()

    @property
    def sleeping(self) -> bool:
        """True while the sleeper is blocked or about to block."""
        return bool(self._sleep_seq.get() & 1)

    def close(self) -> None:
        self._sleep_seq = self._rung_seq = self._poll = None
        for fd in (self._read_fd, self._write_fd):
            if fd is not None:
                os.close(fd)
        self._read_fd = self._write_fd = None
        self._region.close()

    def unlink(self) -> None:
        """Remove the names (FIFO and region); only the creator is expected to."""
        if self._finalizer is not None and self._finalizer.alive:
            self._finalizer()
        else:
            _unlink_if_owner(self.path, os.getpid())
        self._region.unlink()

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self._created:
            self.unlink()
