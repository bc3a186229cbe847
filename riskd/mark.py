"""The mark price: Binance's method for perpetual futures, in exact integer ticks.

Source: Binance, "What Are Mark Price and Price Index in USDⓈ-Margined Futures?"
  https://www.binance.com/en/support/faq/what-are-mark-price-and-price-index-in-usd%E2%93%A2-margined-futures-360033525071
and the same method as Binance publishes it for COIN-M perpetuals ("Mark Price in Perpetual
Futures", https://www.binance.com/en/support/faq/fff6ec1b3f5845d19f1fb924644a0877):

    Mark Price = Median (Price 1, Price 2, Contract Price)
    Price 1 = Price Index * (1 + Last Funding Rate * (Time Until Funding / 8))
    Price 2 = Price Index + Moving Average (N-Minute Basis)
    Moving Average (N-Minute Basis) = sum of [(Bid1_i + Ask1_i)/2 - PI_i] / (number of points)
    Median: If Price 1 < Price 2 < Contract Price, then take Price 2 as Mark Price.

"8" is the funding interval in hours: we use time until next funding / funding interval (the
market's funding_interval_s), as the USDⓈ-M page does for contracts with other intervals. The
contract price is the last traded price. Binance has changed the basis window over the years
(30 minutes, 5 minutes, 1 minute; since 2025-09-18 30 seconds sampled every second, per its
announcement "Binance Futures Will Update the Funding Rate Formula and Mark Price Calculations");
we follow the 5-minute window sampled every second (`BASIS_WINDOW_S`, `BASIS_SAMPLE_S`).

Missing components drop out (Binance says nothing for an empty book; this is our rule):
- Price 2 exists once the window holds at least one basis sample, i.e. a second in the last
  five minutes when the book had both a best bid and a best ask (a one-sided or empty book
  takes no sample that second, like a failed sample);
- the contract price exists once the market has traded;
- Price 1 always exists while there is an index (with funding rate 0 it is the index).
The mark is the median of those present; the median of two is their mean. So with only the
index, mark = index. Without an index there is no mark (riskd sends nothing).

Arithmetic is exact (fractions of ticks) up to one final rounding: to the nearest tick, exact
halves to the even tick (unbiased: a mark that sits on a half tick does not drift one way),
then clamped to [1, max_price_ticks] (the matcher refuses anything outside).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from fractions import Fraction

NS_PER_S = 1_000_000_000
RATE_E9 = 1_000_000_000
BASIS_WINDOW_S = 300
BASIS_SAMPLE_S = 1


@dataclass(frozen=True)
class MarkParts:
    """One mark computation, its components in (fractional) ticks; None = dropped out."""
    price1: Fraction
    price2: Fraction | None
    contract_ticks: int | None
    mark_ticks: int


def median(values: list) -> Fraction:
    """The median; of an even count, the mean of the two middle values."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return Fraction(ordered[mid])
    return Fraction(ordered[mid - 1] + ordered[mid], 2)


def price1(index_ticks: int, funding_rate_e9: int, now_ns: int, next_funding_ns: int,
           interval_s: int) -> Fraction:
    """index x (1 + rate x time until funding / interval), the time clamped to [0, interval]."""
    interval_ns = interval_s * NS_PER_S
    until_ns = min(max(next_funding_ns - now_ns, 0), interval_ns)
    scale = RATE_E9 * interval_ns
    return Fraction(index_ticks * (scale + funding_rate_e9 * until_ns), scale)


class BasisWindow:
    """The per-second basis samples of the last `window_s` seconds, and their average.

    A sample is (bid1 + ask1)/2 - index; kept doubled (bid1 + ask1 - 2 x index) so it is a whole
    number of half ticks. At most one sample per `sample_s` period; samples leave the window
    `window_s` after theirs. A running sum keeps the average O(1).
    """

    def __init__(self, window_s: int = BASIS_WINDOW_S, sample_s: int = BASIS_SAMPLE_S):
        self.window_s = window_s
        self.sample_s = sample_s
        self._samples: deque = deque()       # (period, doubled basis), oldest first
        self._sum_half_ticks = 0

    def add(self, now_ns: int, index_ticks: int, bid_ticks: int, ask_ticks: int) -> None:
        period = now_ns // (self.sample_s * NS_PER_S)
        if self._samples and self._samples[-1][0] >= period:
            return
        doubled = bid_ticks + ask_ticks - 2 * index_ticks
        self._samples.append((period, doubled))
        self._sum_half_ticks += doubled

    def average(self, now_ns: int) -> Fraction | None:
        """The moving average in ticks over the window ending now; None with no sample."""
        oldest = now_ns // (self.sample_s * NS_PER_S) - self.window_s // self.sample_s
        while self._samples and self._samples[0][0] <= oldest:
            self._sum_half_ticks -= self._samples.popleft()[1]
        if not self._samples:
            return None
        return Fraction(self._sum_half_ticks, 2 * len(self._samples))


class MarkCalculator:
    """One market's mark: keeps the basis window; `mark_ticks` is called once per riskd tick."""

    def __init__(self, max_price_ticks: int, window_s: int = BASIS_WINDOW_S,
                 sample_s: int = BASIS_SAMPLE_S):
        self.max_price_ticks = max_price_ticks
        self.basis = BasisWindow(window_s, sample_s)
        self.last: MarkParts | None = None

    def mark_ticks(self, now_ns: int, index_ticks: int, best_bid_ticks: int | None,
                   best_ask_ticks: int | None, last_trade_ticks: int | None,
                   funding_rate_e9: int, next_funding_ns: int, interval_s: int) -> int:
        if best_bid_ticks is not None and best_ask_ticks is not None:
            self.basis.add(now_ns, index_ticks, best_bid_ticks, best_ask_ticks)
        p1 = price1(index_ticks, funding_rate_e9, now_ns, next_funding_ns, interval_s)
        average = self.basis.average(now_ns)
        p2 = None if average is None else index_ticks + average
        present = [p for p in (p1, p2, last_trade_ticks) if p is not None]
        mark = min(max(round(median(present)), 1), self.max_price_ticks)
        self.last = MarkParts(p1, p2, last_trade_ticks, mark)
        return mark
