"""The liquidation scanner: which accounts to send LIQUIDATE for, without rescanning everyone.

riskd reads the matcher's tables (accounts, positions, markets) straight from shared memory and
keeps, per (account, market) with a position, the mark at which that position becomes
liquidatable, its *threshold*:

    long  (size > 0): liquidatable when mark <= long_threshold_ticks
    short (size < 0): liquidatable when mark >= short_threshold_ticks

The rule is the matcher's (docs/risk.md, engine/risk.py): cross, balance + sum of cross uPnL <
sum of cross maintenance margins; isolated, isolated margin + uPnL < its maintenance margin;
maintenance = notional x rate_k - amount_k of the bracket k the notional falls in. Holding
everything but one mark fixed, equity and maintenance are both linear in that mark within a
bracket, so the threshold solves one linear equation per bracket (the one whose bracket holds
the notional at the solution is the answer; it is Binance's liquidation price formula). With X
the equity that backs the position besides its own PnL (cross: balance + the other cross
positions' uPnL - their maintenance; isolated: the isolated margin):

    X + size x P x atpl - cost = |size| x P x atpl x rate_k - amount_k
    P = (cost - amount_k - X) / (size x atpl x (1 - side x rate_k))

Work per cycle (Scanner.cycle):
1. Re-derive only accounts whose `changed_seq` (bumped by the matcher on every command that
   changes a balance, position, isolated margin or margin setting, funding and liquidation
   included) moved since their last derivation; plus a small round-robin sweep (`sweep`
   accounts a cycle, a backstop against a torn read); plus, when some market's mark moved,
   the *coupled* accounts: cross accounts with positions in two or more markets, whose
   threshold in one market depends on the others' marks. Derivation is vectorised (numpy over
   the dirty accounts).
2. Per market, find the candidates at the mark: the thresholds are kept sorted (np.searchsorted
   gives the crossed range in O(log n + k)), plus the accounts re-derived since the sorted
   copy was built (checked directly; the sorted copy is rebuilt when they grow past 1/8).
3. Candidates become LIQUIDATE(account, -1) for cross and (account, m) for isolated, except
   ones already sent while the account has not changed since, until `retry_ns` passed.

Floats, once: thresholds are solved in float64 with SLACK_ATOMS less backing than the account
has (the matcher rounds maintenance up, by less than an atom; float64 misplaces the largest
notionals, 2**54 atoms, by about 2) and widened by a relative 1e-9 before rounding to ticks
(toward including the position). They only choose whom to send LIQUIDATE; the matcher
re-checks every one against its own state exactly and rejects the healthy
(REASON_NOT_LIQUIDATABLE). A position one tick from its threshold may draw such a reject, at
most once per retry period.

Torn reads. The matcher writes while we read. A derivation is kept as final only when the
account's changed_seq read before and after the row reads agree and the matcher has published
the events of that seq (so that command has finished). Otherwise the thresholds are kept
provisionally and the account stays dirty: the next cycle derives it again.
"""

from __future__ import annotations

import numpy as np

from engine.records import MARGIN_ISOLATED

RATE_E9 = 1_000_000_000
WIDEN = 1e-9                    # relative widening of float thresholds toward liquidation
SLACK_ATOMS = 4.0
NO_LONG = np.iinfo(np.int64).min     # never liquidatable as a long
NO_SHORT = np.iinfo(np.int64).max
DEFAULT_SWEEP = 1024
CROSS = -1                      # LIQUIDATE's market for the whole cross account


def market_brackets(markets, m: int):
    """(floors, rates, amounts) as float64 arrays of market m's brackets (the matcher's)."""
    n = int(markets["n_brackets"][m])
    return (markets["bracket_floor_atoms"][m, :n].astype(np.float64),
            markets["bracket_rate_e9"][m, :n].astype(np.float64) / RATE_E9,
            markets["bracket_amount_atoms"][m, :n].astype(np.float64))


def maintenance(notional, brackets):
    """Maintenance margin (float atoms) of notionals (array) under a market's brackets."""
    floors, rates, amounts = brackets
    if not len(floors):
        return np.zeros_like(notional)
    k = np.maximum(np.searchsorted(floors, notional, side="right") - 1, 0)
    return notional * rates[k] - amounts[k]


