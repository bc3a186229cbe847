"""Margin and price rules: exposure, unrealized PnL, leverage caps, the cost of entering an
order, equity against requirement (cross and isolated), the open-interest cap, the price
band, the mark.

Owns no table: these read the state. The one writer is _set_mark_ticks (a market's mark and
the words derived from it).
"""

from engine.numbers import RATE_ONE_E9, mul_div_ceil, mul_div_floor
from engine.records import (FLAG_REDUCE_ONLY, MARGIN_ISOLATED, REASON_INSUFFICIENT_MARGIN,
                            REASON_POSITION_LIMIT, SIDE_BUY)
from engine.state import NONE, UNTRIGGERED
from engine.core.tables import _accounts, _levels, _markets, _orders, _positions, jit
from engine.core.book_sides import _best_level, _best_position, _level_at, _worse_position


@jit
def _exposure_lots(size, open_buy, open_sell):
    a = size + open_buy
    b = size - open_sell
    a = a if a >= 0 else -a
    b = b if b >= 0 else -b
    return a if a > b else b


@jit
def _upnl(mk, pos):
    return pos.size_lots * mk.mark_ticks * mk.atoms_per_tick_lot - pos.cost_atoms


NO_LEVERAGE_CAP = 1 << 62   # MARKET_DTYPE.full_leverage_below_atoms of a market without caps


@jit
def _leverage_cap(mk, notional_atoms):
    """The max leverage of the bracket a notional falls in (the market's max below the floor
    of the first bracket that caps it)."""
    if notional_atoms < mk.full_leverage_below_atoms:
        return mk.max_leverage
    k = mk.n_brackets - 1
    while k > 0 and mk.bracket_floor_atoms[k] > notional_atoms:
        k -= 1
    return mk.bracket_max_leverage[k]


@jit
def _margin_per_lot(mk, leverage, exposure_lots):
    """engine.risk.effective_leverage: initial margin of one lot at the mark, at the leverage
    setting (0: the market's max) capped by the max leverage of the bracket that exposure_lots
    at the mark fall in. Below the first capped bracket's floor no lookup is needed."""
    notional = exposure_lots * mk.mark_ticks * mk.atoms_per_tick_lot
    if notional >= mk.full_leverage_below_atoms:
        cap = _leverage_cap(mk, notional)
        if leverage == 0 or cap < leverage:
            leverage = cap
    if leverage == 0:
        return mk.margin_per_lot_atoms
    return mul_div_ceil(mk.mark_ticks, mk.atoms_per_tick_lot, leverage)


@jit
def _entry_cost(st, market, account, side, limit_ticks, qty, rests, walk):
    """engine.risk.entry_cost_atoms of an order entering the book now, with the furthest
    price its lots can trade at as reference._worst_price finds it (walk: a market order's
    walk of the book; else the limit)."""
    mk = _markets(st)[market]
    opposite = 1 - side
    if not walk:
        best_lvl = _best_level(st, market, opposite)
        best = 0
        if best_lvl != NONE and _crosses(side, limit_ticks, _levels(st)[best_lvl].price_ticks):
            best = _levels(st)[best_lvl].price_ticks
        if best == 0 and not rests:
            return 0
        return _cost_at(mk, side, limit_ticks, best, qty)
    pos = _positions(st)[account, market]
    # With no reduce-only maker in the market and none of the account's own orders on the
    # other side, a level's total is what the walk would count: no need to visit its orders.
    own = pos.open_sell_lots if side == SIDE_BUY else pos.open_buy_lots
    by_level = mk.resting_reduce_only == 0 and own == 0
    worst = 0
    best = 0
    total = 0
    d, i = _best_position(st, market, opposite)
    while d >= 0:
        lvl = _level_at(st, market, opposite, d, i)
        d, i = _worse_position(st, market, opposite, d, i)
        price = _levels(st)[lvl].price_ticks
        if not _crosses(side, limit_ticks, price):
            break
        if worst == 0:
            best = price
        worst = price
        if by_level:
            total += _levels(st)[lvl].qty_lots
        else:
            slot = _levels(st)[lvl].first
            while slot != NONE and total < qty:
                o = _orders(st)[slot]
                if o.account != account and (o.flags & FLAG_REDUCE_ONLY) == 0:
                    total += o.remaining_lots
                slot = o.next
        if total >= qty:
            break
    if total < qty and rests:
        worst = limit_ticks
    if worst == 0:
        return 0
    return _cost_at(mk, side, worst, best, qty)


@jit
def _cost_at(mk, side, worst, best, qty):
    """qty's loss against the mark at worst, plus the taker fee bound when it crosses (best:
    the best crossing price, 0 when none)."""
    gap = worst - mk.mark_ticks if side == SIDE_BUY else mk.mark_ticks - worst
    cost = qty * gap * mk.atoms_per_tick_lot if gap > 0 else 0
    if best != 0 and mk.taker_fee_e9 > 0:
        fee_price = worst if side == SIDE_BUY else best
        cost += mul_div_ceil(qty * fee_price * mk.atoms_per_tick_lot, mk.taker_fee_e9,
                             RATE_ONE_E9) + qty
    return cost


