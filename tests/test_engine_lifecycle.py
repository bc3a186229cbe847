"""Market lifecycle (docs/risk.md "Market states"): trading, cancel_only, reduce_only, halted,
and settlement. Both engines run every command; collateral is checked after each."""

import pytest

from engine.records import (EV_ACK, EV_CANCELED, EV_DONE, EV_LIQUIDATION, EV_MARK, EV_REJECT,
                            KIND_STOP_MARKET,
                            LIQ_KIND_SETTLEMENT, MARGIN_ISOLATED, MARKET_CANCEL_ONLY,
                            MARKET_REDUCE_ONLY, MARKET_SETTLED, MARKET_TRADING,
                            REASON_HALT, SIDE_BUY, insurance_deposit_command,
                            market_state_command, settle_market_command)
from tests.engine_helpers import (MARK, USDC, Engines, amend, buy, cancel, deposit, halt,
                                  market_commands, order, pick, reason_name, resume, risk_commands,
                                  sell, set_margin, set_mark, taker_fee, the_reject)


@pytest.fixture
def eng():
    e = Engines()
    e.admin(market_commands(), risk_commands(), *[deposit(a, 10_000 * USDC) for a in range(1, 6)])
    # 1 long 3, 2 short 3; 1 has a bid and an ask resting
    e.client(sell(2, 3, MARK, cid=1), buy(1, 3, MARK, cid=1))
    e.client(buy(1, 1, MARK - 1_000, cid=2), sell(1, 1, MARK + 1_000, cid=3))
    return e


def state(eng, s):
    return pick(eng.admin(market_state_command(0, s)), EV_DONE)


def test_cancel_only_takes_cancels_only(eng):
    assert state(eng, MARKET_CANCEL_ONLY)
    assert reason_name(the_reject(eng.client(buy(3, 1, MARK, cid=1)))) == "market_cancel_only"
    assert reason_name(the_reject(eng.client(amend(1, cid=2, price=MARK - 500)))) \
        == "market_cancel_only"
    assert pick(eng.client(cancel(1, cid=2)), EV_CANCELED)
    assert state(eng, MARKET_TRADING)
    assert pick(eng.client(buy(3, 1, MARK - 2_000, cid=1)), EV_ACK)


def test_reduce_only_takes_orders_that_reduce(eng):
    assert state(eng, MARKET_REDUCE_ONLY)
    assert reason_name(the_reject(eng.client(buy(3, 1, MARK, cid=1)))) == "market_reduce_only"
    # 1's plain resting orders cannot be amended, but may be canceled
    assert reason_name(the_reject(eng.client(amend(1, cid=3, qty=2)))) == "market_reduce_only"
    assert pick(eng.client(sell(1, 2, MARK + 500, cid=4, reduce_only=True)), EV_ACK)
    # 2 closes part of its short into 1's reduce-only ask
    eng.client(buy(2, 2, MARK + 500, cid=2, reduce_only=True))
    assert eng.position(1)[0] == 1 and eng.position(2)[0] == -1
    # a plain stop that fires in a reduce-only market is refused when it fires
    stop = order(3, SIDE_BUY, 1, kind=KIND_STOP_MARKET, cid=5)
    stop["amount_atoms"] = MARK + 2_000
    assert state(eng, MARKET_TRADING)
    eng.client(stop)
    assert state(eng, MARKET_REDUCE_ONLY)
    fired = eng.admin(set_mark(MARK + 2_000))
    assert [reason_name(e) for e in pick(fired, EV_REJECT)] == ["market_reduce_only"]


def test_halted_and_resumed(eng):
    assert pick(eng.admin(halt()), EV_DONE)
    assert reason_name(the_reject(eng.client(buy(3, 1, MARK, cid=1)))) == "market_halted"
    assert pick(eng.admin(resume()), EV_DONE)
    assert eng.st.markets["state"][0] == MARKET_TRADING
    assert reason_name(the_reject(eng.admin(market_state_command(0, 4)))) == "invalid_message"


def test_settlement_closes_every_position_and_order_at_the_price(eng):
    eng.client(set_margin(3, MARGIN_ISOLATED, 10))
    eng.client(sell(4, 2, MARK, cid=1), buy(3, 2, MARK, cid=1))     # 3 isolated long 2
    stop = order(5, SIDE_BUY, 1, kind=KIND_STOP_MARKET, cid=1)
    stop["amount_atoms"] = MARK + 5_000
    eng.client(stop)
    balances = {a: eng.balance(a) for a in range(1, 6)}
    isolated_margin = eng.margin(3)[2]
    assert isolated_margin > 0
    price = MARK + 3_000                            # 65 300.0
    upnl = {a: eng.position(a)[0] * price * 100 - eng.position(a)[1] for a in range(1, 6)}
    total_before = eng.collateral()
    events = eng.admin(settle_market_command(0, price))
    assert pick(events, EV_MARK)[0]["mark_ticks"] == price
    canceled = pick(events, EV_CANCELED)
    assert len(canceled) == 3 and {e["reason"] for e in canceled} == {REASON_HALT}
    closes = pick(events, EV_LIQUIDATION)
    assert [(e["account"], e["kind"], e["qty_lots"], e["price_ticks"]) for e in closes] == [
        (1, LIQ_KIND_SETTLEMENT, 3, price), (2, LIQ_KIND_SETTLEMENT, 3, price),
        (3, LIQ_KIND_SETTLEMENT, 2, price), (4, LIQ_KIND_SETTLEMENT, 2, price)]
    assert pick(events, EV_DONE)[0]["qty_lots"] == 4
    # every position is closed and each account paid its uPnL at the price (the isolated
    # margin comes back to 3's balance): the payments are what the positions held at the
    # settlement mark, so collateral is what it was
    for a in range(1, 6):
        assert eng.position(a) == (0, 0)
        back = isolated_margin if a == 3 else 0
        assert eng.balance(a) == balances[a] + upnl[a] + back
    assert eng.margin(3)[2] == 0
    assert eng.collateral() == total_before
    assert eng.st.markets["state"][0] == MARKET_SETTLED
    # settled for good: no orders, no state change, no second settlement
    assert reason_name(the_reject(eng.client(buy(1, 1, price, cid=9)))) == "market_settled"
    assert reason_name(the_reject(eng.admin(resume()))) == "market_settled"
    assert reason_name(the_reject(eng.admin(settle_market_command(0, price)))) \
        == "market_settled"


def test_a_settlement_loss_beyond_the_balance_is_covered_by_the_fund():
    eng = Engines()
    eng.admin(market_commands(), risk_commands(), deposit(1, 200 * USDC),
              deposit(2, 10_000 * USDC), insurance_deposit_command(1_000 * USDC))
    eng.client(sell(2, 10, MARK, cid=1), buy(1, 10, MARK, cid=1))   # 1 long 10 lots, 650 USDC
    # settled at 60% of the mark: 1 loses 10 x 26 USDC, more than its 200 USDC
    events = eng.admin(settle_market_command(0, 390_000))
    assert pick(events, EV_LIQUIDATION)[0]["kind"] == LIQ_KIND_SETTLEMENT
    deficit = 260 * USDC + taker_fee(MARK, 10) - 200 * USDC
    assert eng.balance(1) == 0
    assert eng.counters()["insurance"] == 1_000 * USDC - deficit
