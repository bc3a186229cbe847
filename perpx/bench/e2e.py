"""`perpx bench e2e`: order entry end to end over loopback, against a bare pyzmq echo floor.

One invocation:
1. the floor: a bare echo server (ROUTER, CURVE, no ZAP handler, one process) and C client
   processes (DEALER, CURVE) sending the same msgpack new_order/cancel messages the exchange
   run sends, pipelined with the same window; the server echoes each frame unchanged. Measured
   before the exchange is started, so the floor has the box to itself. Then the relay floor
   (perpx/bench/relay.py): the exchange's shape (a gateway- and a matcher-shaped process over
   perpx's shm rings and doorbells) without its logic, the same clients; `orders_over_relay`
   and `ack_p50_over_relay_p50` are what the exchange's own work costs.
2. the exchange, once per ack mode (`--ack-mode fast|durable|both`, default both: fast first,
   then durable): a fresh exchange (`perpx up` as a child process, its own session) on a
   temporary state dir with that ack_mode and rate limits out of the way, C accounts with
   deposits, then the same C client processes: each alternates a resting passive buy (BTC-PERP,
   0.001 at 60000) and a cancel of it by cid, so its book stays tiny. Every request waits for
   its direct reply (`ack`/`canceled`, matched by rid); up to `window` are in flight per client.
   "orders" are these order-entry requests: new_order and cancel, each counted once. In
   "durable" mode a reply leaves the gateway only once persistd has journaled (and fsynced) its
   command, so the difference between the two runs is the price of durability.
3. a paced run against the same exchange at a fixed total rate (spread over the clients; when
   the throughput run sustained less than that rate, at half the sustained rate instead):
   the achieved rate and the ack latency at that rate (from the actual send, and from the
   scheduled send time, which includes any lag of the sender: no coordinated omission).

The floors run under the idle-CPU request the exchange makes for itself (exchange.cpu_latency_us,
perpx/cpu_latency.py), held by this process over the whole run: the exchange and its floors
are measured with idle CPUs treated alike (`settings.cpu_latency`). Their servers also get the
heap the exchange's processes get (exchange.huge_pages, perpx/heap.py); the clients keep this
process's.

The JSON's top-level measurements (`orders_per_s`, `ack_p50_us`, ...) are those of the first
mode run, `settings.ack_mode`: the fast exchange unless only "durable" was asked for. With both,
`durable` holds the durable exchange's measurements under the same names, plus `over_fast`:
durable / fast for each of them.

The client machinery (`_run_clients`, phases) also serves `perpx bench durability`
(perpx/bench/durability.py): a phase names its workload, "rest_cancel" (above) or "cross"
(even clients buy, odd clients sell, all at one price: every order trades or rests until the
other side takes it), and the clients report every `fill` they receive (receipt time, seq).

`--pauses` runs perpx/bench/pauses.py's meters beside each phase of each exchange run and
beside the floors' runs: the platform's own pauses (every CPU stalled at once), each CPU's
time gone (host steal) and which late requests waited in either. The meters wake each CPU
every millisecond, which costs a closed loop ~10% of its rate on this box: a floor measured
without them beside an exchange measured with them would flatter the floor.

Latencies are exact percentiles (numpy) over every sample of the timed window (after a short
warm-up), not a histogram. Throughput counts replies to requests sent inside the timed window
and received before its end. Clients are `multiprocessing` spawn processes.

Everything started here is stopped in `finally`: workers joined (terminated if they hang), the
echo server stopped, the exchange sent SIGTERM (SIGKILL of its process group if it hangs), its
shm entries removed, the temporary state dir deleted.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import msgpack
import msgspec
import numpy as np

from gateway.codec import pack
from gateway.server import gateway_context
from perpx import heap
from perpx.bench import pauses as platform, plot, relay
from perpx.bench.cpu import CpuWindow, name_process
from perpx.config import EXCHANGE_DEFAULTS
from perpx.cpu_latency import CpuLatencyRequest
from perpx.launch import ExchangeProcess

DEFAULT_SECONDS = 5.0
DEFAULT_CLIENTS = 2
DEFAULT_RATE = 20_000
DEFAULT_WINDOW = 8
ACK_MODES = ("fast", "durable")
MARKET = "BTC-PERP"
QTY = "0.001"
PRICE = "60000.0"     # passive: the market starts at 65000, inside the 10% band
CROSS_PRICE = "65000.0"   # the "cross" workload: buyers and sellers meet at the mark


def exchange_config(clients: int, ack_mode: str = "fast", max_orders: int = 65536,
                    max_open_orders: int = 200) -> str:
    return f"""
