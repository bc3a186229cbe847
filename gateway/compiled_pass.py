"""The gateway's order path compiled whole, sockets included (the lane): what a message and
an event cost the gateway per order, on the path every order takes.

Two calls per pass of the gateway's loop (gateway/server.py `_serve_lane`):
- `recv_pass` reads the ROUTER through libzmq itself (pyzmq's own libzmq, on the socket's
  handle). For a live session the lane knows, it takes the fully valid common case of
  `new_order` and `cancel`: rate limit, decimals onto the grid, the pending request, the
  command. Everything else is deferred to the Python gateway (gateway/requests.py) in the same
  pass, and a session's later messages of that pass follow it there, so its order holds.
- `route_pass` routes events: it numbers every report with the engine's rule, keeps it in the
  replay log (gateway/report_log_arrays.py), renders it (gateway/report_render.py) and sends
  it to every live session of its account, the requester's copy with its rid, or holds it
  until journaled (durable acks). It stops at an event the Python router must handle:
  another command's (admin, funding, liquidations), a Python-lane request's reply, a mark or a
  risk event where this gateway publishes market data, an account with a session the lane
  does not know. It returns its index with the event's numbers; Python handles it
  (gateway/routing.py `handed`) and calls again from the next one. So a session gets its
  messages in account_seq order, whichever lane sends them.
The mirror is in arrays too (gateway/mirror_arrays.py), applied per batch before routing.

The Python gateway stays the owner of sessions (gateway/sessions.py): it tells the lane of
each live session (`learn`) and each that stops being live (`forget`), and the lane keeps
each account's sessions in Python's order. Bytes the lane sends are counted per session and
handed to the outbox's checks (gateway/outbox.py) when a session's budget is spent; a send
libzmq refuses goes to the outbox's drop rules. Messages the Python gateway holds for a
session the lane knows wait in the lane's hold, so each session has one queue.

The Python pass (PERPX_GATEWAY_PASS=python) does all of this in Python and is the lane's
oracle: tests/test_gateway_passes.py runs both on one matcher and compares every report.
Event and command codes are numba globals, frozen in the cache: a change of
engine/records.py's codes needs the cache cleared (as gateway/report_render.py says).
"""

from __future__ import annotations

import glob
import os

import numpy as np
from numba import njit, types
from numba.experimental import structref

from engine.records import (CMD_AMEND, CMD_CANCEL, CMD_CANCEL_ALL, CMD_NEW_ORDER, CMD_SET_MARK,
                            COMMAND_BYTES, COMMAND_DTYPE, EV_ACK, EV_BALANCE, EV_CANCELED,
                            EV_COMMAND, EV_FUNDING, EV_MARK, EV_REJECT, EV_TRADE, EVENT_BYTES,
                            FLAG_CID_GIVEN, KIND_LIMIT, ORDER_EVENT_DTYPE, SIDE_BUY, SIDE_SELL,
                            STP_CANCEL_TAKER, TIF_GTC, TRADE_EVENT_DTYPE)
from engine.report_numbering import report_accounts_compiled as _report_accounts
from gateway.memory import ENTRY_BYTES, MESSAGE_OVERHEAD
from gateway.report_log_arrays import ArrayReportLog, log_append
from gateway.requests import R_CANCEL, R_NEW_ORDER
from gateway.routing import ACCOUNT_COMMANDS
from gateway.report_render import (MAX_REPORT_BYTES, SCRATCH_BYTES, market_arrays,
                                   render_into, render_tables)
import llvmlite.binding as llvm

import zmq

# libzmq and libc called from compiled code by symbol (numba's ExternalFunction): the calls
# link against pyzmq's own libzmq, loaded into the process for good, so the compiled
# functions can be cached (ctypes function pointers cannot). Pointers travel as intp.
_LIBZMQ = glob.glob(os.path.join(os.path.dirname(zmq.__file__), os.pardir, "pyzmq.libs",
                                 "libzmq-*.so*"))[0]
llvm.load_library_permanently(_LIBZMQ)
_P, _I, _S = types.intp, types.intc, types.intp


def _ext(name, res, *args):
    return types.ExternalFunction(name, res(*args))


zmq_msg_init = _ext("zmq_msg_init", _I, _P)
zmq_msg_recv = _ext("zmq_msg_recv", _I, _P, _P, _I)
zmq_msg_data = _ext("zmq_msg_data", _P, _P)
zmq_msg_more = _ext("zmq_msg_more", _I, _P)
zmq_msg_close = _ext("zmq_msg_close", _I, _P)
zmq_msg_get = _ext("zmq_msg_get", _I, _P, _I)
zmq_msg_gets = _ext("zmq_msg_gets", _P, _P, _P)
zmq_send = _ext("zmq_send", _I, _P, _P, _S, _I)
memcpy = _ext("memcpy", _P, _P, _P, _S)
strlen = _ext("strlen", _S, _P)
clock_gettime = _ext("clock_gettime", _I, _I, _P)
zmq_errno = _ext("zmq_errno", _I)

DONTWAIT, SNDMORE = 1, 2
ID_CAP = 4096              # routing id -> session index (open addressing, power of two)
ID_MAX = 256               # a routing id's bytes at most (ZeroMQ's limit: 255)
PEND_CAP = 1 << 16         # pending requests by req & mask
COMPILED_REQ = 1 << 30     # req tokens from here on are the compiled lane's
CID_WINDOW = 1024          # in-flight new orders an amend by cid finds before their ack
ARENA = 1 << 20           # the bytes of one pass's deferred messages
OUT_CAP = 4096             # events per route() call: its trade and reply-time lists hold that

# byte offsets in an event slot (EVENT_BYTES), and of its command's fields (EV_COMMAND)
EV_SEQ_AT, EV_ETYPE_AT, EV_SOURCE_AT, EV_ACCOUNT_AT, EV_REQ_AT = (
    ORDER_EVENT_DTYPE.fields[f][1] for f in ("seq", "etype", "source", "account", "req"))
EV_MAKER_AT = TRADE_EVENT_DTYPE.fields["maker_account"][1]
EV_COMMAND_AT = EVENT_BYTES - COMMAND_BYTES     # where EV_COMMAND carries its command
CMD_TS_AT, CMD_ACCOUNT_AT, CMD_CODE_AT = (
    COMMAND_DTYPE.fields[f][1] for f in ("ts_ns", "account", "cmd"))

# int state slots
(I_NEXT_REQ, I_DEFER_N, I_CMD_N, I_CMD_CODE, I_INDEX, I_BOOT, I_PY_CMD, I_ALL_VERSION,
 I_MD_ON, I_MD_N, I_ACK_N, I_FAIL_N, I_CHECK_N, I_MAX_FRAME, I_PAIRS, I_A0, I_S0, I_A1, I_S1,
 I_JOURNAL_ERR, I_DURABLE, I_FULL, I_H_HEAD, I_H_TAIL, I_B_HEAD, I_B_TAIL, I_EMPTY,
 I_CMD_BASE, I_CMD_ROOM) = range(29)
N_INTS = 29

# a session's columns (sid_i): its account, connection fd, generation (a reused index
# is a new session), live, deferred this pass, bytes sent since Python last counted them,
# bytes left before Python must check its queue, on the check list
(S_ACCT, S_FD, S_GEN, S_LIVE, S_DEFERRED, S_OUT, S_ROOM, S_CHECK, S_KLEN) = range(9)
N_SCOLS = 9
# a pending request's columns (pend)
(P_REQ, P_SID, P_GEN, P_RID, P_ACCT, P_KIND, P_CID, P_MARKET) = range(8)
N_PCOLS = 8
# commands whose events the compiled router routes; any other's go to the Python router
ROUTED_COMMANDS = np.array([CMD_NEW_ORDER, CMD_CANCEL, CMD_CANCEL_ALL, CMD_AMEND,
                            CMD_SET_MARK], np.int64)
