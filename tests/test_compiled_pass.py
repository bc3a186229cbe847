"""The compiled lane's readers and its mirror against their oracles (msgpack,
engine/units.py, gateway/mirror.py); its writers are report_render's (test_report_render)."""

from decimal import Decimal

import msgpack
import numpy as np
from hypothesis import example, given, settings, strategies as st

from engine.records import (EV_ACK, EV_AMENDED, EV_CANCELED, EV_DONE, EV_MARK, EV_TRADE,
                            EV_TRIGGERED)
from engine.units import EdgeReject, Grid
from gateway import compiled_pass as cp

INT64 = st.integers(-2 ** 63, 2 ** 63 - 1)


@settings(deadline=None)
@given(INT64)
def test_read_ints_are_msgpack_ints(v):
    buf = np.frombuffer(msgpack.packb(v), np.uint8)
    got, end, ok = cp._read_int(buf, 0)
    assert ok and got == v and end == len(buf)


@settings(max_examples=300, deadline=None)
@given(st.text("0123456789.", min_size=1, max_size=12), st.sampled_from(["0.1", "0.001", "5",
                                                                          "0.25", "1"]))
def test_decimal_units_agree_with_the_grid_or_defer(text, step):
    grid = Grid(Decimal(step), "tick size")
    buf = np.frombuffer(text.encode(), np.uint8)
    got = cp._decimal_units(buf, 0, len(buf), grid.mantissa, grid.exponent)
    try:
        want = grid.units(text, 1, 2, "price")
    except EdgeReject:
        want = None
    if got == -1:
        return                       # deferred: Python gives the exact reject (or accepts)
    assert want == got


def _same_answers(py, arr, cfg):
    """Every query the gateway makes of its mirror (gateway/mirror.py, "queries"), asked of
    both."""
    assert arr.applied_seq == py.applied_seq
    for m in range(cfg.max_markets):
        assert arr.book_version(m) == py.book_version(m)
        assert arr.market_row(m) == py.market_row(m)
        for depth in (0, 2):
            assert arr.book_levels(m, depth) == py.book_levels(m, depth)
    assert arr.any_dirty == py.any_dirty
    dirty = py.dirty_markets()
    assert arr.dirty_markets() == dirty
    for m in range(cfg.max_markets):       # a clean market's take is ([], []) in both
        taken = py.take_dirty(m)
        assert arr.take_dirty(m) == taken and (m in dirty) == (taken != ([], []))
    assert not arr.any_dirty and arr.dirty_markets() == py.dirty_markets() == []
    for account in range(cfg.max_accounts):
        for market in (None, 0, 1):
            want = sorted((oid, o[:8], status)
                          for oid, o, status in py.open_orders(account, market))
            got = [(oid, o, status) for oid, o, status in arr.open_orders(account, market)]
            assert sorted(got) == want
            assert [oid for oid, _, status in got if status == "open"] == sorted(
                oid for oid, _, status in want if status == "open")
    # by oid and by cid; for the owner, another account, and orders that do not exist
    asked = [(o[0], oid, o[1]) for table in (py.orders, py.untriggered)
             for oid, o in table.items()]
    asked += [(account + 1, oid, cid) for account, oid, cid in asked]
    asked += [(0, 10 ** 15, -12345), (1, -1, 0)]
    for account, oid, cid in asked:
        for by_oid, by_cid in ((oid, cid), (0, cid), (oid, 0)):
            assert arr.order_of(account, by_oid, by_cid) == py.order_of(account, by_oid, by_cid)
            assert arr.untriggered_of(account, by_oid, by_cid) == \
                py.untriggered_of(account, by_oid, by_cid)
    for table, query in ((py.orders, py.order_of), (py.untriggered, py.untriggered_of)):
        for oid, o in table.items():          # hits for the owner, by oid and by cid
            assert query(o[0], oid, 0) == query(o[0], 0, o[1]) == o


def test_array_mirror_follows_the_python_mirror():
    """The compiled mirror against gateway/mirror.py (itself checked against the matcher's
    state in test_gateway_units), on the fuzzers' streams, from the start and from a copy
    taken in the middle."""
    from engine.matcher import LocalEvents, Matcher
    from gateway.mirror import Mirror, apply_events, comparable
    from gateway.mirror_arrays import ArrayMirror, ArrayMirrorQueries
    from tests.fuzz_streams import FUZZ_CONFIG, genesis, random_stream

    cfg = FUZZ_CONFIG
    for seed in (5, 6, 7):
        commands = np.concatenate([genesis(), random_stream(seed, 4000)])
        matcher = Matcher(cfg)
        ring = LocalEvents(1 << 14)
        py = Mirror(cfg.max_markets, track_dirty=True)
        arr = ArrayMirror.from_mirror(py, initial=16)      # it has to grow
        late = late_py = None
        start = 0
        seen = set()
        waited = False
        while start < len(commands):
            done, end = matcher.process(commands, ring.sink, 0, ring.capacity, 0, True, start,
                                        64)
            raw = ring.slots[:end]
            seen.update(np.unique(raw["etype"]).tolist())
            apply_events(py, raw.tobytes(), end)
            arr.apply(raw.view(np.uint8).reshape(-1), end)
            if late is not None:
                apply_events(late_py, raw.tobytes(), end)
                late.apply(raw.view(np.uint8).reshape(-1), end)
            start += done
            if late is None and start >= 2000:
                late_py = Mirror.from_state(matcher.state, matcher.seq, cfg.max_markets,
                                            track_dirty=True)
                late = ArrayMirror.from_mirror(late_py, initial=16)
                copy = ArrayMirror.from_mirror(py)       # a mirror's versions carry over
                assert copy.versions.tolist() == py.versions and any(py.versions)
            assert arr.comparable() == comparable(py)
            _same_answers(py, ArrayMirrorQueries(arr), cfg)
            if late is not None:
                _same_answers(late_py, ArrayMirrorQueries(late), cfg)
            waited = waited or bool(py.untriggered)
        assert late.comparable() == comparable(late_py) == comparable(py)
        assert py.orders and waited
        assert len(arr.o_keys) > 16 and len(arr.lv_keys) > 16
    assert {EV_ACK, EV_CANCELED, EV_AMENDED, EV_TRADE, EV_TRIGGERED, EV_DONE, EV_MARK} <= seen


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([True, True, False]), st.integers(1, 60)),
                max_size=300))
