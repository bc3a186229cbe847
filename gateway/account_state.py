"""`account_state`: an account's margin picture, read from the matcher's own tables.

Balances, isolated margins, leverage and margin modes, funding and liquidation effects follow
rules that only the matcher applies; re-deriving them from events would be a second copy of
those rules. So the gateway (and `perpx account show`) copies the account's few rows out of the
matcher's shared state at a command boundary (`account_tables`) and hands them to
engine/risk.py's `account_risk`, the same formulas riskd's scanner and the reference model use.
What the client gets is exact at the seq it carries.

Cost: one account row, one position row per market and the market table (a few KB), copied
twice and compared: ~50 µs per query, plus ~50 µs for engine/risk.py and the formatting (4
markets; tests/test_gateway_risk.py prints both). The matcher is never stopped: the copy is
retried until it falls between two command batches. It is a query's cost, not the order path's.
"""

from __future__ import annotations

from decimal import Decimal, localcontext
from types import SimpleNamespace

import numpy as np

from engine.risk import account_risk
from gateway.codec import MARGIN_MODE_NAMES
from engine.units import atoms_str
from gateway.mirror import consistent_copy

# entry prices are averages: shown with this many decimals beyond the tick's
ENTRY_EXTRA_DIGITS = 6


def account_tables(state, events, account: int, timeout_s: float = 1.0):
    """(tables, seq): the account's rows as a one-account State (the account is row 0) and
    the markets, copied at a command boundary; `seq` is the last command they include."""
    def take(st):
        return {"accounts": np.array(st.accounts[account:account + 1]),
                "positions": np.array(st.positions[account:account + 1]),
                "markets": np.array(st.markets)}
    tables, seq = consistent_copy(state, events, take, timeout_s, pause_s=0.0001)
    return SimpleNamespace(**tables), seq


def entry_price(cost_atoms: int, size_lots: int, market) -> str | None:
    """The average entry price (cost per lot, in the price unit), ENTRY_EXTRA_DIGITS decimals
    finer than the tick and rounded half-even; None without a position."""
    if not size_lots:
        return None
    with localcontext() as ctx:
        ctx.prec = 60
        value = Decimal(cost_atoms) / (Decimal(size_lots) * market.atoms_per_tick_lot) \
            * market.tick_size
        value = value.quantize(market.tick_size / 10 ** ENTRY_EXTRA_DIGITS).normalize()
    return format(value, "f")


def account_state_fields(st, row: int, market_by_id) -> dict:
    """The `account_state` fields (PROTOCOL.md) of row `row` of State tables `st`.

    Beyond the contract: `cross_equity`, `initial_margin`, and per position `margin`
    (isolated margin, "0" for cross), `maintenance_margin`, `notional`.
    `available` = cross equity - initial margin of orders and cross positions (negative when
    the account is below its initial requirement), as engine/risk.py computes it.
    """
    risk = account_risk(st, row)
    positions = []
    for p in risk["positions"]:
        size = p["size_lots"]
        market = market_by_id[p["market"]] if p["market"] < len(market_by_id) else None
        if market is None or not size:
            continue
        lp = p["liquidation_price_ticks"]
        positions.append({
            "market": market.symbol, "size": market.lots_to_str(size),
            "entry_price": entry_price(p["cost_atoms"], size, market),
            "mark_price": market.ticks_to_str(p["mark_ticks"]),
            "unrealized_pnl": atoms_str(p["upnl_atoms"]),
            "liquidation_price": market.ticks_to_str(lp) if lp is not None else None,
            "mode": MARGIN_MODE_NAMES[p["margin_mode"]], "leverage": p["leverage"],
            "margin": atoms_str(p["isolated_margin_atoms"]),
            "maintenance_margin": atoms_str(p["maintenance_atoms"]),
            "notional": atoms_str(p["notional_atoms"])})
    return {"balance": atoms_str(risk["balance_atoms"]),
            "equity": atoms_str(risk["equity_atoms"]),
            "available": atoms_str(risk["available_atoms"]),
            "maintenance_margin": atoms_str(risk["maintenance_atoms"]),
            "cross_equity": atoms_str(risk["cross_equity_atoms"]),
            "initial_margin": atoms_str(risk["initial_margin_atoms"]),
            "positions": positions}


def positions_rows(st, market_by_id, market: int | None = None) -> list[dict]:
    """Every open position of State tables `st` (one market's, or all), by account: the
    `account_state` position fields plus `account`."""
    sizes = st.positions["size_lots"]
    if market is not None:
        sizes = sizes[:, market:market + 1]
    out = []
    for account in np.flatnonzero((sizes != 0).any(axis=1)).tolist():
        for p in account_state_fields(st, account, market_by_id)["positions"]:
            if market is None or p["market"] == market_by_id[market].symbol:
                out.append(dict(account=account, **p))
    return out
