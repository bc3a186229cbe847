"""Market filters (SET_MARKET_FILTERS; docs/risk.md "Filters"): min notional, untriggered
stop orders per account, the open-interest cap, and what stuffing a book side's levels takes.
Both engines run every command."""

from engine.config import EngineConfig, band_ticks, book_levels_needed
from engine.state import C_ORDERS_USED
from engine.records import (EV_ACK, EV_DONE, KIND_MARKET, KIND_STOP_LIMIT, KIND_STOP_MARKET,
                            SIDE_BUY, SIDE_SELL, STATUS_UNTRIGGERED, TIF_IOC,
                            market_filters_command)
from tests.engine_helpers import (MARK, MAX_OPEN_ORDERS, MAX_PRICE, USDC, Engines, amend, buy,
                                  cancel, deposit, market_commands, order, pick, reason_name,
                                  sell, set_mark, the_reject)

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


# ---- stuffing a book side (docs/risk.md, "What stuffing costs now") -----------------------
POOL = 64                 # engine.max_orders of these tests
NEWCOMER, LATECOMER = 14, 15


def stuffed_bids(levels: int, band_e9: int, prices: list[int]) -> tuple[Engines, int]:
    """A market whose book sides hold `levels` levels (min notional 5 USDC) and attackers
    resting one-lot bids at `prices`, MAX_OPEN_ORDERS per account (accounts 1, 2, ...), until
    one is refused; returns the engines and how many rested."""
    eng = Engines(EngineConfig(max_accounts=16, max_markets=1, max_orders=POOL,
                               max_levels_per_side=levels))
    attackers = range(1, -(-len(prices) // MAX_OPEN_ORDERS) + 1)
    eng.admin(market_commands(band_e9=band_e9),
              market_filters_command(0, min_notional_atoms=5 * USDC, max_stop_orders=0,
                                     open_interest_cap_lots=0),
              *[deposit(a, 1_000 * USDC) for a in [*attackers, NEWCOMER, LATECOMER]])
    for k, price in enumerate(prices):
        ev = eng.client(buy(1 + k // MAX_OPEN_ORDERS, 1, price, cid=1 + k % MAX_OPEN_ORDERS))
        if not pick(ev, EV_ACK):
            assert reason_name(the_reject(ev)) == "too_many_orders"
            return eng, k
    return eng, len(prices)


def test_a_side_sized_below_the_pool_is_locked_by_filling_its_levels():
    """The sizing this replaces: 32 levels for a 64-order pool. Four accounts fill the side, and
    a newcomer can bid at no new price though half the pool is free."""
    eng, rested = stuffed_bids(32, 100_000_000, [MARK - k for k in range(48)])
    assert rested == 32 and int(eng.st.counters[C_ORDERS_USED]) == 32
    assert reason_name(the_reject(eng.client(buy(NEWCOMER, 1, MARK - 100, cid=1)))) \
        == "too_many_orders"
    assert pick(eng.client(buy(NEWCOMER, 1, MARK, cid=2)), EV_ACK)   # existing prices only


def test_a_side_covering_the_band_is_locked_again_once_the_mark_moves():
    """Why the band at one mark is not enough: a side as big as the band (the mark +- 10
    ticks: 21 prices), filled at one mark, holds all of it; the mark moves up 5 ticks and the
    band's 5 new prices are refused to everyone, since the old levels rest on."""
    band_e9 = 15_385                               # floor(650,000 x 15,385 / 1e9) = 10 ticks
    levels = band_ticks(MARK, band_e9, MAX_PRICE)
    assert levels == 21
    eng, rested = stuffed_bids(levels, band_e9, [MARK + k for k in range(-10, 11)])
    assert rested == 21
    assert reason_name(the_reject(eng.client(buy(NEWCOMER, 1, MARK - 11, cid=1)))) \
        == "price_band"
    eng.admin(set_mark(MARK + 5))
    assert reason_name(the_reject(eng.client(buy(NEWCOMER, 1, MARK + 15, cid=1)))) \
        == "too_many_orders"


def test_stuffing_a_side_sized_by_book_levels_needed_locks_out_no_new_price():
    """Sized as the config requires, a side never fills before the order pool: seven accounts
    rest 56 bids at 56 prices, and a newcomer still bids at new prices, after the mark moved
    too, until the pool itself is full; then the refusal is the pool's, at every price."""
    levels = book_levels_needed(MAX_PRICE, POOL)
    assert levels == POOL
    eng, rested = stuffed_bids(levels, 100_000_000, [MARK - k for k in range(56)])
    assert rested == 56
    assert pick(eng.client(buy(NEWCOMER, 1, MARK - 1000, cid=1)), EV_ACK)
    eng.admin(set_mark(MARK + 5000))
    for cid in range(2, MAX_OPEN_ORDERS + 1):
        assert pick(eng.client(buy(NEWCOMER, 1, MARK + 5000 - cid, cid=cid)), EV_ACK)
    assert int(eng.st.book_depth[0, 0]) == POOL
    assert reason_name(the_reject(eng.client(buy(LATECOMER, 1, MARK, cid=1)))) \
        == "too_many_orders"                                          # the pool, not the side
