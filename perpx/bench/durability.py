"""`perpx bench durability`: how far DuckDB lags under full load, and how fast a killed matcher
is back with a million resting orders.

One invocation, two fresh exchanges (`perpx up` as child processes, ack_mode "durable", each on
its own temporary state dir), one after the other:

1. DuckDB lag under full load. C client processes (perpx/bench/e2e.py's client machinery,
   workload "cross": even clients buy, odd clients sell, 0.001 BTC-PERP limit orders at the
   mark, up to `window` in flight each, as fast as the box allows) make nearly every order
   trade. Each client notes when it receives a `fill` report (and its seq); meanwhile this
   process polls persistd's progress cursors in shm (shm/progress.py: store_seq, the seq
   up to which `perpx sql` sees rows, and durable_seq) about every POLL_S and records when
   they move. A fill's lag is the time from its report at the client (the earliest of the two
   accounts' reports) until store_seq reached its seq; `lag_from_durable_ms` is the same from
   the moment its seq was durable (acks and fills leave the gateway only then). At the end one
   real `perpx sql` query (perpx.durability.sql, what the CLI runs) checks that every fill seq
   a client saw is in DuckDB. Reported: p50/p99/max lag in ms over all fills of the timed
   window and the load it was measured at (acked orders/s, fills/s). Target: p99 <= 1 s.
   Both cursors are polled, so a lag is late by up to one poll interval plus scheduling delay
   of this process (on a busy 2-core box, up to a few ms).

2. Recovery with N (default 1,000,000) resting orders. The exchange is configured for them
   (engine.max_orders >= 1.1 N, MARKETS markets x ACCOUNTS accounts, each (account, market)
   allowed N / (MARKETS x ACCOUNTS) open orders via the market's max_open_orders, buys spread
   over LEVELS price levels below the mark, inside the price band; all on one side, so no
   order can trade and each command's event bound stays tiny) and persistence.snapshot_every
   = 0.8 N, so a snapshot covers most of them and the rest is replayed from the journal. The
   orders go in two parts, the second only once the snapshot of the first is written: persistd
   snapshots at a journal batch's end, and one batch may hold every order if persistd fell
   behind, which would leave nothing to replay. The
   accounts are created and funded through the ops ring (perpx.ops.Exchange.deposit); the
   orders are written straight into gateway-0's command ring from this process, as the
   gateway writes them (COMMAND_DTYPE records, `ts_ns` stamped at write, `req` 0), which is
   far faster than clients over ZeroMQ. The gateway is the ring's only other producer and
   writes nothing while no client is connected (none is, in this part), so the two never
   race; but its cached copy of the ring's write cursor is now behind, so this exchange must
   not take client orders afterwards (it does not: it is killed, verified and stopped).
   Then, once persistd has journaled and stored everything, `runs` times:
   kill -9 the matcher and time from the kill until the restarted matcher's heartbeat says
   ready with its new pid (the supervisor restarts it: perpx/supervisor.py), and until
   status.json says ready; the matcher's own log line gives its rebuild time split into
   snapshot load + check and journal replay, and the time it took to map the shared memory and
   load the compiled matcher. A matcher that was itself restarted is killed only
   QUICK_CRASH_S after its start: the supervisor backs off the restart of a process that
   dies again that soon. Once more with the snapshot moved aside (the matcher finds none and
   replays the whole journal from genesis: the worst case, as with a lost snapshot or
   snapshot_every >= the journal's length), then it is put back. Finally `perpx verify --json`
   (a child process) replays the journal from genesis and must match the live state hash.
   Target: ready <= 3 s after the kill.

Medians over runs; the lag percentiles are over every fill. The box has 2 cores shared by the
clients, this process and the exchange (matcher, gateway, persistd, supervisor): the
figures are what all of them together achieve, and other load on the box shifts them.
Everything started here is stopped in `finally`, its /dev/shm entries removed, the
temporary state dirs deleted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from persistd import snapshot
from perpx.bench import e2e as bench_e2e
from perpx.bench.e2e import _funded_accounts, bench_dir, run_phases, running_exchange
from perpx.launch import child_env, wait_until

DEFAULT_ORDERS = 1_000_000
DEFAULT_SECONDS = 5.0
DEFAULT_CLIENTS = 4
DEFAULT_RUNS = 3
DEFAULT_WINDOW = 64
LAG_TARGET_MS = 1000.0
RECOVERY_TARGET_S = 3.0
POLL_S = 0.0005
MARKETS = 4
ACCOUNTS = 8
LEVELS = 1000
# A coarse tick and a max price near the mark keep the book sides small: a side must have room
# for every price up to max_price (or every order of the pool), whichever is fewer
TICK_SIZE = 5
MARK_TICKS = 65_000 // TICK_SIZE
MAX_PRICE_TICKS = 70_000 // TICK_SIZE
CHUNK = 1 << 14
SNAPSHOT_FRACTION = 0.8
QUICK_CRASH_S = 10.0      # perpx/supervisor.py: a second death within this backs off
SETTLE_TIMEOUT_S = 600.0
BOX_NOTE = (f"{os.cpu_count()} cpus shared by the clients, the benchmark and the exchange "
            f"(matcher, gateway, persistd, supervisor); other load on the box shifts the figures")


def _ms(values: np.ndarray) -> dict:
    if not len(values):
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(float(np.percentile(values, 50)) / 1e6, 1),
            "p99": round(float(np.percentile(values, 99)) / 1e6, 1),
            "max": round(float(values.max()) / 1e6, 1)}


# ---- 1. DuckDB lag under full load ---------------------------------------------------------
class _CursorLog:
    """A thread that polls persistd's store_seq and durable_seq and records when they move."""

    def __init__(self, progress):
        self.progress = progress
        self.store: list = []      # (perf_counter_ns, store_seq) at each change
        self.durable: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cursor-log", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self._look()     # what the thread may not have seen yet (a busy box delays it)

    def _look(self) -> None:
        s, d = self.progress.store_seq(), self.progress.durable_seq()
        t = time.perf_counter_ns()
        if not self.store or s != self.store[-1][1]:
            self.store.append((t, s))
        if not self.durable or d != self.durable[-1][1]:
            self.durable.append((t, d))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._look()
            time.sleep(POLL_S)

    @staticmethod
    def first_reaching(timeline: list, seqs: np.ndarray) -> np.ndarray:
        """For each seq, when the cursor was first seen at or past it (-1: not yet)."""
        if not timeline:
            return np.full(len(seqs), -1, np.int64)
        t, v = np.asarray(timeline, dtype=np.int64).T
        idx = np.searchsorted(v, seqs, side="left")    # v only grows
        return np.where(idx < len(v), t[np.minimum(idx, len(v) - 1)], -1)


