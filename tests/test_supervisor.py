"""`perpx up` as a real process tree: start-up, status, gateway restart, matcher death, clean
shutdown. Also the helpers the CLI tests share (tests/test_cli.py).

Every wait has a deadline; every exchange started here is stopped (SIGTERM, then SIGKILL of the
supervisor, whose children get SIGTERM through PR_SET_PDEATHSIG) even when a test fails, and
nothing may remain in /dev/shm under its prefix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import msgpack
import zmq
import zmq.auth

from perpx import heap, launch
from perpx.cpu_latency import DEVICE as CPU_LATENCY_DEVICE, current_limit_us
from perpx.launch import REPO, STARTUP_S, ExchangeProcess, child_env, pid_alive
from perpx.statedir import StateDir
from perpx.supervisor import matcher_spins, plan_cpus

WAIT_S = 15.0
CLI_TIMEOUT_S = 60.0


def config_text(gateways: int = 1, ack_mode: str = "fast", extra: str = "",
                btc_oracle: str = "manual", more_markets: str = "") -> str:
    """Both markets' marks move only when a test sets them (manual oracles), unless asked;
    `more_markets` ([[markets]] tables) come after them."""
    return f"""
[exchange]
gateways = {gateways}
ack_mode = "{ack_mode}"
{extra}
[engine]
max_accounts = 64
max_markets = 4
max_orders = 4096

[endpoints]
orders_port = 0
market_data_port = 0

[[markets]]
symbol = "BTC-PERP"
tick_size = "0.1"
lot_size = "0.001"
initial_price = "65000"
max_leverage = 50
oracle = "{btc_oracle}"

[[markets]]
symbol = "ETH-PERP"
tick_size = "0.01"
lot_size = "0.01"
initial_price = "3500"
oracle = "manual"
{more_markets}"""


def _env() -> dict:
    return child_env()


def cli(state_dir, *args, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perpx.cli", "--state-dir", str(state_dir),
                           *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=str(REPO))


def cli_json(state_dir, *args) -> dict:
    r = cli(state_dir, "--json", *args)
    assert r.returncode == 0, f"perpx {' '.join(map(str, args))} failed: {r.stderr}"
    return json.loads(r.stdout)


def cli_fails(state_dir, *args, json_mode: bool = False) -> str:
    """Run a command that must fail: non-zero exit, one line on stderr, nothing on stdout."""
    r = cli(state_dir, *(["--json"] if json_mode else []), *args)
    assert r.returncode != 0, f"perpx {' '.join(map(str, args))} succeeded: {r.stdout}"
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("perpx"), lines[0]
    return lines[0]


def wait_until(condition, timeout_s: float, what: str):
    return launch.wait_until(condition, timeout_s, what, error=AssertionError)


class Up(ExchangeProcess):
    """A `perpx up` process for a test; a failed start fails the test with its stderr."""

    def wait_ready(self, timeout_s: float = STARTUP_S) -> dict:
        try:
            return super().wait_ready(timeout_s)
        except RuntimeError as e:
            raise AssertionError(str(e)) from None


def ping(endpoint: str, server_public_key: str, certificate: str,
         timeout_s: float = WAIT_S) -> dict:
    """A CURVE DEALER round trip (the client retries the handshake while a gateway restarts)."""
    ctx = zmq.Context()
    try:
        public, secret = zmq.auth.load_certificate(certificate)
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.curve_publickey, s.curve_secretkey = public, secret
        s.curve_serverkey = server_public_key.encode()
        s.connect(endpoint)
        deadline = time.monotonic() + timeout_s
        rid = 0
        while time.monotonic() < deadline:
            rid += 1
            s.send(msgpack.packb({"type": "ping", "rid": rid}))
            if s.poll(1000):
                reply = msgpack.unpackb(s.recv())
                if reply.get("rid") == rid:
                    return reply
        raise AssertionError(f"no pong from {endpoint} within {timeout_s} s")
    finally:
        ctx.destroy(linger=0)


def processes(state_dir) -> dict:
    return {p["name"]: p for p in cli_json(state_dir, "status")["processes"]}


def kill9_and_wait_restarted(up, proc: dict) -> int:
    """kill -9 a child (a `perpx status` process entry) and wait until the supervisor has it
    serving again (its first restart); returns the old pid."""
    old, name = proc["pid"], proc["name"]
    os.kill(old, signal.SIGKILL)
    restarted = wait_until(
        lambda: (lambda p: p if p["restarts"] == 1 and p["alive"] and p["pid"] != old
                 and p["state"] == "ready" else None)(processes(up.sd.path)[name]),
        WAIT_S * 2, f"{name} to be restarted")
    up.child_pids.add(restarted["pid"])
    return old


def store_pid(persistd: int) -> int:
    """persistd's store process (its only child)."""
    with open(f"/proc/{persistd}/task/{persistd}/children") as f:
        (store,) = [int(pid) for pid in f.read().split()]
    return store


