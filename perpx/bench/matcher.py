"""Benchmarks of the matching engine: `perpx bench matcher` and `perpx bench lobster`.

What is measured: `Matcher.process` (the compiled matcher, engine/core/) fed a pre-built
command stream in batches (default 256 commands per call, as the matcher process hands them
over) into an event ring of 128-byte slots. The ring is a power of two >= the engine's worst
case for one command; the benchmark is its only consumer and is taken to have consumed
everything, so each call gets the running write position and free_slots = capacity. Every
run starts on a fresh Matcher with the same stream; the setup commands (markets, deposits) are
processed before the clock starts. Compilation happens before any timing (the generator runs
the matcher), and the cyclic GC is collected, frozen and disabled around timed sections.

Reported: commands/s as the median over runs (each run: commands / wall time of the batch
loop, Python call overhead included), events/s, and the latency of each process() call
(p50/p99/p99.9 in µs, pooled over runs). The plain-Python reference model
(engine/reference.py) runs a prefix of the same stream for its commands/s and the ratio, and
both engines' events are compared on a shorter prefix (`events_match`). Each run's final
state hash is compared with the generating pass's (`state_hash_stable`): same stream, same
state, whatever the batch boundaries.

`bench matcher --risk` also generates the risk-on variant of the workload (perpx/bench/workload.py:
moving marks, leveraged and isolated accounts, funding, liquidations) and times both streams
in the same rounds, one run of each in turn, so the box's fast and slow phases fall on both;
`risk_ratio` is the risk-on median over the plain median, and "risk" holds its full report.
"""

import gc
import statistics
import time
from contextlib import contextmanager

import numpy as np

from engine.config import EngineConfig
from engine.matcher import Matcher, drain, event_sink
from engine.service import DEFAULT_EVENT_CAPACITY
from engine.records import (COMMAND_DTYPE, EV_REJECT, EV_TRADE, EVENT_DTYPE,
                            ORDER_EVENT_DTYPE, REASON_NAMES, layout_of)
from engine.reference import ReferenceMatcher

DEFAULT_BATCH = 256
DEFAULT_RUNS = 5


@contextmanager
def quiet_gc():
    """No cyclic GC passes inside timed sections (DESIGN.md: full passes stalled 44 ms)."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class Ring:
    """Preallocated, pre-touched event slots for the benchmark (no other readers)."""

    def __init__(self, config: EngineConfig):
        self.capacity = DEFAULT_EVENT_CAPACITY   # what the matcher process uses
        self.slots = np.zeros(self.capacity, EVENT_DTYPE)
        self.slots.view(np.uint8)[:] = 0xFF      # fault every page in before timing
        self.slots.view(np.uint8)[:] = 0
        self.sink = event_sink(self.slots)


def percentiles_us(samples_ns: np.ndarray) -> dict:
    if len(samples_ns) == 0:
        return {"p50": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
    p = np.percentile(samples_ns, [50, 99, 99.9]) / 1e3
    return {"p50": round(float(p[0]), 3), "p99": round(float(p[1]), 3),
            "p999": round(float(p[2]), 3), "max": round(float(samples_ns.max()) / 1e3, 3)}


def fresh_matcher(config: EngineConfig, setup: np.ndarray, ring: Ring, pos: int = 0):
    """A new Matcher with the setup commands already processed; returns (matcher, pos)."""
    m = Matcher(config)
    for events in drain(m, setup, ring.sink):
        pos += len(events)
    return m, pos


def timed_run(config: EngineConfig, setup: np.ndarray, commands: np.ndarray, ring: Ring,
              batch: int) -> dict:
    """One timed pass of `commands` through a fresh matcher, `batch` commands per call."""
    matcher, pos = fresh_matcher(config, setup, ring)
    n = len(commands)
    lat = np.zeros(n // max(batch, 1) + 2 + n // 64, np.int64)
    process = matcher.process
    sink = ring.sink
    capacity = ring.capacity
    clock = time.perf_counter_ns
    pos0 = pos
    calls = 0
    i = 0
    with quiet_gc():
        t_start = clock()
        while i < n:
            count = batch if n - i > batch else n - i
            t0 = clock()
            done, pos = process(commands, sink, pos, capacity, 0, True, i, count)
            t1 = clock()
            if calls < len(lat):
                lat[calls] = t1 - t0
            calls += 1
            i += done
            if done == 0:   # a command bigger than the ring (never in this workload)
                matcher.process_oversized(commands, i, 0, True)
                i += 1
        elapsed = clock() - t_start
    return {
        "seconds": elapsed / 1e9,
        "commands_per_s": n / (elapsed / 1e9) if elapsed else 0.0,
        "events": pos - pos0,
        "calls": calls,
        "latency_ns": lat[:min(calls, len(lat))],
        "state_hash": matcher.state_hash(),
    }


def call_overhead_us(config: EngineConfig, ring: Ring, calls: int = 20_000) -> float:
    """Median time of a Matcher.process call that has nothing to do (count=0), in µs."""
    matcher = Matcher(config)
    cmds = np.zeros(1, COMMAND_DTYPE)
    lat = np.zeros(calls, np.int64)
    clock = time.perf_counter_ns
    with quiet_gc():
        for k in range(calls):
            t0 = clock()
            matcher.process(cmds, ring.sink, 0, ring.capacity, 0, True, 0, 0)
            lat[k] = clock() - t0
    return round(float(np.median(lat)) / 1e3, 3)


def count_outcomes(config: EngineConfig, setup: np.ndarray, commands: np.ndarray,
                   ring: Ring, batch: int = 4096) -> dict:
    """Untimed pass that reads every event: rejects by reason, trades, events."""
    matcher, _ = fresh_matcher(config, setup, ring)
    rejects = np.zeros(256, np.int64)
    trades = 0
    events = 0
    for ev in drain(matcher, commands, ring.sink, batch):
        et = ev["etype"]
        np.add.at(rejects, ev.view(ORDER_EVENT_DTYPE)["reason"][et == EV_REJECT], 1)
        trades += int(np.count_nonzero(et == EV_TRADE))
        events += len(ev)
    n_rej = int(rejects.sum())
    return {
        "rejects": n_rej,
        "reject_rate": n_rej / max(len(commands), 1),
        "reject_reasons": {REASON_NAMES.get(r, str(r)) + f"({r})": int(c)
                           for r, c in enumerate(rejects) if c},
        "trades": trades,
        "events": events,
        "state_hash": matcher.state_hash(),
    }


# ---- the reference model ------------------------------------------------------------------
def command_dicts(commands: np.ndarray) -> list[dict]:
    names = COMMAND_DTYPE.names
    return [dict(zip(names, row)) for row in commands.tolist()]


def events_as_dicts(slots: np.ndarray) -> list[dict]:
    """Event slots as dicts of their family's named fields (like records.event_to_dict)."""
    etype = slots["etype"]
    out = [None] * len(slots)
    for et in np.unique(etype):
        dt = layout_of(int(et))
        idx = np.flatnonzero(etype == et)
        names = [n for n in dt.names if not n.startswith("_")]
        rows = slots.view(dt)[idx][names].tolist()
        nested = "command" in names
        cnames = COMMAND_DTYPE.names
        for i, row in zip(idx.tolist(), rows):
            d = dict(zip(names, row))
            if nested:
                d["command"] = dict(zip(cnames, d["command"]))
            out[i] = d
    return out


