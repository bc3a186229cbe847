"""Fixed-size records that cross process boundaries, and the codes inside them.

Commands (64 bytes) are written by producers (gateways, riskd, ops) into command rings.
Events (128 bytes) are written by the matcher into the event ring. Every event starts with
the same 24-byte header; each event family then has its own named layout over the same 128
bytes (numpy views of one buffer), so a reader never guesses what a field means.

Units are in the names: `*_ticks` are prices in the market's tick, `*_lots` quantities in
the market's lot, `*_atoms` collateral in 1e-6 USDC, `*_e9` rates in 1e-9.
"""

import numpy as np

COMMAND_BYTES = 64
EVENT_BYTES = 128

# --- command codes -----------------------------------------------------------------------
CMD_CREATE_MARKET = 1
CMD_SET_MARKET_LIMITS = 2
CMD_DEPOSIT = 3
CMD_WITHDRAW = 4
CMD_SET_MARK = 5
CMD_NEW_ORDER = 6
CMD_CANCEL = 7
CMD_CANCEL_ALL = 8
CMD_AMEND = 9
CMD_HALT = 10
CMD_RESUME = 11
CMD_SET_MARGIN = 12        # a client's margin mode and leverage for one market
CMD_SET_MARKET_RISK = 13   # liquidation fee and funding cap of a market
CMD_SET_BRACKET = 14       # one maintenance bracket of a market
CMD_FUNDING = 15           # settle funding for every open position of a market (riskd)
CMD_LIQUIDATE = 16         # liquidate an account's cross positions or one isolated position (riskd)
CMD_INSURANCE_DEPOSIT = 17 # the operator tops the insurance fund up (amount_atoms)
CMD_SET_MARKET_FILTERS = 18  # min notional, stop orders per account, open-interest cap
CMD_SET_MARKET_STATE = 19  # trading / cancel_only / reduce_only / halted (kind)
CMD_SETTLE_MARKET = 20     # close every position at price_ticks, cancel every order: settled
CMD_SET_ACCOUNT_STATE = 21  # disable (qty_lots 1) or enable (0) an account (operator)

# Commands that only the operator/risk rings may send; from a gateway ring they are `forbidden`.
PRIVILEGED_COMMANDS = (
    CMD_CREATE_MARKET, CMD_SET_MARKET_LIMITS, CMD_DEPOSIT, CMD_SET_MARK, CMD_HALT, CMD_RESUME,
    CMD_SET_MARKET_RISK, CMD_SET_BRACKET, CMD_FUNDING, CMD_LIQUIDATE, CMD_INSURANCE_DEPOSIT,
    CMD_SET_MARKET_FILTERS, CMD_SET_MARKET_STATE, CMD_SETTLE_MARKET, CMD_SET_ACCOUNT_STATE,
)

SIDE_BUY = 0
SIDE_SELL = 1

KIND_LIMIT = 0
KIND_MARKET = 1
# Conditional kinds wait in the trigger book until the trigger price is touched, then enter as
# a market (…_MARKET) or limit (…_LIMIT) order. Stops trigger when the price moves against the
# side's entry (a buy stop when the price rises to the trigger), take-profits the other way.
KIND_STOP_MARKET = 2
KIND_STOP_LIMIT = 3
KIND_TAKE_PROFIT_MARKET = 4
KIND_TAKE_PROFIT_LIMIT = 5

TIF_GTC = 0
TIF_IOC = 1
TIF_FOK = 2
TIF_POST_ONLY = 3

FLAG_REDUCE_ONLY = 1
FLAG_TRIGGER_BY_LAST = 2   # conditional kinds: trigger on the last trade price, else on the mark
# Flags the matcher ignores, carried (and journaled) for whoever renders the command's reports
# (gateway/replay.py renders a replayed report from its command and event records alone):
FLAG_CID_GIVEN = 4         # cancel, amend, cancel_all, withdraw, set_margin: the request had a
                           # `cid`, which the reject or `done` echoes
FLAG_ON_DISCONNECT = 8     # cancel_all: a gateway's cancel-on-disconnect (reason `disconnect`)

MARGIN_CROSS = 0
MARGIN_ISOLATED = 1

