"""`perpx up` as a child process: for benchmarks and tests that need a whole exchange.

`close()` always leaves nothing running and nothing in /dev/shm, even when the exchange
failed to start or a child is stuck.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from perpx.statedir import StateDir

REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 240.0      # a cold numba cache compiles the matcher first (about a minute)


def child_env() -> dict:
    """The environment with this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "")
                                                       .split(os.pathsep) if p])
    return env


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.05,
               error: type[Exception] = RuntimeError):
    """condition()'s first true value, polled every interval_s; `error` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def pid_alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class ExchangeProcess:
    """`perpx up` on a state dir (with an optional config text), in its own session."""

    def __init__(self, state_dir: Path, config: str | None = None, *extra: str):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sd = StateDir(self.dir)
        self.out_path = self.dir.parent / f"{self.dir.name}.up.out"
        self.err_path = self.dir.parent / f"{self.dir.name}.up.err"
        argv = [sys.executable, "-m", "perpx.cli", "--state-dir", str(self.dir), "up"]
        if config is not None:
            cfg = self.dir.parent / f"{self.dir.name}.toml"
            cfg.write_text(config)
            argv += ["--config", str(cfg)]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([*argv, *extra], stdout=out, stderr=err,
                                         env=child_env(), cwd=str(REPO),
                                         start_new_session=True)
        self.child_pids: set[int] = set()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_ready(self, timeout_s: float = STARTUP_S) -> dict:
        """Wait for endpoints.json; returns it. Raises if `perpx up` exits or times out."""
        deadline = time.monotonic() + timeout_s
        while not self.sd.endpoints_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"perpx up exited with {self.proc.returncode}:\n"
                                   f"{self.stderr}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"perpx up did not write endpoints.json within "
                                   f"{timeout_s:g} s")
            time.sleep(0.05)
        self.remember_children()
        return json.loads(self.sd.endpoints_file.read_text())

    def remember_children(self) -> None:
        try:
            status = self.sd.status()
        except (OSError, ValueError):
            return
        if status:
            self.child_pids.update(p["pid"] for p in status["processes"] if p.get("pid"))

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> list[str]:
        """Stop whatever still runs; returns the shm entries that were left (and removes them)."""
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        for pid in self.child_pids:     # they get SIGTERM when the supervisor dies
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        left = self.sd.shm_leftovers()
        self.sd.remove_shm_leftovers()
        return left
