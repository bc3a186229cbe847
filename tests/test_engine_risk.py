"""Perpetual risk in the matcher: margin modes and leverage, brackets, funding, liquidation,
insurance fund and auto-deleveraging. Every command runs through the reference model and the
compiled matcher (tests/engine_helpers.py); events are compared exactly."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from engine import risk
from engine.core.perpetual_risk import _compare_products
from engine.records import (EV_BALANCE, EV_CANCELED, EV_DONE, EV_FUNDING, EV_INSURANCE, EV_LIQUIDATION, EV_TRADE,
                            INSURANCE_FUNDING_RESIDUE,
                            INSURANCE_LIQUIDATION_FEE, LIQ_KIND_ADL, LIQ_KIND_LIQUIDATED,
                            MARGIN_CROSS, MARGIN_ISOLATED, REASON_FUNDING_CAP,
                            REASON_INSUFFICIENT_MARGIN, REASON_INVALID_MARKET_CONFIG,
                            REASON_LEVERAGE, REASON_LIQUIDATION, REASON_MARGIN_MODE_LOCKED,
                            REASON_NOT_LIQUIDATABLE, SIDE_BUY, SIDE_SELL, bracket_command)
from tests.engine_helpers import (ATPL, BTC, BTC_BRACKETS, FUNDING_CAP_E9,
                                  LEVERAGE, LIQUIDATION_FEE_E9, MARK, USDC,
                                  assert_events, btc_engines, buy, deposit, expected, fee,
                                  funding, liquidate,
                                  maker_fee, pick, sell, set_margin, set_mark, taker_fee,
                                  the_reject, warm_up)

E9 = 1_000_000_000


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    warm_up()


def per_lot(leverage, mark=MARK):
    return -((-mark * ATPL) // leverage)


def test_set_margin_checks_mode_leverage_and_locks():
    eng = btc_engines((1, 100 * USDC), (2, 100 * USDC), risk=True)
    assert the_reject(eng.client(set_margin(1, MARGIN_CROSS, 0)))["reason"] == REASON_LEVERAGE
    assert the_reject(eng.client(set_margin(1, MARGIN_CROSS, LEVERAGE + 1)))["reason"] == \
        REASON_LEVERAGE
    assert the_reject(eng.client(set_margin(1, 2, 10)))["reason"] == 1   # invalid_message
    assert the_reject(eng.client(set_margin(1, MARGIN_ISOLATED, 10, market=3)))["reason"] == 2
    done = eng.client(set_margin(1, MARGIN_ISOLATED, 10, req=7))
    assert [e["etype"] for e in done[1:]] == [EV_DONE] and done[1]["req"] == 7
    assert eng.margin(1) == (MARGIN_ISOLATED, 10, 0)
    assert int(eng.st.accounts["changed_seq"][1]) == eng.seq
    # an open order locks the mode (not the leverage)
    eng.client(buy(1, 1, MARK - 10, cid=1))
    assert the_reject(eng.client(set_margin(1, MARGIN_CROSS, 10)))["reason"] == \
        REASON_MARGIN_MODE_LOCKED
    eng.client(set_margin(1, MARGIN_ISOLATED, 20))
    assert eng.margin(1) == (MARGIN_ISOLATED, 20, 0)


def test_leverage_sets_the_initial_margin_of_orders():
    # 13 USDC of equity buys 1 lot (65 USDC at mark) at 5x, not at 4x
    eng = btc_engines((1, 13 * USDC), (2, 100 * USDC), risk=True)
    eng.client(set_margin(1, MARGIN_CROSS, 4))
    assert the_reject(eng.client(buy(1, 1, MARK)))["reason"] == REASON_INSUFFICIENT_MARGIN
    eng.client(set_margin(1, MARGIN_CROSS, 5))
    assert eng.client(buy(1, 1, MARK - 10))[1]["status"] == 1
    # lowering the leverage would need more margin than the account has: refused
    assert the_reject(eng.client(set_margin(1, MARGIN_CROSS, 4)))["reason"] == \
        REASON_INSUFFICIENT_MARGIN
    assert eng.margin(1) == (MARGIN_CROSS, 5, 0)


def test_isolated_fills_post_and_release_margin():
    eng = btc_engines((1, 100 * USDC), (2, 100 * USDC), risk=True)
    eng.client(set_margin(1, MARGIN_ISOLATED, 10))
    eng.client(sell(2, 10, MARK, cid=1))
    eng.client(buy(1, 10, MARK, cid=1))
    posted = 10 * per_lot(10)
    assert eng.margin(1) == (MARGIN_ISOLATED, 10, posted)
    assert eng.balance(1) == 100 * USDC - taker_fee(MARK, 10) - posted
    # cross equity no longer counts the isolated position's PnL; its margin is set aside
    eng.admin(set_mark(MARK - 1000))
    r = risk.account_risk(eng.st, 1)
    assert r["cross_equity_atoms"] == eng.balance(1)
    (p,) = r["positions"]
    assert p["upnl_atoms"] == -10 * 1000 * ATPL and p["isolated_margin_atoms"] == posted
    # closing 4 of 10 lots releases 4/10 of the margin; realized PnL goes to the balance
    balance = eng.balance(1)
    eng.client(buy(2, 4, MARK - 1000, cid=2))
    eng.client(sell(1, 4, MARK - 1000, cid=2))
    release = posted * 4 // 10
    assert eng.margin(1)[2] == posted - release
    assert eng.balance(1) == (balance + release - 4 * 1000 * ATPL
                              - taker_fee(MARK - 1000, 4))
    # a full close releases the rest
    eng.client(buy(2, 6, MARK - 1000, cid=3))
    eng.client(sell(1, 6, MARK - 1000, cid=3))
    assert eng.margin(1)[2] == 0 and eng.position(1) == (0, 0)
    eng.client(set_margin(1, MARGIN_CROSS, 10))


def test_brackets_are_checked_and_amounts_derived():
    eng = btc_engines((1, USDC))
    bad = [
        bracket_command(BTC, 1, floor_atoms=0, maintenance_rate_e9=4_000_000),   # out of order
        bracket_command(BTC, 0, floor_atoms=1, maintenance_rate_e9=4_000_000),   # floor not 0
        bracket_command(BTC, 0, floor_atoms=0, maintenance_rate_e9=E9 // LEVERAGE),  # >= IM
        bracket_command(BTC, 0, floor_atoms=0, maintenance_rate_e9=0),
    ]
    for cmd in bad:
        assert the_reject(eng.admin(cmd))["reason"] == REASON_INVALID_MARKET_CONFIG
    eng.admin(bracket_command(BTC, 0, floor_atoms=0, maintenance_rate_e9=4_000_000))
    for cmd in (bracket_command(BTC, 1, floor_atoms=0, maintenance_rate_e9=5_000_000),
                bracket_command(BTC, 1, floor_atoms=10, maintenance_rate_e9=3_000_000)):
        assert the_reject(eng.admin(cmd))["reason"] == REASON_INVALID_MARKET_CONFIG
    for k, (floor_atoms, rate_e9) in enumerate(BTC_BRACKETS[1:], 1):
        eng.admin(bracket_command(BTC, k, floor_atoms=floor_atoms, maintenance_rate_e9=rate_e9))
    # Binance BTCUSDT's maintenance amounts: 0, 50, 1 300, 16 300 USDT
    assert [b[2] for b in risk.market_brackets(eng.st, BTC)] == [
        0, 50 * USDC, 1_300 * USDC, 16_300 * USDC]
    assert risk.market_brackets(eng.st, BTC) == risk.bracket_amounts(BTC_BRACKETS)
    # client rings may not send them
    assert the_reject(eng.client(bracket_command(BTC, 4, floor_atoms=2 * 10**12,
                                                 maintenance_rate_e9=50_000_000)))["reason"] \
        == 18


def test_maintenance_by_bracket():
    brackets = risk.bracket_amounts(BTC_BRACKETS)
    assert risk.maintenance_atoms(0, brackets) == 0
    assert risk.maintenance_atoms(10_000 * USDC, brackets) == 40 * USDC
    # 100 000 USDT: 0.5% - 50 = 450; continuous at the floor: 50 000 x 0.4% = 50 000 x 0.5% - 50
    assert risk.maintenance_atoms(100_000 * USDC, brackets) == 450 * USDC
    assert risk.maintenance_atoms(50_000 * USDC, brackets) == 200 * USDC
    assert risk.maintenance_atoms(2_000_000 * USDC, brackets) == (50_000 - 16_300) * USDC
    assert risk.maintenance_atoms(1, brackets) == 1      # rounded up
    assert risk.maintenance_atoms(5 * USDC, []) == 0


def _long_and_short(eng, lots=10, price=MARK):
    """Account 1 long `lots` and 2 short at price (maker 2, taker 1)."""
    eng.client(sell(2, lots, price, cid=900))
    eng.client(buy(1, lots, price, cid=900))


def test_funding_longs_pay_shorts_with_the_residue_to_the_fund():
    eng = btc_engines((1, 100 * USDC), (2, 100 * USDC), (3, 100 * USDC), risk=True)
    eng.client(set_margin(3, MARGIN_ISOLATED, 10))
    eng.client(sell(2, 7, MARK, cid=1))
    eng.client(buy(1, 7, MARK, cid=1))
    eng.client(sell(3, 3, MARK, cid=1))
    eng.client(buy(1, 3, MARK, cid=2))
    assert the_reject(eng.admin(funding(FUNDING_CAP_E9 + 1)))["reason"] == REASON_FUNDING_CAP
    assert the_reject(eng.client(funding(1000)))["reason"] == 18
    rate = 123_457      # 0.0123457%
    balances = {a: eng.balance(a) for a in (1, 2, 3)}
    iso = eng.margin(3)[2]
    events = eng.admin(funding(rate))
    value = lambda lots: lots * MARK * ATPL * rate / E9   # noqa: E731
    pays = -(-(10 * MARK * ATPL * rate) // E9)
    gets2 = 7 * MARK * ATPL * rate // E9
    gets3 = 3 * MARK * ATPL * rate // E9
    assert pays == -(-value(10) // 1) and gets2 < value(7)
    residue = pays - gets2 - gets3
    assert residue > 0
    want = [
        expected(EV_FUNDING, market=BTC, account=1, rate_e9=rate, size_lots=10, mark_ticks=MARK,
                 payment_atoms=-pays, balance_atoms=balances[1] - pays),
        expected(EV_FUNDING, market=BTC, account=2, rate_e9=rate, size_lots=-7, mark_ticks=MARK,
                 payment_atoms=gets2, balance_atoms=balances[2] + gets2),
        # an isolated position's funding moves its isolated margin
        expected(EV_FUNDING, market=BTC, account=3, rate_e9=rate, size_lots=-3, mark_ticks=MARK,
                 payment_atoms=gets3, balance_atoms=iso + gets3),
        expected(EV_INSURANCE, market=BTC, account=0, reason=INSURANCE_FUNDING_RESIDUE,
                 amount_atoms=residue, fund_atoms=residue),
        expected(EV_DONE, market=BTC, account=0, qty_lots=3),
    ]
    assert_events(events, want)
    assert eng.balance(3) == balances[3] and eng.margin(3)[2] == iso + gets3
    assert eng.counters()["insurance"] == residue
    # a negative rate: shorts pay (rounded up), the long receives (rounded down)
    events = eng.admin(funding(-rate))
    assert [e["payment_atoms"] for e in pick(events, EV_FUNDING)] == [
        10 * MARK * ATPL * rate // E9, (-7 * MARK * ATPL * rate) // E9,
        (-3 * MARK * ATPL * rate) // E9]


def test_liquidation_closes_into_the_book_then_auto_deleverages():
    """Worked by hand (1 lot = 65 USDC at 65 000.0): account 1 is long 50 lots from 65 000.0
    with 70 USDC; at a mark of 63 800.0 its equity (8.375 USDC) is below maintenance (0.4%)."""
    eng = btc_engines((1, 70 * USDC), (2, 1_000 * USDC), (3, 1_000 * USDC), risk=True)
    _long_and_short(eng, 50)
    eng.client(buy(1, 1, 600_000, cid=5))
    eng.client(buy(3, 30, 637_500, cid=1), buy(3, 50, 630_000, cid=2))
    balance = 70 * USDC - taker_fee(MARK, 50)
    assert eng.balance(1) == balance
    healthy = eng.digest()
    assert the_reject(eng.admin(liquidate(1)))["reason"] == REASON_NOT_LIQUIDATABLE
    assert eng.digest() == healthy
    eng.admin(set_mark(638_000))
    assert risk.liquidation_targets(eng.st, 1) == [-1]
    assert the_reject(eng.client(liquidate(1)))["reason"] == 18     # riskd's ring only
    events = eng.admin(liquidate(1))
    oids = [o[0] for o in eng.open_orders(3)]
    # bankruptcy price: balance + 50 x (P - 65 000.0) = 0, rounded up for a long
    bankrupt = -(-(50 * MARK * ATPL - balance) // (50 * ATPL))
    assert bankrupt == 636_325
    after_fill = balance + 30 * (637_500 - MARK) * ATPL
    equity = after_fill + 20 * (638_000 - MARK) * ATPL
    liq_fee = min(fee(30 * 638_000 * ATPL, LIQUIDATION_FEE_E9), equity)
    assert liq_fee == equity == 6_875_000        # the fee takes what is left, no more
    adl_price = -(-(20 * MARK * ATPL - (after_fill - liq_fee)) // (20 * ATPL))
    assert adl_price == 638_000
    want = [
        expected(EV_CANCELED, market=BTC, account=1, reason=REASON_LIQUIDATION, status=3,
                 side=SIDE_BUY, oid=3, cid=5, price_ticks=600_000, remaining_lots=1),
        expected(EV_TRADE, market=BTC, account=1, side=SIDE_SELL, liquidation=1, trade_id=2,
                 price_ticks=637_500, qty_lots=30, remaining_lots=20, fee_atoms=0,
                 maker_account=3, maker_oid=4, maker_cid=1, maker_remaining_lots=0,
                 maker_fee_atoms=maker_fee(637_500, 30)),
        expected(EV_LIQUIDATION, market=BTC, account=1, kind=LIQ_KIND_LIQUIDATED,
                 side=SIDE_SELL, qty_lots=30, price_ticks=637_500, bankruptcy_ticks=bankrupt,
                 fee_atoms=liq_fee, counterparty=-1, size_lots=20),
        expected(EV_INSURANCE, market=BTC, account=1, reason=INSURANCE_LIQUIDATION_FEE,
                 amount_atoms=liq_fee, fund_atoms=liq_fee),
        # the book has nothing left above the new bankruptcy price: the short is deleveraged
        expected(EV_LIQUIDATION, market=BTC, account=1, kind=LIQ_KIND_ADL, side=SIDE_SELL,
                 qty_lots=20, price_ticks=adl_price, bankruptcy_ticks=adl_price,
                 counterparty=2, size_lots=0),
        expected(EV_LIQUIDATION, market=BTC, account=2, kind=LIQ_KIND_ADL, side=SIDE_BUY,
                 qty_lots=20, price_ticks=adl_price, bankruptcy_ticks=adl_price,
                 counterparty=1, size_lots=-30),
        expected(EV_DONE, market=-1, account=1, qty_lots=50),
    ]
    assert_events(events, want)
    assert oids == [5]
    assert eng.position(1) == (0, 0) and eng.balance(1) == 0
    assert eng.position(2)[0] == -30
    assert not risk.liquidation_targets(eng.st, 1)
    assert the_reject(eng.admin(liquidate(1)))["reason"] == REASON_NOT_LIQUIDATABLE


def test_an_unrealized_deficit_is_deleveraged_not_paid_and_isolation_holds():
    """The fund pays only realized losses (docs/risk.md): an isolated position under water
    with no bids is auto-deleveraged at its bankruptcy price (beyond the mark), so the
    counterparty, not the fund, takes the difference, and the cross balance is untouched."""
    eng = btc_engines((1, 70 * USDC), (2, 1_000 * USDC), (3, 1_000 * USDC), (4, 100 * USDC),
                      risk=True)
    # fill the fund: account 1 liquidated as in the test above
    _long_and_short(eng, 50)
    eng.client(buy(3, 30, 637_500, cid=1))
    eng.admin(set_mark(638_000))
    eng.admin(liquidate(1))
    fund = eng.counters()["insurance"]
    assert fund > 0
    # account 4: isolated long 10 lots at 10x from 65 000.0 (65 USDC of margin)
    eng.client(set_margin(4, MARGIN_ISOLATED, 10))
    eng.admin(set_mark(MARK))
    eng.client(sell(2, 10, MARK, cid=7))
    eng.client(buy(4, 10, MARK, cid=7))
    posted = 10 * per_lot(10)
    eng.client(buy(4, 1, 600_000, cid=8))              # an order of the isolated market
    assert eng.margin(4) == (MARGIN_ISOLATED, 10, posted)
    # the mark falls 11%: the isolated equity 65 - 71.5 USDC is negative
    mark = 578_500
    eng.admin(set_mark(mark))
    r = risk.account_risk(eng.st, 4)
    assert not r["liquidatable"] and r["positions"][0]["liquidatable"]
    assert risk.liquidation_targets(eng.st, 4) == [BTC]
    assert the_reject(eng.admin(liquidate(4)))["reason"] == REASON_NOT_LIQUIDATABLE
    assert posted + 10 * (mark - MARK) * ATPL < 0
    balance = eng.balance(4)
    events = eng.admin(liquidate(4, BTC))
    assert [e["reason"] for e in pick(events, EV_CANCELED)] == [REASON_LIQUIDATION]
    assert not [e for e in events if e["etype"] in (EV_INSURANCE, EV_BALANCE)]
    # no bids: everything is deleveraged at the bankruptcy price, where the margin is spent
    bankrupt = -(-(10 * MARK * ATPL - posted) // (10 * ATPL))
    assert mark < bankrupt < MARK
    adl = pick(events, EV_LIQUIDATION)
    assert [(e["account"], e["kind"], e["qty_lots"], e["price_ticks"]) for e in adl] == [
        (4, LIQ_KIND_ADL, 10, bankrupt), (2, LIQ_KIND_ADL, 10, bankrupt)]
    assert eng.position(4) == (0, 0) and eng.margin(4)[2] == 0
    # the cross balance is what it was, give or take the rounding of the bankruptcy price in
    # the account's favour; the fund is untouched
    assert 0 <= eng.balance(4) - balance < 10 * ATPL
    assert eng.counters()["insurance"] == fund


@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.integers(0, 2**63 - 1), min_size=8, max_size=8),
       hs.lists(hs.sampled_from([0, 1, 2**32 - 1, 2**32, 2**62, 2**63 - 1]), min_size=8,
                max_size=8), hs.integers(0, 255))
def test_exact_product_comparison_of_the_adl_ranking(values, edges, mask):
    """The compiled matcher compares ADL scores as 256-bit products: it must agree with Python
    integers, including at the word boundaries."""
    xs = [e if mask >> (i % 8) & 1 else v for i, (v, e) in enumerate(zip(values, edges))]
    a = xs[0] * xs[1] * xs[2] * xs[3]
    b = xs[4] * xs[5] * xs[6] * xs[7]
    assert _compare_products(*xs) == (a > b) - (a < b)
    assert _compare_products(*xs[:4], *xs[:4]) == 0


def test_liquidation_steps_are_capped_and_resume_on_the_next_liquidate():
    """One lot per order: a 40-lot position needs 40 steps; one LIQUIDATE does 32
    (LIQUIDATION_MAX_STEPS), the account stays liquidatable, the next one finishes. Through a
    64-slot ring, so the command runs alone in the overflow buffer."""
    from engine.config import LIQUIDATION_MAX_STEPS
    from tests.engine_helpers import CONFIG, Engines, create_market, risk_commands, set_limits
    eng = Engines(CONFIG, ring_capacity=64)
    eng.admin(create_market(), set_limits(max_order=1), risk_commands())
    eng.admin(*[deposit(a, 10_000 * USDC) for a in range(2, 8)], deposit(1, 70 * USDC))
    for k in range(40):
        eng.client(sell(2, 1, MARK, cid=k))
        eng.client(buy(1, 1, MARK, cid=k))
    mark = 633_000
    eng.admin(set_mark(mark))
    for a in range(3, 8):
        eng.client(*[buy(a, 1, mark, cid=k) for k in range(8)])
    assert risk.liquidation_targets(eng.st, 1) == [-1]
    steps = pick(eng.admin(liquidate(1)), EV_LIQUIDATION)
    assert len(steps) == LIQUIDATION_MAX_STEPS
    assert all(e["kind"] == LIQ_KIND_LIQUIDATED and e["qty_lots"] == 1 for e in steps)
    assert eng.position(1)[0] == 40 - LIQUIDATION_MAX_STEPS
    assert risk.liquidation_targets(eng.st, 1) == [-1]
    steps = pick(eng.admin(liquidate(1)), EV_LIQUIDATION)
    assert len(steps) == 40 - LIQUIDATION_MAX_STEPS and eng.position(1) == (0, 0)
