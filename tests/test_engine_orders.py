"""Order types, flags, self-trade prevention, amend/cancel, validation, margin and PnL.

Every scenario runs through the reference model and the compiled matcher at once
(tests/engine_helpers.py): their events must be identical and their states equal after each
step, with the invariants of DESIGN.md §8 (collateral conserved to the atom included). On top
of that each test states the exact events it expects.
"""

import pytest

from engine.config import EngineConfig
from engine.records import (
    CMD_SET_ACCOUNT_STATE, EV_ACK, EV_AMENDED, EV_CANCELED, EV_TRADE, KIND_MARKET, REASON_POSITION_LIMIT,
    REASON_UNKNOWN_ACCOUNT, SIDE_BUY, SIDE_SELL, STATUS_CANCELED, STATUS_FILLED, STATUS_OPEN,
    STP_CANCEL_BOTH, STP_CANCEL_MAKER, STP_CANCEL_TAKER, TIF_FOK, TIF_IOC, TIF_POST_ONLY,
)
from tests.engine_helpers import (
    ACK, AMENDED, ATPL, BALANCE, BAND_DEV, BTC, CANCELED, DONE, MARK, MARK_EV, MAX_ORDER,
    MAX_OPEN_ORDERS, MAX_PRICE, REJECT, TRADE, USDC, PyPosition, amend, assert_events, body,
    btc_engines, buy, cancel, cancel_all, command, create_market, deposit, Engines, halt, maker_fee,
    margin_required, market_commands, market_order, order, pick, reason_name, resume, sell,
    set_limits, set_margin, set_mark, taker_fee, the_reject, warm_up, withdraw,
)

D = 10_000 * USDC          # each funded account's deposit
ETH = 1


@pytest.fixture(scope="session", autouse=True)
def _compiled():
    warm_up()


@pytest.fixture
def eng():
    return btc_engines((1, D), (2, D), (3, D), (4, D))


# ---- limit GTC ------------------------------------------------------------------------------
def test_limit_gtc_rests_open(eng):
    ev = eng.client(buy(1, 10, 649_000, cid=7, req=11))
    assert_events(ev, [ACK(1, 1, STATUS_OPEN, 10, 649_000, cid=7, remaining=10, req=11)])
    assert eng.bids() == [(649_000, [(1, 1, 10)])]
    assert eng.asks() == []
    assert eng.position_full(1) == (0, 0, 10, 0, 1)
    assert eng.balance(1) == D


def test_limit_crosses_partially_then_rests_the_rest_at_its_own_price(eng):
    eng.client(sell(1, 4, 650_000))
    ev = eng.client(buy(2, 10, 650_100, cid=3, req=5))
    # the taker trades at the maker's price, not its own limit
    assert_events(ev, [
        ACK(2, 2, STATUS_OPEN, 10, 650_100, cid=3, remaining=6, req=5),
        TRADE(2, 2, SIDE_BUY, 650_000, 4, 6, 1, 1, 0, trade_id=1, cid=3, req=5),
    ])
    assert eng.bids() == [(650_100, [(2, 2, 6)])]
    assert eng.asks() == []
    assert eng.position(2) == (4, 4 * 650_000 * ATPL)
    assert eng.position(1) == (-4, -4 * 650_000 * ATPL)


def test_limit_fills_completely_with_exact_fees(eng):
    eng.client(sell(1, 10, 650_000, cid=1))
    ev = eng.client(buy(2, 4, 650_000, cid=2))
    # notional 4 x 650000 ticks x 100 atoms = 260,000,000 atoms (260 USDC):
    # taker 0.05% = 130,000 atoms; maker -0.01% = a rebate of 26,000 atoms
    assert_events(ev, [
        ACK(2, 2, STATUS_FILLED, 4, 650_000, cid=2),
        TRADE(2, 2, SIDE_BUY, 650_000, 4, 0, 1, 1, 6, trade_id=1, cid=2, maker_cid=1,
              fee_atoms=130_000, maker_fee_atoms=-26_000),
    ])
    assert eng.balance(2) == D - 130_000
    assert eng.balance(1) == D + 26_000
    assert eng.counters()["fees"] == 130_000 - 26_000
    assert eng.asks() == [(650_000, [(1, 1, 6)])]


def test_fees_round_in_the_exchanges_favour(eng):
    eng.client(sell(1, 3, 650_001))
    ev = eng.client(buy(2, 3, 650_001))
    # notional 195,000,300 atoms: taker 97,500.15 -> 97,501; rebate 19,500.03 -> 19,500
    t = pick(ev, EV_TRADE)[0]
    assert (t["fee_atoms"], t["maker_fee_atoms"]) == (97_501, -19_500)


def test_price_time_priority(eng):
    eng.client(sell(1, 5, 650_200))   # oid 1: worse price, first in time
    eng.client(sell(2, 5, 650_100))   # oid 2
    eng.client(sell(3, 5, 650_100))   # oid 3: same price as oid 2, later
    ev = eng.client(buy(4, 12, 650_200))
    assert_events(ev, [
        ACK(4, 4, STATUS_FILLED, 12, 650_200),
        TRADE(4, 4, SIDE_BUY, 650_100, 5, 7, 2, 2, 0, trade_id=1),
        TRADE(4, 4, SIDE_BUY, 650_100, 5, 2, 3, 3, 0, trade_id=2),
        TRADE(4, 4, SIDE_BUY, 650_200, 2, 0, 1, 1, 3, trade_id=3),
    ])
    assert eng.asks() == [(650_200, [(1, 1, 3)])]


def test_bids_price_time_priority_for_a_seller(eng):
    eng.client(buy(1, 5, 649_800), buy(2, 5, 649_900), buy(3, 5, 649_900))
    assert eng.bids() == [(649_900, [(2, 2, 5), (3, 3, 5)]), (649_800, [(1, 1, 5)])]
    ev = eng.client(sell(4, 7, 649_800))
    assert_events(ev, [
        ACK(4, 4, STATUS_FILLED, 7, 649_800, side=SIDE_SELL),
        TRADE(4, 4, SIDE_SELL, 649_900, 5, 2, 2, 2, 0, trade_id=1),
        TRADE(4, 4, SIDE_SELL, 649_900, 2, 0, 3, 3, 3, trade_id=2),
    ])


# ---- market orders --------------------------------------------------------------------------
def test_market_buy_is_ioc_up_to_the_band_edge(eng):
    eng.client(sell(1, 3, 700_000), sell(2, 4, MARK + BAND_DEV))    # 715,000: inside the band
    ev = eng.client(market_order(3, SIDE_BUY, 10, req=9))
    assert_events(ev, [
        ACK(3, 3, STATUS_CANCELED, 10, 0, kind=KIND_MARKET, req=9),
        TRADE(3, 3, SIDE_BUY, 700_000, 3, 7, 1, 1, 0, trade_id=1, req=9),
        TRADE(3, 3, SIDE_BUY, 715_000, 4, 3, 2, 2, 0, trade_id=2, req=9),
        CANCELED(3, 3, "ioc", 3, 0, kind=KIND_MARKET, req=9),
    ])
    assert eng.asks() == [] and eng.bids() == []
    assert eng.position(3) == (7, (3 * 700_000 + 4 * 715_000) * ATPL)


