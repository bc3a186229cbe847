"""Where the whole-exchange tests' child processes (a matcher, gateways) start from: one
forkserver whose interpreter has imported what they run and loaded the compiled matcher and
the gateway's lane (tests/child_preload.py).

A spawned child was a fresh interpreter that imported numpy, numba and pyzmq and loaded the
compiled code from numba's cache before serving: ~0.9–1.5 s each, two or more per test. A child
forked from the server serves in ~0.1 s. It is still a process of its own: its memory is its
copy (copy-on-write), it attaches shared memory by name and opens its sockets after the fork,
and it is a `multiprocessing.Process` like before (pid, kill, join, daemon). The server
itself runs no thread and opens no socket, so nothing a fork could break is there to inherit.
Its stdout and stderr are the starting test's (`start_child` hands them over, as a spawned
child inherits them): a test that reads them (`capfd`) sees what its children wrote. A forked
child skips atexit handlers as it ends: what such a test starts must clean up in its own
`finally` (the leak check of tests/shm_workers.py's `shm_prefix` tells), and tests of how a
process exits spawn theirs (tests/shm_workers.py's `Children`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from multiprocessing import reduction

PRELOAD = ["tests.child_preload"]


def child_context():
    """The multiprocessing context the tests start children with (the forkserver's)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)     # read when the server starts, at the first child
    return ctx


def start_child(target, *args, name: str):
    """target(*args) in a daemon child forked from the server, writing to this process's
    current stdout and stderr; returns the started `multiprocessing.Process`."""
    proc = child_context().Process(target=_run_with_output,
                                   args=(_CurrentFd(1), _CurrentFd(2), target, *args),
                                   daemon=True, name=name)
    proc.start()
    return proc


class _CurrentFd:
    """An fd of the starting process, duplicated into the child as it starts (the forkserver
    receives it over its socket while the child's arguments are pickled)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


def _run_with_output(stdout_fd: int, stderr_fd: int, target, *args) -> None:
    for fd, onto in ((stdout_fd, 1), (stderr_fd, 2)):
        os.dup2(fd, onto)
        os.close(fd)
    target(*args)
