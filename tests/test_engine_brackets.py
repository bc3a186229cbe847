"""Leverage brackets: each maintenance bracket carries a max leverage, the initial margin rate
is 1 / min(leverage setting, the max leverage of the bracket the exposure after the order falls
in), and an order's loss against the mark and its taker fee are part of the margin check. So a
command that raises an account's risk never leaves it at or below maintenance (docs/risk.md).
Both engines run every command (tests/engine_helpers.Engines, which also asserts that
invariant after every client command).
"""

import pytest

from engine import risk
from engine.records import (EV_ACK, EV_DONE, KIND_MARKET, MARGIN_CROSS, TIF_IOC,
                            bracket_command)
from tests.engine_helpers import (BTC, MARK, TAKER_FEE_E9, USDC, Engines, buy, deposit,
                                  margin_required, market_commands, order, pick, reason_name,
                                  risk_commands, sell, set_margin, set_mark, taker_fee,
                                  the_reject)

# ETH-style: maintenance 10% above 2,000,000 notional; the market's max leverage is 20, and
# the last bracket's max leverage is left to its default, the largest whole L with 1/L > 10%
ETH_BRACKETS = ((0, 5_000_000), (250_000 * USDC, 10_000_000), (1_000_000 * USDC, 25_000_000),
                (2_000_000 * USDC, 100_000_000))
PRICE = 600_000           # 60,000.0 per BTC: 50 BTC = 50,000 lots = 3,000,000 USDC


@pytest.fixture
def eth():
    eng = Engines()
    eng.admin(market_commands(leverage=20), risk_commands(brackets=ETH_BRACKETS),
              set_mark(PRICE), deposit(9, 10_000_000 * USDC))
    eng.client(sell(9, 60_000, PRICE))            # the book to buy from
    return eng


def test_default_max_leverages_keep_initial_above_maintenance(eth):
    assert risk.market_leverage_caps(eth.st, BTC) == [20, 20, 20, 9]
    assert eth.ref.markets[BTC].leverage_caps == [20, 20, 20, 9]


def test_3_000_000_at_20x_with_160_000_is_refused(eth):
    """The issue's case: at 20x, 150,000 of initial margin used to admit a position whose
    maintenance (133,750 here) it barely covered; the 2,000,000+ bracket allows 9x."""
    eth.admin(deposit(1, 160_000 * USDC))
    ev = eth.client(buy(1, 50_000, PRICE))
    assert reason_name(the_reject(ev)) == "insufficient_margin"
    assert eth.position(1) == (0, 0)
    # what 9x needs (3,000,000 / 9, rounded up per lot) plus the taker fee bound, is enough
    need = margin_required(50_000, mark=PRICE, leverage=9) + taker_fee(PRICE, 50_000) + 50_000
    eth.admin(deposit(2, need))
    assert pick(eth.client(buy(2, 50_000, PRICE)), EV_ACK)[0]["status"] == 2
    r = risk.account_risk(eth.st, 2)
    assert r["positions"][0]["leverage"] == 9
    assert r["cross_equity_atoms"] >= r["initial_margin_atoms"] > r["maintenance_atoms"]


def test_the_bracket_is_the_one_after_the_trade(eth):
    """1,500,000 at 20x is fine; adding 600,000 crosses 2,000,000 and margins all of it at 9x."""
    eth.admin(deposit(1, 100_000 * USDC))
    assert pick(eth.client(buy(1, 25_000, PRICE, cid=1)), EV_ACK)[0]["status"] == 2
    ev = eth.client(buy(1, 10_000, PRICE, cid=2))
    assert reason_name(the_reject(ev)) == "insufficient_margin"
    assert pick(eth.client(buy(1, 5_000, PRICE, cid=3)), EV_ACK)[0]["status"] == 2


def test_set_margin_above_the_position_bracket_is_refused(eth):
    eth.admin(deposit(1, 400_000 * USDC))
    eth.client(buy(1, 50_000, PRICE))
    ev = eth.client(set_margin(1, MARGIN_CROSS, 10))
    assert reason_name(the_reject(ev)) == "invalid_message"      # REASON_LEVERAGE
    assert pick(eth.client(set_margin(1, MARGIN_CROSS, 9)), EV_DONE)
    # a small position may use the market's max
    eth.admin(deposit(2, 1_000 * USDC))
    eth.client(buy(2, 100, PRICE))
    assert pick(eth.client(set_margin(2, MARGIN_CROSS, 20)), EV_DONE)


