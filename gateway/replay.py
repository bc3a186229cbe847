"""The report stream per account: numbering, rendering, and `replay` (PROTOCOL.md, "Report
sequence and replay").

Numbering. engine/reports.py decides which events are reports to which account, and the
matcher keeps each account's last `account_seq` in its state. The gateway copies those
counters with the rest of the state at its boot boundary and runs an AccountSeqTracker over
every later event (gateway/routing.py), so each report it renders carries the number the
matcher counted: the same from every gateway and after any restart.

Rendering. A report is a pure function of its command record, its event record, its position
after the command (`idx`) and its role (0: the event's own account, 1: a trade's maker):
`render_report`. The live path and both replay sources call it, so a replayed report is the
message that was sent live, field for field (without `rid`, which belongs to the connection).
What a reply once took from the gateway's pending table now rides in the command: whether the
request named a cid (FLAG_CID_GIVEN) and whether a cancel_all was a cancel-on-disconnect
(FLAG_ON_DISCONNECT).

Replay. `replay {from_account_seq}` answers the account's reports numbered above it, in order,
then `replayed {last_account_seq, more}`; `more: true` when it stopped early (at most
`max_reports` per request, MAX_REPLAY or fewer: an answer is at most a quarter of what a
connection may queue, `max_queued_bytes`, so that a client that reads is never dropped for
the replay it asked for): the client asks again from `last_account_seq`. Sources:
- memory (`ReportLog`): the last `keep` reports of every account, as (command, event) records,
  appended as the gateway numbers them; a replay it covers is answered at once, in the same
  pass (so before any later live report to that connection);
- the durable `reports` table persistd writes to DuckDB (keyed by (account, account_seq)),
  asked through persistd's SQL socket by a worker thread (`DurableSource`) so the gateway's
  loop never waits for it; rows not yet written (the store trails the journal by ~0.1 s) are
  asked for again until REPLAY_WAIT_S. Its answers are picked up by `Replayer.poll` on the
  next pass; live reports sent meanwhile may arrive before the replayed ones (the client
  orders by account_seq).
Both are bounded: memory holds at most `keep` reports for a bounded number of accounts
(ReportLog), an answer sends at most `max_reports` of them, and the one worker thread fetches
at most that many rows at a time, which the next pass sends (into the connection's counted
queue, gateway/memory.py).
In durable mode every report and the final `replayed` are held until journaled, like the
live messages (gateway/outbox.py).
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from collections import deque

import msgpack
import zmq

from engine.records import (CMD_CANCEL_ALL, CMD_NEW_ORDER, COMMAND_BYTES, EV_ACK, EV_AMENDED,
                            EV_CANCELED, EV_DONE, EV_FUNDING, EV_LIQUIDATION, EV_REJECT,
                            EV_TRADE, EV_TRIGGERED, EVENT_BYTES, FLAG_CID_GIVEN,
                            FLAG_ON_DISCONNECT, REASON_DISCONNECT, REASON_INVALID_MESSAGE,
                            REASON_NAMES, REASON_RATE_LIMITED, REASON_USER)
from engine.units import EdgeReject
from gateway import codec
from gateway.codec import (CM_CID, CM_CMD, CM_FLAGS, CM_OID, COMMAND_STRUCT, E_MARKET, ETYPE_OFFSET,
                           FUNDING_EVENT_STRUCT, LIQUIDATION_EVENT_STRUCT, OE_CID, OE_OID,
                           OE_QTY, OE_REASON, ORDER_EVENT_STRUCT, TRADE_EVENT_STRUCT, pack)
from gateway.memory import ENTRY_BYTES

log = logging.getLogger("perpx.gateway")

MAX_REPLAY = 5000            # reports per `replay` answer; `more` says there are others
REPORT_BYTES = 400           # a report on the wire with libzmq's cost per message, at most
REPLAY_WAIT_S = 10.0         # how long the durable source may trail before a partial answer
DURABLE_TIMEOUT_S = 5.0      # one SQL request to persistd
MAX_DURABLE_JOBS = 64        # replays waiting for the durable source, per gateway
DEFAULT_KEEP = 512           # reports kept in memory per account
# persistd's `reports` table holds the command and event records as int64 words c0.., e0..
RECORD_STRUCT = struct.Struct(f"<{(COMMAND_BYTES + EVENT_BYTES) // 8}q")
RECORD_WORDS = ", ".join([f"c{i}" for i in range(COMMAND_BYTES // 8)]
                         + [f"e{i}" for i in range(EVENT_BYTES // 8)])
_DISCONNECT = REASON_NAMES[REASON_DISCONNECT]
_STRUCTS = {EV_TRADE: TRADE_EVENT_STRUCT, EV_FUNDING: FUNDING_EVENT_STRUCT,
            EV_LIQUIDATION: LIQUIDATION_EVENT_STRUCT}


# -- rendering -----------------------------------------------------------------------------------
def unpack_event(event: bytes):
    """(etype, the event's struct tuple) of a 128-byte event record."""
    etype = event[ETYPE_OFFSET]
    return etype, _STRUCTS.get(etype, ORDER_EVENT_STRUCT).unpack_from(event)


def render_report(etype: int, ev: tuple, role: int, idx: int, cmd: tuple, account_seq: int,
                  market_by_id) -> dict:
    """The report message of one numbered event (see the module docstring)."""
    if etype == EV_REJECT:
        if idx > 1:     # a fired stop/take-profit refused at trigger time: to its owner
            msg = codec.engine_reject_message(ev, ev[OE_CID])
            msg["oid"] = ev[OE_OID]
        else:
            given = cmd[CM_CMD] == CMD_NEW_ORDER or cmd[CM_FLAGS] & FLAG_CID_GIVEN
            msg = codec.engine_reject_message(ev, ev[OE_CID] if given else None)
            if cmd[CM_OID]:
                msg["oid"] = cmd[CM_OID]
    elif etype == EV_DONE:
        code = cmd[CM_CMD]
        msg = codec.done_message(ev, ev[OE_QTY] if code == CMD_CANCEL_ALL else None)
        if cmd[CM_FLAGS] & FLAG_CID_GIVEN:
            msg["cid"] = cmd[CM_CID]
    else:
        m = ev[E_MARKET]
        market = market_by_id[m] if 0 <= m < len(market_by_id) else None
        if market is None:     # a market this gateway has no table for: ids only
            msg = {"type": _TYPE_NAMES[etype], "market": None, "seq": ev[0], "ts": ev[1]}
        elif etype == EV_TRADE:
            msg = codec.fill_messages(ev, market)[role]
        elif etype == EV_ACK:
            msg = codec.ack_message(ev, market)
        elif etype == EV_CANCELED:
            reason = ev[OE_REASON]
            name = _DISCONNECT if (reason == REASON_USER and cmd[CM_CMD] == CMD_CANCEL_ALL
                                   and cmd[CM_FLAGS] & FLAG_ON_DISCONNECT) \
                else REASON_NAMES.get(reason)
            msg = codec.canceled_message(ev, market, name)
        elif etype == EV_AMENDED:
            msg = codec.amended_message(ev, market)
        elif etype == EV_TRIGGERED:
            msg = codec.triggered_message(ev, market)
        elif etype == EV_FUNDING:
            msg = codec.funding_message(ev, market)
        else:
            msg = codec.liquidation_message(ev, market)
    msg["account_seq"] = account_seq
    return msg


_TYPE_NAMES = {EV_TRADE: "fill", EV_ACK: "ack", EV_CANCELED: "canceled", EV_AMENDED: "amended",
               EV_TRIGGERED: "triggered", EV_FUNDING: "funding", EV_LIQUIDATION: "liquidation"}


def render_record(record: bytes, role: int, idx: int, account_seq: int, market_by_id) -> dict:
    """A report kept as its command record followed by its event record (192 bytes)."""
    cmd = COMMAND_STRUCT.unpack_from(record)
    etype, ev = unpack_event(record[COMMAND_BYTES:])
    return render_report(etype, ev, role, idx, cmd, account_seq, market_by_id)


# -- memory --------------------------------------------------------------------------------------
class ReportLog:
    """The last `keep` reports of each account: (account_seq, seq, idx, role, record), for at
    most `max_bytes` // (keep x ENTRY_BYTES) accounts: one more forgets the account whose log
    was made first (its replays then come from the durable store), so what is kept stays
    bounded however many accounts trade (gateway/memory.py)."""

    def __init__(self, keep: int = DEFAULT_KEEP, max_bytes: int = 1 << 62):
        self.keep = keep
        self.max_accounts = max(1, max_bytes // (keep * ENTRY_BYTES))
        self.by_account: dict[int, deque] = {}
        # reports kept, over all accounts: the memory checks read it per session and per
        # tick, where a sum over a thousand logs took ~50 µs each time
        self.entries = 0

    def append(self, account: int, account_seq: int, seq: int, idx: int, role: int,
               record: bytes) -> None:
        log_ = self.by_account.get(account)
        if log_ is None:
            if len(self.by_account) >= self.max_accounts:
                self.entries -= len(self.by_account.pop(next(iter(self.by_account))))
            log_ = self.by_account[account] = deque(maxlen=self.keep)
        if len(log_) < self.keep:
            self.entries += 1            # a full log drops its oldest for this one
        log_.append((account_seq, seq, idx, role, record))

    def bytes(self) -> int:
        """What the kept reports take, as counted."""
        return ENTRY_BYTES * self.entries

    def oldest(self, account: int):
        """The oldest kept account_seq of the account, or None."""
        log_ = self.by_account.get(account)
        return log_[0][0] if log_ else None

    def after(self, account: int, from_seq: int, last: int):
        """The kept reports numbered in (from_seq, last], or None when memory no longer
        holds all of them (the oldest kept is above from_seq + 1)."""
        log_ = self.by_account.get(account)
        if not log_:
            return [] if from_seq >= last else None
        if log_[0][0] > from_seq + 1:
            return None
        start = max(0, from_seq + 1 - log_[0][0])
        return [log_[k] for k in range(start, len(log_)) if log_[k][0] <= last]


# -- the durable source --------------------------------------------------------------------------
class DurableSource:
    """A worker thread that asks persistd (its SQL socket, a ZeroMQ REQ/REP of msgpack maps
    `{"sql": ...}` -> `{"columns", "rows", "store_seq"}` or `{"error"}`) for `reports` rows.
    Jobs go in with `ask`; finished ones come out of `done` (a deque the loop polls), and
    `wake()` is called after each: the gateway may be asleep in its poll, which nothing else
    would end before its timeout (its doorbell's ring: a load while it is awake)."""

    def __init__(self, endpoint: str, ctx: zmq.Context, wake=lambda: None):
        self.endpoint = endpoint
        self.ctx = ctx
        self.wake = wake
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.done: deque = deque()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay", daemon=True)
        self._thread.start()

    def ask(self, job: dict) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self._closing.set()
        self.jobs.put(None)
        self._thread.join(timeout=2 * DURABLE_TIMEOUT_S)

    def _socket(self):
        sock = self.ctx.socket(zmq.REQ)
        sock.linger = 0
        sock.connect(self.endpoint)
        return sock

    def _run(self) -> None:
        sock = self._socket()
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                sock = self._fetch(sock, job)
                self.done.append(job)
                if not self._closing.is_set():     # the gateway's doorbell may be closing
                    self.wake()
        finally:
            sock.close(0)

    def _fetch(self, sock, job: dict):
        """job["rows"]: [(account_seq, seq, idx, role, record)] in (from, upto], as many as
        the store has from from+1 on (fewer when it trails), or job["error"]."""
        lo, hi = job["from"], min(job["upto"], job["from"] + job["max"])
        sql = (f"SELECT account_seq, seq, idx, role, {RECORD_WORDS} FROM reports "
               f"WHERE account = {int(job['account'])} AND account_seq > {int(lo)} "
               f"AND account_seq <= {int(hi)} ORDER BY account_seq")
        deadline = time.monotonic() + REPLAY_WAIT_S
        while True:
            try:
                sock.send(msgpack.packb({"sql": sql}))
                if not sock.poll(int(DURABLE_TIMEOUT_S * 1000)):
                    raise TimeoutError("persistd did not answer")
                answer = msgpack.unpackb(sock.recv(), raw=False)
            except (zmq.ZMQError, TimeoutError) as e:
                sock.close(0)         # a REQ socket that lost its answer cannot send again
                sock = self._socket()
                answer = {"error": str(e)}
            rows = answer.get("rows") or []
            if rows and rows[0][0] == lo + 1:
                job["rows"] = [(r[0], r[1], r[2], r[3], RECORD_STRUCT.pack(*r[4:]))
                               for r in rows]
                return sock
            if time.monotonic() >= deadline or self._closing.is_set():
                job["error"] = answer.get("error") or "the durable store does not hold them yet"
                return sock
            self._closing.wait(0.05)


# -- the request ---------------------------------------------------------------------------------
class Replayer:
    def __init__(self, *, tracker, log: ReportLog, outbox, sessions, mirror, market_by_id,
                 durable: bool, source: DurableSource | None, max_queued_bytes: int):
        self.tracker = tracker
        self.log = log
        self.outbox = outbox
        self.sessions = sessions
        self.mirror = mirror
        self.market_by_id = market_by_id
        self.durable = durable
        self.source = source
        self.asked = 0               # durable replays asked and not yet answered
        self.max_reports = max(1, min(MAX_REPLAY, max_queued_bytes // (4 * REPORT_BYTES)))

    def handle(self, s, msg, rid, now) -> None:
        """`replay` {from_account_seq}: the hook gateway/requests.py dispatches to."""
        from_seq = msg.get("from_account_seq", 0)
        if type(from_seq) is not int or from_seq < 0:
            raise EdgeReject(REASON_INVALID_MESSAGE,
                             "from_account_seq must be a non-negative integer")
        account = s.account
        last = self.tracker.last(account)
        from_seq = min(from_seq, last)
        kept = self.log.after(account, from_seq, last)
        if kept is not None:
            self._send(s, account, kept, from_seq, last, rid)
            return
        if self.source is None:
            raise EdgeReject(REASON_INVALID_MESSAGE, "reports that old are no longer held "
                             "and this gateway has no durable source")
        if self.asked >= MAX_DURABLE_JOBS:
            raise EdgeReject(REASON_RATE_LIMITED, "too many replays from the durable store "
                             "in progress; ask again")
        oldest = self.log.oldest(account)
        upto = oldest - 1 if oldest is not None else last
        self.asked += 1
        self.source.ask({"account": account, "from": from_seq, "upto": upto,
                         "max": self.max_reports, "session": s, "rid": rid})

    def poll(self) -> int:
        """Answer the replays whose durable rows have come back; returns how many."""
        done = self.source.done if self.source is not None else None
        n = 0
        while done:
            job = done.popleft()
            n += 1
            self.asked -= 1
            s = job["session"]
            if not s.live:
                continue           # the connection is gone: its replay goes with it
            if "error" in job:
                log.warning("replay for account %d from %d: %s", job["account"], job["from"],
                            job["error"])
                self._replayed(s, job["from"], True, job["rid"])
                continue
            rows = job["rows"]
            self._send_rows(s, rows)
            sent = rows[-1][0]
            last = self.tracker.last(s.account)
            kept = self.log.after(s.account, sent, last) if sent == job["upto"] else None
            if kept is None:
                self._replayed(s, sent, True, job["rid"])
            else:
                self._send(s, s.account, kept, sent, last, job["rid"])
        return n

    def _send(self, session, account, kept, from_seq, last, rid) -> None:
        more = len(kept) > self.max_reports
        kept = kept[:self.max_reports]
        self._send_rows(session, kept)
        self._replayed(session, kept[-1][0] if kept else from_seq, more, rid,
                       self.mirror.applied_seq if self.durable else 0)

    def _send_rows(self, session, rows) -> None:
        send = self.outbox.send
        market_by_id = self.market_by_id
        for account_seq, seq, idx, role, record in rows:
            send(session, pack(render_record(record, role, idx, account_seq, market_by_id)),
                 seq)

    def _replayed(self, session, last: int, more: bool, rid, seq: int = 0) -> None:
        self.outbox.reply(session, {"type": "replayed", "last_account_seq": last,
                                     "more": more, "ts": time.time_ns()}, rid, seq)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
