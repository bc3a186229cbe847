"""Events in, messages out: drain the event ring, keep the mirror exact, and route each event.

Requests carry a `req` token (int32) that the matcher copies onto every event the command
causes, together with the ring it came from (`source`): an event is this gateway's reply only
if its source is this gateway's ring, its req is pending here and its account is the
requester's. Which events are replies: `ack`/`reject` for new_order, `canceled`/`reject` for
cancel, `amended`/`reject` for amend, `done`/`reject` for cancel_all, withdraw, set_margin.

Order events (ack, canceled, amended, triggered, fill) go to every session of the account on
this gateway (the requester's copy carries `rid`, the others none); rejects and `done` only to
the requester. Nothing is ever sent to a session of another account: events are addressed by
the account field the matcher wrote, and sessions are keyed by the authenticated account.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from engine.records import (CMD_AMEND, CMD_CANCEL, CMD_CANCEL_ALL, CMD_DEPOSIT, CMD_FUNDING,
                            CMD_LIQUIDATE, CMD_NEW_ORDER, CMD_SET_ACCOUNT_STATE, CMD_SET_MARGIN,
                            CMD_WITHDRAW, EV_ACK, EV_AMENDED, EV_BALANCE,
                            EV_CANCELED, EV_COMMAND, EV_DONE, EV_FUNDING, EV_LIQUIDATION,
                            EV_MARK, EV_REJECT, EV_TRADE, EV_TRIGGERED, EVENT_BYTES,
                            REASON_ACCOUNT_DISABLED, REASON_DISCONNECT, REASON_NAMES)
from gateway import codec
from gateway.codec import (CM_ACCOUNT, CM_CMD, CM_MARKET, CM_OID, CM_QTY, CM_TS,
                           COMMAND_IN_EVENT_OFFSET, COMMAND_STRUCT, E_ACCOUNT, E_MARKET, E_REQ,
                           E_SEQ, E_SOURCE, ETYPE_OFFSET, FUNDING_EVENT_STRUCT,
                           LIQUIDATION_EVENT_STRUCT, MARK_EVENT_STRUCT, OE_CID, OE_OID,
                           OE_QTY, OE_REASON, ORDER_EVENT_STRUCT, TR_MAKER_ACCOUNT,
                           TRADE_EVENT_STRUCT, pack)
from gateway.mirror import M_ACTIVE, M_ATPL, M_MAX_ORDER, M_MAX_PRICE
from gateway.outbox import with_rid
from gateway.requests import R_DISCONNECT, R_DONE, R_NEW_ORDER, REPLY_ETYPES

log = logging.getLogger("perpx.gateway")

# commands whose effects are their account's alone (a trade's maker is told by the trade);
# any other command may change every account's view (gateway/views.py)
ACCOUNT_COMMANDS = frozenset((CMD_NEW_ORDER, CMD_CANCEL, CMD_CANCEL_ALL, CMD_AMEND,
                              CMD_WITHDRAW, CMD_DEPOSIT, CMD_SET_MARGIN))


class EventRouter:
    def __init__(self, consumer, mirror, boot_seq: int, source_index: int, requests, sessions,
                 outbox, market_data, markets, market_by_id, event_batch: int, stats: dict,
                 views):
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
        self._fired = None             # (seq, oid) of the last `triggered` routed here
        self._disabling = None         # (seq, account) of a CMD_SET_ACCOUNT_STATE disabling

    # -- the ring -----------------------------------------------------------------------
    def drain(self) -> int:
        """Route one batch of published events (ending at a command boundary); returns how
        many."""
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
                self._process(memoryview(part.view(np.uint8)), len(part))
        consumer.advance(n)
        self.stats["events"] += n
        if self.market_data is not None and self.mirror.any_dirty:
            self.market_data.book_deltas()
        return n

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
        mine = self.source_index
        pending = self.pending
        by_account = self.sessions.by_account
        market_data = self.market_data
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
                code = cmd[CM_CMD]
                if code in ACCOUNT_COMMANDS:
                    versions[cmd[CM_ACCOUNT]] = seq
                else:
                    views.bump_all(seq)
                if code == CMD_FUNDING or code == CMD_LIQUIDATE:
                    self._risk_command = (seq, code, cmd)
                elif code == CMD_SET_ACCOUNT_STATE and cmd[CM_QTY] == 1:
                    self._disabling = (seq, cmd[CM_ACCOUNT])
                continue
            if etype == EV_TRADE:
                tr = TRADE_EVENT_STRUCT.unpack_from(mv, off)
                versions[tr[TR_MAKER_ACCOUNT]] = versions[tr[E_ACCOUNT]] = tr[E_SEQ]
                if tr[E_SEQ] > boot:
                    mirror.on_trade(tr)
                self._route_trade(tr)
                continue
            if etype == EV_MARK:
                ev = MARK_EVENT_STRUCT.unpack_from(mv, off)
                if ev[E_SEQ] > boot:
                    mirror.on_mark(ev)
                if market_data is not None:
                    market_data.mark(ev)
                continue
            if etype >= EV_FUNDING or etype == EV_BALANCE:
                self._risk_event(etype, mv, off)
                continue
            ev = order_unpack(mv, off)
            seq, account, req = ev[E_SEQ], ev[E_ACCOUNT], ev[E_REQ]
            versions[account] = seq
            # is it the reply to one of our requests?
            p = None
            if ev[E_SOURCE] == mine and req:
                p = pending.get(req)
                if p is not None and (p[2] != account or (
                        p[3] != R_DISCONNECT and etype not in REPLY_ETYPES[p[3]])):
                    p = None      # not the reply: a report that follows it (or not ours)
            if seq > boot:
                changed = mirror.on_order_event(etype, ev, seq)
                if changed is not None:
                    self._market_changed(changed)
            if p is None:
                if etype == EV_DONE and self._risk_command is not None:
                    self._risk_command_done(ev)
                if etype == EV_DONE and self._disabling is not None and \
                        self._disabling[0] == seq:
                    self._account_disabled(account)
                if etype == EV_REJECT or etype == EV_DONE or account not in by_account:
                    if etype == EV_REJECT and self._fired == (seq, ev[OE_OID]) and \
                            account in by_account:
                        self._route_fired_reject(ev)
                    continue
                self._route_order_event(etype, ev, None, None, REASON_NAMES.get(ev[OE_REASON]))
                continue
            requester, rid, _, kind, cid, _ = p
            if kind == R_DISCONNECT:
                if etype == EV_CANCELED:
                    self._route_order_event(etype, ev, None, None,
                                            REASON_NAMES[REASON_DISCONNECT])
                elif etype in (EV_DONE, EV_REJECT):
                    del pending[req]
                continue
            del pending[req]
            if kind == R_NEW_ORDER:
                key = (account, cid)
                if self.pending_cids.get(key, (0,))[0] == req:
                    del self.pending_cids[key]
            if etype == EV_REJECT:
                self.outbox.send(requester, pack(with_rid(
                    codec.engine_reject_message(ev, cid), rid)), seq)
            elif etype == EV_DONE:
                count = ev[OE_QTY] if kind == R_DONE and p[5] else None   # cancel_all's
                msg = codec.done_message(ev, count)
                self.outbox.send(requester, pack(with_rid(msg, rid)), seq)
            else:
                self._route_order_event(etype, ev, requester, rid,
                                        REASON_NAMES.get(ev[OE_REASON]))

    # -- orders and fills ---------------------------------------------------------------
    def _market(self, market_id: int):
        return self.market_by_id[market_id] if 0 <= market_id < len(self.market_by_id) \
            else None

    def _route_order_event(self, etype, ev, requester, rid, reason_name) -> None:
        market = self._market(ev[E_MARKET])
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
            self._fired = (ev[E_SEQ], ev[OE_OID])
        else:
            return
        self.outbox.to_account(ev[E_ACCOUNT], msg, requester, rid, ev[E_SEQ])

    def _route_fired_reject(self, ev) -> None:
        """A fired stop/take-profit that a check at trigger time refused: the reject right
        after its `triggered` is a report to the owner (with the oid), not a reply."""
        msg = codec.engine_reject_message(ev, ev[OE_CID])
        msg["oid"] = ev[OE_OID]
        self.outbox.to_account(ev[E_ACCOUNT], msg, seq=ev[E_SEQ])

    def _route_trade(self, tr) -> None:
        market = self._market(tr[E_MARKET])
        if market is None:
            return
        by_account = self.sessions.by_account
        taker, maker = tr[E_ACCOUNT], tr[TR_MAKER_ACCOUNT]
        if taker in by_account or maker in by_account:
            taker_msg, maker_msg = codec.fill_messages(tr, market)
            if taker in by_account:
                self.outbox.to_account(taker, taker_msg, seq=tr[E_SEQ])
            if maker in by_account:
                self.outbox.to_account(maker, maker_msg, seq=tr[E_SEQ])
        if self.market_data is not None:
            self.market_data.trade(tr, market)

    # -- funding, liquidations, balances: rare next to orders, off the per-order path ----
    def _risk_event(self, etype: int, mv: memoryview, off: int) -> None:
        by_account = self.sessions.by_account
        if etype == EV_FUNDING:
            ev = FUNDING_EVENT_STRUCT.unpack_from(mv, off)
            market = self._market(ev[E_MARKET])
            if market is not None and ev[E_ACCOUNT] in by_account:
                self.outbox.to_account(ev[E_ACCOUNT], codec.funding_message(ev, market),
                                       seq=ev[E_SEQ])
        elif etype == EV_LIQUIDATION:
            ev = LIQUIDATION_EVENT_STRUCT.unpack_from(mv, off)
            market = self._market(ev[E_MARKET])
            if market is None:
                return
            if ev[E_ACCOUNT] in by_account:
                self.outbox.to_account(ev[E_ACCOUNT], codec.liquidation_message(ev, market),
                                       seq=ev[E_SEQ])
            # an ADL step also has the deleveraged account's half, addressed to it: market
            # data shows the liquidated account's half only
            rc = self._risk_command
            if self.market_data is not None and rc is not None and rc[0] == ev[E_SEQ] and \
                    rc[2][CM_ACCOUNT] == ev[E_ACCOUNT]:
                self.market_data.liquidation(ev, market)
        # EV_BALANCE, EV_INSURANCE: nothing to route (deposits are the operator's; the fund
        # is nobody's account); `account` reads balances from the matcher

    def _risk_command_done(self, ev) -> None:
        """EV_DONE of a FUNDING command: its rate on `funding.MARKET`, once per command."""
        seq, code, cmd = self._risk_command
        if seq != ev[E_SEQ]:
            return
        self._risk_command = None
        market = self._market(cmd[CM_MARKET])
        if code == CMD_FUNDING and self.market_data is not None and market is not None:
            self.market_data.funding(market, seq, cmd[CM_OID], cmd[CM_TS])  # rate_e9 rides in oid

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
