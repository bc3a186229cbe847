"""A harness for engine tests: every command runs through the reference model AND the compiled
matcher, their events must be identical, and their states must agree after every step.

Builders make command records with sensible BTC-like defaults; expectation builders (`ACK`,
`TRADE`, ...) make complete event dicts (every field of the event's layout, unspecified ones
zero), so `assert_events` compares events exactly, not field by field.
"""

from __future__ import annotations

import functools

import numpy as np

from engine.book import level_slots, order_slots
from engine.config import EngineConfig
from engine.invariants import check_state, collateral_totals
from engine.matcher import LocalEvents, Matcher
from engine.records import (
    BALANCE_EVENT_DTYPE, EV_FUNDING, EV_INSURANCE, EV_LIQUIDATION, FUNDING_EVENT_DTYPE,
    INSURANCE_EVENT_DTYPE, LIQUIDATION_EVENT_DTYPE, CMD_AMEND, CMD_CANCEL, CMD_CANCEL_ALL, CMD_DEPOSIT, CMD_HALT,
    CMD_NEW_ORDER, CMD_RESUME, CMD_SET_MARK, CMD_WITHDRAW, COMMAND_DTYPE, EV_ACK, EV_AMENDED,
    EV_BALANCE, EV_CANCELED, EV_COMMAND, EV_DONE, EV_MARK, EV_REJECT, EV_TRADE, EV_TRIGGERED,
    FLAG_REDUCE_ONLY,
    KIND_LIMIT, KIND_MARKET, MARK_EVENT_DTYPE, ORDER_EVENT_DTYPE, REASON_NAMES, SIDE_BUY,
    SIDE_SELL, STATUS_CANCELED, STATUS_OPEN, STP_CANCEL_TAKER, TIF_GTC, TRADE_EVENT_DTYPE,
    bracket_command, funding_command, liquidate_command, market_create_command,
    market_limits_command, market_risk_command, new_commands, set_margin_command,
)
from engine.reference import RISK_RAISING_COMMANDS, ReferenceMatcher
from engine.state import (C_FEES_ATOMS, C_INSURANCE_ATOMS, C_NET_DEPOSITS_ATOMS, C_NEXT_OID,
                          C_NEXT_TRADE_ID, C_SEQ, NONE, state_hash)

# ---- the BTC-like market ------------------------------------------------------------------
# tick 0.1 USD x lot 0.001 BTC = 0.0001 USD = 100 atoms of 1e-6 USDC
BTC = 0
ATPL = 100
MARK = 650_000                 # 65000.0 USD
MAKER_FEE_E9 = -100_000        # -0.01% (rebate)
TAKER_FEE_E9 = 500_000         # 0.05%
BAND_E9 = 100_000_000          # 10%
LEVERAGE = 50
MAX_PRICE = 10_000_000         # 1,000,000.0 USD
MAX_ORDER = 1_000_000          # 1000 BTC
MAX_POSITION = 10_000_000      # 10000 BTC
MAX_OPEN_ORDERS = 8
BAND_DEV = MARK * BAND_E9 // 1_000_000_000     # 65000 ticks
USDC = 1_000_000               # atoms per USDC

CONFIG = EngineConfig(max_accounts=16, max_markets=4, max_orders=128, max_levels_per_side=32)

ADMIN_SOURCE = 0
CLIENT_SOURCE = 1

ETYPE_NAMES = {EV_COMMAND: "command", EV_ACK: "ack", EV_REJECT: "reject", EV_TRADE: "trade",
               EV_CANCELED: "canceled", EV_AMENDED: "amended", EV_DONE: "done",
               EV_BALANCE: "balance", EV_MARK: "mark", EV_FUNDING: "funding",
               EV_LIQUIDATION: "liquidation", EV_INSURANCE: "insurance",
               EV_TRIGGERED: "triggered"}