# A market's state (MARKET_DTYPE.state): what client orders it takes. HALT / RESUME set
# halted / trading; SET_MARKET_STATE any of the first four; SETTLE_MARKET the last, for good.
MARKET_TRADING = 0
MARKET_CANCEL_ONLY = 1     # cancels only: no new orders or amends, no triggers fire
MARKET_REDUCE_ONLY = 2     # only reduce-only orders (new, amended or fired)
MARKET_HALTED = 3          # as cancel_only (reason market_halted)
MARKET_SETTLED = 4         # positions closed at the settlement price, no orders ever again
MARKET_STATE_NAMES = ("trading", "cancel_only", "reduce_only", "halted", "settled")

MAX_BRACKETS = 8

LIQ_KIND_LIQUIDATED = 0    # closed into the book by the liquidation engine
LIQ_KIND_ADL = 1           # closed against an opposite position by auto-deleveraging
LIQ_KIND_SETTLEMENT = 2    # closed at the settlement price of a settled market

STP_CANCEL_TAKER = 0
STP_CANCEL_MAKER = 1
STP_CANCEL_BOTH = 2

# The command record. For the two market-admin commands the generic int64 fields carry market
# parameters; `market_create_command` / `market_limits_command` below are the only places that
# pack them, and engine code unpacks them under these names:
#   CREATE_MARKET:      price_ticks = initial mark, amount_atoms = atoms_per_tick_lot,
#                       cid = maker_fee_e9, oid = taker_fee_e9, qty_lots = price_band_e9,
#                       account = max_leverage
#   SET_MARKET_LIMITS:  price_ticks = max_price_ticks, qty_lots = max_order_lots,
#                       amount_atoms = max_position_lots, account = max_open_orders
# The risk commands pack theirs the same way (constructors at the end of this module):
#   SET_MARKET_RISK:    cid = liquidation_fee_e9, oid = funding_cap_e9
#   SET_BRACKET:        kind = bracket index, amount_atoms = notional floor in atoms,
#                       price_ticks = maintenance rate e9 (the engine derives the amounts),
#                       qty_lots = the bracket's max leverage (0: the default, config.py)
#   SET_MARGIN:         kind = MARGIN_CROSS / MARGIN_ISOLATED, qty_lots = leverage
#   FUNDING:            oid = funding rate e9 (signed; positive: longs pay shorts)
#   LIQUIDATE:          account; market = -1 for its cross positions, else that isolated one
#   SET_MARKET_FILTERS: amount_atoms = min notional, qty_lots = max untriggered stop orders
#                       per account, price_ticks = open-interest cap in lots (0: none each)
#   SET_MARKET_STATE:   kind = MARKET_TRADING .. MARKET_HALTED
#   SETTLE_MARKET:      price_ticks = the settlement price
#   NEW_ORDER of a conditional kind: amount_atoms = trigger price in ticks,
#                       flags & FLAG_TRIGGER_BY_LAST picks the last trade price over the mark
COMMAND_DTYPE = np.dtype([
    ("ts_ns", "<i8"),          # stamped by the producer on receipt; journaled, so deterministic
    ("cid", "<i8"),            # client order id
    ("oid", "<i8"),            # exchange order id (cancel/amend by oid; 0 = use cid)
    ("price_ticks", "<i8"),
    ("qty_lots", "<i8"),
    ("amount_atoms", "<i8"),   # deposit / withdraw
    ("account", "<i4"),
    ("req", "<i4"),            # producer's request token, echoed on the events it causes
    ("market", "<i2"),         # -1 = all markets (cancel_all)
    ("cmd", "u1"),
    ("side", "u1"),
    ("kind", "u1"),
    ("tif", "u1"),
    ("flags", "u1"),
    ("stp", "u1"),
])
assert COMMAND_DTYPE.itemsize == COMMAND_BYTES

