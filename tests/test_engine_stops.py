"""Stop and take-profit orders: the trigger book.

Every scenario runs through the reference model and the compiled matcher at once
(tests/engine_helpers.py): identical events, equal states, the invariants after each step.
Each test states the exact events it expects.
"""

import pytest

from engine.records import (
    EV_TRIGGERED, FLAG_REDUCE_ONLY, FLAG_TRIGGER_BY_LAST, KIND_LIMIT, KIND_STOP_LIMIT,
    KIND_STOP_MARKET, KIND_TAKE_PROFIT_LIMIT, KIND_TAKE_PROFIT_MARKET, SIDE_BUY, SIDE_SELL,
    STATUS_CANCELED, STATUS_FILLED, STATUS_OPEN, STATUS_UNTRIGGERED, TIF_GTC, TIF_IOC,
    TIF_FOK, TIF_POST_ONLY,
)
from engine.config import EngineConfig
from tests.engine_helpers import (
    ACK, AMENDED, BAND_DEV, CANCELED, DONE, MARK, MARK_EV, MAX_OPEN_ORDERS, MAX_PRICE, REJECT, TRADE,
    USDC, amend, assert_events, btc_engines, buy, cancel, cancel_all, expected, halt, order,
    resume, sell, set_mark, warm_up,
)

D = 10_000 * USDC
UP = 652_000          # a trigger above the mark (650 000)
DOWN = 648_000        # a trigger below it


@pytest.fixture(scope="session", autouse=True)
def _compiled():
    warm_up()


@pytest.fixture
def eng():
    return btc_engines((1, D), (2, D), (3, D), (4, D), (5, D))


def conditional(account, side, qty, trigger, price=0, *, kind=KIND_STOP_MARKET, by_last=False,
                reduce_only=False, tif=TIF_GTC, cid=0, req=0):
    c = order(account, side, qty, price, kind=kind, tif=tif, cid=cid, req=req,
              flags=(FLAG_REDUCE_ONLY if reduce_only else 0)
              | (FLAG_TRIGGER_BY_LAST if by_last else 0))
    c["amount_atoms"] = trigger
    return c


def TRIGGERED(account, oid, status, qty, price=0, *, side, kind, cid=0, remaining=0, req=0):
    return expected(EV_TRIGGERED, market=0, account=account, req=req, status=status, side=side,
                    kind=kind, oid=oid, cid=cid, price_ticks=price, qty_lots=qty,
                    remaining_lots=remaining)


def UNTRIGGERED_ACK(account, oid, qty, price=0, *, side, kind, cid=0, req=0):
    return ACK(account, oid, STATUS_UNTRIGGERED, qty, price, side=side, kind=kind, cid=cid,
               remaining=qty, req=req)


def rises(kind, side):
    return (kind in (KIND_STOP_MARKET, KIND_STOP_LIMIT)) == (side == SIDE_BUY)


# ---- each kind x side x trigger price ---------------------------------------------------------
KINDS = [KIND_STOP_MARKET, KIND_STOP_LIMIT, KIND_TAKE_PROFIT_MARKET, KIND_TAKE_PROFIT_LIMIT]


@pytest.mark.parametrize("by_last", [False, True], ids=["mark", "last"])
@pytest.mark.parametrize("side", [SIDE_BUY, SIDE_SELL], ids=["buy", "sell"])
@pytest.mark.parametrize("kind", KINDS, ids=["stop_market", "stop_limit", "take_profit_market",
                                             "take_profit_limit"])
