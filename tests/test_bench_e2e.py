"""`perpx bench e2e --json`: one JSON object with the required keys, sane numbers, and
nothing of its exchanges left in /dev/shm (it starts and stops its own, in a temp dir). By
default it measures a fast and a durable exchange: the top level is the fast one, `durable`
the other with its ratios to fast."""

from __future__ import annotations

import json
import os

import msgpack

from perpx import heap
from perpx.bench.e2e import WORKLOADS, _decode_reply, _Procs, format_report
from perpx.cli import main
from tests.test_bench_pauses import check_cpu_gone

REQUIRED = ("orders_per_s", "ack_p50_us", "ack_p99_us", "ack_p999_us", "echo_msgs_per_s",
            "echo_rtt_p50_us", "orders_over_echo", "ack_p50_over_echo_p50",
            "relay_msgs_per_s", "relay_rtt_p50_us", "orders_over_relay",
            "ack_p50_over_relay_p50", "paced_achieved_per_s", "paced_ack_p99_us", "settings")


def test_bench_e2e_json(capsys, tmp_path):
    before = set(os.listdir("/dev/shm"))
    png = tmp_path / "e2e.png"
    assert main(["bench", "e2e", "--json", "--seconds", "2", "--rate", "2000",
                 "--plot", str(png), "--pauses"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    res = json.loads(lines[0])
    for key in REQUIRED:
        assert key in res, key
    assert res["orders_per_s"] > 0 and res["echo_msgs_per_s"] > 0
    assert res["paced_achieved_per_s"] > 0
    assert 0 < res["ack_p50_us"] <= res["ack_p99_us"] <= res["ack_p999_us"]
    assert 0 < res["echo_rtt_p50_us"] <= res["echo_rtt_p99_us"] <= res["echo_rtt_p999_us"]
    # the relay floor: real shm rings between two processes, every message answered
    assert res["relay_msgs_per_s"] > 0 and res["samples"]["relay"] > 0
    assert 0 < res["relay_rtt_p50_us"] <= res["relay_rtt_p99_us"] <= res["relay_rtt_max_us"]
    assert res["orders_over_relay"] == round(res["orders_per_s"] / res["relay_msgs_per_s"], 3)
    assert res["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["paced_ack_p50_us"] <= res["paced_ack_p99_us"] <= res["paced_ack_p999_us"]
    assert res["rejects"] == 0, res["first_reject"]
    assert res["settings"]["ack_mode"] == "fast" and res["settings"]["clients"] == 2
    assert res["settings"]["ack_modes"] == ["fast", "durable"]
    # the floors ran under the idle-CPU request the exchanges make (the config default)
    assert res["settings"]["cpu_latency"]["limit_us"] == 0
    assert res["settings"]["huge_pages"]["asked"] is False    # the exchanges' default heap
    durable = res["durable"]
    for key in REQUIRED[:4] + ("paced_achieved_per_s", "paced_ack_p99_us", "over_fast"):
        assert key in durable, key
    assert durable["orders_per_s"] > 0 and durable["paced_achieved_per_s"] > 0
    assert 0 < durable["ack_p50_us"] <= durable["ack_p99_us"] <= durable["ack_p999_us"]
    assert durable["rejects"] == 0, durable["first_reject"]
    assert durable["over_fast"]["orders_per_s"] == round(
        durable["orders_per_s"] / res["orders_per_s"], 3)
    # CPU per order by role over the throughput runs' windows (perpx/bench/cpu.py): the
    # floors' processes by the names they give themselves, the exchange's by their command
    cpus = len(os.sched_getaffinity(0))
    relay_cpu = res["relay_cpu_us_per_msg"]
    assert relay_cpu["relay-gateway"] > 0 and relay_cpu["client"] > 0, relay_cpu
    assert "relay-matcher" in relay_cpu and "gateway" not in relay_cpu, relay_cpu
    assert res["echo_cpu_us_per_msg"]["echo"] > 0, res["echo_cpu_us_per_msg"]
    for run in (res, durable):
        spent = run["cpu_us_per_order"]
        for role in ("gateway", "matcher", "persistd", "client"):
            assert spent[role] > 0, spent
        assert "relay-gateway" not in spent and "echo" not in spent, spent
        assert len(run["cpu_busy"]) >= cpus and all(0 <= b <= 1 for b in run["cpu_busy"].values())
    # the hand-overs behind that CPU: every request and reply crossed loopback TCP through
    # ZeroMQ's I/O threads, and the clients slept between replies
    for run, suffix, server in ((res, "order", "gateway"), (durable, "order", "gateway"),
                                ({k[6:]: v for k, v in res.items() if k.startswith("relay_")},
                                 "msg", "relay-gateway")):
        assert run[f"tcp_segments_per_{suffix}"] > 0.1, run
        for role in ("client", server):
            assert run[f"zmq_io_us_per_{suffix}"][role] > 0, run
            assert run[f"switches_per_{suffix}"][role]["waits"] > 0, run
    rows = {line.split("  ")[0]: line for line in format_report(res).splitlines()}
    assert "relay-gateway" in rows["relay CPU µs/msg"] and "busy cpu" in rows["relay CPU µs/msg"]
    assert "tcp segments" in rows["relay wakes/msg"] and "zmq-io" in rows["fast: wakes/order"]
    assert " gateway " in rows["fast: CPU µs/order"] and "durable: CPU µs/order" in rows
    assert "cpu gone: cpu" in rows["fast: throughput pauses"], rows
    # the pause meters ran beside both phases of both exchanges, and beside the floors: the
    # ratios compare runs made with the same instrument
    assert res["settings"]["pause_meters"] is True
    floors = res["floor_pauses"]
    assert sorted(floors) == ["echo", "relay"]
    for run in (res, durable):
        for phase in ("throughput", "paced"):
            p = run["pauses"][phase]
            check_cpu_gone(p, len(os.sched_getaffinity(0)))
            assert 0 <= p["late_requests_in_platform_pauses"] <= p["late_requests"]
            assert 0 <= p["late_requests_in_cpu_gone"] <= p["late_requests"], p
            assert p["late_requests_in_cpu_gone"] >= p["slowest_in_cpu_gone"], p
            assert p["late_requests_in_platform_pauses"] >= p["slowest_in_platform_pause"], p
    for p in floors.values():
        check_cpu_gone(p, len(os.sched_getaffinity(0)))
        assert 0 <= p["late_requests_in_cpu_gone"] <= p["late_requests"], p
    # its exchanges removed every shm entry they made, and none of their prefixes remains
    assert res["shm_left"] == []
    assert len(set(res["shm_prefixes"])) == 2 and res["shm_prefix"] == res["shm_prefixes"][0]
    after = set(os.listdir("/dev/shm"))
    assert not [n for n in after - before if n.startswith("perpx-relay-")]
    for prefix in res["shm_prefixes"]:
        assert not [n for n in after - before if prefix.lstrip("/") in n]


def _heap_environment(queue) -> None:
    queue.put((os.environ.get("PYTHONMALLOC"), os.environ.get("GLIBC_TUNABLES")))


def test_floor_servers_get_the_exchanges_heap_and_the_clients_keep_ours():
    """The floors are the exchange's shape: their servers start with the environment the
    supervisor gives the exchange's processes (perpx/heap.py); the clients, and this process
    afterwards, have this process's."""
    before = dict(os.environ)
    procs = _Procs(huge_pages=True)
    queue = procs.mp.Queue()
    try:
        procs.start_server(_heap_environment, queue)
        server = queue.get(timeout=60)
        procs.start(_heap_environment, queue)
        client = queue.get(timeout=60)
    finally:
        procs.close()
    assert dict(os.environ) == before
    exchange = heap.child_environment(before, True)
    assert server == (exchange["PYTHONMALLOC"], exchange["GLIBC_TUNABLES"])
    assert client == (before.get("PYTHONMALLOC"), before.get("GLIBC_TUNABLES"))


def test_clients_send_msgpacks_bytes_and_read_what_they_need_of_any_reply():
    """The clients' lean codec (msgspec): each workload's requests are the bytes
    msgpack.packb writes, and a reply's type, rid, seq and ts read as unpackb reads them, for
    the exchange's reports (with fields the client skips) and the floors' echoed requests."""
    for make, _ in WORKLOADS.values():
        for i in range(4):
            raw = make(i, 123 << 20, 1_000_000 + i, i % 2)
            assert msgpack.packb(msgpack.unpackb(raw), use_bin_type=True) == raw
    ack = {"type": "ack", "rid": 7, "cid": 3, "oid": 11, "status": "open", "seq": 42,
           "ts": 1_765_000_000_123_456_789, "account_seq": 5, "price": "60000.0"}
    fill = {"type": "fill", "cid": 3, "oid": 11, "seq": 43, "ts": 1, "qty": "0.001"}
    echoed = msgpack.unpackb(WORKLOADS["rest_cancel"][0](0, 0, 9, 0))
    for reply in (ack, fill, echoed):
        m = _decode_reply(msgpack.packb(reply, use_bin_type=True))
        assert (m.type, m.rid, m.seq, m.ts) == (reply["type"], reply.get("rid"),
                                                reply.get("seq", 0), reply.get("ts"))