ACCOUNT_COMMANDS_ARR = np.array(sorted(ACCOUNT_COMMANDS), np.int64)

K_TYPE, K_CID, K_MARKET, K_SIDE, K_KIND, K_QTY, K_PRICE, K_RID, K_OTHER = range(9)
_KEYS = [b"type", b"cid", b"market", b"side", b"kind", b"qty", b"price", b"rid"]
KEY_BYTES = np.zeros((len(_KEYS), 8), np.uint8)
KEY_LEN = np.zeros(len(_KEYS), np.int64)
for _i, _k in enumerate(_KEYS):
    KEY_BYTES[_i, :len(_k)] = np.frombuffer(_k, np.uint8)
    KEY_LEN[_i] = len(_k)


# ---- the lane's arrays, one argument ----------------------------------------------------------
# numba checks the type of every argument of every call from Python (~70 ns an array): the
# calls' ~40 and ~26 arrays cost ~3 µs each before any work. In one struct they cost one
# check. The calls read their fields into locals of the old parameters' names.
LANE_FIELDS = (
    "sock", "zmsg", "user_id_key", "ts_buf", "arena", "ints", "id_key", "id_klen", "id_sid",
    "sid_i", "pend", "key_bytes", "key_len", "mk_sym", "mk_symlen", "mk_tick", "mk_lot",
    "mk_maxp", "mk_maxq", "tokens", "token_ts", "rate_per_ns", "burst", "cmd", "deferred",
    "out", "plain", "scratch", "rec", "sid_key", "acct_sids", "acct_n", "account_seq",
    "l_slot_of", "l_slot_account", "l_records", "l_fields", "l_count", "l_head", "l_totals",
    "cur_cmd", "versions", "md_idx", "acks", "fails", "checks", "h_meta", "h_bytes", "routed",
    "account_cmds", "r_blob", "r_at", "r_priced", "r_sym", "r_sym_len", "r_tick", "r_lot",
    "ack_bounds", "ack_counts", "ack_sum")


@structref.register
class LaneArraysType(types.StructRef):
    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(typ)) for name, typ in fields)


class LaneArrays(structref.StructRefProxy):
    """The fields of LANE_FIELDS, held by reference: the arrays are CompiledLane's own, so
    what either side writes the other reads. Built by `lane_arrays`; a field is replaced only
    by `set_hold` and `set_render`."""


structref.define_proxy(LaneArrays, LaneArraysType, LANE_FIELDS)


@njit(cache=True)
def _new_lane_arrays(fields):
    return LaneArrays(*fields)


def lane_arrays(**fields) -> LaneArrays:
    """A LaneArrays of the named fields (all of LANE_FIELDS), built by a cached compiled call
    (the proxy's own constructor would compile at every start)."""
    return _new_lane_arrays(tuple(fields[name] for name in LANE_FIELDS))


@njit(cache=True)
def set_hold(lane, h_meta, h_bytes):
    lane.h_meta = h_meta
    lane.h_bytes = h_bytes


@njit(cache=True)
def set_render(lane, r_blob, r_at, r_priced, r_sym, r_sym_len, r_tick, r_lot):
    lane.r_blob = r_blob
    lane.r_at = r_at
    lane.r_priced = r_priced
    lane.r_sym = r_sym
    lane.r_sym_len = r_sym_len
    lane.r_tick = r_tick
    lane.r_lot = r_lot


def _cstr(s: bytes) -> np.ndarray:
    return np.frombuffer(s + b"\0", np.uint8).copy()


@njit(cache=True)
def _fnv(buf, start, n):
    h = np.uint64(1469598103934665603)
    for i in range(n):
        h = (h ^ np.uint64(buf[start + i])) * np.uint64(1099511628211)
    return h



@njit(cache=True)
def id_find(id_key, id_klen, buf, start, n):
    """Table slot of the routing id buf[start:start+n], or -(free slot)-1."""
    mask = len(id_klen) - 1
    i = np.int64(_fnv(buf, start, n) & np.uint64(mask))
    while True:
        k = id_klen[i]
        if k == 0:
            return -i - 1
        if k == n:
            same = True
            for j in range(n):
                if id_key[i, j] != buf[start + j]:
                    same = False
                    break
            if same:
                return i
        i = (i + 1) & mask


@njit(cache=True)
def id_delete(id_key, id_klen, id_sid, i):
    """Remove slot i, moving later entries of its probe chain back (no tombstones)."""
    mask = len(id_klen) - 1
    j = i
    while True:
        j = (j + 1) & mask
        if id_klen[j] == 0:
            break
        home = np.int64(_fnv(id_key[j], 0, id_klen[j]) & np.uint64(mask))
        # j may move to i if its home is not in (i, j] (cyclically)
        if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
            id_key[i] = id_key[j]
            id_klen[i] = id_klen[j]
            id_sid[i] = id_sid[j]
            i = j
    id_klen[i] = 0
    id_key[i] = 0
    id_sid[i] = -1


@njit(cache=True)
def _eq(buf, start, n, lit, litn):
    if n != litn:
        return False
    for j in range(n):
        if buf[start + j] != lit[j]:
            return False
    return True


@njit(cache=True)
def _read_int(buf, p):
    """(value, next position, ok) of a msgpack integer at p."""
    b = buf[p]
    if b <= 0x7f:
        return np.int64(b), p + 1, True
    if b >= 0xe0:
        return np.int64(b) - 256, p + 1, True
    v = np.int64(0)
    if b == 0xcc or b == 0xd0:
        n = 1
    elif b == 0xcd or b == 0xd1:
        n = 2
    elif b == 0xce or b == 0xd2:
        n = 4
    elif b == 0xcf or b == 0xd3:
        n = 8
    else:
        return np.int64(0), p, False
    if p + 1 + n > len(buf):
        return np.int64(0), p, False
    u = np.uint64(0)
    for j in range(n):
        u = (u << np.uint64(8)) | np.uint64(buf[p + 1 + j])
    if b == 0xcf and u > np.uint64(0x7fffffffffffffff):
        return np.int64(0), p, False
    v = np.int64(u)
    if b >= 0xd0:           # signed: sign-extend
        bits = 8 * n
        if n < 8 and v >= (np.int64(1) << (bits - 1)):
            v -= np.int64(1) << bits
    return v, p + 1 + n, True


@njit(cache=True)
def _read_str(buf, p):
    """(start, length, next position, ok) of a msgpack str at p."""
    b = buf[p]
    if 0xa0 <= b <= 0xbf:
        n = b - 0xa0
        return p + 1, n, p + 1 + n, p + 1 + n <= len(buf)
    if b == 0xd9 and p + 1 < len(buf):
        n = buf[p + 1]
        return p + 2, n, p + 2 + n, p + 2 + n <= len(buf)
    return 0, 0, p, False


