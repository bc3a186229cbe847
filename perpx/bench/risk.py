"""`perpx bench risk`: what riskd's liquidation scanner costs, and a liquidation cascade.

1. Scan cost for `positions` (default 100,000) positions, in this process: the matcher's
   tables (engine.state.allocate_state) filled directly with one BTC-like and one ETH-like
   market (the bundled default's brackets), accounts holding one position each (10% isolated)
   and 1% of them a second position in the other market (cross in both: "coupled"), with
   balances putting their liquidation prices 2-30% from the mark. Timed, median of `runs`:
   - build: riskd/scanner.Scanner from scratch (every account derived, thresholds sorted),
     what a (re)started riskd pays once;
   - tick, quiet: one cycle after a 1-tick mark move, no account changed (the sweep of 1,024
     accounts included) — riskd's steady state, every mark interval;
   - tick, 1% changed: 1,000 accounts' changed_seq moved (trading) and the mark moved;
   - tick, cascade: a fresh scanner and a mark that crosses 10% of market 0's long thresholds
     (the LIQUIDATE targets it returns: about 2.5% of the positions);
   - the naive alternative for scale: engine/risk.liquidation_targets per account (exact, what
     a full rescan would run), timed on 2,000 accounts and scaled to all of them.

2. A liquidation cascade on a real exchange (`perpx up` as a child process, one BTC-PERP
   market with a manual oracle, riskd at its default cadence). Through the ops ring: a maker
   M sells `accounts` x 0.01 BTC at 65,000, each of `accounts` (default 10,000) traders buys
   0.01 BTC from it with 14.3-17.5 USDC of collateral (about 45x: liquidation prices between
   63,543 and 63,863, bankruptcy prices 63,283-63,603); a liquidity account L bids 110% of
   their total at 63,700. The shock: an IOC sell of one lot by M (it trades with L at 63,700:
   the contract price moves) and the index set to 63,000 on the IndexBoard (what `perpx oracle
   set` writes). riskd's mark is Binance's median (riskd/mark.py): of Price 1 (63,000) and the
   last trade (63,700), 63,350, below every trader's liquidation price; it sends SET_MARK and
   in the same ring every LIQUIDATE its scanner finds. This process reads every event (as the
   ops reader) and stamps arrivals with the wall clock. Reported: the time from the shock to
   riskd's SET_MARK and from it until every trader's position is closed (an EV_LIQUIDATION
   leaving size 0: closes into L's bids, or auto-deleverage), and per trader the reaction from
   the mark command (its ts_ns, riskd's clock) to the first closing fill of that trader seen
   here (p50/p99 over the traders). Needs the engine's liquidation (E1); until it is there the
   matcher rejects LIQUIDATE and this part reports nothing settled.

The box has 2 cores shared by the exchange, this process and whatever else runs: these are
what they achieve together.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

USDC = 1_000_000
DEFAULT_POSITIONS = 100_000
DEFAULT_ACCOUNTS = 10_000
DEFAULT_RUNS = 5
QUIET_TICKS = 20
NAIVE_SAMPLE = 2_000


# ---- 1. scan cost --------------------------------------------------------------------------------
def _scan_state(positions: int, seed: int):
    """A State holding `positions` positions (see the module docstring) and its config."""
    from engine.config import EngineConfig
    from engine.records import MARGIN_ISOLATED
    from engine.risk import bracket_amounts
    from engine.state import allocate_state
    from perpx.config import load_config
    specs = load_config(None).markets[:2]
    coupled = positions // 100
    accounts = positions - coupled
    cfg = EngineConfig(max_accounts=accounts + 1, max_markets=2, max_orders=16,
                       max_levels_per_side=4)
    st = allocate_state(cfg, lambda name, shape, dtype: np.zeros(shape, dtype))
    for spec in specs:
        row = st.markets[spec.id:spec.id + 1]
        row["active"], row["mark_ticks"] = 1, spec.initial_price_ticks
        row["atoms_per_tick_lot"], row["max_leverage"] = spec.atoms_per_tick_lot, spec.max_leverage
        brackets = bracket_amounts([(int(b.floor * USDC), int(b.rate * 10 ** 9))
                                    for b in spec.brackets])
        row["n_brackets"] = len(brackets)
        for k, (floor, rate, amount) in enumerate(brackets):
            row["bracket_floor_atoms"][0, k], row["bracket_rate_e9"][0, k] = floor, rate
            row["bracket_amount_atoms"][0, k] = amount
    rng = np.random.default_rng(seed)
    ids = np.arange(1, accounts + 1)
    market = rng.integers(0, 2, accounts)
    side = np.where(rng.integers(0, 2, accounts) == 1, 1, -1)
    for m, spec in enumerate(specs):
        mine = ids[market == m]
        mark, atpl = spec.initial_price_ticks, spec.atoms_per_tick_lot
        # notionals of 100 .. 200,000 USDC, entries within 2% of the mark
        lots = (rng.uniform(100, 200_000, len(mine)) * USDC / (mark * atpl)).astype(np.int64) + 1
        entry = (mark * rng.uniform(0.98, 1.02, len(mine))).astype(np.int64)
        size = lots * side[mine - 1]
        p = st.positions[mine, m]
        p["size_lots"], p["cost_atoms"] = size, size * entry * atpl
        notional = lots * mark * atpl
        margin = (notional * rng.uniform(0.02, 0.30, len(mine))).astype(np.int64)
        isolated = rng.random(len(mine)) < 0.1
        p["margin_mode"] = np.where(isolated, MARGIN_ISOLATED, 0)
        p["isolated_margin_atoms"] = np.where(isolated, margin, 0)
        st.positions[mine, m] = p
        st.accounts["balance_atoms"][mine] = margin
    # the coupled: a second, cross position in the other market for the first `coupled` cross
    cross_ids = ids[st.positions["margin_mode"][ids, market] == 0][:coupled]
    for a in cross_ids:
        m = 1 - int(market[a - 1])
        spec = specs[m]
        lots = int(5_000 * USDC // (spec.initial_price_ticks * spec.atoms_per_tick_lot)) + 1
        st.positions["size_lots"][a, m] = -lots
        st.positions["cost_atoms"][a, m] = -lots * spec.initial_price_ticks * spec.atoms_per_tick_lot
    st.accounts["changed_seq"][ids] = ids
    st.counters[0] = accounts + 1
    return st, specs, int(np.count_nonzero(st.positions["size_lots"]))


def _median_ms(samples_s: list) -> float:
    return round(statistics.median(samples_s) * 1e3, 3)


def bench_scan(positions: int = DEFAULT_POSITIONS, runs: int = DEFAULT_RUNS, seed: int = 1,
               progress=None) -> dict:
    from engine.risk import liquidation_targets
    from riskd.scanner import Scanner
    say = progress or (lambda msg: None)
    st, specs, n_positions = _scan_state(positions, seed)
    say(f"scan: {n_positions:,} positions on {len(st.accounts) - 1:,} accounts")
    retry_ns = 10 ** 9
    seq = int(st.counters[0])

    def scanner():
        return Scanner(st, [0, 1], lambda: seq, retry_ns)

    builds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sc = scanner()
        builds.append(time.perf_counter() - t0)
    mark0 = int(st.markets["mark_ticks"][0])
    quiet = []
    for k in range(QUIET_TICKS * runs):
        mark = mark0 + (1 if k % 2 else -1)
        t0 = time.perf_counter()
        sc.cycle(k, {0: mark})
        quiet.append(time.perf_counter() - t0)
    changed = []
    rng = np.random.default_rng(seed + 1)
    n_accounts = len(st.accounts) - 1
    for k in range(runs):
        moved = rng.choice(np.arange(1, n_accounts + 1), n_accounts // 100, replace=False)
        seq += 1
        st.accounts["changed_seq"][moved] = seq
        t0 = time.perf_counter()
        sc.cycle(10 ** 6 + k, {0: mark0 + (1 if k % 2 else -1)})
        changed.append(time.perf_counter() - t0)
    # a mark that crosses 10% of market 0's long thresholds
    longs = np.sort(sc.long_t[0][sc.long_t[0] > 0])
    crash = int(longs[int(len(longs) * 0.9)]) if len(longs) else mark0
    cascade, targets = [], 0
    for k in range(runs):
        sc = scanner()
        t0 = time.perf_counter()
        targets = len(sc.cycle(2 * 10 ** 6 + k, {0: crash}))
        cascade.append(time.perf_counter() - t0)
    sample = np.arange(1, min(NAIVE_SAMPLE, n_accounts) + 1)
    t0 = time.perf_counter()
    for a in sample:
        liquidation_targets(st, int(a))
    naive_per_account = (time.perf_counter() - t0) / len(sample)
    return {"positions": n_positions, "accounts": n_accounts, "runs": runs,
            "build_ms": _median_ms(builds), "tick_quiet_ms": _median_ms(quiet),
            "tick_1pct_changed_ms": _median_ms(changed), "tick_cascade_ms": _median_ms(cascade),
            "cascade_targets": targets, "sweep_per_tick": sc.sweep,
            "naive_full_rescan_ms": round(naive_per_account * n_accounts * 1e3, 1)}


# ---- 2. the cascade ------------------------------------------------------------------------------
P0_TICKS = 650_000
LOTS = 10                      # 0.01 BTC
L_BID_TICKS = 637_000
SHOCK_INDEX_TICKS = 630_000
FIRST_TRADER = 3               # 1: the maker M, 2: the liquidity account L


def cascade_config(accounts: int, extra: str = "", market_extra: str = "") -> str:
    """One manual BTC-PERP market at 65000; `extra` adds sections, `market_extra` market keys."""
    return f"""