def test_market_buy_does_not_take_beyond_mark_plus_band(eng):
    eng.client(sell(1, 3, 714_000), sell(2, 4, 715_000))
    eng.admin(set_mark(649_990))          # band: floor(64,999.0) -> buys up to 714,989
    ev = eng.client(market_order(3, SIDE_BUY, 10))
    assert_events(ev, [
        ACK(3, 3, STATUS_CANCELED, 10, 0, kind=KIND_MARKET),
        TRADE(3, 3, SIDE_BUY, 714_000, 3, 7, 1, 1, 0, trade_id=1),
        CANCELED(3, 3, "ioc", 7, 0, kind=KIND_MARKET),
    ])
    assert eng.asks() == [(715_000, [(2, 2, 4)])]
    # and a limit order at that price is outside the band now
    assert reason_name(the_reject(eng.client(buy(3, 1, 715_000)))) == "price_band"


def test_market_sell_does_not_take_below_mark_minus_band(eng):
    eng.client(buy(1, 3, 586_000), buy(2, 4, 585_000))
    eng.admin(set_mark(650_010))          # band 65,001: sells down to 585,009
    ev = eng.client(market_order(3, SIDE_SELL, 10))
    assert_events(ev, [
        ACK(3, 3, STATUS_CANCELED, 10, 0, side=SIDE_SELL, kind=KIND_MARKET),
        TRADE(3, 3, SIDE_SELL, 586_000, 3, 7, 1, 1, 0, trade_id=1),
        CANCELED(3, 3, "ioc", 7, 0, side=SIDE_SELL, kind=KIND_MARKET),
    ])
    assert eng.bids() == [(585_000, [(2, 2, 4)])]


def test_market_order_into_an_empty_book_is_canceled_ioc(eng):
    ev = eng.client(market_order(1, SIDE_SELL, 5, tif=TIF_IOC))
    assert_events(ev, [ACK(1, 1, STATUS_CANCELED, 5, 0, side=SIDE_SELL, kind=KIND_MARKET),
                       CANCELED(1, 1, "ioc", 5, 0, side=SIDE_SELL, kind=KIND_MARKET)])


def test_market_fok_and_market_post_only(eng):
    eng.client(sell(1, 3, 651_000))
    ev = eng.client(market_order(2, SIDE_BUY, 4, tif=TIF_FOK))
    assert reason_name(the_reject(ev)) == "fok_unfilled"
    ev = eng.client(market_order(2, SIDE_BUY, 3, tif=TIF_FOK))
    assert_events(ev, [ACK(2, 2, STATUS_FILLED, 3, 0, kind=KIND_MARKET),
                       TRADE(2, 2, SIDE_BUY, 651_000, 3, 0, 1, 1, 0, trade_id=1)])
    ev = eng.client(market_order(2, SIDE_BUY, 3, tif=TIF_POST_ONLY, cid=4))
    assert_events(ev, [REJECT(2, "invalid_message", kind=KIND_MARKET, cid=4)])


# ---- IOC, FOK, post-only --------------------------------------------------------------------
def test_ioc_limit_fills_what_it_can_and_cancels_the_rest(eng):
    eng.client(sell(1, 4, 650_000), sell(2, 4, 650_200))
    ev = eng.client(buy(3, 10, 650_100, tif=TIF_IOC, cid=8))
    assert_events(ev, [
        ACK(3, 3, STATUS_CANCELED, 10, 650_100, cid=8),
        TRADE(3, 3, SIDE_BUY, 650_000, 4, 6, 1, 1, 0, trade_id=1, cid=8),
        CANCELED(3, 3, "ioc", 6, 650_100, cid=8),
    ])
    assert eng.bids() == []
    assert eng.asks() == [(650_200, [(2, 2, 4)])]


def test_ioc_that_fills_completely_is_filled(eng):
    eng.client(sell(1, 4, 650_000))
    ev = eng.client(buy(3, 4, 650_000, tif=TIF_IOC))
    assert_events(ev, [ACK(3, 2, STATUS_FILLED, 4, 650_000),
                       TRADE(3, 2, SIDE_BUY, 650_000, 4, 0, 1, 1, 0, trade_id=1)])


def test_fok_that_can_fill_fills_across_levels(eng):
    eng.client(sell(1, 4, 650_000), sell(2, 6, 650_100))
    ev = eng.client(buy(3, 10, 650_100, tif=TIF_FOK))
    assert_events(ev, [
        ACK(3, 3, STATUS_FILLED, 10, 650_100),
        TRADE(3, 3, SIDE_BUY, 650_000, 4, 6, 1, 1, 0, trade_id=1),
        TRADE(3, 3, SIDE_BUY, 650_100, 6, 0, 2, 2, 0, trade_id=2),
    ])


@pytest.mark.parametrize("qty, limit", [(11, 650_100), (10, 650_000), (5, 649_900)])
def test_fok_that_cannot_fill_is_rejected_and_changes_nothing(eng, qty, limit):
    eng.client(sell(1, 4, 650_000), sell(2, 6, 650_100))
    before = eng.digest()
    ev = eng.client(buy(3, qty, limit, tif=TIF_FOK, cid=9, req=4))
    assert_events(ev, [REJECT(3, "fok_unfilled", cid=9, req=4)])
    assert eng.digest() == before
    assert eng.asks() == [(650_000, [(1, 1, 4)]), (650_100, [(2, 2, 6)])]
    assert [eng.balance(a) for a in (1, 2, 3)] == [D, D, D]
    assert eng.counters()["next_oid"] == 3


def test_post_only_that_would_take_is_rejected(eng):
    eng.client(sell(1, 4, 650_000))
    before = eng.digest()
    ev = eng.client(buy(2, 3, 650_000, tif=TIF_POST_ONLY, cid=5))
    assert_events(ev, [REJECT(2, "post_only_would_take", cid=5)])
    assert eng.digest() == before


def test_post_only_that_does_not_cross_rests(eng):
    eng.client(sell(1, 4, 650_000))
    ev = eng.client(buy(2, 3, 649_900, tif=TIF_POST_ONLY, cid=5))
    assert_events(ev, [ACK(2, 2, STATUS_OPEN, 3, 649_900, cid=5, remaining=3)])
    # it makes: a later seller crossing it pays taker, it gets the rebate
    ev = eng.client(sell(3, 3, 649_900))
    assert_events(ev, [ACK(3, 3, STATUS_FILLED, 3, 649_900, side=SIDE_SELL),
                       TRADE(3, 3, SIDE_SELL, 649_900, 3, 0, 2, 2, 0, trade_id=1, maker_cid=5)])
    assert eng.balance(2) == D - maker_fee(649_900, 3) > D


# ---- reduce-only ----------------------------------------------------------------------------
def _long(eng, account, qty, price=MARK, counterparty=4):
    """Give `account` a long position of qty at price (counterparty takes the short)."""
    eng.client(sell(counterparty, qty, price), buy(account, qty, price, tif=TIF_IOC))
    assert eng.position(account)[0] >= qty


def test_reduce_only_without_position_is_rejected(eng):
    ev = eng.client(sell(1, 5, 660_000, reduce_only=True, cid=2))
    assert_events(ev, [REJECT(1, "reduce_only_violation", side=SIDE_SELL, cid=2)])
    ev = eng.client(market_order(1, SIDE_BUY, 5, reduce_only=True))
    assert_events(ev, [REJECT(1, "reduce_only_violation", kind=KIND_MARKET)])


