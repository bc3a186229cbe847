"""Query answers computed once per change, not once per query.

`account`, `open_orders` and `book` replies are built once and kept, packed, until what they
show changes; a flood of queries then costs a dict lookup and a few bytes each, not a copy of
the matcher's rows and a risk computation in the gateway's only thread.

What changes what (the gateway sees every event):
- an account's view (`account`, `open_orders`): any event addressed to the account (a trade to
  both sides), or a command that is not one account's own (marks, funding, liquidations,
  market admin: `bump_all`). Its version is the seq of the last such event.
- a book: the mirror counts each change of its levels (`book_version(market)`).

An `account` answer is the matcher's rows copied at some seq S; it stays exact at S (and at
every later seq the gateway has routed) until the account's version passes S.
"""

from __future__ import annotations

from gateway.codec import pack

_MAX_KEPT = 4096        # views kept per kind; beyond, the oldest are forgotten


def map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


class PackedMap:
    """A msgpack map packed once; `with_fields` adds the per-reply fields (rid, ts, seq)."""

    __slots__ = ("n", "body")

    def __init__(self, msg: dict):
        self.n = len(msg)
        self.body = b"".join(pack(k) + pack(v) for k, v in msg.items())

    def with_fields(self, **extra) -> bytes:
        extra = {k: v for k, v in extra.items() if v is not None}
        return map_header(self.n + len(extra)) + self.body + \
            b"".join(pack(k) + pack(v) for k, v in extra.items())



class Views:
    def __init__(self):
        self.versions: dict[int, int] = {}     # account -> seq of the last event for it
        self.all_version = 0                    # seq of the last command that touches anyone
        self.accounts: dict[int, tuple[int, PackedMap]] = {}     # account -> (seq S, reply)
        self.open_orders: dict[tuple, tuple[int, PackedMap]] = {}  # (account, market) -> ...
        self.books: dict[tuple, tuple[int, PackedMap]] = {}   # (market, depth) -> (version, ..)
        self.stats = {"view_hits": 0, "view_builds": 0}
        self.bytes = 0       # the packed answers kept (gateway/memory.py counts them)

    def version(self, account: int) -> int:
        try:      # a dict, or the compiled router's array (gateway/compiled_pass.py)
            v = self.versions[account]
        except (KeyError, IndexError):
            v = 0
        return v if v > self.all_version else self.all_version

    def bump_all(self, seq: int) -> None:
        self.all_version = seq

    # -- cached lookups: the view, or None when it must be built again -------------------
    def account(self, account: int):
        """(S, reply) if still exact."""
        got = self.accounts.get(account)
        if got is not None and got[0] >= self.version(account):
            self.stats["view_hits"] += 1
            return got
        return None

    def keep_account(self, account: int, seq: int, view: PackedMap) -> None:
        self.stats["view_builds"] += 1
        self._keep(self.accounts, account, (seq, view))

    def orders(self, account: int, market) -> PackedMap | None:
        got = self.open_orders.get((account, market))
        if got is not None and got[0] == self.version(account):
            self.stats["view_hits"] += 1
            return got[1]
        return None

    def keep_orders(self, account: int, market, view: PackedMap) -> None:
        self.stats["view_builds"] += 1
        self._keep(self.open_orders, (account, market), (self.version(account), view))

    def book(self, market: int, depth: int, version: int) -> PackedMap | None:
        got = self.books.get((market, depth))
        if got is not None and got[0] == version:
            self.stats["view_hits"] += 1
            return got[1]
        return None

    def keep_book(self, market: int, depth: int, version: int, view: PackedMap) -> None:
        self.stats["view_builds"] += 1
        self._keep(self.books, (market, depth), (version, view))

    def _keep(self, table: dict, key, value) -> None:
        old = table.get(key)
        if old is None and len(table) >= _MAX_KEPT:
            old = table.pop(next(iter(table)))
        if old is not None:
            self.bytes -= len(old[1].body)
        table[key] = value
        self.bytes += len(value[1].body)