@njit(cache=True)
def _decimal_units(buf, start, n, mantissa, exponent):
    """A plain decimal string -> units of the grid (mantissa x 10^-exponent), or -1 when it
    is not one, not on the grid or not positive (Python then gives the exact reject)."""
    if n == 0 or n > 18 or buf[start] == 46:     # engine/units.py: a digit before any '.'
        return -1
    digits = np.int64(0)
    places = -1
    for j in range(n):
        c = buf[start + j]
        if c == 46:          # '.'
            if places >= 0:
                return -1
            places = 0
        elif 48 <= c <= 57:
            digits = digits * 10 + (c - 48)
            if places >= 0:
                places += 1
        else:
            return -1
    if places == 0:
        return -1
    if places < 0:
        places = 0
    # units = digits x 10^exponent / (mantissa x 10^places): the larger power of ten goes
    # to the side it belongs to, so one division decides both the grid and the value
    if n + exponent - places > 18:              # could overflow int64: Python decides
        return -1
    num = digits
    den = mantissa
    for _ in range(exponent - places):
        num *= 10
    for _ in range(places - exponent):
        den *= 10
    if num % den:
        return -1
    units = num // den
    return units if units > 0 else -1


@njit(cache=True)
def _now_ns(ts_buf):
    clock_gettime(0, np.int64(ts_buf.ctypes.data))
    return ts_buf[0] * 1_000_000_000 + ts_buf[1]


@njit(cache=True)
def _put_cmd(cmd, slot, ts, cid, price, qty, account, req, market, code, side, flags):
    """A GTC limit order or a cancel, into the command ring's record `slot`."""
    c = cmd[slot]
    c.ts_ns = ts
    c.cid = cid
    c.oid = 0
    c.price_ticks = price
    c.qty_lots = qty
    c.amount_atoms = 0
    c.account = account
    c.req = req
    c.market = market
    c.cmd = code
    c.side = side
    c.kind = KIND_LIMIT
    c.tif = TIF_GTC
    c.flags = flags
    c.stp = STP_CANCEL_TAKER


@njit(cache=True)
def recv_pass(lane, max_msgs):
    """Read up to max_msgs messages from the ROUTER; write the common case's commands into
    the command ring's records (`cmd`) from sequence ints[I_CMD_BASE] on, ints[I_CMD_N] of
    them, which the caller publishes; defer the rest: ints[I_DEFER_N] rows of `deferred`
    (arena offset, routing id length, payload length, more frames, account, fd), their bytes
    in `arena`; ints[I_EMPTY] when it found the ROUTER empty. Reads no message once
    ints[I_CMD_ROOM] commands are written (the room the caller found in the ring): the rest
    wait in the ROUTER. Returns how many messages were read."""
    sock, zmsg, user_id_key, ts_buf, arena = (lane.sock, lane.zmsg, lane.user_id_key,
                                               lane.ts_buf, lane.arena)
    ints, id_key, id_klen, id_sid, sid_i = (lane.ints, lane.id_key, lane.id_klen, lane.id_sid,
                                            lane.sid_i)
    pend, key_bytes, key_len, cmd, deferred = (lane.pend, lane.key_bytes, lane.key_len,
                                               lane.cmd, lane.deferred)
    mk_sym, mk_symlen, mk_tick, mk_lot, mk_maxp, mk_maxq = (
        lane.mk_sym, lane.mk_symlen, lane.mk_tick, lane.mk_lot, lane.mk_maxp, lane.mk_maxq)
    tokens, token_ts, rate_per_ns, burst = (lane.tokens, lane.token_ts, lane.rate_per_ns,
                                            lane.burst)
    zp = np.int64(zmsg.ctypes.data)
    base = np.int64(arena.ctypes.data)
    got = 0
    ints[I_DEFER_N] = 0
    ints[I_CMD_N] = 0
    ints[I_EMPTY] = 0
    pos = 0
    vals = np.zeros(9, np.int64)
    vlen = np.zeros(9, np.int64)
    vkind = np.zeros(9, np.int64)          # 0 absent, 1 int, 2 str
    # room for one more message: its routing id and the largest frame the ROUTER admits
    while got < max_msgs and pos + ID_MAX + ints[I_MAX_FRAME] <= len(arena) and \
            ints[I_CMD_N] < ints[I_CMD_ROOM]:
        zmq_msg_init(zp)
        isize = zmq_msg_recv(zp, sock, DONTWAIT)
        if isize < 0:
            zmq_msg_close(zp)
            ints[I_EMPTY] = 1      # the ROUTER had no more
            break
        istart = pos
        memcpy(base + pos, zmq_msg_data(zp), isize)
        pos += isize
        zmq_msg_close(zp)
        zmq_msg_init(zp)
        psize = zmq_msg_recv(zp, sock, DONTWAIT)
        pstart = pos
        memcpy(base + pos, zmq_msg_data(zp), psize)
        pos += psize
        more = zmq_msg_more(zp)
        uid = zmq_msg_gets(zp, np.int64(user_id_key.ctypes.data))
        account = np.int64(-1)
        if uid != 0:
            ulen = strlen(uid)
            tmp = np.empty(ulen, np.uint8)
            memcpy(np.int64(tmp.ctypes.data), uid, ulen)
            account = 0
            for c in tmp:
                if c < 48 or c > 57 or account > 1 << 40:
                    account = -1
                    break
                account = account * 10 + (c - 48)
        fd = zmq_msg_get(zp, 2)      # ZMQ_SRCFD
        zmq_msg_close(zp)
        extra = 0
        while more:              # more frames: read them all; Python refuses the request
            zmq_msg_init(zp)
            s2 = zmq_msg_recv(zp, sock, DONTWAIT)
            more = zmq_msg_more(zp) if s2 >= 0 else 0
            zmq_msg_close(zp)
            extra = 1
        got += 1
        slot = id_find(id_key, id_klen, arena, istart, isize)
        sid = id_sid[slot] if slot >= 0 else -1
        handled = False
        # the session's key is routing id, account and fd (gateway/sessions.py): anything
        # else is Python's to sort out
        if sid >= 0 and not extra and sid_i[sid, S_LIVE] and sid_i[sid, S_DEFERRED] == 0 \
                and sid_i[sid, S_ACCT] == account and sid_i[sid, S_FD] == fd \
                and psize <= 1024:
            handled = _handle(arena, pstart, psize, sid, sid_i[sid, S_GEN], account, ints,
                              ts_buf, pend, key_bytes, key_len, mk_sym, mk_symlen, mk_tick,
                              mk_lot, mk_maxp, mk_maxq, tokens, token_ts, rate_per_ns, burst,
                              cmd, vals, vlen, vkind)
        if not handled:
            if sid >= 0:
                sid_i[sid, S_DEFERRED] = 1
            d = deferred[ints[I_DEFER_N]]
            d[0] = istart
            d[1] = isize
            d[2] = psize
            d[3] = extra
            d[4] = account
            d[5] = fd
            ints[I_DEFER_N] += 1
    return got


