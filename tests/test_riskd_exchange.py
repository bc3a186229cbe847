"""riskd inside `perpx up`: liquidations and funding end to end, real processes throughout.

1. A small liquidation cascade (perpx/bench/risk.run_cascade with 200 traders at ~45x): after
   the shock riskd's scanner sends LIQUIDATE for every trader, the matcher closes them, DuckDB
   holds a `liquidations` row per trader and `perpx check` finds every invariant intact; the
   same with one isolated and one cross trader (LIQUIDATE(account, market) vs (account, -1)).
2. Funding every 2 s: riskd samples a book whose impact bid sits 0.17% above the index and
   sends FUNDING at each boundary; the two positions are charged (`funding_payments` in
   DuckDB), the long pays what the short receives plus a residue of at most one atom each way,
   `perpx status` shows the estimate and the next funding time, and market data carries the
   rate (funding.MARKET) and, with the next mark, riskd's index and estimate (mark.MARKET).
"""

from __future__ import annotations

import time
from decimal import Decimal

import numpy as np

from engine.records import MARGIN_ISOLATED, set_margin_command
from perpx.bench import risk as bench_risk
from perpx.client import MarketData
from perpx.ops import Exchange
from shm.index_board import IndexBoard
from tests.engine_helpers import buy, deposit, sell
from tests.test_supervisor import cli_json, wait_until

TRADERS = 200
SQL_WAIT_S = 30.0


def sql(state_dir, query: str) -> list:
    return cli_json(state_dir, "sql", query)["rows"]


def test_a_cascade_liquidates_every_trader_and_duckdb_has_them(ups):
    up = ups("state", bench_risk.cascade_config(TRADERS))
    up.wait_ready()
    res = bench_risk.run_cascade(up.sd, TRADERS, lambda msg: None)
    assert res["mark_after_shock"] == 63_350.0        # median(63000, last trade 63700)
    assert (res["liquidated"], res["closed"]) == (TRADERS, TRADERS)
    assert res["reaction_ms"]["p99"] < 5_000
    traders = range(bench_risk.FIRST_TRADER, bench_risk.FIRST_TRADER + TRADERS)
    wait_until(lambda: sql(up.sd.path, "SELECT count(DISTINCT account) FROM liquidations "
                                       f"WHERE account >= {traders[0]}")[0][0] == TRADERS,
               SQL_WAIT_S, "a liquidations row per trader in DuckDB")
    positions = cli_json(up.sd.path, "positions", "BTC-PERP")["positions"]
    assert not [p for p in positions if p["account"] in traders]
    assert cli_json(up.sd.path, "check")["ok"]
    procs = {p["name"]: p for p in cli_json(up.sd.path, "status")["processes"]}
    assert procs["riskd"]["alive"] and procs["riskd"]["restarts"] == 0


FUNDING_CONFIG = bench_risk.cascade_config(
    2, extra="[risk]\nmark_interval_ms = 50\nfunding_sample_ms = 100\n",
    market_extra='funding_interval_s = 2\ninterest_rate = "0.0001"\nfunding_cap = "0.005"\n')