@jit
def _equity_and_requirement(st, account, extra_market, extra_buy, extra_sell, extra_leverage):
    """(cross equity, initial margin required); extra_* as if the account had extra open lots
    (or another leverage, when > 0) in extra_market. An isolated position's own lots are backed
    by its isolated margin: only its open orders beyond the position count here."""
    equity = _accounts(st)[account].balance_atoms
    required = 0
    for m in range(len(_markets(st))):
        mk = _markets(st)[m]
        if mk.active == 0:
            continue
        pos = _positions(st)[account, m]
        buy = pos.open_buy_lots
        sell = pos.open_sell_lots
        leverage = pos.leverage
        if m == extra_market:
            buy += extra_buy
            sell += extra_sell
            if extra_leverage > 0:
                leverage = extra_leverage
        elif pos.size_lots == 0 and buy == 0 and sell == 0:
            continue
        exposure = _exposure_lots(pos.size_lots, buy, sell)
        per_lot = _margin_per_lot(mk, leverage, exposure)
        if pos.margin_mode == MARGIN_ISOLATED:
            required += _isolated_requirement(pos.size_lots, buy, sell,
                                              pos.isolated_margin_atoms + _upnl(mk, pos), per_lot)
        else:
            equity += _upnl(mk, pos)
            required += exposure * per_lot
    return equity, required


@jit
def _isolated_requirement(size, buy, sell, isolated_equity, per_lot):
    """engine.risk.isolated_requirement_atoms: the larger drain on the cross balance of the
    orders growing an isolated position or closing (and maybe flipping) it."""
    growing = buy if size >= 0 else sell
    closing = sell if size >= 0 else buy
    drain = growing * per_lot
    if growing > 0:
        shortfall = (size if size >= 0 else -size) * per_lot - isolated_equity
        if shortfall > 0:
            drain += shortfall
    if closing > 0:
        flip = closing - (size if size >= 0 else -size)
        if flip < 0:
            flip = 0
        closing_drain = flip * per_lot - isolated_equity
        if closing_drain > drain:
            drain = closing_drain
    return drain if drain > 0 else 0


@jit
def _exposure_error(st, account, market, add_buy, add_sell, check_margin, entry_cost):
    mk = _markets(st)[market]
    pos = _positions(st)[account, market]
    if _exposure_lots(pos.size_lots, pos.open_buy_lots + add_buy,
                      pos.open_sell_lots + add_sell) > mk.max_position_lots:
        return REASON_POSITION_LIMIT
    if not check_margin:
        return 0
    equity, required = _equity_and_requirement(st, account, market, add_buy, add_sell, 0)
    if equity - required - entry_cost < 0:
        return REASON_INSUFFICIENT_MARGIN
    return 0


@jit
def _open_interest_error(mk, pos, side, qty):
    """reference._open_interest_error: would the lots the order opens (beyond closing its
    account's position) raise the open interest above the market's cap?"""
    if mk.open_interest_cap_lots == 0:
        return False
    closing = _closing_lots(pos.size_lots, side)
    opening = qty - (closing if closing > 0 else 0)
    return opening > 0 and mk.open_interest_lots + opening > mk.open_interest_cap_lots


@jit
def _untriggered_of(st, account, market):
    """The account's untriggered orders in the market (a walk of its order list: only stop
    and take-profit placements pay for it)."""
    n = 0
    slot = _accounts(st)[account].first_order
    while slot != NONE:
        o = _orders(st)[slot]
        if o.market == market and o.level == UNTRIGGERED:
            n += 1
        slot = o.account_next
    return n


@jit
def _set_mark_ticks(mk, mark_ticks):
    mk.mark_ticks = mark_ticks
    mk.band_dev_ticks = mul_div_floor(mark_ticks, mk.price_band_e9, RATE_ONE_E9)
    mk.margin_per_lot_atoms = mul_div_ceil(mark_ticks, mk.atoms_per_tick_lot, mk.max_leverage)


@jit
def _outside_band(mk, price_ticks):
    d = price_ticks - mk.mark_ticks
    if d < 0:
        d = -d
    return d > mk.band_dev_ticks


@jit
def _band_limit(mk, side):
    dev = mk.band_dev_ticks
    if side == SIDE_BUY:
        p = mk.mark_ticks + dev
        return p if p < mk.max_price_ticks else mk.max_price_ticks
    p = mk.mark_ticks - dev
    return p if p > 1 else 1


@jit
def _crosses(side, limit_ticks, opposite_ticks):
    if side == SIDE_BUY:
        return opposite_ticks <= limit_ticks
    return opposite_ticks >= limit_ticks


@jit
def _closing_lots(size, side):
    """How much an order on `side` would close of a position of `size` (<= 0: none)."""
    return -size if side == SIDE_BUY else size