@njit(cache=True)
def _handle(buf, p, size, sid, gen, account, ints, ts_buf, pend,
            key_bytes, key_len, mk_sym, mk_symlen, mk_tick, mk_lot, mk_maxp, mk_maxq,
            tokens, token_ts, rate_per_ns, burst, cmd, vals, vlen, vkind):
    end = p + size
    b = buf[p]
    if b < 0x80 or b > 0x8f:
        return False
    nkeys = b - 0x80
    p += 1
    vkind[:] = 0
    for _ in range(nkeys):
        if p >= end:
            return False
        ks, kn, p, ok = _read_str(buf, p)
        if not ok or p >= end:
            return False
        key = -1
        for k in range(8):
            if _eq(buf, ks, kn, key_bytes[k], key_len[k]):
                key = k
                break
        if key < 0 or vkind[key] != 0:
            return False           # a key the fast lane does not take
        vb = buf[p]
        if (0xa0 <= vb <= 0xbf) or vb == 0xd9:
            s, n, p, ok = _read_str(buf, p)
            if not ok:
                return False
            vals[key] = s
            vlen[key] = n
            vkind[key] = 2
        else:
            v, p, ok = _read_int(buf, p)
            if not ok:
                return False
            vals[key] = v
            vkind[key] = 1
    if p != end or vkind[K_TYPE] != 2:
        return False
    if vkind[K_RID] == 2 or vkind[K_CID] != 1:
        return False
    ts = vals[K_TYPE]
    tn = vlen[K_TYPE]
    is_new = tn == 9 and buf[ts] == 110 and buf[ts + 4] == 111    # new_order
    is_cancel = tn == 6 and buf[ts] == 99 and buf[ts + 1] == 97     # cancel
    if not is_new and not is_cancel:
        return False
    if is_new and ints[I_JOURNAL_ERR]:
        return False
    now = _now_ns(ts_buf)
    # the account's rate limit (one token)
    t = tokens[account] + (now - token_ts[account]) * rate_per_ns
    if t > burst:
        t = burst
    if t < 1.0:
        return False               # Python answers rate_limited
    market = 0
    price = np.int64(0)
    qty = np.int64(0)
    side = 0
    if is_new:
        if vkind[K_MARKET] != 2 or vkind[K_SIDE] != 2 or vkind[K_QTY] != 2 or \
                vkind[K_PRICE] != 2:
            return False
        market = -1
        for m in range(len(mk_symlen)):
            if mk_symlen[m] and _eq(buf, vals[K_MARKET], vlen[K_MARKET], mk_sym[m],
                                    mk_symlen[m]):
                market = m
                break
        if market < 0:
            return False
        s0, sn = vals[K_SIDE], vlen[K_SIDE]
        if sn == 3 and buf[s0] == 98 and buf[s0 + 1] == 117 and buf[s0 + 2] == 121:
            side = SIDE_BUY
        elif sn == 4 and buf[s0] == 115 and buf[s0 + 1] == 101:
            side = SIDE_SELL
        else:
            return False
        if vkind[K_KIND] != 0:
            k0 = vals[K_KIND]
            if not (vlen[K_KIND] == 5 and buf[k0] == 108 and buf[k0 + 1] == 105):  # limit
                return False
        price = _decimal_units(buf, vals[K_PRICE], vlen[K_PRICE], mk_tick[market, 0],
                               mk_tick[market, 1])
        qty = _decimal_units(buf, vals[K_QTY], vlen[K_QTY], mk_lot[market, 0],
                             mk_lot[market, 1])
        if price <= 0 or qty <= 0 or price > mk_maxp[market] or qty > mk_maxq[market]:
            return False
    tokens[account] = t - 1.0
    token_ts[account] = now
    req = ints[I_NEXT_REQ]
    ints[I_NEXT_REQ] = req + 1 if req < 2 ** 31 - 1 else COMPILED_REQ
    row = pend[req & (len(pend) - 1)]
    if row[P_REQ] != 0:
        return False               # the table's slot is taken: Python handles it
    row[P_REQ] = req
    row[P_SID] = sid
    row[P_GEN] = gen
    row[P_RID] = vals[K_RID] if vkind[K_RID] == 1 else 0
    row[P_ACCT] = account
    row[P_KIND] = (0 if is_new else 1) + (2 if vkind[K_RID] == 1 else 0)
    row[P_CID] = vals[K_CID]
    row[P_MARKET] = market
    k = ints[I_CMD_N]
    slot = (ints[I_CMD_BASE] + k) & (len(cmd) - 1)     # the ring's sequence k of the pass
    if is_new:
        _put_cmd(cmd, slot, now, vals[K_CID], price, qty, account, req, market, CMD_NEW_ORDER,
                 side, 0)
    else:
        _put_cmd(cmd, slot, now, vals[K_CID], 0, 0, account, req, 0, CMD_CANCEL, SIDE_BUY,
                 FLAG_CID_GIVEN)
    ints[I_CMD_N] = k + 1
    return True


# ---- the way out: events routed, reports rendered by gateway/report_render.py ----------------
@njit(cache=True)
def _i64_at(buf, at):
    return buf[at:at + 8].view(np.int64)[0]


@njit(cache=True)
def _i32_at(buf, at):
    return np.int64(buf[at:at + 4].view(np.int32)[0])


@njit(cache=True)
def _deliver(sock, sid, ptr, size, sid_key, sid_i, ints, fails, checks):
    """One message to session sid, now. A send libzmq refuses goes on the `fails` list
    (sid, errno) for the outbox's rules, and the session gets nothing more from this lane; a
    session whose byte budget is spent goes on the `checks` list (once)."""
    s = sid_i[sid]
    if s[S_LIVE] == 0:
        return
    r = zmq_send(sock, np.int64(sid_key.ctypes.data) + sid * sid_key.shape[1], s[S_KLEN],
                 DONTWAIT | SNDMORE)
    if r >= 0:
        r = zmq_send(sock, ptr, size, DONTWAIT)
    if r < 0:
        f = ints[I_FAIL_N]
        fails[f, 0] = sid
        fails[f, 1] = zmq_errno()
        ints[I_FAIL_N] = f + 1
        s[S_LIVE] = 0
        return
    s[S_OUT] += size + MESSAGE_OVERHEAD
    s[S_ROOM] -= size + MESSAGE_OVERHEAD
    if s[S_ROOM] <= 0 and s[S_CHECK] == 0:
        s[S_CHECK] = 1
        checks[ints[I_CHECK_N]] = sid
        ints[I_CHECK_N] += 1


# ---- the durable hold (PROTOCOL: acks and fills only once journaled; gateway/outbox.py) ------
# Held messages wait in two rings: entries (seq, sid, generation, byte position, size) and
# their bytes, each message contiguous (one that would straddle the end starts at 0). Byte
# positions only grow; a position's place is position % capacity.
H_SEQ, H_SID, H_GEN, H_POS, H_SIZE = range(5)


@njit(cache=True)
def hold_room(ints, h_meta, h_bytes, messages, size):
    """Whether `messages` more of `size` bytes each fit."""
    cap = len(h_bytes)
    return ints[I_H_TAIL] - ints[I_H_HEAD] + messages <= len(h_meta) and \
        ints[I_B_TAIL] + messages * 2 * size - ints[I_B_HEAD] <= cap


@njit(cache=True)
def hold(ints, h_meta, h_bytes, seq, sid, gen, buf, size):
    """Keep buf[:size] for session sid until seq is journaled (hold_room said it fits)."""
    cap = len(h_bytes)
    pos = ints[I_B_TAIL]
    at = pos % cap
    if at + size > cap:                    # straddles the end: start at 0
        pos += cap - at
        at = 0
    h_bytes[at:at + size] = buf[:size]
    row = h_meta[ints[I_H_TAIL] % len(h_meta)]
    row[H_SEQ] = seq
    row[H_SID] = sid
    row[H_GEN] = gen
    row[H_POS] = pos
    row[H_SIZE] = size
    ints[I_H_TAIL] += 1
    ints[I_B_TAIL] = pos + size


