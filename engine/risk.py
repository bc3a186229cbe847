"""Perpetual risk formulas in plain Python integers (docs/risk.md has the rules and sources).

Shared by the reference model (engine/reference.py, whose rules the compiled matcher must
reproduce event for event), the gateway (account_state) and riskd (the liquidation scanner).
Everything is exact integer arithmetic on Python ints; rounding is stated per function.

Brackets are sequences of (floor_atoms, rate_e9, amount_atoms), ascending by floor, as the
matcher stores them (`market_brackets` reads them from the state tables).

Signatures others call:
    maintenance_atoms(notional_atoms, brackets) -> int
    initial_margin_per_lot_atoms(mark_ticks, atoms_per_tick_lot, leverage) -> int
    bankruptcy_price_ticks(equity_other_atoms, size_lots, cost_atoms, atoms_per_tick_lot) -> int
    liquidation_price_ticks(wallet_balance_atoms, other_maintenance_atoms, other_upnl_atoms,
                            size_lots, cost_atoms, atoms_per_tick_lot, brackets) -> int | None
    market_brackets(st, market) -> list[tuple[int, int, int]]
    market_leverage_caps(st, market) -> list[int]   (each bracket's max leverage)
    effective_leverage(setting, max_leverage, notional_atoms, brackets, caps) -> int
    entry_cost_atoms(side, worst_ticks, qty_lots, mark_ticks, fee_price_ticks,
                     atoms_per_tick_lot, taker_fee_e9, may_take) -> int
    account_risk(st, account) -> dict
    liquidation_targets(st, account) -> list[int]   (LIQUIDATE markets: -1 = cross)
"""

from fractions import Fraction

from engine.records import MARGIN_ISOLATED

RATE_ONE_E9 = 1_000_000_000


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def bracket_index(notional_atoms: int, brackets) -> int:
    """The highest bracket whose floor is <= the notional (-1: no brackets)."""
    k = -1
    for i, (floor_atoms, _rate, _amount) in enumerate(brackets):
        if floor_atoms <= notional_atoms:
            k = i
    return k


def maintenance_atoms(notional_atoms: int, brackets) -> int:
    """Maintenance margin of a position of this notional (atoms, >= 0): Binance USDⓈ-M,
    ceil(notional x rate_k / 1e9) - amount_k with k the highest bracket whose floor <= notional.

    Rounded up (the exchange's favour). A market without brackets requires none: its accounts
    are liquidatable only once their equity is negative.
    """
    k = bracket_index(notional_atoms, brackets)
    if k < 0:
        return 0
    _floor, rate_e9, amount_atoms = brackets[k]
    return _ceil_div(notional_atoms * rate_e9, RATE_ONE_E9) - amount_atoms


def bracket_amounts(floors_and_rates) -> list[tuple[int, int, int]]:
    """(floor, rate) pairs -> brackets with Binance's cumulative maintenance amounts:
    amount_k = amount_{k-1} + floor_k x (rate_k - rate_{k-1}) / 1e9, floor division."""
    out = []
    amount = 0
    prev_rate = 0
    for k, (floor_atoms, rate_e9) in enumerate(floors_and_rates):
        if k:
            amount += floor_atoms * (rate_e9 - prev_rate) // RATE_ONE_E9
        out.append((floor_atoms, rate_e9, amount))
        prev_rate = rate_e9
    return out


def initial_margin_per_lot_atoms(mark_ticks: int, atoms_per_tick_lot: int, leverage: int) -> int:
    """Initial margin of one lot at the mark: ceil(mark x atoms_per_tick_lot / leverage)."""
    return _ceil_div(mark_ticks * atoms_per_tick_lot, leverage)


