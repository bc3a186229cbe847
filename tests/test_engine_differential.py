"""The compiled matcher against the reference model: same commands in, same events out.

After every command the reference model's invariants hold; after every batch the compiled
state passes engine/invariants.py (book not crossed, FIFO links, positions sum to zero,
open-order totals, collateral conserved to the atom).
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from engine.invariants import account_seq_problems, check_state
from engine.matcher import LocalEvents, Matcher
from engine.records import (CMD_LIQUIDATE, COMMAND_DTYPE, EV_COMMAND, EV_INSURANCE,
                            INSURANCE_DEFICIT)
from engine.reference import RISK_RAISING_COMMANDS, ReferenceMatcher
from engine.state import C_INSURANCE_ATOMS
from tests.fuzz_streams import FUZZ_CONFIG, command_lists, commands_from_dicts, genesis, random_stream

BATCH = 64
# CI runs >= 200k commands; PERPX_FUZZ_COMMANDS raises it for a long soak.
TOTAL_COMMANDS = int(os.environ.get("PERPX_FUZZ_COMMANDS", "208000"))
SEEDS = 8


def run_both(commands: np.ndarray, check_every_batch: bool = True, ring_slots: int = 1 << 12):
    """Feed both engines; privileged and unprivileged batches alternate."""
    fast = Matcher(FUZZ_CONFIG)
    ring = LocalEvents(ring_slots)
    ref = ReferenceMatcher(FUZZ_CONFIG)
    for b, start in enumerate(range(0, len(commands), BATCH)):
        batch = commands[start:start + BATCH]
        privileged = b % 3 != 1
        seqs_before = fast.state.accounts["account_seq"].copy()
        got = ring.run(fast, batch, source=b % 4, privileged=privileged)
        want = []
        for i, rec in enumerate(batch):
            account = int(rec["account"])
            known = 0 <= account < FUZZ_CONFIG.max_accounts
            before = ref.risk_snapshot(account) if known else None
            want.extend(ref.process({k: int(rec[k]) for k in COMMAND_DTYPE.names}, b % 4,
                                    privileged))
            ref.check_invariants()
            if before is not None and int(rec["cmd"]) in RISK_RAISING_COMMANDS:
                assert not ref.check_risk_raised(account, before)
            if before is not None and int(rec["cmd"]) == CMD_LIQUIDATE:
                _assert_fund_paid_only_losses(ref, account, int(rec["market"]), before[1],
                                              want)
        if got != want:
            _explain(got, want, start)
        # the compiled counters advanced by the rule applied to its own events, and agree
        # with the reference's
        problems = account_seq_problems(seqs_before, got, fast.state.accounts["account_seq"])
        assert not problems, f"batch at {start}: {problems}"
        assert list(fast.state.accounts["account_seq"]) == ref.account_seqs
        if check_every_batch:
            problems = check_state(fast.state)
            assert not problems, f"after command {start + len(batch)}: {problems}"
    _assert_same_accounts(fast, ref)
    return fast, ref


def _assert_fund_paid_only_losses(ref, account, scope, balance_before, events):
    """After a liquidation, the account's balance is no more than its closing fills alone
    left it, unless that was a loss: the fund lifts a negative balance (cross) or an isolated
    position's loss beyond its margin at most back to zero."""
    covered = sum(-e["amount_atoms"] for e in events
                  if e["etype"] == EV_INSURANCE and e["reason"] == INSURANCE_DEFICIT
                  and e["seq"] == ref.seq and e["account"] == account)
    if covered:
        after = ref.balances[account]
        floor = 0 if scope == -1 else balance_before
        assert after <= max(after - covered, floor), (ref.seq, after, covered, floor)


def _assert_same_accounts(fast, ref):
    """Balances, positions with their margin settings, and the insurance fund agree."""
    st = fast.state
    assert list(st.accounts["balance_atoms"]) == ref.balances
    assert int(st.counters[C_INSURANCE_ATOMS]) == ref.insurance_atoms
    for (account, market), p in ref.positions.items():
        row = st.positions[account, market]
        assert (int(row["size_lots"]), int(row["cost_atoms"]), int(row["isolated_margin_atoms"]),
                int(row["leverage"]), int(row["margin_mode"])) == (
            p.size_lots, p.cost_atoms, p.isolated_margin_atoms, p.leverage, p.margin_mode)


def _explain(got, want, start):
    for k, (g, w) in enumerate(zip(got, want)):
        if g != w:
            cmd = next(e for e in reversed(got[:k + 1]) if e["etype"] == EV_COMMAND)
            diff = {f: (g.get(f), w.get(f)) for f in set(g) | set(w) if g.get(f) != w.get(f)}
            pytest.fail(f"event {k} of batch at {start} differs for command {cmd['command']}:"
                        f" {diff}\ncompiled: {g}\nreference: {w}")
    pytest.fail(f"batch at {start}: {len(got)} events compiled, {len(want)} reference")


@pytest.mark.parametrize("seed", range(SEEDS))
def test_seeded_streams_agree(seed):
    commands = np.concatenate([genesis(), random_stream(seed, TOTAL_COMMANDS // SEEDS,
                                                        account_states=seed % 2 == 0)])
    fast, ref = run_both(commands, check_every_batch=seed < 2)
    assert fast.seq == ref.seq == len(commands)
    assert not check_state(fast.state)
    # the stream must exercise matching, not just rejects
    assert ref.next_trade_id > len(commands) // 50
    # and most accounts received reports of every kind the rule counts
    assert sum(1 for s in ref.account_seqs if s > 100) >= 8


def test_events_identical_through_a_ring_smaller_than_a_command():
    """A 16-slot ring: batches stop early and big commands go through the overflow buffer."""
    commands = np.concatenate([genesis(), random_stream(99, 8_000)])
    run_both(commands, check_every_batch=False, ring_slots=16)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_lists)
def test_hypothesis_streams_agree(items):
    run_both(np.concatenate([genesis(), commands_from_dicts(items)]))