def test_each_kind_fires_when_its_price_reaches_the_trigger(eng, kind, side, by_last):
    """Buy stops and sell take-profits fire on a rise to the trigger, sell stops and buy
    take-profits on a fall. 5 lots meet 3 lots of liquidity: a market kind cancels the rest
    (ioc), a limit kind rests it at its price."""
    up = rises(kind, side)
    trigger = UP if up else DOWN
    # liquidity for the fired order, on the far side of the trigger's own trade
    liquidity = {(SIDE_BUY, True): 652_500, (SIDE_BUY, False): 649_000,
                 (SIDE_SELL, True): 651_000, (SIDE_SELL, False): 647_500}[(side, up)]
    market_kind = kind in (KIND_STOP_MARKET, KIND_TAKE_PROFIT_MARKET)
    price = 0 if market_kind else liquidity
    eng.client(order(2, 1 - side, 3, liquidity, cid=20))                                 # oid 1
    ev = eng.client(conditional(1, side, 5, trigger, price, kind=kind, by_last=by_last, cid=10,
                                req=7))
    assert_events(ev, [UNTRIGGERED_ACK(1, 2, 5, price, side=side, kind=kind, cid=10, req=7)])
    assert eng.open_orders(1) == [(2, 10, price, 5)]
    assert eng.position_full(1) == (0, 0, 0, 0, 1)      # counted as open, no margin held

    if by_last:
        # account 3 rests 1 lot at the trigger, account 4 takes it: the last price is there
        taker_side = SIDE_BUY if up else SIDE_SELL
        eng.client(order(3, 1 - taker_side, 1, trigger))                             # oid 3
        ev = eng.client(order(4, taker_side, 1, trigger, req=44))                    # oid 4
        head = [ACK(4, 4, STATUS_FILLED, 1, trigger, side=taker_side, req=44),
                TRADE(4, 4, taker_side, trigger, 1, 0, 3, 3, 0, trade_id=1, req=44)]
        trade_id = 2
    else:
        ev = eng.admin(set_mark(trigger + (-1_000 if up else 1_000)))
        assert_events(ev, [MARK_EV(trigger + (-1_000 if up else 1_000))])   # not there yet
        ev = eng.admin(set_mark(trigger))
        head = [MARK_EV(trigger)]
        trade_id = 1
    fill = TRADE(1, 2, side, liquidity, 3, 2, 2, 1, 0, trade_id=trade_id, cid=10, maker_cid=20)
    if market_kind:
        tail = [TRIGGERED(1, 2, STATUS_CANCELED, 5, side=side, kind=kind, cid=10), fill,
                CANCELED(1, 2, "ioc", 2, side=side, kind=kind, cid=10)]
    else:
        tail = [TRIGGERED(1, 2, STATUS_OPEN, 5, price, side=side, kind=kind, cid=10,
                          remaining=2), fill]
    assert_events(ev, head + tail)
    assert eng.position(1)[0] == (3 if side == SIDE_BUY else -3)
    assert eng.open_orders(1) == ([] if market_kind else [(2, 10, price, 2)])


@pytest.mark.parametrize("kind, side, trigger", [
    (KIND_STOP_MARKET, SIDE_BUY, MARK), (KIND_STOP_MARKET, SIDE_BUY, MARK - 1),
    (KIND_STOP_LIMIT, SIDE_SELL, MARK), (KIND_TAKE_PROFIT_MARKET, SIDE_BUY, MARK + 5),
    (KIND_TAKE_PROFIT_LIMIT, SIDE_SELL, MARK),
])
def test_a_trigger_the_price_already_reached_is_rejected(eng, kind, side, trigger):
    """Binance's "order would immediately trigger", as invalid_price."""
    before = eng.digest()
    ev = eng.client(conditional(1, side, 1, trigger, MARK, kind=kind, cid=3))
    assert_events(ev, [REJECT(1, "invalid_price", side=side, kind=kind, cid=3)])
    assert eng.digest() == before


def test_last_price_triggers_wait_for_a_first_trade(eng):
    """Before any trade there is no last price: nothing is rejected as immediate, nothing
    fires; the first trade is compared with every trigger."""
    ev = eng.client(conditional(1, SIDE_SELL, 1, DOWN, by_last=True, cid=1),
                    conditional(2, SIDE_BUY, 1, UP, by_last=True, cid=2))
    assert [e["status"] for e in ev if e["etype"] == 2] == [STATUS_UNTRIGGERED] * 2
    eng.client(sell(3, 1, 647_000))                                                    # oid 3
    ev = eng.client(buy(4, 1, 647_000))                                                # oid 4
    # last = 647 000 <= 648 000: the sell stop fires (no bids: canceled); the buy stop waits
    assert_events(ev, [
        ACK(4, 4, STATUS_FILLED, 1, 647_000),
        TRADE(4, 4, SIDE_BUY, 647_000, 1, 0, 3, 3, 0, trade_id=1),
        TRIGGERED(1, 1, STATUS_CANCELED, 1, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=1),
        CANCELED(1, 1, "ioc", 1, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=1),
    ])
    assert eng.open_orders(2) == [(2, 2, 0, 1)]


