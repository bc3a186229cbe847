"""The heartbeat board: `<prefix>-supervisor`, one 64-byte slot per watched process.

Created by the supervisor. The matcher (slot MATCHER_SLOT) writes its pid, sets `ready` once it
serves and bumps `beats` on every pass of its loop; the supervisor and `perpx status` read them.
One writer per slot; readers never block it.
"""

from __future__ import annotations

import numpy as np

from shm import names
from shm.region import Region

HEARTBEAT_LAYOUT = 0x5045_5250_4842_0001   # "PERPHB" v1
HEARTBEAT_DTYPE = np.dtype([("pid", "<i8"), ("beats", "<i8"), ("ready", "<i8"),
                            ("_pad", "u1", (40,))])
assert HEARTBEAT_DTYPE.itemsize == 64
HEARTBEAT_SLOTS = 16
MATCHER_SLOT = 0


class HeartbeatBoard:
    """Named slots over the heartbeat region; `slots[i]["beats"]` and so on."""

    def __init__(self, region: Region):
        self.region = region
        self.slots = region.payload.view(HEARTBEAT_DTYPE)

    @classmethod
    def create(cls, prefix: str) -> HeartbeatBoard:
        return cls(Region.create(names.heartbeat_board(prefix), HEARTBEAT_LAYOUT,
                                 HEARTBEAT_SLOTS * HEARTBEAT_DTYPE.itemsize))

    @classmethod
    def attach(cls, prefix: str) -> HeartbeatBoard:
        return cls(Region.attach(names.heartbeat_board(prefix), HEARTBEAT_LAYOUT))

    def slot(self, i: int) -> np.ndarray:
        """Slot i as a one-record view (writes through to shared memory)."""
        return self.slots[i:i + 1]

    def close(self) -> None:
        self.slots = None
        self.region.close()

    def unlink(self) -> None:
        self.region.unlink()