def store_policies(pid: int) -> set:
    """The scheduling policies of the process's threads (DuckDB's included)."""
    policies = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            policies.add(os.sched_getscheduler(int(tid)))
        except ProcessLookupError:     # a thread that just ended
            pass
    return policies


def assert_cpu_placement(status: dict, procs: dict) -> None:
    """The plan in status.json is the one the processes run with: the matcher SCHED_BATCH
    where it shares its CPU with a gateway; persistd's store process, on the 'other' CPUs,
    SCHED_IDLE in every thread (perpx/supervisor.py plan_cpus, persistd/storer.py)."""
    plan = status["cpu_plan"]
    assert plan == plan_cpus(os.sched_getaffinity(0), 2)
    matcher = procs["matcher"]["pid"]
    assert os.sched_getaffinity(matcher) == set(plan["matcher"])
    expected = os.SCHED_OTHER if matcher_spins(plan) else os.SCHED_BATCH
    assert os.sched_getscheduler(matcher) == expected
    store = store_pid(procs["persistd"]["pid"])
    with open(f"/proc/{store}/cmdline", "rb") as f:
        assert b"--store" in f.read()
    assert os.sched_getaffinity(store) == set(plan["other"])
    assert store_policies(store) == {os.SCHED_IDLE}
    assert_sigterm_taken_by_a_thread(store)


