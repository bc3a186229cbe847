"""Capacities of the matcher's state, and the int64 headroom limits every market must keep.

Plain Python: the CLI and every process read it without loading the compiler. The compiled
checks of a market's settings against these limits are in engine/market_checks.py."""

from dataclasses import dataclass

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
