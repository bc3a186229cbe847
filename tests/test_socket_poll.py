"""gateway/socket_poll.py on real sockets over loopback: what wakes its sleep, and the message
whose wake-up a call on the socket already took."""

from __future__ import annotations

import os
import threading

import pytest
import zmq

from gateway.socket_poll import SocketPoll

# Long enough that a sleep which missed its wake-up shows as an empty answer, not a pass.
NEVER_MS = 10_000


@pytest.fixture
def pair():
    """A ROUTER bound to loopback and a DEALER connected to it, one message through already
    (the connection is up)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        router.linger = dealer.linger = 0
        router.bind("tcp://127.0.0.1:*")
        dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
        dealer.send(b"hello")
        assert router.poll(10_000), "the first message never came"
        router.recv_multipart()
        yield router, dealer
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def _drain(router) -> int:
    got = 0
    while True:
        try:
            router.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return got
        got += 1


def test_a_message_wakes_the_sleep(pair):
    router, dealer = pair
    poll = SocketPoll(router)
    assert _drain(router) == 0
    sender = threading.Timer(0.05, dealer.send, (b"order",))
    sender.start()
    try:
        assert poll.wait(NEVER_MS) == [poll.sock_fd]
    finally:
        sender.join()
    assert _drain(router) == 1


def test_a_message_already_taken_in_returns_at_once(pair):
    """The message arrived and a call on the ROUTER (a send, here the events query) processed
    its wake-up: its fd is quiet, and `wait` must not sleep on it."""
    router, dealer = pair
    poll = SocketPoll(router)
    dealer.send(b"order")
    assert router.poll(10_000), "the message never came"     # zmq_poll: asks ZMQ_EVENTS
    assert poll.wait(NEVER_MS) == [poll.sock_fd]
    assert _drain(router) == 1


def test_a_plain_fd_wakes_it_and_is_named(pair):
    router, _ = pair
    r, w = os.pipe()
    try:
        poll = SocketPoll(router, r)
        writer = threading.Timer(0.05, os.write, (w, b"x"))
        writer.start()
        assert poll.wait(NEVER_MS) == [r]
        writer.join()
    finally:
        os.close(r)
        os.close(w)


def test_nothing_times_out_empty(pair):
    router, _ = pair
    assert SocketPoll(router).wait(20) == []


def test_wait_fds_sleeps_through_queued_messages_until_a_plain_fd(pair):
    """A caller that cannot read the socket (the gateway with a full command ring) sleeps
    through the messages queued on it and wakes for its fds alone."""
    router, dealer = pair
    r, w = os.pipe()
    try:
        poll = SocketPoll(router, r)
        dealer.send(b"order")
        assert poll.wait(NEVER_MS) == [poll.sock_fd]       # queued: `wait` returns at once
        assert poll.wait_fds(20) == []
        writer = threading.Timer(0.05, os.write, (w, b"x"))
        writer.start()
        assert poll.wait_fds(NEVER_MS) == [r]
        writer.join()
        assert _drain(router) == 1
    finally:
        os.close(r)
        os.close(w)