def test_reduce_only_on_the_same_side_as_the_position_is_rejected(eng):
    _long(eng, 1, 10)
    before = eng.digest()
    ev = eng.client(buy(1, 5, 640_000, reduce_only=True))
    assert_events(ev, [REJECT(1, "reduce_only_violation")])
    assert eng.digest() == before


def test_reduce_only_qty_is_clipped_to_the_position(eng):
    _long(eng, 1, 10)                          # oids 1, 2
    ev = eng.client(sell(1, 25, 660_000, reduce_only=True, cid=3))
    assert_events(ev, [ACK(1, 3, STATUS_OPEN, 10, 660_000, side=SIDE_SELL, cid=3, remaining=10)])
    assert eng.position_full(1) == (10, 10 * MARK * ATPL, 0, 10, 1)


def test_reduce_only_does_not_need_margin(eng):
    _long(eng, 1, 10)
    eng.admin(set_mark(600_000))               # long 10 from 650,000: equity falls
    # withdraw everything the margin rule allows...
    equity = D - taker_fee(MARK, 10) + 10 * (600_000 - MARK) * ATPL
    room = equity - margin_required(10, 600_000)
    assert_events(eng.client(withdraw(1, room)),
                  [BALANCE(1, -room, D - taker_fee(MARK, 10) - room), DONE(1)])
    # ...then one more tick down: equity (-1000 atoms) now falls short of the requirement
    # (-20 atoms), so even a position-reducing plain order is refused...
    eng.admin(set_mark(599_999))
    assert_events(eng.client(sell(1, 1, 620_000)),
                  [REJECT(1, "insufficient_margin", side=SIDE_SELL)])
    # ...while a reduce-only one is accepted: it is not margin-checked
    assert_events(eng.client(sell(1, 10, 620_000, reduce_only=True)),
                  [ACK(1, 3, STATUS_OPEN, 10, 620_000, side=SIDE_SELL, remaining=10)])


def test_resting_reduce_only_is_shrunk_when_the_position_shrinks(eng):
    _long(eng, 1, 10)                                             # oids 1, 2
    eng.client(sell(1, 10, 660_000, reduce_only=True, cid=5))     # oid 3
    eng.client(buy(2, 4, 650_000))                                # oid 4
    ev = eng.client(sell(1, 4, 650_000, req=21))                  # oid 5: closes 4 of 10
    assert_events(ev, [
        ACK(1, 5, STATUS_FILLED, 4, 650_000, side=SIDE_SELL, req=21),
        TRADE(1, 5, SIDE_SELL, 650_000, 4, 0, 2, 4, 0, trade_id=2, req=21),
        AMENDED(1, 3, 660_000, 6, reason="reduce_only", side=SIDE_SELL, cid=5, req=21),
    ])
    assert eng.asks() == [(660_000, [(3, 1, 6)])]


def test_resting_reduce_only_is_canceled_when_the_position_closes(eng):
    _long(eng, 1, 10)
    eng.client(sell(1, 10, 660_000, reduce_only=True, cid=5))     # oid 3
    eng.client(buy(2, 10, 649_000))                               # oid 4
    ev = eng.client(market_order(1, SIDE_SELL, 10))               # oid 5
    assert_events(ev, [
        ACK(1, 5, STATUS_FILLED, 10, 0, side=SIDE_SELL, kind=KIND_MARKET),
        TRADE(1, 5, SIDE_SELL, 649_000, 10, 0, 2, 4, 0, trade_id=2),
        CANCELED(1, 3, "reduce_only", 10, 660_000, side=SIDE_SELL, cid=5),
    ])
    assert eng.asks() == [] and eng.position(1)[0] == 0


def test_reduce_only_of_a_maker_is_canceled_when_its_other_order_closes_it(eng):
    _long(eng, 1, 10)
    eng.client(sell(1, 10, 660_000, reduce_only=True, cid=1))     # oid 3
    eng.client(sell(1, 10, 655_000, cid=2))                       # oid 4: plain
    ev = eng.client(buy(2, 10, 655_000, req=8))                   # oid 5
    # addressed to the maker, so the sweep's event carries no request token
    assert_events(ev, [
        ACK(2, 5, STATUS_FILLED, 10, 655_000, req=8),
        TRADE(2, 5, SIDE_BUY, 655_000, 10, 0, 1, 4, 0, trade_id=2, req=8, maker_cid=2),
        CANCELED(1, 3, "reduce_only", 10, 660_000, side=SIDE_SELL, cid=1),
    ])


def test_reduce_only_is_canceled_after_a_flip(eng):
    _long(eng, 1, 10)
    eng.client(sell(1, 10, 660_000, reduce_only=True, cid=1))     # oid 3
    eng.client(buy(2, 15, 650_000))                               # oid 4
    ev = eng.client(sell(1, 15, 650_000, cid=2))                  # oid 5: long 10 -> short 5
    assert_events(ev, [
        ACK(1, 5, STATUS_FILLED, 15, 650_000, side=SIDE_SELL, cid=2),
        TRADE(1, 5, SIDE_SELL, 650_000, 15, 0, 2, 4, 0, trade_id=2, cid=2),
        CANCELED(1, 3, "reduce_only", 10, 660_000, side=SIDE_SELL, cid=1),
    ])
    assert eng.position(1) == (-5, -5 * 650_000 * ATPL)


def test_reduce_only_maker_trades_no_more_than_closes_its_position(eng):
    _long(eng, 1, 10)                                             # oids 1, 2
    eng.client(sell(1, 8, 650_000, cid=1))                        # oid 3: plain
    eng.client(sell(1, 10, 650_100, reduce_only=True, cid=2))     # oid 4: RO, all of it
    ev = eng.client(buy(3, 18, 650_100))                          # oid 5
    assert_events(ev, [
        ACK(3, 5, STATUS_OPEN, 18, 650_100, remaining=8),
        TRADE(3, 5, SIDE_BUY, 650_000, 8, 10, 1, 3, 0, trade_id=2, maker_cid=1),
        # the reduce-only maker trades only the 2 lots that close the position...
        TRADE(3, 5, SIDE_BUY, 650_100, 2, 8, 1, 4, 8, trade_id=3, maker_cid=2),
        # ...and is then canceled, the taker resting the rest
        CANCELED(1, 4, "reduce_only", 8, 650_100, side=SIDE_SELL, cid=2),
    ])
    assert eng.position(1)[0] == 0
    assert eng.bids() == [(650_100, [(5, 3, 8)])]


def test_fok_counts_reduce_only_makers_only_up_to_their_position(eng):
    _long(eng, 1, 10)
    eng.client(sell(1, 8, 650_000, cid=1))                        # oid 3
    eng.client(sell(1, 10, 650_100, reduce_only=True, cid=2))     # oid 4 (2 really tradeable)
    eng.client(sell(2, 5, 650_100))                               # oid 5
    assert reason_name(the_reject(eng.client(buy(3, 16, 650_100, tif=TIF_FOK)))) \
        == "fok_unfilled"
    ev = eng.client(buy(3, 15, 650_100, tif=TIF_FOK))             # oid 6
    assert_events(ev, [
        ACK(3, 6, STATUS_FILLED, 15, 650_100),
        TRADE(3, 6, SIDE_BUY, 650_000, 8, 7, 1, 3, 0, trade_id=2, maker_cid=1),
        TRADE(3, 6, SIDE_BUY, 650_100, 2, 5, 1, 4, 8, trade_id=3, maker_cid=2),
        CANCELED(1, 4, "reduce_only", 8, 650_100, side=SIDE_SELL, cid=2),
        TRADE(3, 6, SIDE_BUY, 650_100, 5, 0, 2, 5, 0, trade_id=4),
    ])