def effective_leverage(setting: int, max_leverage: int, notional_atoms: int, brackets,
                       caps) -> int:
    """The leverage a position's initial margin is computed at: min(its setting (0: the
    market's max), the max leverage of the bracket its notional falls in). The notional is
    the exposure's (position plus open orders, after the order being checked) at the mark."""
    leverage = setting or max_leverage
    k = bracket_index(notional_atoms, brackets)
    # (a cap of 0: tables filled without SET_BRACKET, e.g. by hand in tests: no cap)
    if k >= 0 and 0 < caps[k] < leverage:
        return caps[k]
    return leverage


def entry_cost_atoms(side: int, worst_ticks: int, qty_lots: int, mark_ticks: int,
                     fee_price_ticks: int, atoms_per_tick_lot: int, taker_fee_e9: int,
                     may_take: bool) -> int:
    """What an order may cost its account at once, beyond initial margin (Binance's "open
    loss", plus the taker fee): qty x max(0, worst - mark) for a buy (mark - worst for a
    sell), worst being the furthest price any of its lots can trade at (a limit order's limit;
    a market order's from a walk of the book: reference._worst_price), and when it may take, the taker fee of qty at
    fee_price (the highest price it can fill at) plus one atom per lot for the rounding of
    each fill's fee. With it in the margin check an accepted order leaves its account's
    equity at the mark at or above its initial margin, so above its maintenance margin
    (docs/risk.md)."""
    gap = worst_ticks - mark_ticks if side == 0 else mark_ticks - worst_ticks
    cost = qty_lots * gap * atoms_per_tick_lot if gap > 0 else 0
    if may_take and taker_fee_e9 > 0:
        cost += _ceil_div(qty_lots * fee_price_ticks * atoms_per_tick_lot * taker_fee_e9,
                          RATE_ONE_E9) + qty_lots
    return cost


def isolated_requirement_atoms(size_lots: int, open_buy_lots: int, open_sell_lots: int,
                               isolated_equity_atoms: int, per_lot_atoms: int) -> int:
    """What an isolated position's open orders need from the cross balance (>= 0).

    Orders that grow the position post per_lot_atoms for each new lot, and top the position
    up to its initial margin (|size| x per_lot) when its equity has fallen below it. Orders on
    the closing side hand the isolated equity (margin + uPnL) back to the balance and post
    margin for any lots beyond the position (a flip), so they drain flip_lots x per_lot -
    isolated equity. The larger drain of the two sides counts; with no position it is
    exposure x per_lot.
    """
    if size_lots >= 0:
        growing, closing = open_buy_lots, open_sell_lots
    else:
        growing, closing = open_sell_lots, open_buy_lots
    drain = growing * per_lot_atoms
    if growing > 0:
        drain += max(abs(size_lots) * per_lot_atoms - isolated_equity_atoms, 0)
    if closing > 0:
        flip = max(closing - abs(size_lots), 0)
        drain = max(drain, flip * per_lot_atoms - isolated_equity_atoms)
    return max(drain, 0)


def bankruptcy_price_ticks(equity_other_atoms: int, size_lots: int, cost_atoms: int,
                           atoms_per_tick_lot: int) -> int:
    """The price at which the position's equity is zero, everything else held fixed.

    equity_other_atoms: what backs the position besides its own PnL (cross: balance plus the
    other cross positions' uPnL at mark; isolated: its isolated margin). Solves
    equity_other + size x P x atoms_per_tick_lot - cost = 0. A long is rounded up and a short
    down, so closing at or beyond it never leaves negative equity. Not clamped: the result
    may be <= 0 or above the market's max price.
    """
    assert size_lots != 0
    num = cost_atoms - equity_other_atoms
    den = size_lots * atoms_per_tick_lot
    if size_lots > 0:
        return _ceil_div(num, den)
    return num // den