def bench_lag(root: Path, seconds: float, clients: int, window: int, say) -> dict:
    from shm.progress import JournalProgress
    from perpx.durability import sql
    if clients < 2:
        raise ValueError("the lag run needs at least 2 clients (a buyer and a seller)")
    shm_left: list = []
    warmup = min(0.5, seconds / 4)
    phase = {"name": "load", "seconds": seconds, "warmup_s": warmup, "window": window,
             "rate": 0, "workload": "cross"}
    config = bench_e2e.exchange_config(clients, "durable", max_orders=1 << 18,
                                       max_open_orders=1 << 18)
    say("lag: starting a durable exchange")
    with running_exchange(root / "lag", config, say, shm_left) as (exchange, endpoints):
        certs = _funded_accounts(exchange.sd, clients, usdc="1000000000")
        progress = JournalProgress.attach(exchange.sd.prefix)
        try:
            flush_ms = exchange.sd.exchange()["persistence"]["store_flush_ms"]
            with _CursorLog(progress) as log:
                load = run_phases({"endpoints": endpoints, "certificates": certs}, [phase],
                                  clients, say)["load"]
                fills = load["fills"]
                if not len(fills):
                    raise RuntimeError(f"lag: no fills in the timed window ({load})")
                # one sample per fill seq: the earliest report (of taker or maker)
                order = np.lexsort((fills[:, 0], fills[:, 1]))
                fills = fills[order]
                first = np.r_[True, fills[1:, 1] != fills[:-1, 1]]
                reported, seqs = fills[first, 0], fills[first, 1]
                top = int(seqs.max())
                wait_until(lambda: progress.store_seq() >= top, 60.0,
                           f"store_seq to reach seq {top}", 0.001)
            visible = _CursorLog.first_reaching(log.store, seqs)
            durable = _CursorLog.first_reaching(log.durable, seqs)
            # a fill can be in DuckDB before its report reached the client: lag 0
            lag = np.maximum(visible - reported, 0)
            lag_durable = np.maximum(visible - durable, 0)
            answer = sql(exchange.sd, f"SELECT DISTINCT seq FROM fills "
                                      f"WHERE seq BETWEEN {int(seqs.min())} AND {top}")
            stored = np.asarray([row[0] for row in answer["rows"]], np.int64)
        finally:
            progress.close()
    in_store = int(np.count_nonzero(np.isin(seqs, stored)))
    sql_ok = in_store == len(seqs)
    if not sql_ok:
        raise RuntimeError(f"lag: `perpx sql` sees {in_store} of the {len(seqs)} fill seqs "
                           f"the clients were told about")
    lag_ms = _ms(lag)
    second = (reported - reported.min()) // 1_000_000_000      # of the timed window
    per_second = [_ms(lag[second == k])["p99"] for k in range(int(second.max()) + 1)]
    return {
        "lag_ms": lag_ms,
        "lag_p99_ms_per_second": per_second,    # a DuckDB falling behind shows as a rising line
        "lag_from_durable_ms": _ms(lag_durable),
        "target_ms": LAG_TARGET_MS,
        "meets_target": lag_ms["p99"] is not None and lag_ms["p99"] <= LAG_TARGET_MS,
        "load_orders_per_s": load["per_s"],
        "fills_per_s": round(len(seqs) / seconds),
        "ack_p50_us": load["p50_us"], "ack_p99_us": load["p99_us"],
        "fill_samples": int(len(seqs)),
        "visible_before_report": int(np.count_nonzero(visible < reported)),
        "rejects": load["rejected"], "first_reject": load["first_reject"],
        "sql_check": {"query": "SELECT DISTINCT seq FROM fills over the sampled seq range",
                      "fill_seqs_seen": int(len(seqs)), "fill_seqs_in_duckdb": int(in_store),
                      "ok": sql_ok},
        "settings": {"seconds": seconds, "warmup_s": warmup, "clients": clients,
                     "window": window, "workload": "cross: even clients buy, odd sell, at the "
                                                   "mark", "store_flush_ms": flush_ms,
                     "poll_ms": POLL_S * 1e3},
        "shm_prefix": exchange.sd.prefix,
        "shm_left": shm_left,
    }


