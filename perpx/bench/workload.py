"""The standard matcher workload: a seeded, deterministic command stream for benchmarks.

Setup (processed before any timing, privileged, as the ops ring would send it):
  - market 0, BTC-like: tick 0.1 USD, lot 0.001 BTC (atoms_per_tick_lot = 100), mark 650000
    ticks (65000 USD); market 1, ETH-like: tick 0.01 USD, lot 0.01 ETH (atoms_per_tick_lot =
    100), mark 350000 ticks (3500 USD). Both: maker fee 0.02%, taker fee 0.05%, price band
    10%, max leverage 50, max price 2x the mark, max order 100000 lots, max position 10M lots,
    1000 open orders per account and market.
  - accounts 1..1000, each funded with one deposit of 1,000,000 USDC.

Workload (N commands, each drawn independently with these probabilities):
  | share | command |
  | 52.0% | passive new limit order: Geometric(1/4) ticks behind the mid (>= 1, mean 4,
  |       | capped at 200), qty Geometric(1/4) lots (>= 1, mean 4); 90% GTC, 10% post-only;
  |       | 80% of them from the 100 "market maker" accounts 1..100, the rest from any |
  |  8.0% | crossing limit order: 1..5 ticks through the mid, qty Geometric(1/(8 f)) lots;
  |       | half GTC (the rest rests), half IOC |
  | 25.0% | cancel of an order known to be resting: 70% by oid, 30% by cid |
  |  7.0% | amend of a resting order: 60% quantity down (keeps priority), 40% re-price on its
  |       | own side of the mid (loses priority) |
  |  5.0% | market order, qty Geometric(1/(8 f)) lots |
  |  2.0% | deposit of 1000 USDC |
  |  0.8% | withdrawal of 100 USDC |
  |  0.2% | cancel-all of a market maker in one market |
f is the depth controller's factor: before each chunk it is multiplied by
exp(0.05 (resting - 4000) / 4000) (clamped to [0.05, 20]), so the aggressive flow grows when
the book is deeper than ~4000 resting orders and shrinks when it is thinner. Without it the book
either drains (aggressors larger than the passive flow net of cancels) or grows without bound.
60% of orders go to market 0, 40% to market 1; sides are even; the mid is each market's mark
and stays put (the mark never moves in this workload). Orders carry unique cids (a global
counter), `req` = the command's index, `ts_ns` 1 µs apart.

Cancels and amends must name orders that are really resting, or the matcher would mostly
reject them. The generator therefore builds the stream in chunks (default 1024 commands) and
runs each chunk through the compiled matcher as it goes, tracking the live orders from the
events (acks, trades, cancels, amendments — the public event contract in engine/records.py,
not the matcher's private tables). Cancel and amend targets of a chunk are sampled, without
replacement, from the orders resting at the start of the chunk; a few of them trade away
inside the chunk before their cancel arrives, which is the realistic source of
`unknown_order` rejects. When fewer orders rest than a chunk wants to cancel/amend (the start),
the surplus slots become passive new orders instead. Each chunk is drawn with numpy in one go,
so generation costs about one matcher pass plus a little numpy per chunk.

The risk-on variant (`generate(..., risk=True)`, `perpx bench matcher --risk`) is the same
stream with perpetual risk switched on and exercised:
  - setup adds per market a liquidation fee (0.5%), a funding cap (0.75%) and three
    maintenance brackets (0.4% from 0, 0.5% from 50k USDC, 1% from 250k USDC); accounts
    801..900 trade cross at leverage 10 and 901..1000 isolated at leverage 20 in both markets;
    20 "punter" accounts 1001..1020 (half cross, half isolated, leverage 50) start with
    200 USDC.
  - every 32nd command is a SET_MARK, alternating markets: the mark swings around the mid as
    a sine of amplitude 3% and period 100,000 commands (orders keep pricing off the mid);
  - every 10,000th command (offset 16) is a FUNDING of +-0.01%, alternating markets and sign;
  - 0.5% of the draws are punter market orders sized at 30x the punter's balance (as of the
    chunk's start), which the swinging mark then pushes under: at each chunk's start the
    generator asks engine.risk.liquidation_targets about every punter and sends a LIQUIDATE
    for each target (what riskd would), and re-funds (200 USDC) punters left with less than
    half of that and no position. These front-of-chunk commands replace the chunk's first
    draws (after its mark).

The stream depends only on the seed, the sizes and the matcher's rules: the same engine gives
the same stream, and `Workload.stats` records what the generating pass saw (reject rate and
reasons, trades, resting orders at the end, the state hash after the whole stream).
"""