# ---- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("fields, reason", [
    (dict(trigger=0), "invalid_price"),
    (dict(trigger=-1), "invalid_price"),
    (dict(trigger=MAX_PRICE + 1), "invalid_price"),
    (dict(trigger=2 ** 63 - 1), "invalid_price"),
    (dict(trigger=-2 ** 63), "invalid_price"),
    (dict(kind=KIND_STOP_LIMIT, price=0), "invalid_price"),
    (dict(kind=KIND_STOP_LIMIT, price=MAX_PRICE + 1), "invalid_price"),
    (dict(tif=TIF_POST_ONLY), "invalid_message"),        # a stop market may not be post-only
    (dict(kind=KIND_TAKE_PROFIT_MARKET, tif=TIF_POST_ONLY), "invalid_message"),
    (dict(qty=0), "invalid_qty"),
])
def test_conditional_orders_are_validated_at_placement(eng, fields, reason):
    before = eng.digest()
    kind = fields.get("kind", KIND_STOP_MARKET)
    ev = eng.client(conditional(1, SIDE_BUY, fields.get("qty", 1), fields.get("trigger", UP),
                                fields.get("price", 0), kind=kind,
                                tif=fields.get("tif", TIF_GTC), cid=4))
    assert_events(ev, [REJECT(1, reason, kind=kind, cid=4)])
    assert eng.digest() == before


def test_trigger_by_last_on_a_plain_order_is_invalid(eng):
    ev = eng.client(order(1, SIDE_BUY, 1, MARK, flags=FLAG_TRIGGER_BY_LAST))
    assert_events(ev, [REJECT(1, "invalid_message")])


def test_duplicate_cid_and_open_order_limit_count_untriggered_orders(eng):
    eng.client(conditional(1, SIDE_BUY, 1, UP, cid=9))
    ev = eng.client(buy(1, 1, 640_000, cid=9))
    assert_events(ev, [REJECT(1, "duplicate_cid", cid=9)])
    for k in range(MAX_OPEN_ORDERS - 1):
        eng.client(buy(1, 1, 640_000 - k, cid=100 + k))
    ev = eng.client(conditional(1, SIDE_SELL, 1, DOWN, cid=11))
    assert_events(ev, [REJECT(1, "too_many_orders", side=SIDE_SELL, kind=KIND_STOP_MARKET,
                              cid=11)])
    ev = eng.client(buy(1, 1, 630_000, cid=12))
    assert_events(ev, [REJECT(1, "too_many_orders", cid=12)])


def test_the_trigger_book_of_a_market_is_capped():
    eng = btc_engines((1, D), (2, D), config=EngineConfig(
        max_accounts=16, max_markets=4, max_orders=128, max_levels_per_side=32,
        max_trigger_orders=2))
    eng.client(conditional(1, SIDE_BUY, 1, UP, cid=1), conditional(2, SIDE_SELL, 1, DOWN, cid=2))
    ev = eng.client(conditional(1, SIDE_BUY, 1, UP, cid=3))
    assert_events(ev, [REJECT(1, "too_many_orders", kind=KIND_STOP_MARKET, cid=3)])
    eng.client(cancel(2, cid=2))
    ev = eng.client(conditional(1, SIDE_BUY, 1, UP, cid=3))
    assert_events(ev, [UNTRIGGERED_ACK(1, 3, 1, side=SIDE_BUY, kind=KIND_STOP_MARKET, cid=3)])


# ---- cancel, cancel_all, amend ----------------------------------------------------------------
def test_cancel_by_oid_and_cid_reaches_untriggered_orders(eng):
    eng.client(conditional(1, SIDE_BUY, 4, UP, 653_000, kind=KIND_STOP_LIMIT, cid=1),
               conditional(1, SIDE_SELL, 2, DOWN, cid=2))
    ev = eng.client(cancel(1, oid=1, req=5))
    assert_events(ev, [CANCELED(1, 1, "user", 4, 653_000, kind=KIND_STOP_LIMIT, cid=1, req=5)])
    ev = eng.client(cancel(1, cid=2, req=6))
    assert_events(ev, [CANCELED(1, 2, "user", 2, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=2,
                                req=6)])
    assert eng.open_orders(1) == []
    ev = eng.admin(set_mark(UP))
    assert_events(ev, [MARK_EV(UP)])          # nothing left to fire
    # another account's untriggered order is unknown to it
    eng.client(conditional(1, SIDE_BUY, 1, 660_000, cid=3))
    assert_events(eng.client(cancel(2, oid=3)), [REJECT(2, "unknown_order", oid=3)])


