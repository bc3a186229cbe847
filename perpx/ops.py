"""Operator actions on a running exchange: admin commands through the ops ring, and reads of
the matcher's published state.

Writes. The ops command ring has one producer at a time (SPSC), so every writer (each CLI
command, and the supervisor's genesis) takes an flock on STATE_DIR/ops.lock first. Holding it,
the writer joins the event ring as consumer "ops" at the current position (so it sees every
event from then on, and nothing older), writes its commands with fresh `req` tokens, reads
events until each command's closing event arrived (matched by source = the ops ring and
`req`), then deregisters (so the matcher never waits for a reader that left) and releases the
lock. Every wait has a deadline. The supervisor frees the "ops" slot if a CLI process dies
while holding it (see supervisor.Supervisor._reap_stale_ops_reader).

A command closes with EV_DONE (deposit: after its EV_BALANCE), EV_MARK (set mark) or
EV_REJECT.

Reads. `snapshot()` takes a consistent copy of the state tables at a command boundary
(gateway.mirror.consistent_state_copy) and builds the same Mirror a gateway keeps, so `book`,
`account show` and `positions` show exactly what the gateways answer, at one `seq`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace

import numpy as np
import zmq.auth

from engine.market import MarketTable
from engine.records import (CMD_CANCEL_ALL, CMD_DEPOSIT, CMD_HALT, CMD_RESUME,
                            CMD_SET_ACCOUNT_STATE, COMMAND_DTYPE, EVENT_DTYPE, EV_BALANCE,
                            EV_COMMAND, EV_DONE, EV_INSURANCE, EV_MARK, EV_REJECT, MARKET_SETTLED,
                            MARKET_STATE_NAMES, ORDER_EVENT_DTYPE, REASON_NAMES, event_to_dict,
                            insurance_deposit_command, market_state_command, new_commands,
                            settle_market_command)
from engine.shared_state import attach_state
from engine.state import C_NET_DEPOSITS_ATOMS, C_SEQ
from gateway.account_state import account_state_fields, positions_rows
from gateway.codec import open_order_row
from gateway.mirror import (M_ACTIVE, M_HALTED, M_LAST, M_MARK, M_STATE, Mirror, O_MARKET,
                            consistent_state_copy)
from perpx.config import Config, config_from_resolved
from perpx.statedir import FileLock, StateDir
from perpx.statedir import attach_retrying as _attach
from shm import names
from shm.index_board import IndexBoard
from shm.progress import JournalProgress
from shm.ring import CommandRing, EventRing

REPLY_TIMEOUT_S = 10.0
LOCK_TIMEOUT_S = 10.0
# Account 0 is the exchange's own (insurance fund / fee residues, DESIGN.md §4): never a client.
FIRST_CLIENT_ACCOUNT = 1
ACCOUNT_IDS_FILE = "account_ids"     # the highest account id ever handed out

_ADMIN_REJECT_TEXT = {
    19: "the matcher refused the market parameters",
    20: "the market already exists",
    21: "no such account (outside the engine's account table)",
}


class OpsError(RuntimeError):
    """The matcher refused a command, or did not answer in time."""


@dataclass
class Reply:
    req: int
    seq: int
    events: list            # event dicts (engine.records.event_to_dict), in order

    @property
    def last(self) -> dict:
        return self.events[-1]

    @property
    def rejected(self) -> bool:
        return self.last["etype"] == EV_REJECT

    def reason(self) -> str:
        code = self.last.get("reason", 0)
        text = _ADMIN_REJECT_TEXT.get(code)
        name = REASON_NAMES.get(code, str(code))
        return f"{name} ({text})" if text else name


class Exchange:
    """A handle on the exchange of a state directory, from any process."""

    def __init__(self, state_dir, require_running: bool = True):
        self.sd = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
        if require_running:
            self.sd.require_running()
        self.doc = self.sd.exchange()
        self.prefix = self.doc["prefix"]
        self.config: Config = config_from_resolved(self.doc)
        self.engine = self.config.engine_config()
        self.ops_index = [s["name"] for s in self.doc["sources"]].index("ops")

    def market(self, symbol: str):
        return self.config.market(symbol)

    # -- writes ---------------------------------------------------------------------------
    def session(self, timeout_s: float = REPLY_TIMEOUT_S) -> OpsSession:
        return OpsSession(self, timeout_s)

    def submit(self, commands: np.ndarray, timeout_s: float = REPLY_TIMEOUT_S) -> list[Reply]:
        with self.session(timeout_s) as s:
            return s.submit(commands)

    def submit_one(self, command: np.ndarray, what: str,
                   timeout_s: float = REPLY_TIMEOUT_S) -> Reply:
        reply = self.submit(command, timeout_s)[0]
        if reply.rejected:
            raise OpsError(f"{what}: rejected by the matcher: {reply.reason()}")
        return reply

    def deposit(self, account: int, atoms: int) -> Reply:
        self.check_account(account)
        c = new_commands(1)
        c["cmd"] = CMD_DEPOSIT
        c["account"] = account
        c["amount_atoms"] = atoms
        reply = self.submit_one(c, f"deposit to account {account}")
        if not any(e["etype"] == EV_BALANCE for e in reply.events):
            raise OpsError("deposit: the matcher answered without a balance change")
        return reply

    def set_account_state(self, account: int, disabled: bool,
                          cancel_orders: bool = False) -> tuple[Reply, Reply | None]:
        """`perpx account disable|enable`: a journaled command (CMD_SET_ACCOUNT_STATE). The
        gateways refuse a disabled account's keys at the handshake and close its sessions;
        with cancel_orders its open orders are canceled after it (the matcher's reply to
        that cancel_all is the second Reply)."""
        if not 0 <= account < self.engine.max_accounts:
            raise OpsError(f"account {account} is outside 0..{self.engine.max_accounts - 1}")
        c = new_commands(1)
        c["cmd"] = CMD_SET_ACCOUNT_STATE
        c["account"] = account
        c["qty_lots"] = 1 if disabled else 0
        reply = self.submit_one(c, f"{'disable' if disabled else 'enable'} account {account}")
        canceled = None
        if cancel_orders:
            c = new_commands(1)
            c["cmd"] = CMD_CANCEL_ALL
            c["account"] = account
            c["market"] = -1
            canceled = self.submit_one(c, f"cancel the orders of account {account}")
        return reply, canceled

    def set_market_state(self, symbol: str, state: str) -> Reply:
        """`perpx market state`: trading, cancel_only, reduce_only or halted (journaled)."""
        if state not in MARKET_STATE_NAMES[:MARKET_SETTLED]:
            raise OpsError(f"state must be one of {', '.join(MARKET_STATE_NAMES[:MARKET_SETTLED])}"
                           f", not {state!r} (settle with `perpx market settle`)")
        m = self.market(symbol)
        return self.submit_one(market_state_command(m.id, MARKET_STATE_NAMES.index(state)),
                               f"market state {symbol} {state}")

    def settle_market(self, symbol: str, price_text: str) -> Reply:
        """`perpx market settle`: close every position at the price, cancel every order."""
        m = self.market(symbol)
        try:
            ticks = m.price_to_ticks(price_text)
        except ValueError as e:
            raise OpsError(str(e)) from None
        return self.submit_one(settle_market_command(m.id, ticks), f"settle {symbol}")

    def fund_deposit(self, atoms: int) -> Reply:
        reply = self.submit_one(insurance_deposit_command(atoms), "insurance fund deposit")
        if not any(e["etype"] == EV_INSURANCE for e in reply.events):
            raise OpsError("fund deposit: the matcher answered without a fund change")
        return reply

    def halt(self, symbol: str, halted: bool) -> Reply:
        m = self.market(symbol)
        c = new_commands(1)
        c["cmd"] = CMD_HALT if halted else CMD_RESUME
        c["market"] = m.id
        return self.submit_one(c, f"{'halt' if halted else 'resume'} {symbol}")

    def set_index(self, symbol: str, price_text: str,
                  timeout_s: float = REPLY_TIMEOUT_S, force: bool = False) -> dict:
        """`perpx oracle set`: a manual market's index, through the IndexBoard to riskd.

        The price goes on the board (under the ops lock: one operator writer at a time); riskd
        picks it up on its next tick, computes the mark from it (riskd/mark.py: with no trades
        and no basis the mark is the index), writes SET_MARK into its ring and then publishes
        the version it applied. We wait for that, then for the matcher to hold that mark, so
        a read right after this returns sees it. Returns the published numbers (ticks)."""
        m = self.market(symbol)
        if m.oracle != "manual":
            raise OpsError(f"{symbol} takes its index from its {m.oracle.split(':')[0]!r} feed; "
                           f"`perpx oracle set` works only for markets with oracle = \"manual\"")
        ticks = m.price_to_ticks(price_text)
        deadline = time.monotonic() + timeout_s
        board = _attach(lambda: IndexBoard.attach(self.prefix, self.engine.max_markets))
        region, state = _attach(lambda: attach_state(self.prefix, self.engine))
        try:
            max_jump = Decimal((self.config.risk or {}).get("oracle_max_jump", "0"))
            current = board.published(m.id)
            if max_jump and current is not None and current.index_ticks and not force and \
                    abs(ticks - current.index_ticks) > max_jump * current.index_ticks:
                raise OpsError(f"oracle set {symbol}: {price_text} is more than "
                               f"{max_jump * 100:f}% from the current index "
                               f"{m.ticks_to_str(current.index_ticks)} ([risk] oracle_max_jump); "
                               f"use --force if you mean it")
            with FileLock(self.sd.ops_lock) as lock:
                lock.acquire(LOCK_TIMEOUT_S, "the index board")
                version = board.set(m.id, ticks)
            while True:
                published = board.published(m.id)
                if (published is not None and published.applied_version >= version
                        and int(state.markets["mark_ticks"][m.id]) == published.mark_ticks):
                    return {"index_ticks": published.index_ticks,
                            "mark_ticks": published.mark_ticks,
                            "seq": int(state.counters[C_SEQ])}
                if time.monotonic() > deadline:
                    raise OpsError(f"oracle set {symbol}: the index is on the board but riskd "
                                   f"has not applied it within {timeout_s:g} s (is riskd "
                                   f"running? see `perpx status`); it will when it runs")
                time.sleep(0.01)
        finally:
            del state
            region.close()
            board.close()

    def check_account(self, account: int) -> None:
        if not 0 <= account < self.engine.max_accounts:
            raise OpsError(f"account {account} is outside 0..{self.engine.max_accounts - 1}")
        if account not in self.sd.registered_accounts():
            raise OpsError(f"account {account} is not registered (create it with "
                           f"`perpx account create`)")

    # -- reads ----------------------------------------------------------------------------
    def snapshot(self, timeout_s: float = 5.0):
        """(Mirror, seq): the matcher's state at a command boundary, as a gateway mirrors it."""
        events = _attach(lambda: EventRing.attach(names.event_ring(self.prefix), EVENT_DTYPE))
        try:
            region, state = _attach(lambda: attach_state(self.prefix, self.engine))
            try:
                tables, seq = consistent_state_copy(state, events, timeout_s)
            finally:
                del state
                region.close()
        finally:
            events.close()
        mirror = Mirror.from_state(tables, seq, self.engine.max_markets)
        mirror.tables = tables
        return mirror, seq

    def counters(self) -> dict:
        """seq and friends straight from the state region (no copy of the tables)."""
        region, state = _attach(lambda: attach_state(self.prefix, self.engine))
        try:
            c = state.counters
            return {"seq": int(c[C_SEQ]), "net_deposits_atoms": int(c[C_NET_DEPOSITS_ATOMS])}
        finally:
            del state
            region.close()