# ---- 2. recovery with N resting orders -----------------------------------------------------
def snapshot_every(orders: int) -> int:
    """persistence.snapshot_every for a book of `orders`: a snapshot covers most of them."""
    return max(1, int(orders * SNAPSHOT_FRACTION))


def recovery_config(orders: int) -> str:
    per_pair = -(-orders // (MARKETS * ACCOUNTS)) + 1
    markets = "".join(f"""
[[markets]]
symbol = "M{m}-PERP"
tick_size = "{TICK_SIZE}"
lot_size = "0.001"
initial_price = "{MARK_TICKS * TICK_SIZE}"
max_price = "{MAX_PRICE_TICKS * TICK_SIZE}"
max_leverage = 50
oracle = "manual"
max_open_orders = {per_pair}
""" for m in range(MARKETS))
    return f"""
[exchange]
gateways = 1
ack_mode = "durable"
rate_limit_per_s = 1000000000
rate_limit_burst = 1000000000

[engine]
max_accounts = {ACCOUNTS + 8}
max_markets = {MARKETS}
max_orders = {max(1 << 16, orders + orders // 10)}
max_levels_per_side = {MAX_PRICE_TICKS}
command_ring_capacity = {1 << 16}

[persistence]
snapshot_every = {snapshot_every(orders)}

[endpoints]
orders_port = 0
market_data_port = 0
{markets}"""


def resting_orders(orders: int, accounts: list[int], ts_ns: int) -> np.ndarray:
    """N passive 1-lot limit buys, round-robin over accounts and markets, spread over LEVELS
    ticks below the mark: command records as gateway/server.py packs them."""
    from engine.records import CMD_NEW_ORDER, COMMAND_DTYPE, KIND_LIMIT, SIDE_BUY, TIF_GTC
    k = np.arange(orders, dtype=np.int64)
    c = np.zeros(orders, COMMAND_DTYPE)
    c["ts_ns"] = ts_ns
    c["cid"] = k + 1                                         # unique per account
    c["price_ticks"] = MARK_TICKS - 1 - (k // (len(accounts) * MARKETS)) % LEVELS
    c["qty_lots"] = 1
    c["account"] = np.asarray(accounts, np.int32)[k % len(accounts)]
    c["market"] = (k // len(accounts)) % MARKETS
    c["cmd"] = CMD_NEW_ORDER
    c["side"] = SIDE_BUY
    c["kind"] = KIND_LIMIT
    c["tif"] = TIF_GTC
    return c


class _Live:
    """Read-only views of a running exchange's shm: state counters, heartbeat, progress."""

    def __init__(self, sd):
        from engine.records import EVENT_DTYPE
        from engine.shared_state import attach_state
        from shm import names
        from shm.progress import JournalProgress
        from shm.heartbeat import MATCHER_SLOT, HeartbeatBoard
        from shm.ring import EventRing
        self.sd = sd
        self._closers = []
        self.state_region, self.state = attach_state(sd.prefix, sd.engine_config())
        self._closers.append(self.state_region.close)
        self.progress = JournalProgress.attach(sd.prefix)
        self._closers.append(self.progress.close)
        self.hb_board = HeartbeatBoard.attach(sd.prefix)
        self._closers.append(self.hb_board.close)
        self.beat = self.hb_board.slot(MATCHER_SLOT)
        self.events = EventRing.attach(names.event_ring(sd.prefix), EVENT_DTYPE)
        self._closers.append(self.events.close)

    def seq(self) -> int:
        from engine.state import C_SEQ
        return int(self.state.counters[C_SEQ])

    def resting(self) -> int:
        mk = self.state.markets
        return int(mk["resting_buy"].sum() + mk["resting_sell"].sum())

    def matcher(self) -> tuple[int, bool]:
        return int(self.beat["pid"][0]), bool(self.beat["ready"][0])

    def settled(self, seq: int) -> bool:
        """Everything up to seq journaled, in DuckDB, and read by the gateway."""
        cursor = self.events.published_cursor()
        return (self.progress.durable_seq() >= seq and self.progress.store_seq() >= seq
                and self.events.consumer_cursor("gateway-0") == cursor)

    def close(self) -> None:
        self.state = self.beat = None
        for close in reversed(self._closers):
            close()


def _load(sd, live: _Live, orders: int, say) -> dict:
    """Fund the accounts, then write the orders into gateway-0's command ring."""
    from engine.records import COMMAND_DTYPE
    from shm import names
    from perpx.ops import Exchange
    from shm.ring import CommandRing
    say(f"recovery: creating {ACCOUNTS} funded accounts")
    _funded_accounts(sd, ACCOUNTS, usdc="1000000000")
    accounts = sd.registered_accounts()[-ACCOUNTS:]
    start_seq = Exchange(sd).counters()["seq"]
    commands = resting_orders(orders, accounts, time.time_ns())
    first = snapshot_every(orders)
    ring = CommandRing.attach(names.command_ring(sd.prefix, "gateway-0"), COMMAND_DTYPE)
    say(f"recovery: writing {orders:,} resting orders into gateway-0's command ring")
    try:
        sequenced_s = _write_sequenced(ring, live, commands[:first], start_seq)
        wait_until(lambda: live.progress.snapshot_seq() > 0, SETTLE_TIMEOUT_S,
                   f"the snapshot of the first {first:,} orders")
        sequenced_s += _write_sequenced(ring, live, commands[first:], start_seq + first)
        end_seq = start_seq + orders
        say(f"recovery: {orders:,} orders sequenced in {sequenced_s:.1f} s; waiting for "
            f"persistd (journal, DuckDB) and the gateway")
        t0 = time.monotonic()
        wait_until(lambda: live.settled(end_seq), SETTLE_TIMEOUT_S,
                   "persistd and the gateway to catch up")
        caught_up_s = time.monotonic() - t0
    finally:
        ring.close()
    resting = live.resting()
    if resting != orders:
        raise RuntimeError(f"recovery: {resting:,} orders rest in the book, {orders:,} were "
                           f"written: the matcher rejected some (see the config)")
    return {"seq": end_seq, "sequenced_s": round(sequenced_s, 2),
            "sequenced_per_s": round(orders / sequenced_s),
            "caught_up_s": round(caught_up_s, 2)}


def _write_sequenced(ring, live: _Live, commands: np.ndarray, from_seq: int) -> float:
    """Write `commands` into `ring` and wait until the matcher has sequenced them (its seq
    reaches from_seq + len(commands)); returns the seconds that took."""
    t0 = time.monotonic()
    done = 0
    while done < len(commands):
        chunk = commands[done:done + CHUNK]
        chunk["ts_ns"] = time.time_ns()
        n = ring.write(chunk)
        done += n
        if n == 0 and not ring.wait_for_space(1, timeout_s=10.0):
            raise RuntimeError(f"recovery: the matcher took no command for 10 s "
                               f"({done:,} of {len(commands):,} written)")
    end_seq = from_seq + len(commands)
    wait_until(lambda: live.seq() >= end_seq, SETTLE_TIMEOUT_S,
               f"the matcher to sequence {len(commands):,} orders", 0.01)
    return time.monotonic() - t0


_RECOVERED = re.compile(
    r"recovered seq (\d+) in ([\d.]+) s: snapshot at seq (\d+) \+ (\d+) journaled commands "
    r"\(snapshot of (\d+) bytes read and checked in ([\d.]+) s, replay in ([\d.]+) s, "
    r"journal end found in ([\d.]+) s\)")
_LOADED = re.compile(r"compiled matcher loaded in ([\d.]+) s")


def _matcher_status(sd) -> dict:
    status = sd.status() or {}
    return next((p for p in status.get("processes", []) if p["name"] == "matcher"), {})


def _status_ready(sd, pid: int) -> bool:
    status = sd.status() or {}
    return any(p["name"] == "matcher" and p["pid"] == pid and p["state"] == "ready"
               for p in status.get("processes", []))


def _kill_and_time(sd, live: _Live, seq: int, say) -> dict:
    """kill -9 the matcher; time until its successor is ready (heartbeat, then status.json)."""
    status = _matcher_status(sd)
    # a restarted matcher that dies again within QUICK_CRASH_S is restarted after a back-off
    pause = status.get("started_at", 0) + QUICK_CRASH_S + 0.5 - time.time()
    if status.get("restarts") and pause > 0:
        say(f"recovery: waiting {pause:.1f} s (the supervisor backs off quick re-crashes)")
        time.sleep(pause)
    old, ready = live.matcher()
    if not ready:
        raise RuntimeError("recovery: the matcher is not ready before the kill")
    log_file = sd.logs_dir / "matcher.log"
    offset = log_file.stat().st_size
    t0, wall0 = time.perf_counter(), time.time()
    os.kill(old, signal.SIGKILL)
    spawned = ready_at = None
    deadline = t0 + 120
    while ready_at is None:
        pid, ready = live.matcher()
        now = time.perf_counter()
        if pid != old and spawned is None:
            spawned = now
        if pid != old and ready:
            ready_at = now
        elif now > deadline:
            raise RuntimeError(f"recovery: the matcher was not ready 120 s after the kill; "
                               f"its log:\n{log_file.read_text()[offset:][-2000:]}")
        else:
            time.sleep(0.0005)
    new = live.matcher()[0]
    wait_until(lambda: _status_ready(sd, new), 30.0, "status.json to say the matcher is ready",
               0.002)
    status_at = time.perf_counter()
    spawned_wall = _matcher_status(sd).get("started_at", wall0)
    if live.seq() != seq:
        raise RuntimeError(f"recovery: the restarted matcher is at seq {live.seq()}, not {seq}")
    text = log_file.read_text()[offset:]
    rec, loaded = _RECOVERED.search(text), _LOADED.search(text)
    if rec is None or loaded is None:
        raise RuntimeError(f"recovery: no recovery lines in the matcher's log:\n{text[-2000:]}")
    return {"ready_s": round(ready_at - t0, 3), "status_ready_s": round(status_at - t0, 3),
            "restarted_s": round(spawned_wall - wall0, 3),   # the supervisor's new process
            "pid_written_s": round(spawned - t0, 3),         # ... past its imports
            "matcher_load_s": float(loaded.group(1)), "rebuild_s": float(rec.group(2)),
            "snapshot_seq": int(rec.group(3)), "replayed": int(rec.group(4)),
            "snapshot_bytes": int(rec.group(5)), "snapshot_load_s": float(rec.group(6)),
            "replay_s": float(rec.group(7)), "journal_end_s": float(rec.group(8))}


def _verify(sd) -> dict:
    """`perpx verify --json` as a child process."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "perpx.cli", "--state-dir", str(sd.path),
                           "--json", "verify"], capture_output=True, text=True, env=child_env(),
                          timeout=600)
    seconds = round(time.monotonic() - t0, 2)
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"perpx verify failed ({proc.returncode}): {proc.stderr.strip()}")
    res = json.loads(proc.stdout)
    live = [c for c in res["checks"] if c["at"] == "live"]
    return {"ok": bool(res["ok"]) and bool(live) and all(c["ok"] for c in live),
            "live_checked": bool(live), "seq": res["seq"], "from": res["from"],
            "replay_s": res["seconds"], "wall_s": seconds,
            "checks": [{k: c[k] for k in ("at", "seq", "ok")} for c in res["checks"]]}


def _timed_kill(sd, live: _Live, seq: int, what: str, say) -> dict:
    say(f"recovery: {what}: kill -9 the matcher")
    r = _kill_and_time(sd, live, seq, say)
    say(f"recovery: ready {r['ready_s']} s after the kill (rebuild {r['rebuild_s']} s: "
        f"snapshot {r['snapshot_load_s']} s + replay of {r['replayed']:,} commands "
        f"{r['replay_s']} s; compiled matcher loaded in {r['matcher_load_s']} s)")
    return r


def _median(runs: list, key: str):
    return round(statistics.median(r[key] for r in runs), 3)


def bench_recovery(root: Path, orders: int, runs: int, say) -> dict:
    shm_left: list = []
    say(f"recovery: starting a durable exchange for {orders:,} resting orders")
    with running_exchange(root / "recovery", recovery_config(orders), say, shm_left) as \
            (exchange, _):
        sd = exchange.sd
        live = _Live(sd)
        try:
            load = _load(sd, live, orders, say)
            results = [_timed_kill(sd, live, load["seq"], f"run {i + 1}/{runs}", say)
                       for i in range(runs)]
            # the worst case: no usable snapshot, the whole journal is replayed
            aside = [p.rename(p.with_name(p.name + ".aside"))
                     for _, p in snapshot.snapshots(sd.snapshots_dir)]
            try:
                full = _timed_kill(sd, live, load["seq"], "without the snapshot (moved "
                                   "aside: the whole journal is replayed)", say)
            finally:
                for p in aside:
                    p.rename(p.with_name(p.name[:-len(".aside")]))
            say("recovery: perpx verify --json")
            verify = _verify(sd)
            snapshot_seq = live.progress.snapshot_seq()
        finally:
            live.close()
    ready = _median(results, "ready_s")
    replayed = results[0]["replayed"]
    replay_s = _median(results, "replay_s")
    return {
        "orders": orders, "resting": orders, "seq": load["seq"],
        "load": load,
        "ready_s": ready,
        "status_ready_s": _median(results, "status_ready_s"),
        "rebuild_s": _median(results, "rebuild_s"),
        "snapshot_load_s": _median(results, "snapshot_load_s"),
        "replay_s": replay_s,
        "matcher_load_s": _median(results, "matcher_load_s"),
        "restarted_s": _median(results, "restarted_s"),
        "pid_written_s": _median(results, "pid_written_s"),
        "snapshot_seq": snapshot_seq,
        "snapshot_bytes": results[0]["snapshot_bytes"],
        "replayed": replayed,
        "replay_per_s": round(replayed / replay_s) if replay_s else None,
        "target_s": RECOVERY_TARGET_S,
        "meets_target": ready <= RECOVERY_TARGET_S,
        "verify": verify,
        "runs": results,
        "without_snapshot": full,
        "settings": {"markets": MARKETS, "accounts": ACCOUNTS, "levels": LEVELS,
                     "snapshot_every": snapshot_every(orders),
                     "loaded_via": "gateway-0's command ring, written by the benchmark"},
        "shm_prefix": sd.prefix,
        "shm_left": shm_left,
    }


def bench_durability(orders: int = DEFAULT_ORDERS, seconds: float = DEFAULT_SECONDS,
                     clients: int = DEFAULT_CLIENTS, runs: int = DEFAULT_RUNS,
                     window: int = DEFAULT_WINDOW, progress=None) -> dict:
    say = progress or (lambda msg: None)
    with bench_dir("durability") as root:
        lag = bench_lag(root, seconds, clients, window, say)
        recovery = bench_recovery(root, orders, runs, say)
    return {
        "benchmark": "durability",
        "lag": lag,
        "recovery": recovery,
        "box": BOX_NOTE,
        "shm_prefixes": [lag["shm_prefix"], recovery["shm_prefix"]],
        "shm_left": lag["shm_left"] + recovery["shm_left"],
    }


def format_report(res: dict) -> str:
    lag, rec = res["lag"], res["recovery"]
    ls, lm, ld = lag["settings"], lag["lag_ms"], lag["lag_from_durable_ms"]
    v = rec["verify"]
    mb = rec["snapshot_bytes"] / 2 ** 20
    runs = len(rec["runs"])
    rate = f"{rec['replay_per_s']:,}/s" if rec["replay_per_s"] else "too short to time"
    full = rec["without_snapshot"]
    rows = [
        ("benchmark", f"durability: two fresh exchanges, ack_mode durable; {res['box']}"),
        ("lag load", f"{ls['clients']} client processes crossing orders, window {ls['window']},"
                     f" {ls['seconds']:g} s: {lag['load_orders_per_s']:,} orders/s acked, "
                     f"{lag['fills_per_s']:,} fills/s (ack p50 {lag['ack_p50_us']} µs, "
                     f"p99 {lag['ack_p99_us']} µs)"),
        ("DuckDB lag ms", f"p50 {lm['p50']}  p99 {lm['p99']}  max {lm['max']}  from the fill "
                          f"report at the client, over {lag['fill_samples']:,} fills "
                          f"(target p99 <= {lag['target_ms']:g}: "
                          f"{'met' if lag['meets_target'] else 'MISSED'})"),
        ("  p99 per second", "  ".join(str(v) for v in lag["lag_p99_ms_per_second"])),
        ("  from durable ms", f"p50 {ld['p50']}  p99 {ld['p99']}  max {ld['max']}  "
                              f"(store_flush_ms {ls['store_flush_ms']}, cursors polled every "
                              f"{ls['poll_ms']:g} ms)"),
        ("  perpx sql", f"{lag['sql_check']['fill_seqs_in_duckdb']:,} of "
                        f"{lag['sql_check']['fill_seqs_seen']:,} reported fill seqs visible"),
        ("recovery book", f"{rec['orders']:,} resting orders ({rec['settings']['markets']} "
                          f"markets x {rec['settings']['accounts']} accounts), loaded through "
                          f"gateway-0's ring in {rec['load']['sequenced_s']} s "
                          f"({rec['load']['sequenced_per_s']:,}/s), persistd and the gateway "
                          f"caught up {rec['load']['caught_up_s']} s later"),
        ("kill -9 -> ready", f"{rec['ready_s']} s median of {runs} (heartbeat; status.json "
                             f"{rec['status_ready_s']} s) (target <= {rec['target_s']:g} s: "
                             f"{'met' if rec['meets_target'] else 'MISSED'})"),
        ("  matcher rebuild", f"{rec['rebuild_s']} s: snapshot at seq {rec['snapshot_seq']:,} "
                              f"({mb:,.0f} MiB) read + crc {rec['snapshot_load_s']} s, replay of"
                              f" {rec['replayed']:,} commands {rec['replay_s']} s "
                              f"({rate})"),
        ("  before rebuild", f"supervisor restarted it {rec['restarted_s']} s after the kill;"
                             f" heartbeat pid written at {rec['pid_written_s']} s; shm mapped + "
                             f"compiled matcher loaded {rec['matcher_load_s']} s into its main()"),
        ("  per run ready s", "  ".join(str(r["ready_s"]) for r in rec["runs"])),
        ("without snapshot", f"ready {full['ready_s']} s, rebuild {full['rebuild_s']} s: replay "
                             f"of all {full['replayed']:,} commands from genesis "
                             f"{full['replay_s']} s (snapshot moved aside, 1 run: the worst "
                             f"case with snapshot_every >= the journal)"),
        ("verify", f"{'ok' if v['ok'] else 'FAILED'}: replayed from {v['from']} to seq "
                   f"{v['seq']:,} in {v['replay_s']} s; live state hash "
                   f"{'matches' if v['live_checked'] and v['ok'] else 'NOT checked/matching'}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
