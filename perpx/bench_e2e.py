"""`perpx bench e2e`: order entry end to end over loopback, against a bare pyzmq echo floor.

One invocation:
1. the floor: a bare echo server (ROUTER, CURVE, no ZAP handler, one process) and C client
   processes (DEALER, CURVE) sending the same msgpack new_order/cancel messages the exchange
   run sends, pipelined with the same window; the server echoes each frame unchanged. Measured
   before the exchange is started, so the floor has the box to itself.
2. the exchange: a fresh exchange (`perpx up` as a child process, its own session) on a
   temporary state dir with ack_mode "fast" and rate limits out of the way, C accounts with
   deposits, then the same C client processes: each alternates a resting passive buy (BTC-PERP,
   0.001 at 60000) and a cancel of it by cid, so its book stays tiny. Every request waits for
   its direct reply (`ack`/`canceled`, matched by rid); up to `window` are in flight per client.
   "orders" are these order-entry requests: new_order and cancel, each counted once.
3. a paced run against the same exchange at a fixed total rate (spread over the clients; when
   the throughput run sustained less than that rate, at half the sustained rate instead):
   the achieved rate and the ack latency at that rate (from the actual send, and from the
   scheduled send time, which includes any lag of the sender: no coordinated omission).

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
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np

from perpx.launch import ExchangeProcess

DEFAULT_SECONDS = 5.0
DEFAULT_CLIENTS = 2
DEFAULT_RATE = 20_000
DEFAULT_WINDOW = 8
MARKET = "BTC-PERP"
QTY = "0.001"
PRICE = "60000.0"     # passive: the market starts at 65000, inside the 10% band


def exchange_config(clients: int) -> str:
    return f"""
[exchange]
gateways = 1
ack_mode = "fast"
rate_limit_per_s = 1000000000
rate_limit_burst = 1000000000

