"""gateway/report_render.py against its oracle, gateway/replay.py's `render_record` packed
by codec's `pack` (what the Python gateway sends), byte for byte.

The reports are the engine's own: the fuzz streams of tests/fuzz_streams.py run through the
matcher in batches and numbered by engine/report_numbering.py, each rendered with and without
rids (0, 1, 2**40, -5) and with two market tables (both fuzz markets known, and market 1 with
no table). The streams never set the flags the matcher ignores and only the gateway reads
(FLAG_CID_GIVEN, FLAG_ON_DISCONNECT), so the test sets them at random on the commands they
belong to; then every report type and branch occurs (asserted): ack, canceled (cancel-on-
disconnect too), amended, fill as taker and maker and of a liquidation, triggered, funding,
liquidation, reject at idx 1 and idx > 1, done with and without count and cid, a market with
no table. Hand-built records add what the streams do not reach: every field distinct per
report type (the streams keep some fields equal: an amended event's qty and remaining),
extreme integers and decimals, a 32-byte symbol (str8), unnamed reasons, and the codes the
renderer hands back to Python.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine.market import Market
from engine.matcher import LocalEvents, Matcher
from engine.records import (CMD_AMEND, CMD_CANCEL, CMD_CANCEL_ALL, CMD_NEW_ORDER,
                            CMD_SET_MARGIN, CMD_WITHDRAW, COMMAND_BYTES, COMMAND_DTYPE, EV_ACK,
                            EV_AMENDED, EV_BALANCE, EV_CANCELED, EV_DONE, EV_FUNDING,
                            EV_LIQUIDATION, EV_REJECT, EV_TRADE, EV_TRIGGERED, FLAG_CID_GIVEN,
                            FLAG_ON_DISCONNECT, REASON_LEVERAGE, REASON_USER, layout_of)
from engine.report_numbering import number_events
from engine.units import scaled_str
from gateway import report_render as rr
from gateway.codec import pack
from gateway.replay import render_record
from tests.fuzz_streams import FUZZ_CONFIG, genesis, random_stream

RIDS = (None, 0, 1, 2 ** 40, -5)
INT64 = st.integers(-2 ** 63, 2 ** 63 - 1)
# genesis() creates market 0 with atoms_per_tick_lot 100 and market 1 with 7: grids that give
# those (0.01 x 0.01 and 0.07 x 0.0001 USDC); market 1's symbol is 32 bytes (a str8)
MARKETS = [Market("BTC-PERP", 0, "0.01", "0.01"),
           Market("ETH-USDC-PERPETUAL-SWAP-LINEAR-1", 1, "0.07", "0.0001")]
TABLES = ([MARKETS[0], MARKETS[1], None], [MARKETS[0]])   # the second has no market 1


def oracle(record, role, idx, account_seq, market_by_id, rid):
    """What the Python gateway sends: render_record, with rid appended as outbox.to_account
    does for the requester's copy."""
    msg = render_record(record, role, idx, account_seq, market_by_id)
    if rid is not None:
        msg = dict(msg)
        msg["rid"] = rid
    return pack(msg), msg


def fuzz_reports(seed: int, n: int):
    """(record, role, idx, account_seq) of every report of a fuzz stream, in order."""
    commands = np.concatenate([genesis(), random_stream(seed, n)])
    rng = np.random.default_rng(seed)
    named = np.isin(commands["cmd"], (CMD_CANCEL, CMD_AMEND, CMD_CANCEL_ALL, CMD_WITHDRAW,
                                      CMD_SET_MARGIN))
    cid_given = named & (rng.random(len(commands)) < 0.5)
    on_disconnect = (commands["cmd"] == CMD_CANCEL_ALL) & (rng.random(len(commands)) < 0.5)
    commands["flags"] |= (np.where(cid_given, FLAG_CID_GIVEN, 0)
                          | np.where(on_disconnect, FLAG_ON_DISCONNECT, 0)).astype(np.uint8)
    matcher = Matcher(FUZZ_CONFIG)
    ring = LocalEvents(1 << 14)
    counters = np.zeros(FUZZ_CONFIG.max_accounts, np.int64)
    out = []
    start = 0
    while start < len(commands):
        done, end = matcher.process(commands, ring.sink, 0, ring.capacity, 0, True, start, 64)
        raw = ring.slots[:end].view(np.uint8).reshape(end, 128)
        for r in number_events(ring.slots[:end], counters):
            record = raw[r["command"], COMMAND_BYTES:].tobytes() + raw[r["event"]].tobytes()
            out.append((record, int(r["role"]), int(r["index"]), int(r["account_seq"])))
        start += done
    return out


