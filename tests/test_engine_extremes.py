"""Overflow extremes and hostile field values.

- Markets at the int64 headroom limit (max_price x max_position x atoms_per_tick_lot up to
  2**54) trade their largest legal orders at their largest legal prices with maximum fees;
  every event and state value is compared with Python big-int arithmetic, so a wrap anywhere
  shows, and collateral must still be conserved to the atom.
- Limits beyond the headroom are refused (`invalid_message` by name).
- Extreme field values (int64 min/max, out-of-range accounts and markets, unknown codes, bad
  enums) are rejected and change nothing but the sequence number.
- The matcher never writes more events than the ring slots it was handed.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from engine.config import (MAX_BALANCE_ATOMS, MAX_FEE_E9, MAX_LEVERAGE, MAX_OPEN_ORDERS_LIMIT,
                           MAX_POSITION_LOTS_LIMIT, NOTIONAL_LIMIT_ATOMS, EngineConfig)
from engine.matcher import event_sink
from engine.records import (
    CMD_AMEND, CMD_CANCEL, CMD_CANCEL_ALL, CMD_CREATE_MARKET, CMD_DEPOSIT, CMD_HALT,
    CMD_FUNDING, CMD_LIQUIDATE, CMD_SET_BRACKET, CMD_SET_MARGIN, CMD_SET_MARKET_RISK,
    CMD_NEW_ORDER, CMD_RESUME, CMD_SET_MARK, CMD_SET_MARKET_LIMITS, CMD_WITHDRAW, COMMAND_DTYPE,
    EV_ACK, EV_COMMAND, EV_REJECT, EV_TRADE, EVENT_DTYPE, KIND_MARKET, PRIVILEGED_COMMANDS,
    REASON_INVALID_MARKET_CONFIG, REASON_MARKET_EXISTS, REASON_UNKNOWN_ACCOUNT, SIDE_BUY,
    SIDE_SELL, STATUS_FILLED, STATUS_OPEN, TIF_IOC,
)
from engine.config import MAX_NET_DEPOSITS_ATOMS
from engine.state import C_NET_DEPOSITS_ATOMS
from tests.engine_helpers import (
    ACK, BALANCE, DONE, MARK, TRADE, Engines, PyPosition, amend, assert_events, body,
    btc_engines, buy, cancel, cancel_all, command, create_market, deposit, fee,
    margin_required, market_commands, pick, reason_name, sell, set_limits, set_mark,
    the_reject, warm_up, withdraw,
)

I64_MAX = 2 ** 63 - 1
I64_MIN = -2 ** 63
I32_MAX = 2 ** 31 - 1
I32_MIN = -2 ** 31
I16_MAX = 2 ** 15 - 1
I16_MIN = -2 ** 15
BIG = MAX_BALANCE_ATOMS                 # 2**60 atoms: the most one account may hold by deposit

CONFIG = EngineConfig(max_accounts=16, max_markets=4, max_orders=64, max_levels_per_side=16)


@pytest.fixture(scope="session", autouse=True)
def _compiled():
    warm_up()


def headroom_price(atpl, max_position):
    """The largest max_price_ticks the headroom rule accepts."""
    return NOTIONAL_LIMIT_ATOMS // atpl // max_position


# ---- the largest legal trades -------------------------------------------------------------
HEADROOM_MARKETS = [
    # (atoms_per_tick_lot, max_position_lots)
    (1, MAX_POSITION_LOTS_LIMIT),        # max_price 6,004,799
    (100, 10_000_000),                   # the BTC-like grid at its limit
    (3, 7),                              # max_price = 2**54 // 21
    (2 ** 20, 1_000),
    (1, 1),                              # max_price = 2**54 ticks
    (2 ** 54, 1),                        # one tick-lot is worth 2**54 atoms
]


@pytest.mark.parametrize("atpl, max_pos", HEADROOM_MARKETS)
@pytest.mark.parametrize("maker_rate", [MAX_FEE_E9, -MAX_FEE_E9])
@pytest.mark.parametrize("leverage", [1, MAX_LEVERAGE])
def test_largest_orders_at_largest_prices(atpl, max_pos, maker_rate, leverage):
    top = headroom_price(atpl, max_pos)
    assert top * max_pos * atpl <= NOTIONAL_LIMIT_ATOMS
    assert (top + 1) * max_pos * atpl > NOTIONAL_LIMIT_ATOMS
    eng = Engines(CONFIG)
    eng.admin(market_commands(0, atpl=atpl, mark=top, maker_fee_e9=maker_rate,
                              taker_fee_e9=MAX_FEE_E9, band_e9=999_999_999, leverage=leverage,
                              max_price=top, max_order=max_pos, max_position=max_pos,
                              max_open_orders=MAX_OPEN_ORDERS_LIMIT))
    for a in (1, 2, 3, 4):
        assert_events(eng.admin(deposit(a, BIG)), [BALANCE(a, BIG, BIG), DONE(a)])
    pos = {1: PyPosition(atpl), 2: PyPosition(atpl)}
    bal = {1: BIG, 2: BIG}
    fees = 0

    def trade(price, qty, maker_side, oid, trade_id):
        nonlocal fees
        maker_fn, taker_fn = (buy, sell) if maker_side == SIDE_BUY else (sell, buy)
        assert_events(eng.client(maker_fn(1, qty, price, cid=oid)),
                      [ACK(1, oid, STATUS_OPEN, qty, price, side=maker_side, cid=oid,
                           remaining=qty)])
        n = price * qty * atpl                       # big-int notional
        tf, mf = fee(n, MAX_FEE_E9), fee(n, maker_rate)
        ev = eng.client(taker_fn(2, qty, price, tif=TIF_IOC))
        assert_events(ev, [
            ACK(2, oid + 1, STATUS_FILLED, qty, price, side=1 - maker_side),
            TRADE(2, oid + 1, 1 - maker_side, price, qty, 0, 1, oid, 0, trade_id=trade_id,
                  maker_cid=oid, fee_atoms=tf, maker_fee_atoms=mf),
        ])
        d = qty if maker_side == SIDE_BUY else -qty
        bal[1] += pos[1].fill(d, price) - mf
        bal[2] += pos[2].fill(-d, price) - tf
        fees += tf + mf
        for a in (1, 2):
            assert eng.balance(a) == bal[a]
            assert eng.position(a) == (pos[a].size, pos[a].cost)
        assert eng.counters()["fees"] == fees

    # 1 sells the largest order at the largest price, 2 takes it
    trade(top, max_pos, SIDE_SELL, 1, 1)
    assert pos[2].cost == top * max_pos * atpl
    # the mark falls to one tick: 2 is down ~2**54 atoms, 1 up as much
    eng.admin(set_mark(1))
    total, net = eng.collateral()
    assert total == net == 4 * BIG
    assert pos[2].upnl(1) == (1 - top) * max_pos * atpl
    # 2 closes at one tick (the band at a mark of 1 tick admits only 1 tick)
    trade(1, max_pos, SIDE_BUY, 3, 2)
    assert pos[1].size == pos[2].size == 0
    assert bal[2] == BIG - fee(top * max_pos * atpl, MAX_FEE_E9) - fee(max_pos * atpl, MAX_FEE_E9) \
        - (top - 1) * max_pos * atpl
    # margin at the headroom, to the atom: equity == requirement passes, one atom less fails
    eng.admin(set_mark(top))
    need = margin_required(max_pos, mark=top, atpl=atpl, leverage=leverage)
    eng.admin(deposit(5, need), deposit(6, need - 1))
    assert pick(eng.client(buy(5, max_pos, top)), EV_ACK)[0]["status"] == STATUS_OPEN
    assert reason_name(the_reject(eng.client(buy(6, max_pos, top)))) == "insufficient_margin"
    # and the largest order of the other side against it
    ev = eng.client(sell(3, max_pos, top))
    assert pick(ev, EV_TRADE)[0]["fee_atoms"] == fee(top * max_pos * atpl, MAX_FEE_E9)
    total, net = eng.collateral()
    assert total == net


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hs.data())
def test_random_extreme_markets_match_big_int_arithmetic(data):
    """Random headroom-limited markets and fees; a few trades between two accounts at random
    prices up to the max, marks moved to each price; big-int model of every atom."""
    atpl = data.draw(hs.sampled_from([1, 2, 7, 100, 12345, 2 ** 31 - 1, 2 ** 40, 2 ** 54])
                     | hs.integers(1, 2 ** 54), label="atpl")
    max_pos = data.draw(hs.integers(1, min(MAX_POSITION_LOTS_LIMIT, NOTIONAL_LIMIT_ATOMS // atpl)),
                        label="max_pos")
    top = headroom_price(atpl, max_pos)
    taker_rate = data.draw(hs.sampled_from([0, 1, MAX_FEE_E9]) | hs.integers(0, MAX_FEE_E9),
                           label="taker")
    maker_rate = data.draw(hs.sampled_from([-taker_rate, 0, MAX_FEE_E9])
                           | hs.integers(-taker_rate, MAX_FEE_E9), label="maker")
    leverage = data.draw(hs.sampled_from([1, 3, MAX_LEVERAGE]), label="leverage")
    eng = Engines(CONFIG)
    eng.admin(market_commands(0, atpl=atpl, mark=top, maker_fee_e9=maker_rate,
                              taker_fee_e9=taker_rate, band_e9=1, leverage=leverage,
                              max_price=top, max_order=max_pos, max_position=max_pos))
    eng.admin(deposit(1, BIG), deposit(2, BIG))
    pos = {1: PyPosition(atpl), 2: PyPosition(atpl)}
    bal = {1: BIG, 2: BIG}
    fees = 0
    for step in range(data.draw(hs.integers(1, 5), label="trades")):
        price = data.draw(hs.sampled_from([1, top]) | hs.integers(1, top), label="price")
        target = data.draw(hs.sampled_from([-max_pos, max_pos, 0])
                           | hs.integers(-max_pos, max_pos), label="target")
        qty = pos[1].size - target              # 1 sells qty (buys -qty) to reach target
        if qty == 0:
            continue
        eng.admin(set_mark(price))
        side = SIDE_SELL if qty > 0 else SIDE_BUY
        qty = abs(qty) if abs(qty) <= max_pos else max_pos
        maker_fn, taker_fn = (sell, buy) if side == SIDE_SELL else (buy, sell)
        eng.client(maker_fn(1, qty, price))
        ev = eng.client(taker_fn(2, qty, price, tif=TIF_IOC))
        (t,) = pick(ev, EV_TRADE)
        n = price * qty * atpl
        assert (t["price_ticks"], t["qty_lots"]) == (price, qty)
        assert (t["fee_atoms"], t["maker_fee_atoms"]) == (fee(n, taker_rate), fee(n, maker_rate))
        d = -qty if side == SIDE_SELL else qty
        bal[1] += pos[1].fill(d, price) - fee(n, maker_rate)
        bal[2] += pos[2].fill(-d, price) - fee(n, taker_rate)
        fees += fee(n, taker_rate) + fee(n, maker_rate)
        for a in (1, 2):
            assert eng.balance(a) == bal[a]
            assert eng.position(a) == (pos[a].size, pos[a].cost)
        assert eng.counters()["fees"] == fees
        total, net = eng.collateral()
        assert total == net == 2 * BIG


# ---- deposits and balances at the cap -----------------------------------------------------
def test_deposit_up_to_the_balance_cap():
    eng = btc_engines(config=CONFIG)
    assert_events(eng.admin(deposit(1, BIG)), [BALANCE(1, BIG, BIG), DONE(1)])
    for amount in (1, I64_MAX):
        assert reason_name(the_reject(eng.admin(deposit(1, amount)))) == "invalid_message"
    assert reason_name(the_reject(eng.admin(deposit(2, BIG + 1)))) == "invalid_message"
    assert_events(eng.admin(deposit(2, BIG - 5)), [BALANCE(2, BIG - 5, BIG - 5), DONE(2)])
    assert_events(eng.admin(deposit(2, 5)), [BALANCE(2, 5, BIG), DONE(2)])
    assert reason_name(the_reject(eng.admin(deposit(2, 1)))) == "invalid_message"
    assert_events(eng.client(withdraw(2, BIG)), [BALANCE(2, -BIG, 0), DONE(2)])
    assert eng.counters()["net_deposits"] == BIG
    assert eng.collateral() == (BIG, BIG)


@pytest.mark.parametrize("one_account", [False, True])
def test_total_deposits_at_the_cap_do_not_wrap(one_account):
    """Net deposits are capped exchange-wide; churn through one account never accumulates."""
    eng = btc_engines(config=CONFIG)
    eng.check_every_step = False
    if one_account:
        for _ in range(9):
            eng.admin(deposit(1, BIG))
            eng.client(withdraw(1, BIG))
        eng.admin(deposit(1, BIG))
        assert eng.ref.net_deposits_atoms == int(eng.st.counters[C_NET_DEPOSITS_ATOMS]) == BIG
    else:
        accounts = MAX_NET_DEPOSITS_ATOMS // BIG
        eng.admin(*[deposit(a, BIG) for a in range(accounts)])
        assert reason_name(the_reject(eng.admin(deposit(accounts, 1)))) == "invalid_message"
        assert eng.ref.net_deposits_atoms == int(eng.st.counters[C_NET_DEPOSITS_ATOMS])
        assert int(eng.st.counters[C_NET_DEPOSITS_ATOMS]) == MAX_NET_DEPOSITS_ATOMS
    total, net = eng.collateral()
    assert total == net


# ---- market limits beyond the headroom ----------------------------------------------------
def _limits_reject(eng, market=0, **limits):
    before = eng.digest()
    r = the_reject(eng.admin(set_limits(market, **limits)))
    assert r["reason"] == REASON_INVALID_MARKET_CONFIG
    assert reason_name(r) == "invalid_message"
    assert eng.digest() == before


@pytest.mark.parametrize("atpl", [1, 100, 3, 2 ** 20, 2 ** 54])
def test_limits_exactly_at_the_headroom_pass_and_one_tick_more_fails(atpl):
    max_pos = max(1, min(MAX_POSITION_LOTS_LIMIT, NOTIONAL_LIMIT_ATOMS // atpl // 1000))
    top = headroom_price(atpl, max_pos)
    eng = Engines(CONFIG)
    eng.admin(create_market(0, atpl=atpl, mark=1))
    _limits_reject(eng, max_price=top + 1, max_order=max_pos, max_position=max_pos)
    if max_pos < MAX_POSITION_LOTS_LIMIT and headroom_price(atpl, max_pos + 1) < top:
        _limits_reject(eng, max_price=top, max_order=max_pos, max_position=max_pos + 1)
    assert_events(eng.admin(set_limits(0, max_price=top, max_order=max_pos,
                                       max_position=max_pos, max_open_orders=3)),
                  [DONE(3, 0)])          # the limits command carries max_open_orders as account
    # limits are set once
    _limits_reject(eng, max_price=1, max_order=1, max_position=1)


@pytest.mark.parametrize("limits", [
    dict(max_price=0), dict(max_price=-1), dict(max_price=I64_MIN), dict(max_price=I64_MAX),
    dict(max_order=0), dict(max_order=I64_MIN), dict(max_order=I64_MAX),
    dict(max_position=0), dict(max_position=I64_MAX), dict(max_position=-5),
    dict(max_position=MAX_POSITION_LOTS_LIMIT + 1, max_order=1, max_price=1),
    dict(max_order=11, max_position=10),                   # order larger than position
    dict(max_open_orders=0), dict(max_open_orders=-1),
    dict(max_open_orders=MAX_OPEN_ORDERS_LIMIT + 1),
    dict(max_price=MARK - 1),                              # the mark above the max price
    dict(max_price=headroom_price(100, 10_000_000) + 1, max_position=10_000_000),
])
def test_limits_out_of_bounds_are_rejected(limits):
    eng = Engines(CONFIG)
    eng.admin(create_market(0))
    _limits_reject(eng, **limits)
    assert reason_name(the_reject(eng.client(buy(1, 1, MARK)))) == "market_halted"


def test_limits_at_the_other_bounds_pass():
    eng = Engines(CONFIG)
    eng.admin(create_market(0, atpl=1, mark=1), create_market(1, atpl=1, mark=1))
    assert_events(eng.admin(set_limits(0, max_price=1, max_order=1, max_position=1,
                                       max_open_orders=1)), [DONE(1, 0)])
    assert_events(eng.admin(set_limits(1, max_price=1, max_order=MAX_POSITION_LOTS_LIMIT,
                                       max_position=MAX_POSITION_LOTS_LIMIT,
                                       max_open_orders=MAX_OPEN_ORDERS_LIMIT)),
                  [DONE(MAX_OPEN_ORDERS_LIMIT, 0, market=1)])
    # a one-lot market at one tick trades
    eng.admin(deposit(1, 10), deposit(2, 10))
    eng.client(sell(1, 1, 1, market=0))
    ev = eng.client(buy(2, 1, 1, market=0))
    assert pick(ev, EV_ACK)[0]["status"] == STATUS_FILLED


@pytest.mark.parametrize("params", [
    dict(atpl=0), dict(atpl=-1), dict(atpl=I64_MIN),
    dict(mark=0), dict(mark=-1), dict(mark=I64_MIN),
    dict(taker_fee_e9=-1), dict(taker_fee_e9=MAX_FEE_E9 + 1), dict(taker_fee_e9=I64_MAX),
    dict(taker_fee_e9=I64_MIN),
    dict(maker_fee_e9=-500_001), dict(maker_fee_e9=MAX_FEE_E9 + 1), dict(maker_fee_e9=I64_MIN),
    dict(maker_fee_e9=I64_MAX),
    dict(band_e9=0), dict(band_e9=1_000_000_000), dict(band_e9=-1), dict(band_e9=I64_MAX),
    dict(leverage=0), dict(leverage=MAX_LEVERAGE + 1), dict(leverage=-1),
    dict(leverage=I32_MAX), dict(leverage=I32_MIN),
])
def test_market_config_out_of_bounds_is_rejected(params):
    eng = Engines(CONFIG)
    before = eng.digest()
    r = the_reject(eng.admin(create_market(0, **params)))
    assert r["reason"] == REASON_INVALID_MARKET_CONFIG and reason_name(r) == "invalid_message"
    assert eng.digest() == before


def test_market_config_at_its_bounds_is_accepted():
    eng = Engines(CONFIG)
    for m, params in enumerate([
        dict(atpl=1, mark=1, taker_fee_e9=MAX_FEE_E9, maker_fee_e9=-MAX_FEE_E9, band_e9=1,
             leverage=1),
        dict(atpl=I64_MAX, mark=I64_MAX, taker_fee_e9=0, maker_fee_e9=MAX_FEE_E9,
             band_e9=999_999_999, leverage=MAX_LEVERAGE),
    ]):
        assert_events(eng.admin(create_market(m, **params)),
                      [DONE(params["leverage"], 0, market=m)])
    # market 1's mark (2**63 - 1 ticks) is above any max price the headroom allows
    _limits_reject(eng, 1, max_price=1, max_order=1, max_position=1)
    r = the_reject(eng.admin(create_market(0)))
    assert r["reason"] == REASON_MARKET_EXISTS and reason_name(r) == "invalid_message"
    for m in (CONFIG.max_markets, -1, I16_MAX, I16_MIN):
        assert reason_name(the_reject(eng.admin(create_market(m)))) == "unknown_market"


# ---- extreme field values -----------------------------------------------------------------
def base_engines() -> Engines:
    """A market, two funded accounts with a resting order each (oid 1 cid 5, oid 2 cid 6)."""
    eng = btc_engines((1, 10_000_000_000), (2, 10_000_000_000), config=CONFIG)
    eng.client(buy(1, 5, 649_000, cid=5), sell(2, 5, 651_000, cid=6))
    return eng


def _order_cmd(**over):
    f = dict(cmd=CMD_NEW_ORDER, account=1, market=0, side=SIDE_BUY, price_ticks=640_000,
             qty_lots=1, cid=77)
    f.update(over)
    return f


EXTREME_COMMANDS = [
    # new orders
    (_order_cmd(price_ticks=I64_MAX), "invalid_price"),
    (_order_cmd(price_ticks=I64_MIN), "invalid_price"),
    (_order_cmd(side=SIDE_SELL, price_ticks=I64_MAX), "invalid_price"),
    (_order_cmd(qty_lots=I64_MAX), "invalid_qty"),
    (_order_cmd(qty_lots=I64_MIN), "invalid_qty"),
    (_order_cmd(kind=KIND_MARKET, qty_lots=I64_MAX), "invalid_qty"),
    (_order_cmd(qty_lots=I64_MAX, price_ticks=I64_MAX), "invalid_qty"),
    (_order_cmd(cid=5), "duplicate_cid"),
    (_order_cmd(account=I32_MAX), "forbidden"),
    (_order_cmd(account=I32_MIN), "forbidden"),
    (_order_cmd(account=CONFIG.max_accounts), "forbidden"),
    (_order_cmd(account=-1), "forbidden"),
    (_order_cmd(market=I16_MAX), "unknown_market"),
    (_order_cmd(market=I16_MIN), "unknown_market"),
    (_order_cmd(market=-1), "unknown_market"),
    (_order_cmd(side=2), "invalid_message"),
    (_order_cmd(side=255), "invalid_message"),
    (_order_cmd(kind=6), "invalid_message"),          # past the conditional kinds (2..5)
    (_order_cmd(kind=255), "invalid_message"),
    (_order_cmd(tif=4), "invalid_message"),
    (_order_cmd(tif=255), "invalid_message"),
    (_order_cmd(stp=3), "invalid_message"),
    (_order_cmd(stp=255), "invalid_message"),
    (_order_cmd(flags=2), "invalid_message"),
    (_order_cmd(flags=3), "invalid_message"),
    (_order_cmd(flags=255), "invalid_message"),
    # cancel / amend
    (dict(cmd=CMD_CANCEL, account=1, oid=I64_MAX), "unknown_order"),
    (dict(cmd=CMD_CANCEL, account=1, oid=I64_MIN), "unknown_order"),
    (dict(cmd=CMD_CANCEL, account=1, oid=-1), "unknown_order"),
    (dict(cmd=CMD_CANCEL, account=1, cid=I64_MAX), "unknown_order"),
    (dict(cmd=CMD_CANCEL, account=1, cid=I64_MIN), "unknown_order"),
    (dict(cmd=CMD_CANCEL, account=1, oid=2), "unknown_order"),          # account 2's order
    (dict(cmd=CMD_CANCEL, account=2, cid=5), "unknown_order"),          # account 1's cid
    (dict(cmd=CMD_CANCEL, account=I32_MAX, oid=1), "unknown_order"),
    (dict(cmd=CMD_CANCEL, account=I32_MIN, cid=5), "unknown_order"),
    (dict(cmd=CMD_AMEND, account=1, oid=I64_MAX, qty_lots=1), "unknown_order"),
    (dict(cmd=CMD_AMEND, account=1, oid=I64_MIN, qty_lots=1), "unknown_order"),
    (dict(cmd=CMD_AMEND, account=I32_MIN, oid=1, qty_lots=1), "unknown_order"),
    (dict(cmd=CMD_AMEND, account=1, oid=1, price_ticks=I64_MAX), "invalid_price"),
    (dict(cmd=CMD_AMEND, account=1, oid=1, price_ticks=I64_MIN), "invalid_price"),
    (dict(cmd=CMD_AMEND, account=1, oid=1, qty_lots=I64_MAX), "invalid_qty"),
    (dict(cmd=CMD_AMEND, account=1, oid=1, qty_lots=I64_MIN), "invalid_qty"),
    (dict(cmd=CMD_AMEND, account=1, oid=1, qty_lots=I64_MAX, price_ticks=I64_MAX),
     "invalid_qty"),
    (dict(cmd=CMD_AMEND, account=1, cid=5), "invalid_message"),
    (dict(cmd=CMD_CANCEL_ALL, account=1, market=I16_MAX), "unknown_market"),
    (dict(cmd=CMD_CANCEL_ALL, account=1, market=I16_MIN), "unknown_market"),
    (dict(cmd=CMD_CANCEL_ALL, account=1, market=-2), "unknown_market"),
    # money
    (dict(cmd=CMD_DEPOSIT, account=1, amount_atoms=I64_MAX), "invalid_message"),
    (dict(cmd=CMD_DEPOSIT, account=1, amount_atoms=I64_MIN), "invalid_message"),
    (dict(cmd=CMD_DEPOSIT, account=3, amount_atoms=BIG + 1), "invalid_message"),
    (dict(cmd=CMD_DEPOSIT, account=I32_MAX, amount_atoms=1), "forbidden"),
    (dict(cmd=CMD_DEPOSIT, account=I32_MIN, amount_atoms=1), "forbidden"),
    (dict(cmd=CMD_WITHDRAW, account=1, amount_atoms=I64_MAX), "invalid_message"),
    (dict(cmd=CMD_WITHDRAW, account=1, amount_atoms=I64_MIN), "invalid_message"),
    (dict(cmd=CMD_WITHDRAW, account=1, amount_atoms=BIG + 1), "invalid_message"),
    (dict(cmd=CMD_WITHDRAW, account=1, amount_atoms=BIG), "insufficient_balance"),
    (dict(cmd=CMD_WITHDRAW, account=I32_MAX, amount_atoms=1), "forbidden"),
    (dict(cmd=CMD_WITHDRAW, account=-1, amount_atoms=1), "forbidden"),
    # admin
    (dict(cmd=CMD_SET_MARK, market=0, price_ticks=I64_MAX), "invalid_price"),
    (dict(cmd=CMD_SET_MARK, market=0, price_ticks=I64_MIN), "invalid_price"),
    (dict(cmd=CMD_SET_MARK, market=0, price_ticks=0), "invalid_price"),
    (dict(cmd=CMD_SET_MARK, market=I16_MIN, price_ticks=MARK), "unknown_market"),
    (dict(cmd=CMD_HALT, market=I16_MAX), "unknown_market"),
    (dict(cmd=CMD_RESUME, market=I16_MIN), "unknown_market"),
    (dict(cmd=CMD_SET_MARKET_LIMITS, market=0, price_ticks=I64_MAX, qty_lots=I64_MAX,
          amount_atoms=I64_MAX, account=I32_MAX), "invalid_message"),
    (dict(cmd=CMD_SET_MARKET_LIMITS, market=I16_MAX, price_ticks=1, qty_lots=1,
          amount_atoms=1, account=1), "unknown_market"),
    (dict(cmd=CMD_CREATE_MARKET, market=1, price_ticks=I64_MIN, amount_atoms=I64_MAX,
          cid=I64_MIN, oid=I64_MAX, qty_lots=I64_MIN, account=I32_MIN), "invalid_message"),
    (dict(cmd=CMD_CREATE_MARKET, market=I16_MIN), "unknown_market"),
    # unknown command codes
    (dict(cmd=0, account=1), "invalid_message"),
    (dict(cmd=12, account=1), "invalid_message"),
    (dict(cmd=99, account=1, market=0), "invalid_message"),
    (dict(cmd=255, account=I32_MIN, market=I16_MIN, price_ticks=I64_MIN, qty_lots=I64_MAX),
     "invalid_message"),
]


@pytest.mark.parametrize("fields, reason", EXTREME_COMMANDS,
                         ids=[f"{i}-{r}" for i, (_, r) in enumerate(EXTREME_COMMANDS)])
def test_extreme_field_values_are_rejected_and_change_nothing(fields, reason):
    eng = base_engines()
    before = eng.digest()
    seq = eng.seq
    fields = dict(fields, req=fields.get("req", -7), ts_ns=I64_MAX)
    ev = eng.admin(command(**fields))          # privileged: admin commands get past `forbidden`
    r = the_reject(ev)
    assert reason_name(r) == reason
    # the reject echoes what the command said, and nothing else changed but the sequence
    assert r["ts_ns"] == I64_MAX and r["seq"] == seq + 1
    assert (r["account"], r["market"], r["req"], r["oid"], r["cid"], r["side"], r["kind"]) == (
        fields.get("account", 0), fields.get("market", 0), -7, fields.get("oid", 0),
        fields.get("cid", 0), fields.get("side", 0), fields.get("kind", 0))
    assert eng.digest() == before
    assert eng.seq == seq + 1


@pytest.mark.parametrize("code", PRIVILEGED_COMMANDS)
def test_privileged_commands_with_extreme_fields_from_a_client_are_forbidden(code):
    eng = base_engines()
    before = eng.digest()
    ev = eng.client(command(cmd=code, account=1, market=0, price_ticks=I64_MAX,
                            amount_atoms=I64_MAX, qty_lots=I64_MAX, cid=I64_MIN, oid=I64_MIN))
    assert reason_name(the_reject(ev)) == "forbidden"
    assert eng.digest() == before


def test_extreme_ids_and_tokens_in_accepted_orders_round_trip():
    eng = base_engines()
    ev = eng.client(command(cmd=CMD_NEW_ORDER, account=1, side=SIDE_BUY, price_ticks=640_000,
                            qty_lots=1, cid=I64_MAX, req=I32_MIN, ts_ns=I64_MIN))
    assert_events(ev, [ACK(1, 3, STATUS_OPEN, 1, 640_000, cid=I64_MAX, remaining=1,
                           req=I32_MIN)])
    assert all(e["ts_ns"] == I64_MIN for e in ev)
    eng.client(command(cmd=CMD_NEW_ORDER, account=1, side=SIDE_BUY, price_ticks=640_000,
                       qty_lots=1, cid=I64_MIN))
    assert [o[1] for o in eng.open_orders(1)] == [5, I64_MAX, I64_MIN]
    assert [e["oid"] for e in body(eng.client(cancel(1, cid=I64_MIN)))] == [4]
    assert [e["oid"] for e in body(eng.client(cancel(1, cid=I64_MAX)))] == [3]


@pytest.mark.parametrize("account", [I32_MAX, I32_MIN, -1, CONFIG.max_accounts])
def test_cancel_all_from_an_unknown_account_is_rejected(account):
    eng = base_engines()
    before = eng.digest()
    r = the_reject(eng.client(cancel_all(account)))
    assert r["reason"] == REASON_UNKNOWN_ACCOUNT
    assert eng.digest() == before


# hypothesis: any record of extreme and ordinary values; both engines agree, invariants hold,
# and a rejected command changes nothing
_i64 = (hs.sampled_from([I64_MIN, I64_MIN + 1, -2 ** 54, -1, 0, 1, 2, 5, 6, 640_000, 651_000,
                         MARK, 2 ** 31, 2 ** 54, BIG, BIG + 1, I64_MAX - 1, I64_MAX])
        | hs.integers(I64_MIN, I64_MAX))
_i32 = hs.sampled_from([I32_MIN, -1, 0, 1, 2, 3, CONFIG.max_accounts, I32_MAX]) \
    | hs.integers(I32_MIN, I32_MAX)
_i16 = hs.sampled_from([I16_MIN, -2, -1, 0, 1, CONFIG.max_markets, I16_MAX]) \
    | hs.integers(I16_MIN, I16_MAX)
_u8 = hs.sampled_from([0, 1, 2, 3, 4, 127, 255]) | hs.integers(0, 255)
_record = hs.fixed_dictionaries({
    "cmd": hs.sampled_from(list(range(0, 14)) + [99, 255]),
    "ts_ns": _i64, "cid": _i64, "oid": _i64, "price_ticks": _i64, "qty_lots": _i64,
    "amount_atoms": _i64, "account": _i32, "req": _i32, "market": _i16,
    "side": _u8, "kind": _u8, "tif": _u8, "flags": _u8, "stp": _u8,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=hs.lists(_record, min_size=1, max_size=4), privileged=hs.booleans())
def test_random_extreme_records(records, privileged):
    eng = base_engines()
    for fields in records:
        before = eng.digest()
        ev = eng.run(command(**fields), privileged=privileged)   # engines agree, invariants hold
        assert ev[0]["etype"] == EV_COMMAND
        rejects = pick(ev, EV_REJECT)
        if rejects:
            assert len(body(ev)) == 1
            r = rejects[0]
            assert (r["account"], r["market"], r["req"], r["oid"], r["cid"]) == (
                fields["account"], fields["market"], fields["req"], fields["oid"],
                fields["cid"])
            assert eng.digest() == before
        elif fields["cmd"] not in (CMD_NEW_ORDER, CMD_CANCEL, CMD_CANCEL_ALL, CMD_AMEND,
                                   CMD_DEPOSIT, CMD_WITHDRAW, CMD_SET_MARK, CMD_HALT,
                                   CMD_RESUME, CMD_CREATE_MARKET, CMD_SET_MARKET_LIMITS,
                                   CMD_SET_MARGIN, CMD_SET_MARKET_RISK, CMD_SET_BRACKET,
                                   CMD_FUNDING, CMD_LIQUIDATE):
            pytest.fail(f"unknown command {fields['cmd']} was not rejected")
        if fields["cmd"] in PRIVILEGED_COMMANDS and not privileged:
            assert [reason_name(r) for r in rejects] == ["forbidden"]
    total, net = eng.collateral()
    assert total == net


# ---- the event ring bound -----------------------------------------------------------------
def _capped_reduce_only_book(k):
    """k maker accounts, each long 2 with a plain sell of 1 then a reduce-only sell of 2 at
    650,100: a buyer through that level trades the plain order, 1 lot of the reduce-only one,
    then cancels it (3 events for 2 resting orders). Account k+1 holds a bid to amend."""
    eng = btc_engines(*[(a, 10_000_000_000) for a in range(1, k + 3)], config=CONFIG)
    eng.check_every_step = False
    counter = k + 2
    for a in range(1, k + 1):
        eng.client(sell(counter, 2, MARK, cid=a), buy(a, 2, MARK, tif=TIF_IOC))
        eng.client(sell(a, 1, 650_100, cid=1), sell(a, 2, 650_100, reduce_only=True, cid=2))
    eng.client(buy(k + 1, 3 * k, 640_000, cid=7))
    eng.check()
    return eng


def _events_written(eng, cmd, free_slots):
    slots = np.zeros(1 << 10, EVENT_DTYPE)
    sink = event_sink(slots)
    done, end = eng.matcher.process(np.asarray(cmd, COMMAND_DTYPE).reshape(-1), sink, 0,
                                    free_slots, 1, False)
    return done, end


@pytest.mark.parametrize("k", [2, 10])
def test_new_order_never_writes_more_events_than_free_slots(k):
    for free in range(1, 3 * k + 16):
        eng = _capped_reduce_only_book(k)
        done, written = _events_written(eng, buy(k + 1, 3 * k, 650_100, cid=8), free)
        assert written <= free, (free, done, written)
    assert done == 1 and written == 2 + 3 * k


@pytest.mark.parametrize("k", [2, 10])
def test_amend_never_writes_more_events_than_free_slots(k):
    # the amend bound is looser (8 + 2 x orders in use), so it needs more room to proceed
    for free in range(1, 6 * k + 16):
        eng = _capped_reduce_only_book(k)
        done, written = _events_written(eng, amend(k + 1, cid=7, price=650_100), free)
        assert written <= free, (free, done, written)
    assert done == 1 and written == 2 + 3 * k
