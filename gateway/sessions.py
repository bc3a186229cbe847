"""Who is connected: sessions of authenticated connections, and each account's request budget.

A session is one client connection as the ROUTER shows it: its routing id, the account its
CURVE key authenticated as (the ZAP User-Id libzmq attaches to every message of the
connection) and the connection's fd (from the message; the socket monitor names connections
by fd). It is known from its first message and ends when the monitor reports its fd
disconnected.
"""

from __future__ import annotations

import zmq


class Session:
    __slots__ = ("identity", "account", "user_id", "fd", "cancel_on_disconnect")

    def __init__(self, identity: bytes, account: int, user_id: str, fd: int):
        self.identity = identity
        self.account = account
        self.user_id = user_id
        self.fd = fd
        self.cancel_on_disconnect = False


class Sessions:
    """The session table: by routing id, by account (for reports) and by fd (for the monitor)."""

    def __init__(self):
        self.by_identity: dict[bytes, Session] = {}
        self.by_account: dict[int, list[bytes]] = {}
        self.by_fd: dict[int, list[bytes]] = {}

    def of_message(self, identity: bytes, frame, learn_disconnects) -> Session | None:
        """The message's session (None if it carries no account). `learn_disconnects()`
        drains the monitor before a new connection is trusted (an fd may have been reused)."""
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        s = self.by_identity.get(identity)
        if s is not None and s.user_id == user_id:
            return s
        learn_disconnects()
        if s is not None:
            self.remove(s)
        if not user_id or not user_id.isdigit():
            return None
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            fd = -1
        s = Session(identity, int(user_id), user_id, fd)
        self.by_identity[identity] = s
        self.by_account.setdefault(s.account, []).append(identity)
        self.by_fd.setdefault(fd, []).append(identity)
        return s

    def remove(self, s: Session) -> None:
        if self.by_identity.get(s.identity) is s:
            del self.by_identity[s.identity]
        conns = self.by_account.get(s.account)
        if conns is not None and s.identity in conns:
            conns.remove(s.identity)
            if not conns:
                del self.by_account[s.account]
        same_fd = self.by_fd.get(s.fd)
        if same_fd is not None and s.identity in same_fd:
            same_fd.remove(s.identity)
            if not same_fd:
                del self.by_fd[s.fd]

    def on_fd(self, fd: int) -> list[Session]:
        """The sessions of a connection the monitor reports accepted or disconnected."""
        out = []
        for identity in list(self.by_fd.get(fd, ())):
            s = self.by_identity.get(identity)
            if s is not None:
                out.append(s)
        return out


class TokenBucket:
    """Per-account request budget: `rate` per second, bursts up to `burst`."""

    __slots__ = ("rate", "burst", "buckets")

    def __init__(self, rate: float, burst: float):
        self.rate = rate / 1e9          # per ns
        self.burst = float(burst)
        self.buckets: dict[int, list] = {}

    def take(self, account: int, now_ns: int) -> bool:
        b = self.buckets.get(account)
        if b is None:
            self.buckets[account] = [self.burst - 1.0, now_ns]
            return True
        tokens = b[0] + (now_ns - b[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        b[1] = now_ns
        if tokens < 1.0:
            b[0] = tokens
            return False
        b[0] = tokens - 1.0
        return True
