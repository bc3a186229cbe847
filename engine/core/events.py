"""Writing a command's events into the ring: claiming the next slot, order events, rejects,
the closing count, cancel reports.

Owns: the ring slots from the descriptor's write cursor on (the event bound of
engine/core/batch.py guarantees the room). May touch nothing else; it reads the order it
reports on.
"""

from engine.records import EVENT_BYTES, EV_CANCELED, EV_DONE, EV_REJECT, STATUS_CANCELED
from engine.state import D_MASK, D_SEQ, D_SOURCE, D_WRITE
from engine.core.tables import _desc, _order_events, _orders, _ring_headers, _ring_words, jit


@jit
def _claim(st, cmd, etype, market, account):
    """Next ring slot, zeroed, with the header of the current command written."""
    desc = _desc(st)
    pos = desc[D_WRITE]
    desc[D_WRITE] = pos + 1
    j = pos & desc[D_MASK]
    # a fixed trip count over a view taken once: a few vector stores, where re-deriving the
    # view after each store (it might alias the descriptor) made 16 load-store pairs
    words = _ring_words(st)
    for w in range(EVENT_BYTES // 8):
        words[j, w] = 0
    hdr = _ring_headers(st)[j]
    hdr.seq = desc[D_SEQ]
    hdr.ts_ns = cmd.ts_ns
    hdr.etype = etype
    hdr.source = desc[D_SOURCE]
    hdr.market = market
    hdr.account = account
    return j


@jit
def _order_event(st, cmd, etype, market, account, req, reason, status, side, kind, oid, cid,
                 price_ticks, qty_lots, remaining_lots):
    j = _claim(st, cmd, etype, market, account)
    e = _order_events(st)[j]
    e.req = req
    e.reason = reason
    e.status = status
    e.side = side
    e.kind = kind
    e.oid = oid
    e.cid = cid
    e.price_ticks = price_ticks
    e.qty_lots = qty_lots
    e.remaining_lots = remaining_lots
    return j


@jit
def _reject(st, cmd, reason):
    _order_event(st, cmd, EV_REJECT, cmd.market, cmd.account, cmd.req, reason, 0, cmd.side,
                 cmd.kind, cmd.oid, cmd.cid, 0, 0, 0)


@jit
def _done(st, cmd, count):
    _order_event(st, cmd, EV_DONE, cmd.market, cmd.account, cmd.req, 0, 0, 0, 0, 0, 0, 0,
                 count, 0)


@jit
def _req_for(cmd, account):
    return cmd.req if account == cmd.account else 0


@jit
def _canceled(st, cmd, slot, reason, canceled_lots):
    o = _orders(st)[slot]
    _order_event(st, cmd, EV_CANCELED, o.market, o.account, _req_for(cmd, o.account), reason,
                 STATUS_CANCELED, o.side, o.kind, o.oid, o.cid, o.price_ticks, 0, canceled_lots)
