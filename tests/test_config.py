"""The TOML config (perpx/config.py): the bundled default, exact conversions, and one clear
error per bad key, naming it."""

import json
from decimal import Decimal

import pytest

from engine.config import band_ticks, book_levels_needed
from engine.market_checks import market_config_problem, market_limits_problem
from engine.records import (CMD_CREATE_MARKET, CMD_SET_BRACKET, CMD_SET_MARKET_FILTERS,
                            CMD_SET_MARKET_LIMITS,
                            CMD_SET_MARKET_RISK)
from perpx.config import ConfigError, config_from_resolved, genesis_commands, load_config, parse_config
from engine.units import usdc_to_atoms
from shm.names import prefix_for as shm_prefix_for
from perpx.supervisor import matcher_spins, plan_cpus
from tests.test_layers import compilers_loaded_by

# The example of PROTOCOL.md, verbatim (the contract's keys).
PROTOCOL_EXAMPLE = '''
[exchange]
gateways = 1                 # gateway processes
ack_mode = "durable"         # or "fast" (benchmarks only)

[[markets]]
symbol = "BTC-PERP"
tick_size = "0.1"
lot_size = "0.001"
initial_price = "65000"      # starting index for the sim feed and the first mark
oracle = "sim"               # "sim" | "manual" | "csv:PATH"
max_leverage = 50
maker_fee = "0.0002"         # negative = rebate
taker_fee = "0.0005"
price_band = "0.10"          # limit prices within ±10% of mark
brackets = [["0", "0.004"], ["50000", "0.005"], ["250000", "0.01"], ["1000000", "0.025"]]
                             # [notional floor, maintenance rate]; maintenance amounts follow
liquidation_fee = "0.005"    # of the closed notional, to the insurance fund
funding_interval_s = 28800
interest_rate = "0.0001"     # per 8 hours
funding_cap = "0.0075"       # |rate| per interval at most
'''

GOOD_MARKET = '''
[[markets]]
symbol = "BTC-PERP"
tick_size = "0.1"
lot_size = "0.001"
initial_price = "65000"
'''


def market(**overrides) -> str:
    """A config with a good market 0 and market 1 = ETH-PERP with the given keys changed."""
    keys = {"symbol": '"ETH-PERP"', "tick_size": '"0.01"', "lot_size": '"0.01"',
            "initial_price": '"3500"'}
    keys.update(overrides)
    body = "\n".join(f"{k} = {v}" for k, v in keys.items() if v is not None)
    return GOOD_MARKET + "\n[[markets]]\n" + body + "\n"


def test_bundled_default():
    cfg = load_config()
    assert [m.symbol for m in cfg.markets] == ["BTC-PERP", "ETH-PERP"]
    btc, eth = cfg.markets
    assert (btc.id, btc.tick_size, btc.lot_size, btc.initial_price) == (
        0, Decimal("0.1"), Decimal("0.001"), Decimal("65000"))
    assert (eth.id, eth.tick_size, eth.lot_size, eth.initial_price) == (
        1, Decimal("0.01"), Decimal("0.01"), Decimal("3500"))
    assert btc.atoms_per_tick_lot == 100 and eth.atoms_per_tick_lot == 100
    assert btc.initial_price_ticks == 650_000 and eth.initial_price_ticks == 350_000
    assert (btc.maker_fee_e9, btc.taker_fee_e9, btc.price_band_e9) == (200_000, 500_000,
                                                                      100_000_000)
    assert btc.max_price_ticks == 10 * btc.initial_price_ticks
    assert cfg.gateways == 1 and cfg.ack_mode == "durable" and btc.oracle == "sim"
    # the derived limits are legal for the engine, and the maintenance amounts follow
    for m in cfg.markets:
        assert market_config_problem(m.atoms_per_tick_lot, m.initial_price_ticks, m.maker_fee_e9,
                                     m.taker_fee_e9, m.price_band_e9, m.max_leverage) == 0
        assert market_limits_problem(m.atoms_per_tick_lot, m.initial_price_ticks,
                                     m.max_price_ticks, m.max_order_lots, m.max_position_lots,
                                     m.max_open_orders) == 0
    assert [b.maintenance_amount for b in btc.brackets] == [Decimal(0), Decimal(50),
                                                            Decimal(1300), Decimal(16300)]
    assert btc.describe()["max_position_qty"] == "27000"
    # a book side has room for a level per order of the pool, at any price up to max_price
    assert cfg.engine["max_levels_per_side"] == cfg.engine["max_orders"] == 65536
    assert [book_levels_needed(m.max_price_ticks, 65536) for m in cfg.markets] == [65536] * 2


