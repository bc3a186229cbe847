"""The matcher's state: preallocated numpy tables, their layout, and the canonical state hash.

All tables are plain numpy arrays, so they can live in shared memory (pass `alloc`) for other
processes to snapshot. Only the matcher writes them. Everything is an integer; links between
tables are int32 slot indices with -1 for none.
"""

import hashlib
import mmap
from collections import namedtuple

import numpy as np

from engine.config import EngineConfig
from engine.records import MAX_BRACKETS

NONE = -1
UNTRIGGERED = -2                       # ORDER_DTYPE.level of an order waiting in a trigger book

MARKET_DTYPE = np.dtype([
    ("active", "<i8"),
    ("atoms_per_tick_lot", "<i8"),
    ("maker_fee_e9", "<i8"),
    ("taker_fee_e9", "<i8"),
    ("price_band_e9", "<i8"),
    ("max_leverage", "<i8"),
    ("mark_ticks", "<i8"),
    ("max_price_ticks", "<i8"),       # 0 until SET_MARKET_LIMITS: the market does not trade
    ("max_order_lots", "<i8"),
    ("max_position_lots", "<i8"),
    ("max_open_orders", "<i8"),
    ("halted", "<i8"),                 # 1: no order entry, no triggers (state 1, 3 or 4)
    ("last_trade_ticks", "<i8"),
    ("resting_buy", "<i8"),            # resting orders per side (bounds a command's events)
    ("resting_sell", "<i8"),
    ("resting_reduce_only", "<i8"),
    # derived from the mark, recomputed when it changes (saves divisions on every order)
    ("band_dev_ticks", "<i8"),         # floor(mark x price band)
    ("margin_per_lot_atoms", "<i8"),   # ceil(mark x atoms_per_tick_lot / max_leverage)
    # perpetual risk (SET_MARKET_RISK, SET_BRACKET; docs/risk.md)
    ("liquidation_fee_e9", "<i8"),
    ("funding_cap_e9", "<i8"),
    ("n_brackets", "<i8"),             # maintenance brackets set so far, in index order
    ("bracket_floor_atoms", "<i8", (MAX_BRACKETS,)),
    ("bracket_rate_e9", "<i8", (MAX_BRACKETS,)),
    ("bracket_amount_atoms", "<i8", (MAX_BRACKETS,)),  # derived: Binance's cumulative amount
    ("untriggered", "<i8"),            # orders in the market's trigger book
    ("bracket_max_leverage", "<i8", (MAX_BRACKETS,)),  # initial rate 1/L of each bracket
    # derived: the floor of the first bracket whose max leverage is below the market's (2**62
    # when none), so margin checks below it skip the bracket lookup
    ("full_leverage_below_atoms", "<i8"),
    # filters (SET_MARKET_FILTERS; 0: none) and the open interest (sum of long positions)
    ("min_notional_atoms", "<i8"),
    ("max_stop_orders", "<i8"),        # untriggered orders per account
    ("open_interest_cap_lots", "<i8"),
    ("open_interest_lots", "<i8"),
    ("state", "<i8"),                  # MARKET_TRADING .. MARKET_SETTLED (engine/records.py)
])

# One net position per (account, market), with the open-order totals its margin needs.
POSITION_DTYPE = np.dtype([
    ("size_lots", "<i8"),
    ("cost_atoms", "<i8"),             # signed entry notional of the open position
    ("open_buy_lots", "<i8"),
    ("open_sell_lots", "<i8"),
    ("open_orders", "<i8"),
    ("reduce_only_orders", "<i8"),
    ("isolated_margin_atoms", "<i8"),  # collateral posted to an isolated position
    ("leverage", "<i4"),               # 0: the market's max_leverage
    ("margin_mode", "<i4"),            # MARGIN_CROSS / MARGIN_ISOLATED
])
assert POSITION_DTYPE.itemsize == 64

ACCOUNT_DTYPE = np.dtype([
    ("balance_atoms", "<i8"),
    ("open_orders", "<i8"),
    ("first_order", "<i4"),            # the account's resting orders, in placement order
    ("last_order", "<i4"),
    ("touched_seq", "<i8"),            # scratch: last command that changed its position
    ("fok_traded_lots", "<i8"),        # scratch: a FOK check's running total per maker
    # seq of the last command that changed its balance, a position, an isolated margin or its
    # margin settings: riskd's incremental scanner re-checks only accounts that moved
    ("changed_seq", "<i8"),
    # the last `account_seq` given to a report to this account (engine/reports.py): 0 = none
    ("account_seq", "<i8"),
    ("disabled", "u1"),                # 1: CMD_SET_ACCOUNT_STATE disabled it (operator)
    ("_pad", "u1", (7,)),             # one cache line per account: a fill touches one line
])
assert ACCOUNT_DTYPE.itemsize == 64