def compiled_events(config: EngineConfig, commands: np.ndarray, ring: Ring,
                    batch: int = 1024) -> list[dict]:
    out = []
    for events in drain(Matcher(config), commands, ring.sink, batch):
        out.extend(events_as_dicts(events))
    return out


def reference_run(config: EngineConfig, setup: np.ndarray, commands: np.ndarray,
                  keep_events_for: int = 0) -> dict:
    """Time the reference model over `commands` (after setup); keep the events of the
    setup and the first `keep_events_for` commands for comparison."""
    ref = ReferenceMatcher(config)
    kept = []
    for c in command_dicts(setup):
        kept.extend(ref.process(c, 0, True))
    dicts = command_dicts(commands)
    process = ref.process
    clock = time.perf_counter_ns
    with quiet_gc():
        t0 = clock()
        for c in dicts[:keep_events_for]:
            kept.extend(process(c, 0, True))
        for c in dicts[keep_events_for:]:
            process(c, 0, True)
        elapsed = clock() - t0
    return {"seconds": elapsed / 1e9,
            "commands_per_s": len(dicts) / (elapsed / 1e9) if elapsed else 0.0,
            "events": kept}


def compare_events(compiled: list[dict], reference: list[dict]) -> dict:
    n = min(len(compiled), len(reference))
    for i in range(n):
        if compiled[i] != reference[i]:
            return {"events_match": False, "first_mismatch": i,
                    "compiled_event": compiled[i], "reference_event": reference[i]}
    if len(compiled) != len(reference):
        return {"events_match": False, "first_mismatch": n,
                "compiled_events": len(compiled), "reference_events": len(reference)}
    return {"events_match": True, "events_compared": n}


# ---- the benchmarks -----------------------------------------------------------------------
def _say(progress, msg):
    if progress is not None:
        progress(msg)


