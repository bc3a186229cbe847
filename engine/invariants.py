"""The invariants of DESIGN.md §8 over the compiled matcher's state tables.

Used by tests after every batch and by `perpx check` on a snapshot of live state. Returns a
list of violations (empty when all hold) rather than raising, so an operator sees them all.
Plain Python over the tables: this is a checker, not a hot path.
"""

import numpy as np

from engine.book import level_keys, level_slots, order_slots
from engine.config import RATE_ONE_E9
from engine.records import (FLAG_REDUCE_ONLY, FLAG_TRIGGER_BY_LAST, KIND_STOP_LIMIT,
                            KIND_STOP_MARKET, SIDE_BUY, SIDE_SELL)
from engine.reports import account_seqs_of_events
from engine.state import (C_FEES_ATOMS, C_FREE_BLOCKS, C_INSURANCE_ATOMS, C_NET_DEPOSITS_ATOMS,
                          C_ORDERS_USED, NONE, TRIGGER_QUEUES, UNTRIGGERED, State)


def _walk_level(st: State, market: int, side: int, lvl: int, problems: list):
    """Follow a level's FIFO links; returns its order slots front to back. A cycle shows as a
    back link that disagrees (every order has one predecessor)."""
    lv = st.levels[lvl]
    slots = []
    prev = NONE
    for slot in order_slots(st, lvl):
        o = st.orders[slot]
        if int(o["prev"]) != prev or int(o["level"]) != lvl:
            problems.append(f"market {market}: broken FIFO links at order slot {slot}")
            break
        if int(o["market"]) != market or int(o["side"]) != side:
            problems.append(f"market {market}: order slot {slot} sits in the wrong book")
        if int(o["price_ticks"]) != int(lv["price_ticks"]) or int(o["remaining_lots"]) <= 0:
            problems.append(f"market {market}: order slot {slot} has a bad price or quantity")
        slots.append(slot)
        prev = slot
    if int(lv["last"]) != prev:
        problems.append(f"market {market}: level {lvl} tail link is wrong")
    if len(slots) != int(lv["orders"]):
        problems.append(f"market {market}: level {lvl} counts {int(lv['orders'])} orders, holds {len(slots)}")
    if sum(int(st.orders[s]["remaining_lots"]) for s in slots) != int(lv["qty_lots"]):
        problems.append(f"market {market}: level {lvl} quantity differs from its orders")
    return slots


def _trigger_queue_problems(st: State, market: int, queue: int, open_count, problems) -> int:
    """Check one trigger queue (sorted, each order filed where its kind, side and trigger
    put it); count its orders as open. Returns how many it holds."""
    depth = int(st.trigger_depth[market, queue])
    keys = st.trigger_keys[market, queue, :depth]
    if depth and not np.all(keys[1:] >= keys[:-1]):
        problems.append(f"market {market}: trigger queue {queue} not sorted")
    for k in range(depth):
        slot = int(st.trigger_slots[market, queue, k])
        o = st.orders[slot]
        kind, side, flags = int(o["kind"]), int(o["side"]), int(o["flags"])
        rises = (KIND_STOP_MARKET <= kind <= KIND_STOP_LIMIT) == (side == SIDE_BUY)
        want_queue = (0 if rises else 1) + (2 if flags & FLAG_TRIGGER_BY_LAST else 0)
        trigger = int(st.trigger_ticks[slot])
        if (int(o["level"]) != UNTRIGGERED or int(o["market"]) != market
                or kind < KIND_STOP_MARKET or want_queue != queue
                or int(keys[k]) != (trigger if queue & 1 else -trigger)
                or int(o["remaining_lots"]) <= 0):
            problems.append(f"market {market}: order slot {slot} misfiled in trigger queue {queue}")
        open_count[int(o["account"]), market] += 1
    return depth


