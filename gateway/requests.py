"""Client requests: authenticate, rate-limit, decode, validate, then either queue a command for
the matcher (its reply comes back as an event, gateway/routing.py) or answer at once (queries,
pings, edge rejects).

Requests are dispatched by `type` through `Requests.handlers`; a module adds a request type
with `register(type, handler)`, the handler being `handler(session, msg, rid, now_ns)` that
replies through the outbox or raises `EdgeReject`.
"""

from __future__ import annotations

import os
import time

import numpy as np

from engine.records import (CMD_CANCEL_ALL, COMMAND_DTYPE, EV_ACK, EV_AMENDED, EV_CANCELED,
                            EV_DONE, EV_REJECT, FLAG_CID_GIVEN, FLAG_ON_DISCONNECT,
                            REASON_FORBIDDEN, REASON_INVALID_MESSAGE, REASON_MARKET_HALTED,
                            REASON_RATE_LIMITED, REASON_UNKNOWN_ORDER)
from engine.units import EdgeReject
from gateway import codec
from gateway.account_state import account_state_fields, account_tables
from gateway.codec import COMMAND_STRUCT
from gateway.mirror import O_MARKET
from gateway.reasons import where
from gateway.views import PackedMap

# what a pending request expects as its reply
R_NEW_ORDER, R_CANCEL, R_AMEND, R_DONE, R_DISCONNECT = range(5)
REPLY_ETYPES = {
    R_NEW_ORDER: (EV_ACK, EV_REJECT),
    R_CANCEL: (EV_CANCELED, EV_REJECT),
    R_AMEND: (EV_AMENDED, EV_REJECT),
    R_DONE: (EV_DONE, EV_REJECT),
    R_DISCONNECT: (EV_DONE, EV_REJECT),
}
REQ_LIMIT = 2 ** 31 - 1
F_CID, F_FLAGS = 2, 10     # positions in codec's command-field tuples
# Requests that would add exposure or move money: refused while the journal fails.
NOT_WHILE_JOURNAL_FAILS = frozenset(("new_order", "amend", "withdraw", "set_margin"))
# Tokens of the account's rate limit a request takes (Binance-style request weights): what it
# costs the gateway's one thread next to an order. A type not listed (malformed ones
# included) weighs 1.
WEIGHTS = {"cancel_all": 5, "book": 5, "open_orders": 5, "account": 10}
# How long an `account` query may wait for the matcher to pause between command batches.
ACCOUNT_COPY_TIMEOUT_S = 0.5


def _cid_given(fields: tuple, msg: dict) -> tuple:
    if "cid" not in msg:
        return fields
    return fields[:F_FLAGS] + (fields[F_FLAGS] | FLAG_CID_GIVEN,) + fields[F_FLAGS + 1:]


def _request_cid(fields: tuple, msg: dict) -> tuple:
    if msg.get("cid") is None:
        return fields
    cid = codec.int_field(msg, "cid", required=True)
    return (fields[:F_CID] + (cid,) + fields[F_CID + 1:F_FLAGS]
            + (fields[F_FLAGS] | FLAG_CID_GIVEN,) + fields[F_FLAGS + 1:])


