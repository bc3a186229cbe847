"""Perpetual risk (engine/reference.py has the same rules in plain Python): a market's risk
settings, brackets and filters, margin modes, the insurance fund, funding, settlement,
liquidation and auto-deleveraging (with the 256-bit products that rank ADL counterparties).

May touch: balances, positions, the insurance fund and their events; orders only by
canceling them or trading through matching.py.
"""

import numpy as np

from engine.config import (ADL_MAX_COUNTERPARTIES, LIQUIDATION_MAX_STEPS, MAX_BALANCE_ATOMS,
                           MAX_NET_DEPOSITS_ATOMS)
from engine.market_checks import (bracket_leverage, bracket_problem, market_filters_problem,
                                  market_risk_problem)
from engine.numbers import RATE_ONE_E9, fee_atoms, mul_div_ceil, mul_div_floor
from engine.records import (EV_FUNDING, EV_INSURANCE, EV_LIQUIDATION, EV_MARK, INSURANCE_DEFICIT,
                            INSURANCE_DEPOSIT, INSURANCE_FUNDING_RESIDUE,
                            INSURANCE_LIQUIDATION_FEE, KIND_LIMIT, LIQ_KIND_ADL,
                            LIQ_KIND_LIQUIDATED, LIQ_KIND_SETTLEMENT, MARGIN_CROSS,
                            MARGIN_ISOLATED, MARKET_SETTLED, REASON_ACCOUNT_DISABLED,
                            REASON_FUNDING_CAP, REASON_HALT, REASON_INSUFFICIENT_MARGIN,
                            REASON_INVALID_MARKET_CONFIG, REASON_INVALID_MESSAGE,
                            REASON_INVALID_PRICE, REASON_LEVERAGE, REASON_LIQUIDATION,
                            REASON_MARGIN_MODE_LOCKED, REASON_MARKET_SETTLED,
                            REASON_NOT_LIQUIDATABLE, REASON_UNKNOWN_ACCOUNT,
                            REASON_UNKNOWN_MARKET, SIDE_BUY, SIDE_SELL, STP_CANCEL_MAKER, TIF_IOC)
from engine.state import C_INSURANCE_ATOMS, C_NET_DEPOSITS_ATOMS, C_SEQ, NONE
from engine.core.tables import (FLAG_LIQUIDATION_TAKER, _accounts, _counters, _funding_events,
                                _insurance_events, _liquidation_events, _mark_events, _markets,
                                _orders, _positions, _touched, jit)
from engine.core.events import _claim, _done, _reject, _req_for
from engine.core.margin import (NO_LEVERAGE_CAP, _equity_and_requirement, _leverage_cap,
                                _set_mark_ticks, _upnl)
from engine.core.matching import _apply_fill, _match, _touch
from engine.core.triggers import _after_trading
from engine.core.commands import _account_ok, _balance_event, _cancel_open, _market_ok