class OpsSession:
    """The ops ring's single producer, for the duration of a `with` block."""

    def __init__(self, exchange: Exchange, timeout_s: float = REPLY_TIMEOUT_S):
        self.ex = exchange
        self.timeout_s = timeout_s
        self.lock = FileLock(exchange.sd.ops_lock)
        self.events = self.consumer = self.ring = None

    def __enter__(self) -> OpsSession:
        self.lock.acquire(LOCK_TIMEOUT_S, "the ops ring")
        try:
            prefix = self.ex.prefix
            self.events = _attach(lambda: EventRing.attach(names.event_ring(prefix), EVENT_DTYPE))
            self.consumer = self.events.consumer("ops", start="current")
            self.ring = _attach(lambda: CommandRing.attach(names.command_ring(prefix, "ops"),
                                                           COMMAND_DTYPE))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.consumer is not None:
            self.consumer.deregister()
            self.consumer = None
        for thing in (self.ring, self.events):
            if thing is not None:
                thing.close()
        self.ring = self.events = None
        self.lock.release()

    def submit(self, commands: np.ndarray) -> list[Reply]:
        """Send the commands; return each one's events once its closing event arrived."""
        cmds = np.array(commands, copy=True)
        n = len(cmds)
        base = 1 + int.from_bytes(os.urandom(4), "little") % (2 ** 30)
        cmds["req"] = base + np.arange(n)
        unstamped = cmds["ts_ns"] == 0
        cmds["ts_ns"][unstamped] = time.time_ns()
        replies = {base + i: Reply(base + i, 0, []) for i in range(n)}
        open_reqs = set(replies)
        sent = 0
        source = self.ex.ops_index
        deadline = time.monotonic() + self.timeout_s
        consumer = self.consumer
        while open_reqs:
            if sent < n:
                sent += self.ring.write(cmds[sent:])
            available = consumer.available()
            if not available:
                if time.monotonic() > deadline:
                    raise OpsError(f"no reply from the matcher within {self.timeout_s:g} s "
                                   f"({n - len(open_reqs)} of {n} commands answered; is the "
                                   f"matcher stalled? see `perpx status`)")
                consumer.wait(1, timeout_s=0.05)
                continue
            batch = consumer.peek(min(available, 1 << 16))
            consumer.advance(len(batch))
            reqs = batch.view(ORDER_EVENT_DTYPE)["req"]
            mine = np.flatnonzero((batch["source"] == source) & (batch["etype"] != EV_COMMAND)
                                  & (reqs >= base) & (reqs < base + n))
            for i in mine:
                event = event_to_dict(batch[i])
                reply = replies[event["req"]]
                reply.events.append(event)
                reply.seq = event["seq"]
                if event["etype"] in (EV_DONE, EV_MARK, EV_REJECT):
                    open_reqs.discard(event["req"])
        self._wait_durable(max(r.seq for r in replies.values()), deadline)
        return [replies[base + i] for i in range(n)]

    def _wait_durable(self, seq: int, deadline: float) -> None:
        """Like a gateway's acks, an operator's answer waits until the journal has it."""
        progress = _attach(lambda: JournalProgress.attach(self.ex.prefix))
        try:
            if not progress.wait_durable(seq, max(0.0, deadline - time.monotonic())):
                raise OpsError(f"seq {seq} was sequenced but is not journaled after "
                               f"{self.timeout_s:g} s (durable_seq {progress.durable_seq()}): "
                               f"is persistd running? see `perpx status`")
        finally:
            progress.close()