def test_band_ticks_counts_both_edges_clipped_to_the_price_range():
    assert band_ticks(650_000, 100_000_000, 6_500_000) == 130_001      # BTC-PERP at 65000
    assert band_ticks(10, 500_000_000, 100) == 11                      # [5, 15]
    assert band_ticks(10, 500_000_000, 12) == 8                        # [5, 12]
    assert band_ticks(3, 999_999_999, 100) == 5                        # [1, 5]
    assert band_ticks(1, 500_000_000, 1) == 1


def test_book_sides_must_hold_a_level_per_price_or_per_order():
    """engine.max_levels_per_side defaults to max_orders; a smaller value passes only for
    markets with fewer prices up to their max_price than the pool has orders."""
    coarse = GOOD_MARKET.replace('tick_size = "0.1"', 'tick_size = "100"')   # 650 ticks
    cfg = parse_config("[engine]\nmax_orders = 4096\n" + GOOD_MARKET)
    assert cfg.engine["max_levels_per_side"] == 4096
    cfg = parse_config("[engine]\nmax_levels_per_side = 6500\n" + coarse)
    assert cfg.markets[0].max_price_ticks == 6500
    with pytest.raises(ConfigError) as err:
        parse_config("[engine]\nmax_levels_per_side = 6499\n" + coarse)
    assert str(err.value) == (
        "engine.max_levels_per_side: 6499 is below the 6500 price levels a book side of "
        "markets[0] (BTC-PERP) can come to hold: one per resting order (engine.max_orders "
        "65536) at any of its 6500 prices up to max_price 650000 (its price band alone spans "
        "131 prices at initial_price); set it to at least 6500, or leave it out (max_orders)")


def test_genesis_commands_create_each_market_then_its_limits_and_risk():
    cfg = load_config()
    cmds = genesis_commands(cfg, ts_ns=1)
    per_market = ([CMD_CREATE_MARKET, CMD_SET_MARKET_LIMITS, CMD_SET_MARKET_RISK]
                  + [CMD_SET_BRACKET] * 4 + [CMD_SET_MARKET_FILTERS])
    assert list(cmds["cmd"]) == per_market * 2
    assert list(cmds["market"]) == [0] * 8 + [1] * 8
    # default.toml's filters: min notional 5 USDC, 10 stop orders, no open-interest cap
    assert list(cmds[7][["amount_atoms", "qty_lots", "price_ticks"]].item()) == [5_000_000, 10, 0]
    # each bracket's max leverage, resolved (BTC: max 50; 2.5% allows 39)
    assert list(cmds[3:7]["qty_lots"]) == [50, 50, 50, 39]
    btc = cfg.markets[0]
    create, limits, market_risk = cmds[0], cmds[1], cmds[2]
    assert (market_risk["cid"], market_risk["oid"]) == (5_000_000, 7_500_000)
    # default.toml's BTC brackets: [0, 0.4%], [50000, 0.5%], [250000, 1%], [1000000, 2.5%]
    brackets = cmds[3:7]
    assert list(brackets["kind"]) == [0, 1, 2, 3]
    assert list(brackets["amount_atoms"]) == [0, 50_000 * 10**6, 250_000 * 10**6, 10**12]
    assert list(brackets["price_ticks"]) == [4_000_000, 5_000_000, 10_000_000, 25_000_000]
    assert (create["price_ticks"], create["amount_atoms"], create["cid"], create["oid"],
            create["qty_lots"], create["account"]) == (650_000, 100, 200_000, 500_000,
                                                      100_000_000, 50)
    assert (limits["price_ticks"], limits["qty_lots"], limits["amount_atoms"],
            limits["account"]) == (btc.max_price_ticks, btc.max_order_lots,
                                   btc.max_position_lots, btc.max_open_orders)


def test_protocol_example_and_defaults():
    cfg = parse_config(PROTOCOL_EXAMPLE)
    m = cfg.markets[0]
    assert (m.max_leverage, m.liquidation_fee_e9, m.funding_interval_s, m.funding_cap_e9) == (
        50, 5_000_000, 28800, 7_500_000)
    # a market with only the required keys takes the defaults
    only = parse_config(GOOD_MARKET).markets[0]
    assert (only.oracle, only.max_leverage, only.taker_fee) == ("sim", 20, Decimal("0.0005"))
    assert parse_config(GOOD_MARKET).endpoints == {"host": "127.0.0.1", "orders_port": 7700,
                                                   "market_data_port": 7800,
                                                   "metrics_port": 7900}