from dataclasses import dataclass, field

import numpy as np

from engine.config import EngineConfig
from engine.risk import liquidation_targets
from engine.matcher import Matcher, drain, event_sink
from engine.records import (CMD_AMEND, CMD_CANCEL, CMD_CANCEL_ALL, CMD_DEPOSIT, CMD_FUNDING,
                            CMD_LIQUIDATE, CMD_NEW_ORDER, CMD_SET_MARK, CMD_WITHDRAW, EV_ACK,
                            EV_AMENDED, EV_CANCELED, EV_LIQUIDATION, EV_REJECT, EV_TRADE,
                            EVENT_DTYPE, KIND_MARKET, MARGIN_CROSS, MARGIN_ISOLATED,
                            ORDER_EVENT_DTYPE, REASON_NAMES, SIDE_BUY, STATUS_OPEN, TIF_GTC,
                            TIF_IOC, TIF_POST_ONLY, TRADE_EVENT_DTYPE, bracket_command,
                            market_create_command, market_limits_command, market_risk_command,
                            new_commands, set_margin_command)

USDC = 1_000_000               # atoms per USDC
TS_BASE_NS = 1_700_000_000_000_000_000
TS_STEP_NS = 1_000

# (symbol, tick, lot, atoms_per_tick_lot, mark_ticks)
MARKETS = (
    ("BTC-PERP", "0.1", "0.001", 100, 650_000),
    ("ETH-PERP", "0.01", "0.01", 100, 350_000),
)
MARKET_WEIGHTS = (0.6, 0.4)
MAKER_FEE_E9 = 200_000          # 0.02%
TAKER_FEE_E9 = 500_000          # 0.05%
PRICE_BAND_E9 = 100_000_000     # 10%
MAX_LEVERAGE = 50
MAX_ORDER_LOTS = 100_000
MAX_POSITION_LOTS = 10_000_000
MAX_OPEN_ORDERS = 1_000

N_ACCOUNTS = 1_000
FIRST_ACCOUNT = 1               # accounts 1..1000; 0 is left to the house
N_MAKERS = 100                  # accounts 1..100 are the market makers
INITIAL_DEPOSIT = 1_000_000 * USDC

# workload mix, in draw order
K_PASSIVE, K_CROSS, K_CANCEL, K_AMEND, K_MARKET, K_DEPOSIT, K_WITHDRAW, K_CANCEL_ALL = range(8)
# the risk-on variant's commands, put in place of draws
K_PUNTER, K_MARK, K_FUNDING, K_LIQUIDATE, K_REFILL = range(8, 13)
RISK_MIX = ("punter_market", "mark", "funding", "liquidate", "punter_deposit")
MIX = (
    ("passive_limit", 0.520),
    ("crossing_limit", 0.080),
    ("cancel", 0.250),
    ("amend", 0.070),
    ("market", 0.050),
    ("deposit", 0.020),
    ("withdraw", 0.008),
    ("cancel_all", 0.002),
)
assert abs(sum(p for _, p in MIX) - 1.0) < 1e-12

PASSIVE_OFFSET_P = 0.25         # ticks behind the mid: Geometric(p) >= 1, capped
MAX_PASSIVE_OFFSET = 200
PASSIVE_QTY_P = 0.25
CROSS_MAX_TICKS = 5
CROSS_QTY_MEAN = 8.0            # lots, before the depth controller's factor
MARKET_QTY_MEAN = 8.0
TARGET_RESTING = 4_000          # the depth controller holds the book near this many orders
CONTROL_GAIN = 0.05
CONTROL_RANGE = (0.05, 20.0)
POST_ONLY_SHARE = 0.10
MAKER_SHARE = 0.80
CANCEL_BY_CID_SHARE = 0.30
AMEND_QTY_SHARE = 0.60
DEPOSIT_AMOUNT = 1_000 * USDC
WITHDRAW_AMOUNT = 100 * USDC

