"""The operator's side of durability: `perpx sql`, `perpx verify`, `perpx check`.

- `sql`: a read-only query, answered by persistd (it holds DuckDB's write connection) over a
  local ZeroMQ socket (STATE_DIR/run/sql.ipc). `record_admin` adds an operator command's
  who/when row to admin_log over the same socket.
- `verify`: replays the journal offline into a private copy of the state, from genesis when
  the journal starts at seq 1, else from the oldest snapshot it reaches back to. Every batch
  checksum is checked on the way (a corrupt batch fails the run, naming segment and offset);
  at each later snapshot and, when the exchange runs, at the live state, the replayed state
  hash must equal the recorded (live) one. Works on a stopped exchange too.
- `check`: DESIGN.md §8's state invariants (book uncrossed and FIFO, positions summing to zero,
  collateral conserved, ...) on a consistent copy of the live tables.
"""

from __future__ import annotations

import os
import pwd
import time

import msgpack
import zmq

from engine.invariants import check_state
from engine.records import EVENT_DTYPE
from engine.shared_state import attach_state
from engine.state import State, state_hash
from gateway.mirror import consistent_state_copy
from perpx.statedir import StateDir
from persistd import snapshot
from persistd.journal import JournalCorrupt, journal_info
from persistd.replica import Replica
from shm import names
from shm.progress import JournalProgress
from shm.ring import EventRing


class DurabilityError(RuntimeError):
    pass


def sql(sd: StateDir, query: str, timeout_s: float = 30.0) -> dict:
    """{"columns", "rows", "store_seq"} of a read-only query; DurabilityError on refusal."""
    return _sql_request(sd, {"sql": query}, timeout_s)


def _sql_request(sd: StateDir, request: dict, timeout_s: float) -> dict:
    """One request on persistd's local socket (STATE_DIR/run/sql.ipc); its reply map."""
    sd.require_running()
    if not sd.sql_socket.exists():
        raise DurabilityError("persistd is not serving SQL (is it starting or restarting?)")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{sd.sql_socket}")
        sock.send(msgpack.packb(request))
        if not sock.poll(int(timeout_s * 1000)):
            raise DurabilityError(f"persistd did not answer within {timeout_s:g} s")
        reply = msgpack.unpackb(sock.recv())
    finally:
        sock.close()
    if "error" in reply:
        raise DurabilityError(reply["error"])
    return reply


def record_admin(sd: StateDir, command: str, args: str, seq: int | None, outcome: str,
                 timeout_s: float = 5.0) -> None:
    """Add who ran an operator command, and when, to DuckDB's admin_log (through persistd,
    the store's only writer); DurabilityError if it could not be recorded."""
    uid = os.getuid()
    try:
        operator = pwd.getpwuid(uid).pw_name
    except KeyError:
        operator = str(uid)
    _sql_request(sd, {"admin_log": {"ts_ns": time.time_ns(), "operator": operator, "uid": uid,
                                    "pid": os.getpid(), "command": command, "args": args,
                                    "seq": seq, "outcome": outcome}}, timeout_s)


def _live_copy(sd: StateDir, doc: dict):
    """(State of copied tables, seq) of the running matcher at a command boundary."""
    region, state = attach_state(doc["prefix"], sd.engine_config(doc))
    events = EventRing.attach(names.event_ring(doc["prefix"]), EVENT_DTYPE)
    try:
        tables, seq = consistent_state_copy(state, events, tables=State._fields)
    finally:
        del state
        events.close()
        region.close()
    return State(**tables), seq


def check(sd: StateDir) -> dict:
    sd.require_running()
    doc = sd.exchange()
    st, seq = _live_copy(sd, doc)
    problems = check_state(st)      # collateral conservation included
    return {"seq": seq, "ok": not problems, "problems": problems}


def _wait_durable(sd: StateDir, doc: dict, seq: int, timeout_s: float = 30.0) -> None:
    progress = JournalProgress.attach(doc["prefix"])
    try:
        if not progress.wait_durable(seq, timeout_s):
            raise DurabilityError(f"the journal did not reach the live seq {seq} within "
                                  f"{timeout_s:g} s (durable_seq {progress.durable_seq()})")
    finally:
        progress.close()


def verify(sd: StateDir, on_progress=None, on_total=None) -> dict:
    """Replay the journal offline and compare state hashes (see the module docstring).

    The replay ends at the journal's end as found when it starts (or the live state's seq,
    if later): a running exchange keeps appending, and a moving end would never be reached.
    `on_total(seq)` is told that end once it is known, `on_progress(seq)` each batch.
    """
    doc = sd.exchange()
    cfg = sd.engine_config(doc)
    info = journal_info(sd.journal_dir) if sd.journal_dir.is_dir() else {"last_seq": 0}
    if info["last_seq"] == 0:
        raise DurabilityError(f"no journal in {sd.journal_dir}: nothing to verify")
    replica = Replica(cfg)
    start = "genesis"
    snaps = snapshot.snapshots(sd.snapshots_dir)
    if info["first_seq"] > 1:
        usable = [(s, p) for s, p in snaps if s >= info["first_seq"] - 1]
        if not usable:
            raise DurabilityError(f"the journal starts at seq {info['first_seq']} and no "
                                  f"snapshot reaches back to it")
        seq0, path = usable[0]
        snapshot.load_snapshot(path, replica.layout_version, replica.buffer)
        start = f"snapshot at seq {seq0}"
    checks = []
    live = None
    if sd.supervisor_pid() is not None:
        live_state, live_seq = _live_copy(sd, doc)
        _wait_durable(sd, doc, live_seq)
        live = (live_seq, state_hash(live_state))
        del live_state
    targets = [(s, "snapshot", snapshot.read_header(p)["state_hash"]) for s, p in snaps
               if s > replica.seq]
    if live is not None:
        targets.append((live[0], "live", live[1]))
    total = max([info["last_seq"]] + [seq for seq, _, _ in targets])
    if on_total is not None:
        on_total(total)
    t0 = time.monotonic()
    try:
        for seq, what, expected in sorted(targets):
            replica.catch_up(sd.journal_dir, upto_seq=seq, on_progress=on_progress)
            if replica.seq != seq:
                raise DurabilityError(f"the journal ends at seq {replica.seq}, before the {what} "
                                      f"state at seq {seq}")
            got = replica.state_hash()
            checks.append({"at": what, "seq": seq, "ok": got == expected,
                           "expected": expected, "replayed": got})
        replica.catch_up(sd.journal_dir, upto_seq=total, on_progress=on_progress)
    except JournalCorrupt as e:
        raise DurabilityError(f"journal corrupt: {e}") from None
    return {"ok": all(c["ok"] for c in checks), "from": start, "seq": replica.seq,
            "journal_last_seq": total, "state_hash": replica.state_hash(),
            "seconds": round(time.monotonic() - t0, 3), "checks": checks}
