"""The liquidation scanner (riskd/scanner.py) against the exact rule (engine/risk.py).

Unit and property tests on a State built in-process (the matcher's tables, filled directly):
whatever the positions, balances, brackets and mark moves, every account engine/risk.py finds
liquidatable is among the scanner's LIQUIDATE targets (nothing missed), the extras sit within
a tick of their threshold, a target is not re-sent until its account changes or the retry
period passes, and only accounts whose changed_seq moved (plus the sweep) are re-derived.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from engine.records import MARGIN_CROSS, MARGIN_ISOLATED
from engine.risk import account_risk, bracket_amounts, liquidation_targets
from engine.state import allocate_state
from perpx.launch import REPO, child_env
from riskd.scanner import CROSS, Scanner

USDC = 1_000_000
S = 1_000_000_000
ACCOUNTS = 64
CFG = EngineConfig(max_accounts=ACCOUNTS, max_markets=2, max_orders=16, max_levels_per_side=4)
# BTC-like (tick 0.1, lot 0.001: 100 atoms per tick-lot) and ETH-like (tick 0.01, lot 0.01)
MARKETS = [(650_000, 100, [(0, 4_000_000), (50_000 * USDC, 5_000_000),
                           (250_000 * USDC, 10_000_000)]),
           (350_000, 100, [(0, 5_000_000), (25_000 * USDC, 6_500_000)])]


def new_state():
    st_ = allocate_state(CFG, lambda name, shape, dtype: np.zeros(shape, dtype))
    for m, (mark, atpl, brackets) in enumerate(MARKETS):
        row = st_.markets[m:m + 1]
        row["active"], row["mark_ticks"], row["atoms_per_tick_lot"] = 1, mark, atpl
        row["max_leverage"] = 20
        full = bracket_amounts(brackets)
        row["n_brackets"] = len(full)
        for k, (floor, rate, amount) in enumerate(full):
            row["bracket_floor_atoms"][0, k] = floor
            row["bracket_rate_e9"][0, k] = rate
            row["bracket_amount_atoms"][0, k] = amount
    return st_


def put(st_, account, market, size, entry_ticks, mode=MARGIN_CROSS, isolated_atoms=0):
    p = st_.positions[account:account + 1, market]
    p["size_lots"] = size
    p["cost_atoms"] = size * entry_ticks * MARKETS[market][1]
    p["margin_mode"] = mode
    p["isolated_margin_atoms"] = isolated_atoms


def touch(st_, account, seq):
    st_.accounts["changed_seq"][account] = seq
    st_.counters[0] = max(int(st_.counters[0]), seq)


def scanner(st_, **kw):
    return Scanner(st_, [0, 1], published_seq=lambda: int(st_.counters[0]),
                   retry_ns=kw.pop("retry_ns", S), **kw)


def exact(st_):
    return {(a, m) for a in range(ACCOUNTS) for m in liquidation_targets(st_, a)}


def test_a_long_is_found_when_the_mark_reaches_its_threshold():
    st_ = new_state()
    # 1 BTC long from 65000 with 2,000 USDC. At the liquidation price the notional is above
    # 50,000 (bracket 1: rate 0.5%, amount 50,000 x (0.5% - 0.4%) = 50 USDC), so
    # 2000 + (P - 65000) = 0.005 P - 50: P = 62950 / 0.995 = 63266.33 (632663.3 ticks)
    st_.accounts["balance_atoms"][1] = 2_000 * USDC
    put(st_, 1, 0, 1_000, 650_000)
    touch(st_, 1, 1)
    sc = scanner(st_)
    assert sc.cycle(0) == []
    assert sc.long_t[0, 1] == 632_663
    lp = account_risk(st_, 1)["positions"][0]["liquidation_price_ticks"]
    assert lp == 632_664                                  # engine/risk.py: rounded toward mark
    assert sc.cycle(1, {0: 632_664}) == []                # equity 266.4 >= maintenance 266.332
    assert sc.cycle(2, {0: 632_663}) == [(1, CROSS)]      # equity 266.3 < 266.3315
    st_.markets["mark_ticks"][0] = 632_663
    assert exact(st_) == {(1, CROSS)}
    assert sc.cycle(3) == [(1, CROSS)]                    # not sent yet: still a target
    sc.mark_sent([(1, CROSS)], 2)
    assert sc.cycle(4) == []                              # sent, unchanged, within the retry
    assert sc.cycle(2 + S) == [(1, CROSS)]                # the retry period passed
    sc.mark_sent([(1, CROSS)], 2 + S)
    st_.accounts["balance_atoms"][1] += 1_000 * USDC      # a deposit: changed, re-derived
    touch(st_, 1, 2)
    assert sc.cycle(5 + S) == []                          # healthy again at the same mark


def test_isolated_positions_are_targeted_by_market():
    st_ = new_state()
    st_.accounts["balance_atoms"][2] = 10 ** 6 * USDC     # a rich cross wallet does not help
    put(st_, 2, 1, -100, 350_000, MARGIN_ISOLATED, isolated_atoms=200 * USDC)
    touch(st_, 2, 1)
    sc = scanner(st_)
    lp = account_risk(st_, 2)["positions"][0]["liquidation_price_ticks"]
    # 1 ETH short from 3500 on 200 USDC: 200 + 3500 - P = 0.005 P, P = 3681.592 (368159.2
    # ticks): engine/risk shows 368159 (toward the mark), liquidatable from 368160 on
    assert (lp, sc.short_t[1, 2]) == (368_159, 368_160)
    assert sc.cycle(0, {1: 368_159}) == []
    assert sc.cycle(0, {1: 368_160}) == [(2, 1)]


def test_only_changed_accounts_are_rederived():
    st_ = new_state()
    for a in range(1, ACCOUNTS):
        st_.accounts["balance_atoms"][a] = 5_000 * USDC
        put(st_, a, 0, 1_000, 650_000)
        touch(st_, a, a)
    sc = scanner(st_, sweep=0)
    assert sc.derived == ACCOUNTS
    sc.cycle(0, {0: 640_000})
    assert sc.derived == ACCOUNTS                         # a mark move derives nobody
    touch(st_, 7, 100)
    touch(st_, 9, 101)
    sc.cycle(1)
    assert sc.derived == ACCOUNTS + 2
    # a cross account in both markets is coupled: a mark move in either re-derives it
    put(st_, 5, 1, -50, 350_000)
    touch(st_, 5, 102)
    sc.cycle(2)
    before = sc.derived
    sc.cycle(3, {1: 351_000})
    assert sc.derived == before + 1


def test_a_torn_derivation_is_redone_next_cycle():
    st_ = new_state()
    st_.accounts["balance_atoms"][3] = 2_000 * USDC
    put(st_, 3, 0, 1_000, 650_000)
    st_.accounts["changed_seq"][3] = 5          # seq 5 is not published yet (counters say 0)
    sc = scanner(st_, sweep=0)
    assert sc.derived_seq[3] == -1
    derived = sc.derived
    sc.cycle(0)
    assert sc.derived == derived + 1             # still unsettled: derived again
    st_.counters[0] = 5
    sc.cycle(1)
    assert sc.derived_seq[3] == 5
    sc.cycle(2)
    assert sc.derived == derived + 2             # settled: left alone


position = st.tuples(st.integers(0, 1), st.integers(-3_000, 3_000), st.integers(-15, 15),
                     st.booleans(), st.integers(1, 3_000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(1, ACCOUNTS - 1), st.integers(0, 6_000),
                          st.lists(position, min_size=1, max_size=2)), min_size=1, max_size=40),
       st.lists(st.tuples(st.integers(-12, 12), st.integers(-12, 12)), min_size=1, max_size=6))
def test_scanner_never_misses_a_liquidatable_account(accounts, moves):
    """Random accounts (cross and isolated, one or two markets, any brackets they reach) and
    random mark paths: after each move the scanner's targets include every exact target, and
    each extra is within 2 ticks (of the market that moved) of being one."""
    st_ = new_state()
    seq = 0
    for account, balance_usdc, positions in accounts:
        st_.accounts["balance_atoms"][account] = balance_usdc * USDC
        for market, size, entry_pct, isolated, iso_usdc in positions:
            mark = MARKETS[market][0]
            put(st_, account, market, size, mark + mark * entry_pct // 100,
                MARGIN_ISOLATED if isolated else MARGIN_CROSS, iso_usdc * USDC if isolated else 0)
        seq += 1
        touch(st_, account, seq)
    sc = scanner(st_)
    now = 0
    for pct0, pct1 in moves:
        marks = {m: MARKETS[m][0] + MARKETS[m][0] * pct // 100
                 for m, pct in ((0, pct0), (1, pct1))}
        now += S
        targets = set(sc.cycle(now, marks))
        for m, mark in marks.items():
            st_.markets["mark_ticks"][m] = mark
        truth = exact(st_)
        assert truth <= targets, (truth - targets)
        for account, market in targets - truth:
            near = False
            for m in (0, 1):
                for delta in (-2, 2):
                    st_.markets["mark_ticks"][m] = marks[m] + delta
                    near |= (account, market) in exact(st_)
                st_.markets["mark_ticks"][m] = marks[m]
            assert near, (account, market)


@pytest.mark.parametrize("n", [1, 5])
def test_thresholds_match_the_binance_formula_of_engine_risk(n):
    """Single-position cross and isolated accounts: the scanner's threshold is engine/risk's
    liquidation price up to the rounding side (floor vs the tick toward the mark)."""
    st_ = new_state()
    rng = np.random.default_rng(n)
    for a in range(1, ACCOUNTS):
        m = int(rng.integers(0, 2))
        size = int(rng.integers(1, 5_000)) * (1 if rng.integers(0, 2) else -1)
        isolated = bool(rng.integers(0, 2))
        st_.accounts["balance_atoms"][a] = int(rng.integers(100, 100_000)) * USDC
        put(st_, a, m, size, MARKETS[m][0], MARGIN_ISOLATED if isolated else MARGIN_CROSS,
            int(rng.integers(100, 50_000)) * USDC if isolated else 0)
        touch(st_, a, a)
    sc = scanner(st_)
    for a in range(1, ACCOUNTS):
        (pos,) = account_risk(st_, a)["positions"]
        lp = pos["liquidation_price_ticks"]
        m = pos["market"]
        if pos["size_lots"] > 0:
            assert lp is None and sc.long_t[m, a] < 1 or sc.long_t[m, a] in (lp - 1, lp)
        else:
            assert lp is None or sc.short_t[m, a] in (lp, lp + 1)


def test_bench_risk_scan_figures_from_the_cli():
    """`perpx bench risk --no-cascade`: the scanner figures only (no exchange), as JSON."""
    r = subprocess.run([sys.executable, "-m", "perpx.cli", "bench", "risk", "--no-cascade",
                        "--positions", "3000", "--runs", "1", "--json"], capture_output=True,
                       text=True, env=child_env(), cwd=str(REPO), timeout=120)
    assert r.returncode == 0, r.stderr
    scan = json.loads(r.stdout)["scan"]
    assert scan["positions"] == 3000 and scan["accounts"] == 2970
    assert 0 < scan["tick_quiet_ms"] < scan["naive_full_rescan_ms"]
    assert scan["cascade_targets"] > 0


def test_small_positions_at_the_rounding_edge_are_not_missed():
    """One-lot to five-lot positions, where the matcher's maintenance ceiling (up to one atom)
    moves the exact threshold by a sizeable part of a tick: at every mark around it, whatever
    engine/risk finds liquidatable is a target."""
    rng = np.random.default_rng(7)
    for _ in range(30):
        st_ = new_state()
        for a in range(1, ACCOUNTS):
            size = int(rng.integers(1, 6)) * (1 if a % 2 else -1)
            put(st_, a, 0, size, 650_000 + int(rng.integers(-500, 500)))
            st_.accounts["balance_atoms"][a] = int(rng.integers(1_000_000, 3_000_000))
            touch(st_, a, a)
        sc = scanner(st_, retry_ns=0)
        edges = [int(t) for t in np.concatenate([sc.long_t[0, 1:], sc.short_t[0, 1:]])
                 if 10 < t < 10 ** 7]
        for mark in {e + d for e in edges[::7] for d in (-2, -1, 0, 1, 2)}:
            st_.markets["mark_ticks"][0] = mark
            assert exact(st_) <= set(sc.cycle(mark, {0: mark})), mark