def thresholds(size, cost, backing, atpl: float, brackets):
    """(long, short) threshold ticks (int64 arrays) of positions in one market.

    size, cost, backing: float64 arrays (lots, atoms, atoms; backing = X above). Positions of
    size 0 get NO_LONG / NO_SHORT."""
    floors, rates, amounts = brackets
    if not len(floors):
        floors, rates, amounts = np.zeros(1), np.zeros(1), np.zeros(1)
    side = np.sign(size)
    backing = backing - SLACK_ATOMS
    best = np.full(size.shape, np.nan)
    fallback = np.full(size.shape, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(len(floors)):
            p = (cost - amounts[k] - backing) / (size * atpl * (1 - side * rates[k]))
            notional = np.abs(size) * p * atpl
            upper = floors[k + 1] if k + 1 < len(floors) else np.inf
            fits = (notional >= floors[k]) & (notional < upper) & np.isnan(best)
            best = np.where(fits, p, best)
            # no consistent bracket (rounding at a floor): the widest choice, more candidates
            fallback = np.where(side > 0, np.fmax(fallback, p), np.fmin(fallback, p))
    p = np.where(np.isnan(best), fallback, best)
    long_t = np.full(size.shape, NO_LONG, dtype=np.int64)
    short_t = np.full(size.shape, NO_SHORT, dtype=np.int64)
    ok = np.isfinite(p)
    is_long, is_short = ok & (side > 0), ok & (side < 0)
    # A long whose threshold is <= 0 cannot be liquidated by any mark (>= 1 tick).
    long_p = np.floor(p[is_long] * (1 + WIDEN) + 1e-6)
    long_t[is_long] = np.clip(long_p, NO_LONG // 2, NO_SHORT // 2).astype(np.int64)
    short_p = np.ceil(p[is_short] * (1 - WIDEN) - 1e-6)
    short_t[is_short] = np.clip(short_p, 1, NO_SHORT // 2).astype(np.int64)
    return long_t, short_t


class _SortedThresholds:
    """One market and direction: thresholds by account, with a sorted copy for range queries
    and the accounts re-derived since that copy (checked directly)."""

    def __init__(self, values: np.ndarray, absent: int, long: bool):
        self.values = values            # dense, by account (a view of the scanner's table)
        self.absent = absent
        self.long = long
        self.recent: set[int] = set()
        self.rebuild()

    def rebuild(self) -> None:
        present = np.flatnonzero(self.values != self.absent)
        order = np.argsort(self.values[present], kind="stable")
        self.sorted_accounts = present[order]
        self.sorted_values = self.values[self.sorted_accounts]
        self.recent.clear()

    def touched(self, accounts: np.ndarray) -> None:
        self.recent.update(accounts.tolist())
        if len(self.recent) * 8 > len(self.sorted_accounts) + 64:
            self.rebuild()

    def crossed(self, mark: int) -> np.ndarray:
        """Accounts whose threshold the mark has reached."""
        if self.long:
            lo = np.searchsorted(self.sorted_values, mark, side="left")
            hit = self.sorted_accounts[lo:]
        else:
            hi = np.searchsorted(self.sorted_values, mark, side="right")
            hit = self.sorted_accounts[:hi]
        if self.recent or len(hit):
            current = self.values[hit]
            hit = hit[current >= mark] if self.long else hit[current <= mark]
            if self.recent:
                extra = np.fromiter(self.recent, np.int64, len(self.recent))
                values = self.values[extra]
                extra = extra[values >= mark] if self.long else extra[values <= mark]
                hit = np.union1d(hit, extra)
        return hit


class Scanner:
    """Incremental liquidation scanner over a State (see the module docstring).

    `published_seq()` returns the seq of the matcher's last published event (riskd reads it
    from the event ring); `now_ns` times the re-send back-off."""

    def __init__(self, state, market_ids, published_seq, retry_ns: int,
                 sweep: int = DEFAULT_SWEEP):
        self.state = state
        self.market_ids = list(market_ids)
        self.published_seq = published_seq
        self.retry_ns = retry_ns
        self.sweep = sweep
        n_accounts, n_markets = state.positions.shape
        self.n_accounts = n_accounts
        self.long_t = np.full((n_markets, n_accounts), NO_LONG, dtype=np.int64)
        self.short_t = np.full((n_markets, n_accounts), NO_SHORT, dtype=np.int64)
        self.isolated = np.zeros((n_markets, n_accounts), dtype=bool)
        self.derived_seq = np.full(n_accounts, -1, dtype=np.int64)
        self.coupled = np.zeros(n_accounts, dtype=bool)
        self.marks_used = np.zeros(n_markets, dtype=np.int64)
        # per target (row 0: cross, row 1 + m: isolated in m) the account's changed_seq when
        # its last LIQUIDATE was written, and when
        self.sent_seq = np.full((n_markets + 1, n_accounts), -1, dtype=np.int64)
        self.sent_ns = np.zeros((n_markets + 1, n_accounts), dtype=np.int64)
        self._sweep_at = 0
        self.derived = 0                 # accounts derived so far (for benchmarks and logs)
        self.build()

    # -- derivation ----------------------------------------------------------------------
    def build(self) -> None:
        """Derive every account (the start, and after a restart of riskd)."""
        self.index = {}
        self.derive(np.arange(self.n_accounts), self.state.markets["mark_ticks"].copy())
        for m in self.market_ids:
            self.index[m] = (_SortedThresholds(self.long_t[m], NO_LONG, True),
                             _SortedThresholds(self.short_t[m], NO_SHORT, False))

    def derive(self, accounts: np.ndarray, marks: np.ndarray) -> None:
        """Thresholds of these accounts from the tables, the other markets at `marks`."""
        if not len(accounts):
            return
        st = self.state
        changed_before = st.accounts["changed_seq"][accounts]
        markets = st.markets
        rows = st.positions[accounts]                            # a copy: (k, n_markets)
        balance = st.accounts["balance_atoms"][accounts].astype(np.float64)
        changed_after = st.accounts["changed_seq"][accounts]
        settled = (changed_before == changed_after) & (changed_after <= self.published_seq())

        ids = [m for m in self.market_ids if markets["active"][m]]
        size = rows["size_lots"].astype(np.float64)
        cost = rows["cost_atoms"].astype(np.float64)
        isolated = rows["margin_mode"] == MARGIN_ISOLATED
        cross = (~isolated) & (size != 0)
        upnl = np.zeros_like(size)
        mm = np.zeros_like(size)
        brackets = {}
        for m in ids:
            atpl = float(markets["atoms_per_tick_lot"][m])
            brackets[m] = market_brackets(markets, m)
            upnl[:, m] = size[:, m] * float(marks[m]) * atpl - cost[:, m]
            mm[:, m] = maintenance(np.abs(size[:, m]) * float(marks[m]) * atpl, brackets[m])
        cross_equity = balance + np.where(cross, upnl - mm, 0.0).sum(axis=1)
        for m in ids:
            backing = np.where(isolated[:, m], rows["isolated_margin_atoms"][:, m],
                               cross_equity - upnl[:, m] + mm[:, m])
            long_t, short_t = thresholds(size[:, m], cost[:, m], backing,
                                         float(markets["atoms_per_tick_lot"][m]), brackets[m])
            moved = (self.long_t[m, accounts] != long_t) | (self.short_t[m, accounts] != short_t)
            self.long_t[m, accounts] = long_t
            self.short_t[m, accounts] = short_t
            self.isolated[m, accounts] = isolated[:, m]
            if m in self.index and moved.any():
                for side in self.index[m]:
                    side.touched(accounts[moved])
        self.coupled[accounts] = cross.sum(axis=1) >= 2
        self.derived_seq[accounts] = np.where(settled, changed_after, -1)
        self.marks_used[:] = marks
        self.derived += len(accounts)

    # -- a cycle -------------------------------------------------------------------------
    def dirty(self, marks: np.ndarray) -> np.ndarray:
        """Accounts to re-derive this cycle (see the module docstring, step 1)."""
        changed = self.state.accounts["changed_seq"] != self.derived_seq
        if self.sweep:
            lo = self._sweep_at
            hi = min(lo + self.sweep, self.n_accounts)
            changed[lo:hi] = True
            self._sweep_at = 0 if hi >= self.n_accounts else hi
        if np.any(marks[self.market_ids] != self.marks_used[self.market_ids]):
            changed |= self.coupled
        return np.flatnonzero(changed)

    def cycle(self, now_ns: int, marks: dict | None = None) -> list[tuple[int, int]]:
        """The LIQUIDATE commands to send now, as (account, market or -1).

        marks: {market: mark_ticks} riskd is sending ahead of these commands in the same ring
        (the matcher applies them first); other markets use the matcher's current mark."""
        current = self.state.markets["mark_ticks"].copy()
        for m, mark in (marks or {}).items():
            current[m] = mark
        self.derive(self.dirty(current), current)
        accounts, targets = [], []
        active = self.state.markets["active"]
        for m in self.market_ids:
            if not active[m]:
                continue
            for side in self.index[m]:
                hit = side.crossed(int(current[m]))
                accounts.append(hit)
                targets.append(np.where(self.isolated[m, hit], m, CROSS))
        if not accounts:
            return []
        account, market = np.concatenate(accounts), np.concatenate(targets)
        _, first = np.unique((market + 1) * self.n_accounts + account, return_index=True)
        account, row = account[first], market[first] + 1
        fresh = ((self.sent_seq[row, account] != self.state.accounts["changed_seq"][account])
                 | (now_ns - self.sent_ns[row, account] >= self.retry_ns))
        return list(zip(account[fresh].tolist(), (row[fresh] - 1).tolist()))

    def mark_sent(self, targets, now_ns: int) -> None:
        """Record the LIQUIDATEs written: not sent again until the account changes or
        retry_ns passed."""
        if not len(targets):
            return
        account, market = np.array(targets, dtype=np.int64).T
        self.sent_seq[market + 1, account] = self.state.accounts["changed_seq"][account]
        self.sent_ns[market + 1, account] = now_ns
