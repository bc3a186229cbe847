"""Random command streams for differential tests of the compiled matcher against the reference.

Streams are dense with edge cases on purpose: few accounts and a narrow price range so orders
cross, self-trade, collide on cids, reduce positions and run into limits often. Stops and
take-profits trigger in the same narrow range (by mark or last price), so marks and trades set
them off, often several in a cascade, and their trigger books fill up.
"""

import numpy as np
from hypothesis import strategies as hs

from engine.config import EngineConfig
from engine.records import *  # noqa: F403

FUZZ_CONFIG = EngineConfig(max_accounts=12, max_markets=3, max_orders=96, max_levels_per_side=10,
                           max_trigger_orders=6)
CONDITIONAL_KINDS = (KIND_STOP_MARKET, KIND_STOP_LIMIT, KIND_TAKE_PROFIT_MARKET,
                     KIND_TAKE_PROFIT_LIMIT)
MARKETS = (0, 1)
MARK_TICKS = (1000, 20000)
# Market 0's max price sits inside its mark walk (+-160 ticks): marks above it are refused,
# and so are orders above it, and the band's upper limit is clipped to it.
MAX_PRICE_TICKS = (1100, 10_000_000)


# Maintenance brackets (floor atoms, rate e9, max leverage; 0 = the default) steep enough that
# mark moves liquidate often, and with max leverages that bind within the fuzzed positions.
BRACKETS = (((0, 45_000_000, 20), (2_000_000, 60_000_000, 12), (6_000_000, 100_000_000, 0)),
            ((0, 180_000_000, 0), (3_000_000, 200_000_000, 0), (10_000_000, 250_000_000, 0)))
FUNDING_CAP_E9 = 5_000_000
# (min notional atoms, untriggered orders per account, open-interest cap lots) per market:
# tight enough that each binds in the stream
FILTERS = ((500_000, 1, 1_000), (0, 2, 300))


def genesis(filters: bool = True) -> np.ndarray:
    """Two markets (one with a maker rebate) with risk parameters and brackets, funded
    accounts; with filters, also min notionals, stop caps and open-interest caps."""
    cmds = [
        market_create_command(0, atoms_per_tick_lot=100, initial_mark_ticks=MARK_TICKS[0],
                              maker_fee_e9=-100_000, taker_fee_e9=500_000,
                              price_band_e9=50_000_000, max_leverage=20),
        market_limits_command(0, max_price_ticks=MAX_PRICE_TICKS[0], max_order_lots=500,
                              max_position_lots=2_000, max_open_orders=7),
        market_create_command(1, atoms_per_tick_lot=7, initial_mark_ticks=MARK_TICKS[1],
                              maker_fee_e9=200_000, taker_fee_e9=700_000,
                              price_band_e9=30_000_000, max_leverage=5),
        market_limits_command(1, max_price_ticks=MAX_PRICE_TICKS[1], max_order_lots=300,
                              max_position_lots=1_000, max_open_orders=8),
    ]
    for m, brackets in enumerate(BRACKETS):
        cmds.append(market_risk_command(m, liquidation_fee_e9=5_000_000 * (m + 1),
                                        funding_cap_e9=FUNDING_CAP_E9))
        if filters:
            min_notional, stops, oi_cap = FILTERS[m]
            cmds.append(market_filters_command(m, min_notional_atoms=min_notional,
                                               max_stop_orders=stops,
                                               open_interest_cap_lots=oi_cap))
        for k, (floor_atoms, rate_e9, leverage) in enumerate(brackets):
            cmds.append(bracket_command(m, k, floor_atoms=floor_atoms,
                                        maintenance_rate_e9=rate_e9, max_leverage=leverage))
    for account in range(FUZZ_CONFIG.max_accounts - 2):
        d = new_commands(1)
        d["cmd"] = CMD_DEPOSIT
        d["account"] = account
        d["amount_atoms"] = 1_000_000 * (account + 1) ** 2
        cmds.append(d)
    return np.concatenate(cmds)


