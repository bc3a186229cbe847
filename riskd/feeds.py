"""Index price feeds: where riskd gets each market's index (DESIGN.md §5).

A feed is an `IndexFeed`: `index_ticks(now_ns)` returns the index in the market's ticks (an
int on the grid, within [1, max_price_ticks]) or None while it has no price. riskd calls it once
per tick with the wall clock; feeds are outside the matcher, so they may use floats and clocks
internally, but what they return is an exact integer tick.

Kinds, chosen by the market's `oracle` string (perpx/config.py):

    "sim"        SimWalk: a seeded geometric random walk (reproducible from seed + times)
    "csv:PATH"   CsvReplay: rows `ts_ns,price` replayed by time, holding the last price
    "manual"     ManualFeed: the price an operator set with `perpx oracle set` (IndexBoard)

Plugging in an external feed (an exchange websocket, a Pyth/Chainlink reader, ...): subclass
`IndexFeed`, register a factory under a new kind in `FEED_KINDS` (it receives the Market,
the text after "kind:" and a `FeedContext`), and admit the kind in perpx/config.py's oracle
validation. A feed that does network I/O must do it on its own thread and make
`index_ticks` return the latest value at once: riskd calls every feed on one thread, every tick.

The operator's prices reach the manual feed through the index board (shm/index_board.py).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.units import Grid, parse_decimal
from shm.index_board import IndexBoard

NS_PER_S = 1_000_000_000

# About 50% a year (0.5 / sqrt(365 * 86400 s) = 0.89 bps per sqrt(second)), BTC-like.
DEFAULT_SIM_VOL_BPS_PER_SQRT_S = 1.0
# The sim steps ten times a second whatever riskd's tick, so the path depends only on time.
SIM_STEP_NS = 100_000_000


class IndexFeed:
    """The plug-in point: one market's index source (see the module docstring).

    `applied_version` is for feeds an operator drives: the version of the operator's input the
    last `index_ticks` call used (riskd publishes it, so `perpx oracle set` can wait until its
    price is in use). Other feeds leave it 0.
    """

    applied_version = 0

    def index_ticks(self, now_ns: int) -> int | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the feed holds (files, shm, threads)."""


