"""The insurance fund pays only realized losses (docs/risk.md): a liquidation closes into the
book first (no worse than the bankruptcy price), the fund covers what loss the closing
realized, and the rest is auto-deleveraged. The operator tops the fund up with
INSURANCE_DEPOSIT (`perpx fund deposit`). Both engines run every command."""

from engine.records import (EV_BALANCE, EV_DONE, EV_INSURANCE, EV_LIQUIDATION,
                            INSURANCE_DEPOSIT, INSURANCE_LIQUIDATION_FEE,
                            LIQ_KIND_LIQUIDATED, insurance_deposit_command)
from tests.engine_helpers import (USDC, Engines, buy, deposit, liquidate, market_commands, pick,
                                  reason_name, risk_commands, sell, set_mark, the_reject)

ATPL = 10                 # tick 0.01, lot 0.001: one lot at one tick is 10 atoms
NO_FEES = dict(maker_fee_e9=0, taker_fee_e9=0)   # as in the arithmetic


def test_a_stale_ask_and_a_mark_jump_do_not_drain_the_fund():
    """The issue's case: short 0.2 at 100 with 15 USDC, the mark jumps to 550 (equity -75 at
    the mark), the close fills at 140 against a colluding account's stale ask. The fund used
    to pay the 75 first and the account kept it (81.45 USDC); now the account keeps only what
    its fill leaves, 15 - 8 - the 0.55 clearance fee, and the fund only gains that fee."""
    eng = Engines()
    eng.admin(market_commands(atpl=ATPL, mark=10_000, **NO_FEES), risk_commands(),
              deposit(1, 15 * USDC), deposit(2, 1_000 * USDC), deposit(3, 1_000 * USDC))
    eng.client(sell(1, 200, 10_000), buy(3, 200, 10_000))
    assert eng.position(1) == (-200, -20 * USDC)
    eng.admin(set_mark(14_000))
    eng.client(sell(2, 200, 14_000))                  # 2's ask, left behind by the mark
    events = eng.admin(insurance_deposit_command(150 * USDC))
    assert pick(events, EV_INSURANCE)[0]["reason"] == INSURANCE_DEPOSIT
    assert eng.counters()["insurance"] == 150 * USDC
    eng.admin(set_mark(55_000))
    events = eng.admin(liquidate(1))
    fee = 200 * 55_000 * ATPL * 5 // 1000           # 0.5% of the closed notional at the mark
    assert fee == 550_000
    steps = pick(events, EV_LIQUIDATION)
    assert [(e["kind"], e["qty_lots"], e["price_ticks"], e["fee_atoms"]) for e in steps] == [
        (LIQ_KIND_LIQUIDATED, 200, 14_000, fee)]
    assert [e["reason"] for e in pick(events, EV_INSURANCE)] == [INSURANCE_LIQUIDATION_FEE]
    assert not pick(events, EV_BALANCE)
    assert eng.position(1) == (0, 0)
    assert eng.balance(1) == 15 * USDC - 8 * USDC - fee          # 6.45 USDC
    assert eng.counters()["insurance"] == 150 * USDC + fee


def test_a_mark_crash_closed_into_a_stale_bid_keeps_the_fund_out():
    """Long 0.2 at 100 with 10 USDC, the mark crashes to 10 (equity -8 at the mark): the
    bankruptcy price is 50, a bid at 90.50 takes the close, the account keeps 10 - 1.9 - the
    fee, and the fund (topped up to 100) pays nothing."""
    eng = Engines()
    eng.admin(market_commands(atpl=ATPL, mark=10_000, **NO_FEES), risk_commands(),
              deposit(1, 10 * USDC), deposit(2, 1_000 * USDC), deposit(3, 1_000 * USDC),
              insurance_deposit_command(100 * USDC))
    eng.client(buy(1, 200, 10_000), sell(3, 200, 10_000))
    eng.admin(set_mark(9_100))
    eng.client(buy(2, 200, 9_050))
    eng.admin(set_mark(1_000))
    events = eng.admin(liquidate(1))
    steps = pick(events, EV_LIQUIDATION)
    assert [(e["price_ticks"], e["bankruptcy_ticks"]) for e in steps] == [(9_050, 5_000)]
    assert [e["reason"] for e in pick(events, EV_INSURANCE)] == [INSURANCE_LIQUIDATION_FEE]
    fee = 200 * 1_000 * ATPL * 5 // 1000
    assert steps[0]["fee_atoms"] == fee
    assert eng.balance(1) == 10 * USDC - (10_000 - 9_050) * 200 * ATPL - fee
    assert eng.counters()["insurance"] == 100 * USDC + fee


def test_insurance_deposit_is_operator_only_and_checked():
    eng = Engines()
    eng.admin(market_commands())
    assert reason_name(the_reject(eng.client(insurance_deposit_command(USDC)))) == "forbidden"
    assert reason_name(the_reject(eng.admin(insurance_deposit_command(0)))) == "invalid_message"
    events = eng.admin(insurance_deposit_command(5 * USDC), insurance_deposit_command(USDC))
    assert [e["fund_atoms"] for e in pick(events, EV_INSURANCE)] == [5 * USDC, 6 * USDC]
    assert len(pick(events, EV_DONE)) == 2
    assert eng.counters()["insurance"] == 6 * USDC
