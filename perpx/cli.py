"""The `perpx` command line (PROTOCOL.md, "Command line").

Every command takes `--state-dir DIR` (default ./perpx-state) and `--json`, before or after
the subcommand. With `--json` a command prints exactly one JSON document on stdout; progress
and diagnostics go to stderr. Exit status 0 on success; on failure one line on stderr and a
non-zero status (1 for a failed command, 2 for a usage error).

Adding a subcommand: write `cmd_<name>(args) -> int` and a `_register_<name>(subparsers,
common)` that adds its parser with `parents=[common]` and `set_defaults(func=cmd_<name>)`, then
list the register function in REGISTRARS. Only implemented subcommands are registered. Every
argument gets help text and every command examples in EXAMPLES (tests/test_newcomer.py checks
both); a command that changes the exchange is decorated with `@admin_command(name)` so that
admin_log records who ran it. `perpx` alone prints the help.
"""

import argparse
import importlib.metadata
import json
import os
import sys

from engine import numba_cache_dir
from perpx.heap import heap_line, huge_page_bytes
from perpx.statedir import PRIVATE_UMASK

DEFAULT_STATE_DIR = "./perpx-state"
# bench defaults (kept here so building the parser does not import the engine)
DEFAULT_RUNS = 5
DEFAULT_BATCH = 256


class CliError(Exception):
    """A failure to report as one line on stderr (exit status 1)."""


# Examples shown at the end of each command's --help, by command path.
EXAMPLES = {
    "": ["./scripts/run                        # exchange + demo traders, state in ./perpx-state",
         "perpx up                             # just the exchange (foreground)",
         "perpx account create --deposit 1000  # an account for your bot",
         "perpx status", "perpx top", "perpx down"],
    "up": ["perpx up", "perpx up --config my-exchange.toml --state-dir /srv/perpx",
           "perpx --json up                # one JSON line with the endpoints once up"],
    "down": ["perpx down", "perpx down --timeout 60"],
    "status": ["perpx status", "perpx status --json | jq .rings.events.consumer_lag"],
    "top": ["perpx top", "perpx top --interval 0.5", "perpx top --once    # one frame, then exit"],
    "account": ["perpx account create --deposit 1000", "perpx account show 1"],
    "account create": ["perpx account create", "perpx account create --deposit 1000",
                       "perpx --json account create --deposit 250.5"],
    "account show": ["perpx account show 1", "perpx account show 1 --json"],
    "deposit": ["perpx deposit 1 250.5"],
    "halt": ["perpx halt BTC-PERP"],
    "resume": ["perpx resume BTC-PERP"],
    "oracle": ["perpx oracle set BTC-PERP 64000"],
    "oracle set": ["perpx oracle set BTC-PERP 64000", "perpx oracle set ETH-PERP 3150.25"],
    "book": ["perpx book BTC-PERP", "perpx book ETH-PERP --depth 3"],
    "positions": ["perpx positions", "perpx positions BTC-PERP --json"],
    "markets": ["perpx markets", "perpx markets --config my-exchange.toml   # validate a config"],
    "sql": ['perpx sql "SELECT market, count(*), sum(qty) FROM fills GROUP BY market"',
            'perpx sql "SELECT * FROM admin_log ORDER BY seq DESC LIMIT 10"'],
    "check": ["perpx check"],
    "verify": ["perpx verify", "perpx --json verify"],
    "demo": ["perpx demo", "perpx demo --seconds 30 --seed 7"],
    "bench": ["perpx bench matcher", "perpx bench e2e --seconds 3"],
    "bench matcher": ["perpx bench matcher", "perpx bench matcher --commands 200000 --runs 3",
                      "perpx bench matcher --risk --json"],
    "bench lobster": ["perpx bench lobster", "perpx bench lobster --limit 100000"],
    "bench e2e": ["perpx bench e2e", "perpx bench e2e --seconds 3 --ack-mode fast"],
    "bench durability": ["perpx bench durability --orders 100000 --runs 1"],
    "bench risk": ["perpx bench risk --no-cascade", "perpx bench risk --positions 10000"],
    "bench levels": ["perpx bench levels", "perpx bench levels --levels 4096,65536 --json"],
    "bench latency": ["perpx bench latency", "perpx bench latency --plot docs/latency.png",
                      "perpx bench latency --clients 1 --rates 1000 --no-max --json",
                      "perpx bench latency --clients 1 --rates 1000 --no-max --pauses"],
    "bench box": ["perpx bench box", "perpx bench box --seconds 30 --dir STATE_DIR"],
    "account disable": ["perpx account disable 7", "perpx account disable 7 --cancel-orders"],
    "account enable": ["perpx account enable 7"],
    "fund": ["perpx fund deposit 10000"],
    "fund deposit": ["perpx fund deposit 10000", "perpx --json fund deposit 2500.5"],
    "market": ["perpx market state BTC-PERP cancel_only", "perpx market settle ETH-PERP 3150"],
    "market state": ["perpx market state BTC-PERP cancel_only",
                     "perpx market state BTC-PERP trading"],
    "market settle": ["perpx market settle ETH-PERP 3150.25"],
    "journal": ["perpx journal inspect", "perpx journal repair"],
    "journal inspect": ["perpx journal inspect", "perpx --json journal inspect"],
    "journal repair": ["perpx journal repair          # says what it would do",
                       "perpx journal repair --yes    # does it (stop the exchange first)"],
}


