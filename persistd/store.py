"""The DuckDB query store persistd writes and `perpx sql` reads (PROTOCOL.md, "DuckDB store").

One DuckDB file holds what happened on the exchange as tables of rows derived from the event
stream. Money and sizes are DECIMAL columns holding exactly the values the wire shows:

    prices      = ticks x tick_size      DECIMAL(38, P)  P = the most fraction digits of any tick
    quantities  = lots x lot_size        DECIMAL(38, Q)  Q = the same over the lot sizes
    collateral  = atoms / 1e6            DECIMAL(38, 6)  (balances, fees, funding payments)
    rates       = e9 units / 1e9         DECIMAL(38, 9)

One column type serves every market, so a price of a 0.1-tick market reads "65000.50" when
another market has a 0.01 tick: the same value as the wire's "65000.5", with the column's scale.
The conversion is done inside DuckDB as exact decimal arithmetic (int64 -> DECIMAL(19,0), times
the market's step as DECIMAL(38, P)); with P <= 12 and steps up to 10**7 every int64 tick count
fits. A value that cannot be held exactly (only with extreme tick sizes) is refused with a
ValueError before anything is written, never rounded. When a later configuration adds a market
with a finer tick or lot, the columns are widened (ALTER ... TYPE DECIMAL(38, larger scale))
when the store is opened; a scale is never narrowed.

Tables (the PROTOCOL.md columns first, extras at the end):

    fills(seq, ts, trade_id, market, price, qty, taker_account, maker_account, taker_side,
          taker_fee, maker_fee, liquidation, taker_oid, maker_oid)
    orders(seq, ts, oid, cid, account, market, side, kind, price, qty, status,
           remaining, reason)
    funding_payments(seq, ts, market, account, rate, payment, size, mark)
    liquidations(seq, ts, market, account, qty, price, kind, side, fee, bankruptcy_price,
                 counterparty, size)
    balances(seq, ts, account, balance)
    reports(account, account_seq, seq, idx, role, c0 .. c7, e0 .. e15)
    insurance_fund(seq, ts, reason, amount, fund)
    marks(seq, ts, market, mark)
    meta(last_seq, schema_version)             -- one row

seq/ts/ids/accounts are BIGINT (ts in nanoseconds as on the wire), market the symbol, and the
word columns hold the wire's words ("buy"/"sell", "limit"/"market"/"stop_market"/...,
"open"/"filled"/"canceled"/"untriggered", cancel reasons "user"/"ioc"/"stp"/...,
liquidation kinds "liquidated"/"adl", insurance reasons "liquidation_fee"/"funding_residue"/
"deficit"). `reports` is the durable source of `replay` (PROTOCOL.md, "Report sequence and
replay"): one row per report to an account, keyed by (account, account_seq) as
engine/reports.py numbers them, holding the raw 64-byte command and 128-byte event records
(BLOBs) from which a gateway renders the report exactly as it was sent live, `idx` the
event's position after its command (from 1) and `role` 0 for the event's own account, 1 for
a trade's maker. Columns added after a store was created (the liquidation extras) are added to an
older file when it is opened.

Threads: one Store is shared by a writer thread (write) and any number of query threads
(query). DuckDB connection objects are not thread-safe, so the Store never shares one between
threads: write() uses its own cursor (`con.cursor()`, a separate connection to the same
database) under a lock, and each query() borrows a cursor from a pool (a new one when all are
busy). Every write() is one transaction and every query() runs in one read-only transaction, so
DuckDB's MVCC gives a query either all of a batch or none of it, and all statements of a
multi-statement query see the same snapshot. close() must be called once the other threads are
done with the store.

Cost: a write() call has a fixed cost of a few milliseconds (planning the INSERTs, commit)
besides about 1 µs per row, so the writer should batch (everything the ring holds, or every
~0.1 s), not write per event. Only one process can open a DuckDB file for writing; another
process cannot even read it meanwhile, so `perpx sql` has to ask the process that owns the Store.
"""

from __future__ import annotations

import re
import threading

import duckdb
import numpy as np

from engine.records import (BALANCE_EVENT_DTYPE, EV_ACK, EV_AMENDED, EV_BALANCE, EV_CANCELED,
                            EV_FUNDING, EV_INSURANCE, EV_LIQUIDATION, EV_MARK, EV_TRADE,
                            EV_TRIGGERED, COMMAND_BYTES, EVENT_BYTES, EVENT_DTYPE,
                            FUNDING_EVENT_DTYPE, INSURANCE_DEFICIT, INSURANCE_DEPOSIT,
                            INSURANCE_EVENT_DTYPE, INSURANCE_FUNDING_RESIDUE,
                            INSURANCE_LIQUIDATION_FEE, KIND_LIMIT, LIQ_KIND_ADL,
                            LIQ_KIND_LIQUIDATED, LIQ_KIND_SETTLEMENT, LIQUIDATION_EVENT_DTYPE,
                            MARK_EVENT_DTYPE,
                            ORDER_EVENT_DTYPE, REASON_NAMES, REASON_USER, STATUS_CANCELED,
                            STATUS_FILLED, STATUS_OPEN, STATUS_UNTRIGGERED, TRADE_EVENT_DTYPE)

SCHEMA_VERSION = 1
PRECISION = 38                  # DuckDB's widest DECIMAL
ATOM_SCALE = 6                  # collateral: 1e-6 USDC
RATE_SCALE = 9                  # rates travel in 1e-9 units
INT64_MAX = 2 ** 63 - 1