STATUS_NAMES = {0: "-", 1: "open", 2: "filled", 3: "canceled", 4: "untriggered"}
# name -> code; for a name several codes share (invalid_message, forbidden, ...) the first code
NAME_TO_REASON = {}
for _code, _name in sorted(REASON_NAMES.items()):
    NAME_TO_REASON.setdefault(_name, _code)


def reason_name(event_or_code) -> str:
    code = event_or_code["reason"] if isinstance(event_or_code, dict) else event_or_code
    return REASON_NAMES[int(code)]


def _reason(value) -> int:
    return NAME_TO_REASON[value] if isinstance(value, str) else int(value)


# ---- fee / money arithmetic in Python big ints (independent of engine.numbers) -------------
def notional(price_ticks: int, qty_lots: int, atpl: int = ATPL) -> int:
    return price_ticks * qty_lots * atpl


def fee(notional_atoms: int, fee_e9: int) -> int:
    """Charged rounded up; a rebate paid rounded down (exchange's favour)."""
    if fee_e9 >= 0:
        return -((-notional_atoms * fee_e9) // 1_000_000_000)
    return -((notional_atoms * -fee_e9) // 1_000_000_000)


def taker_fee(price, qty, atpl=ATPL, rate=TAKER_FEE_E9):
    return fee(notional(price, qty, atpl), rate)


def maker_fee(price, qty, atpl=ATPL, rate=MAKER_FEE_E9):
    return fee(notional(price, qty, atpl), rate)


def margin_required(exposure_lots: int, mark=MARK, atpl=ATPL, leverage=LEVERAGE) -> int:
    """Lots times the initial margin of one lot, rounded up (docs/matching.md)."""
    return exposure_lots * -((-mark * atpl) // leverage)


class PyPosition:
    """The cost-basis rule in plain big-int Python: closing lots take their share of the cost
    (truncated toward zero), a flip opens the rest at the fill price."""

    def __init__(self, atpl=ATPL):
        self.atpl = atpl
        self.size = 0
        self.cost = 0

    def fill(self, delta: int, price: int) -> int:
        """Apply a signed fill; returns realized PnL in atoms."""
        if self.size == 0 or (self.size > 0) == (delta > 0):
            self.size += delta
            self.cost += delta * price * self.atpl
            return 0
        whole, wanted = abs(self.size), abs(delta)
        close = min(whole, wanted)
        removed = self.cost if close == whole else (abs(self.cost) * close // whole) * (
            1 if self.cost >= 0 else -1)
        closing_delta = close if delta > 0 else -close
        realized = -(closing_delta * price * self.atpl) - removed
        self.size += closing_delta
        self.cost -= removed
        rest = delta - closing_delta
        if rest:
            self.size += rest
            self.cost += rest * price * self.atpl
        return realized

    def upnl(self, mark):
        return self.size * mark * self.atpl - self.cost


# ---- command builders ---------------------------------------------------------------------
def command(**fields) -> np.ndarray:
    """One command record from raw fields (anything not given is zero)."""
    c = new_commands(1)
    for k, v in fields.items():
        c[k] = v
    return c


def create_market(market=BTC, *, atpl=ATPL, mark=MARK, maker_fee_e9=MAKER_FEE_E9,
                  taker_fee_e9=TAKER_FEE_E9, band_e9=BAND_E9, leverage=LEVERAGE, ts=0):
    return market_create_command(market, atoms_per_tick_lot=atpl, initial_mark_ticks=mark,
                                 maker_fee_e9=maker_fee_e9, taker_fee_e9=taker_fee_e9,
                                 price_band_e9=band_e9, max_leverage=leverage, ts_ns=ts)


def set_limits(market=BTC, *, max_price=MAX_PRICE, max_order=MAX_ORDER,
               max_position=MAX_POSITION, max_open_orders=MAX_OPEN_ORDERS, ts=0):
    return market_limits_command(market, max_price_ticks=max_price, max_order_lots=max_order,
                                 max_position_lots=max_position, max_open_orders=max_open_orders,
                                 ts_ns=ts)


def market_commands(market=BTC, *, max_price=MAX_PRICE, max_order=MAX_ORDER,
                    max_position=MAX_POSITION, max_open_orders=MAX_OPEN_ORDERS, **create):
    """CREATE_MARKET then SET_MARKET_LIMITS."""
    return np.concatenate([
        create_market(market, **create),
        set_limits(market, max_price=max_price, max_order=max_order, max_position=max_position,
                   max_open_orders=max_open_orders),
    ])


def deposit(account, amount, *, market=0, req=0):
    return command(cmd=CMD_DEPOSIT, account=account, amount_atoms=amount, market=market, req=req)


def withdraw(account, amount, *, market=0, req=0):
    return command(cmd=CMD_WITHDRAW, account=account, amount_atoms=amount, market=market, req=req)


def order(account, side, qty, price=0, *, kind=KIND_LIMIT, tif=TIF_GTC, reduce_only=False,
          stp=STP_CANCEL_TAKER, cid=0, market=BTC, req=0, flags=None, ts=0):
    return command(cmd=CMD_NEW_ORDER, account=account, side=side, qty_lots=qty, price_ticks=price,
                   kind=kind, tif=tif, stp=stp, cid=cid, market=market, req=req, ts_ns=ts,
                   flags=(FLAG_REDUCE_ONLY if reduce_only else 0) if flags is None else flags)


def buy(account, qty, price, **kw):
    return order(account, SIDE_BUY, qty, price, **kw)


def sell(account, qty, price, **kw):
    return order(account, SIDE_SELL, qty, price, **kw)


def market_order(account, side, qty, **kw):
    kw.setdefault("tif", TIF_GTC)   # a market order's GTC means IOC
    return order(account, side, qty, 0, kind=KIND_MARKET, **kw)


def cancel(account, *, oid=0, cid=0, market=BTC, req=0):
    return command(cmd=CMD_CANCEL, account=account, oid=oid, cid=cid, market=market, req=req)


def cancel_all(account, market=-1, *, req=0):
    return command(cmd=CMD_CANCEL_ALL, account=account, market=market, req=req)


def amend(account, *, oid=0, cid=0, price=0, qty=0, market=BTC, req=0):
    return command(cmd=CMD_AMEND, account=account, oid=oid, cid=cid, price_ticks=price,
                   qty_lots=qty, market=market, req=req)


def set_mark(price, market=BTC, *, req=0):
    return command(cmd=CMD_SET_MARK, market=market, price_ticks=price, req=req)


# Binance BTCUSDT-like maintenance brackets (floor in atoms, rate e9) and risk parameters
BTC_BRACKETS = ((0, 4_000_000), (50_000 * 1_000_000, 5_000_000),
                (250_000 * 1_000_000, 10_000_000), (1_000_000 * 1_000_000, 25_000_000))
LIQUIDATION_FEE_E9 = 5_000_000     # 0.5%
FUNDING_CAP_E9 = 7_500_000         # 0.75%


def risk_commands(market=BTC, *, brackets=BTC_BRACKETS, liquidation_fee_e9=LIQUIDATION_FEE_E9,
                  funding_cap_e9=FUNDING_CAP_E9):
    """SET_MARKET_RISK and the SET_BRACKETs of a market (what genesis sends)."""
    cmds = [market_risk_command(market, liquidation_fee_e9=liquidation_fee_e9,
                                funding_cap_e9=funding_cap_e9)]
    cmds += [bracket_command(market, k, floor_atoms=b[0], maintenance_rate_e9=b[1],
                             max_leverage=b[2] if len(b) > 2 else 0)
             for k, b in enumerate(brackets)]
    return np.concatenate(cmds)


def set_margin(account, mode, leverage, market=BTC, *, req=0):
    return set_margin_command(account, market, mode=mode, leverage=leverage, req=req)


def funding(rate_e9, market=BTC):
    return funding_command(market, rate_e9=rate_e9)


def liquidate(account, market=-1):
    return liquidate_command(account, market)


def halt(market=BTC):
    return command(cmd=CMD_HALT, market=market)


def resume(market=BTC):
    return command(cmd=CMD_RESUME, market=market)


# ---- expected events (complete dicts, header seq/ts/source aside) -------------------------
def _layout_fields(dtype):
    return [n for n in dtype.names if not n.startswith("_")
            and n not in ("seq", "ts_ns", "etype", "source")]


_FIELDS = {
    EV_ACK: _layout_fields(ORDER_EVENT_DTYPE), EV_REJECT: _layout_fields(ORDER_EVENT_DTYPE),
    EV_CANCELED: _layout_fields(ORDER_EVENT_DTYPE), EV_AMENDED: _layout_fields(ORDER_EVENT_DTYPE),
    EV_DONE: _layout_fields(ORDER_EVENT_DTYPE), EV_TRADE: _layout_fields(TRADE_EVENT_DTYPE),
    EV_TRIGGERED: _layout_fields(ORDER_EVENT_DTYPE),
    EV_BALANCE: _layout_fields(BALANCE_EVENT_DTYPE), EV_MARK: _layout_fields(MARK_EVENT_DTYPE),
    EV_FUNDING: _layout_fields(FUNDING_EVENT_DTYPE),
    EV_LIQUIDATION: _layout_fields(LIQUIDATION_EVENT_DTYPE),
    EV_INSURANCE: _layout_fields(INSURANCE_EVENT_DTYPE),
}


def expected(etype, **fields) -> dict:
    unknown = set(fields) - set(_FIELDS[etype])
    assert not unknown, f"{ETYPE_NAMES[etype]} has no fields {unknown}"
    out = {"etype": etype}
    for name in _FIELDS[etype]:
        out[name] = int(fields.get(name, 0))
    return out


def ACK(account, oid, status, qty, price=0, *, side=SIDE_BUY, kind=KIND_LIMIT, cid=0,
        remaining=0, req=0, market=BTC):
    return expected(EV_ACK, market=market, account=account, req=req, status=status, side=side,
                    kind=kind, oid=oid, cid=cid, price_ticks=price, qty_lots=qty,
                    remaining_lots=remaining)


def REJECT(account, reason, *, side=SIDE_BUY, kind=KIND_LIMIT, oid=0, cid=0, req=0, market=BTC):
    return expected(EV_REJECT, market=market, account=account, req=req, reason=_reason(reason),
                    side=side, kind=kind, oid=oid, cid=cid)


def CANCELED(account, oid, reason, lots, price=0, *, side=SIDE_BUY, kind=KIND_LIMIT, cid=0,
             req=0, market=BTC):
    return expected(EV_CANCELED, market=market, account=account, req=req,
                    reason=_reason(reason), status=STATUS_CANCELED, side=side, kind=kind,
                    oid=oid, cid=cid, price_ticks=price, remaining_lots=lots)


def AMENDED(account, oid, price, qty, *, reason=0, side=SIDE_BUY, kind=KIND_LIMIT, cid=0,
            req=0, market=BTC):
    return expected(EV_AMENDED, market=market, account=account, req=req, reason=_reason(reason),
                    status=STATUS_OPEN, side=side, kind=kind, oid=oid, cid=cid,
                    price_ticks=price, qty_lots=qty, remaining_lots=qty)


def DONE(account, count=0, *, market=BTC, req=0):
    return expected(EV_DONE, market=market, account=account, req=req, qty_lots=count)


def BALANCE(account, amount, balance, *, market=0, req=0):
    return expected(EV_BALANCE, market=market, account=account, req=req, amount_atoms=amount,
                    balance_atoms=balance)


def MARK_EV(mark, *, market=BTC, account=0, req=0):
    return expected(EV_MARK, market=market, account=account, req=req, mark_ticks=mark)


def TRADE(taker, oid, side, price, qty, remaining, maker, maker_oid, maker_remaining, *,
          trade_id, fee_atoms=None, maker_fee_atoms=None, cid=0, maker_cid=0, req=0, market=BTC,
          atpl=ATPL, taker_rate=TAKER_FEE_E9, maker_rate=MAKER_FEE_E9):
    """A trade; fees default to the market's rates on price x qty (big-int arithmetic)."""
    n = notional(price, qty, atpl)
    return expected(EV_TRADE, market=market, account=taker, req=req, side=side,
                    trade_id=trade_id, price_ticks=price, qty_lots=qty, oid=oid, cid=cid,
                    remaining_lots=remaining,
                    fee_atoms=fee(n, taker_rate) if fee_atoms is None else fee_atoms,
                    maker_account=maker, maker_oid=maker_oid, maker_cid=maker_cid,
                    maker_remaining_lots=maker_remaining,
                    maker_fee_atoms=fee(n, maker_rate) if maker_fee_atoms is None
                    else maker_fee_atoms)


# ---- rendering and picking ------------------------------------------------------------------
def render(event: dict) -> str:
    name = ETYPE_NAMES.get(event["etype"], str(event["etype"]))
    parts = [name, f"acct={event.get('account')}"]
    if "reason" in event and event["reason"]:
        parts.append(f"reason={reason_name(event)}")
    if event["etype"] in (EV_ACK, EV_CANCELED, EV_AMENDED, EV_TRIGGERED):
        parts.append(f"status={STATUS_NAMES.get(event['status'], event['status'])}")
    for k in ("oid", "cid", "price_ticks", "qty_lots", "remaining_lots", "fee_atoms",
              "maker_account", "maker_oid", "maker_remaining_lots", "maker_fee_atoms",
              "amount_atoms", "balance_atoms", "mark_ticks"):
        if k in event and event[k]:
            parts.append(f"{k}={event[k]}")
    return " ".join(parts)


def render_all(events) -> str:
    return "\n".join(render(e) for e in events)


def body(events) -> list[dict]:
    """The events without the EV_COMMAND records."""
    return [e for e in events if e["etype"] != EV_COMMAND]


def pick(events, etype) -> list[dict]:
    return [e for e in events if e["etype"] == etype]


def reasons(events) -> list[str]:
    return [reason_name(e) for e in events if e["etype"] in (EV_REJECT, EV_CANCELED)]


def assert_events(events, want: list[dict]):
    """Exact comparison of the non-command events (header seq/ts/source aside)."""
    got = [{k: v for k, v in e.items() if k not in ("seq", "ts_ns", "source")}
           for e in body(events)]
    if got != want:
        lines = ["events differ", "got:", render_all(got), "want:", render_all(want)]
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                diff = {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)}
                lines.append(f"first difference at {i} (got, want): {diff}")
                break
        raise AssertionError("\n".join(lines))


def the_reject(events) -> dict:
    """The single reject a command caused (asserts there is exactly one and nothing else)."""
    b = body(events)
    assert len(b) == 1 and b[0]["etype"] == EV_REJECT, render_all(b)
    return b[0]


# ---- the harness ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def warm_up() -> bool:
    """Compile (or load from cache) every compiled path once per session."""
    e = Engines()
    e.admin(market_commands(), deposit(1, 100 * USDC), deposit(2, 100 * USDC))
    e.client(buy(1, 1, MARK, cid=1), sell(2, 2, MARK, tif=1), amend(1, cid=1, qty=1),
             cancel(1, cid=1), cancel_all(1), withdraw(1, 1))
    return True


class Engines:
    """The reference model and the compiled matcher fed the same commands."""

    def __init__(self, config: EngineConfig = CONFIG, ring_capacity: int | None = None,
                 check_every_step: bool = True):
        self.config = config
        self.ref = ReferenceMatcher(config)
        self.matcher = Matcher(config)
        cap = 1 << max(10, (config.event_bound() + 64).bit_length())
        self.ring = LocalEvents(ring_capacity or cap)
        self.check_every_step = check_every_step

    # -- running --
    def run(self, *commands, privileged=True, source=ADMIN_SOURCE) -> list[dict]:
        recs = np.concatenate([np.asarray(c, COMMAND_DTYPE).reshape(-1) for c in commands])
        want = []
        for rec in recs:
            account = int(rec["account"])
            raising = (int(rec["cmd"]) in RISK_RAISING_COMMANDS
                       and 0 <= account < self.config.max_accounts)
            before = self.ref.risk_snapshot(account) if raising else None
            want.extend(self.ref.process({k: int(rec[k]) for k in COMMAND_DTYPE.names}, source,
                                         privileged))
            if raising:
                assert not self.ref.check_risk_raised(account, before)
        got = self.ring.run(self.matcher, recs, source=source, privileged=privileged)
        if got != want:
            for i, (g, w) in enumerate(zip(got, want)):
                if g != w:
                    raise AssertionError(
                        f"engines disagree at event {i}:\ncompiled:  {g}\nreference: {w}\n"
                        f"compiled events:\n{render_all(got)}\n"
                        f"reference events:\n{render_all(want)}")
            raise AssertionError(f"{len(got)} compiled events, {len(want)} reference events\n"
                                 f"compiled:\n{render_all(got)}\nreference:\n{render_all(want)}")
        self._check_headers(got, recs, source)
        if self.check_every_step:
            self.check()
        return got

    def admin(self, *commands):
        return self.run(*commands, privileged=True, source=ADMIN_SOURCE)

    def client(self, *commands):
        return self.run(*commands, privileged=False, source=CLIENT_SOURCE)

    def _check_headers(self, events, recs, source):
        cmds = [e for e in events if e["etype"] == EV_COMMAND]
        assert len(cmds) == len(recs)
        seq0 = self.seq - len(recs)
        for k, e in enumerate(cmds):
            assert e["seq"] == seq0 + k + 1
            assert e["command"] == {n: int(recs[k][n]) for n in COMMAND_DTYPE.names}
        k = -1
        for e in events:
            if e["etype"] == EV_COMMAND:
                k += 1
            assert k >= 0, "an event before its command"
            assert e["seq"] == seq0 + k + 1 and e["ts_ns"] == int(recs[k]["ts_ns"])
            assert e["source"] == source

    # -- state, from both engines (asserted equal) --
    @property
    def st(self):
        return self.matcher.state

    @property
    def seq(self) -> int:
        assert self.matcher.seq == self.ref.seq
        return self.ref.seq

    def balance(self, account) -> int:
        a = int(self.st.accounts["balance_atoms"][account])
        assert a == self.ref.balances[account]
        return a

    def position(self, account, market=BTC) -> tuple[int, int]:
        """(size_lots, cost_atoms)"""
        return self.position_full(account, market)[:2]

    def position_full(self, account, market=BTC) -> tuple:
        """(size_lots, cost_atoms, open_buy_lots, open_sell_lots, open_orders)"""
        p = self.st.positions[account, market]
        got = tuple(int(p[f]) for f in ("size_lots", "cost_atoms", "open_buy_lots",
                                         "open_sell_lots", "open_orders"))
        r = self.ref.positions.get((account, market))
        want = (0, 0, 0, 0, 0) if r is None else (r.size_lots, r.cost_atoms, r.open_buy_lots,
                                                   r.open_sell_lots, r.open_orders)
        assert got == want, (got, want)
        return got

    def margin(self, account, market=BTC) -> tuple[int, int, int]:
        """(margin_mode, leverage, isolated_margin_atoms)"""
        p = self.st.positions[account, market]
        got = (int(p["margin_mode"]), int(p["leverage"]), int(p["isolated_margin_atoms"]))
        r = self.ref.positions.get((account, market))
        want = (0, 0, 0) if r is None else (r.margin_mode, r.leverage, r.isolated_margin_atoms)
        assert got == want, (got, want)
        return got

    def book(self, side, market=BTC) -> list[tuple[int, list[tuple[int, int, int]]]]:
        """[(price, [(oid, account, remaining), ...]), ...] best price first, FIFO inside."""
        st = self.st
        got = []
        for lvl in level_slots(st, market, side):
            orders = [(int(st.orders[s]["oid"]), int(st.orders[s]["account"]),
                       int(st.orders[s]["remaining_lots"])) for s in order_slots(st, lvl)]
            got.append((int(st.levels[lvl]["price_ticks"]), orders))
        want = []
        mk = self.ref.markets.get(market)
        if mk is not None:
            prices = mk.prices[side]
            for price in (reversed(prices) if side == SIDE_BUY else prices):
                want.append((price, [(o.oid, o.account, o.remaining_lots)
                                     for o in mk.levels[side][price]]))
        assert got == want, (got, want)
        return got

    def bids(self, market=BTC):
        return self.book(SIDE_BUY, market)

    def asks(self, market=BTC):
        return self.book(SIDE_SELL, market)

    def open_orders(self, account) -> list[tuple[int, int, int, int]]:
        """[(oid, cid, price, remaining)] of an account, in placement order."""
        st = self.st
        got = []
        slot = int(st.accounts["first_order"][account])
        while slot != NONE:
            o = st.orders[slot]
            got.append((int(o["oid"]), int(o["cid"]), int(o["price_ticks"]),
                        int(o["remaining_lots"])))
            slot = int(o["account_next"])
        want = [(o.oid, o.cid, o.price_ticks, o.remaining_lots)
                for o in self.ref.orders_of.get(account, {}).values()]
        assert got == want, (got, want)
        return got

    def counters(self) -> dict:
        c = self.st.counters
        got = {"fees": int(c[C_FEES_ATOMS]), "net_deposits": int(c[C_NET_DEPOSITS_ATOMS]),
               "insurance": int(c[C_INSURANCE_ATOMS]),
               "next_oid": int(c[C_NEXT_OID]),
               "next_trade_id": int(c[C_NEXT_TRADE_ID]), "seq": int(c[C_SEQ])}
        r = self.ref
        want = {"fees": r.fees_collected_atoms, "net_deposits": r.net_deposits_atoms,
                "insurance": r.insurance_atoms,
                "next_oid": r.next_oid,
                "next_trade_id": r.next_trade_id, "seq": r.seq}
        assert got == want, (got, want)
        return got

    def collateral(self) -> tuple[int, int]:
        """(holdings, net deposits) of the compiled state (engine.invariants.collateral_totals)."""
        return collateral_totals(self.st)

    def check(self):
        """Both engines in the same state, every invariant of DESIGN.md §8 holds."""
        self.ref.check_invariants()
        problems = check_state(self.st)
        assert not problems, problems
        self.counters()
        for a in range(self.config.max_accounts):
            self.balance(a)
        for m in range(self.config.max_markets):
            if m in self.ref.markets:
                for a in range(self.config.max_accounts):
                    self.position_full(a, m)
                    self.margin(a, m)
                self.bids(m)
                self.asks(m)
        for a in range(self.config.max_accounts):
            self.open_orders(a)
        total, net = self.collateral()
        assert total == net, f"collateral not conserved: {total} != {net}"

    def state_hash(self) -> str:
        return self.matcher.state_hash()

    def digest(self) -> str:
        """The state hash with the sequence counter and the report numbers masked: what a
        reject must not change (it is a command, and a report to its account)."""
        counters = self.st.counters.copy()
        counters[C_SEQ] = 0
        accounts = self.st.accounts.copy()
        accounts["account_seq"] = 0
        return state_hash(self.st._replace(counters=counters, accounts=accounts))


def btc_engines(*accounts_and_deposits, config=CONFIG, risk=False) -> Engines:
    """Engines with the BTC market set up and accounts funded: btc_engines((1, amount), ...).

    risk=True also sets the market's risk parameters and brackets (risk_commands)."""
    e = Engines(config)
    e.admin(market_commands())
    if risk:
        e.admin(risk_commands())
    for account, amount in accounts_and_deposits:
        e.admin(deposit(account, amount))
    return e
