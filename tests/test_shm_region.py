import os
import platform
import resource

import numpy as np
import pytest

from shm.platform import require_tso
from shm.region import Region, ShmError
from tests.shm_workers import children, shm_prefix  # noqa: F401  (fixtures)


def test_create_attach_round_trip_across_processes(shm_prefix, children):
    name = shm_prefix + "-r"
    with Region.create(name, layout_version=4, payload_bytes=1000) as region:
        assert region.payload.size == 1000 and region.payload.dtype == np.uint8
        assert not region.payload.any(), "a new region is zero-filled"
        assert region.payload.ctypes.data % 64 == 0
        assert region.creator_pid == os.getpid() and region.name == name
        children.start("region_writer", name, 4, 123456789)
        [(_, creator_pid, child_pid)] = children.collect(1, timeout_s=30)
        assert creator_pid == os.getpid() and child_pid != os.getpid()
        assert region.payload[:8].view(np.int64)[0] == 123456789
    assert not os.path.exists("/dev/shm" + name), "the creator unlinks on exit"


def test_attach_missing_region_says_so(shm_prefix):
    with pytest.raises(ShmError, match=rf"region {shm_prefix}-nope does not exist — is the exchange running\?"):
        Region.attach(shm_prefix + "-nope", 1)


def test_attach_other_layout_version_fails_loudly(shm_prefix):
    with Region.create(shm_prefix + "-v", 3, 64):
        with pytest.raises(ShmError, match=r"has layout version 3, this code expects 4"):
            Region.attach(shm_prefix + "-v", 4)


def test_attach_foreign_object_fails_on_magic(shm_prefix):
    import posix_ipc

    foreign = posix_ipc.SharedMemory(shm_prefix + "-f", posix_ipc.O_CREX, size=4096)
    foreign.close_fd()
    try:
        with pytest.raises(ShmError, match="is not a perpx region"):
            Region.attach(shm_prefix + "-f", 1)
    finally:
        foreign.unlink()


def test_create_existing_fails(shm_prefix):
    with Region.create(shm_prefix + "-x", 1, 64):
        with pytest.raises(ShmError, match=rf"{shm_prefix}-x already exists \(creator pid {os.getpid()} is alive\)"):
            Region.create(shm_prefix + "-x", 1, 64)


def test_only_the_creator_unlinks(shm_prefix):
    path = "/dev/shm" + shm_prefix + "-u"
    creator = Region.create(shm_prefix + "-u", 1, 64)
    with Region.attach(shm_prefix + "-u", 1) as attached:
        assert not attached.created_here
    assert os.path.exists(path), "closing an attached region leaves the name alone"
    view = creator.payload
    creator.close()
    view[0] = 7  # views handed out before close() stay mapped: they never dangle
    creator.unlink()
    assert not os.path.exists(path)


def test_names_stay_in_the_perpx_namespace():
    for bad in ("perpx-x", "/other", "/perpx-a/b"):
        with pytest.raises(ValueError):
            Region.create(bad, 1, 64)


def test_pages_are_faulted_in_at_create(shm_prefix):
    with Region.create(shm_prefix + "-p", 1, 16 << 20) as region:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        region.payload[::4096] = 1
        assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 16, "hot path took page faults"


def test_refuses_a_machine_without_total_store_order(monkeypatch):
    require_tso()
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(ShmError, match=r"assume x86-64 total store order; this machine is 'aarch64'"):
        require_tso()


def test_a_creator_that_forgets_to_close_still_cleans_up_at_exit(shm_prefix, children):
    proc = children.start("forgetful_creator", shm_prefix)
    [(_, n, entries)] = children.collect(1, timeout_s=30)
    # 4 regions + 5 doorbells (2 per ring, 1 alone), each a region and a semaphore
    assert n == 5 and len(entries) == 4 + 5 * 2, entries
    proc.join(30)
    assert proc.exitcode == 0
    assert not [e for e in os.listdir("/dev/shm") if shm_prefix[1:] in e]
