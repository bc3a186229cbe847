"""A small client library for perpx (PROTOCOL.md, "Order entry" and "Market data").

    from perpx.client import Client, MarketData
    c = Client.connect("perpx-state/endpoints.json", "perpx-state/clients/1.key_secret")
    ack = c.new_order("BTC-PERP", "buy", "limit", "0.01", "64000")     # -> the `ack` (or `reject`)
    c.reports()                  # fills/cancels that arrived meanwhile (no rid), oldest first
    md = MarketData.connect(c.endpoints, ["BTC-PERP"], snapshot_client=c)
    md.poll(0.1); md.book("BTC-PERP")   # local book: `book` snapshot + `book.MARKET` deltas

`Client` is synchronous and meant for one thread: every request method sends one message with
a fresh `rid` and waits (with a deadline) for the reply echoing it; anything else received
meanwhile (fills, `canceled` with reason ioc/stp/…, replies to requests that timed out) is
queued for `reports()` and, if given, passed to `on_report`. Replies are returned as the
gateway sent them (a `reject` is a reply, not an exception); `RequestTimeout` is raised when
no reply arrives in time.

`AsyncClient` offers the same request methods as coroutines (zmq.asyncio): a receiver task
resolves each request's future by rid and queues the rest.

Reports by type: `on(type, handler)` registers a handler for one report type ("fill",
"canceled", "triggered", "funding", "liquidation", ...); every report is still queued and
passed to `on_report`. Conditional orders are `new_order(..., kind="stop_market",
trigger_price="64000", trigger_by="mark")` (ack status "untriggered", later a `triggered`
report); `set_margin(market, "isolated", 10)` answers `done` or `reject`.

Reports in order, none lost (PROTOCOL.md, "Report sequence and replay"): every report to the
account carries `account_seq`; the client delivers them in that order, each once, and keeps
`last_account_seq`. A gap (a report numbered beyond the next), a reconnection (the socket
monitor sees the connection come back, e.g. after a gateway restart) or a request that timed
out sends `replay {from_account_seq: last}`; what it returns fills the gap. `connect` starts
the stream at `from_account_seq` (a bot's saved position) or, by default, at the account's
current end. A request whose reply was lost is resolved from the replayed reports by its cid
(new orders, cancels and amends by their order's cid or oid; cancel_all, withdraw and
set_margin get a cid of the client's, which `done` and `reject` echo); if the replay holds no
outcome the command was never sequenced and `RequestLost` is raised (safe to send again).
A new connection is a new session at the gateway: after a reconnection the client says its
last `hello` again (cancel_on_disconnect) before the replay and before any later request
(a request sent while the connection was down may reach the gateway before it: libzmq sends
what it queued meanwhile first).

Set-up fails fast and says why (docs/client.md): the certificate is read before any socket
exists (CertificateMissing, CertificateInvalid, PublicOnlyCertificate); a socket monitor sees
the CURVE handshake's outcome, and a key the gateway keeps refusing for UNKNOWN_KEY_GRACE_S
raises UnknownKey (libzmq does not retry a refused handshake, so each attempt is a new socket;
the grace lets a key registered a moment ago in at the gateway's next registry scan), another
failed handshake (a wrong server key) HandshakeFailed; silence until connect_timeout_s raises
ConnectTimeout. Every socket lingers 0 and a failed set-up
closes what it made, so nothing blocks in ctx.term(). Prices, quantities and amounts are
strings, ints or Decimals; a float raises FloatRefused.

Typed objects: `typed(msg)` turns any reply or report map into a frozen dataclass (Ack,
Reject, Fill, Canceled, AccountState, Book, ...; decimals as Decimal, the map in `.raw`);
`typed_reports()` is `reports()` typed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils.monitor import parse_monitor_message, recv_monitor_message

from gateway.socket_poll import SocketPoll, has_input

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 15.0
# How long a command whose reply did not come may wait for a replay to tell its outcome (the
# gateway may be restarting).
RECOVER_S = 30.0
HANDSHAKE_ATTEMPT_S = 1.0
# A refused handshake is retried this long before UnknownKey: a key registered a moment ago
# gets in once the gateway re-scans its registry (every 0.2 s at most, gateway/accounts.py).
UNKNOWN_KEY_GRACE_S = 1.0
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# the socket's monitor: the handshake's outcome at connect, then disconnects and reconnects
# (a reconnection replays the report stream)
_MONITOR_EVENTS = _HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED


class ClientError(RuntimeError):
    """Anything the client library raises about the exchange or its own set-up."""


class RequestTimeout(ClientError):
    """No reply to a request within its deadline."""


class CertificateError(ClientError):
    """The client certificate cannot be used (raised before any socket is made)."""


class CertificateMissing(CertificateError):
    """No file at the certificate path."""


class CertificateInvalid(CertificateError):
    """The file is not a CURVE certificate (or its keys are malformed)."""


class PublicOnlyCertificate(CertificateError):
    """The file holds a public key only (accounts/<id>.key); clients need the secret one."""


class UnknownKey(ClientError):
    """The gateway refused the certificate's key at the handshake: not a registered account
    (or a disabled one)."""


class HandshakeFailed(ClientError):
    """The CURVE handshake failed for another reason than the key: most often an
    endpoints.json of another exchange (or of an earlier server key)."""


class ConnectTimeout(ClientError):
    """No answer from the gateway at all (exchange down, wrong endpoint or server key)."""


class FloatRefused(ClientError, TypeError):
    """A price, quantity or amount given as a float: floats cannot say 0.1 exactly."""


class RequestLost(RequestTimeout):
    """No reply, and the account's replayed reports hold no outcome: never sequenced."""


