"""The market table of a gateway, and exact conversions between wire decimals and engine units.

On the wire prices, quantities and amounts are decimal strings ("65000.5", "0.001"); inside the
exchange they are integers: prices in ticks, quantities in lots, collateral in atoms (1e-6
USDC). The conversion happens here, once, at the edge, and it never rounds: a price off the
market's tick grid is `invalid_tick`, a quantity off its lot grid `invalid_lot`.

What is accepted for a price or quantity:
- a string of ASCII digits with an optional fraction: "65000", "65000.5", "0.001", "65000.50"
  (trailing zeros are fine). No sign, exponent, spaces, "NaN"/"inf", leading "." or trailing ".".
- a plain int, as a convenience (bool is not an int here).
- a float is `invalid_message` (a binary float cannot say which decimal the client meant);
  any other type too.
- zero, negative, malformed or larger than the market allows: `invalid_price` / `invalid_qty`.

Every parser raises `EdgeReject(reason_code, text)`; nothing here returns a partial result.

The table is loaded from JSON (`MarketTable.load`):

    {"markets": [{"symbol": "BTC-PERP", "id": 0, "tick_size": "0.1", "lot_size": "0.001",
                  "max_price_ticks": 10000000, "max_order_lots": 1000000}, ...]}

`id` defaults to the position in the list; the two limits are optional (0 = not known yet:
the gateway then takes them from the matcher's market table when it attaches, and the matcher
enforces them in any case). Other keys (fees, leverage, ...) are kept in `extra` untouched,
so the TOML config's market sections can be passed through as they are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from engine.records import (REASON_INVALID_LOT, REASON_INVALID_MESSAGE, REASON_INVALID_PRICE,
                            REASON_INVALID_QTY, REASON_INVALID_TICK, REASON_UNKNOWN_MARKET)

ATOMS_PER_USDC = 10 ** 6
ATOM_EXPONENT = 6
INT64_MAX = 2 ** 63 - 1
# No legal value needs more digits than this; longer strings are refused before any parsing.
MAX_DECIMAL_CHARS = 40
_DECIMAL = re.compile(r"([0-9]{1,30})(?:\.([0-9]{1,30}))?")
_POW10 = [10 ** i for i in range(80)]
CACHE_LIMIT = 1 << 16        # entries per conversion cache (cleared when full)


class EdgeReject(Exception):
    """A request refused at the gateway: a reason code (engine.records) and a text for people."""

    def __init__(self, reason: int, text: str):
        super().__init__(text)
        self.reason = reason
        self.text = text


def _grid(step: Decimal, what: str) -> tuple[int, int]:
    """A positive decimal step as (mantissa, exponent): step = mantissa * 10**-exponent."""
    if not step.is_finite() or step <= 0:
        raise ValueError(f"{what} must be a positive decimal, got {step}")
    sign, digits, exp = step.normalize().as_tuple()
    mantissa = int("".join(map(str, digits)))
    if exp > 0:
        return mantissa * 10 ** exp, 0
    return mantissa, -exp


def _as_decimal(value, what: str) -> Decimal:
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{what} must be a decimal string, got {value!r}")
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{what} is not a decimal: {value!r}") from None


def parse_decimal(value, reason_bad: int, what: str) -> tuple[int, int]:
    """A wire number as (integer digits, number of fraction digits): "65000.5" -> (650005, 1).

    Strings must be plain positive-or-zero decimals; ints are taken as they are.
    """
    kind = type(value)
    if kind is str:
        if len(value) > MAX_DECIMAL_CHARS:
            raise EdgeReject(reason_bad, f"{what} has too many digits")
        m = _DECIMAL.fullmatch(value)
        if m is None:
            raise EdgeReject(reason_bad, f"{what} must be a plain decimal string like "
                                         f"\"65000.5\", got {value!r}")
        whole, frac = m.groups()
        if frac is None:
            return int(whole), 0
        return int(whole + frac), len(frac)
    if kind is int:
        if value < 0:
            raise EdgeReject(reason_bad, f"{what} must be positive")
        if value > INT64_MAX:
            raise EdgeReject(reason_bad, f"{what} is too large")
        return value, 0
    if kind is float:
        raise EdgeReject(REASON_INVALID_MESSAGE,
                         f"{what} must be a decimal string, not a float ({value!r})")
    raise EdgeReject(REASON_INVALID_MESSAGE,
                     f"{what} must be a decimal string, got {type(value).__name__}")


def to_units(value, mantissa: int, exponent: int, reason_bad: int, reason_grid: int,
             what: str, step_text: str) -> int:
    """Exact value / step for step = mantissa * 10**-exponent; off-grid raises, never rounds."""
    digits, places = parse_decimal(value, reason_bad, what)
    if digits == 0:
        raise EdgeReject(reason_bad, f"{what} must be positive")
    if places <= exponent:
        num = digits * _POW10[exponent - places]
        units, rest = divmod(num, mantissa)
    else:
        units, rest = divmod(digits, mantissa * _POW10[places - exponent])
    if rest:
        raise EdgeReject(reason_grid, f"{what} {value} is not a multiple of {step_text}")
    return units


def format_scaled(n: int, exponent: int) -> str:
    """n * 10**-exponent as a plain decimal string without trailing zeros: (650005, 1) -> "65000.5"."""
    if exponent == 0:
        return str(n)
    neg = n < 0
    s = str(-n if neg else n)
    if len(s) <= exponent:
        s = "0" * (exponent - len(s) + 1) + s
    whole, frac = s[:-exponent], s[-exponent:].rstrip("0")
    out = whole + "." + frac if frac else whole
    return "-" + out if neg else out


def atoms_to_str(atoms: int) -> str:
    """Collateral atoms as USDC: 1_500_000 -> "1.5"; negative stays negative."""
    return format_scaled(atoms, ATOM_EXPONENT)


def usdc_to_atoms(value, what: str = "amount") -> int:
    """A positive USDC amount (at most 6 decimals) as atoms; anything else `invalid_message`."""
    try:
        atoms = to_units(value, 1, ATOM_EXPONENT, REASON_INVALID_MESSAGE, REASON_INVALID_MESSAGE,
                         what, "0.000001 USDC")
    except EdgeReject as e:
        raise EdgeReject(REASON_INVALID_MESSAGE, e.text) from None
    if atoms > INT64_MAX:
        raise EdgeReject(REASON_INVALID_MESSAGE, f"{what} is too large")
    return atoms


@dataclass
class Market:
    symbol: str
    market_id: int
    tick_size: Decimal
    lot_size: Decimal
    max_price_ticks: int = 0      # 0 = not known here (the matcher's value is taken on attach)
    max_order_lots: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.symbol, str) or not self.symbol or len(self.symbol) > 32:
            raise ValueError(f"market symbol must be a non-empty string, got {self.symbol!r}")
        if not 0 <= self.market_id < 2 ** 15:
            raise ValueError(f"market {self.symbol}: id {self.market_id} out of range")
        self.tick_size = _as_decimal(self.tick_size, f"{self.symbol} tick_size")
        self.lot_size = _as_decimal(self.lot_size, f"{self.symbol} lot_size")
        self._tick_m, self._tick_e = _grid(self.tick_size, f"{self.symbol} tick_size")
        self._lot_m, self._lot_e = _grid(self.lot_size, f"{self.symbol} lot_size")
        atoms = self.tick_size * self.lot_size * ATOMS_PER_USDC
        if atoms != atoms.to_integral_value() or atoms < 1:
            raise ValueError(f"market {self.symbol}: tick_size x lot_size = "
                             f"{self.tick_size * self.lot_size} USDC is not a whole number of "
                             f"atoms (1e-6 USDC)")
        self.atoms_per_tick_lot = int(atoms)
        for name in ("max_price_ticks", "max_order_lots"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= INT64_MAX:
                raise ValueError(f"market {self.symbol}: {name} must be an integer >= 0")
        self.topic_book = f"book.{self.symbol}".encode()
        self.topic_trade = f"trade.{self.symbol}".encode()
        self.topic_mark = f"mark.{self.symbol}".encode()
        self.topic_funding = f"funding.{self.symbol}".encode()
        self.topic_liquidation = f"liquidation.{self.symbol}".encode()
        self._tick_text = format(self.tick_size.normalize(), "f")
        self._lot_text = format(self.lot_size.normalize(), "f")

        # Conversion caches: a market maker repeats the same prices and sizes all day.
        self._ticks_in, self._lots_in, self._ticks_out, self._lots_out = {}, {}, {}, {}

    def set_limits(self, max_price_ticks: int, max_order_lots: int) -> None:
        self.max_price_ticks = max_price_ticks
        self.max_order_lots = max_order_lots
        self._ticks_in.clear()
        self._lots_in.clear()

    # -- wire -> engine -----------------------------------------------------------------
    def price_to_ticks(self, value, what: str = "price") -> int:
        if type(value) is str:
            ticks = self._ticks_in.get(value)
            if ticks is not None:
                return ticks
        ticks = to_units(value, self._tick_m, self._tick_e, REASON_INVALID_PRICE,
                         REASON_INVALID_TICK, what, f"the tick size {self._tick_text}")
        limit = self.max_price_ticks or INT64_MAX
        if ticks > limit:
            raise EdgeReject(REASON_INVALID_PRICE,
                             f"{what} {value} is above the market's maximum "
                             f"{self.ticks_to_str(limit)}")
        if type(value) is str:
            if len(self._ticks_in) >= CACHE_LIMIT:
                self._ticks_in.clear()
            self._ticks_in[value] = ticks
        return ticks

    def qty_to_lots(self, value, what: str = "qty") -> int:
        if type(value) is str:
            lots = self._lots_in.get(value)
            if lots is not None:
                return lots
        lots = to_units(value, self._lot_m, self._lot_e, REASON_INVALID_QTY, REASON_INVALID_LOT,
                        what, f"the lot size {self._lot_text}")
        limit = self.max_order_lots or INT64_MAX
        if lots > limit:
            raise EdgeReject(REASON_INVALID_QTY,
                             f"{what} {value} is above the market's maximum order "
                             f"{self.lots_to_str(limit)}")
        if type(value) is str:
            if len(self._lots_in) >= CACHE_LIMIT:
                self._lots_in.clear()
            self._lots_in[value] = lots
        return lots

    # -- engine -> wire -----------------------------------------------------------------
    def ticks_to_str(self, ticks: int) -> str:
        s = self._ticks_out.get(ticks)
        if s is None:
            s = format_scaled(ticks * self._tick_m, self._tick_e)
            if len(self._ticks_out) >= CACHE_LIMIT:
                self._ticks_out.clear()
            self._ticks_out[ticks] = s
        return s

    def lots_to_str(self, lots: int) -> str:
        s = self._lots_out.get(lots)
        if s is None:
            s = format_scaled(lots * self._lot_m, self._lot_e)
            if len(self._lots_out) >= CACHE_LIMIT:
                self._lots_out.clear()
            self._lots_out[lots] = s
        return s

    def signed_lots_to_str(self, lots: int) -> str:
        """A position size: negative = short."""
        return "-" + self.lots_to_str(-lots) if lots < 0 else self.lots_to_str(lots)

    def ticks_to_decimal(self, ticks) -> Decimal:
        return Decimal(ticks) * self.tick_size

    def describe(self) -> dict:
        return {"symbol": self.symbol, "id": self.market_id,
                "tick_size": self._tick_text, "lot_size": self._lot_text,
                "atoms_per_tick_lot": self.atoms_per_tick_lot,
                "max_price_ticks": self.max_price_ticks, "max_order_lots": self.max_order_lots}


class MarketTable:
    """Markets by symbol and by engine id."""

    def __init__(self, markets: list[Market]):
        self.markets = list(markets)
        self.by_symbol = {}
        self.by_id = {}
        for m in self.markets:
            if m.symbol in self.by_symbol:
                raise ValueError(f"market symbol {m.symbol} appears twice")
            if m.market_id in self.by_id:
                raise ValueError(f"market id {m.market_id} appears twice "
                                 f"({self.by_id[m.market_id].symbol}, {m.symbol})")
            self.by_symbol[m.symbol] = m
            self.by_id[m.market_id] = m

    @classmethod
    def from_dicts(cls, items: list[dict]) -> MarketTable:
        markets = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"market #{i} must be an object")
            item = dict(item)
            try:
                symbol = item.pop("symbol")
                tick = item.pop("tick_size")
                lot = item.pop("lot_size")
            except KeyError as e:
                raise ValueError(f"market #{i} lacks {e.args[0]}") from None
            market_id = item.pop("id", i)
            market = Market(symbol=symbol, market_id=market_id, tick_size=tick, lot_size=lot,
                            max_price_ticks=item.pop("max_price_ticks", 0),
                            max_order_lots=item.pop("max_order_lots", 0), extra=item)
            stated = item.get("atoms_per_tick_lot")
            if stated is not None and stated != market.atoms_per_tick_lot:
                raise ValueError(f"market {symbol}: atoms_per_tick_lot {stated} disagrees with "
                                 f"tick_size x lot_size ({market.atoms_per_tick_lot})")
            markets.append(market)
        return cls(markets)

    @classmethod
    def load(cls, path) -> MarketTable:
        doc = json.loads(Path(path).read_text())
        items = doc["markets"] if isinstance(doc, dict) else doc
        return cls.from_dicts(items)

    def to_json(self) -> str:
        return json.dumps({"markets": [dict(m.describe(), **m.extra) for m in self.markets]})

    def get(self, symbol) -> Market:
        """The market a message names; `invalid_message` for a non-string, else `unknown_market`."""
        market = self.by_symbol.get(symbol) if type(symbol) is str else None
        if market is None:
            if type(symbol) is not str:
                raise EdgeReject(REASON_INVALID_MESSAGE, "market must be a symbol string")
            raise EdgeReject(REASON_UNKNOWN_MARKET, f"unknown market {symbol[:40]!r}")
        return market
