"""`perpx up`: start the exchange, watch it, stop it cleanly.

Processes (one per role, DESIGN.md §1):

    matcher     python -m perpx.matcherd   creates every shm structure; the only writer of state
    persistd    python -m persistd         journal, durable_seq, DuckDB, snapshots
    riskd       python -m riskd            index, mark, funding, liquidation scan (riskd/)
    gateway-N   python -m gateway          N = 0 .. exchange.gateways-1; gateway-0 also
                                            publishes market data

Command rings (engine.service.Source), in this order, which is the `source` index on events:
ops (privileged: CLI and genesis), riskd (privileged: marks, funding, liquidations), gateway-0 .. gateway-N-1
(unprivileged). The gateways name their ring `gateway-N` (gateway/server.py), so the rings are
named that way rather than gwN. Event ring consumers: gateway-0 .., persistd, riskd, ops.

Start-up: lock STATE_DIR/supervisor.lock (one `perpx up` per state dir), clear what a crashed
run left in /dev/shm under this state dir's prefix, resolve the config into exchange.json,
create the server's CURVE certificate once (kept across runs, so clients keep their
server_public_key), start the matcher and wait for its heartbeat to say ready (the first run
compiles the matcher, about a minute, and says so with a clock), start persistd, send the
genesis commands (per market, config.genesis_commands) through the ops ring and check each
was accepted, create the IndexBoard (`<prefix>-index`, shm/index_board.py: it belongs to the
supervisor so that an operator's manual index outlives riskd restarts), start riskd and wait
for its ready file, start the gateways and wait until each has bound its sockets, start the
Prometheus exporter (perpx/metrics.py: threads of this process, reading shm only;
endpoints.metrics), then write endpoints.json and status.json.

CPU pinning (`os.sched_setaffinity`, exchange.pin_cpus): with at least gateways + 2 CPUs the
matcher and each gateway get a CPU of their own and everything else (the supervisor,
persistd, riskd) shares the rest. With fewer, the order path (the matcher and the gateways)
shares all CPUs but the last, and everything else gets the last one. On this 2-core box:
matcher and gateway on CPU 0; persistd, riskd, supervisor on CPU 1. The order path stays
together because every order crosses gateway -> matcher -> gateway, and on this VM a wake-up
round trip between two processes costs ~7 µs on one CPU against ~65 µs (p99 ~210 µs) across
two; a matcher that shares its CPU never spins when idle (it would hold up the gateway it
waits for), see `matcher_spins`. With one CPU nothing is pinned.
The CPUs are those this process may use (its own affinity mask), lowest first.

Idle CPUs (exchange.cpu_latency_us, perpx/cpu_latency.py): while it runs, the supervisor asks
the kernel to keep idle CPUs polling rather than halting (0, the default), so an order that
finds the order path asleep does not first wait for the host to wake its CPU. The request
ends with the supervisor. Where the host refuses it (not root), the start says so and goes on.

Watching (every 0.1 s): a process that exits is noticed by its parent's wait (no polling of
pids that could be reused). Every child that dies is restarted (Supervisor._tend says how
each resumes), immediately the first time and with a back-off (0.5 s doubling to 30 s) while
it keeps dying within 10 s of its start; each restart counts in `restarts`. A gateway comes
back on the same ports and ring (its consumer slot resumes at its saved cursor). riskd keeps
nothing of its own: a new one re-attaches to the board (sim walks resume at the last
published index, manual indexes are still on the board), rebuilds its liquidation scanner
from the tables and starts a fresh funding average (see riskd/funding.py). The matcher bumps
a heartbeat counter in shm (`<prefix>-supervisor`) on every pass of its loop; if it stops for
5 s the supervisor says so loudly (it does not kill it). A CLI process killed
while reading events as consumer "ops" would leave that slot active and eventually stall the
matcher; the supervisor frees such a slot when nobody holds the ops lock.

Shutdown (SIGINT, SIGTERM, SIGHUP, or `perpx down`): riskd and the gateways first (SIGTERM,
then SIGKILL after 5 s), then the matcher (SIGTERM: it unlinks everything it created; SIGKILL
after 10 s), then persistd, then the heartbeat region and the IndexBoard; whatever is still in
/dev/shm under the prefix is removed (and named). endpoints.json and status.json are removed;
the exit status is 0.

Children run in their own process group (a terminal's Ctrl-C reaches only the supervisor,
which stops them in order) and get SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so a
killed supervisor does not leave an exchange running headless. Their output goes to
STATE_DIR/logs/<name>.log; the supervisor's own messages go to stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from engine.matcher import matcher_is_cached
from engine.records import (CMD_CREATE_MARKET, CMD_SET_BRACKET, CMD_SET_MARKET_LIMITS,
                            CMD_SET_MARKET_RISK, EVENT_DTYPE)
from engine.shared_state import attach_state
from engine.state import C_SEQ
from perpx import heap
from perpx.config import BUNDLED_SOURCE, Config, genesis_commands, write_json_atomic
from perpx.cpu_latency import CpuLatencyRequest
from perpx.launch import child_env
from perpx.metrics import Exporter
from perpx.ops import Exchange, OpsError
from perpx.progress import COMPILING_MATCHER, Bar, GatewayCompile, elapsed
from perpx.statedir import FileLock, StateDir
from persistd.journal import journal_info
from shm import names
from shm.heartbeat import MATCHER_SLOT, HeartbeatBoard
from shm.index_board import IndexBoard
from shm.progress import JournalProgress
from shm.region import ShmError
from shm.ring import EventRing

WATCH_INTERVAL_S = 0.1
GATEWAY_READY_TIMEOUT_S = 60.0
QUICK_CRASH_S = 10.0
MAX_BACKOFF_S = 30.0
HEARTBEAT_STALL_S = 5.0
STALE_OPS_CHECK_S = 2.0
GATEWAY_STOP_S = 5.0
MATCHER_STOP_S = 10.0

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1

PR_SET_PDEATHSIG = 1


class StartupError(RuntimeError):
    pass


# ---- layout of the exchange ------------------------------------------------------------------
def sources_for(cfg: Config) -> list[dict]:
    cap = cfg.engine["command_ring_capacity"]
    out = [{"name": "ops", "privileged": True, "capacity": cap},
           {"name": "riskd", "privileged": True, "capacity": cap}]
    out += [{"name": f"gateway-{i}", "privileged": False, "capacity": cap}
            for i in range(cfg.gateways)]
    return out


def consumers_for(cfg: Config) -> list[str]:
    return [f"gateway-{i}" for i in range(cfg.gateways)] + ["persistd", "riskd", "ops"]


def plan_cpus(available, gateways: int) -> dict[str, list[int]]:
    """Which CPUs each process may run on: keys 'matcher', 'gateway-N', 'other'."""
    cpus = sorted(available)
    order_procs = ["matcher"] + [f"gateway-{i}" for i in range(gateways)]
    if len(cpus) < 2:
        return {**{n: cpus for n in order_procs}, "other": cpus}
    if len(cpus) >= gateways + 2:
        plan = {"matcher": cpus[:1]}
        for i in range(gateways):
            plan[f"gateway-{i}"] = [cpus[1 + i]]
        plan["other"] = cpus[gateways + 1:]
        return plan
    order_path = cpus[:-1]
    return {**{n: order_path for n in order_procs}, "other": cpus[-1:]}


def matcher_spins(plan: dict[str, list[int]]) -> bool:
    """Whether the matcher may spin while idle: only on CPUs no gateway runs on (an unpinned
    matcher may share a CPU with anything, so it does not spin either)."""
    mine = set(plan.get("matcher", ()))
    return bool(mine) and not any(mine & set(cpus) for name, cpus in plan.items()
                                  if name.startswith("gateway-"))


def _bindable(host: str, port: int) -> bool:
    addr = "0.0.0.0" if host in ("*", "0.0.0.0") else host
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr.strip("[]"), port))
        except OSError:
            return False
    return True


def resolve_ports(cfg: Config, log=None) -> dict:
    """Concrete ports: 0 becomes a free port now (kept for the run, so restarts reuse it).

    A port the config file names that is taken is an error naming it and its config key. A
    port nobody chose (the bundled config's, or a key the file leaves out) that is taken is
    replaced by a free one, and `log` says which and how to fix it: a second exchange on the
    box, or anything else on 7700, does not stop a newcomer's `./scripts/run`.
    """
    host = cfg.endpoints["host"]
    chosen_keys = () if cfg.source == BUNDLED_SOURCE else cfg.explicit_endpoints
    taken = set()

    def free_port() -> int:
        for _ in range(100):
            addr = "127.0.0.1" if host in ("*", "0.0.0.0") else host.strip("[]")
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr, 0))
                port = s.getsockname()[1]
            if port not in taken:
                taken.add(port)
                return port
        raise StartupError("could not find a free port")

    def pick(port: int, key: str) -> int:
        if not port:
            return free_port()
        if port not in taken and _bindable(host, port):
            taken.add(port)
            return port
        if key in chosen_keys:
            raise StartupError(f"endpoints.{key}: port {port} on {host} is in use; choose "
                               f"another in {cfg.source} (0 = any free port)")
        chosen = free_port()
        if log is not None:
            log(f"port {port} (endpoints.{key}) on {host} is in use, so this run uses "
                f"{chosen}; clients find it in endpoints.json. To fix the port, set "
                f"endpoints.{key} in a config file: perpx up --config FILE")
        return chosen

    base = cfg.endpoints["orders_port"]
    orders = [pick(base + i if base else 0, "orders_port") for i in range(cfg.gateways)]
    md = pick(cfg.endpoints["market_data_port"], "market_data_port")
    metrics = pick(cfg.endpoints["metrics_port"], "metrics_port")
    connect_host = "127.0.0.1" if host in ("*", "0.0.0.0") else host
    return {
        "orders_bind": [f"tcp://{host}:{p}" for p in orders],
        "market_data_bind": f"tcp://{host}:{md}",
        "orders": [f"tcp://{connect_host}:{p}" for p in orders],
        "market_data": f"tcp://{connect_host}:{md}",
        "metrics_host": host, "metrics_port": metrics,
        "metrics_port_chosen": "metrics_port" in chosen_keys,
    }


# ---- children --------------------------------------------------------------------------------
_libc = None


def _child_setup(cpus, parent_pid):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc

    def setup():  # runs in the child between fork and exec: keep it to system calls
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


@dataclass
class Child:
    name: str
    argv: list
    cpus: list
    log_path: Path
    ready_file: Path | None = None
    ready_check: object = None       # or a callable: True once the process serves
    popen: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0          # monotonic
    started_wall: float = 0.0
    ready: bool = False
    quick_crashes: int = 0
    restart_at: float | None = None  # monotonic time of a scheduled restart
    exit_note: str = ""

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join("    | " + line for line in text.splitlines()[-lines:])


# ---- the supervisor ----------------------------------------------------------------------------
class Supervisor:
    def __init__(self, state_dir, cfg: Config, *, out=None, json_out: bool = False,
                 log=None):
        self.sd = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
        self.cfg = cfg
        self.out = out or sys.stdout
        self.json_out = json_out
        self._log = log or (lambda msg: print(f"perpx up: {msg}", file=sys.stderr, flush=True))
        self.stop_requested = False
        self.stop_reason = ""
        self.lock = FileLock(self.sd.supervisor_lock)
        self.children: dict[str, Child] = {}
        self.matcher: Child | None = None
        self.persistd: Child | None = None
        self.riskd: Child | None = None
        self.index_board = None
        self.progress = None
        self.exporter = None
        self.lane_compile: GatewayCompile | None = None
        self.gateways: list[Child] = []
        self.hb_board = None
        self.heartbeat = None
        self.events = None
        self.endpoints = None
        self.doc = None
        self.exit_code = EXIT_OK
        self._last_beats = (0, time.monotonic())
        self._stall_reported = False
        self._last_ops_check = 0.0
        self.cpu_plan = {}
        self.cpu_latency: CpuLatencyRequest | None = None

    def log(self, msg: str) -> None:
        self._log(msg)

    # -- signals ------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if not self.stop_requested:
            self.stop_reason = signal.Signals(signum).name
        self.stop_requested = True

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # -- the whole run ------------------------------------------------------------------
    def run(self) -> int:
        self.install_signal_handlers()
        unsafe = self.sd.others_can_write()
        if unsafe:
            raise StartupError(unsafe)
        self.sd.make()
        deadline = time.monotonic() + 1.0
        while not self.lock.try_acquire():
            if time.monotonic() > deadline:
                pid = self.sd.supervisor_pid()
                raise StartupError(f"an exchange is already running for {self.sd.path} "
                                   f"(supervisor pid {pid}); `perpx down` stops it")
            time.sleep(0.05)
        self.lock.write_pid()
        fixed = self.sd.private()
        if fixed:
            self.log(f"made {len(fixed)} files and directories of {self.sd.path} private to "
                     f"this user (0600/0700): {', '.join(fixed[:4])}"
                     + (" ..." if len(fixed) > 4 else ""))
        try:
            try:
                self.start()
            except StartupError as e:
                if self.stop_requested:
                    self.log(f"{self.stop_reason} received during start-up: shutting down")
                else:
                    self.log(f"error: {e}")
                    self.exit_code = EXIT_STARTUP_FAILED
            if not self.stop_requested and self.exit_code == EXIT_OK:
                self.watch()
        finally:
            try:
                self.shutdown()
            finally:
                if self.cpu_latency is not None:
                    self.cpu_latency.close()
                self.lock.release()
        return self.exit_code

    # -- start-up -----------------------------------------------------------------------
    def start(self) -> None:
        sd, cfg = self.sd, self.cfg
        left = sd.remove_shm_leftovers()
        if left:
            self.log(f"removed {len(left)} shared-memory leftovers of a previous run "
                     f"under {sd.prefix}: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}")
        for stale in (sd.endpoints_file, sd.status_file):
            stale.unlink(missing_ok=True)
        if cfg.ack_mode == "fast":
            self.log("note: ack_mode \"fast\": gateways acknowledge before the journal has the "
                     "command (benchmarks only: an acknowledged order can be lost in a crash)")
        ports = resolve_ports(cfg, self.log)
        available = sorted(os.sched_getaffinity(0))
        self.cpu_plan = plan_cpus(available, cfg.gateways) if cfg.pin_cpus else {}
        if self.cpu_plan and len(available) > 1:
            os.sched_setaffinity(0, self.cpu_plan["other"])
        self.cpu_latency = CpuLatencyRequest(cfg.cpu_latency_us)
        if cfg.cpu_latency_us >= 0 and not self.cpu_latency.held:
            self.log(f"note: exchange.cpu_latency_us = {cfg.cpu_latency_us} not applied "
                     f"({self.cpu_latency.refused}): idle CPUs may halt, and an order that finds "
                     f"the order path idle waits for its CPU to wake (docs/operations.md)")
        self.doc = {
            **cfg.to_dict(),
            "prefix": sd.prefix,
            "state_dir": str(sd.path),
            "sources": sources_for(cfg),
            "consumers": consumers_for(cfg),
            "ports": ports,
            "matcher_spins": matcher_spins(self.cpu_plan),
        }
        write_json_atomic(sd.exchange_file, self.doc)
        server_secret = self._server_certificate()

        # heartbeats, then the matcher
        self.hb_board = HeartbeatBoard.create(sd.prefix)
        self.heartbeat = self.hb_board.slots
        self.progress = JournalProgress.create(sd.prefix)
        journaled = journal_info(sd.journal_dir)["last_seq"] if sd.journal_dir.exists() else 0

        def matcher_ready():
            beat = self.heartbeat[MATCHER_SLOT]
            return beat["ready"] == 1 and beat["pid"] == self.matcher.pid

        self.matcher = self._child("matcher", [sys.executable, "-m", "perpx.matcherd",
                                               "--spec", str(sd.exchange_file)],
                                   ready_check=matcher_ready)
        compiles = not matcher_is_cached()
        self.lane_compile = self._compile_gateway_lane()   # beside the matcher's: cold cache
        self._spawn(self.matcher)
        self.log(f"matcher started (pid {self.matcher.pid}, cpus {self.matcher.cpus or 'any'}); "
                 f"waiting for it to {'compile' if compiles else 'load'} the matcher"
                 + (f" and recover seq {journaled} from the journal" if journaled else ""))
        t0 = time.monotonic()
        if compiles:
            with elapsed(COMPILING_MATCHER):
                self._wait(lambda: self._check_ready(self.matcher), cfg.startup_timeout_s,
                           "the matcher to start", [self.matcher])
        else:
            self._wait_for_matcher_replay(journaled, cfg.startup_timeout_s)
        self.log(f"matcher ready in {time.monotonic() - t0:.1f} s")

        self.persistd = self._child("persistd", [sys.executable, "-m", "persistd",
                                                 "--spec", str(sd.exchange_file)],
                                    ready_check=lambda: self.progress.pid() == self.persistd.pid)
        self._spawn(self.persistd)
        self._wait(lambda: self._check_ready(self.persistd), cfg.startup_timeout_s,
                   "persistd to open the journal", [self.matcher, self.persistd])
        self.log(f"persistd ready (pid {self.persistd.pid}, journal at seq "
                 f"{self.progress.durable_seq()})")

        if journaled == 0:
            self._genesis()

        self.events = EventRing.attach(names.event_ring(sd.prefix), EVENT_DTYPE)

        self.index_board = IndexBoard.create(sd.prefix, cfg.engine["max_markets"])
        self.riskd = self._child("riskd", [sys.executable, "-m", "riskd", "--spec",
                                           str(sd.exchange_file), "--ready-file",
                                           str(sd.run_dir / "riskd.json")],
                                 sd.run_dir / "riskd.json")
        self._spawn(self.riskd)
        self._wait(lambda: self._check_ready(self.riskd), GATEWAY_READY_TIMEOUT_S,
                   "riskd to attach", [self.matcher, self.persistd, self.riskd])
        self.log(f"riskd ready (pid {self.riskd.pid}, a tick every "
                 f"{cfg.risk['mark_interval_ms']} ms)")

        if self.lane_compile is not None:
            try:
                self.lane_compile.wait()
            except RuntimeError as e:
                raise StartupError(str(e)) from None
        for i in range(cfg.gateways):
            ready_file = sd.run_dir / f"gateway-{i}.json"
            argv = [sys.executable, "-m", "gateway", "--spec", str(sd.exchange_file),
                    "--index", str(i), "--orders", ports["orders_bind"][i],
                    "--server-key", str(server_secret), "--endpoints-file", str(ready_file),
                    "--stats-file", str(sd.run_dir / f"gateway-{i}.stats.json")]
            if i == 0:
                argv += ["--market-data", ports["market_data_bind"]]
            gw = self._child(f"gateway-{i}", argv, ready_file)
            self.gateways.append(gw)
            self._spawn(gw)
        self._wait(lambda: all(self._check_ready(g) for g in self.gateways),
                   GATEWAY_READY_TIMEOUT_S, "the gateways to bind their sockets",
                   [self.matcher, *self.gateways])

        public, _ = zmq.auth.load_certificate(str(server_secret))
        self.endpoints = {"orders": ports["orders"][0], "market_data": ports["market_data"],
                          "server_public_key": public.decode(), "orders_all": ports["orders"]}
        self.exporter = Exporter(sd, self.doc, log=self.log, restarts=lambda: {
            c.name: c.restarts for c in self._running()})
        host, port = ports["metrics_host"], ports["metrics_port"]
        try:
            self.endpoints["metrics"] = self.exporter.start(host, port)
        except OSError as e:
            if ports["metrics_port_chosen"]:
                raise StartupError(f"endpoints.metrics_port: cannot serve metrics on "
                                   f"{host}:{port}: {e}") from None
            # taken since resolve_ports looked (another exchange starting): any free port
            self.endpoints["metrics"] = self.exporter.start(host, 0)
            self.log(f"port {port} (endpoints.metrics_port) on {host} was taken meanwhile; "
                     f"metrics at {self.endpoints['metrics']}")
        write_json_atomic(sd.endpoints_file, self.endpoints)
        self.write_status()
        if self.json_out:
            print(json.dumps(self.endpoints), file=self.out, flush=True)
        else:
            print(f"perpx is up: orders {self.endpoints['orders']}, market data "
                  f"{self.endpoints['market_data']}, metrics {self.endpoints['metrics']} "
                  f"(perpx top); state in {sd.path}; "
                  f"{len(cfg.markets)} markets ({', '.join(m.symbol for m in cfg.markets)}). "
                  f"Ctrl-C or `perpx down` stops it.", file=self.out, flush=True)

    def _wait_for_matcher_replay(self, journaled: int, timeout_s: float) -> None:
        """Wait for the matcher to serve; with a journal to replay, show a bar of the replay:
        the seq of the state it rebuilds in shared memory (counters[C_SEQ]) against the
        journal's last seq."""
        if not journaled:
            self._wait(lambda: self._check_ready(self.matcher), timeout_s,
                       "the matcher to start", [self.matcher])
            return
        bar = Bar("matcher: replaying the journal", journaled)
        mapped = []                   # [region, state] once the matcher has made the region

        def ready() -> bool:
            if not mapped:
                try:
                    mapped.extend(attach_state(self.sd.prefix, self.cfg.engine_config()))
                except ShmError:
                    pass              # not created yet
            if mapped:
                bar.update(min(int(mapped[1].counters[C_SEQ]), journaled))
            return self._check_ready(self.matcher)

        try:
            self._wait(ready, timeout_s, "the matcher to start", [self.matcher])
            bar.update(journaled)     # ready: it has replayed all of it
        finally:
            bar.stop()
            if mapped:
                region = mapped[0]
                mapped.clear()        # drop the state's views before unmapping
                region.close()

    def _server_certificate(self) -> Path:
        secret = self.sd.keys_dir / "server.key_secret"
        if not secret.exists():
            _, secret_file = zmq.auth.create_certificates(str(self.sd.keys_dir), "server")
            secret = Path(secret_file)
        os.chmod(secret, 0o600)
        return secret

    def _child(self, name: str, argv: list, ready_file: Path | None = None,
               ready_check=None) -> Child:
        cpus = self.cpu_plan.get(name, self.cpu_plan.get("other", [])) if self.cpu_plan else []
        child = Child(name, argv, cpus, self.sd.logs_dir / f"{name}.log", ready_file,
                      ready_check)
        self.children[name] = child
        return child

    def _spawn(self, child: Child) -> None:
        if child.ready_file is not None:
            child.ready_file.unlink(missing_ok=True)
        env = heap.child_environment(child_env(), self.cfg.huge_pages)
        env["PYTHONUNBUFFERED"] = "1"
        with open(child.log_path, "ab") as log:
            log.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {child.name}: "
                      f"{' '.join(child.argv)}\n".encode())
            log.flush()
            child.popen = subprocess.Popen(
                child.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(self.sd.path), env=env, process_group=0,
                preexec_fn=_child_setup(child.cpus, os.getpid()))
        child.started_at = time.monotonic()
        child.started_wall = time.time()
        child.ready = False
        child.restart_at = None
        self.write_status()

    def _check_ready(self, child: Child) -> bool:
        if not child.ready and child.alive():
            if child.ready_file is not None:
                child.ready = child.ready_file.exists()
            elif child.ready_check is not None:
                child.ready = bool(child.ready_check())
        return child.ready

    def _wait(self, condition, timeout_s: float, what: str, watched: list[Child]) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.stop_requested:
                raise StartupError(f"stopped ({self.stop_reason}) while waiting for {what}")
            for child in watched:
                code = child.popen.poll()
                if code is not None:
                    raise StartupError(f"{child.name} {describe_exit(code)} while waiting for "
                                       f"{what}; its log ({child.log_path}):\n"
                                       f"{log_tail(child.log_path, 15)}")
            if time.monotonic() > deadline:
                raise StartupError(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(0.02)

    def _compile_gateway_lane(self) -> GatewayCompile | None:
        """On a cold numba cache, compile the gateways' lane (gateway/compiled_pass.py) once,
        in a process of its own beside the matcher's compile; the gateways start after it
        (each would compile it for minutes past its ready timeout)."""
        if os.environ.get("PERPX_GATEWAY_PASS") == "python":
            return None
        lane_compile = GatewayCompile()
        if lane_compile.process is None:
            return None
        self.log("compiling the gateway's order path (first start only), beside the matcher")
        return lane_compile

    def _genesis(self) -> None:
        command_words = {CMD_CREATE_MARKET: "CREATE_MARKET", CMD_SET_MARKET_LIMITS: "SET_MARKET_LIMITS",
                 CMD_SET_MARKET_RISK: "SET_MARKET_RISK", CMD_SET_BRACKET: "SET_BRACKET"}
        ex = Exchange(self.sd, require_running=False)
        commands = genesis_commands(self.cfg)
        try:
            replies = ex.submit(commands, timeout_s=30.0)
        except OpsError as e:
            raise StartupError(f"genesis: {e}") from None
        for command, reply in zip(commands, replies):
            if reply.rejected:
                m = self.cfg.markets[int(command["market"])]
                what = command_words[int(command["cmd"])]
                raise StartupError(f"genesis: the matcher rejected {what} for {m.symbol} "
                                   f"(markets[{m.id}]): {reply.reason()}")
        self.log(f"genesis: {len(self.cfg.markets)} markets created "
                 f"(seq {max(r.seq for r in replies)})")

    # -- watching -----------------------------------------------------------------------
    def watch(self) -> None:
        while not self.stop_requested:
            now = time.monotonic()
            if self.matcher.ready:
                self._check_heartbeat(now)
            changed = False
            for child in self._running():
                changed |= self._tend(child, now)
            if now - self._last_ops_check > STALE_OPS_CHECK_S:
                self._last_ops_check = now
                self._reap_stale_ops_reader()
            if changed:
                self.write_status()
            time.sleep(WATCH_INTERVAL_S)
        self.log(f"{self.stop_reason or 'stop'} received: shutting down")

    def _check_heartbeat(self, now: float) -> None:
        beats = int(self.heartbeat[MATCHER_SLOT]["beats"])
        last, since = self._last_beats
        if beats != last:
            if self._stall_reported:
                self.log("the matcher's heartbeat is back")
                self._stall_reported = False
            self._last_beats = (beats, now)
        elif now - since > HEARTBEAT_STALL_S and not self._stall_reported:
            self._stall_reported = True
            self.log(f"WARNING: the matcher (pid {self.matcher.pid}) is alive but its heartbeat "
                     f"has not moved for {now - since:.0f} s: it is stuck")

    def _tend(self, child: Child, now: float) -> bool:
        """Restart a dead process (with back-off); True if the status changed.

        A restarted matcher maps the shared memory its predecessor left and rebuilds its state
        from snapshot + journal (perpx/matcherd.py); a restarted persistd resumes at its ring
        cursor and the journal's end; a restarted gateway resumes at its ring cursor.
        """
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)
                self.log(f"{child.name} restarted (pid {child.pid}, restart #{child.restarts})")
                return True
            return False
        code = child.popen.poll()
        if code is None:
            if not child.ready and self._check_ready(child):
                if child.restarts:
                    self.log(f"{child.name} is serving again (pid {child.pid}, "
                             f"{now - child.started_at:.1f} s after its restart)")
                return True
            timeout = (self.cfg.startup_timeout_s if child.ready_check is not None
                       else GATEWAY_READY_TIMEOUT_S)
            if not child.ready and now - child.started_at > timeout:
                self.log(f"{child.name} (pid {child.pid}) did not come up within "
                         f"{timeout:g} s: killing it")
                child.popen.kill()
            return False
        lived = now - child.started_at
        child.exit_note = describe_exit(code)
        child.quick_crashes = child.quick_crashes + 1 if lived < QUICK_CRASH_S else 0
        delay = 0.0 if child.quick_crashes <= 1 else min(0.5 * 2 ** (child.quick_crashes - 2),
                                                         MAX_BACKOFF_S)
        tail = log_tail(child.log_path, 10 if child is self.matcher else 5)
        loud = "!" * 20 + " " if child in (self.matcher, self.persistd) else ""
        self.log(f"{loud}{child.name} (pid {child.pid}) {child.exit_note} after {lived:.1f} s; "
                 f"restarting" + (f" in {delay:g} s" if delay else "")
                 + (f"; its log:\n{tail}" if tail else ""))
        child.ready = False
        child.restart_at = now + delay
        return True

    def _reap_stale_ops_reader(self) -> None:
        """Free the "ops" consumer slot if a CLI died holding it (nobody holds the ops lock)."""
        if self.events is None or self.events.consumer_cursor("ops") is None:
            return
        probe = FileLock(self.sd.ops_lock)
        if not probe.try_acquire():
            return
        try:
            if self.events.consumer_cursor("ops") is None:
                return
            try:
                consumer = self.events.consumer("ops", start="current")
            except ShmError:
                return   # a live process owns it (without the lock): leave it
            consumer.deregister()
            self.log("freed the event ring's \"ops\" reader slot left by a CLI process that died")
        finally:
            probe.release()

    # -- status -------------------------------------------------------------------------
    def write_status(self) -> None:
        procs = []
        for child in self._running():
            if child.popen is None:
                continue
            procs.append({"name": child.name, "pid": child.pid, "restarts": child.restarts,
                          "cpus": child.cpus, "started_at": round(child.started_wall, 3),
                          "state": ("restarting" if child.restart_at is not None else
                                    "ready" if child.ready else "starting"),
                          "log": str(child.log_path)})
        write_json_atomic(self.sd.status_file, {
            "supervisor_pid": os.getpid(), "prefix": self.sd.prefix,
            "state_dir": str(self.sd.path), "config": self.cfg.source,
            "cpu_plan": self.cpu_plan,
            "cpu_latency": self.cpu_latency.as_dict() if self.cpu_latency else None,
            "heap": {"huge_pages": self.cfg.huge_pages, "thp": heap.thp_mode()},
            "processes": procs, "endpoints": self.endpoints})

    def _running(self) -> list[Child]:
        """The children started so far, in start order."""
        return [c for c in (self.matcher, self.persistd, self.riskd, *self.gateways)
                if c is not None]

    # -- shutdown -----------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.lane_compile is not None:     # a start-up that failed while it compiled
            self.lane_compile.stop()
        for child in self._running():
            child.restart_at = None
        if self.exporter is not None:      # it reads the shm the children are about to remove
            self.exporter.stop()
            self.exporter = None
        # riskd with the gateways: no new marks or liquidations once clients are gone.
        self._stop_children([c for c in (self.riskd, *self.gateways) if c is not None],
                            GATEWAY_STOP_S)
        if self.events is not None:
            self.events.close()
            self.events = None
        # The matcher before persistd: persistd journals everything the matcher published.
        if self.matcher is not None:
            self._stop_children([self.matcher], MATCHER_STOP_S)
        if self.persistd is not None:
            self._stop_children([self.persistd], MATCHER_STOP_S)
        if self.progress is not None:
            self.progress.close()
            self.progress.unlink()
            self.progress = None
        if self.index_board is not None:
            self.index_board.close()
            self.index_board.unlink()
            self.index_board = None
        self.heartbeat = None
        if self.hb_board is not None:
            self.hb_board.close()
            self.hb_board.unlink()
            self.hb_board = None
        left = self.sd.remove_shm_leftovers()
        if left:
            self.log(f"removed {len(left)} shared-memory entries the processes left: "
                     f"{', '.join(left[:6])}{' ...' if len(left) > 6 else ''}")
        for f in (self.sd.endpoints_file, self.sd.status_file):
            f.unlink(missing_ok=True)
        for child in self._running():
            if child.ready_file is not None:
                child.ready_file.unlink(missing_ok=True)
        if self.matcher is not None and self.exit_code == EXIT_OK:
            self.log("stopped cleanly")

    def _stop_children(self, children: list[Child], timeout_s: float) -> None:
        running = [c for c in children if c.alive()]
        for c in running:
            try:
                c.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        for c in running:
            try:
                c.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{c.name} (pid {c.pid}) did not stop within {timeout_s:g} s: killing it")
                c.popen.kill()
                c.popen.wait(timeout=5)


def up(state_dir, cfg: Config, json_out: bool = False) -> int:
    return Supervisor(state_dir, cfg, json_out=json_out).run()
