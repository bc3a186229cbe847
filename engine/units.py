"""Fixed-point units: the one place that scales decimals to the engine's integers and back.

Inside the exchange every number is an int64 in a fixed unit: prices in ticks, quantities in
lots, collateral in atoms (1e-6 USDC), rates in 1e-9. Outside it (the wire, the config, the
CLI, DuckDB) they are decimals. A `Grid` is one such unit, a positive decimal step, and converts
exactly in both directions: a value off the grid is refused, never rounded.

Two kinds of input, two parsers:
- the wire and the CLI (`Grid.units`, `usdc_to_atoms`): a plain string of ASCII digits with an
  optional fraction ("65000", "0.001", trailing zeros fine; no sign, exponent, spaces, "NaN"),
  or an int; a float is refused (a binary float cannot say which decimal was meant);
- the config (`parse_decimal`): also signed values and TOML's Decimal, for fees and rates.

Refusals raise `EdgeReject(reason, text)`, a ValueError carrying an engine reason code
(engine/records.py), so a gateway turns it into a `reject` and a CLI into one line.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from engine.records import REASON_INVALID_MESSAGE

ATOM_EXPONENT = 6
ATOMS_PER_USDC = 10 ** ATOM_EXPONENT
RATE_EXPONENT = 9
RATE_E9 = 10 ** RATE_EXPONENT
INT64_MAX = 2 ** 63 - 1
# No legal value needs more characters than this; longer strings are refused before parsing.
MAX_DECIMAL_CHARS = 40
_WIRE_DECIMAL = re.compile(r"([0-9]{1,30})(?:\.([0-9]{1,30}))?")
_CONFIG_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")
_POW10 = [10 ** i for i in range(80)]


class EdgeReject(ValueError):
    """A value or request refused: a reason code (engine.records) and a text for people."""

    def __init__(self, reason: int, text: str):
        super().__init__(text)
        self.reason = reason
        self.text = text


def wire_digits(value, reason_bad: int, what: str) -> tuple[int, int]:
    """A wire number as (integer digits, number of fraction digits): "65000.5" -> (650005, 1).

    Strings must be plain non-negative decimals; ints are taken as they are. Malformed or
    negative values raise EdgeReject(reason_bad); a float or another type `invalid_message`.
    """
    kind = type(value)
    if kind is str:
        if len(value) > MAX_DECIMAL_CHARS:
            raise EdgeReject(reason_bad, f"{what} has too many digits")
        m = _WIRE_DECIMAL.fullmatch(value)
        if m is None:
            if value[:1] == "-" and _WIRE_DECIMAL.fullmatch(value[1:]):
                raise EdgeReject(reason_bad, f"{what} must be positive")
            raise EdgeReject(reason_bad, f"{what} {value!r} is not a plain decimal string "
                                         f"like \"65000.5\"")
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


def parse_decimal(value, what: str) -> Decimal:
    """A config or command-line number: str, int or (TOML-parsed) Decimal, signed; never a bool
    or a float (ValueError)."""
    if isinstance(value, (bool, float)):
        raise ValueError(f"{what}: {value!r} must be a decimal string like \"0.1\"")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, str):
        text = value.strip()
        if not _CONFIG_DECIMAL.fullmatch(text):
            raise ValueError(f"{what}: {value!r} is not a plain decimal number")
        try:
            d = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"{what}: {value!r} is not a decimal number") from None
    else:
        raise ValueError(f"{what}: {value!r} must be a decimal string, not "
                         f"{type(value).__name__}")
    if not d.is_finite():
        raise ValueError(f"{what}: {value!r} is not a finite number")
    return d


def dec_str(value: Decimal) -> str:
    """A decimal as a plain string without exponent or trailing zeros: 65000, 0.001, -0.0001."""
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def scaled_str(n: int, exponent: int) -> str:
    """n * 10**-exponent as a plain decimal string without trailing zeros: (650005, 1) ->
    "65000.5"; negative stays negative."""
    if exponent == 0:
        return str(n)
    neg = n < 0
    s = str(-n if neg else n)
    if len(s) <= exponent:
        s = "0" * (exponent - len(s) + 1) + s
    whole, frac = s[:-exponent], s[-exponent:].rstrip("0")
    out = whole + "." + frac if frac else whole
    return "-" + out if neg else out


class Grid:
    """A positive decimal step (a tick size, a lot size, 1e-6 USDC, 1e-9) as mantissa x
    10**-exponent, converting exactly between decimals and whole numbers of steps."""

    __slots__ = ("name", "step", "mantissa", "exponent", "text")

    def __init__(self, step, name: str = "step"):
        step = parse_decimal(step, name) if not isinstance(step, Decimal) else step
        if not step.is_finite() or step <= 0:
            raise ValueError(f"{name} must be a positive decimal, got {step}")
        self.name = name
        _, digits, exp = step.normalize().as_tuple()
        mantissa = int("".join(map(str, digits)))
        self.step = step
        self.mantissa, self.exponent = (mantissa * 10 ** exp, 0) if exp > 0 else (mantissa, -exp)
        self.text = dec_str(step)

    def units(self, value, reason_bad: int, reason_grid: int, what: str) -> int:
        """A positive wire value (see wire_digits) as a whole number of steps: off the grid
        raises EdgeReject(reason_grid), zero or malformed EdgeReject(reason_bad)."""
        digits, places = wire_digits(value, reason_bad, what)
        if digits == 0:
            raise EdgeReject(reason_bad, f"{what} must be positive")
        if places <= self.exponent:
            units, rest = divmod(digits * _POW10[self.exponent - places], self.mantissa)
        else:
            units, rest = divmod(digits, self.mantissa * _POW10[places - self.exponent])
        if rest:
            raise EdgeReject(reason_grid, f"{what} {value} is not a multiple of the {self.name} "
                                          f"{self.text}")
        return units

    def exact(self, value: Decimal) -> int | None:
        """value / step when it is a whole number (any sign), else None."""
        _, digits, exp = value.as_tuple()
        n = int("".join(map(str, digits)) or 0) * (-1 if value < 0 else 1)
        places = -exp if exp < 0 else 0
        n *= _POW10[exp] if exp > 0 else 1
        if places <= self.exponent:
            units, rest = divmod(n * _POW10[self.exponent - places], self.mantissa)
        else:
            units, rest = divmod(n, self.mantissa * _POW10[places - self.exponent])
        return None if rest else units

    def format(self, units: int) -> str:
        """units x step as a plain decimal string ("65000.5"); negative stays negative."""
        return scaled_str(units * self.mantissa, self.exponent)

    def decimal(self, units: int) -> Decimal:
        return Decimal(units) * self.step


USDC = Grid(Decimal(1).scaleb(-ATOM_EXPONENT), "USDC atom")
RATE = Grid(Decimal(1).scaleb(-RATE_EXPONENT), "rate unit")


def usdc_to_atoms(value, what: str = "amount") -> int:
    """A positive USDC amount (at most 6 decimals) as atoms; anything else `invalid_message`."""
    bad = REASON_INVALID_MESSAGE
    digits, places = wire_digits(value, bad, what)
    if places > ATOM_EXPONENT and digits % _POW10[places - ATOM_EXPONENT]:
        raise EdgeReject(bad, f"{what} {value} has more than 6 decimals (USDC atoms are 1e-6)")
    atoms = USDC.units(value, bad, bad, what)
    if atoms > INT64_MAX // 2:
        raise EdgeReject(REASON_INVALID_MESSAGE, f"{what} {value} is too large")
    return atoms


def atoms_str(atoms: int) -> str:
    """Collateral atoms as USDC: 1_500_000 -> "1.5"; negative stays negative."""
    return scaled_str(atoms, ATOM_EXPONENT)
