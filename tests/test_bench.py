"""The benchmark entry points: `perpx bench matcher` and `perpx bench lobster` through main()."""

import json

import numpy as np
import pytest

from perpx import cli
from perpx.bench import lobster, workload
from engine.records import (CMD_AMEND, CMD_CANCEL, CMD_NEW_ORDER, CMD_SET_BRACKET,
                            CMD_SET_MARGIN, CMD_SET_MARK, TIF_IOC)

KEYS = ("commands_per_s", "reference_commands_per_s", "reference_ratio", "batch_latency_us",
        "runs", "commands", "batch", "reject_rate", "events_match", "events_per_s")


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_result(res, commands, runs, max_reject_rate):
    for key in KEYS:
        assert key in res, key
    assert res["commands"] == commands
    assert res["commands_per_s"] > 0
    assert res["reference_commands_per_s"] > 0
    assert res["reference_ratio"] > 1          # compiled is faster than the plain-Python model
    assert res["events_per_s"] > 0
    assert len(res["runs"]) == runs and all(r > 0 for r in res["runs"])
    lat = res["batch_latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"]
    assert res["events_match"] is True
    assert res["state_hash_stable"] is True
    assert 0 <= res["reject_rate"] < max_reject_rate


def test_bench_matcher_json(capsys):
    code, out, err = run_cli(capsys, "bench", "matcher", "--json", "--commands", "20000",
                             "--runs", "3")
    assert code == 0, err
    res = json.loads(out)          # exactly one JSON document
    check_result(res, 20000, 3, max_reject_rate=0.05)
    assert res["batch"] == 256
    assert res["trades"] > 0
    mix = res["mix"]
    assert sum(mix.values()) == 20000
    assert mix["cancel"] > 0.15 * 20000 and mix["passive_limit"] > 0.4 * 20000


def test_bench_matcher_risk_on(capsys):
    """--risk times the risk-on variant in the same rounds: its own full report (events
    checked against the reference model, stable state hash) and the ratio to the plain rate."""
    code, out, err = run_cli(capsys, "bench", "matcher", "--json", "--risk", "--commands",
                             "20000", "--runs", "1")
    assert code == 0, err
    res = json.loads(out)
    check_result(res, 20000, 1, max_reject_rate=0.05)
    risk = res["risk"]
    check_result(risk, 20000, 1, max_reject_rate=0.1)
    assert res["risk_ratio"] == round(risk["commands_per_s"] / res["commands_per_s"], 3)
    mix = risk["mix"]
    assert sum(mix.values()) == 20000
    g = np.arange(20000)
    funding = g % workload.FUNDING_EVERY == workload.FUNDING_OFFSET
    assert mix["mark"] == np.count_nonzero((g % workload.MARK_EVERY == 0) & ~funding)
    assert mix["funding"] == 2 and mix["punter_market"] > 0 and mix["liquidate"] > 0
    assert risk["liquidations"] > 0


def test_risk_workload_setup_and_stream():
    wl = workload.generate(3000, seed=7, risk=True)
    setup = wl.setup
    assert np.count_nonzero(setup["cmd"] == CMD_SET_MARGIN) == 2 * (200 + workload.N_PUNTERS)
    assert np.count_nonzero(setup["cmd"] == CMD_SET_BRACKET) == 2 * len(workload.BRACKETS)
    assert wl.stats["rejects"] < 0.05 * 3000
    marks = wl.commands[wl.commands["cmd"] == CMD_SET_MARK]
    mids = np.array([m[4] for m in workload.MARKETS])[marks["market"]]
    assert np.all(np.abs(marks["price_ticks"] - mids) <= workload.MARK_SWING * mids + 1)


def test_global_json_before_subcommand(capsys):
    code, out, err = run_cli(capsys, "--json", "--state-dir", "/nonexistent", "bench",
                             "matcher", "--commands", "2000", "--runs", "1", "--batch", "64",
                             "--reference-commands", "500", "--verify-commands", "500")
    assert code == 0, err
    res = json.loads(out)
    assert res["batch"] == 64 and res["commands"] == 2000


