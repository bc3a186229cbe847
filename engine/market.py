"""A market as every process sees it: its grids, limits and rules, in decimals and engine units.

One type for the config (perpx/config.py builds and validates it), exchange.json (`describe()`
writes it, `from_dict()` reads it back) and the wire (the gateway converts prices and
quantities with it, once, at the edge, caching what market makers repeat all day).

Conversions never round: a price off the tick grid is `invalid_tick`, a quantity off the lot
grid `invalid_lot` (EdgeReject, engine/units.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from engine.records import (REASON_INVALID_LOT, REASON_INVALID_MESSAGE, REASON_INVALID_PRICE,
                            REASON_INVALID_QTY, REASON_INVALID_TICK, REASON_UNKNOWN_MARKET)
from engine.units import (ATOMS_PER_USDC, INT64_MAX, RATE, USDC, EdgeReject, Grid, atoms_str,
                          dec_str)

CACHE_LIMIT = 1 << 16        # entries per conversion cache (cleared when full)


@dataclass(frozen=True)
class Bracket:
    floor: Decimal               # notional (USDC) from which the rate applies
    rate: Decimal                # maintenance margin rate
    maintenance_amount: Decimal  # Binance-style deduction: keeps the requirement continuous
    max_leverage: int = 0        # resolved: the default when the config leaves it out


@dataclass
class Market:
    """The configured market. Only symbol, id and the two grids are required: a table that only
    converts (a test, a tool) may leave the rules at their defaults."""
    symbol: str
    id: int
    tick_size: Decimal
    lot_size: Decimal
    max_price_ticks: int = 0      # 0 = not known here (a gateway takes the matcher's on attach)
    max_order_lots: int = 0
    max_position_lots: int = 0
    initial_price_ticks: int = 0
    max_open_orders: int = 0
    oracle: str = "manual"        # "sim", "manual" or "csv:<absolute path>"
    max_leverage: int = 1
    maker_fee: Decimal = Decimal(0)
    taker_fee: Decimal = Decimal(0)
    price_band: Decimal = Decimal(0)
    brackets: tuple = ()
    liquidation_fee: Decimal = Decimal(0)
    funding_interval_s: int = 28800
    interest_rate: Decimal = Decimal(0)
    funding_cap: Decimal = Decimal(0)
    # filters (0: none)
    min_notional_atoms: int = 0
    max_stop_orders: int = 0
    open_interest_cap_lots: int = 0

    def __hash__(self):
        return hash((self.symbol, self.id))

    def __post_init__(self):
        if not isinstance(self.symbol, str) or not self.symbol or len(self.symbol) > 32:
            raise ValueError(f"market symbol must be a non-empty string, got {self.symbol!r}")
        if isinstance(self.id, bool) or not isinstance(self.id, int) or not 0 <= self.id < 2 ** 15:
            raise ValueError(f"market {self.symbol}: id {self.id!r} out of range")
        self.tick = Grid(self.tick_size, "tick size")
        self.lot = Grid(self.lot_size, "lot size")
        self.tick_size, self.lot_size = self.tick.step, self.lot.step
        atoms = self.tick_size * self.lot_size * ATOMS_PER_USDC
        if atoms != atoms.to_integral_value() or atoms < 1:
            raise ValueError(f"market {self.symbol}: tick_size x lot_size = "
                             f"{dec_str(self.tick_size * self.lot_size)} USDC is not a whole "
                             f"number of atoms (1e-6 USDC)")
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
        # Rates in the engine's unit (1e-9); the config proved them exact.
        self.maker_fee_e9 = RATE.exact(Decimal(self.maker_fee))
        self.taker_fee_e9 = RATE.exact(Decimal(self.taker_fee))
        self.price_band_e9 = RATE.exact(Decimal(self.price_band))
        self.liquidation_fee_e9 = RATE.exact(Decimal(self.liquidation_fee))
        self.interest_rate_e9 = RATE.exact(Decimal(self.interest_rate))
        self.funding_cap_e9 = RATE.exact(Decimal(self.funding_cap))
        # Conversion caches: a market maker repeats the same prices and sizes all day.
        self._ticks_in, self._lots_in, self._ticks_out, self._lots_out = {}, {}, {}, {}

    @property
    def max_price(self) -> Decimal:
        return self.tick.decimal(self.max_price_ticks)

    @property
    def initial_price(self) -> Decimal:
        return self.tick.decimal(self.initial_price_ticks)

    def set_limits(self, max_price_ticks: int, max_order_lots: int) -> None:
        """The matcher's limits, read by a gateway when it attaches (they bound what it
        accepts)."""
        self.max_price_ticks = max_price_ticks
        self.max_order_lots = max_order_lots
        self._ticks_in.clear()
        self._lots_in.clear()

    # -- decimal -> engine (cache hits inline: this is the gateway's per-message path) --------
    def price_to_ticks(self, value, what: str = "price") -> int:
        """A positive price on the tick grid, at most the market's max price."""
        ticks = self._ticks_in.get(value) if type(value) is str else None
        if ticks is None:
            ticks = self._to_units(value, self.tick, self._ticks_in, self.max_price_ticks,
                                   REASON_INVALID_PRICE, REASON_INVALID_TICK, what, "maximum")
        return ticks

    def qty_to_lots(self, value, what: str = "qty") -> int:
        """A positive quantity on the lot grid, at most the market's max order."""
        lots = self._lots_in.get(value) if type(value) is str else None
        if lots is None:
            lots = self._to_units(value, self.lot, self._lots_in, self.max_order_lots,
                                  REASON_INVALID_QTY, REASON_INVALID_LOT, what, "maximum order")
        return lots

    @staticmethod
    def _to_units(value, grid: Grid, cache: dict, limit: int, reason_bad: int,
                  reason_grid: int, what: str, limit_name: str) -> int:
        units = grid.units(value, reason_bad, reason_grid, what)
        if units > (limit or INT64_MAX):
            raise EdgeReject(reason_bad, f"{what} {value} is above the market's {limit_name} "
                                         f"{grid.format(limit)}")
        if type(value) is str:
            if len(cache) >= CACHE_LIMIT:
                cache.clear()
            cache[value] = units
        return units

    # -- engine -> decimal ------------------------------------------------------------------
    def ticks_to_str(self, ticks: int) -> str:
        s = self._ticks_out.get(ticks)
        return s if s is not None else self._to_str(ticks, self.tick, self._ticks_out)

    def lots_to_str(self, lots: int) -> str:
        """A quantity or a signed position size (negative = short)."""
        s = self._lots_out.get(lots)
        return s if s is not None else self._to_str(lots, self.lot, self._lots_out)

    @staticmethod
    def _to_str(units: int, grid: Grid, cache: dict) -> str:
        s = grid.format(units)
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[units] = s
        return s

    # -- exchange.json ----------------------------------------------------------------------
    def describe(self) -> dict:
        """The market as configured, wire style (decimal strings), plus its engine units;
        `from_dict` reads it back."""
        return {
            "symbol": self.symbol, "id": self.id,
            "tick_size": self.tick.text, "lot_size": self.lot.text,
            "initial_price": self.ticks_to_str(self.initial_price_ticks), "oracle": self.oracle,
            "max_leverage": self.max_leverage,
            "maker_fee": dec_str(self.maker_fee), "taker_fee": dec_str(self.taker_fee),
            "price_band": dec_str(self.price_band),
            # [floor, maintenance rate, max leverage] as configured, then the derived amount
            "brackets": [[dec_str(b.floor), dec_str(b.rate), b.max_leverage,
                          dec_str(b.maintenance_amount)] for b in self.brackets],
            "liquidation_fee": dec_str(self.liquidation_fee),
            "funding_interval_s": self.funding_interval_s,
            "interest_rate": dec_str(self.interest_rate),
            "funding_cap": dec_str(self.funding_cap),
            "max_price": self.ticks_to_str(self.max_price_ticks),
            "max_position_qty": self.lots_to_str(self.max_position_lots),
            "max_order_qty": self.lots_to_str(self.max_order_lots),
            "max_open_orders": self.max_open_orders,
            "min_notional": atoms_str(self.min_notional_atoms),
            "max_stop_orders": self.max_stop_orders,
            "open_interest_cap": self.lots_to_str(self.open_interest_cap_lots),
            "atoms_per_tick_lot": self.atoms_per_tick_lot,
            "max_price_ticks": self.max_price_ticks,
            "max_order_lots": self.max_order_lots,
            "max_position_lots": self.max_position_lots,
            "initial_price_ticks": self.initial_price_ticks,
        }

    @classmethod
    def from_dict(cls, item: dict, default_id: int = 0) -> Market:
        """A market from `describe()` output (exchange.json), or from a table that gives only
        symbol, tick_size, lot_size and optionally id and the engine limits."""
        if not isinstance(item, dict):
            raise ValueError(f"market #{default_id} must be an object")
        try:
            symbol, tick, lot = item["symbol"], item["tick_size"], item["lot_size"]
        except KeyError as e:
            raise ValueError(f"market #{default_id} lacks {e.args[0]}") from None
        rules = {k: Decimal(str(item[k])) for k in ("maker_fee", "taker_fee", "price_band",
                                                     "liquidation_fee", "interest_rate",
                                                     "funding_cap") if k in item}
        rules.update({k: item[k] for k in ("max_position_lots", "initial_price_ticks",
                                            "max_open_orders", "oracle", "max_leverage",
                                            "funding_interval_s", "max_stop_orders") if k in item})
        if "brackets" in item:
            # [floor, rate, max leverage, amount]; older files hold [floor, rate, amount]
            rules["brackets"] = tuple(
                Bracket(Decimal(str(b[0])), Decimal(str(b[1])), Decimal(str(b[3])), int(b[2]))
                if len(b) == 4 else Bracket(*(Decimal(str(x)) for x in b))
                for b in item["brackets"])
        if "min_notional" in item:
            rules["min_notional_atoms"] = USDC.exact(Decimal(str(item["min_notional"])))
        if "open_interest_cap" in item:
            rules["open_interest_cap_lots"] = Grid(lot, "lot size").exact(
                Decimal(str(item["open_interest_cap"])))
        market = cls(symbol=symbol, id=item.get("id", default_id), tick_size=tick,
                     lot_size=lot, max_price_ticks=item.get("max_price_ticks", 0),
                     max_order_lots=item.get("max_order_lots", 0), **rules)
        stated = item.get("atoms_per_tick_lot")
        if stated is not None and stated != market.atoms_per_tick_lot:
            raise ValueError(f"market {symbol}: atoms_per_tick_lot {stated} disagrees with "
                             f"tick_size x lot_size ({market.atoms_per_tick_lot})")
        return market


class MarketTable:
    """Markets by symbol and by engine id."""

    def __init__(self, markets: list[Market]):
        self.markets = list(markets)
        self.by_symbol = {}
        self.by_id = {}
        for m in self.markets:
            if m.symbol in self.by_symbol:
                raise ValueError(f"market symbol {m.symbol} appears twice")
            if m.id in self.by_id:
                raise ValueError(f"market id {m.id} appears twice "
                                 f"({self.by_id[m.id].symbol}, {m.symbol})")
            self.by_symbol[m.symbol] = m
            self.by_id[m.id] = m

    @classmethod
    def from_dicts(cls, items: list[dict]) -> MarketTable:
        return cls([Market.from_dict(item, i) for i, item in enumerate(items)])

    def get(self, symbol) -> Market:
        """The market a message names; `invalid_message` for a non-string, else
        `unknown_market`."""
        market = self.by_symbol.get(symbol) if type(symbol) is str else None
        if market is None:
            if type(symbol) is not str:
                raise EdgeReject(REASON_INVALID_MESSAGE, "market must be a symbol string")
            raise EdgeReject(REASON_UNKNOWN_MARKET, f"unknown market {symbol[:40]!r}")
        return market
