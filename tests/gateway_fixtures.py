"""A small exchange in real processes for the gateway tests: a matcher and a gateway, each
spawned, markets created and accounts funded through the privileged ops ring, CURVE keys in a
tmp dir, clients as real DEALER sockets over loopback.

Every wait has a deadline; processes are stopped (and killed if they do not stop) when the
test ends, and the shm_prefix fixture checks that nothing is left in /dev/shm.
"""

from __future__ import annotations

import json
import queue
import time
import traceback
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth

from engine.config import EngineConfig
from engine.records import (CMD_DEPOSIT, CMD_SET_MARK, COMMAND_DTYPE, bracket_command,
                            market_create_command, market_limits_command, market_risk_command,
                            new_commands)
from engine.service import MatcherService
from engine.shared_state import attach_state
from engine.spec import Source
from shm import names
from engine.state import C_SEQ, state_hash
from engine.market import MarketTable
from shm.ring import CommandRing
from tests.shm_workers import attach_when_ready
from tests.child_processes import child_context, start_child

ENGINE = EngineConfig(max_accounts=16, max_markets=4, max_orders=2048, max_levels_per_side=256)
SOURCES = [Source("ops", privileged=True), Source("gateway-0", privileged=False),
           Source("gateway-1", privileged=False)]
CONSUMERS = ["gateway-0", "gateway-1", "test"]
GATEWAY_SOURCE_INDEX = 1

MARKETS = [
    {"symbol": "BTC-PERP", "id": 0, "tick_size": "0.1", "lot_size": "0.001"},
    {"symbol": "ETH-PERP", "id": 1, "tick_size": "0.01", "lot_size": "0.01"},
]
BTC, ETH = 0, 1
BTC_MARK = 650_000          # 65000.0
ETH_MARK = 300_000          # 3000.00
MAKER_FEE = {BTC: 0.0002, ETH: -0.0001}
TAKER_FEE = {BTC: 0.0005, ETH: 0.0004}
# the default config's risk parameters (PROTOCOL.md): [notional floor in USDC, rate e9]
BRACKETS = ((0, 4_000_000), (50_000, 5_000_000), (250_000, 10_000_000), (1_000_000, 25_000_000))
LIQUIDATION_FEE_E9 = 5_000_000
FUNDING_CAP_E9 = 7_500_000
ACCOUNTS = (1, 2, 3, 4)
DEPOSIT_ATOMS = 10_000_000 * 10 ** 6      # 10M USDC each
STARTUP_S = 120.0                          # first start compiles the matcher (cached later)
WAIT_S = 10.0


def genesis() -> np.ndarray:
    cmds = [
        market_create_command(BTC, atoms_per_tick_lot=100, initial_mark_ticks=BTC_MARK,
                              maker_fee_e9=200_000, taker_fee_e9=500_000,
                              price_band_e9=100_000_000, max_leverage=50),
        market_limits_command(BTC, max_price_ticks=2_000_000, max_order_lots=100_000,
                              max_position_lots=1_000_000, max_open_orders=500),
        market_create_command(ETH, atoms_per_tick_lot=100, initial_mark_ticks=ETH_MARK,
                              maker_fee_e9=-100_000, taker_fee_e9=400_000,
                              price_band_e9=100_000_000, max_leverage=20),
        market_limits_command(ETH, max_price_ticks=3_000_000, max_order_lots=100_000,
                              max_position_lots=1_000_000, max_open_orders=500),
    ]
    for market in (BTC, ETH):
        cmds.append(market_risk_command(market, liquidation_fee_e9=LIQUIDATION_FEE_E9,
                                        funding_cap_e9=FUNDING_CAP_E9))
        for k, (floor_usdc, rate_e9) in enumerate(BRACKETS):
            cmds.append(bracket_command(market, k, floor_atoms=floor_usdc * 10 ** 6,
                                        maintenance_rate_e9=rate_e9))
    for account in ACCOUNTS:
        d = new_commands(1)
        d["cmd"] = CMD_DEPOSIT
        d["account"] = account
        d["amount_atoms"] = DEPOSIT_ATOMS
        cmds.append(d)
    return np.concatenate(cmds)


# -- child processes ----------------------------------------------------------------------------
def serve_matcher(prefix: str, stop) -> None:
    service = MatcherService(ENGINE, prefix, SOURCES, consumers=CONSUMERS)
    try:
        service.run(stop.is_set)
    finally:
        service.close()


def serve_gateway(prefix: str, options: dict, ready, stop) -> None:
    try:
        from gateway.server import Gateway
        durable_value = options.pop("durable_value", None)
        if durable_value is not None:        # durable mode, durable_seq played by the test
            options["ack_mode"] = "durable"
            options["durable_seq"] = lambda: durable_value.value
        options.setdefault("source_index", GATEWAY_SOURCE_INDEX)
        gw = Gateway(prefix, ENGINE, MarketTable.from_dicts(MARKETS), **options)
    except BaseException:
        ready.put(("error", traceback.format_exc()))
        raise
    try:
        ready.put(("ready", gw.endpoints()))
        gw.serve(stop.is_set)
    finally:
        gw.close()


