"""Events in, messages out: drain the event ring, keep the mirror exact, and route each event.

Requests carry a `req` token (int32) that the matcher copies onto every event the command
causes, together with the ring it came from (`source`): an event is this gateway's reply only
if its source is this gateway's ring, its req is pending here and its account is the
requester's. Which events are replies: `ack`/`reject` for new_order, `canceled`/`reject` for
cancel, `amended`/`reject` for amend, `done`/`reject` for cancel_all, withdraw, set_margin.

Every report to an account (engine/reports.py says which events are: acks, fills, cancels,
amends, triggers, funding, liquidations, rejects and `done` of client commands) is numbered
with its `account_seq` (gateway/replay.py), kept for replay, and goes to every session of the
account on this gateway (the requester's copy carries `rid`, the others none): each session
sees the account's whole stream, without gaps. Nothing is ever sent to a session of another
account: events are addressed by the account field the matcher wrote, and sessions are keyed
by the authenticated account.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from engine.records import (CMD_AMEND, CMD_CANCEL, CMD_CANCEL_ALL, CMD_DEPOSIT, CMD_FUNDING,
                            CMD_LIQUIDATE, CMD_NEW_ORDER, CMD_SET_ACCOUNT_STATE, CMD_SET_MARGIN,
                            CMD_WITHDRAW, EV_BALANCE, EV_COMMAND, EV_DONE, EV_FUNDING,
                            EV_LIQUIDATION, EV_MARK, EV_REJECT, EV_TRADE, EVENT_BYTES,
                            REASON_ACCOUNT_DISABLED, REASON_NAMES)
from engine.reports import AccountSeqTracker
from gateway.codec import (CM_ACCOUNT, CM_CMD, CM_MARKET, CM_OID, CM_QTY, CM_TS,
                           COMMAND_IN_EVENT_OFFSET, COMMAND_STRUCT, E_ACCOUNT, E_MARKET, E_REQ,
                           E_SEQ, E_SOURCE, ETYPE_OFFSET, FUNDING_EVENT_STRUCT, HEADER_STRUCT,
                           LIQUIDATION_EVENT_STRUCT, MARK_EVENT_STRUCT, ORDER_EVENT_STRUCT,
                           TR_MAKER_ACCOUNT, TRADE_EVENT_STRUCT, pack)
from gateway.mirror import M_ACTIVE, M_ATPL, M_MAX_ORDER, M_MAX_PRICE
from gateway.replay import ReportLog, render_report
from gateway.requests import R_DISCONNECT, R_NEW_ORDER, REPLY_ETYPES

log = logging.getLogger("perpx.gateway")


# commands whose effects are their account's alone (a trade's maker is told by the trade);
# any other command may change every account's view (gateway/views.py)
ACCOUNT_COMMANDS = frozenset((CMD_NEW_ORDER, CMD_CANCEL, CMD_CANCEL_ALL, CMD_AMEND,
                              CMD_WITHDRAW, CMD_DEPOSIT, CMD_SET_MARGIN))


class EventRouter:
    def __init__(self, consumer, mirror, boot_seq: int, source_index: int, requests, sessions,
                 outbox, market_data, markets, market_by_id, event_batch: int, stats: dict,
                 views, account_seqs, report_log: ReportLog):
        """account_seqs: the accounts' account_seq column in the state copied at boot_seq."""
        self.consumer = consumer
        self.mirror = mirror
        self.boot_seq = boot_seq
        self.source_index = source_index
        self.pending = requests.pending
        self.pending_cids = requests.pending_cids
        self.sessions = sessions
        self.outbox = outbox
        self.market_data = market_data
        self.markets = markets
        self.market_by_id = market_by_id
        self.event_batch = event_batch
        self.stats = stats
        self.views = views
        stats.setdefault("events", 0)
        self._risk_command = None      # (seq, code, command) of the last FUNDING / LIQUIDATE
        self._disabling = None         # (seq, account) of a CMD_SET_ACCOUNT_STATE disabling
        self.tracker = AccountSeqTracker(account_seqs)
        self.report_log = report_log
        self.ack_latency = outbox.ack_latency   # told of every reply (gateway/outbox.py)
        self._cmd = None               # the command whose events are being routed ...
        self._cmd_record = b""         # ... and its 64-byte record (kept with its reports)

    # -- the ring -----------------------------------------------------------------------
    def drain(self) -> int:
        """Route one batch of published events (ending at a command boundary); returns how
        many."""
        head, tail, n = self.next_batch(self.event_batch)
        if not n:
            return 0
        for part in (head, tail):
            if len(part):
                self._process(memoryview(part.view(np.uint8)), len(part))
        self.batch_done(n)
        return n

    def batch_done(self, n: int) -> None:
        """After a batch of n events was routed (here, or by the compiled router: its loop
        calls this too): the ring's slots go back, the replies' send time is noted, market
        data publishes the batch's book deltas."""
        self.consumer.advance(n)
        self.stats["events"] += n
        self.outbox.sent_upto(self.mirror.applied_seq)
        if self.market_data is not None and self.mirror.any_dirty:
            self.market_data.book_deltas()

    def next_batch(self, max_n: int):
        """(head, tail, n): the next published events as the ring's two views, at most max_n
        unless one command has more, ending at a command boundary so that `applied_seq`
        never names half a command."""
        consumer = self.consumer
        available = consumer.available()
        if not available:
            return (), (), 0
        head, tail = consumer.peek_views(min(available, max_n))
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
        return head, tail, n

    def catch_up(self, seq: int) -> None:
        """Route everything up to `seq` (published by then)."""
        while self.mirror.applied_seq < seq and self.drain():
            pass

    @staticmethod
    def _command_boundary(head, tail) -> int:
        """Index of the last EV_COMMAND in head+tail (0 if the first is the only one)."""
        for part, base in ((tail, len(head)), (head, 0)):
            if len(part):
                idx = np.flatnonzero(part["etype"] == EV_COMMAND)
                if len(idx):
                    return base + int(idx[-1])
        return 0

    # -- one batch ----------------------------------------------------------------------
    def _process(self, mv: memoryview, count: int) -> None:
        mirror = self.mirror
        boot = self.boot_seq
        market_data = self.market_data
        number = self.tracker.on_event
        views = self.views
        versions = views.versions
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
                    self.tracker.on_command(cmd[CM_CMD])
                    self._cmd = cmd
                    self._cmd_record = bytes(mv[off + COMMAND_IN_EVENT_OFFSET:off + EVENT_BYTES])
                code = cmd[CM_CMD]
                if code in ACCOUNT_COMMANDS:
                    versions[cmd[CM_ACCOUNT]] = seq
                else:
                    views.bump_all(seq)
                self._command_state(seq, cmd)
                continue
            # Events of commands before the boot copy: the mirror has them and no session
            # existed yet; only market data is still published.
            if etype == EV_TRADE:
                tr = TRADE_EVENT_STRUCT.unpack_from(mv, off)
                versions[tr[TR_MAKER_ACCOUNT]] = versions[tr[E_ACCOUNT]] = tr[E_SEQ]
                if tr[E_SEQ] > boot:
                    mirror.on_trade(tr)
                    for role, (account, n) in enumerate(
                            number(EV_TRADE, tr[E_ACCOUNT], tr[TR_MAKER_ACCOUNT])):
                        self._report(account, n, role, EV_TRADE, tr, mv, off)
                if market_data is not None:
                    market = self._market(tr[E_MARKET])
                    if market is not None:
                        market_data.trade(tr, market)
                continue
            if etype == EV_MARK:
                ev = MARK_EVENT_STRUCT.unpack_from(mv, off)
                if ev[E_SEQ] > boot:
                    mirror.on_mark(ev)
                    number(EV_MARK, ev[E_ACCOUNT])
                if market_data is not None:
                    market_data.mark(ev)
                continue
            if etype >= EV_FUNDING or etype == EV_BALANCE:
                self._risk_event(etype, mv, off)
                continue
            ev = order_unpack(mv, off)
            versions[ev[E_ACCOUNT]] = ev[E_SEQ]
            self._order_event(etype, ev, mv, off, None)

    def _order_event(self, etype: int, ev: tuple, mv: memoryview, off: int, pairs) -> None:
        """An order event: the reply to one of our requests (if it is), the mirror, the
        reports. `pairs`: its report numbers when the compiled router numbered it and
        applied it to its own mirror (gateway/compiled_pass.py), else None."""
        seq, account, req = ev[E_SEQ], ev[E_ACCOUNT], ev[E_REQ]
        pending = self.pending
        # is it the reply to one of our requests?
        p = None
        if ev[E_SOURCE] == self.source_index and req:
            p = pending.get(req)
            if p is not None and (p[2] != account or (
                    p[3] != R_DISCONNECT and etype not in REPLY_ETYPES[p[3]])):
                p = None      # not the reply: a report that follows it (or not ours)
        requester = rid = None
        if p is None:
            if etype == EV_DONE and self._risk_command is not None:
                self._risk_command_done(ev)
            if etype == EV_DONE and self._disabling is not None and \
                    self._disabling[0] == seq:
                self._account_disabled(account)
        elif p[3] == R_DISCONNECT:    # nobody to reply to; the reports go to the others
            if etype == EV_DONE or etype == EV_REJECT:
                del pending[req]
        else:
            requester, rid = p[0], p[1]
            del pending[req]
            self.ack_latency.replied(seq, self._cmd[CM_TS])
            if p[3] == R_NEW_ORDER:
                key = (account, p[4])
                if self.pending_cids.get(key, (0,))[0] == req:
                    del self.pending_cids[key]
        if seq <= self.boot_seq:
            return
        if pairs is None:
            changed = self.mirror.on_order_event(etype, ev, seq)
            if changed is not None:
                self._market_changed(changed)
            pairs = self.tracker.on_event(etype, account)
        if pairs:
            self._report(account, pairs[0][1], 0, etype, ev, mv, off, requester, rid)
        elif requester is not None:
            # a reply that is no report (a command naming no account): the requester's
            msg = render_report(etype, ev, 0, self.tracker.index, self._cmd, 0,
                                self.market_by_id)
            del msg["account_seq"]
            self.outbox.reply(requester, msg, rid, seq)

    def handed(self, mv: memoryview, off: int, cmd_record: bytes, pairs: list,
               idx: int) -> None:
        """One event the compiled router (gateway/compiled_pass.py) handed over, after it
        applied it to its mirror, numbered it (`pairs`, role 0 first; `idx` its place in its
        command) and kept its reports, and after it updated the views' versions: what is
        left is this router's, as `_process` does it (market-data trades went out with
        the compiled router's list)."""
        etype = mv[off + ETYPE_OFFSET]
        seq = int.from_bytes(mv[off:off + 8], "little", signed=True)
        if seq > self.boot_seq:
            self._cmd_record = cmd_record
            self._cmd = COMMAND_STRUCT.unpack_from(cmd_record)
            self.tracker.index = idx
        if etype == EV_COMMAND:
            cmd = COMMAND_STRUCT.unpack_from(mv, off + COMMAND_IN_EVENT_OFFSET)
            self._command_state(seq, cmd)
        elif etype == EV_TRADE:
            tr = TRADE_EVENT_STRUCT.unpack_from(mv, off)
            for role, (account, n) in enumerate(pairs):
                self._report(account, n, role, EV_TRADE, tr, mv, off)
        elif etype == EV_MARK:
            if self.market_data is not None:
                self.market_data.mark(MARK_EVENT_STRUCT.unpack_from(mv, off))
        elif etype >= EV_FUNDING or etype == EV_BALANCE:
            self._risk_event(etype, mv, off, pairs)
        else:
            self._order_event(etype, ORDER_EVENT_STRUCT.unpack_from(mv, off), mv, off, pairs)

    def _command_state(self, seq: int, cmd: tuple) -> None:
        """What this router remembers of a command until its events are routed."""
        code = cmd[CM_CMD]
        if code == CMD_FUNDING or code == CMD_LIQUIDATE:
            self._risk_command = (seq, code, cmd)
        elif code == CMD_SET_ACCOUNT_STATE and cmd[CM_QTY] == 1:
            self._disabling = (seq, cmd[CM_ACCOUNT])

    def publish_trades(self, mv: memoryview, indices: list) -> None:
        """Market data of the trades at these event indices (the compiled router's list)."""
        for i in indices:
            tr = TRADE_EVENT_STRUCT.unpack_from(mv, i * EVENT_BYTES)
            market = self._market(tr[E_MARKET])
            if market is not None:
                self.market_data.trade(tr, market)

    # -- reports ------------------------------------------------------------------------
    def _market(self, market_id: int):
        return self.market_by_id[market_id] if 0 <= market_id < len(self.market_by_id) \
            else None

    def _report(self, account: int, account_seq: int, role: int, etype: int, ev: tuple,
                mv: memoryview, off: int, requester=None, rid=None) -> None:
        """A numbered report: kept for replay, and sent to every session of the account (the
        requester's copy, when it is a reply, with `rid`)."""
        idx = self.tracker.index
        self.report_log.append(account, account_seq, ev[E_SEQ], idx, role,
                               self._cmd_record + bytes(mv[off:off + EVENT_BYTES]))
        if requester is not None or account in self.sessions.by_account:
            msg = render_report(etype, ev, role, idx, self._cmd, account_seq,
                                self.market_by_id)
            self.outbox.to_account(account, msg, requester, rid, ev[E_SEQ])

    # -- funding, liquidations, balances: rare next to orders, off the per-order path ----
    def _risk_event(self, etype: int, mv: memoryview, off: int, pairs=None) -> None:
        if etype == EV_FUNDING or etype == EV_LIQUIDATION:
            ev = (FUNDING_EVENT_STRUCT if etype == EV_FUNDING
                  else LIQUIDATION_EVENT_STRUCT).unpack_from(mv, off)
        else:
            ev = HEADER_STRUCT.unpack_from(mv, off)
        if ev[E_SEQ] > self.boot_seq:
            if pairs is None:
                pairs = self.tracker.on_event(etype, ev[E_ACCOUNT])
            for account, n in pairs:
                self._report(account, n, 0, etype, ev, mv, off)
        if etype == EV_LIQUIDATION:
            # an ADL step also has the deleveraged account's half, addressed to it: market
            # data shows the liquidated account's half only
            market = self._market(ev[E_MARKET])
            rc = self._risk_command
            if self.market_data is not None and market is not None and rc is not None and \
                    rc[0] == ev[E_SEQ] and rc[2][CM_ACCOUNT] == ev[E_ACCOUNT]:
                self.market_data.liquidation(ev, market)
        # EV_BALANCE, EV_INSURANCE: no report (deposits are the operator's; the fund is
        # nobody's account); `account` reads balances from the matcher

    def _risk_command_done(self, ev) -> None:
        """EV_DONE of a FUNDING command: its rate on `funding.MARKET`, once per command."""
        seq, code, cmd = self._risk_command
        if seq != ev[E_SEQ]:
            return
        self._risk_command = None
        market = self._market(cmd[CM_MARKET])
        if code == CMD_FUNDING and self.market_data is not None and market is not None:
            self.market_data.funding(market, seq, cmd[CM_OID], cmd[CM_TS])  # rate_e9 rides in oid

    def _market_changed(self, m: int) -> None:
        market = self.market_by_id[m]
        if market is None:
            return
        mk = self.mirror.market_row(m)
        if mk[M_ACTIVE] and mk[M_ATPL] != market.atoms_per_tick_lot:
            log.error("market %s (id %d) was created with %d atoms per tick x lot, the "
                      "gateway's table says %d: orders for it are refused", market.symbol, m,
                      mk[M_ATPL], market.atoms_per_tick_lot)
            self.market_by_id[m] = None
            self.markets.by_symbol.pop(market.symbol, None)
            return
        market.set_limits(market.max_price_ticks or mk[M_MAX_PRICE],
                          market.max_order_lots or mk[M_MAX_ORDER])
        if self.market_data is not None:
            self.market_data.state_changed(market)

    def _account_disabled(self, account: int) -> None:
        """The operator disabled the account (its DONE): each of its sessions is told, then
        evicted (gateway/sessions.py); the handshake refuses its keys from now on."""
        self._disabling = None
        note = pack({"type": "reject", "reason": REASON_NAMES[REASON_ACCOUNT_DISABLED],
                     "message": "this account was disabled by the operator: its sessions are "
                                "closed", "ts": time.time_ns()})
        for s in tuple(self.sessions.by_account.get(account, ())):
            self.outbox.send(s, note)        # not held: the session will not be there then
            self.sessions.evict(s)