class _Parser(argparse.ArgumentParser):
    """perpx's parsers: one-line errors, and the examples of EXAMPLES after the help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        examples = EXAMPLES.get(self.prog.partition(" ")[2])
        if examples and not self.epilog:
            self.epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)

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
    args.result_seq = result.get("seq")       # for admin_log (see admin_command)
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
                              progress=_progress(args), plot_path=args.plot,
                              pauses=args.pauses)
    emit(args, res, bench_e2e.format_report(res))
    return 0


def cmd_bench_latency(args) -> int:
    from perpx.bench import latency as bench_latency
    res = bench_latency.bench_latency(seconds=args.seconds, rates=args.rates,
                                      clients=args.clients, ack_mode=args.ack_mode,
                                      with_max=not args.no_max, plot_path=args.plot,
                                      pauses=args.pauses, progress=_progress(args))
    emit(args, res, bench_latency.format_report(res))
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


def cmd_bench_levels(args) -> int:
    from perpx.bench import levels as bench_levels

    res = bench_levels.bench_levels(levels=args.levels, pairs=args.pairs, runs=args.runs,
                                    batch=args.batch)
    emit(args, res, bench_levels.format_report(res))
    return 0


def cmd_bench_box(args) -> int:
    from perpx.bench import box as bench_box

    res = bench_box.bench_box(seconds=args.seconds, directory=args.dir,
                              progress=_progress(args))
    emit(args, res, bench_box.format_report(res))
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


def _int_list(text: str) -> list[int]:
    values = [_positive_int(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError("an empty list")
    return values


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

    def pause_option(q, where: str):
        q.add_argument("--pauses", action="store_true",
                       help=f"beside {where}, meter the platform's own pauses (all CPUs "
                            f"stalled at once, perpx/bench/pauses.py) and count the late "
                            f"requests that waited in one")

    q = bsub.add_parser("e2e", parents=[common],
                        help="order entry end to end over loopback vs a bare pyzmq echo")
    client_options(q, "run", 2, 8)
    q.add_argument("--rate", type=_positive_float, default=20_000.0, metavar="R",
                   help="total orders/s of the paced run (default 20000)")
    q.add_argument("--ack-mode", choices=("durable", "fast", "both"), default="both",
                   help="exchange(s) to measure: fast, durable, or both in one run, each "
                        "a fresh exchange (default both; the top-level figures are fast's)")
    q.add_argument("--plot", metavar="FILE.png", default=None,
                   help="write the latency spectra (closed loop and paced) as a PNG")
    pause_option(q, "each exchange run")
    q.set_defaults(func=cmd_bench_e2e)

    q = bsub.add_parser("latency", parents=[common],
                        help="ack latency under open-loop load at fixed rates, from each "
                             "order's intended send time")
    q.add_argument("--seconds", type=_positive_float, default=3.0, metavar="S",
                   help="timed seconds per rate (default 3)")
    q.add_argument("--rates", type=_int_list, default=[100, 1000, 5000], metavar="R,R,...",
                   help="total orders/s (default 100,1000,5000; plus the sustained maximum "
                        "unless --no-max)")
    q.add_argument("--clients", type=_int_list, default=[1, 4], metavar="C,C,...",
                   help="client counts, each runs every rate (default 1,4)")
    q.add_argument("--ack-mode", choices=("durable", "fast", "both"), default="both",
                   help="exchange(s) to measure, a fresh one each (default both)")
    q.add_argument("--no-max", action="store_true",
                   help="skip the closed-loop run and the rate at the sustained maximum")
    q.add_argument("--plot", metavar="FILE.png", default=None,
                   help="write the percentile spectra (one panel per ack mode and client "
                        "count) as a PNG")
    pause_option(q, "each rate")
    q.set_defaults(func=cmd_bench_latency)

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

    q = bsub.add_parser("levels", parents=[common],
                        help="the compiled matcher's cost per command on a deep book side: a "
                             "new level (and its cancel) next to the best vs below all others")
    q.add_argument("--levels", type=_int_list, default=[4096, 16384, 65536], metavar="L,L,...",
                   help="levels resting on the side (default 4096,16384,65536)")
    q.add_argument("--pairs", type=_positive_int, default=20_000, metavar="N",
                   help="place+cancel pairs per timed run (default 20000)")
    q.add_argument("--runs", type=_positive_int, default=3, metavar="R",
                   help="timed runs, the median is reported (default 3)")
    q.add_argument("--batch", type=_positive_int, default=DEFAULT_BATCH,
                   help=f"commands per Matcher.process call (default {DEFAULT_BATCH})")
    q.set_defaults(func=cmd_bench_levels)

    q = bsub.add_parser("box", parents=[common],
                        help="what the platform itself costs, no exchange running: pauses of "
                             "every CPU at once (idle, then beside busy loops) and the "
                             "journal's small fdatasync (alone, then beside a writer)")
    q.add_argument("--seconds", type=_positive_float, default=10.0, metavar="S",
                   help="seconds per measurement, four of them (default 10)")
    q.add_argument("--dir", default=None, metavar="DIR",
                   help="a directory on the disk to measure, e.g. the state directory's "
                        "(default: the system's temporary directory)")
    q.set_defaults(func=cmd_bench_box)


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
    from engine.units import usdc_to_atoms
    try:
        return usdc_to_atoms(text)
    except ValueError as e:
        raise CliError(str(e)) from None


def admin_command(name: str):
    """Decorate an operator command that changes the exchange: whatever its outcome, a row
    goes to DuckDB's admin_log (who, when, the command line, its seq, ok or the error). A row
    that cannot be written (persistd restarting) is a warning on stderr, not a failure."""
    def wrap(cmd):
        def run(args) -> int:
            outcome = "ok"
            try:
                return cmd(args)
            except BaseException as e:
                outcome = f"error: {e}" if str(e) else f"error: {type(e).__name__}"
                raise
            finally:
                _record_admin(args, name, outcome)
        run.__name__, run.__doc__ = cmd.__name__, cmd.__doc__
        return run
    return wrap


def _record_admin(args, name: str, outcome: str) -> None:
    from perpx.durability import DurabilityError, record_admin
    from perpx.statedir import NotRunning
    try:
        record_admin(_state_dir(args), name, " ".join(getattr(args, "argv", [])),
                     getattr(args, "result_seq", None), outcome)
    except NotRunning:
        pass                      # nothing changed, and there is no store to write to
    except (DurabilityError, OSError) as e:
        print(f"perpx: warning: not recorded in admin_log: {e}", file=sys.stderr)


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


def status_report(sd) -> dict:
    """The `perpx status` document (also used by tests)."""
    from perpx.launch import pid_alive, wait_until
    supervisor = sd.require_running()
    st = sd.status() or {"processes": [], "endpoints": None}
    procs = [{"name": p["name"], "pid": p["pid"], "alive": pid_alive(p["pid"]),
              "restarts": p["restarts"], "state": p.get("state"), "cpus": p.get("cpus"),
              "started_at": p.get("started_at"),
              "huge_page_bytes": huge_page_bytes(p["pid"])} for p in st["processes"]]
    report = {"running": True, "supervisor_pid": supervisor, "state_dir": str(sd.path),
              "prefix": sd.prefix, "processes": procs, "seq": None,
              "durable_seq": None, "journal": None, "heartbeats": {}, "rings": {},
              "endpoints": st.get("endpoints"), "cpu_latency": st.get("cpu_latency"),
              "heap": st.get("heap")}
    try:
        doc = sd.exchange()
    except RuntimeError:
        return report
    from engine.records import COMMAND_DTYPE, EVENT_DTYPE
    from engine.shared_state import attach_state
    from shm import names
    from engine.state import C_SEQ
    from shm.heartbeat import MATCHER_SLOT, HeartbeatBoard
    from shm.region import ShmError
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
    report["gateways"] = _gateway_report(sd)
    return report


def _gateway_report(sd) -> dict:
    """Each gateway's counts and limits from its stats file (written once a second).

    `stale`: the file is a dead or stuck gateway's (`stale_reason` says which), so its counts
    are not current; a restarted gateway replaces it about a second after it serves."""
    from perpx.gateway_stats import read_gateway_stats
    return {name: {**g.stats, "stale": g.stale is not None, "stale_reason": g.stale}
            for name, g in read_gateway_stats(sd.run_dir).items()}


def _risk_report(doc: dict) -> dict:
    """riskd's latest numbers per market from the IndexBoard (wire decimals), {} if none.

    `stale`: riskd has published nothing for the market for three of its ticks (at least 2 s)
    or ever: its index feed fails (riskd logs why) or has no price yet."""
    import time
    from decimal import Decimal

    from engine.spec import ExchangeSpec
    from engine.units import dec_str
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
        for m in ExchangeSpec.from_dict(doc).markets:
            pub = board.published(m.id)
            if pub is None:
                out[m.symbol] = {"index": None, "mark": None, "funding_rate": None,
                                 "next_funding_ts": None, "stale": True}
            else:
                out[m.symbol] = {"index": m.ticks_to_str(pub.index_ticks),
                                 "mark": m.ticks_to_str(pub.mark_ticks),
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
    idle = report["cpu_latency"]
    if idle is not None:
        limit = idle["limit_us"]
        if idle["held"]:
            how = "poll" if limit == 0 else f"no idle state declared slower than {limit} µs"
            lines.append(f"idle CPUs: {how} (exchange.cpu_latency_us = {limit}, held)")
        else:
            lines.append(f"idle CPUs: as the host sets them (exchange.cpu_latency_us = {limit}"
                         + (f": {idle['refused']})" if idle["refused"] else ")"))
    if report["heap"] is not None:
        lines.append(heap_line(report["heap"], report["processes"]))
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
    for name, g in report.get("gateways", {}).items():
        if g["stale"]:
            lines.append(f"{name}: STALE stats file ({g['stale_reason']}): counts not shown")
            continue
        lim = g["limits"]
        lines.append(f"{name}: {g['connections']} connections (max {lim['max_connections']}), "
                     f"{g['sessions']} sessions (max {lim['max_connections_per_account']} per "
                     f"account, {g['refused_sessions']} refused), {g['dropped_sessions']} "
                     f"dropped for not reading (queue max {lim['max_queued_messages']} "
                     f"messages, {lim['max_queued_bytes'] / 2 ** 20:.1f} MB)")
        mem = {k: f"{v / 2 ** 20:.1f}" for k, v in g["memory"].items()}
        lines.append(f"{name}: rss {g['rss_bytes'] / 2 ** 20:.1f} MB (limit "
                     f"{mem['limit_bytes']} MB, base {mem['base_bytes']} MB); held for clients "
                     f"{mem['accounted_bytes']} MB: queued {mem['queued_bytes']}, durable hold "
                     f"{mem['held_bytes']}, replay {mem['replay_bytes']}, views "
                     f"{mem['views_bytes']}")
    if report["endpoints"]:
        lines.append(f"orders {report['endpoints']['orders']}   market data "
                     f"{report['endpoints']['market_data']}   metrics "
                     f"{report['endpoints'].get('metrics', '-')} (perpx top)")
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
    from perpx.durability import DurabilityError, verify
    from perpx.progress import Bar, ensure_matcher_compiled
    sd = _state_dir(args)
    out = None if args.json else sys.stderr
    bar = None

    def on_total(total: int) -> None:
        nonlocal bar
        if out is not None:
            bar = Bar("verify: replaying the journal", total, out)

    if out is not None:
        ensure_matcher_compiled(out)
    try:
        result = verify(sd, on_progress=lambda seq: bar and bar.update(seq), on_total=on_total)
    except DurabilityError as e:
        raise CliError(f"verify failed: {e}") from None
    finally:
        if bar is not None:
            bar.stop()
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


def cmd_journal_inspect(args) -> int:
    from persistd.journal import inspect_journal
    sd = _state_dir(args)
    if not sd.journal_dir.exists():
        raise CliError(f"no journal in {sd.path}")
    info = inspect_journal(sd.journal_dir)
    store_seq = _store_last_seq(sd)
    info["store_seq"] = store_seq
    lines = [f"{row['path']}: seqs {row['first_seq']}..{row['last_seq']}, {row['bytes']} bytes"
             for row in info["segments"]]
    lines.append(f"journal ends at seq {info['last_seq']}; synced-seq marker {info['synced_seq']}"
                 + (f"; DuckDB at seq {store_seq}" if store_seq is not None else ""))
    p = info["problem"]
    if p is None:
        lines.append("no damage found")
    else:
        lines.append(f"{'DAMAGE TO ACKNOWLEDGED HISTORY' if p['acknowledged'] else 'torn tail'}"
                     f": {p['segment']} at byte {p['offset']}, seq {p['seq']}: {p['reason']}")
        lines.append("`perpx journal repair --yes` cuts the journal there"
                     + (f" and deletes DuckDB rows past seq {p['seq'] - 1}"
                        if store_seq is not None and store_seq >= p["seq"] else ""))
    store_ahead = store_seq is not None and p is None and store_seq > info["last_seq"]
    if store_ahead:
        lines.append(f"DuckDB holds rows past the journal's end (seq {store_seq}): "
                     f"`perpx journal repair --yes` deletes them")
    emit(args, info, "\n".join(lines))
    return 0 if p is None and not store_ahead else 1


def _store_last_seq(sd):
    """meta.last_seq of the DuckDB store (None: no store file). Opens it, so not while the
    exchange runs (persistd's store process holds it)."""
    from persistd.store import Store
    if not sd.store_file.exists():
        return None
    store = Store(sd.store_file, [], config={"threads": 1})   # the schema is there already
    try:
        return store.last_seq
    finally:
        store.close()


def cmd_journal_repair(args) -> int:
    from persistd.journal import cut_journal, inspect_journal
    from persistd.store import Store
    sd = _state_dir(args)
    if sd.supervisor_pid() is not None:
        raise CliError(f"the exchange in {sd.path} is running: `perpx down` first")
    if not sd.journal_dir.exists():
        raise CliError(f"no journal in {sd.path}")
    info = inspect_journal(sd.journal_dir)
    p = info["problem"]
    end = p["seq"] - 1 if p else info["last_seq"]
    store_seq = _store_last_seq(sd)
    store_ahead = store_seq is not None and store_seq > end
    if p is None and not store_ahead:
        emit(args, {"repaired": False, "last_seq": end}, "nothing to repair")
        return 0
    what = ([f"cut the journal at {p['segment']} byte {p['offset']} (seq {p['seq']} on, "
             f"{'ACKNOWLEDGED' if p['acknowledged'] else 'never acknowledged'})"] if p else []) \
        + ([f"delete DuckDB rows past seq {end} (it holds up to {store_seq})"]
           if store_ahead else [])
    if not args.yes:
        raise CliError("would " + " and ".join(what) + "; run again with --yes to do it")
    out = cut_journal(sd.journal_dir) if p else {"last_seq": end, "cut_bytes": 0, "deleted": []}
    deleted_rows = 0
    if store_ahead:
        store = Store(sd.store_file, [], config={"threads": 1})
        try:
            deleted_rows = store.forget_after(end)
        finally:
            store.close()
    from persistd import snapshot
    dropped = []
    for seq, path in snapshot.snapshots(sd.snapshots_dir):
        if seq > end:
            path.unlink()
            dropped.append(path.name)
    result = {"repaired": True, "last_seq": end, "cut_bytes": out["cut_bytes"],
              "deleted_segments": out["deleted"], "deleted_store_rows": deleted_rows,
              "deleted_snapshots": dropped}
    emit(args, result, f"repaired: the journal ends at seq {end} ({out['cut_bytes']} bytes cut, "
                       f"{len(out['deleted'])} later segments deleted); {deleted_rows} DuckDB "
                       f"rows and {len(dropped)} snapshots past it deleted")
    return 0


# ---- accounts and money -----------------------------------------------------------------------
@admin_command("account create")
def cmd_account_create(args) -> int:
    from perpx.config import load_config
    from engine.units import atoms_str
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
    connect = f"Client.connect({str(sd.endpoints_file)!r}, {cert!r})"
    result = {"account": account, "certificate": cert, "endpoints": str(sd.endpoints_file),
              "connect": connect}
    text = f"account {account}\ncertificate {cert}  (secret: keep it to yourself)"
    if ex is not None:
        reply = ex.deposit(account, atoms)
        balance = next(e for e in reply.events if "balance_atoms" in e)["balance_atoms"]
        result.update({"deposit": atoms_str(atoms), "balance": atoms_str(balance),
                       "seq": reply.seq})
        text += f"\ndeposited {atoms_str(atoms)} USDC (balance {atoms_str(balance)})"
    text += ("\nconnect a bot (docs/client.md):\n    from perpx.client import Client\n"
             f"    c = {connect}")
    emit(args, result, text)
    return 0


@admin_command("deposit")
def cmd_deposit(args) -> int:
    from engine.units import atoms_str
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
    from engine.units import atoms_str
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


def cmd_account_disable(args) -> int:
    return _account_state(args, True)


def cmd_account_enable(args) -> int:
    return _account_state(args, False)


def _account_state(args, disabled: bool) -> int:
    ex = _exchange(args)
    cancel = getattr(args, "cancel_orders", False)
    reply, canceled = ex.set_account_state(args.id, disabled, cancel)
    result = {"account": args.id, "disabled": disabled, "seq": reply.seq}
    text = f"account {args.id} {'disabled' if disabled else 'enabled'} (seq {reply.seq})"
    if canceled is not None:
        result["canceled"] = canceled.last.get("qty_lots", 0)
        text += f"; {result['canceled']} open orders canceled"
    emit(args, result, text)
    return 0


# ---- markets --------------------------------------------------------------------------------
@admin_command("halt")
def cmd_halt(args) -> int:
    return _halt(args, True)


@admin_command("resume")
def cmd_resume(args) -> int:
    return _halt(args, False)


def _halt(args, halted: bool) -> int:
    ex = _exchange(args)
    reply = ex.halt(args.market, halted)
    emit(args, {"market": args.market, "halted": halted, "seq": reply.seq},
         f"{args.market} {'halted' if halted else 'resumed'} (seq {reply.seq})")
    return 0


@admin_command("oracle set")
def cmd_oracle_set(args) -> int:
    ex = _exchange(args)
    done = ex.set_index(args.market, args.price, force=args.force)
    m = ex.market(args.market)
    index, mark = m.ticks_to_str(done["index_ticks"]), m.ticks_to_str(done["mark_ticks"])
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


def cmd_top(args) -> int:
    from rich.console import Console

    from perpx.top import run_top, scrape
    sd = _state_dir(args)
    sd.require_running()
    url = (sd.status() or {}).get("endpoints", {}) or {}
    url = url.get("metrics")
    if not url:
        raise CliError(f"no metrics endpoint in {sd.status_file} (is the exchange still "
                       f"starting?)")
    if args.json:
        emit(args, scrape(url))
        return 0
    try:
        run_top(url, Console(), interval_s=args.interval, once=args.once,
                title=f"perpx top  {sd.path}")
    except OSError as e:
        raise CliError(f"cannot read {url}: {e}") from None
    except KeyboardInterrupt:
        pass                      # Ctrl-C is how one leaves top
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
    q.add_argument("--deposit", metavar="AMOUNT", default=None,
                   help="USDC to deposit into it, e.g. 1000 or 250.5 (needs a running exchange)")
    q.set_defaults(func=cmd_account_create)
    q = asub.add_parser("show", parents=[common], help="balance, margin, positions, orders")
    q.add_argument("id", type=_account_id, metavar="ID", help="the account id, e.g. 1")
    q.set_defaults(func=cmd_account_show)
    q = asub.add_parser("disable", parents=[common],
                        help="refuse the account's keys, close its sessions, stop its trading")
    q.add_argument("id", type=_account_id, metavar="ID", help="the account id, e.g. 7")
    q.add_argument("--cancel-orders", action="store_true", help="also cancel its open orders")
    q.set_defaults(func=cmd_account_disable)
    q = asub.add_parser("enable", parents=[common], help="undo `account disable`")
    q.add_argument("id", type=_account_id, metavar="ID", help="the account id, e.g. 7")
    q.set_defaults(func=cmd_account_enable)


def _register_deposit(sub, common):
    p = sub.add_parser("deposit", parents=[common], help="credit USDC to an account")
    p.add_argument("account", type=_account_id, metavar="ACCOUNT",
                   help="the account id (from `perpx account create`)")
    p.add_argument("amount", metavar="AMOUNT", help="USDC, e.g. 1000 or 0.5")
    p.set_defaults(func=cmd_deposit)


def _register_market(sub, common):
    p = sub.add_parser("market", parents=[common], help="a market's state and settlement")
    msub = p.add_subparsers(dest="market_command", metavar="ACTION", required=True,
                            parser_class=_Parser)
    q = msub.add_parser("state", parents=[common],
                        help="trading | cancel_only | reduce_only | halted (journaled)")
    q.add_argument("market", metavar="MARKET", help="market symbol, e.g. BTC-PERP")
    q.add_argument("state", metavar="STATE",
                   help="trading, cancel_only, reduce_only or halted")
    q.set_defaults(func=cmd_market_state)
    q = msub.add_parser("settle", parents=[common],
                        help="close every position at PRICE, cancel every order: settled")
    q.add_argument("market", metavar="MARKET", help="market symbol, e.g. BTC-PERP")
    q.add_argument("price", metavar="PRICE",
                   help="the settlement price on the tick grid, e.g. 64000.5")
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
    p.add_argument("market", metavar="MARKET", help="market symbol, e.g. BTC-PERP")
    p.set_defaults(func=cmd_halt)
    p = sub.add_parser("resume", parents=[common], help="resume trading in a market")
    p.add_argument("market", metavar="MARKET", help="market symbol, e.g. BTC-PERP")
    p.set_defaults(func=cmd_resume)


def _register_oracle(sub, common):
    p = sub.add_parser("oracle", parents=[common], help="index price feeds")
    osub = p.add_subparsers(dest="oracle_command", metavar="ACTION", required=True,
                            parser_class=_Parser)
    q = osub.add_parser("set", parents=[common],
                        help="set the index (and mark) of a market whose oracle is manual")
    q.add_argument("market", metavar="MARKET", help="market symbol, e.g. BTC-PERP")
    q.add_argument("price", metavar="PRICE",
                   help="the index price, a decimal on the market's tick grid, e.g. 64000.5")
    q.add_argument("--force", action="store_true", default=False,
                   help="allow an index further than [risk] oracle_max_jump from the current")
    q.set_defaults(func=cmd_oracle_set)


def _register_book(sub, common):
    p = sub.add_parser("book", parents=[common], help="a market's order book")
    p.add_argument("market", metavar="MARKET", help="market symbol, e.g. BTC-PERP")
    p.add_argument("--depth", type=_depth, default=10, metavar="N",
                   help="levels per side (default 10; 0 = all)")
    p.set_defaults(func=cmd_book)


def _register_positions(sub, common):
    p = sub.add_parser("positions", parents=[common], help="open positions (all accounts)")
    p.add_argument("market", metavar="MARKET", nargs="?", default=None,
                   help="only this market (default: all)")
    p.set_defaults(func=cmd_positions)


def _register_markets(sub, common):
    p = sub.add_parser("markets", parents=[common], help="the markets and their parameters")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="show (and validate) this config instead of the exchange's")
    p.set_defaults(func=cmd_markets)


