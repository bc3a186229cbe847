"""A million resting orders fit the matcher's tables in under 256 MB, and it still trades."""

import numpy as np

from engine.config import EngineConfig
from engine.matcher import LocalEvents, Matcher, drain
from engine.records import (CMD_CANCEL_ALL, CMD_DEPOSIT, CMD_NEW_ORDER, EV_ACK, EV_DONE,
                            EV_TRADE, KIND_MARKET, SIDE_BUY, SIDE_SELL, TIF_IOC,
                            market_create_command, market_limits_command, new_commands)
from engine.state import C_ORDERS_USED, state_nbytes

ACCOUNTS = 1000
PER_ACCOUNT = 1000          # 500 bids and 500 asks each
MARK = 650_000
CONFIG = EngineConfig(max_accounts=ACCOUNTS, max_markets=1, max_orders=1 << 20,
                      max_levels_per_side=1024)


def test_a_million_resting_orders_in_under_256_mb():
    assert state_nbytes(CONFIG) < 256 * 2**20
    setup = [
        market_create_command(0, atoms_per_tick_lot=100, initial_mark_ticks=MARK,
                              maker_fee_e9=-100_000, taker_fee_e9=500_000,
                              price_band_e9=100_000_000, max_leverage=50),
        market_limits_command(0, max_price_ticks=10 * MARK, max_order_lots=1_000_000,
                              max_position_lots=10_000_000, max_open_orders=PER_ACCOUNT),
    ]
    deposits = new_commands(ACCOUNTS)
    deposits["cmd"] = CMD_DEPOSIT
    deposits["account"] = np.arange(ACCOUNTS)
    deposits["amount_atoms"] = 10**10
    n = ACCOUNTS * PER_ACCOUNT
    orders = new_commands(n)
    orders["cmd"] = CMD_NEW_ORDER
    orders["account"] = np.repeat(np.arange(ACCOUNTS), PER_ACCOUNT)
    k = np.tile(np.arange(PER_ACCOUNT), ACCOUNTS)
    orders["side"] = np.where(k % 2 == 0, SIDE_BUY, SIDE_SELL)
    depth = 1 + k // 2                             # 500 price levels per side
    orders["price_ticks"] = np.where(orders["side"] == SIDE_BUY, MARK - depth, MARK + depth)
    orders["qty_lots"] = 1
    orders["cid"] = k
    matcher = Matcher(CONFIG)
    ring = LocalEvents(1 << 16)
    ring.run(matcher, np.concatenate(setup + [deposits]), collect=False)

    acks = 0
    for events in drain(matcher, orders, ring.sink, privileged=False):
        acks += int(np.count_nonzero((events["etype"] == EV_ACK)))
    st = matcher.state
    assert acks == n
    assert int(st.counters[C_ORDERS_USED]) == n
    assert list(st.book_depth[0]) == [500, 500]
    assert int(st.positions["open_buy_lots"].sum()) == n // 2
    assert int(st.markets["resting_buy"][0]) == int(st.markets["resting_sell"][0]) == n // 2

    # a market order sweeps through the top of a million-order book
    sweep = new_commands(1)
    sweep["cmd"] = CMD_NEW_ORDER
    sweep["account"] = 0
    sweep["side"] = SIDE_SELL
    sweep["kind"] = KIND_MARKET
    sweep["tif"] = TIF_IOC
    sweep["qty_lots"] = 5000
    sweep["cid"] = 10**9
    sweep["stp"] = 1                                 # cancel_maker: skip its own bids
    events = ring.run(matcher, sweep, privileged=False)
    trades = [e for e in events if e["etype"] == EV_TRADE]
    assert sum(t["qty_lots"] for t in trades) == 5000
    assert trades[0]["price_ticks"] == MARK - 1     # best bid first
    # and cancel-all of one account takes its remaining orders off (5 bids traded above)
    assert int(st.accounts["open_orders"][999]) == PER_ACCOUNT - 5
    cancel_all = new_commands(1)
    cancel_all["cmd"] = CMD_CANCEL_ALL
    cancel_all["account"] = 999
    cancel_all["market"] = -1
    done = ring.run(matcher, cancel_all, privileged=False)[-1]
    assert done["etype"] == EV_DONE and done["qty_lots"] == PER_ACCOUNT - 5
    assert int(st.accounts["open_orders"][999]) == 0