def test_cancel_all_reaches_untriggered_orders(eng):
    eng.client(buy(1, 1, 640_000, cid=1),
               conditional(1, SIDE_SELL, 2, DOWN, cid=2, by_last=True),
               conditional(1, SIDE_BUY, 3, UP, cid=3))
    ev = eng.client(cancel_all(1, req=4))
    assert_events(ev, [
        CANCELED(1, 1, "user", 1, 640_000, cid=1, req=4),
        CANCELED(1, 2, "user", 2, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=2, req=4),
        CANCELED(1, 3, "user", 3, kind=KIND_STOP_MARKET, cid=3, req=4),
        DONE(1, 3, market=-1, req=4),
    ])
    assert eng.position_full(1) == (0, 0, 0, 0, 0)


def test_an_untriggered_order_is_not_amended(eng):
    eng.client(conditional(1, SIDE_BUY, 1, UP, 655_000, kind=KIND_STOP_LIMIT, cid=1))
    before = eng.digest()
    ev = eng.client(amend(1, cid=1, price=656_000))
    assert_events(ev, [REJECT(1, "invalid_message", cid=1)])
    assert eng.digest() == before


# ---- firing ---------------------------------------------------------------------------------
def test_fired_orders_enter_nearest_trigger_first_then_in_placement_order(eng):
    """Three buy stop-limits that rest once fired: mark jumps past all three; they fire in
    trigger order (651 000 twice, by placement, then 651 500) and rest in that order."""
    eng.client(conditional(1, SIDE_BUY, 1, 651_000, 640_000, kind=KIND_STOP_LIMIT, cid=1),
               conditional(2, SIDE_BUY, 2, 651_500, 640_000, kind=KIND_STOP_LIMIT, cid=2),
               conditional(3, SIDE_BUY, 3, 651_000, 640_000, kind=KIND_STOP_LIMIT, cid=3))
    ev = eng.admin(set_mark(652_000))
    assert_events(ev, [
        MARK_EV(652_000),
        TRIGGERED(1, 1, STATUS_OPEN, 1, 640_000, side=SIDE_BUY, kind=KIND_STOP_LIMIT, cid=1,
                  remaining=1),
        TRIGGERED(3, 3, STATUS_OPEN, 3, 640_000, side=SIDE_BUY, kind=KIND_STOP_LIMIT, cid=3,
                  remaining=3),
        TRIGGERED(2, 2, STATUS_OPEN, 2, 640_000, side=SIDE_BUY, kind=KIND_STOP_LIMIT, cid=2,
                  remaining=2),
    ])
    assert eng.bids() == [(640_000, [(1, 1, 1), (3, 3, 3), (2, 2, 2)])]


def test_a_fired_order_takes_its_time_priority_from_its_triggering(eng):
    """Account 5's bid placed after the stop still comes first: the stop joins the level
    only when it fires."""
    eng.client(conditional(1, SIDE_BUY, 2, UP, 640_000, kind=KIND_STOP_LIMIT, cid=1))  # oid 1
    eng.client(buy(5, 2, 640_000, cid=5))                                               # oid 2
    eng.admin(set_mark(UP))
    assert eng.bids() == [(640_000, [(2, 5, 2), (1, 1, 2)])]
    ev = eng.client(sell(3, 3, 640_000))                                                # oid 3
    assert_events(ev, [
        ACK(3, 3, STATUS_FILLED, 3, 640_000, side=SIDE_SELL),
        TRADE(3, 3, SIDE_SELL, 640_000, 2, 1, 5, 2, 0, trade_id=1, maker_cid=5),
        TRADE(3, 3, SIDE_SELL, 640_000, 1, 0, 1, 1, 1, trade_id=2, maker_cid=1),
    ])


