"""What a newcomer and an operator meet first, with real processes: `./scripts/run` when port
7700 is taken and when it already runs, the numba cache the console script finds, `perpx
--version` and a bare `perpx`, the state dir's file modes, the Prometheus endpoint under load
and `perpx top`. (The client library's set-up errors are in tests/test_client.py.)"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine
from engine.records import CMD_HALT, EVENT_DTYPE, new_commands
from perpx.cli import build_parser
from perpx.client import Client
from perpx.demo import run_demo
from perpx.launch import REPO, STARTUP_S, child_env
from perpx.metrics import METRICS, WRITE_AHEAD_FRACTION, _tail_events
from perpx.ops import Exchange, create_account
from perpx.progress import ensure_matcher_compiled
from perpx.statedir import StateDir
from perpx.top import scrape
from shm.ring import EventRing
from tests.shm_workers import shm_prefix  # noqa: F401  (fixture)
from tests.test_gateway_stats import exited_pid, write_stats
from tests.test_supervisor import cli, cli_json, config_text, wait_until

WAIT_S = 20.0
CONSOLE_SCRIPT = Path(sys.executable).parent / "perpx"


# ---- ./scripts/run -----------------------------------------------------------------------------
def _hold_port(port: int):
    """A socket listening on 127.0.0.1:port, or None if something else holds it already."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        return s
    except OSError as e:
        s.close()
        assert e.errno == errno.EADDRINUSE
        return None


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_scripts_run_with_port_7700_taken_comes_up_refuses_twins_and_stops_with_down(tmp_path):
    held = _hold_port(7700)
    state = tmp_path / "state"
    env = {**child_env(), "PERPX_STATE_DIR": str(state)}
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    with open(out, "w") as o, open(err, "w") as e:
        run = subprocess.Popen([str(REPO / "scripts" / "run")], stdout=o, stderr=e, env=env,
                               cwd=str(REPO), start_new_session=True)
    sd = StateDir(state)
    try:
        wait_until(lambda: "demo: maker account" in _read(out) or run.poll() is not None,
                   STARTUP_S, "./scripts/run to start the demo")
        assert run.poll() is None, f"scripts/run exited:\n{_read(out)}\n{_read(err)}"
        endpoints = json.loads(sd.endpoints_file.read_text())
        assert not endpoints["orders"].endswith(":7700")
        assert "port 7700 (endpoints.orders_port)" in _read(err), _read(err)
        # a second run in the same state dir refuses, and leaves the first alone
        twin = subprocess.run([str(REPO / "scripts" / "run")], capture_output=True, text=True,
                              env=env, cwd=str(REPO), timeout=60)
        assert twin.returncode == 1 and "already running" in twin.stderr, twin.stderr
        assert "Demo traders start now" not in twin.stdout
        assert run.poll() is None and sd.supervisor_pid() is not None
        # `perpx down` stops the exchange, and the demo and the script with it
        assert cli(state, "down").returncode == 0
        run.wait(timeout=30)
        assert "perpx: stopped." in _read(out)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(timeout=10)
        if held is not None:
            held.close()
        left = sd.shm_leftovers()
        sd.remove_shm_leftovers()
    assert not left, f"left in /dev/shm: {left}"


