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
    from perpx import bench

    res = bench.bench_matcher(commands=args.commands, runs=args.runs, batch=args.batch,
                              seed=args.seed, reference_commands=args.reference_commands,
                              verify_commands=args.verify_commands,
                              progress=_progress(args))
    emit(args, res, bench.format_report(res))
    return _events_status(res)


def cmd_bench_lobster(args) -> int:
    from perpx import bench

    try:
        res = bench.bench_lobster(data=args.data, limit=args.limit, runs=args.runs,
                                  batch=args.batch, reference_commands=args.reference_commands,
                                  verify_commands=args.verify_commands,
                                  progress=_progress(args))
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    emit(args, res, bench.format_report(res))
    return _events_status(res)


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


# Subcommands, in help order. Others (up, down, status, account, deposit, ...) add theirs here.
REGISTRARS = [
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
