"""The CPU latency request: idle CPUs poll instead of halting while the exchange runs.

An idle CPU halts, and the next order pays for waking it. On a VM a halt is an exit to the
host (this box's kernel line has `haltpoll.guest_halt_poll_ns=0`: no polling first), and the
order's Python then runs cold: at 1,000 orders/s the gateway spends ~145 µs of CPU on a lone
order against 22 µs per order in the closed loop (docs/tuning.md).

Linux takes a limit on that wake-up from any process that holds `/dev/cpu_dma_latency` open
after writing a 32-bit number of µs to it (the kernel's CPU latency QoS, the interface of
tuned's latency-performance profile): the idle governor then picks no idle state whose
declared exit latency is above the lowest limit held, and 0 leaves only polling. A limit
above 0 helps only where the idle states declare what waking from them costs: this VM's
haltpoll driver declares 1 µs for a halt that costs the host's wake-up, and its governor
honours 0 alone. The request lasts while the file is open, so it ends with the process that
holds it, however that process ends: nothing is left to undo.

What it costs: the idle CPUs look busy to the host (power, and a host that bills or throttles
by CPU time). A polling idle CPU runs any thread that wakes at once, so it takes nothing from
the exchange's processes. `exchange.cpu_latency_us` (perpx/config.py) chooses: 0 on a box
that is the venue's, -1 to leave the host's choice alone on a shared machine.
"""

from __future__ import annotations

import os
import struct

DEVICE = "/dev/cpu_dma_latency"
_VALUE = struct.Struct("=i")      # the kernel reads and writes a native s32


class CpuLatencyRequest:
    """Asks the kernel for at most `limit_us` of idle-CPU wake-up latency until close().

    Never raises for the host's refusal: `held` says whether the request stands and, when one
    was asked for (limit_us >= 0), `refused` why not (the device's error, e.g. "Permission
    denied" for a user other than root). limit_us = -1 asks for nothing."""

    def __init__(self, limit_us: int, device: str = DEVICE):
        self.limit_us = limit_us
        self.device = device
        self.refused = None
        self._fd = None
        if limit_us < 0:
            return
        try:
            fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            self.refused = f"{device}: {e.strerror}"
            return
        try:
            os.write(fd, _VALUE.pack(limit_us))
        except OSError as e:
            os.close(fd)
            self.refused = f"{device}: {e.strerror}"
            return
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def as_dict(self) -> dict:
        return {"limit_us": self.limit_us, "held": self.held, "refused": self.refused}

    def close(self) -> None:
        """Withdraw the request (the kernel drops it with the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CpuLatencyRequest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def current_limit_us(device: str = DEVICE) -> int:
    """The limit in force: the lowest of all requests held (the kernel's default, 2e9 µs,
    when there is none). Raises OSError where the device cannot be read."""
    with open(device, "rb") as f:
        return _VALUE.unpack(f.read(_VALUE.size))[0]