# ---- the numba cache ---------------------------------------------------------------------------
def test_the_console_script_loads_the_matcher_the_tests_compiled(tmp_path):
    """The cache dir comes from the engine package, not from the scripts: the `perpx` console
    script (any venv of this checkout, any cwd, no NUMBA_CACHE_DIR) resolves the same dir as
    the tests, and loading the matcher from there is a cache hit, not a compile."""
    ensure_matcher_compiled()                   # what the tests use, compiled (once) here
    import numba.core.config
    ours = Path(numba.core.config.CACHE_DIR)
    if engine.numba_cache_dir() != REPO / ".numba-cache" or ours != REPO / ".numba-cache":
        pytest.skip(f"NUMBA_CACHE_DIR is set from outside to {ours}")
    env = {k: v for k, v in child_env().items() if k != "NUMBA_CACHE_DIR"}
    version = subprocess.run([str(CONSOLE_SCRIPT), "--version"], capture_output=True,
                             text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines()[1].endswith(f": {ours}")
    probe = ("import numpy as np\n"
             "from engine import core\n"
             "from engine.config import EngineConfig\n"
             "from engine.matcher import Matcher, event_sink, matcher_is_cached\n"
             "from engine.records import COMMAND_DTYPE, EVENT_DTYPE\n"
             "cached = matcher_is_cached()\n"
             "Matcher(EngineConfig()).process(np.zeros(0, COMMAND_DTYPE),\n"
             "                                event_sink(np.zeros(16, EVENT_DTYPE)), 0, 16)\n"
             "s = core.run_batch.stats\n"
             "print(cached, sum(s.cache_hits.values()), sum(s.cache_misses.values()))\n")
    # the console script's interpreter, from elsewhere, without the variable
    loaded = subprocess.run([str(CONSOLE_SCRIPT.parent / "python"), "-c", probe],
                            capture_output=True, text=True, env=env, cwd=str(tmp_path),
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["True", "1", "0"], loaded.stdout    # one hit, no miss


# ---- the command line --------------------------------------------------------------------------
def test_version_and_bare_perpx(tmp_path):
    r = subprocess.run([str(CONSOLE_SCRIPT), "--version"], capture_output=True, text=True,
                       env=child_env(), cwd=str(tmp_path), timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("perpx 0.1.0\n"), r
    bare = subprocess.run([str(CONSOLE_SCRIPT)], capture_output=True, text=True,
                          env=child_env(), cwd=str(tmp_path), timeout=60)
    assert bare.returncode == 0 and bare.stderr == ""
    for part in ("usage: perpx", "COMMAND", "account", "top", "examples:", "./scripts/run"):
        assert part in bare.stdout


def test_every_argument_has_help_and_every_command_examples():
    missing = []

    def walk(parser, path):
        if not parser.epilog or "examples:" not in parser.epilog:
            missing.append(f"{path or 'perpx'}: no examples")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}".strip())
            elif not action.help:
                missing.append(f"{path} {action.dest}: no help")
    walk(build_parser(), "")
    assert not missing, missing


# ---- file modes --------------------------------------------------------------------------------
def _modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = stat.S_IMODE(st.st_mode)
    return out


def test_state_dir_is_private_whatever_the_umask(ups, tmp_path):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "old.log").write_text("from a run before the rule\n")
    os.chmod(state / "logs" / "old.log", 0o644)
    os.chmod(state, 0o755)
    old_umask = os.umask(0o022)                 # the children inherit a permissive umask
    try:
        up = ups("state", config_text())
        up.wait_ready()
        cli_json(state, "account", "create", "--deposit", "100")
    finally:
        os.umask(old_umask)
    modes = _modes(state)
    assert {"journal", "perpx.duckdb", "logs/matcher.log", "logs/old.log", "keys",
            "clients", "endpoints.json"} <= set(modes)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    # (a unix socket, run/sql.ipc, is made 0777 & ~umask: 0700, as private as 0600)
    wrong = {p: oct(m) for p, m in modes.items()
             if (m & 0o077 if (state / p).is_socket()
                 else m != (0o700 if (state / p).is_dir() else 0o600))}
    assert not wrong, wrong
    # started again, the matcher replays that journal: a bar that ends at exactly N/N (100%)
    seq = cli_json(state, "status")["seq"]
    assert cli(state, "down").returncode == 0
    again = ups("state", config_text())
    again.wait_ready()
    assert f"matcher: replaying the journal: {seq}/{seq} seq (100%)" in again.stderr, \
        again.stderr


def test_up_refuses_a_state_dir_others_can_write(tmp_path):
    state = tmp_path / "shared"
    state.mkdir()
    os.chmod(state, 0o777)
    r = cli(state, "up", timeout=60)
    assert r.returncode == 1
    assert "writable by group or others (mode 0777)" in r.stderr and "chmod 700" in r.stderr
    assert not (state / "exchange.json").exists()


# ---- metrics and perpx top ---------------------------------------------------------------------
def _values(scraped: dict, name: str) -> dict:
    return {tuple(sorted(labels.items())): v for labels, v in scraped.get(name, [])}


def _total(scraped: dict, name: str) -> float:
    return sum(_values(scraped, name).values())


METRICS_CONFIG = config_text(btc_oracle="sim", extra="[persistence]\nsnapshot_every = 300\n")


def test_metrics_under_load_and_perpx_top(ups):
    up = ups("state", METRICS_CONFIG)
    endpoints = up.wait_ready()
    url = endpoints["metrics"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    assert cli_json(up.sd.path, "status")["endpoints"]["metrics"] == url
    before = scrape(url)
    for name in METRICS:
        want = name + "_count" if name == "perpx_ack_latency_seconds" else name
        assert want in before, f"{want} missing from the first scrape"

    # load: the demo traders (twice: the second run reuses the first run's accounts)
    first = run_demo(up.sd.path, seconds=4, out=open(os.devnull, "w"), seed=1)
    assert first["orders"] > 50 and first["trades"] > 0 and not first["errors"]
    again = run_demo(up.sd.path, seconds=0.5, out=open(os.devnull, "w"), seed=2)
    assert again["accounts"] == first["accounts"]

    # a liquidation: A long 1 ETH at 20x on 200 USDC, then the index drops 17%
    ex = Exchange(up.sd)
    certs = {}
    for name, usdc in (("a", 200), ("b", 1_000_000)):
        account, certs[name] = create_account(up.sd, ex.engine.max_accounts)
        ex.deposit(account, usdc * 10 ** 6)
    with Client.connect(endpoints, certs["a"]) as a, Client.connect(endpoints, certs["b"]) as b:
        assert b.new_order("ETH-PERP", "sell", "limit", "1", "3500")["status"] == "open"
        assert a.new_order("ETH-PERP", "buy", "limit", "1", "3500")["status"] == "filled"
        assert b.new_order("ETH-PERP", "buy", "limit", "2", "3200")["status"] == "open"
        # a reject by the matcher: a withdrawal beyond the balance
        assert b.withdraw("2000000")["type"] == "reject"
    ex.set_index("ETH-PERP", "2900")      # mark: median(index, last trade 3500, ...) ~3200
    # an admin command the matcher refuses (no market 7) also counts as a reject
    halt = new_commands(1)
    halt["cmd"], halt["market"] = CMD_HALT, 7
    assert ex.submit(halt)[0].rejected

    # a process restart
    gateway = next(p for p in cli_json(up.sd.path, "status")["processes"]
                   if p["name"] == "gateway-0")
    os.kill(gateway["pid"], signal.SIGKILL)
    wait_until(lambda: next(p for p in cli_json(up.sd.path, "status")["processes"]
                            if p["name"] == "gateway-0")["state"] == "ready", WAIT_S,
               "gateway-0 to serve again")

    # a refusal by the gateway itself (after the restart: a gateway counts afresh)
    with Client.connect(endpoints, certs["b"]) as b:
        assert b.request({"type": "no_such_type"})["reason"] == "invalid_message"

    for name, what in (("perpx_liquidations_total", "a liquidation"),
                       ("perpx_process_restarts_total", "the restart"),
                       ("perpx_snapshot_age_seconds", "a snapshot")):
        wait_until(lambda: _total(scrape(url), name) > 0, WAIT_S, f"{what} in the metrics")
    # the killed gateway's last stats file is stale (not exported) until the new one writes
    # its own (once a second): wait for this refusal by name, not for any
    refused = (("gateway", "gateway-0"), ("reason", "invalid_message"))
    wait_until(lambda: _values(scrape(url), "perpx_gateway_refusals_total").get(refused, 0) >= 1,
               WAIT_S, "the gateway's refusal in the metrics")
    # a stats file a dead gateway left (one this exchange does not run, naming a pid that has
    # exited): down, and none of its counts exported
    write_stats(up.sd.run_dir, "gateway-9", {**json.loads(
        (up.sd.run_dir / "gateway-0.stats.json").read_text()), "pid": exited_pid()})
    wait_until(lambda: (("gateway", "gateway-9"),) in _values(scrape(url), "perpx_gateway_up"),
               WAIT_S, "the dead gateway in the metrics")
    after = scrape(url)
    assert _values(after, "perpx_gateway_up") == {(("gateway", "gateway-0"),): 1,
                                                  (("gateway", "gateway-9"),): 0}
    assert not any(dict(k)["gateway"] == "gateway-9"
                   for name in ("perpx_gateway_refusals_total", "perpx_gateway_memory_bytes")
                   for k in _values(after, name))

    for name in METRICS:
        want = name + "_count" if name == "perpx_ack_latency_seconds" else name
        assert want in after, f"{want} missing under load"
    moved = {
        "perpx_seq": _total(after, "perpx_seq") > _total(before, "perpx_seq"),
        "perpx_commands_total": (_total(after, "perpx_commands_total")
                                 > _total(before, "perpx_commands_total") + 50),
        "perpx_ack_latency_seconds": (_total(after, "perpx_ack_latency_seconds_count")
                                      > _total(before, "perpx_ack_latency_seconds_count") + 50),
        "perpx_open_interest": _values(after, "perpx_open_interest") != _values(
            before, "perpx_open_interest"),
        "perpx_mark_price": _values(after, "perpx_mark_price") != _values(
            before, "perpx_mark_price"),
        "perpx_index_price": _values(after, "perpx_index_price") != _values(
            before, "perpx_index_price"),
        "perpx_liquidations_total": _total(after, "perpx_liquidations_total") > 0,
        "perpx_rejects_total": (_total(after, "perpx_rejects_total")
                                >= _total(before, "perpx_rejects_total") + 2),
        "perpx_process_restarts_total": _values(after, "perpx_process_restarts_total")[
            (("process", "gateway-0"),)] == 1,
        "perpx_snapshot_lag_commands": _total(after, "perpx_snapshot_lag_commands") < _total(
            after, "perpx_seq"),
        "perpx_events_missed_total": _total(after, "perpx_events_missed_total") == 0,
    }
    assert all(moved.values()), {k: v for k, v in moved.items() if not v}
    assert _values(after, "perpx_gateway_refusals_total")[refused] >= 1
    memory = {dict(k)["part"]: x for k, x in _values(after, "perpx_gateway_memory_bytes").items()
              if dict(k)["gateway"] == "gateway-0"}
    assert memory["limit"] == 1024 << 20 and 0 < memory["rss"] < memory["limit"], memory
    assert {"queued", "held", "replay", "views"} <= set(memory), memory
    reasons = {dict(k)["reason"] for k in _values(after, "perpx_rejects_total")}
    assert {"insufficient_balance", "unknown_market"} <= reasons, reasons
    assert set(_values(after, "perpx_event_ring_lag_events")) >= {
        (("consumer", "persistd"),), (("consumer", "gateway-0"),)}
    assert not any(_values(after, "perpx_book_crossed").values())
    for name in ("perpx_durable_lag_commands", "perpx_duckdb_lag_commands"):
        assert _total(after, name) >= 0
    assert _total(after, "perpx_insurance_fund_usdc") >= 0

    # perpx top: one frame, as a terminal would show it
    env = {**child_env(), "COLUMNS": "120"}
    top = subprocess.run([sys.executable, "-m", "perpx.cli", "--state-dir", str(up.sd.path),
                          "top", "--once"], capture_output=True, text=True, env=env,
                         cwd=str(REPO), timeout=60)
    assert top.returncode == 0, top.stderr
    for part in ("perpx top", "commands/s", "ack p50", "ack latency", "BTC-PERP", "ETH-PERP",
                 "event ring -> persistd", "insufficient_balance", "gateway-0",
                 "rejects by reason"):
        assert part in top.stdout, f"{part!r} not in:\n{top.stdout}"

    # verify on a journal that keeps growing (riskd's marks): its bar ends at exactly 100%
    checked = cli(up.sd.path, "verify", timeout=120)
    assert checked.returncode == 0, checked.stderr
    end = int(checked.stdout.split(" to seq ")[1].split()[0])
    assert checked.stderr.strip().splitlines()[-1] == (
        f"verify: replaying the journal: {end}/{end} seq (100%)")

    # admin_log: who ran which operator command, when, with its seq and outcome
    t0 = time.time_ns()
    deposit = cli_json(up.sd.path, "deposit", first["accounts"][0], "5")
    assert cli(up.sd.path, "halt", "NOPE-PERP").returncode == 1
    rows = cli_json(up.sd.path, "sql", "SELECT command, operator, uid, pid, ts, seq, outcome, "
                                       "args FROM admin_log ORDER BY ts")["rows"]
    assert [(r[0], r[2], r[5], r[6]) for r in rows[-2:]] == [
        ("deposit", os.getuid(), deposit["seq"], "ok"),
        ("halt", os.getuid(), None, "error: unknown market 'NOPE-PERP' (markets: BTC-PERP, "
                                    "ETH-PERP)")]
    assert all(r[1] and r[3] > 0 and r[4] >= t0 for r in rows[-2:])
    assert rows[-1][7].endswith("halt NOPE-PERP")


# ---- the exporter's ring reader -------------------------------------------------------------------
def test_the_exporter_reads_the_event_ring_behind_the_matcher_without_joining_it(shm_prefix):
    """_tail_events sees every event while it keeps up, counts what the producer reused before
    it looked as missed, never returns a slot the producer may have rewritten, and leaves the
    ring's consumers alone (the producer never waits for it)."""
    with EventRing.create(shm_prefix + "-ev", EVENT_DTYPE, capacity=64,
                          consumers=["persistd"]) as ring:
        reader = ring.consumer("persistd", start="current")

        def produce(n):                         # seq = position + 1, the reader drains all
            for _ in range(n):
                assert ring.free_slots() >= 1
                pos = ring.write_cursor
                ring.records[pos & ring.mask]["seq"] = pos + 1
                ring.publish(pos + 1)
                reader.advance(1)

        produce(10)
        events, pos, missed = _tail_events(ring, 0)
        assert events["seq"].tolist() == list(range(1, 11)) and (pos, missed) == (10, 0)
        produce(200)                            # three laps while the exporter looked away
        events, pos, missed = _tail_events(ring, pos)
        keep = 64 - 64 // WRITE_AHEAD_FRACTION
        assert events["seq"].tolist() == list(range(211 - keep, 211))
        assert (pos, missed) == (210, 200 - keep)
        assert ring.consumer_names == ["persistd"] and ring.free_slots() == 64