def test_a_cascade_fires_within_the_same_command(eng):
    """A by-last sell stop fires, its fill moves the last price down, which fires the next
    (lower) one within the same command; the third (645 000) is not reached and waits."""
    eng.client(buy(2, 1, 648_000, cid=1),       # oid 1: where the first trade happens
               buy(2, 1, 647_000, cid=2),       # oid 2: what stop A sells into
               buy(2, 1, 646_000, cid=3))       # oid 3: what stop B sells into
    eng.client(conditional(3, SIDE_SELL, 1, 648_000, by_last=True, cid=4),   # oid 4: A
               conditional(4, SIDE_SELL, 1, 647_000, by_last=True, cid=5),   # oid 5: B
               conditional(5, SIDE_SELL, 1, 645_000, by_last=True, cid=6))   # oid 6: C, waits
    ev = eng.client(sell(1, 1, 648_000, req=9))                                # oid 7
    assert_events(ev, [
        ACK(1, 7, STATUS_FILLED, 1, 648_000, side=SIDE_SELL, req=9),
        TRADE(1, 7, SIDE_SELL, 648_000, 1, 0, 2, 1, 0, trade_id=1, maker_cid=1, req=9),
        TRIGGERED(3, 4, STATUS_FILLED, 1, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=4),
        TRADE(3, 4, SIDE_SELL, 647_000, 1, 0, 2, 2, 0, trade_id=2, cid=4, maker_cid=2),
        TRIGGERED(4, 5, STATUS_FILLED, 1, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=5),
        TRADE(4, 5, SIDE_SELL, 646_000, 1, 0, 2, 3, 0, trade_id=3, cid=5, maker_cid=3),
    ])
    assert eng.open_orders(5) == [(6, 6, 0, 1)]
    assert eng.position(2)[0] == 3


def test_mark_triggers_fire_before_the_last_price_triggers_their_trades_set_off(eng):
    eng.client(sell(2, 1, 652_500, cid=1))                                             # oid 1
    eng.client(sell(2, 1, 653_000, cid=2))                                             # oid 2
    eng.client(conditional(1, SIDE_BUY, 1, UP, cid=3))                                 # oid 3
    eng.client(conditional(3, SIDE_BUY, 1, 652_500, by_last=True, cid=4))              # oid 4
    ev = eng.admin(set_mark(UP, req=8))
    assert_events(ev, [
        MARK_EV(UP, req=8),
        TRIGGERED(1, 3, STATUS_FILLED, 1, side=SIDE_BUY, kind=KIND_STOP_MARKET, cid=3),
        TRADE(1, 3, SIDE_BUY, 652_500, 1, 0, 2, 1, 0, trade_id=1, cid=3, maker_cid=1),
        TRIGGERED(3, 4, STATUS_FILLED, 1, side=SIDE_BUY, kind=KIND_STOP_MARKET, cid=4),
        TRADE(3, 4, SIDE_BUY, 653_000, 1, 0, 2, 2, 0, trade_id=2, cid=4, maker_cid=2),
    ])


def test_a_halted_market_holds_its_triggers_until_resumed(eng):
    eng.client(sell(2, 1, 652_500, cid=1))
    eng.client(conditional(1, SIDE_BUY, 1, UP, cid=2))
    eng.admin(halt())
    assert_events(eng.admin(set_mark(UP)), [MARK_EV(UP)])
    ev = eng.admin(resume())
    assert_events(ev, [
        DONE(0),
        TRIGGERED(1, 2, STATUS_FILLED, 1, side=SIDE_BUY, kind=KIND_STOP_MARKET, cid=2),
        TRADE(1, 2, SIDE_BUY, 652_500, 1, 0, 2, 1, 0, trade_id=1, cid=2, maker_cid=1),
    ])


# ---- checks at trigger time -----------------------------------------------------------------
def test_reduce_only_stop_is_clipped_to_the_position_when_it_fires(eng):
    eng.client(sell(2, 3, MARK, cid=1))
    eng.client(buy(1, 3, MARK, cid=2))                       # account 1 long 3
    # placed for 10 lots: reduce-only is not checked until the stop fires
    ev = eng.client(conditional(1, SIDE_SELL, 10, DOWN, reduce_only=True, cid=3))     # oid 3
    assert_events(ev, [UNTRIGGERED_ACK(1, 3, 10, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=3)])
    eng.client(buy(4, 5, 647_000, cid=4))                                             # oid 4
    ev = eng.admin(set_mark(DOWN))
    assert_events(ev, [
        MARK_EV(DOWN),
        TRIGGERED(1, 3, STATUS_FILLED, 3, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=3),
        TRADE(1, 3, SIDE_SELL, 647_000, 3, 0, 4, 4, 2, trade_id=2, cid=3, maker_cid=4),
    ])
    assert eng.position(1)[0] == 0