# the risk-on variant (module docstring)
LIQUIDATION_FEE_E9 = 5_000_000          # 0.5%
FUNDING_CAP_E9 = 7_500_000              # 0.75%
BRACKETS = ((0, 4_000_000), (50_000 * USDC, 5_000_000), (250_000 * USDC, 10_000_000))
CROSS_LEVERAGED = (801, 901, 10)        # accounts [first, end) and their leverage
ISOLATED_LEVERAGED = (901, 1001, 20)
FIRST_PUNTER = 1001
N_PUNTERS = 20
PUNTER_LEVERAGE = 50
PUNTER_DEPOSIT = 200 * USDC
PUNTER_GEARING = 30                     # a punter order's notional / its balance
PUNTER_SHARE = 0.005
MARK_EVERY = 32
MARK_SWING = 0.03
MARK_PERIOD = 100_000
FUNDING_EVERY = 10_000
FUNDING_OFFSET = 16
FUNDING_RATE_E9 = 100_000               # 0.01%

DEFAULT_SEED = 20240621
DEFAULT_CHUNK = 1024


def engine_config() -> EngineConfig:
    """Capacities the workload fits in (the engine defaults)."""
    return EngineConfig()


def ring_capacity(config: EngineConfig, at_least: int = 0) -> int:
    """A power of two >= the matcher's worst case for one command (and >= at_least)."""
    need = max(config.event_bound(), at_least, 2)
    return 1 << (need - 1).bit_length()


def setup_commands(risk: bool = False) -> np.ndarray:
    """Create and limit both markets, then fund every account; with `risk`, the markets' risk
    parameters and the accounts' margin settings of the risk-on variant too."""
    parts = []
    for m, (_sym, _tick, _lot, aptl, mark) in enumerate(MARKETS):
        parts.append(market_create_command(
            m, atoms_per_tick_lot=aptl, initial_mark_ticks=mark, maker_fee_e9=MAKER_FEE_E9,
            taker_fee_e9=TAKER_FEE_E9, price_band_e9=PRICE_BAND_E9, max_leverage=MAX_LEVERAGE,
            ts_ns=TS_BASE_NS))
        parts.append(market_limits_command(
            m, max_price_ticks=2 * mark, max_order_lots=MAX_ORDER_LOTS,
            max_position_lots=MAX_POSITION_LOTS, max_open_orders=MAX_OPEN_ORDERS,
            ts_ns=TS_BASE_NS))
    deposits = new_commands(N_ACCOUNTS)
    deposits["cmd"] = CMD_DEPOSIT
    deposits["ts_ns"] = TS_BASE_NS
    deposits["account"] = np.arange(FIRST_ACCOUNT, FIRST_ACCOUNT + N_ACCOUNTS)
    deposits["amount_atoms"] = INITIAL_DEPOSIT
    parts.append(deposits)
    if risk:
        parts.append(_risk_setup())
    out = np.concatenate(parts)
    out["req"] = np.arange(len(out)) - len(out)     # negative: setup, not workload
    return out


def _risk_setup() -> np.ndarray:
    parts = []
    for m in range(len(MARKETS)):
        parts.append(market_risk_command(m, liquidation_fee_e9=LIQUIDATION_FEE_E9,
                                         funding_cap_e9=FUNDING_CAP_E9, ts_ns=TS_BASE_NS))
        for k, (floor_atoms, rate_e9) in enumerate(BRACKETS):
            parts.append(bracket_command(m, k, floor_atoms=floor_atoms,
                                         maintenance_rate_e9=rate_e9, ts_ns=TS_BASE_NS))
    punters = range(FIRST_PUNTER, FIRST_PUNTER + N_PUNTERS)
    settings = [(a, MARGIN_CROSS, CROSS_LEVERAGED[2]) for a in range(*CROSS_LEVERAGED[:2])]
    settings += [(a, MARGIN_ISOLATED, ISOLATED_LEVERAGED[2])
                 for a in range(*ISOLATED_LEVERAGED[:2])]
    settings += [(a, MARGIN_CROSS if a < FIRST_PUNTER + N_PUNTERS // 2 else MARGIN_ISOLATED,
                  PUNTER_LEVERAGE) for a in punters]
    for account, mode, leverage in settings:
        for m in range(len(MARKETS)):
            parts.append(set_margin_command(account, m, mode=mode, leverage=leverage,
                                            ts_ns=TS_BASE_NS))
    deposits = new_commands(N_PUNTERS)
    deposits["cmd"] = CMD_DEPOSIT
    deposits["ts_ns"] = TS_BASE_NS
    deposits["account"] = np.array(punters)
    deposits["amount_atoms"] = PUNTER_DEPOSIT
    parts.append(deposits)
    return np.concatenate(parts)


