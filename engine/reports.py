"""Which events are reports to which account: the one rule behind `account_seq`.

PROTOCOL.md ("Report sequence and replay"): every report addressed to an account carries
`account_seq`, 1, 2, 3, ... per account without gaps, the same from every gateway and after
any restart. The matcher keeps each account's last `account_seq` in its accounts table
(engine/state.py, column `account_seq`) and advances it after every command by applying
`report_accounts` to each event the command caused, in order; a consumer that joins the
event stream at a command boundary copies those counters and applies the same function to
each later event (`AccountSeqTracker`), so it numbers every report exactly as the matcher
counted it. The reference model (engine/reference.py) and the compiled matcher
(engine/core/tables.py compiles this very function) both use it, and so does persistd's
store, a block of event slots at a time (engine/report_numbering.py); the differential fuzz
and engine/invariants.py check that counters and events agree. This module is plain Python:
a gateway numbers reports with it without loading numba.

The rule, per event (`index` is the event's position after its command's EV_COMMAND, from 1):
- `ack`, `canceled`, `amended`, `triggered`, `funding`, `liquidation`: one report to the
  event's account;
- a trade: one `fill` to the taker (the event's account) and one to the maker, in that
  order (a self-trade, were one possible, would be two reports);
- `reject`: the reject of a fired stop or take-profit (never a command's first event: its
  `triggered` precedes it) is a report to the order's owner; a command's own reject (always
  its first event) is a report when the command is a client's (CLIENT_COMMANDS) and names an
  existing account;
- `done` of a client's cancel_all, withdraw or set_margin: a report to that account (so a
  request whose reply was lost still has an outcome in the stream);
- nothing else (commands, marks, balances, insurance, operators' and riskd's own outcomes).
"""

import numpy as np

from engine.records import (CMD_AMEND, CMD_CANCEL, CMD_CANCEL_ALL, CMD_NEW_ORDER,
                            CMD_SET_MARGIN, CMD_WITHDRAW, EV_ACK, EV_AMENDED, EV_CANCELED,
                            EV_COMMAND, EV_DONE, EV_FUNDING, EV_LIQUIDATION, EV_REJECT, EV_TRADE,
                            EV_TRIGGERED)

# Commands a client sends through a gateway (an operator's tool may send them too).
CLIENT_COMMANDS = (CMD_NEW_ORDER, CMD_CANCEL, CMD_CANCEL_ALL, CMD_AMEND, CMD_WITHDRAW,
                   CMD_SET_MARGIN)
# Client commands whose success is an EV_DONE.
DONE_COMMANDS = (CMD_CANCEL_ALL, CMD_WITHDRAW, CMD_SET_MARGIN)

NO_ACCOUNT = -1


def report_accounts(cmd_code, index, etype, account, maker_account, max_accounts):
    """(first, second): the accounts this event is a report to, NO_ACCOUNT for none.

    Plain integer code on purpose: engine/core/tables.py compiles it with numba, everything else
    calls it as Python.
    """
    if etype == EV_TRADE:
        return account, maker_account
    if (etype == EV_ACK or etype == EV_CANCELED or etype == EV_AMENDED
            or etype == EV_TRIGGERED or etype == EV_FUNDING or etype == EV_LIQUIDATION):
        return account, NO_ACCOUNT
    if 0 <= account < max_accounts:
        # (loops over the constant tuples, not helpers: numba compiles this body as it is)
        if etype == EV_REJECT:
            if index > 1:
                return account, NO_ACCOUNT
            for code in CLIENT_COMMANDS:
                if cmd_code == code:
                    return account, NO_ACCOUNT
        elif etype == EV_DONE:
            for code in DONE_COMMANDS:
                if cmd_code == code:
                    return account, NO_ACCOUNT
    return NO_ACCOUNT, NO_ACCOUNT


class AccountSeqTracker:
    """Numbers the reports of an event stream joined at a command boundary.

    `counters` are the accounts' `account_seq` column as of that boundary (a copy). Feed
    every later event in order: `on_command(code)` for each EV_COMMAND, then `on_event(...)`
    for each of its events, which returns the (account, account_seq) pairs it is a report to.
    """

    __slots__ = ("counters", "cmd_code", "index", "max_accounts")

    def __init__(self, counters: np.ndarray):
        self.counters = [int(c) for c in counters]
        self.max_accounts = len(self.counters)
        self.cmd_code = 0
        self.index = 0

    def on_command(self, code: int) -> None:
        self.cmd_code = code
        self.index = 0

    def on_event(self, etype: int, account: int, maker_account: int = NO_ACCOUNT):
        """[(account, account_seq), ...] for this event: empty, one, or (trade) two pairs."""
        self.index += 1
        first, second = report_accounts(self.cmd_code, self.index, etype, account,
                                        maker_account, self.max_accounts)
        out = []
        counters = self.counters
        for a in (first, second):
            if a != NO_ACCOUNT:
                counters[a] += 1
                out.append((a, counters[a]))
        return out

    def last(self, account: int) -> int:
        return self.counters[account] if 0 <= account < self.max_accounts else 0


def account_seqs_of_events(events, counters: np.ndarray) -> np.ndarray:
    """Apply the rule to a stream of event dicts (engine.records.event_to_dict, EV_COMMAND
    included) from counters at its start; returns the counters after it (a new array)."""
    tracker = AccountSeqTracker(counters)
    for ev in events:
        if ev["etype"] == EV_COMMAND:
            tracker.on_command(ev["command"]["cmd"])
        else:
            tracker.on_event(ev["etype"], ev["account"], ev.get("maker_account", NO_ACCOUNT))
    return np.array(tracker.counters, np.int64)
