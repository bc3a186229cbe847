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
            spinning gateway takes the core the matcher needs), then sleep in one poll(2) on
            the ROUTER, its monitor and the event ring's doorbell FIFO (gateway/socket_poll.py)
            until a message, a connection event or new events

That loop is the Python pass. By default the order path runs compiled (gateway/compiled_pass.py,
the lane): one call reads the ROUTER and turns the common `new_order` and `cancel` into
commands, one routes each batch of events (numbering, the replay log, rendering, sending or
holding), the mirror is applied in arrays (gateway/mirror_arrays.py); the Python pass's code
answers everything the lane defers or hands over, and owns sessions, queries, limits and market
data. PERPX_GATEWAY_PASS=python runs the Python pass alone (the lane's oracle in tests).

Where each part lives: gateway/sessions.py (connections, accounts, request budgets),
gateway/requests.py (decoding, validation, commands, queries), gateway/routing.py (events ->
replies and reports), gateway/replay.py (account_seq, rendering reports, `replay`),
gateway/outbox.py (sending, the durable hold, dropping), gateway/memory.py (the byte limit
per connection and the memory bound), gateway/market_data.py (the PUB),
gateway/mirror.py (the book copy), gateway/codec.py (wire <-> records), gateway/stats_file.py
(the stats file `perpx status` reads, written off the serving thread).

Start-up: attach the rings (matcher first), join the event ring as consumer `gateway-N`
(start="saved" if that slot was used before, so a restarted gateway resumes at its cursor,
else "current"), copy the matcher's state at a command boundary (gateway/mirror.py) and apply
only later events to the mirror and the report numbering (gateway/replay.py); events between
the saved cursor and that point only feed market data (no session exists yet). Then bind the
sockets and serve.

Running one: `python -m gateway --spec exchange.json --index 0 --server-key server.key_secret
[--orders tcp://127.0.0.1:7001] [--market-data tcp://127.0.0.1:7002] [--endpoints-file F]`;
SIGTERM/SIGINT stop it cleanly. The spec (engine/spec.py) gives the shm prefix, the markets,
the accounts directory, the rate limit, the ack mode, this gateway's ring `gateway-N` among
the matcher's sources and persistd's SQL socket (replays older than the gateway's memory read
the DuckDB store through it). Give `--market-data` to one gateway only.

Connections: a session is known from its first message, keyed by routing id, account and
fd; the ROUTER's monitor reports disconnects by fd (gateway/sessions.py has the lifecycle). A
session that sent `{"type": "hello", "cancel_on_disconnect": true}` gets all its account's
orders canceled (reason `disconnect`) once every message it sent is read, so after all its
commands (only if the gateway sees the disconnect: a gateway restart forgets sessions, so
clients say hello again when they reconnect).
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
from pathlib import Path

import numpy as np
import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from engine.config import EngineConfig
from engine.market import MarketTable
from engine.records import COMMAND_DTYPE, EVENT_DTYPE
from engine.shared_state import attach_state
from engine.spec import load_spec
from gateway.accounts import ZAP_DOMAIN, AccountAuthenticator, AccountRegistry
from gateway.market_data import MarketData
from gateway.memory import REPLAY_SHARE, MemoryBudget, kernel_sndbuf, rss_bytes
from gateway.mirror import M_ACTIVE, M_ATPL, M_MAX_ORDER, M_MAX_PRICE, Mirror, \
    consistent_state_copy
from gateway.outbox import Outbox
from gateway.replay import DEFAULT_KEEP, DurableSource, Replayer, ReportLog
from gateway.requests import Requests
from gateway.socket_poll import SocketPoll, has_input
from gateway.routing import EventRouter
from gateway.sessions import Sessions, TokenBucket
from gateway.stats_file import STATS_INTERVAL_S, StatsFile   # also the memory bound's tick
from gateway.views import Views
from shm import names
from shm.progress import JournalProgress
from shm.region import ShmError, attach_retrying
from shm.ring import CommandRing, EventRing
from shm.wait import SpinYieldBlockWait

log = logging.getLogger("perpx.gateway")

# pyzmq's Cython socket methods, called directly with int flags: the Python-level wrappers and
# flag enums cost several µs per message.
_recv_part = zmq.backend.Socket.recv
_NB = int(zmq.NOBLOCK)
# How often a busy gateway reads its monitor (disconnects, accepts); a sleeping one wakes for it.
MONITOR_INTERVAL_S = 0.001
QUERY_RUN = 32
# A gateway whose command ring is full sleeps this long at most between looks at it (the
# matcher's events wake it sooner).
FULL_RING_WAIT_MS = 1
DEFAULT_MAX_QUEUED_BYTES = 8 << 20
DEFAULT_MEMORY_LIMIT_MB = 1024
ORDER_PATHS = ("compiled", "python")


def gateway_context() -> zmq.Context:
    """The gateway's ZeroMQ context: its I/O and reaper threads run SCHED_BATCH.

    Every reply the gateway sends wakes the context's I/O thread (CURVE, then the socket
    write). Pinned to the gateway's CPU and woken as an ordinary thread, it preempted the
    gateway at once: two context switches and one sendmsg per reply. A SCHED_BATCH thread is
    never preempted for on wake-up: it runs when the gateway's pass ends in a poll (or at the
    scheduler's next tick) and writes what queued meanwhile in one go. `perpx bench e2e`
    (docs/tuning.md): about +10% orders/s and 12% less gateway CPU per order. libzmq applies
    the policy as it starts each thread (set before the first socket).
    """
    ctx = zmq.Context()
    ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
    return ctx


class _Frame:
    """A message the compiled lane deferred, as requests.handle reads a zmq.Frame."""
    __slots__ = ("buffer", "uid", "fd")

    def __init__(self, payload: bytes, uid, fd: int):
        self.buffer = payload
        self.uid = uid
        self.fd = fd

    def __len__(self):
        return len(self.buffer)

    def get(self, prop):
        return self.uid if prop == "User-Id" else self.fd


class _KeptByTheLane:
    """The router's report log when the compiled lane keeps every report itself."""

    def append(self, *record) -> None:
        pass


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
                 max_connections: int = 512, max_connections_per_account: int = 8,
                 max_queued_messages: int = 10_000,
                 max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
                 memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB, stats_file: str | None = None,
                 attach_timeout_s: float = 30.0, context: zmq.Context | None = None,
                 replay_store: str | None = None, replay_keep: int = DEFAULT_KEEP,
                 order_path: str | None = None):
        """replay_store: persistd's SQL endpoint, the durable source of `replay` for reports
        older than the last `replay_keep` per account this gateway keeps in memory.
        order_path: "compiled" (the default: gateway/compiled_pass.py) or "python" (this
        module's own pass, everything in Python); PERPX_GATEWAY_PASS in the environment
        chooses when it is not given."""
        order_path = order_path or os.environ.get("PERPX_GATEWAY_PASS", "compiled")
        if order_path not in ORDER_PATHS:
            raise ValueError(f"order_path must be one of {ORDER_PATHS}, got {order_path!r}")
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
        self.durable = ack_mode == "durable"
        self.durable_seq = durable_seq
        self.recv_batch = recv_batch
        self.spin_s = spin_s
        self.market_by_id = [markets.by_id.get(m) for m in range(engine_cfg.max_markets)]
        self.stats: dict[str, int] = {}
        self.limits = {"max_connections": max_connections,
                       "max_connections_per_account": max_connections_per_account,
                       "max_queued_messages": max_queued_messages,
                       "max_queued_bytes": max_queued_bytes,
                       "gateway_memory_limit_mb": memory_limit_mb,
                       "max_message_bytes": max_message_bytes,
                       "hard_max_message_bytes": hard_max_message_bytes}
        self.stats_file = None
        self._stats_due = 0.0
        self._closers = []
        self._closed = False
        try:
            if stats_file:
                self.stats_file = StatsFile(stats_file)
                self._closers.append(self.stats_file.close)
            self.sessions = Sessions(lambda s: self.requests.cancel_on_disconnect(s),
                                     max_connections_per_account, max_connections)
            self._attach(attach_timeout_s)
            self._setup_zmq(context, accounts_dir, server_secret_key_file, server_keys,
                            orders_endpoint, market_data_endpoint, hard_max_message_bytes,
                            max_queued_messages, kernel_sndbuf(max_queued_bytes))
            self.memory = MemoryBudget(memory_limit_mb << 20, max_queued_bytes,
                                       kernel_sndbuf(max_queued_bytes))
            if not self.memory.headroom():
                raise ValueError(f"gateway_memory_limit_mb = {memory_limit_mb} leaves nothing: "
                                 f"the gateway takes {self.memory.base >> 20} MB to run")
            self.sessions.on_closed = self.memory.forget
            self.outbox = Outbox(self.router, self.pub, self.sessions,
                                 durable_seq if self.durable else None, self.stats,
                                 self.memory)
            self.outbox.learn_disconnects = self._drain_monitor
            self.market_data = None
            self.views = Views()
            if self.pub is not None:
                self.market_data = MarketData(prefix, self.mirror, self.market_by_id,
                                              self.outbox, self._closers)
            self.requests = Requests(
                sessions=self.sessions, outbox=self.outbox,
                limiter=TokenBucket(rate_per_s, burst, self.cfg.max_accounts),
                ring=self.ring, mirror=self.mirror, markets=markets,
                market_by_id=self.market_by_id, state=self._state, events=self.events,
                max_message_bytes=max_message_bytes, recv_batch=recv_batch, durable=self.durable,
                journal_errno=journal_errno or (lambda: 0),
                learn_disconnects=self._drain_monitor, stats=self.stats, views=self.views)
            report_log = ReportLog(replay_keep, self.memory.headroom() // REPLAY_SHARE)
            self.memory.parts["replay"] = report_log.bytes
            self.memory.parts["views"] = lambda: self.views.bytes
            self.router_events = EventRouter(
                self.consumer, self.mirror, self.boot_seq, source_index, self.requests,
                self.sessions, self.outbox, self.market_data, markets, self.market_by_id,
                event_batch, self.stats, self.views, self._boot_account_seqs, report_log)
            self.requests.catch_up = self.router_events.catch_up
            self.replayer = Replayer(
                tracker=self.router_events.tracker, log=report_log, outbox=self.outbox,
                sessions=self.sessions, mirror=self.mirror, market_by_id=self.market_by_id,
                durable=self.durable,
                source=(DurableSource(replay_store, self.ctx, self.bell.ring) if replay_store
                        else None),
                max_queued_bytes=max_queued_bytes)
            self.requests.register("replay", self.replayer.handle)
            # durable replays answered by the worker thread (gateway/replay.py), which rings
            # the doorbell; an empty tuple when there is no durable source
            self.replay_done = self.replayer.source.done if replay_store else ()
            self.lane = None
            if order_path == "compiled":
                self._use_lane()
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
        self._boot_account_seqs = tables["accounts"]["account_seq"]
        self._check_markets()
        # Requests of a previous incarnation of this gateway may still be in our ring: let the
        # matcher take them, and consume their events, before our own req tokens start.
        deadline = time.monotonic() + min(timeout_s, 5.0)
        while self.ring.free_slots() < self.ring.capacity and time.monotonic() < deadline:
            time.sleep(0.001)

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
                   md_endpoint, hard_max, max_queued, sndbuf) -> None:
        if server_keys is None:
            if secret_file is None:
                raise ValueError("the gateway needs the server's CURVE keys "
                                 "(server_secret_key_file or server_keys)")
            public, secret = zmq.auth.load_certificate(secret_file)
            if secret is None:
                raise ValueError(f"{secret_file} holds no secret key")
            server_keys = (public, secret)
        self.server_public_key = server_keys[0]
        self.ctx = context or gateway_context()
        self._own_ctx = context is None
        self.registry = AccountRegistry(accounts_dir, self.cfg.max_accounts)
        self.auth = AccountAuthenticator(self.ctx, self.registry, self._admits)
        self.auth.start()
        r = self.router = self.ctx.socket(zmq.ROUTER)
        r.linger = 0
        r.curve_server = True
        r.curve_publickey, r.curve_secretkey = server_keys
        r.zap_domain = ZAP_DOMAIN.encode()
        r.maxmsgsize = hard_max
        # What one connection can hold in this process and its kernel: libzmq's pipe, at most
        # `max_queued` messages (then sends to it fail, ROUTER_MANDATORY, and the session is
        # dropped) and at most max_queued_bytes handed since its socket last drained (the
        # outbox's count, gateway/memory.py, drops it past that), plus the kernel's send
        # buffer, fixed here (no autotuning up to 4 MB; the kernel books twice it) and read
        # by the count to tell a socket that drains.
        r.sndhwm = max_queued
        r.sndbuf = sndbuf
        r.router_mandatory = 1
        r.rcvhwm = 100_000
        self.monitor = r.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        r.bind(orders_endpoint)
        self.orders_endpoint = r.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub = None
        self.market_data_endpoint = None
        if md_endpoint:
            self.pub = self.ctx.socket(zmq.PUB)
            self.pub.linger = 0
            self.pub.sndhwm = max_queued
            self.pub.bind(md_endpoint)
            self.market_data_endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self.mirror.track_dirty = True
            self.mirror.dirty = [(set(), set()) for _ in range(self.cfg.max_markets)]
        # one poll(2): the ROUTER, its monitor, and this consumer's doorbell on the event ring
        # (a FIFO), so that new events wake the same sleep
        self.monitor_fd = self.monitor.get(zmq.FD)
        self.poller = SocketPoll(r, self.monitor_fd, self.bell.fileno())

    def _admits(self, account: int) -> bool:
        """The handshake's last word (ZAP thread): the connection limits, and an account the
        operator disabled (the matcher's state says so) is refused."""
        state = self._state
        return self.sessions.admits(account) and not (
            state is not None and 0 <= account < len(state.accounts)
            and state.accounts["disabled"][account])

    def endpoints(self) -> dict:
        return {"orders": self.orders_endpoint, "market_data": self.market_data_endpoint,
                "server_public_key": self.server_public_key.decode()}

    # ------------------------------------------------------------------ main loop ------
    def serve(self, should_stop=lambda: False, heartbeat=None) -> None:
        """Serve until should_stop() (checked at least every 50 ms); heartbeat() each pass."""
        if self.lane is not None:
            return self._serve_lane(should_stop, heartbeat)
        gc.collect()
        gc.freeze()
        gc.disable()
        self.memory.start()
        last_gc = now = time.monotonic()
        events_at_gc = 0
        consumer = self.consumer
        requests = self.requests
        drain_events = self.router_events.drain
        replay_done = self.replay_done
        monitor_due = 0.0
        try:
            while not should_stop():
                if now >= monitor_due:         # closed sessions get nothing more
                    monitor_due = now + MONITOR_INTERVAL_S
                    self._drain_monitor()
                worked = drain_events()
                if requests.cmd_n < self.recv_batch:
                    worked += self._drain_router()
                if requests.cmd_n:
                    requests.flush()
                if replay_done:
                    self.replayer.poll()
                if self.durable:
                    self.outbox.release_upto(self.durable_seq())
                now = self._end_of_pass(heartbeat)
                if worked:
                    if self.stats["events"] - events_at_gc > 1_000_000:
                        gc.collect(0)      # the young generation only: cheap, bounded
                        events_at_gc = self.stats["events"]
                    continue
                # Idle. Replies are due soon if we just wrote commands: spin a little.
                if requests.pending and self.spin_s:
                    end = time.perf_counter() + self.spin_s
                    router = self.router
                    while time.perf_counter() < end:
                        if consumer.available() or has_input(router):
                            break
                    else:
                        self._sleep(50)
                    continue
                last_gc = self._idle(time.monotonic(), last_gc)
        finally:
            gc.enable()

    def _use_lane(self) -> None:
        """The compiled lane (gateway/compiled_pass.py) takes the order path: it reads the
        ROUTER and routes events; the objects it shares state with read its arrays from now
        on (the mirror, the report log and numbering, the views' versions, the rate limit,
        the durable hold, the sessions it knows)."""
        from gateway.compiled_pass import CompiledLane
        self.lane = lane = CompiledLane(self)
        self.array_mirror = self._array_mirror()
        self.requests.lane_cid_market = lane.cid_market
        forget_memory = self.sessions.on_closed

        def on_closed(s):
            forget_memory(s)
            lane.forget(s)
        self.sessions.on_closed = on_closed
        self.router_events.report_log = _KeptByTheLane()
        self.outbox.lane = lane
        self.memory.parts["held"] = lambda: self.outbox.held_bytes + lane.held_bytes()
        lane.warm()

    def _serve_lane(self, should_stop, heartbeat) -> None:
        """serve() with the compiled lane: it reads and routes; the Python gateway answers
        what it defers and hands over (gateway/compiled_pass.py)."""
        from gateway import compiled_pass as cp
        lane = self.lane
        array_mirror = self.array_mirror
        queries = self.mirror
        router_events = self.router_events
        gc.collect()
        gc.freeze()
        gc.disable()
        self.memory.start()
        requests = self.requests
        sessions = self.sessions
        outbox = self.outbox
        views = self.views
        ring = self.ring
        router = self.router
        mine = self.source_index
        ints = lane.ints
        arena = lane.arena
        sid_i = lane.sid_i
        durable = self.durable
        journal_errno = requests.journal_errno
        replay_done = self.replay_done
        monitor_due = 0.0
        last_gc = now = time.monotonic()

        def take_lists(mv):
            """What route() gathered: market-data trades, held replies' times (durable acks),
            checks and failures."""
            if ints[cp.I_MD_N]:
                router_events.publish_trades(mv, lane.md_idx[:ints[cp.I_MD_N]].tolist())
                ints[cp.I_MD_N] = 0
            if ints[cp.I_ACK_N]:
                k = int(ints[cp.I_ACK_N])
                outbox.ack_latency.unsent.extend(zip(lane.acks[:k, 0].tolist(),
                                                     lane.acks[:k, 1].tolist()))
                ints[cp.I_ACK_N] = 0
            if ints[cp.I_CHECK_N] or ints[cp.I_FAIL_N]:
                lane.settle(outbox)

        def drain() -> int:
            """Route one batch of published events (ending at a command boundary, as
            EventRouter.drain); returns how many."""
            head, tail, take = router_events.next_batch(cp.OUT_CAP)
            if not take:
                return 0
            for part in (head, tail):
                count = len(part)
                if not count:
                    continue
                raw = part.view(np.uint8).reshape(-1)
                array_mirror.apply(raw, count)
                self._markets_changed(array_mirror, lane)
                mv = memoryview(raw)
                e = 0
                while e < count:
                    end = min(count, e + cp.OUT_CAP)    # the lists route() fills hold that
                    e = lane.route(raw, e, end, mine)
                    take_lists(mv)
                    if ints[cp.I_FULL]:
                        lane.grow_hold()
                    elif e < end:
                        lane.adopt(raw, e, requests.pending)
                        router_events.handed(mv, e * 128, lane.cur_cmd.tobytes(),
                                             lane.pairs(), int(ints[cp.I_INDEX]))
                        e += 1
            views.all_version = int(ints[cp.I_ALL_VERSION])
            router_events.batch_done(take)
            return take

        def catch_up(seq: int) -> None:
            while queries.applied_seq < seq and drain():
                pass
        requests.catch_up = catch_up

        try:
            while not should_stop():
                if now >= monitor_due:
                    monitor_due = now + MONITOR_INTERVAL_S
                    self._drain_monitor()
                worked = drain()
                if requests.cmd_n:
                    requests.flush()
                if not requests.cmd_n and has_input(router):
                    ints[cp.I_JOURNAL_ERR] = journal_errno()
                    # the call writes its commands into the ring's slots, at most what is free
                    # now (a full ring leaves the messages in the ROUTER); published here,
                    # before anything the deferred ones queue
                    ints[cp.I_CMD_BASE] = ring.write_cursor
                    ints[cp.I_CMD_ROOM] = ring.room(self.recv_batch)
                    got = lane.recv(self.recv_batch)
                    worked += got
                    if ints[cp.I_CMD_N]:
                        ring.publish(ring.write_cursor + int(ints[cp.I_CMD_N]))
                    deferred = int(ints[cp.I_DEFER_N])
                    sessions.reads += got - deferred
                    for d in range(deferred):
                        start, ilen, plen, more, acct, fd = lane.deferred[d].tolist()
                        identity = bytes(arena[start:start + ilen])
                        frame = _Frame(bytes(arena[start + ilen:start + ilen + plen]),
                                       str(acct) if acct >= 0 else None, fd)
                        requests.handle(identity, frame, bool(more))
                        s = sessions.by_identity.get(identity)
                        if s is not None and s.live and not s.refused and not s.evicted:
                            lane.learn(s)
                    if deferred:
                        sid_i[:, cp.S_DEFERRED] = 0
                    if sessions.closing:
                        sessions.finish_drained(bool(ints[cp.I_EMPTY]))
                elif sessions.closing and not has_input(router):
                    sessions.finish_drained(True)
                if requests.cmd_n:
                    requests.flush()
                if replay_done:
                    self.replayer.poll()
                if durable:
                    upto = self.durable_seq()
                    outbox.release_upto(upto)     # the PUB's, and sessions the lane lacks
                    if lane.release(upto):
                        outbox.ack_latency.sent_upto(upto, time.time_ns())
                        if ints[cp.I_CHECK_N] or ints[cp.I_FAIL_N]:
                            lane.settle(outbox)
                now = self._end_of_pass(heartbeat)
                if worked:
                    continue
                last_gc = self._idle(now, last_gc)
        finally:
            gc.enable()

    def _idle(self, now: float, last_gc: float) -> float:
        """Nothing to do: the reject summary when due, a full collection at most every 10 s
        (nobody waits for this pass), then sleep. Returns when it last collected."""
        self.outbox.reasons.flush_due()
        if now - last_gc > 10.0:
            gc.collect()
            last_gc = now
        self._sleep(50)
        return last_gc

    def _array_mirror(self):
        """The mirror in arrays (gateway/mirror_arrays.py), applied per batch by the lane's
        loop; every reader of the mirror reads it from now on."""
        from gateway.book_render import BookDeltas
        from gateway.mirror_arrays import ArrayMirror, ArrayMirrorQueries
        arrays = ArrayMirror.from_mirror(self.mirror)
        queries = ArrayMirrorQueries(arrays)
        queries.warm()
        arrays.apply(np.zeros(128, np.uint8), 0)
        self.mirror = queries
        for reader in (self.requests, self.market_data, self.replayer, self.router_events):
            if reader is not None:
                reader.mirror = queries
        if self.market_data is not None:
            self.market_data.dirty_book_deltas = book_deltas = BookDeltas(arrays,
                                                                          self.market_by_id)
            book_deltas.warm()
        return arrays

    def _markets_changed(self, arrays, lane) -> None:
        """Markets an admin command of the last batch changed (gateway/routing.py)."""
        if self.market_data is None:
            arrays.forget_dirty()     # nobody publishes book deltas from this gateway
        changed = arrays.take_changed()
        if changed:
            for m in changed:
                self.router_events._market_changed(m)
            lane.load_markets()
            if self.market_data is not None:
                self.market_data.dirty_book_deltas.load_markets()

    def _end_of_pass(self, heartbeat) -> float:
        """The heartbeat, the index board when due, and once a second the memory bound and
        the stats file. Returns the time."""
        if heartbeat is not None:
            heartbeat()
        now = time.monotonic()
        market_data = self.market_data
        if market_data is not None and now >= market_data.board_due:
            market_data.board_changes()
        if now >= self._stats_due:
            self._stats_due = now + STATS_INTERVAL_S
            self.outbox.memory_tick()
            if self.stats_file is not None:
                self.stats_file.submit(self.status())
        return now

    def _sleep(self, timeout_ms: int) -> None:
        """Block in one poll on the ROUTER, its monitor and the event ring's doorbell (a FIFO,
        shm/doorbell.py) until a message, a connection event, new events, (durable mode)
        journaled ones or a durable replay's answer (a full command ring: not a message, see
        below): arm the doorbell, re-check, poll, disarm (gateway/socket_poll.py)."""
        bell = self.bell
        token = bell.arm()
        readable = False
        try:
            if self.consumer.available() or self.replay_done or \
                    (self.durable and self.outbox.releasable()):
                return
            if self.ring.room(1):
                if self.requests.cmd_n:
                    return        # room again for the commands that wait: flush them
                ready = self.poller.wait(timeout_ms)
            else:
                # The command ring is full and only the matcher frees it, publishing events
                # for what it takes: wait for the doorbell, not for a ROUTER we cannot read
                # (it stays readable; waking on it would spin on the matcher's CPU).
                ready = self.poller.wait_fds(FULL_RING_WAIT_MS)
            for fd in ready:
                if fd == self.monitor_fd:
                    self._drain_monitor()      # until empty: its next event signals its fd
                elif fd == bell.fileno():
                    readable = True
        finally:
            bell.disarm(token, readable)

    # ------------------------------------------------------------------ input ----------
    def _drain_router(self) -> int:
        router = self.router
        sessions = self.sessions
        if not has_input(router):
            # most passes find nothing: 1.2 µs here against 3.3 for recv raising Again
            if sessions.closing:
                sessions.finish_drained(True)
            return 0
        requests = self.requests
        got = 0
        limit = self.recv_batch - requests.cmd_n
        empty = False
        # Once a command waits in the buffer, at most QUERY_RUN other messages (queries,
        # rejects: a flood by some account) are read before it goes to the matcher, so an
        # order's ack waits for a few dozen of them, not for a whole batch.
        others = 0
        while got < limit and others < QUERY_RUN:
            try:
                identity = _recv_part(router, _NB, True, False)
            except zmq.Again:
                empty = True
                break
            frame = part = _recv_part(router, _NB, False, False)
            extra = False
            while part.more:           # more than one frame: read them all, refuse the request
                part = _recv_part(router, _NB, False, False)
                extra = True
            got += 1
            queued = requests.cmd_n
            requests.handle(identity, frame, extra)
            if queued and requests.cmd_n == queued:
                others += 1
        if sessions.closing:
            sessions.finish_drained(empty)
        return got

    def _drain_monitor(self) -> None:
        # read while it has events (not until zmq.Again: an exception per call, every 1 ms
        # while busy); either way its fd then signals only what comes after
        monitor = self.monitor
        while has_input(monitor):
            frames = monitor.recv_multipart(zmq.NOBLOCK)
            try:
                event = parse_monitor_message(frames)
            except Exception:
                continue
            kind = event["event"]
            if kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_ACCEPTED):
                self.sessions.on_fd(event["value"])
                self.sessions.open_connections += 1 if kind == zmq.EVENT_ACCEPTED else -1

    # ------------------------------------------------------------------ stats ----------
    def status(self) -> dict:
        """Counts and limits for `perpx status` (written to `stats_file` once a second)."""
        sessions = self.sessions
        lane = self.lane
        live = sum(len(v) for v in sessions.by_account.values())
        memory = self.memory
        accounted = memory.accounted()
        return {"pid": os.getpid(), "rss_bytes": rss_bytes(), "seq": self.mirror.applied_seq,
                "memory": {"limit_bytes": memory.limit, "base_bytes": memory.base,
                           "accounted_bytes": sum(accounted.values()),
                           "headroom_bytes": memory.headroom(),
                           **{f"{k}_bytes": v for k, v in accounted.items()}},
                "connections": sessions.open_connections, "sessions": live,
                "refused_sessions": sum(1 for s in sessions.by_identity.values()
                                        if s.refused and s.live),
                "closing_sessions": len(sessions.closing),
                "held": len(self.outbox.held) + (lane.held_count() if lane else 0),
                "pending": len(self.requests.pending) + (lane.pending_count() if lane else 0),
                "ack_latency": self.outbox.ack_latency.stats(), **self.stats, **self.views.stats,
                "refused_by_reason": dict(self.outbox.reasons.totals), "limits": self.limits}

    # ------------------------------------------------------------------ shutdown -------
    def _close_state(self, region) -> None:
        # the views first: a mapping with exported views cannot close
        self._state = None
        if getattr(self, "requests", None) is not None:
            self.requests.state = None
        region.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if getattr(self, "replayer", None) is not None:
            self.replayer.close()         # its worker's socket, before the context ends
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
# the spec's exchange key -> (Gateway argument, type)
SPEC_LIMITS = {"rate_limit_per_s": ("rate_per_s", float), "rate_limit_burst": ("burst", float),
               "max_connections": ("max_connections", int),
               "max_connections_per_account": ("max_connections_per_account", int),
               "max_queued_messages": ("max_queued_messages", int),
               "max_queued_bytes": ("max_queued_bytes", int),
               "gateway_memory_limit_mb": ("memory_limit_mb", int)}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gateway",
                                description="perpx order-entry gateway (one process)")
    p.add_argument("--spec", required=True, help="exchange.json written by `perpx up`")
    p.add_argument("--index", type=int, default=0, help="gateway number N (gateway-N)")
    p.add_argument("--orders", default="tcp://127.0.0.1:*", help="ROUTER endpoint to bind")
    p.add_argument("--market-data", default=None,
                   help="PUB endpoint to bind (give it to one gateway only)")
    p.add_argument("--server-key", required=True,
                   help="the server's CURVE secret certificate (zmq.auth format)")
    p.add_argument("--spin-us", type=float, default=0.0,
                   help="busy-wait this long for a due reply before sleeping (0: never spin)")
    p.add_argument("--endpoints-file", default=None,
                   help="write the bound endpoints here as JSON once serving")
    p.add_argument("--replay-keep", type=int, default=DEFAULT_KEEP,
                   help="reports kept in memory per account for replay")
    p.add_argument("--stats-file", default=None,
                   help="write counts and limits here as JSON once a second (perpx status)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"gateway-{args.index} %(levelname)s %(message)s")
    spec = load_spec(args.spec)
    source = f"gateway-{args.index}"
    source_index = [s.name for s in spec.sources].index(source)
    exchange = spec.section("exchange")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # exchange.json holds the config resolved by `perpx up` (perpx/config.py, its one home
    # for defaults): every limit is there, none is guessed here
    missing = [key for key in SPEC_LIMITS if key not in exchange]
    if missing:
        log.error("%s: the exchange section lacks %s: write it with `perpx up`", args.spec,
                  ", ".join(missing))
        return 2
    limits = {arg: kind(exchange[key]) for key, (arg, kind) in SPEC_LIMITS.items()}
    progress = attach_retrying(lambda: JournalProgress.attach(spec.prefix), 30.0)
    gw = Gateway(spec.prefix, spec.engine, MarketTable(spec.markets),
                 source_index=source_index, index=args.index,
                 accounts_dir=spec.layout.accounts_dir, server_secret_key_file=args.server_key,
                 orders_endpoint=args.orders, market_data_endpoint=args.market_data,
                 spin_s=args.spin_us * 1e-6, ack_mode=spec.ack_mode,
                 durable_seq=progress.durable_seq, journal_errno=progress.journal_errno,
                 stats_file=args.stats_file, **limits,
                 replay_store=f"ipc://{spec.layout.sql_socket}", replay_keep=args.replay_keep)
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