# --- event codes ---------------------------------------------------------------------------
EV_COMMAND = 1     # the sequenced input command itself (what persistd journals)
EV_ACK = 2         # new order accepted; status says where it ended after matching
EV_REJECT = 3
EV_TRADE = 4
EV_CANCELED = 5
EV_AMENDED = 6
EV_DONE = 7        # cancel_all (count), withdraw, deposit, market admin
EV_BALANCE = 8     # deposit / withdraw: delta and the new balance
EV_MARK = 9
EV_TRIGGERED = 10  # a conditional order became live (order layout; the live order's events follow)
EV_FUNDING = 11    # one position's funding payment
EV_LIQUIDATION = 12  # one closing step of a liquidation or an ADL, addressed to each account
EV_INSURANCE = 13  # the insurance fund changed (fee, funding residue, deficit cover)

STATUS_OPEN = 1
STATUS_FILLED = 2
STATUS_CANCELED = 3
STATUS_UNTRIGGERED = 4

# reasons (reject reasons first, in PROTOCOL.md order, then cancel reasons)
REASON_NONE = 0
REASON_INVALID_MESSAGE = 1
REASON_UNKNOWN_MARKET = 2
REASON_INVALID_PRICE = 3
REASON_INVALID_QTY = 4
REASON_INVALID_TICK = 5
REASON_INVALID_LOT = 6
REASON_INSUFFICIENT_MARGIN = 7
REASON_POST_ONLY_WOULD_TAKE = 8
REASON_FOK_UNFILLED = 9
REASON_REDUCE_ONLY_VIOLATION = 10
REASON_PRICE_BAND = 11
REASON_RATE_LIMITED = 12
REASON_MARKET_HALTED = 13
REASON_DUPLICATE_CID = 14
REASON_UNKNOWN_ORDER = 15
REASON_TOO_MANY_ORDERS = 16
REASON_INSUFFICIENT_BALANCE = 17
REASON_FORBIDDEN = 18
REASON_INVALID_MARKET_CONFIG = 19
REASON_MARKET_EXISTS = 20
REASON_UNKNOWN_ACCOUNT = 21
REASON_POSITION_LIMIT = 22
REASON_LEVERAGE = 23           # leverage outside [1, the market's max]
REASON_MARGIN_MODE_LOCKED = 24 # mode change with a position or open orders in the market
REASON_NOT_LIQUIDATABLE = 25   # LIQUIDATE re-checked against the matcher's state: healthy
REASON_FUNDING_CAP = 26        # FUNDING rate beyond the market's cap
REASON_MIN_NOTIONAL = 27       # an order's notional below the market's min_notional
REASON_TOO_MANY_STOP_ORDERS = 28  # the account's untriggered orders in the market at the cap
REASON_OPEN_INTEREST_CAP = 29  # the order would raise open interest above the market's cap
REASON_MARKET_CANCEL_ONLY = 30
REASON_MARKET_REDUCE_ONLY = 31  # the market takes reduce-only orders only
REASON_MARKET_SETTLED = 39      # (after the cancel reasons: 32.. are taken)
# cancel reasons
REASON_USER = 32
REASON_IOC = 33
REASON_STP = 34
REASON_REDUCE_ONLY = 35
REASON_LIQUIDATION = 36
REASON_HALT = 37
REASON_DISCONNECT = 38
REASON_ACCOUNT_DISABLED = 40   # new orders, amends, withdrawals, set_margin of a disabled one