# -- the exchange -------------------------------------------------------------------------------
class Exchange:
    def __init__(self, prefix: str, tmp: Path):
        self.prefix = prefix
        self.tmp = tmp
        self.ctx = child_context()
        self.procs: list = []
        self.zmq = zmq.Context()
        self.clients: list[Client] = []
        keys = tmp / "keys"
        self.accounts_dir = tmp / "accounts"
        keys.mkdir()
        self.accounts_dir.mkdir()
        _, self.server_secret_file = zmq.auth.create_certificates(keys, "server")
        self.server_public, _ = zmq.auth.load_certificate(self.server_secret_file)
        self.certs = {}
        for account in ACCOUNTS:
            self.certs[account] = self.new_cert(str(account), register_as=account)

    def new_cert(self, name: str, register_as: int | None = None) -> Path:
        public_file, secret_file = zmq.auth.create_certificates(self.tmp / "keys", name)
        if register_as is not None:
            self.register(public_file, register_as)
        return Path(secret_file)

    def register(self, public_file, account: int) -> None:
        target = self.accounts_dir / f"{account}.key"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(Path(public_file).read_text())
        tmp.rename(target)

    # processes
    def start_matcher(self) -> None:
        self._stop_matcher = self.ctx.Event()
        proc = start_child(serve_matcher, self.prefix, self._stop_matcher, name="matcher")
        self.procs.append((proc, self._stop_matcher))
        self.matcher = proc
        self.ops = attach_when_ready(
            lambda: CommandRing.attach(names.command_ring(self.prefix, "ops"), COMMAND_DTYPE),
            STARTUP_S)
        cmds = genesis()
        assert self.ops.write(cmds) == len(cmds)
        wait_until(lambda: self.seq() >= len(cmds), STARTUP_S, "genesis to be sequenced")

    def submit(self, cmds: np.ndarray) -> int:
        """Privileged commands through the ops ring; returns once they are sequenced (the seq
        of the last: tests send one thing at a time, so nothing else interleaves)."""
        target = self.seq() + len(cmds)
        assert self.ops.write(cmds) == len(cmds)
        wait_until(lambda: self.seq() >= target, WAIT_S, "ops commands to be sequenced")
        return target

    def set_mark(self, market: int, ticks: int) -> int:
        c = new_commands(1)
        c["cmd"], c["market"], c["price_ticks"] = CMD_SET_MARK, market, ticks
        return self.submit(c)

    def start_gateway(self, **options) -> dict:
        options.setdefault("accounts_dir", str(self.accounts_dir))
        options.setdefault("server_secret_key_file", str(self.server_secret_file))
        if options.get("index", 0) == 0:
            options.setdefault("market_data_endpoint", "tcp://127.0.0.1:*")
        options.setdefault("rate_per_s", 100_000.0)
        options.setdefault("burst", 100_000.0)
        ready = self.ctx.Queue()
        stop = self.ctx.Event()
        proc = start_child(serve_gateway, self.prefix, options, ready, stop, name="gateway")
        self.procs.append((proc, stop))
        try:
            kind, payload = ready.get(timeout=STARTUP_S)
        except queue.Empty:
            raise AssertionError("the gateway did not come up") from None
        if kind == "error":
            raise AssertionError(f"the gateway failed to start:\n{payload}")
        if options.get("index", 0) == 0:
            self.gateway = proc
            self.endpoints = payload
        return payload

    def client(self, account_or_cert, endpoints: dict | None = None,
               routing_id: bytes | None = None, watch_handshake: bool = False,
               slow_reader: bool = False) -> Client:
        cert = self.certs[account_or_cert] if isinstance(account_or_cert, int) else account_or_cert
        c = Client(self.zmq, (endpoints or self.endpoints)["orders"], self.server_public, cert,
                   routing_id, watch_handshake, slow_reader)
        self.clients.append(c)
        return c

    def restart_gateway(self, kill: bool = True, **options) -> dict:
        """Stop (or kill -9) the gateway and start a new one on the same rings."""
        for i, (proc, stop) in enumerate(self.procs):
            if proc is self.gateway:
                if kill:
                    proc.kill()
                else:
                    stop.set()
                proc.join(timeout=10)
                del self.procs[i]
                break
        return self.start_gateway(**options)

    def subscriber(self, *topics: str):
        sub = self.zmq.socket(zmq.SUB)
        sub.linger = 0
        for t in topics:
            sub.setsockopt(zmq.SUBSCRIBE, t.encode())
        sub.connect(self.endpoints["market_data"])
        return sub

    # state
    def seq(self) -> int:
        region, state = attach_when_ready(lambda: attach_state(self.prefix, ENGINE), WAIT_S)
        try:
            return int(state.counters[C_SEQ])
        finally:
            del state
            region.close()

    def quiet_state(self):
        """(seq, state hash, copy of the tables) once the matcher has stopped moving."""
        region, state = attach_when_ready(lambda: attach_state(self.prefix, ENGINE), WAIT_S)
        try:
            deadline = time.monotonic() + WAIT_S
            while True:
                s0 = int(state.counters[C_SEQ])
                h = state_hash(state)
                tables = {n: np.array(getattr(state, n)) for n in state._fields}
                time.sleep(0.05)
                if int(state.counters[C_SEQ]) == s0 and state_hash(state) == h:
                    return s0, h, tables
                if time.monotonic() > deadline:
                    raise AssertionError("the matcher did not go quiet")
        finally:
            del state
            region.close()

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for proc, stop in reversed(self.procs):
            stop.set()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        if getattr(self, "ops", None) is not None:
            self.ops.close()
        self.zmq.term()


