"""perpx/client.py's report-stream bookkeeping (pure logic, no sockets): reports delivered in
account_seq order and once, a gap asks for a replay, and a lost reply is recognised among the
reports by its cid or oid."""

import itertools

import zmq

from perpx.client import SYNC_FROM, _ReportStream, is_outcome


def r(n, **fields):
    return {"type": "fill", "account_seq": n, **fields}


def test_in_order_once_and_gaps_ask_for_a_replay():
    s = _ReportStream(from_account_seq=None)
    assert s.replay_request(7) == {"type": "replay", "rid": 7, "from_account_seq": SYNC_FROM}
    assert s.accept(r(5)) == []                      # before the sync point is known: held
    assert s.on_message({"type": "replayed", "rid": 7, "last_account_seq": 4,
                         "more": False}) == [r(5)]
    assert s.last == 5 and not s.need_replay
    assert s.accept(r(5)) == []                      # a duplicate (replay and live copy)
    assert s.accept(r(7)) == [] and s.need_replay    # 6 is missing
    assert s.replay_request(8)["from_account_seq"] == 5
    assert s.accept({"type": "ack", "account_seq": 8, "rid": 3}, as_reply=True) == []
    assert s.on_message(r(6)) == [r(6), r(7)]        # the replay fills the gap; 8 was the reply
    assert s.last == 8
    assert s.on_message({"type": "replayed", "rid": 8, "last_account_seq": 8,
                         "more": False}) == []
    assert not s.need_replay
    # an answer to a replay given up is dropped; one that stopped early asks again
    assert s.on_message({"type": "replayed", "rid": 1, "last_account_seq": 8}) == []
    s.replay_request(9)
    s.on_message({"type": "replayed", "rid": 9, "last_account_seq": 8, "more": True})
    assert s.need_replay
    # a refused replay (rate limited) is asked again
    s.replay_request(10)
    assert s.on_message({"type": "reject", "rid": 10, "reason": "rate_limited"}) == []
    assert s.need_replay and s.replay_rid is None


def test_outcomes_by_cid_or_oid():
    new = {"type": "new_order", "cid": 5}
    assert is_outcome(new, {"type": "ack", "cid": 5, "oid": 9})
    assert is_outcome(new, {"type": "reject", "cid": 5, "reason": "price_band"})
    assert not is_outcome(new, {"type": "reject", "cid": 5, "oid": 9})   # a fired stop's
    assert not is_outcome(new, {"type": "fill", "cid": 5})
    by_oid = {"type": "cancel", "oid": 9}
    assert is_outcome(by_oid, {"type": "canceled", "oid": 9, "cid": 5, "reason": "user"})
    assert not is_outcome(by_oid, {"type": "canceled", "oid": 9, "reason": "ioc"})
    assert is_outcome(by_oid, {"type": "reject", "oid": 9, "reason": "unknown_order"})
    by_cid = {"type": "amend", "cid": 5}
    assert is_outcome(by_cid, {"type": "amended", "cid": 5, "oid": 9})
    assert not is_outcome(by_cid, {"type": "amended", "cid": 6, "oid": 9})
    done = {"type": "withdraw", "cid": 77}
    assert is_outcome(done, {"type": "done", "cid": 77})
    assert not is_outcome(done, {"type": "done"})


def test_a_new_connection_is_told_hello_first_then_the_replay():
    s = _ReportStream(from_account_seq=3)
    rids = itertools.count(20)
    assert s.on_connection_event(zmq.EVENT_DISCONNECTED) is False
    assert s.on_connection_event(zmq.EVENT_HANDSHAKE_SUCCEEDED) is True
    assert s.resume(rids) == [{"type": "replay", "rid": 20, "from_account_seq": 3}]  # no hello
    s.replay_rid = None
    s.hello = {"cancel_on_disconnect": True}
    s.on_connection_event(zmq.EVENT_DISCONNECTED)
    s.on_connection_event(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    assert s.resume(rids) == [{"type": "hello", "rid": 21, "cancel_on_disconnect": True},
                              {"type": "replay", "rid": 22, "from_account_seq": 3}]
    assert s.resume(rids) == []                      # said once per connection
    # its answer is nobody's reply and no report; a refusal is said again
    assert s.on_message({"type": "reject", "rid": 21, "reason": "rate_limited"}) == []
    assert [m["type"] for m in s.resume(rids)] == ["hello"]
    assert s.on_message({"type": "hello", "rid": 23, "account": 1,
                         "cancel_on_disconnect": True}) == []
    assert s.resume(rids) == [] and not s.need_hello
