"""riskd's funding: Binance's premium index and funding rate (riskd/funding.py), then FUNDING
commands from a real riskd process into a real matcher at interval boundaries.

Source of the formulas and examples: Binance, "Introduction to Binance Futures Funding Rates",
https://www.binance.com/en/support/faq/360033525031 :
  F = P + clamp(I - P, 0.05%, -0.05%); "if (I - P) is within +/-0.05% then F = P + (I - P) = I";
  P = [Max(0, Impact Bid Price - Price Index) - Max(0, Price Index - Impact Ask Price)] / Index;
  IMN = 200 USDT / initial margin rate at max leverage: "if the maximum leverage of BNBUSDT
  perpetual contract is 20x, and its corresponding Initial Margin Rate is 5%, then the Impact
  Margin Notional (IMN) is 4,000 USDT (200 USDT / 5%)";
  premium indexes every 5 s, averaged time-weighted: (1 x P1 + 2 x P2 + ... + n x Pn) / (1 + ... + n).
"""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.records import CMD_FUNDING, COMMAND_EVENT_DTYPE, EV_COMMAND
from perpx.config import parse_config
from riskd.funding import (INTEREST_CLAMP_E9, FundingSchedule, PremiumAverage, funding_rate_e9,
                           impact_notional_atoms, impact_price, next_funding_ns, premium_e9)
from tests.engine_helpers import buy, deposit, sell
from tests.shm_workers import shm_prefix  # noqa: F401 — fixture: prefix, leak check
from tests.test_riskd import WAIT_S, riskd_rig, wait_until

S = 1_000_000_000
USDC = 1_000_000


# ---- the formulas -------------------------------------------------------------------------------
def test_impact_margin_notional_is_binances_bnbusdt_example():
    assert impact_notional_atoms(20) == 4_000 * USDC         # 200 USDT / 5%
    assert impact_notional_atoms(50) == 10_000 * USDC        # BTC-PERP at 50x: 200 / 2%


@pytest.mark.parametrize("premium, interest, cap, rate", [
    (300_000, 100_000, 7_500_000, 100_000),        # I - P = -0.02%: within 0.05%, F = I
    (-400_000, 100_000, 7_500_000, 100_000),       # I - P = +0.05% exactly: still F = I
    (800_000, 100_000, 7_500_000, 300_000),        # I - P = -0.07% -> -0.05%: F = P - 0.05%
    (-1_000_000, 100_000, 7_500_000, -500_000),    # I - P = +0.11% -> +0.05%: F = P + 0.05%
    (20_000_000, 100_000, 7_500_000, 7_500_000),   # 1.95% capped at 0.75%
    (-20_000_000, 100_000, 7_500_000, -7_500_000),
    (0, 0, 7_500_000, 0),
])
def test_funding_rate_formula(premium, interest, cap, rate):
    assert funding_rate_e9(premium, interest, cap) == rate


@given(st.integers(-10 ** 8, 10 ** 8), st.integers(-10 ** 6, 10 ** 6), st.integers(0, 10 ** 8))
def test_funding_rate_is_binances_formula_exactly(premium, interest, cap):
    expected = premium + min(max(interest - premium, -INTEREST_CLAMP_E9), INTEREST_CLAMP_E9)
    assert funding_rate_e9(premium, interest, cap) == min(max(expected, -cap), cap)


def test_premium_index_from_impact_prices():
    index = 650_000                                   # 65000.0 at tick 0.1
    assert premium_e9(index, Fraction(650_130), Fraction(650_200)) == 200_000   # +13 / 65000
    assert premium_e9(index, Fraction(649_800), Fraction(649_870)) == -200_000  # ask below
    assert premium_e9(index, Fraction(649_990), Fraction(650_010)) == 0         # index inside
    assert premium_e9(index, None, None) == 0                                   # empty book
    assert premium_e9(index, Fraction(650_013), None) == 20_000                 # one side
    assert premium_e9(3, Fraction(4), None) == 333_333_333                      # rounded


def test_impact_price_is_the_average_fill_of_the_notional():
    """BTC at tick 0.1, lot 0.001 (100 atoms per tick-lot); IMN 10,000 USDC at 50x.
    Bids: 0.1 BTC at 65000.0 (6,500 USDC), 1 BTC at 64999.0. The remaining 3,500 USDC fill
    3500/64999 BTC at 64999.0, so the average price is 10000 / (0.1 + 3500/64999) USDC."""
    levels = [(650_000, 100), (649_990, 1_000)]
    price_usdc = Fraction(10_000) / (Fraction(1, 10) + Fraction(3_500, 64_999))
    assert impact_price(levels, 10_000 * USDC, 100) == price_usdc * 10     # in ticks
    assert impact_price(levels, 6_500 * USDC, 100) == 650_000              # exactly level one
    assert impact_price(levels, 80_000 * USDC, 100) is None                # book too thin
    assert impact_price([], 1, 100) is None


