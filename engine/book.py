"""Walking the compiled matcher's book tables: the one place that knows how they link.

Per market and side, `book_levels[m, side, :book_depth[m, side]]` holds level slots sorted
with the BEST LAST (`book_keys` are price for bids, -price for asks); each level links its
orders front to back through `first` and the orders' `next`. `tables` is anything with the
state's table attributes (engine/state.py State, or a copy of it).

Readers of live shared memory may see a torn book: these walks are bounded, so a reader gets a
wrong answer it can detect, never an endless loop.
"""

from __future__ import annotations

from engine.state import NONE


def level_slots(tables, market: int, side: int) -> list[int]:
    """The side's level slots, best first."""
    depth = int(tables.book_depth[market, side])
    return [int(s) for s in tables.book_levels[market, side, :depth][::-1]]


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
