"""The replay log (gateway/replay.py, `ReportLog`) in numpy arrays, so that replay (Python)
and the compiled router (gateway/compiled_pass.py) keep and read one log.

Same contract as ReportLog, which stays the oracle (tests/test_report_log_arrays.py): the
last `keep` reports of each account, for at most `max_accounts` accounts; a new account
beyond that takes the log of the account whose log was made first (FIFO of creation, as
ReportLog's dict order), and `entries` counts the reports kept over all accounts.

Layout (`arrays()`, in the order `log_append` takes them):
- slot_of[account]: the account's log slot, -1 when it has none;
- slot_account[slot]: the account holding the slot, -1 while the slot was never used;
- records[slot, keep, 192] uint8: the 64-byte command record then the 128-byte event record;
- fields[slot, keep, 4] int64: account_seq, seq, idx, role (F_* columns);
- count[slot]: reports kept (<= keep); head[slot]: ring position of the oldest;
- totals[2] int64: T_ENTRIES (reports kept, all slots), T_SLOTS_MADE (logs made so far: the
  next one takes slot T_SLOTS_MADE % slots, the one made first of those alive).
Slots: min(max_accounts, accounts), so what is allocated is bounded by both the memory share
and the engine's account count; np.zeros leaves pages untouched until a slot is used.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.records import COMMAND_BYTES, EVENT_BYTES
from gateway.memory import ENTRY_BYTES
from gateway.replay import DEFAULT_KEEP

RECORD_BYTES = COMMAND_BYTES + EVENT_BYTES
F_ACCOUNT_SEQ, F_SEQ, F_IDX, F_ROLE = range(4)
T_ENTRIES, T_SLOTS_MADE = range(2)


@njit(cache=True)
def log_append(slot_of, slot_account, records, fields, count, head, totals,
               account, account_seq, seq, idx, role, cmd64, ev128):
    """Keep one report of `account` (0 <= account < len(slot_of)): its command record
    `cmd64` and event record `ev128` (uint8 arrays, copied in). Returns the kept 192-byte
    record (a view into `records`), which the router renders from."""
    keep = records.shape[1]
    slot = slot_of[account]
    if slot < 0:                  # a new log: the slot made longest ago, or a never-used one
        slot = totals[T_SLOTS_MADE] % records.shape[0]
        totals[T_SLOTS_MADE] += 1
        evicted = slot_account[slot]
        if evicted >= 0:          # its account is forgotten: replays go to the durable store
            slot_of[evicted] = -1
            totals[T_ENTRIES] -= count[slot]
        slot_account[slot] = account
        slot_of[account] = slot
        count[slot] = 0
        head[slot] = 0
    if count[slot] < keep:
        pos = (head[slot] + count[slot]) % keep
        count[slot] += 1
        totals[T_ENTRIES] += 1
    else:                         # a full ring overwrites its oldest
        pos = head[slot]
        head[slot] = (pos + 1) % keep
    records[slot, pos, :COMMAND_BYTES] = cmd64
    records[slot, pos, COMMAND_BYTES:] = ev128
    fields[slot, pos, F_ACCOUNT_SEQ] = account_seq
    fields[slot, pos, F_SEQ] = seq
    fields[slot, pos, F_IDX] = idx
    fields[slot, pos, F_ROLE] = role
    return records[slot, pos]


class ArrayReportLog:
    """ReportLog's interface (append, bytes, after, keep, max_accounts, entries) over the
    arrays above; `accounts` is the engine's account count (ids are 0 .. accounts - 1)."""

    def __init__(self, keep: int = DEFAULT_KEEP, max_bytes: int = 1 << 62, *, accounts: int):
        self.keep = keep
        self.max_accounts = max(1, max_bytes // (keep * ENTRY_BYTES))
        slots = min(self.max_accounts, accounts)
        self.slot_of = np.full(accounts, -1, np.int64)
        self.slot_account = np.full(slots, -1, np.int64)
        self.records = np.zeros((slots, keep, RECORD_BYTES), np.uint8)
        self.fields = np.zeros((slots, keep, 4), np.int64)
        self.count = np.zeros(slots, np.int64)
        self.head = np.zeros(slots, np.int64)
        self.totals = np.zeros(2, np.int64)

    def arrays(self) -> tuple:
        """The arrays in `log_append`'s order: log_append(*log.arrays(), account, ...)."""
        return (self.slot_of, self.slot_account, self.records, self.fields, self.count,
                self.head, self.totals)

    @property
    def entries(self) -> int:
        """Reports kept, over all accounts."""
        return int(self.totals[T_ENTRIES])

    def append(self, account: int, account_seq: int, seq: int, idx: int, role: int,
               record: bytes) -> None:
        u8 = np.frombuffer(record, np.uint8)
        log_append(*self.arrays(), account, account_seq, seq, idx, role,
                   u8[:COMMAND_BYTES], u8[COMMAND_BYTES:])

    def bytes(self) -> int:
        """What the kept reports take, as ReportLog counts them (ENTRY_BYTES each)."""
        return ENTRY_BYTES * self.entries

    def oldest(self, account: int):
        """The oldest kept account_seq of the account, or None."""
        slot = self.slot_of[account] if 0 <= account < len(self.slot_of) else -1
        if slot < 0 or self.count[slot] == 0:
            return None
        return int(self.fields[slot, self.head[slot], F_ACCOUNT_SEQ])

    def after(self, account: int, from_seq: int, last: int):
        """The kept reports numbered in (from_seq, last], as a list of
        (account_seq, seq, idx, role, record bytes), or None when memory no longer holds all
        of them (the oldest kept is above from_seq + 1): ReportLog.after's answer."""
        slot = self.slot_of[account]
        n = self.count[slot] if slot >= 0 else 0
        if n == 0:
            return [] if from_seq >= last else None
        head = self.head[slot]
        oldest = int(self.fields[slot, head, F_ACCOUNT_SEQ])
        if oldest > from_seq + 1:
            return None
        pos = (head + np.arange(max(0, from_seq + 1 - oldest), n)) % self.keep
        records = self.records[slot]
        return [(a_seq, seq, idx, role, records[p].tobytes())
                for (a_seq, seq, idx, role), p in zip(self.fields[slot, pos].tolist(),
                                                      pos.tolist())
                if a_seq <= last]