def test_time_weighted_premium_average():
    avg = PremiumAverage()
    assert avg.average_e9() == 0
    for p in (100, 200, 300):
        avg.add(p)
    assert avg.average_e9() == round(Fraction(1 * 100 + 2 * 200 + 3 * 300, 6))    # 233
    flat = PremiumAverage()
    for _ in range(5_760):                      # an 8 h interval of 5 s samples
        flat.add(-7)
    assert flat.average_e9() == -7


def test_schedule_boundaries_samples_and_settlement():
    spec = parse_config(MARKETS).markets[0]
    assert next_funding_ns(8 * 3600 * S + 1, 8 * 3600) == 16 * 3600 * S     # 16:00 UTC
    assert next_funding_ns(8 * 3600 * S, 8 * 3600) == 16 * 3600 * S         # strictly after
    t0 = 1_700_000_000 * S + 100_000_000                                    # 0.1 s past a second
    sched = FundingSchedule(spec, sample_ms=500, now_ns=t0)
    assert sched.next_funding_ns == 1_700_000_002 * S                      # 2 s interval
    assert sched.settle(t0) is None and sched.estimate_e9() == spec.interest_rate_e9
    assert sched.sample_due(t0)
    sched.sample(t0, 900_000)
    assert not sched.sample_due(t0 + 300_000_000)                          # same 0.5 s slot
    assert sched.sample_due(t0 + 400_000_000)
    sched.sample(t0 + 400_000_000, 900_000)
    assert sched.estimate_e9() == 900_000 - INTEREST_CLAMP_E9 == 400_000
    assert sched.settle(1_700_000_002 * S) == 400_000
    assert sched.next_funding_ns == 1_700_000_004 * S
    sched.sent(400_000)
    assert sched.last_rate_e9 == 400_000
    assert sched.settle(1_700_000_004 * S) is None                         # no sample: no FUNDING


# ---- the process ---------------------------------------------------------------------------------
MARKETS = """
[engine]
max_accounts = 16
max_markets = 2
max_orders = 1024

[[markets]]
symbol = "FUND-PERP"
tick_size = "0.1"
lot_size = "0.001"
initial_price = "1000"
oracle = "manual"
max_leverage = 10
funding_interval_s = 2
interest_rate = "0.0001"
funding_cap = "0.005"
"""
def test_riskd_sends_funding_at_each_boundary(shm_prefix, tmp_path):
    """A 2 s interval, a sample every 50 ms. The index is 1000.0; the book's bids take the
    whole 2,000 USDC impact notional (10x) at 1002.0 and its asks at 1003.0, so every sample's
    premium is 2/1000 = 0.2% and the rate 0.2% - 0.05% = 0.15%: FUNDING(0, 1_500_000) at every
    boundary, each one sequenced by the matcher (its EV_COMMAND from the riskd ring)."""
    # 3 units a side (3,000 lots of 0.001): about 3,000 USDC, more than the 2,000 IMN
    setup = np.concatenate([deposit(1, 10 ** 6 * USDC), deposit(2, 10 ** 6 * USDC),
                            buy(1, 3_000, 10_020, cid=1), sell(2, 3_000, 10_030, cid=1)])
    with riskd_rig(shm_prefix, tmp_path, parse_config(MARKETS),
                   {"mark_interval_ms": 20, "funding_sample_ms": 50}, setup) as rig:
        rig.board.set(0, 10_000)
        fundings = []

        def two_fundings():
            rig.check_alive()
            n = rig.consumer.available()
            if n:
                batch = rig.consumer.peek(n)
                rig.consumer.advance(n)
                for e in batch[batch["etype"] == EV_COMMAND].view(COMMAND_EVENT_DTYPE):
                    if int(e["command"]["cmd"]) == CMD_FUNDING:
                        fundings.append((int(e["source"]), int(e["seq"]),
                                         int(e["command"]["market"]), int(e["command"]["oid"]),
                                         int(e["command"]["ts_ns"])))
            return len(fundings) >= 2

        wait_until(two_fundings, 3 * 2 + WAIT_S, "two FUNDING commands from riskd")
        # The first interval may have started before riskd did: fewer samples, same premium.
        assert [(src, m, rate) for src, _, m, rate, _ in fundings[:2]] == [(1, 0, 1_500_000)] * 2
        seqs, stamps = [f[1] for f in fundings[:2]], [f[4] for f in fundings[:2]]
        assert seqs[0] < seqs[1]
        # sent on the first tick (20 ms) past each boundary (even seconds since the epoch); a
        # loaded box may delay a tick, and a riskd stalled past a boundary skips one
        for ts in stamps:
            assert ts % (2 * S) < S, ts
        assert stamps[1] // (2 * S) > stamps[0] // (2 * S)
        published = rig.board.published(0)
        assert published.funding_rate_e9 == 1_500_000
        assert published.next_funding_ns % (2 * S) == 0
        assert published.next_funding_ns > time.time_ns() - S