ORDER_DTYPE = np.dtype([
    ("oid", "<i8"),
    ("cid", "<i8"),
    ("price_ticks", "<i8"),
    ("remaining_lots", "<i8"),
    ("account", "<i4"),
    ("level", "<i4"),                  # NONE: not resting; UNTRIGGERED: in a trigger book
    ("prev", "<i4"),                   # FIFO within the price level
    ("next", "<i4"),                   # ... also the free-list link of an unused slot
    ("account_prev", "<i4"),
    ("account_next", "<i4"),
    ("market", "<i2"),
    ("side", "u1"),
    ("kind", "u1"),
    ("tif", "u1"),
    ("flags", "u1"),
    ("stp", "u1"),
    ("_pad", "u1"),
])
assert ORDER_DTYPE.itemsize == 64

# An open-addressing index entry: (owner, key) -> order slot. The oid index uses owner 0 and
# key = oid; the (account, cid) index owner = account, key = cid. Key and slot share a cache
# line, so a probe costs one miss.
INDEX_DTYPE = np.dtype([
    ("key", "<i8"),
    ("owner", "<i4"),
    ("slot", "<i4"),                   # NONE: empty
])

LEVEL_DTYPE = np.dtype([
    ("price_ticks", "<i8"),
    ("qty_lots", "<i8"),
    ("first", "<i4"),
    ("last", "<i4"),
    ("orders", "<i4"),
    ("next_free", "<i4"),
])

# counters: scalars of the state, by index
C_SEQ = 0
C_NEXT_OID = 1
C_NEXT_TRADE_ID = 2
C_FEES_ATOMS = 3
C_NET_DEPOSITS_ATOMS = 4         # deposits minus withdrawals
C_INSURANCE_ATOMS = 5            # the insurance fund
C_ORDERS_USED = 6
C_FREE_ORDER = 7
C_FREE_LEVEL = 8
C_UNRESTS = 9                    # orders taken off the book so far (index_deletes' cursor)
C_FREE_BLOCKS = 10               # book blocks on the free stack (book_free[:n])
C_MAX_LEVELS = 11                # EngineConfig.max_levels_per_side: levels a book side may hold
C_COUNT = 16

# The tables, in the order the state hash reads them. A book side's levels are sorted by key
# (price for bids, -price for asks, so "best" is always the largest key) in blocks of
# book_block_size() levels: `book_dir[m, side, :book_nblocks[m, side]]` lists its blocks in key
# order (the best block last, always block 2 m + side; the rest of the row holds nothing);
# block b holds
# `book_counts[b]` keys in `book_keys[b]`, ascending, and their level slots in `book_levels[b]`.
# Blocks come from one pool (`book_free[:counters[C_FREE_BLOCKS]]` is its free stack); no two
# neighbouring blocks of a side hold B/2 levels or fewer together (they are merged), which
# bounds the blocks a side of L levels uses at 4 L / B + 1. `book_depth` counts the levels.
# `index_deletes` holds (oid, account, cid) of the last DEFERRED_DELETES orders taken off the
# book, whose index entries are deleted only when the queue comes round (engine/core.py).
# The trigger book: `trigger_ticks[slot]` is the trigger price of the untriggered order in that
# order slot; `trigger_keys[m, queue, k]` / `trigger_slots` / `trigger_depth` hold, per market,
# four queues (TRIGGER_QUEUES) of untriggered orders sorted so the next to fire is last.
State = namedtuple("State", [
    "counters", "markets", "positions", "accounts", "orders", "levels",
    "book_keys", "book_levels", "book_counts", "book_dir", "book_nblocks", "book_depth",
    "book_free",
    "cid_index", "oid_index", "index_deletes",
    "trigger_ticks", "trigger_keys", "trigger_slots", "trigger_depth",
    "touched",
])

# A trigger queue: 2 x (by last price) + (fires on a fall). Buy stops and sell take-profits
# fire when the price rises to their trigger, sell stops and buy take-profits when it falls.
TRIGGER_QUEUES = 4

DEFERRED_DELETES = 16            # a power of two

# Scratch tables are deterministic too, but carry no meaning between commands.
_SCRATCH = ("touched",)


def book_block_size(max_levels_per_side: int) -> int:
    """Levels per block of a book side: the largest power of two at most 2 x sqrt(max levels),
    at least 4. A new or removed level shifts one block and, when a block splits, merges or
    empties, the side's directory of about 4 L / B blocks: ~2 sqrt(L) + 4 sqrt(L) entries at most
    where one sorted array shifted L (docs/tuning.md, "Deep book sides")."""
    block = 4
    while block * block <= max_levels_per_side:
        block *= 2
    return block