def environ_of(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = f.read().decode().split("\0")
    return dict(p.split("=", 1) for p in pairs if "=" in p)


def assert_heap(status: dict, procs: dict, huge_pages: bool) -> None:
    """Every process runs with the heap the config asked for (perpx/heap.py); on huge pages
    where the kernel has them, and `perpx status` says so."""
    thp = heap.thp_mode()
    assert status["heap"] == {"huge_pages": huge_pages, "thp": thp}
    for p in procs.values():
        env = environ_of(p["pid"])
        assert (env.get("PYTHONMALLOC") == "malloc") is huge_pages, (p["name"], env)
        assert (heap.TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")) is huge_pages
    if huge_pages and thp in ("madvise", "always"):
        # the gateway's and the matcher's heaps are tens of MiB: some of it in 2 MiB pages
        assert all(procs[name]["huge_page_bytes"] >= 2 << 20 for name in ("matcher", "gateway-0")), \
            {name: p["huge_page_bytes"] for name, p in procs.items()}


def test_child_environment_adds_the_heap_settings_to_the_tunables_given():
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0", "X": "1"}
    huge = heap.child_environment(env, True)
    assert huge == {"X": "1", "PYTHONMALLOC": "malloc",
                    "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert heap.child_environment({}, True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert heap.child_environment(env, False) == env and env["X"] == "1"


def assert_sigterm_taken_by_a_thread(pid: int) -> None:
    """The store process takes SIGTERM in a thread of its own (sigwait), not in a handler of
    its main thread, which could deadlock on the Event its loop waits on (persistd/storer.py
    `serve`): every thread but that one has SIGTERM blocked (the kernel unblocks it in a
    thread only while the thread waits for it)."""
    takers = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            blocked = [line for line in f if line.startswith("SigBlk:")][0].split()[1]
        if not int(blocked, 16) & (1 << (signal.SIGTERM - 1)):
            takers.append(int(tid))
    assert len(takers) == 1 and takers[0] != pid, takers


# ---------------------------------------------------------------------------------------------
def test_up_status_gateway_restart_and_sigterm(ups):
    # the limit in force is the lowest of every request held on the box: compare before and
    # after only when nobody else holds one
    idle_limit_before = current_limit_us() if os.access(CPU_LATENCY_DEVICE, os.R_OK) else None
    up = ups("state", config_text(gateways=2, extra="huge_pages = true"))
    endpoints = up.wait_ready()
    sd = up.sd

    assert {"orders", "market_data", "server_public_key"} <= set(endpoints)
    assert endpoints["orders"].startswith("tcp://127.0.0.1:")
    assert endpoints["market_data"].startswith("tcp://127.0.0.1:")
    server_public, _ = zmq.auth.load_certificate(sd.keys_dir / "server.key")
    assert endpoints["server_public_key"] == server_public.decode()
    assert len(endpoints["orders_all"]) == 2

    status = cli_json(sd.path, "status")
    procs = {p["name"]: p for p in status["processes"]}
    assert list(procs) == ["matcher", "persistd", "riskd", "gateway-0", "gateway-1"]
    assert all(p["alive"] and p["restarts"] == 0 and p["pid"] > 0 for p in procs.values())
    assert status["seq"] >= 4            # the genesis: two markets, two commands each
    assert status["durable_seq"] == status["seq"]      # "fast" acks, but persistd journals
    assert status["heartbeats"]["matcher"]["beating"]
    assert_cpu_placement(json.loads(sd.status_file.read_text()), procs)
    assert_heap(status, procs, True)
    # idle CPUs: the bundled request (0: poll) stands while the exchange runs, or the status
    # says why the host refused it
    idle = status["cpu_latency"]
    if idle_limit_before is not None and os.access(CPU_LATENCY_DEVICE, os.W_OK):
        assert idle == {"limit_us": 0, "held": True, "refused": None}
        assert current_limit_us() == 0
    else:
        assert idle["held"] is False and CPU_LATENCY_DEVICE in idle["refused"]
        assert "cpu_latency_us = 0 not applied" in up.stderr
    text = cli(sd.path, "status").stdout
    assert "idle CPUs: " in text
    assert ("heap on huge pages (THP " if heap.thp_mode() in ("madvise", "always")
            else "heap: huge pages asked for, none possible") in text

    # one exchange per state dir
    line = cli_fails(sd.path, "up", "--config", up.dir.parent / "state.toml")
    assert "already running" in line

    account = cli_json(sd.path, "account", "create")
    for endpoint in endpoints["orders_all"]:
        assert ping(endpoint, endpoints["server_public_key"], account["certificate"])["type"] == "pong"

    # kill -9 a gateway: the supervisor restarts it on the same endpoint
    old = kill9_and_wait_restarted(up, procs["gateway-1"])
    assert not pid_alive(old)
    # its stats file: the dead gateway's, stale, until the new one writes its own (a second)
    def stats_1():
        return cli_json(sd.path, "status")["gateways"].get("gateway-1")
    first = stats_1()
    assert (first is None or first["pid"] != old
            or first["stale_reason"] == f"pid {old} is not running"), first
    new = processes(sd.path)["gateway-1"]["pid"]
    wait_until(lambda: (g := stats_1()) and g["pid"] == new and not g["stale"], WAIT_S,
               "the restarted gateway-1's own stats")
    assert processes(sd.path)["gateway-0"]["restarts"] == 0
    assert ping(endpoints["orders_all"][1], endpoints["server_public_key"],
                account["certificate"])["type"] == "pong"
    assert "gateway-1" in up.stderr and "killed by SIGKILL" in up.stderr

    # kill -9 riskd: restarted too; the manual index set before it died is still applied after
    done = cli_json(sd.path, "oracle", "set", "ETH-PERP", "3510")
    kill9_and_wait_restarted(up, procs["riskd"])
    assert cli_json(sd.path, "status")["risk"]["ETH-PERP"]["index"] == "3510"
    assert cli_json(sd.path, "oracle", "set", "ETH-PERP", "3520.25")["mark_price"] == "3520.25"
    assert cli_json(sd.path, "status")["seq"] > done["seq"]

    # SIGTERM: exit 0, nothing left behind
    up.proc.send_signal(signal.SIGTERM)
    assert up.wait_exit(30) == 0, up.stderr
    assert sd.shm_leftovers() == []
    assert not sd.endpoints_file.exists()
    for pid in up.child_pids:
        assert not pid_alive(pid)
    assert "stopped cleanly" in up.stderr
    if idle_limit_before == 2_000_000_000:
        assert current_limit_us() == idle_limit_before      # the request ended with it


def test_matcher_kill9_is_restarted_and_recovers_its_state(ups):
    up = ups("state")
    up.wait_ready()
    sd = up.sd
    account = cli_json(sd.path, "account", "create", "--deposit", "1000")
    seq = cli_json(sd.path, "status")["seq"]
    matcher = processes(sd.path)["matcher"]["pid"]
    os.kill(matcher, signal.SIGKILL)
    new = wait_until(
        lambda: (lambda p: p if p["restarts"] == 1 and p["state"] == "ready" else None)(
            processes(sd.path)["matcher"]), WAIT_S * 4, "the matcher to be restarted")
    up.child_pids.add(new["pid"])
    assert "matcher" in up.stderr and "killed by SIGKILL" in up.stderr
    status = cli_json(sd.path, "status")
    assert status["seq"] == seq                 # recovered, not reset
    assert_heap(status, {p["name"]: p for p in status["processes"]}, False)   # the default
    assert "heap: Python's own allocator" in cli(sd.path, "status").stdout
    shown = cli_json(sd.path, "account", "show", account["account"])
    assert shown["balance"] == "1000"
    deposit = cli_json(sd.path, "deposit", account["account"], "1")
    assert deposit["seq"] == seq + 1                                  # the sequence goes on
    up.proc.send_signal(signal.SIGTERM)
    assert up.wait_exit(30) == 0, up.stderr
    assert sd.shm_leftovers() == []


def test_invalid_config_fails_before_starting_anything(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(config_text().replace('tick_size = "0.1"', 'tick_size = "0.0001"'))
    line = cli_fails(tmp_path / "state", "up", "--config", bad)
    assert "markets[0].tick_size: '0.0001' x lot_size '0.001'" in line
    assert StateDir(tmp_path / "state").shm_leftovers() == []
    assert "tick" in cli_fails(tmp_path / "state", "markets", "--config", bad)
