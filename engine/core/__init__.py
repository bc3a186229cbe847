"""The compiled matcher: numba code over the state tables in engine/state.py.

It implements exactly the rules of engine/reference.py (read that first; it is the spec) over
preallocated arrays: a slot pool of orders, price levels with FIFO links, one sorted array of
price keys per book side, open-addressing indexes for oid and (account, cid).

`run_batch` takes a batch of command records and writes events straight into the event ring
slots it is given. It never waits: before each command it checks that the ring has room for
the most events that command can cause, and returns early when it has not, so the caller
(Python) can wait for consumers and call again. No wall clock, no randomness, no floats.

One file per part, each importing only the parts before it in this list (no cycles):
tables (`jit`, the views of the state), indexes, events, book_sides, orders, margin,
matching, triggers, commands, perpetual_risk, batch (`run_batch`). numba caches each source
directory apart and sees only the defining file's changes; engine/__init__.py drops the
cache when any engine source changes.
"""

from engine.core.batch import run_batch

__all__ = ["run_batch"]