def book_blocks(cfg: EngineConfig) -> tuple[int, int]:
    """(blocks in the pool, directory entries per side). A side of L levels uses fewer than
    4 L / B + 1 blocks (and one more while a block splits); all sides together hold at most
    min(max_orders, 2 x markets x max_levels_per_side) levels (a level holds a resting order)."""
    block = book_block_size(cfg.max_levels_per_side)
    total = min(cfg.max_orders, 2 * cfg.max_markets * cfg.max_levels_per_side)
    return (4 * total // block + 2 * cfg.max_markets + 4,
            4 * cfg.max_levels_per_side // block + 3)


def _table_shapes(cfg: EngineConfig):
    # load <= 1/2, and room for the stale entries of deferred deletes even when tiny
    index_size = 1 << max(6, (2 * cfg.max_orders - 1).bit_length())
    assert index_size > cfg.max_orders + DEFERRED_DELETES
    # a level holds at least one resting order, so there are never more than the pool's orders
    # (an amend takes its order off the book before it rests again)
    n_levels = min(cfg.max_markets * 2 * cfg.max_levels_per_side, cfg.max_orders)
    block = book_block_size(cfg.max_levels_per_side)
    pool, per_side = book_blocks(cfg)
    return {
        "counters": ((C_COUNT,), np.int64),
        "markets": ((cfg.max_markets,), MARKET_DTYPE),
        "positions": ((cfg.max_accounts, cfg.max_markets), POSITION_DTYPE),
        "accounts": ((cfg.max_accounts,), ACCOUNT_DTYPE),
        # one extra slot: the taker scratch order, so IOC orders need no free slot
        "orders": ((cfg.max_orders + 1,), ORDER_DTYPE),
        "levels": ((n_levels,), LEVEL_DTYPE),
        "book_keys": ((pool, block), np.int64),
        "book_levels": ((pool, block), np.int32),
        "book_counts": ((pool,), np.int64),
        "book_dir": ((cfg.max_markets, 2, per_side), np.int32),
        "book_nblocks": ((cfg.max_markets, 2), np.int64),
        "book_depth": ((cfg.max_markets, 2), np.int64),
        "book_free": ((pool,), np.int32),
        "cid_index": ((index_size,), INDEX_DTYPE),
        "oid_index": ((index_size,), INDEX_DTYPE),
        "index_deletes": ((DEFERRED_DELETES, 3), np.int64),
        "trigger_ticks": ((cfg.max_orders + 1,), np.int64),
        "trigger_keys": ((cfg.max_markets, TRIGGER_QUEUES, cfg.max_trigger_orders), np.int64),
        "trigger_slots": ((cfg.max_markets, TRIGGER_QUEUES, cfg.max_trigger_orders), np.int32),
        "trigger_depth": ((cfg.max_markets, TRIGGER_QUEUES), np.int64),
        # the accounts a command's trades touched (at most one per order, plus the taker's),
        # then a FOK check's makers (at most one per resting order)
        "touched": ((2 * cfg.max_orders + 4,), np.int32),
    }


def table_layout(cfg: EngineConfig) -> list[tuple[str, int, tuple, np.dtype]]:
    """(name, byte offset, shape, dtype) of each table in one buffer, cache-line aligned."""
    layout = []
    offset = 0
    for name, (shape, dtype) in _table_shapes(cfg).items():
        dtype = np.dtype(dtype)
        layout.append((name, offset, shape, dtype))
        offset += -(-int(np.prod(shape)) * dtype.itemsize // 64) * 64
    return layout


def state_nbytes(cfg: EngineConfig) -> int:
    name, offset, shape, dtype = table_layout(cfg)[-1]
    return offset + int(np.prod(shape)) * dtype.itemsize


def layout_version(cfg: EngineConfig) -> int:
    """Changes whenever a table's shape or record layout does: readers of another build fail."""
    descr = repr([(n, o, s, d.descr) for n, o, s, d in table_layout(cfg)]).encode()
    return int.from_bytes(hashlib.blake2b(descr, digest_size=7).digest(), "little")


def state_in_buffer(cfg: EngineConfig, buffer: np.ndarray, fresh: bool) -> State:
    """The state tables as views of one uint8 buffer (e.g. a shared-memory region's payload).

    fresh=True initialises them; fresh=False reads what is there (another process's state).
    """
    views = {name: buffer[offset:offset + int(np.prod(shape)) * dtype.itemsize]
             .view(dtype).reshape(shape)
             for name, offset, shape, dtype in table_layout(cfg)}
    if fresh:
        return allocate_state(cfg, lambda name, shape, dtype: views[name])
    return State(**views)


HUGE_PAGE = 2 << 20


def _huge_page_buffer(nbytes: int) -> np.ndarray:
    """Zeroed private memory starting on a 2 MiB boundary, advised for transparent huge pages.

    The matcher reads its tables (~15 MB by default) at random: with 4 KiB pages most of those
    reads also missed the TLB (a page walk each); 2 MiB pages cover all of them.
    """
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(mapping, np.uint8)      # keeps the mapping alive
    start = -raw.ctypes.data % HUGE_PAGE
    return raw[start:start + nbytes]


def allocate_state(cfg: EngineConfig, alloc=None) -> State:
    """Fresh, empty state. `alloc(name, shape, dtype)` may place tables in shared memory;
    by default they share one buffer of huge pages."""
    if alloc is None:
        return state_in_buffer(cfg, _huge_page_buffer(state_nbytes(cfg)), fresh=True)
    tables = {name: alloc(name, shape, dtype) for name, (shape, dtype) in _table_shapes(cfg).items()}
    for arr in tables.values():
        arr[...] = 0
    st = State(**tables)
    st.counters[C_NEXT_OID] = 1
    st.counters[C_NEXT_TRADE_ID] = 1
    n_orders = cfg.max_orders
    st.orders["next"][:n_orders] = np.arange(1, n_orders + 1, dtype=np.int32)
    st.orders["next"][n_orders - 1] = NONE
    st.orders["level"][:] = NONE
    st.counters[C_FREE_ORDER] = 0
    n_levels = len(st.levels)
    st.levels["next_free"][:] = np.arange(1, n_levels + 1, dtype=np.int32)
    st.levels["next_free"][n_levels - 1] = NONE
    st.counters[C_FREE_LEVEL] = 0
    # block 2 m + side is the top block of that side for good: an empty side holds just it
    n_tops = 2 * cfg.max_markets
    st.book_dir[:, :, 0] = np.arange(n_tops, dtype=np.int32).reshape(cfg.max_markets, 2)
    st.book_nblocks[:] = 1
    st.book_free[:len(st.book_free) - n_tops] = np.arange(len(st.book_free) - 1, n_tops - 1, -1,
                                                          dtype=np.int32)
    st.counters[C_FREE_BLOCKS] = len(st.book_free) - n_tops
    st.counters[C_MAX_LEVELS] = cfg.max_levels_per_side
    st.accounts["first_order"][:] = NONE
    st.accounts["last_order"][:] = NONE
    st.cid_index["slot"] = NONE
    st.oid_index["slot"] = NONE
    return st


# The descriptor the compiled matcher reads (engine/views.py): the event ring (address, slots,
# words per slot) and the batch's cursor words first, in their own 128 bytes; then for each
# State table, in field order, 4 words (address, up to three dimensions). The cursor words are
# written all through a batch: behind the table words (where they were) their place moved with
# the number of tables, and with 4 more tables the plain `perpx bench matcher` ran ~20% slower
# (docs/tuning.md); here the tables can change without moving them.
D_TABLE_WORDS = 4
D_RING = 0
D_MASK = D_RING + 4          # event ring slots - 1
D_WRITE = D_RING + 5         # next event ring position to write
D_SEQ = D_RING + 6           # sequence number of the command being processed
D_SOURCE = D_RING + 7        # ring the batch came from
D_NEED = D_RING + 8          # set when a batch stops early: free slots the next command needs
D_TABLES = 16
D_COUNT = D_TABLES + len(State._fields) * D_TABLE_WORDS


def table_word(name: str) -> int:
    return D_TABLES + State._fields.index(name) * D_TABLE_WORDS


def descriptor(st: State) -> np.ndarray:
    """The int64 descriptor of these tables; the caller keeps `st` alive while it is used."""
    raw = np.zeros(D_COUNT + 8, np.int64)
    start = (-raw.ctypes.data % 64) // 8        # on a cache line boundary
    desc = raw[start:start + D_COUNT]
    for name in State._fields:
        arr = getattr(st, name)
        if not arr.flags.c_contiguous:
            raise ValueError(f"table {name} must be C-contiguous")
        w = table_word(name)
        desc[w] = arr.ctypes.data
        desc[w + 1:w + 1 + arr.ndim] = arr.shape
    return desc


def state_hash(st: State) -> str:
    """blake2b over the canonical state tables (scratch excluded)."""
    h = hashlib.blake2b(digest_size=32)
    for name in State._fields:
        if name in _SCRATCH:
            continue
        arr = getattr(st, name)
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr).view(np.uint8).tobytes())
    return h.hexdigest()