def test_two_reduce_only_orders_each_up_to_the_position(eng):
    _long(eng, 1, 10)
    eng.client(sell(1, 10, 660_000, reduce_only=True, cid=1))     # oid 3
    eng.client(sell(1, 10, 661_000, reduce_only=True, cid=2))     # oid 4
    eng.client(buy(2, 10, 660_000))                               # oid 5 takes oid 3
    assert eng.asks() == []                                       # oid 4 canceled
    assert eng.position_full(1) == (0, 0, 0, 0, 0)


# ---- self-trade prevention ------------------------------------------------------------------
def _stp_book(eng):
    eng.client(sell(2, 3, 650_000))     # oid 1: someone else, first in the queue
    eng.client(sell(1, 5, 650_000, cid=1))  # oid 2: the taker's own order behind it
    eng.client(sell(3, 5, 650_100))     # oid 3: someone else, next level


def test_stp_cancel_taker_expires_the_taker(eng):
    _stp_book(eng)
    ev = eng.client(buy(1, 10, 650_100, stp=STP_CANCEL_TAKER, req=6, cid=2))
    assert_events(ev, [
        ACK(1, 4, STATUS_CANCELED, 10, 650_100, req=6, cid=2),
        TRADE(1, 4, SIDE_BUY, 650_000, 3, 7, 2, 1, 0, trade_id=1, req=6, cid=2),
        CANCELED(1, 4, "stp", 7, 650_100, req=6, cid=2),
    ])
    assert eng.asks() == [(650_000, [(2, 1, 5)]), (650_100, [(3, 3, 5)])]


def test_stp_cancel_maker_expires_the_maker_and_keeps_matching(eng):
    _stp_book(eng)
    ev = eng.client(buy(1, 10, 650_100, stp=STP_CANCEL_MAKER, req=6, cid=2))
    assert_events(ev, [
        ACK(1, 4, STATUS_OPEN, 10, 650_100, remaining=2, req=6, cid=2),
        TRADE(1, 4, SIDE_BUY, 650_000, 3, 7, 2, 1, 0, trade_id=1, req=6, cid=2),
        CANCELED(1, 2, "stp", 5, 650_000, side=SIDE_SELL, req=6, cid=1),
        TRADE(1, 4, SIDE_BUY, 650_100, 5, 2, 3, 3, 0, trade_id=2, req=6, cid=2),
    ])
    assert eng.asks() == []
    assert eng.bids() == [(650_100, [(4, 1, 2)])]


def test_stp_cancel_both_expires_both(eng):
    _stp_book(eng)
    ev = eng.client(buy(1, 10, 650_100, stp=STP_CANCEL_BOTH, req=6, cid=2))
    assert_events(ev, [
        ACK(1, 4, STATUS_CANCELED, 10, 650_100, req=6, cid=2),
        TRADE(1, 4, SIDE_BUY, 650_000, 3, 7, 2, 1, 0, trade_id=1, req=6, cid=2),
        CANCELED(1, 2, "stp", 5, 650_000, side=SIDE_SELL, req=6, cid=1),
        CANCELED(1, 4, "stp", 7, 650_100, req=6, cid=2),
    ])
    assert eng.asks() == [(650_100, [(3, 3, 5)])]


def test_stp_cancel_maker_clears_several_own_makers(eng):
    eng.client(sell(1, 2, 650_000, cid=1), sell(1, 2, 650_000, cid=2), sell(2, 3, 650_000))
    ev = eng.client(buy(1, 3, 650_000, stp=STP_CANCEL_MAKER, cid=3))
    assert_events(ev, [
        ACK(1, 4, STATUS_FILLED, 3, 650_000, cid=3),
        CANCELED(1, 1, "stp", 2, 650_000, side=SIDE_SELL, cid=1),
        CANCELED(1, 2, "stp", 2, 650_000, side=SIDE_SELL, cid=2),
        TRADE(1, 4, SIDE_BUY, 650_000, 3, 0, 2, 3, 0, trade_id=1, cid=3),
    ])


def test_no_stp_when_own_order_does_not_cross(eng):
    eng.client(sell(1, 5, 650_500, cid=1))
    ev = eng.client(buy(1, 5, 650_000, stp=STP_CANCEL_BOTH, cid=2))
    assert_events(ev, [ACK(1, 2, STATUS_OPEN, 5, 650_000, remaining=5, cid=2)])


def test_fok_with_own_order_in_the_way(eng):
    _stp_book(eng)
    before = eng.digest()
    for stp in (STP_CANCEL_TAKER, STP_CANCEL_BOTH):
        assert reason_name(the_reject(eng.client(
            buy(1, 8, 650_100, tif=TIF_FOK, stp=stp, cid=2)))) == "fok_unfilled"
    assert eng.digest() == before
    # cancel_maker walks past its own order: 3 + 5 lots of others are there
    assert reason_name(the_reject(eng.client(
        buy(1, 9, 650_100, tif=TIF_FOK, stp=STP_CANCEL_MAKER, cid=2)))) == "fok_unfilled"
    ev = eng.client(buy(1, 8, 650_100, tif=TIF_FOK, stp=STP_CANCEL_MAKER, cid=2))
    assert [e["etype"] for e in body(ev)] == [EV_ACK, EV_TRADE, EV_CANCELED, EV_TRADE]
    assert pick(ev, EV_ACK)[0]["status"] == STATUS_FILLED


# ---- amend ----------------------------------------------------------------------------------
def test_amend_qty_down_keeps_time_priority(eng):
    eng.client(sell(1, 10, 650_000, cid=4), sell(2, 10, 650_000))
    ev = eng.client(amend(1, oid=1, qty=5, req=3))
    assert_events(ev, [AMENDED(1, 1, 650_000, 5, side=SIDE_SELL, cid=4, req=3)])
    assert eng.asks() == [(650_000, [(1, 1, 5), (2, 2, 10)])]
    assert eng.position_full(1) == (0, 0, 0, 5, 1)
    ev = eng.client(buy(3, 5, 650_000))
    assert pick(ev, EV_TRADE)[0]["maker_oid"] == 1


def test_amend_qty_up_loses_time_priority(eng):
    eng.client(sell(1, 10, 650_000), sell(2, 10, 650_000))
    ev = eng.client(amend(1, oid=1, qty=15))
    assert_events(ev, [AMENDED(1, 1, 650_000, 15, side=SIDE_SELL)])
    assert eng.asks() == [(650_000, [(2, 2, 10), (1, 1, 15)])]
    ev = eng.client(buy(3, 5, 650_000))
    assert pick(ev, EV_TRADE)[0]["maker_oid"] == 2


def test_amend_price_change_loses_time_priority(eng):
    eng.client(sell(2, 10, 650_100))                # oid 1
    eng.client(sell(1, 10, 650_000, cid=6))         # oid 2
    ev = eng.client(amend(1, cid=6, price=650_100))
    assert_events(ev, [AMENDED(1, 2, 650_100, 10, side=SIDE_SELL, cid=6)])
    assert eng.asks() == [(650_100, [(1, 2, 10), (2, 1, 10)])]
    ev = eng.client(buy(3, 5, 650_100))
    assert pick(ev, EV_TRADE)[0]["maker_oid"] == 1