def _front_of_chunk(matcher: Matcher) -> list[tuple[int, int, int]]:
    """(command, account, market) of the LIQUIDATEs riskd would send now, and the punters'
    refills (market -1 for a deposit)."""
    st = matcher.state
    out = []
    for account in range(FIRST_PUNTER, FIRST_PUNTER + N_PUNTERS):
        out += [(CMD_LIQUIDATE, account, m) for m in liquidation_targets(st, account)]
        if (st.accounts["balance_atoms"][account] < PUNTER_DEPOSIT // 2
                and not st.positions["size_lots"][account].any()):
            out.append((CMD_DEPOSIT, account, 0))
    return out


@dataclass
class Workload:
    setup: np.ndarray          # processed untimed, privileged
    commands: np.ndarray       # the measured stream
    seed: int
    stats: dict = field(default_factory=dict)

    def full(self) -> np.ndarray:
        return np.concatenate([self.setup, self.commands])


class _LiveOrders:
    """Orders resting in the matcher, followed from its events (indexed by oid)."""

    def __init__(self, max_oid: int):
        n = max_oid + 2
        self.live = np.zeros(n, bool)
        self.account = np.zeros(n, np.int32)
        self.cid = np.zeros(n, np.int64)
        self.market = np.zeros(n, np.int16)
        self.side = np.zeros(n, np.uint8)
        self.price = np.zeros(n, np.int64)
        self.remaining = np.zeros(n, np.int64)

    def apply(self, events: np.ndarray):
        """Fold a slice of event slots (in sequence order) into the live set."""
        et = events["etype"]
        oe = events.view(ORDER_EVENT_DTYPE)
        te = events.view(TRADE_EVENT_DTYPE)
        pos = np.arange(len(events), dtype=np.int64) * 2

        ack = np.flatnonzero(et == EV_ACK)
        a = oe[ack]
        self.account[a["oid"]] = a["account"]
        self.cid[a["oid"]] = a["cid"]
        self.market[a["oid"]] = a["market"]
        self.side[a["oid"]] = a["side"]

        amd = np.flatnonzero(et == EV_AMENDED)
        can = np.flatnonzero(et == EV_CANCELED)
        trd = np.flatnonzero(et == EV_TRADE)
        t = te[trd]
        # (oid, live after this event, remaining, new price or -1, order of the event)
        oids = np.concatenate([a["oid"], oe["oid"][amd], oe["oid"][can], t["maker_oid"], t["oid"]])
        live = np.concatenate([a["status"] == STATUS_OPEN, np.ones(len(amd), bool),
                               np.zeros(len(can), bool), t["maker_remaining_lots"] > 0,
                               t["remaining_lots"] > 0])
        rem = np.concatenate([a["remaining_lots"], oe["remaining_lots"][amd],
                              np.zeros(len(can), np.int64), t["maker_remaining_lots"],
                              t["remaining_lots"]])
        price = np.concatenate([a["price_ticks"], oe["price_ticks"][amd],
                                np.full(len(can) + 2 * len(trd), -1, np.int64)])
        order = np.concatenate([pos[ack], pos[amd], pos[can], pos[trd], pos[trd] + 1])
        if len(oids) == 0:
            return
        srt = np.lexsort((order, oids))
        oids_s = oids[srt]
        last = srt[np.r_[oids_s[1:] != oids_s[:-1], True]]   # the last event per oid wins
        o = oids[last]
        self.live[o] = live[last]
        self.remaining[o] = rem[last]
        p = price[last]
        has_price = p >= 0
        self.price[o[has_price]] = p[has_price]


