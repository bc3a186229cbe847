"""The exchange's state directory: its layout (engine/spec.py StateLayout), the shm prefix,
and the two locks.

The directory is 0700 and every file in it 0600 (`perpx up` refuses a directory that group or
others can write, and makes what an older run left private). The shm prefix is derived from the
state directory's real path (shm/names.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
from pathlib import Path

import posix_ipc

from engine.spec import StateLayout, engine_config_from
from shm import names
from shm.region import ShmError, attach_retrying as retrying


# Files perpx creates are its user's alone (journal, DuckDB, logs, keys: every account's orders
# and balances); set by `perpx` before it creates anything, inherited by the processes it starts.
PRIVATE_UMASK = 0o077


class NotRunning(RuntimeError):
    """No exchange runs for this state directory."""


ATTACH_TIMEOUT_S = 5.0


def attach_retrying(fn, timeout_s: float = ATTACH_TIMEOUT_S):
    """fn() (attaching to some shared memory), retried while it is not there yet; NotRunning
    after timeout_s."""

    try:
        return retrying(fn, timeout_s, poll_s=0.02)
    except (ShmError, posix_ipc.ExistentialError) as e:
        raise NotRunning(f"cannot attach to the exchange's shared memory: {e}") from None


class FileLock:
    """An flock on a file; released when closed or when the process dies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = None

    def try_acquire(self, shared: bool = False) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self.fd = fd
        return True

    def acquire(self, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.try_acquire():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {self.path} is still locked after {timeout_s:g} s "
                                   f"(another perpx command is using it)")
            time.sleep(0.01)

    def write_pid(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class StateDir(StateLayout):
    """The state directory's layout (engine/spec.py) with its locks and running checks."""

    def __init__(self, path):
        super().__init__(path)
        self.prefix = names.prefix_for(self.path)

    def make(self) -> None:
        """Create the directory and its subdirectories, private to this user (see private)."""
        os.umask(PRIVATE_UMASK)
        for d in (self.path, self.keys_dir, self.accounts_dir, self.clients_dir, self.logs_dir,
                  self.run_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    def others_can_write(self) -> str | None:
        """Why the state directory is not safe to run from (its mode lets group or others
        write it), or None."""
        try:
            mode = self.path.stat().st_mode & 0o777
        except FileNotFoundError:
            return None
        if mode & 0o022:
            return (f"{self.path} is writable by group or others (mode {mode:04o}): anyone "
                    f"who can write it could plant keys, a journal or a config; make it "
                    f"private (chmod 700 {self.path}) or pick another --state-dir")
        return None

    def private(self) -> list[str]:
        """Make everything in the directory this user's alone: directories 0700, files 0600
        (left as they are by runs before this rule, or by an odd umask). Returns what changed."""
        changed = []
        for root, dirs, files in os.walk(self.path):
            for name, want in [(d, 0o700) for d in dirs] + [(f, 0o600) for f in files]:
                p = os.path.join(root, name)
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                if stat.S_ISLNK(st.st_mode) or st.st_mode & 0o777 == want:
                    continue
                os.chmod(p, want)
                changed.append(os.path.relpath(p, self.path))
        return changed

    # -- is it running? -----------------------------------------------------------------
    def supervisor_pid(self) -> int | None:
        """The running supervisor's pid, or None when no `perpx up` holds the lock."""
        if not self.supervisor_lock.exists():
            return None
        probe = FileLock(self.supervisor_lock)
        if probe.try_acquire(shared=True):
            probe.release()
            return None
        try:
            return int(self.supervisor_lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return -1   # locked, pid not written yet

    def require_running(self) -> int:
        pid = self.supervisor_pid()
        if pid is None:
            raise NotRunning(f"the exchange is not running (no `perpx up` for {self.path})")
        return pid

    def exchange(self) -> dict:
        try:
            return json.loads(self.exchange_file.read_text())
        except FileNotFoundError:
            raise NotRunning(f"{self.exchange_file} does not exist: start the exchange with "
                             f"`perpx up --state-dir {self.path}`") from None

    def status(self) -> dict | None:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def engine_config(self, doc: dict | None = None):
        return engine_config_from((doc or self.exchange())["engine"])

    # -- accounts -----------------------------------------------------------------------
    def registered_accounts(self) -> list[int]:
        if not self.accounts_dir.is_dir():
            return []
        return sorted(int(p.stem) for p in self.accounts_dir.glob("*.key")
                      if p.stem.isascii() and p.stem.isdigit())

    def shm_leftovers(self) -> list[str]:
        """Entries in /dev/shm under this exchange's prefix (regions and semaphores)."""
        base = self.prefix.lstrip("/")
        try:
            names = os.listdir("/dev/shm")
        except FileNotFoundError:
            return []
        return sorted(n for n in names
                      if n.startswith(base + "-") or n.startswith("sem." + base + "-"))

    def remove_shm_leftovers(self) -> list[str]:
        removed = []
        for entry in self.shm_leftovers():
            try:
                if entry.startswith("sem."):
                    posix_ipc.unlink_semaphore("/" + entry[4:])
                else:
                    posix_ipc.unlink_shared_memory("/" + entry)
                removed.append(entry)
            except posix_ipc.ExistentialError:
                pass
        return removed
