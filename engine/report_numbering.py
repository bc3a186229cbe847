"""The batch form of AccountSeqTracker, compiled: the reports among a block of event slots,
numbered by the one rule of engine/reports.py (`report_accounts`). persistd's store numbers
every report it writes to DuckDB this way; a gateway numbers one event at a time with the
tracker and never loads numba for it."""

import numpy as np
from numba import njit

from engine.records import COMMAND_EVENT_DTYPE, EV_COMMAND, EV_TRADE, TRADE_EVENT_DTYPE
from engine.reports import NO_ACCOUNT, report_accounts

# One report found in a stream of event slots (number_events): which slot, to whom, its
# number, the slot's position after its command (from 1), and role 0 for the event's own
# account, 1 for a trade's maker; `command` is the slot of the command that caused it.
REPORT_DTYPE = np.dtype([("event", "<i8"), ("command", "<i8"), ("account_seq", "<i8"),
                         ("account", "<i4"), ("index", "<i4"), ("role", "u1")])

# the one compiled form of the rule: persistd's store and the gateway's lane number with it
report_accounts_compiled = njit(cache=True)(report_accounts)


@njit(cache=True)
def _number(etype, account, maker, cmd_code, counters, out):
    n = 0
    command = -1
    code = 0
    index = 0
    for i in range(len(etype)):
        if etype[i] == EV_COMMAND:
            command = i
            code = cmd_code[i]
            index = 0
            continue
        index += 1
        first, second = report_accounts_compiled(code, index, etype[i], account[i],
                                                 maker[i], len(counters))
        for role in range(2):
            a = first if role == 0 else second
            if a < 0:
                continue
            counters[a] += 1
            r = out[n]
            r.event = i
            r.command = command
            r.account_seq = counters[a]
            r.account = a
            r.index = index
            r.role = role
            n += 1
    return n


def number_events(events: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """The reports among `events` (128-byte slots as the event ring holds them, starting at a
    command boundary) in order, numbered from `counters` (the accounts' account_seq before
    them, advanced in place): a REPORT_DTYPE array. The batch form of AccountSeqTracker."""
    etype = np.ascontiguousarray(events["etype"])
    account = np.ascontiguousarray(events["account"]).astype(np.int64)
    trades = events.view(TRADE_EVENT_DTYPE)
    maker = np.where(etype == EV_TRADE, trades["maker_account"], NO_ACCOUNT).astype(np.int64)
    cmd_code = np.ascontiguousarray(events.view(COMMAND_EVENT_DTYPE)["command"]["cmd"])
    out = np.zeros(2 * len(events), REPORT_DTYPE)
    n = _number(etype, account, maker, cmd_code, counters, out)
    return out[:n]