def _register_top(sub, common):
    p = sub.add_parser("top", parents=[common],
                       help="live dashboard: throughput, ack latency, markets, lags, rejects")
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                   help="seconds between redraws (default 1)")
    p.add_argument("--once", action="store_true",
                   help="print one frame and exit (with --json: the scrape as JSON)")
    p.set_defaults(func=cmd_top)


def _register_demo(sub, common):
    p = sub.add_parser("demo", parents=[common],
                       help="demo traders (a market maker, two takers) against the exchange")
    p.add_argument("--seconds", type=float, default=None, metavar="N",
                   help="stop after N seconds (default: run until Ctrl-C)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.set_defaults(func=cmd_demo)


def _register_durability(sub, common):
    p = sub.add_parser("sql", parents=[common], help="read-only SQL on the DuckDB store")
    p.add_argument("query", metavar="SQL", help="one read-only statement (SELECT, ...)")
    p.set_defaults(func=cmd_sql)
    p = sub.add_parser("check", parents=[common],
                       help="check the invariants of the live state (DESIGN.md §8)")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("verify", parents=[common],
                       help="replay the journal offline and compare state hashes")
    p.set_defaults(func=cmd_verify)


def _register_journal(sub, common):
    p = sub.add_parser("journal", parents=[common],
                       help="inspect or repair a damaged journal (exchange stopped)")
    jsub = p.add_subparsers(dest="journal_command", metavar="ACTION", required=True,
                            parser_class=_Parser)
    q = jsub.add_parser("inspect", parents=[common],
                        help="scan every segment: seq ranges, the synced-seq marker, the first "
                             "damage (exit 1 if any)")
    q.set_defaults(func=cmd_journal_inspect)
    q = jsub.add_parser("repair", parents=[common],
                        help="cut the journal at its first damage and drop DuckDB rows and "
                             "snapshots past the new end")
    q.add_argument("--yes", action="store_true",
                   help="do it (without: say what would be cut, exit 1)")
    q.set_defaults(func=cmd_journal_repair)


# Subcommands, in help order.
REGISTRARS = [
    _register_up,
    _register_down,
    _register_status,
    _register_top,
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
    _register_journal,
    _register_demo,
    _register_bench,
]


def version() -> str:
    try:
        return importlib.metadata.version("perpx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


class _VersionAction(argparse.Action):
    """--version: the version, and where the compiled matcher is cached (engine package)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"perpx {version()}\nnumba cache (the compiled matcher): {numba_cache_dir()}")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(prog="perpx", description="perpx: a perpetual-futures exchange on one box. "
                                               "`perpx COMMAND --help` explains each command.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version (and the matcher's cache dir) and exit")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    args.argv = ["perpx", *argv]
    os.umask(PRIVATE_UMASK)       # what perpx creates (keys, state, logs) is this user's alone
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
    except Exception as e:    # every failure is one line, never a traceback
        print(f"perpx: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
