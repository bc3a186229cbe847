"""What the gateway holds, counted and bounded (issue 14; `[exchange] gateway_memory_limit_mb`
and `max_queued_bytes`, docs/protocol.md "Limits").

A client that does not read, or many of them, must not grow the gateway without bound. Its
memory beyond what it needs to run (the mirror, the interpreter: `base`, the RSS measured when
it starts serving) is what it keeps for others, in four parts:
- queued: outgoing bytes each connection has not taken (`queue_check` below), over all of
  them;
- held: messages the durable hold keeps until journaled (gateway/outbox.py);
- replay: the reports the ReportLog keeps for replay (gateway/replay.py, ENTRY_BYTES each);
- views: the query answers kept packed (gateway/views.py).
`over()` when base + their sum passes the limit: the outbox then drops the connection with the
most queued (the largest offender; it reconnects and replays), and the ReportLog forgets whole
accounts (their replays then come from the durable store) so that it never takes more than
REPLAY_SHARE of what the limit leaves.

Queued bytes per connection. libzmq tells nothing of a peer's queue: it holds up to `sndhwm`
messages in the ROUTER's pipe to the connection, then the kernel's send buffer (SO_SNDBUF)
more. The outbox counts what it hands to libzmq per session (`out_bytes`, one add per
message: its length and MESSAGE_OVERHEAD). Every `check_every` bytes, and once a second for a
session with something counted, it asks the kernel how much the connection's socket has not
sent (SIOCOUTQ, one system call): less than half of the send buffer unsent means libzmq's pipe
drains into it, so everything handed before the previous check has left the gateway;
otherwise the count goes on. The session's queued bytes are what was handed since: an upper
bound of what sits in libzmq's pipe and the kernel for it, which a client that reads keeps
under about 2 x check_every. check_every is a quarter of the per-connection limit, less when
the memory bound leaves little room (so that many connections cannot pass it by much between
checks). A message limit (`sndhwm`) stays as well: libzmq refuses more, the session is
dropped at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import struct
import termios

# a kept report: its 192-byte record (a bytes object of 225), the 5-tuple, two ints and the
# deque's slot, measured with sys.getsizeof and rounded up
ENTRY_BYTES = 400
# at most 1/REPLAY_SHARE of what the limit leaves above `base` goes to reports kept for replay
REPLAY_SHARE = 4
# what libzmq takes per message queued besides its bytes: the zmq_msg_t slot in the pipe (64)
# and the content block's header with malloc's own (48)
MESSAGE_OVERHEAD = 112
MIN_CHECK_EVERY = 64 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")
_INT = struct.Struct("i")
_ZERO = bytes(4)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_shutdown = _libc.shutdown
_setsockopt = _libc.setsockopt
_SHUT_RDWR = 2
_SOL_SOCKET, _SO_LINGER = 1, 13
_LINGER_0 = struct.pack("ii", 1, 0)       # struct linger {l_onoff 1, l_linger 0}
# glibc's; elsewhere freed memory stays where malloc keeps it
_malloc_trim = getattr(_libc, "malloc_trim", None)


_statm = (0, -1)         # (pid, fd): /proc/self/statm, opened by the process that reads it


def rss_bytes() -> int:
    """This process's resident set. Read once a second in the serving thread: the file stays
    open (opening /proc/self/statm anew took up to 0.1 ms there), and a forked child, whose
    inherited fd names its parent, opens its own."""
    global _statm
    pid, fd = _statm
    if pid != os.getpid():
        fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        _statm = (os.getpid(), fd)
    return int(os.pread(fd, 128, 0).split()[1]) * _PAGE


def release_freed() -> None:
    """Give memory freed (a dropped connection's queue) back to the system, so that RSS shows
    it: glibc keeps small blocks in its arenas otherwise. Called after drops, not per message."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def kernel_sndbuf(max_queued_bytes: int) -> int:
    """The SO_SNDBUF the ROUTER asks for its connections: a quarter of the per-connection
    limit, between 16 KiB and 1 MiB (plenty for loopback and LAN at our message sizes)."""
    return max(16 * 1024, min(max_queued_bytes // 4, 1 << 20))


def shut_down(fd: int) -> None:
    """End a connection libzmq owns: its engine reads the end, closes the socket and frees the
    pipe (what was queued to it); the monitor reports the disconnect. Lingering 0, the close
    resets the connection and drops what the kernel still held for it, so a client that does
    not read learns it at once too and its libzmq reconnects. (libzmq has no call to close
    one peer of a bound ROUTER.)"""
    _setsockopt(fd, _SOL_SOCKET, _SO_LINGER, _LINGER_0, len(_LINGER_0))
    _shutdown(fd, _SHUT_RDWR)


def unsent_bytes(fd: int) -> int | None:
    """What the socket `fd` has not sent (SIOCOUTQ), None if it is no socket any more."""
    try:
        return _INT.unpack(fcntl.ioctl(fd, termios.TIOCOUTQ, _ZERO))[0]
    except OSError:
        return None


class MemoryBudget:
    """The limit, the base, and the parts counted (each a callable returning bytes, read at
    checks, not per message); the per-session queue check."""

    def __init__(self, limit_bytes: int, max_queued_bytes: int, sndbuf_bytes: int):
        self.limit = limit_bytes
        self.max_queued_bytes = max_queued_bytes
        # the kernel buffer counts as draining below half of what was asked for (the kernel
        # doubles SO_SNDBUF for its bookkeeping; a full buffer holds more than that)
        self.drained_below = sndbuf_bytes // 2
        self.queued = 0           # the live sessions' queued_bytes, summed
        self.parts = {"queued": lambda: self.queued}   # + held, replay, views
        self.start()

    def start(self) -> None:
        """Serving begins: what the process holds now is its base."""
        self.base = rss_bytes()
        self.check_every = max(MIN_CHECK_EVERY,
                               min(self.max_queued_bytes, self.headroom() // 64) // 4)

    def headroom(self) -> int:
        """What the limit leaves for the parts counted."""
        return max(0, self.limit - self.base)

    def accounted(self) -> dict:
        return {name: part() for name, part in self.parts.items()}

    def total(self) -> int:
        return sum(part() for part in self.parts.values())

    def over(self) -> bool:
        return self.total() > self.headroom()

    def queue_check(self, s) -> int:
        """Bring the session's queued bytes up to date (see the module docstring); returns
        them."""
        unsent = unsent_bytes(s.fd)
        # a socket we cannot ask (its fd unknown, or closing) counts as draining: the
        # message limit still holds it
        if unsent is None or unsent < self.drained_below:
            s.taken_bytes = s.checked_bytes
        s.checked_bytes = s.out_bytes
        s.check_at = s.out_bytes + self.check_every
        queued = s.out_bytes - s.taken_bytes
        self.queued += queued - s.queued_bytes
        s.queued_bytes = queued
        return queued

    def forget(self, s) -> None:
        """A session that closed: its queue is gone with its connection (or about to be)."""
        self.queued -= s.queued_bytes
        s.queued_bytes = 0