def _risk_kinds(kind, c0, rng, front):
    """Put the risk-on variant's commands in place of a chunk's draws (in `kind`): punter
    orders at random, marks and funding at fixed strides, then `front` (_front_of_chunk) in
    the first free places. Returns front as placed, one entry per K_LIQUIDATE/K_REFILL."""
    k = len(kind)
    g = np.arange(c0, c0 + k)
    kind[rng.random(k) < PUNTER_SHARE] = K_PUNTER
    kind[g % MARK_EVERY == 0] = K_MARK
    kind[g % FUNDING_EVERY == FUNDING_OFFSET] = K_FUNDING
    free = np.flatnonzero((kind != K_MARK) & (kind != K_FUNDING))
    front = front[:len(free)]
    for i, (code, _account, _market) in zip(free, front):
        kind[i] = K_LIQUIDATE if code == CMD_LIQUIDATE else K_REFILL
    return front


def _fill_risk(cmds, kind, c0, front, matcher, next_cid):
    """Write the risk-on commands _risk_kinds placed; returns the next free cid."""
    g = np.arange(c0, c0 + len(cmds))
    mids = np.array([m[4] for m in MARKETS], np.int64)
    lot_atoms = np.array([m[3] * m[4] for m in MARKETS], np.int64)
    m = kind == K_PUNTER
    n = int(np.count_nonzero(m))
    if n:
        account = FIRST_PUNTER + g[m] % N_PUNTERS
        balance = matcher.state.accounts["balance_atoms"][account]
        qty = np.clip(balance * PUNTER_GEARING // lot_atoms[cmds["market"][m]], 1, MAX_ORDER_LOTS)
        cmds["cmd"][m] = CMD_NEW_ORDER
        cmds["kind"][m] = KIND_MARKET
        cmds["tif"][m] = TIF_IOC
        cmds["account"][m] = account
        cmds["side"][m] = (g[m] // N_PUNTERS) % 2
        cmds["qty_lots"][m] = qty
        cmds["cid"][m] = np.arange(next_cid, next_cid + n)
        next_cid += n
    m = kind == K_MARK
    market = (g[m] // MARK_EVERY) % len(MARKETS)
    swing = np.sin(2 * np.pi * g[m] / MARK_PERIOD) * MARK_SWING
    cmds["cmd"][m] = CMD_SET_MARK
    cmds["market"][m] = market
    cmds["account"][m] = 0
    cmds["price_ticks"][m] = mids[market] + np.round(mids[market] * swing).astype(np.int64)
    m = kind == K_FUNDING
    period = g[m] // FUNDING_EVERY
    cmds["cmd"][m] = CMD_FUNDING
    cmds["market"][m] = period % len(MARKETS)
    cmds["account"][m] = 0
    cmds["oid"][m] = np.where(period % 4 < 2, FUNDING_RATE_E9, -FUNDING_RATE_E9)
    placed = np.flatnonzero((kind == K_LIQUIDATE) | (kind == K_REFILL))
    for i, (code, account, market) in zip(placed, front):
        cmds["cmd"][i] = code
        cmds["account"][i] = account
        cmds["market"][i] = market
        cmds["amount_atoms"][i] = PUNTER_DEPOSIT if code == CMD_DEPOSIT else 0
    return next_cid


def _geometric(rng, p, size, cap=None):
    x = rng.geometric(p, size).astype(np.int64)
    return np.minimum(x, cap) if cap is not None else x


def generate(n_commands: int, seed: int = DEFAULT_SEED, chunk: int = DEFAULT_CHUNK,
             config: EngineConfig | None = None, risk: bool = False) -> Workload:
    """The standard workload of n_commands (plus setup), or its risk-on variant; see the
    module docstring."""
    config = config or engine_config()
    rng = np.random.default_rng(seed)
    setup = setup_commands(risk)
    out = new_commands(n_commands)
    mids = np.array([m[4] for m in MARKETS], np.int64)
    cum = np.cumsum([p for _, p in MIX])
    cum[-1] = 1.0

    matcher = Matcher(config)
    capacity = ring_capacity(config, 8 * chunk + 64)
    slots = np.zeros(capacity, EVENT_DTYPE)
    sink = event_sink(slots)
    book = _LiveOrders(n_commands)
    rejects = np.zeros(256, np.int64)
    counts = np.zeros(len(MIX) + len(RISK_MIX), np.int64)
    trades = 0
    events = 0
    liquidations = 0
    next_cid = 1
    max_resting = 0
    factor = 1.0                # aggressor size factor (depth controller)
    factors = []

    def run(cmds):
        nonlocal trades, events, liquidations
        for ev in drain(matcher, cmds, sink):
            book.apply(ev)
            et = ev["etype"]
            rej = ev.view(ORDER_EVENT_DTYPE)["reason"][et == EV_REJECT]
            np.add.at(rejects, rej, 1)
            trades += int(np.count_nonzero(et == EV_TRADE))
            liquidations += int(np.count_nonzero(et == EV_LIQUIDATION))
            events += len(ev)

    run(setup)
    setup_rejects = int(rejects.sum())
    if setup_rejects:
        raise RuntimeError(f"workload setup rejected {setup_rejects} commands")

    for c0 in range(0, n_commands, chunk):
        k = min(chunk, n_commands - c0)
        cmds = out[c0:c0 + k]
        kind = np.searchsorted(cum, rng.random(k), side="right").astype(np.int64)
        if risk:
            front = _risk_kinds(kind, c0, rng, _front_of_chunk(matcher))

        # cancel/amend targets: sampled from the orders resting now, without replacement
        resting = np.flatnonzero(book.live)
        max_resting = max(max_resting, len(resting))
        factor *= float(np.exp(CONTROL_GAIN * (len(resting) - TARGET_RESTING) / TARGET_RESTING))
        factor = min(max(factor, CONTROL_RANGE[0]), CONTROL_RANGE[1])
        factors.append(factor)
        want = np.flatnonzero((kind == K_CANCEL) | (kind == K_AMEND))
        if len(want) > len(resting):
            drop = rng.choice(want, len(want) - len(resting), replace=False)
            kind[drop] = K_PASSIVE
            want = np.flatnonzero((kind == K_CANCEL) | (kind == K_AMEND))
        targets = np.zeros(k, np.int64)
        if len(want):
            targets[want] = rng.choice(resting, len(want), replace=False)
        counts += np.bincount(kind, minlength=len(counts))

        idx = np.arange(c0, c0 + k)
        cmds["ts_ns"] = TS_BASE_NS + (idx + 1) * TS_STEP_NS
        cmds["req"] = idx
        market = (rng.random(k) >= MARKET_WEIGHTS[0]).astype(np.int16)
        side = rng.integers(0, 2, k).astype(np.uint8)
        buy = side == SIDE_BUY
        mid = mids[market]
        any_account = rng.integers(FIRST_ACCOUNT, FIRST_ACCOUNT + N_ACCOUNTS, k)
        maker_account = rng.integers(FIRST_ACCOUNT, FIRST_ACCOUNT + N_MAKERS, k)
        u = rng.random(k)
        u2 = rng.random(k)

        # new orders (passive, crossing, market) share market/side/account draws
        is_new = (kind == K_PASSIVE) | (kind == K_CROSS) | (kind == K_MARKET)
        cmds["cmd"][is_new] = CMD_NEW_ORDER
        cmds["market"] = market
        cmds["side"] = side
        cmds["account"] = np.where((kind == K_PASSIVE) & (u < MAKER_SHARE), maker_account,
                                   any_account)
        n_new = int(np.count_nonzero(is_new))
        cmds["cid"][is_new] = np.arange(next_cid, next_cid + n_new)
        next_cid += n_new

        behind = _geometric(rng, PASSIVE_OFFSET_P, k, MAX_PASSIVE_OFFSET)
        through = rng.integers(1, CROSS_MAX_TICKS + 1, k)
        m = kind == K_PASSIVE
        cmds["price_ticks"][m] = np.where(buy, mid - behind, mid + behind)[m]
        cmds["qty_lots"][m] = _geometric(rng, PASSIVE_QTY_P, k)[m]
        cmds["tif"][m] = np.where(u2 < POST_ONLY_SHARE, TIF_POST_ONLY, TIF_GTC)[m]
        m = kind == K_CROSS
        cmds["price_ticks"][m] = np.where(buy, mid + through, mid - through)[m]
        cmds["qty_lots"][m] = _geometric(rng, min(1.0, 1 / (CROSS_QTY_MEAN * factor)), k,
                                         MAX_ORDER_LOTS)[m]
        cmds["tif"][m] = np.where(u2 < 0.5, TIF_GTC, TIF_IOC)[m]
        m = kind == K_MARKET
        cmds["kind"][m] = KIND_MARKET
        cmds["tif"][m] = TIF_IOC
        cmds["qty_lots"][m] = _geometric(rng, min(1.0, 1 / (MARKET_QTY_MEAN * factor)), k,
                                         MAX_ORDER_LOTS)[m]

        # cancels and amends address the target's owner and market
        m = (kind == K_CANCEL) | (kind == K_AMEND)
        t = targets[m]
        cmds["account"][m] = book.account[t]
        cmds["market"][m] = book.market[t]
        cmds["side"][m] = 0
        by_cid = u2[m] < CANCEL_BY_CID_SHARE
        cmds["oid"][m] = np.where(by_cid, 0, t)
        cmds["cid"][m] = np.where(by_cid, book.cid[t], 0)
        cmds["cmd"][kind == K_CANCEL] = CMD_CANCEL
        m = kind == K_AMEND
        cmds["cmd"][m] = CMD_AMEND
        t = targets[m]
        rem = book.remaining[t]
        qty_down = (u[m] < AMEND_QTY_SHARE) & (rem > 1)
        new_qty = np.maximum(1, (rem * rng.random(len(t))).astype(np.int64))
        new_qty = np.minimum(new_qty, rem - 1)
        t_mid = mids[book.market[t]]
        t_buy = book.side[t] == SIDE_BUY
        new_price = np.where(t_buy, t_mid - behind[m], t_mid + behind[m])
        # a re-price to the same price would be a no-op: move one tick further out
        same = new_price == book.price[t]
        new_price = np.where(same, np.where(t_buy, new_price - 1, new_price + 1), new_price)
        cmds["qty_lots"][m] = np.where(qty_down, new_qty, 0)
        cmds["price_ticks"][m] = np.where(qty_down, 0, new_price)

        m = kind == K_DEPOSIT
        cmds["cmd"][m] = CMD_DEPOSIT
        cmds["amount_atoms"][m] = DEPOSIT_AMOUNT
        cmds["market"][m] = 0
        m = kind == K_WITHDRAW
        cmds["cmd"][m] = CMD_WITHDRAW
        cmds["amount_atoms"][m] = WITHDRAW_AMOUNT
        cmds["market"][m] = 0
        m = kind == K_CANCEL_ALL
        cmds["cmd"][m] = CMD_CANCEL_ALL
        cmds["account"][m] = maker_account[m]
        for name in ("side", "cid"):
            cmds[name][kind >= K_DEPOSIT] = 0
        if risk:
            next_cid = _fill_risk(cmds, kind, c0, front, matcher, next_cid)

        run(cmds)

    n_rej = int(rejects.sum())
    stats = {
        "commands": n_commands,
        "seed": seed,
        "chunk": chunk,
        "mix": {name: int(c) for name, c in zip([n for n, _ in MIX] + list(RISK_MIX), counts)
                if c or name not in RISK_MIX},
        "rejects": n_rej,
        "reject_rate": n_rej / max(n_commands, 1),
        "reject_reasons": {f"{REASON_NAMES.get(r, r)}({r})": int(c)
                           for r, c in enumerate(rejects) if c},
        "trades": trades,
        "liquidations": liquidations,
        "events": events,
        "resting_at_end": int(np.count_nonzero(book.live)),
        "max_resting": max_resting,
        "aggressor_size_factor": {"min": round(min(factors), 3), "max": round(max(factors), 3),
                                  "end": round(factor, 3)} if factors else None,
        "state_hash": matcher.state_hash(),
    }
    return Workload(setup=setup, commands=out, seed=seed, stats=stats)