@pytest.mark.parametrize("leverage, reason", [
    (10, "initial rate 1/10 is not above 10%"),
    (21, "above the market's max leverage"),
])
def test_bad_bracket_leverage_is_refused(leverage, reason):
    eng = Engines()
    eng.admin(market_commands(leverage=20), risk_commands(brackets=ETH_BRACKETS[:3]))
    ev = eng.admin(bracket_command(BTC, 3, floor_atoms=2_000_000 * USDC,
                                   maintenance_rate_e9=100_000_000, max_leverage=leverage))
    assert reason_name(the_reject(ev)) == "invalid_message", reason
    assert eng.ref.markets[BTC].leverage_caps == [20, 20, 20]


def test_bracket_leverage_may_not_rise():
    eng = Engines()
    eng.admin(market_commands(leverage=20),
              risk_commands(brackets=((0, 5_000_000, 10),)))
    ev = eng.admin(bracket_command(BTC, 1, floor_atoms=USDC, maintenance_rate_e9=6_000_000,
                                   max_leverage=15))
    assert reason_name(the_reject(ev)) == "invalid_message"
    # left out, the default is at most the previous bracket's
    assert pick(eng.admin(bracket_command(BTC, 1, floor_atoms=USDC,
                                          maintenance_rate_e9=6_000_000)), EV_DONE)
    assert eng.ref.markets[BTC].leverage_caps == [10, 10]


def test_a_taker_pays_its_loss_against_the_mark_and_fee_up_front():
    """A buy that takes an ask above the mark needs initial margin plus that loss plus its fee
    bound: with one atom less it is refused, and once filled its equity is at its initial
    margin, above maintenance."""
    eng = Engines()
    eng.admin(market_commands(), risk_commands(), deposit(9, 1_000_000 * USDC))
    eng.client(sell(9, 10, MARK + 10_000))
    loss = 10 * 10_000 * 100
    need = margin_required(10) + loss + taker_fee(MARK + 10_000, 10) + 10
    eng.admin(deposit(1, need - 1), deposit(2, need))
    assert reason_name(the_reject(eng.client(buy(1, 10, MARK + 10_000)))) == "insufficient_margin"
    assert pick(eng.client(buy(2, 10, MARK + 10_000)), EV_ACK)[0]["status"] == 2
    r = risk.account_risk(eng.st, 2)
    assert r["cross_equity_atoms"] >= margin_required(10) > r["maintenance_atoms"]


def test_a_market_order_pays_the_loss_of_the_levels_it_reaches_not_the_band():
    eng = Engines()
    eng.admin(market_commands(), risk_commands(), deposit(9, 1_000_000 * USDC))
    eng.client(sell(9, 5, MARK + 1_000, cid=1), sell(9, 5, MARK + 2_000, cid=2))
    # the walk ends at MARK + 2000: loss 10 lots x 2000 ticks, fee bound at that price
    need = (margin_required(10) + 10 * 2_000 * 100
            + -((-10 * (MARK + 2_000) * 100 * TAKER_FEE_E9) // 10**9) + 10)
    eng.admin(deposit(1, need - 1), deposit(2, need))
    market_buy = dict(kind=KIND_MARKET, tif=TIF_IOC)
    assert reason_name(the_reject(eng.client(order(1, 0, 10, **market_buy)))) \
        == "insufficient_margin"
    assert pick(eng.client(order(2, 0, 10, **market_buy)), EV_ACK)[0]["status"] == 2
    assert eng.position(2)[0] == 10


def test_a_sell_above_nothing_is_free_of_the_fee_bound():
    """An order that cannot take (nothing crosses) needs no fee bound: the exact initial
    margin boundary of resting orders is unchanged."""
    eng = Engines()
    eng.admin(market_commands(), risk_commands(), deposit(1, margin_required(10)))
    assert pick(eng.client(sell(1, 10, MARK + 1)), EV_ACK)[0]["status"] == 1
    assert reason_name(the_reject(eng.client(sell(1, 1, MARK + 1, cid=1)))) \
        == "insufficient_margin"