def _block_problems(st: State, market: int, side: int) -> list[str]:
    """A side's blocks: in use by no other side, none empty, and no two neighbours holding half
    a block or less together (what bounds the blocks a side uses: engine/state.py)."""
    problems = []
    nb = int(st.book_nblocks[market, side])
    size = st.book_levels.shape[1]
    if not 1 <= nb <= st.book_dir.shape[2]:
        return [f"market {market}: side {side} has {nb} blocks"]
    blocks = [int(b) for b in st.book_dir[market, side, :nb]]
    counts = [int(st.book_counts[b]) for b in blocks]
    if not blocks or blocks[-1] != 2 * market + side:
        return [f"market {market}: side {side}'s top block is not block {2 * market + side}"]
    # only the top block of an empty side is empty
    lowest_top = 0 if nb == 1 else 1
    if any(not 1 <= n <= size for n in counts[:-1]) or not lowest_top <= counts[-1] <= size:
        problems.append(f"market {market}: side {side} has a block holding {counts}")
    if any(2 * (a + b) <= size for a, b in zip(counts, counts[1:])):
        problems.append(f"market {market}: side {side} has neighbouring blocks to merge")
    return problems


def _block_pool_problems(st: State) -> list[str]:
    """Every block of the pool is in exactly one side's directory or on the free stack."""
    free = int(st.counters[C_FREE_BLOCKS])
    used = [int(b) for b in st.book_free[:free]]
    for m in range(len(st.markets)):
        for side in (SIDE_BUY, SIDE_SELL):
            used.extend(int(b) for b in st.book_dir[m, side, :int(st.book_nblocks[m, side])])
    if sorted(used) != list(range(len(st.book_free))):
        return ["book blocks: the free stack and the sides' directories do not share out the pool"]
    return []


def check_state(st: State) -> list[str]:
    problems: list[str] = []
    n_markets = len(st.markets)
    n_accounts = len(st.accounts)
    open_buy = np.zeros((n_accounts, n_markets), np.int64)
    open_sell = np.zeros((n_accounts, n_markets), np.int64)
    open_count = np.zeros((n_accounts, n_markets), np.int64)
    reduce_only = np.zeros((n_accounts, n_markets), np.int64)
    resting_total = 0
    for m in range(n_markets):
        mk = st.markets[m]
        if not mk["active"]:
            continue
        best = [None, None]
        for side in (SIDE_BUY, SIDE_SELL):
            problems.extend(_block_problems(st, m, side))
            slots = level_slots(st, m, side)
            keys = np.array(level_keys(st, m, side), np.int64)       # descending
            if len(slots) != int(st.book_depth[m, side]):
                problems.append(f"market {m}: side {side} counts {int(st.book_depth[m, side])} "
                                f"levels, its blocks hold {len(slots)}")
            if len(keys) and not np.all(keys[1:] < keys[:-1]):
                problems.append(f"market {m}: price keys of side {side} not strictly sorted")
            resting_side = 0
            for k, lvl in enumerate(slots):
                price = int(st.levels[lvl]["price_ticks"])
                if (price if side == SIDE_BUY else -price) != int(keys[k]):
                    problems.append(f"market {m}: level {lvl} filed under the wrong price")
                for slot in _walk_level(st, m, side, lvl, problems):
                    o = st.orders[slot]
                    a = int(o["account"])
                    lots = int(o["remaining_lots"])
                    (open_buy if side == SIDE_BUY else open_sell)[a, m] += lots
                    open_count[a, m] += 1
                    if int(o["flags"]) & FLAG_REDUCE_ONLY:
                        reduce_only[a, m] += 1
                    resting_side += 1
            if slots:
                best[side] = int(st.levels[slots[0]]["price_ticks"])
            if resting_side != int(mk["resting_buy" if side == SIDE_BUY else "resting_sell"]):
                problems.append(f"market {m}: resting count of side {side} is off")
            resting_total += resting_side
        if best[0] is not None and best[1] is not None and best[0] >= best[1]:
            problems.append(f"market {m}: book crossed (bid {best[0]} >= ask {best[1]})")
        sizes = st.positions["size_lots"][:, m]
        if int(sizes.sum()) != 0:
            problems.append(f"market {m}: positions do not sum to zero")
        if int(sizes[sizes > 0].sum()) != int(mk["open_interest_lots"]):
            problems.append(f"market {m}: open interest differs from the long positions")
        problems.extend(bracket_problems(st, m))
        untriggered = sum(_trigger_queue_problems(st, m, q, open_count, problems)
                          for q in range(TRIGGER_QUEUES))
        if untriggered != int(mk["untriggered"]):
            problems.append(f"market {m}: untriggered count is off")
        resting_total += untriggered
    pos = st.positions
    for name, expect in (("open_buy_lots", open_buy), ("open_sell_lots", open_sell),
                         ("open_orders", open_count), ("reduce_only_orders", reduce_only)):
        if not np.array_equal(pos[name], expect):
            problems.append(f"positions.{name} disagree with the resting orders")
    problems.extend(_block_pool_problems(st))
    if resting_total != int(st.counters[C_ORDERS_USED]):
        problems.append("order pool usage disagrees with the books and trigger books")
    problems.extend(collateral_problems(st))
    return problems


