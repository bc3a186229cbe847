"""persistd.store: the DuckDB query store.

Events come from the real compiled matcher where practical (engine.matcher.Matcher with a
LocalEvents ring, commands from tests/engine_helpers.py and tests/fuzz_streams.py); the
expected rows are computed one event at a time from what the gateway would send on the wire
(gateway.codec messages, engine.units conversions), independently of the store's vectorised
numpy/SQL path. Extreme values use hand-built events.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal, localcontext

import duckdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from engine.matcher import LocalEvents, Matcher, drain
from engine.records import (CMD_SET_MARK, EV_ACK, EV_AMENDED, EV_BALANCE, EV_CANCELED,
                            EV_FUNDING, EV_INSURANCE, EV_LIQUIDATION, EV_MARK, EV_TRADE,
                            EV_TRIGGERED, EVENT_DTYPE, INSURANCE_EVENT_DTYPE, KIND_LIMIT,
                            REASON_NAMES, SIDE_BUY, SIDE_SELL, TIF_IOC, TRADE_EVENT_DTYPE,
                            new_commands)
from gateway import codec
from gateway.codec import (BALANCE_EVENT_STRUCT, MARK_EVENT_STRUCT, ORDER_EVENT_STRUCT,
                           TRADE_EVENT_STRUCT)
from engine.market import Market
from engine.units import atoms_str
from persistd.store import BALANCE_ROW_DTYPE, INSURANCE_WORDS, ReadOnlyViolation, Store
from tests import engine_helpers as eh
from tests.fuzz_streams import FUZZ_CONFIG, genesis, random_stream

# The fuzz markets: id 0 has 100 atoms per tick x lot, id 1 has 7 (an odd tick: 0.0007).
FUZZ_MARKETS = [Market("A-PERP", 0, "0.1", "0.001"), Market("B-PERP", 1, "0.0007", "0.01")]
BTC_MARKETS = [Market("BTC-PERP", 0, "0.1", "0.001")]     # engine_helpers' BTC: 100 atoms
D = Decimal


# ---- running the engine -----------------------------------------------------------------------
def run_engine(config, batches) -> np.ndarray:
    """[(commands, privileged)] through one compiled matcher; all raw event slots, in order."""
    matcher = Matcher(config)
    ring = LocalEvents(1 << 16)
    out = []
    for commands, privileged in batches:
        for events in drain(matcher, commands, ring.sink, source=0 if privileged else 1,
                            privileged=privileged):
            out.append(events.copy())
    return np.concatenate(out) if out else np.zeros(0, EVENT_DTYPE)


def set_marks(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = new_commands(n)
    c["cmd"] = CMD_SET_MARK
    c["market"] = rng.integers(0, 2, n)
    c["price_ticks"] = np.where(c["market"] == 0, 1000, 20000) + rng.integers(-20, 21, n)
    return c


@pytest.fixture(scope="module")
def fuzz_events() -> np.ndarray:
    """Genesis, then client streams with privileged mark updates between them."""
    batches = [(genesis(filters=False), True)]     # dense trading: no min notional
    for k in range(6):
        batches.append((random_stream(100 + k, 4000), False))
        batches.append((set_marks(k, 5), True))
        batches.append((risk_commands(k), True))
    return run_engine(FUZZ_CONFIG, batches)


def risk_commands(k: int) -> np.ndarray:
    """Funding in both markets, a mark shock in one, then LIQUIDATE for every account's cross
    positions and each isolated one (the healthy are refused): funding, liquidation and
    insurance events from the real engine."""
    from engine.records import funding_command, liquidate_command
    shock = new_commands(1)
    shock["cmd"], shock["market"] = CMD_SET_MARK, k % 2
    shock["price_ticks"] = (950, 19_500)[k % 2] if k % 3 else (1040, 20_600)[k % 2]
    cmds = [funding_command(0, rate_e9=(-1) ** k * 1_000_000),
            funding_command(1, rate_e9=(-1) ** (k + 1) * 700_001), shock]
    for account in range(FUZZ_CONFIG.max_accounts):
        cmds.append(liquidate_command(account))
        cmds += [liquidate_command(account, m) for m in (0, 1)]
    return np.concatenate(cmds)


def command_bounds(events: np.ndarray) -> np.ndarray:
    """Indices where a new seq starts (and len): cut points that keep commands whole."""
    seq = events["seq"]
    return np.concatenate([[0], np.flatnonzero(seq[1:] != seq[:-1]) + 1, [len(seq)]])


# ---- the oracle: rows as the wire says them, one event at a time -------------------------------
def wire_rows(events: np.ndarray, markets, after: int = 0, upto: int | None = None) -> dict:
    raw = np.ascontiguousarray(events).tobytes()
    upto = int(events["seq"].max()) if upto is None else upto
    fills, orders, balances, marks = [], [], [], []
    funding, liquidations, insurance = [], [], []
    acked, amended_price = set(), {}
    for i in range(len(events)):
        off = i * 128
        seq, ts = int(events["seq"][i]), int(events["ts_ns"][i])
        etype = int(events["etype"][i])
        if not after < seq <= upto:
            continue
        if etype == EV_TRADE:
            tr = TRADE_EVENT_STRUCT.unpack_from(raw, off)
            mk = markets[tr[4]]
            taker, maker = codec.fill_messages(tr, mk)
            price, qty = D(taker["price"]), D(taker["qty"])
            fills.append((seq, ts, taker["trade_id"], mk.symbol, price, qty, tr[5], tr[16],
                          taker["side"], D(taker["fee"]), D(maker["fee"]),
                          taker.get("liquidation", False), taker["oid"], maker["oid"]))
            if maker["remaining"] == "0":
                orders.append((seq, ts, maker["oid"], maker["cid"], tr[16], mk.symbol,
                               maker["side"], "limit", price, qty, "filled", D(0), None))
            if taker["remaining"] == "0" and (seq, taker["oid"]) not in acked:
                own = amended_price.get((seq, taker["oid"]))
                orders.append((seq, ts, taker["oid"], taker["cid"], tr[5], mk.symbol,
                               taker["side"], "limit",
                               price if own is None else D(mk.ticks_to_str(own)), qty,
                               "filled", D(0), None))
        elif etype in (EV_ACK, EV_CANCELED, EV_AMENDED, EV_TRIGGERED):
            ev = ORDER_EVENT_STRUCT.unpack_from(raw, off)
            (_, _, _, _, market, account, _, reason, _, side, kind, oid, cid, ticks, _, _) = ev
            mk = markets[market]
            side_w, kind_w = codec.SIDE_NAMES[side], codec.KIND_NAMES[kind]
            price = D(mk.ticks_to_str(ticks)) if ticks else None
            if etype == EV_TRIGGERED:        # the fired order's ack, in effect
                acked.add((seq, oid))
                msg = codec.triggered_message(ev, mk)
                orders.append((seq, ts, oid, cid, account, mk.symbol, msg["side"], kind_w,
                               price, D(msg["qty"]), msg["status"], D(msg["remaining"]), None))
            elif etype == EV_ACK:
                acked.add((seq, oid))
                msg = codec.ack_message(ev, mk)
                assert (price is None) == ("price" not in msg)
                orders.append((seq, ts, oid, cid, account, mk.symbol, msg["side"], kind_w,
                               price, D(msg["qty"]), msg["status"], D(msg["remaining"]), None))
            elif etype == EV_CANCELED:
                msg = codec.canceled_message(ev, mk, REASON_NAMES[reason])
                orders.append((seq, ts, oid, cid, account, mk.symbol, side_w, kind_w, price,
                               D(msg["qty"]), "canceled", D(0), msg["reason"]))
            else:
                amended_price.setdefault((seq, oid), ticks)
                msg = codec.amended_message(ev, mk)
                orders.append((seq, ts, oid, cid, account, mk.symbol, side_w, kind_w,
                               D(msg["price"]), D(msg["qty"]), "open", D(msg["qty"]),
                               REASON_NAMES[reason] if reason else None))
        elif etype == EV_BALANCE:
            b = BALANCE_EVENT_STRUCT.unpack_from(raw, off)
            balances.append((seq, ts, b[5], D(atoms_str(b[8]))))
        elif etype == EV_MARK:
            m = MARK_EVENT_STRUCT.unpack_from(raw, off)
            mk = markets[m[4]]
            marks.append((seq, ts, mk.symbol, D(mk.ticks_to_str(m[7]))))
        elif etype == EV_FUNDING:
            f = codec.FUNDING_EVENT_STRUCT.unpack_from(raw, off)
            mk = markets[f[4]]
            msg = codec.funding_message(f, mk)
            funding.append((seq, ts, mk.symbol, f[5], D(msg["rate"]), D(msg["payment"]),
                            D(msg["size"]), D(msg["mark_price"])))
        elif etype == EV_LIQUIDATION:
            q = codec.LIQUIDATION_EVENT_STRUCT.unpack_from(raw, off)
            mk = markets[q[4]]
            msg = codec.liquidation_message(q, mk)
            liquidations.append((seq, ts, mk.symbol, q[5], D(msg["qty"]), D(msg["price"]),
                                 msg["kind"], msg["side"], D(msg["fee"]),
                                 D(mk.ticks_to_str(q[11])) if q[11] else None, q[13],
                                 D(msg["size"])))
        elif etype == EV_INSURANCE:
            e = events[i:i + 1].view(INSURANCE_EVENT_DTYPE)[0]
            insurance.append((seq, ts, INSURANCE_WORDS[int(e["reason"])],
                              D(atoms_str(int(e["amount_atoms"]))),
                              D(atoms_str(int(e["fund_atoms"])))))
    return {"fills": fills, "orders": orders, "balances": balances, "marks": marks,
            "funding_payments": funding, "liquidations": liquidations,
            "insurance_fund": insurance}


COLUMNS = {
    "fills": "seq, ts, trade_id, market, price, qty, taker_account, maker_account, taker_side, "
             "taker_fee, maker_fee, liquidation, taker_oid, maker_oid",
    "orders": "seq, ts, oid, cid, account, market, side, kind, price, qty, status, remaining, "
              "reason",
    "balances": "seq, ts, account, balance",
    "marks": "seq, ts, market, mark",
    "funding_payments": "seq, ts, market, account, rate, payment, size, mark",
    "liquidations": "seq, ts, market, account, qty, price, kind, side, fee, bankruptcy_price, "
                    "counterparty, size",
    "insurance_fund": "seq, ts, reason, amount, fund",
}


def stored(store: Store, table: str) -> list[tuple]:
    """A table's rows in insertion order (rowid)."""
    return store.query(f"SELECT {COLUMNS[table]} FROM {table} ORDER BY rowid")[1]


