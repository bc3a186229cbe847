"""`perpx demo`: demo traders against a running exchange.

Three accounts are created through the same path as `perpx account create` (perpx.ops) and
funded, once per state dir: later runs reuse them (STATE_DIR/demo.json); one market maker
quotes every market a few levels each side around the mark (with a small random walk of its
own mid, kept inside the price band), re-quoting every ~200 ms with `amend` (a level whose
order is gone is placed anew); two takers send small market and IOC orders at random
intervals. Every second one line: orders/s, trades/s, open interest and
last price per market. Ctrl-C (or `seconds`, or the exchange stopping) stops it: the maker
cancels its quotes.

Each trader is a thread with its own `perpx.client.Client`; the main thread reads market
data and prints. CPU stays modest: the traders sleep between actions.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from decimal import Decimal

import zmq

from perpx.client import Client, ClientError, MarketData, load_endpoints

DEPOSIT_ATOMS = 10_000_000 * 10 ** 6       # 10M USDC each
DEMO_FILE = "demo.json"                    # the demo's account ids, reused by the next run
LEVELS = 3
REQUOTE_S = 0.2


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.orders = 0          # new_order + amend requests sent
        self.rejects = 0
        self.errors: list[str] = []

    def add(self, orders: int = 0, rejects: int = 0) -> None:
        with self.lock:
            self.orders += orders
            self.rejects += rejects


def demo_accounts(sd, n: int, atoms: int = DEPOSIT_ATOMS) -> list[tuple[int, str]]:
    """The demo's n accounts (id, certificate), funded: those of the last run when their
    certificates and registrations are still there (recorded in STATE_DIR/demo.json, topped up
    to `atoms` when below half of it), new ones otherwise, so that runs do not pile up accounts."""
    from perpx.config import write_json_atomic
    from perpx.ops import Exchange, account_view, create_account
    ex = Exchange(sd)
    record = sd.path / DEMO_FILE
    try:
        ids = [int(a) for a in json.loads(record.read_text())["accounts"]][:n]
    except (OSError, ValueError, KeyError, TypeError):
        ids = []
    registered = set(sd.registered_accounts())
    out = [(a, str(sd.clients_dir / f"{a}.key_secret")) for a in ids
           if a in registered and (sd.clients_dir / f"{a}.key_secret").exists()]
    if out:
        mirror, _ = ex.snapshot()
        for account, _ in out:
            balance_atoms = int(Decimal(account_view(ex, mirror, account)["balance"]) * 10 ** 6)
            if balance_atoms < atoms // 2:
                ex.deposit(account, atoms - balance_atoms)
    while len(out) < n:
        account, cert = create_account(ex.sd, ex.engine.max_accounts)
        ex.deposit(account, atoms)
        out.append((account, cert))
    write_json_atomic(record, {"accounts": [a for a, _ in out]})
    return out


def market_params(sd) -> dict:
    """symbol -> {tick, lot, mark (Decimal), band}: from the live exchange."""
    from perpx.ops import Exchange, markets_view
    ex = Exchange(sd)
    mirror, _ = ex.snapshot()
    out = {}
    for m, row in zip(ex.config.markets, markets_view(ex.config, mirror)):
        live = row.get("live", {})
        mark = live.get("mark_price") or live.get("last_price") or str(m.initial_price)
        out[m.symbol] = {"tick": m.tick_size, "lot": m.lot_size, "mark": Decimal(mark),
                         "band": getattr(m, "price_band", Decimal("0.1"))}
    return out


def _q(x: Decimal, step: Decimal) -> Decimal:
    return (x / step).to_integral_value() * step


def _s(x: Decimal) -> str:
    t = format(x.normalize(), "f")
    return t


class Maker(threading.Thread):
    def __init__(self, endpoints, cert, params, stats, stop, seed):
        super().__init__(name="demo-maker", daemon=True)
        self.endpoints, self.cert, self.params = endpoints, cert, params
        self.stats, self.stop_event = stats, stop
        self.rng = random.Random(seed)
        self.mid = {s: p["mark"] for s, p in params.items()}
        self.slots: dict[tuple, int] = {}      # (market, side, level) -> cid of the live quote

    def run(self):
        try:
            c = Client.connect(self.endpoints, self.cert, cancel_on_disconnect=True)
        except ClientError as e:
            self.stats.errors.append(f"maker: {e}")
            return
        try:
            while not self.stop_event.is_set():
                t0 = time.monotonic()
                for symbol in self.params:
                    self.requote(c, symbol)
                c.reports()      # fills and cancels: the next amend tells whether a quote lives
                self.stop_event.wait(max(REQUOTE_S - (time.monotonic() - t0), 0.01))
            for symbol in self.params:
                c.cancel_all(symbol)
        except ClientError as e:
            self.stats.errors.append(f"maker: {e}")
        finally:
            c.close()

    def requote(self, c: Client, symbol: str) -> None:
        p = self.params[symbol]
        tick, lot, mark = p["tick"], p["lot"], p["mark"]
        step = max(_q(mark * Decimal("0.0002"), tick), tick)       # 2 bp between levels
        drift = self.rng.choice((-1, 0, 0, 1)) * tick * max(int(step / tick) // 2, 1)
        lo, hi = mark * (1 - p["band"] / 4), mark * (1 + p["band"] / 4)
        mid = min(max(self.mid[symbol] + drift, lo), hi)
        up = mid >= self.mid[symbol]
        self.mid[symbol] = mid
        size = max(_q(Decimal(2000) / mark, lot), lot)             # ~2000 USDC a level
        # move the side that the mid moves towards first, so own quotes never cross
        sides = ("sell", "buy") if up else ("buy", "sell")
        for side in sides:
            for level in range(LEVELS):
                off = step * (level + 1)
                price = _q(mid - off if side == "buy" else mid + off, tick)
                key = (symbol, side, level)
                cid = self.slots.get(key)
                reply = None
                if cid is not None:
                    reply = c.amend(cid=cid, price=_s(price), qty=_s(size))
                    self.stats.add(orders=1)
                if reply is None or reply.get("type") != "amended":
                    cid = c.next_cid()
                    reply = c.new_order(symbol, side, "limit", _s(size), _s(price), cid=cid)
                    self.stats.add(orders=1)
                    if reply.get("type") == "ack" and reply.get("status") == "open":
                        self.slots[key] = cid
                    else:
                        self.slots.pop(key, None)
                        if reply.get("type") == "reject":
                            self.stats.add(rejects=1)


class Taker(threading.Thread):
    def __init__(self, name, endpoints, cert, params, stats, stop, seed):
        super().__init__(name=name, daemon=True)
        self.endpoints, self.cert, self.params = endpoints, cert, params
        self.stats, self.stop_event = stats, stop
        self.rng = random.Random(seed)
        self.fills = 0

    def run(self):
        try:
            c = Client.connect(self.endpoints, self.cert)
        except ClientError as e:
            self.stats.errors.append(f"{self.name}: {e}")
            return
        symbols = list(self.params)
        try:
            while not self.stop_event.wait(self.rng.uniform(0.02, 0.15)):
                symbol = self.rng.choice(symbols)
                p = self.params[symbol]
                side = self.rng.choice(("buy", "sell"))
                qty = p["lot"] * self.rng.randint(1, 5) * max(
                    int(_q(Decimal(200) / p["mark"], p["lot"]) / p["lot"]), 1)
                if self.rng.random() < 0.5:
                    reply = c.new_order(symbol, side, "market", _s(qty))
                else:
                    off = p["mark"] * Decimal("0.002")
                    price = _q(p["mark"] + off if side == "buy" else p["mark"] - off, p["tick"])
                    reply = c.new_order(symbol, side, "limit", _s(qty), _s(price), tif="ioc")
                self.stats.add(orders=1, rejects=int(reply.get("type") == "reject"))
                self.fills += sum(1 for r in c.reports() if r.get("type") == "fill")
        except ClientError as e:
            self.stats.errors.append(f"{self.name}: {e}")
        finally:
            c.close()


def open_interest(sd) -> dict:
    from perpx.ops import Exchange, positions_view
    ex = Exchange(sd)
    mirror, _ = ex.snapshot()
    return positions_view(ex, mirror, None)["open_interest"]


def run_demo(state_dir, seconds: float | None = None, out=sys.stdout, seed: int | None = None,
             stop: threading.Event | None = None) -> dict:
    """Run until `seconds` pass, `stop` is set or Ctrl-C; returns the totals."""
    from perpx.statedir import StateDir
    sd = StateDir(state_dir)
    sd.require_running()
    endpoints = load_endpoints(sd.endpoints_file)
    params = market_params(sd)
    accounts = demo_accounts(sd, 3)
    rng = random.Random(seed)
    stop = stop or threading.Event()
    stats = Stats()
    maker = Maker(endpoints, accounts[0][1], params, stats, stop, rng.random())
    takers = [Taker(f"demo-taker-{i}", endpoints, cert, params, stats, stop, rng.random())
                for i, (_, cert) in enumerate(accounts[1:], 1)]
    ctx = zmq.Context()
    md = MarketData.connect(endpoints, list(params), ctx=ctx, settle_s=0.1)
    print(f"demo: maker account {accounts[0][0]}, takers "
          f"{', '.join(str(a) for a, _ in accounts[1:])}; Ctrl-C stops", file=out, flush=True)
    started = time.monotonic()
    threads = [maker, *takers]
    for t in threads:
        t.start()
    last_t, last_orders, last_trades = started, 0, 0
    try:
        while not stop.is_set():
            md.poll(0.05)
            now = time.monotonic()
            if seconds is not None and now - started >= seconds:
                break
            if now - last_t >= 1.0:
                if sd.supervisor_pid() is None:
                    print("demo: the exchange stopped", file=out, flush=True)
                    break
                dt = now - last_t
                try:
                    oi = open_interest(sd)
                except Exception as e:        # a snapshot can time out under load
                    oi = {s: f"? ({type(e).__name__})" for s in params}
                parts = [f"{s} oi {oi.get(s, '?')} last {md.last_price.get(s, '-')}"
                         for s in params]
                print(f"[{now - started:5.1f}s] orders/s {(stats.orders - last_orders) / dt:6.1f}"
                      f"  trades/s {(md.trades - last_trades) / dt:6.1f}  " + "  ".join(parts),
                      file=out, flush=True)
                last_t, last_orders, last_trades = now, stats.orders, md.trades
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        md.poll(0.2)
        md.close()
        ctx.term()
    elapsed = time.monotonic() - started
    result = {"seconds": round(elapsed, 3), "accounts": [a for a, _ in accounts],
              "orders": stats.orders, "rejects": stats.rejects, "trades": md.trades,
              "taker_fills": sum(t.fills for t in takers),
              "last_price": dict(md.last_price), "errors": list(stats.errors)}
    print(f"demo: stopped after {elapsed:.1f} s: {stats.orders} orders, {md.trades} trades, "
          f"{stats.rejects} rejects" + (f", errors: {stats.errors}" if stats.errors else ""),
          file=out, flush=True)
    return result