REASON_NAMES = {
    REASON_NONE: "none",
    REASON_INVALID_MESSAGE: "invalid_message",
    REASON_UNKNOWN_MARKET: "unknown_market",
    REASON_INVALID_PRICE: "invalid_price",
    REASON_INVALID_QTY: "invalid_qty",
    REASON_INVALID_TICK: "invalid_tick",
    REASON_INVALID_LOT: "invalid_lot",
    REASON_INSUFFICIENT_MARGIN: "insufficient_margin",
    REASON_POST_ONLY_WOULD_TAKE: "post_only_would_take",
    REASON_FOK_UNFILLED: "fok_unfilled",
    REASON_REDUCE_ONLY_VIOLATION: "reduce_only_violation",
    REASON_PRICE_BAND: "price_band",
    REASON_RATE_LIMITED: "rate_limited",
    REASON_MARKET_HALTED: "market_halted",
    REASON_DUPLICATE_CID: "duplicate_cid",
    REASON_UNKNOWN_ORDER: "unknown_order",
    REASON_TOO_MANY_ORDERS: "too_many_orders",
    REASON_INSUFFICIENT_BALANCE: "insufficient_balance",
    REASON_FORBIDDEN: "forbidden",
    REASON_ACCOUNT_DISABLED: "account_disabled",
    # Protocol-level `invalid_message` variants the gateway never lets through but the matcher
    # still guards against (ops tools and riskd write rings too).
    REASON_INVALID_MARKET_CONFIG: "invalid_message",
    REASON_MARKET_EXISTS: "invalid_message",
    REASON_UNKNOWN_ACCOUNT: "forbidden",
    REASON_POSITION_LIMIT: "insufficient_margin",
    REASON_LEVERAGE: "invalid_message",
    REASON_MARGIN_MODE_LOCKED: "invalid_message",
    REASON_NOT_LIQUIDATABLE: "invalid_message",
    REASON_FUNDING_CAP: "invalid_message",
    REASON_MIN_NOTIONAL: "min_notional",
    REASON_TOO_MANY_STOP_ORDERS: "too_many_stop_orders",
    REASON_OPEN_INTEREST_CAP: "open_interest_cap",
    REASON_MARKET_CANCEL_ONLY: "market_cancel_only",
    REASON_MARKET_REDUCE_ONLY: "market_reduce_only",
    REASON_MARKET_SETTLED: "market_settled",
    REASON_USER: "user",
    REASON_IOC: "ioc",
    REASON_STP: "stp",
    REASON_REDUCE_ONLY: "reduce_only",
    REASON_LIQUIDATION: "liquidation",
    REASON_HALT: "halt",
    REASON_DISCONNECT: "disconnect",
}

# --- event layouts -------------------------------------------------------------------------
_HEADER = [
    ("seq", "<i8"),            # sequence number of the command that caused the event
    ("ts_ns", "<i8"),          # that command's timestamp
    ("etype", "u1"),
    ("source", "u1"),          # ring the command came from
    ("market", "<i2"),
    ("account", "<i4"),        # the account the event is addressed to (taker for trades)
]

# ack, reject, canceled, amended, done
ORDER_EVENT_DTYPE = np.dtype(_HEADER + [
    ("req", "<i4"),
    ("reason", "u1"),
    ("status", "u1"),
    ("side", "u1"),
    ("kind", "u1"),
    ("oid", "<i8"),
    ("cid", "<i8"),
    ("price_ticks", "<i8"),
    ("qty_lots", "<i8"),        # ack: the order's accepted quantity; done: count (cancel_all)
    ("remaining_lots", "<i8"),  # ack/amended: open quantity; canceled: quantity canceled
    ("_pad", "u1", (56,)),
])

TRADE_EVENT_DTYPE = np.dtype(_HEADER + [
    ("req", "<i4"),             # the taker's request token
    ("side", "u1"),             # the taker's side
    ("liquidation", "u1"),      # 1: the taker is the liquidation engine closing `account`
    ("_pad0", "u1", (2,)),
    ("trade_id", "<i8"),
    ("price_ticks", "<i8"),
    ("qty_lots", "<i8"),
    ("oid", "<i8"),             # taker
    ("cid", "<i8"),
    ("remaining_lots", "<i8"),
    ("fee_atoms", "<i8"),
    ("maker_account", "<i4"),
    ("_pad1", "u1", (4,)),
    ("maker_oid", "<i8"),
    ("maker_cid", "<i8"),
    ("maker_remaining_lots", "<i8"),
    ("maker_fee_atoms", "<i8"),  # negative: a rebate
])

BALANCE_EVENT_DTYPE = np.dtype(_HEADER + [
    ("req", "<i4"),
    ("_pad0", "u1", (4,)),
    ("amount_atoms", "<i8"),    # signed change
    ("balance_atoms", "<i8"),   # the balance after it
    ("_pad1", "u1", (80,)),
])

MARK_EVENT_DTYPE = np.dtype(_HEADER + [
    ("req", "<i4"),
    ("_pad0", "u1", (4,)),
    ("mark_ticks", "<i8"),
    ("_pad1", "u1", (88,)),
])