def assert_tables(store: Store, want: dict) -> None:
    for table, rows in want.items():
        got = stored(store, table)
        assert len(got) == len(rows), (table, len(got), len(rows))
        for k, (g, w) in enumerate(zip(got, rows)):
            assert g == w, f"{table} row {k}:\n got  {g}\n want {w}"


# ---- schema -----------------------------------------------------------------------------------
def test_schema_types(tmp_path):
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        cols, rows = store.query(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() "
            "WHERE schema_name = 'main' ORDER BY table_name, column_index")
    types = {}
    for table, column, typ in rows:
        types.setdefault(table, {})[column] = typ
    P, Q, A = "DECIMAL(38,4)", "DECIMAL(38,3)", "DECIMAL(38,6)"   # 0.0007 tick, 0.001 lot
    B, V = "BIGINT", "VARCHAR"
    assert list(types["fills"].items())[:12] == [
        ("seq", B), ("ts", B), ("trade_id", B), ("market", V), ("price", P), ("qty", Q),
        ("taker_account", B), ("maker_account", B), ("taker_side", V), ("taker_fee", A),
        ("maker_fee", A), ("liquidation", "BOOLEAN")]
    assert list(types["orders"].items())[:11] == [
        ("seq", B), ("ts", B), ("oid", B), ("cid", B), ("account", B), ("market", V),
        ("side", V), ("kind", V), ("price", P), ("qty", Q), ("status", V)]
    assert list(types["funding_payments"].items())[:6] == [
        ("seq", B), ("ts", B), ("market", V), ("account", B), ("rate", "DECIMAL(38,9)"),
        ("payment", A)]
    assert list(types["liquidations"].items())[:7] == [
        ("seq", B), ("ts", B), ("market", V), ("account", B), ("qty", Q), ("price", P),
        ("kind", V)]
    assert list(types["balances"].items())[:4] == [
        ("seq", B), ("ts", B), ("account", B), ("balance", A)]
    assert types["meta"]["last_seq"] == B