def test_bench_text_output(capsys):
    code, out, err = run_cli(capsys, "bench", "matcher", "--commands", "2000", "--runs", "1",
                             "--reference-commands", "500", "--verify-commands", "500")
    assert code == 0, err
    assert "commands/s (median)" in out and "events match" in out


def test_usage_error_is_one_line(capsys):
    code = None
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "matcher", "--commands", "zero"])
    code = exc.value.code
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_workload_is_deterministic_and_valid():
    a = workload.generate(5000, seed=7)
    b = workload.generate(5000, seed=7)
    assert np.array_equal(a.commands, b.commands)
    assert a.stats["state_hash"] == b.stats["state_hash"]
    c = workload.generate(5000, seed=8)
    assert not np.array_equal(a.commands, c.commands)
    assert a.stats["reject_rate"] < 0.05
    cmds = a.commands
    # cancels and amends name an order of their own account that was acked earlier
    acked = {}
    for i, row in enumerate(cmds):
        if row["cmd"] == CMD_NEW_ORDER:
            acked[(int(row["account"]), int(row["cid"]))] = i
    for row in cmds[(cmds["cmd"] == CMD_CANCEL) | (cmds["cmd"] == CMD_AMEND)]:
        assert row["oid"] > 0 or (int(row["account"]), int(row["cid"])) in acked


# ---- LOBSTER ------------------------------------------------------------------------------
def _lobster_file():
    try:
        return lobster.find_message_file()
    except FileNotFoundError:
        return None


needs_data = pytest.mark.skipif(_lobster_file() is None, reason="LOBSTER data folder absent")


@needs_data
def test_bench_lobster_json(capsys):
    code, out, err = run_cli(capsys, "bench", "lobster", "--json", "--limit", "5000",
                             "--runs", "3", "--verify-commands", "5000")
    assert code == 0, err
    res = json.loads(out)
    assert res["messages"] == 5000
    check_result(res, res["commands"], 3, max_reject_rate=0.25)
    assert 0 < res["commands"] <= 2 * 5000
    assert res["trades"] > 0


@needs_data
def test_lobster_mapping():
    msgs = lobster.load_messages(_lobster_file(), limit=2000)
    assert len(msgs) == 2000
    assert set(np.unique(msgs["type"])) <= {1, 2, 3, 4, 5, 7}
    replay = lobster.to_commands(msgs)
    cmds = replay.commands
    submitted = set(msgs["order_id"][msgs["type"] == 1].tolist())
    new = cmds[cmds["cmd"] == CMD_NEW_ORDER]
    makers = new[new["tif"] != TIF_IOC]
    assert set(makers["cid"].tolist()) <= submitted
    # cancels/amends only for orders submitted inside the window, addressed to their maker
    for row in cmds[(cmds["cmd"] == CMD_CANCEL) | (cmds["cmd"] == CMD_AMEND)]:
        assert int(row["cid"]) in submitted
        assert row["account"] == lobster.maker_account(int(row["cid"]))
    # prices land on the 0.01 USD grid
    assert np.all(makers["price_ticks"] * lobster.PRICE_PER_TICK
                  == msgs["price"][replay.rows[cmds["cmd"] == CMD_NEW_ORDER][new["tif"] != TIF_IOC]])


def test_lobster_missing_data_is_one_clear_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "bench", "lobster", "--data", str(tmp_path / "nowhere"))
    assert code != 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "LOBSTER message file not found" in err


def test_bench_levels_json(capsys):
    code, out, err = run_cli(capsys, "bench", "levels", "--json", "--levels", "64,2048",
                             "--pairs", "200", "--runs", "1")
    assert code == 0, err
    res = json.loads(out)
    assert [r["levels"] for r in res["rows"]] == [64, 2048]
    for row in res["rows"]:
        assert row["near_ns"] > 0 and row["far_ns"] > 0 and "shift_ns_per_level" in row
    assert res["pairs"] == 200 and res["runs"] == 1