FUNDING_EVENT_DTYPE = np.dtype(_HEADER + [
    ("req", "<i4"),
    ("_pad0", "u1", (4,)),
    ("rate_e9", "<i8"),
    ("size_lots", "<i8"),       # the position it was charged on
    ("mark_ticks", "<i8"),      # the price the position was valued at
    ("payment_atoms", "<i8"),   # signed: negative = paid
    ("balance_atoms", "<i8"),   # the account's balance after it
    ("_pad1", "u1", (56,)),
])

LIQUIDATION_EVENT_DTYPE = np.dtype(_HEADER + [
    ("req", "<i4"),
    ("kind", "u1"),             # LIQ_KIND_LIQUIDATED / LIQ_KIND_ADL
    ("side", "u1"),             # this account's side in the closing trade
    ("_pad0", "u1", (2,)),
    ("qty_lots", "<i8"),
    ("price_ticks", "<i8"),
    ("bankruptcy_ticks", "<i8"),
    ("fee_atoms", "<i8"),       # liquidation fee charged to this account for this step
    ("counterparty", "<i8"),    # the other account (ADL: the deleveraged / the liquidated)
    ("size_lots", "<i8"),       # this account's position after the step
    ("_pad1", "u1", (48,)),
])

INSURANCE_EVENT_DTYPE = np.dtype(_HEADER + [
    ("req", "<i4"),
    ("reason", "u1"),           # INSURANCE_* below
    ("_pad0", "u1", (3,)),
    ("amount_atoms", "<i8"),    # signed change of the fund
    ("fund_atoms", "<i8"),      # the fund after it
    ("_pad1", "u1", (80,)),
])

INSURANCE_LIQUIDATION_FEE = 1
INSURANCE_FUNDING_RESIDUE = 2
INSURANCE_DEFICIT = 3           # the fund paid a liquidated account's realized loss
INSURANCE_DEPOSIT = 4           # the operator topped the fund up (CMD_INSURANCE_DEPOSIT)

# EV_COMMAND: the header, then the 64-byte command record verbatim in the second half.
COMMAND_EVENT_DTYPE = np.dtype(_HEADER + [
    ("_pad0", "u1", (40,)),
    ("command", COMMAND_DTYPE),
])
COMMAND_EVENT_WORD = 8   # the command starts at int64 word 8 of the event

for _dt in (ORDER_EVENT_DTYPE, TRADE_EVENT_DTYPE, BALANCE_EVENT_DTYPE, MARK_EVENT_DTYPE,
            FUNDING_EVENT_DTYPE, LIQUIDATION_EVENT_DTYPE, INSURANCE_EVENT_DTYPE,
            COMMAND_EVENT_DTYPE):
    assert _dt.itemsize == EVENT_BYTES, _dt

# The ring stores raw 128-byte slots; the header view is enough to dispatch on etype.
EVENT_DTYPE = np.dtype(_HEADER + [("_body", "u1", (104,))])
assert EVENT_DTYPE.itemsize == EVENT_BYTES

_LAYOUT_BY_ETYPE = {
    EV_COMMAND: COMMAND_EVENT_DTYPE,
    EV_ACK: ORDER_EVENT_DTYPE,
    EV_REJECT: ORDER_EVENT_DTYPE,
    EV_CANCELED: ORDER_EVENT_DTYPE,
    EV_AMENDED: ORDER_EVENT_DTYPE,
    EV_DONE: ORDER_EVENT_DTYPE,
    EV_TRADE: TRADE_EVENT_DTYPE,
    EV_BALANCE: BALANCE_EVENT_DTYPE,
    EV_MARK: MARK_EVENT_DTYPE,
    EV_TRIGGERED: ORDER_EVENT_DTYPE,
    EV_FUNDING: FUNDING_EVENT_DTYPE,
    EV_LIQUIDATION: LIQUIDATION_EVENT_DTYPE,
    EV_INSURANCE: INSURANCE_EVENT_DTYPE,
}


def layout_of(etype: int) -> np.dtype:
    return _LAYOUT_BY_ETYPE[etype]


