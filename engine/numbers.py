"""Exact integer arithmetic shared by the reference model and the compiled matcher.

Everything here is int64-safe for the operands a market's limits allow (see
`engine.market_checks.market_limits_problem`): products are split so no intermediate exceeds
2**63.
They are compiled with numba and called both by the matcher's compiled code and by the
plain-Python reference model, so both sides round identically by construction.
"""

from numba import njit

kernel = njit(cache=True, nogil=True)

RATE_ONE_E9 = 1_000_000_000


@kernel
def mul_div_floor(a, b, d):
    """floor(a * b / d) for a >= 0, b >= 0, d > 0 without forming a * b.

    Exact when (a % d) * b fits in int64, i.e. when b < 2**63 / d.
    """
    q = a // d
    r = a - q * d
    return q * b + (r * b) // d


@kernel
def mul_div_ceil(a, b, d):
    """ceil(a * b / d) for a >= 0, b >= 0, d > 0, under the same bounds as mul_div_floor."""
    q = a // d
    r = a - q * d
    return q * b + (r * b + d - 1) // d


@kernel
def fee_atoms(notional_atoms, fee_e9):
    """Fee on a notional, rounded in the exchange's favour.

    A positive rate is charged rounded up; a negative rate (a maker rebate) is paid rounded
    down, so the venue never pays out a fraction of an atom it did not collect.
    """
    if fee_e9 >= 0:
        return mul_div_ceil(notional_atoms, fee_e9, RATE_ONE_E9)
    return -mul_div_floor(notional_atoms, -fee_e9, RATE_ONE_E9)


@kernel
def cost_share(cost_atoms, part_lots, whole_lots):
    """The share of a position's signed cost basis carried by part_lots of whole_lots.

    Truncates toward zero. Any truncation stays in the remaining position's cost basis, so the
    sum of balances and cost bases (and hence collateral) is unchanged by rounding.
    """
    if part_lots == whole_lots:
        return cost_atoms
    if cost_atoms >= 0:
        return mul_div_floor(cost_atoms, part_lots, whole_lots)
    return -mul_div_floor(-cost_atoms, part_lots, whole_lots)


@kernel
def position_after_fill(size_lots, cost_atoms, delta_lots, price_ticks, atoms_per_tick_lot):
    """Apply a fill of delta_lots (signed: + buys) at price_ticks to a net position.

    Returns (size_lots, cost_atoms, realized_atoms). The cost basis is the signed notional of
    the open position at its entry prices; closing lots take their share of it, and a fill
    that flips the position opens the rest at the fill price.
    """
    if size_lots == 0 or (size_lots > 0) == (delta_lots > 0):
        return size_lots + delta_lots, cost_atoms + delta_lots * price_ticks * atoms_per_tick_lot, 0
    whole = size_lots if size_lots > 0 else -size_lots
    wanted = delta_lots if delta_lots > 0 else -delta_lots
    close = wanted if wanted < whole else whole
    removed = cost_share(cost_atoms, close, whole)
    closing_delta = close if delta_lots > 0 else -close
    realized = -(closing_delta * price_ticks * atoms_per_tick_lot) - removed
    size_lots = size_lots + closing_delta
    cost_atoms = cost_atoms - removed
    rest = delta_lots - closing_delta
    if rest != 0:
        size_lots += rest
        cost_atoms += rest * price_ticks * atoms_per_tick_lot
    return size_lots, cost_atoms, realized