@njit(cache=True)
def release_pass(lane, upto):
    """Send what is held for events up to `upto` (journaled) to its sessions if they are
    still the ones it was for; returns how many entries left the hold."""
    sock, ints, h_meta, h_bytes = lane.sock, lane.ints, lane.h_meta, lane.h_bytes
    sid_key, sid_i, fails, checks = lane.sid_key, lane.sid_i, lane.fails, lane.checks
    n = 0
    cap = len(h_bytes)
    base = np.int64(h_bytes.ctypes.data)
    while ints[I_H_HEAD] < ints[I_H_TAIL]:
        row = h_meta[ints[I_H_HEAD] % len(h_meta)]
        if row[H_SEQ] > upto:
            break
        sid = row[H_SID]
        if sid_i[sid, S_GEN] == row[H_GEN]:
            _deliver(sock, sid, base + row[H_POS] % cap, row[H_SIZE], sid_key, sid_i, ints,
                     fails, checks)
        ints[I_H_HEAD] += 1
        ints[I_B_HEAD] = row[H_POS] + row[H_SIZE]
        n += 1
    if ints[I_H_HEAD] == ints[I_H_TAIL]:
        ints[I_B_HEAD] = ints[I_B_TAIL]
    return n


@njit(cache=True)
def _send(sock, seq, sid, buf, size, sid_key, sid_i, ints, fails, checks, h_meta, h_bytes):
    """A message caused by event seq: held in durable mode, else delivered now."""
    if ints[I_DURABLE]:
        if sid_i[sid, S_LIVE]:
            hold(ints, h_meta, h_bytes, seq, sid, sid_i[sid, S_GEN], buf, size)
    else:
        _deliver(sock, sid, np.int64(buf.ctypes.data), size, sid_key, sid_i, ints, fails,
                 checks)


@njit(cache=True)
def _member(code, codes):
    for c in codes:
        if c == code:
            return True
    return False


@njit(cache=True)
def route_pass(lane, ev, start, n, mine):
    """Route events start..n-1 of `ev` (128 bytes each, from a command boundary on). Returns
    n, or the index of an event handed to Python: its report numbers are in ints (I_PAIRS
    pairs of account and account_seq at I_A0.., role 0 first), its command in cur_cmd, its
    position in the command in ints[I_INDEX]. Market-data trades (md_idx), held replies'
    times (acks: seq, the command's ts; a fast reply's wait goes into the ack-latency
    histogram at once), failed sends and sessions to check accumulate in ints' counts until
    Python takes them."""
    ints, sock, out, plain, scratch, rec = (lane.ints, lane.sock, lane.out, lane.plain,
                                            lane.scratch, lane.rec)
    sid_key, sid_i, acct_sids, acct_n, pend, account_seq = (
        lane.sid_key, lane.sid_i, lane.acct_sids, lane.acct_n, lane.pend, lane.account_seq)
    l_slot_of, l_slot_account, l_records, l_fields, l_count, l_head, l_totals = (
        lane.l_slot_of, lane.l_slot_account, lane.l_records, lane.l_fields, lane.l_count,
        lane.l_head, lane.l_totals)
    cur_cmd, versions, md_idx, acks, fails, checks = (lane.cur_cmd, lane.versions, lane.md_idx,
                                                      lane.acks, lane.fails, lane.checks)
    h_meta, h_bytes, routed, account_cmds = lane.h_meta, lane.h_bytes, lane.routed, \
        lane.account_cmds
    r_blob, r_at, r_priced, r_sym, r_sym_len, r_tick, r_lot = (
        lane.r_blob, lane.r_at, lane.r_priced, lane.r_sym, lane.r_sym_len, lane.r_tick,
        lane.r_lot)
    ts_buf, ack_bounds, ack_counts, ack_sum = (lane.ts_buf, lane.ack_bounds, lane.ack_counts,
                                               lane.ack_sum)
    nacc = len(account_seq)
    for e in range(start, n):
        off = e * EVENT_BYTES
        etype = ev[off + EV_ETYPE_AT]
        seq = _i64_at(ev, off + EV_SEQ_AT)
        boot = seq <= ints[I_BOOT]    # the state copy the gateway started from has it
        if etype == EV_COMMAND:
            code = np.int64(ev[off + EV_COMMAND_AT + CMD_CODE_AT])
            acct = _i32_at(ev, off + EV_COMMAND_AT + CMD_ACCOUNT_AT)
            # gateway/views.py: which views this command may change
            if _member(code, account_cmds):
                if 0 <= acct < nacc:
                    versions[acct] = seq
            else:
                ints[I_ALL_VERSION] = seq
            if not boot:
                cur_cmd[:] = ev[off + EV_COMMAND_AT:off + EVENT_BYTES]
                ints[I_CMD_CODE] = code
                ints[I_INDEX] = 0
            ints[I_PAIRS] = 0
            if _member(code, routed):
                ints[I_PY_CMD] = 0
                continue
            ints[I_PY_CMD] = 1
            return e
        if ints[I_DURABLE] and not hold_room(ints, h_meta, h_bytes, 2 * acct_sids.shape[1],
                                             MAX_REPORT_BYTES):
            ints[I_FULL] = 1
            return e                  # Python grows the hold and calls again from e
        account = _i32_at(ev, off + EV_ACCOUNT_AT)
        maker = _i32_at(ev, off + EV_MAKER_AT) if etype == EV_TRADE else np.int64(-1)
        if etype == EV_TRADE:
            if 0 <= account < nacc:
                versions[account] = seq
            if 0 <= maker < nacc:
                versions[maker] = seq
            if ints[I_MD_ON]:
                md_idx[ints[I_MD_N]] = e
                ints[I_MD_N] += 1
        elif etype < EV_FUNDING and etype != EV_BALANCE and etype != EV_MARK:
            if 0 <= account < nacc:
                versions[account] = seq
        pairs = 0
        kept0 = kept1 = rec           # the reports just kept (log_append's views)
        if not boot:
            index = ints[I_INDEX] + 1
            ints[I_INDEX] = index
            # the one numbering rule (engine/reports.py), compiled as persistd's store has it
            first, second = _report_accounts(ints[I_CMD_CODE], index, etype, account, maker,
                                             nacc)
            for a in (first, second):
                if a < 0:
                    continue
                account_seq[a] += 1
                ints[I_A0 + 2 * pairs] = a
                ints[I_S0 + 2 * pairs] = account_seq[a]
                kept = log_append(l_slot_of, l_slot_account, l_records, l_fields, l_count,
                                  l_head, l_totals, a, account_seq[a], seq, index, pairs,
                                  cur_cmd, ev[off:off + EVENT_BYTES])
                if pairs == 0:
                    kept0 = kept
                else:
                    kept1 = kept
                pairs += 1
        ints[I_PAIRS] = pairs
        if ints[I_PY_CMD] or etype >= EV_FUNDING or etype == EV_BALANCE or \
                (etype == EV_MARK and ints[I_MD_ON]):
            return e
        for k in range(pairs):
            if acct_n[ints[I_A0 + 2 * k]] < 0:
                return e              # a session the lane could not learn: Python sends
        if boot or pairs == 0:
            continue
        source = ev[off + EV_SOURCE_AT]
        req = _i32_at(ev, off + EV_REQ_AT)
        requester = -1
        rid = np.int64(0)
        has_rid = False
        if source == mine and req != 0:
            if req < COMPILED_REQ:
                return e              # a request of the Python lane: its reply is Python's
            row = pend[req & (len(pend) - 1)]
            kind = row[P_KIND]        # bit 0: cancel (else new_order); + 2: it had a rid
            if row[P_REQ] == req and row[P_ACCT] == account and (
                    etype == EV_REJECT or etype == (EV_CANCELED if kind & 1 else EV_ACK)):
                row[P_REQ] = 0
                sid = row[P_SID]
                if sid_i[sid, S_LIVE] and sid_i[sid, S_GEN] == row[P_GEN]:
                    requester = sid
                rid = row[P_RID]
                has_rid = kind >= 2
                if ints[I_DURABLE]:   # the hold's release says when it went (Python)
                    k = ints[I_ACK_N]
                    acks[k, 0] = seq
                    acks[k, 1] = _i64_at(cur_cmd, CMD_TS_AT)
                    ints[I_ACK_N] = k + 1
                else:                 # sent below, now: gateway/ack_latency.py's buckets
                    wait_ns = max(0, _now_ns(ts_buf) - _i64_at(cur_cmd, CMD_TS_AT))
                    ack_counts[np.searchsorted(ack_bounds, wait_ns)] += 1
                    ack_sum[0] += wait_ns
        index = ints[I_INDEX]
        for role in range(pairs):
            a = ints[I_A0 + 2 * role]
            a_seq = ints[I_S0 + 2 * role]
            record = kept0 if role == 0 else kept1
            plain_n = -1
            for j in range(acct_n[a]):
                sid = acct_sids[a, j]
                if role == 0 and sid == requester and has_rid:
                    o = render_into(record, role, index, a_seq, True, rid, out, 0, r_blob, r_at,
                                    r_priced, r_sym, r_sym_len, r_tick, r_lot, scratch)
                    if o > 0:
                        _send(sock, seq, sid, out, o, sid_key, sid_i, ints, fails, checks,
                              h_meta, h_bytes)
                    continue
                if plain_n < 0:
                    plain_n = render_into(record, role, index, a_seq, False, 0, plain, 0, r_blob,
                                          r_at, r_priced, r_sym, r_sym_len, r_tick, r_lot,
                                          scratch)
                if plain_n > 0:
                    _send(sock, seq, sid, plain, plain_n, sid_key, sid_i, ints, fails,
                          checks, h_meta, h_bytes)
    return n


