"""Funding: Binance's premium index and funding rate, in integer 1e-9 rates.

Source: Binance, "Introduction to Binance Futures Funding Rates"
  https://www.binance.com/en/support/faq/360033525031
(and "Leverage and Margin of USDⓈ-M Futures" for the impact margin notional):

    Funding Rate (F) = Premium Index (P) + clamp(Interest Rate (I) - Premium Index (P), 0.05%, -0.05%)
    Premium Index (P) = [Max(0, Impact Bid Price - Price Index) - Max(0, Price Index - Impact Ask
                        Price)] / Price Index
    Impact Bid/Ask Price = the average fill price to execute the Impact Margin Notional on the
                        bid/ask side
    Impact Margin Notional (IMN) = 200 USDT / initial margin rate at maximum leverage
                        (Binance's example: BNBUSDT at 20x, rate 5%: IMN = 4,000 USDT)
    The premium index is calculated every 5 seconds; the funding rate uses the time-weighted
    average of the interval's premium indexes: (1 x P1 + 2 x P2 + ... + n x Pn) / (1 + 2 + ... + n).
    "if (I - P) is within +/-0.05% then F = P + (I - P) = I."

Then Binance caps the rate (clamp(F, -cap, cap)); our cap is the market's `funding_cap`.
Our interest rate is the market's `interest_rate`, already per funding interval.

Units and rounding. Prices are ticks, notionals atoms (1e-6 USDC), rates e9 (1e-9). Impact
prices are exact fractions of ticks; each sample's premium is rounded once, to the nearest e9
(halves to even), which is the precision the rate travels in; the weighted average is exact
over those integers and rounded the same way; clamp and cap are exact on integers. Nothing in
a FUNDING command passes through a float.

Our rules where Binance says nothing:
- a book side that cannot fill the whole IMN has no impact price: its term counts 0 (a thin
  book is no evidence of a premium). An empty book samples a premium of 0.
- samples are taken on riskd ticks, at most one per `funding_sample_ms` slot of the epoch;
  a market without an index takes none. At a boundary with no sample in the interval (the
  market had no index while riskd ran) riskd sends no FUNDING.
- riskd persists nothing: a riskd restarted mid-interval averages only the samples it took
  since, and a riskd that is down at a boundary sends no FUNDING for that interval (the
  matcher does not know the schedule; a late FUNDING would charge positions opened after the
  boundary). A riskd stalled across several boundaries sends one FUNDING, not one per interval.
"""

from __future__ import annotations

from fractions import Fraction

RATE_E9 = 1_000_000_000
NS_PER_S = 1_000_000_000
IMPACT_MARGIN_ATOMS = 200 * 1_000_000        # 200 USDC of margin
INTEREST_CLAMP_E9 = 500_000                  # 0.05%


def impact_notional_atoms(max_leverage: int) -> int:
    """IMN = 200 USDC / (1 / max_leverage)."""
    return IMPACT_MARGIN_ATOMS * max_leverage


def impact_price(levels, notional_atoms: int, atoms_per_tick_lot: int) -> Fraction | None:
    """The average fill price (fractional ticks) of taking `notional_atoms` from a book side.

    `levels`: (price_ticks, qty_lots) best first. The last level used is taken in part, so
    the fill is exactly the notional: avg = notional / lots, lots = whole levels + the rest of
    the notional / (price x atoms_per_tick_lot). None when the side holds less notional."""
    filled_atoms = 0
    lots = Fraction(0)
    for price_ticks, qty_lots in levels:
        level_atoms = price_ticks * qty_lots * atoms_per_tick_lot
        if filled_atoms + level_atoms >= notional_atoms:
            lots += Fraction(notional_atoms - filled_atoms, price_ticks * atoms_per_tick_lot)
            return Fraction(notional_atoms, atoms_per_tick_lot) / lots
        filled_atoms += level_atoms
        lots += qty_lots
    return None


def round_e9(x: Fraction) -> int:
    """To the nearest integer, halves to even (Python's round on a Fraction)."""
    return round(x)


def premium_e9(index_ticks: int, impact_bid: Fraction | None,
               impact_ask: Fraction | None) -> int:
    above = max(Fraction(0), impact_bid - index_ticks) if impact_bid is not None else 0
    below = max(Fraction(0), index_ticks - impact_ask) if impact_ask is not None else 0
    return round_e9(Fraction(above - below) * RATE_E9 / index_ticks)


def funding_rate_e9(average_premium_e9: int, interest_e9: int, cap_e9: int) -> int:
    """F = P + clamp(I - P, -0.05%, 0.05%), then clamp(F, -cap, cap)."""
    damped = min(max(interest_e9 - average_premium_e9, -INTEREST_CLAMP_E9), INTEREST_CLAMP_E9)
    return min(max(average_premium_e9 + damped, -cap_e9), cap_e9)


class PremiumAverage:
    """The interval's premium samples, time-weighted as Binance: sample i (from 1) weighs i."""

    def __init__(self):
        self.count = 0
        self._weighted_sum_e9 = 0

    def add(self, premium_e9: int) -> None:
        self.count += 1
        self._weighted_sum_e9 += self.count * premium_e9

    def average_e9(self) -> int:
        """0 with no sample."""
        if not self.count:
            return 0
        return round_e9(Fraction(2 * self._weighted_sum_e9, self.count * (self.count + 1)))


def next_funding_ns(now_ns: int, interval_s: int) -> int:
    """The first boundary strictly after now, boundaries at multiples of the interval since the
    epoch (8 h: 00:00, 08:00, 16:00 UTC, as Binance)."""
    interval_ns = interval_s * NS_PER_S
    return (now_ns // interval_ns + 1) * interval_ns


class FundingSchedule:
    """One market's funding: samples, the running estimate, and the boundaries.

    Per riskd tick: `settle(now)` first (the rate of an interval that has ended, or None), then
    `sample(now, premium)` when the market has an index. `estimate_e9()` is the rate that would
    be charged if the interval ended now, for market data."""

    def __init__(self, spec, sample_ms: int, now_ns: int):
        self.interval_s = spec.funding_interval_s
        self.interest_e9 = spec.interest_rate_e9
        self.cap_e9 = spec.funding_cap_e9
        self.impact_notional_atoms = impact_notional_atoms(spec.max_leverage)
        self.sample_ns = sample_ms * 1_000_000
        self.next_funding_ns = next_funding_ns(now_ns, self.interval_s)
        self.premiums = PremiumAverage()
        self.last_rate_e9 = 0          # the rate of the last FUNDING this riskd sent
        self._last_slot = -1

    def due(self, now_ns: int) -> bool:
        return now_ns >= self.next_funding_ns

    def sample_due(self, now_ns: int) -> bool:
        return now_ns // self.sample_ns > self._last_slot

    def sample(self, now_ns: int, premium: int) -> None:
        self._last_slot = now_ns // self.sample_ns
        self.premiums.add(premium)

    def estimate_e9(self) -> int:
        return funding_rate_e9(self.premiums.average_e9(), self.interest_e9, self.cap_e9)

    def settle(self, now_ns: int) -> int | None:
        """At or past the boundary: the interval's rate (None without samples); starts the
        next interval. The caller sends FUNDING and then calls `sent(rate)`."""
        if not self.due(now_ns):
            return None
        rate = self.estimate_e9() if self.premiums.count else None
        self.premiums = PremiumAverage()
        self.next_funding_ns = next_funding_ns(now_ns, self.interval_s)
        return rate

    def sent(self, rate_e9: int) -> None:
        self.last_rate_e9 = rate_e9