def bracket_problems(st: State, market: int) -> list[str]:
    """Every bracket's initial rate 1/max leverage is above its maintenance rate, and max
    leverages do not rise with the notional: so an order the margin check accepts leaves its
    account's equity above maintenance (docs/risk.md, the bracket invariant)."""
    mk = st.markets[market]
    n = int(mk["n_brackets"])
    caps = [int(x) for x in mk["bracket_max_leverage"][:n]]
    rates = [int(x) for x in mk["bracket_rate_e9"][:n]]
    problems = []
    prev = int(mk["max_leverage"])
    for k, (cap, rate) in enumerate(zip(caps, rates)):
        if not 1 <= cap <= prev or cap * rate >= RATE_ONE_E9:
            problems.append(f"market {market}: bracket {k} max leverage {cap} does not keep "
                            f"its initial rate above its maintenance rate {rate}e-9 or rises")
        prev = cap
    return problems


def collateral_totals(st: State) -> tuple[int, int]:
    """(holdings, net deposits) as Python integers: holdings = balances + isolated margins +
    unrealized PnL at mark + insurance fund + fees; net deposits = deposits - withdrawals."""
    active = st.markets["active"] != 0
    mark = st.markets["mark_ticks"] * st.markets["atoms_per_tick_lot"]
    # Python integers: an int64 sum over many accounts could wrap and hide a violation.
    size = st.positions["size_lots"][:, active].astype(object)
    cost = st.positions["cost_atoms"][:, active].astype(object)
    upnl = int((size * mark[active].astype(object) - cost).sum())
    isolated = int(st.positions["isolated_margin_atoms"].astype(object).sum())
    total = (sum(st.accounts["balance_atoms"].astype(object)) + upnl + isolated
             + int(st.counters[C_FEES_ATOMS]) + int(st.counters[C_INSURANCE_ATOMS]))
    return total, int(st.counters[C_NET_DEPOSITS_ATOMS])


def collateral_problems(st: State) -> list[str]:
    """Collateral is conserved to the atom (DESIGN.md §8.3)."""
    total, net = collateral_totals(st)
    if total != net:
        return [f"collateral not conserved: holdings {total} != net deposits {net}"]
    return []


def account_seq_problems(before: np.ndarray, events, after: np.ndarray) -> list[str]:
    """Each account's `account_seq` advanced by exactly the reports among `events` (event
    dicts, EV_COMMAND included, as engine.records.event_to_dict gives them) under the one
    rule of engine/reports.py: `before` and `after` are the accounts' counters around them."""
    want = account_seqs_of_events(events, before)
    if np.array_equal(want, after):
        return []
    wrong = np.flatnonzero(want != np.asarray(after))
    return [f"account {int(a)}: account_seq {int(after[a])}, the events' reports make it "
            f"{int(want[a])}" for a in wrong[:10]]