[engine]
max_accounts = {max(64, clients + 2)}
max_markets = 4
max_orders = 65536
max_levels_per_side = 1024

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
"""


# ---- the client side (runs in spawned processes) --------------------------------------------
def _message(i: int, cid_base: int, rid: int) -> bytes:
    """Request i of a client: even = new resting order, odd = cancel of the previous one."""
    cid = cid_base + i // 2
    if i % 2 == 0:
        msg = {"type": "new_order", "cid": cid, "market": MARKET, "side": "buy",
               "kind": "limit", "qty": QTY, "price": PRICE, "rid": rid}
    else:
        msg = {"type": "cancel", "cid": cid, "rid": rid}
    return msgpack.packb(msg, use_bin_type=True)


def _loop(sock, seconds: float, warmup_s: float, window: int, rate: float) -> dict:
    """Send/receive until the timed window ends; returns counts and latency samples (ns)."""
    import zmq
    now = time.perf_counter_ns
    interval = int(1e9 / rate) if rate > 0 else 0
    cid_base = (time.time_ns() // 1_000_000 % (1 << 40)) << 20
    t0 = now()
    rec_start = t0 + int(warmup_s * 1e9)
    end = rec_start + int(seconds * 1e9)
    drain_until = end + 5_000_000_000
    inflight: dict = {}
    lat: list = []
    sched: list = []
    acked = rejected = others = 0
    i = 0
    rid = 1_000_000
    next_due = t0
    pack_check = None
    while True:
        t = now()
        stopping = t >= end
        # keep pairs whole: after the end only the pending cancel may still go out
        while len(inflight) < window and (not stopping or i % 2 == 1) and \
                (interval == 0 or next_due <= t):
            sock.send(_message(i, cid_base, rid))
            inflight[rid] = (t, next_due if interval else t)
            next_due += interval
            i += 1
            rid += 1
        if stopping and (not inflight and i % 2 == 0 or t > drain_until):
            break
        if interval and len(inflight) < window and not stopping:
            wait_ms = max(0, (next_due - t) // 1_000_000)   # < 1 ms to the next send: spin
        else:
            wait_ms = 100
        if not sock.poll(wait_ms):
            continue
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            tr = now()
            m = msgpack.unpackb(data, raw=False)
            entry = inflight.pop(m.get("rid"), None)
            if entry is None:
                others += 1
                continue
            if entry[0] >= rec_start and tr <= end:
                if m.get("type") == "reject":
                    rejected += 1
                    pack_check = pack_check or m
                else:
                    acked += 1
                    lat.append(tr - entry[0])
                    sched.append(tr - entry[1])
    return {"acked": acked, "rejected": rejected, "unmatched": others, "sent": i,
            "seconds": seconds, "first_reject": pack_check, "left_in_flight": len(inflight),
            "lat_ns": np.asarray(lat, dtype=np.int64),
            "sched_ns": np.asarray(sched, dtype=np.int64)}


def _client_main(kind: str, target: dict, phases: list, queue, start_evt, index: int) -> None:
    """A client process: connect (and handshake), then run each phase on the start signal."""
    import zmq
    from perpx.bench import quiet_gc
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles Ctrl-C
    ctx = zmq.Context()
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
                res = _loop(sock, phase["seconds"], phase["warmup_s"], phase["window"],
                            phase["rate"])
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
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.linger = 0
    s.curve_server = True
    s.curve_secretkey = secret
    s.bind("tcp://127.0.0.1:*")
    queue.put(("endpoint", -1, s.getsockopt_string(zmq.LAST_ENDPOINT)))
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

    def __init__(self):
        self.mp = mp.get_context("spawn")
        self.procs: list = []

    def start(self, target, *args):
        p = self.mp.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

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
    """Start `clients` processes, run the phases in lockstep; {phase: [result per client]}."""
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
                dead = [p for p in workers if not p.is_alive()]
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
            results = [None] * clients
            for _ in range(clients):
                idx, (name, res) = get(["result"], ph["warmup_s"] + ph["seconds"] + 60)
                results[idx] = res
            out[ph["name"]] = results
        return out
    except BaseException:
        procs.close(0)          # error or Ctrl-C: do not wait for the workers
        raise


def _summary(results: list) -> dict:
    lat = np.concatenate([r["lat_ns"] for r in results])
    sched = np.concatenate([r["sched_ns"] for r in results])
    seconds = results[0]["seconds"]
    acked = sum(r["acked"] for r in results)
    pct = (lambda a, q: round(float(np.percentile(a, q)) / 1e3, 1) if len(a) else 0.0)
    return {"acked": acked, "per_s": round(acked / seconds),
            "rejected": sum(r["rejected"] for r in results),
            "first_reject": next((r["first_reject"] for r in results if r["first_reject"]), None),
            "p50_us": pct(lat, 50), "p99_us": pct(lat, 99), "p999_us": pct(lat, 99.9),
            "max_us": round(float(lat.max()) / 1e3, 1) if len(lat) else 0.0,
            "sched_p50_us": pct(sched, 50), "sched_p99_us": pct(sched, 99),
            "sched_p999_us": pct(sched, 99.9), "samples": int(len(lat))}


def _funded_accounts(sd, n: int) -> list[str]:
    """n new accounts with 1,000,000 USDC each; their certificate paths."""
    from perpx.config import usdc_to_atoms
    from perpx.ops import Exchange, create_account
    ex = Exchange(sd)
    certs = []
    for _ in range(n):
        account, cert = create_account(sd, ex.engine.max_accounts)
        ex.deposit(account, usdc_to_atoms("1000000"))
        certs.append(cert)
    return certs


def bench_e2e(seconds: float = DEFAULT_SECONDS, clients: int = DEFAULT_CLIENTS,
              rate: float = DEFAULT_RATE, window: int = DEFAULT_WINDOW, progress=None) -> dict:
    import zmq
    say = progress or (lambda msg: None)
    warmup = min(0.5, seconds / 4)
    throughput = {"name": "throughput", "seconds": seconds, "warmup_s": warmup,
                  "window": window, "rate": 0}
    paced = {"name": "paced", "seconds": seconds, "warmup_s": warmup, "window": window,
             "rate": rate / clients}
    def on_term(signum, frame):
        raise KeyboardInterrupt
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, on_term)    # SIGTERM cleans up like Ctrl-C
    root = Path(tempfile.mkdtemp(prefix="perpx-bench-e2e-"))
    exchange = None
    shm_left: list = []
    paced_rate = rate
    try:
        # 1. the floor
        procs = _Procs()
        stop = procs.mp.Event()
        try:
            q = procs.mp.Queue()
            public, secret = zmq.curve_keypair()
            procs.start(_echo_main, secret, q, stop)
            _, _, endpoint = q.get(timeout=30)
            say(f"echo server on {endpoint}")
            echo = _run_clients(procs, "echo", {"endpoint": endpoint, "server_public": public},
                                [throughput], clients, say)
        finally:
            stop.set()
            procs.close()
        # 2./3. the exchange
        say("starting the exchange (ack_mode fast)")
        exchange = ExchangeProcess(root / "state", exchange_config(clients))
        endpoints = exchange.wait_ready()
        certs = _funded_accounts(exchange.sd, clients)
        target = {"endpoints": endpoints, "certificates": certs}
        ex = {}
        for phase in (throughput, paced):
            if phase is paced:
                # the box cannot sustain the rate: pace at half the sustained throughput
                sustained = _summary(ex["throughput"])["per_s"]
                paced_rate = rate if sustained >= rate else max(1.0, sustained / 2)
                phase["rate"] = paced_rate / clients
            procs = _Procs()
            try:
                ex.update(_run_clients(procs, "exchange", target, [phase], clients, say))
            finally:
                procs.close()
    finally:
        if exchange is not None:
            say("stopping the exchange")
            shm_left = exchange.close()
        shutil.rmtree(root, ignore_errors=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)

    e = _summary(echo["throughput"])
    t = _summary(ex["throughput"])
    p = _summary(ex["paced"])
    return {
        "benchmark": "e2e",
        "orders_per_s": t["per_s"],
        "ack_p50_us": t["p50_us"], "ack_p99_us": t["p99_us"], "ack_p999_us": t["p999_us"],
        "ack_max_us": t["max_us"],
        "echo_msgs_per_s": e["per_s"],
        "echo_rtt_p50_us": e["p50_us"], "echo_rtt_p99_us": e["p99_us"],
        "echo_rtt_p999_us": e["p999_us"],
        "orders_over_echo": round(t["per_s"] / e["per_s"], 3) if e["per_s"] else None,
        "ack_p50_over_echo_p50": round(t["p50_us"] / e["p50_us"], 3) if e["p50_us"] else None,
        "paced_target_per_s": rate,
        "paced_rate_per_s": round(paced_rate),
        "paced_achieved_per_s": p["per_s"],
        "paced_ack_p50_us": p["p50_us"], "paced_ack_p99_us": p["p99_us"],
        "paced_ack_p999_us": p["p999_us"],
        "paced_sched_p99_us": p["sched_p99_us"],   # from the scheduled send time
        "rejects": t["rejected"] + p["rejected"],
        "first_reject": t["first_reject"] or p["first_reject"],
        "samples": {"throughput": t["samples"], "paced": p["samples"], "echo": e["samples"]},
        "settings": {"seconds": seconds, "warmup_s": warmup, "clients": clients,
                     "window": window, "rate": rate, "ack_mode": "fast", "gateways": 1,
                     "orders": "alternating resting new_order and cancel, both counted",
                     "percentiles": "exact (numpy) over all samples",
                     "echo": "measured before the exchange starts", "cpus": os.cpu_count()},
        "shm_prefix": exchange.sd.prefix if exchange is not None else None,
        "shm_left": shm_left,
    }


def format_report(res: dict) -> str:
    s = res["settings"]
    rows = [
        ("benchmark", f"e2e: {s['clients']} client processes, window {s['window']}, "
                      f"{s['seconds']:g} s per run (+{s['warmup_s']:g} s warm-up), "
                      f"{s['cpus']} cpus"),
        ("exchange", "1 gateway, ack_mode fast; orders = new_order + cancel, alternating"),
        ("orders/s (acked)", f"{res['orders_per_s']:,}"),
        ("ack latency µs", f"p50 {res['ack_p50_us']}  p99 {res['ack_p99_us']}  "
                           f"p99.9 {res['ack_p999_us']}  max {res['ack_max_us']}"),
        ("echo msgs/s", f"{res['echo_msgs_per_s']:,}  (bare pyzmq ROUTER/CURVE, run first)"),
        ("echo rtt µs", f"p50 {res['echo_rtt_p50_us']}  p99 {res['echo_rtt_p99_us']}  "
                        f"p99.9 {res['echo_rtt_p999_us']}"),
        ("orders / echo", f"{res['orders_over_echo']}  (target >= 0.7)"),
        ("ack p50 / echo p50", f"{res['ack_p50_over_echo_p50']}  (target <= 1.5)"),
        ("paced run", f"asked {res['paced_target_per_s']:,.0f}/s, paced at "
                      f"{res['paced_rate_per_s']:,}/s" +
         ("" if res["paced_rate_per_s"] >= res["paced_target_per_s"] else
          " (half the sustained rate: the box cannot sustain the asked rate)") +
         f", achieved {res['paced_achieved_per_s']:,}/s"),
        ("paced ack µs", f"p50 {res['paced_ack_p50_us']}  p99 {res['paced_ack_p99_us']}  "
                         f"p99.9 {res['paced_ack_p999_us']}  (p99 from schedule "
                         f"{res['paced_sched_p99_us']}; target p99 <= 1000)"),
        ("rejects", f"{res['rejects']}" + (f" (first: {res['first_reject']})"
                                           if res["first_reject"] else "")),
        ("percentiles", s["percentiles"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