def is_type(kind, **fields):
    return lambda m: m.get("type") == kind and all(m.get(k) == v for k, v in fields.items())


def order(cid, market, side, qty, price=None, **kw):
    msg = dict(type="new_order", cid=cid, market=market, side=side, qty=qty, **kw)
    if price is not None:
        msg["price"] = price
    return msg


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.002)


def gateway_stats(ex) -> dict:
    """The gateway's stats file (`ex.stats_file`), once it is written."""
    wait_until(ex.stats_file.exists, WAIT_S, "the stats file")
    return json.loads(ex.stats_file.read_text())


# -- a client -----------------------------------------------------------------------------------
class Client:
    def __init__(self, ctx: zmq.Context, endpoint: str, server_public: bytes, cert: Path,
                 routing_id: bytes | None = None, watch_handshake: bool = False,
                 slow_reader: bool = False):
        public, secret = zmq.auth.load_certificate(cert)
        s = self.sock = ctx.socket(zmq.DEALER)
        s.linger = 0
        if routing_id is not None:        # chosen by the client, as any client may
            s.routing_id = routing_id
        self.monitor = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED) \
            if watch_handshake else None
        s.rcvhwm = s.sndhwm = 100_000
        if slow_reader:        # buffers nothing on its side: what it does not read queues up
            s.rcvhwm, s.rcvbuf = 1, 4096
        s.sndtimeo = int(WAIT_S * 1000)      # a refused connection never blocks a test
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server_public
        s.connect(endpoint)
        self.inbox: list[dict] = []
        self.log: list[dict] = []      # everything this client ever received
        self._rid = 0

    def send(self, **msg) -> int:
        self._rid += 1
        msg.setdefault("rid", self._rid)
        self.sock.send(msgpack.packb(msg))
        return msg["rid"]

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float) -> dict | None:
        if self.sock.poll(int(timeout_s * 1000)):
            m = msgpack.unpackb(self.sock.recv())
            self.log.append(m)
            return m
        return None

    def wait_for(self, pred, timeout_s: float = WAIT_S, what: str = "a message") -> dict:
        for i, m in enumerate(self.inbox):
            if pred(m):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout_s} s; inbox: {self.inbox[-10:]}")
            m = self.recv(left)
            if m is None:
                continue
            if pred(m):
                return m
            self.inbox.append(m)

    def request(self, timeout_s: float = WAIT_S, **msg) -> dict:
        rid = self.send(**msg)
        return self.wait_for(lambda m: m.get("rid") == rid, timeout_s, f"reply to {msg}")

    def reports(self, quiet_s: float = 0.3) -> list[dict]:
        """Everything that arrives until nothing has come for quiet_s (plus the inbox)."""
        out, self.inbox = self.inbox, []
        while True:
            m = self.recv(quiet_s)
            if m is None:
                return out
            out.append(m)

    def wait_handshake(self, timeout_s: float = WAIT_S) -> None:
        """The CURVE handshake completed: the gateway's ROUTER has this connection."""
        if not self.monitor.poll(int(timeout_s * 1000)):
            raise AssertionError(f"no handshake within {timeout_s} s")
        self.monitor.recv_multipart()

    def close(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.sock.close(linger=0)


# ---- fixtures (tests that use them import shm_prefix from tests.shm_workers too) ----------
@pytest.fixture
def exchange_factory(shm_prefix, tmp_path):
    made = []

    def make(durable=False, **gateway_options):
        ex = Exchange(shm_prefix, tmp_path)
        made.append(ex)
        ex.start_matcher()
        if durable:
            ex.durable = gateway_options["durable_value"] = ex.ctx.Value("q", 0)
        ex.start_gateway(**gateway_options)
        return ex

    try:
        yield make
    finally:
        for ex in made:
            ex.close()


@pytest.fixture
def exchange(exchange_factory):
    return exchange_factory()