[exchange]
gateways = 1
ack_mode = "{ack_mode}"
rate_limit_per_s = 1000000000
rate_limit_burst = 1000000000

[engine]
max_accounts = {max(64, clients + 2)}
max_markets = 4
max_orders = {max_orders}

[endpoints]
orders_port = 0
market_data_port = 0

[[markets]]
symbol = "BTC-PERP"
tick_size = "0.1"
lot_size = "0.001"
initial_price = "65000"
max_leverage = 50
oracle = "manual"
max_open_orders = {max_open_orders}
"""


# ---- the client side (runs in spawned processes) --------------------------------------------
# The clients are the instrument: what they spend per message is box CPU the exchange under
# test does not get. They encode with the gateway's msgspec encoder (`codec.pack`: the bytes
# msgpack.packb writes, in a quarter of its time here) and decode the four fields a reply is
# read for in a fifth of unpackb's.
class _Reply(msgspec.Struct):
    """What the client reads of a reply (the floors' replies are the request itself)."""
    type: str
    rid: int | None = None
    seq: int = 0
    ts: int | None = None


_decode_reply = msgspec.msgpack.Decoder(_Reply).decode


def _rest_cancel(i: int, cid_base: int, rid: int, index: int) -> bytes:
    """Request i of a client: even = new resting order, odd = cancel of the previous one."""
    cid = cid_base + i // 2
    if i % 2 == 0:
        msg = {"type": "new_order", "cid": cid, "market": MARKET, "side": "buy",
               "kind": "limit", "qty": QTY, "price": PRICE, "rid": rid}
    else:
        msg = {"type": "cancel", "cid": cid, "rid": rid}
    return pack(msg)


def _cross(i: int, cid_base: int, rid: int, index: int) -> bytes:
    """Request i of a client: a limit order at the mark, buy for even clients, sell for odd."""
    msg = {"type": "new_order", "cid": cid_base + i, "market": MARKET,
           "side": "buy" if index % 2 == 0 else "sell", "kind": "limit", "qty": QTY,
           "price": CROSS_PRICE, "rid": rid}
    return pack(msg)


# workload -> (message i of a client, requests that belong together: stopping keeps them whole)
WORKLOADS = {"rest_cancel": (_rest_cancel, 2), "cross": (_cross, 1)}


def _wait_readable(sock, fd: int, timeout_s: float) -> bool:
    """Wait up to timeout_s (sub-millisecond: zmq's poll counts whole ms) for a message.

    A paced client must not spin between sends: on a 2-core box two spinning clients take
    both cores from the exchange they measure. ZMQ_FD is edge-triggered, so EVENTS is checked
    first and select() only waits for what arrives after that."""
    import zmq
    if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        return True
    if timeout_s > 0:
        select.select([fd], [], [], timeout_s)
    return bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)