def test_reduce_only_stop_without_a_position_is_canceled_when_it_fires(eng):
    eng.client(conditional(1, SIDE_SELL, 10, DOWN, reduce_only=True, cid=3))          # oid 1
    ev = eng.admin(set_mark(DOWN))
    assert_events(ev, [
        MARK_EV(DOWN),
        TRIGGERED(1, 1, STATUS_CANCELED, 10, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=3),
        CANCELED(1, 1, "reduce_only", 10, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=3),
    ])
    assert eng.position_full(1) == (0, 0, 0, 0, 0)


def test_reduce_only_take_profit_by_last_closes_the_position(eng):
    eng.client(sell(2, 2, MARK, cid=1))
    eng.client(buy(1, 2, MARK, cid=2))                       # account 1 long 2
    eng.client(conditional(1, SIDE_SELL, 2, UP, 651_000, kind=KIND_TAKE_PROFIT_LIMIT,
                           by_last=True, reduce_only=True, cid=3))                     # oid 3
    eng.client(buy(5, 2, 651_000, cid=5))                                             # oid 4
    eng.client(sell(3, 1, UP, cid=6))                                                 # oid 5
    ev = eng.client(buy(4, 1, UP, req=3))                                             # oid 6
    assert_events(ev, [
        ACK(4, 6, STATUS_FILLED, 1, UP, req=3),
        TRADE(4, 6, SIDE_BUY, UP, 1, 0, 3, 5, 0, trade_id=2, maker_cid=6, req=3),
        TRIGGERED(1, 3, STATUS_FILLED, 2, 651_000, side=SIDE_SELL, kind=KIND_TAKE_PROFIT_LIMIT,
                  cid=3),
        TRADE(1, 3, SIDE_SELL, 651_000, 2, 0, 5, 4, 0, trade_id=3, cid=3, maker_cid=5),
    ])
    assert eng.position(1)[0] == 0


def test_margin_is_checked_when_the_order_fires(eng):
    """No margin is held while untriggered; when it fires the order must pass the margin
    check like a new order, else EV_TRIGGERED then a reject addressed to the owner."""
    ev = eng.client(conditional(9, SIDE_BUY, 1, UP, cid=1))
    assert_events(ev, [UNTRIGGERED_ACK(9, 1, 1, side=SIDE_BUY, kind=KIND_STOP_MARKET, cid=1)])
    ev = eng.admin(set_mark(UP, req=4))
    assert_events(ev, [
        MARK_EV(UP, req=4),
        TRIGGERED(9, 1, STATUS_CANCELED, 1, side=SIDE_BUY, kind=KIND_STOP_MARKET, cid=1),
        REJECT(9, "insufficient_margin", kind=KIND_STOP_MARKET, oid=1, cid=1),
    ])
    assert eng.open_orders(9) == []


def test_the_band_is_checked_against_the_mark_when_a_stop_limit_fires(eng):
    # 700 000 is beyond the band around 650 000 (65 000): accepted while untriggered
    ev = eng.client(conditional(1, SIDE_BUY, 1, UP, 720_000, kind=KIND_STOP_LIMIT, cid=1))
    assert_events(ev, [UNTRIGGERED_ACK(1, 1, 1, 720_000, side=SIDE_BUY, kind=KIND_STOP_LIMIT,
                                       cid=1)])
    assert MARK + BAND_DEV < 720_000
    ev = eng.admin(set_mark(UP))          # band around 652 000: up to 717 200
    assert_events(ev, [
        MARK_EV(UP),
        TRIGGERED(1, 1, STATUS_CANCELED, 1, 720_000, side=SIDE_BUY, kind=KIND_STOP_LIMIT,
                  cid=1),
        REJECT(1, "price_band", kind=KIND_STOP_LIMIT, oid=1, cid=1),
    ])