def timed_runs(config: EngineConfig, streams: list, ring: Ring, *, runs: int, batch: int,
               progress=None) -> list[list[dict]]:
    """`runs` timed passes of each (name, setup, commands) stream, interleaved (one pass of
    each per round, so the machine's slow and fast phases fall on all of them alike)."""
    # warm-up: compile (if the generator did not already) and fault in code and tables
    for _name, setup, commands in streams:
        timed_run(config, setup, commands[:min(len(commands), 20_000)], ring, batch)
    results = [[] for _ in streams]
    for r in range(runs):
        for (name, setup, commands), out in zip(streams, results):
            res = timed_run(config, setup, commands, ring, batch)
            _say(progress, f"run {r + 1}/{runs}{name}: "
                           f"{res['commands_per_s'] / 1e6:.2f} M commands/s")
            out.append(res)
    return results


def measure(config: EngineConfig, setup: np.ndarray, commands: np.ndarray, *, runs: int,
            batch: int, reference_commands: int, verify_commands: int, expected_hash=None,
            progress=None) -> dict:
    """The common part of both benchmarks: timed runs, reference rate, event comparison."""
    ring = Ring(config)
    results = timed_runs(config, [("", setup, commands)], ring, runs=runs, batch=batch,
                         progress=progress)[0]
    return summarize(config, setup, commands, results, ring, batch=batch,
                     reference_commands=reference_commands, verify_commands=verify_commands,
                     expected_hash=expected_hash, progress=progress)


def summarize(config: EngineConfig, setup: np.ndarray, commands: np.ndarray, results: list,
              ring: Ring, *, batch: int, reference_commands: int, verify_commands: int,
              expected_hash=None, progress=None) -> dict:
    """A stream's timed runs, with the reference model's rate and the event comparison."""
    overhead = call_overhead_us(config, ring)
    rates = [r["commands_per_s"] for r in results]
    median_rate = statistics.median(rates)
    median_seconds = statistics.median(r["seconds"] for r in results)
    events = results[0]["events"]
    hashes = {r["state_hash"] for r in results}
    lat = np.concatenate([r["latency_ns"] for r in results])

    n_ref = min(reference_commands, len(commands))
    n_ver = min(verify_commands, n_ref)
    _say(progress, f"reference model on {n_ref} commands ...")
    ref = reference_run(config, setup, commands[:n_ref], keep_events_for=n_ver)
    _say(progress, f"comparing events on {n_ver} commands ...")
    compiled = compiled_events(config, np.concatenate([setup, commands[:n_ver]]), ring)
    match = compare_events(compiled, ref["events"])
    outcomes = count_outcomes(config, setup, commands, ring)

    out = {
        "commands": len(commands),
        "batch": batch,
        "commands_per_s": round(median_rate),
        "events_per_s": round(events / median_seconds) if median_seconds else 0,
        "events": events,
        "events_per_command": round(events / max(len(commands), 1), 3),
        "runs": [round(x) for x in rates],
        "batch_latency_us": percentiles_us(lat),
        "process_calls_per_run": results[0]["calls"],
        "empty_call_us": overhead,
        "reference_commands": n_ref,
        "reference_commands_per_s": round(ref["commands_per_s"]),
        "reference_ratio": round(median_rate / ref["commands_per_s"], 2)
        if ref["commands_per_s"] else None,
        "verify_commands": n_ver,
        **match,
        "reject_rate": round(outcomes["reject_rate"], 6),
        "rejects": outcomes["rejects"],
        "reject_reasons": outcomes["reject_reasons"],
        "trades": outcomes["trades"],
        "state_hash_stable": len(hashes) == 1 and outcomes["state_hash"] in hashes
        and (expected_hash is None or expected_hash in hashes),
        "engine_config": {"max_accounts": config.max_accounts,
                          "max_markets": config.max_markets,
                          "max_orders": config.max_orders,
                          "max_levels_per_side": config.max_levels_per_side},
        "event_ring_slots": ring.capacity,
    }
    return out


