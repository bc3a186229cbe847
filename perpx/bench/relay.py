"""The relay floor of `perpx bench e2e`: the exchange's shape without its logic.

Two processes wired like the order path, with perpx's own shm rings and doorbells:

- gateway-shaped: a ROUTER (CURVE, as the gateway and the echo), one pass = hand the events
  that arrived back to their clients, receive what the clients sent (up to RECV_BATCH),
  write one 64-byte command per message into the command ring (one write per pass); when
  idle, one poll(2) on the ROUTER and the event ring's doorbell (a FIFO), as gateway/server.py
  (gateway/socket_poll.py).
- matcher-shaped: drains the command ring and answers each command with one 128-byte event
  carrying its token; idles as the real matcher does when it shares a CPU with the gateway
  (SCHED_BATCH, 20 yields, then sleep on the doorbell: perpx/matcherd.py).

The gateway keeps each message by token and sends the frames back unchanged when its event
comes: the clients see the echo's replies. Both are pinned as the supervisor pins the order
path (plan_cpus with one gateway). What the exchange loses against this floor is its own
work: parsing, checks, matching, the mirror, replies built, the journal.
"""

from __future__ import annotations

import os
import signal

import numpy as np

from gateway.socket_poll import SocketPoll
from gateway.server import gateway_context
from perpx.bench.cpu import name_process
from perpx.matcherd import share_cpu_with_gateway
from perpx.supervisor import plan_cpus
from shm.ring import CommandRing, EventRing
from shm.wait import shared_cpu_wait

CAPACITY = 1 << 14
RECV_BATCH = 256
TOKEN_COMMAND = np.dtype([("token", "<i8"), ("_pad", "u1", (56,))])
TOKEN_EVENT = np.dtype([("token", "<i8"), ("_pad", "u1", (120,))])


def ring_names(tag: str) -> tuple[str, str]:
    return f"/perpx-relay-{tag}-cmd", f"/perpx-relay-{tag}-evt"


def create_rings(tag: str) -> tuple[CommandRing, EventRing]:
    cmd_name, evt_name = ring_names(tag)
    cmd = CommandRing.create(cmd_name, TOKEN_COMMAND, CAPACITY)
    try:
        evt = EventRing.create(evt_name, TOKEN_EVENT, CAPACITY, ["gateway"])
    except BaseException:
        cmd.close()
        cmd.unlink()
        raise
    return cmd, evt


def curve_router(ctx, secret: bytes):
    """A CURVE server ROUTER bound to a free loopback port: (socket, its endpoint). The
    floors' (echo, relay) front, as the gateway's."""
    import zmq
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.curve_server = True
    router.curve_secretkey = secret
    router.bind("tcp://127.0.0.1:*")
    return router, router.getsockopt_string(zmq.LAST_ENDPOINT)


def _pin(role: str) -> None:
    plan = plan_cpus(os.sched_getaffinity(0), 1)
    os.sched_setaffinity(0, plan[role])


def matcher_main(tag: str, stop_evt) -> None:
    """Answer each command with one event, until stop_evt."""
    import gc
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name_process("relay-matcher")
    _pin("matcher")
    share_cpu_with_gateway()
    cmd_name, evt_name = ring_names(tag)
    cmd = CommandRing.attach(cmd_name, TOKEN_COMMAND, wait=shared_cpu_wait)
    evt = EventRing.attach(evt_name, TOKEN_EVENT)
    out = np.zeros(CAPACITY, TOKEN_EVENT)
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        while not stop_evt.is_set():
            if not cmd.wait(1, timeout_s=0.1):
                continue
            head, tail = cmd.peek_views(CAPACITY)
            n = len(head) + len(tail)
            out["token"][:len(head)] = head["token"]
            out["token"][len(head):n] = tail["token"]
            done = 0
            while done < n and not stop_evt.is_set():
                if not evt.wait_for_space(1, timeout_s=0.1):
                    continue
                done += evt.write(out[done:n])
            cmd.advance(n)
    finally:
        cmd.close()
        evt.close()


def gateway_main(tag: str, secret: bytes, queue, stop_evt) -> None:
    """ROUTER in, command ring out; event ring in, ROUTER out."""
    import gc
    import zmq
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name_process("relay-gateway")
    _pin("gateway-0")
    cmd_name, evt_name = ring_names(tag)
    bells = []

    def wait_factory(bell):
        bells.append(bell)
        return shared_cpu_wait(bell)

    evt = EventRing.attach(evt_name, TOKEN_EVENT, wait=wait_factory)
    consumer = evt.consumer("gateway", start="current")
    bell = bells[-1]
    cmd = CommandRing.attach(cmd_name, TOKEN_COMMAND)
    ctx = gateway_context()       # the gateway's I/O thread policy: the floor has its shape
    router, endpoint = curve_router(ctx, secret)
    queue.put(("endpoint", -1, endpoint))
    poller = SocketPoll(router, bell.fileno())
    pending: dict = {}
    batch = np.zeros(RECV_BATCH, TOKEN_COMMAND)
    token = 0
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        while not stop_evt.is_set():
            worked = 0
            available = consumer.available()
            if available:
                head, tail = consumer.peek_views(available)
                for part in (head, tail):
                    for t in part["token"].tolist():
                        router.send_multipart(pending.pop(t))
                consumer.advance(available)
                worked += available
            n = 0
            while n < RECV_BATCH and router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                pending[token] = router.recv_multipart(zmq.NOBLOCK)
                batch["token"][n] = token
                token += 1
                n += 1
            if n:
                written = 0
                while written < n and not stop_evt.is_set():
                    if not cmd.wait_for_space(1, timeout_s=0.1):
                        continue
                    written += cmd.write(batch[written:n])
                worked += n
            if worked:
                continue
            armed = bell.arm()
            readable = False
            try:
                if consumer.available():
                    continue
                if bell.fileno() in poller.wait(50):
                    readable = True
            finally:
                bell.disarm(armed, readable)
    finally:
        router.close(0)
        ctx.term()
        consumer.deregister()
        evt.close()
        cmd.close()
