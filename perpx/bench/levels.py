"""`perpx bench levels`: what a deep book side costs the compiled matcher per command.

A book side's levels are sorted in blocks (engine/core/book_sides.py): a new or removed level
shifts one block, and the side's block directory when a block splits, merges or empties. With
one sorted array per side (before), a level far from the best shifted every level between it
and the best. A side can hold up to `max_levels_per_side` levels, which the config sizes to the
order pool (docs/risk.md, "What stuffing costs now"), so the worst case is a side holding the
whole pool.

Measured: one account rests `levels` bids at distinct prices, then (timed) places and cancels
one bid `pairs` times, either below the lowest level (far) or above the best (near).
Reported per command (a pair is two commands): the median over runs of wall time / commands,
batches of `batch` commands per Matcher.process call as the matcher process hands them over;
`shift_ns_per_level` = (far - near) / levels (0.86 with one sorted array).
"""

import time

import numpy as np

from engine.config import EngineConfig
from engine.records import (CMD_CANCEL, CMD_DEPOSIT, CMD_NEW_ORDER, KIND_LIMIT, SIDE_BUY,
                            TIF_GTC, market_create_command, market_limits_command, new_commands)
from perpx.bench.matcher import Ring, fresh_matcher, quiet_gc

MARK_TICKS = 10_000_000
ACCOUNT = 1
DEFAULT_LEVELS = (4096, 16384, 65536)
DEFAULT_PAIRS = 20_000


def _setup(levels: int) -> np.ndarray:
    """A market with a 50% band around MARK_TICKS and one funded account resting `levels`
    one-lot bids at MARK_TICKS - 1, - 2, ... (the best last)."""
    deposit = new_commands(1)
    deposit["cmd"] = CMD_DEPOSIT
    deposit["account"] = ACCOUNT
    deposit["amount_atoms"] = 1 << 50
    bids = _bids(MARK_TICKS - 1 - np.arange(levels), cid0=1)
    return np.concatenate([
        market_create_command(0, atoms_per_tick_lot=1, initial_mark_ticks=MARK_TICKS,
                              maker_fee_e9=0, taker_fee_e9=0, price_band_e9=500_000_000,
                              max_leverage=100),
        market_limits_command(0, max_price_ticks=2 * MARK_TICKS, max_order_lots=1000,
                              max_position_lots=1 << 20, max_open_orders=1_000_000),
        deposit, bids])


def _bids(prices: np.ndarray, cid0: int) -> np.ndarray:
    c = new_commands(len(prices))
    c["cmd"] = CMD_NEW_ORDER
    c["account"] = ACCOUNT
    c["side"] = SIDE_BUY
    c["kind"] = KIND_LIMIT
    c["tif"] = TIF_GTC
    c["qty_lots"] = 1
    c["price_ticks"] = prices
    c["cid"] = cid0 + np.arange(len(prices))
    return c


def _pairs(levels: int, pairs: int, far: bool) -> np.ndarray:
    """Place one bid at a new level and cancel it again, `pairs` times."""
    price = MARK_TICKS - levels - 10 if far else MARK_TICKS
    cids = (1 << 40) + np.arange(pairs)
    c = new_commands(2 * pairs)
    c[0::2] = _bids(np.full(pairs, price), cid0=int(cids[0]))
    c["cmd"][1::2] = CMD_CANCEL
    c["account"][1::2] = ACCOUNT
    c["cid"][1::2] = cids
    c["req"] = np.arange(2 * pairs) + 1
    return c


def _timed(config: EngineConfig, setup: np.ndarray, commands: np.ndarray, ring: Ring,
           batch: int) -> float:
    """ns per command of one pass over `commands` on a fresh matcher."""
    matcher, pos = fresh_matcher(config, setup, ring)
    clock = time.perf_counter_ns
    i, n = 0, len(commands)
    with quiet_gc():
        t0 = clock()
        while i < n:
            done, pos = matcher.process(commands, ring.sink, pos, ring.capacity, 0, True, i,
                                        min(batch, n - i))
            i += done
        elapsed = clock() - t0
    if np.any(matcher.state.book_depth[0] != (config.max_levels_per_side - 16, 0)):
        raise RuntimeError("the book side does not hold the levels the benchmark set up")
    return elapsed / n


def bench_levels(levels=DEFAULT_LEVELS, pairs: int = DEFAULT_PAIRS, runs: int = 3,
                 batch: int = 256) -> dict:
    rows = []
    for n in levels:
        config = EngineConfig(max_accounts=4, max_markets=1, max_orders=n + 16,
                              max_levels_per_side=n + 16)
        ring = Ring(config)
        setup = _setup(n)
        row = {"levels": n}
        for name, far in (("near_ns", False), ("far_ns", True)):
            stream = _pairs(n, pairs, far)
            row[name] = round(float(np.median([_timed(config, setup, stream, ring, batch)
                                               for _ in range(runs)])), 1)
        row["shift_ns_per_level"] = round((row["far_ns"] - row["near_ns"]) / n, 3)
        rows.append(row)
    return {"pairs": pairs, "runs": runs, "batch": batch, "rows": rows}


def format_report(res: dict) -> str:
    lines = [f"levels bench: {res['pairs']} place+cancel pairs per run, median of {res['runs']}"
             f" runs, batch {res['batch']}; ns per command",
             f"{'levels':>8} {'near':>9} {'far':>10} {'ns/level':>9}"]
    for r in res["rows"]:
        lines.append(f"{r['levels']:>8} {r['near_ns']:>9.1f} {r['far_ns']:>10.1f} "
                     f"{r['shift_ns_per_level']:>9.3f}")
    return "\n".join(lines)
