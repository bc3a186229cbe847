"""The gateway process: clients over ZeroMQ (CURVE, msgpack) in, command ring out, events back.

One process, one thread doing the work (plus pyzmq's ZAP thread for handshakes):

    loop:
        drain the event ring (everything published, in command-aligned batches):
            apply each event to the mirror (book, orders, balances, positions)
            route it: the reply to the connection that sent the request (with its `rid`),
                      reports to every connection of the account the event is addressed to
            market data (one gateway only): trades as they come, book deltas per batch
        drain the ROUTER (up to a batch of messages):
            authenticate (the connection's ZAP User-Id is the account), rate-limit, decode,
            validate everything, pack commands into a buffer; answer queries and edge rejects
        write the buffered commands to the command ring in one go
        nothing to do: optionally spin (`spin_s`, off by default: on a shared 2-core box a
            spinning gateway takes the core the matcher needs), then sleep in one zmq poll on
            [ROUTER, monitor, the event ring's doorbell FIFO] until a message, a connection
            event or new events

Requests get a `req` token (int32) that the matcher copies onto every event the command
causes, together with the ring it came from (`source`): an event is this gateway's reply
only if its source is this gateway's ring, its req is pending here and its account is the
requester's. Which events are replies: `ack`/`reject` for new_order, `canceled`/`reject` for
cancel, `amended`/`reject` for amend, `done`/`reject` for cancel_all and withdraw.

Routing: order events (ack, canceled, amended, fill) go to every connection of the account on
this gateway (the requester's copy carries `rid`, the others none), rejects and `done` only
to the requester. Nothing is ever sent to a connection of another account: events are
addressed by the account field the matcher wrote, and connections are keyed by the
authenticated account.

Acks and fills in "fast" mode go out as soon as they are in the event ring. "durable" mode
(PROTOCOL: only once journaled) holds every outgoing message of an event, and query answers,
until `durable_seq()` (a callable the owner passes, e.g. reading persistd's durable_seq from
shm) reaches its seq; `release_upto(seq)` is the hook that releases them.

Start-up: attach the rings (matcher first), join the event ring as consumer `gateway-N`
(start="saved" if that slot was used before, so a restarted gateway resumes at its cursor,
else "current"), copy the matcher's state at a command boundary (gateway/mirror.py) and apply
only later events to the mirror; events between the saved cursor and that point are still
routed. Then bind the sockets and serve.

Running one: `python -m gateway --prefix /perpx-x --index 0 --source-index 1
--server-key server.key_secret --accounts ACCOUNTS_DIR --markets markets.json
[--orders tcp://127.0.0.1:7001] [--market-data tcp://127.0.0.1:7002] [--rate 5000 --burst 10000]
[--endpoints-file F]`; SIGTERM/SIGINT stop it cleanly. `--source-index` is the position of
this gateway's ring (`names.command_ring(prefix, "gateway-N")`) in the MatcherService's source
list; markets.json is `{"engine": {EngineConfig fields}, "markets": [...]}` (gateway/markets.py).
Give `--market-data` to one gateway only.

Connections: a connection is known from its first message (identity + User-Id + its socket
fd); the ROUTER's monitor reports disconnects by fd, which ends the session. A session that
sent `{"type": "hello", "cancel_on_disconnect": true}` gets all its account's orders canceled
(reason `disconnect`) when it disconnects (only if the gateway sees the disconnect: a gateway
restart forgets sessions, so clients say hello again when they reconnect).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from engine.config import EngineConfig
from engine.records import (CMD_CANCEL_ALL, CMD_FUNDING, CMD_LIQUIDATE, COMMAND_DTYPE, EV_ACK,
                            EV_AMENDED, EV_BALANCE, EV_CANCELED, EV_COMMAND, EV_DONE,
                            EV_FUNDING, EV_LIQUIDATION, EV_MARK, EV_REJECT,
                            EV_TRADE, EV_TRIGGERED, EVENT_BYTES, EVENT_DTYPE, MARKET_STATE_NAMES,
                            MARKET_TRADING, REASON_DISCONNECT, REASON_FORBIDDEN,
                            REASON_INVALID_MESSAGE, REASON_MARKET_HALTED, REASON_NAMES,
                            REASON_RATE_LIMITED, REASON_UNKNOWN_ORDER)
from engine.service import attach_state
from shm import names
from gateway import codec
from gateway.accounts import ZAP_DOMAIN, AccountAuthenticator, AccountRegistry
from gateway.codec import (COMMAND_IN_EVENT_OFFSET, COMMAND_STRUCT, ETYPE_OFFSET,
                           FUNDING_EVENT_STRUCT, LIQUIDATION_EVENT_STRUCT, MARK_EVENT_STRUCT,
                           ORDER_EVENT_STRUCT, TRADE_EVENT_STRUCT, pack)
from gateway.account_state import account_state_fields, account_tables
from gateway.markets import EdgeReject, MarketTable
from gateway.mirror import (M_ACTIVE, M_ATPL, M_MARK, M_MAX_ORDER, M_MAX_PRICE, M_STATE,
                            O_ACCOUNT, O_MARKET, Mirror, consistent_state_copy)
from shm.progress import JournalProgress
from shm.index_board import IndexBoard
from shm.region import ShmError, attach_retrying
from shm.ring import CommandRing, EventRing
from shm.wait import SpinYieldBlockWait

log = logging.getLogger("perpx.gateway")

# what a pending request expects as its reply
R_NEW_ORDER, R_CANCEL, R_AMEND, R_DONE, R_DISCONNECT = range(5)
_REPLY_ETYPES = {
    R_NEW_ORDER: (EV_ACK, EV_REJECT),
    R_CANCEL: (EV_CANCELED, EV_REJECT),
    R_AMEND: (EV_AMENDED, EV_REJECT),
    R_DONE: (EV_DONE, EV_REJECT),
    R_DISCONNECT: (EV_DONE, EV_REJECT),
}
REQ_LIMIT = 2 ** 31 - 1
# pyzmq's Cython socket methods, called directly with int flags: the Python-level wrappers and
# flag enums cost several µs per message (measured: send_multipart 5.6 µs, these 1.0 µs).
_send_part = zmq.backend.Socket.send
_recv_part = zmq.backend.Socket.recv
_get_option = zmq.backend.Socket.get
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NB = int(zmq.NOBLOCK)
_NB_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_NAME_INVALID = REASON_NAMES[REASON_INVALID_MESSAGE]


def _send_pair(sock, first: bytes, second: bytes) -> None:
    """A two-frame message (identity or topic, then payload), never blocking: a client (or
    subscriber) that does not read loses messages at the high-water mark, not the gateway."""
    try:
        _send_part(sock, first, _NB_MORE, True, False)
        _send_part(sock, second, _NB, True, False)
    except zmq.ZMQError:
        pass
# Requests that would add exposure or move money: refused while the journal fails.
_NOT_WHILE_JOURNAL_FAILS = frozenset(("new_order", "amend", "withdraw", "set_margin"))
# How long an `account` query may wait for the matcher to pause between command batches.
ACCOUNT_COPY_TIMEOUT_S = 0.5
# How often the market-data gateway looks for index/funding changes riskd published without
# a new mark.
BOARD_REPUBLISH_S = 1.0
NO_BOARD_LINE = (None, None, None)


class Session:
    __slots__ = ("identity", "account", "user_id", "fd", "cancel_on_disconnect")

    def __init__(self, identity, account, user_id, fd):
        self.identity = identity
        self.account = account
        self.user_id = user_id
        self.fd = fd
        self.cancel_on_disconnect = False


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


class Gateway:
    def __init__(self, prefix: str, engine_cfg: EngineConfig, markets: MarketTable, *,
                 source_index: int, accounts_dir, server_secret_key_file=None,
                 server_keys: tuple[bytes, bytes] | None = None, index: int = 0,
                 orders_endpoint: str = "tcp://127.0.0.1:*",
                 market_data_endpoint: str | None = None,
                 source_name: str | None = None, consumer_name: str | None = None,
                 rate_per_s: float = 5000.0, burst: float = 10000.0,
                 max_message_bytes: int = 1024, hard_max_message_bytes: int = 64 * 1024,
                 ack_mode: str = "fast", durable_seq=None, journal_errno=None,
                 event_batch: int = 4096, recv_batch: int = 256, spin_s: float = 0.0,
                 attach_timeout_s: float = 30.0, context: zmq.Context | None = None):
        if ack_mode not in ("fast", "durable"):
            raise ValueError(f"ack_mode must be 'fast' or 'durable', got {ack_mode!r}")
        if ack_mode == "durable" and durable_seq is None:
            raise ValueError("ack_mode 'durable' needs durable_seq: a callable returning the "
                             "journal's durable sequence number (persistd)")
        self.prefix = prefix
        self.cfg = engine_cfg
        self.markets = markets
        self.index = index
        self.source_index = source_index
        self.source_name = source_name or f"gateway-{index}"
        self.consumer_name = consumer_name or f"gateway-{index}"
        self.max_message_bytes = max_message_bytes
        self.durable = ack_mode == "durable"
        self.durable_seq = durable_seq
        # persistd's journal_errno (shm/progress.py): non-zero while journal writes fail
        self.journal_errno = journal_errno or (lambda: 0)
        self.event_batch = event_batch
        self.recv_batch = recv_batch
        self.spin_s = spin_s
        self.market_by_id = [markets.by_id.get(m) for m in range(engine_cfg.max_markets)]
        self.limiter = TokenBucket(rate_per_s, burst)
        self._closers = []
        self._closed = False
        try:
            self._attach(attach_timeout_s)
            self._setup_zmq(context, accounts_dir, server_secret_key_file, server_keys,
                            orders_endpoint, market_data_endpoint, hard_max_message_bytes)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ start-up -------
    def _attach(self, timeout_s: float) -> None:
        bells = []

        def wait_factory(bell):
            bells.append(bell)
            return SpinYieldBlockWait(bell)

        self.events = attach_retrying(lambda: EventRing.attach(
            names.event_ring(self.prefix), EVENT_DTYPE, wait=wait_factory), timeout_s)
        self._closers.append(self.events.close)
        try:
            self.consumer = self.events.consumer(self.consumer_name, start="saved")
            self.joined = "saved"
        except ShmError:
            self.consumer = self.events.consumer(self.consumer_name, start="current")
            self.joined = "current"
        self.bell = bells[-1]
        self.ring = attach_retrying(lambda: CommandRing.attach(
            names.command_ring(self.prefix, self.source_name), COMMAND_DTYPE), timeout_s)
        self._closers.append(self.ring.close)
        region, self._state = attach_retrying(lambda: attach_state(self.prefix, self.cfg),
                                              timeout_s)
        self._closers.append(lambda: self._close_state(region))
        tables, seq = consistent_state_copy(self._state, self.events, timeout_s)
        self.mirror = Mirror.from_state(tables, seq, self.cfg.max_markets)
        self.boot_seq = seq
        self._check_markets()
        # Requests of a previous incarnation of this gateway may still be in our ring: let the
        # matcher take them, and consume their events, before our own req tokens start.
        deadline = time.monotonic() + min(timeout_s, 5.0)
        while self.ring.free_slots() < self.ring.capacity and time.monotonic() < deadline:
            time.sleep(0.001)
        self._next_req = 1 + int.from_bytes(os.urandom(3), "little")
        self.pending: dict[int, tuple] = {}
        self.pending_cids: dict[tuple[int, int], tuple[int, int]] = {}
        self.sessions: dict[bytes, Session] = {}
        self.by_account: dict[int, list[bytes]] = {}
        self.by_fd: dict[int, list[bytes]] = {}
        self._cmd_buf = np.zeros(self.recv_batch + 64, COMMAND_DTYPE)
        self._cmd_mv = memoryview(self._cmd_buf.view(np.uint8))
        self._cmd_n = 0
        self._held = deque()
        self._risk_command = None      # (seq, code, command) of the last FUNDING / LIQUIDATE
        self._fired = None             # (seq, oid) of the last `triggered` routed here
        self.index_board = None
        self._index_board_retry = 0.0
        self._board_sent: dict[int, tuple] = {}    # market -> (index, rate, next) last published
        self._state_sent: dict[int, int] = {}      # market -> its state in the last mark.MARKET
        self._board_due = 0.0
        self.stats = {"requests": 0, "edge_rejects": 0, "events": 0, "dropped_frames": 0}

    def _check_markets(self) -> None:
        """The engine's market table is the truth for limits; grids must agree with it."""
        for m, market in enumerate(self.market_by_id):
            mk = self.mirror.markets[m]
            if market is None or not mk[M_ACTIVE]:
                continue
            if mk[M_ATPL] != market.atoms_per_tick_lot:
                raise ValueError(f"market {market.symbol} (id {m}): the matcher has "
                                 f"{mk[M_ATPL]} atoms per tick x lot, the market table "
                                 f"{market.atoms_per_tick_lot}: wrong tick/lot sizes")
            market.set_limits(market.max_price_ticks or mk[M_MAX_PRICE],
                              market.max_order_lots or mk[M_MAX_ORDER])

    def _setup_zmq(self, context, accounts_dir, secret_file, server_keys, orders_endpoint,
                   md_endpoint, hard_max) -> None:
        if server_keys is None:
            if secret_file is None:
                raise ValueError("the gateway needs the server's CURVE keys "
                                 "(server_secret_key_file or server_keys)")
            public, secret = zmq.auth.load_certificate(secret_file)
            if secret is None:
                raise ValueError(f"{secret_file} holds no secret key")
            server_keys = (public, secret)
        self.server_public_key = server_keys[0]
        self.ctx = context or zmq.Context()
        self._own_ctx = context is None
        self.registry = AccountRegistry(accounts_dir, self.cfg.max_accounts)
        self.auth = AccountAuthenticator(self.ctx, self.registry)
        self.auth.start()
        r = self.router = self.ctx.socket(zmq.ROUTER)
        r.linger = 0
        r.curve_server = True
        r.curve_publickey, r.curve_secretkey = server_keys
        r.zap_domain = ZAP_DOMAIN.encode()
        r.maxmsgsize = hard_max
        r.sndhwm = 100_000
        r.rcvhwm = 100_000
        self.monitor = r.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        r.bind(orders_endpoint)
        self.orders_endpoint = r.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub = None
        self.market_data_endpoint = None
        if md_endpoint:
            self.pub = self.ctx.socket(zmq.PUB)
            self.pub.linger = 0
            self.pub.sndhwm = 100_000
            self.pub.bind(md_endpoint)
            self.market_data_endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self.mirror.track_dirty = True
            self.mirror.dirty = [(set(), set()) for _ in range(self.cfg.max_markets)]
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        # the event ring's doorbell for this consumer is a FIFO: new events wake the same poll
        self.poller.register(self.bell.fileno(), zmq.POLLIN)

    def endpoints(self) -> dict:
        return {"orders": self.orders_endpoint, "market_data": self.market_data_endpoint,
                "server_public_key": self.server_public_key.decode()}

    # ------------------------------------------------------------------ main loop ------
    def serve(self, should_stop=lambda: False, heartbeat=None) -> None:
        """Serve until should_stop() (checked at least every 50 ms); heartbeat() each pass."""
        gc.collect()
        gc.freeze()
        gc.disable()
        last_gc = time.monotonic()
        events_at_gc = 0
        consumer = self.consumer
        try:
            while not should_stop():
                worked = self._drain_events()
                if self._cmd_n < self.recv_batch:
                    worked += self._drain_router()
                if self._cmd_n:
                    self._flush_commands()
                if self.durable:
                    self.release_upto(self.durable_seq())
                if heartbeat is not None:
                    heartbeat()
                if self.pub is not None and time.monotonic() >= self._board_due:
                    self._publish_board_changes()
                if worked:
                    if self.stats["events"] - events_at_gc > 1_000_000:
                        gc.collect(0)      # the young generation only: cheap, bounded
                        events_at_gc = self.stats["events"]
                    continue
                # Idle. Replies are due soon if we just wrote commands: spin a little.
                if self.pending and self.spin_s:
                    end = time.perf_counter() + self.spin_s
                    router = self.router
                    while time.perf_counter() < end:
                        if consumer.available() or _get_option(router, _EVENTS) & _POLLIN:
                            break
                    else:
                        self._sleep(50)
                    continue
                now = time.monotonic()
                if now - last_gc > 10.0:
                    gc.collect()      # idle: nobody waits for this pass
                    last_gc = now
                self._sleep(50)
        finally:
            gc.enable()

    def _sleep(self, timeout_ms: int) -> None:
        """Block in one poll on the ROUTER, its monitor and the event ring's doorbell (a FIFO,
        shm/doorbell.py) until a message, a connection event, new events or (durable mode)
        journaled ones: arm the doorbell, re-check, poll, disarm."""
        bell = self.bell
        token = bell.arm()
        readable = False
        try:
            if self.consumer.available() or self._releasable():
                return
            if self._cmd_n:
                timeout_ms = 1    # the command ring was full: retry soon
            for sock, _ in self.poller.poll(timeout_ms):
                if sock is self.monitor:
                    self._drain_monitor()
                elif sock == bell.fileno():
                    readable = True
        finally:
            bell.disarm(token, readable)

    # ------------------------------------------------------------------ output ---------
    def _send(self, identity: bytes, payload: bytes, seq: int = 0) -> None:
        if self.durable and seq:
            self._held.append((seq, identity, payload))
            return
        _send_pair(self.router, identity, payload)

    def _publish(self, topic: bytes, payload: bytes, seq: int) -> None:
        if self.durable:
            self._held.append((seq, None, (topic, payload)))
            return
        _send_pair(self.pub, topic, payload)

    def _releasable(self) -> bool:
        """Durable mode: something held is journaled now (persistd rings our doorbell)."""
        held = self._held
        return bool(held) and held[0][0] <= self.durable_seq()

    def release_upto(self, seq: int) -> int:
        """Durable mode: send what was held for events up to `seq` (journaled); returns how many."""
        held = self._held
        n = 0
        while held and held[0][0] <= seq:
            _, identity, payload = held.popleft()
            if identity is None:
                _send_pair(self.pub, payload[0], payload[1])
            else:
                _send_pair(self.router, identity, payload)
            n += 1
        return n

    def _to_account(self, account: int, msg: dict, requester=None, rid=None, seq=0) -> None:
        """An event's message to every connection of the account; the requester's copy has rid."""
        conns = self.by_account.get(account)
        if requester is not None and rid is not None:
            plain = None
            msg_rid = dict(msg)
            msg_rid["rid"] = rid
            self._send(requester, pack(msg_rid), seq)
        else:
            plain = pack(msg)
            if requester is not None:
                self._send(requester, plain, seq)
        if conns:
            for ident in conns:
                if ident != requester:
                    if plain is None:
                        plain = pack(msg)
                    self._send(ident, plain, seq)

    def _reply(self, identity: bytes, msg: dict, rid, seq: int = 0) -> None:
        if rid is not None:
            msg["rid"] = rid
        self._send(identity, pack(msg), seq)

    def _edge_reject(self, identity, reason: int, text: str, rid=None, cid=None) -> None:
        self.stats["edge_rejects"] += 1
        msg = {"type": "reject", "reason": REASON_NAMES[reason], "message": text,
               "ts": time.time_ns()}
        if type(cid) is int:
            msg["cid"] = cid
        self._reply(identity, msg, rid)

    # ------------------------------------------------------------------ events ---------
    def _drain_events(self) -> int:
        consumer = self.consumer
        available = consumer.available()
        if not available:
            return 0
        head, tail = consumer.peek_views(min(available, self.event_batch))
        n = len(head) + len(tail)
        if n < available:
            # Stop at a command boundary so `applied_seq` never names half a command.
            take = self._command_boundary(head, tail)
            if take == 0:
                head, tail = consumer.peek_views(available)
                n = len(head) + len(tail)
            elif take < n:
                if take <= len(head):
                    head, tail = head[:take], tail[:0]
                else:
                    tail = tail[:take - len(head)]
                n = take
        for part in (head, tail):
            if len(part):
                self._process_events(memoryview(part.view(np.uint8)), len(part))
        consumer.advance(n)
        self.stats["events"] += n
        if self.pub is not None and self.mirror.any_dirty:
            self._publish_book_deltas()
        return n

    @staticmethod
    def _command_boundary(head, tail) -> int:
        """Index of the last EV_COMMAND in head+tail (0 if the first is the only one)."""
        for part, base in ((tail, len(head)), (head, 0)):
            if len(part):
                idx = np.flatnonzero(part["etype"] == EV_COMMAND)
                if len(idx):
                    return base + int(idx[-1])
        return 0

    def _process_events(self, mv: memoryview, count: int) -> None:
        mirror = self.mirror
        boot = self.boot_seq
        mine = self.source_index
        pending = self.pending
        by_account = self.by_account
        order_unpack = ORDER_EVENT_STRUCT.unpack_from
        for i in range(count):
            off = i * EVENT_BYTES
            etype = mv[off + ETYPE_OFFSET]
            if etype == EV_COMMAND:
                cmd = COMMAND_STRUCT.unpack_from(mv, off + COMMAND_IN_EVENT_OFFSET)
                seq = int.from_bytes(mv[off:off + 8], "little", signed=True)
                if seq > boot:
                    mirror.on_command(seq, cmd)
                    mirror.applied_seq = seq
                code = cmd[9]
                if code == CMD_FUNDING or code == CMD_LIQUIDATE:
                    self._risk_command = (seq, code, cmd)
                continue
            if etype == EV_TRADE:
                tr = TRADE_EVENT_STRUCT.unpack_from(mv, off)
                if tr[0] > boot:
                    mirror.on_trade(tr)
                self._route_trade(tr)
                continue
            if etype == EV_MARK:
                ev = MARK_EVENT_STRUCT.unpack_from(mv, off)
                if ev[0] > boot:
                    mirror.on_mark(ev)
                if self.pub is not None:
                    self._publish_mark(ev)
                continue
            if etype >= EV_FUNDING or etype == EV_BALANCE:
                self._risk_event(etype, mv, off)
                continue
            ev = order_unpack(mv, off)
            seq, account = ev[0], ev[5]
            # is it the reply to one of our requests?
            p = None
            if ev[3] == mine and ev[6]:
                p = pending.get(ev[6])
                if p is not None and (p[2] != account or (
                        p[3] != R_DISCONNECT and etype not in _REPLY_ETYPES[p[3]])):
                    p = None      # not the reply: a report that follows it (or not ours)
            if seq > boot:
                changed = mirror.on_order_event(etype, ev, seq)
                if changed is not None:
                    self._market_changed(changed)
            if p is None:
                if etype == EV_DONE and self._risk_command is not None:
                    self._risk_command_done(ev)
                if etype == EV_REJECT or etype == EV_DONE or account not in by_account:
                    if etype == EV_REJECT and self._fired == (seq, ev[11]) and \
                            account in by_account:
                        self._route_fired_reject(ev)
                    continue
                self._route_order_event(etype, ev, None, None, REASON_NAMES.get(ev[7]))
                continue
            identity, rid, _, kind, cid, _ = p
            if kind == R_DISCONNECT:
                if etype == EV_CANCELED:
                    self._route_order_event(etype, ev, None, None,
                                            REASON_NAMES[REASON_DISCONNECT])
                elif etype in (EV_DONE, EV_REJECT):
                    del pending[ev[6]]
                continue
            del pending[ev[6]]
            if kind == R_NEW_ORDER:
                key = (account, cid)
                if self.pending_cids.get(key, (0,))[0] == ev[6]:
                    del self.pending_cids[key]
            if etype == EV_REJECT:
                self._send(identity, pack(self._with_rid(
                    codec.engine_reject_message(ev, cid), rid)), seq)
            elif etype == EV_DONE:
                msg = codec.done_message(ev, ev[14] if kind == R_DONE and p[5] else None)
                self._send(identity, pack(self._with_rid(msg, rid)), seq)
            else:
                self._route_order_event(etype, ev, identity, rid, REASON_NAMES.get(ev[7]))

    @staticmethod
    def _with_rid(msg: dict, rid) -> dict:
        if rid is not None:
            msg["rid"] = rid
        return msg

    def _route_order_event(self, etype, ev, identity, rid, reason_name) -> None:
        market = self.market_by_id[ev[4]] if 0 <= ev[4] < len(self.market_by_id) else None
        if market is None:
            return
        if etype == EV_ACK:
            msg = codec.ack_message(ev, market)
        elif etype == EV_CANCELED:
            msg = codec.canceled_message(ev, market, reason_name)
        elif etype == EV_AMENDED:
            msg = codec.amended_message(ev, market)
        elif etype == EV_TRIGGERED:
            msg = codec.triggered_message(ev, market)
            self._fired = (ev[0], ev[11])
        else:
            return
        self._to_account(ev[5], msg, identity, rid, ev[0])

    def _route_fired_reject(self, ev) -> None:
        """A fired stop/take-profit that a check at trigger time refused: the reject right
        after its `triggered` is a report to the owner (with the oid), not a reply."""
        msg = codec.engine_reject_message(ev, ev[12])
        msg["oid"] = ev[11]
        self._to_account(ev[5], msg, seq=ev[0])

    # Funding, liquidations and balances are rare next to orders: their events take this path,
    # off the per-order one.
    def _risk_event(self, etype: int, mv: memoryview, off: int) -> None:
        if etype == EV_FUNDING:
            ev = FUNDING_EVENT_STRUCT.unpack_from(mv, off)
            market = self._market(ev[4])
            if market is not None and ev[5] in self.by_account:
                self._to_account(ev[5], codec.funding_message(ev, market), seq=ev[0])
        elif etype == EV_LIQUIDATION:
            ev = LIQUIDATION_EVENT_STRUCT.unpack_from(mv, off)
            market = self._market(ev[4])
            if market is None:
                return
            if ev[5] in self.by_account:
                self._to_account(ev[5], codec.liquidation_message(ev, market), seq=ev[0])
            # one market-data message per closing step: the liquidated account's half (an ADL
            # step also has the deleveraged account's half, addressed to it)
            rc = self._risk_command
            if self.pub is not None and rc is not None and rc[0] == ev[0] and \
                    rc[2][6] == ev[5]:
                self._publish(market.topic_liquidation, pack(
                    {"seq": ev[0], "side": codec.SIDE_NAMES[ev[8]],
                     "qty": market.lots_to_str(ev[9]), "price": market.ticks_to_str(ev[10]),
                     "kind": codec.LIQUIDATION_KIND_NAMES[ev[7]], "ts": ev[1]}), ev[0])
        # EV_BALANCE, EV_INSURANCE: nothing to route (deposits are the operator's; the fund
        # is nobody's account); `account` reads balances from the matcher

    def _risk_command_done(self, ev) -> None:
        """EV_DONE of a FUNDING command: its rate on `funding.MARKET`, once per command."""
        seq, code, cmd = self._risk_command
        if seq != ev[0]:
            return
        self._risk_command = None
        market = self._market(cmd[8])
        if code == CMD_FUNDING and self.pub is not None and market is not None:
            self._publish(market.topic_funding, pack(
                {"seq": seq, "rate": codec.rate_to_str(cmd[2]), "ts": cmd[0]}), seq)

    def _market(self, market_id: int):
        return self.market_by_id[market_id] if 0 <= market_id < len(self.market_by_id) \
            else None

    def _publish_mark(self, ev) -> None:
        """`mark.MARKET` for a mark the matcher took (EV_MARK)."""
        market = self._market(ev[4])
        if market is not None:
            self._publish_mark_line(market, ev[0], ev[7], ev[1], self._board_line(market))

    def _publish_mark_line(self, market, seq: int, mark_ticks: int, ts: int, line) -> None:
        """`mark.MARKET`: the matcher's mark; index, funding estimate and next funding time
        from riskd's IndexBoard (null while riskd has published nothing for the market)."""
        line = line or NO_BOARD_LINE
        self._board_sent[market.market_id] = line
        state = self.mirror.markets[market.market_id][M_STATE]
        self._state_sent[market.market_id] = state
        self._publish(market.topic_mark, pack(
            {"seq": seq, "mark": market.ticks_to_str(mark_ticks), "index": line[0],
             "funding_rate": line[1], "next_funding_ts": line[2], "ts": ts,
             "state": MARKET_STATE_NAMES[state]}), seq)

    def _board_line(self, market):
        """(index, funding_rate, next_funding_ts) as the wire says them, None before riskd
        published for the market."""
        published = self._index_board_values(market.market_id)
        if published is None:
            return None
        return (market.ticks_to_str(published.index_ticks) if published.index_ticks else None,
                codec.rate_to_str(published.funding_rate_e9), published.next_funding_ns or None)

    def _publish_board_changes(self) -> None:
        """riskd re-sends no unchanged mark, but its index and funding estimate move on: once
        a second, `mark.MARKET` again for each market whose board line changed since the last
        one published (the mark as the matcher has it, at the mirror's seq)."""
        self._board_due = time.monotonic() + BOARD_REPUBLISH_S
        for m, market in enumerate(self.market_by_id):
            if market is None or not self.mirror.markets[m][M_ACTIVE]:
                continue
            line = self._board_line(market)
            if line is not None and self._board_sent.get(m) != line:
                self._publish_mark_line(market, self.mirror.applied_seq,
                                        self.mirror.markets[m][M_MARK], time.time_ns(), line)

    def _index_board_values(self, market_id: int):
        """riskd's published line for a market; the board is attached on first need (riskd
        may start after the gateway), retried at most once a second while it does not exist."""
        board = self.index_board
        if board is None:
            now = time.monotonic()
            if now < self._index_board_retry:
                return None
            self._index_board_retry = now + 1.0
            try:
                board = self.index_board = IndexBoard.attach(self.prefix)
            except (ShmError, FileNotFoundError, OSError):
                return None
            self._closers.append(board.close)
        if market_id >= board.max_markets:
            return None
        return board.published(market_id)

    def _route_trade(self, tr) -> None:
        market = self.market_by_id[tr[4]] if 0 <= tr[4] < len(self.market_by_id) else None
        if market is None:
            return
        by_account = self.by_account
        taker, maker = tr[5], tr[16]
        if taker in by_account or maker in by_account:
            taker_msg, maker_msg = codec.fill_messages(tr, market)
            if taker in by_account:
                self._to_account(taker, taker_msg, seq=tr[0])
            if maker in by_account:
                self._to_account(maker, maker_msg, seq=tr[0])
        if self.pub is not None:
            self._publish(market.topic_trade, pack(
                {"seq": tr[0], "trade_id": tr[9], "price": market.ticks_to_str(tr[10]),
                 "qty": market.lots_to_str(tr[11]), "taker_side": codec.SIDE_NAMES[tr[7]],
                 "ts": tr[1]}), tr[0])

    def _publish_book_deltas(self) -> None:
        mirror = self.mirror
        seq = mirror.applied_seq
        for m, market in enumerate(self.market_by_id):
            dirty = mirror.dirty[m]
            if not (dirty[0] or dirty[1]):
                continue
            bids, asks = mirror.take_dirty(m)
            if market is None:
                continue
            t, l = market.ticks_to_str, market.lots_to_str
            self._publish(market.topic_book, pack(
                {"seq": seq, "bids": [[t(p), l(q)] for p, q in bids],
                 "asks": [[t(p), l(q)] for p, q in asks]}), seq)
        mirror.any_dirty = False

    def _market_changed(self, m: int) -> None:
        market = self.market_by_id[m]
        if market is None:
            return
        mk = self.mirror.markets[m]
        if mk[M_ACTIVE] and mk[M_ATPL] != market.atoms_per_tick_lot:
            log.error("market %s (id %d) was created with %d atoms per tick x lot, the "
                      "gateway's table says %d: orders for it are refused", market.symbol, m,
                      mk[M_ATPL], market.atoms_per_tick_lot)
            self.market_by_id[m] = None
            self.markets.by_symbol.pop(market.symbol, None)
            return
        market.set_limits(market.max_price_ticks or mk[M_MAX_PRICE],
                          market.max_order_lots or mk[M_MAX_ORDER])
        if mk[M_STATE] != self._state_sent.get(m, MARKET_TRADING):
            # a market state change (halt, cancel_only, settlement...) shows in mark.MARKET
            self._publish_mark_line(market, self.mirror.applied_seq, mk[M_MARK], time.time_ns(),
                                    self._board_line(market))

    # ------------------------------------------------------------------ requests -------
    def _drain_router(self) -> int:
        router = self.router
        if not _get_option(router, _EVENTS) & _POLLIN:
            return 0    # most passes find nothing: 1.2 µs here against 3.3 for recv raising Again
        got = 0
        limit = self.recv_batch - self._cmd_n
        while got < limit:
            try:
                identity = _recv_part(router, _NB, True, False)
            except zmq.Again:
                break
            frame = _recv_part(router, _NB, False, False)
            extra = False
            while frame.more:          # more than one frame: read them all, refuse the request
                frame = _recv_part(router, _NB, False, False)
                extra = True
            got += 1
            try:
                self._handle(identity, frame, extra)
            except Exception:
                # A bug must not let one client's message take the gateway down for everyone.
                log.exception("unexpected error handling a request; rejected it")
                self._edge_reject(identity, REASON_INVALID_MESSAGE, "the gateway could not "
                                  "process this message")
        return got

    def _session(self, identity: bytes, frame) -> Session | None:
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        s = self.sessions.get(identity)
        if s is not None and s.user_id == user_id:
            return s
        # A connection we have not seen: learn of any disconnects first (an fd may be reused).
        self._drain_monitor()
        if s is not None:
            self._end_session(s, cancel=False)
        if not user_id or not user_id.isdigit():
            return None
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            fd = -1
        s = Session(identity, int(user_id), user_id, fd)
        self.sessions[identity] = s
        self.by_account.setdefault(s.account, []).append(identity)
        self.by_fd.setdefault(fd, []).append(identity)
        return s

    def _end_session(self, s: Session, cancel: bool = True) -> None:
        if self.sessions.get(s.identity) is s:
            del self.sessions[s.identity]
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
        if cancel and s.cancel_on_disconnect:
            req = self._new_req()
            self.pending[req] = (None, None, s.account, R_DISCONNECT, None, None)
            self._queue_command(time.time_ns(), s.account, req,
                                (CMD_CANCEL_ALL, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))

    def _drain_monitor(self) -> None:
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = parse_monitor_message(frames)
            except Exception:
                continue
            fd = event["value"]
            if event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_ACCEPTED):
                for identity in list(self.by_fd.get(fd, ())):
                    s = self.sessions.get(identity)
                    if s is not None:
                        self._end_session(s)

    def _new_req(self) -> int:
        req = self._next_req
        self._next_req = req + 1 if req < REQ_LIMIT else 1
        return req

    def _queue_command(self, ts: int, account: int, req: int, f: tuple) -> None:
        COMMAND_STRUCT.pack_into(self._cmd_mv, self._cmd_n * 64, ts, f[2], f[3], f[4], f[5],
                                 f[6], account, req, f[1], f[0], f[7], f[8], f[9], f[10], f[11])
        self._cmd_n += 1
        if self._cmd_n == len(self._cmd_buf):
            self._flush_commands()
            if self._cmd_n == len(self._cmd_buf):
                self.ring.wait_for_space(1, timeout_s=1.0)
                self._flush_commands()

    def _flush_commands(self) -> None:
        n = self._cmd_n
        written = self.ring.write(self._cmd_buf[:n])
        if written < n:
            self._cmd_buf[:n - written] = self._cmd_buf[written:n]
        self._cmd_n = n - written

    def _handle(self, identity: bytes, frame, extra_frames: bool) -> None:
        self.stats["requests"] += 1
        if extra_frames:
            if self._session(identity, frame) is not None:
                self._edge_reject(identity, REASON_INVALID_MESSAGE,
                                  "a request is exactly one frame (a msgpack map)")
            return
        s = self._session(identity, frame)
        if s is None:
            self.stats["dropped_frames"] += 1
            return
        account = s.account
        now = time.time_ns()
        allowed = self.limiter.take(account, now)
        if len(frame) > self.max_message_bytes:
            if allowed:
                self._edge_reject(identity, REASON_INVALID_MESSAGE,
                                  f"message larger than {self.max_message_bytes} bytes")
            return
        try:
            msg = codec.unpack(frame.buffer)
        except Exception:
            msg = None
        if type(msg) is not dict:
            if allowed:
                self._edge_reject(identity, REASON_INVALID_MESSAGE, "not a msgpack map")
            return
        rid = msg.get("rid")
        if rid is not None and type(rid) is not int:
            self._edge_reject(identity, REASON_INVALID_MESSAGE, "rid must be an integer")
            return
        typ = msg.get("type")
        cid = msg.get("cid")
        if "account" in msg and msg["account"] != account:
            self._edge_reject(identity, REASON_FORBIDDEN,
                              "this connection trades only for its own account", rid, cid)
            return
        if not allowed:
            self._edge_reject(identity, REASON_RATE_LIMITED, "too many requests", rid, cid)
            return
        if typ in _NOT_WHILE_JOURNAL_FAILS and self.journal_errno():
            self._edge_reject(identity, REASON_MARKET_HALTED,
                              f"not accepting {typ} while the journal cannot be written "
                              f"({os.strerror(self.journal_errno())}): nothing would be "
                              f"durable; cancels still work", rid, cid)
            return
        try:
            if typ == "new_order":
                fields, market = codec.parse_new_order(msg, self.markets)
                req = self._new_req()
                self.pending[req] = (identity, rid, account, R_NEW_ORDER, fields[2], None)
                self.pending_cids[(account, fields[2])] = (req, fields[1])
                self._queue_command(now, account, req, fields)
            elif typ == "cancel":
                oid, cid_ = codec.order_ref(msg)
                req = self._new_req()
                self.pending[req] = (identity, rid, account, R_CANCEL,
                                     cid_ if "cid" in msg else None, None)
                self._queue_command(now, account, req, codec.cancel_fields(oid, cid_, 0))
            elif typ == "amend":
                oid, cid_ = codec.order_ref(msg)
                market = self._market_of_order(account, oid, cid_, msg)
                fields = codec.amend_fields(msg, oid, cid_, market)
                req = self._new_req()
                self.pending[req] = (identity, rid, account, R_AMEND,
                                     cid_ if "cid" in msg else None, None)
                self._queue_command(now, account, req, fields)
            elif typ == "cancel_all":
                fields = codec.parse_cancel_all(msg, self.markets)
                req = self._new_req()
                self.pending[req] = (identity, rid, account, R_DONE, None, True)
                self._queue_command(now, account, req, fields)
            elif typ == "withdraw":
                fields = codec.parse_withdraw(msg)
                req = self._new_req()
                self.pending[req] = (identity, rid, account, R_DONE, None, False)
                self._queue_command(now, account, req, fields)
            elif typ == "ping":
                self._reply(identity, {"type": "pong", "ts": now}, rid)
            elif typ == "book":
                self._answer_book(identity, msg, rid, now)
            elif typ == "open_orders":
                self._answer_open_orders(identity, account, msg, rid, now)
            elif typ == "account":
                self._answer_account(identity, account, rid, now)
            elif typ == "hello":
                flag = msg.get("cancel_on_disconnect", False)
                if type(flag) is not bool:
                    raise EdgeReject(REASON_INVALID_MESSAGE,
                                     "cancel_on_disconnect must be true or false")
                s.cancel_on_disconnect = flag
                self._reply(identity, {"type": "hello", "account": account,
                                       "cancel_on_disconnect": flag, "ts": now}, rid)
            elif typ == "set_margin":
                fields = codec.parse_set_margin(msg, self.markets)
                req = self._new_req()
                self.pending[req] = (identity, rid, account, R_DONE, None, False)
                self._queue_command(now, account, req, fields)
            else:
                raise EdgeReject(REASON_INVALID_MESSAGE,
                                 "unknown message type" if type(typ) is str
                                 else "type is missing or not a string")
        except EdgeReject as e:
            self._edge_reject(identity, e.reason, e.text, rid, cid)

    def _market_of_order(self, account: int, oid: int, cid: int, msg: dict):
        """The market of an order this account may amend (its grid checks the new values)."""
        mirror = self.mirror
        order = None
        if oid:
            order = mirror.orders.get(oid)
            if order is not None and mirror.acct_orders.get(account, {}).get(oid) is not order:
                order = None
        else:
            found = mirror.cid_index.get((account, cid))
            order = mirror.orders.get(found) if found is not None else None
        if order is not None:
            market = self.market_by_id[order[O_MARKET]]
            if market is not None:
                return market
        waiting = mirror.untriggered.get(oid or mirror.cid_index.get((account, cid)))
        if waiting is not None and waiting[O_ACCOUNT] == account:
            raise EdgeReject(REASON_INVALID_MESSAGE, "an untriggered stop or take-profit order "
                             "cannot be amended: cancel it and place a new one")
        if not oid:
            pend = self.pending_cids.get((account, cid))
            if pend is not None and self.market_by_id[pend[1]] is not None:
                return self.market_by_id[pend[1]]
        if "market" in msg:        # a hint for an order this gateway has not seen yet
            return self.markets.get(msg["market"])
        raise EdgeReject(REASON_UNKNOWN_ORDER, "no such open order of this account")

    # ------------------------------------------------------------------ queries --------
    def _query_seq(self) -> int:
        return self.mirror.applied_seq if self.durable else 0

    def _answer_book(self, identity, msg, rid, now) -> None:
        market = self.markets.get(msg.get("market"))
        depth = msg.get("depth", 0)
        if depth is None:
            depth = 0
        if type(depth) is not int or depth < 0:
            raise EdgeReject(REASON_INVALID_MESSAGE, "depth must be a non-negative integer")
        bids, asks = self.mirror.book_levels(market.market_id, depth)
        t, l = market.ticks_to_str, market.lots_to_str
        self._reply(identity, {"type": "book", "market": market.symbol,
                               "seq": self.mirror.applied_seq,
                               "bids": [[t(p), l(q)] for p, q in bids],
                               "asks": [[t(p), l(q)] for p, q in asks], "ts": now},
                    rid, self._query_seq())

    def _answer_open_orders(self, identity, account, msg, rid, now) -> None:
        only = None
        if msg.get("market") is not None:
            only = self.markets.get(msg["market"]).market_id
        out = []
        for oid, o, status in self.mirror.open_orders(account, only):
            market = self.market_by_id[o[O_MARKET]]
            if market is not None:
                out.append(codec.open_order_row(oid, o, status, market))
        self._reply(identity, {"type": "open_orders", "orders": out,
                               "seq": self.mirror.applied_seq, "ts": now},
                    rid, self._query_seq())

    def _answer_account(self, identity, account, rid, now) -> None:
        """From the matcher's own rows (gateway/account_state.py), exact at their seq. The
        events up to that seq are published by then: they are routed first, so a client sees
        the fills of those commands before the account_state that includes them."""
        tables, seq = account_tables(self._state, self.events, account, ACCOUNT_COPY_TIMEOUT_S)
        while self.mirror.applied_seq < seq and self._drain_events():
            pass
        msg = {"type": "account_state", "account": account}
        msg.update(account_state_fields(tables, 0, self.market_by_id))
        msg["seq"] = seq
        msg["ts"] = now
        self._reply(identity, msg, rid, seq if self.durable else 0)

    # ------------------------------------------------------------------ shutdown -------
    def _close_state(self, region) -> None:
        self._state = None        # the views first: a mapping with exported views cannot close
        region.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if getattr(self, "monitor", None) is not None:
            try:
                self.router.disable_monitor()
            except Exception:
                pass
            self.monitor.close(linger=0)
        for name in ("router", "pub"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        if getattr(self, "_own_ctx", False):
            self.ctx.term()
        self.consumer = None
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:
                pass
        self._closers.clear()


# ---------------------------------------------------------------------- entry point -----
def engine_config_from(doc: dict) -> EngineConfig:
    fields = {k: v for k, v in (doc.get("engine") or {}).items()
              if k in EngineConfig.__dataclass_fields__}
    return EngineConfig(**fields)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gateway",
                                description="perpx order-entry gateway (one process)")
    p.add_argument("--prefix", required=True, help="shm name prefix of the exchange, e.g. /perpx-main")
    p.add_argument("--index", type=int, default=0, help="gateway number N (gateway-N)")
    p.add_argument("--source-index", type=int, required=True,
                   help="position of this gateway's ring among the matcher's sources")
    p.add_argument("--orders", default="tcp://127.0.0.1:*", help="ROUTER endpoint to bind")
    p.add_argument("--market-data", default=None,
                   help="PUB endpoint to bind (give it to one gateway only)")
    p.add_argument("--server-key", required=True,
                   help="the server's CURVE secret certificate (zmq.auth format)")
    p.add_argument("--accounts", required=True, help="directory of <account>.key public keys")
    p.add_argument("--markets", required=True,
                   help="JSON: {\"engine\": {EngineConfig fields}, \"markets\": [...]}")
    p.add_argument("--rate", type=float, default=5000.0, help="requests/s per account")
    p.add_argument("--burst", type=float, default=10000.0, help="token bucket size per account")
    p.add_argument("--spin-us", type=float, default=0.0,
                   help="busy-wait this long for a due reply before sleeping (0: never spin)")
    p.add_argument("--ack-mode", choices=("durable", "fast"), default="durable",
                   help="durable: release acks and fills once persistd journaled them; fast: "
                        "at once (benchmarks only)")
    p.add_argument("--endpoints-file", default=None,
                   help="write the bound endpoints here as JSON once serving")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"gateway-{args.index} %(levelname)s %(message)s")
    doc = json.loads(Path(args.markets).read_text())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    progress = attach_retrying(lambda: JournalProgress.attach(args.prefix), 30.0)
    gw = Gateway(args.prefix, engine_config_from(doc), MarketTable.from_dicts(doc["markets"]),
                 source_index=args.source_index, index=args.index,
                 accounts_dir=args.accounts, server_secret_key_file=args.server_key,
                 orders_endpoint=args.orders, market_data_endpoint=args.market_data,
                 rate_per_s=args.rate, burst=args.burst, spin_s=args.spin_us * 1e-6,
                 ack_mode=args.ack_mode, durable_seq=progress.durable_seq,
                 journal_errno=progress.journal_errno)
    try:
        if args.endpoints_file:       # atomically: a watcher may poll for it
            target = Path(args.endpoints_file)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(json.dumps(gw.endpoints()))
            tmp.rename(target)
        log.info("serving orders on %s, market data on %s (joined the event ring: %s, "
                 "state at seq %d)", gw.orders_endpoint, gw.market_data_endpoint, gw.joined,
                 gw.boot_seq)
        gw.serve(stop.is_set)
    finally:
        gw.close()
        progress.close()
    return 0
