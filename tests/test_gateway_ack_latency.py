"""The gateway's ack-latency histogram (gateway/ack_latency.py), as its stats file shows it:
every reply to a request the matcher answered is counted once, from the gateway's receipt to
the reply's send, the durable hold included; what the gateway answers itself is not."""

import time

import pytest

from gateway.ack_latency import ACK_BUCKETS_S, FOLD_AT, AckLatency
from tests.gateway_fixtures import WAIT_S, gateway_stats, order, wait_until
from tests.gateway_fixtures import exchange_factory  # noqa: F401 — fixture
from tests.shm_workers import shm_prefix  # noqa: F401 — fixture: unique prefix, leak check


def ack_latency(ex) -> dict:
    return gateway_stats(ex)["ack_latency"]


def counted(ex) -> int:
    return sum(ack_latency(ex)["counts"])


@pytest.fixture
def make(exchange_factory, tmp_path):  # noqa: F811
    def start(durable=False):
        stats_file = tmp_path / "gateway-0.stats.json"
        ex = exchange_factory(durable=durable, stats_file=str(stats_file))
        ex.stats_file = stats_file
        return ex
    return start


def test_every_matcher_reply_is_counted_once_and_nothing_else(make):
    ex = make()
    a = ex.client(1)
    replies = []
    for cid in range(1, 21):
        replies.append(a.request(**order(cid, "BTC-PERP", "buy", "0.1", "60000"))["type"])
        replies.append(a.request(type="cancel", cid=cid)["type"])
    replies.append(a.request(type="cancel", cid=999)["type"])        # the matcher rejects it
    assert replies == ["ack", "canceled"] * 20 + ["reject"]
    # answered by the gateway alone: not counted
    assert a.request(type="ping")["type"] == "pong"
    assert a.request(type="no_such_type")["reason"] == "invalid_message"
    assert a.request(**order(50, "BTC-PERP", "buy", "0.1", "60000.00001"))["type"] == "reject"
    assert a.request(type="open_orders")["type"] == "open_orders"
    wait_until(lambda: counted(ex) >= 41, WAIT_S, "41 replies in the stats file")
    time.sleep(1.2)     # one more write of the stats file: nothing else arrives
    hist = ack_latency(ex)
    assert sum(hist["counts"]) == 41
    assert hist["le_s"] == list(ACK_BUCKETS_S) and len(hist["counts"]) == len(ACK_BUCKETS_S) + 1
    assert 0 < hist["sum_s"] < 41 * 1.0


def test_durable_wait_includes_the_hold(make):
    ex = make(durable=True)
    a = ex.client(1)
    seq_before = ex.seq()
    rids = [a.send(**order(cid, "BTC-PERP", "buy", "0.1", "60000")) for cid in (1, 2, 3)]
    wait_until(lambda: ex.seq() >= seq_before + 3, WAIT_S, "the matcher to take the orders")
    time.sleep(1.2)      # the hold: journaled (durable_seq) only now; the stats file rewritten
    assert counted(ex) == 0
    ex.durable.value = ex.seq()
    for rid in rids:
        assert a.wait_for(lambda m, rid=rid: m.get("rid") == rid)["type"] == "ack"
    wait_until(lambda: counted(ex) == 3, WAIT_S, "the 3 released acks in the stats file")
    hist = ack_latency(ex)
    # each waited at least the 1.2 s hold: the buckets up to 1 s are empty
    below = ACK_BUCKETS_S.index(1.0) + 1
    assert hist["counts"][:below] == [0] * below
    assert hist["sum_s"] >= 3 * 1.2


def test_folds_stay_small_and_count_every_wait():
    """Waits are bucketed every FOLD_AT replies, not a second's worth at once (a 0.7 ms stop of
    the serving thread at 20k orders/s); the buckets follow Prometheus' `le`."""
    lat = AckLatency()
    bound_ns = round(ACK_BUCKETS_S[0] * 1e9)
    n = 3 * FOLD_AT + 5
    for seq in range(1, n + 1):
        lat.replied(seq, 0)
        # a wait equal to a bound is in that bound's bucket; one above it in the next
        lat.sent_upto(seq, bound_ns + (seq % 2))
        assert len(lat._waits_ns) < FOLD_AT
    stats = lat.stats()
    odd = n - n // 2                  # the waits one above the bound
    assert stats["counts"][:2] == [n - odd, odd] and sum(stats["counts"]) == n
    assert stats["sum_s"] == (n * bound_ns + odd) / 1e9