# ---- rows from a hand-made engine scenario ---------------------------------------------------
def at(ts: int, command: np.ndarray) -> np.ndarray:
    command["ts_ns"] = ts
    return command


def test_scenario_rows_exact(tmp_path):
    """A small story through the compiled matcher, its rows written out by hand."""
    usd = eh.USDC
    events = run_engine(eh.CONFIG, [
        (np.concatenate([eh.market_commands(), eh.deposit(1, 100_000 * usd),
                         eh.deposit(2, 100_000 * usd), eh.set_mark(650_100)]), True),
        (np.concatenate([
            at(1001, eh.sell(2, 5, 650_000, cid=21)),        # rests 0.005 @ 65000.0  (oid 1)
            at(1002, eh.buy(1, 2, 650_000, cid=11)),         # takes 0.002, filled    (oid 2)
            at(1003, eh.buy(1, 3, 649_990, cid=12)),         # rests 0.003 @ 64999.0  (oid 3)
            at(1004, eh.amend(1, cid=12, price=650_000)),    # re-prices, takes the rest
            at(1005, eh.market_order(1, SIDE_BUY, 1, cid=13)),   # nothing left: ioc (oid 4)
            at(1006, eh.sell(2, 1, 650_500, cid=22)),        # rests                  (oid 5)
            at(1007, eh.cancel(2, cid=22)),
            at(1008, eh.withdraw(1, 1 * usd)),
        ]), False),
    ])
    with Store(tmp_path / "x.duckdb", BTC_MARKETS) as store:
        counts = store.write(events)
        assert counts == {"fills": 2, "orders": 10, "balances": 3, "marks": 1}
        assert store.last_seq == int(events["seq"].max()) == 13
        fills = stored(store, "fills")
        orders = stored(store, "orders")
        balances = stored(store, "balances")
        marks = stored(store, "marks")
        as_text = store.query("SELECT CAST(price AS VARCHAR), CAST(taker_fee AS VARCHAR) "
                              "FROM fills ORDER BY rowid")[1]
    # 2 lots x 65000.0 x 0.001 = 130 USDC notional: taker 0.05% = 0.065, maker -0.01% = -0.013
    assert fills == [
        (7, 1002, 1, "BTC-PERP", D("65000.0"), D("0.002"), 1, 2, "buy", D("0.065"),
         D("-0.013"), False, 2, 1),
        (9, 1004, 2, "BTC-PERP", D("65000.0"), D("0.003"), 1, 2, "buy", D("0.0975"),
         D("-0.0195"), False, 3, 1),
    ]
    assert as_text == [("65000.0", "0.065000"), ("65000.0", "0.097500")]
    o = lambda *r: r  # noqa: E731
    assert orders == [
        o(6, 1001, 1, 21, 2, "BTC-PERP", "sell", "limit", D("65000.0"), D("0.005"), "open",
          D("0.005"), None),
        o(7, 1002, 2, 11, 1, "BTC-PERP", "buy", "limit", D("65000.0"), D("0.002"), "filled",
          D("0"), None),
        o(8, 1003, 3, 12, 1, "BTC-PERP", "buy", "limit", D("64999.0"), D("0.003"), "open",
          D("0.003"), None),
        o(9, 1004, 3, 12, 1, "BTC-PERP", "buy", "limit", D("65000.0"), D("0.003"), "open",
          D("0.003"), None),                                            # amended
        o(9, 1004, 1, 21, 2, "BTC-PERP", "sell", "limit", D("65000.0"), D("0.003"), "filled",
          D("0"), None),                                                # maker completed
        o(9, 1004, 3, 12, 1, "BTC-PERP", "buy", "limit", D("65000.0"), D("0.003"), "filled",
          D("0"), None),                                                # amended taker done
        o(10, 1005, 4, 13, 1, "BTC-PERP", "buy", "market", None, D("0.001"), "canceled",
          D("0"), None),                                                # the ack says it
        o(10, 1005, 4, 13, 1, "BTC-PERP", "buy", "market", None, D("0.001"), "canceled",
          D("0"), "ioc"),
        o(11, 1006, 5, 22, 2, "BTC-PERP", "sell", "limit", D("65050.0"), D("0.001"), "open",
          D("0.001"), None),
        o(12, 1007, 5, 22, 2, "BTC-PERP", "sell", "limit", D("65050.0"), D("0.001"), "canceled",
          D("0"), "user"),
    ]
    # account 1 after fees (0.065 + 0.0975) and the withdrawal of 1
    assert balances == [(3, 0, 1, D("100000")), (4, 0, 2, D("100000")),
                        (13, 1008, 1, D("99998.8375"))]
    assert marks == [(5, 0, "BTC-PERP", D("65010.0"))]
    assert wire_rows(events, BTC_MARKETS) == {"fills": fills, "orders": orders,
                                              "balances": balances, "marks": marks,
                                              "funding_payments": [], "liquidations": [],
                                              "insurance_fund": []}


# ---- rows from random engine streams ---------------------------------------------------------
def test_engine_stream_rows_match_wire(tmp_path, fuzz_events):
    events = fuzz_events
    want = wire_rows(events, FUZZ_MARKETS)
    assert len(want["fills"]) > 300 and len(want["orders"]) > 2000
    assert (events["etype"] == EV_TRIGGERED).sum() > 5      # stops placed, fired and filled
    assert len(want["marks"]) > 10 and len(want["balances"]) > 5
    assert len(want["funding_payments"]) > 10 and len(want["insurance_fund"]) > 5
    assert len(want["liquidations"]) > 0 and any(r[11] for r in want["fills"])
    amended_takers = [r for r in want["orders"] if r[10] == "filled"]
    assert len(amended_takers) > len(want["fills"])   # makers and some re-matched amends
    rng = np.random.default_rng(7)
    bounds = command_bounds(events)
    cuts = np.unique(np.concatenate([[0, len(events)], rng.choice(bounds, 40)]))
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        for a, b in zip(cuts[:-1], cuts[1:]):
            store.write(events[a:b])
        assert store.last_seq == int(events["seq"].max())
        assert_tables(store, want)
        # the decimal text equals ticks x tick size, per market, row by row
        rows = store.query("SELECT market, CAST(price AS VARCHAR), CAST(qty AS VARCHAR) "
                           "FROM fills ORDER BY rowid")[1]
    tr = events[events["etype"] == EV_TRADE].view(TRADE_EVENT_DTYPE)
    for (sym, price, qty), m, ticks, lots in zip(rows, tr["market"], tr["price_ticks"],
                                                 tr["qty_lots"]):
        mk = FUZZ_MARKETS[m]
        assert sym == mk.symbol
        assert D(price) == D(int(ticks)) * mk.tick_size
        assert D(qty) == D(int(lots)) * mk.lot_size


