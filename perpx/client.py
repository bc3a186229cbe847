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

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 15.0
HANDSHAKE_ATTEMPT_S = 1.0
# A refused handshake is retried this long before UnknownKey: a key registered a moment ago
# gets in once the gateway re-scans its registry (every 0.2 s at most, gateway/accounts.py).
UNKNOWN_KEY_GRACE_S = 1.0
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


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

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
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
        msg = {"type": "cancel_all"}
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
        return self.request({"type": "hello", "cancel_on_disconnect": cancel_on_disconnect},
                            timeout_s)

    def withdraw(self, amount, timeout_s=None):
        return self.request({"type": "withdraw", "amount": _decimal_text(amount, "amount")},
                            timeout_s)

    def set_margin(self, market: str, mode: str, leverage: int, timeout_s=None):
        """Margin mode ("cross"/"isolated") and leverage of one market: `done` or `reject`."""
        return self.request({"type": "set_margin", "market": market, "mode": mode,
                             "leverage": leverage}, timeout_s)

    def on(self, report_type: str, handler) -> None:
        """Call handler(msg) for every report of this type (after queueing it)."""
        self._handlers.setdefault(report_type, []).append(handler)

    def _report(self, msg: dict) -> None:
        self._queue.append(msg)
        if self.on_report is not None:
            self.on_report(msg)
        for handler in self._handlers.get(msg.get("type"), ()):
            handler(msg)


def _make_socket(ctx, endpoints: dict, public: bytes, secret: bytes):
    """(DEALER with the client's CURVE keys, connected; PAIR socket receiving its handshake
    outcome, attached before the connect so that no outcome is missed). Both linger 0; both
    closed again if any step fails. The caller closes the monitor once it has the outcome."""
    s = ctx.socket(zmq.DEALER)
    mon = None
    try:
        s.linger = 0
        s.curve_publickey, s.curve_secretkey = public, secret
        s.curve_serverkey = endpoints["server_public_key"].encode()
        mon = s.get_monitor_socket(_HANDSHAKE_EVENTS)
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
                 timeout_s: float = DEFAULT_TIMEOUT_S, own_ctx: bool = False):
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
        self.socket = None

    @classmethod
    def connect(cls, endpoints, certificate, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, on_report=None,
                cancel_on_disconnect=False, ctx: zmq.Context | None = None) -> Client:
        """Load the certificate, connect, handshake and ping.

        Raises a CertificateError at once for an unusable certificate, UnknownKey within
        about UNKNOWN_KEY_GRACE_S when the gateway refuses the key (HandshakeFailed when the
        handshake fails otherwise: a wrong server key), ConnectTimeout when nothing answers
        within connect_timeout_s; nothing stays open after a failure."""
        endpoints = load_endpoints(endpoints)
        load_client_certificate(certificate)       # before any socket or context
        own = ctx is None
        c = cls(ctx or zmq.Context(), endpoints, certificate, on_report=on_report,
                timeout_s=timeout_s, own_ctx=own)
        try:
            c._handshake(connect_timeout_s)
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
            if self.socket is not None:
                self.socket.close(0)
                self.socket = None
            self.socket, mon = _make_socket(self.ctx, self.endpoints, self.public, self.secret)
            attempt = min(HANDSHAKE_ATTEMPT_S, max(deadline - time.monotonic(), 0.05))
            outcome = self._await_handshake(mon, attempt)
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

    def _await_handshake(self, mon, timeout_s: float) -> str:
        """'ok', 'refused', 'failed' or 'silent' (nothing within timeout_s) for the current
        socket."""
        try:
            if mon.poll(max(int(timeout_s * 1000), 1)):
                return _handshake_outcome(recv_monitor_message(mon)["event"])
            return "silent"
        finally:
            self.socket.disable_monitor()
            mon.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- I/O -------------------------------------------------------------------------------
    def request(self, msg: dict, timeout_s: float | None = None) -> dict:
        rid = self.last_rid = next(self._rids)
        msg["rid"] = rid
        self.socket.send(_pack(msg))
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(max(int(left * 1000), 1)):
                if time.monotonic() >= deadline:
                    raise RequestTimeout(f"no reply to {msg['type']} (rid {rid})")
                continue
            reply = _unpack(self.socket.recv())
            if reply.get("rid") == rid:
                return reply
            self._report(reply)

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if not self.socket.poll(max(int(left * 1000), 0)):
                return
            self._report(_unpack(self.socket.recv()))
            timeout_s = 0
            deadline = time.monotonic()

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
            if self.socket.poll(max(int(left * 1000), 1)):
                self._report(_unpack(self.socket.recv()))


class AsyncClient(_Requests):
    """The same requests as coroutines, on zmq.asyncio; reports go to `reports()`/on_report."""

    def __init__(self, ctx, endpoints: dict, certificate, *, on_report=None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, own_ctx: bool = False):
        self.ctx = ctx
        self.own_ctx = own_ctx
        self.endpoints = endpoints
        self.certificate = str(certificate)
        self.public, self.secret = load_client_certificate(self.certificate)
        self.on_report = on_report
        self.timeout_s = timeout_s
        self._rids = itertools.count(1)
        self._cids = itertools.count(_first_cid())
        self._pending: dict[int, asyncio.Future] = {}
        self._queue: deque = deque()
        self._handlers: dict = {}
        self._arrived = asyncio.Event()
        self._task = None
        self.socket = None

    @classmethod
    async def connect(cls, endpoints, certificate, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                      connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, on_report=None,
                      cancel_on_disconnect=False, ctx=None) -> AsyncClient:
        """As Client.connect (same errors, same deadlines)."""
        endpoints = load_endpoints(endpoints)
        load_client_certificate(certificate)       # before any socket or context
        own = ctx is None
        c = cls(ctx or zmq.asyncio.Context(), endpoints, certificate,
                on_report=on_report, timeout_s=timeout_s, own_ctx=own)
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
            if cancel_on_disconnect:
                await c.hello(True)
        except BaseException:
            await c.close()
            raise
        return c

    async def _open(self, handshake_s: float) -> str:
        """A fresh socket and reader; its handshake outcome (see Client._await_handshake)."""
        self._stop_reader()
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        self.socket, mon = _make_socket(self.ctx, self.endpoints, self.public, self.secret)
        try:
            if await mon.poll(max(int(handshake_s * 1000), 1)):
                outcome = _handshake_outcome(
                    parse_monitor_message(await mon.recv_multipart())["event"])
            else:
                outcome = "silent"
        finally:
            self.socket.disable_monitor()
            mon.close(0)
        self._task = asyncio.get_running_loop().create_task(self._reader(self.socket))
        return outcome

    def _stop_reader(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _reader(self, sock) -> None:
        while True:
            msg = _unpack(await sock.recv())
            fut = self._pending.pop(msg.get("rid"), None) if "rid" in msg else None
            if fut is not None and not fut.done():
                fut.set_result(msg)
                continue
            self._report(msg)
            self._arrived.set()

    async def request(self, msg: dict, timeout_s: float | None = None) -> dict:
        rid = next(self._rids)
        msg["rid"] = rid
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.socket.send(_pack(msg))
            return await asyncio.wait_for(fut, self.timeout_s if timeout_s is None
                                          else timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no reply to {msg['type']} (rid {rid})") from None
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
        self._stop_reader()
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