def test_amend_same_qty_same_price_keeps_priority(eng):
    eng.client(sell(1, 10, 650_000), sell(2, 10, 650_000))
    eng.client(amend(1, oid=1, qty=10, price=650_000))
    assert eng.asks() == [(650_000, [(1, 1, 10), (2, 2, 10)])]


def test_amend_a_partially_filled_order_sets_its_remaining(eng):
    eng.client(sell(1, 10, 650_000), buy(2, 4, 650_000))
    ev = eng.client(amend(1, oid=1, qty=3))
    assert_events(ev, [AMENDED(1, 1, 650_000, 3, side=SIDE_SELL)])
    assert eng.position_full(1) == (-4, -4 * 650_000 * ATPL, 0, 3, 1)


def test_amend_to_a_crossing_price_trades(eng):
    eng.client(buy(1, 10, 649_000, cid=2))           # oid 1
    eng.client(sell(2, 4, 650_000))                  # oid 2
    ev = eng.client(amend(1, cid=2, price=650_000, req=7))
    assert_events(ev, [
        AMENDED(1, 1, 650_000, 10, cid=2, req=7),
        TRADE(1, 1, SIDE_BUY, 650_000, 4, 6, 2, 2, 0, trade_id=1, cid=2, req=7),
    ])
    assert eng.bids() == [(650_000, [(1, 1, 6)])]
    assert eng.balance(1) == D - taker_fee(650_000, 4)     # the amended order took: taker fee


def test_amend_that_fills_completely_frees_the_order(eng):
    eng.client(buy(1, 4, 649_000, cid=2), sell(2, 4, 650_000))
    ev = eng.client(amend(1, cid=2, price=650_000))
    assert [e["etype"] for e in body(ev)] == [EV_AMENDED, EV_TRADE]
    assert eng.bids() == [] and eng.asks() == [] and eng.open_orders(1) == []
    # the cid is free again
    assert pick(eng.client(buy(1, 1, 640_000, cid=2)), EV_ACK)[0]["status"] == STATUS_OPEN


def test_amend_post_only_to_a_crossing_price_is_rejected(eng):
    eng.client(buy(1, 10, 649_000, tif=TIF_POST_ONLY, cid=2), sell(2, 4, 650_000))
    before = eng.digest()
    ev = eng.client(amend(1, cid=2, price=650_000))
    assert_events(ev, [REJECT(1, "post_only_would_take", cid=2)])
    assert eng.digest() == before
    ev = eng.client(amend(1, cid=2, price=649_900))      # not crossing: fine
    assert_events(ev, [AMENDED(1, 1, 649_900, 10, cid=2)])


def test_amend_of_another_accounts_order_is_unknown(eng):
    eng.client(sell(1, 10, 650_000, cid=4))
    before = eng.digest()
    assert_events(eng.client(amend(2, oid=1, qty=5)), [REJECT(2, "unknown_order", oid=1)])
    assert_events(eng.client(amend(2, cid=4, qty=5)), [REJECT(2, "unknown_order", cid=4)])
    assert eng.digest() == before


@pytest.mark.parametrize("fields, reason", [
    (dict(), "invalid_message"),                          # neither price nor qty
    (dict(qty=MAX_ORDER + 1), "invalid_qty"),
    (dict(qty=-1), "invalid_qty"),
    (dict(price=-5), "invalid_price"),
    (dict(price=MAX_PRICE + 1), "invalid_price"),
    (dict(price=MARK + BAND_DEV + 1), "price_band"),
    (dict(price=MARK - BAND_DEV - 1), "price_band"),
])
def test_amend_validation(eng, fields, reason):
    eng.client(sell(1, 10, 650_000, cid=4))
    before = eng.digest()
    assert reason_name(the_reject(eng.client(amend(1, oid=1, **fields)))) == reason
    assert eng.digest() == before


def test_amend_reduce_only_beyond_the_position_is_rejected(eng):
    _long(eng, 1, 10)
    eng.client(sell(1, 5, 660_000, reduce_only=True, cid=1))
    assert reason_name(the_reject(eng.client(amend(1, cid=1, qty=11)))) == "reduce_only_violation"
    assert_events(eng.client(amend(1, cid=1, qty=10)),
                  [AMENDED(1, 3, 660_000, 10, side=SIDE_SELL, cid=1)])


def test_amend_qty_up_needs_margin(eng):
    eng.admin(deposit(5, margin_required(10)))
    eng.client(buy(5, 10, 640_000, cid=1))
    assert reason_name(the_reject(eng.client(amend(5, cid=1, qty=11)))) == "insufficient_margin"
    assert_events(eng.client(amend(5, cid=1, qty=9)), [AMENDED(5, 1, 640_000, 9, cid=1)])


# ---- cancel ---------------------------------------------------------------------------------
def test_cancel_by_oid(eng):
    eng.client(sell(1, 10, 650_000, cid=4), buy(2, 3, 650_000))
    ev = eng.client(cancel(1, oid=1, req=12))
    assert_events(ev, [CANCELED(1, 1, "user", 7, 650_000, side=SIDE_SELL, cid=4, req=12)])
    assert eng.asks() == [] and eng.position_full(1) == (-3, -3 * 650_000 * ATPL, 0, 0, 0)
    # a second cancel finds nothing
    assert_events(eng.client(cancel(1, oid=1)), [REJECT(1, "unknown_order", oid=1)])


def test_cancel_by_cid(eng):
    eng.client(buy(1, 10, 649_000, cid=44), buy(1, 10, 649_000, cid=45))
    ev = eng.client(cancel(1, cid=45))
    assert_events(ev, [CANCELED(1, 2, "user", 10, 649_000, cid=45)])
    assert eng.bids() == [(649_000, [(1, 1, 10)])]


def test_cancel_of_another_accounts_order_is_unknown_and_the_order_stays(eng):
    eng.client(buy(1, 10, 649_000, cid=7))
    before = eng.digest()
    assert_events(eng.client(cancel(2, oid=1)), [REJECT(2, "unknown_order", oid=1)])
    assert_events(eng.client(cancel(2, cid=7)), [REJECT(2, "unknown_order", cid=7)])
    assert eng.digest() == before
    assert eng.bids() == [(649_000, [(1, 1, 10)])]
    # the same cid in another account is another order: each account cancels its own
    eng.client(buy(2, 5, 648_000, cid=7))
    assert_events(eng.client(cancel(2, cid=7)), [CANCELED(2, 2, "user", 5, 648_000, cid=7)])
    assert eng.bids() == [(649_000, [(1, 1, 10)])]


def test_cancel_all_one_market_and_all_markets(eng):
    eng.admin(market_commands(ETH, mark=30_000, atpl=10))
    eng.client(buy(1, 1, 649_000, cid=1),              # oid 1, BTC
               sell(1, 1, 31_000, market=ETH, cid=2),  # oid 2, ETH
               sell(1, 2, 651_000, cid=3),             # oid 3, BTC
               buy(2, 1, 649_500))                     # oid 4, someone else's
    ev = eng.client(cancel_all(1, BTC, req=3))
    assert_events(ev, [
        CANCELED(1, 1, "user", 1, 649_000, cid=1, req=3),
        CANCELED(1, 3, "user", 2, 651_000, side=SIDE_SELL, cid=3, req=3),
        DONE(1, 2, market=BTC, req=3),
    ])
    ev = eng.client(cancel_all(1, req=4))
    assert_events(ev, [CANCELED(1, 2, "user", 1, 31_000, side=SIDE_SELL, cid=2, market=ETH,
                                req=4),
                       DONE(1, 1, market=-1, req=4)])
    assert_events(eng.client(cancel_all(1)), [DONE(1, 0, market=-1)])
    assert eng.bids() == [(649_500, [(4, 2, 1)])]
    assert_events(eng.client(cancel_all(1, 3)), [REJECT(1, "unknown_market", market=3)])


