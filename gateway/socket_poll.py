"""Sleeping on a ZeroMQ socket and plain fds in one poll(2).

zmq_poll (pyzmq's `Poller`) asks each socket for its events (ZMQ_EVENTS: inside libzmq a
zero-timeout poll(2) and a getpid(2), ~1.5 µs from Python) before it sleeps and again when it
wakes, and it polls the fds with a zero timeout before the one that sleeps: for a socket and
its monitor, four such questions and two poll(2)s per sleep. The gateway sleeps between most
orders, so a lone order paid that twice (its request, then its events); a client's request
pays it once more, waiting for the reply.

A socket's notification fd (ZMQ_FD) lets one poll(2) cover the socket and other fds (the
gateway's doorbell FIFO, a monitor's ZMQ_FD). That fd is edge-triggered: it signals commands
sent to the socket since it last processed its commands (a peer's message arriving at an
empty queue is one), not messages already queued. Any call on the socket may process its
commands, a send() among them, and so take in the wake-up of a message nobody has read. So
the socket is asked once (ZMQ_EVENTS) just before sleeping. A socket registered as a plain fd
(a monitor) must be read until it has nothing (`has_input` false) whenever it is read, so that
its next message signals its fd.

Users: the gateway's ROUTER (gateway/server.py), the relay floor's (perpx/bench/relay.py),
the client library's DEALER (perpx/client.py).
"""

from __future__ import annotations

import select

import zmq

_get_option = zmq.backend.Socket.get     # pyzmq's Cython method, int option: no enum wrapping
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def has_input(sock: zmq.Socket) -> bool:
    """Whether `sock` has a message to read now (ZMQ_EVENTS). Asking processes the socket's
    pending commands, so its fd signals only what arrives after."""
    return bool(_get_option(sock, _EVENTS) & _POLLIN)


class SocketPoll:
    def __init__(self, sock: zmq.Socket, *fds: int):
        """sock: the socket whose input wakes `wait`; fds: plain fds (or other sockets'
        ZMQ_FD, kept drained) that wake it too."""
        self.sock = sock
        self.sock_fd = sock.get(zmq.FD)
        self._poll = select.poll()
        self._poll_fds = select.poll()
        for fd in (self.sock_fd, *fds):
            self._poll.register(fd, select.POLLIN)
        for fd in fds:
            self._poll_fds.register(fd, select.POLLIN)

    def wait(self, timeout_ms: int) -> list[int]:
        """Block until the socket has input, one of the fds is readable, or timeout_ms.

        Returns the fds that are ready: `sock_fd` when the socket has input (at once, without
        sleeping, if it has some already) or may have (its fd signalled: a message, or only a
        command; the caller reads until `zmq.Again`), and each readable fd given; [] when
        timeout_ms passed.
        """
        if has_input(self.sock):
            return [self.sock_fd]
        return [fd for fd, _ in self._poll.poll(timeout_ms)]

    def wait_fds(self, timeout_ms: int) -> list[int]:
        """`wait` without the socket: for a caller that cannot read it now (its input has
        nowhere to go), so that its queued messages do not wake it. Returns the readable fds;
        [] when timeout_ms passed."""
        return [fd for fd, _ in self._poll_fds.poll(timeout_ms)]