[exchange]
gateways = 1
ack_mode = "fast"
rate_limit_per_s = 1000000000
rate_limit_burst = 1000000000

[engine]
max_accounts = {accounts + FIRST_TRADER + 16}
max_markets = 1
max_orders = 4096
command_ring_capacity = 65536

[endpoints]
orders_port = 0
market_data_port = 0
{extra}
[[markets]]
symbol = "BTC-PERP"
tick_size = "0.1"
lot_size = "0.001"
initial_price = "65000"
oracle = "manual"
max_leverage = 50
{market_extra}"""


def _setup_commands(accounts: int) -> list:
    """Batches: deposits, M's ask, the traders' buys, L's bid (see the module docstring)."""
    from engine.records import (CMD_DEPOSIT, CMD_NEW_ORDER, SIDE_BUY, SIDE_SELL, TIF_IOC,
                                new_commands)
    traders = np.arange(FIRST_TRADER, FIRST_TRADER + accounts)
    dep = new_commands(accounts + 2)
    dep["cmd"], dep["account"] = CMD_DEPOSIT, np.concatenate([[1, 2], traders])
    # 14.3 .. 17.5 USDC: initial margin 13 + taker fee 0.325 + a spread of liquidation prices
    dep["amount_atoms"] = np.concatenate([[10 ** 7 * USDC] * 2,
                                          14_300_000 + 64_000 * (traders % 51)])

    def orders(account, side, lots, price, tif=0):
        o = new_commands(len(np.atleast_1d(account)))
        o["cmd"], o["account"], o["side"], o["qty_lots"] = CMD_NEW_ORDER, account, side, lots
        o["price_ticks"], o["tif"], o["cid"] = price, tif, np.arange(1, len(o) + 1)
        return o

    ask = orders(1, SIDE_SELL, accounts * LOTS, P0_TICKS)
    buys = orders(traders, SIDE_BUY, LOTS, P0_TICKS, TIF_IOC)
    bid = orders(2, SIDE_BUY, accounts * LOTS * 11 // 10, L_BID_TICKS)
    bid["cid"] = 1
    return [dep, ask, buys, bid]


def sequence_commands(session, commands, timeout_s: float = 120.0) -> int:
    """Write commands into the ops ring and read events until the matcher has closed each
    (ops replies, perpx/ops.py, wait per command; this is one pass for thousands). Returns how
    many were rejected."""
    from engine.records import EV_COMMAND, EV_REJECT
    cmds = np.array(commands, copy=True)
    cmds["ts_ns"] = time.time_ns()
    source = session.ex.ops_index
    sent = sequenced = rejected = 0
    deadline = time.monotonic() + timeout_s
    while sequenced < len(cmds):
        if sent < len(cmds):
            sent += session.ring.write(cmds[sent:])
        n = session.consumer.available()
        if not n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cascade setup: {sequenced} of {len(cmds)} commands "
                                   f"sequenced after {timeout_s:g} s")
            session.consumer.wait(1, timeout_s=0.05)
            continue
        batch = session.consumer.peek(min(n, 1 << 16))
        session.consumer.advance(len(batch))
        mine = batch[batch["source"] == source]
        sequenced += int(np.count_nonzero(mine["etype"] == EV_COMMAND))
        rejected += int(np.count_nonzero(mine["etype"] == EV_REJECT))
    # (the matcher publishes a command's events together, so its reject came with them)
    return rejected