@jit
def _set_market_risk(st, cmd):
    if not _market_ok(st, cmd.market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if market_risk_problem(cmd.cid, cmd.oid) != 0:
        return _reject(st, cmd, REASON_INVALID_MARKET_CONFIG)
    mk = _markets(st)[cmd.market]
    mk.liquidation_fee_e9 = cmd.cid
    mk.funding_cap_e9 = cmd.oid
    _done(st, cmd, 0)


@jit
def _set_bracket(st, cmd):
    if not _market_ok(st, cmd.market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    mk = _markets(st)[cmd.market]
    n = mk.n_brackets
    prev_floor = mk.bracket_floor_atoms[n - 1] if n > 0 else 0
    prev_rate = mk.bracket_rate_e9[n - 1] if n > 0 else 0
    prev_amount = mk.bracket_amount_atoms[n - 1] if n > 0 else 0
    prev_leverage = mk.bracket_max_leverage[n - 1] if n > 0 else mk.max_leverage
    leverage = bracket_leverage(cmd.qty_lots, cmd.price_ticks, prev_leverage)
    if bracket_problem(n, cmd.kind, cmd.amount_atoms, cmd.price_ticks, prev_floor, prev_rate,
                       mk.max_leverage, leverage, prev_leverage) != 0:
        return _reject(st, cmd, REASON_INVALID_MARKET_CONFIG)
    mk.bracket_max_leverage[n] = leverage
    if leverage < mk.max_leverage and mk.full_leverage_below_atoms == NO_LEVERAGE_CAP:
        mk.full_leverage_below_atoms = cmd.amount_atoms
    mk.bracket_floor_atoms[n] = cmd.amount_atoms
    mk.bracket_rate_e9[n] = cmd.price_ticks
    mk.bracket_amount_atoms[n] = prev_amount + mul_div_floor(
        cmd.amount_atoms, cmd.price_ticks - prev_rate, RATE_ONE_E9)
    mk.n_brackets = n + 1
    _done(st, cmd, 0)


@jit
def _set_margin(st, cmd):
    market = cmd.market
    account = cmd.account
    if not _market_ok(st, market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if not _account_ok(st, account):
        return _reject(st, cmd, REASON_UNKNOWN_ACCOUNT)
    if _accounts(st)[account].disabled != 0:
        return _reject(st, cmd, REASON_ACCOUNT_DISABLED)
    mode = cmd.kind
    leverage = cmd.qty_lots
    mk = _markets(st)[market]
    if mode > MARGIN_ISOLATED:
        return _reject(st, cmd, REASON_INVALID_MESSAGE)
    pos = _positions(st)[account, market]
    # not above the max leverage of the bracket the current position falls in
    size = pos.size_lots if pos.size_lots >= 0 else -pos.size_lots
    if leverage < 1 or leverage > _leverage_cap(mk, size * mk.mark_ticks * mk.atoms_per_tick_lot):
        return _reject(st, cmd, REASON_LEVERAGE)
    if mode != pos.margin_mode and (pos.size_lots != 0 or pos.open_orders != 0):
        return _reject(st, cmd, REASON_MARGIN_MODE_LOCKED)
    equity, required = _equity_and_requirement(st, account, -1, 0, 0, 0)
    _, new_required = _equity_and_requirement(st, account, market, 0, 0, leverage)
    if new_required > required and equity - new_required < 0:
        return _reject(st, cmd, REASON_INSUFFICIENT_MARGIN)
    pos.margin_mode = mode
    pos.leverage = leverage
    _accounts(st)[account].changed_seq = _counters(st)[C_SEQ]
    _done(st, cmd, 0)


@jit
def _set_market_filters(st, cmd):
    if not _market_ok(st, cmd.market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if market_filters_problem(cmd.amount_atoms, cmd.qty_lots, cmd.price_ticks) != 0:
        return _reject(st, cmd, REASON_INVALID_MARKET_CONFIG)
    mk = _markets(st)[cmd.market]
    mk.min_notional_atoms = cmd.amount_atoms
    mk.max_stop_orders = cmd.qty_lots
    mk.open_interest_cap_lots = cmd.price_ticks
    _done(st, cmd, 0)


@jit
def _insurance_deposit(st, cmd):
    amount = cmd.amount_atoms
    if (amount < 1 or amount > MAX_BALANCE_ATOMS - _counters(st)[C_INSURANCE_ATOMS]
            or amount > MAX_NET_DEPOSITS_ATOMS - _counters(st)[C_NET_DEPOSITS_ATOMS]):
        return _reject(st, cmd, REASON_INVALID_MESSAGE)
    _counters(st)[C_NET_DEPOSITS_ATOMS] += amount
    _insure(st, cmd, INSURANCE_DEPOSIT, amount, cmd.market, cmd.account)
    _done(st, cmd, 0)


@jit
def _insure(st, cmd, reason, amount, market, account):
    """Change the insurance fund by amount, with its event (none when 0)."""
    if amount == 0:
        return
    fund = _counters(st)[C_INSURANCE_ATOMS] + amount
    _counters(st)[C_INSURANCE_ATOMS] = fund
    j = _claim(st, cmd, EV_INSURANCE, market, account)
    e = _insurance_events(st)[j]
    e.req = _req_for(cmd, account)
    e.reason = reason
    e.amount_atoms = amount
    e.fund_atoms = fund


@jit
def _funding(st, cmd):
    market = cmd.market
    if not _market_ok(st, market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    mk = _markets(st)[market]
    rate = cmd.oid
    magnitude = rate if rate >= 0 else -rate
    if magnitude > mk.funding_cap_e9:
        return _reject(st, cmd, REASON_FUNDING_CAP)
    count = 0
    residue = 0
    seq = _counters(st)[C_SEQ]
    for account in range(len(_accounts(st))):
        pos = _positions(st)[account, market]
        size = pos.size_lots
        if size == 0:
            continue
        notional = (size if size > 0 else -size) * mk.mark_ticks * mk.atoms_per_tick_lot
        if (size > 0) == (rate > 0):
            payment = -mul_div_ceil(notional, magnitude, RATE_ONE_E9)
        else:
            payment = mul_div_floor(notional, magnitude, RATE_ONE_E9)
        residue -= payment
        acct = _accounts(st)[account]
        if pos.margin_mode == MARGIN_ISOLATED:
            pos.isolated_margin_atoms += payment
            after = pos.isolated_margin_atoms
        else:
            acct.balance_atoms += payment
            after = acct.balance_atoms
        acct.changed_seq = seq
        j = _claim(st, cmd, EV_FUNDING, market, account)
        e = _funding_events(st)[j]
        e.req = _req_for(cmd, account)
        e.rate_e9 = rate
        e.size_lots = size
        e.mark_ticks = mk.mark_ticks
        e.payment_atoms = payment
        e.balance_atoms = after
        count += 1
    _insure(st, cmd, INSURANCE_FUNDING_RESIDUE, residue, market, cmd.account)
    _done(st, cmd, count)


@jit
def _maintenance(mk, pos):
    """ceil(notional x rate_k / 1e9) - amount_k, k the highest bracket with floor <= notional."""
    size = pos.size_lots if pos.size_lots >= 0 else -pos.size_lots
    notional = size * mk.mark_ticks * mk.atoms_per_tick_lot
    k = mk.n_brackets - 1
    while k >= 0 and mk.bracket_floor_atoms[k] > notional:
        k -= 1
    if k < 0:
        return 0
    return mul_div_ceil(notional, mk.bracket_rate_e9[k], RATE_ONE_E9) - mk.bracket_amount_atoms[k]


@jit
def _cross_equity(st, account, skip_market):
    equity = _accounts(st)[account].balance_atoms
    for m in range(len(_markets(st))):
        pos = _positions(st)[account, m]
        if pos.size_lots != 0 and pos.margin_mode == MARGIN_CROSS and m != skip_market:
            equity += _upnl(_markets(st)[m], pos)
    return equity


@jit
def _liquidatable(st, account, scope):
    """scope -1: the account's cross positions; else its isolated position in that market."""
    if scope == -1:
        maintenance = 0
        has_position = False
        for m in range(len(_markets(st))):
            pos = _positions(st)[account, m]
            if pos.size_lots != 0 and pos.margin_mode == MARGIN_CROSS:
                has_position = True
                maintenance += _maintenance(_markets(st)[m], pos)
        return has_position and _cross_equity(st, account, -1) < maintenance
    pos = _positions(st)[account, scope]
    if pos.margin_mode != MARGIN_ISOLATED or pos.size_lots == 0:
        return False
    mk = _markets(st)[scope]
    return pos.isolated_margin_atoms + _upnl(mk, pos) < _maintenance(mk, pos)


@jit
def _position_equity(st, account, market):
    """The equity behind one position: cross equity, or isolated margin + uPnL."""
    pos = _positions(st)[account, market]
    if pos.margin_mode == MARGIN_ISOLATED:
        return pos.isolated_margin_atoms + _upnl(_markets(st)[market], pos)
    return _cross_equity(st, account, -1)


@jit
def _bankruptcy_limit(st, account, market):
    """engine.risk.bankruptcy_price_ticks, clamped to the market's prices [1, max]."""
    pos = _positions(st)[account, market]
    mk = _markets(st)[market]
    if pos.margin_mode == MARGIN_ISOLATED:
        other = pos.isolated_margin_atoms
    else:
        other = _cross_equity(st, account, market)
    num = pos.cost_atoms - other
    den = pos.size_lots * mk.atoms_per_tick_lot
    price = -((-num) // den) if pos.size_lots > 0 else num // den
    if price < 1:
        return 1
    return price if price < mk.max_price_ticks else mk.max_price_ticks


@jit
def _cover_deficit(st, cmd, account, scope, balance_before):
    """The fund pays what it can of the realized loss the liquidation left (reference
    ._cover_deficit): the negative balance, or for an isolated position the balance's fall
    since balance_before; at most the scope's negative equity. Credited to the balance."""
    acct = _accounts(st)[account]
    if scope == -1:
        realized = acct.balance_atoms
        equity = _cross_equity(st, account, -1)
    else:
        pos = _positions(st)[account, scope]
        realized = acct.balance_atoms - balance_before
        equity = pos.isolated_margin_atoms + _upnl(_markets(st)[scope], pos) + realized
    cover = -realized if -realized < -equity else -equity
    fund = _counters(st)[C_INSURANCE_ATOMS]
    if fund < cover:
        cover = fund
    if cover <= 0:
        return
    _insure(st, cmd, INSURANCE_DEFICIT, -cover, scope, account)
    acct.balance_atoms += cover
    acct.changed_seq = _counters(st)[C_SEQ]
    _balance_event(st, cmd, scope, account, cover, acct.balance_atoms)


@jit
def _liquidation_event(st, cmd, market, account, kind, side, qty, price, bankrupt, fee,
                       counterparty):
    j = _claim(st, cmd, EV_LIQUIDATION, market, account)
    e = _liquidation_events(st)[j]
    e.req = _req_for(cmd, account)
    e.kind = kind
    e.side = side
    e.qty_lots = qty
    e.price_ticks = price
    e.bankruptcy_ticks = bankrupt
    e.fee_atoms = fee
    e.counterparty = counterparty
    e.size_lots = _positions(st)[account, market].size_lots



@jit
def _settle_market(st, cmd):
    """reference._settle_market: cancel the market's orders, close its positions at the
    settlement price (the mark first), cover negative balances from the fund; settled."""
    market = cmd.market
    price = cmd.price_ticks
    if not _market_ok(st, market):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    mk = _markets(st)[market]
    if mk.state == MARKET_SETTLED:
        return _reject(st, cmd, REASON_MARKET_SETTLED)
    if price < 1 or price > mk.max_price_ticks:
        return _reject(st, cmd, REASON_INVALID_PRICE)
    _set_mark_ticks(mk, price)
    j = _claim(st, cmd, EV_MARK, market, cmd.account)
    e = _mark_events(st)[j]
    e.req = cmd.req
    e.mark_ticks = price
    mk.state = MARKET_SETTLED
    mk.halted = 1
    n_accounts = len(_accounts(st))
    for account in range(n_accounts):
        slot = _accounts(st)[account].first_order
        while slot != NONE:
            nxt = _orders(st)[slot].account_next
            if _orders(st)[slot].market == market:
                _cancel_open(st, cmd, slot, REASON_HALT)
            slot = nxt
    closed = 0
    for account in range(n_accounts):
        size = _positions(st)[account, market].size_lots
        if size == 0:
            continue
        side = SIDE_SELL if size > 0 else SIDE_BUY
        lots = size if size > 0 else -size
        _apply_fill(st, account, market, side, lots, price, 0)
        _liquidation_event(st, cmd, market, account, LIQ_KIND_SETTLEMENT, side, lots, price,
                           price, 0, -1)
        _cover_deficit(st, cmd, account, -1, 0)
        closed += 1
    _done(st, cmd, closed)


@jit
def _liquidate(st, cmd, scratch):
    account = cmd.account
    scope = cmd.market
    if not _account_ok(st, account):
        return _reject(st, cmd, REASON_UNKNOWN_ACCOUNT)
    if scope != -1 and not _market_ok(st, scope):
        return _reject(st, cmd, REASON_UNKNOWN_MARKET)
    if not _liquidatable(st, account, scope):
        return _reject(st, cmd, REASON_NOT_LIQUIDATABLE)
    slot = _accounts(st)[account].first_order
    while slot != NONE:
        nxt = _orders(st)[slot].account_next
        if scope == -1 or _orders(st)[slot].market == scope:
            _cancel_open(st, cmd, slot, REASON_LIQUIDATION)
        slot = nxt
    balance_before = _accounts(st)[account].balance_atoms
    closed = 0
    for m in range(len(_markets(st))):
        pos = _positions(st)[account, m]
        if scope == -1:
            if pos.size_lots == 0 or pos.margin_mode != MARGIN_CROSS:
                continue
        elif m != scope:
            continue
        lots, n_touched = _liquidate_position(st, cmd, account, m, scope, scratch,
                                              balance_before)
        closed += lots
        # its trades moved the last price: the market's triggers may fire, then the sweep
        n_touched = _after_trading(st, cmd, m, scratch, n_touched)
        # the next market's sweep starts a fresh list of touched accounts
        for t in range(n_touched):
            _accounts(st)[_touched(st)[t]].touched_seq = 0
    _cover_deficit(st, cmd, account, scope, balance_before)
    _done(st, cmd, closed)


@jit
def _liquidate_position(st, cmd, account, market, scope, scratch, balance_before):
    """Close into the book by IOC steps at the bankruptcy price while the scope stays
    liquidatable; when the book takes no more, the fund covers the realized loss so far, and
    the rest is auto-deleveraged. Returns (lots closed, n_touched)."""
    mk = _markets(st)[market]
    pos = _positions(st)[account, market]
    acct = _accounts(st)[account]
    closed = 0
    n_touched = 0
    for _ in range(LIQUIDATION_MAX_STEPS):
        if pos.size_lots == 0 or not _liquidatable(st, account, scope):
            return closed, n_touched
        bankrupt = _bankruptcy_limit(st, account, market)
        side = SIDE_SELL if pos.size_lots > 0 else SIDE_BUY
        size = pos.size_lots if pos.size_lots > 0 else -pos.size_lots
        qty = size if size < mk.max_order_lots else mk.max_order_lots
        o = _orders(st)[scratch]
        o.oid = 0
        o.cid = 0
        o.price_ticks = bankrupt
        o.remaining_lots = qty
        o.account = account
        o.market = market
        o.side = side
        o.kind = KIND_LIMIT
        o.tif = TIF_IOC
        o.flags = FLAG_LIQUIDATION_TAKER
        o.stp = STP_CANCEL_MAKER
        o.level = NONE
        balance_before = acct.balance_atoms
        _, n_touched = _match(st, cmd, scratch, bankrupt, n_touched)
        filled = qty - o.remaining_lots
        if filled == 0:
            _cover_deficit(st, cmd, account, scope, balance_before)
            lots, n_touched = _auto_deleverage(st, cmd, account, market, n_touched)
            return closed + lots, n_touched
        closed += filled
        # the equity the fee may take: an isolated position's closed part was paid out to the
        # balance (released margin and realized PnL)
        if scope == -1:
            equity = _cross_equity(st, account, -1)
        else:
            equity = (pos.isolated_margin_atoms + _upnl(mk, pos) + acct.balance_atoms
                      - balance_before)
        fee = fee_atoms(filled * mk.mark_ticks * mk.atoms_per_tick_lot, mk.liquidation_fee_e9)
        if equity < 0:
            equity = 0
        if fee > equity:
            fee = equity
        acct.balance_atoms -= fee
        _liquidation_event(st, cmd, market, account, LIQ_KIND_LIQUIDATED, side, filled,
                           mk.last_trade_ticks, bankrupt, fee, -1)
        _insure(st, cmd, INSURANCE_LIQUIDATION_FEE, fee, market, account)
    return closed, n_touched


@jit
def _auto_deleverage(st, cmd, account, market, n_touched):
    """Close the position at its bankruptcy price against the best-ranked opposite positions
    (BitMEX's ranking), at most ADL_MAX_COUNTERPARTIES of them. Returns (lots, n_touched)."""
    pos = _positions(st)[account, market]
    bankrupt = _bankruptcy_limit(st, account, market)
    closed = 0
    for _ in range(ADL_MAX_COUNTERPARTIES):
        if pos.size_lots == 0:
            break
        other = _adl_counterparty(st, account, market, pos.size_lots)
        if other == NONE:
            break
        size = pos.size_lots if pos.size_lots > 0 else -pos.size_lots
        other_size = _positions(st)[other, market].size_lots
        if other_size < 0:
            other_size = -other_size
        qty = size if size < other_size else other_size
        side = SIDE_SELL if pos.size_lots > 0 else SIDE_BUY
        _apply_fill(st, account, market, side, qty, bankrupt, 0)
        _apply_fill(st, other, market, 1 - side, qty, bankrupt, 0)
        n_touched = _touch(st, other, n_touched)
        _liquidation_event(st, cmd, market, account, LIQ_KIND_ADL, side, qty, bankrupt,
                           bankrupt, 0, other)
        _liquidation_event(st, cmd, market, other, LIQ_KIND_ADL, 1 - side, qty, bankrupt,
                           bankrupt, 0, account)
        closed += qty
    return closed, n_touched


@jit
def _adl_factors(st, account, market):
    """engine.risk.adl_score as (profitable, a, b, c, d): the score is a*b/(c*d) when
    profitable, else -(a*b)/(c*d); all four factors >= 0 (< 2**63)."""
    mk = _markets(st)[market]
    pos = _positions(st)[account, market]
    size = pos.size_lots if pos.size_lots >= 0 else -pos.size_lots
    upnl = _upnl(mk, pos)
    entry = pos.cost_atoms if pos.cost_atoms >= 0 else -pos.cost_atoms
    entry = entry if entry > 1 else 1
    equity = _position_equity(st, account, market)
    equity = equity if equity > 1 else 1
    notional = size * mk.mark_ticks * mk.atoms_per_tick_lot
    notional = notional if notional > 1 else 1
    if upnl > 0:
        return True, upnl, notional, entry, equity
    return False, -upnl, equity, entry, notional


@jit
def _adl_counterparty(st, account, market, size_lots):
    """The best-ranked position opposite size_lots (ties: the lower account), or NONE."""
    best = NONE
    b_up = False
    b_a = b_b = b_c = b_d = 0
    for other in range(len(_accounts(st))):
        size = _positions(st)[other, market].size_lots
        if other == account or size == 0 or (size > 0) == (size_lots > 0):
            continue
        up, a, b, c, d = _adl_factors(st, other, market)
        if best == NONE:
            better = True
        elif up != b_up:
            better = up
        else:
            # compare a*b/(c*d) with the best's by cross-multiplying, exactly
            order = _compare_products(a, b, b_c, b_d, b_a, b_b, c, d)
            better = order > 0 if up else order < 0
        if better:
            best = other
            b_up = up
            b_a = a
            b_b = b
            b_c = c
            b_d = d
    return best


_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)


@jit
def _mul_wide(x, y):
    """(high, low) 64-bit words of x * y for uint64 x, y."""
    x0 = x & _LOW32
    x1 = x >> _SHIFT32
    y0 = y & _LOW32
    y1 = y >> _SHIFT32
    p00 = x0 * y0
    p01 = x0 * y1
    p10 = x1 * y0
    mid = (p00 >> _SHIFT32) + (p01 & _LOW32) + (p10 & _LOW32)
    low = (p00 & _LOW32) | ((mid & _LOW32) << _SHIFT32)
    high = x1 * y1 + (p01 >> _SHIFT32) + (p10 >> _SHIFT32) + (mid >> _SHIFT32)
    return high, low


@jit
def _product4(a, b, c, d):
    """a*b*c*d for int64 a..d >= 0 as four 64-bit words, most significant first."""
    h1, l1 = _mul_wide(np.uint64(a), np.uint64(b))
    h2, l2 = _mul_wide(np.uint64(c), np.uint64(d))
    c1, c0 = _mul_wide(l1, l2)
    d1, d0 = _mul_wide(l1, h2)
    e1, e0 = _mul_wide(h1, l2)
    f1, f0 = _mul_wide(h1, h2)
    w1 = c1 + d0
    carry = _ONE if w1 < d0 else _ZERO
    w1 = w1 + e0
    carry += _ONE if w1 < e0 else _ZERO
    w2 = d1 + e1
    carry2 = _ONE if w2 < e1 else _ZERO
    w2 = w2 + f0
    carry2 += _ONE if w2 < f0 else _ZERO
    w2 = w2 + carry
    carry2 += _ONE if w2 < carry else _ZERO
    return f1 + carry2, w2, w1, c0


@jit
def _compare_products(a, b, c, d, e, f, g, h):
    """Sign of a*b*c*d - e*f*g*h for int64 factors >= 0, exactly (256-bit products)."""
    x3, x2, x1, x0 = _product4(a, b, c, d)
    y3, y2, y1, y0 = _product4(e, f, g, h)
    if x3 != y3:
        return 1 if x3 > y3 else -1
    if x2 != y2:
        return 1 if x2 > y2 else -1
    if x1 != y1:
        return 1 if x1 > y1 else -1
    if x0 != y0:
        return 1 if x0 > y0 else -1
    return 0