class AccountSeqs:
    """AccountSeqTracker's `last`, read from the lane's counters (gateway/replay.py)."""

    def __init__(self, counters: np.ndarray):
        self.counters = counters

    def last(self, account: int) -> int:
        return int(self.counters[account]) if 0 <= account < len(self.counters) else 0


class CompiledLane:
    """The arrays both calls share, the calls the gateway's loop makes, and what Python
    tells the lane of its sessions."""

    def __init__(self, gw):
        self.gw = gw
        self.sock = gw.router.underlying
        self.zmsg = np.zeros(64, np.uint8)           # a zmq_msg_t (64 bytes in libzmq)
        self.user_id_key = _cstr(b"User-Id")
        self.ts_buf = np.zeros(2, np.int64)
        max_frame = gw.limits["hard_max_message_bytes"]
        self.arena = np.zeros(max(ARENA, 4 * (ID_MAX + max_frame)), np.uint8)
        self.ints = np.zeros(N_INTS, np.int64)
        self.ints[I_MAX_FRAME] = max_frame
        self.ints[I_NEXT_REQ] = COMPILED_REQ
        self.ints[I_BOOT] = gw.boot_seq
        self.ints[I_MD_ON] = gw.market_data is not None
        accounts = gw.cfg.max_accounts
        per_account = gw.limits["max_connections_per_account"]
        sids = 2 * gw.limits["max_connections"] + 16
        self.id_key = np.zeros((ID_CAP, ID_MAX), np.uint8)
        self.id_klen = np.zeros(ID_CAP, np.int64)
        self.id_sid = np.full(ID_CAP, -1, np.int64)
        self.sid_key = np.zeros((sids, ID_MAX), np.uint8)
        self.sid_i = np.zeros((sids, N_SCOLS), np.int64)
        self.free_sids = list(range(sids - 1, -1, -1))
        self.sid_of: dict = {}            # Session -> sid
        self.session_of: dict = {}        # sid -> Session
        self.acct_sids = np.zeros((accounts, per_account), np.int64)
        self.acct_n = np.zeros(accounts, np.int64)
        self.pend = np.zeros((PEND_CAP, N_PCOLS), np.int64)
        self.account_seq = np.asarray(gw._boot_account_seqs, np.int64).copy()
        # the replay log (gateway/report_log_arrays.py): route() keeps every report in it,
        # `replay` reads it
        kept = gw.replayer.log
        self.report_log = ArrayReportLog(kept.keep, kept.max_accounts * kept.keep * ENTRY_BYTES,
                                         accounts=accounts)
        gw.replayer.log = self.report_log
        gw.replayer.tracker = AccountSeqs(self.account_seq)
        gw.memory.parts["replay"] = self.report_log.bytes
        self.cur_cmd = np.zeros(COMMAND_BYTES, np.uint8)
        # the views' versions (gateway/views.py), kept by route() from now on
        self.versions = np.zeros(accounts, np.int64)
        for account, seq in gw.views.versions.items():
            if 0 <= account < accounts:
                self.versions[account] = seq
        gw.views.versions = self.versions
        self.ints[I_ALL_VERSION] = gw.views.all_version
        self.md_idx = np.zeros(OUT_CAP, np.int64)
        self.acks = np.zeros((OUT_CAP, 2), np.int64)
        self.fails = np.zeros((sids, 2), np.int64)     # each session once (S_LIVE, S_CHECK)
        self.checks = np.zeros(sids, np.int64)
        self.out = np.zeros(MAX_REPORT_BYTES, np.uint8)
        self.plain = np.zeros(MAX_REPORT_BYTES, np.uint8)
        self.rec = np.zeros(COMMAND_BYTES + EVENT_BYTES, np.uint8)
        self.scratch = np.zeros(SCRATCH_BYTES, np.uint8)
        m = gw.cfg.max_markets
        self.mk_sym = np.zeros((m, 24), np.uint8)
        self.mk_symlen = np.zeros(m, np.int64)
        self.mk_tick = np.ones((m, 2), np.int64)
        self.mk_lot = np.ones((m, 2), np.int64)
        self.mk_maxp = np.zeros(m, np.int64)
        self.mk_maxq = np.zeros(m, np.int64)
        self.load_markets()
        lim = gw.requests.limiter          # gateway/sessions.py: its arrays are shared
        self.tokens, self.token_ts = lim.tokens, lim.token_ts
        self.rate_per_ns = float(lim.rate)
        self.burst = float(lim.burst)
        self.ints[I_DURABLE] = gw.durable
        self.h_meta = np.zeros((1 << 14, 5), np.int64)
        self.h_bytes = np.zeros(4 << 20, np.uint8)
        self.deferred = np.zeros((512, 6), np.int64)
        l_slot_of, l_slot_account, l_records, l_fields, l_count, l_head, l_totals = \
            self.report_log.arrays()
        r_blob, r_at, r_priced, r_sym, r_sym_len, r_tick, r_lot = self.render
        ack = gw.outbox.ack_latency         # its histogram, which route() adds to
        self.arrays = lane_arrays(
            sock=self.sock, zmsg=self.zmsg, user_id_key=self.user_id_key, ts_buf=self.ts_buf,
            arena=self.arena, ints=self.ints, id_key=self.id_key, id_klen=self.id_klen,
            id_sid=self.id_sid, sid_i=self.sid_i, pend=self.pend, key_bytes=KEY_BYTES,
            key_len=KEY_LEN, mk_sym=self.mk_sym, mk_symlen=self.mk_symlen,
            mk_tick=self.mk_tick, mk_lot=self.mk_lot, mk_maxp=self.mk_maxp,
            mk_maxq=self.mk_maxq, tokens=self.tokens, token_ts=self.token_ts,
            rate_per_ns=self.rate_per_ns, burst=self.burst, cmd=gw.ring.records,
            deferred=self.deferred, out=self.out, plain=self.plain, scratch=self.scratch,
            rec=self.rec, sid_key=self.sid_key, acct_sids=self.acct_sids, acct_n=self.acct_n,
            account_seq=self.account_seq, l_slot_of=l_slot_of, l_slot_account=l_slot_account,
            l_records=l_records, l_fields=l_fields, l_count=l_count, l_head=l_head,
            l_totals=l_totals, cur_cmd=self.cur_cmd, versions=self.versions,
            md_idx=self.md_idx, acks=self.acks, fails=self.fails, checks=self.checks,
            h_meta=self.h_meta, h_bytes=self.h_bytes, routed=ROUTED_COMMANDS,
            account_cmds=ACCOUNT_COMMANDS_ARR, r_blob=r_blob, r_at=r_at, r_priced=r_priced,
            r_sym=r_sym, r_sym_len=r_sym_len, r_tick=r_tick, r_lot=r_lot,
            ack_bounds=ack.bounds_ns, ack_counts=ack.counts, ack_sum=ack.sum_ns)

    def load_markets(self) -> None:
        """The gateway's market table (gateway.market_by_id) into the lane's arrays: at
        start, and after an admin command changed a market (gateway/routing.py)."""
        self.render = render_tables() + market_arrays(self.gw.market_by_id)
        if hasattr(self, "arrays"):
            set_render(self.arrays, *self.render)
        self.mk_symlen[:] = 0
        for i, market in enumerate(self.gw.market_by_id):
            if market is None:
                continue
            sym = market.symbol.encode()
            self.mk_sym[i] = 0
            self.mk_sym[i, :len(sym)] = np.frombuffer(sym, np.uint8)
            self.mk_symlen[i] = len(sym)
            self.mk_tick[i] = (market.tick.mantissa, market.tick.exponent)
            self.mk_lot[i] = (market.lot.mantissa, market.lot.exponent)
            self.mk_maxp[i] = market.max_price_ticks or (1 << 62)
            self.mk_maxq[i] = market.max_order_lots or (1 << 62)

    # -- the two calls -----------------------------------------------------------------
    def recv(self, max_msgs: int) -> int:
        return recv_pass(self.arrays, min(max_msgs, len(self.deferred)))

    def route(self, ev_bytes: np.ndarray, start: int, n: int, mine: int) -> int:
        return route_pass(self.arrays, ev_bytes, start, n, mine)

    def warm(self) -> None:
        """Load both calls' machine code now (numba loads it at the first call), so that
        the gateway's memory base (gateway/memory.py) counts it, with the lane's tables of
        fixed size (written once, so their pages are the process's from now on)."""
        for table in (self.arena, self.pend, self.deferred, self.id_key,
                      self.sid_i, self.acct_sids):
            table.fill(0)
        self.recv(0)
        self.route(np.zeros(EVENT_BYTES, np.uint8), 0, 0, 0)
        self.release(-1)
        set_hold(self.arrays, self.h_meta, self.h_bytes)      # what a growth and an admin
        set_render(self.arrays, *self.render)                 # command call later
        hold_room(self.ints, self.h_meta, self.h_bytes, 1, 1)
        hold(np.zeros(N_INTS, np.int64), np.zeros((1, 5), np.int64), np.zeros(1, np.uint8), 0,
             0, 0, np.zeros(1, np.uint8), 1)
        for table in (self.h_meta, self.h_bytes):
            table.fill(0)
        keys = np.zeros((4, ID_MAX), np.uint8)
        lens = np.zeros(4, np.int64)
        slot = -id_find(keys, lens, keys[0], 0, 1) - 1
        lens[slot] = 1
        id_delete(keys, lens, np.zeros(4, np.int64), slot)

    # -- the durable hold --------------------------------------------------------------
    def grow_hold(self) -> None:
        """Twice the room: what is held moves to the front of new rings, in order."""
        ints = self.ints
        head, tail = int(ints[I_H_HEAD]), int(ints[I_H_TAIL])
        meta = self.h_meta[np.arange(head, tail) % len(self.h_meta)]
        old = self.h_bytes
        self.h_meta = np.zeros((2 * len(self.h_meta), 5), np.int64)
        self.h_bytes = np.zeros(2 * len(old), np.uint8)
        set_hold(self.arrays, self.h_meta, self.h_bytes)
        ints[I_H_HEAD] = ints[I_H_TAIL] = ints[I_B_HEAD] = ints[I_B_TAIL] = 0
        for seq, sid, gen, pos, size in meta.tolist():
            at = pos % len(old)
            hold(ints, self.h_meta, self.h_bytes, seq, sid, gen, old[at:at + size], size)
        ints[I_FULL] = 0

    def holds(self, s) -> bool:
        """Whether the session's held messages wait here (all of them do: one queue)."""
        return s in self.sid_of

    def hold(self, s, seq: int, payload: bytes) -> None:
        """A message the Python gateway holds for a session the lane knows (gateway/outbox.py),
        in the same queue as the lane's own, so the session gets them in order."""
        buf = np.frombuffer(payload, np.uint8).copy()
        while not hold_room(self.ints, self.h_meta, self.h_bytes, 1, len(buf)):
            self.grow_hold()
        sid = self.sid_of[s]
        hold(self.ints, self.h_meta, self.h_bytes, seq, sid, self.sid_i[sid, S_GEN], buf,
             len(buf))

    def releasable(self, upto: int) -> bool:
        ints = self.ints
        return ints[I_H_HEAD] < ints[I_H_TAIL] and \
            self.h_meta[ints[I_H_HEAD] % len(self.h_meta), H_SEQ] <= upto

    def release(self, upto: int) -> int:
        return release_pass(self.arrays, upto)

    def held_bytes(self) -> int:
        return int(self.ints[I_B_TAIL] - self.ints[I_B_HEAD])

    def cid_market(self, account: int, cid: int):
        """The market of the account's new order `cid` the lane sent and the matcher has not
        answered yet, or None (gateway/requests.py: amend by cid before the ack). Looks at
        the last CID_WINDOW requests only, so an amend of an unknown cid costs little."""
        newest = int(self.ints[I_NEXT_REQ])
        rows = self.pend[np.arange(newest - CID_WINDOW, newest) & (len(self.pend) - 1)]
        found = np.flatnonzero((rows[:, P_REQ] != 0) & (rows[:, P_ACCT] == account) &
                               (rows[:, P_CID] == cid) & ((rows[:, P_KIND] & 1) == 0))
        return int(rows[found[-1], P_MARKET]) if len(found) else None

    def held_count(self) -> int:
        """Messages waiting in the hold."""
        return int(self.ints[I_H_TAIL] - self.ints[I_H_HEAD])

    def pending_count(self) -> int:
        """The lane's requests not answered yet (a scan: for the stats, once a second)."""
        return int(np.count_nonzero(self.pend[:, P_REQ]))

    def adopt(self, raw: np.ndarray, e: int, pending: dict) -> None:
        """Event e, handed to Python, may be the reply to one of the lane's requests (its
        account's reports go through Python): the request moves to Python's pending table
        (gateway/requests.py's layout) for the router to answer."""
        off = e * EVENT_BYTES
        req = int(raw[off + EV_REQ_AT:off + EV_REQ_AT + 4].view(np.int32)[0])
        if req < COMPILED_REQ or raw[off + EV_SOURCE_AT] != self.gw.source_index:
            return
        row = self.pend[req & (len(self.pend) - 1)]
        etype = raw[off + EV_ETYPE_AT]
        reply = EV_CANCELED if row[P_KIND] & 1 else EV_ACK
        account = raw[off + EV_ACCOUNT_AT:off + EV_ACCOUNT_AT + 4].view(np.int32)[0]
        if row[P_REQ] != req or row[P_ACCT] != account or \
                (etype != reply and etype != EV_REJECT):
            return
        row[P_REQ] = 0
        sid = int(row[P_SID])
        s = self.session_of.get(sid) if self.sid_i[sid, S_GEN] == row[P_GEN] else None
        pending[req] = (s, int(row[P_RID]) if row[P_KIND] >= 2 else None, int(row[P_ACCT]),
                        R_CANCEL if row[P_KIND] & 1 else R_NEW_ORDER, int(row[P_CID]), None)

    def pairs(self) -> list:
        """The (account, account_seq) pairs of the event route() handed over, role 0 first."""
        ints = self.ints
        return [(int(ints[I_A0 + 2 * k]), int(ints[I_S0 + 2 * k]))
                for k in range(int(ints[I_PAIRS]))]

    # -- sessions: Python's lifecycle, told to the lane --------------------------------
    def learn(self, s) -> None:
        """A live, admitted session (gateway/sessions.py): the lane takes its messages and
        sends it its account's reports."""
        if s in self.sid_of or not 0 <= s.account < len(self.acct_n):
            return
        if len(s.identity) > ID_MAX or not self.free_sids:
            self._sync_account(s.account)     # Python routes this account's reports
            return
        buf = np.frombuffer(s.identity, np.uint8).copy()     # writable: one compiled form
        slot = id_find(self.id_key, self.id_klen, buf, 0, len(buf))
        if slot >= 0:         # another session with this routing id is still known
            self._sync_account(s.account)
            return
        slot = -slot - 1
        sid = self.free_sids.pop()
        self.id_key[slot, :len(buf)] = buf
        self.id_klen[slot] = len(buf)
        self.id_sid[slot] = sid
        self.sid_key[sid] = 0
        self.sid_key[sid, :len(buf)] = buf
        row = self.sid_i[sid]
        gen = row[S_GEN] + 1
        row[:] = 0
        row[S_ACCT], row[S_FD], row[S_GEN], row[S_LIVE] = s.account, s.fd, gen, 1
        row[S_KLEN] = len(buf)
        row[S_ROOM] = max(1, s.check_at - s.out_bytes)
        self.sid_of[s] = sid
        self.session_of[sid] = s
        self._sync_account(s.account)

    def forget(self, s) -> None:
        """The session stopped being live: nothing more to it from the lane."""
        sid = self.sid_of.pop(s, None)
        if sid is None:
            return
        self.count_out(sid)
        del self.session_of[sid]
        slot = id_find(self.id_key, self.id_klen, self.sid_key[sid], 0,
                       int(self.sid_i[sid, S_KLEN]))
        if slot >= 0:
            id_delete(self.id_key, self.id_klen, self.id_sid, slot)
        self.sid_i[sid, S_LIVE] = 0
        self.free_sids.append(sid)
        self._sync_account(s.account)

    def _sync_account(self, account: int) -> None:
        """The account's live sessions, in Python's order; -1 when the lane does not know
        one of them (no sid left): route() then hands the account's reports to Python."""
        conns = self.gw.sessions.by_account.get(account, ())
        sids = [self.sid_of.get(c, -1) for c in conns if c.live]
        if -1 in sids:
            self.acct_n[account] = -1
            return
        self.acct_sids[account, :len(sids)] = sids
        self.acct_n[account] = len(sids)

    # -- what the lane counted, to the outbox ------------------------------------------
    def count_out(self, sid: int) -> None:
        """The bytes the lane sent to sid since the last count, onto its Session."""
        s = self.session_of.get(sid)
        row = self.sid_i[sid]
        if s is not None:
            s.out_bytes += int(row[S_OUT])
        row[S_OUT] = 0
        row[S_CHECK] = 0
        if s is not None:
            row[S_ROOM] = max(1, s.check_at - s.out_bytes)

    def settle(self, outbox) -> None:
        """After route(): sessions whose budget is spent are checked, failed sends go to the
        outbox's rules."""
        ints = self.ints
        for k in range(int(ints[I_CHECK_N])):
            sid = int(self.checks[k])
            self.count_out(sid)
            s = self.session_of.get(sid)
            if s is not None and s.live and s.out_bytes >= s.check_at:
                outbox.check(s)
                if s.live and sid in self.session_of:
                    self.sid_i[sid, S_ROOM] = max(1, s.check_at - s.out_bytes)
        ints[I_CHECK_N] = 0
        for k in range(int(ints[I_FAIL_N])):
            s = self.session_of.get(int(self.fails[k, 0]))
            if s is not None:
                outbox.failed(s, int(self.fails[k, 1]))
                if s.live:          # still live (a closing connection): sends resume
                    self.sid_i[self.sid_of[s], S_LIVE] = 1
        ints[I_FAIL_N] = 0

    def count_all(self) -> None:
        for sid in self.session_of:
            self.count_out(sid)


