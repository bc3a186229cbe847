"""A named POSIX shared-memory region with a self-describing header.

Every shared structure of perpx lives in one region: a 64-byte header (magic, layout version,
payload size, creator pid) followed by the payload at a cache-line aligned offset. The header
is what lets a process that attaches to the wrong thing -- a region of another layout
version, or no region at all because the exchange is not running -- fail loudly at start-up
instead of reading garbage on the hot path.
"""

from __future__ import annotations

import mmap
import os
import time
import weakref

import numpy as np
import posix_ipc

MAGIC = b"PERPXSHM"
NAME_PREFIX = "/perpx-"
HEADER_BYTES = 64

_HEADER = np.dtype(
    [
        ("magic", "S8"),
        ("layout_version", "<i8"),
        ("payload_bytes", "<i8"),
        ("creator_pid", "<i8"),
        ("reserved", "V32"),
    ]
)
assert _HEADER.itemsize == HEADER_BYTES


def attach_retrying(attach, timeout_s: float, poll_s: float = 0.01):
    """attach() retried while what it maps does not exist yet (or is still being created by
    another process); after timeout_s the last error is raised."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return attach()
        except (ShmError, posix_ipc.ExistentialError):
            if time.monotonic() > deadline:
                raise
            time.sleep(poll_s)


class ShmError(RuntimeError):
    """A shared-memory structure is missing, of another layout, or misused across processes."""


def check_name(name: str) -> None:
    """Refuse names outside the /perpx- namespace so leftovers are easy to find and remove."""
    if not name.startswith(NAME_PREFIX) or "/" in name[1:]:
        raise ValueError(f"shared memory name {name!r} must look like '{NAME_PREFIX}<something>' (no further '/')")


def unlink_if_owner(unlink, name: str, creator_pid: int) -> None:
    """Remove a name this process created; safety net for atexit and garbage collection.

    A forked child inherits the parent's finalizers; the pid check keeps it from removing the
    parent's regions when it exits.
    """
    if os.getpid() != creator_pid:
        return
    try:
        unlink(name)
    except posix_ipc.ExistentialError:
        pass


class Region:
    """One mapped POSIX shared-memory object: header + payload (``payload`` is a uint8 view).

    The creator owns the name: it unlinks it on ``__exit__``/``unlink()``, and, as a safety net,
    when the creating object is garbage-collected or the process exits. So the creator keeps
    its object alive for as long as others should be able to attach.
    """

    def __init__(self, name: str, mapping: mmap.mmap, created: bool):
        self.name = name
        self._mmap = mapping
        self._header = np.frombuffer(mapping, dtype=_HEADER, count=1)
        self.payload = np.frombuffer(mapping, dtype=np.uint8, offset=HEADER_BYTES)
        self.creator_pid = int(self._header["creator_pid"][0])
        self.layout_version = int(self._header["layout_version"][0])
        self._finalizer = (
            weakref.finalize(self, unlink_if_owner, posix_ipc.unlink_shared_memory, name, os.getpid())
            if created
            else None
        )

    @classmethod
    def create(cls, name: str, layout_version: int, payload_bytes: int) -> Region:
        """Create a zero-filled region; fails if the name exists (a running or crashed exchange)."""
        check_name(name)
        if payload_bytes <= 0:
            raise ValueError(f"payload_bytes must be positive, got {payload_bytes}")
        total = HEADER_BYTES + payload_bytes
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=total)
        except posix_ipc.ExistentialError:
            raise ShmError(
                f"shared memory region {name} already exists ({_describe_existing(name)}) — "
                f"another exchange is running, or a crashed one left it behind"
            ) from None
        try:
            mapping = _map(shm, total)
        except BaseException:
            posix_ipc.unlink_shared_memory(name)
            raise
        header = np.frombuffer(mapping, dtype=_HEADER, count=1)
        header["layout_version"] = layout_version
        header["payload_bytes"] = payload_bytes
        header["creator_pid"] = os.getpid()
        # Magic goes last: an attacher racing the creation sees "not initialised", never a
        # header with a valid magic and half-written fields (stores stay in order on x86-64).
        header["magic"] = MAGIC
        del header
        return cls(name, mapping, created=True)

    @classmethod
    def attach(cls, name: str, layout_version: int) -> Region:
        """Map an existing region, checking magic and layout version."""
        check_name(name)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise ShmError(f"shared memory region {name} does not exist — is the exchange running?") from None
        size = shm.size   # read before close_fd: posix_ipc asks the descriptor
        if size < HEADER_BYTES:
            shm.close_fd()
            raise ShmError(f"shared memory region {name} is {size} bytes, too small for a perpx header "
                           "(or is still being created)")
        mapping = _map(shm, shm.size)
        header = np.frombuffer(mapping, dtype=_HEADER, count=1)[0]
        magic, version, payload = bytes(header["magic"]), int(header["layout_version"]), int(header["payload_bytes"])
        del header
        if magic != MAGIC:
            mapping.close()
            raise ShmError(f"shared memory region {name} is not a perpx region (or is still being created)")
        if version != layout_version:
            mapping.close()
            raise ShmError(f"shared memory region {name} has layout version {version}, this code expects {layout_version}")
        if HEADER_BYTES + payload != len(mapping):
            mapping.close()
            raise ShmError(f"shared memory region {name} says {payload} payload bytes but is {len(mapping)} bytes long")
        return cls(name, mapping, created=False)

    @staticmethod
    def exists(name: str) -> bool:
        check_name(name)
        try:
            posix_ipc.SharedMemory(name).close_fd()
        except posix_ipc.ExistentialError:
            return False
        return True

    @property
    def created_here(self) -> bool:
        return self._finalizer is not None

    def close(self) -> None:
        """Drop this object's mapping.

        numpy views handed out earlier keep the memory mapped until they are garbage; that is
        deliberate: a view never dangles.
        """
        self.payload = None
        self._header = None
        try:
            self._mmap.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        """Remove the name; processes still attached keep their mapping until they close."""
        if self._finalizer is not None and self._finalizer.alive:
            self._finalizer()
        elif self._finalizer is None:
            posix_ipc.unlink_shared_memory(self.name)

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self.created_here:
            self.unlink()


def _map(shm: posix_ipc.SharedMemory, size: int) -> mmap.mmap:
    # MAP_POPULATE faults every page in now (and, on create, allocates it), so the hot path
    # never takes a page fault.
    try:
        return mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        shm.close_fd()


def _describe_existing(name: str) -> str:
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return "it vanished meanwhile"
    try:
        if shm.size < HEADER_BYTES:
            return "not a perpx region"
        with mmap.mmap(shm.fd, HEADER_BYTES, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
            pid = int(np.frombuffer(m, dtype=_HEADER, count=1)["creator_pid"][0])
    finally:
        shm.close_fd()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"creator pid {pid} is gone"
    except PermissionError:
        pass
    return f"creator pid {pid} is alive"