# ---- sim ----------------------------------------------------------------------------------------
class SimWalk(IndexFeed):
    """A driftless geometric random walk in log price, stepped every SIM_STEP_NS of time.

    The walk starts at `initial_ticks` at the first call's `now_ns`; step k (k = elapsed //
    SIM_STEP_NS) adds sigma * N(0, 1) to the log price, sigma = vol x sqrt(step seconds), with
    normals from numpy's PCG64 seeded by `seed` (an int or a sequence of ints). So the price at a
    time depends only on the seed and the time elapsed since the first call, not on how often
    it is sampled: the same seed and the same `now_ns` sequence give the same prices (with the
    same numpy: its Generator streams are stable within a version).

    Floats live only inside: the output is round(initial x exp(log move)) as an int, clamped to
    [1, max_ticks]; the log price itself is clamped to that range too, so the walk never sticks
    beyond a bound.
    """

    def __init__(self, initial_ticks: int, seed, vol_bps_per_sqrt_s: float, max_ticks: int):
        if not 1 <= initial_ticks <= max_ticks:
            raise ValueError(f"initial price {initial_ticks} ticks is outside [1, {max_ticks}]")
        self._initial_ticks = initial_ticks
        self._max_ticks = max_ticks
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._sigma = vol_bps_per_sqrt_s / 1e4 * math.sqrt(SIM_STEP_NS / NS_PER_S)
        self._log_lo = math.log(1 / initial_ticks)
        self._log_hi = math.log(max_ticks / initial_ticks)
        self._log_move = 0.0
        self._origin_ns = None
        self._steps = 0

    def index_ticks(self, now_ns: int) -> int:
        if self._origin_ns is None:
            self._origin_ns = now_ns
        target = max(0, (now_ns - self._origin_ns) // SIM_STEP_NS)
        if target > self._steps:
            x = self._log_move
            for z in self._rng.standard_normal(target - self._steps):
                x = min(max(x + self._sigma * float(z), self._log_lo), self._log_hi)
            self._log_move = x
            self._steps = target
        ticks = round(self._initial_ticks * math.exp(self._log_move))
        return min(max(ticks, 1), self._max_ticks)


# ---- csv ----------------------------------------------------------------------------------------
class CsvFeedError(ValueError):
    """A CSV index file that cannot be replayed; the message names the file and line."""


class CsvReplay(IndexFeed):
    """Replays `ts_ns,price` rows (price a decimal string on the tick grid).

    The file is read and checked once, at construction: blank lines and `#` comments are
    skipped, an optional header `ts_ns,price` is allowed, timestamps must not go back, and a
    price off the grid, not positive or above `max_ticks` fails with the line named.

    Relative time (default): the first `index_ticks` call plays the first row, and a row plays
    once as much time has passed since that call as lies between it and the first row. With
    `absolute_ts=True` a row plays once `now_ns` reaches its `ts_ns` (None before the first).
    After the last row the last price holds.
    """

    def __init__(self, path, tick_size, max_ticks: int | None = None, absolute_ts: bool = False):
        self.path = Path(path)
        self._times_ns, self._prices_ticks = _load_csv(self.path, Grid(tick_size, "tick size"),
                                                       max_ticks)
        self._absolute = absolute_ts
        self._origin_ns = None

    def index_ticks(self, now_ns: int) -> int | None:
        if self._absolute:
            at_ns = now_ns
        else:
            if self._origin_ns is None:
                self._origin_ns = now_ns
            at_ns = self._times_ns[0] + (now_ns - self._origin_ns)
        k = bisect.bisect_right(self._times_ns, at_ns)
        return self._prices_ticks[k - 1] if k else None


def _load_csv(path: Path, tick: Grid, max_ticks: int | None) -> tuple[list, list]:
    times, prices = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise CsvFeedError(f"{path}: cannot read the index file: {e.strerror}") from None
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        fields = [f.strip() for f in line.split(",")]
        if not times and fields == ["ts_ns", "price"]:
            continue
        if len(fields) != 2:
            raise CsvFeedError(f"{where}: expected `ts_ns,price`, got {raw!r}")
        ts_text, price_text = fields
        if not ts_text.lstrip("-").isdigit():
            raise CsvFeedError(f"{where}: ts_ns {ts_text!r} is not an integer (nanoseconds)")
        ts_ns = int(ts_text)
        if times and ts_ns < times[-1]:
            raise CsvFeedError(f"{where}: ts_ns {ts_ns} goes back (previous row {times[-1]})")
        try:
            ticks = tick.exact(parse_decimal(price_text, "price"))
        except ValueError as e:
            raise CsvFeedError(f"{where}: {e}") from None
        if ticks is None:
            raise CsvFeedError(f"{where}: price {price_text} is not a multiple of the tick size "
                               f"{tick.text}")
        if ticks < 1:
            raise CsvFeedError(f"{where}: price {price_text} is not positive")
        if max_ticks is not None and ticks > max_ticks:
            raise CsvFeedError(f"{where}: price {price_text} is above the market's max price "
                               f"{tick.format(max_ticks)}")
        times.append(ts_ns)
        prices.append(ticks)
    if not times:
        raise CsvFeedError(f"{path}: no price rows (expected lines `ts_ns,price`)")
    return times, prices


# ---- the manual feed ------------------------------------------------------------------------
class ManualFeed(IndexFeed):
    """The operator's index from the IndexBoard (None until one is set). Owns its board."""

    def __init__(self, board: IndexBoard, market: int):
        self._board = board
        self._market = market

    def index_ticks(self, now_ns: int) -> int | None:
        # Version before price: a set in between makes us claim an older version, never a
        # newer one than the price we use.
        version = self._board.version(self._market)
        ticks = self._board.get(self._market)
        self.applied_version = version
        return ticks or None

    def close(self) -> None:
        self._board.close()


# ---- one market's feed fails alone ------------------------------------------------------------
FEED_RETRY_S = 1.0


class GuardedFeed(IndexFeed):
    """A market's feed that fails alone: building it (a CSV with a bad row) or reading a price
    may raise; the error is kept (`error`, `failing_since_ns`) and logged when it changes, the
    market gets no index meanwhile (riskd keeps its last good one and sends no mark), and the
    feed is built again every FEED_RETRY_S (an operator fixes the file: it recovers)."""

    def __init__(self, build, symbol: str, log):
        self._build = build
        self._symbol = symbol
        self._log = log
        self._feed = None
        self._retry_ns = 0
        self.error: str | None = None
        self.failing_since_ns: int | None = None

    @property
    def applied_version(self) -> int:
        return self._feed.applied_version if self._feed is not None else 0

    def index_ticks(self, now_ns: int) -> int | None:
        try:
            if self._feed is None:
                if now_ns < self._retry_ns:
                    return None
                self._feed = self._build()
            ticks = self._feed.index_ticks(now_ns)
        except Exception as e:          # any feed's failure: this market's alone
            self._fail(f"{type(e).__name__}: {e}", now_ns)
            return None
        if self.error is not None:
            self._log(f"{self._symbol}: index feed recovered")
            self.error = self.failing_since_ns = None
        return ticks

    def _fail(self, error: str, now_ns: int) -> None:
        if error != self.error:
            self._log(f"{self._symbol}: index feed failing, keeping the last index: {error}")
        self.error = error
        if self.failing_since_ns is None:
            self.failing_since_ns = now_ns
        self._retry_ns = now_ns + int(FEED_RETRY_S * NS_PER_S)
        if self._feed is not None:
            try:
                self._feed.close()
            finally:
                self._feed = None

    def close(self) -> None:
        if self._feed is not None:
            self._feed.close()
            self._feed = None


# ---- the factory ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FeedContext:
    prefix: str                   # the exchange's shm prefix
    seed: int                     # riskd's seed; sim walks mix in the market id
    start_ticks: int | None       # where a sim walk resumes (riskd's last published index)


def _sim_feed(spec, _arg: str, ctx: FeedContext) -> IndexFeed:
    return SimWalk(ctx.start_ticks or spec.initial_price_ticks, (ctx.seed, spec.id),
                   DEFAULT_SIM_VOL_BPS_PER_SQRT_S, spec.max_price_ticks)


def _manual_feed(spec, _arg: str, ctx: FeedContext) -> IndexFeed:
    return ManualFeed(IndexBoard.attach(ctx.prefix), spec.id)


def _csv_feed(spec, arg: str, _ctx: FeedContext) -> IndexFeed:
    return CsvReplay(arg, spec.tick_size, max_ticks=spec.max_price_ticks)


# kind -> factory(market_spec, text after "kind:", FeedContext): the registry of feed kinds.
FEED_KINDS = {"sim": _sim_feed, "manual": _manual_feed, "csv": _csv_feed}


def feed_for(market_spec, prefix: str, seed: int, start_ticks: int | None = None) -> IndexFeed:
    """The feed a market's `oracle` string names ("sim", "manual", "csv:PATH", ...)."""
    kind, _, arg = market_spec.oracle.partition(":")
    factory = FEED_KINDS.get(kind)
    if factory is None:
        raise ValueError(f"{market_spec.symbol}: unknown oracle kind {kind!r} (known: "
                         f"{', '.join(sorted(FEED_KINDS))})")
    return factory(market_spec, arg, FeedContext(prefix, seed, start_ticks))