def liquidation_price_ticks(wallet_balance_atoms: int, other_maintenance_atoms: int,
                            other_upnl_atoms: int, size_lots: int, cost_atoms: int,
                            atoms_per_tick_lot: int, brackets) -> int | None:
    """Binance USDⓈ-M one-way liquidation price, in ticks; None when it cannot be reached (<= 0).

    LP = (WB - TMM1 + UPNL1 + cumB - Side1 x Position1 x EP1) / (Position1 x MMR_B - Side1 x
    Position1) with Side1 x Position1 x EP1 = the signed entry cost. Cross: WB = the wallet
    balance, TMM1/UPNL1 = maintenance and uPnL of the other cross positions; isolated: WB = the
    isolated margin, TMM1 = UPNL1 = 0. The bracket (MMR_B, cumB) is the one consistent with the
    notional at LP. Rounded to the tick toward the mark (a long up, a short down): the mark
    cannot pass the displayed price without the position becoming liquidatable.
    """
    if size_lots == 0:
        return None
    side = 1 if size_lots > 0 else -1
    lots = abs(size_lots)
    unit = lots * atoms_per_tick_lot
    candidates = list(brackets) or [(0, 0, 0)]
    fallback = None
    for k, (_floor, rate_e9, amount_atoms) in enumerate(candidates):
        num = (wallet_balance_atoms - other_maintenance_atoms + other_upnl_atoms + amount_atoms
               - cost_atoms) * RATE_ONE_E9
        den = unit * (rate_e9 - side * RATE_ONE_E9)
        lp = _ceil_div(num, den) if side > 0 else num // den
        if lp <= 0:
            return None
        if bracket_index(unit * lp, candidates) == k:
            return lp
        if fallback is None:
            fallback = lp
    return fallback


def adl_score(upnl_atoms: int, cost_atoms: int, notional_atoms: int,
              equity_atoms: int) -> Fraction:
    """BitMEX's auto-deleveraging ranking of a position, exactly (higher goes first).

    PnL% = uPnL / |entry value|; effective leverage = |mark value| / (mark value - bankrupt
    value), and mark value - bankrupt value is the equity behind the position (cross: the
    account's cross equity; isolated: isolated margin + uPnL), taken as >= 1 atom. Ranking =
    PnL% x effective leverage when PnL% > 0, PnL% / effective leverage otherwise.
    """
    entry = max(abs(cost_atoms), 1)
    equity = max(equity_atoms, 1)
    notional = max(notional_atoms, 1)
    if upnl_atoms > 0:
        return Fraction(upnl_atoms * notional, entry * equity)
    return Fraction(upnl_atoms * equity, entry * notional)


# ---- reading the matcher's tables ----------------------------------------------------------
def market_brackets(st, market: int) -> list[tuple[int, int, int]]:
    mk = st.markets[market]
    n = int(mk["n_brackets"])
    return [(int(mk["bracket_floor_atoms"][k]), int(mk["bracket_rate_e9"][k]),
             int(mk["bracket_amount_atoms"][k])) for k in range(n)]


def market_leverage_caps(st, market: int) -> list[int]:
    mk = st.markets[market]
    return [int(x) for x in mk["bracket_max_leverage"][:int(mk["n_brackets"])]]


def _position_rows(st, account: int):
    """(market, position row, market row) of every active market where the account holds a
    position or open orders."""
    for m in range(len(st.markets)):
        mk = st.markets[m]
        if not mk["active"]:
            continue
        p = st.positions[account, m]
        if int(p["size_lots"]) != 0 or int(p["open_orders"]) != 0:
            yield m, p, mk


