"""The index board: `<prefix>-index`, indexes in shared memory between processes.

Created by the supervisor, so it outlives riskd restarts and an operator's price survives them.
Written in two directions: `perpx oracle set` writes a market's operator line (the manual feed
reads it), riskd publishes the index, mark and funding estimate it computed (the gateways'
`mark.MARKET` and `perpx status` read it).
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from shm import names
from shm.cursor import CACHE_LINE, Cursor
from shm.region import Region, ShmError

INDEX_BOARD_LAYOUT = 0x5045_5250_4958_0001    # "PERPIX" v1

# riskd's line per market, a seqlock: `version` is odd while riskd writes the line.
_PUBLISHED_DTYPE = np.dtype([
    ("version", "<i8"),
    ("index_ticks", "<i8"),
    ("mark_ticks", "<i8"),          # the mark riskd computed from it (sent when it changed)
    ("funding_rate_e9", "<i8"),     # the current interval's rate estimate (riskd/funding.py)
    ("next_funding_ns", "<i8"),     # the end of the current interval (epoch ns)
    ("ts_ns", "<i8"),               # when riskd computed them (wall clock)
    ("applied_version", "<i8"),     # the operator version that index came from (manual feeds)
    ("_pad", "<i8"),
])
assert _PUBLISHED_DTYPE.itemsize == CACHE_LINE

Published = namedtuple("Published", ["index_ticks", "mark_ticks", "funding_rate_e9",
                                     "next_funding_ns", "ts_ns", "applied_version"])
_SEQLOCK_ATTEMPTS = 10_000


class IndexBoard:
    """`<prefix>-index`: indexes in shared memory, one cache line per market and direction.

    Layout (every part a 64-byte line): a meta line (max_markets); then per market the
    OPERATOR line: word 0 the index an operator set (ticks, 0 = never set; a Cursor: one aligned
    int64, read atomically), word 1 a version bumped after each set; then per market the
    PUBLISHED line, riskd's output: index, mark, funding rate, next funding time, under a seqlock.

    One writer per line: operator lines are written by `perpx oracle set` (serialised by the ops
    lock), published lines only by riskd. Readers never block anyone.

    For market data (the gateway's `mark.MARKET` {mark, index, funding_rate, next_funding_ts}):
    `published(m)` gives index_ticks and mark_ticks (x tick_size), funding_rate_e9 (the
    current interval's estimate, / 1e9, signed) and next_funding_ns (epoch ns, the end of the
    current interval); None until riskd has published for that market.
    """

    def __init__(self, region: Region):
        self.region = region
        payload = region.payload
        self.max_markets = int(payload[:8].view(np.int64)[0])
        operator_at = CACHE_LINE
        published_at = operator_at + self.max_markets * CACHE_LINE
        self._operator = [Cursor.at(payload, operator_at + m * CACHE_LINE)
                          for m in range(self.max_markets)]
        self._versions = payload[operator_at:published_at].view(np.int64)[1::CACHE_LINE // 8]
        self._published = payload[published_at:published_at + self.max_markets * CACHE_LINE] \
            .view(_PUBLISHED_DTYPE)

    @staticmethod
    def _nbytes(max_markets: int) -> int:
        return (1 + 2 * max_markets) * CACHE_LINE

    @classmethod
    def create(cls, prefix: str, max_markets: int) -> IndexBoard:
        region = Region.create(names.index_board(prefix), INDEX_BOARD_LAYOUT,
                               cls._nbytes(max_markets))
        region.payload[:8].view(np.int64)[0] = max_markets
        return cls(region)

    @classmethod
    def attach(cls, prefix: str, max_markets: int | None = None) -> IndexBoard:
        region = Region.attach(names.index_board(prefix), INDEX_BOARD_LAYOUT)
        found = int(region.payload[:8].view(np.int64)[0])
        if region.payload.size != cls._nbytes(found) or (max_markets not in (None, found)):
            region.close()
            raise ShmError(f"index board {region.name} holds {found} markets, expected "
                           f"{max_markets}")
        return cls(region)

    def _check(self, market: int) -> None:
        if not 0 <= market < self.max_markets:
            raise ValueError(f"market {market} is outside 0..{self.max_markets - 1}")

    # -- operator side (perpx oracle set) and ManualFeed ---------------------------------
    def set(self, market: int, ticks: int) -> int:
        """Set a market's operator index; returns the new version. Price first, then version."""
        self._check(market)
        if ticks < 1:
            raise ValueError(f"an index must be at least 1 tick, got {ticks}")
        self._operator[market].set(ticks)
        version = int(self._versions[market]) + 1
        self._versions[market] = version
        return version

    def get(self, market: int) -> int:
        """The operator's index in ticks, 0 if never set."""
        self._check(market)
        return self._operator[market].get()

    def version(self, market: int) -> int:
        self._check(market)
        return int(self._versions[market])

    # -- riskd's side ---------------------------------------------------------------------
    def publish(self, market: int, published: Published) -> None:
        self._check(market)
        line = self._published[market:market + 1]
        version = int(line["version"][0])
        line["version"] = version + 1          # odd: readers retry
        for name, value in zip(Published._fields, published):
            line[name] = value
        line["version"] = version + 2

    def published(self, market: int) -> Published | None:
        """riskd's latest values for a market (None: never published, or riskd died mid-write)."""
        self._check(market)
        line = self._published[market:market + 1]
        for _ in range(_SEQLOCK_ATTEMPTS):
            before = int(line["version"][0])
            if before & 1:
                continue
            values = Published(*(int(line[name][0]) for name in Published._fields))
            if int(line["version"][0]) == before:
                return values if before else None
        return None

    def close(self) -> None:
        self._operator = self._versions = self._published = None
        self.region.close()

    def unlink(self) -> None:
        self.region.unlink()
