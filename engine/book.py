"""Walking the compiled matcher's book tables: the one place that knows how they link.

A book side's levels are sorted by key (price for bids, -price for asks: the best is the
largest) over blocks: `book_dir[m, side, :book_nblocks[m, side]]` lists the side's blocks in
key order, the best block last, and block b holds `book_counts[b]` level slots in
`book_levels[b]` (their keys in `book_keys[b]`), ascending (engine/state.py). Each level
links its orders front to back through `first` and the orders' `next`. `tables` is anything
with the state's table attributes (engine/state.py State, or a copy of it).

Readers of live shared memory may see a torn book: these walks are bounded, so a reader gets a
wrong answer it can detect, never an endless loop.
"""

from __future__ import annotations

from engine.records import SIDE_BUY
from engine.state import NONE


def _blocks(tables, market: int, side: int):
    """The side's blocks, best first, with their counts (clipped to the tables' bounds)."""
    nb = min(max(int(tables.book_nblocks[market, side]), 0), tables.book_dir.shape[2])
    size = tables.book_levels.shape[1]
    for d in range(nb - 1, -1, -1):
        b = int(tables.book_dir[market, side, d])
        yield b, min(max(int(tables.book_counts[b]), 0), size)


def level_slots(tables, market: int, side: int) -> list[int]:
    """The side's level slots, best first."""
    slots = []
    for b, n in _blocks(tables, market, side):
        slots.extend(int(s) for s in tables.book_levels[b, :n][::-1])
    return slots


def level_keys(tables, market: int, side: int) -> list[int]:
    """The side's keys in the order `level_slots` gives their levels (descending)."""
    keys = []
    for b, n in _blocks(tables, market, side):
        keys.extend(int(k) for k in tables.book_keys[b, :n][::-1])
    return keys


def best_price(tables, market: int, side: int) -> int | None:
    """The side's best price in ticks, None when it is empty."""
    for b, n in _blocks(tables, market, side):
        if n:
            key = int(tables.book_keys[b, n - 1])
            return key if side == SIDE_BUY else -key
        return None
    return None


def order_slots(tables, level: int):
    """The order slots resting at a level, front (oldest) to back. Stops after as many orders
    as the table has (a cycle in a torn or broken book)."""
    orders = tables.orders
    slot = int(tables.levels[level]["first"])
    for _ in range(len(orders)):
        if slot == NONE:
            return
        yield slot
        slot = int(orders[slot]["next"])


def side_levels(tables, market: int, side: int):
    """(price_ticks, qty_lots) of a book side, best first."""
    levels = tables.levels
    for lvl in level_slots(tables, market, side):
        yield int(levels[lvl]["price_ticks"]), int(levels[lvl]["qty_lots"])
