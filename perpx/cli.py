"""The `perpx` command line (PROTOCOL.md, "Command line").

Every command takes `--state-dir DIR` (default ./perpx-state) and `--json`, before or after
the subcommand. With `--json` a command prints exactly one JSON document on stdout; progress
and diagnostics go to stderr. Exit status 0 on success; on failure one line on stderr and a
non-zero status (1 for a failed command, 2 for a usage error).

Adding a subcommand: write `cmd_<name>(args) -> int` and a `_register_<name>(subparsers,
common)` that adds its parser with `parents=[common]` and `set_defaults(func=cmd_<name>)`, then
list the register function in REGISTRARS. Only implemented subcommands are registered.
"""

import argparse
import json
import os
import sys

DEFAULT_STATE_DIR = "./perpx-state"
# bench defaults (kept here so building the parser does not import the engine)
DEFAULT_RUNS = 5
DEFAULT_BATCH = 256


class CliError(Exception):
    """A failure to report as one line on stderr (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _common_options() -> argparse.ArgumentParser:
    """Options every command accepts, also after the subcommand.

    Defaults are suppressed here so that `perpx --json bench matcher` is not overridden by the
    subparser's default; the top-level parser holds the real defaults.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help=f"exchange state directory (default {DEFAULT_STATE_DIR})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document on stdout")
    return common


def emit(args, result: dict, text: str | None = None):
    """Print a command's result: JSON with --json, else `text` (or the JSON, indented)."""
    if args.json:
        print(json.dumps(result, sort_keys=False))
    else:
        print(text if text is not None else json.dumps(result, indent=2))


def _progress(args):
    if args.json or getattr(args, "quiet", False):
        return None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


# ---- bench --------------------------------------------------------------------------------
def cmd_bench_matcher(args) -> int:
    from perpx.bench import matcher as bench

    res = bench.bench_matcher(commands=args.commands, runs=args.runs, batch=args.batch,
                              seed=args.seed, reference_commands=args.reference_commands,
                              verify_commands=args.verify_commands, risk=args.risk,
                              progress=_progress(args))
    emit(args, res, bench.format_report(res))
    return max(_events_status(res), _events_status(res["risk"]) if "risk" in res else 0)


def cmd_bench_lobster(args) -> int:
    from perpx.bench import matcher as bench

    try:
        res = bench.bench_lobster(data=args.data, limit=args.limit, runs=args.runs,
                                  batch=args.batch, reference_commands=args.reference_commands,
                                  verify_commands=args.verify_commands,
                                  progress=_progress(args))
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    emit(args, res, bench.format_report(res))
    return _events_status(res)


def cmd_bench_e2e(args) -> int:
    from perpx.bench import e2e as bench_e2e

    res = bench_e2e.bench_e2e(seconds=args.seconds, clients=args.clients, rate=args.rate,
                              window=args.window, ack_mode=args.ack_mode,
                              progress=_progress(args))
    emit(args, res, bench_e2e.format_report(res))
    return 0


def cmd_bench_durability(args) -> int:
    from perpx.bench import durability as bench_durability

    res = bench_durability.bench_durability(orders=args.orders, seconds=args.seconds,
                                            clients=args.clients, runs=args.runs,
                                            window=args.window, progress=_progress(args))
    emit(args, res, bench_durability.format_report(res))
    return 0