def random_stream(seed: int, n: int, account_states: bool = False) -> np.ndarray:
    """n commands after genesis, drawn from a seeded generator (vectorized). account_states:
    also accounts disabled for a while and enabled again (drawn apart, so the rest of the
    stream is the same as without)."""
    rng = np.random.default_rng(seed)
    c = new_commands(n)
    c["ts_ns"] = np.arange(n) * 1000 + seed
    c["market"] = rng.choice(np.array(MARKETS + (0, 1, 2)), n, p=[0.45, 0.45, 0.04, 0.04, 0.02])
    c["account"] = np.where(rng.random(n) < 0.02, FUZZ_CONFIG.max_accounts,
                            rng.integers(0, FUZZ_CONFIG.max_accounts, n))
    # each market's mark follows a random walk within +-20% of its start, and orders are priced
    # around where it is: trading goes on while marks move far enough to liquidate
    paths = [np.full(n, 500)]
    for start in MARK_TICKS:
        walk = np.clip(np.cumsum(rng.choice([-2, -1, 0, 1, 2], n, p=[0.1, 0.15, 0.5, 0.15, 0.1])),
                       -80, 80)
        paths.append(start + walk * (start // 400))
    mark = np.choose(np.where(np.isin(c["market"], MARKETS), c["market"] + 1, 0), paths)
    c["price_ticks"] = mark + rng.integers(-12, 13, n) * np.maximum(mark // 400, 1)
    c["qty_lots"] = np.where(rng.random(n) < 0.1, rng.integers(0, 700, n), rng.integers(1, 40, n))
    c["cid"] = rng.integers(0, 6, n)
    # oids are assigned from 1 to accepted orders, about one in seven commands: aim near there
    recent_oid = np.maximum(np.arange(n) // 7 - rng.integers(0, 25, n), 1)
    c["oid"] = np.where(rng.random(n) < 0.6, 0, recent_oid)
    c["side"] = rng.integers(0, 2, n)
    c["kind"] = rng.choice([KIND_LIMIT, KIND_MARKET, *CONDITIONAL_KINDS, 7], n,
                           p=[0.68, 0.12, 0.04, 0.06, 0.04, 0.05, 0.01])
    c["tif"] = rng.choice([TIF_GTC, TIF_IOC, TIF_FOK, TIF_POST_ONLY, 9], n,
                          p=[0.55, 0.15, 0.1, 0.19, 0.01])
    conditional = np.isin(c["kind"], CONDITIONAL_KINDS)
    by_last = rng.random(n) < np.where(conditional, 0.5, 0.01)
    c["flags"] = (np.where(rng.random(n) < 0.25, FLAG_REDUCE_ONLY, 0)
                  | np.where(by_last, FLAG_TRIGGER_BY_LAST, 0))
    c["stp"] = rng.integers(0, 3, n)
    c["req"] = np.arange(n) + 1
    trigger = mark + rng.integers(-12, 13, n) * np.maximum(mark // 400, 1)
    c["amount_atoms"] = rng.integers(1, 3_000_000, n)
    c["cmd"] = rng.choice(
        [CMD_NEW_ORDER, CMD_CANCEL, CMD_AMEND, CMD_CANCEL_ALL, CMD_SET_MARK, CMD_DEPOSIT,
         CMD_WITHDRAW, CMD_HALT, CMD_RESUME, 99, CMD_SET_MARGIN, CMD_FUNDING, CMD_LIQUIDATE,
         CMD_INSURANCE_DEPOSIT],
        n, p=[0.445, 0.15, 0.13, 0.02, 0.08, 0.02, 0.033, 0.002, 0.02, 0.005, 0.025, 0.01, 0.055,
              0.005])
    # a conditional order's trigger price rides in amount_atoms, near the mark like prices
    c["amount_atoms"] = np.where(conditional & (c["cmd"] == CMD_NEW_ORDER), trigger,
                                 c["amount_atoms"])
    # risk commands: marks set to the walk, margin settings,
    # funding rates around the cap, liquidation of cross accounts or isolated positions
    mark_move = c["cmd"] == CMD_SET_MARK
    c["price_ticks"] = np.where(mark_move, mark, c["price_ticks"])
    set_margin = c["cmd"] == CMD_SET_MARGIN
    c["kind"] = np.where(set_margin, rng.choice([MARGIN_CROSS, MARGIN_ISOLATED, 2], n,
                                                p=[0.45, 0.5, 0.05]), c["kind"])
    c["qty_lots"] = np.where(set_margin, rng.integers(0, 23, n), c["qty_lots"])
    c["oid"] = np.where(c["cmd"] == CMD_FUNDING,
                        rng.integers(-FUNDING_CAP_E9 - 100, FUNDING_CAP_E9 + 100, n), c["oid"])
    liquidate = c["cmd"] == CMD_LIQUIDATE
    c["market"] = np.where(liquidate, rng.choice([-1, -1, 0, 1, 2], n), c["market"])
    # amends change only price or only quantity half of the time
    amend = c["cmd"] == CMD_AMEND
    which = rng.integers(0, 3, n)
    c["price_ticks"] = np.where(amend & (which == 1), 0, c["price_ticks"])
    c["qty_lots"] = np.where(amend & (which == 2), 0, c["qty_lots"])
    c["market"] = np.where(c["cmd"] == CMD_CANCEL_ALL, np.where(which == 0, -1, c["market"]),
                           c["market"])
    if account_states:
        extra = np.random.default_rng(seed + 1_000_003)
        at = extra.random(n) < 0.004
        c["cmd"][at] = CMD_SET_ACCOUNT_STATE
        c["qty_lots"][at] = extra.choice([1, 0, 2], at.sum(), p=[0.4, 0.55, 0.05])
    # market states (mostly back to trading, 4 is invalid), and in the last twentieth a rare
    # settlement at the walk's mark (a settled market takes no orders again)
    state = rng.random(n) < 0.008
    c["cmd"] = np.where(state, CMD_SET_MARKET_STATE, c["cmd"])
    c["kind"] = np.where(state, rng.choice([0, 0, 0, 0, 1, 2, 2, 3, 4], n), c["kind"])
    settle = (np.arange(n) > 0.95 * n) & (rng.random(n) < 0.002)
    c["cmd"] = np.where(settle, CMD_SETTLE_MARKET, c["cmd"])
    c["price_ticks"] = np.where(settle, mark, c["price_ticks"])
    return c


# A hypothesis strategy: the same vocabulary as random_stream, drawn field by field so failures
# shrink to a handful of small commands.
_command = hs.fixed_dictionaries({
    "cmd": hs.sampled_from([CMD_NEW_ORDER] * 5 + [CMD_CANCEL, CMD_AMEND, CMD_CANCEL_ALL,
                                                  CMD_SET_MARK, CMD_WITHDRAW, CMD_HALT,
                                                  CMD_RESUME, CMD_SET_MARGIN, CMD_FUNDING,
                                                  CMD_LIQUIDATE, CMD_LIQUIDATE,
                                                  CMD_SET_ACCOUNT_STATE, CMD_INSURANCE_DEPOSIT,
                                                  CMD_SET_MARKET_STATE, CMD_SETTLE_MARKET]),
    "market": hs.sampled_from([0, 0, 1, -1, 2]),
    "account": hs.integers(0, 4),
    "side": hs.integers(0, 1),
    "kind": hs.sampled_from([KIND_LIMIT, KIND_LIMIT, KIND_MARKET, *CONDITIONAL_KINDS]),
    "tif": hs.sampled_from([TIF_GTC, TIF_IOC, TIF_FOK, TIF_POST_ONLY]),
    "flags": hs.sampled_from([0, 0, FLAG_REDUCE_ONLY, FLAG_TRIGGER_BY_LAST,
                              FLAG_TRIGGER_BY_LAST | FLAG_REDUCE_ONLY]),
    "trigger_off": hs.integers(-6, 6),
    "stp": hs.integers(0, 2),
    "price_off": hs.integers(-6, 6),
    "qty_lots": hs.integers(0, 60),
    "cid": hs.integers(0, 3),
    "oid": hs.integers(0, 12),
    "amount_atoms": hs.integers(1, 5_000_000),
})
command_lists = hs.lists(_command, min_size=1, max_size=60)


def commands_from_dicts(items: list[dict]) -> np.ndarray:
    c = new_commands(len(items))
    for i, item in enumerate(items):
        m = item["market"]
        mark = MARK_TICKS[m] if m in MARKETS else 500
        for k, v in item.items():
            if k not in ("price_off", "trigger_off"):
                c[i][k] = v
        # marks move 5x wider than order prices (liquidations need real moves); funding rates
        # straddle the cap
        steps = item["price_off"] * (5 if item["cmd"] == CMD_SET_MARK else 1)
        c[i]["price_ticks"] = mark + steps * max(mark // 400, 1)
        if item["cmd"] == CMD_FUNDING:
            c[i]["oid"] = (item["oid"] - 6) * 1_000_000
        if item["cmd"] == CMD_NEW_ORDER and item["kind"] in CONDITIONAL_KINDS:
            c[i]["amount_atoms"] = mark + item["trigger_off"] * max(mark // 400, 1)
        c[i]["ts_ns"] = i
        c[i]["req"] = i + 1
    return c
