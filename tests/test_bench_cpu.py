"""perpx/bench/cpu.py's CpuWindow on a process whose hand-overs are known: a child that
plays ZeroMQ ping-pong over loopback TCP, one round trip per millisecond at most."""

from __future__ import annotations

import multiprocessing as mp
import time

from perpx.bench.cpu import CpuWindow, name_process

WINDOW_S = 1.0


def _ping_pong(done, stop) -> None:
    """Round trips between two PAIR sockets over TCP until stop; `done` counts them. Each
    message is alone on the wire (the next waits for it) and each trip sleeps 1 ms."""
    import zmq
    name_process("client")
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("tcp://127.0.0.1:*")
        b.connect(a.getsockopt_string(zmq.LAST_ENDPOINT))
        while not stop.is_set():
            a.send(b"ping")
            b.recv()
            b.send(b"pong")
            a.recv()
            with done.get_lock():
                done.value += 1
            time.sleep(0.001)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_cpu_window_counts_wakes_zmq_io_and_segments():
    spawn = mp.get_context("spawn")
    done, stop = spawn.Value("q", 0), spawn.Event()
    child = spawn.Process(target=_ping_pong, args=(done, stop), daemon=True)
    child.start()
    try:
        deadline = time.monotonic() + 30
        while done.value < 50:           # connected and running
            assert child.is_alive() and time.monotonic() < deadline, "no round trips"
            time.sleep(0.01)
        window = CpuWindow(time.monotonic() + 0.05, WINDOW_S)
        start = done.value
        time.sleep(0.05 + WINDOW_S)
        trips = done.value - start       # read beside the window's ends: close, not exact
        figures = window.figures(trips)
    finally:
        stop.set()
        child.join(10)
        if child.is_alive():
            child.kill()
    assert 100 < trips < 1000, trips
    # two messages per trip, each its own segment (acks ride on the answers or add more)
    assert 1.5 < figures["tcp_segments_per_order"] < 8, figures
    spent = figures["cpu_us_per_order"]["client"]
    io = figures["zmq_io_us_per_order"]["client"]
    assert 0 < io < spent, figures        # the I/O thread's share of the process's CPU
    # the sleep, the recv waits and the I/O thread's wakes: several per trip
    assert figures["switches_per_order"]["client"]["waits"] > 2, figures