def test_toml_floats_are_exact_and_rebates_allowed():
    cfg = parse_config(market(tick_size="0.01", lot_size="0.01", maker_fee="-0.0001",
                              initial_price="3500.07"))
    eth = cfg.markets[1]
    assert eth.tick_size == Decimal("0.01") and eth.maker_fee_e9 == -100_000
    assert eth.initial_price_ticks == 350_007


def test_resolved_config_round_trips():
    cfg = load_config()
    assert config_from_resolved(cfg.to_dict()) == cfg
    assert cfg.risk == {"mark_interval_ms": 250, "seed": 0, "funding_sample_ms": 5000,
                        "liquidation_retry_ms": 1000, "scan": True, "feed_stale_s": 30,
                        "breaker_move": "0", "breaker_window_s": 60, "breaker_halt_s": 60,
                        "oracle_max_jump": "0"}
    tuned = parse_config("[risk]\nmark_interval_ms = 50\nscan = false\n" + GOOD_MARKET)
    assert (tuned.risk["mark_interval_ms"], tuned.risk["scan"]) == (50, False)
    assert config_from_resolved(tuned.to_dict()) == tuned
    assert cfg.cpu_latency_us == 0        # idle CPUs poll on the bundled exchange
    shared = parse_config("[exchange]\ncpu_latency_us = -1\n" + GOOD_MARKET)
    assert shared.cpu_latency_us == -1 and config_from_resolved(shared.to_dict()) == shared
    assert cfg.huge_pages is False        # Python's own allocator unless asked (perpx/heap.py)
    huge = parse_config("[exchange]\nhuge_pages = true\n" + GOOD_MARKET)
    assert huge.huge_pages is True and config_from_resolved(huge.to_dict()) == huge


def test_reading_a_resolved_config_loads_no_compiler(tmp_path):
    """CLI commands on a running exchange (status, book, markets, account ...) read its
    resolved config, its spec and its state without numba: importing it and loading one
    compiled check cost ~0.5 s a command. Only checking a config loads it."""
    resolved = tmp_path / "exchange.json"
    resolved.write_text(json.dumps(load_config().to_dict()))
    code = ("import json\n"
            "from perpx import cli, ops\n"
            "from perpx.config import config_from_resolved\n"
            "from engine.shared_state import attach_state\n"
            f"assert config_from_resolved(json.loads(open({str(resolved)!r}).read())).markets")
    assert compilers_loaded_by(code) == []


def test_csv_oracle_path_is_resolved_against_the_config_file(tmp_path):
    (tmp_path / "btc.csv").write_text("ts,price\n0,65000\n")
    path = tmp_path / "x.toml"
    path.write_text(market(oracle='"csv:btc.csv"'))
    assert load_config(path).markets[1].oracle == f"csv:{tmp_path / 'btc.csv'}"


