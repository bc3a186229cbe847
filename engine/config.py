"""Capacities of the matcher's state, and the int64 headroom rules every market must pass."""

from dataclasses import dataclass

from engine.numbers import kernel
from engine.records import MAX_BRACKETS

MAX_MARKETS_LIMIT = 64
# A market's largest position (or open exposure) at its largest price must stay below this many
# atoms (2**54 atoms = 18 billion USDC): summed over 64 markets with the balance cap, equity,
# margin and cost basis stay far inside int64.
NOTIONAL_LIMIT_ATOMS = 2 ** 54
MAX_BALANCE_ATOMS = 2 ** 60
# Deposits minus withdrawals over the whole exchange: keeps the collateral total in int64.
MAX_NET_DEPOSITS_ATOMS = 3 * 2 ** 61
# cost_share() multiplies a remainder (< position) by a part (<= position): position**2 < 2**63.
MAX_POSITION_LOTS_LIMIT = 3_000_000_000
MAX_FEE_E9 = 100_000_000          # 10%
MAX_LEVERAGE = 1000
MAX_OPEN_ORDERS_LIMIT = 1_000_000
RATE_ONE_E9 = 1_000_000_000
# Work one LIQUIDATE does at most, so its events stay bounded (docs/risk.md): IOC steps into the
# book per position, and counterparties auto-deleveraged per position. A position that needs
# more stays liquidatable, and riskd sends LIQUIDATE again.
LIQUIDATION_MAX_STEPS = 32
ADL_MAX_COUNTERPARTIES = 32


@dataclass(frozen=True)
class EngineConfig:
    max_accounts: int = 1024
    max_markets: int = 8
    max_orders: int = 1 << 16
    # price levels per book side: book_levels_needed() says how many a market can come to use
    max_levels_per_side: int = 1 << 16
    # untriggered stop / take-profit orders per market: bounds what one price move can set off
    max_trigger_orders: int = 1024

    def __post_init__(self):
        if not 1 <= self.max_markets <= MAX_MARKETS_LIMIT:
            raise ValueError(f"max_markets must be 1..{MAX_MARKETS_LIMIT}")
        for name in ("max_accounts", "max_orders", "max_levels_per_side", "max_trigger_orders"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_accounts >= 2 ** 31:
            raise ValueError("max_accounts must fit in int32")

    def event_bound(self) -> int:
        """Most events one command can cause: a LIQUIDATE's (each resting order canceled or
        traded, and reduce-only ones swept, plus its steps and ADL per market, plus what the
        trigger books of those markets set off after), or a FUNDING's (one per account), or a
        SETTLE_MARKET's (every order canceled, three per account); `_event_bound`
        (engine/core/batch.py) and `_trigger_bound` (engine/core/triggers.py) have the
        per-command counts.

        Event rings can be much smaller: a command whose worst case exceeds the ring runs
        alone into an overflow buffer of this size (Matcher.process_oversized).
        """
        per_market = 3 * LIQUIDATION_MAX_STEPS + 2 * ADL_MAX_COUNTERPARTIES + 4
        # the trigger books: 8 + 2R + 5T per market, R + T orders in the pool
        triggers = (8 * self.max_markets + 2 * self.max_orders
                    + 3 * min(self.max_orders, self.max_markets * self.max_trigger_orders))
        # one event per account for FUNDING; SETTLE_MARKET's close and deficit cover: three
        return (3 * self.max_orders + self.max_markets * per_market + 3 * self.max_accounts + 32
                + triggers)


def book_levels_needed(max_price_ticks: int, max_orders: int) -> int:
    """The price levels one book side of a market can come to hold, so that a side sized to
    it never refuses a new price before the order pool refuses the order (docs/risk.md, "What
    stuffing costs now"). A level is one distinct price of resting orders, so there are at most
    `max_orders` (the pool of all markets). And any price in [1, max_price] can carry a resting
    order of either side: the price band is checked at entry against the mark of then, orders
    rest until canceled, and the mark may be anywhere up to max_price (riskd clamps it there,
    SET_MARK refuses more), so after the mark has moved the levels of several bands add up. The
    band at one mark is the smaller count an attacker needs to lock out new prices until the
    mark moves, `band_ticks` below."""
    return min(max_price_ticks, max_orders)


def band_ticks(mark_ticks: int, price_band_e9: int, max_price_ticks: int) -> int:
    """The prices inside the band at this mark, both edges included and clipped to
    [1, max_price]: where a side's new orders may rest (a bid above the mark rests when no ask
    is at or below it). engine/reference.py `_outside_band` is the rule it counts."""
    dev = mark_ticks * price_band_e9 // RATE_ONE_E9
    return min(mark_ticks + dev, max_price_ticks) - max(mark_ticks - dev, 1) + 1


# Why a market's parameters are refused, by problem code (0 = none). The checks are compiled
# so the matcher runs the very code the config loader runs.
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