# ---- accounts ---------------------------------------------------------------------------------
def create_account(sd: StateDir, max_accounts: int) -> tuple[int, str]:
    """A new account id with a fresh CURVE certificate, registered for the gateways.

    The client's certificate (public + secret key) goes to clients/<id>.key_secret, its public
    key to accounts/<id>.key (the registry gateway/accounts.py reads: written to a temp name,
    then renamed, so a gateway never reads half a file). Ids are allocated under the ops lock:
    one more than the highest id ever handed out, starting at 1 (0 is the exchange's). Never
    reused: the highest is kept in STATE_DIR/account_ids (besides the key files, which an
    operator may delete), so a new account never inherits an old one's balance or positions.
    """
    sd.make()
    high_file = sd.path / ACCOUNT_IDS_FILE
    with FileLock(sd.ops_lock) as lock:
        lock.acquire(LOCK_TIMEOUT_S, "account create")
        taken = set(sd.registered_accounts())
        taken.update(int(p.name.split(".")[0]) for p in sd.clients_dir.glob("*.key_secret")
                     if p.name.split(".")[0].isdigit())
        if high_file.exists():
            taken.add(int(high_file.read_text().strip() or 0))
        account = max(taken, default=FIRST_CLIENT_ACCOUNT - 1) + 1
        if account >= max_accounts:
            raise OpsError(f"no account id left: ids go up to {max_accounts - 1} "
                           f"(engine.max_accounts)")
        tmp = high_file.with_name(f".{ACCOUNT_IDS_FILE}.tmp")     # before the key exists
        tmp.write_text(f"{account}\n")
        os.replace(tmp, high_file)
        public_file, secret_file = zmq.auth.create_certificates(str(sd.clients_dir), str(account))
        os.chmod(secret_file, 0o600)
        target = sd.accounts_dir / f"{account}.key"
        tmp = sd.accounts_dir / f".{account}.key.tmp"
        with open(public_file) as src:
            tmp.write_text(src.read())
        os.replace(tmp, target)
        os.unlink(public_file)   # the registry holds the public key; the client file both
    return account, str(secret_file)


