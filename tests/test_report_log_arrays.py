"""ArrayReportLog (gateway/report_log_arrays.py) against its oracle, ReportLog
(gateway/replay.py): the same appends give the same `after` answers, `entries` and `bytes()`,
and appends from compiled code (`log_append`) the same arrays as the class's."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from gateway.memory import ENTRY_BYTES
from gateway.replay import ReportLog
from gateway.report_log_arrays import ArrayReportLog, log_append

ACCOUNTS = 6


def _assert_same(array_log: ArrayReportLog, oracle: ReportLog, last_seq: list[int]) -> None:
    assert array_log.entries == oracle.entries
    assert array_log.bytes() == oracle.bytes()
    for account in range(ACCOUNTS):
        for last in range(last_seq[account] + 1):
            for from_seq in range(last + 2):
                assert array_log.after(account, from_seq, last) == \
                    oracle.after(account, from_seq, last), (account, from_seq, last)


# a step: (account, role, idx, a byte to fill the record with)
_steps = st.lists(st.tuples(st.integers(0, ACCOUNTS - 1), st.integers(0, 1),
                            st.integers(0, 9), st.integers(0, 255)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(keep=st.integers(1, 4), logs=st.integers(1, ACCOUNTS + 1), steps=_steps)
def test_answers_as_report_log(keep, logs, steps):
    """Random appends over several accounts, with memory for `logs` logs (fewer than the
    accounts: the first made is forgotten; more: the slots are the accounts), compared after
    every step on every (account, from_seq, last) up to the account's last report."""
    max_bytes = logs * keep * ENTRY_BYTES
    oracle = ReportLog(keep, max_bytes)
    array_log = ArrayReportLog(keep, max_bytes, accounts=ACCOUNTS)
    assert array_log.max_accounts == oracle.max_accounts
    last_seq = [0] * ACCOUNTS     # numbered per account, as the gateway's tracker does
    for seq, (account, role, idx, fill) in enumerate(steps, 1):
        last_seq[account] += 1
        # a distinct record per report: command and event halves both vary
        record = bytes([fill]) * 64 + seq.to_bytes(8, "little") * 16
        oracle.append(account, last_seq[account], seq, idx, role, record)
        array_log.append(account, last_seq[account], seq, idx, role, record)
        _assert_same(array_log, oracle, last_seq)


@njit(cache=True)
def _append_compiled(arrays_accounts, accounts, account_seqs, seqs, idxs, roles, cmds, evs,
                     kept):
    """The router's way in: log_append from compiled code, the records as row views."""
    slot_of, slot_account, records, fields, count, head, totals = arrays_accounts
    for i in range(len(accounts)):
        kept[i] = log_append(slot_of, slot_account, records, fields, count, head, totals,
                             accounts[i], account_seqs[i], seqs[i], idxs[i], roles[i],
                             cmds[i], evs[i])


def test_compiled_appends_are_the_class_appends():
    rng = np.random.default_rng(7)
    n, keep = 200, 3
    accounts = rng.integers(0, ACCOUNTS, n)
    account_seqs = np.zeros(n, np.int64)
    last = np.zeros(ACCOUNTS, np.int64)
    for i, a in enumerate(accounts):
        last[a] += 1
        account_seqs[i] = last[a]
    seqs = np.arange(1, n + 1, dtype=np.int64)
    idxs = rng.integers(0, 5, n)
    roles = rng.integers(0, 2, n)
    cmds = rng.integers(0, 256, (n, 64), dtype=np.uint8)
    evs = rng.integers(0, 256, (n, 128), dtype=np.uint8)
    by_class = ArrayReportLog(keep, 4 * keep * ENTRY_BYTES, accounts=ACCOUNTS)
    for i in range(n):
        by_class.append(int(accounts[i]), int(account_seqs[i]), int(seqs[i]), int(idxs[i]),
                        int(roles[i]), cmds[i].tobytes() + evs[i].tobytes())
    compiled = ArrayReportLog(keep, 4 * keep * ENTRY_BYTES, accounts=ACCOUNTS)
    kept = np.zeros((n, 192), np.uint8)
    _append_compiled(compiled.arrays(), accounts, account_seqs, seqs, idxs, roles, cmds, evs,
                     kept)
    for mine, theirs in zip(compiled.arrays(), by_class.arrays()):   # totals included
        assert np.array_equal(mine, theirs)
    # each append returned the record it kept
    assert np.array_equal(kept, np.concatenate([cmds, evs], axis=1))