BAD = [
    # (config text, key the error names, a phrase of the message)
    (market(tick_size='"0.0001"', lot_size='"0.001"'), "markets[1].tick_size",
     "'0.0001' x lot_size '0.001' = 0.0000001 USDC is not a whole number of 1e-6 USDC"),
    (market(tick_size='"0"'), "markets[1].tick_size", "must be positive"),
    (market(lot_size='"-0.01"'), "markets[1].lot_size", "must be positive"),
    (market(tick_size='"abc"'), "markets[1].tick_size", "not a plain decimal"),
    (market(tick_size="true"), "markets[1].tick_size", "must be a decimal string"),
    (market(initial_price='"3500.005"'), "markets[1].initial_price",
     "not a multiple of tick_size '0.01'"),
    (market(initial_price='"0"'), "markets[1].initial_price", "must be positive"),
    (market(maker_fee='"0.00000000001"'), "markets[1].maker_fee",
     "not a whole number of 1e-9"),
    (market(maker_fee='"-0.001"', taker_fee='"0.0005"'), "markets[1].maker_fee",
     "must be in [-0.0005, 0.1]"),
    (market(taker_fee='"0.2"'), "markets[1].taker_fee", "must be in [0, 0.1]"),
    (market(taker_fee='"-0.1"'), "markets[1].taker_fee", "must be in [0, 0.1]"),
    (market(price_band='"1.5"'), "markets[1].price_band", "must be in (0, 1)"),
    (market(price_band='"0"'), "markets[1].price_band", "must be in (0, 1)"),
    (market(max_leverage="0"), "markets[1].max_leverage", "must be in [1, 1000]"),
    (market(max_leverage="2000"), "markets[1].max_leverage", "must be in [1, 1000]"),
    (market(max_leverage='"50"'), "markets[1].max_leverage", "must be an integer"),
    (market(oracle='"feed"'), "markets[1].oracle", "must be one of sim, manual, csv:PATH"),
    (market(oracle='"csv:/nonexistent/prices.csv"'), "markets[1].oracle", "does not exist"),
    (market(brackets='[["10", "0.004"]]'), "markets[1].brackets[0][0]", "must start at notional 0"),
    (market(brackets='[["0", "0.004"], ["0", "0.005"]]'), "markets[1].brackets[1][0]",
     "must be above the previous floor"),
    (market(brackets='[["0", "0.004"], ["100", "0.003"]]'), "markets[1].brackets[1][1]",
     "below the previous bracket's"),
    (market(max_leverage="50", brackets='[["0", "0.02"]]'), "markets[1].brackets[0][1]",
     "below the initial margin rate 1/max_leverage = 0.02"),
    (market(brackets='[["0"]]'), "markets[1].brackets[0]", "must be a pair"),
    (market(max_leverage="20", brackets='[["0", "0.004"], ["100", "0.1", 10]]'),
     "markets[1].brackets[1][2]", "initial margin rate 0.1, not above the maintenance rate"),
    (market(max_leverage="20", brackets='[["0", "0.004", 10], ["100", "0.005", 15]]'),
     "markets[1].brackets[1][2]", "above the previous bracket's 10"),
    (market(max_leverage="20", brackets='[["0", "0.004", 30]]'), "markets[1].brackets[0][2]",
     "must be in [1, 20]"),
    (market(min_notional='"-1"'), "markets[1].min_notional", "must be >= 0 USDC"),
    (market(min_notional='"0.0000001"'), "markets[1].min_notional", "6 decimals at most"),
    (market(max_stop_orders="-1"), "markets[1].max_stop_orders", "must be in [0,"),
    ("[risk]\nbreaker_move = \"-0.1\"\n" + GOOD_MARKET, "risk.breaker_move",
     "must be a fraction >= 0"),
    (market(open_interest_cap='"0.001"'), "markets[1].open_interest_cap",
     "not a multiple of lot_size '0.01'"),
    (market(brackets='[]'), "markets[1].brackets", "non-empty list"),
    (market(liquidation_fee='"1"'), "markets[1].liquidation_fee", "must be in [0, 1)"),
    (market(funding_interval_s="0"), "markets[1].funding_interval_s", "must be in [1,"),
    (market(funding_cap='"0.0000000001"'), "markets[1].funding_cap", "1e-9"),
    (market(interest_rate='"x"'), "markets[1].interest_rate", "not a plain decimal"),
    (market(tick='"0.01"'), "markets[1].tick", "unknown key (did you mean 'tick_size'?)"),
    (market(symbol=None), "markets[1].symbol", "is required"),
    (market(symbol='"BTC-PERP"'), "markets[1].symbol", "already markets[0]"),
    (market(symbol='"has space"'), "markets[1].symbol", "must be 1-32 letters"),
    (market(max_price='"3000"'), "markets[1].max_price", "below initial_price"),
    (market(max_price='"35000.001"'), "markets[1].max_price", "not a multiple of tick_size"),
    (market(max_position_qty='"100000000"'), "markets[1].max_position_qty",
     "exceeds the int64 headroom at max_price 35000: at most 514697.1"),
    (market(max_position_qty='"100"', max_order_qty='"200"'), "markets[1].max_order_qty",
     "exceeds max_position_qty '100'"),
    (market(max_order_qty='"0.005"'), "markets[1].max_order_qty", "not a multiple of lot_size"),
    (market(max_open_orders="0"), "markets[1].max_open_orders", "must be in [1, 1000000]"),
    ("[exchange]\ngateways = 0\n" + GOOD_MARKET, "exchange.gateways", "must be in [1, 64]"),
    ('[exchange]\nack_mode = "slow"\n' + GOOD_MARKET, "exchange.ack_mode",
     "must be one of durable, fast"),
    ('[exchange]\npin_cpus = "yes"\n' + GOOD_MARKET, "exchange.pin_cpus", "true or false"),
    ("[exchange]\ncpu_latency_us = -2\n" + GOOD_MARKET, "exchange.cpu_latency_us",
     "must be in [-1, 2147483647]"),
    ("[exchange]\ncpu_latency_us = true\n" + GOOD_MARKET, "exchange.cpu_latency_us",
     "must be an integer"),
    ('[exchange]\nhuge_pages = "yes"\n' + GOOD_MARKET, "exchange.huge_pages", "true or false"),
    ("[exchange]\ngatways = 2\n" + GOOD_MARKET, "exchange.gatways", "did you mean 'gateways'"),
    ("[engine]\nmax_markets = 100\n" + GOOD_MARKET, "engine.max_markets", "must be in [1, 64]"),
    ("[engine]\ncommand_ring_capacity = 1000\n" + GOOD_MARKET, "engine.command_ring_capacity",
     "power of two"),
    ("[engine]\nmax_markets = 1\n" + market(), "markets", "2 markets but engine.max_markets is 1"),
    ("[engine]\nmax_levels_per_side = 4096\n" + GOOD_MARKET, "engine.max_levels_per_side",
     "4096 is below the 65536 price levels a book side of markets[0] (BTC-PERP) can come to hold"),
    ("[endpoints]\norders_port = 70000\n" + GOOD_MARKET, "endpoints.orders_port",
     "must be in [0, 65535]"),
    ("[exchange]\ngateways = 3\n[endpoints]\norders_port = 7700\nmarket_data_port = 7702\n"
     + GOOD_MARKET, "endpoints.market_data_port", "collides with the gateways' order ports"),
    ("[exchange]\ngateways = 1\n", "markets", "no [[markets]] defined"),
    ("[risks]\nx = 1\n" + GOOD_MARKET, "risks", "unknown key (did you mean 'risk'?)"),
    ("[risk]\nmark_interval = 1\n" + GOOD_MARKET, "risk.mark_interval",
     "did you mean 'mark_interval_ms'"),
    ("[risk]\nmark_interval_ms = 5\n" + GOOD_MARKET, "risk.mark_interval_ms",
     "must be in [10, 60000]"),
    ("[risk]\nfunding_sample_ms = 0\n" + GOOD_MARKET, "risk.funding_sample_ms", "must be in"),
    ("[risk]\nliquidation_retry_ms = 1.5\n" + GOOD_MARKET, "risk.liquidation_retry_ms",
     "must be an integer"),
    ("[risk]\nseed = -1\n" + GOOD_MARKET, "risk.seed", "must be in [0,"),
    ('[risk]\nscan = "no"\n' + GOOD_MARKET, "risk.scan", "true or false"),
]