# ---- formatting of state reads ------------------------------------------------------------------
def wire_markets(ex: Exchange) -> list:
    """The configured markets as the gateway's Market objects, indexed by market id."""
    table = MarketTable(ex.config.markets)
    return [table.by_id.get(m) for m in range(ex.engine.max_markets)]


def account_view(ex: Exchange, mirror, account: int) -> dict:
    """What `perpx account show` prints: the gateway's account_state (the same code,
    gateway/account_state.py, on a state copy), plus open orders."""
    markets = wire_markets(ex)
    view = {"account": account, "registered": account in ex.sd.registered_accounts()}
    view.update(account_state_fields(SimpleNamespace(**mirror.tables), account, markets))
    view["open_orders"] = [open_order_row(oid, o, status, markets[o[O_MARKET]])
                           for oid, o, status in sorted(mirror.open_orders(account))
                           if markets[o[O_MARKET]] is not None]
    view["seq"] = mirror.applied_seq
    return view


def positions_view(ex: Exchange, mirror, symbol: str | None) -> dict:
    only = ex.market(symbol).id if symbol else None
    markets = wire_markets(ex)
    sizes = mirror.tables["positions"]["size_lots"]
    open_interest = {m.symbol: m.lots_to_str(int(sizes[:, m.id].clip(min=0).sum()))
                     for m in markets if m is not None and only in (None, m.id)}
    return {"seq": mirror.applied_seq,
            "positions": positions_rows(SimpleNamespace(**mirror.tables), markets, only),
            "open_interest": open_interest}


def book_view(ex: Exchange, mirror, symbol: str, depth: int) -> dict:
    m = ex.market(symbol)
    bids, asks = mirror.book_levels(m.id, depth)
    return {"market": m.symbol, "seq": mirror.applied_seq,
            "bids": [[m.ticks_to_str(p), m.lots_to_str(q)] for p, q in bids],
            "asks": [[m.ticks_to_str(p), m.lots_to_str(q)] for p, q in asks]}


def markets_view(config: Config, mirror=None) -> list[dict]:
    """The markets as configured; with a live mirror also their mark, last price, halt flag
    and state (trading, cancel_only, reduce_only, halted, settled)."""
    out = []
    for m in config.markets:
        row = m.describe()
        if mirror is not None:
            mk = mirror.markets[m.id]
            row["live"] = {"active": bool(mk[M_ACTIVE]), "halted": bool(mk[M_HALTED]),
                           "state": MARKET_STATE_NAMES[mk[M_STATE]],
                           "mark_price": m.ticks_to_str(mk[M_MARK]) if mk[M_MARK] else None,
                           "last_price": m.ticks_to_str(mk[M_LAST]) if mk[M_LAST] else None}
        out.append(row)
    return out