def bench_matcher(commands: int = 1_000_000, runs: int = DEFAULT_RUNS,
                  batch: int = DEFAULT_BATCH, seed: int | None = None,
                  reference_commands: int = 100_000, verify_commands: int = 20_000,
                  risk: bool = False, progress=None) -> dict:
    """The standard workload; with `risk`, also its risk-on variant (perpx/bench/workload.py), timed
    in the same rounds, reported under "risk" with `risk_ratio` = its rate / the plain one."""
    from perpx.bench import workload

    if commands < 1 or runs < 1 or batch < 1:
        raise ValueError("--commands, --runs and --batch must be positive")
    seed = workload.DEFAULT_SEED if seed is None else seed
    config = workload.engine_config()
    workloads = []
    for variant in ((False, True) if risk else (False,)):
        _say(progress, f"generating {commands} commands{' (risk on)' if variant else ''} "
                       f"(seed {seed}; compiles on first use) ...")
        t0 = time.perf_counter()
        wl = workload.generate(commands, seed=seed, config=config, risk=variant)
        workloads.append((wl, time.perf_counter() - t0))
    ring = Ring(config)
    results = timed_runs(config, [(" (risk on)" if k else "", wl.setup, wl.commands)
                                  for k, (wl, _) in enumerate(workloads)],
                         ring, runs=runs, batch=batch, progress=progress)
    reports = []
    for (wl, gen_s), res in zip(workloads, results):
        rep = summarize(config, wl.setup, wl.commands, res, ring, batch=batch,
                        reference_commands=reference_commands, verify_commands=verify_commands,
                        expected_hash=wl.stats["state_hash"], progress=progress)
        rep["mix"] = wl.stats["mix"]
        rep["resting_orders_at_end"] = wl.stats["resting_at_end"]
        rep["max_resting_orders"] = wl.stats["max_resting"]
        rep["generate_seconds"] = round(gen_s, 3)
        reports.append(rep)
    out = {"benchmark": "matcher", "workload": "standard", "seed": seed, **reports[0]}
    if risk:
        out["risk"] = {"workload": "risk on", **reports[1],
                       "liquidations": workloads[1][0].stats["liquidations"]}
        out["risk_ratio"] = round(reports[1]["commands_per_s"] / reports[0]["commands_per_s"],
                                  3)
    return out


def bench_lobster(data=None, limit: int | None = None, runs: int = DEFAULT_RUNS,
                  batch: int = DEFAULT_BATCH, reference_commands: int = 100_000,
                  verify_commands: int = 20_000, progress=None) -> dict:
    from perpx.bench import lobster

    if runs < 1 or batch < 1 or (limit is not None and limit < 1):
        raise ValueError("--runs, --batch and --limit must be positive")
    path, replay = lobster.load_replay(data, limit)
    if len(replay.commands) == 0:
        raise ValueError(f"no replayable messages in {path}")
    config = EngineConfig()
    _say(progress, f"replaying {len(replay.commands)} commands from {path.name} ...")
    out = {"benchmark": "lobster", "data": str(path), "messages": replay.stats["messages"]}
    out.update(measure(config, replay.setup, replay.commands, runs=runs, batch=batch,
                       reference_commands=reference_commands,
                       verify_commands=verify_commands, progress=progress))
    out["mapped"] = replay.stats["by_kind"]
    out["skipped"] = replay.stats["skipped"]
    return out


# ---- text output --------------------------------------------------------------------------
def format_report(res: dict) -> str:
    lat = res["batch_latency_us"]
    rows = [
        ("benchmark", res["benchmark"] + (f" ({res['data']})" if "data" in res else "")),
        ("commands", f"{res['commands']:,} in batches of {res['batch']}"),
        ("commands/s (median)", f"{res['commands_per_s']:,}"),
        ("runs", ", ".join(f"{r / 1e6:.2f}M" for r in res["runs"])),
        ("events/s", f"{res['events_per_s']:,} ({res['events_per_command']} per command)"),
        ("batch latency µs", f"p50 {lat['p50']}  p99 {lat['p99']}  p99.9 {lat['p999']}  "
                             f"max {lat['max']}"),
        ("empty process() call", f"{res['empty_call_us']} µs (Python -> compiled overhead)"),
        ("reference commands/s", f"{res['reference_commands_per_s']:,} "
                                 f"(on {res['reference_commands']:,} commands)"),
        ("compiled / reference", f"{res['reference_ratio']}x"),
        ("events match", f"{res['events_match']} (first {res['verify_commands']:,} commands)"),
        ("reject rate", f"{res['reject_rate'] * 100:.3f}% " +
         (", ".join(f"{k} {v}" for k, v in res["reject_reasons"].items()) or "")),
        ("trades", f"{res['trades']:,}"),
        ("state hash stable", str(res["state_hash_stable"])),
    ]
    if "mix" in res:
        total = max(sum(res["mix"].values()), 1)
        rows.append(("mix", ", ".join(f"{k} {v / total * 100:.1f}%"
                                      for k, v in res["mix"].items())))
        rows.append(("resting orders", f"{res['resting_orders_at_end']:,} at end, "
                                       f"max {res['max_resting_orders']:,}"))
    if "mapped" in res:
        rows.append(("mapped", ", ".join(f"{k} {v}" for k, v in res["mapped"].items())))
        rows.append(("skipped", ", ".join(f"{k} {v}" for k, v in res["skipped"].items())))
    if not res["events_match"]:
        rows.append(("first mismatch", str({k: v for k, v in res.items()
                                            if k in ("first_mismatch", "compiled_event",
                                                     "reference_event")})))
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    if "risk" in res:
        text += (f"\n\nrisk on ({res['risk']['liquidations']:,} liquidations; risk on / plain "
                 f"{res['risk_ratio']}):\n" + format_report({"benchmark": "matcher",
                                                               **res["risk"]}))
    return text
