"""The exchange's TOML config: keys, defaults, validation, exact conversion to engine units.

PROTOCOL.md ("Config is TOML") fixes the contract keys; the others below are extras, all with
defaults. `load_config(path)` reads a file (None: the bundled perpx/default.toml) and returns a
`Config`, or raises `ConfigError` whose text names the offending key, e.g.

    markets[1].tick_size: '0.0001' x lot_size '0.001' = 1E-7 USDC is not a whole number of 1e-6 USDC

Keys (defaults in brackets):

    [exchange]  gateways [1], ack_mode ["durable"] ("durable" | "fast"), pin_cpus [true],
                cpu_latency_us [0] (the limit on idle CPUs' declared wake-up latency that the
                exchange asks the kernel for while it runs, perpx/cpu_latency.py: 0 = idle
                CPUs poll; -1 = ask for nothing), huge_pages [false] (true: the exchange's
                processes keep their heap on transparent huge pages, perpx/heap.py),
                rate_limit_per_s [5000], rate_limit_burst [10000] (per account, per gateway),
                startup_timeout_s [180] (the first start compiles the matcher: ~1 min),
                max_connections [512] (per gateway), max_connections_per_account [8] (per
                gateway), max_queued_messages [10000] (>= 5000; per connection: a client that
                lets more queue up is dropped), max_queued_bytes [8388608] (>= 1 MiB; per
                connection, bytes its client has not taken: over it, dropped too),
                gateway_memory_limit_mb [1024] (>= 256; per gateway process: the memory its
                queues, held messages, replay log and views may take above what it needs to
                run; past it the connection with the most queued is dropped)
    [engine]    max_accounts [1024], max_markets [8], max_orders [65536],
                max_levels_per_side [max_orders] (price levels per book side; at least
                engine.config.book_levels_needed of every market: min(max_orders, the market's
                max_price in ticks)), max_trigger_orders [1024] (untriggered stops and
                take-profits per market), command_ring_capacity [16384],
                event_ring_capacity [0: engine.service's default], batch [256]
    [persistence] snapshot_every [1000000] (commands between state snapshots), snapshots_keep
                [2], store_flush_ms [500] (DuckDB batch interval), retire_journal [true]
                (delete journal segments older than the oldest snapshot kept)
    [risk]      mark_interval_ms [250] (riskd's tick: marks, funding samples, liquidation scan),
                seed [0] (sim index walks), funding_sample_ms [5000] (premium index samples,
                Binance's 5 s), liquidation_retry_ms [1000] (riskd re-sends a LIQUIDATE for an
                account that has not changed after this long), scan [true] (the liquidation
                scanner; false only for benchmarks of the rest), feed_stale_s [30] (a market
                whose index feed has failed this long goes cancel_only until it recovers),
                breaker_move ["0": off], breaker_window_s [60], breaker_halt_s [60] (a mark
                moving more than breaker_move within the window: cancel_only for halt_s),
                oracle_max_jump ["0": off] (`oracle set` further from the index needs --force)
    [endpoints] host ["127.0.0.1"], orders_port [7700] (gateway N binds orders_port + N),
                market_data_port [7800], metrics_port [7900] (Prometheus, perpx/metrics.py);
                a port of 0 means "any free port, chosen at start" (and kept across gateway
                restarts)
    [[markets]] symbol, tick_size, lot_size, initial_price (required); oracle ["sim"],
                max_leverage [20], maker_fee ["0.0002"], taker_fee ["0.0005"],
                price_band ["0.10"], brackets [see DEFAULT_BRACKETS], liquidation_fee ["0.005"],
                funding_interval_s [28800], interest_rate ["0.0001"], funding_cap ["0.0075"],
                min_notional ["0": none], max_stop_orders [10], open_interest_cap ["0": none],
                and the extras max_price, max_position_qty, max_order_qty, max_open_orders.

Numbers. Prices, quantities, amounts and rates are read as decimal.Decimal, never as binary
floats (TOML floats are parsed straight to Decimal, so `tick_size = 0.1` is exactly 0.1). The
conversions are exact or refused:
- atoms_per_tick_lot = tick_size x lot_size x 1e6 must be a whole number >= 1 (a tick move on
  one lot is a whole number of 1e-6 USDC: money never needs rounding at the fill);
- initial_price and max_price must lie on the tick grid, quantities on the lot grid;
- fees, price band, rates: whole numbers of 1e-9 (the engine's rate unit).

Limits (engine.market_checks.market_limits_problem proves int64 headroom with them). Defaults:
- max_price = 10 x initial_price. The mark can never exceed it (SET_MARK above it is refused),
  so a market that rallies tenfold needs a new config; a higher bound costs position headroom.
- max_position_qty: the largest position whose notional at max_price stays under
  NOTIONAL_LIMIT_ATOMS (2**54 atoms, 18e9 USDC) and within MAX_POSITION_LOTS_LIMIT, rounded
  down to two significant digits of lots (BTC-PERP default: 27,000 BTC; ETH-PERP: 510,000 ETH).
  Set it lower for a real venue; it may not be set higher.
- max_order_qty = max_position_qty / 10 (rounded down to two significant digits of lots).
- max_open_orders = 200 per account per market.

Market ids are the positions in the file (the first [[markets]] is market 0).
`genesis_commands(config)` gives the commands that create them: CREATE_MARKET,
SET_MARKET_LIMITS, SET_MARKET_RISK, the SET_BRACKETs and SET_MARKET_FILTERS per market, in id
order.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import time
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np

from engine.config import (MAX_FEE_E9, MAX_LEVERAGE, MAX_MARKETS_LIMIT, MAX_OPEN_ORDERS_LIMIT,
                           MAX_POSITION_LOTS_LIMIT, NOTIONAL_LIMIT_ATOMS, band_ticks,
                           book_levels_needed)
from engine.market import Bracket, Market
from engine.records import (MAX_BRACKETS, bracket_command, market_create_command,
                            market_filters_command, market_limits_command, market_risk_command)
from engine.spec import engine_config_from
from engine.units import ATOMS_PER_USDC, RATE, RATE_E9, USDC, Grid, dec_str, parse_decimal

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.toml")

ORACLE_KINDS = ("sim", "manual", "csv:PATH")
ACK_MODES = ("durable", "fast")
DEFAULT_BRACKETS = (("0", "0.004"), ("50000", "0.005"), ("250000", "0.01"),
                    ("1000000", "0.025"))
_SYMBOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


class ConfigError(ValueError):
    """An invalid config; the message starts with the key it is about."""


# ---- the schema ----------------------------------------------------------------------------
EXCHANGE_DEFAULTS = {
    "gateways": 1,
    "ack_mode": "durable",
    "pin_cpus": True,
    "cpu_latency_us": 0,
    "huge_pages": False,
    "rate_limit_per_s": 5000,
    "rate_limit_burst": 10000,
    "startup_timeout_s": 180,
    "max_connections": 512,
    "max_connections_per_account": 8,
    "max_queued_messages": 10_000,
    "max_queued_bytes": 8 << 20,
    "gateway_memory_limit_mb": 1024,
}
# (lowest, highest): a gateway pass may write up to its event batch (4096) messages, about
# 1 MiB, to one connection before the client's reads are credited, so a smaller queue would
# drop clients that read; the gateway itself takes 100-200 MB to run
GATEWAY_LIMITS = {"max_connections": (1, 1 << 20), "max_connections_per_account": (1, 1 << 20),
                  "max_queued_messages": (5000, 1 << 20),
                  "max_queued_bytes": (1 << 20, 1 << 34),
                  "gateway_memory_limit_mb": (256, 1 << 20)}
GATEWAY_LIMIT_KEYS = tuple(GATEWAY_LIMITS)
ENGINE_DEFAULTS = {
    "max_accounts": 1024,
    "max_markets": 8,
    "max_orders": 1 << 16,
    "max_levels_per_side": None,     # None: max_orders
    "max_trigger_orders": 1024,
    "command_ring_capacity": 1 << 14,
    "event_ring_capacity": 0,
    "batch": 256,
}
# Config.source of the bundled perpx/default.toml
BUNDLED_SOURCE = "<bundled default>"
ENDPOINT_DEFAULTS = {
    "host": "127.0.0.1",
    "orders_port": 7700,
    "market_data_port": 7800,
    "metrics_port": 7900,
}
PERSISTENCE_DEFAULTS = {
    "snapshot_every": 1_000_000,
    "snapshots_keep": 2,
    # each DuckDB commit fsyncs, and the journal's fdatasync then waits for the same ext4
    # journal commit: 10 a second put a durable ack's p90 at 1.5 ms, 1 a second at 1.0 ms;
    # 2 a second halve the wait of a pass's oldest fill for DuckDB (docs/tuning.md, twentieth
    # pass)
    "store_flush_ms": 500,
    "retire_journal": True,
}
RISK_DEFAULTS = {
    "mark_interval_ms": 250,
    "feed_stale_s": 30,
    # the circuit breaker (off: "0"): a mark moving more than this fraction within the window
    # puts the market in cancel_only for halt_s; a manual index further than oracle_max_jump
    # from the current one needs `perpx oracle set --force` ("0": no bound)
    "breaker_move": "0",
    "breaker_window_s": 60,
    "breaker_halt_s": 60,
    "oracle_max_jump": "0",
    "seed": 0,
    "funding_sample_ms": 5000,
    "liquidation_retry_ms": 1000,
    "scan": True,
}
MARKET_REQUIRED = ("symbol", "tick_size", "lot_size", "initial_price")
MARKET_DEFAULTS = {
    "oracle": "sim",
    "max_leverage": 20,
    "maker_fee": "0.0002",
    "taker_fee": "0.0005",
    "price_band": "0.10",
    "brackets": [list(b) for b in DEFAULT_BRACKETS],
    "liquidation_fee": "0.005",
    "funding_interval_s": 28800,
    "interest_rate": "0.0001",
    "funding_cap": "0.0075",
    # extras (None: derived, see the module docstring)
    "max_price": None,
    "max_position_qty": None,
    "max_order_qty": None,
    "max_open_orders": 200,
    # filters (PROTOCOL.md): "0" = none
    "min_notional": "0",
    "max_stop_orders": 10,
    "open_interest_cap": "0",
}
MARKET_KEYS = MARKET_REQUIRED + tuple(MARKET_DEFAULTS)
TOP_LEVEL = ("exchange", "engine", "endpoints", "persistence", "risk", "markets")


@dataclass(frozen=True)
class Config:
    gateways: int
    ack_mode: str
    pin_cpus: bool
    rate_limit_per_s: float
    rate_limit_burst: float
    startup_timeout_s: float
    engine: dict               # EngineConfig fields + command_ring_capacity + batch
    endpoints: dict            # host, orders_port, market_data_port
    markets: tuple
    persistence: dict = None   # PERSISTENCE_DEFAULTS keys
    risk: dict = None          # RISK_DEFAULTS keys
    source: str = BUNDLED_SOURCE
    gateway_limits: dict = None  # GATEWAY_LIMIT_KEYS
    cpu_latency_us: int = EXCHANGE_DEFAULTS["cpu_latency_us"]
    huge_pages: bool = EXCHANGE_DEFAULTS["huge_pages"]
    # endpoint keys the config file gave (a port left to the defaults may move when taken);
    # how the file was written, not what it says, so not compared
    explicit_endpoints: tuple = field(default=(), compare=False)

    def engine_config(self):
        return engine_config_from(self.engine)

    def market(self, symbol: str) -> Market:
        for m in self.markets:
            if m.symbol == symbol:
                return m
        known = ", ".join(m.symbol for m in self.markets)
        raise ValueError(f"unknown market {symbol!r} (markets: {known})")

    def to_dict(self) -> dict:
        """The resolved config as JSON-able data (what `perpx up` writes to exchange.json)."""
        return {
            "source": self.source,
            "exchange": {"gateways": self.gateways, "ack_mode": self.ack_mode,
                         "pin_cpus": self.pin_cpus, "cpu_latency_us": self.cpu_latency_us,
                         "huge_pages": self.huge_pages,
                         "rate_limit_per_s": self.rate_limit_per_s,
                         "rate_limit_burst": self.rate_limit_burst,
                         "startup_timeout_s": self.startup_timeout_s,
                         **(self.gateway_limits or {})},
            "engine": dict(self.engine),
            "endpoints": dict(self.endpoints),
            "persistence": dict(self.persistence or PERSISTENCE_DEFAULTS),
            "risk": dict(self.risk or RISK_DEFAULTS),
            "markets": [m.describe() for m in self.markets],
        }


# ---- numbers ---------------------------------------------------------------------------------
def _two_digits_down(n: int) -> int:
    """n rounded down to two significant digits (27_712_812 -> 27_000_000); n >= 1."""
    if n < 100:
        return n
    scale = 10 ** (len(str(n)) - 2)
    return n // scale * scale


# ---- validation helpers --------------------------------------------------------------------
class _Checker:
    def __init__(self, origin: Path | None):
        self.origin = origin

    @staticmethod
    def fail(key: str, text: str):
        raise ConfigError(f"{key}: {text}")

    def table(self, doc: dict, name: str) -> dict:
        value = doc.get(name, {})
        if not isinstance(value, dict):
            self.fail(name, f"must be a table ([{name}]), got {type(value).__name__}")
        return value

    def unknown_keys(self, where: str, given: dict, known) -> None:
        for key in given:
            if key not in known:
                hint = difflib.get_close_matches(key, list(known), n=1)
                self.fail(f"{where}.{key}" if where else key,
                          "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else
                                           f" (known: {', '.join(known)})"))

    def integer(self, key: str, value, lo: int, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"{value!r} must be an integer")
        if value < lo or (hi is not None and value > hi):
            self.fail(key, f"{value} must be in [{lo}, {hi if hi is not None else '...'}]")
        return value

    def number(self, key: str, value, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
            self.fail(key, f"{value!r} must be a number")
        if not lo <= value <= hi:
            self.fail(key, f"{value} must be in [{lo}, {hi}]")
        return float(value)

    def decimal(self, key: str, value) -> Decimal:
        try:
            return parse_decimal(value, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def rate_e9(self, key: str, value: Decimal, text) -> int:
        e9 = RATE.exact(value)
        if e9 is None:
            self.fail(key, f"'{text}' is not a whole number of 1e-9 (the engine's rate unit)")
        return e9

    def quantity(self, key: str, value, step: Decimal, step_key: str, unit: str) -> int:
        d = self.decimal(key, value)
        if d <= 0:
            self.fail(key, f"'{value}' must be positive")
        units = Grid(step).exact(d)
        if units is None:
            self.fail(key, f"'{value}' is not a multiple of {step_key} '{dec_str(step)}'")
        return units


# ---- loading -----------------------------------------------------------------------------
def load_config(path=None) -> Config:
    """Read and validate a config file (None: the bundled default)."""
    p = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {p}: {e.strerror}") from None
    return parse_config(text, origin=p if path is not None else None,
                        source=str(p) if path is not None else BUNDLED_SOURCE)


def parse_config(text: str, origin: Path | None = None, source: str = "<string>") -> Config:
    try:
        doc = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return config_from_dict(doc, origin=origin, source=source)


def config_from_dict(doc: dict, origin: Path | None = None, source: str = "<dict>",
                     engine_checks: bool = True) -> Config:
    """engine_checks=False skips the compiled engine checks (a resolved config of a running
    exchange passed them at start-up; loading their compiled code costs ~0.6 s per process)."""
    c = _Checker(origin)
    c.unknown_keys("", doc, TOP_LEVEL)

    ex = c.table(doc, "exchange")
    c.unknown_keys("exchange", ex, EXCHANGE_DEFAULTS)
    ex = {**EXCHANGE_DEFAULTS, **ex}
    gateways = c.integer("exchange.gateways", ex["gateways"], 1, 64)
    if ex["ack_mode"] not in ACK_MODES:
        c.fail("exchange.ack_mode", f"{ex['ack_mode']!r} must be one of {', '.join(ACK_MODES)}")
    if not isinstance(ex["pin_cpus"], bool):
        c.fail("exchange.pin_cpus", f"{ex['pin_cpus']!r} must be true or false")
    cpu_latency = c.integer("exchange.cpu_latency_us", ex["cpu_latency_us"], -1, 2 ** 31 - 1)
    if not isinstance(ex["huge_pages"], bool):
        c.fail("exchange.huge_pages", f"{ex['huge_pages']!r} must be true or false")
    rate = c.number("exchange.rate_limit_per_s", ex["rate_limit_per_s"], 1, 1e9)
    burst = c.number("exchange.rate_limit_burst", ex["rate_limit_burst"], 1, 1e9)
    startup = c.number("exchange.startup_timeout_s", ex["startup_timeout_s"], 1, 3600)
    limits = {k: c.integer(f"exchange.{k}", ex[k], lo, hi)
              for k, (lo, hi) in GATEWAY_LIMITS.items()}

    eng = c.table(doc, "engine")
    c.unknown_keys("engine", eng, ENGINE_DEFAULTS)
    eng = {**ENGINE_DEFAULTS, **eng}
    c.integer("engine.max_accounts", eng["max_accounts"], 2, 2 ** 31 - 1)
    c.integer("engine.max_markets", eng["max_markets"], 1, MAX_MARKETS_LIMIT)
    c.integer("engine.max_orders", eng["max_orders"], 1, 1 << 28)
    if eng["max_levels_per_side"] is None:
        eng["max_levels_per_side"] = eng["max_orders"]
    c.integer("engine.max_levels_per_side", eng["max_levels_per_side"], 1, 1 << 28)
    c.integer("engine.max_trigger_orders", eng["max_trigger_orders"], 1, 1 << 20)
    cap = c.integer("engine.command_ring_capacity", eng["command_ring_capacity"], 2, 1 << 24)
    if cap & (cap - 1):
        c.fail("engine.command_ring_capacity", f"{cap} must be a power of two")
    ecap = c.integer("engine.event_ring_capacity", eng["event_ring_capacity"], 0, 1 << 26)
    if ecap and (ecap < 1024 or ecap & (ecap - 1)):
        c.fail("engine.event_ring_capacity", f"{ecap} must be 0 (the engine's default) or a "
                                             f"power of two >= 1024")
    c.integer("engine.batch", eng["batch"], 1, 1 << 16)

    ep = c.table(doc, "endpoints")
    c.unknown_keys("endpoints", ep, ENDPOINT_DEFAULTS)
    explicit_endpoints = tuple(k for k in ENDPOINT_DEFAULTS if k in ep)
    ep = {**ENDPOINT_DEFAULTS, **ep}
    if not isinstance(ep["host"], str) or not re.fullmatch(r"[A-Za-z0-9.:\-\[\]*]+", ep["host"]):
        c.fail("endpoints.host", f"{ep['host']!r} must be a host name or address")
    c.integer("endpoints.orders_port", ep["orders_port"], 0, 65535)
    c.integer("endpoints.market_data_port", ep["market_data_port"], 0, 65535)
    c.integer("endpoints.metrics_port", ep["metrics_port"], 0, 65535)
    if ep["orders_port"] and ep["orders_port"] + gateways - 1 > 65535:
        c.fail("endpoints.orders_port", f"{ep['orders_port']} + {gateways} gateways passes 65535")
    if (ep["orders_port"] and ep["market_data_port"]
            and ep["orders_port"] <= ep["market_data_port"] < ep["orders_port"] + gateways):
        c.fail("endpoints.market_data_port",
               f"{ep['market_data_port']} collides with the gateways' order ports "
               f"{ep['orders_port']}..{ep['orders_port'] + gateways - 1}")

    per = c.table(doc, "persistence")
    c.unknown_keys("persistence", per, PERSISTENCE_DEFAULTS)
    per = {**PERSISTENCE_DEFAULTS, **per}
    c.integer("persistence.snapshot_every", per["snapshot_every"], 1, 1 << 40)
    c.integer("persistence.snapshots_keep", per["snapshots_keep"], 1, 100)
    c.integer("persistence.store_flush_ms", per["store_flush_ms"], 1, 60_000)
    if not isinstance(per["retire_journal"], bool):
        c.fail("persistence.retire_journal", f"{per['retire_journal']!r} must be true or false")

    risk = c.table(doc, "risk")
    c.unknown_keys("risk", risk, RISK_DEFAULTS)
    risk = {**RISK_DEFAULTS, **risk}
    c.integer("risk.mark_interval_ms", risk["mark_interval_ms"], 10, 60_000)
    c.integer("risk.seed", risk["seed"], 0, 2 ** 63 - 1)
    c.integer("risk.funding_sample_ms", risk["funding_sample_ms"], 10, 3_600_000)
    c.integer("risk.liquidation_retry_ms", risk["liquidation_retry_ms"], 10, 3_600_000)
    c.integer("risk.feed_stale_s", risk["feed_stale_s"], 1, 86_400)
    c.integer("risk.breaker_window_s", risk["breaker_window_s"], 1, 86_400)
    c.integer("risk.breaker_halt_s", risk["breaker_halt_s"], 1, 86_400)
    for key in ("breaker_move", "oracle_max_jump"):
        value = c.decimal(f"risk.{key}", risk[key])
        if not 0 <= value < 100 or value * RATE_E9 != int(value * RATE_E9):
            c.fail(f"risk.{key}", f"'{risk[key]}' must be a fraction >= 0 with at most 9 "
                                  f"decimals (\"0\": off)")
        risk[key] = dec_str(value)
    if not isinstance(risk["scan"], bool):
        c.fail("risk.scan", f"{risk['scan']!r} must be true or false")

    items = doc.get("markets")
    if items is None:
        c.fail("markets", "no [[markets]] defined")
    if not isinstance(items, list) or not items:
        c.fail("markets", "must be a non-empty array of tables ([[markets]])")
    if len(items) > eng["max_markets"]:
        c.fail("markets", f"{len(items)} markets but engine.max_markets is {eng['max_markets']}")
    markets = []
    seen = {}
    for i, item in enumerate(items):
        m = _market(c, i, item, origin, engine_checks)
        if m.symbol in seen:
            c.fail(f"markets[{i}].symbol", f"{m.symbol!r} is already markets[{seen[m.symbol]}]")
        seen[m.symbol] = i
        _check_book_capacity(c, i, m, eng)
        markets.append(m)
    return Config(gateways=gateways, ack_mode=ex["ack_mode"], pin_cpus=ex["pin_cpus"],
                  rate_limit_per_s=rate, rate_limit_burst=burst, startup_timeout_s=startup,
                  engine={k: eng[k] for k in ENGINE_DEFAULTS}, endpoints=dict(ep),
                  markets=tuple(markets), persistence=per, risk=risk, source=source,
                  gateway_limits=limits, cpu_latency_us=cpu_latency,
                  huge_pages=ex["huge_pages"],
                  explicit_endpoints=explicit_endpoints)


def _check_book_capacity(c: _Checker, i: int, m: Market, eng: dict) -> None:
    """A book side must have room for a level at every price its resting orders can take
    before the order pool runs out, or a few accounts filling its levels lock everyone out of
    new prices (docs/risk.md, "What stuffing costs now")."""
    levels, orders = eng["max_levels_per_side"], eng["max_orders"]
    needed = book_levels_needed(m.max_price_ticks, orders)
    if levels < needed:
        band = band_ticks(m.initial_price_ticks, m.price_band_e9, m.max_price_ticks)
        c.fail("engine.max_levels_per_side",
               f"{levels} is below the {needed} price levels a book side of markets[{i}] "
               f"({m.symbol}) can come to hold: one per resting order (engine.max_orders "
               f"{orders}) at any of its {m.max_price_ticks} prices up to max_price "
               f"{dec_str(m.max_price)} (its price band alone spans {band} prices at "
               f"initial_price); set it to at least {needed}, or leave it out (max_orders)")


def _market(c: _Checker, i: int, item, origin: Path | None,
            engine_checks: bool = True) -> Market:
    at = f"markets[{i}]"
    if not isinstance(item, dict):
        c.fail(at, "must be a table ([[markets]])")
    c.unknown_keys(at, item, MARKET_KEYS)
    for key in MARKET_REQUIRED:
        if key not in item:
            c.fail(f"{at}.{key}", "is required")
    m = {**MARKET_DEFAULTS, **item}

    symbol = m["symbol"]
    if not isinstance(symbol, str) or not _SYMBOL.fullmatch(symbol):
        c.fail(f"{at}.symbol", f"{symbol!r} must be 1-32 letters, digits, '.', '_' or '-'")
    tick = c.decimal(f"{at}.tick_size", m["tick_size"])
    lot = c.decimal(f"{at}.lot_size", m["lot_size"])
    if tick <= 0:
        c.fail(f"{at}.tick_size", f"'{m['tick_size']}' must be positive")
    if lot <= 0:
        c.fail(f"{at}.lot_size", f"'{m['lot_size']}' must be positive")
    atpl = USDC.exact(tick * lot)
    if atpl is None or atpl < 1:
        c.fail(f"{at}.tick_size", f"'{m['tick_size']}' x lot_size '{m['lot_size']}' = "
                                  f"{dec_str(tick * lot)} USDC is not a whole number of 1e-6 USDC")

    initial_ticks = c.quantity(f"{at}.initial_price", m["initial_price"], tick, "tick_size",
                               "price")
    initial = Decimal(initial_ticks) * tick

    oracle = m["oracle"]
    if not isinstance(oracle, str) or not (oracle in ("sim", "manual")
                                           or oracle.startswith("csv:")):
        c.fail(f"{at}.oracle", f"{oracle!r} must be one of {', '.join(ORACLE_KINDS)}")
    if oracle.startswith("csv:"):
        raw = oracle[4:]
        if not raw:
            c.fail(f"{at}.oracle", "csv: needs a path, e.g. \"csv:prices/btc.csv\"")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = (origin.parent if origin is not None else Path.cwd()) / path
        if not path.is_file():
            c.fail(f"{at}.oracle", f"csv file {str(path)!r} does not exist")
        oracle = f"csv:{path.resolve()}"

    leverage = c.integer(f"{at}.max_leverage", m["max_leverage"], 1, MAX_LEVERAGE)

    def rate(key, lo, hi, lo_open=False, hi_open=False):
        value = c.decimal(f"{at}.{key}", m[key])
        e9 = c.rate_e9(f"{at}.{key}", value, m[key])
        if (value < lo or (lo_open and value == lo)) or (value > hi or (hi_open and value == hi)):
            c.fail(f"{at}.{key}", f"'{m[key]}' must be in {'(' if lo_open else '['}{dec_str(lo)}, "
                                  f"{dec_str(hi)}{')' if hi_open else ']'}")
        return value, e9

    max_fee = Decimal(MAX_FEE_E9) / RATE_E9
    taker, taker_e9 = rate("taker_fee", Decimal(0), max_fee)
    maker, maker_e9 = rate("maker_fee", -taker, max_fee)
    band, band_e9 = rate("price_band", Decimal(0), Decimal(1), lo_open=True, hi_open=True)
    liq_fee, _ = rate("liquidation_fee", Decimal(0), Decimal(1), hi_open=True)
    interest, _ = rate("interest_rate", Decimal(-1), Decimal(1), True, True)
    cap, _ = rate("funding_cap", Decimal(0), Decimal(1), hi_open=True)
    interval = c.integer(f"{at}.funding_interval_s", m["funding_interval_s"], 1, 7 * 24 * 3600)

    brackets = _brackets(c, f"{at}.brackets", m["brackets"], leverage)

    problem = engine_checks and _compiled_checks().market_config_problem(
        atpl, initial_ticks, maker_e9, taker_e9, band_e9, leverage)
    if problem:
        key = {1: "tick_size", 2: "initial_price", 3: "taker_fee", 4: "maker_fee",
               5: "price_band", 6: "max_leverage"}.get(problem, "symbol")
        c.fail(f"{at}.{key}", _compiled_checks().MARKET_PROBLEMS[problem])

    # limits
    if m["max_price"] is None:
        max_price_ticks = 10 * initial_ticks
    else:
        max_price_ticks = c.quantity(f"{at}.max_price", m["max_price"], tick, "tick_size",
                                     "price")
        if max_price_ticks < initial_ticks:
            c.fail(f"{at}.max_price", f"'{m['max_price']}' is below initial_price "
                                      f"'{dec_str(initial)}'")
    bound = min(MAX_POSITION_LOTS_LIMIT, NOTIONAL_LIMIT_ATOMS // atpl // max_price_ticks)
    if bound < 1:
        c.fail(f"{at}.max_price" if m["max_price"] is not None else f"{at}.initial_price",
               f"one lot at the max price {dec_str(Decimal(max_price_ticks) * tick)} exceeds "
               f"the engine's notional headroom (2**54 atoms)")
    if m["max_position_qty"] is None:
        max_position = _two_digits_down(bound)
    else:
        max_position = c.quantity(f"{at}.max_position_qty", m["max_position_qty"], lot,
                                  "lot_size", "qty")
        if max_position > bound:
            c.fail(f"{at}.max_position_qty",
                   f"'{m['max_position_qty']}' exceeds the int64 headroom at max_price "
                   f"{dec_str(Decimal(max_price_ticks) * tick)}: at most "
                   f"{dec_str(Decimal(bound) * lot)}")
    if m["max_order_qty"] is None:
        max_order = max(1, _two_digits_down(max(1, max_position // 10)))
    else:
        max_order = c.quantity(f"{at}.max_order_qty", m["max_order_qty"], lot, "lot_size", "qty")
        if max_order > max_position:
            c.fail(f"{at}.max_order_qty", f"'{m['max_order_qty']}' exceeds max_position_qty "
                                          f"'{dec_str(Decimal(max_position) * lot)}'")
    max_open = c.integer(f"{at}.max_open_orders", m["max_open_orders"], 1, MAX_OPEN_ORDERS_LIMIT)
    problem = engine_checks and _compiled_checks().market_limits_problem(
        atpl, initial_ticks, max_price_ticks, max_order, max_position, max_open)
    if problem:
        key = {8: "max_position_qty", 9: "max_order_qty", 10: "max_open_orders",
               11: "max_position_qty", 12: "max_price"}.get(problem, "max_price")
        c.fail(f"{at}.{key}", _compiled_checks().MARKET_PROBLEMS[problem])
    # filters: "0" = none
    min_notional = c.decimal(f"{at}.min_notional", m["min_notional"])
    min_notional_atoms = USDC.exact(min_notional)
    if min_notional_atoms is None or min_notional < 0:
        c.fail(f"{at}.min_notional",
               f"'{m['min_notional']}' must be >= 0 USDC, with 6 decimals at most")
    stops = c.integer(f"{at}.max_stop_orders", m["max_stop_orders"], 0, MAX_OPEN_ORDERS_LIMIT)
    oi_cap = 0
    if c.decimal(f"{at}.open_interest_cap", m["open_interest_cap"]) != 0:
        oi_cap = c.quantity(f"{at}.open_interest_cap", m["open_interest_cap"], lot, "lot_size",
                            "qty")

    return Market(
        id=i, symbol=symbol, tick_size=tick, lot_size=lot, oracle=oracle,
        max_leverage=leverage, maker_fee=maker, taker_fee=taker, price_band=band,
        brackets=brackets, liquidation_fee=liq_fee, funding_interval_s=interval,
        interest_rate=interest, funding_cap=cap, max_open_orders=max_open,
        initial_price_ticks=initial_ticks, max_price_ticks=max_price_ticks,
        max_position_lots=max_position, max_order_lots=max_order,
        min_notional_atoms=min_notional_atoms, max_stop_orders=stops,
        open_interest_cap_lots=oi_cap)


def _compiled_checks():
    """engine/market_checks.py, imported where it is needed: a resolved config of a running
    exchange (engine_checks=False, its brackets' leverage given) is read without loading numba,
    which CLI commands would otherwise wait ~0.2 s for."""
    from engine import market_checks
    return market_checks


def _brackets(c: _Checker, key: str, value, leverage: int) -> tuple:
    """[[notional floor, maintenance rate, max leverage (optional)], ...]: floors from 0
    strictly up, rates non-decreasing in (0, 1), the first below the initial margin rate
    1/max_leverage. Each bracket's max leverage is in [1, max_leverage], does not rise with
    the floor, and its initial rate 1/L is above the maintenance rate; left out, it is the
    largest such whole leverage, at most the previous bracket's
    (engine.market_checks.bracket_leverage).
    The maintenance amount of bracket k is amount[k-1] + floor[k] x (rate[k] - rate[k-1])
    (Binance's cumulative deduction), so notional x rate - amount is continuous across floors."""
    if not isinstance(value, list) or not value:
        c.fail(key, "must be a non-empty list of [notional floor, maintenance rate] pairs")
    out = []
    for k, pair in enumerate(value):
        at = f"{key}[{k}]"
        if not isinstance(pair, list) or len(pair) not in (2, 3):
            c.fail(at, f"{pair!r} must be a pair [notional floor, maintenance rate] or "
                       f"[notional floor, maintenance rate, max leverage]")
        floor = c.decimal(at + "[0]", pair[0])
        rate = c.decimal(at + "[1]", pair[1])
        c.rate_e9(at + "[1]", rate, pair[1])
        if USDC.exact(floor) is None:
            c.fail(at + "[0]", f"'{pair[0]}' has more than 6 decimals (USDC)")
        if k == 0 and floor != 0:
            c.fail(at + "[0]", f"the first bracket must start at notional 0, not '{pair[0]}'")
        if not 0 < rate < 1:
            c.fail(at + "[1]", f"maintenance rate '{pair[1]}' must be in (0, 1)")
        if out:
            if floor <= out[-1].floor:
                c.fail(at + "[0]", f"floor '{pair[0]}' must be above the previous floor "
                                   f"'{dec_str(out[-1].floor)}'")
            if rate < out[-1].rate:
                c.fail(at + "[1]", f"maintenance rate '{pair[1]}' is below the previous "
                                   f"bracket's '{dec_str(out[-1].rate)}'")
            amount = out[-1].maintenance_amount + floor * (rate - out[-1].rate)
        else:
            if rate * leverage >= 1:
                c.fail(at + "[1]", f"maintenance rate '{pair[1]}' must be below the initial "
                                   f"margin rate 1/max_leverage = {dec_str(Decimal(1) / leverage)}")
            amount = Decimal(0)
        prev_leverage = out[-1].max_leverage if out else leverage
        given = c.integer(at + "[2]", pair[2], 1, leverage) if len(pair) == 3 else 0
        # a leverage given is the kernel's answer as it is: only a default needs the kernel
        bracket_lev = given or _compiled_checks().bracket_leverage(0, int(rate * RATE_E9),
                                                                   prev_leverage)
        if bracket_lev > prev_leverage:
            c.fail(at + "[2]", f"max leverage {bracket_lev} is above the previous bracket's "
                               f"{prev_leverage}")
        if rate * bracket_lev >= 1:
            c.fail(at + "[2]", f"max leverage {bracket_lev} gives an initial margin rate "
                               f"{dec_str(Decimal(1) / bracket_lev)}, not above the maintenance "
                               f"rate '{pair[1]}'")
        out.append(Bracket(floor, rate, amount, bracket_lev))
    return tuple(out)


# ---- genesis -------------------------------------------------------------------------------
def genesis_commands(cfg: Config, ts_ns: int | None = None):
    """Per market (id = position in the config): CREATE_MARKET, SET_MARKET_LIMITS,
    SET_MARKET_RISK (liquidation fee, funding cap) and one SET_BRACKET per maintenance bracket,
    in index order (the matcher derives the maintenance amounts itself)."""

    ts = time.time_ns() if ts_ns is None else ts_ns
    cmds = []
    for m in cfg.markets:
        if len(m.brackets) > MAX_BRACKETS:
            raise ValueError(f"{m.symbol}: at most {MAX_BRACKETS} maintenance brackets")
        cmds.append(market_create_command(
            m.id, atoms_per_tick_lot=m.atoms_per_tick_lot, initial_mark_ticks=m.initial_price_ticks,
            maker_fee_e9=m.maker_fee_e9, taker_fee_e9=m.taker_fee_e9,
            price_band_e9=m.price_band_e9, max_leverage=m.max_leverage, ts_ns=ts))
        cmds.append(market_limits_command(
            m.id, max_price_ticks=m.max_price_ticks, max_order_lots=m.max_order_lots,
            max_position_lots=m.max_position_lots, max_open_orders=m.max_open_orders, ts_ns=ts))
        cmds.append(market_risk_command(m.id, liquidation_fee_e9=m.liquidation_fee_e9,
                                        funding_cap_e9=m.funding_cap_e9, ts_ns=ts))
        for k, b in enumerate(m.brackets):
            cmds.append(bracket_command(
                m.id, k, floor_atoms=int(b.floor * ATOMS_PER_USDC),
                maintenance_rate_e9=int(b.rate * RATE_E9), max_leverage=b.max_leverage,
                ts_ns=ts))
        cmds.append(market_filters_command(
            m.id, min_notional_atoms=m.min_notional_atoms, max_stop_orders=m.max_stop_orders,
            open_interest_cap_lots=m.open_interest_cap_lots, ts_ns=ts))
    return np.concatenate(cmds)


# ---- the resolved config of a running exchange (STATE_DIR/exchange.json) --------------------
def config_from_resolved(doc: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (re-validated: same rules)."""
    markets = []
    for m in doc["markets"]:
        item = {k: m[k] for k in MARKET_KEYS if k in m}
        # [floor, rate, max leverage, amount]; older files hold [floor, rate, amount]
        item["brackets"] = [b[:3] if len(b) == 4 else b[:2] for b in m["brackets"]]
        if item.get("oracle", "").startswith("csv:"):
            pass   # already absolute
        markets.append(item)
    ex = dict(doc["exchange"])
    for k in ("rate_limit_per_s", "rate_limit_burst", "startup_timeout_s"):
        ex[k] = Decimal(str(ex[k]))
    return config_from_dict({"exchange": ex, "engine": doc["engine"],
                             "endpoints": doc["endpoints"], "risk": doc.get("risk", {}),
                             "markets": markets},
                            source=doc.get("source", "<resolved>"), engine_checks=False)


def write_json_atomic(path: Path, doc) -> None:
    """Write JSON so a reader never sees half a file (write a temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