def lane_is_cached() -> bool:
    """Whether loading the lane reads numba's cache (False: it compiles, minutes on a cold
    cache); engine/matcher.py's matcher_is_cached, for the lane's largest call."""
    try:
        return bool(route_pass._cache._cache_file._load_index())
    except (AttributeError, OSError, EOFError, ValueError):
        return False


def stand_in_gateway():
    """The least of a Gateway that CompiledLane reads, at the smallest sizes, with the types
    a real one gives the calls (so that what it compiles is what a gateway loads): for
    compile_lane and the tests. Its socket handle is 0: nothing may be sent through it."""
    from types import SimpleNamespace

    from gateway.ack_latency import AckLatency
    from gateway.replay import ReportLog
    from gateway.sessions import TokenBucket
    from gateway.views import Views
    return SimpleNamespace(
        router=SimpleNamespace(underlying=0), boot_seq=0, market_data=None, source_index=0,
        cfg=SimpleNamespace(max_accounts=4, max_markets=2), durable=False,
        limits={"max_connections": 2, "max_connections_per_account": 2,
                "hard_max_message_bytes": 1024},
        _boot_account_seqs=np.zeros(4, np.int64), views=Views(),
        replayer=SimpleNamespace(log=ReportLog(4)), memory=SimpleNamespace(parts={}),
        market_by_id=[None, None], sessions=SimpleNamespace(by_account={}),
        outbox=SimpleNamespace(ack_latency=AckLatency()),
        requests=SimpleNamespace(limiter=TokenBucket(1.0, 1.0, 4)),
        ring=SimpleNamespace(records=np.zeros(8, COMMAND_DTYPE)))


def compile_lane() -> None:
    """Compile (or load) every call of the lane with the types a gateway gives them, on a
    stand-in gateway: before the tests and a first start, so that no gateway compiles while
    its clients wait (perpx/progress.py)."""
    from gateway.book_render import BookDeltas
    from gateway.mirror_arrays import ArrayMirror, ArrayMirrorQueries
    CompiledLane(stand_in_gateway()).warm()
    mirror = ArrayMirror(2)
    mirror.apply(np.zeros(EVENT_BYTES, np.uint8), 0)
    ArrayMirrorQueries(mirror).warm()
    BookDeltas(mirror, [None, None]).warm()
