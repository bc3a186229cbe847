"""Every message gets exactly one reply with its `rid` (and `cid`) whenever they can be read,
whatever its shape: any msgpack type in any field, frames up to the hard limit, several
frames; nothing a client sends writes a traceback (issue 14 item 5)."""

import math
from collections import Counter

import msgpack
import pytest

from tests.gateway_fixtures import WAIT_S, Exchange
from tests.shm_workers import shm_prefix  # noqa: F401 — fixture: unique prefix, leak check

ODD_VALUES = [None, True, False, 0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, 1.5, math.nan,
              "", "x" * 200, "BTC-PERP", b"\x00\xff", [], [1, [2, {"a": None}]], {},
              {"a": {"b": [1]}}, msgpack.ExtType(5, b"abc"), msgpack.Timestamp(1, 0)]
REQUESTS = [
    {"type": "new_order", "cid": 7, "market": "BTC-PERP", "side": "buy", "qty": "0.001",
     "price": "60000", "kind": "limit", "tif": "gtc", "reduce_only": False,
     "stp": "cancel_taker", "trigger_price": "61000", "trigger_by": "mark"},
    {"type": "cancel", "cid": 7, "oid": 1},
    {"type": "amend", "cid": 7, "oid": 1, "price": "60001", "qty": "0.002",
     "market": "BTC-PERP"},
    {"type": "cancel_all", "market": "BTC-PERP"},
    {"type": "withdraw", "amount": "1"},
    {"type": "set_margin", "market": "BTC-PERP", "mode": "cross", "leverage": 5},
    {"type": "book", "market": "BTC-PERP", "depth": 3},
    {"type": "open_orders", "market": "BTC-PERP"},
    {"type": "account"},
    {"type": "hello", "cancel_on_disconnect": False},
    {"type": "ping"},
    {"type": "no_such_type"},
]


@pytest.fixture
def exchange(shm_prefix, tmp_path):
    ex = Exchange(shm_prefix, tmp_path)
    try:
        ex.start_matcher()
        ex.start_gateway(rate_per_s=1e9, burst=1e9)
        yield ex
    finally:
        ex.close()


def shapes():
    """(frames, rid the reply must carry or None, cid it must carry or None)."""
    rid = 1000
    out = []
    for base in REQUESTS:
        for field in list(base) + ["rid", "account", "extra"]:
            for value in ODD_VALUES:
                rid += 1
                msg = dict(base, rid=rid)
                msg[field] = value
                want_rid = value if field == "rid" and type(value) is int else (
                    None if field == "rid" else rid)
                cid = msg.get("cid")
                want_cid = cid if type(cid) is int and "cid" in msg else None
                out.append(([msgpack.packb(msg)], want_rid, want_cid))
    for value in ODD_VALUES:                     # not a map at all
        out.append(([msgpack.packb(value)], None, None))
    for raw in (b"", b"\xc1", b"\x81\xa3rid", b"\xdf\xff\xff\xff\xff", b"\x80" * 5):
        out.append(([raw], None, None))
    # keys that are not strings: a strict map refuses them, the rid is still read
    for key in (1, None, (1, 2), b"k", 1.5):
        rid += 1
        out.append(([msgpack.packb({key: 1, "rid": rid, "type": "ping"})], rid, None))
    # deep nesting, a huge declared length
    for depth in (500, 3000):       # beyond msgpack's 1024 levels the rid is unreadable
        rid += 1
        head = msgpack.packb({"type": "ping", "rid": rid})
        deep = bytes([head[0] + 1]) + head[1:] + b"\xa1x" + b"\x91" * depth + b"\xc0"
        out.append(([deep], rid if depth < 1024 else None, None))
    # sizes up to the hard limit (64 KiB), and several frames
    for size in (1000, 1025, 4096, 65000):
        rid += 1
        msg = {"type": "new_order", "cid": 9, "rid": rid, "pad": ""}
        msg["pad"] = "p" * (size - len(msgpack.packb(msg)))
        out.append(([msgpack.packb(msg)], rid, 9 if size > 1024 else None))
    for tail in ([b"x"], [b""], [b"a", b"b"], [msgpack.packb({"type": "ping"})]):
        rid += 1
        out.append(([msgpack.packb({"type": "ping", "rid": rid, "cid": 3})] + tail, rid, 3))
    rid += 1
    out.append(([b"", msgpack.packb({"type": "ping", "rid": rid})], None, None))
    return out


def test_every_shape_gets_exactly_one_reply_with_its_rid(capfd, exchange):
    a = exchange.client(1)
    cases = shapes()
    replies = []
    for start in range(0, len(cases), 200):
        chunk = cases[start:start + 200]
        for frames, _, _ in chunk:
            a.send_raw(*frames)
        for _ in chunk:
            m = a.recv(WAIT_S)
            assert m is not None, f"no reply ({len(replies)} replies to {start + len(chunk)})"
            replies.append(m)
    assert a.recv(0.5) is None, "a message got more than one reply"
    assert len(replies) == len(cases) > 1000
    # each rid as often as it was sent (the odd int rids repeat), every other reply without
    assert Counter(m.get("rid") for m in replies) == Counter(rid for _, rid, _ in cases)
    by_rid = {m["rid"]: m for m in replies if "rid" in m}
    for _, rid, cid in cases:
        if rid is not None and 1000 < rid < 10 ** 6 and cid is not None and \
                by_rid[rid]["type"] == "reject":      # (the unique rids)
            assert by_rid[rid].get("cid") == cid, (by_rid[rid], rid)
    assert a.request(type="ping")["type"] == "pong"
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "refused" in line]) <= 40, err[-2000:]