SYNC_FROM = 2 ** 62          # a replay from here answers only the account's last account_seq
# requests whose outcome is a report (so a lost reply is found again by replay)
SEQUENCED = frozenset(("new_order", "cancel", "amend", "cancel_all", "withdraw", "set_margin"))
_OUTCOME_TYPES = {"new_order": ("ack",), "cancel": ("canceled",), "amend": ("amended",),
                  "cancel_all": ("done",), "withdraw": ("done",), "set_margin": ("done",)}


def is_outcome(request: dict, report: dict) -> bool:
    """Whether `report` is the reply to `request` (matched by cid or oid, not rid)."""
    kind = request["type"]
    typ = report.get("type")
    if typ != "reject" and typ not in _OUTCOME_TYPES.get(kind, ()):
        return False
    if kind in ("new_order", "cancel_all", "withdraw", "set_margin"):
        return report.get("cid") == request.get("cid") and "oid" not in report \
            if typ == "reject" else report.get("cid") == request.get("cid")
    if typ == "canceled" and report.get("reason") != "user":
        return False
    if "oid" in request:
        return report.get("oid") == request["oid"]
    return report.get("cid") == request.get("cid") and (typ != "reject" or "oid" not in report)


class _ReportStream:
    """account_seq bookkeeping: which reports to deliver now, in order, each once; and what a
    new connection must be told first (`resume`)."""

    def __init__(self, from_account_seq: int | None):
        self.last = from_account_seq     # None until the first replay says where the end is
        self.ahead: dict[int, dict | None] = {}   # beyond a gap (None: delivered as a reply)
        self.replay_rid = None
        self.need_replay = False
        self.disconnected = False
        # the session's settings as the last `hello` asked them (None: never said), which a
        # new connection (a new session at the gateway) must be told again
        self.hello: dict | None = None
        self.hello_rid = None
        self.need_hello = False

    def on_connection_event(self, event: int) -> bool:
        """A monitor event of the session's socket; True when it reconnected after a
        disconnect: the gateway sees a new session, which is told the hello settings again
        (need_hello); whatever was sent meanwhile is in the replay, and a replay asked before
        may have lost its answer, so a new one is due (need_replay)."""
        if event == zmq.EVENT_DISCONNECTED:
            self.disconnected = True
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self.disconnected:
            self.disconnected = False
            self.replay_rid = None
            self.need_replay = True
            self.need_hello = self.hello is not None
            return True
        return False

    def resume(self, rids) -> list[dict]:
        """What to send now, in this order, before anything else: `hello` again on a new
        connection, then the replay that is due (rids: the client's rid counter)."""
        out = []
        if self.need_hello:
            self.need_hello = False
            self.hello_rid = next(rids)
            out.append({"type": "hello", "rid": self.hello_rid, **self.hello})
        if self.need_replay and self.replay_rid is None:
            out.append(self.replay_request(next(rids)))
        return out

    def on_message(self, msg: dict) -> list[dict]:
        """Anything received that is no awaited reply: the reports it makes deliverable."""
        rid = msg.get("rid")
        if rid is not None and rid == self.hello_rid:
            self.hello_rid = None           # the repeated hello's answer: nobody waits for it
            if msg.get("type") != "hello":
                self.need_hello = True      # refused (rate limit, ...): say it again
            return []
        if rid is not None and rid == self.replay_rid:
            if msg.get("type") == "replayed":
                return self.replayed(msg)
            self.replay_rid = None          # refused (rate limit, ...): ask again
            self.need_replay = True
            return []
        if msg.get("type") == "replayed":   # the end of a replay given up (reconnected)
            return []
        return self.accept(msg)

    def accept(self, msg: dict, as_reply: bool = False) -> list[dict]:
        n = msg.get("account_seq")
        if n is None:
            return [] if as_reply else [msg]
        if self.last is None or n > self.last + 1:
            self.ahead[n] = None if as_reply else msg
            if self.last is not None:
                self.need_replay = True
            return []
        if n <= self.last:
            return []          # seen already (a replay and the live copy)
        self.last = n
        return ([] if as_reply else [msg]) + self._take_ahead()

    def _take_ahead(self) -> list[dict]:
        out = []
        while self.last + 1 in self.ahead:
            self.last += 1
            m = self.ahead.pop(self.last)
            if m is not None:
                out.append(m)
        return out

    def replayed(self, msg: dict) -> list[dict]:
        """The end of a replay; returns reports it made deliverable."""
        self.replay_rid = None
        out = []
        if self.last is None:
            self.last = msg.get("last_account_seq", 0)
            for n in [k for k in self.ahead if k <= self.last]:
                del self.ahead[n]
            out = self._take_ahead()
        self.need_replay = bool(msg.get("more") or self.ahead)
        return out

    def replay_request(self, rid: int) -> dict:
        self.replay_rid = rid
        self.need_replay = False
        return {"type": "replay", "rid": rid,
                "from_account_seq": SYNC_FROM if self.last is None else self.last}


def load_endpoints(endpoints) -> dict:
    """endpoints.json path (or its state dir), or the already-loaded dict."""
    if isinstance(endpoints, dict):
        return endpoints
    p = Path(endpoints)
    if p.is_dir():
        p = p / "endpoints.json"
    return json.loads(p.read_text())


