"""Everything the gateway sends: replies and reports to sessions, market data to the PUB, and
the durable hold in front of both.

"fast" mode sends at once. "durable" mode (PROTOCOL: acks and fills only once journaled)
holds every message caused by an event, and query answers, until `durable_seq()` (persistd's
journal progress in shm) reaches its seq; `release_upto(seq)` sends what is due. Messages
without a seq (pong, hello, edge rejects) are never held.

Only live sessions are sent to (gateway/sessions.py): what is due to a session that closed,
held messages included, is dropped, never sent to whoever has its routing id now. Nothing here
blocks. A session's connection holds at most the ROUTER's send high-water mark of messages
(`max_queued_messages`) and `max_queued_bytes` not taken by its client (counted as
gateway/memory.py says): a session over either is dropped, and so is the one with the most
queued when the gateway's memory passes its bound (`gateway_memory_limit_mb`). Dropped: ended
(gateway/sessions.py `evict`, its cancel_on_disconnect applies) and its connection shut down,
which frees what libzmq queued to it; the client's libzmq reconnects and its library replays.
So a client that does not read costs a bounded amount of memory and nobody else's messages.
A market-data subscriber that does not read loses messages at its high-water mark.
"""

from __future__ import annotations

import time
from collections import deque

import zmq

from engine.records import REASON_NAMES
from gateway.ack_latency import AckLatency
from gateway.codec import pack
from gateway.memory import MESSAGE_OVERHEAD, MemoryBudget, release_freed, rss_bytes, shut_down
from gateway.reasons import ReasonLog

# pyzmq's Cython socket method, called directly with int flags: the Python-level wrappers and
# flag enums cost several µs per message (measured: send_multipart 5.6 µs, this 1.0 µs).
_send_part = zmq.backend.Socket.send
_NB = int(zmq.NOBLOCK)
_NB_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def send_pair(sock, first: bytes, second: bytes) -> None:
    """A two-frame message (routing id or topic, then payload), never blocking."""
    try:
        _send_part(sock, first, _NB_MORE, True, False)
        _send_part(sock, second, _NB, True, False)
    except zmq.ZMQError:
        pass


def with_rid(msg: dict, rid) -> dict:
    if rid is not None:
        msg["rid"] = rid
    return msg


DROP_QUEUE_FULL = "session dropped: its client does not read (queue full)"
DROP_BYTES = "session dropped: its client does not read (bytes queued)"
DROP_MEMORY = "session dropped: the gateway's memory bound (most bytes queued)"