def account_risk(st, account: int) -> dict:
    """An account's margin picture from the State tables (numpy views; e.g. a snapshot).

    Returns {account, balance_atoms, cross_equity_atoms (balance + cross uPnL),
    equity_atoms (cross equity + isolated margins + isolated uPnL), initial_margin_atoms (what
    orders and cross positions require, as the matcher's margin check), available_atoms
    (cross equity - initial margin), maintenance_atoms (cross), liquidatable (cross),
    changed_seq, positions: [...]}; each position is {market, size_lots, cost_atoms (signed
    entry cost), mark_ticks, notional_atoms, upnl_atoms, maintenance_atoms, margin_mode,
    leverage (effective), isolated_margin_atoms, open_buy_lots, open_sell_lots,
    liquidation_price_ticks (None: unreachable or no position), liquidatable}.
    """
    balance = int(st.accounts["balance_atoms"][account])
    rows = []
    cross_upnl = cross_mm = required = iso_equity = 0
    for m, p, mk in _position_rows(st, account):
        size = int(p["size_lots"])
        cost = int(p["cost_atoms"])
        mark = int(mk["mark_ticks"])
        atpl = int(mk["atoms_per_tick_lot"])
        brackets = market_brackets(st, m)
        notional = abs(size) * mark * atpl
        upnl = size * mark * atpl - cost
        mm = maintenance_atoms(notional, brackets) if size else 0
        buy, sell = int(p["open_buy_lots"]), int(p["open_sell_lots"])
        exposure = max(abs(size + buy), abs(size - sell))
        leverage = effective_leverage(int(p["leverage"]), int(mk["max_leverage"]),
                                      exposure * mark * atpl, brackets,
                                      market_leverage_caps(st, m))
        per_lot = initial_margin_per_lot_atoms(mark, atpl, leverage)
        isolated = int(p["margin_mode"]) == MARGIN_ISOLATED
        iso_margin = int(p["isolated_margin_atoms"])
        if isolated:
            required += isolated_requirement_atoms(size, buy, sell, iso_margin + upnl, per_lot)
            iso_equity += iso_margin + upnl
        else:
            required += exposure * per_lot
            cross_upnl += upnl
            cross_mm += mm
        rows.append(dict(market=m, size_lots=size, cost_atoms=cost, mark_ticks=mark,
                         notional_atoms=notional, upnl_atoms=upnl, maintenance_atoms=mm,
                         margin_mode=int(p["margin_mode"]), leverage=leverage,
                         isolated_margin_atoms=iso_margin,
                         open_buy_lots=int(p["open_buy_lots"]),
                         open_sell_lots=int(p["open_sell_lots"]),
                         _brackets=brackets, _atpl=atpl))
    cross_equity = balance + cross_upnl
    has_cross_position = False
    for r in rows:
        brackets, atpl = r.pop("_brackets"), r.pop("_atpl")
        if r["size_lots"] == 0:
            r["liquidation_price_ticks"] = None
            r["liquidatable"] = False
        elif r["margin_mode"] == MARGIN_ISOLATED:
            r["liquidation_price_ticks"] = liquidation_price_ticks(
                r["isolated_margin_atoms"], 0, 0, r["size_lots"], r["cost_atoms"], atpl,
                brackets)
            r["liquidatable"] = r["isolated_margin_atoms"] + r["upnl_atoms"] < r["maintenance_atoms"]
        else:
            has_cross_position = True
            r["liquidation_price_ticks"] = liquidation_price_ticks(
                balance, cross_mm - r["maintenance_atoms"], cross_upnl - r["upnl_atoms"],
                r["size_lots"], r["cost_atoms"], atpl, brackets)
            r["liquidatable"] = cross_equity < cross_mm
    return dict(account=account, balance_atoms=balance, cross_equity_atoms=cross_equity,
                equity_atoms=cross_equity + iso_equity, initial_margin_atoms=required,
                available_atoms=cross_equity - required, maintenance_atoms=cross_mm,
                liquidatable=has_cross_position and cross_equity < cross_mm,
                changed_seq=int(st.accounts["changed_seq"][account]), positions=rows)


def liquidation_targets(st, account: int) -> list[int]:
    """What riskd sends LIQUIDATE for: -1 when the cross account is below maintenance, then
    each isolated position below its own maintenance (by market)."""
    risk = account_risk(st, account)
    out = [-1] if risk["liquidatable"] else []
    out += [p["market"] for p in risk["positions"]
            if p["margin_mode"] == MARGIN_ISOLATED and p["liquidatable"]]
    return out