def test_a_fired_post_only_that_would_take_is_rejected(eng):
    eng.client(sell(2, 1, 652_500, cid=1))
    eng.client(conditional(1, SIDE_BUY, 1, UP, 653_000, kind=KIND_STOP_LIMIT,
                           tif=TIF_POST_ONLY, cid=2))
    ev = eng.admin(set_mark(UP))
    assert_events(ev, [
        MARK_EV(UP),
        TRIGGERED(1, 2, STATUS_CANCELED, 1, 653_000, side=SIDE_BUY, kind=KIND_STOP_LIMIT,
                  cid=2),
        REJECT(1, "post_only_would_take", kind=KIND_STOP_LIMIT, oid=2, cid=2),
    ])


def test_a_fired_ioc_limit_cancels_what_it_cannot_fill(eng):
    eng.client(conditional(1, SIDE_SELL, 2, DOWN, 647_000, kind=KIND_STOP_LIMIT, tif=TIF_IOC,
                           cid=1))
    ev = eng.admin(set_mark(DOWN))
    assert_events(ev, [
        MARK_EV(DOWN),
        TRIGGERED(1, 1, STATUS_CANCELED, 2, 647_000, side=SIDE_SELL, kind=KIND_STOP_LIMIT,
                  cid=1),
        CANCELED(1, 1, "ioc", 2, 647_000, side=SIDE_SELL, kind=KIND_STOP_LIMIT, cid=1),
    ])


def test_reduce_only_orders_are_swept_once_after_the_whole_cascade(eng):
    """Account 1 is long 2 with a resting reduce-only sell for 2; its own stop sells the
    position: the sweep after the command cancels the now-needless reduce-only order."""
    eng.client(sell(2, 2, MARK, cid=1))
    eng.client(buy(1, 2, MARK, cid=2))                                                 # long 2
    eng.client(sell(1, 2, 660_000, reduce_only=True, cid=3))                          # oid 3
    eng.client(buy(4, 2, 647_000, cid=4))                                             # oid 4
    eng.client(conditional(1, SIDE_SELL, 2, DOWN, cid=5))                              # oid 5
    ev = eng.admin(set_mark(DOWN))
    assert_events(ev, [
        MARK_EV(DOWN),
        TRIGGERED(1, 5, STATUS_FILLED, 2, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=5),
        TRADE(1, 5, SIDE_SELL, 647_000, 2, 0, 4, 4, 0, trade_id=2, cid=5, maker_cid=4),
        CANCELED(1, 3, "reduce_only", 2, 660_000, side=SIDE_SELL, cid=3),
    ])


def test_a_fired_fok_check_keeps_the_accounts_the_command_already_touched(eng):
    """The command's own trade changes account 1's position before a stop fires whose FOK
    check walks other makers: the sweep after still reaches account 1's reduce-only order."""
    eng.client(sell(2, 3, MARK, cid=1))                                                # oid 1
    eng.client(buy(1, 3, MARK, cid=2))                                                 # oid 2
    eng.client(sell(1, 3, 660_000, reduce_only=True, cid=3))                          # oid 3
    eng.client(buy(3, 2, 649_000, cid=4))                                             # oid 4
    eng.client(buy(5, 1, 648_000, cid=5))                                             # oid 5
    eng.client(conditional(4, SIDE_SELL, 1, 649_000, 648_000, kind=KIND_STOP_LIMIT,
                           tif=TIF_FOK, by_last=True, cid=6))                          # oid 6
    ev = eng.client(sell(1, 2, 649_000, cid=7, req=9))                                # oid 7
    assert_events(ev, [
        ACK(1, 7, STATUS_FILLED, 2, 649_000, side=SIDE_SELL, cid=7, req=9),
        TRADE(1, 7, SIDE_SELL, 649_000, 2, 0, 3, 4, 0, trade_id=2, cid=7, maker_cid=4, req=9),
        TRIGGERED(4, 6, STATUS_FILLED, 1, 648_000, side=SIDE_SELL, kind=KIND_STOP_LIMIT, cid=6),
        TRADE(4, 6, SIDE_SELL, 648_000, 1, 0, 5, 5, 0, trade_id=3, cid=6, maker_cid=5),
        AMENDED(1, 3, 660_000, 1, reason="reduce_only", side=SIDE_SELL, cid=3, req=9),
    ])


