"""Who is connected: sessions of authenticated connections, and each account's request budget.

A session is one client connection: its routing id, the account its CURVE key authenticated as
(the ZAP User-Id libzmq attaches to every message of the connection) and the connection's fd
(the message's ZMQ_SRCFD; the socket monitor names connections by fd). The three together
are the session's key; a routing id alone names nothing for long, since a client may choose
its own and reuse it on a new connection once the old one is gone.

Lifecycle:
- live: from its first message. Replies and its account's reports are sent to it.
- closing: the monitor reported its fd disconnected (or the fd accepted again). Nothing more
  is sent to it, its replies and held messages included: they are dropped, never re-routed.
  Messages it sent before the disconnect may still be unread in the ROUTER; they carry its key
  and are processed as this session (their commands are sequenced).
- finished: all its messages are read. Then its cancel-on-disconnect is queued, after every
  command it sent.
- evicted: ended by the gateway while the connection may stay open (an account the operator
  disabled; a client that does not read, whose connection the outbox then shuts down,
  gateway/outbox.py). Finished at once; what the connection sends from then on is read and
  ignored until the monitor reports it closed. libzmq frees a routing id only once its pipe
  is read to the end, so a message with the same routing id and another key proves the old
  one drained; so does an empty ROUTER, or more reads than there are connections since its
  last message (the ROUTER queues fairly, one message per pipe in turn).

Limits: at most `max_per_account` live sessions per account; a connection beyond it is
`refused`: each message it sends is answered with a reject and nothing else is sent to it.
The handshake already refuses a key whose account is at its limit, and any key while the
gateway has `max_connections` connections open (`admits`, called from the ZAP thread).
"""

from __future__ import annotations

import numpy as np

import zmq


class Session:
    __slots__ = ("identity", "account", "user_id", "fd", "cancel_on_disconnect", "live",
                 "last_read", "refused", "evicted", "out_bytes", "checked_bytes",
                 "taken_bytes", "check_at", "queued_bytes")

    def __init__(self, identity: bytes, account: int, user_id: str, fd: int):
        self.identity = identity
        self.account = account
        self.user_id = user_id
        self.fd = fd
        self.cancel_on_disconnect = False
        self.live = True
        self.last_read = 0          # Sessions.reads at its last message (or its disconnect)
        self.refused = False        # beyond its account's connection limit
        self.evicted = False        # ended by the gateway while its connection stays open
        # outgoing bytes (gateway/memory.py): handed to libzmq; handed at the last check;
        # known to have left the gateway; when to check next; not taken by the client
        self.out_bytes = self.checked_bytes = self.taken_bytes = 0
        self.check_at = 0
        self.queued_bytes = 0


