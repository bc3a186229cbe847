"""What long operations show on a terminal: a bar for work of known size, a clock otherwise.

Both write to stderr (stdout stays for results and --json). On a terminal they redraw in
place (rich); elsewhere (logs, pipes, tests) they print a line when they start and one when
they end, so a log still says what took the time.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from engine.config import EngineConfig
from engine.matcher import Matcher, event_sink, matcher_is_cached
from engine.records import COMMAND_DTYPE, EVENT_DTYPE

COMPILING_MATCHER = "compiling the matcher (first run only)"
COMPILING_GATEWAY = "compiling the gateway's order path (first run only)"


def _console(out) -> Console:
    return Console(file=out or sys.stderr, highlight=False)


@contextmanager
def elapsed(what: str, out=None, every_s: float = 10.0, since: float | None = None):
    """Show `what… N s` while the block runs, then `what: done in N s` (or, if the block
    raised, `what: stopped after N s`), N counted from `since` (a time.monotonic()) when the
    work began before the block.

    On a terminal the seconds tick in place; elsewhere a line every `every_s` seconds.
    """
    console = _console(out)
    t0 = time.monotonic() if since is None else since
    stop = threading.Event()
    status = console.status(f"{what}…") if console.is_terminal else None

    def tick():
        while not stop.wait(0.5 if status is not None else every_s):
            text = f"{what}… {time.monotonic() - t0:.0f} s"
            if status is not None:
                status.update(text)
            else:
                console.print(text)

    if status is not None:
        status.start()
    else:
        console.print(f"{what}…")
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    outcome = "stopped after"
    try:
        yield
        outcome = "done in"
    finally:
        stop.set()
        ticker.join()
        if status is not None:
            status.stop()
        console.print(f"{what}: {outcome} {time.monotonic() - t0:.1f} s")


class Bar:
    """A progress bar over a count (e.g. journal seqs) whose end may move.

    `update(done)` moves it; a `done` past the total raises the total (the bar never runs past
    100%); `stop()` ends it, at exactly 100% when done reached the total.
    """

    def __init__(self, what: str, total: int, out=None, unit: str = "seq"):
        self.total = max(int(total), 0)
        self.done = 0
        self._console = _console(out)
        self._what = what
        self._unit = unit
        self._stopped = False
        self._progress = Progress(TextColumn(f"{what}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn(unit), TextColumn("{task.percentage:>3.0f}%"),
                                  TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=self._console, transient=False,
                                  disable=not self._console.is_terminal)
        self._task = self._progress.add_task(what, total=self.total or None)
        self._progress.start()

    def update(self, done: int) -> None:
        self.done = int(done)
        if self.done > self.total:
            self.total = self.done
        self._progress.update(self._task, completed=self.done, total=self.total or None)

    def stop(self) -> None:
        """End the bar where it is: at exactly 100% when the work reached its (last) total."""
        if self._stopped:
            return
        self._stopped = True
        if self.done >= self.total:          # finished: never shown short of or past 100%
            self.total = self.done
            self._progress.update(self._task, completed=max(self.done, 1),
                                  total=max(self.total, 1))
        self._progress.stop()
        if not self._console.is_terminal:
            pct = 100 if self.done >= self.total else self.done * 100 // max(self.total, 1)
            self._console.print(f"{self._what}: {self.done}/{self.total} {self._unit} ({pct}%)")


def ensure_matcher_compiled(out=None) -> bool:
    """Load the compiled matcher into this process, saying so when that means compiling it
    (numba's cache is cold: about a minute). Returns whether it compiled."""
    if matcher_is_cached():
        return False
    with elapsed(COMPILING_MATCHER, out):
        load_matcher()
    return True


def load_matcher() -> None:
    """Run the compiled matcher once on nothing: numba loads its machine code from the cache
    into this process (or compiles it, on a cold cache)."""
    slots = np.zeros(16, EVENT_DTYPE)
    Matcher(EngineConfig()).process(np.zeros(0, COMMAND_DTYPE), event_sink(slots), 0,
                                    len(slots))


class GatewayCompile:
    """The gateway's compiled lane (gateway/compiled_pass.py) compiled in a process of its own
    when numba's cache lacks it, so that it runs beside the matcher's compile (two cores: the
    two cold compiles, about a minute each, overlap). `wait()` then waits for it with a clock
    and raises if it failed, `stop()` ends it unfinished; all do nothing when the cache had
    the lane."""

    def __init__(self):
        from gateway.compiled_pass import lane_is_cached
        self.t0 = time.monotonic()
        self.process = None if lane_is_cached() else subprocess.Popen(
            [sys.executable, "-c",
             "from gateway.compiled_pass import compile_lane; compile_lane()"])

    def wait(self, out=None) -> None:
        if self.process is None:
            return
        with elapsed(COMPILING_GATEWAY, out, since=self.t0):
            code = self.process.wait()
        self.process = None
        if code != 0:
            raise RuntimeError(f"compiling the gateway's order path failed (exit {code})")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def ensure_compiled(out=None) -> None:
    """The matcher and the gateway's lane loaded or, on a cold cache, compiled side by side
    (the matcher here, the lane in a process of its own), each with a clock."""
    lane = GatewayCompile()
    ensure_matcher_compiled(out)
    lane.wait(out)