# Extra balance rows a caller computes (balances changed by fills): these fields, any order.
BALANCE_ROW_DTYPE = np.dtype([("seq", "<i8"), ("ts_ns", "<i8"), ("account", "<i4"),
                              ("balance_atoms", "<i8")])

SIDE_WORDS = ("buy", "sell")
KIND_WORDS = ("limit", "market", "stop_market", "stop_limit", "take_profit_market",
              "take_profit_limit")
STATUS_WORDS = {STATUS_OPEN: "open", STATUS_FILLED: "filled", STATUS_CANCELED: "canceled",
                STATUS_UNTRIGGERED: "untriggered"}
LIQUIDATION_WORDS = {LIQ_KIND_LIQUIDATED: "liquidated", LIQ_KIND_ADL: "adl",
                     LIQ_KIND_SETTLEMENT: "settlement"}
INSURANCE_WORDS = {INSURANCE_LIQUIDATION_FEE: "liquidation_fee",
                   INSURANCE_FUNDING_RESIDUE: "funding_residue", INSURANCE_DEFICIT: "deficit",
                   INSURANCE_DEPOSIT: "deposit"}

DATA_TABLES = ("fills", "orders", "funding_payments", "liquidations", "balances",
               "insurance_fund", "marks", "reports")

# Report rows a caller numbered (persistd, with engine/reports.py): these fields.
REPORT_ROW_DTYPE = np.dtype([("seq", "<i8"), ("account_seq", "<i8"), ("account", "<i4"),
                             ("idx", "<i4"), ("role", "u1"),
                             ("command", "u1", (COMMAND_BYTES,)),
                             ("event", "u1", (EVENT_BYTES,))])
