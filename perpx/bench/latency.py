"""`perpx bench latency`: order-ack latency under open-loop load at fixed rates.

For each ack mode (fast, durable: a fresh exchange each, as `perpx bench e2e` starts them) and
each client count, every rate in turn: the clients send `perpx bench e2e`'s rest/cancel
stream on a fixed schedule, rate/clients each, whatever the replies do (a window of
OPEN_WINDOW requests in flight is only a safety cap). Latency is measured from each request's
INTENDED send time to its reply, as wrk2 and HdrHistogram do: when the exchange stalls, the
requests that should have gone out meanwhile are charged for the stall too (no coordinated
omission). Each rate gets fresh client processes, a warm-up, then `seconds` of timed sends;
every request sent in the timed window counts, also when its reply comes after it.

The rates: the fixed ones (default 100, 1,000 and 5,000 orders/s) plus "max", the highest
this box sustains for that ack mode: MAX_FRACTION of the closed-loop throughput (e2e's window-8
run) measured on the same exchange just before. Per rate: achieved orders/s, p50, p90, p99,
p99.9 and max (µs), the samples, and requests never answered (should be 0). Also
`to_gateway_p50_us` and `to_gateway_p99_us`: from each request's actual send until the gateway
read it (its receipt stamp, `ts`, which the reply carries; one clock on one box). That part is
spent before any of the exchange's logic: both ends' ZeroMQ I/O threads, CURVE, loopback, and
the wait for the gateway's next pass. The rest of the latency is the exchange's work and the
way back. `cpu_us_per_order`: each process's CPU time per acked order over the timed window,
by role (perpx/bench/cpu.py; the text report shows the gateway's and the matcher's). At low
rates each order runs code gone cold since the one before.

`--plot FILE.png` writes the percentile spectra (perpx/bench/plot.py): one panel per ack mode
and client count, one line per rate.

`--pauses` runs perpx/bench/pauses.py's meters beside each rate: per run, the pauses of the
platform itself (every CPU stalled at once), each CPU's time gone (host steal), and how many
of the requests later than 2 ms were waiting during either. The percentiles are the same
either way: nothing is left out.
"""

from __future__ import annotations

import os

import numpy as np

from perpx.bench import pauses as platform, plot
from perpx.bench.e2e import (DEFAULT_WINDOW, bench_dir, exchange_config, _funded_accounts,
                             run_phases, running_exchange)

DEFAULT_SECONDS = 3.0
DEFAULT_RATES = (100, 1_000, 5_000)
DEFAULT_CLIENTS = (1, 4)
ACK_MODES = ("fast", "durable")
OPEN_WINDOW = 4096
MAX_FRACTION = 0.9
QUANTILES = (("p50_us", 50), ("p90_us", 90), ("p99_us", 99), ("p999_us", 99.9))
# issue 16's targets at 1,000 orders/s, one client (µs)
TARGET_RATE = 1_000


def _quantile_us(samples_ns: np.ndarray, q: float) -> float | None:
    """The q-th percentile in µs, to 0.1 µs; None without samples."""
    return round(float(np.percentile(samples_ns, q)) / 1e3, 1) if len(samples_ns) else None


def latency_figures(summary: dict) -> dict:
    """One rate's figures from e2e's run summary, latencies from the intended send time."""
    sched = summary["sched_ns"]
    out = {"achieved_per_s": summary["per_s"]}
    for name, q in QUANTILES:
        out[name] = _quantile_us(sched, q)
    out["max_us"] = _quantile_us(sched, 100)
    for name, q in (("to_gateway_p50_us", 50), ("to_gateway_p99_us", 99)):
        out[name] = _quantile_us(summary["to_gateway_ns"], q)
    out.update({"samples": int(len(sched)), "unanswered": summary["unanswered"],
                "rejected": summary["rejected"], "first_reject": summary["first_reject"],
                "cpu_us_per_order": summary["cpu_us_per_order"]})
    return out


def _mode_runs(root, mode: str, seconds: float, rates: list, clients: list, with_max: bool,
               pauses: bool, say) -> tuple[list, dict, str]:
    """A fresh exchange in `mode`; every (clients, rate) run against it; (rows, samples, its
    shm prefix)."""
    shm_left: list = []
    rows, samples = [], {}
    warmup = min(0.5, seconds / 4)
    base = {"seconds": seconds, "warmup_s": warmup, "window": OPEN_WINDOW}
    say(f"starting the exchange (ack_mode {mode})")
    with running_exchange(root / mode, exchange_config(max(clients), mode), say,
                          shm_left) as (exchange, endpoints):
        target = {"endpoints": endpoints,
                  "certificates": _funded_accounts(exchange.sd, max(clients))}
        mode_rates = [(str(r), float(r)) for r in rates]
        if with_max:
            closed = run_phases(target, [{**base, "name": "closed", "window": DEFAULT_WINDOW,
                                          "rate": 0}], max(clients), say)["closed"]
            mode_rates.append(("max", max(1.0, MAX_FRACTION * closed["per_s"])))
        for c in clients:
            for label, rate in mode_rates:
                phase = {**base, "name": f"{label}/s", "rate": rate / c}
                summary = run_phases(target, [phase], c, say, pauses)[phase["name"]]
                rows.append({"ack_mode": mode, "clients": c, "rate": label,
                             "rate_per_s": round(rate), **latency_figures(summary)})
                if pauses:
                    rows[-1]["pauses"] = summary["pauses"]
                samples[(mode, c, label)] = summary["sched_ns"]
    if shm_left:
        raise RuntimeError(f"the {mode} exchange left shm entries: {shm_left}")
    return rows, samples, exchange.sd.prefix