def test_funding_is_charged_at_each_boundary(ups):
    """Index 64900; A long 1 BTC from B at 65000; M quotes 1 BTC at 65010 / 65030 (more than
    the 10,000 USDC impact notional at 50x on each side). Premium = (65010 - 64900) / 64900 =
    0.001694915 (1,694,915 e-9); I - P clamps to -0.05%: rate = 1,194,915 e-9 per interval."""
    up = ups("state", FUNDING_CONFIG)
    endpoints = up.wait_ready()
    ex = Exchange(up.sd)
    board = IndexBoard.attach(ex.prefix)
    md = MarketData.connect(endpoints, ["BTC-PERP"])
    try:
        usdc = 10 ** 6
        setup = np.concatenate([deposit(a, 100_000 * usdc) for a in (1, 2, 3)] + [
            sell(2, 1_000, 650_000, cid=1), buy(1, 1_000, 650_000, cid=1),
            buy(3, 1_000, 650_100, cid=1), sell(3, 1_000, 650_300, cid=2)])
        with ex.session() as session:
            assert bench_risk.sequence_commands(session, setup) == 0
        # the index only now: riskd samples nothing (no index) until the book is complete
        board.set(0, 649_000)
        rate = "0.001194915"
        wait_until(lambda: len(sql(up.sd.path, "SELECT * FROM funding_payments")) >= 4,
                   3 * 2 + SQL_WAIT_S, "two fundings of two positions in DuckDB")
        rows = sql(up.sd.path, "SELECT seq, account, rate, payment FROM funding_payments "
                               "ORDER BY seq, account")
        by_seq = {}
        for seq, account, row_rate, payment in rows:
            by_seq.setdefault(seq, {})[account] = Decimal(str(payment))
            assert Decimal(str(row_rate)) == Decimal(rate)
        for payments in by_seq.values():
            assert set(payments) == {1, 2}
            assert payments[1] < 0 < payments[2]                     # the long pays
            assert 0 <= -(payments[1] + payments[2]) <= Decimal("0.000001")
            # ~ 1 BTC x mark (about 65,000) x 0.1194915%: about 77.7 USDC
            assert Decimal(70) < payments[2] < Decimal(85)
        risk = cli_json(up.sd.path, "status")["risk"]["BTC-PERP"]
        assert risk["funding_rate"] == rate and risk["index"] == "64900"
        assert risk["next_funding_ts"] % 2_000_000_000 == 0
        assert risk["next_funding_ts"] > time.time_ns() - 2_000_000_000
        assert cli_json(up.sd.path, "check")["ok"]

        # market data: each FUNDING as funding.MARKET; riskd's numbers ride on mark.MARKET,
        # published when the mark moves (here it sits on the last trade, 65000, until the
        # index moves enough to pull the median away)
        wait_until(lambda: md.poll(0.05) >= 0 and md.funding.get("BTC-PERP"), SQL_WAIT_S,
                   "funding.BTC-PERP")
        assert md.funding["BTC-PERP"]["rate"] == rate
        board.set(0, 640_000)

        def mark_with_the_new_index():
            md.poll(0.05)
            info = md.mark_info.get("BTC-PERP", {})
            return info.get("index") == "64000" and info
        info = wait_until(mark_with_the_new_index, SQL_WAIT_S, "mark.BTC-PERP at index 64000")
        assert Decimal(info["mark"]) < 65_000
        assert Decimal("0.001") < Decimal(info["funding_rate"]) <= Decimal("0.005")
        assert info["next_funding_ts"] % 2_000_000_000 == 0
        assert info["next_funding_ts"] > time.time_ns() - 2_000_000_000
    finally:
        md.close()
        board.close()


def test_an_isolated_and_a_cross_position_are_both_liquidated(ups):
    """Trader 3 isolated at 40x (16.25 USDC of isolated margin on 0.01 BTC: liquidation at
    ~63,629.5), trader 4 cross with 15 USDC (~63,6xx). The shock's mark, 63,350, is past both:
    riskd must send LIQUIDATE(3, market 0) and LIQUIDATE(4, -1) (the matcher refuses the
    other form: 3 has no cross position), and both close into L's bid at 63,700."""
    up = ups("state", bench_risk.cascade_config(2))
    up.wait_ready()
    usdc = 10 ** 6
    setup = [np.concatenate([deposit(1, 10 ** 7 * usdc), deposit(2, 10 ** 7 * usdc),
                             deposit(3, 20 * usdc), deposit(4, 15 * usdc),
                             set_margin_command(3, 0, mode=MARGIN_ISOLATED, leverage=40)]),
             np.concatenate([sell(1, 20, 650_000, cid=1), buy(3, 10, 650_000, cid=1),
                             buy(4, 10, 650_000, cid=1), buy(2, 100, 637_000, cid=1)])]
    res = bench_risk.run_cascade(up.sd, 2, lambda msg: None, setup)
    assert (res["liquidated"], res["closed"]) == (2, 2)
    wait_until(lambda: sql(up.sd.path, "SELECT count(DISTINCT account) FROM liquidations "
                                       "WHERE account IN (3, 4)")[0][0] == 2,
               SQL_WAIT_S, "liquidations rows for both")
    assert cli_json(up.sd.path, "check")["ok"]