def bench_cascade(accounts: int = DEFAULT_ACCOUNTS, progress=None) -> dict:
    from perpx.bench.e2e import bench_dir, running_exchange
    say = progress or (lambda msg: None)
    shm_left: list = []
    with bench_dir("risk") as root, \
            running_exchange(root / "state", cascade_config(accounts), say, shm_left) as (up, _):
        res = run_cascade(up.sd, accounts, say)
    return {**res, "shm_left": shm_left}


def run_cascade(state_dir, accounts: int, say, setup=None) -> dict:
    """The cascade on a running exchange started with cascade_config(accounts): `setup`
    (batches of commands; default _setup_commands) must leave the accounts FIRST_TRADER ..
    FIRST_TRADER + accounts - 1 long and liquidatable at the shock, M (1) short, L (2) bidding."""
    from engine.records import CMD_NEW_ORDER, SIDE_SELL, TIF_IOC, new_commands
    from perpx.launch import wait_until
    from perpx.ops import Exchange
    from shm.index_board import IndexBoard
    ex = Exchange(state_dir)
    board = IndexBoard.attach(ex.prefix)
    try:
        board.set(0, P0_TICKS)
        say(f"cascade: {accounts:,} traders buying 0.01 BTC each at ~45x")
        with ex.session(timeout_s=120.0) as session:
            for batch in setup or _setup_commands(accounts):
                rejected = sequence_commands(session, batch)
                if rejected:
                    raise RuntimeError(f"cascade setup: {rejected} of {len(batch)} commands "
                                       f"rejected")
            # two riskd ticks: its scanner has derived every trader (changed_seq moved)
            for _ in range(2):
                since = time.time_ns()
                wait_until(lambda: getattr(board.published(0), "ts_ns", 0) > since, 10.0,
                           "a riskd tick")
            shock = new_commands(1)
            shock["cmd"], shock["account"], shock["side"] = CMD_NEW_ORDER, 1, SIDE_SELL
            shock["qty_lots"], shock["price_ticks"], shock["tif"] = 1, SHOCK_INDEX_TICKS, TIF_IOC
            shock["cid"], shock["ts_ns"] = 10 ** 9, time.time_ns()
            say("cascade: the shock")
            t_shock = time.time_ns()
            if session.ring.write(shock) != 1:
                raise RuntimeError("cascade: the ops ring is full")
            board.set(0, SHOCK_INDEX_TICKS)
            return _observe(session.consumer, accounts, t_shock)
    finally:
        board.close()