def cmd_bench_risk(args) -> int:
    from perpx.bench import risk as bench_risk

    res = bench_risk.bench_risk(positions=args.positions, accounts=args.accounts,
                                runs=args.runs, cascade=not args.no_cascade,
                                progress=_progress(args))
    emit(args, res, bench_risk.format_report(res))
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _events_status(res) -> int:
    if res["events_match"]:
        return 0
    print(f"perpx: error: compiled and reference events differ at event "
          f"{res.get('first_mismatch')}", file=sys.stderr)
    return 1


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _register_bench(sub, common):
    p = sub.add_parser("bench", parents=[common], help="benchmarks of the matching engine")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True,
                            parser_class=_Parser)

    def timing_options(q):
        q.add_argument("--runs", type=_positive_int, default=DEFAULT_RUNS,
                       help=f"timed runs, the median is reported (default {DEFAULT_RUNS})")
        q.add_argument("--batch", type=_positive_int, default=DEFAULT_BATCH,
                       help=f"commands per Matcher.process call (default {DEFAULT_BATCH})")
        q.add_argument("--reference-commands", type=_positive_int, default=100_000,
                       metavar="N", help="prefix run through the reference model "
                                         "(default 100000)")
        q.add_argument("--verify-commands", type=_positive_int, default=20_000, metavar="N",
                       help="prefix on which both engines' events are compared "
                            "(default 20000)")

    q = bsub.add_parser("matcher", parents=[common],
                        help="the compiled matcher on the standard workload")
    q.add_argument("--commands", type=_positive_int, default=1_000_000, metavar="N",
                   help="workload size (default 1000000)")
    q.add_argument("--seed", type=int, default=None, help="workload seed")
    q.add_argument("--risk", action="store_true",
                   help="also time the risk-on variant (moving marks, leveraged and isolated "
                        "accounts, funding, liquidations) in the same rounds; risk_ratio")
    timing_options(q)
    q.set_defaults(func=cmd_bench_matcher)

    q = bsub.add_parser("lobster", parents=[common],
                        help="replay a LOBSTER message file through the matcher")
    q.add_argument("--data", metavar="PATH", default=None,
                   help="the message file, its folder, or the data folder "
                        "(default: ../shared/data next to the repository)")
    q.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="replay only the first N messages")
    timing_options(q)
    q.set_defaults(func=cmd_bench_lobster)

    def client_options(q, what: str, clients: int, window: int):
        q.add_argument("--seconds", type=_positive_float, default=5.0, metavar="S",
                       help=f"seconds per timed {what} (default 5)")
        q.add_argument("--clients", type=_positive_int, default=clients, metavar="C",
                       help=f"client processes of the {what} (default {clients})")
        q.add_argument("--window", type=_positive_int, default=window, metavar="W",
                       help=f"requests in flight per client (default {window})")

    q = bsub.add_parser("e2e", parents=[common],
                        help="order entry end to end over loopback vs a bare pyzmq echo")
    client_options(q, "run", 2, 8)
    q.add_argument("--rate", type=_positive_float, default=20_000.0, metavar="R",
                   help="total orders/s of the paced run (default 20000)")
    q.add_argument("--ack-mode", choices=("durable", "fast", "both"), default="both",
                   help="exchange(s) to measure: fast, durable, or both in one run, each "
                        "a fresh exchange (default both; the top-level figures are fast's)")
    q.set_defaults(func=cmd_bench_e2e)

    q = bsub.add_parser("durability", parents=[common],
                        help="DuckDB lag under full load (crossing orders: half the "
                             "clients buy, half sell), and matcher recovery time with N "
                             "resting orders")
    q.add_argument("--orders", type=_positive_int, default=1_000_000, metavar="N",
                   help="resting orders when the matcher is killed (default 1000000)")
    client_options(q, "full-load lag run", 4, 64)
    q.add_argument("--runs", type=_positive_int, default=3, metavar="R",
                   help="matcher kills, the median is reported (default 3)")
    q.set_defaults(func=cmd_bench_durability)

    q = bsub.add_parser("risk", parents=[common],
                        help="riskd's liquidation scanner on N positions, and a liquidation "
                             "cascade on a real exchange")
    q.add_argument("--positions", type=_positive_int, default=100_000, metavar="N",
                   help="positions in the scanner's tables (default 100000)")
    q.add_argument("--accounts", type=_positive_int, default=10_000, metavar="A",
                   help="accounts near their liquidation price in the cascade (default 10000)")
    q.add_argument("--runs", type=_positive_int, default=5, metavar="R",
                   help="timed runs of each scanner figure, the median is reported (default 5)")
    q.add_argument("--no-cascade", action="store_true",
                   help="only the scanner figures (no exchange is started)")
    q.set_defaults(func=cmd_bench_risk)


# ---- helpers for the exchange commands ------------------------------------------------------
def _state_dir(args):
    from perpx.statedir import StateDir
    return StateDir(args.state_dir)


def _exchange(args):
    from perpx.ops import Exchange
    return Exchange(_state_dir(args))