# ---- client order ids -----------------------------------------------------------------------
def test_duplicate_open_cid_is_rejected_and_reusable_once_gone(eng):
    eng.client(buy(1, 10, 649_000, cid=99))
    before = eng.digest()
    ev = eng.client(sell(1, 1, 660_000, cid=99, req=2))
    assert_events(ev, [REJECT(1, "duplicate_cid", side=SIDE_SELL, cid=99, req=2)])
    # an IOC with an open order's cid is a duplicate too
    assert reason_name(the_reject(eng.client(sell(1, 1, 640_000, cid=99, tif=TIF_IOC)))) \
        == "duplicate_cid"
    assert eng.digest() == before
    eng.client(cancel(1, cid=99))
    ev = eng.client(sell(1, 1, 660_000, cid=99))
    assert_events(ev, [ACK(1, 2, STATUS_OPEN, 1, 660_000, side=SIDE_SELL, cid=99, remaining=1)])
    # once filled, the cid is free again too
    eng.client(buy(2, 1, 660_000))
    ev = eng.client(sell(1, 1, 661_000, cid=99))
    assert pick(ev, EV_ACK)[0]["status"] == STATUS_OPEN


def test_cid_of_an_ioc_order_is_never_held(eng):
    eng.client(buy(1, 1, 649_000, cid=5, tif=TIF_IOC))
    assert pick(eng.client(buy(1, 1, 649_000, cid=5)), EV_ACK)[0]["status"] == STATUS_OPEN


# ---- validation -----------------------------------------------------------------------------
def test_price_band_is_inclusive(eng):
    ev = eng.client(buy(1, 1, MARK + BAND_DEV), sell(2, 1, MARK - BAND_DEV))
    # a buy at 715,000 rests, a sell at 585,000 takes it (at the maker's price)
    assert [e["etype"] for e in body(ev)] == [EV_ACK, EV_ACK, EV_TRADE]
    assert pick(ev, EV_TRADE)[0]["price_ticks"] == MARK + BAND_DEV
    assert_events(eng.client(buy(1, 1, MARK + BAND_DEV + 1, cid=3)),
                  [REJECT(1, "price_band", cid=3)])
    assert_events(eng.client(sell(1, 1, MARK - BAND_DEV - 1)),
                  [REJECT(1, "price_band", side=SIDE_SELL)])


@pytest.mark.parametrize("price, qty, reason", [
    (0, 1, "invalid_price"), (-1, 1, "invalid_price"), (MAX_PRICE + 1, 1, "invalid_price"),
    (MARK, 0, "invalid_qty"), (MARK, -3, "invalid_qty"), (MARK, MAX_ORDER + 1, "invalid_qty"),
    (0, 0, "invalid_qty"),    # quantity is checked first
])
def test_off_limits_price_and_qty(eng, price, qty, reason):
    before = eng.digest()
    ev = eng.client(buy(1, qty, price, cid=1))
    assert reason_name(the_reject(ev)) == reason
    assert eng.digest() == before


def test_market_order_ignores_the_price_field(eng):
    eng.client(sell(2, 1, 650_000))
    ev = eng.client(order(1, SIDE_BUY, 1, -77, kind=KIND_MARKET))
    assert_events(ev, [ACK(1, 2, STATUS_FILLED, 1, 0, kind=KIND_MARKET),
                       TRADE(1, 2, SIDE_BUY, 650_000, 1, 0, 2, 1, 0, trade_id=1)])


@pytest.mark.parametrize("market", [2, 3, -1, 4, 100, -32768, 32767])
def test_unknown_market(eng, market):
    before = eng.digest()
    ev = eng.client(buy(1, 1, MARK, market=market))
    assert_events(ev, [REJECT(1, "unknown_market", market=market)])
    assert eng.digest() == before


def test_market_without_limits_does_not_trade(eng):
    eng.admin(create_market(ETH, mark=30_000))
    assert reason_name(the_reject(eng.client(buy(1, 1, 30_000, market=ETH)))) == "market_halted"
    eng.admin(set_limits(ETH))
    assert pick(eng.client(buy(1, 1, 30_000, market=ETH)), EV_ACK)


def test_halted_market_rejects_orders_and_amends_but_cancels_work(eng):
    eng.client(buy(1, 5, 649_000, cid=1), buy(1, 5, 648_000, cid=2), sell(2, 5, 651_000))
    assert_events(eng.admin(halt()), [DONE(0, 0)])
    before = eng.digest()
    assert_events(eng.client(sell(3, 1, 649_000)),
                  [REJECT(3, "market_halted", side=SIDE_SELL)])
    assert_events(eng.client(market_order(3, SIDE_BUY, 1)),
                  [REJECT(3, "market_halted", kind=KIND_MARKET)])
    assert_events(eng.client(amend(1, cid=1, qty=2)), [REJECT(1, "market_halted", cid=1)])
    assert eng.digest() == before
    assert_events(eng.client(cancel(1, cid=1)), [CANCELED(1, 1, "user", 5, 649_000, cid=1)])
    assert_events(eng.client(cancel_all(2)),
                  [CANCELED(2, 3, "user", 5, 651_000, side=SIDE_SELL), DONE(2, 1, market=-1)])
    assert_events(eng.admin(resume()), [DONE(0, 0)])
    assert_events(eng.client(amend(1, cid=2, qty=2)), [AMENDED(1, 2, 648_000, 2, cid=2)])
    assert pick(eng.client(sell(3, 1, 648_000)), EV_ACK)[0]["status"] == STATUS_FILLED


def test_halt_of_unknown_market(eng):
    assert_events(eng.admin(halt(3)), [REJECT(0, "unknown_market", market=3)])


def test_too_many_open_orders_per_market(eng):
    for k in range(MAX_OPEN_ORDERS - 1):
        eng.client(buy(1, 1, 640_000 - k, cid=k))
    eng.client(sell(1, 1, 660_000, tif=TIF_POST_ONLY, cid=100))   # post-only counts too
    before = eng.digest()
    assert_events(eng.client(buy(1, 1, 640_000, cid=200)),
                  [REJECT(1, "too_many_orders", cid=200)])
    assert_events(eng.client(sell(1, 1, 660_000, tif=TIF_POST_ONLY, cid=201)),
                  [REJECT(1, "too_many_orders", side=SIDE_SELL, cid=201)])
    assert eng.digest() == before
    # an IOC never rests, so it is not limited; nor is another account
    assert pick(eng.client(buy(1, 1, 640_000, tif=TIF_IOC, cid=300)), EV_ACK)
    assert pick(eng.client(buy(2, 1, 640_000, cid=1)), EV_ACK)[0]["status"] == STATUS_OPEN
    eng.client(cancel(1, cid=0))
    assert pick(eng.client(buy(1, 1, 640_000, cid=200)), EV_ACK)[0]["status"] == STATUS_OPEN