@example([(True, 6), (True, 29), (False, 6)])   # 6 and 29 hash to slot 15: 29 wraps to 0
def test_the_tables_keep_what_a_dict_keeps(ops):
    """Linear probing with backward-shift deletion, in a table of 16 slots holding up to 15
    of 60 keys: long probe chains, wrapping around, deletions inside them."""
    from gateway.mirror_arrays import _delete, _find
    keys = np.zeros((16, 3), np.int64)
    vals = np.zeros((16, 1), np.int64)
    want = {}
    for put, k in ops:
        i = _find(keys, k, 7, 0)
        if put and i < 0 and len(want) == 15:
            continue
        if put:
            if i < 0:
                i = -i - 1
                keys[i] = (k, 7, 0)
            vals[i, 0] = k * 10
            want[k] = k * 10
        elif i >= 0:
            _delete(keys, vals, i)
            del want[k]
        # every key kept is found, and no slot holds anything else (a lost entry would)
        assert np.count_nonzero(keys[:, 0]) == len(want)
        for key, val in want.items():
            j = _find(keys, key, 7, 0)
            assert j >= 0 and vals[j, 0] == val


def test_the_calls_read_the_hold_it_grew_into():
    """The calls read the lane's arrays through one struct (LaneArrays): a hold that grew
    (new rings) must be the one release_pass reads, in order, from where it was."""
    lane = cp.CompiledLane(cp.stand_in_gateway())
    lane.warm()
    entries = len(lane.h_meta)
    payload = np.arange(24, dtype=np.uint8)
    for seq in range(1, 3 * entries + 1):
        while not cp.hold_room(lane.ints, lane.h_meta, lane.h_bytes, 1, len(payload)):
            lane.grow_hold()
        cp.hold(lane.ints, lane.h_meta, lane.h_bytes, seq, 0, 0, payload, len(payload))
        if seq == entries // 2:
            assert lane.release(seq // 2) == seq // 2      # the first rings: head moves on
    assert len(lane.h_meta) >= 2 * entries               # it grew
    released = entries // 4
    assert lane.held_count() == 3 * entries - released
    assert lane.release(entries) == entries - released   # seqs in order across the growth
    assert lane.release(3 * entries - 1) == 2 * entries - 1
    assert lane.held_count() == 1 and not lane.releasable(3 * entries - 1)
    assert lane.releasable(3 * entries)


def test_take_changed_names_the_markets_admin_commands_changed():
    """ArrayMirror.take_changed, what the lane's loop asks per batch: the markets created or
    changed by the batch's admin commands (genesis), then none while only orders flow."""
    from engine.matcher import LocalEvents, Matcher
    from engine.records import (CMD_CREATE_MARKET, CMD_HALT, CMD_RESUME, CMD_SET_MARKET_LIMITS,
                                CMD_SET_MARKET_STATE, CMD_SETTLE_MARKET)
    from gateway.mirror_arrays import ArrayMirror
    from tests.fuzz_streams import FUZZ_CONFIG, genesis, random_stream

    admin_codes = {CMD_CREATE_MARKET, CMD_SET_MARKET_LIMITS, CMD_HALT, CMD_RESUME,
                   CMD_SET_MARKET_STATE, CMD_SETTLE_MARKET}
    cfg = FUZZ_CONFIG
    commands = np.concatenate([genesis(), random_stream(8, 400)])
    matcher = Matcher(cfg)
    ring = LocalEvents(1 << 14)
    arr = ArrayMirror(cfg.max_markets)
    start = 0
    named = []
    while start < len(commands):
        done, end = matcher.process(commands, ring.sink, 0, ring.capacity, 0, True, start, 8)
        arr.apply(ring.slots[:end].view(np.uint8).reshape(-1), end)
        admin = {int(c["market"]) for c in commands[start:start + done]
                 if int(c["cmd"]) in admin_codes}
        changed = arr.take_changed()
        assert set(changed) <= admin and list(changed) == sorted(changed)
        assert arr.take_changed() == ()                      # taken: cleared
        named += changed
        start += done
    created = {int(c["market"]) for c in genesis() if int(c["cmd"]) == CMD_CREATE_MARKET}
    assert len(created) > 1 and set(named) >= created      # genesis's markets were named