def test_rewrite_and_overlap_add_nothing(tmp_path, fuzz_events):
    events = fuzz_events
    want = wire_rows(events, FUZZ_MARKETS)
    bounds = command_bounds(events)
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        store.write(events)
        assert store.write(events) == {}
        # overlapping windows, some starting in the middle of a command
        rng = np.random.default_rng(3)
        for _ in range(20):
            a, b = sorted(rng.integers(0, len(events), 2))
            assert store.write(events[a:b + 1]) == {}
        assert_tables(store, want)

    with Store(tmp_path / "y.duckdb", FUZZ_MARKETS) as store:
        # a writer replaying from a little before where it stopped, again and again
        starts = bounds[::250]
        for a, b in zip(starts[:-1], starts[1:]):
            lo = bounds[max(0, np.searchsorted(bounds, a) - 5)]
            store.write(events[lo:b])
        store.write(events)
        assert_tables(store, want)


def test_upto_seq_holds_back_an_unfinished_command(tmp_path, fuzz_events):
    """A reader that cut a command in two passes upto_seq = the last whole command."""
    events = fuzz_events
    seq = events["seq"]
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        pos, size = 0, 1
        rng = np.random.default_rng(11)
        while pos < len(events):
            end = min(len(events), pos + size + int(rng.integers(0, 1500)))
            cut_inside = end < len(events) and seq[end] == seq[end - 1]
            whole = int(seq[end - 1]) - 1 if cut_inside else int(seq[end - 1])
            before = store.last_seq
            store.write(events[pos:end], upto_seq=whole)
            assert store.last_seq == max(before, whole)
            pos = int(np.searchsorted(seq, store.last_seq, side="right"))  # resume after it
            size = size * 2 if store.last_seq == before else 1   # a long command: read more
        assert store.last_seq == int(seq.max())
        assert_tables(store, wire_rows(events, FUZZ_MARKETS))
        # upto_seq below what events hold: the rest waits, and only whole commands land
        half = int(seq[len(seq) // 2])
    with Store(tmp_path / "y.duckdb", FUZZ_MARKETS) as store:
        store.write(events, upto_seq=half)
        assert store.last_seq == half
        assert_tables(store, wire_rows(events, FUZZ_MARKETS, upto=half))
        store.write(events)
        assert_tables(store, wire_rows(events, FUZZ_MARKETS))
        store.write(None, upto_seq=store.last_seq + 100)     # nothing to write: just the mark
        assert store.last_seq == int(seq.max()) + 100


def test_last_seq_persists_across_reopen(tmp_path, fuzz_events):
    events = fuzz_events
    path = tmp_path / "x.duckdb"
    cut = command_bounds(events)[len(command_bounds(events)) // 2]
    with Store(path, FUZZ_MARKETS) as store:
        assert store.last_seq == 0
        store.write(events[:cut])
        first = store.last_seq
    assert first == int(events["seq"][cut - 1])
    con = duckdb.connect(str(path))
    assert con.execute("SELECT last_seq FROM meta").fetchall() == [(first,)]
    con.close()
    with Store(path, FUZZ_MARKETS) as store:
        assert store.last_seq == first
        store.write(events)            # the first half again, then the rest
        assert store.last_seq == int(events["seq"].max())
        assert_tables(store, wire_rows(events, FUZZ_MARKETS))
    with Store(path, FUZZ_MARKETS) as store:
        assert store.last_seq == int(events["seq"].max())


def test_forget_after_a_cut_journal(tmp_path, fuzz_events):
    """Rows past a seq go, and that seq's successors are written again (reused seqs)."""
    events = fuzz_events
    bounds = command_bounds(events)
    cut = int(events["seq"][bounds[len(bounds) // 3] - 1])
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        store.write(events)
        deleted = store.forget_after(cut)
        want_all = wire_rows(events, FUZZ_MARKETS)
        assert deleted == sum(1 for rows in want_all.values() for r in rows if r[0] > cut)
        assert store.last_seq == cut
        assert_tables(store, wire_rows(events, FUZZ_MARKETS, upto=cut))
        assert store.forget_after(store.last_seq + 10) == 0 and store.last_seq == cut
        store.write(events)
        assert_tables(store, want_all)
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        assert store.last_seq == int(events["seq"].max())


def test_caller_balance_rows(tmp_path):
    events = run_engine(eh.CONFIG, [(np.concatenate([
        eh.market_commands(), eh.deposit(1, 5 * eh.USDC), eh.deposit(2, 7 * eh.USDC)]), True)])
    # seqs 3 and 4 carry the deposits; the caller adds rows for seqs 3, 4, 5 (fills it knows)
    extra = np.zeros(4, BALANCE_ROW_DTYPE)
    extra["seq"] = [2, 3, 3, 5]
    extra["ts_ns"] = [20, 30, 31, 50]
    extra["account"] = [9, 7, 8, 1]
    extra["balance_atoms"] = [1, -2_500_000, 2 ** 63 - 1, 123]
    with Store(tmp_path / "x.duckdb", BTC_MARKETS) as store:
        store.write(events[events["seq"] <= 2])
        assert store.last_seq == 2
        counts = store.write(events, balances=extra)
        assert counts == {"balances": 5}
        assert store.last_seq == 5          # the caller's rows count for the default upto_seq
        assert stored(store, "balances") == [
            (3, 0, 1, D("5")), (3, 30, 7, D("-2.5")),
            (3, 31, 8, D("9223372036854.775807")),
            (4, 0, 2, D("7")), (5, 50, 1, D("0.000123"))]
        assert store.write(events, balances=extra) == {}


# ---- exactness at the extremes -----------------------------------------------------------------
EXTREME_MARKETS = [Market("X-PERP", 0, "0.1", "0.001"), Market("Y-PERP", 1, "0.0007", "0.01"),
                   Market("Z-PERP", 2, "25", "1"), Market("W-PERP", 3, "0.00000001", "100")]
INT64 = 2 ** 63 - 1


def trade_events(rows, first_seq: int) -> np.ndarray:
    """Hand-built trades: rows of (market, price_ticks, qty_lots, fee_atoms, maker_fee_atoms)."""
    n = len(rows)
    ev = np.zeros(n, TRADE_EVENT_DTYPE)
    ev["etype"] = EV_TRADE
    ev["seq"] = first_seq + np.arange(n)
    ev["ts_ns"] = ev["seq"] * 1_000_000_007
    for k, name in enumerate(("market", "price_ticks", "qty_lots", "fee_atoms",
                              "maker_fee_atoms")):
        ev[name] = np.array([r[k] for r in rows], dtype=np.int64)
    ev["trade_id"] = np.arange(n) + 1
    ev["account"], ev["maker_account"] = 1, 2
    ev["maker_remaining_lots"] = ev["remaining_lots"] = 1
    ev["side"] = np.arange(n) % 2
    return ev


def check_exact(store: Store, ev: np.ndarray, markets) -> None:
    first = int(ev["seq"].min())
    rows = store.query("SELECT market, CAST(price AS VARCHAR), CAST(qty AS VARCHAR), "
                       "CAST(taker_fee AS VARCHAR), CAST(maker_fee AS VARCHAR), price, qty, "
                       "taker_fee FROM fills WHERE seq >= ? ORDER BY seq", [first])[1]
    assert len(rows) == len(ev)
    by_symbol = {m.symbol: m for m in markets}
    with localcontext() as ctx:
        ctx.prec = 100
        for row, e in zip(rows, ev):
            sym, price_s, qty_s, fee_s, maker_fee_s, price, qty, fee = row
            mk = by_symbol[sym]
            assert mk.id == e["market"]
            want_price = D(int(e["price_ticks"])) * mk.tick_size
            want_qty = D(int(e["qty_lots"])) * mk.lot_size
            assert D(price_s) == want_price == price, (sym, price_s, int(e["price_ticks"]))
            assert D(qty_s) == want_qty == qty
            assert D(fee_s) == D(int(e["fee_atoms"])) / 10 ** 6 == fee
            assert D(maker_fee_s) == D(int(e["maker_fee_atoms"])) / 10 ** 6
            # and the wire's own strings
            assert D(price_s) == D(mk.ticks_to_str(int(e["price_ticks"])))
            assert D(fee_s) == D(atoms_str(int(e["fee_atoms"])))
            assert isinstance(price, Decimal) and isinstance(fee, Decimal)


def test_extreme_values_exact(tmp_path):
    big = [2 ** 62, 2 ** 62 + 1, 2 ** 62 - 1, INT64, INT64 - 1, 3 * 2 ** 61 + 12345, 1]
    rows = []
    for m in range(4):
        for k, v in enumerate(big):
            rows.append((m, v, big[-1 - k], v if k % 2 else -v, -INT64 if k == 3 else v // 7))
    ev = trade_events(rows, 1)
    with Store(tmp_path / "x.duckdb", EXTREME_MARKETS) as store:
        assert (store.price_scale, store.qty_scale) == (8, 3)
        store.write(ev)
        check_exact(store, ev, EXTREME_MARKETS)
        # the largest exact Z-PERP price: (2**63 - 1) x 25
        assert store.query("SELECT max(price) FROM fills WHERE market = 'Z-PERP'")[1] == [
            (D(INT64) * 25,)]


@settings(max_examples=60, deadline=None)
@given(hs.lists(hs.tuples(hs.integers(0, 3), hs.integers(1, INT64), hs.integers(1, INT64),
                          hs.integers(-INT64, INT64), hs.integers(-INT64, INT64)),
                min_size=1, max_size=30))
def test_random_int64_values_exact(tmp_path_factory, rows):
    path = tmp_path_factory.getbasetemp() / "hypothesis_store.duckdb"
    with Store(path, EXTREME_MARKETS) as store:
        ev = trade_events(rows, store.last_seq + 1)
        store.write(ev)
        check_exact(store, ev, EXTREME_MARKETS)


def test_values_that_cannot_be_exact_are_refused(tmp_path):
    """A 1e-15 tick next to a 1e6 tick: DECIMAL(38,15) holds 23 integer digits, so the coarse
    market's prices stop at 10**17 ticks; beyond that the whole batch is refused."""
    markets = [Market("FINE", 0, "0.000000000000001", "1000000000"),
               Market("COARSE", 1, "1000000", "1")]
    with Store(tmp_path / "x.duckdb", markets) as store:
        assert store.price_scale == 15
        ok = trade_events([(1, 10 ** 17 - 1, 1, 0, 0), (0, INT64, INT64, INT64, -INT64)], 1)
        store.write(ok)
        check_exact(store, ok, markets)
        bad = trade_events([(0, 5, 5, 0, 0), (1, 10 ** 17, 1, 0, 0)], 3)
        with pytest.raises(ValueError, match=r"seq 4: price_ticks = 100000000000000000 ticks "
                                             r"of COARSE does not fit DECIMAL\(38,15\)"):
            store.write(bad)
        assert store.last_seq == 2
        assert store.query("SELECT count(*) FROM fills")[1] == [(2,)]


def test_unknown_market_is_refused(tmp_path):
    ev = trade_events([(0, 10, 1, 0, 0), (3, 10, 1, 0, 0)], 1)
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        with pytest.raises(ValueError, match="seq 2 names market 3"):
            store.write(ev)
        assert store.last_seq == 0
        assert store.query("SELECT count(*) FROM fills")[1] == [(0,)]


def test_consecutive_writes_and_a_refused_one_between(tmp_path):
    """Each table's input is registered once and refilled per write: batches of different
    sizes land exactly, and a refused batch leaves the next write where it was."""
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        store.write(trade_events([(0, 10, 1, 0, 0), (0, 11, 2, 0, 0)], 1))
        with pytest.raises(ValueError, match="names market 3"):
            store.write(trade_events([(3, 12, 1, 0, 0)], 3))
        store.write(trade_events([(0, 13, 3, 0, 0), (1, 14, 4, 0, 0), (0, 15, 5, 0, 0)], 3))
        store.write(trade_events([(1, 16, 6, 0, 0)], 6))
        assert store.last_seq == 6
        assert store.query("SELECT seq, qty FROM fills ORDER BY seq")[1] == [
            (s, D(str(q * FUZZ_MARKETS[m].lot_size)))
            for s, m, q in [(1, 0, 1), (2, 0, 2), (3, 0, 3), (4, 1, 4), (5, 0, 5), (6, 1, 6)]]


def test_scale_widens_for_a_finer_new_market(tmp_path):
    path = tmp_path / "x.duckdb"
    ev = trade_events([(0, 650_005, 1234, 5, -1)], 1)
    with Store(path, BTC_MARKETS) as store:
        assert (store.price_scale, store.qty_scale) == (1, 3)
        store.write(ev)
    finer = BTC_MARKETS + [Market("SHIB-PERP", 1, "0.00000001", "1000")]
    with Store(path, finer) as store:
        assert (store.price_scale, store.qty_scale) == (8, 3)
        assert store.query("SELECT data_type FROM duckdb_columns() WHERE table_name = 'fills' "
                           "AND column_name = 'price'")[1] == [("DECIMAL(38,8)",)]
        ev2 = trade_events([(1, 1_234, 7, 1, 1)], 2)
        store.write(ev2)
        assert store.query("SELECT market, price, qty FROM fills ORDER BY seq")[1] == [
            ("BTC-PERP", D("65000.5"), D("1.234")), ("SHIB-PERP", D("0.00001234"), D("7000"))]
    with Store(path, BTC_MARKETS) as store:         # never narrowed again
        assert store.price_scale == 8
        assert store.query("SELECT count(*) FROM fills")[1] == [(2,)]


# ---- query: read-only ------------------------------------------------------------------------
REFUSED = [
    "INSERT INTO fills (seq) VALUES (1)",
    "UPDATE meta SET last_seq = 0",
    "DELETE FROM orders",
    "TRUNCATE balances",
    "CREATE TABLE t (a INT)",
    "CREATE VIEW v AS SELECT 1",
    "CREATE MACRO f(x) AS x",
    "DROP TABLE fills",
    "ALTER TABLE fills ADD COLUMN x INT",
    "ATTACH 'other.duckdb' AS other",
    "DETACH other",
    "COPY fills TO 'out.csv'",
    "COPY fills FROM 'in.csv'",
    "EXPORT DATABASE 'dump'",
    "SET threads = 1",
    "PRAGMA enable_profiling",
    "PRAGMA force_checkpoint",
    "CALL checkpoint()",
    "CHECKPOINT",
    "INSTALL json",
    "LOAD json",
    "BEGIN TRANSACTION",
    "VACUUM",
    "USE memory",
    "INSERT INTO balances (seq) VALUES (1) RETURNING seq",
    "SELECT 1; DELETE FROM fills",
    "SELECT 1;\nDROP TABLE meta;",
    "EXPLAIN ANALYZE DELETE FROM fills",
    "/* just */ EXPLAIN /* a */ ANALYZE -- plan\n UPDATE meta SET last_seq = 1",
    "EXPLAIN DELETE FROM fills",
]


def test_query_refuses_writes(tmp_path, fuzz_events):
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        store.write(fuzz_events)
        before = {t: store.query(f"SELECT count(*) FROM {t}")[1] for t in COLUMNS}
        for sql in REFUSED:
            with pytest.raises(ReadOnlyViolation) as info:
                store.query(sql)
            message = str(info.value)
            assert "\n" not in message and message.startswith("refused"), (sql, message)
        assert {t: store.query(f"SELECT count(*) FROM {t}")[1] for t in COLUMNS} == before
        assert store.query("SELECT last_seq FROM meta")[1] == [(store.last_seq,)]
        # no file outside the database can be read either
        with pytest.raises(duckdb.PermissionException):
            store.query("SELECT * FROM read_csv('/etc/passwd')")
        # the store still writes afterwards
        assert store.write(fuzz_events, upto_seq=store.last_seq + 1) == {}


def test_query_answers_reads(tmp_path, fuzz_events):
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        store.write(fuzz_events)
        cols, rows = store.query("SELECT market, sum(qty) AS volume, count(*) AS n FROM fills "
                                 "GROUP BY market ORDER BY market")
        assert cols == ["market", "volume", "n"]
        assert [r[0] for r in rows] == ["A-PERP", "B-PERP"]
        assert all(isinstance(r[1], Decimal) for r in rows)
        cols, rows = store.query("SELECT count(*) FROM fills WHERE market = ? AND seq > ?",
                                 ["B-PERP", 100])
        assert rows[0][0] > 0
        assert store.query("SELECT $x::INT + 1 AS y", {"x": 41}) == (["y"], [(42,)])
        assert "fills" in [r[0] for r in store.query("SHOW TABLES")[1]]
        assert [r[0] for r in store.query("DESCRIBE balances")[1]] == [
            "seq", "ts", "account", "balance"]
        assert store.query("PRAGMA table_info('meta')")[1][0][1] == "last_seq"
        assert store.query("EXPLAIN SELECT * FROM fills")[0] == ["explain_key", "explain_value"]
        assert store.query("EXPLAIN ANALYZE SELECT count(*) FROM fills")[1]
        assert store.query("SELECT 1 AS a; SELECT 2 AS b") == (["b"], [(2,)])
        assert store.query("FROM meta SELECT last_seq")[1] == [(store.last_seq,)]
        assert store.query("SELECT * FROM range(10)", max_rows=3)[1] == [(0,), (1,), (2,)]
        assert store.query("SELECT count(*) FROM range(4)")[1] == [(4,)]   # cursor reusable
        with pytest.raises(duckdb.ParserException):
            store.query("SELEC 1")
        with pytest.raises(ValueError):
            store.query("SELECT ?; SELECT ?", [1])


def test_queries_never_see_half_a_batch(tmp_path, fuzz_events):
    """A reader thread queries while the writer commits batches: the fills and orders it sees
    always add up to exactly the batches up to the meta.last_seq it sees."""
    events = fuzz_events
    bounds = command_bounds(events)
    cuts = bounds[:: max(1, len(bounds) // 150)]
    cuts = np.unique(np.concatenate([cuts, [len(events)]]))
    want = wire_rows(events, FUZZ_MARKETS)
    fills_upto, orders_upto = {0: 0}, {0: 0}
    for b in cuts[1:]:
        s = int(events["seq"][b - 1])
        fills_upto[s] = sum(1 for r in want["fills"] if r[0] <= s)
        orders_upto[s] = sum(1 for r in want["orders"] if r[0] <= s)
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        seen, errors, done = [], [], threading.Event()

        def reader():
            try:
                while not done.is_set():
                    _, rows = store.query(
                        "SELECT (SELECT last_seq FROM meta), (SELECT count(*) FROM fills), "
                        "(SELECT count(*) FROM orders)")
                    seen.append(rows[0])
            except BaseException as e:          # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for a, b in zip(cuts[:-1], cuts[1:]):
            store.write(events[a:b])
            time.sleep(0.0005)
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len({s for s, _, _ in seen}) > 5, "the reader saw too few batches to mean much"
    for s, n_fills, n_orders in seen:
        assert (n_fills, n_orders) == (fills_upto[s], orders_upto[s]), s


def test_closed_store_refuses(tmp_path):
    store = Store(tmp_path / "x.duckdb", FUZZ_MARKETS)
    store.close()
    store.close()
    with pytest.raises(RuntimeError):
        store.query("SELECT 1")
    with pytest.raises(RuntimeError):
        store.write(trade_events([(0, 1, 1, 0, 0)], 1))


def test_markets_indexed_by_id():
    with pytest.raises(ValueError, match="index"):
        Store(":memory:", [FUZZ_MARKETS[1]])


# ---- bulk speed ------------------------------------------------------------------------------
def trade_heavy_commands(n_trades: int) -> np.ndarray:
    """Maker rests one lot, a taker takes it with IOC; sides alternate so positions stay flat.
    Every trade completes both orders: per trade 2 commands, 2 acks, 1 trade."""
    n = 2 * n_trades
    c = new_commands(n)
    k = np.arange(n)
    pair = k // 2
    maker_side = np.where(pair % 2 == 0, SIDE_SELL, SIDE_BUY)
    is_maker = k % 2 == 0
    c["cmd"] = eh.CMD_NEW_ORDER
    c["market"] = 0
    c["account"] = np.where(is_maker, 1, 2)
    c["side"] = np.where(is_maker, maker_side, 1 - maker_side)
    c["kind"] = KIND_LIMIT
    c["tif"] = np.where(is_maker, 0, TIF_IOC)
    c["price_ticks"] = 1000 + (pair % 7)
    c["qty_lots"] = 1
    c["cid"] = k + 1
    c["ts_ns"] = 1_700_000_000_000_000_000 + k * 1000
    return c


def test_bulk_insert_rate(tmp_path, capsys):
    n_trades = 200_000
    fees = np.concatenate([eh.deposit(a, 1_000 * eh.USDC) for a in (1, 2)])   # 200k taker fees
    events = run_engine(FUZZ_CONFIG, [(np.concatenate([genesis(filters=False), fees]), True),
                                      (trade_heavy_commands(n_trades), False)])
    assert int((events["etype"] == EV_TRADE).sum()) == n_trades
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        t0 = time.perf_counter()
        counts = store.write(events)
        dt = time.perf_counter() - t0
        rows = sum(counts.values())
        # the same as synthetic trades only (no acks), in 4 batches of 50k
        ev = trade_events([(0, 650_000 + k % 100, 1 + k % 9, 65, -13) for k in range(50_000)],
                          store.last_seq + 1)
        t1 = time.perf_counter()
        for b in range(4):
            ev["seq"] = store.last_seq + 1 + np.arange(len(ev))
            store.write(ev)
        dt_fills = time.perf_counter() - t1
        assert store.query("SELECT count(*) FROM fills")[1] == [(n_trades + 200_000,)]
    with capsys.disabled():
        print(f"\n[store] {len(events):,} engine events ({n_trades:,} trades) -> "
              f"{rows:,} rows {counts} in {dt:.3f} s: {rows / dt:,.0f} rows/s, "
              f"{n_trades / dt:,.0f} trades/s")
        print(f"[store] 4 x 50,000 trade events -> fills: {200_000 / dt_fills:,.0f} rows/s")
    assert counts["fills"] == n_trades and counts["orders"] == 3 * n_trades


# ---- perpetual risk: funding, liquidations, the insurance fund -------------------------------
def risk_events() -> np.ndarray:
    """Hand-built events of one funding command (seq 7) and one liquidation (seq 8): the
    layouts are engine.records'; the real engine's are checked in tests/test_gateway_risk.py."""
    from engine.records import (EV_FUNDING, EV_INSURANCE, EV_LIQUIDATION, FUNDING_EVENT_DTYPE,
                                INSURANCE_DEFICIT, INSURANCE_EVENT_DTYPE,
                                INSURANCE_FUNDING_RESIDUE, INSURANCE_LIQUIDATION_FEE,
                                LIQ_KIND_ADL, LIQ_KIND_LIQUIDATED, LIQUIDATION_EVENT_DTYPE)
    out = []
    fund = np.zeros(2, FUNDING_EVENT_DTYPE)
    fund["etype"], fund["seq"], fund["ts_ns"], fund["market"] = EV_FUNDING, 7, 70, 0
    fund["account"] = [1, 2]
    fund["rate_e9"] = 100_000                     # 0.0001
    fund["size_lots"] = [1500, -1500]             # 1.5 long, 1.5 short
    fund["mark_ticks"] = 650_005
    fund["payment_atoms"] = [-9_750_075, 9_750_074]
    fund["balance_atoms"] = [1, 2]
    out.append(fund.view(EVENT_DTYPE))
    ins = np.zeros(3, INSURANCE_EVENT_DTYPE)
    ins["etype"], ins["seq"], ins["ts_ns"] = EV_INSURANCE, [7, 8, 8], [70, 80, 80]
    ins["reason"] = [INSURANCE_FUNDING_RESIDUE, INSURANCE_LIQUIDATION_FEE, INSURANCE_DEFICIT]
    ins["amount_atoms"] = [1, 325_002, -5_000_000]
    ins["fund_atoms"] = [1, 325_003, -4_674_997 + 10_000_000]
    out.append(ins[:1].view(EVENT_DTYPE))
    trade = trade_events([(0, 640_000, 500, 0, 64_000)], 8)
    trade["liquidation"] = 1
    trade["ts_ns"] = 80
    out.append(trade.view(EVENT_DTYPE))
    liq = np.zeros(3, LIQUIDATION_EVENT_DTYPE)
    liq["etype"], liq["seq"], liq["ts_ns"], liq["market"] = EV_LIQUIDATION, 8, 80, 0
    liq["account"] = [1, 1, 3]
    liq["kind"] = [LIQ_KIND_LIQUIDATED, LIQ_KIND_ADL, LIQ_KIND_ADL]
    liq["side"] = [SIDE_SELL, SIDE_SELL, SIDE_BUY]
    liq["qty_lots"] = [500, 1000, 1000]
    liq["price_ticks"] = [640_000, 639_990, 639_990]
    liq["bankruptcy_ticks"] = 639_990
    liq["fee_atoms"] = [325_002, 0, 0]
    liq["counterparty"] = [0, 3, 1]
    liq["size_lots"] = [1000, 0, 4000]
    out.append(liq.view(EVENT_DTYPE))
    out.append(ins[1:].view(EVENT_DTYPE))
    return np.concatenate(out)


def test_risk_rows_exact(tmp_path):
    ev = risk_events()
    with Store(tmp_path / "x.duckdb", BTC_MARKETS) as store:
        counts = store.write(ev)
        assert counts == {"fills": 1, "funding_payments": 2, "liquidations": 3,
                          "insurance_fund": 3}
        assert store.query("SELECT seq, ts, market, account, rate, payment, size, mark "
                           "FROM funding_payments ORDER BY rowid")[1] == [
            (7, 70, "BTC-PERP", 1, D("0.0001"), D("-9.750075"), D("1.5"), D("65000.5")),
            (7, 70, "BTC-PERP", 2, D("0.0001"), D("9.750074"), D("-1.5"), D("65000.5"))]
        assert store.query("SELECT seq, market, account, qty, price, kind, side, fee, "
                           "bankruptcy_price, counterparty, size FROM liquidations "
                           "ORDER BY rowid")[1] == [
            (8, "BTC-PERP", 1, D("0.5"), D("64000"), "liquidated", "sell", D("0.325002"),
             D("63999"), 0, D("1")),
            (8, "BTC-PERP", 1, D("1"), D("63999"), "adl", "sell", D("0"), D("63999"), 3,
             D("0")),
            (8, "BTC-PERP", 3, D("1"), D("63999"), "adl", "buy", D("0"), D("63999"), 1,
             D("4"))]
        assert store.query("SELECT seq, reason, amount, fund FROM insurance_fund "
                           "ORDER BY rowid")[1] == [
            (7, "funding_residue", D("0.000001"), D("0.000001")),
            (8, "liquidation_fee", D("0.325002"), D("0.325003")),
            (8, "deficit", D("-5"), D("5.325003"))]
        assert store.query("SELECT seq, liquidation, maker_fee FROM fills")[1] == [
            (8, True, D("0.064"))]
        assert store.write(ev) == {}         # idempotent like every table


def test_older_store_file_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE liquidations (seq BIGINT, ts BIGINT, market VARCHAR, "
                "account BIGINT, qty DECIMAL(38,3), price DECIMAL(38,1), kind VARCHAR)")
    con.execute("CREATE TABLE funding_payments (seq BIGINT, ts BIGINT, market VARCHAR, "
                "account BIGINT, rate DECIMAL(38,9), payment DECIMAL(38,6))")
    con.close()
    with Store(path, BTC_MARKETS) as store:
        assert store.write(risk_events())["liquidations"] == 3
        assert store.query("SELECT side, size FROM liquidations ORDER BY rowid")[1][2] == \
            ("buy", D("4"))


def test_reports_rows_numbered_gap_free(tmp_path, fuzz_events):
    """persistd's `reports` rows: per account account_seq 1..N without gaps, N = the engine's
    counter, each row the raw event (and its command) it numbers; rewrites add nothing."""
    from engine.records import COMMAND_BYTES, COMMAND_DTYPE, EV_COMMAND
    from engine.reports import AccountSeqTracker
    from persistd.storer import report_rows
    from persistd.store import REPORT_WORDS
    events = fuzz_events
    counters = np.zeros(FUZZ_CONFIG.max_accounts, np.int64)
    rng = np.random.default_rng(5)
    bounds = command_bounds(events)
    cuts = np.unique(np.concatenate([[0, len(events)], rng.choice(bounds, 30)]))
    with Store(tmp_path / "x.duckdb", FUZZ_MARKETS) as store:
        for a, b in zip(cuts[:-1], cuts[1:]):
            store.write(events[a:b], reports=report_rows(events[a:b], counters))
        assert store.write(events, reports=report_rows(events, counters.copy() * 0)) == {}
        rows = store.query(f"SELECT account, account_seq, seq, idx, role, {REPORT_WORDS} "
                           f"FROM reports ORDER BY account, account_seq")[1]
        rows = [(*r[:5], np.array(r[5:13], "<i8").tobytes(), np.array(r[13:], "<i8").tobytes())
                for r in rows]
    # the oracle: the per-event tracker over the same stream
    tracker = AccountSeqTracker(np.zeros(FUZZ_CONFIG.max_accounts, np.int64))
    want = []
    raw = events.view(np.uint8).reshape(len(events), -1)
    command = None
    for i, ev in enumerate(events):
        if ev["etype"] == EV_COMMAND:
            command = raw[i, 64:64 + COMMAND_BYTES].tobytes()
            tracker.on_command(int(raw[i, 64 + COMMAND_DTYPE.fields["cmd"][1]]))
            continue
        maker = int(ev.view(TRADE_EVENT_DTYPE)["maker_account"]) \
            if ev["etype"] == EV_TRADE else -1
        for role, (account, n) in enumerate(tracker.on_event(int(ev["etype"]),
                                                            int(ev["account"]), maker)):
            want.append((account, n, int(ev["seq"]), tracker.index, role, command,
                         raw[i].tobytes()))
    want.sort(key=lambda r: (r[0], r[1]))
    assert [tuple(r) for r in rows] == want
    assert list(counters) == tracker.counters
    per_account = {}
    for r in rows:
        per_account.setdefault(r[0], []).append(r[1])
    assert len(per_account) >= 8
    for seqs in per_account.values():
        assert seqs == list(range(1, len(seqs) + 1))
