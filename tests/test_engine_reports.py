"""engine/reports.py: which events are reports to which account (account_seq), by example,
through both engines (tests/engine_helpers.Engines runs the reference and the compiled
matcher and asserts they agree)."""

import numpy as np

from engine.records import EV_MARK, EV_REJECT, EV_TRIGGERED, KIND_STOP_LIMIT, SIDE_BUY
from engine.reports import account_seqs_of_events
from tests import engine_helpers as eh

MAX = eh.CONFIG.max_accounts


def numbers(e, *accounts) -> list[int]:
    got = [int(e.st.accounts["account_seq"][a]) for a in accounts]
    assert got == [e.ref.account_seqs[a] for a in accounts]
    return got


def test_which_events_are_reports_to_whom():
    e = eh.btc_engines((1, 1000 * eh.USDC), (2, 1000 * eh.USDC))
    events = []

    def run(kind, *commands):
        out = getattr(e, kind)(*commands)
        events.extend(out)
        return out

    assert numbers(e, 1, 2) == [0, 0]            # deposits are the operator's: no report
    run("client", eh.sell(1, 5, eh.MARK, cid=1))                    # ack
    assert numbers(e, 1, 2) == [1, 0]
    run("client", eh.buy(2, 2, eh.MARK, cid=2))   # ack, then one fill to each side
    assert numbers(e, 1, 2) == [2, 2]
    run("client", eh.cancel(1, cid=99))                             # a client's reject
    assert numbers(e, 1, 2) == [3, 2]
    run("client", eh.deposit(1, 5))             # a privileged command from a client ring
    run("admin", eh.liquidate(2))               # riskd's command refused: healthy
    run("client", eh.buy(MAX + 3, 1, eh.MARK))  # no such account: nobody's report
    assert numbers(e, 1, 2) == [3, 2]
    run("client", eh.cancel_all(1))              # the rest canceled, then done
    run("client", eh.withdraw(2, eh.USDC))       # done (EV_BALANCE is no report)
    assert numbers(e, 1, 2) == [5, 3]
    # the consumer's tracker, fed the same events from zero, numbers them the same
    want = e.st.accounts["account_seq"]
    assert list(account_seqs_of_events(events, np.zeros(MAX, np.int64))) == list(want)


def test_a_fired_stops_reject_is_a_report_to_its_owner():
    """Under an operator's SET_MARK (no client command), a stop fires and a check at trigger
    time refuses it: `triggered` and the reject are both reports to the owner."""
    e = eh.btc_engines((1, 1000 * eh.USDC))
    stop = eh.order(1, SIDE_BUY, 1, 720_000, kind=KIND_STOP_LIMIT, cid=1)
    stop["amount_atoms"] = eh.MARK + 2_000        # trigger; 720 000 is beyond the band then
    e.client(stop)
    assert numbers(e, 1) == [1]
    ev = e.admin(eh.set_mark(eh.MARK + 2_000))
    assert [x["etype"] for x in ev[1:]] == [EV_MARK, EV_TRIGGERED, EV_REJECT]
    assert numbers(e, 1) == [3]