# ---- state --------------------------------------------------------------------------------
def test_the_state_hash_covers_the_trigger_book(eng):
    a = eng.digest()
    eng.client(conditional(1, SIDE_BUY, 1, UP, cid=1))
    b = eng.digest()
    assert b != a
    other = btc_engines((1, D), (2, D), (3, D), (4, D), (5, D))
    other.client(conditional(1, SIDE_BUY, 1, UP + 1, cid=1))   # same order, another trigger
    assert other.digest() != b


def test_the_event_bound_holds_over_cascading_streams():
    """8 + 2R + 5T (engine/core/triggers.py _trigger_bound) over every command of long random
    streams whose market has untriggered orders, counted on the reference model."""
    from engine.records import CMD_AMEND, COMMAND_DTYPE, EV_COMMAND
    from engine.reference import ReferenceMatcher
    from tests.fuzz_streams import FUZZ_CONFIG, genesis, random_stream
    import numpy as np

    worst = 0
    for seed in range(2):
        ref = ReferenceMatcher(FUZZ_CONFIG)
        for rec in np.concatenate([genesis(), random_stream(100 + seed, 10_000)]):
            market_id = int(rec["market"])
            if rec["cmd"] == CMD_AMEND:     # an amend works in its order's market
                found = ref._find_order(int(rec["account"]), int(rec["oid"]), int(rec["cid"]))
                market_id = -1 if found is None else found.market
            market = ref.markets.get(market_id)
            bound = None
            if market is not None and market.triggers:
                bound = 8 + 2 * sum(market.resting) + 5 * len(market.triggers)
            events = ref.process({k: int(rec[k]) for k in COMMAND_DTYPE.names}, 0, True)
            if bound is not None:
                assert len(events) <= bound, (rec, len(events), bound)
                worst = max(worst, sum(e["etype"] != EV_COMMAND for e in events))
    assert worst >= 8          # the streams do cascade


def test_a_liquidation_cancels_untriggered_orders_and_its_trades_fire_stops():
    """The liquidation of tests/test_engine_risk.py, with a stop on each side: the liquidated
    account's is canceled (reason liquidation) with its other orders; the liquidation's trade
    at 637 500 moves the last price, which fires account 4's by-last sell stop once the
    market's liquidation steps are done."""
    from engine.records import EV_CANCELED, EV_DONE, EV_LIQUIDATION, EV_TRADE, REASON_LIQUIDATION
    from tests.engine_helpers import liquidate

    eng = btc_engines((1, 70 * USDC), (2, 1_000 * USDC), (3, 1_000 * USDC), (4, 1_000 * USDC),
                      risk=True)
    eng.client(sell(2, 50, MARK, cid=900), buy(1, 50, MARK, cid=900))                # oids 1, 2
    eng.client(buy(1, 1, 600_000, cid=5))                                             # oid 3
    eng.client(buy(3, 30, 637_500, cid=1), buy(3, 50, 630_000, cid=2))               # oids 4, 5
    eng.client(conditional(1, SIDE_SELL, 5, 630_000, cid=6))                          # oid 6
    eng.client(conditional(4, SIDE_SELL, 1, 637_500, by_last=True, cid=7))            # oid 7
    eng.admin(set_mark(638_000))
    events = eng.admin(liquidate(1))
    canceled = [e for e in events if e["etype"] == EV_CANCELED]
    assert [(e["oid"], e["reason"], e["kind"]) for e in canceled] == [
        (3, REASON_LIQUIDATION, KIND_LIMIT), (6, REASON_LIQUIDATION, KIND_STOP_MARKET)]
    kinds = [e["etype"] for e in events if e["etype"] not in (1, EV_CANCELED)]
    # the liquidation's steps and ADL, then the stop it set off, then the reply
    assert kinds[-4:] == [EV_LIQUIDATION, EV_TRIGGERED, EV_TRADE, EV_DONE]
    fired = [e for e in events if e["etype"] in (EV_TRIGGERED, EV_TRADE)][-2:]
    assert_events(fired, [
        TRIGGERED(4, 7, STATUS_FILLED, 1, side=SIDE_SELL, kind=KIND_STOP_MARKET, cid=7),
        TRADE(4, 7, SIDE_SELL, 630_000, 1, 0, 3, 5, 49, trade_id=3, cid=7, maker_cid=2),
    ])
    assert eng.open_orders(1) == [] and eng.open_orders(4) == []
