"""The batch loop: run_batch, the compiled matcher's one entry point (engine/matcher.py).

Before each command it checks the ring has room for the most events the command can cause,
and returns early when it has not; then it sequences the command (seq, EV_COMMAND), rejects
unprivileged ones, dispatches to the handlers and numbers the reports. Owns: the
descriptor's cursor words and the sequence counter.
"""

from engine.config import ADL_MAX_COUNTERPARTIES, LIQUIDATION_MAX_STEPS
from engine.records import (CMD_AMEND, CMD_CANCEL, CMD_CANCEL_ALL, CMD_CREATE_MARKET, CMD_DEPOSIT,
                            CMD_FUNDING, CMD_HALT, CMD_INSURANCE_DEPOSIT, CMD_LIQUIDATE,
                            CMD_NEW_ORDER, CMD_RESUME, CMD_SETTLE_MARKET, CMD_SET_ACCOUNT_STATE,
                            CMD_SET_BRACKET, CMD_SET_MARGIN, CMD_SET_MARK, CMD_SET_MARKET_FILTERS,
                            CMD_SET_MARKET_LIMITS, CMD_SET_MARKET_RISK, CMD_SET_MARKET_STATE,
                            CMD_WITHDRAW, COMMAND_BYTES, COMMAND_EVENT_WORD, EV_COMMAND,
                            MARKET_HALTED, MARKET_TRADING, PRIVILEGED_COMMANDS, REASON_FORBIDDEN,
                            REASON_INVALID_MESSAGE, SIDE_BUY, SIDE_SELL)
from engine.state import C_SEQ, D_NEED, D_SEQ, D_WRITE, NONE
from engine.views import address_of, prefetch
from engine.core.tables import (_accounts, _cid_index, _counters, _markets, _number_reports,
                                _oid_index, _orders, _positions, _ring_words, jit)
from engine.core.indexes import _home
from engine.core.events import _claim, _reject
from engine.core.triggers import _trigger_bound
from engine.core.commands import (_amend, _cancel, _cancel_all, _create_market, _deposit,
                                  _find_order, _new_order, _set_account_state, _set_mark,
                                  _set_market_limits, _set_state, _withdraw)
from engine.core.perpetual_risk import (_funding, _insurance_deposit, _liquidate, _set_bracket,
                                        _set_margin, _set_market_filters, _set_market_risk,
                                        _settle_market)


@jit
def _taker_bound(st, account, market, side, qty):
    """Most events an order of `qty` lots can cause when it takes.

    Each trade fills at least a lot; each of the account's own resting orders it meets is
    canceled at most once (STP); each resting reduce-only order adds at most one event besides
    its trades (canceled while matching, or shrunk/canceled by the sweep after). Plus the
    command, the reply and the taker's own cancel.
    """
    mk = _markets(st)[market]
    opposite = mk.resting_sell if side == SIDE_BUY else mk.resting_buy
    if side > SIDE_SELL:
        opposite = mk.resting_buy + mk.resting_sell
    fills = qty if 0 <= qty < opposite else (opposite if qty >= 0 else 0)
    own = _positions(st)[account, market].open_orders
    stp = own if own < opposite else opposite
    return 8 + fills + stp + mk.resting_reduce_only


@jit
def _event_bound(st, cmd):
    """Most events this command can cause (checked against the ring's free slots)."""
    code = cmd.cmd
    if code == CMD_NEW_ORDER:
        if not (0 <= cmd.market < len(_markets(st)) and 0 <= cmd.account < len(_accounts(st))):
            return 4
        need = _taker_bound(st, cmd.account, cmd.market, cmd.side, cmd.qty_lots)
        if _markets(st)[cmd.market].untriggered != 0:
            return max(need, _trigger_bound(st, cmd.market))
        return need
    if code == CMD_AMEND:
        slot = _find_order(st, cmd.account, cmd.oid, cmd.cid)
        if slot == NONE:
            return 4
        o = _orders(st)[slot]
        qty = cmd.qty_lots if cmd.qty_lots > o.remaining_lots else o.remaining_lots
        need = _taker_bound(st, o.account, o.market, o.side, qty)
        return max(need, _trigger_bound(st, o.market))
    if code == CMD_SET_MARK or code == CMD_RESUME:
        if 0 <= cmd.market < len(_markets(st)):
            return 4 + _trigger_bound(st, cmd.market)
        return 4
    if code == CMD_CANCEL_ALL:
        if 0 <= cmd.account < len(_accounts(st)):
            return 4 + _accounts(st)[cmd.account].open_orders
        return 4
    if code == CMD_FUNDING:
        return 6 + len(_accounts(st))
    if code == CMD_SETTLE_MARKET:
        if not 0 <= cmd.market < len(_markets(st)):
            return 4
        mk = _markets(st)[cmd.market]
        return 8 + mk.resting_buy + mk.resting_sell + mk.untriggered + 3 * len(_accounts(st))
    if code == CMD_SET_MARKET_STATE:
        if 0 <= cmd.market < len(_markets(st)):
            return 4 + _trigger_bound(st, cmd.market)
        return 4
    if code == CMD_LIQUIDATE:
        return _liquidation_bound(st, cmd)
    return 4