def _loop(sock, phase: dict, index: int) -> dict:
    """Send/receive until the timed window ends; returns counts and latency samples (ns), and
    (receipt time, seq) of every fill received in the timed window.

    `to_gateway_ns`: per exchange reply, from the request's send to the gateway reading it.
    The gateway stamps each request with the wall clock as it reads it (`ts`, which the
    reply carries); the client and the exchange share the box's clock, and the client stamps
    each send with the same clock (an offset to CLOCK_MONOTONIC taken once would be off by as
    much as the wall clock is stepped during the run). The floors' replies carry no stamp."""
    import zmq
    seconds, window, rate = phase["seconds"], phase["window"], phase["rate"]
    message, group = WORKLOADS[phase.get("workload", "rest_cancel")]
    now = time.monotonic_ns      # CLOCK_MONOTONIC: perpx/bench/pauses.py times pauses with it
    interval = int(1e9 / rate) if rate > 0 else 0
    cid_base = (time.time_ns() // 1_000_000 % (1 << 40)) << 20
    t0 = now()
    rec_start = t0 + int(phase["warmup_s"] * 1e9)
    end = rec_start + int(seconds * 1e9)
    drain_until = end + 5_000_000_000
    inflight: dict = {}
    lat: list = []
    sched: list = []
    due: list = []
    to_gateway: list = []
    fills: list = []
    acked = rejected = others = 0
    i = 0
    rid = 1_000_000
    next_due = t0
    pack_check = None
    fd = sock.getsockopt(zmq.FD)
    poller = zmq.Poller()      # one for the run: Socket.poll builds one per call (~2 µs)
    poller.register(sock, zmq.POLLIN)
    while True:
        t = now()
        stopping = t >= end
        # keep groups whole: after the end only the rest of a started group may still go out
        while len(inflight) < window and (not stopping or i % group) and \
                (interval == 0 or next_due <= t):
            sent_wall_ns = time.time_ns()        # the clock of the gateway's `ts`
            sock.send(message(i, cid_base, rid, index))
            inflight[rid] = (t, next_due if interval else t, sent_wall_ns)
            next_due += interval
            i += 1
            rid += 1
        if stopping and (not inflight and i % group == 0 or t > drain_until):
            break
        if interval and len(inflight) < window and not stopping:
            if not _wait_readable(sock, fd, (next_due - t) / 1e9):
                continue
        elif not poller.poll(100):
            continue
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            tr = now()
            m = _decode_reply(data)
            entry = inflight.pop(m.rid, None)
            if entry is None:
                others += 1
                if m.type == "fill" and rec_start <= tr <= end:
                    fills.append((tr, m.seq))
                continue
            if rec_start <= entry[0] < end:
                if m.type == "reject":
                    rejected += 1
                    pack_check = pack_check or msgpack.unpackb(data, raw=False)
                else:
                    # latency of every request sent in the window, also when its reply comes
                    # after the end (dropping those would hide the tail); throughput counts
                    # only replies inside the window
                    acked += tr <= end
                    lat.append(tr - entry[0])
                    sched.append(tr - entry[1])
                    due.append(entry[1])
                    ts = m.ts
                    if ts is not None:
                        to_gateway.append(ts - entry[2])
    return {"acked": acked, "rejected": rejected, "unmatched": others, "sent": i,
            "seconds": seconds, "first_reject": pack_check, "left_in_flight": len(inflight),
            "lat_ns": np.asarray(lat, dtype=np.int64),
            "sched_ns": np.asarray(sched, dtype=np.int64),
            "due_ns": np.asarray(due, dtype=np.int64),
            "to_gateway_ns": np.asarray(to_gateway, dtype=np.int64),
            "fills": np.asarray(fills, dtype=np.int64).reshape(-1, 2)}


def _client_main(kind: str, target: dict, phases: list, queue, start_evt, index: int) -> None:
    """A client process: connect (and handshake), then run each phase on the start signal."""
    import zmq
    from perpx.bench.matcher import quiet_gc
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles Ctrl-C
    name_process("client")
    # A closed loop's clients get the gateway's I/O thread policy (SCHED_BATCH), for the same
    # reason: an ordinary I/O thread, woken by each send of a burst, preempted its client
    # between sends and wrote them a segment each. With it the clients spend ~20% less CPU
    # per message, and the exchange's closed-loop maximum fell from ~46 to ~16 ms. A paced
    # client keeps an ordinary one: there it is a request's latency (p99 at 1,000/s 1.1 ms
    # against 2.1 ms with SCHED_BATCH). docs/tuning.md, "Fifteenth pass".
    closed_loop = all(ph["rate"] == 0 for ph in phases)
    ctx = gateway_context() if closed_loop else zmq.Context()
    client = sock = None
    try:
        if kind == "exchange":
            from perpx.client import Client
            client = Client.connect(target["endpoints"], target["certificates"][index], ctx=ctx,
                                    connect_timeout_s=30.0)
            sock = client.socket
        else:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = target["server_public"]
            sock.connect(target["endpoint"])
            deadline = time.monotonic() + 30
            while True:
                sock.send(msgpack.packb({"type": "ping", "rid": 0}))
                if sock.poll(1000):
                    sock.recv()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("echo server did not answer")
        queue.put(("ready", index, None))
        for phase in phases:
            if not start_evt[phase["name"]].wait(120):
                return
            with quiet_gc():
                res = _loop(sock, phase, index)
            queue.put(("result", index, (phase["name"], res)))
    except Exception as e:       # reported to the parent, which fails the benchmark
        queue.put(("error", index, f"{type(e).__name__}: {e}"))
    finally:
        if client is not None:
            client.close()
        elif sock is not None:
            sock.close(0)
        ctx.term()


def _echo_main(secret: bytes, queue, stop_evt) -> None:
    import zmq
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name_process("echo")
    ctx = zmq.Context()
    s, endpoint = relay.curve_router(ctx, secret)
    queue.put(("endpoint", -1, endpoint))
    try:
        while not stop_evt.is_set():
            if not s.poll(100):
                continue
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                s.send_multipart(frames)
    finally:
        s.close(0)
        ctx.term()


# ---- orchestration -------------------------------------------------------------------------
class _Procs:
    """Spawned processes of one phase; close() joins, then terminates/kills stragglers."""

    def __init__(self, huge_pages: bool = EXCHANGE_DEFAULTS["huge_pages"]):
        """huge_pages: the heap the floors' servers get, as the exchange's processes do with
        exchange.huge_pages (its default: the exchanges here run the default config)."""
        self.mp = mp.get_context("spawn")
        self.procs: list = []
        self.huge_pages = huge_pages

    def start(self, target, *args):
        p = self.mp.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def start_server(self, target, *args):
        """A floor's server: started with the environment the exchange's processes get."""
        env = heap.child_environment(os.environ, self.huge_pages)
        changed = {k: os.environ.get(k) for k, v in env.items() if os.environ.get(k) != v}
        os.environ.update({k: env[k] for k in changed})    # a spawned child inherits it
        try:
            return self.start(target, *args)
        finally:
            for k, v in changed.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v

    def close(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
        self.procs.clear()


def _run_clients(procs: _Procs, kind: str, target: dict, phases: list, clients: int,
                 say) -> dict:
    """Start `clients` processes, run the phases in lockstep; {phase: {"clients": [result
    per client], "cpu": the CpuWindow over its timed window}}."""
    queue = procs.mp.Queue()
    events = {ph["name"]: procs.mp.Event() for ph in phases}
    workers = [procs.start(_client_main, kind, target, phases, queue, events, i)
               for i in range(clients)]

    def get(kinds, timeout_s):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                tag, idx, payload = queue.get(timeout=0.5)
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} clients: no {kinds[0]} within {timeout_s:g} s")
                # a client that exited 0 put everything first (its queue flushes at exit):
                # what it put may still be on its way, so only a failed one ends the wait
                dead = [p for p in workers if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{kind} client exited with {dead[0].exitcode}")
                continue
            if tag == "error":
                raise RuntimeError(f"{kind} client {idx}: {payload}")
            if tag in kinds:
                return idx, payload

    try:
        for _ in range(clients):
            get(["ready"], 60)
        out = {}
        for ph in phases:
            say(f"{kind}: {ph['name']} run, {ph['seconds']:g} s"
                + (f" at {ph['rate'] * clients:,.0f}/s" if ph["rate"] else ""))
            events[ph["name"]].set()
            cpu = CpuWindow(time.monotonic() + ph["warmup_s"], ph["seconds"])
            results = [None] * clients
            for _ in range(clients):
                idx, (name, res) = get(["result"], ph["warmup_s"] + ph["seconds"] + 60)
                results[idx] = res
            out[ph["name"]] = {"clients": results, "cpu": cpu}
        return out
    except BaseException:
        procs.close(0)          # error or Ctrl-C: do not wait for the workers
        raise


def _summary(phase_out: dict) -> dict:
    """One phase's figures from its clients' results and its CpuWindow."""
    results = phase_out["clients"]
    lat = np.concatenate([r["lat_ns"] for r in results])
    sched = np.concatenate([r["sched_ns"] for r in results])
    due = np.concatenate([r["due_ns"] for r in results])
    seconds = results[0]["seconds"]
    acked = sum(r["acked"] for r in results)
    pct = (lambda a, q: round(float(np.percentile(a, q)) / 1e3, 1) if len(a) else 0.0)
    return {"acked": acked, "per_s": round(acked / seconds),
            "rejected": sum(r["rejected"] for r in results),
            "first_reject": next((r["first_reject"] for r in results if r["first_reject"]), None),
            "p50_us": pct(lat, 50), "p99_us": pct(lat, 99), "p999_us": pct(lat, 99.9),
            "max_us": round(float(lat.max()) / 1e3, 1) if len(lat) else 0.0,
            "sched_p50_us": pct(sched, 50), "sched_p99_us": pct(sched, 99),
            "sched_p999_us": pct(sched, 99.9), "samples": int(len(lat)),
            "unanswered": sum(r["left_in_flight"] for r in results),
            "fills": np.concatenate([r["fills"] for r in results]),
            "lat_ns": lat, "sched_ns": sched, "due_ns": due,
            "to_gateway_ns": np.concatenate([r["to_gateway_ns"] for r in results]),
            **phase_out["cpu"].figures(acked)}


def _funded_accounts(sd, n: int, usdc: str = "1000000") -> list[str]:
    """n new accounts with `usdc` USDC each; their certificate paths."""
    from engine.units import usdc_to_atoms
    from perpx.ops import Exchange, create_account
    ex = Exchange(sd)
    certs = []
    for _ in range(n):
        account, cert = create_account(sd, ex.engine.max_accounts)
        ex.deposit(account, usdc_to_atoms(usdc))
        certs.append(cert)
    return certs


@contextmanager
def bench_dir(name: str):
    """A temporary directory for a benchmark's exchanges, removed at the end; SIGTERM on the
    main thread raises KeyboardInterrupt meanwhile, so it cleans up like Ctrl-C."""
    def on_term(signum, frame):
        raise KeyboardInterrupt
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, on_term)
    root = Path(tempfile.mkdtemp(prefix=f"perpx-bench-{name}-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


@contextmanager
def running_exchange(state_dir: Path, config: str, say, shm_left: list):
    """`perpx up` on state_dir; yields (ExchangeProcess, endpoints). Stopped at the end, with
    the shm entries it left (removed) appended to shm_left."""
    exchange = ExchangeProcess(state_dir, config)
    try:
        yield exchange, exchange.wait_ready()
    finally:
        say("stopping the exchange")
        shm_left.extend(exchange.close())


def _measured_phase(procs: _Procs, kind: str, target: dict, phase: dict, clients: int, say,
                    pauses: bool) -> dict:
    """One phase of the clients against `target`, summed up; with `pauses` the pause meters
    run beside it and the summary gets their figures under "pauses"."""
    with platform.PauseMeter() if pauses else nullcontext() as meter:
        results = _run_clients(procs, kind, target, [phase], clients, say)
    summary = _summary(results[phase["name"]])
    if pauses:
        summary["pauses"] = platform.summary(meter.pauses, summary["due_ns"],
                                             summary["sched_ns"], meter.gone, meter.steal_ms)
    return summary


def _measure_floor(kind: str, servers, clients: int, phase: dict, say,
                   pauses: bool = False) -> dict:
    """One throughput run of the clients against a floor: `servers(procs, secret, queue,
    stop)` starts its processes, the last of which puts its endpoint on the queue."""
    import zmq
    procs = _Procs()
    stop = procs.mp.Event()
    try:
        q = procs.mp.Queue()
        public, secret = zmq.curve_keypair()
        servers(procs, secret, q, stop)
        _, _, endpoint = q.get(timeout=30)
        say(f"{kind} on {endpoint}")
        return _measured_phase(procs, kind, {"endpoint": endpoint, "server_public": public},
                               phase, clients, say, pauses)
    finally:
        stop.set()
        procs.close()


def _measure_echo(clients: int, phase: dict, say, pauses: bool = False) -> dict:
    """The floor: a bare echo server and the clients."""
    return _measure_floor("echo", lambda procs, secret, q, stop: procs.start_server(
        _echo_main, secret, q, stop), clients, phase, say, pauses)


def _measure_relay(clients: int, phase: dict, say, pauses: bool = False) -> dict:
    """The relay floor (perpx/bench/relay.py: gateway- and matcher-shaped processes over shm
    rings) and the same clients."""
    tag = f"{os.getpid()}-{time.monotonic_ns() % 10 ** 9}"
    cmd, evt = relay.create_rings(tag)

    def servers(procs, secret, q, stop):
        procs.start_server(relay.matcher_main, tag, stop)
        procs.start_server(relay.gateway_main, tag, secret, q, stop)
    try:
        return _measure_floor("relay", servers, clients, phase, say, pauses)
    finally:
        for ring in (cmd, evt):
            ring.close()
            ring.unlink()


def run_phases(target: dict, phases: list, clients: int, say, pauses: bool = False) -> dict:
    """Each phase with fresh client processes against an exchange; {phase name: summary}.

    A phase whose `rate` is a callable gets it called with the summaries so far (the paced
    run picks its rate from the throughput run's) and its result (the total rate) recorded.
    `pauses`: perpx/bench/pauses.py's meters run beside each phase, and its summary gets
    their figures under "pauses".
    """
    out = {}
    for phase in phases:
        if callable(phase["rate"]):
            phase = {**phase, "rate": phase["rate"](out) / clients}
        procs = _Procs()
        try:
            out[phase["name"]] = {**_measured_phase(procs, "exchange", target, phase, clients,
                                                    say, pauses),
                                  "rate_per_s": round(phase["rate"] * clients)}
        finally:
            procs.close()
    return out


def _exchange_runs(root: Path, ack_mode: str, clients: int, phases: list, say,
                   pauses: bool) -> dict:
    """A fresh exchange in `ack_mode`, the phases against it; the summaries plus its shm."""
    shm_left: list = []
    say(f"starting the exchange (ack_mode {ack_mode})")
    with running_exchange(root / ack_mode, exchange_config(clients, ack_mode), say,
                          shm_left) as (exchange, endpoints):
        target = {"endpoints": endpoints, "certificates": _funded_accounts(exchange.sd, clients)}
        out = run_phases(target, phases, clients, say, pauses)
    return {**out, "shm_prefix": exchange.sd.prefix, "shm_left": shm_left}


def _measurements(t: dict, p: dict, e: dict, r: dict, rate: float) -> dict:
    """One exchange run's figures (the names of the JSON's top level); e: the echo, r: the
    relay."""
    return {
        "orders_per_s": t["per_s"],
        "ack_p50_us": t["p50_us"], "ack_p99_us": t["p99_us"], "ack_p999_us": t["p999_us"],
        "ack_max_us": t["max_us"],
        "orders_over_echo": round(t["per_s"] / e["per_s"], 3) if e["per_s"] else None,
        "ack_p50_over_echo_p50": round(t["p50_us"] / e["p50_us"], 3) if e["p50_us"] else None,
        "orders_over_relay": round(t["per_s"] / r["per_s"], 3) if r["per_s"] else None,
        "ack_p50_over_relay_p50": round(t["p50_us"] / r["p50_us"], 3) if r["p50_us"] else None,
        "paced_target_per_s": rate,
        "paced_rate_per_s": p["rate_per_s"],
        "paced_achieved_per_s": p["per_s"],
        "paced_ack_p50_us": p["p50_us"], "paced_ack_p99_us": p["p99_us"],
        "paced_ack_p999_us": p["p999_us"],
        "paced_sched_p99_us": p["sched_p99_us"],   # from the scheduled send time
        "rejects": t["rejected"] + p["rejected"],
        "first_reject": t["first_reject"] or p["first_reject"],
        "samples": {"throughput": t["samples"], "paced": p["samples"], "echo": e["samples"],
                    "relay": r["samples"]},
        # the throughput run's (perpx/bench/cpu.py)
        "cpu_us_per_order": t["cpu_us_per_order"], "cpu_busy": t["cpu_busy"],
        "zmq_io_us_per_order": t["zmq_io_us_per_order"],
        "switches_per_order": t["switches_per_order"],
        "tcp_segments_per_order": t["tcp_segments_per_order"],
        **({"pauses": {"throughput": t["pauses"], "paced": p["pauses"]}} if "pauses" in t
           else {}),
    }


# durable / fast is reported for these
COMPARED = ("orders_per_s", "ack_p50_us", "ack_p99_us", "ack_p999_us", "paced_achieved_per_s",
            "paced_ack_p50_us", "paced_ack_p99_us", "paced_ack_p999_us")


def _plot(path, echo: dict, relay_floor: dict, runs: dict, clients: int, window: int) -> str:
    """The latency spectra of the run as a PNG (perpx/bench/plot.py)."""
    closed = [("echo", echo["lat_ns"]), ("relay", relay_floor["lat_ns"])] + \
        [(m, r["throughput"]["lat_ns"])
                                            for m, r in runs.items()]
    paced = [(f"{m} at {r['paced']['rate_per_s']:,}/s", r["paced"]["sched_ns"])
             for m, r in runs.items()]
    return str(plot.write_spectra(path, [
        (f"closed loop, {clients} clients x window {window}: round trip", closed),
        ("paced: from the intended send time", paced)],
        "perpx bench e2e: ack latency"))


def bench_e2e(seconds: float = DEFAULT_SECONDS, clients: int = DEFAULT_CLIENTS,
              rate: float = DEFAULT_RATE, window: int = DEFAULT_WINDOW, ack_mode: str = "both",
              progress=None, plot_path=None, pauses: bool = False) -> dict:
    say = progress or (lambda msg: None)
    modes = ACK_MODES if ack_mode == "both" else (ack_mode,)
    if not modes or any(m not in ACK_MODES for m in modes):
        raise ValueError(f"ack_mode must be fast, durable or both, not {ack_mode!r}")
    warmup = min(0.5, seconds / 4)
    throughput = {"name": "throughput", "seconds": seconds, "warmup_s": warmup,
                  "window": window, "rate": 0}

    def paced_rate(done: dict) -> float:
        # the box cannot sustain the rate: pace at half the sustained throughput
        sustained = done["throughput"]["per_s"]
        return rate if sustained >= rate else max(1.0, sustained / 2)

    paced = {**throughput, "name": "paced", "rate": paced_rate}
    runs = {}
    # the exchange_config() exchanges ask for the default; the floors get the same
    with bench_dir("e2e") as root, \
            CpuLatencyRequest(EXCHANGE_DEFAULTS["cpu_latency_us"]) as idle_cpus:
        idle_cpus_asked = idle_cpus.as_dict()
        # before any exchange: the box to itself; the same meters beside them as beside it
        echo = _measure_echo(clients, throughput, say, pauses)
        relay_floor = _measure_relay(clients, throughput, say, pauses)
        for mode in modes:
            runs[mode] = _exchange_runs(root, mode, clients, [throughput, paced], say, pauses)

    first = runs[modes[0]]
    res = {
        "benchmark": "e2e",
        **_measurements(first["throughput"], first["paced"], echo, relay_floor, rate),
        "echo_msgs_per_s": echo["per_s"],
        "echo_rtt_p50_us": echo["p50_us"], "echo_rtt_p99_us": echo["p99_us"],
        "echo_rtt_p999_us": echo["p999_us"],
        "relay_msgs_per_s": relay_floor["per_s"],
        "relay_rtt_p50_us": relay_floor["p50_us"], "relay_rtt_p99_us": relay_floor["p99_us"],
        "relay_rtt_p999_us": relay_floor["p999_us"], "relay_rtt_max_us": relay_floor["max_us"],
        "echo_cpu_us_per_msg": echo["cpu_us_per_order"], "echo_cpu_busy": echo["cpu_busy"],
        "relay_cpu_us_per_msg": relay_floor["cpu_us_per_order"],
        "relay_cpu_busy": relay_floor["cpu_busy"],
        **{f"{name}_{figure}_per_msg": floor[f"{figure}_per_order"]
           for name, floor in (("echo", echo), ("relay", relay_floor))
           for figure in ("zmq_io_us", "switches", "tcp_segments")},
        **({"floor_pauses": {"echo": echo["pauses"], "relay": relay_floor["pauses"]}}
           if pauses else {}),
    }
    if len(modes) == 2:
        d = _measurements(runs["durable"]["throughput"], runs["durable"]["paced"], echo,
                          relay_floor, rate)
        d["over_fast"] = {k: round(d[k] / res[k], 3) if res[k] else None for k in COMPARED}
        d["shm_prefix"] = runs["durable"]["shm_prefix"]
        res["durable"] = d
    res.update({
        "settings": {"seconds": seconds, "warmup_s": warmup, "clients": clients,
                     "window": window, "rate": rate, "ack_mode": modes[0],
                     "ack_modes": list(modes), "gateways": 1,
                     "orders": "alternating resting new_order and cancel, both counted",
                     "percentiles": "exact (numpy) over all samples",
                     "echo": "measured before the exchanges start, once",
                     "relay": "measured after the echo, before the exchanges, once",
                     "pause_meters": pauses,
                     "pause_meters_over": "the floors and the exchanges alike",
                     "cpu_latency": {**idle_cpus_asked,
                                     "over": "the floors and the exchanges alike"},
                     "huge_pages": {"asked": EXCHANGE_DEFAULTS["huge_pages"],
                                    "thp": heap.thp_mode(),
                                    "over": "the floors' servers and the exchanges alike"},
                     "cpus": os.cpu_count()},
        "shm_prefix": first["shm_prefix"],
        "shm_prefixes": [runs[m]["shm_prefix"] for m in modes],
        "shm_left": [n for m in modes for n in runs[m]["shm_left"]],
        "plot": _plot(plot_path, echo, relay_floor, runs, clients, window) if plot_path
        else None,
    })
    return res


def _run_rows(res: dict, label: str) -> list:
    """Report rows of one exchange run's figures."""
    return [
        (f"{label}orders/s (acked)", f"{res['orders_per_s']:,}"),
        (f"{label}ack latency µs", f"p50 {res['ack_p50_us']}  p99 {res['ack_p99_us']}  "
                                   f"p99.9 {res['ack_p999_us']}  max {res['ack_max_us']}"),
        (f"{label}orders / echo", f"{res['orders_over_echo']}  (target >= 0.7)"),
        (f"{label}ack p50 / echo p50", f"{res['ack_p50_over_echo_p50']}  (target <= 1.5)"),
        (f"{label}orders / relay", f"{res['orders_over_relay']}  (target >= 0.9)"),
        (f"{label}ack p50 / relay p50", f"{res['ack_p50_over_relay_p50']}  (target <= 1.2)"),
        (f"{label}paced run", f"asked {res['paced_target_per_s']:,.0f}/s, paced at "
                              f"{res['paced_rate_per_s']:,}/s" +
         ("" if res["paced_rate_per_s"] >= res["paced_target_per_s"] else
          " (half the sustained rate: the box cannot sustain the asked rate)") +
         f", achieved {res['paced_achieved_per_s']:,}/s"),
        (f"{label}paced ack µs", f"p50 {res['paced_ack_p50_us']}  p99 "
                                 f"{res['paced_ack_p99_us']}  p99.9 {res['paced_ack_p999_us']}  "
                                 f"(p99 from schedule {res['paced_sched_p99_us']}; "
                                 f"target p99 <= 1000)"),
        (f"{label}CPU µs/order", _cpu_cells(res["cpu_us_per_order"], res["cpu_busy"])),
        (f"{label}wakes/order", _wake_cells(res["switches_per_order"],
                                            res["zmq_io_us_per_order"],
                                            res["tcp_segments_per_order"])),
        (f"{label}rejects", f"{res['rejects']}" + (f" (first: {res['first_reject']})"
                                                    if res["first_reject"] else "")),
        *[(f"{label}{phase} pauses", platform.describe(p))
          for phase, p in res.get("pauses", {}).items()],
    ]


def _cpu_cells(per_order: dict, busy: dict) -> str:
    """"gateway 35.1  matcher 6.5 ...; busy cpu0 97%  cpu1 68%": the roles over 0.05 µs."""
    spent = "  ".join(f"{role} {us}" for role, us in per_order.items() if us >= 0.05)
    return f"{spent}; busy " + "  ".join(f"{cpu} {b:.0%}" for cpu, b in busy.items())


def _wake_cells(switches: dict, zmq_io: dict, segments) -> str:
    """"client waits 0.41 preempted 0.16 zmq-io 11.3 µs ...; tcp segments 0.51": the
    hand-overs behind the CPU per order (perpx/bench/cpu.py), roles that woke at all."""
    cells = "  ".join(f"{role} waits {s['waits']} preempted {s['preempted']}"
                      + (f" zmq-io {zmq_io[role]} µs" if role in zmq_io else "")
                      for role, s in switches.items() if s["waits"] or s["preempted"])
    return f"{cells}; tcp segments {segments}"


def format_report(res: dict) -> str:
    s = res["settings"]
    modes = s.get("ack_modes", [s["ack_mode"]])
    rows = [
        ("benchmark", f"e2e: {s['clients']} client processes, window {s['window']}, "
                      f"{s['seconds']:g} s per run (+{s['warmup_s']:g} s warm-up), "
                      f"{s['cpus']} cpus shared by clients and exchange"),
        ("exchange", f"1 gateway, ack_mode {' then '.join(modes)} (a fresh exchange each); "
                     f"orders = new_order + cancel, alternating"),
        ("echo msgs/s", f"{res['echo_msgs_per_s']:,}  (bare pyzmq ROUTER/CURVE, run first)"),
        ("echo rtt µs", f"p50 {res['echo_rtt_p50_us']}  p99 {res['echo_rtt_p99_us']}  "
                        f"p99.9 {res['echo_rtt_p999_us']}"),
        ("relay msgs/s", f"{res['relay_msgs_per_s']:,}  (gateway- and matcher-shaped "
                         f"processes over shm rings, no logic)"),
        ("relay rtt µs", f"p50 {res['relay_rtt_p50_us']}  p99 {res['relay_rtt_p99_us']}  "
                         f"p99.9 {res['relay_rtt_p999_us']}  max {res['relay_rtt_max_us']}"),
        ("relay CPU µs/msg", _cpu_cells(res["relay_cpu_us_per_msg"], res["relay_cpu_busy"])),
        ("relay wakes/msg", _wake_cells(res["relay_switches_per_msg"],
                                        res["relay_zmq_io_us_per_msg"],
                                        res["relay_tcp_segments_per_msg"])),
        *_run_rows(res, f"{s['ack_mode']}: "),
    ]
    if "durable" in res:
        d = res["durable"]
        ratio = d["over_fast"]
        rows += _run_rows(d, "durable: ")
        rows.append(("durable / fast", "  ".join(f"{k} {v}" for k, v in ratio.items())))
    rows.append(("percentiles", s["percentiles"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