class Sessions:
    """The session table: by routing id, live ones by account (for reports) and by fd (for the
    monitor), closing ones until their messages are read."""

    def __init__(self, on_finished, max_per_account: int = 8, max_connections: int = 512):
        self.on_finished = on_finished    # called with each session once all it sent is read
        self.max_per_account = max_per_account
        self.max_connections = max_connections
        self.open_connections = 0         # accepted minus disconnected (the monitor's count)
        self.by_identity: dict[bytes, Session] = {}
        self.by_account: dict[int, list[Session]] = {}
        self.by_fd: dict[int, list[Session]] = {}
        self.closing: list[Session] = []
        self.evicted: dict[int, list[Session]] = {}    # fd -> sessions evicted, still connected
        self.forgetting: list[Session] = []     # evicted, connection closed, maybe unread
        self.reads = 0                    # messages read from the ROUTER
        self.on_closed = lambda s: None   # each session as it stops being live

    def of_message(self, identity: bytes, frame, learn_disconnects) -> Session | None:
        """The message's session (None if it carries no account). `learn_disconnects()`
        drains the monitor before a new connection is trusted (an fd may have been reused)."""
        self.reads += 1
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:      # (deprecated in libzmq; without it the fd is unknown)
            fd = -1
        s = self.by_identity.get(identity)
        if s is not None and s.user_id == user_id and s.fd == fd:
            s.last_read = self.reads
            return s
        learn_disconnects()
        s = self.by_identity.get(identity)
        if s is not None:
            # The routing id has a new connection: the old one's pipe is gone, all it sent read.
            if s.live:
                self.close(s)
            self.finish(s)
        if not user_id or not user_id.isdigit():
            return None
        s = Session(identity, int(user_id), user_id, fd)
        s.last_read = self.reads
        self.by_identity[identity] = s
        conns = self.by_account.get(s.account)
        if conns is None:
            self.by_account[s.account] = [s]
        elif len(conns) < self.max_per_account:
            conns.append(s)
        else:
            s.refused = True
        self.by_fd.setdefault(fd, []).append(s)
        return s

    def admits(self, account: int) -> bool:
        """May a key of `account` complete a handshake now? (Read from the ZAP thread: a
        snapshot is enough, the session table has the last word.)"""
        return self.open_connections < self.max_connections and \
            len(self.by_account.get(account, ())) < self.max_per_account

    def on_fd(self, fd: int) -> None:
        """The monitor reports fd disconnected (or accepted: a reused fd's old connection is
        gone): its live sessions close, its evicted ones are forgotten."""
        for s in list(self.by_fd.get(fd, ())):
            self.close(s)
        for s in self.evicted.pop(fd, ()):
            s.last_read = self.reads
            self.forgetting.append(s)

    def evict(self, s: Session) -> None:
        """The gateway ends a session whose connection stays open (its queue is full, or its
        account was disabled): nothing more is sent to it and nothing it sends from now on is
        executed, so it is finished at once, after all it sent before; it is forgotten once
        its connection has closed and all it sent is read."""
        if not s.live:
            return
        self.close(s)
        s.evicted = True
        self.evicted.setdefault(s.fd, []).append(s)
        self.finish(s)

    def close(self, s: Session) -> None:
        """live -> closing: nothing more is sent to it."""
        if not s.live:
            return
        s.live = False
        s.last_read = self.reads
        self.on_closed(s)
        conns = self.by_account.get(s.account)
        if conns is not None and s in conns:
            conns.remove(s)
            if not conns:
                del self.by_account[s.account]
        same_fd = self.by_fd.get(s.fd)
        if same_fd is not None and s in same_fd:
            same_fd.remove(s)
            if not same_fd:
                del self.by_fd[s.fd]
        self.closing.append(s)

    def finish(self, s: Session) -> None:
        """closing -> finished: all it sent is read."""
        if not s.evicted and self.by_identity.get(s.identity) is s:
            del self.by_identity[s.identity]
        if s in self.closing:
            self.closing.remove(s)
            self.on_finished(s)

    def finish_drained(self, router_empty: bool) -> None:
        """After reading from the ROUTER: finish the closing sessions that have nothing left
        in it (all of them if it is empty)."""
        horizon = self.reads - 2 * len(self.by_identity) - 2
        for s in list(self.closing):
            if router_empty or s.last_read < horizon:
                self.finish(s)
        for s in list(self.forgetting):
            if router_empty or s.last_read < horizon:
                self.forgetting.remove(s)
                if self.by_identity.get(s.identity) is s:
                    del self.by_identity[s.identity]


class TokenBucket:
    """Per-account request budget: `rate` tokens per second, bursts up to `burst`; a request
    takes its weight in tokens. Kept in arrays indexed by account id (0 <= account <
    accounts; any other account is refused), which the compiled lane's recv_pass reads and
    writes too (gateway/compiled_pass.py `_handle`, the same rule for one token): one budget
    per account, whichever lane takes the request."""

    __slots__ = ("rate", "burst", "tokens", "token_ts")

    def __init__(self, rate: float, burst: float, accounts: int):
        self.rate = rate / 1e9          # per ns
        self.burst = float(burst)
        self.tokens = np.full(accounts, self.burst, np.float64)
        self.token_ts = np.zeros(accounts, np.int64)   # 0: never used, so the bucket is full

    def take(self, account: int, now_ns: int, weight: int = 1) -> bool:
        if not 0 <= account < len(self.tokens):
            return False
        tokens = min(self.burst, float(self.tokens[account]) +
                     (now_ns - int(self.token_ts[account])) * self.rate)
        self.token_ts[account] = now_ns
        if tokens < weight:
            self.tokens[account] = tokens
            return False
        self.tokens[account] = tokens - weight
        return True