class Requests:
    def __init__(self, *, sessions, outbox, limiter, ring, mirror, markets, market_by_id,
                 state, events, max_message_bytes: int, recv_batch: int, durable: bool,
                 journal_errno, learn_disconnects, stats: dict, views):
        self.sessions = sessions
        self.outbox = outbox
        self.limiter = limiter
        self.ring = ring
        self.mirror = mirror
        self.markets = markets
        self.market_by_id = market_by_id
        self.state = state
        self.events = events
        self.max_message_bytes = max_message_bytes
        self.durable = durable
        self.journal_errno = journal_errno
        self.learn_disconnects = learn_disconnects
        self.catch_up = lambda seq: None     # the event router's: route events up to seq
        self.stats = stats
        self.views = views
        stats.setdefault("requests", 0)
        stats.setdefault("dropped_frames", 0)
        stats.setdefault("ignored_messages", 0)
        # req -> (Session, rid, account, R_*, cid or None, extra)
        self.pending: dict[int, tuple] = {}
        # (account, cid) -> (req, market) of new orders not acked yet (amend by cid needs it);
        # the compiled lane's own are asked of it (gateway/compiled_pass.py)
        self.pending_cids: dict[tuple[int, int], tuple[int, int]] = {}
        self.lane_cid_market = lambda account, cid: None
        self._next_req = 1 + int.from_bytes(os.urandom(3), "little")
        self.cmd_buf = np.zeros(recv_batch + 64, COMMAND_DTYPE)
        self._cmd_mv = memoryview(self.cmd_buf.view(np.uint8))
        self.cmd_n = 0
        self.handlers = {
            "new_order": self._new_order, "cancel": self._cancel, "amend": self._amend,
            "cancel_all": self._cancel_all, "withdraw": self._withdraw,
            "set_margin": self._set_margin, "ping": self._ping, "hello": self._hello,
            "book": self._book, "open_orders": self._open_orders, "account": self._account,
        }
        self.weights = dict(WEIGHTS)

    def register(self, typ: str, handler, weight: int = 1) -> None:
        """handler(session, msg, rid, now_ns) answers `typ`; `weight` tokens of the account's
        rate limit per request."""
        self.handlers[typ] = handler
        self.weights[typ] = weight

    # -- the command buffer -------------------------------------------------------------
    def new_req(self) -> int:
        req = self._next_req
        self._next_req = req + 1 if req < REQ_LIMIT else 1
        return req

    def queue_command(self, ts: int, account: int, req: int, f: tuple) -> None:
        """Pack command fields (codec's parse_* layout) into the buffer for the ring."""
        COMMAND_STRUCT.pack_into(self._cmd_mv, self.cmd_n * 64, ts, f[2], f[3], f[4], f[5],
                                 f[6], account, req, f[1], f[0], f[7], f[8], f[9], f[10], f[11])
        self.cmd_n += 1
        if self.cmd_n == len(self.cmd_buf):
            self.flush()
            if self.cmd_n == len(self.cmd_buf):
                self.ring.wait_for_space(1, timeout_s=1.0)
                self.flush()

    def flush(self) -> None:
        n = self.cmd_n
        written = self.ring.write(self.cmd_buf[:n])
        if written < n:
            self.cmd_buf[:n - written] = self.cmd_buf[written:n]
        self.cmd_n = n - written

    def _command(self, s, rid, kind: int, cid, extra, now: int, fields: tuple) -> int:
        req = self.new_req()
        self.pending[req] = (s, rid, s.account, kind, cid, extra)
        self.queue_command(now, s.account, req, fields)
        return req

    def cancel_on_disconnect(self, s) -> None:
        """A finished session (gateway/sessions.py): cancel all its account's orders if it
        asked for that, after every command it sent."""
        if s.cancel_on_disconnect:
            req = self.new_req()
            self.pending[req] = (None, None, s.account, R_DISCONNECT, None, None)
            self.queue_command(time.time_ns(), s.account, req,
                               (CMD_CANCEL_ALL, -1, 0, 0, 0, 0, 0, 0, 0, 0,
                                FLAG_ON_DISCONNECT, 0))

    # -- one message --------------------------------------------------------------------
    def handle(self, identity: bytes, frame, extra_frames: bool) -> None:
        """One message (`frame`: its first frame; `extra_frames`: it had more): exactly one
        reply, with its `rid` (and `cid`) whenever they can be read, whatever its shape.
        Never raises: a bug must not let one client's message take the gateway down, nor
        fill the log."""
        self.stats["requests"] += 1
        s = None
        try:
            s = self.sessions.of_message(identity, frame, self.learn_disconnects)
            if s is None:
                self.stats["dropped_frames"] += 1      # no account: not through our ZAP
                return
            if s.evicted:
                self.stats["ignored_messages"] += 1    # gateway/sessions.py: it gets nothing
                return
            self._handle(s, frame, extra_frames)
        except Exception as e:
            if s is None:                 # before its session is known: nobody to answer
                self.outbox.reasons.note(f"unexpected {where(e)} (not answered)")
                return
            self.outbox.reject(s, REASON_INVALID_MESSAGE,
                               "the gateway could not process this message")
            self.outbox.reasons.note(f"unexpected {where(e)}")

    def _handle(self, s, frame, extra_frames: bool):
        outbox = self.outbox
        now = time.time_ns()
        size = len(frame)
        msg = None
        if size <= self.max_message_bytes and not extra_frames:
            try:
                msg = codec.unpack(frame.buffer)
            except Exception:
                msg = None
        strict = type(msg) is dict
        if not strict:
            msg = codec.unpack_lenient(frame.buffer)     # only to read rid and cid
        rid = cid = typ = None
        if msg is not None:
            rid = msg.get("rid")
            cid = msg.get("cid")
            typ = msg.get("type")
            if type(rid) is not int:
                rid = None
            if type(cid) is not int:
                cid = None
            if type(typ) is not str:
                typ = None
        allowed = self.limiter.take(s.account, now, self.weights.get(typ, 1))
        if not allowed:
            outbox.reject(s, REASON_RATE_LIMITED, "too many requests", rid, cid)
        elif s.refused:
            outbox.reject(s, REASON_FORBIDDEN, f"this account has {self.sessions.max_per_account}"
                          f" connections to this gateway already: this one is refused", rid, cid)
        elif extra_frames:
            outbox.reject(s, REASON_INVALID_MESSAGE,
                          "a request is exactly one frame (a msgpack map)", rid, cid)
        elif size > self.max_message_bytes:
            outbox.reject(s, REASON_INVALID_MESSAGE,
                          f"message larger than {self.max_message_bytes} bytes", rid, cid)
        elif not strict:
            outbox.reject(s, REASON_INVALID_MESSAGE, "not a msgpack map with string keys",
                          rid, cid)
        elif rid is None and msg.get("rid") is not None:
            outbox.reject(s, REASON_INVALID_MESSAGE, "rid must be an integer", None, cid)
        elif "account" in msg and msg["account"] != s.account:
            outbox.reject(s, REASON_FORBIDDEN,
                          "this connection trades only for its own account", rid, cid)
        elif typ is None:
            outbox.reject(s, REASON_INVALID_MESSAGE, "type is missing or not a string", rid,
                          cid)
        elif typ in NOT_WHILE_JOURNAL_FAILS and self.journal_errno():
            outbox.reject(s, REASON_MARKET_HALTED,
                          f"not accepting {typ} while the journal cannot be written "
                          f"({os.strerror(self.journal_errno())}): nothing would be "
                          f"durable; cancels still work", rid, cid)
        else:
            handler = self.handlers.get(typ)
            try:
                if handler is None:
                    raise EdgeReject(REASON_INVALID_MESSAGE, "unknown message type")
                handler(s, msg, rid, now)
            except EdgeReject as e:
                outbox.reject(s, e.reason, e.text, rid, cid)

    # -- commands -----------------------------------------------------------------------
    def _new_order(self, s, msg, rid, now) -> None:
        fields, market = codec.parse_new_order(msg, self.markets)
        req = self._command(s, rid, R_NEW_ORDER, fields[2], None, now, fields)
        self.pending_cids[(s.account, fields[2])] = (req, fields[1])

    # A cid the request named rides in the command with FLAG_CID_GIVEN, so the reject (or
    # `done`) echoes it, live and replayed (gateway/replay.py). cancel_all, withdraw and
    # set_margin take an optional cid of the client's choosing for that alone.
    def _cancel(self, s, msg, rid, now) -> None:
        oid, cid = codec.order_ref(msg)
        self._command(s, rid, R_CANCEL, cid if "cid" in msg else None, None, now,
                      _cid_given(codec.cancel_fields(oid, cid, 0), msg))

    def _amend(self, s, msg, rid, now) -> None:
        oid, cid = codec.order_ref(msg)
        market = self._market_of_order(s.account, oid, cid, msg)
        fields = codec.amend_fields(msg, oid, cid, market)
        self._command(s, rid, R_AMEND, cid if "cid" in msg else None, None, now,
                      _cid_given(fields, msg))

    def _cancel_all(self, s, msg, rid, now) -> None:
        self._command(s, rid, R_DONE, None, True, now,
                      _request_cid(codec.parse_cancel_all(msg, self.markets), msg))

    def _withdraw(self, s, msg, rid, now) -> None:
        self._command(s, rid, R_DONE, None, False, now,
                      _request_cid(codec.parse_withdraw(msg), msg))

    def _set_margin(self, s, msg, rid, now) -> None:
        self._command(s, rid, R_DONE, None, False, now,
                      _request_cid(codec.parse_set_margin(msg, self.markets), msg))

    def _market_of_order(self, account: int, oid: int, cid: int, msg: dict):
        """The market of an order this account may amend (its grid checks the new values)."""
        order = self.mirror.order_of(account, oid, cid)
        if order is not None:
            market = self.market_by_id[order[O_MARKET]]
            if market is not None:
                return market
        if self.mirror.untriggered_of(account, oid, cid) is not None:
            raise EdgeReject(REASON_INVALID_MESSAGE, "an untriggered stop or take-profit order "
                             "cannot be amended: cancel it and place a new one")
        if not oid:
            pend = self.pending_cids.get((account, cid))
            m = pend[1] if pend is not None else self.lane_cid_market(account, cid)
            if m is not None and self.market_by_id[m] is not None:
                return self.market_by_id[m]
        if "market" in msg:        # a hint for an order this gateway has not seen yet
            return self.markets.get(msg["market"])
        raise EdgeReject(REASON_UNKNOWN_ORDER, "no such open order of this account")

    # -- answered here ------------------------------------------------------------------
    def _ping(self, s, msg, rid, now) -> None:
        self.outbox.reply(s, {"type": "pong", "ts": now}, rid)

    def _hello(self, s, msg, rid, now) -> None:
        flag = msg.get("cancel_on_disconnect", False)
        if type(flag) is not bool:
            raise EdgeReject(REASON_INVALID_MESSAGE, "cancel_on_disconnect must be true or false")
        s.cancel_on_disconnect = flag
        self.outbox.reply(s, {"type": "hello", "account": s.account,
                              "cancel_on_disconnect": flag, "ts": now}, rid)

    # Queries: answered from views built once per change (gateway/views.py).
    def _query_seq(self) -> int:
        """Durable mode holds a query's answer until what it shows is journaled."""
        return self.mirror.applied_seq if self.durable else 0

    def _book(self, s, msg, rid, now) -> None:
        market = self.markets.get(msg.get("market"))
        depth = msg.get("depth", 0)
        if depth is None:
            depth = 0
        if type(depth) is not int or depth < 0:
            raise EdgeReject(REASON_INVALID_MESSAGE, "depth must be a non-negative integer")
        m = market.id
        version = self.mirror.book_version(m)
        view = self.views.book(m, depth, version)
        if view is None:
            bids, asks = self.mirror.book_levels(m, depth)
            t, l = market.ticks_to_str, market.lots_to_str
            view = PackedMap({"type": "book", "market": market.symbol,
                              "bids": [[t(p), l(q)] for p, q in bids],
                              "asks": [[t(p), l(q)] for p, q in asks]})
            self.views.keep_book(m, depth, version, view)
        self.outbox.send(s, view.with_fields(seq=self.mirror.applied_seq, ts=now, rid=rid),
                         self._query_seq())

    def _open_orders(self, s, msg, rid, now) -> None:
        only = None
        if msg.get("market") is not None:
            only = self.markets.get(msg["market"]).id
        view = self.views.orders(s.account, only)
        if view is None:
            out = []
            for oid, o, status in self.mirror.open_orders(s.account, only):
                market = self.market_by_id[o[O_MARKET]]
                if market is not None:
                    out.append(codec.open_order_row(oid, o, status, market))
            view = PackedMap({"type": "open_orders", "orders": out})
            self.views.keep_orders(s.account, only, view)
        self.outbox.send(s, view.with_fields(seq=self.mirror.applied_seq, ts=now, rid=rid),
                         self._query_seq())

    def _account(self, s, msg, rid, now) -> None:
        """From the matcher's own rows (gateway/account_state.py), exact at their seq. The
        events up to that seq are published by then: they are routed first, so a client sees
        the fills of those commands before the account_state that includes them. Kept until
        an event for the account (or for everyone) passes that seq."""
        kept = self.views.account(s.account)
        if kept is None:
            tables, seq = account_tables(self.state, self.events, s.account,
                                         ACCOUNT_COPY_TIMEOUT_S)
            self.catch_up(seq)
            out = {"type": "account_state", "account": s.account}
            out.update(account_state_fields(tables, 0, self.market_by_id))
            kept = (seq, PackedMap(out))
            self.views.keep_account(s.account, seq, kept[1])
        seq, view = kept
        self.outbox.send(s, view.with_fields(seq=seq, ts=now, rid=rid),
                         seq if self.durable else 0)