def test_too_many_orders_in_the_engine_and_levels_per_side():
    cfg = EngineConfig(max_accounts=8, max_markets=2, max_orders=4, max_levels_per_side=2)
    eng = btc_engines((1, D), (2, D), config=cfg)
    eng.client(buy(1, 1, 640_000, cid=1), buy(1, 1, 640_100, cid=2))
    # a third bid price level is refused; another order on an existing level is fine
    assert reason_name(the_reject(eng.client(buy(1, 1, 640_200, cid=3)))) == "too_many_orders"
    eng.client(buy(2, 1, 640_000, cid=1), sell(2, 1, 660_000, cid=2))
    assert eng.counters()["next_oid"] == 5
    # the engine holds 4 orders: full
    assert reason_name(the_reject(eng.client(sell(1, 1, 660_000, cid=3)))) == "too_many_orders"
    # an amend to a new price level when the side is full
    assert reason_name(the_reject(eng.client(amend(1, oid=1, price=639_000)))) \
        == "too_many_orders"
    # an IOC still trades: it needs no order slot
    ev = eng.client(sell(2, 1, 640_100, tif=TIF_IOC, cid=3))
    assert pick(ev, EV_ACK)[0]["status"] == STATUS_FILLED


# ---- margin and collateral ------------------------------------------------------------------
def test_initial_margin_boundary_is_exact(eng):
    need = margin_required(10)                   # 10 lots x 650000 x 100 / 50 = 13,000,000
    assert need == 13_000_000
    eng.admin(deposit(5, need), deposit(6, need - 1))
    # equity == requirement passes (the rule is equity - required < 0 fails)
    assert_events(eng.client(buy(5, 10, 640_000, cid=1)),
                  [ACK(5, 1, STATUS_OPEN, 10, 640_000, remaining=10, cid=1)])
    assert_events(eng.client(buy(5, 1, 640_000, cid=2)),
                  [REJECT(5, "insufficient_margin", cid=2)])
    # one atom short: 10 lots fail, 9 pass
    assert_events(eng.client(buy(6, 10, 640_000)), [REJECT(6, "insufficient_margin")])
    assert pick(eng.client(buy(6, 9, 640_000)), EV_ACK)[0]["status"] == STATUS_OPEN
    # the requirement is on the larger side of the book: a sell up to 10 lots adds nothing
    assert pick(eng.client(sell(5, 10, 660_000, cid=3)), EV_ACK)[0]["status"] == STATUS_OPEN
    assert_events(eng.client(sell(5, 1, 660_000, cid=4)),
                  [REJECT(5, "insufficient_margin", side=SIDE_SELL, cid=4)])


def test_initial_margin_rounds_up():
    eng = Engines()
    eng.admin(market_commands(BTC, leverage=3))
    need = margin_required(1, leverage=3)       # 65,000,000 / 3 = 21,666,666.67
    assert need == 21_666_667
    eng.admin(deposit(1, need), deposit(2, need - 1))
    assert pick(eng.client(buy(1, 1, 640_000)), EV_ACK)
    assert reason_name(the_reject(eng.client(buy(2, 1, 640_000)))) == "insufficient_margin"


def test_margin_uses_the_mark_and_unrealized_pnl(eng):
    eng.admin(deposit(5, margin_required(10)))
    eng.client(buy(5, 10, 640_000))
    eng.client(cancel(5, oid=1))
    eng.admin(set_mark(600_000))                # requirement falls with the mark
    # but a bid above the mark also needs its loss against the mark (Binance's open loss):
    # 10 lots x 40,000 ticks x 100 atoms
    assert reason_name(the_reject(eng.client(buy(5, 10, 640_000, cid=1)))) \
        == "insufficient_margin"
    assert pick(eng.client(buy(5, 10, 600_000, cid=1)), EV_ACK)
    # 10 lots at 600,000 need 12,000,000: 1,000,000 spare = 0.83 lot
    assert reason_name(the_reject(eng.client(buy(5, 1, 600_000, cid=2)))) \
        == "insufficient_margin"


def test_position_limit_binds_as_insufficient_margin():
    eng = Engines()
    eng.admin(market_commands(BTC, max_position=20, max_order=15), deposit(1, D), deposit(2, D))
    eng.client(buy(1, 15, 640_000, cid=1))
    ev = eng.client(buy(1, 6, 640_000, cid=2))
    assert the_reject(ev)["reason"] == REASON_POSITION_LIMIT
    assert reason_name(the_reject(ev)) == "insufficient_margin"
    assert pick(eng.client(buy(1, 5, 640_000, cid=2)), EV_ACK)
    eng.client(sell(2, 15, 640_000), sell(2, 5, 640_000))
    assert eng.position(1)[0] == 20
    # long 20 with 30 lots of plain sells open: exposure max(|20|, |20 - 30|) = 20
    eng.client(sell(1, 15, 660_000, cid=3), sell(1, 15, 662_000, cid=4))
    # reduce-only orders are bound by the position limit too: |20 - 45| = 25 > 20
    ev = eng.client(sell(1, 15, 661_000, reduce_only=True, cid=5))
    assert the_reject(ev)["reason"] == REASON_POSITION_LIMIT
    assert pick(eng.client(sell(1, 10, 661_000, reduce_only=True, cid=5)), EV_ACK)
    assert eng.position_full(1)[2:] == (0, 40, 3)


def test_withdraw(eng):
    eng.admin(deposit(5, 20 * USDC))
    assert_events(eng.client(withdraw(5, 20 * USDC + 1, req=2)),
                  [REJECT(5, "insufficient_balance", req=2)])
    eng.client(buy(5, 10, 640_000))                         # needs 13 USDC
    assert_events(eng.client(withdraw(5, 7 * USDC + 1)), [REJECT(5, "insufficient_margin")])
    net_before = eng.counters()["net_deposits"]
    assert_events(eng.client(withdraw(5, 7 * USDC, req=3)),
                  [BALANCE(5, -7 * USDC, 13 * USDC, req=3), DONE(5, req=3)])
    assert eng.counters()["net_deposits"] == net_before - 7 * USDC
    for bad in (0, -1):
        assert reason_name(the_reject(eng.client(withdraw(5, bad)))) == "invalid_message"
    assert the_reject(eng.client(withdraw(16, 1)))["reason"] == REASON_UNKNOWN_ACCOUNT


def test_withdraw_counts_unrealized_losses(eng):
    eng.admin(deposit(5, 20 * USDC))
    eng.client(sell(1, 10, MARK), buy(5, 10, MARK, tif=TIF_IOC))
    fee5 = taker_fee(MARK, 10)
    eng.admin(set_mark(MARK - 1000))            # -100,000 atoms per lot: -1 USDC on 10 lots
    equity = 20 * USDC - fee5 - 10 * 1000 * ATPL
    room = equity - margin_required(10, MARK - 1000)
    assert reason_name(the_reject(eng.client(withdraw(5, room + 1)))) == "insufficient_margin"
    assert_events(eng.client(withdraw(5, room)),
                  [BALANCE(5, -room, 20 * USDC - fee5 - room), DONE(5)])


def test_deposit_events_and_limits(eng):
    assert_events(eng.admin(deposit(7, 5 * USDC, req=9)),
                  [BALANCE(7, 5 * USDC, 5 * USDC, req=9), DONE(7, req=9)])
    assert_events(eng.admin(deposit(7, 1)), [BALANCE(7, 1, 5 * USDC + 1), DONE(7)])
    for bad in (0, -5):
        assert reason_name(the_reject(eng.admin(deposit(7, bad)))) == "invalid_message"
    assert reason_name(the_reject(eng.admin(deposit(16, 1)))) == "forbidden"
    assert reason_name(the_reject(eng.admin(deposit(-1, 1)))) == "forbidden"


