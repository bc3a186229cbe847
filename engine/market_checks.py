"""The checks every market's settings must pass (engine/config.py has the limits they
enforce): compiled, so the matcher runs the very code the config loader and the reference
model run. A problem code (0 = none) names its reason in MARKET_PROBLEMS."""

from engine.config import (MAX_FEE_E9, MAX_LEVERAGE, MAX_OPEN_ORDERS_LIMIT,
                           MAX_POSITION_LOTS_LIMIT, NOTIONAL_LIMIT_ATOMS, RATE_ONE_E9)
from engine.numbers import kernel
from engine.records import MAX_BRACKETS

# Why a market's parameters are refused, by problem code (0 = none).
MARKET_PROBLEMS = {
    1: "tick x lot must be a whole number of atoms (atoms_per_tick_lot >= 1)",
    2: "initial mark must be >= 1 tick",
    3: "taker fee must be in [0, 10%]",
    4: "maker fee must be in [-taker fee, 10%] (a rebate may not exceed the taker fee)",
    5: "price band must be in (0, 1)",
    6: f"max leverage must be in [1, {MAX_LEVERAGE}]",
    7: "limits must be positive",
    8: "max position too large for exact cost-basis arithmetic",
    9: "max order larger than max position",
    10: f"max open orders must be <= {MAX_OPEN_ORDERS_LIMIT}",
    11: "max price x max position exceeds the int64 notional headroom",
    12: "the market's mark is above its max price",
    13: "liquidation fee and funding cap must be in [0, 1)",
    14: "brackets are set in index order (at most 8), the first at notional 0, floors rising",
    15: "maintenance rates must be in (0, 1), not falling, the first below 1/max_leverage",
    16: "a bracket's max leverage must be in [1, the market's max leverage], not rising with the"
        " notional, and its initial rate 1/leverage above its maintenance rate",
    17: "min notional, stop orders per account and open-interest cap must be >= 0 and in range",
}


@kernel
def market_config_problem(atoms_per_tick_lot, initial_mark_ticks, maker_fee_e9, taker_fee_e9,
                          price_band_e9, max_leverage):
    if atoms_per_tick_lot < 1:
        return 1
    if initial_mark_ticks < 1:
        return 2
    if not 0 <= taker_fee_e9 <= MAX_FEE_E9:
        return 3
    if not -taker_fee_e9 <= maker_fee_e9 <= MAX_FEE_E9:
        return 4
    if not 1 <= price_band_e9 < 1_000_000_000:
        return 5
    if not 1 <= max_leverage <= MAX_LEVERAGE:
        return 6
    return 0


@kernel
def market_limits_problem(atoms_per_tick_lot, mark_ticks, max_price_ticks, max_order_lots,
                          max_position_lots, max_open_orders):
    if max_price_ticks < 1 or max_order_lots < 1 or max_position_lots < 1 or max_open_orders < 1:
        return 7
    if max_position_lots > MAX_POSITION_LOTS_LIMIT:
        return 8
    if max_order_lots > max_position_lots:
        return 9
    if max_open_orders > MAX_OPEN_ORDERS_LIMIT:
        return 10
    # Written as divisions so the check itself cannot overflow.
    if max_price_ticks > NOTIONAL_LIMIT_ATOMS // atoms_per_tick_lot // max_position_lots:
        return 11
    if mark_ticks > max_price_ticks:
        return 12
    return 0


@kernel
def market_risk_problem(liquidation_fee_e9, funding_cap_e9):
    if not (0 <= liquidation_fee_e9 < RATE_ONE_E9 and 0 <= funding_cap_e9 < RATE_ONE_E9):
        return 13
    return 0


@kernel
def market_filters_problem(min_notional_atoms, max_stop_orders, open_interest_cap_lots):
    if not (0 <= min_notional_atoms <= NOTIONAL_LIMIT_ATOMS
            and 0 <= max_stop_orders <= MAX_OPEN_ORDERS_LIMIT
            and 0 <= open_interest_cap_lots <= MAX_POSITION_LOTS_LIMIT * MAX_OPEN_ORDERS_LIMIT):
        return 17
    return 0


@kernel
def bracket_leverage(leverage, rate_e9, prev_leverage):
    """A bracket's max leverage as SET_BRACKET resolves it: `leverage`, or when 0 the default,
    the largest whole leverage whose initial rate 1/L is above the maintenance rate, at most the
    previous bracket's (the first bracket's previous is the market's max leverage)."""
    if leverage != 0 or not 0 < rate_e9 < RATE_ONE_E9:
        return leverage
    default = (RATE_ONE_E9 - 1) // rate_e9
    return default if default < prev_leverage else prev_leverage


@kernel
def bracket_problem(n_brackets, index, floor_atoms, rate_e9, prev_floor_atoms, prev_rate_e9,
                    max_leverage, leverage, prev_leverage):
    """Why SET_BRACKET `index` cannot follow the n_brackets already set (0 = it can).

    Rates may repeat (the config allows equal rates); floors must rise. `leverage` is the
    bracket's resolved max leverage (bracket_leverage), `prev_leverage` the previous bracket's
    (the market's max for the first): leverage x rate < 1e9 proves the initial margin of every
    position is above its maintenance margin.
    """
    if index != n_brackets or index >= MAX_BRACKETS:
        return 14
    if floor_atoms < 0 or floor_atoms > NOTIONAL_LIMIT_ATOMS:
        return 14
    if (index == 0 and floor_atoms != 0) or (index > 0 and floor_atoms <= prev_floor_atoms):
        return 14
    if not 0 < rate_e9 < RATE_ONE_E9:
        return 15
    if index == 0 and rate_e9 * max_leverage >= RATE_ONE_E9:
        return 15
    if index > 0 and rate_e9 < prev_rate_e9:
        return 15
    if not 1 <= leverage <= prev_leverage or leverage > max_leverage:
        return 16
    if leverage * rate_e9 >= RATE_ONE_E9:
        return 16
    return 0