def branches(msg: dict, idx: int) -> set:
    """The renderer's branches a report took, read off the oracle's message."""
    kind = msg["type"]
    got = {kind}
    if msg.get("market", "") is None:
        got.add("no table")
    elif kind == "fill":
        got.add(msg["liquidity"])
        if msg.get("liquidation"):
            got.add("liquidation fill")
    elif kind == "reject":
        got.add("reject idx > 1" if idx > 1 else "reject idx 1")
    elif kind == "done":
        got.add("done count" if "count" in msg else "done no count")
        got.add("done cid" if "cid" in msg else "done no cid")
    elif kind == "canceled" and msg["reason"] == "disconnect":
        got.add("disconnect")
    return got


def test_every_fuzz_report_renders_byte_identical():
    seen = set()
    n = 0
    for seed in (1, 5, 7):
        for record, role, idx, account_seq in fuzz_reports(seed, 6000):
            for market_by_id in TABLES:
                markets = rr.market_arrays(market_by_id)
                for rid in RIDS:
                    want, msg = oracle(record, role, idx, account_seq, market_by_id, rid)
                    got = rr.render(record, role, idx, account_seq, markets, rid)
                    assert got == want, (msg, record.hex())
                    n += 1
                seen |= branches(msg, idx)
    expected = {"ack", "canceled", "disconnect", "amended", "fill", "taker", "maker",
                "liquidation fill", "triggered", "funding", "liquidation", "reject idx 1",
                "reject idx > 1", "done count", "done no count", "done cid", "done no cid",
                "no table"}
    assert expected <= seen, expected - seen
    assert n > 150_000                 # about 19,000 reports, each ten ways


def _record(etype: int, command=None, **fields) -> bytes:
    """A 192-byte report record: a command (zero but for `command`), then an event of
    `etype`'s layout with `fields`."""
    cmd = np.zeros(1, COMMAND_DTYPE)
    for name, value in (command or {}).items():
        cmd[name] = value
    ev = np.zeros(1, layout_of(etype))
    ev["etype"] = etype
    for name, value in fields.items():
        ev[name] = value
    return cmd.tobytes() + ev.tobytes()


def _distinct(etype: int, command=None, **codes) -> bytes:
    """A record whose every int64 field (command and event) holds its own value, so a field
    read from the wrong place shows; the streams cannot catch that where two fields are
    always equal (an amended event's qty and remaining)."""
    cmd = {name: -(k + 1) * 1_000_003 for k, name in enumerate(COMMAND_DTYPE.names)
           if COMMAND_DTYPE[name] == np.int64}
    dtype = layout_of(etype)
    ev = {name: (k + 1) * 7_000_019 * (-1) ** k for k, name in enumerate(dtype.names)
          if dtype[name] == np.int64}
    return _record(etype, {**cmd, **(command or {})}, **{**ev, **codes})


