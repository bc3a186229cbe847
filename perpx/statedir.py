"""The exchange's state directory: what lives where, the shm prefix, and the two locks.

    STATE_DIR/
      supervisor.lock     flock held (exclusive) by the running `perpx up`: "is it running?"
      ops.lock            flock serializing writers of the single-producer ops ring (CLI, genesis)
      exchange.json       the resolved config of the running (or last) exchange: engine
                          capacities, markets in engine units, shm prefix, sources, consumers.
                          Gateways read their market table from it; CLI commands their markets.
      endpoints.json      {"orders", "market_data", "server_public_key"} (+ "orders_all": every
                          gateway's order endpoint); present while the exchange runs
      status.json         the supervisor's process table (pids, restarts, cpus); while it runs
      keys/server.key, keys/server.key_secret      the server's CURVE certificate (kept)
      accounts/<id>.key   the account registry the gateways read (public keys only)
      clients/<id>.key_secret                      the client certificates `account create` made
      logs/<process>.log  stdout/stderr of each child process
      run/                scratch: each gateway's endpoints file, persistd's SQL socket
      journal/            persistd's command journal: the source of truth (persistd/journal.py)
      snapshots/          state snapshots at sequence numbers (persistd/snapshot.py)
      perpx.duckdb        the query store (persistd/store.py), written only by persistd

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

from shm import names


# Files perpx creates are its user's alone (journal, DuckDB, logs, keys: every account's orders
# and balances); set by `perpx` before it creates anything, inherited by the processes it starts.
PRIVATE_UMASK = 0o077


class NotRunning(RuntimeError):
    """No exchange runs for this state directory."""


ATTACH_TIMEOUT_S = 5.0


def attach_retrying(fn, timeout_s: float = ATTACH_TIMEOUT_S):
    """fn() (attaching to some shared memory), retried while it is not there yet; NotRunning
    after timeout_s."""
    import posix_ipc

    from shm.region import ShmError, attach_retrying as retrying
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


class StateDir:
    def __init__(self, path):
        self.path = Path(path).expanduser().absolute()
        self.prefix = names.prefix_for(self.path)
        self.supervisor_lock = self.path / "supervisor.lock"
        self.ops_lock = self.path / "ops.lock"
        self.exchange_file = self.path / "exchange.json"
        self.endpoints_file = self.path / "endpoints.json"
        self.status_file = self.path / "status.json"
        self.keys_dir = self.path / "keys"
        self.accounts_dir = self.path / "accounts"
        self.clients_dir = self.path / "clients"
        self.logs_dir = self.path / "logs"
        self.run_dir = self.path / "run"
        self.journal_dir = self.path / "journal"
        self.snapshots_dir = self.path / "snapshots"
        self.store_file = self.path / "perpx.duckdb"
        self.sql_socket = self.run_dir / "sql.ipc"

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
        from engine.config import EngineConfig
        eng = (doc or self.exchange())["engine"]
        return EngineConfig(**{k: eng[k] for k in EngineConfig.__dataclass_fields__ if k in eng})

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
        import posix_ipc
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