def _targets(rows: list) -> dict:
    """issue 16's targets at 1,000/s, one client, where both modes were measured."""
    at = {r["ack_mode"]: r for r in rows if r["clients"] == 1 and r["rate"] == str(TARGET_RATE)}
    if "fast" not in at or "durable" not in at:
        return {}
    f, d = at["fast"], at["durable"]
    checks = {
        "durable_p50_le_fast_p50_plus_300us": (d["p50_us"], f["p50_us"] + 300),
        "durable_p99_le_2ms": (d["p99_us"], 2000), "durable_p999_le_5ms": (d["p999_us"], 5000),
        "durable_max_le_20ms": (d["max_us"], 20000), "fast_p99_le_1ms": (f["p99_us"], 1000),
    }
    return {k: {"value_us": v, "limit_us": lim, "met": v <= lim}
            for k, (v, lim) in checks.items()}


def bench_latency(seconds: float = DEFAULT_SECONDS, rates=DEFAULT_RATES,
                  clients=DEFAULT_CLIENTS, ack_mode: str = "both", with_max: bool = True,
                  plot_path=None, pauses: bool = False, progress=None) -> dict:
    say = progress or (lambda msg: None)
    modes = ACK_MODES if ack_mode == "both" else (ack_mode,)
    if any(m not in ACK_MODES for m in modes):
        raise ValueError(f"ack_mode must be fast, durable or both, not {ack_mode!r}")
    rates, clients = sorted(set(rates)), sorted(set(clients))
    rows, samples, prefixes = [], {}, []
    with bench_dir("latency") as root:
        for mode in modes:
            r, s, prefix = _mode_runs(root, mode, seconds, rates, clients, with_max, pauses,
                                      say)
            rows += r
            samples.update(s)
            prefixes.append(prefix)
    res = {"benchmark": "latency", "runs": rows, "targets": _targets(rows),
           "settings": {"seconds": seconds, "warmup_s": min(0.5, seconds / 4),
                        "rates": rates, "max_rate": with_max, "max_fraction": MAX_FRACTION,
                        "clients": clients, "ack_modes": list(modes),
                        "open_window": OPEN_WINDOW, "gateways": 1,
                        "orders": "alternating resting new_order and cancel, both counted",
                        "latency": "from each request's intended send time (open loop)",
                        "percentiles": "exact (numpy) over all samples",
                        "pause_meters": pauses,
                        "cpus": os.cpu_count()},
           "plot": None, "shm_prefixes": prefixes}
    if plot_path is not None:
        panels = [(f"{mode} acks, {c} client{'s' * (c > 1)}",
                   [(f"{label}/s", a) for (m, c2, label), a in samples.items()
                    if m == mode and c2 == c])
                  for mode in modes for c in clients]
        res["plot"] = str(plot.write_spectra(
            plot_path, panels, "perpx bench latency: ack latency from the intended send time"))
    return res


def format_report(res: dict) -> str:
    s = res["settings"]
    lines = [f"latency: open loop, {s['seconds']:g} s per rate (+{s['warmup_s']:g} s warm-up), "
             f"latency from the intended send time, {s['cpus']} cpus shared by clients and "
             f"exchange",
             f"{'mode':8} {'clients':>7} {'rate/s':>8} {'achieved':>9} {'p50 µs':>9} "
             f"{'p90 µs':>9} {'p99 µs':>9} {'p99.9 µs':>9} {'max µs':>9} {'n':>7} "
             f"{'to gw p50':>9} {'to gw p99':>9} {'gw cpu':>7} {'mt cpu':>7}"]
    def cells(values: dict, keys, width: int = 9) -> str:
        return " ".join(f"{values.get(k) if values.get(k) is not None else '-':>{width}}"
                        for k in keys)

    for r in res["runs"]:
        rate = f"{r['rate_per_s']:,}" + ("*" if r["rate"] == "max" else "")
        lines.append(f"{r['ack_mode']:8} {r['clients']:>7} {rate:>8} {r['achieved_per_s']:>9,} "
                     + cells(r, ("p50_us", "p90_us", "p99_us", "p999_us", "max_us"))
                     + f" {r['samples']:>7} "
                     + cells(r, ("to_gateway_p50_us", "to_gateway_p99_us")) + " "
                     + cells(r["cpu_us_per_order"], ("gateway", "matcher"), 7)
                     + (f"  unanswered {r['unanswered']}" if r["unanswered"] else "")
                     + (f"  rejected {r['rejected']}" if r["rejected"] else ""))
        if "pauses" in r:
            lines.append(f"{'':17} {platform.describe(r['pauses'])}")
    if s["max_rate"]:
        lines.append(f"* max: {s['max_fraction']:g} x the closed-loop throughput of that "
                     f"exchange (window {DEFAULT_WINDOW})")
    lines.append("to gw: from the actual send until the gateway read the request (its "
                 "receipt stamp); gw cpu, mt cpu: µs of CPU per order of the gateway and the "
                 "matcher")
    for name, t in res["targets"].items():
        lines.append(f"target {name}: {t['value_us']} µs (limit {t['limit_us']}) "
                     f"{'met' if t['met'] else 'MISSED'}")
    if res["plot"]:
        lines.append(f"plot: {res['plot']}")
    return "\n".join(lines)