def _observe(consumer, accounts: int, t_shock: int) -> dict:
    """Read events until every trader's position is closed; the timings of the module
    docstring."""
    from engine.records import (CMD_LIQUIDATE, COMMAND_EVENT_DTYPE, EV_COMMAND, EV_LIQUIDATION,
                                EV_MARK, LIQUIDATION_EVENT_DTYPE, MARK_EVENT_DTYPE)
    traders = set(range(FIRST_TRADER, FIRST_TRADER + accounts))
    first_fill, closed = {}, {}
    mark_event = first_liquidate = None
    deadline = time.monotonic() + 60 + accounts / 100
    while len(closed) < accounts and time.monotonic() < deadline:
        n = consumer.available()
        if not n:
            consumer.wait(1, timeout_s=0.05)
            continue
        batch = consumer.peek(min(n, 1 << 16))
        consumer.advance(len(batch))
        now = time.time_ns()
        if first_liquidate is None:
            # the mark that set the cascade off is riskd's last before its LIQUIDATEs (a tick
            # between the shock's trade and its index makes an intermediate mark first)
            riskd = batch[batch["source"] == 1]
            for e in riskd[riskd["etype"] == EV_MARK].view(MARK_EVENT_DTYPE):
                mark_event = (int(e["ts_ns"]), now, int(e["mark_ticks"]))
            if np.any(riskd[riskd["etype"] == EV_COMMAND].view(COMMAND_EVENT_DTYPE)
                      ["command"]["cmd"] == CMD_LIQUIDATE):
                first_liquidate = now
        liq = batch[batch["etype"] == EV_LIQUIDATION].view(LIQUIDATION_EVENT_DTYPE)
        for account, size in zip(liq["account"].tolist(), liq["size_lots"].tolist()):
            if account in traders:
                first_fill.setdefault(account, now)
                if size == 0:
                    closed.setdefault(account, now)
    if mark_event is None:
        raise RuntimeError("riskd sent no mark after the shock")
    mark_ts, mark_seen, mark_ticks = mark_event
    reaction = np.array([t - mark_ts for t in first_fill.values()], dtype=np.float64)
    done = len(closed) == accounts
    settled = max(closed.values()) if done else None

    def ms(ns):
        return round(float(ns) / 1e6, 3)
    return {"accounts": accounts, "mark_after_shock": mark_ticks / 10,
            "shock_to_mark_command_ms": ms(mark_ts - t_shock),
            "mark_command_seen_ms": ms(mark_seen - mark_ts),
            "first_liquidate_seen_ms": ms(first_liquidate - mark_ts) if first_liquidate else None,
            "liquidated": len(first_fill), "closed": len(closed),
            "all_settled_ms_from_mark": ms(settled - mark_ts) if done else None,
            "all_settled_ms_from_shock": ms(settled - t_shock) if done else None,
            "reaction_ms": ({"first": ms(reaction.min()),
                             "p50": ms(np.percentile(reaction, 50)),
                             "p99": ms(np.percentile(reaction, 99))} if len(reaction) else None)}


