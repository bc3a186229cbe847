"""The gateway's stats file, written by a thread of its own.

Once a second the serving thread builds the gateway's status (`Gateway.status`, which reads
state only it may touch) and hands the JSON text here; this thread writes it to `path.tmp`
and renames it over `path`, so a reader (`perpx status`, the metrics exporter) sees a whole
file, the newest or the one before. Those file-system calls took 0.5-0.75 ms of the serving
thread's pass on this VM (an order arriving meanwhile waited: `perpx bench latency`, fast acks
at 1,000/s); here they run while the serving thread goes on (they release the interpreter
lock). Only the newest text is kept: one that arrives before the last is written replaces it.
"""

from __future__ import annotations

import threading
from pathlib import Path


class StatsFile:
    def __init__(self, path):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._text: str | None = None
        self._closing = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="stats-file", daemon=True)
        self._thread.start()

    def submit(self, text: str) -> None:
        """Write `text` soon; returns at once."""
        with self._ready:
            self._text = text
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while self._text is None and not self._closing:
                    self._ready.wait()
                text, self._text = self._text, None
            if text is None:
                return                       # closing, and everything submitted is written
            try:
                self._tmp.write_text(text)
                self._tmp.rename(self.path)
            except OSError:
                pass          # a full disk: the file stays a second older, the gateway serves on

    def close(self) -> None:
        """Write what was submitted last, then stop the thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(timeout=5.0)