@pytest.mark.parametrize("text,key,phrase", BAD, ids=[f"{k}:{p[:24]}" for _, k, p in BAD])
def test_bad_key_gives_a_clear_error_naming_it(text, key, phrase):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    message = str(err.value)
    assert message.startswith(key + ": "), message
    assert phrase in message, message
    assert "\n" not in message


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[[markets]\nsymbol=")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_usdc_amounts_are_exact():
    assert usdc_to_atoms("1000") == 1_000_000_000
    assert usdc_to_atoms("0.000001") == 1
    assert usdc_to_atoms("250.5") == 250_500_000
    for bad, phrase in (("0.0000001", "more than 6 decimals"), ("-1", "must be positive"),
                        ("0", "must be positive"), ("1e3", "not a plain decimal"),
                        ("abc", "not a plain decimal")):
        with pytest.raises(ValueError, match=phrase):
            usdc_to_atoms(bad)


def test_cpu_plan():
    # one CPU: everything shares it, and the matcher does not spin
    one = plan_cpus([0], 1)
    assert one == {"matcher": [0], "gateway-0": [0], "other": [0]}
    assert not matcher_spins(one)
    # this box: the order path (matcher, gateways) on CPU 0, the rest on CPU 1
    two = plan_cpus([0, 1], 1)
    assert two == {"matcher": [0], "gateway-0": [0], "other": [1]}
    assert not matcher_spins(two)
    assert plan_cpus([0, 1], 2) == {"matcher": [0], "gateway-0": [0], "gateway-1": [0],
                                    "other": [1]}
    # enough CPUs: a CPU each, the rest shared; the matcher spins on its own CPU
    five = plan_cpus([0, 1, 2, 3, 4], 2)
    assert five == {"matcher": [0], "gateway-0": [1], "gateway-1": [2], "other": [3, 4]}
    assert matcher_spins(five)
    assert plan_cpus([0, 1, 2], 2) == {"matcher": [0, 1], "gateway-0": [0, 1],
                                       "gateway-1": [0, 1], "other": [2]}
    # not pinned: the matcher may share a CPU with a gateway
    assert not matcher_spins({})


def test_shm_prefix_is_stable_per_state_dir(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert shm_prefix_for(a) == shm_prefix_for(str(a) + "/") == shm_prefix_for(a / "x" / "..")
    assert shm_prefix_for(a) != shm_prefix_for(b)
    assert shm_prefix_for(a).startswith("/perpx-") and len(shm_prefix_for(a)) == 17
