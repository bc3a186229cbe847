"""The idle-CPU request (perpx/cpu_latency.py) against the kernel's real device.

The supervisor's use of it (status.json, the request ending with the exchange) is tested in
tests/test_supervisor.py."""

import os

import pytest

from perpx.cpu_latency import DEVICE, CpuLatencyRequest, current_limit_us

KERNEL_DEFAULT_US = 2_000_000_000      # the limit in force while nobody asks for one


def _device_usable() -> str | None:
    if not os.path.exists(DEVICE):
        return f"{DEVICE} does not exist here"
    if not os.access(DEVICE, os.R_OK | os.W_OK):
        return f"{DEVICE} needs root"
    return None


@pytest.mark.skipif(_device_usable() is not None, reason=str(_device_usable()))
def test_the_request_holds_while_open_and_the_lowest_wins():
    before = current_limit_us()
    if before != KERNEL_DEFAULT_US:
        pytest.skip(f"another process holds a CPU latency request ({before} µs): the limit "
                    f"in force is the lowest of all, so this test needs none held")
    with CpuLatencyRequest(7) as loose:
        assert loose.held and loose.refused is None
        assert current_limit_us() == min(before, 7)
        with CpuLatencyRequest(0) as strict:
            assert strict.as_dict() == {"limit_us": 0, "held": True, "refused": None}
            assert current_limit_us() == 0
        assert current_limit_us() == min(before, 7)     # the stricter one went with its file
    assert not loose.held
    assert current_limit_us() == before


def test_a_refused_request_says_why_and_raises_nothing(tmp_path):
    missing = CpuLatencyRequest(0, device=str(tmp_path / "no-such-device"))
    assert not missing.held
    assert missing.refused == f"{tmp_path / 'no-such-device'}: No such file or directory"
    missing.close()                   # nothing to withdraw
    directory = CpuLatencyRequest(0, device=str(tmp_path))      # refused even to root
    assert not directory.held and directory.refused == f"{tmp_path}: Is a directory"


def test_minus_one_asks_for_nothing(tmp_path):
    # a directory as the device: opening it would be refused with "Is a directory"
    req = CpuLatencyRequest(-1, device=str(tmp_path))
    assert req.as_dict() == {"limit_us": -1, "held": False, "refused": None}