EDGES = [
    # extreme integers everywhere an int is written, and decimals whose units x mantissa
    # overflow int64 (market 1's mantissa is 7) or print 32+ bytes
    _record(EV_ACK, seq=2 ** 63 - 1, ts_ns=-2 ** 63, market=1, cid=-2 ** 63,
                  oid=2 ** 63 - 1, price_ticks=2 ** 63 - 1, qty_lots=-2 ** 63,
                  remaining_lots=-1, kind=5, status=4, side=1),
    _record(EV_TRADE, seq=1, market=1, liquidation=7, side=1, fee_atoms=-2 ** 63,
                  maker_fee_atoms=2 ** 63 - 1, price_ticks=-1, qty_lots=10 ** 18,
                  maker_cid=-33, maker_oid=-129, trade_id=2 ** 32),
    # a reason with no name: canceled says None, a reject falls back to invalid_message
    _record(EV_CANCELED, market=0, reason=200, remaining_lots=5),
    _record(EV_CANCELED, market=0, reason=0),
    _record(EV_REJECT, reason=200, cid=-7, oid=9),
    # every field distinct, for each report type and its optional keys
    _distinct(EV_ACK, market=0, kind=0, side=1, status=2),
    _distinct(EV_ACK, market=1, kind=3, side=0, status=4),
    _distinct(EV_ACK, market=1, kind=2, side=1, status=1),
    _distinct(EV_CANCELED, {"cmd": CMD_CANCEL_ALL, "flags": FLAG_ON_DISCONNECT}, market=0,
              reason=REASON_USER),
    _distinct(EV_AMENDED, market=1),
    _distinct(EV_TRIGGERED, market=0, side=1, kind=4, status=4),
    _distinct(EV_TRADE, market=1, side=0, liquidation=0),
    _distinct(EV_FUNDING, market=0),
    _distinct(EV_LIQUIDATION, market=1, kind=2, side=1),
    _distinct(EV_REJECT, {"cmd": CMD_NEW_ORDER}, reason=REASON_LEVERAGE),
    _distinct(EV_REJECT, {"cmd": CMD_AMEND, "flags": FLAG_CID_GIVEN}, reason=7),
    _distinct(EV_DONE, {"cmd": CMD_CANCEL_ALL, "flags": FLAG_CID_GIVEN}),
    _distinct(EV_DONE, {"cmd": CMD_WITHDRAW}),
]


@pytest.mark.parametrize("record", EDGES)
@pytest.mark.parametrize("role", (0, 1))
def test_hand_built_edges_render_byte_identical(record, role):
    markets = rr.market_arrays(TABLES[0])
    for idx in (1, 2):
        for rid in RIDS:
            want, _ = oracle(record, role, idx, 9, TABLES[0], rid)
            assert rr.render(record, role, idx, 9, markets, rid) == want


@pytest.mark.parametrize("record", [
    _record(EV_ACK, market=0, side=2),              # Python: IndexError
    _record(EV_ACK, market=0, kind=6),              # Python: IndexError
    _record(EV_TRADE, market=0, side=2),            # the maker's side indexes from the end
    _record(EV_LIQUIDATION, market=0, kind=9),      # Python: KeyError
    _record(EV_BALANCE, market=0),                  # no report type
])
def test_codes_python_has_no_name_for_are_handed_back(record):
    assert rr.render(record, 1, 1, 9, rr.market_arrays(TABLES[0])) is None


@settings(deadline=None)
@given(INT64, st.sampled_from([1, 7, 25, 10 ** 17]), st.integers(0, rr.MAX_EXPONENT))
def test_decimals_are_scaled_str(units, mantissa, exponent):
    out = np.zeros(rr.SCRATCH_BYTES + 8, np.uint8)
    n = rr._w_scaled(out, 0, units, mantissa, exponent, np.zeros(rr.SCRATCH_BYTES, np.uint8))
    assert bytes(out[:n]) == pack(scaled_str(units * mantissa, exponent))


@settings(deadline=None)
@given(INT64)
def test_compiled_pass_ints_are_msgspec_ints(v):
    out = np.zeros(16, np.uint8)
    assert bytes(out[:rr._w_int(out, 0, v)]) == pack(v)


def test_too_little_room_is_refused():
    out = np.zeros(rr.MAX_REPORT_BYTES - 1, np.uint8)
    with pytest.raises(ValueError):
        rr.render_into(np.frombuffer(bytes(192), np.uint8), 0, 1, 1, False, 0, out, 0,
                       rr.BLOB, rr.AT, rr.PRICED, *rr.market_arrays(TABLES[0]),
                       np.zeros(rr.SCRATCH_BYTES, np.uint8))
