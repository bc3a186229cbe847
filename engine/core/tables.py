"""The compiled matcher's base: `jit`, and the views of the state through the descriptor `st`.

Owns: `jit`, the one set of numba options every function of engine/core/ is compiled with;
one view per table of engine/state.py and per event family of the ring; the numbering of a
command's reports (engine/reports.py's rule, compiled); the liquidation taker's order flag.
Imports nothing of engine/core/; every other file reads and writes the state through these
views.
"""

import numpy as np
from numba import njit

from engine.records import (BALANCE_EVENT_DTYPE, EVENT_DTYPE, EV_TRADE, FUNDING_EVENT_DTYPE,
                            INSURANCE_EVENT_DTYPE, LIQUIDATION_EVENT_DTYPE, MARK_EVENT_DTYPE,
                            ORDER_EVENT_DTYPE, TRADE_EVENT_DTYPE)
from engine.reports import NO_ACCOUNT, report_accounts
from engine.state import (ACCOUNT_DTYPE, D_COUNT, D_MASK, D_RING, D_WRITE, INDEX_DTYPE,
                          LEVEL_DTYPE, MARKET_DTYPE, ORDER_DTYPE, POSITION_DTYPE, table_word)
from engine.views import descriptor_view, table_view


# _nrt=False: nothing here allocates, and without the runtime numba emits no reference
# counting for the arrays inside the state tuple on every call (it cost ~100 ns a call).
jit = njit(cache=True, nogil=True, boundscheck=False, _nrt=False)


# `st` is the descriptor's address; `_desc(st)` is the descriptor itself (its cursor words).
_desc = descriptor_view(D_COUNT)
_counters = table_view(table_word("counters"), np.int64, 1)
_markets = table_view(table_word("markets"), MARKET_DTYPE, 1)
_positions = table_view(table_word("positions"), POSITION_DTYPE, 2)
_accounts = table_view(table_word("accounts"), ACCOUNT_DTYPE, 1)
_orders = table_view(table_word("orders"), ORDER_DTYPE, 1)
_levels = table_view(table_word("levels"), LEVEL_DTYPE, 1)
_book_keys = table_view(table_word("book_keys"), np.int64, 2)
_book_levels = table_view(table_word("book_levels"), np.int32, 2)
_book_counts = table_view(table_word("book_counts"), np.int64, 1)
_book_dir = table_view(table_word("book_dir"), np.int32, 3)
_book_nblocks = table_view(table_word("book_nblocks"), np.int64, 2)
_book_depth = table_view(table_word("book_depth"), np.int64, 2)
_book_free = table_view(table_word("book_free"), np.int32, 1)
_cid_index = table_view(table_word("cid_index"), INDEX_DTYPE, 1)
_oid_index = table_view(table_word("oid_index"), INDEX_DTYPE, 1)
_index_deletes = table_view(table_word("index_deletes"), np.int64, 2)
_trigger_ticks = table_view(table_word("trigger_ticks"), np.int64, 1)
_trigger_keys = table_view(table_word("trigger_keys"), np.int64, 3)
_trigger_slots = table_view(table_word("trigger_slots"), np.int32, 3)
_trigger_depth = table_view(table_word("trigger_depth"), np.int64, 2)
_touched = table_view(table_word("touched"), np.int32, 1)
# the event ring: one buffer of 128-byte slots, one view per event family
_ring_words = table_view(D_RING, np.int64, 2)
_ring_headers = table_view(D_RING, EVENT_DTYPE, 1)
_order_events = table_view(D_RING, ORDER_EVENT_DTYPE, 1)
_trade_events = table_view(D_RING, TRADE_EVENT_DTYPE, 1)
_balance_events = table_view(D_RING, BALANCE_EVENT_DTYPE, 1)
_mark_events = table_view(D_RING, MARK_EVENT_DTYPE, 1)
_funding_events = table_view(D_RING, FUNDING_EVENT_DTYPE, 1)
_liquidation_events = table_view(D_RING, LIQUIDATION_EVENT_DTYPE, 1)
_insurance_events = table_view(D_RING, INSURANCE_EVENT_DTYPE, 1)

_report_accounts = jit(report_accounts)


@jit
def _number_reports(st, cmd, first_pos):
    """Advance account_seq by the reports among the command's events, which start after its
    EV_COMMAND at ring position first_pos - 1 (engine/reports.py: the one rule)."""
    desc = _desc(st)
    mask = desc[D_MASK]
    headers = _ring_headers(st)
    trades = _trade_events(st)
    accounts = _accounts(st)
    n_accounts = len(accounts)
    for pos in range(first_pos, desc[D_WRITE]):
        j = pos & mask
        etype = headers[j].etype
        maker = trades[j].maker_account if etype == EV_TRADE else NO_ACCOUNT
        first, second = _report_accounts(cmd.cmd, pos - first_pos + 1, etype,
                                         headers[j].account, maker, n_accounts)
        if first != NO_ACCOUNT:
            accounts[first].account_seq += 1
        if second != NO_ACCOUNT:
            accounts[second].account_seq += 1


# An order flag no command may carry (_new_order rejects unknown flags): the taker is the
# liquidation engine closing its account's position. It pays no taker fee and its trades are
# marked `liquidation`.
FLAG_LIQUIDATION_TAKER = 0x80