def event_to_dict(raw_event) -> dict:
    """One event slot (any 128-byte view) as a dict of its family's named fields."""
    data = np.ascontiguousarray(raw_event).reshape(-1).view(np.uint8)
    dt = _LAYOUT_BY_ETYPE[int(data.view(EVENT_DTYPE)[0]["etype"])]
    rec = data.view(dt)[0]
    out = {}
    for name in dt.names:
        if name.startswith("_"):
            continue
        value = rec[name]
        if name == "command":
            out[name] = {k: int(value[k]) for k in COMMAND_DTYPE.names}
        else:
            out[name] = int(value)
    return out


def new_commands(n: int) -> np.ndarray:
    return np.zeros(n, dtype=COMMAND_DTYPE)


def market_create_command(market: int, *, atoms_per_tick_lot: int, initial_mark_ticks: int,
                          maker_fee_e9: int, taker_fee_e9: int, price_band_e9: int,
                          max_leverage: int, ts_ns: int = 0) -> np.ndarray:
    return _command(CMD_CREATE_MARKET, market, ts_ns, price_ticks=initial_mark_ticks,
                    amount_atoms=atoms_per_tick_lot, cid=maker_fee_e9, oid=taker_fee_e9,
                    qty_lots=price_band_e9, account=max_leverage)


def market_limits_command(market: int, *, max_price_ticks: int, max_order_lots: int,
                          max_position_lots: int, max_open_orders: int,
                          ts_ns: int = 0) -> np.ndarray:
    return _command(CMD_SET_MARKET_LIMITS, market, ts_ns, price_ticks=max_price_ticks,
                    qty_lots=max_order_lots, amount_atoms=max_position_lots,
                    account=max_open_orders)


def _command(code: int, market: int, ts_ns: int, **fields) -> np.ndarray:
    c = new_commands(1)
    c["cmd"] = code
    c["market"] = market
    c["ts_ns"] = ts_ns
    for name, value in fields.items():
        c[name] = value
    return c


def market_risk_command(market: int, *, liquidation_fee_e9: int, funding_cap_e9: int,
                        ts_ns: int = 0) -> np.ndarray:
    return _command(CMD_SET_MARKET_RISK, market, ts_ns, cid=liquidation_fee_e9,
                    oid=funding_cap_e9)


def bracket_command(market: int, index: int, *, floor_atoms: int, maintenance_rate_e9: int,
                    max_leverage: int = 0, ts_ns: int = 0) -> np.ndarray:
    return _command(CMD_SET_BRACKET, market, ts_ns, kind=index, amount_atoms=floor_atoms,
                    price_ticks=maintenance_rate_e9, qty_lots=max_leverage)


def set_margin_command(account: int, market: int, *, mode: int, leverage: int,
                       ts_ns: int = 0, req: int = 0) -> np.ndarray:
    return _command(CMD_SET_MARGIN, market, ts_ns, account=account, kind=mode,
                    qty_lots=leverage, req=req)


def funding_command(market: int, *, rate_e9: int, ts_ns: int = 0) -> np.ndarray:
    return _command(CMD_FUNDING, market, ts_ns, oid=rate_e9)


def liquidate_command(account: int, market: int = -1, *, ts_ns: int = 0) -> np.ndarray:
    return _command(CMD_LIQUIDATE, market, ts_ns, account=account)


def market_filters_command(market: int, *, min_notional_atoms: int, max_stop_orders: int,
                           open_interest_cap_lots: int, ts_ns: int = 0) -> np.ndarray:
    return _command(CMD_SET_MARKET_FILTERS, market, ts_ns, amount_atoms=min_notional_atoms,
                    qty_lots=max_stop_orders, price_ticks=open_interest_cap_lots)


def market_state_command(market: int, state: int, *, ts_ns: int = 0) -> np.ndarray:
    return _command(CMD_SET_MARKET_STATE, market, ts_ns, kind=state)


def settle_market_command(market: int, price_ticks: int, *, ts_ns: int = 0) -> np.ndarray:
    return _command(CMD_SETTLE_MARKET, market, ts_ns, price_ticks=price_ticks)


def insurance_deposit_command(amount_atoms: int, *, ts_ns: int = 0) -> np.ndarray:
    return _command(CMD_INSURANCE_DEPOSIT, -1, ts_ns, amount_atoms=amount_atoms)