def table(headers, rows) -> str:
    """A plain text table: one header line, then the rows; numbers right-aligned."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def numeric(i):
        return all(_looks_numeric(r[i]) for r in cells if r[i]) and any(r[i] for r in cells)

    right = [numeric(i) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w)
                         for v, w, r in zip(values, widths, right)).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in cells])


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _non_negative(what: str):
    """An argparse type: an integer >= 0, with errors that say what it is."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} is an integer, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{what} is >= 0, got {text}")
        return value
    return parse


_account_id = _non_negative("an account id")
_depth = _non_negative("a depth")


def _amount_atoms(text: str) -> int:
    from perpx.config import usdc_to_atoms
    try:
        return usdc_to_atoms(text)
    except ValueError as e:
        raise CliError(str(e)) from None


# ---- up / down / status -----------------------------------------------------------------------
def cmd_up(args) -> int:
    from perpx.config import load_config
    from perpx.supervisor import StartupError, Supervisor
    cfg = load_config(args.config)
    try:
        return Supervisor(_state_dir(args), cfg, json_out=args.json).run()
    except StartupError as e:
        raise CliError(str(e)) from None


def cmd_down(args) -> int:
    import os
    import signal
    import time
    sd = _state_dir(args)
    pid = sd.require_running()
    deadline = time.monotonic() + 2.0
    while pid == -1 and time.monotonic() < deadline:   # just started: pid not written yet
        time.sleep(0.05)
        pid = sd.supervisor_pid() or 0
    if pid <= 0:
        raise CliError(f"cannot tell the supervisor's pid from {sd.supervisor_lock}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while sd.supervisor_pid() is not None:
        if time.monotonic() > deadline:
            raise CliError(f"the supervisor (pid {pid}) is still running {args.timeout:g} s "
                           f"after SIGTERM")
        time.sleep(0.05)
    emit(args, {"stopped": True, "supervisor_pid": pid},
         f"perpx: stopped the exchange in {sd.path} (supervisor pid {pid})")
    return 0


def _pid_alive(pid) -> bool:
    """Alive and not a zombie (a dead child its parent has not reaped yet)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def status_report(sd) -> dict:
    """The `perpx status` document (also used by tests)."""
    supervisor = sd.require_running()
    st = sd.status() or {"processes": [], "endpoints": None}
    procs = [{"name": p["name"], "pid": p["pid"], "alive": _pid_alive(p["pid"]),
              "restarts": p["restarts"], "state": p.get("state"), "cpus": p.get("cpus"),
              "started_at": p.get("started_at")} for p in st["processes"]]
    report = {"running": True, "supervisor_pid": supervisor, "state_dir": str(sd.path),
              "prefix": sd.prefix, "processes": procs, "seq": None,
              "durable_seq": None, "journal": None, "heartbeats": {}, "rings": {},
              "endpoints": st.get("endpoints")}
    try:
        doc = sd.exchange()
    except RuntimeError:
        return report
    from engine.records import COMMAND_DTYPE, EVENT_DTYPE
    from engine.service import attach_state
    from shm import names
    from engine.state import C_SEQ
    from perpx.launch import wait_until
    from shm.heartbeat import MATCHER_SLOT, HeartbeatBoard
    from shm.region import Region, ShmError
    from shm.ring import CommandRing, EventRing
    prefix = doc["prefix"]
    try:
        region, state = attach_state(prefix, sd.engine_config(doc))
        report["seq"] = int(state.counters[C_SEQ])
        del state
        region.close()
    except ShmError:
        pass
    try:
        from shm.progress import JournalProgress
        progress = JournalProgress.attach(prefix)
        journal = progress.as_dict()
        progress.close()
        report["durable_seq"] = journal["durable_seq"]
        report["journal"] = journal
    except ShmError:
        pass
    try:
        hb = HeartbeatBoard.attach(prefix)
        slot = hb.slot(MATCHER_SLOT)
        first = int(slot["beats"][0])
        # The matcher beats at least every 50 ms; on a loaded 2-core box a beat can come late,
        # so watch for up to a second before calling it stopped.
        try:
            beats = wait_until(lambda s=slot: (b := int(s["beats"][0])) != first and b, 1.0,
                               "a matcher heartbeat", interval_s=0.01, error=TimeoutError)
        except TimeoutError:
            beats = first
        report["heartbeats"]["matcher"] = {"beats": beats, "beating": beats != first,
                                           "ready": bool(slot["ready"][0])}
        del slot
        hb.close()
    except ShmError:
        pass
    try:
        events = EventRing.attach(names.event_ring(prefix), EVENT_DTYPE)
        published = events.published_cursor()
        lags = {}
        for name in events.consumer_names:
            cursor = events.consumer_cursor(name)
            if cursor is not None:
                lags[name] = published - cursor
        report["rings"]["events"] = {"published": published, "capacity": events.capacity,
                                     "consumer_lag": lags}
        events.close()
        depths = {}
        for source in doc["sources"]:
            ring = CommandRing.attach(names.command_ring(prefix, source["name"]), COMMAND_DTYPE)
            depths[source["name"]] = ring.available()
            ring.close()
        report["rings"]["commands"] = depths
    except ShmError:
        pass
    report["risk"] = _risk_report(doc)
    return report


def _risk_report(doc: dict) -> dict:
    """riskd's latest numbers per market from the IndexBoard (wire decimals), {} if none.

    `stale`: riskd has published nothing for the market for three of its ticks (at least 2 s)
    or ever: its index feed fails (riskd logs why) or has no price yet."""
    import time
    from decimal import Decimal

    from perpx.config import config_from_resolved, dec_str
    from shm.index_board import IndexBoard
    from shm.region import ShmError
    try:
        board = IndexBoard.attach(doc["prefix"])
    except ShmError:
        return {}
    try:
        out = {}
        risk = doc.get("risk", {})
        stale_ns = max(3 * risk.get("mark_interval_ms", 250) * 10 ** 6, 2 * 10 ** 9)
        now = time.time_ns()
        for m in config_from_resolved(doc).markets:
            pub = board.published(m.id)
            if pub is None:
                out[m.symbol] = {"index": None, "mark": None, "funding_rate": None,
                                 "next_funding_ts": None, "stale": True}
            else:
                out[m.symbol] = {"index": m.price_str(pub.index_ticks),
                                 "mark": m.price_str(pub.mark_ticks),
                                 "funding_rate": dec_str(Decimal(pub.funding_rate_e9) / 10 ** 9),
                                 "next_funding_ts": pub.next_funding_ns,
                                 "stale": now - pub.ts_ns > stale_ns}
        return out
    finally:
        board.close()


def cmd_status(args) -> int:
    import time
    report = status_report(_state_dir(args))
    rows = [(p["name"], p["pid"], "yes" if p["alive"] else "NO", p["restarts"], p["state"],
             ",".join(map(str, p["cpus"] or [])) or "any") for p in report["processes"]]
    hb = report["heartbeats"].get("matcher")
    rings = report["rings"]
    lines = [f"exchange in {report['state_dir']} (supervisor pid {report['supervisor_pid']}, "
             f"shm {report['prefix']})",
             table(["process", "pid", "alive", "restarts", "state", "cpus"], rows), "",
             f"seq {report['seq']}   durable_seq {report['durable_seq']}"]
    journal = report["journal"]
    if journal:
        lines.append(f"DuckDB at seq {journal['store_seq']}   newest snapshot at seq "
                     f"{journal['snapshot_seq']}"
                     + (f"   JOURNAL WRITES FAILING: {os.strerror(journal['journal_errno'])}"
                        if journal["journal_errno"] else ""))
    if hb:
        lines.append(f"matcher heartbeat: {'beating' if hb['beating'] else 'STOPPED'} "
                     f"({hb['beats']} beats)")
    if rings.get("events"):
        lag = ", ".join(f"{k} {v}" for k, v in rings["events"]["consumer_lag"].items()) or "-"
        lines.append(f"event ring: {rings['events']['published']} published, lag per reader: "
                     f"{lag}")
    if rings.get("commands"):
        lines.append("command rings (queued): " + ", ".join(
            f"{k} {v}" for k, v in rings["commands"].items()))
    for symbol, r in report.get("risk", {}).items():
        if r["index"] is None:
            lines.append(f"{symbol}: no index (STALE)")
            continue
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["next_funding_ts"] // 10 ** 9))
        lines.append(f"{symbol}: index {r['index']}  mark {r['mark']}  funding rate "
                     f"{r['funding_rate']} (next at {at} UTC)" + ("  STALE" if r["stale"] else ""))
    if report["endpoints"]:
        lines.append(f"orders {report['endpoints']['orders']}   market data "
                     f"{report['endpoints']['market_data']}")
    emit(args, report, "\n".join(lines))
    return 0


# ---- durability -------------------------------------------------------------------------------
def cmd_sql(args) -> int:
    from perpx.durability import DurabilityError, sql
    try:
        result = sql(_state_dir(args), args.query)
    except DurabilityError as e:
        raise CliError(str(e)) from None
    rows = [[str(v) if v is not None else "NULL" for v in r] for r in result["rows"]]
    emit(args, {"columns": result["columns"], "rows": result["rows"]},
         table(result["columns"], rows) + f"\n({len(rows)} rows)")
    return 0


def cmd_check(args) -> int:
    from perpx.durability import check
    result = check(_state_dir(args))
    text = (f"all invariants hold at seq {result['seq']}" if result["ok"] else
            "\n".join([f"INVARIANTS VIOLATED at seq {result['seq']}:"] + result["problems"]))
    emit(args, result, text)
    return 0 if result["ok"] else 1


def cmd_verify(args) -> int:
    from perpx.durability import DurabilityError, progress_printer, verify
    from persistd.journal import journal_info
    sd = _state_dir(args)
    total = journal_info(sd.journal_dir)["last_seq"] if sd.journal_dir.exists() else 0
    show = None if args.json else progress_printer(total, sys.stderr)
    try:
        result = verify(sd, on_progress=show)
    except DurabilityError as e:
        raise CliError(f"verify failed: {e}") from None
    lines = [f"replayed the journal from {result['from']} to seq {result['seq']} in "
             f"{result['seconds']} s: state hash {result['state_hash'][:16]}…"]
    for c in result["checks"]:
        lines.append(f"  {c['at']} state at seq {c['seq']}: "
                     + ("hash matches" if c["ok"] else
                        f"MISMATCH (recorded {c['expected'][:16]}…, replayed "
                        f"{c['replayed'][:16]}…)"))
    if not result["checks"]:
        lines.append("  (no snapshot after the start and no running exchange to compare with)")
    emit(args, result, "\n".join(lines))
    return 0 if result["ok"] else 1


# ---- accounts and money -----------------------------------------------------------------------
def cmd_account_create(args) -> int:
    from perpx.config import atoms_str, load_config
    from perpx.ops import Exchange, create_account
    sd = _state_dir(args)
    atoms = _amount_atoms(args.deposit) if args.deposit is not None else None
    ex = Exchange(sd) if atoms is not None else None   # refuse before creating anything
    if ex is not None:
        max_accounts = ex.engine.max_accounts
    elif sd.exchange_file.exists():
        max_accounts = sd.engine_config().max_accounts
    else:
        max_accounts = load_config(None).engine["max_accounts"]
    account, cert = create_account(sd, max_accounts)
    result = {"account": account, "certificate": cert}
    text = f"account {account}\ncertificate {cert}"
    if ex is not None:
        reply = ex.deposit(account, atoms)
        balance = next(e for e in reply.events if "balance_atoms" in e)["balance_atoms"]
        result.update({"deposit": atoms_str(atoms), "balance": atoms_str(balance),
                       "seq": reply.seq})
        text += f"\ndeposited {atoms_str(atoms)} USDC (balance {atoms_str(balance)})"
    emit(args, result, text)
    return 0


def cmd_deposit(args) -> int:
    from perpx.config import atoms_str
    atoms = _amount_atoms(args.amount)
    ex = _exchange(args)
    reply = ex.deposit(args.account, atoms)
    balance = next(e for e in reply.events if "balance_atoms" in e)["balance_atoms"]
    emit(args, {"account": args.account, "amount": atoms_str(atoms),
                "balance": atoms_str(balance), "seq": reply.seq},
         f"deposited {atoms_str(atoms)} USDC to account {args.account}: balance "
         f"{atoms_str(balance)} (seq {reply.seq})")
    return 0


def cmd_market_state(args) -> int:
    reply = _exchange(args).set_market_state(args.market, args.state)
    emit(args, {"market": args.market, "state": args.state, "seq": reply.seq},
         f"{args.market} is {args.state} (seq {reply.seq})")
    return 0


def cmd_market_settle(args) -> int:
    from engine.records import EV_DONE
    reply = _exchange(args).settle_market(args.market, args.price)
    closed = next(e["qty_lots"] for e in reply.events if e["etype"] == EV_DONE)
    emit(args, {"market": args.market, "price": args.price, "state": "settled",
                "positions_closed": closed, "seq": reply.seq},
         f"{args.market} settled at {args.price}: {closed} positions closed (seq {reply.seq})")
    return 0


def cmd_fund_deposit(args) -> int:
    from perpx.config import atoms_str
    atoms = _amount_atoms(args.amount)
    reply = _exchange(args).fund_deposit(atoms)
    fund = next(e for e in reply.events if "fund_atoms" in e)["fund_atoms"]
    emit(args, {"amount": atoms_str(atoms), "fund": atoms_str(fund), "seq": reply.seq},
         f"deposited {atoms_str(atoms)} USDC to the insurance fund: {atoms_str(fund)} "
         f"(seq {reply.seq})")
    return 0


def cmd_account_show(args) -> int:
    from perpx.ops import account_view
    ex = _exchange(args)
    if not 0 <= args.id < ex.engine.max_accounts:
        raise CliError(f"account {args.id} is outside 0..{ex.engine.max_accounts - 1}")
    mirror, _ = ex.snapshot()
    view = account_view(ex, mirror, args.id)
    lines = [f"account {view['account']}{'' if view['registered'] else ' (not registered)'}"
             f"   seq {view['seq']}",
             f"balance {view['balance']}   equity {view['equity']}   available "
             f"{view['available']}",
             f"initial margin {view['initial_margin']}   maintenance margin "
             f"{view['maintenance_margin']}"]
    if view["positions"]:
        lines += ["", table(["market", "size", "entry", "mark", "unrealized pnl", "liq. price",
                             "mode", "leverage", "margin"],
                            [(p["market"], p["size"], p["entry_price"], p["mark_price"],
                              p["unrealized_pnl"], p["liquidation_price"] or "-", p["mode"],
                              p["leverage"], p["margin"]) for p in view["positions"]])]
    if view["open_orders"]:
        lines += ["", table(["oid", "cid", "market", "side", "kind", "price", "qty", "remaining",
                             "status"],
                            [(o["oid"], o["cid"], o["market"], o["side"], o["kind"],
                              o["price"] or "-", o["qty"], o["remaining"], o["status"])
                             for o in view["open_orders"]])]
    emit(args, view, "\n".join(lines))
    return 0


# ---- markets --------------------------------------------------------------------------------
def cmd_halt(args) -> int:
    return _halt(args, True)


def cmd_resume(args) -> int:
    return _halt(args, False)


def _halt(args, halted: bool) -> int:
    ex = _exchange(args)
    reply = ex.halt(args.market, halted)
    emit(args, {"market": args.market, "halted": halted, "seq": reply.seq},
         f"{args.market} {'halted' if halted else 'resumed'} (seq {reply.seq})")
    return 0


def cmd_oracle_set(args) -> int:
    ex = _exchange(args)
    done = ex.set_index(args.market, args.price, force=args.force)
    m = ex.market(args.market)
    index, mark = m.price_str(done["index_ticks"]), m.price_str(done["mark_ticks"])
    emit(args, {"market": args.market, "index_price": index, "mark_price": mark,
                "seq": done["seq"]},
         f"{args.market} index set to {index}: mark {mark} (seq {done['seq']})")
    return 0


def cmd_book(args) -> int:
    from perpx.ops import book_view
    ex = _exchange(args)
    ex.market(args.market)
    mirror, _ = ex.snapshot()
    view = book_view(ex, mirror, args.market, args.depth)
    rows = []
    for i in range(max(len(view["bids"]), len(view["asks"]))):
        bid = view["bids"][i] if i < len(view["bids"]) else ["", ""]
        ask = view["asks"][i] if i < len(view["asks"]) else ["", ""]
        rows.append((bid[1], bid[0], ask[0], ask[1]))
    text = f"{view['market']} book at seq {view['seq']}\n" + (
        table(["bid qty", "bid", "ask", "ask qty"], rows) if rows else "(empty)")
    emit(args, view, text)
    return 0


def cmd_positions(args) -> int:
    from perpx.ops import positions_view
    ex = _exchange(args)
    if args.market:
        ex.market(args.market)
    mirror, _ = ex.snapshot()
    view = positions_view(ex, mirror, args.market)
    rows = view["positions"]
    text = (table(["account", "market", "size", "entry", "mark", "unrealized pnl",
                   "liq. price", "mode", "leverage"],
                  [(p["account"], p["market"], p["size"], p["entry_price"], p["mark_price"],
                    p["unrealized_pnl"], p["liquidation_price"] or "-", p["mode"],
                    p["leverage"]) for p in rows])
            if rows else "no open positions")
    text += "\nopen interest: " + ", ".join(f"{k} {v}" for k, v in view["open_interest"].items())
    emit(args, view, text)
    return 0


def cmd_markets(args) -> int:
    from perpx.config import config_from_resolved, load_config
    from perpx.ops import Exchange, markets_view
    sd = _state_dir(args)
    mirror = None
    if args.config:
        cfg = load_config(args.config)
    elif sd.exchange_file.exists():
        cfg = config_from_resolved(sd.exchange())
        if sd.supervisor_pid() is not None:
            mirror, _ = Exchange(sd).snapshot()
    else:
        cfg = load_config(None)
    rows = markets_view(cfg, mirror)
    headers = ["id", "symbol", "tick", "lot", "initial", "oracle", "lev", "maker", "taker",
               "band", "max price", "max pos", "max order", "liq. fee", "funding every",
               "funding cap", "maint. brackets"]
    body = [(m["id"], m["symbol"], m["tick_size"], m["lot_size"], m["initial_price"], m["oracle"],
             m["max_leverage"], m["maker_fee"], m["taker_fee"], m["price_band"], m["max_price"],
             m["max_position_qty"], m["max_order_qty"], m["liquidation_fee"],
             f"{m['funding_interval_s']} s", m["funding_cap"],
             " ".join(f"{floor}:{rate}:{lev}x" for floor, rate, lev, _ in m["brackets"]))
            for m in rows]
    if mirror is not None:
        headers += ["mark", "state"]
        body = [b + (m["live"]["mark_price"], m["live"]["state"]) for b, m in zip(body, rows)]
    emit(args, {"source": cfg.source, "markets": rows}, table(headers, body))
    return 0


def cmd_demo(args) -> int:
    from perpx.demo import run_demo
    result = run_demo(args.state_dir, seconds=args.seconds,
                      out=sys.stderr if args.json else sys.stdout, seed=args.seed)
    if args.json:
        emit(args, result)
    return 0


# ---- registration -----------------------------------------------------------------------------
def _register_up(sub, common):
    p = sub.add_parser("up", parents=[common], help="start the exchange (foreground supervisor)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML config (default: the bundled BTC-PERP/ETH-PERP exchange)")
    p.set_defaults(func=cmd_up)


def _register_down(sub, common):
    p = sub.add_parser("down", parents=[common], help="stop the running exchange")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for a clean stop (default 30)")
    p.set_defaults(func=cmd_down)


def _register_status(sub, common):
    p = sub.add_parser("status", parents=[common],
                       help="processes, heartbeats, ring depths, sequence numbers")
    p.set_defaults(func=cmd_status)


def _register_account(sub, common):
    p = sub.add_parser("account", parents=[common], help="create or show an account")
    asub = p.add_subparsers(dest="account_command", metavar="ACTION", required=True,
                            parser_class=_Parser)
    q = asub.add_parser("create", parents=[common],
                        help="new account with a CURVE certificate, registered with the gateways")
    q.add_argument("--deposit", metavar="AMOUNT", default=None, help="USDC to deposit")
    q.set_defaults(func=cmd_account_create)
    q = asub.add_parser("show", parents=[common], help="balance, margin, positions, orders")
    q.add_argument("id", type=_account_id, metavar="ID")
    q.set_defaults(func=cmd_account_show)


def _register_deposit(sub, common):
    p = sub.add_parser("deposit", parents=[common], help="credit USDC to an account")
    p.add_argument("account", type=_account_id, metavar="ACCOUNT")
    p.add_argument("amount", metavar="AMOUNT", help="USDC, e.g. 1000 or 0.5")
    p.set_defaults(func=cmd_deposit)


def _register_market(sub, common):
    p = sub.add_parser("market", parents=[common], help="a market's state and settlement")
    msub = p.add_subparsers(dest="market_command", metavar="ACTION", required=True,
                            parser_class=_Parser)
    q = msub.add_parser("state", parents=[common],
                        help="trading | cancel_only | reduce_only | halted (journaled)")
    q.add_argument("market", metavar="MARKET")
    q.add_argument("state", metavar="STATE")
    q.set_defaults(func=cmd_market_state)
    q = msub.add_parser("settle", parents=[common],
                        help="close every position at PRICE, cancel every order: settled")
    q.add_argument("market", metavar="MARKET")
    q.add_argument("price", metavar="PRICE")
    q.set_defaults(func=cmd_market_settle)


def _register_fund(sub, common):
    p = sub.add_parser("fund", parents=[common], help="the insurance fund")
    fsub = p.add_subparsers(dest="fund_command", metavar="SUBCOMMAND", required=True,
                            parser_class=_Parser)
    q = fsub.add_parser("deposit", parents=[common],
                        help="top the insurance fund up (journaled like any command)")
    q.add_argument("amount", metavar="AMOUNT", help="USDC, e.g. 1000 or 0.5")
    q.set_defaults(func=cmd_fund_deposit)


def _register_halt(sub, common):
    p = sub.add_parser("halt", parents=[common], help="stop trading in a market")
    p.add_argument("market", metavar="MARKET")
    p.set_defaults(func=cmd_halt)
    p = sub.add_parser("resume", parents=[common], help="resume trading in a market")
    p.add_argument("market", metavar="MARKET")
    p.set_defaults(func=cmd_resume)


def _register_oracle(sub, common):
    p = sub.add_parser("oracle", parents=[common], help="index price feeds")
    osub = p.add_subparsers(dest="oracle_command", metavar="ACTION", required=True,
                            parser_class=_Parser)
    q = osub.add_parser("set", parents=[common],
                        help="set the index (and mark) of a market whose oracle is manual")
    q.add_argument("market", metavar="MARKET")
    q.add_argument("price", metavar="PRICE")
    q.add_argument("--force", action="store_true", default=False,
                   help="allow an index further than [risk] oracle_max_jump from the current")
    q.set_defaults(func=cmd_oracle_set)


def _register_book(sub, common):
    p = sub.add_parser("book", parents=[common], help="a market's order book")
    p.add_argument("market", metavar="MARKET")
    p.add_argument("--depth", type=_depth, default=10, metavar="N",
                   help="levels per side (default 10; 0 = all)")
    p.set_defaults(func=cmd_book)


def _register_positions(sub, common):
    p = sub.add_parser("positions", parents=[common], help="open positions (all accounts)")
    p.add_argument("market", metavar="MARKET", nargs="?", default=None)
    p.set_defaults(func=cmd_positions)


def _register_markets(sub, common):
    p = sub.add_parser("markets", parents=[common], help="the markets and their parameters")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="show (and validate) this config instead of the exchange's")
    p.set_defaults(func=cmd_markets)


def _register_demo(sub, common):
    p = sub.add_parser("demo", parents=[common],
                       help="demo traders (a market maker, two takers) against the exchange")
    p.add_argument("--seconds", type=float, default=None, metavar="N",
                   help="stop after N seconds (default: run until Ctrl-C)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.set_defaults(func=cmd_demo)


def _register_durability(sub, common):
    p = sub.add_parser("sql", parents=[common], help="read-only SQL on the DuckDB store")
    p.add_argument("query", metavar="SQL")
    p.set_defaults(func=cmd_sql)
    p = sub.add_parser("check", parents=[common],
                       help="check the invariants of the live state (DESIGN.md §8)")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("verify", parents=[common],
                       help="replay the journal offline and compare state hashes")
    p.set_defaults(func=cmd_verify)


# Subcommands, in help order.
REGISTRARS = [
    _register_up,
    _register_down,
    _register_status,
    _register_account,
    _register_deposit,
    _register_fund,
    _register_halt,
    _register_market,
    _register_oracle,
    _register_book,
    _register_positions,
    _register_markets,
    _register_durability,
    _register_demo,
    _register_bench,
]


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(prog="perpx", description="perpx: a perpetual-futures exchange on one box")
    parser.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                        help=f"exchange state directory (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--json", action="store_true", default=False,
                        help="print one JSON document on stdout")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    for register in REGISTRARS:
        register(sub, common)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"perpx: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("perpx: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"perpx: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