REPORT_WORD_NAMES = ([f"c{i}" for i in range(COMMAND_BYTES // 8)]
                     + [f"e{i}" for i in range(EVENT_BYTES // 8)])
REPORT_WORDS = ", ".join(REPORT_WORD_NAMES)
REPORT_WORD_COLUMNS = ", ".join(f"{w} BIGINT" for w in REPORT_WORD_NAMES)

# Which columns follow the price / quantity scale (widened together when a market needs it).
PRICE_COLUMNS = (("fills", "price"), ("orders", "price"), ("liquidations", "price"),
                 ("liquidations", "bankruptcy_price"), ("funding_payments", "mark"),
                 ("marks", "mark"))
QTY_COLUMNS = (("fills", "qty"), ("orders", "qty"), ("orders", "remaining"),
               ("liquidations", "qty"), ("liquidations", "size"), ("funding_payments", "size"))
# Columns beyond a table's first version: added to older store files when they are opened.
ADDED_COLUMNS = (("funding_payments", "size", "Q"), ("funding_payments", "mark", "P"),
                 ("liquidations", "side", "VARCHAR"), ("liquidations", "fee", "A"),
                 ("liquidations", "bankruptcy_price", "P"),
                 ("liquidations", "counterparty", "BIGINT"), ("liquidations", "size", "Q"))

# Statements a query may hold. SELECT covers DESCRIBE, SHOW, SUMMARIZE, FROM-first and VALUES
# (DuckDB parses them as SELECT). EXPLAIN only of a SELECT (EXPLAIN ANALYZE runs its statement).
# PRAGMA only these (others change settings or force checkpoints).
READ_PRAGMAS = frozenset({"table_info", "show_tables", "show_tables_expanded", "show",
                          "database_size", "database_list", "storage_info", "version",
                          "platform", "functions", "collations"})


class ReadOnlyViolation(Exception):
    """A query() that would do more than read."""


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _word_case(column: str, words: dict) -> str:
    """CASE column WHEN code THEN 'word' ... END (NULL for any other code)."""
    whens = " ".join(f"WHEN {code} THEN {_sql_str(word)}" for code, word in sorted(words.items()))
    return f"CASE {column} {whens} END"


def _report_columns(reports, last: int, upto: int) -> dict:
    """Column arrays of the report rows in (last, upto]; the records as int64 words."""
    if reports is None or not len(reports):
        return {"seq": ()}
    r = reports[(reports["seq"] > last) & (reports["seq"] <= upto)]
    cols = {k: r[k] for k in ("account", "account_seq", "seq", "idx", "role")}
    words = np.concatenate([np.ascontiguousarray(r["command"]).view("<i8"),
                            np.ascontiguousarray(r["event"]).view("<i8")], axis=1)
    for i, name in enumerate(REPORT_WORD_NAMES):
        cols[name] = np.ascontiguousarray(words[:, i])
    return cols


def _event_array(events) -> np.ndarray:
    """Any array of 128-byte event slots (EVENT_DTYPE, a family layout, raw bytes), as
    EVENT_DTYPE."""
    if events is None:
        return np.zeros(0, EVENT_DTYPE)
    arr = np.asarray(events)
    if arr.dtype == EVENT_DTYPE:
        return arr.reshape(-1)
    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if len(raw) % EVENT_BYTES:
        raise ValueError(f"events must be whole {EVENT_BYTES}-byte slots, got {len(raw)} bytes")
    return raw.view(EVENT_DTYPE)


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two int64 columns as one 16-byte value per row (np.isin on pairs)."""
    out = np.empty(len(a), [("a", "<i8"), ("b", "<i8")])
    out["a"], out["b"] = a, b
    return out.view("V16")


class Store:
    """The exchange's DuckDB query store: write() event batches, query() read-only SQL.

    `markets` lists engine.market.Market objects by market id (the events' `market` field);
    None marks an unused id.
    """

    def __init__(self, path, markets, *, config: dict | None = None):
        self.path = str(path)
        self.markets = list(markets)
        for i, m in enumerate(self.markets):
            if m is not None and m.id != i:
                raise ValueError(f"market {m.symbol} has id {m.id} but is at index {i}; "
                                 f"pass markets indexed by id (None for unused ids)")
        price_steps = [None if m is None else (m.tick.mantissa, m.tick.exponent)
                       for m in self.markets]
        qty_steps = [None if m is None else (m.lot.mantissa, m.lot.exponent) for m in self.markets]
        want_p = max([s[1] for s in price_steps if s] + [0])
        want_q = max([s[1] for s in qty_steps if s] + [0])

        cfg = {"enable_external_access": False, "lock_configuration": True}
        cfg.update(config or {})
        self._con = duckdb.connect(self.path, config=cfg)
        self._lock = threading.Lock()          # the reader pool and the closed flag
        self._write_lock = threading.Lock()    # one write() at a time
        self._closed = False
        self._idle_readers: list = []
        try:
            self._writer = self._con.cursor()
            self.price_scale, self.qty_scale = self._create_schema(want_p, want_q)
            self._last_seq = self._stored_last_seq()
            self._last_seq_stale = False
        except BaseException:
            self._con.close()
            raise
        self._inputs: dict[str, dict] = {}     # per table: the columns its INSERT reads
        self._known = np.array([m is not None for m in self.markets] + [False], dtype=bool)
        # Largest |ticks| / |lots| per market whose value fits DECIMAL(38, scale) exactly.
        self._max_ticks = self._exact_limits(price_steps, self.price_scale)
        self._max_lots = self._exact_limits(qty_steps, self.qty_scale)
        self._sql = self._insert_statements()

    # -- schema -------------------------------------------------------------------------
    def _create_schema(self, want_p: int, want_q: int) -> tuple[int, int]:
        cur = self._writer
        have_p = self._column_scale(PRICE_COLUMNS)
        have_q = self._column_scale(QTY_COLUMNS)
        p = max(want_p, have_p if have_p is not None else 0)
        q = max(want_q, have_q if have_q is not None else 0)
        if p > PRECISION - 19 or q > PRECISION - 19:
            raise ValueError(f"a tick or lot size with {max(p, q)} fraction digits leaves too "
                             f"few integer digits in DECIMAL({PRECISION}, ...)")
        P, Q, A, R = (f"DECIMAL({PRECISION},{s})" for s in (p, q, ATOM_SCALE, RATE_SCALE))
        cur.execute("BEGIN TRANSACTION")
        try:
            cur.execute(f"""
                CREATE TABLE IF NOT EXISTS fills (
                    seq BIGINT, ts BIGINT, trade_id BIGINT, market VARCHAR,
                    price {P}, qty {Q}, taker_account BIGINT, maker_account BIGINT,
                    taker_side VARCHAR, taker_fee {A}, maker_fee {A}, liquidation BOOLEAN,
                    taker_oid BIGINT, maker_oid BIGINT);
                CREATE TABLE IF NOT EXISTS orders (
                    seq BIGINT, ts BIGINT, oid BIGINT, cid BIGINT, account BIGINT,
                    market VARCHAR, side VARCHAR, kind VARCHAR, price {P}, qty {Q},
                    status VARCHAR, remaining {Q}, reason VARCHAR);
                CREATE TABLE IF NOT EXISTS funding_payments (
                    seq BIGINT, ts BIGINT, market VARCHAR, account BIGINT, rate {R},
                    payment {A});
                CREATE TABLE IF NOT EXISTS liquidations (
                    seq BIGINT, ts BIGINT, market VARCHAR, account BIGINT, qty {Q}, price {P},
                    kind VARCHAR);
                CREATE TABLE IF NOT EXISTS balances (
                    seq BIGINT, ts BIGINT, account BIGINT, balance {A});
                CREATE TABLE IF NOT EXISTS insurance_fund (
                    seq BIGINT, ts BIGINT, reason VARCHAR, amount {A}, fund {A});
                CREATE TABLE IF NOT EXISTS marks (
                    seq BIGINT, ts BIGINT, market VARCHAR, mark {P});
                CREATE TABLE IF NOT EXISTS admin_log (
                    ts BIGINT, operator VARCHAR, uid BIGINT, pid BIGINT, command VARCHAR,
                    args VARCHAR, seq BIGINT, outcome VARCHAR);
                CREATE TABLE IF NOT EXISTS reports (
                    account BIGINT, account_seq BIGINT, seq BIGINT, idx INTEGER,
                    role TINYINT, {REPORT_WORD_COLUMNS});
                CREATE TABLE IF NOT EXISTS meta (
                    last_seq BIGINT NOT NULL, schema_version INTEGER NOT NULL);
            """)
            if cur.execute("SELECT count(*) FROM meta").fetchall()[0][0] == 0:
                cur.execute("INSERT INTO meta VALUES (0, ?)", [SCHEMA_VERSION])
            types = {"P": P, "Q": Q, "A": A}
            for table, column, typ in ADDED_COLUMNS:
                cur.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} "
                            f"{types.get(typ, typ)}")
            for columns, scale, typ in ((PRICE_COLUMNS, p, P), (QTY_COLUMNS, q, Q)):
                for table, column in columns:
                    if self._scale_of(table, column) < scale:
                        cur.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {typ}")
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return p, q

    def _stored_last_seq(self) -> int:
        # (DuckDB 2 wants every result consumed before the cursor does anything else)
        return int(self._writer.execute("SELECT last_seq FROM meta").fetchall()[0][0])

    def _scale_of(self, table: str, column: str) -> int:
        row = self._writer.execute(
            "SELECT numeric_scale FROM duckdb_columns() WHERE database_name = current_database()"
            " AND schema_name = 'main' AND table_name = ? AND column_name = ?",
            [table, column]).fetchall()
        return -1 if not row or row[0][0] is None else int(row[0][0])

    def _column_scale(self, columns) -> int | None:
        scales = [self._scale_of(t, c) for t, c in columns]
        scales = [s for s in scales if s >= 0]
        return max(scales) if scales else None

    @staticmethod
    def _exact_limits(steps, scale: int) -> np.ndarray:
        out = np.zeros(len(steps) + 1, dtype=np.int64)
        for i, s in enumerate(steps):
            if s is not None:
                mult = s[0] * 10 ** (scale - s[1])       # the step in units of 10**-scale
                out[i] = min(INT64_MAX, (10 ** PRECISION - 1) // mult)
        return out

    def _insert_statements(self) -> dict:
        P = f"DECIMAL({PRECISION},{self.price_scale})"
        Q = f"DECIMAL({PRECISION},{self.qty_scale})"
        A = f"DECIMAL({PRECISION},{ATOM_SCALE})"
        R = f"DECIMAL({PRECISION},{RATE_SCALE})"

        def lookup(items):
            return "[" + ", ".join("NULL" if v is None else v for v in items) + "]"

        symbols = lookup([None if m is None else _sql_str(m.symbol) for m in self.markets])
        ticks = lookup([None if m is None
                        else f"CAST({_sql_str(format(m.tick_size, 'f'))} AS {P})"
                        for m in self.markets])
        lots = lookup([None if m is None
                       else f"CAST({_sql_str(format(m.lot_size, 'f'))} AS {Q})"
                       for m in self.markets])
        market = f"list_extract({symbols}, market + 1)"

        def price(col):   # exact: int64 as DECIMAL(19,0) times the step; 0 ticks = no price
            return (f"CASE WHEN {col} = 0 THEN NULL ELSE "
                    f"CAST({col} AS DECIMAL(19,0)) * list_extract({ticks}, market + 1) END")

        def qty(col):
            return f"CAST({col} AS DECIMAL(19,0)) * list_extract({lots}, market + 1)"

        def atoms(col):
            return f"CAST({col} AS DECIMAL(19,0)) * CAST('0.000001' AS {A})"

        side = _word_case("side", dict(enumerate(SIDE_WORDS)))
        kind = _word_case("kind", dict(enumerate(KIND_WORDS)))
        status = _word_case("status", STATUS_WORDS)
        # orders rows carry cancel reasons (and reduce_only on an amend): codes from 32 up
        reason = _word_case("reason", {c: n for c, n in REASON_NAMES.items()
                                       if c >= REASON_USER})
        return {
            "fills": f"""
                INSERT INTO fills (seq, ts, trade_id, market, price, qty, taker_account,
                                   maker_account, taker_side, taker_fee, maker_fee, liquidation,
                                   taker_oid, maker_oid)
                SELECT seq, ts_ns, trade_id, {market}, {price('price_ticks')},
                       {qty('qty_lots')}, account, maker_account, {side},
                       {atoms('fee_atoms')}, {atoms('maker_fee_atoms')}, liquidation <> 0,
                       oid, maker_oid
                FROM _store_fills""",
            "orders": f"""
                INSERT INTO orders (seq, ts, oid, cid, account, market, side, kind, price, qty,
                                    status, remaining, reason)
                SELECT seq, ts_ns, oid, cid, account, {market}, {side}, {kind},
                       {price('price_ticks')}, {qty('qty_lots')}, {status},
                       {qty('remaining_lots')}, {reason}
                FROM _store_orders""",
            "balances": f"""
                INSERT INTO balances (seq, ts, account, balance)
                SELECT seq, ts_ns, account, {atoms('balance_atoms')} FROM _store_balances""",
            "marks": f"""
                INSERT INTO marks (seq, ts, market, mark)
                SELECT seq, ts_ns, {market}, {price('mark_ticks')} FROM _store_marks""",
            "funding_payments": f"""
                INSERT INTO funding_payments (seq, ts, market, account, rate, payment, size,
                                              mark)
                SELECT seq, ts_ns, {market}, account,
                       CAST(rate_e9 AS DECIMAL(19,0)) * CAST('0.000000001' AS {R}),
                       {atoms('payment_atoms')}, {qty('size_lots')}, {price('mark_ticks')}
                FROM _store_funding_payments""",
            "liquidations": f"""
                INSERT INTO liquidations (seq, ts, market, account, qty, price, kind, side, fee,
                                          bankruptcy_price, counterparty, size)
                SELECT seq, ts_ns, {market}, account, {qty('qty_lots')},
                       {price('price_ticks')}, {_word_case("kind", LIQUIDATION_WORDS)}, {side},
                       {atoms('fee_atoms')}, {price('bankruptcy_ticks')}, counterparty,
                       {qty('size_lots')}
                FROM _store_liquidations""",
            "reports": f"""
                INSERT INTO reports (account, account_seq, seq, idx, role, {REPORT_WORDS})
                SELECT account, account_seq, seq, idx, role, {REPORT_WORDS}
                FROM _store_reports""",
            "insurance_fund": f"""
                INSERT INTO insurance_fund (seq, ts, reason, amount, fund)
                SELECT seq, ts_ns, {_word_case("reason", INSURANCE_WORDS)},
                       {atoms('amount_atoms')}, {atoms('fund_atoms')}
                FROM _store_insurance_fund""",
        }

    # -- writing ------------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        """The highest event seq written (meta.last_seq); 0 for a new store."""
        return self._last_seq

    def write(self, events: np.ndarray | None, balances: np.ndarray | None = None,
              upto_seq: int | None = None, reports: np.ndarray | None = None) -> dict:
        """Write the rows of a batch of events in one transaction; returns rows per table.

        `events` are 128-byte event slots (engine.records.EVENT_DTYPE) in seq order, as the
        event ring holds them. Only events with last_seq < seq <= upto_seq are used (upto_seq
        defaults to the largest seq in `events` and `balances`); afterwards meta.last_seq is
        max(last_seq, upto_seq), in the same transaction as the rows. So a writer that restarts
        and replays an overlap writes nothing twice, and a query sees all of a batch or none.
        All events of one seq (one command) must come in the same call: once a seq is written,
        later events of it are skipped.

        Rows, per event:
        - EV_TRADE -> one fills row: price, qty, taker_account = the event's account,
          maker_account, taker_side = the event's side, taker_fee = fee_atoms,
          maker_fee = maker_fee_atoms (negative: a rebate), liquidation (true when the
          liquidation engine was the taker), taker_oid, maker_oid.
          If maker_remaining_lots is 0 the maker's order is complete: an orders row for the
          maker (oid/cid/account of the maker, side opposite the taker's, kind "limit" since
          only limit orders rest, price = the trade price, which is the maker's own,
          qty = this last fill's qty, remaining 0, status "filled").
          If the taker's remaining_lots is 0 and the taker is not an order acknowledged in the
          same command (whose ack already says "filled"), it is an amended order that
          re-matched: an orders row for the taker likewise (price = its amended price).
        - EV_ACK -> orders row: status from the event ("open", "filled", "canceled",
          "untriggered" for a stop or take-profit waiting for its trigger),
          qty = the accepted quantity (qty_lots), price (NULL for a market order),
          remaining = the open quantity after matching (0 unless open).
        - EV_CANCELED -> orders row: status "canceled", qty = the quantity canceled,
          remaining 0, reason ("user", "ioc", "stp", "reduce_only", ...).
        - EV_AMENDED -> orders row: status "open", the new price, qty = remaining = the new
          open quantity; reason "reduce_only" when the matcher shrank a reduce-only order.
        - EV_TRIGGERED (a stop or take-profit fired) -> orders row like an ack's: the event
          says where the live order ended ("open", "filled", "canceled"), qty = the quantity
          it entered with (a reduce-only order may be clipped); no other ack follows.
        - EV_BALANCE -> balances row: balance = balance_atoms (the balance after the change).
        - EV_MARK -> marks row.
        - EV_FUNDING -> funding_payments row: rate = rate_e9 / 1e9, payment (negative: paid),
          the size and mark it was charged on.
        - EV_LIQUIDATION -> liquidations row per closing step and account: qty, price, kind
          ("liquidated" or "adl"), the account's side, fee, bankruptcy price, counterparty
          (ADL), the account's size afterwards.
        - EV_INSURANCE -> insurance_fund row: reason, amount (signed), fund after it.
        - EV_COMMAND, EV_REJECT, EV_DONE -> nothing.
        `balances` (optional): a structured array with fields seq, ts_ns, account,
        balance_atoms (BALANCE_ROW_DTYPE) of balance changes the caller knows (fills, funding,
        liquidations, from its replica of the state); inserted as given, with the same seq
        window. Balance rows of one seq keep their order, EV_BALANCE rows first.
        `reports` (optional): REPORT_ROW_DTYPE rows (the caller numbers them), inserted as
        given with the same seq window.

        Raises ValueError (nothing written) for an event of a market the store does not know
        or a value too large for its DECIMAL column.
        """
        ev = _event_array(events)
        extra = None
        if balances is not None:
            extra = np.asarray(balances).reshape(-1)
            missing = set(BALANCE_ROW_DTYPE.names) - set(extra.dtype.names or ())
            if missing:
                raise ValueError(f"balances rows lack fields {sorted(missing)}")
        with self._write_lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            cur = self._writer
            if upto_seq is None:
                tops = [int(ev["seq"].max())] if len(ev) else []
                if extra is not None and len(extra):
                    tops.append(int(extra["seq"].max()))
                if not tops:
                    return {}
                upto_seq = max(tops)
            upto_seq = int(upto_seq)
            # Each DuckDB statement costs ~0.1-0.5 ms of CPU however few its rows, more than
            # the rows themselves at ~100 ms batches: the INSERTs, the meta update and the
            # COMMIT go in one execute, and meta.last_seq is read only after a failed write.
            cur.execute("BEGIN TRANSACTION")
            try:
                if self._last_seq_stale:
                    self._last_seq = self._stored_last_seq()
                    self._last_seq_stale = False
                last = self._last_seq
                batches = self._rows(ev, extra, last, upto_seq)
                batches["reports"] = _report_columns(reports, last, upto_seq)
                counts = {}
                statements = []
                for table, data in batches.items():
                    n = len(data["seq"])
                    if n == 0:
                        continue
                    if table in self._inputs:
                        self._inputs[table].update(data)
                    else:
                        # Registered once: DuckDB reads the dict's arrays when the INSERT
                        # runs, and a registration costs as much as a statement.
                        self._inputs[table] = dict(data)
                        cur.register(f"_store_{table}", self._inputs[table])
                    statements.append(self._sql[table])
                    counts[table] = n
                new_last = max(last, upto_seq)
                if new_last != last:
                    statements.append(f"UPDATE meta SET last_seq = {new_last}")
                cur.execute(";\n".join(statements + ["COMMIT"]))
            except BaseException:
                self._last_seq_stale = True     # a failed COMMIT may have written meta or not
                try:
                    cur.execute("ROLLBACK")
                except duckdb.Error:
                    pass                  # no transaction left to roll back
                raise
            finally:
                for columns in self._inputs.values():
                    columns.clear()       # the batch's arrays are not kept alive
            self._last_seq = new_last
            return counts

    def log_admin(self, ts_ns: int, operator: str, uid: int, pid: int, command: str,
                  args: str, seq: int | None, outcome: str) -> None:
        """One row of admin_log: who (user name, uid, pid of the `perpx` process) ran which
        operator command when (wall-clock ns), the seq it ended at (None if it has none) and
        its outcome ("ok" or the error). Not derived from the journal (an oracle set reaches
        the matcher as riskd's SET_MARK), so forget_after leaves these rows alone."""
        with self._write_lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            self._writer.execute("INSERT INTO admin_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 [int(ts_ns), str(operator), int(uid), int(pid), str(command),
                                  str(args), None if seq is None else int(seq), str(outcome)])

    def forget_after(self, seq: int) -> int:
        """Delete every row of a seq > `seq` and lower meta.last_seq to `seq` if above it,
        in one transaction; returns the rows deleted. For a journal whose tail was cut:
        the seqs past its end will be reused by other commands, which write() would
        otherwise skip as already written."""
        seq = int(seq)
        with self._write_lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            cur = self._writer
            cur.execute("BEGIN TRANSACTION")
            try:
                deleted = 0
                for table in DATA_TABLES:
                    deleted += cur.execute(f"DELETE FROM {table} WHERE seq > ?",
                                           [seq]).fetchall()[0][0]
                cur.execute("UPDATE meta SET last_seq = least(last_seq, ?)", [seq])
                last = self._stored_last_seq()
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self._last_seq = last
            self._last_seq_stale = False
            return deleted

    def _rows(self, ev: np.ndarray, extra, last: int, upto: int) -> dict:
        """Column arrays per table for the events in (last, upto] (see write)."""
        seq = ev["seq"]
        pos = np.flatnonzero((seq > last) & (seq <= upto))
        etype = ev["etype"][pos]
        out = {}

        # trades -> fills (+ orders rows for orders a fill completed)
        p_tr = pos[etype == EV_TRADE]
        tr = ev[p_tr].view(TRADE_EVENT_DTYPE)
        self._check(tr, p_tr, ev, ("price_ticks",), ("qty_lots",))
        out["fills"] = {k: tr[k] for k in (
            "seq", "ts_ns", "trade_id", "market", "price_ticks", "qty_lots", "account",
            "maker_account", "side", "fee_atoms", "maker_fee_atoms", "liquidation", "oid",
            "maker_oid")}

        # order events -> orders
        p_oe = pos[np.isin(etype, (EV_ACK, EV_CANCELED, EV_AMENDED, EV_TRIGGERED))]
        oe = ev[p_oe].view(ORDER_EVENT_DTYPE)
        oet = oe["etype"]
        is_ack, is_cancel = oet == EV_ACK, oet == EV_CANCELED
        is_new = is_ack | (oet == EV_TRIGGERED)     # a fired order's ack, in effect
        self._check(oe, p_oe, ev, ("price_ticks",), ("qty_lots", "remaining_lots"))
        parts = [{
            "seq": oe["seq"], "ts_ns": oe["ts_ns"], "oid": oe["oid"], "cid": oe["cid"],
            "account": oe["account"].astype(np.int64), "market": oe["market"],
            "side": oe["side"], "kind": oe["kind"], "price_ticks": oe["price_ticks"],
            "qty_lots": np.where(is_new, oe["qty_lots"], oe["remaining_lots"]),
            "status": np.where(is_new, oe["status"],
                               np.where(is_cancel, STATUS_CANCELED, STATUS_OPEN)).astype(np.uint8),
            "remaining_lots": np.where(is_cancel, 0, oe["remaining_lots"]),
            "reason": oe["reason"],
            "_key": p_oe * 4,
        }]
        maker_done = tr["maker_remaining_lots"] == 0
        if maker_done.any():
            t = tr[maker_done]
            parts.append({
                "seq": t["seq"], "ts_ns": t["ts_ns"], "oid": t["maker_oid"],
                "cid": t["maker_cid"], "account": t["maker_account"].astype(np.int64),
                "market": t["market"], "side": (1 - t["side"]).astype(np.uint8),
                "kind": np.full(len(t), KIND_LIMIT, np.uint8), "price_ticks": t["price_ticks"],
                "qty_lots": t["qty_lots"], "status": np.full(len(t), STATUS_FILLED, np.uint8),
                "remaining_lots": np.zeros(len(t), np.int64),
                "reason": np.zeros(len(t), np.uint8), "_key": p_tr[maker_done] * 4 + 1,
            })
        taker_done = tr["remaining_lots"] == 0
        if taker_done.any():
            # a new order's ack or a fired order's EV_TRIGGERED (same command, same oid)
            # already reports it filled; one oid has two such events when a stop is placed
            # and fires, so the match is on the (seq, oid) pair
            acks = oe[is_new]
            taker_done &= ~np.isin(_pairs(tr["seq"], tr["oid"]), _pairs(acks["seq"], acks["oid"]))
        if taker_done.any():
            t = tr[taker_done]
            price = t["price_ticks"].copy()
            # the amended price of each such taker (these rows are rare: look them up)
            am = oe[(oet == EV_AMENDED) & np.isin(oe["oid"], t["oid"])]
            amended = {}
            for s, o, pr in zip(am["seq"].tolist(), am["oid"].tolist(),
                                am["price_ticks"].tolist()):
                amended.setdefault((s, o), pr)
            for k, (s, o) in enumerate(zip(t["seq"].tolist(), t["oid"].tolist())):
                price[k] = amended.get((s, o), price[k])
            parts.append({
                "seq": t["seq"], "ts_ns": t["ts_ns"], "oid": t["oid"], "cid": t["cid"],
                "account": t["account"].astype(np.int64), "market": t["market"],
                "side": t["side"], "kind": np.full(len(t), KIND_LIMIT, np.uint8),
                "price_ticks": price, "qty_lots": t["qty_lots"],
                "status": np.full(len(t), STATUS_FILLED, np.uint8),
                "remaining_lots": np.zeros(len(t), np.int64),
                "reason": np.zeros(len(t), np.uint8), "_key": p_tr[taker_done] * 4 + 2,
            })
        if len(parts) == 1:
            orders = parts[0]
        else:
            orders = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            ordering = np.argsort(orders["_key"], kind="stable")
            orders = {k: v[ordering] for k, v in orders.items()}
        del orders["_key"]
        out["orders"] = orders

        # balances: EV_BALANCE rows (deposits, withdrawals, the fund's deficit covers, all
        # of them on the balance) and the caller's rows, by seq
        p_bal = pos[etype == EV_BALANCE]
        be = ev[p_bal].view(BALANCE_EVENT_DTYPE)
        cols = ("seq", "ts_ns", "account", "balance_atoms")
        bal = {k: be[k] for k in cols}
        if extra is not None and len(extra):
            x = extra[(extra["seq"] > last) & (extra["seq"] <= upto)]
            if len(x):
                bal = {k: np.concatenate([bal[k].astype(BALANCE_ROW_DTYPE[k]),
                                          x[k].astype(BALANCE_ROW_DTYPE[k])]) for k in cols}
                ordering = np.argsort(bal["seq"], kind="stable")
                bal = {k: v[ordering] for k, v in bal.items()}
        out["balances"] = bal

        # marks
        p_mark = pos[etype == EV_MARK]
        mk = ev[p_mark].view(MARK_EVENT_DTYPE)
        self._check(mk, p_mark, ev, ("mark_ticks",), ())
        out["marks"] = {k: mk[k] for k in ("seq", "ts_ns", "market", "mark_ticks")}

        # funding payments, liquidation steps, insurance fund changes: one row per event
        p_fund = pos[etype == EV_FUNDING]
        fe = ev[p_fund].view(FUNDING_EVENT_DTYPE)
        self._check(fe, p_fund, ev, ("mark_ticks",), ("size_lots",))
        out["funding_payments"] = {k: fe[k] for k in (
            "seq", "ts_ns", "market", "account", "rate_e9", "payment_atoms", "size_lots",
            "mark_ticks")}
        p_liq = pos[etype == EV_LIQUIDATION]
        le = ev[p_liq].view(LIQUIDATION_EVENT_DTYPE)
        self._check(le, p_liq, ev, ("price_ticks", "bankruptcy_ticks"), ("qty_lots", "size_lots"))
        out["liquidations"] = {k: le[k] for k in (
            "seq", "ts_ns", "market", "account", "qty_lots", "price_ticks", "kind", "side",
            "fee_atoms", "bankruptcy_ticks", "counterparty", "size_lots")}
        ie = ev[pos[etype == EV_INSURANCE]].view(INSURANCE_EVENT_DTYPE)
        out["insurance_fund"] = {k: ie[k] for k in (
            "seq", "ts_ns", "reason", "amount_atoms", "fund_atoms")}
        return out

    def _check(self, rows, positions, ev, tick_fields, lot_fields) -> None:
        """Known markets, and values that fit their DECIMAL columns exactly; else ValueError."""
        if len(rows) == 0:
            return
        market = rows["market"].astype(np.int64)
        n = len(self.markets)
        bad = (market < 0) | (market >= n)
        safe = np.where(bad, n, market)
        bad |= ~self._known[safe]
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"event seq {int(rows['seq'][k])} names market {int(market[k])}, "
                             f"which the store does not know ({n} market ids configured)")
        for fields, limits, what, scale in ((tick_fields, self._max_ticks, "ticks",
                                             self.price_scale),
                                            (lot_fields, self._max_lots, "lots",
                                             self.qty_scale)):
            lim = limits[safe]
            for f in fields:
                v = rows[f]
                over = (v > lim) | (v < -lim)
                if over.any():
                    k = int(np.flatnonzero(over)[0])
                    m = self.markets[int(market[k])]
                    raise ValueError(
                        f"event seq {int(rows['seq'][k])}: {f} = {int(v[k])} {what} of "
                        f"{m.symbol} does not fit DECIMAL({PRECISION},{scale}) exactly")

    # -- reading ------------------------------------------------------------------------
    def query(self, sql: str, params=None, *,
              max_rows: int | None = None) -> tuple[list[str], list[tuple]]:
        """Run read-only SQL: (column names, rows) of its last statement.

        Allowed: SELECT (with DESCRIBE, SHOW, SUMMARIZE, VALUES, FROM-first), EXPLAIN of a
        SELECT, and the PRAGMAs in READ_PRAGMAS; several of them separated by ';'. Anything
        else, or a mix with anything else, raises ReadOnlyViolation before anything runs. The
        statements run in one READ ONLY transaction that is rolled back afterwards, and the
        connection cannot touch other files (enable_external_access is off). DECIMAL values
        come back as decimal.Decimal. `params` (a list, or a dict for $name parameters) need
        a single statement. `max_rows` caps the rows fetched (the rest are dropped).
        """
        statements = duckdb.extract_statements(sql)
        if not statements:
            raise ValueError("no SQL statement given")
        for st in statements:
            refusal = _refusal(st)
            if refusal:
                raise ReadOnlyViolation(refusal)
        if params is not None and len(statements) != 1:
            raise ValueError("query parameters need a single statement")
        cur = self._borrow()
        try:
            _begin_read_only(cur)
            try:
                for st in statements[:-1]:
                    cur.execute(st)
                if params is None:
                    cur.execute(statements[-1])
                else:
                    cur.execute(statements[-1], params)
                columns = [d[0] for d in cur.description] if cur.description else []
                if not cur.description:
                    rows = []
                elif max_rows is None:
                    rows = cur.fetchall()
                else:
                    rows = cur.fetchmany(max_rows)
            finally:
                cur.execute("ROLLBACK")
        except duckdb.TransactionException as e:
            if "read-only" in str(e) or "read only" in str(e):
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ReadOnlyViolation(f"refused: the query tried to write ({first})") from None
            raise
        finally:
            self._give_back(cur)
        return columns, rows

    def _borrow(self):
        with self._lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            if self._idle_readers:
                return self._idle_readers.pop()
            return self._con.cursor()

    def _give_back(self, cur) -> None:
        with self._lock:
            if self._closed:
                cur.close()
            else:
                self._idle_readers.append(cur)

    # -- closing ------------------------------------------------------------------------
    def close(self) -> None:
        """Close the cursors and the database (checkpointed by DuckDB). Idempotent."""
        with self._write_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            for cur in self._idle_readers:
                cur.close()
            self._idle_readers.clear()
            self._writer.close()
            self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_read_only_begin = ["BEGIN TRANSACTION READ ONLY"]


def _begin_read_only(cur) -> None:
    """BEGIN TRANSACTION READ ONLY; a plain BEGIN on a DuckDB too old to parse it (the
    statement check in query() still applies)."""
    try:
        cur.execute(_read_only_begin[0])
    except duckdb.ParserException:
        _read_only_begin[0] = "BEGIN TRANSACTION"
        cur.execute(_read_only_begin[0])


def _words(query: str) -> list[str]:
    """The statement's tokens without comments, lower-cased, with their offsets."""
    out = []
    tokens = duckdb.tokenize(query)
    for k, (start, ttype) in enumerate(tokens):
        if ttype == duckdb.token_type.comment:
            continue
        end = tokens[k + 1][0] if k + 1 < len(tokens) else len(query)
        out.append((query[start:end].strip().lower(), start))
    return out


def _refusal(statement) -> str | None:
    """Why a parsed statement may not run in query(), or None if it only reads."""
    stype = statement.type
    if stype == duckdb.StatementType.SELECT:
        return None
    name = stype.name
    if stype == duckdb.StatementType.EXPLAIN:
        words = _words(statement.query)
        k = 1
        if len(words) > 1 and words[1][0] in ("analyze", "analyse"):
            k = 2
        if len(words) > k:
            inner = duckdb.extract_statements(statement.query[words[k][1]:])
            if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
                return None
        return "refused: EXPLAIN is allowed only of a SELECT (the store is read-only)"
    if stype == duckdb.StatementType.PRAGMA:
        words = _words(statement.query)
        pragma = re.match(r"\w+", words[1][0]) if len(words) > 1 else None
        if pragma and pragma.group(0) in READ_PRAGMAS:
            return None
        return (f"refused: PRAGMA {pragma.group(0) if pragma else ''} is not a read "
                f"(allowed: {', '.join(sorted(READ_PRAGMAS))})")
    return (f"refused: {name} statements are not allowed; the store is read-only "
            f"(SELECT, EXPLAIN, DESCRIBE/SHOW and reading PRAGMAs only)")