# ---- the report ----------------------------------------------------------------------------------
def bench_risk(positions: int = DEFAULT_POSITIONS, accounts: int = DEFAULT_ACCOUNTS,
               runs: int = DEFAULT_RUNS, cascade: bool = True, progress=None) -> dict:
    import os
    out = {"box": f"{os.cpu_count()} CPUs", "scan": bench_scan(positions, runs, progress=progress)}
    if cascade:
        out["cascade"] = bench_cascade(accounts, progress=progress)
    return out


def format_report(res: dict) -> str:
    s = res["scan"]
    lines = [
        f"riskd scanner, {s['positions']:,} positions on {s['accounts']:,} accounts "
        f"(median of {s['runs']}; {res['box']}):",
        f"  full build            {s['build_ms']:>10} ms",
        f"  tick, quiet           {s['tick_quiet_ms']:>10} ms   (mark moved 1 tick, sweep "
        f"{s['sweep_per_tick']} accounts)",
        f"  tick, 1% changed      {s['tick_1pct_changed_ms']:>10} ms",
        f"  tick, cascade         {s['tick_cascade_ms']:>10} ms   ({s['cascade_targets']:,} "
        f"LIQUIDATE targets)",
        f"  naive exact rescan    {s['naive_full_rescan_ms']:>10} ms   (engine/risk per account, "
        f"scaled)",
    ]
    c = res.get("cascade")
    if c:
        r = c["reaction_ms"] or {}
        lines += [
            f"liquidation cascade, {c['accounts']:,} accounts (real exchange, manual oracle):",
            f"  mark after the shock  {c['mark_after_shock']}",
            f"  shock -> SET_MARK     {c['shock_to_mark_command_ms']} ms (riskd's tick)",
            f"  SET_MARK -> first LIQUIDATE sequenced  {c['first_liquidate_seen_ms']} ms",
            f"  liquidated / closed   {c['liquidated']:,} / {c['closed']:,}",
            f"  all settled           {c['all_settled_ms_from_mark']} ms after the mark command "
            f"({c['all_settled_ms_from_shock']} ms after the shock)",
            f"  reaction mark -> first closing fill per account: first {r.get('first')} ms, "
            f"p50 {r.get('p50')} ms, p99 {r.get('p99')} ms",
        ]
    return "\n".join(lines)
