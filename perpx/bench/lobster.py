"""LOBSTER message files as perpx command streams (for the replay benchmark and book tests).

A LOBSTER message file (https://lobsterdata.com, see LOBSTER_SampleFiles_ReadMe.txt next to
the data) has one row per book event: time (seconds after midnight), type, order id, size
(shares), price (USD x 10000) and direction (1 buy, -1 sell order). The replay maps it onto one
perpx market with a 0.01 USD tick and a 1-share lot (so 1 tick x 1 lot = 0.01 USD = 10,000
atoms), marked at the first price, with a 50% price band:

  | type | meaning                  | perpx command                                          |
  | 1    | new limit order          | new GTC limit order, cid = LOBSTER order id            |
  | 2    | partial cancellation     | amend the quantity down (by cid); cancel at zero       |
  | 3    | deletion                 | cancel (by cid)                                        |
  | 4    | visible execution        | IOC limit order on the opposite side, that size at     |
  |      |                          | that price, from a taker account: it trades against    |
  |      |                          | whatever rests there, by price-time priority           |
  | 5, 7 | hidden execution, halt   | skipped                                                |

Orders whose submission is not in the file (they rested before the window, or their
submission happened outside the file's price levels) are skipped for types 2-4.

A level-1 file only reports events at the best quotes, so an order that leaves the top of the
book and is deleted deeper down never gets its deletion in the file; replayed as is, it would
rest forever and later cross new orders that never traded in reality. When the matching
orderbook file (`..._orderbook_1.csv`, best ask/bid after every message) is present, the
replay therefore also cancels, just before a message, every order still open in the replay
that is priced better than the real best quote after that message (a bid above the best
bid, an ask below the best ask): it must have been deleted unseen. These `stale_cancel`s are
counted separately. The
replayer tracks each order's size as LOBSTER reports it, so amendments name the size LOBSTER
says is left; when the replayed book has matched differently (it lacks the orders that rested
before the window), an order may already be gone, and its cancel is rejected with
`unknown_order` — that is what the reject rate of the replay measures.

Makers are spread over accounts 1..100 by order id (1 + id % 100), takers over accounts
101..110 (by the executed order's id); every account is funded with 1e9 USDC. Commands carry
the message time in ns as `ts_ns` and the message's row as `req`.
"""

import heapq
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.records import (CMD_AMEND, CMD_CANCEL, CMD_DEPOSIT, CMD_NEW_ORDER, KIND_LIMIT,
                            SIDE_BUY, SIDE_SELL, TIF_GTC, TIF_IOC, market_create_command,
                            market_limits_command, new_commands)

DEFAULT_DATASET = "lobster-amzn-2012-06-21-level1"
DEFAULT_MESSAGE_FILE = "AMZN_2012-06-21_34200000_57600000_message_1.csv"
DATA_ENV = "PERPX_DATA"

MESSAGE_DTYPE = np.dtype([
    ("time_ns", "<i8"),        # nanoseconds after midnight
    ("type", "<i8"),
    ("order_id", "<i8"),
    ("size", "<i8"),           # shares
    ("price", "<i8"),          # USD x 10000
    ("direction", "<i8"),      # 1 buy order, -1 sell order
])

T_SUBMIT, T_CANCEL_PART, T_DELETE, T_EXEC_VISIBLE, T_EXEC_HIDDEN, T_HALT = 1, 2, 3, 4, 5, 7

PRICE_PER_TICK = 100           # LOBSTER price units (1e-4 USD) per 0.01 USD tick
ATOMS_PER_TICK_LOT = 10_000    # 0.01 USD x 1 share, in 1e-6 USDC
MARKET = 0
N_MAKERS = 100
N_TAKERS = 10
FIRST_MAKER = 1
FIRST_TAKER = FIRST_MAKER + N_MAKERS
DEPOSIT_ATOMS = 1_000_000_000 * 1_000_000     # 1e9 USDC each
PRICE_BAND_E9 = 500_000_000                   # 50%
MAKER_FEE_E9 = 200_000
TAKER_FEE_E9 = 500_000
MAX_LEVERAGE = 20
MAX_ORDER_LOTS = 1_000_000
MAX_POSITION_LOTS = 10_000_000
MAX_OPEN_ORDERS = 100_000
TAKER_CID_BASE = 1 << 40       # taker cids: base + message row (never a LOBSTER id)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def data_dirs() -> list[Path]:
    """Where the shared data folder is looked for: $PERPX_DATA, then ../shared/data next to
    the repository root, then ./data inside it."""
    out = []
    if os.environ.get(DATA_ENV):
        out.append(Path(os.environ[DATA_ENV]))
    root = repo_root()
    out += [root.parent / "shared" / "data", root / "data"]
    return out


