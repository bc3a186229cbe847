"""A cursor: one int64 sequence number alone on its own cache line in shared memory.

It has exactly one writer process. Loads and stores go through a numpy view of an aligned
int64, which numpy performs as a single 8-byte move: atomic on x86-64, so a reader sees the
old value or the new one, never a mix. A cache line of its own keeps the writer's stores from
invalidating the line another process is polling (false sharing).
"""

from __future__ import annotations

import numpy as np

CACHE_LINE = 64


class Cursor:
    __slots__ = ("_cell",)

    def __init__(self, cell: np.ndarray):
        if cell.dtype != np.int64 or cell.shape != (1,) or cell.ctypes.data % CACHE_LINE:
            raise ValueError("a cursor is one int64 at the start of a cache line")
        self._cell = cell

    @classmethod
    def at(cls, buffer: np.ndarray, offset: int) -> Cursor:
        """The cursor stored at byte ``offset`` of a uint8 buffer."""
        return cls(buffer[offset : offset + 8].view(np.int64))

    def get(self) -> int:
        return self._cell.item(0)

    def set(self, value: int) -> None:
        self._cell[0] = value