@pytest.mark.parametrize("make", [
    lambda: create_market(2), lambda: set_limits(BTC), lambda: deposit(1, 5),
    lambda: set_mark(600_000), lambda: halt(BTC), lambda: resume(BTC),
])
def test_privileged_commands_from_a_client_are_forbidden(eng, make):
    before = eng.digest()
    ev = eng.client(make())
    assert reason_name(the_reject(ev)) == "forbidden"
    assert eng.digest() == before


def test_set_mark(eng):
    assert_events(eng.admin(set_mark(700_000, req=5)), [MARK_EV(700_000, req=5)])
    assert reason_name(the_reject(eng.admin(set_mark(0)))) == "invalid_price"
    assert reason_name(the_reject(eng.admin(set_mark(MAX_PRICE + 1)))) == "invalid_price"
    assert reason_name(the_reject(eng.admin(set_mark(5, market=3)))) == "unknown_market"


# ---- positions, PnL, fees -------------------------------------------------------------------
def test_open_add_partial_close_and_flip_exact_money(eng):
    """Account 1 trades against 2; both positions, balances and realized PnL to the atom."""
    p1, p2 = PyPosition(), PyPosition()
    bal = {1: D, 2: D}
    fees = 0

    def trade(maker, taker, maker_side, qty, price):
        nonlocal fees
        side_fn = buy if maker_side == SIDE_BUY else sell
        other_fn = sell if maker_side == SIDE_BUY else buy
        eng.client(side_fn(maker, qty, price))
        ev = eng.client(other_fn(taker, qty, price, tif=TIF_IOC))
        t = pick(ev, EV_TRADE)
        assert len(t) == 1 and t[0]["qty_lots"] == qty and t[0]["price_ticks"] == price
        mf, tf = maker_fee(price, qty), taker_fee(price, qty)
        assert (t[0]["fee_atoms"], t[0]["maker_fee_atoms"]) == (tf, mf)
        pos = {1: p1, 2: p2}
        d = qty if maker_side == SIDE_BUY else -qty
        bal[maker] += pos[maker].fill(d, price) - mf
        bal[taker] += pos[taker].fill(-d, price) - tf
        fees += mf + tf
        assert eng.position(1) == (p1.size, p1.cost)
        assert eng.position(2) == (p2.size, p2.cost)
        assert eng.balance(1) == bal[1] and eng.balance(2) == bal[2]
        assert eng.counters()["fees"] == fees

    trade(1, 2, SIDE_BUY, 10, 650_000)          # 1 opens long 10 as maker (rebate)
    assert eng.position(1) == (10, 650_000_000)
    assert eng.balance(1) == D + 65_000         # rebate 0.01% of 650 USDC
    assert eng.balance(2) == D - 325_000
    trade(2, 1, SIDE_SELL, 5, 652_000)          # 1 adds 5 as taker
    assert eng.position(1) == (15, 650_000_000 + 326_000_000)
    trade(2, 1, SIDE_BUY, 6, 660_000)           # 1 sells 6 as taker: partial close
    # closing 6 of 15 takes floor(976,000,000 x 6 / 15) = 390,400,000 of the cost basis;
    # realized = 6 x 660,000 x 100 - 390,400,000 = 5,600,000
    assert eng.position(1) == (9, 976_000_000 - 390_400_000)
    trade(1, 2, SIDE_SELL, 7, 661_000)          # a 7-lot partial close: the share truncates
    trade(2, 1, SIDE_BUY, 20, 640_000)          # 1 sells 20 while long 2: flips to short 18
    assert eng.position(1) == (-18, -18 * 640_000 * ATPL)
    trade(1, 2, SIDE_BUY, 18, 641_111)          # 1 buys back: flat
    assert eng.position(1) == (0, 0) and eng.position(2) == (0, 0)
    # flat: all money is in balances and fees
    assert eng.balance(1) + eng.balance(2) + eng.counters()["fees"] == 2 * D


def test_cost_basis_truncation_keeps_collateral_exact(eng):
    # three buys at different prices, then sell in awkward pieces: cost shares truncate,
    # the truncated atoms stay in the remaining position, collateral stays exact
    for price in (650_001, 650_007, 650_014):
        eng.client(sell(2, 1, price), buy(1, 1, price, tif=TIF_IOC))
    cost = (650_001 + 650_007 + 650_014) * ATPL
    assert cost % 3 != 0
    assert eng.position(1) == (3, cost)
    eng.client(buy(3, 1, 650_000), sell(1, 1, 650_000, tif=TIF_IOC))
    # the closing lot takes floor(cost / 3) of the basis
    assert eng.position(1) == (2, cost - cost // 3)
    eng.admin(set_mark(655_555))
    total, net = eng.collateral()
    assert total == net == 4 * D


def test_collateral_identity_through_deposits_withdrawals_and_marks(eng):
    eng.client(sell(1, 7, 651_000), buy(2, 5, 652_000), buy(3, 2, 651_000, tif=TIF_IOC))
    eng.admin(set_mark(700_001))
    eng.client(withdraw(2, 123_456), withdraw(1, 1))
    eng.admin(deposit(9, 77))
    total, net = eng.collateral()
    assert net == 4 * D + 77 - 123_457 == total
    # unrealized PnL at the mark: account 1 short 7 from 651,000
    st = eng.st
    assert int(st.positions[1, BTC]["size_lots"]) * 700_001 * ATPL \
        - int(st.positions[1, BTC]["cost_atoms"]) == -7 * (700_001 - 651_000) * ATPL


def test_disabled_account_places_amends_withdraws_nothing_but_cancels_and_trades(eng):
    """CMD_SET_ACCOUNT_STATE (operator): a disabled account's new orders, amends, withdrawals
    and margin changes are `account_disabled`; its cancels work and its resting orders still
    trade; enabled again it is as before."""
    def account_state(account, disabled):
        return command(cmd=CMD_SET_ACCOUNT_STATE, account=account, qty_lots=disabled)

    eng.client(buy(1, 5, 649_000, cid=1), buy(1, 5, 648_000, cid=2))
    assert_events(eng.admin(account_state(1, 1)), [DONE(1, 0, market=0)])
    before = eng.digest()
    assert_events(eng.client(buy(1, 1, 649_000, cid=3)), [REJECT(1, "account_disabled", cid=3)])
    assert_events(eng.client(amend(1, cid=1, qty=2)), [REJECT(1, "account_disabled", cid=1)])
    assert reason_name(the_reject(eng.client(withdraw(1, USDC)))) == "account_disabled"
    assert reason_name(the_reject(eng.client(set_margin(1, 0, 5)))) == "account_disabled"
    assert eng.digest() == before
    assert pick(eng.client(sell(2, 5, 649_000)), EV_TRADE)      # its resting order trades
    assert_events(eng.client(cancel(1, cid=2)), [CANCELED(1, 2, "user", 5, 648_000, cid=2)])
    # only the operator's ring may send it; values other than 0 and 1 are refused
    assert reason_name(the_reject(eng.client(account_state(1, 0)))) == "forbidden"
    assert reason_name(the_reject(eng.admin(account_state(1, 2)))) == "invalid_message"
    assert_events(eng.admin(account_state(1, 0)), [DONE(1, 0, market=0)])
    assert pick(eng.client(buy(1, 1, 649_000, cid=4)), EV_ACK)
