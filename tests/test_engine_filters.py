"""Market filters (SET_MARKET_FILTERS; docs/risk.md "Filters"): min notional, untriggered
stop orders per account, and the open-interest cap. Both engines run every command."""

from engine.records import (EV_ACK, EV_DONE, KIND_MARKET, KIND_STOP_LIMIT, KIND_STOP_MARKET,
                            SIDE_BUY, SIDE_SELL, STATUS_UNTRIGGERED, TIF_IOC,
                            market_filters_command)
from tests.engine_helpers import (MARK, USDC, Engines, amend, buy, cancel, deposit,
                                  market_commands, order, pick, reason_name, sell, set_mark,
                                  the_reject)

LOT = 65 * USDC           # one lot (0.001 BTC) at the mark 65,000.0


def filtered(min_notional=0, stops=0, oi_cap=0) -> Engines:
    eng = Engines()
    eng.admin(market_commands(),
              market_filters_command(0, min_notional_atoms=min_notional, max_stop_orders=stops,
                                     open_interest_cap_lots=oi_cap),
              *[deposit(a, 100_000 * USDC) for a in range(1, 8)])
    return eng


def stop(account, side, trigger, *, cid, kind=KIND_STOP_MARKET, price=0, reduce_only=False):
    c = order(account, side, 1, price, kind=kind, cid=cid, reduce_only=reduce_only)
    c["amount_atoms"] = trigger
    return c


def test_min_notional_at_the_price_or_the_mark():
    eng = filtered(min_notional=100 * USDC)      # 1 lot = 65 USDC, 2 lots = 130
    assert reason_name(the_reject(eng.client(buy(1, 1, MARK, cid=1)))) == "min_notional"
    assert pick(eng.client(buy(1, 2, MARK - 10, cid=1)), EV_ACK)
    # at the order's price: 2 lots at 49,000.0 would be 98 USDC (the mark moves the band)
    eng.admin(set_mark(500_000))
    assert reason_name(the_reject(eng.client(buy(1, 2, 490_000, cid=2)))) == "min_notional"
    eng.admin(set_mark(MARK))
    # market orders at the mark; stop-limits at their price, stop-markets at the mark
    market_buy = order(2, SIDE_BUY, 1, kind=KIND_MARKET, tif=TIF_IOC, cid=1)
    assert reason_name(the_reject(eng.client(market_buy))) == "min_notional"
    assert reason_name(the_reject(eng.client(stop(2, SIDE_BUY, MARK + 100, cid=2)))) \
        == "min_notional"
    assert reason_name(the_reject(eng.client(
        stop(2, SIDE_BUY, MARK + 100, cid=3, kind=KIND_STOP_LIMIT, price=MARK + 200)))) \
        == "min_notional"
    # amending below it is refused too
    assert reason_name(the_reject(eng.client(amend(1, cid=1, qty=1)))) == "min_notional"
    # an order that only reduces is exempt
    eng.client(sell(3, 2, MARK - 10, cid=1))      # 1 buys 2 lots
    assert eng.position(1)[0] == 2
    assert pick(eng.client(sell(1, 1, MARK + 10, cid=5, reduce_only=True)), EV_ACK)


def test_stop_orders_per_account_are_capped():
    eng = filtered(stops=2)
    for cid in (1, 2):
        ev = eng.client(stop(1, SIDE_BUY, MARK + 100 * cid, cid=cid))
        assert pick(ev, EV_ACK)[0]["status"] == STATUS_UNTRIGGERED
    assert reason_name(the_reject(eng.client(stop(1, SIDE_SELL, MARK - 100, cid=3)))) \
        == "too_many_stop_orders"
    # another account has its own slots; resting orders do not count
    assert pick(eng.client(stop(2, SIDE_BUY, MARK + 100, cid=1)), EV_ACK)
    assert pick(eng.client(buy(1, 1, MARK - 100, cid=4)), EV_ACK)
    # a canceled stop frees its slot, and so does one that fired
    eng.client(cancel(1, cid=1))
    assert pick(eng.client(stop(1, SIDE_SELL, MARK - 100, cid=3)), EV_ACK)
    eng.client(sell(3, 2, MARK + 200, cid=1))     # the stops at +100 (2) and +200 (1) fire
    eng.admin(set_mark(MARK + 200))
    assert eng.position(1)[0] == 1
    assert pick(eng.client(stop(1, SIDE_SELL, MARK - 200, cid=5)), EV_ACK)


def test_open_interest_cap_refuses_only_the_side_that_raises_it():
    eng = filtered(oi_cap=10)
    eng.client(sell(2, 6, MARK, cid=1), buy(1, 6, MARK, cid=1))       # open interest 6
    # 3 opens 5 more: 11 > 10, refused, resting or taking
    assert reason_name(the_reject(eng.client(buy(3, 5, MARK - 100, cid=1)))) \
        == "open_interest_cap"
    assert reason_name(the_reject(eng.client(sell(4, 5, MARK + 100, cid=1)))) \
        == "open_interest_cap"
    # up to the cap is fine
    eng.client(sell(4, 4, MARK, cid=1), buy(3, 4, MARK, cid=1))       # 10
    assert eng.st.markets["open_interest_lots"][0] == 10
    assert reason_name(the_reject(eng.client(buy(5, 1, MARK - 100, cid=1)))) \
        == "open_interest_cap"
    # closing always passes: 1 sells 6 to 2, who closes its short: open interest 4
    eng.client(buy(2, 6, MARK, cid=2))
    assert pick(eng.client(sell(1, 6, MARK, cid=2)), EV_ACK)
    assert eng.st.markets["open_interest_lots"][0] == 4
    # and frees room to open again
    assert pick(eng.client(buy(5, 6, MARK - 100, cid=1)), EV_ACK)


def test_filters_are_validated():
    eng = Engines()
    eng.admin(market_commands())
    ev = eng.admin(market_filters_command(0, min_notional_atoms=-1, max_stop_orders=0,
                                          open_interest_cap_lots=0))
    assert reason_name(the_reject(ev)) == "invalid_message"
    assert pick(eng.admin(market_filters_command(0, min_notional_atoms=0, max_stop_orders=10,
                                                 open_interest_cap_lots=0)), EV_DONE)