def load_client_certificate(path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys of a client certificate file; a CertificateError saying what
    is wrong otherwise. `perpx account create` prints the path of a new one."""
    path = Path(path)
    if not path.is_file():
        raise CertificateMissing(f"{path}: no such certificate file (`perpx account create` "
                                 f"makes one and prints its path)")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise CertificateInvalid(f"{path}: not a CURVE certificate ({e})") from None
    if not secret:
        raise PublicOnlyCertificate(f"{path} holds only a public key: a client connects with "
                                    f"the secret certificate, clients/<id>.key_secret")
    for name, key in (("public", public), ("secret", secret)):
        if len(key) != 40:
            raise CertificateInvalid(f"{path}: the {name} key is not 40 z85 characters")
    return public, secret


def _decimal_text(value, what: str) -> str:
    """A price/qty/amount as the wire's decimal string; floats are refused (0.1 is not 0.1)."""
    if isinstance(value, float):
        raise FloatRefused(f"{what}={value!r} is a float: pass a string such as '0.01' or a "
                           f"decimal.Decimal (floats cannot hold most decimals exactly, and "
                           f"the exchange rejects a value off its grid rather than round it)")
    if isinstance(value, Decimal):
        return format(value, "f")        # never exponent notation (1E-7), which is refused
    return str(value)


def _pack(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def _unpack(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False)


def _first_cid() -> int:
    # distinct across client instances of one account (open-order cids must be unique)
    return (time.time_ns() // 1_000_000 % (1 << 41)) << 20


def _order_msg(market, side, kind, qty, price, tif, reduce_only, stp, cid, trigger_price,
               trigger_by) -> dict:
    msg = {"type": "new_order", "cid": cid, "market": market, "side": side, "kind": kind,
           "qty": _decimal_text(qty, "qty")}
    if price is not None:
        msg["price"] = _decimal_text(price, "price")
    if tif is not None:
        msg["tif"] = tif
    if reduce_only:
        msg["reduce_only"] = True
    if stp is not None:
        msg["stp"] = stp
    if trigger_price is not None:
        msg["trigger_price"] = _decimal_text(trigger_price, "trigger_price")
    if trigger_by is not None:
        msg["trigger_by"] = trigger_by
    return msg


def _ref(oid, cid) -> dict:
    if oid is None and cid is None:
        raise ValueError("oid or cid is required")
    return {"oid": oid} if oid is not None else {"cid": cid}


class _Connection:
    """A socket, and the zmq context when this object made it.

    close() never blocks: sockets close with linger 0, and a context of its own is destroyed
    (every socket still open in it closed with linger 0, then terminated), so a set-up that
    failed half-way cannot leave ctx.term() waiting for a socket nobody closes."""

    socket = None
    monitor = None      # the socket's monitor (order-entry sessions)

    def _close_sockets(self) -> None:
        if self.monitor is not None:
            try:
                self.socket.disable_monitor()
            except zmq.ZMQError:
                pass
            self.monitor.close(0)
            self.monitor = None
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None

    def close(self) -> None:
        self._close_sockets()
        if self.own_ctx:
            self.ctx.destroy(linger=0)
            self.own_ctx = False


class _Requests:
    """The request methods, shared by Client and AsyncClient (`request` does the I/O)."""

    def next_cid(self) -> int:
        return next(self._cids)

    def new_order(self, market: str, side: str, kind: str = "limit", qty="0", price=None,
                  tif: str | None = None, reduce_only: bool = False, stp: str | None = None,
                  cid: int | None = None, trigger_price=None, trigger_by: str | None = None,
                  timeout_s: float | None = None):
        """`ack` or `reject` (tif/stp default to the exchange's: gtc/ioc, cancel_taker)."""
        if cid is None:
            cid = self.next_cid()
        return self.request(_order_msg(market, side, kind, qty, price, tif, reduce_only, stp,
                                       cid, trigger_price, trigger_by), timeout_s)

    def cancel(self, oid: int | None = None, cid: int | None = None, timeout_s=None):
        return self.request({"type": "cancel", **_ref(oid, cid)}, timeout_s)

    def cancel_all(self, market: str | None = None, timeout_s=None):
        msg = {"type": "cancel_all", "cid": self.next_cid()}
        if market is not None:
            msg["market"] = market
        return self.request(msg, timeout_s)

    def amend(self, oid: int | None = None, cid: int | None = None, price=None, qty=None,
              timeout_s=None):
        msg = {"type": "amend", **_ref(oid, cid)}
        if price is not None:
            msg["price"] = _decimal_text(price, "price")
        if qty is not None:
            msg["qty"] = _decimal_text(qty, "qty")
        return self.request(msg, timeout_s)

    def account(self, timeout_s=None):
        return self.request({"type": "account"}, timeout_s)

    def open_orders(self, market: str | None = None, timeout_s=None):
        msg = {"type": "open_orders"}
        if market is not None:
            msg["market"] = market
        return self.request(msg, timeout_s)

    def book(self, market: str, depth: int = 0, timeout_s=None):
        return self.request({"type": "book", "market": market, "depth": depth}, timeout_s)

    def ping(self, timeout_s=None):
        return self.request({"type": "ping"}, timeout_s)

    def hello(self, cancel_on_disconnect: bool = True, timeout_s=None):
        """The session's settings; said again on every new connection (_ReportStream)."""
        self._stream.hello = {"cancel_on_disconnect": cancel_on_disconnect}
        return self.request({"type": "hello", "cancel_on_disconnect": cancel_on_disconnect},
                            timeout_s)

    def withdraw(self, amount, timeout_s=None):
        return self.request({"type": "withdraw", "amount": _decimal_text(amount, "amount"),
                             "cid": self.next_cid()},
                            timeout_s)

    def set_margin(self, market: str, mode: str, leverage: int, timeout_s=None):
        """Margin mode ("cross"/"isolated") and leverage of one market: `done` or `reject`."""
        return self.request({"type": "set_margin", "market": market, "mode": mode,
                             "leverage": leverage, "cid": self.next_cid()}, timeout_s)

    def on(self, report_type: str, handler) -> None:
        """Call handler(msg) for every report of this type (after queueing it)."""
        self._handlers.setdefault(report_type, []).append(handler)

    @property
    def last_account_seq(self) -> int | None:
        """The account_seq of the last report delivered (in order, without gaps)."""
        return self._stream.last

    def _report(self, msg: dict) -> None:
        self._resolve(msg)
        self._queue.append(msg)
        if self.on_report is not None:
            self.on_report(msg)
        for handler in self._handlers.get(msg.get("type"), ()):
            handler(msg)


def _make_socket(ctx, endpoints: dict, public: bytes, secret: bytes):
    """(DEALER with the client's CURVE keys, connected; its monitor (_MONITOR_EVENTS),
    attached before the connect so that no handshake outcome is missed). Both linger 0; both
    closed again if any step fails."""
    s = ctx.socket(zmq.DEALER)
    mon = None
    try:
        s.linger = 0
        s.curve_publickey, s.curve_secretkey = public, secret
        s.curve_serverkey = endpoints["server_public_key"].encode()
        mon = s.get_monitor_socket(_MONITOR_EVENTS)
        mon.linger = 0
        s.connect(endpoints["orders"])
    except BaseException:
        if mon is not None:
            mon.close(0)
        s.close(0)
        raise
    return s, mon


def _handshake_outcome(event: int) -> str:
    """'ok'; 'refused' (the gateway's authenticator denied the key); 'failed' (anything else:
    e.g. a wrong server key, which the gateway cannot decrypt)."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return "ok"
    return "refused" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "failed"


def _failed_handshake_error(outcome: str, endpoints: dict, certificate: str,
                            seconds: float) -> ClientError:
    if outcome == "refused":
        return UnknownKey(f"the gateway at {endpoints['orders']} refused the key of "
                          f"{certificate} for {seconds:.1f} s: it is not a registered account "
                          f"of this exchange (or it is disabled); `perpx account create` "
                          f"registers a new one")
    return HandshakeFailed(f"the CURVE handshake with {endpoints['orders']} failed for "
                           f"{seconds:.1f} s: is server_public_key in endpoints.json this "
                           f"exchange's (its current endpoints.json)?")


def _silent_message(endpoints: dict, timeout_s: float) -> str:
    return (f"no answer from {endpoints['orders']} within {timeout_s:g} s: is the exchange "
            f"up (perpx status), and endpoints.json its current one?")




class Client(_Connection, _Requests):
    """A synchronous order-entry session (one thread)."""

    def __init__(self, ctx: zmq.Context, endpoints: dict, certificate, *, on_report=None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, own_ctx: bool = False,
                 from_account_seq: int | None = None):
        self.ctx = ctx
        self.own_ctx = own_ctx
        self.endpoints = endpoints
        self.certificate = str(certificate)
        self.public, self.secret = load_client_certificate(self.certificate)
        self.on_report = on_report
        self.timeout_s = timeout_s
        self.last_rid = 0
        self._rids = itertools.count(1)
        self._cids = itertools.count(_first_cid())
        self._queue: deque = deque()
        self._handlers: dict = {}
        self._stream = _ReportStream(from_account_seq)
        self._awaiting = None          # the request being waited for ...
        self._resolved = None          # ... and its outcome, when a report turned out to be it
        self.socket = None
        self.monitor = None

    @classmethod
    def connect(cls, endpoints, certificate, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, on_report=None,
                cancel_on_disconnect=False, ctx: zmq.Context | None = None,
                from_account_seq: int | None = None) -> Client:
        """Load the certificate, connect, handshake, ping and sync the report stream.

        Raises a CertificateError at once for an unusable certificate, UnknownKey within
        about UNKNOWN_KEY_GRACE_S when the gateway refuses the key (HandshakeFailed when the
        handshake fails otherwise: a wrong server key), ConnectTimeout when nothing answers
        within connect_timeout_s; nothing stays open after a failure."""
        endpoints = load_endpoints(endpoints)
        load_client_certificate(certificate)       # before any socket or context
        own = ctx is None
        c = cls(ctx or zmq.Context(), endpoints, certificate, on_report=on_report,
                timeout_s=timeout_s, own_ctx=own, from_account_seq=from_account_seq)
        try:
            c._handshake(connect_timeout_s)
            c.sync()
            if cancel_on_disconnect:
                c.hello(True)
        except BaseException:
            c.close()
            raise
        return c

    def _handshake(self, timeout_s: float) -> None:
        """Open a socket and ping until a pong, with a fresh socket per attempt (libzmq does
        not retry a refused CURVE handshake); see connect for what it raises."""
        deadline = time.monotonic() + timeout_s
        refused_since = None
        while True:
            self._close_sockets()
            self.socket, self.monitor = _make_socket(self.ctx, self.endpoints, self.public,
                                                     self.secret)
            # one poll(2) on the DEALER and its monitor (gateway/socket_poll.py)
            self._monitor_fd = self.monitor.get(zmq.FD)
            self._poller = SocketPoll(self.socket, self._monitor_fd)
            attempt = min(HANDSHAKE_ATTEMPT_S, max(deadline - time.monotonic(), 0.05))
            outcome = self._await_handshake(attempt)
            if outcome == "ok":
                try:
                    self.ping(timeout_s=max(deadline - time.monotonic(), attempt))
                    return
                except RequestTimeout:
                    raise ConnectTimeout(_silent_message(self.endpoints, timeout_s)) from None
            now = time.monotonic()
            if outcome in ("refused", "failed"):
                refused_since = refused_since or now
                if now - refused_since >= UNKNOWN_KEY_GRACE_S:
                    raise _failed_handshake_error(outcome, self.endpoints, self.certificate,
                                                  now - refused_since)
                time.sleep(0.05)
            elif now >= deadline:
                raise ConnectTimeout(_silent_message(self.endpoints, timeout_s))

    def _await_handshake(self, timeout_s: float) -> str:
        """'ok', 'refused', 'failed' or 'silent' (nothing within timeout_s) for the current
        socket: the first handshake event on its monitor."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.monitor.poll(max(int(left * 1000), 1)):
                return "silent"
            event = recv_monitor_message(self.monitor)["event"]
            if event & _HANDSHAKE_EVENTS:
                return _handshake_outcome(event)


    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- I/O -------------------------------------------------------------------------------
    def _pump(self, timeout_ms: int, rid=None):
        """Wait up to timeout_ms for input and handle it; returns the reply with `rid` if it
        came. Reports are delivered in account_seq order; replays are asked for as needed."""
        self._resume()
        ready = self._poller.wait(timeout_ms)
        if self._monitor_fd in ready:
            self._on_monitor()
        if self._poller.sock_fd not in ready:
            return None
        reply = None
        while True:
            try:
                msg = _unpack(self.socket.recv(zmq.NOBLOCK))
            except zmq.Again:
                return reply
            if rid is not None and msg.get("rid") == rid:
                for m in self._stream.accept(msg, as_reply=True):
                    self._report(m)
                reply = msg
            else:
                self._handle(msg)

    def _on_monitor(self) -> None:
        # read while it has events: asked each request, and its fd signals only what comes after
        while has_input(self.monitor):
            event = zmq.utils.monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            self._stream.on_connection_event(event["event"])

    def _resume(self) -> None:
        """A reconnection seen (the monitor, without waiting): hello again, then the replay
        due, before any request."""
        self._on_monitor()
        for m in self._stream.resume(self._rids):
            self._send(m)

    def _handle(self, msg: dict) -> None:
        for m in self._stream.on_message(msg):
            self._report(m)

    def _resolve(self, msg: dict) -> None:
        if self._awaiting is not None and self._resolved is None and \
                is_outcome(self._awaiting, msg):
            self._resolved = msg

    def _send(self, msg: dict) -> None:
        self.socket.send(_pack(msg))

    def request(self, msg: dict, timeout_s: float | None = None) -> dict:
        self._resume()
        rid = self.last_rid = next(self._rids)
        msg["rid"] = rid
        self._send(msg)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        self._awaiting, self._resolved = (msg if msg["type"] in SEQUENCED else None), None
        try:
            while self._resolved is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return self._lost(msg, timeout_s)
                reply = self._pump(max(int(left * 1000), 1), rid)
                if reply is not None:
                    return reply
            return self._resolved
        finally:
            self._awaiting = None

    def _lost(self, msg: dict, timeout_s: float) -> dict:
        """No reply in time: if it was a command, the replayed reports say what became of it."""
        if msg["type"] not in SEQUENCED:
            raise RequestTimeout(f"no reply to {msg['type']} (rid {msg['rid']})")
        try:
            self.sync(max(timeout_s, RECOVER_S))
        except RequestTimeout:
            raise RequestTimeout(f"no reply to {msg['type']} (rid {msg['rid']}) and no "
                                 f"replay to tell its outcome") from None
        if self._resolved is not None:
            return self._resolved
        raise RequestLost(f"{msg['type']} (rid {msg['rid']}) was never sequenced: no reply, "
                          f"and nothing of it in the replayed reports")

    def sync(self, timeout_s: float | None = None) -> int:
        """Replay from the last report delivered until the stream is whole (or, for a stream
        not started yet, learn where it ends); returns last_account_seq."""
        stream = self._stream
        stream.need_replay = True
        stream.replay_rid = None
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while stream.need_replay or stream.replay_rid is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout("the replay did not finish")
            self._pump(max(int(left * 1000), 1))
        return stream.last

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        before = len(self._queue)
        while True:
            left = deadline - time.monotonic()
            self._pump(max(int(left * 1000), 0))      # reads everything that has arrived
            if len(self._queue) > before or left <= 0:
                return

    def reports(self, timeout_s: float = 0.0) -> list[dict]:
        """Every queued report (after reading what has arrived, waiting up to timeout_s for
        the first if none is queued); the queue is emptied."""
        self._drain(0 if self._queue else timeout_s)
        out = list(self._queue)
        self._queue.clear()
        return out

    def typed_reports(self, timeout_s: float = 0.0) -> list[Report]:
        """reports() as typed objects (Fill, Canceled, ...)."""
        return [typed(m) for m in self.reports(timeout_s)]

    def wait_for(self, pred, timeout_s: float | None = None) -> dict:
        """The first queued (or arriving) report matching pred; it is removed from the queue."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            for i, m in enumerate(self._queue):
                if pred(m):
                    del self._queue[i]
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout("no matching report")
            self._pump(max(int(left * 1000), 1))


class AsyncClient(_Connection, _Requests):
    """The same requests as coroutines, on zmq.asyncio; reports go to `reports()`/on_report,
    in account_seq order, replayed after reconnections and gaps like Client's."""

    def __init__(self, ctx, endpoints: dict, certificate, *, on_report=None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, own_ctx: bool = False,
                 from_account_seq: int | None = None):
        self.ctx = ctx
        self.own_ctx = own_ctx
        self.endpoints = endpoints
        self.certificate = str(certificate)
        self.public, self.secret = load_client_certificate(self.certificate)
        self.on_report = on_report
        self.timeout_s = timeout_s
        self._rids = itertools.count(1)
        self._cids = itertools.count(_first_cid())
        self._pending: dict[int, tuple[dict, asyncio.Future]] = {}
        self._queue: deque = deque()
        self._handlers: dict = {}
        self._stream = _ReportStream(from_account_seq)
        self._synced = asyncio.Event()
        self._arrived = asyncio.Event()
        self._tasks: list = []
        self.socket = None
        self.monitor = None

    @classmethod
    async def connect(cls, endpoints, certificate, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                      connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, on_report=None,
                      cancel_on_disconnect=False, ctx=None,
                      from_account_seq: int | None = None) -> AsyncClient:
        """As Client.connect (same errors, same deadlines)."""
        endpoints = load_endpoints(endpoints)
        load_client_certificate(certificate)       # before any socket or context
        own = ctx is None
        c = cls(ctx or zmq.asyncio.Context(), endpoints, certificate,
                on_report=on_report, timeout_s=timeout_s, own_ctx=own,
                from_account_seq=from_account_seq)
        try:
            deadline = time.monotonic() + connect_timeout_s
            refused_since = None
            while True:
                attempt = min(HANDSHAKE_ATTEMPT_S, max(deadline - time.monotonic(), 0.05))
                outcome = await c._open(attempt)
                if outcome == "ok":
                    try:
                        await c.ping(timeout_s=max(deadline - time.monotonic(), attempt))
                        break
                    except RequestTimeout:
                        raise ConnectTimeout(_silent_message(endpoints,
                                                             connect_timeout_s)) from None
                now = time.monotonic()
                if outcome in ("refused", "failed"):
                    refused_since = refused_since or now
                    if now - refused_since >= UNKNOWN_KEY_GRACE_S:
                        raise _failed_handshake_error(outcome, endpoints, c.certificate,
                                                      now - refused_since)
                    await asyncio.sleep(0.05)
                elif now >= deadline:
                    raise ConnectTimeout(_silent_message(endpoints, connect_timeout_s))
            await c.sync()
            if cancel_on_disconnect:
                await c.hello(True)
        except BaseException:
            await c.close()
            raise
        return c

    async def _open(self, handshake_s: float) -> str:
        """A fresh socket with its monitor, and their tasks; the handshake's outcome (see
        Client._await_handshake)."""
        self._stop_tasks()
        self._close_sockets()
        self.socket, self.monitor = _make_socket(self.ctx, self.endpoints, self.public,
                                                 self.secret)
        deadline = time.monotonic() + handshake_s
        outcome = "silent"
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await self.monitor.poll(max(int(left * 1000), 1)):
                break
            event = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            if event & _HANDSHAKE_EVENTS:
                outcome = _handshake_outcome(event)
                break
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reader(self.socket)),
                       loop.create_task(self._watch(self.monitor))]
        return outcome

    def _stop_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks = []


    async def _reader(self, sock) -> None:
        stream = self._stream
        while True:
            msg = _unpack(await sock.recv())
            rid = msg.get("rid")
            pending = self._pending.pop(rid, None) if rid is not None else None
            if pending is not None:
                for m in stream.accept(msg, as_reply=True):
                    self._report(m)
                if not pending[1].done():
                    pending[1].set_result(msg)
                continue
            for m in stream.on_message(msg):
                self._report(m)
            self._arrived.set()
            await self._resume()

    async def _watch(self, monitor) -> None:
        while True:
            event = await zmq.utils.monitor.recv_monitor_message(monitor)
            if self._stream.on_connection_event(event["event"]):
                await self._resume()

    async def _resume(self) -> None:
        """hello again on a new connection, then the replay due (Client._resume)."""
        stream = self._stream
        for m in stream.resume(self._rids):
            await self.socket.send(_pack(m))
        if not stream.need_replay and stream.replay_rid is None:
            self._synced.set()

    def _resolve(self, msg: dict) -> None:
        for rid, (request, fut) in list(self._pending.items()):
            if not fut.done() and is_outcome(request, msg):
                del self._pending[rid]
                fut.set_result(msg)
                return

    async def sync(self, timeout_s: float | None = None) -> int:
        """Replay until the report stream is whole (see Client.sync)."""
        stream = self._stream
        stream.need_replay = True
        stream.replay_rid = None
        self._synced.clear()
        await self._resume()
        try:
            await asyncio.wait_for(self._synced.wait(),
                                   self.timeout_s if timeout_s is None else timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout("the replay did not finish") from None
        return stream.last

    async def request(self, msg: dict, timeout_s: float | None = None) -> dict:
        rid = next(self._rids)
        msg["rid"] = rid
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = (msg, fut)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            await self.socket.send(_pack(msg))
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            if msg["type"] not in SEQUENCED:
                raise RequestTimeout(f"no reply to {msg['type']} (rid {rid})") from None
            await self.sync(max(timeout_s, RECOVER_S))   # a replayed report resolves fut
            if fut.done():
                return fut.result()
            raise RequestLost(f"{msg['type']} (rid {rid}) was never sequenced: no reply, "
                              f"and nothing of it in the replayed reports") from None
        finally:
            self._pending.pop(rid, None)

    async def reports(self, timeout_s: float = 0.0) -> list[dict]:
        if not self._queue and timeout_s > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        out = list(self._queue)
        self._queue.clear()
        return out

    async def close(self) -> None:
        self._stop_tasks()
        _Connection.close(self)


# ---- typed reports ----------------------------------------------------------------------------
# The wire's maps as frozen dataclasses: `typed(msg)`. Decimal strings become Decimal; fields a
# message lacks are None; every object keeps the map it came from in `raw` (so new fields are
# never lost). The dict API stays the primary one: requests return, and reports() yields, maps.
def _dec(v):
    return None if v is None else Decimal(v)


@dataclass(frozen=True)
class Report:
    """Base of every typed message: `type`, `rid` (replies only), `account_seq` (reports
    addressed to an account, once the gateway sends it), and the raw map."""
    type: str
    rid: int | None
    account_seq: int | None
    raw: dict = field(repr=False, compare=False)


@dataclass(frozen=True)
class Ack(Report):
    cid: int | None
    oid: int | None
    status: str | None


@dataclass(frozen=True)
class Reject(Report):
    cid: int | None
    reason: str | None
    message: str | None


@dataclass(frozen=True)
class Fill(Report):
    cid: int | None
    oid: int | None
    trade_id: int | None
    market: str | None
    side: str | None
    price: Decimal | None
    qty: Decimal | None
    remaining: Decimal | None
    fee: Decimal | None
    liquidity: str | None


@dataclass(frozen=True)
class Canceled(Report):
    cid: int | None
    oid: int | None
    reason: str | None


@dataclass(frozen=True)
class Amended(Report):
    cid: int | None
    oid: int | None
    price: Decimal | None
    qty: Decimal | None


@dataclass(frozen=True)
class Triggered(Report):
    cid: int | None
    oid: int | None


@dataclass(frozen=True)
class Funding(Report):
    market: str | None
    rate: Decimal | None
    payment: Decimal | None


@dataclass(frozen=True)
class Liquidation(Report):
    market: str | None
    qty: Decimal | None
    price: Decimal | None
    kind: str | None
    fee: Decimal | None


@dataclass(frozen=True)
class Position:
    market: str
    size: Decimal
    entry_price: Decimal | None
    mark_price: Decimal | None
    unrealized_pnl: Decimal | None
    liquidation_price: Decimal | None
    mode: str | None
    leverage: int | None


@dataclass(frozen=True)
class AccountState(Report):
    balance: Decimal | None
    equity: Decimal | None
    available: Decimal | None
    maintenance_margin: Decimal | None
    positions: tuple[Position, ...]


@dataclass(frozen=True)
class OpenOrder:
    oid: int
    cid: int
    market: str
    side: str
    kind: str
    price: Decimal | None
    qty: Decimal
    remaining: Decimal
    status: str


@dataclass(frozen=True)
class OpenOrders(Report):
    orders: tuple[OpenOrder, ...]


@dataclass(frozen=True)
class Book(Report):
    market: str | None
    seq: int | None
    bids: tuple[tuple[Decimal, Decimal], ...]
    asks: tuple[tuple[Decimal, Decimal], ...]


@dataclass(frozen=True)
class Done(Report):
    pass


@dataclass(frozen=True)
class Pong(Report):
    pass


@dataclass(frozen=True)
class Other(Report):
    """A message type this library does not know (yet): see `raw`."""


_DECIMAL_FIELDS = {"price", "qty", "remaining", "fee", "rate", "payment", "balance", "equity",
                   "available", "maintenance_margin", "entry_price", "mark_price",
                   "unrealized_pnl", "liquidation_price", "size"}


def _fields_of(cls, msg: dict) -> dict:
    out = {}
    for f in fields(cls):
        if f.name in ("type", "rid", "account_seq", "raw"):
            continue
        v = msg.get(f.name)
        out[f.name] = _dec(v) if f.name in _DECIMAL_FIELDS and isinstance(v, str) else v
    return out


_TYPED = {"ack": Ack, "reject": Reject, "fill": Fill, "canceled": Canceled,
          "amended": Amended, "triggered": Triggered, "funding": Funding,
          "liquidation": Liquidation, "done": Done, "pong": Pong}


def typed(msg: dict) -> Report:
    """The typed object of a wire message (reply or report); Other for an unknown type."""
    kind = msg.get("type")
    head = {"type": kind, "rid": msg.get("rid"), "account_seq": msg.get("account_seq"),
            "raw": msg}
    if kind == "account_state":
        body = _fields_of(AccountState, {k: v for k, v in msg.items() if k != "positions"})
        body["positions"] = tuple(Position(**_fields_of(Position, p))
                                  for p in msg.get("positions", ()))
        return AccountState(**head, **body)
    if kind == "open_orders":
        return OpenOrders(**head, orders=tuple(OpenOrder(**_fields_of(OpenOrder, o))
                                               for o in msg.get("orders", ())))
    if kind == "book":
        def side(levels):
            return tuple((Decimal(p), Decimal(q)) for p, q in levels)
        return Book(**head, market=msg.get("market"), seq=msg.get("seq"),
                    bids=side(msg.get("bids", ())), asks=side(msg.get("asks", ())))
    cls = _TYPED.get(kind, Other)
    return cls(**head, **_fields_of(cls, msg))


# ---- market data ----------------------------------------------------------------------------
class LocalBook:
    """One market's book: price string -> qty string per side, and the seq it is at."""

    def __init__(self, market: str):
        self.market = market
        self.seq = -1
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.synced = False

    def load(self, snapshot: dict) -> None:
        self.seq = snapshot["seq"]
        self.bids = {p: q for p, q in snapshot["bids"]}
        self.asks = {p: q for p, q in snapshot["asks"]}
        self.synced = True

    def apply(self, delta: dict) -> bool:
        if delta["seq"] <= self.seq:
            return False
        for side, levels in ((self.bids, delta.get("bids", ())), (self.asks,
                                                                   delta.get("asks", ()))):
            for p, q in levels:
                if Decimal(q) == 0:
                    side.pop(p, None)
                else:
                    side[p] = q
        self.seq = delta["seq"]
        return True

    def levels(self, depth: int = 0) -> tuple[list, list]:
        bids = sorted(self.bids.items(), key=lambda kv: Decimal(kv[0]), reverse=True)
        asks = sorted(self.asks.items(), key=lambda kv: Decimal(kv[0]))
        if depth:
            bids, asks = bids[:depth], asks[:depth]
        return [list(x) for x in bids], [list(x) for x in asks]

    def best(self) -> tuple[str | None, str | None]:
        bid = max(self.bids, key=Decimal) if self.bids else None
        ask = min(self.asks, key=Decimal) if self.asks else None
        return bid, ask

    def as_dict(self, depth: int = 0) -> dict:
        bids, asks = self.levels(depth)
        return {"market": self.market, "seq": self.seq, "bids": bids, "asks": asks}


class MarketData(_Connection):
    """A SUB socket on `market_data`, keeping a local book per market.

    On connect it subscribes to `book.MARKET` (plus `trade.`, `mark.`, `funding.` and
    `liquidation.MARKET`), lets the subscription settle, then takes a `book` snapshot per market
    over `snapshot_client` (a Client); deltas with a higher seq are applied by `poll()`. Without
    a snapshot client the books start empty (fine for a market that is empty). Trades and marks
    update `last_price`, `mark` and `mark_info` (the whole `mark.MARKET` message: index,
    funding_rate, next_funding_ts) and are passed to `on_trade(market, msg)` /
    `on_mark(market, msg)`; funding rates and liquidations go to `on_funding(market, msg)` /
    `on_liquidation(market, msg)`, the last funding message per market to `funding`.
    """

    def __init__(self, ctx, endpoints: dict, markets, *, on_trade=None, on_mark=None,
                 on_funding=None, on_liquidation=None, own_ctx: bool = False):
        self.ctx = ctx
        self.own_ctx = own_ctx
        self.endpoints = endpoints
        self.books = {m: LocalBook(m) for m in markets}
        self.last_price: dict[str, str] = {}
        self.mark: dict[str, str] = {}
        self.mark_info: dict[str, dict] = {}
        self.funding: dict[str, dict] = {}
        self.trades = 0
        self.on_trade, self.on_mark = on_trade, on_mark
        self.on_funding, self.on_liquidation = on_funding, on_liquidation
        self.socket = ctx.socket(zmq.SUB)
        self.socket.linger = 0
        self.socket.rcvhwm = 100_000
        for m in markets:
            for kind in ("book", "trade", "mark", "funding", "liquidation"):
                self.socket.setsockopt(zmq.SUBSCRIBE, f"{kind}.{m}".encode())
        self.socket.connect(endpoints["market_data"])

    @classmethod
    def connect(cls, endpoints, markets, *, snapshot_client: Client | None = None,
                settle_s: float = 0.3, ctx=None, **kw) -> MarketData:
        own = ctx is None
        md = cls(ctx or zmq.Context(), load_endpoints(endpoints), list(markets), own_ctx=own,
                 **kw)
        time.sleep(settle_s)            # the subscription reaches the publisher (slow joiner)
        if snapshot_client is not None:
            md.poll(0)
            for m in md.books:
                md.resync(m, snapshot_client)
        return md

    def resync(self, market: str, client: Client) -> None:
        snap = client.book(market, 0)
        if snap.get("type") != "book":
            raise ClientError(f"book snapshot of {market}: {snap}")
        book = self.books[market]
        if snap["seq"] >= book.seq or not book.synced:
            book.load(snap)

    def poll(self, timeout_s: float = 0.0, max_messages: int = 10_000) -> int:
        """Read and apply what has arrived (waiting up to timeout_s for the first)."""
        n = 0
        wait_ms = int(timeout_s * 1000)
        while n < max_messages and self.socket.poll(wait_ms if n == 0 else 0):
            topic, payload = self.socket.recv_multipart()
            kind, _, market = topic.decode().partition(".")
            msg = _unpack(payload)
            n += 1
            if kind == "book":
                self.books[market].apply(msg)
            elif kind == "trade":
                self.trades += 1
                self.last_price[market] = msg["price"]
                if self.on_trade is not None:
                    self.on_trade(market, msg)
            elif kind == "mark":
                self.mark[market] = msg.get("mark")
                self.mark_info[market] = msg
                if self.on_mark is not None:
                    self.on_mark(market, msg)
            elif kind == "funding":
                self.funding[market] = msg
                if self.on_funding is not None:
                    self.on_funding(market, msg)
            elif kind == "liquidation":
                if self.on_liquidation is not None:
                    self.on_liquidation(market, msg)
        return n

    def book(self, market: str, depth: int = 0) -> dict:
        return self.books[market].as_dict(depth)