@jit
def _liquidation_bound(st, cmd):
    """Most events a LIQUIDATE can cause (EngineConfig.event_bound() covers any of them).

    Its own orders canceled; per market liquidated: each resting order traded out or
    canceled (reduce-only) at most once, a partly filled one more per step, each reduce-only
    order swept once, per step a liquidation and an insurance event, per ADL counterparty two
    events; a deficit cover before its ADL and one at the end (an insurance and a balance
    event each).
    """
    if not 0 <= cmd.account < len(_accounts(st)):
        return 4
    n = 8 + _accounts(st)[cmd.account].open_orders
    for m in range(len(_markets(st))):
        if cmd.market == -1 or cmd.market == m:
            mk = _markets(st)[m]
            n += (mk.resting_buy + mk.resting_sell + mk.resting_reduce_only
                  + 3 * LIQUIDATION_MAX_STEPS + 2 * ADL_MAX_COUNTERPARTIES + 4
                  + _trigger_bound(st, m))
    return n


PREFETCH_AHEAD = 4


@jit
def _privileged_only(code):
    for privileged in PRIVILEGED_COMMANDS:
        if code == privileged:
            return True
    return False


@jit
def _prefetch_for(st, cmd):
    """Start loading what a later command reads first (likely cache misses): its position
    (the event bound and the margin check read it), its account row (the margin check's
    balance, a resting order's account list) and the index bucket it probes first.

    A prefetch never faults: a command naming a bad account or market costs a useless load.
    """
    positions = _positions(st)
    prefetch(positions, cmd.account * positions.shape[1] + cmd.market)
    prefetch(_accounts(st), cmd.account)
    if cmd.cmd == CMD_NEW_ORDER or ((cmd.cmd == CMD_CANCEL or cmd.cmd == CMD_AMEND)
                                    and cmd.oid == 0):
        index = _cid_index(st)
        prefetch(index, _home(cmd.account, cmd.cid, len(index) - 1))
    elif cmd.cmd == CMD_CANCEL or cmd.cmd == CMD_AMEND:
        index = _oid_index(st)
        prefetch(index, _home(0, cmd.oid, len(index) - 1))


@jit
def run_batch(desc, commands, command_words, start, count, privileged, free_slots):
    """Sequence commands[start:start+count]. Returns how many were processed.

    Stops early (returns fewer) when the ring lacks room for a command's worst case.
    The descriptor's cursor words carry the ring position, seq and source (engine/state.py).
    """
    st = address_of(desc)
    scratch = len(_orders(st)) - 1
    ring_words = _ring_words(st)
    used_before = desc[D_WRITE]
    desc[D_NEED] = 0
    end = start + count
    for i in range(start, start + count):
        if i + PREFETCH_AHEAD < end:
            _prefetch_for(st, commands[i + PREFETCH_AHEAD])
        cmd = commands[i]
        need = _event_bound(st, cmd)
        if need > free_slots - (desc[D_WRITE] - used_before):
            desc[D_NEED] = need
            return i - start
        seq = _counters(st)[C_SEQ] + 1
        _counters(st)[C_SEQ] = seq
        desc[D_SEQ] = seq
        command_pos = desc[D_WRITE]
        j = _claim(st, cmd, EV_COMMAND, cmd.market, cmd.account)
        for w in range(COMMAND_BYTES // 8):
            ring_words[j, COMMAND_EVENT_WORD + w] = command_words[i, w]
        code = cmd.cmd
        if not privileged and _privileged_only(code):
            _reject(st, cmd, REASON_FORBIDDEN)
        elif code == CMD_NEW_ORDER:
            _new_order(st, cmd, scratch)
        elif code == CMD_CANCEL:
            _cancel(st, cmd)
        elif code == CMD_AMEND:
            _amend(st, cmd, scratch)
        elif code == CMD_CANCEL_ALL:
            _cancel_all(st, cmd)
        elif code == CMD_DEPOSIT:
            _deposit(st, cmd)
        elif code == CMD_WITHDRAW:
            _withdraw(st, cmd)
        elif code == CMD_SET_MARK:
            _set_mark(st, cmd, scratch)
        elif code == CMD_CREATE_MARKET:
            _create_market(st, cmd)
        elif code == CMD_SET_MARKET_LIMITS:
            _set_market_limits(st, cmd)
        elif code == CMD_HALT:
            _set_state(st, cmd, MARKET_HALTED, scratch)
        elif code == CMD_RESUME:
            _set_state(st, cmd, MARKET_TRADING, scratch)
        elif code == CMD_SET_MARGIN:
            _set_margin(st, cmd)
        elif code == CMD_FUNDING:
            _funding(st, cmd)
        elif code == CMD_LIQUIDATE:
            _liquidate(st, cmd, scratch)
        elif code == CMD_SET_MARKET_RISK:
            _set_market_risk(st, cmd)
        elif code == CMD_SET_BRACKET:
            _set_bracket(st, cmd)
        elif code == CMD_SET_ACCOUNT_STATE:
            _set_account_state(st, cmd)
        elif code == CMD_INSURANCE_DEPOSIT:
            _insurance_deposit(st, cmd)
        elif code == CMD_SET_MARKET_FILTERS:
            _set_market_filters(st, cmd)
        elif code == CMD_SET_MARKET_STATE:
            _set_state(st, cmd, -1, scratch)
        elif code == CMD_SETTLE_MARKET:
            _settle_market(st, cmd)
        else:
            _reject(st, cmd, REASON_INVALID_MESSAGE)
        _number_reports(st, cmd, command_pos + 1)
    return count