def find_message_file(data: str | os.PathLike | None = None) -> Path:
    """The LOBSTER message file: `data` may be the file itself, the dataset folder, or the data
    folder holding the dataset folder. Raises FileNotFoundError with the places looked at."""
    candidates = []
    bases = [Path(data)] if data is not None else data_dirs()
    for base in bases:
        if base.is_file():
            return base
        candidates += [base / DEFAULT_DATASET / DEFAULT_MESSAGE_FILE, base / DEFAULT_MESSAGE_FILE]
        if base.is_dir():
            candidates += sorted(base.glob("*_message_*.csv"))
            candidates += sorted(base.glob("*/*_message_*.csv"))
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(b) for b in bases)
    raise FileNotFoundError(f"LOBSTER message file not found (looked in {looked}; "
                            f"pass --data PATH or set {DATA_ENV})")


def load_messages(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Rows of a LOBSTER message file as a MESSAGE_DTYPE array (first `limit` rows)."""
    path = Path(path)
    with open(path) as f:
        first = f.readline()
    skip = 0 if first[:1].isdigit() else 1          # the sample files may carry a header
    raw = np.loadtxt(path, delimiter=",", skiprows=skip, max_rows=limit, dtype=np.float64,
                     ndmin=2, usecols=range(6))
    out = np.zeros(len(raw), MESSAGE_DTYPE)
    out["time_ns"] = np.rint(raw[:, 0] * 1e9).astype(np.int64)
    for k, name in enumerate(MESSAGE_DTYPE.names[1:], start=1):
        out[name] = raw[:, k].astype(np.int64)
    return out


BOOK_DTYPE = np.dtype([
    ("ask_price", "<i8"), ("ask_size", "<i8"), ("bid_price", "<i8"), ("bid_size", "<i8"),
])
NO_BID = -9999999999           # LOBSTER's dummy prices for an empty side
NO_ASK = 9999999999


def orderbook_file_for(message_file: str | os.PathLike) -> Path:
    p = Path(message_file)
    return p.with_name(p.name.replace("_message_", "_orderbook_"))


def load_orderbook(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Level 1 of a LOBSTER orderbook file (the book after each message) as BOOK_DTYPE."""
    path = Path(path)
    with open(path) as f:
        first = f.readline()
    skip = 0 if first[:1] in "-0123456789" else 1
    raw = np.loadtxt(path, delimiter=",", skiprows=skip, max_rows=limit, dtype=np.int64,
                     ndmin=2, usecols=range(4))
    out = np.zeros(len(raw), BOOK_DTYPE)
    for k, name in enumerate(BOOK_DTYPE.names):
        out[name] = raw[:, k]
    return out


def maker_account(order_id) -> int:
    return FIRST_MAKER + order_id % N_MAKERS


def taker_account(order_id) -> int:
    return FIRST_TAKER + order_id % N_TAKERS


@dataclass
class Replay:
    setup: np.ndarray          # market + funding, processed privileged and untimed
    commands: np.ndarray       # one command per replayed message
    rows: np.ndarray           # the message row each command came from
    mark_ticks: int
    stats: dict = field(default_factory=dict)

    def full(self) -> np.ndarray:
        return np.concatenate([self.setup, self.commands])


def replay_setup(mark_ticks: int, ts_ns: int = 0) -> np.ndarray:
    parts = [
        market_create_command(MARKET, atoms_per_tick_lot=ATOMS_PER_TICK_LOT,
                              initial_mark_ticks=mark_ticks, maker_fee_e9=MAKER_FEE_E9,
                              taker_fee_e9=TAKER_FEE_E9, price_band_e9=PRICE_BAND_E9,
                              max_leverage=MAX_LEVERAGE, ts_ns=ts_ns),
        market_limits_command(MARKET, max_price_ticks=2 * mark_ticks,
                              max_order_lots=MAX_ORDER_LOTS,
                              max_position_lots=MAX_POSITION_LOTS,
                              max_open_orders=MAX_OPEN_ORDERS, ts_ns=ts_ns),
    ]
    deposits = new_commands(N_MAKERS + N_TAKERS)
    deposits["cmd"] = CMD_DEPOSIT
    deposits["ts_ns"] = ts_ns
    deposits["account"] = np.arange(FIRST_MAKER, FIRST_TAKER + N_TAKERS)
    deposits["amount_atoms"] = DEPOSIT_ATOMS
    parts.append(deposits)
    out = np.concatenate(parts)
    out["req"] = np.arange(len(out)) - len(out)
    return out


def to_commands(messages: np.ndarray, book: np.ndarray | None = None) -> Replay:
    """Map LOBSTER messages onto perpx commands (see the module docstring).

    `book`: the level-1 orderbook rows matching `messages` (same length); when given, orders
    the file never deletes are canceled once the real best quotes pass them.
    """
    if book is not None and len(book) != len(messages):
        raise ValueError("orderbook rows do not match the messages")
    priced = messages[(messages["type"] >= T_SUBMIT) & (messages["type"] <= T_EXEC_VISIBLE)]
    if len(priced) == 0:
        raise ValueError("no replayable LOBSTER messages")
    mark = int(priced["price"][0]) // PRICE_PER_TICK
    cap = len(messages) * (2 if book is not None else 1)
    out = new_commands(cap)
    rows = np.zeros(cap, np.int64)
    left = {}                          # order id -> shares LOBSTER says are still open
    bids, asks = [], []                # heaps of (-price | price, order id), lazily pruned
    n = 0
    skipped = {"unknown_order": 0, "hidden_execution": 0, "halt": 0, "off_grid": 0, "other": 0}
    by_kind = {"new_limit": 0, "amend": 0, "cancel": 0, "ioc_execution": 0, "stale_cancel": 0}
    recs = messages.tolist()
    quotes = book[["bid_price", "ask_price"]].tolist() if book is not None else None

    def emit(row, ts, fields):
        nonlocal n
        c = out[n]
        for k, v in fields.items():
            c[k] = v
        c["market"] = MARKET
        c["ts_ns"] = ts
        c["req"] = row
        rows[n] = row
        n += 1

    def prune(row, ts, best_bid, best_ask):
        """Cancel open orders priced better than the real best quotes (deleted unseen)."""
        for heap, sign, stale in ((bids, -1, lambda p: best_bid != NO_BID and p > best_bid),
                                  (asks, 1, lambda p: best_ask != NO_ASK and p < best_ask)):
            while heap:
                key, oid = heap[0]
                if left.get(oid, 0) <= 0:
                    heapq.heappop(heap)          # gone already
                    continue
                if not stale(sign * key):
                    break
                heapq.heappop(heap)
                left[oid] = 0
                emit(row, ts, {"cmd": CMD_CANCEL, "account": maker_account(oid), "cid": oid})
                by_kind["stale_cancel"] += 1

    for row, (ts, typ, oid, size, price, direction) in enumerate(recs):
        # 1. the message's own effect on the tracked sizes, and its command (or None)
        cmd = None
        if typ == T_SUBMIT:
            if price % PRICE_PER_TICK or size <= 0:
                skipped["off_grid"] += 1
            else:
                left[oid] = size
                heapq.heappush(bids if direction == 1 else asks,
                               (-price if direction == 1 else price, oid))
                cmd = {"cmd": CMD_NEW_ORDER, "account": maker_account(oid), "cid": oid,
                       "side": SIDE_BUY if direction == 1 else SIDE_SELL, "kind": KIND_LIMIT,
                       "tif": TIF_GTC, "price_ticks": price // PRICE_PER_TICK, "qty_lots": size}
                by_kind["new_limit"] += 1
        elif typ in (T_CANCEL_PART, T_DELETE, T_EXEC_VISIBLE):
            open_size = left.get(oid, 0)
            if open_size <= 0:
                skipped["unknown_order"] += 1
            elif typ == T_EXEC_VISIBLE and price % PRICE_PER_TICK:
                skipped["off_grid"] += 1
            else:
                rest = open_size - size if typ != T_DELETE else 0
                left[oid] = rest
                if typ == T_EXEC_VISIBLE:
                    cmd = {"cmd": CMD_NEW_ORDER, "account": taker_account(oid),
                           "cid": TAKER_CID_BASE + row,
                           "side": SIDE_SELL if direction == 1 else SIDE_BUY,
                           "kind": KIND_LIMIT, "tif": TIF_IOC,
                           "price_ticks": price // PRICE_PER_TICK, "qty_lots": size}
                    by_kind["ioc_execution"] += 1
                elif rest > 0:
                    cmd = {"cmd": CMD_AMEND, "account": maker_account(oid), "cid": oid,
                           "qty_lots": rest}
                    by_kind["amend"] += 1
                else:
                    cmd = {"cmd": CMD_CANCEL, "account": maker_account(oid), "cid": oid}
                    by_kind["cancel"] += 1
        elif typ == T_EXEC_HIDDEN:
            skipped["hidden_execution"] += 1
        elif typ == T_HALT:
            skipped["halt"] += 1
        else:
            skipped["other"] += 1
        # 2. orders the real book after this message no longer has, then the message itself
        if quotes is not None:
            prune(row, ts, *quotes[row])
        if cmd is not None:
            emit(row, ts, cmd)
    ts0 = int(messages["time_ns"][0])
    stats = {"messages": len(messages), "commands": n, "by_kind": by_kind, "skipped": skipped,
             "mark_ticks": mark}
    return Replay(setup=replay_setup(mark, ts0), commands=out[:n].copy(), rows=rows[:n].copy(),
                  mark_ticks=mark, stats=stats)


def load_replay(data=None, limit: int | None = None,
                prune_stale: bool = True) -> tuple[Path, Replay]:
    """Find, load and map the message file (pruned with its orderbook file when present)."""
    path = find_message_file(data)
    messages = load_messages(path, limit)
    book = None
    book_path = orderbook_file_for(path)
    if prune_stale and book_path.is_file():
        book = load_orderbook(book_path, limit)
    replay = to_commands(messages, book)
    replay.stats["orderbook"] = str(book_path) if book is not None else None
    return path, replay