class Outbox:
    def __init__(self, router, pub, sessions, durable_seq, stats: dict,
                 memory: MemoryBudget):
        self.router = router
        self.pub = pub
        self.sessions = sessions
        self.durable = durable_seq is not None
        self.durable_seq = durable_seq
        self.held = deque()            # (seq, Session or None for the PUB, payload)
        self.held_bytes = 0            # their payloads'
        self.memory = memory
        self.memory.parts["held"] = lambda: self.held_bytes
        self._trim = False             # something was dropped: give freed memory back
        self.stats = stats
        self.stats.setdefault("edge_rejects", 0)
        self.stats.setdefault("dropped_sessions", 0)
        self.reasons = ReasonLog()
        # replies are timed from receipt to send: routing tells it of each, and the outbox
        # when they went to the socket (sent_upto with fast acks, release_upto when held)
        self.ack_latency = AckLatency()
        self.learn_disconnects = lambda: None    # the gateway's: drain the socket monitor
        self.lane = None       # the compiled lane (gateway/compiled_pass.py), if it runs

    # -- to sessions --------------------------------------------------------------------
    def send(self, session, payload: bytes, seq: int = 0) -> None:
        if self.durable and seq:
            if self.lane is not None and self.lane.holds(session):
                self.lane.hold(session, seq, payload)    # one queue per session: the lane's
                return
            self.held.append((seq, session, payload))
            self.held_bytes += len(payload)
        elif session.live:
            self._deliver(session, payload)

    def _deliver(self, session, payload: bytes) -> None:
        try:
            _send_part(self.router, session.identity, _NB_MORE, True, False)
            _send_part(self.router, payload, _NB, True, False)
        except zmq.ZMQError as e:
            self.failed(session, e.errno)
            return
        session.out_bytes += len(payload) + MESSAGE_OVERHEAD
        if session.out_bytes >= session.check_at:
            self.check(session)

    def failed(self, session, errno: int) -> None:
        """libzmq refused a send to the session with errno."""
        # ROUTER_MANDATORY: EAGAIN is a full queue (a client that does not read) or a
        # connection closing, EHOSTUNREACH one gone; the monitor reports a closing
        # connection before libzmq refuses sends to it: it closes, it is not evicted
        self.learn_disconnects()      # a closing connection is not a slow client
        if not session.live:
            return
        if errno == zmq.EAGAIN:
            self.drop(session, DROP_QUEUE_FULL)
        else:
            self.sessions.evict(session)

    # -- the bounds (gateway/memory.py) -------------------------------------------------
    def check(self, session) -> None:
        memory = self.memory
        if memory.queue_check(session) > memory.max_queued_bytes:
            self.drop(session, DROP_BYTES)
        elif memory.over():
            self.drop_largest()

    def drop(self, session, reason: str) -> None:
        """End a session that costs too much and shut its connection down (see the module
        docstring)."""
        self.learn_disconnects()       # its fd is still its connection's
        if not session.live:
            return
        self.stats["dropped_sessions"] += 1
        self.reasons.note(reason)
        self.sessions.evict(session)
        shut_down(session.fd)
        self._trim = True

    def drop_largest(self) -> bool:
        """Drop the live session with the most bytes queued, if any has some."""
        largest = None
        for conns in self.sessions.by_account.values():
            for s in conns:
                if largest is None or s.queued_bytes > largest.queued_bytes:
                    largest = s
        if largest is None or largest.queued_bytes <= 0:
            return False
        self.drop(largest, DROP_MEMORY)
        return True

    def memory_tick(self) -> None:
        """Once a second: bring counted queues up to date (a client that caught up frees its
        count), hold the bound (accounted bytes, and RSS itself: one more drop per tick while
        it is above the limit), give what drops freed back to the system."""
        memory = self.memory
        if self.lane is not None:
            self.lane.count_all()        # the bytes the lane sent, onto the sessions
        for conns in tuple(self.sessions.by_account.values()):
            for s in tuple(conns):
                if s.queued_bytes and s.live:
                    self.check(s)
        while memory.over() and self.drop_largest():
            pass
        if rss_bytes() > memory.limit:
            self.drop_largest()
        if self._trim:
            self._trim = False
            release_freed()

    def reply(self, session, msg: dict, rid, seq: int = 0) -> None:
        self.send(session, pack(with_rid(msg, rid)), seq)

    def reject(self, session, reason: int, text: str, rid=None, cid=None) -> None:
        """An edge reject: the gateway's own, nothing was sequenced."""
        self.stats["edge_rejects"] += 1
        self.reasons.note(REASON_NAMES[reason])
        msg = {"type": "reject", "reason": REASON_NAMES[reason], "message": text,
               "ts": time.time_ns()}
        if type(cid) is int:
            msg["cid"] = cid
        self.reply(session, msg, rid)

    def to_account(self, account: int, msg: dict, requester=None, rid=None, seq=0) -> None:
        """An event's message to every live session of the account; the requester's copy (if
        it is still live) has rid."""
        conns = self.sessions.by_account.get(account)
        if requester is not None and rid is not None:
            plain = None
            msg_rid = dict(msg)
            msg_rid["rid"] = rid
            self.send(requester, pack(msg_rid), seq)
        else:
            plain = pack(msg)
            if requester is not None:
                self.send(requester, plain, seq)
        if conns:
            for s in tuple(conns):       # a full queue closes a session: it leaves conns
                if s is not requester:
                    if plain is None:
                        plain = pack(msg)
                    self.send(s, plain, seq)

    # -- market data --------------------------------------------------------------------
    def publish(self, topic: bytes, payload: bytes, seq: int) -> None:
        if self.durable:
            self.held.append((seq, None, (topic, payload)))
            self.held_bytes += len(payload)
            return
        send_pair(self.pub, topic, payload)

    def sent_upto(self, seq: int) -> None:
        """The replies to events up to `seq` went to the socket, unless they are held (durable
        acks: release_upto sends them, and says so)."""
        if self.ack_latency.unsent and not self.durable:
            self.ack_latency.sent_upto(seq, time.time_ns())

    # -- the durable hold ---------------------------------------------------------------
    def releasable(self) -> bool:
        """Durable mode: something held is journaled now (persistd rings our doorbell)."""
        held = self.held
        durable = self.durable_seq()
        return (bool(held) and held[0][0] <= durable) or \
            (self.lane is not None and self.lane.releasable(durable))

    def release_upto(self, seq: int) -> int:
        """Send what was held for events up to `seq` (journaled); returns how many."""
        held = self.held
        n = 0
        size = 0
        while held and held[0][0] <= seq:
            _, session, payload = held.popleft()
            if session is None:
                send_pair(self.pub, payload[0], payload[1])
                size += len(payload[1])
            else:
                size += len(payload)
                if session.live:
                    self._deliver(session, payload)
            n += 1
        self.held_bytes -= size
        if n and self.ack_latency.unsent:
            self.ack_latency.sent_upto(seq, time.time_ns())
        return n
