"""The exchange spec: what every process of a running exchange is told, in one place.

`perpx up` validates the TOML config (perpx/config.py) and writes the resolved result to
STATE_DIR/exchange.json; every child process (matcher, gateways, persistd, riskd) gets
`--spec exchange.json` and reads it with `load_spec`, so they all see the same markets, engine
capacities, shm prefix, command sources and state-directory layout. The spec is trusted: it was
validated when it was written; `from_dict` checks only its shape.

    {"prefix", "state_dir", "engine": {EngineConfig fields, batch, event_ring_capacity,
     command_ring_capacity}, "markets": [Market.describe(), ...], "sources": [{"name",
     "privileged", "capacity"}], "consumers": [...], "exchange": {...}, "risk": {...},
     "persistence": {...}, "endpoints": {...}, "matcher_spins": bool}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.config import EngineConfig
from engine.market import Market


class StateLayout:
    """Where each file of an exchange lives under its state directory (perpx/statedir.py adds
    the locks and the running checks on top):

    STATE_DIR/
      supervisor.lock     flock held (exclusive) by the running `perpx up`: "is it running?"
      ops.lock            flock serializing writers of the single-producer ops ring (CLI, genesis)
      exchange.json       the resolved config of the running (or last) exchange: engine
                          capacities, markets in engine units, shm prefix, sources, consumers.
                          Gateways read their market table from it; CLI commands their markets.
      endpoints.json      {"orders", "market_data", "server_public_key"} (+ "orders_all": every
                          gateway's order endpoint); present while the exchange runs
      status.json         the supervisor's process table (pids, restarts, cpus); while it runs
      keys/server.key, keys/server.key_secret      the server's CURVE certificate (kept)
      accounts/<id>.key   the account registry the gateways read (public keys only)
      clients/<id>.key_secret                      the client certificates `account create` made
      logs/<process>.log  stdout/stderr of each child process
      run/                scratch: each gateway's endpoints file, persistd's SQL socket
      journal/            persistd's command journal: the source of truth (persistd/journal.py)
      snapshots/          state snapshots at sequence numbers (persistd/snapshot.py)
      perpx.duckdb        the query store (persistd/store.py), written only by persistd
    """

    def __init__(self, path):
        self.path = Path(path).expanduser().absolute()
        self.supervisor_lock = self.path / "supervisor.lock"
        self.ops_lock = self.path / "ops.lock"
        self.exchange_file = self.path / "exchange.json"
        self.endpoints_file = self.path / "endpoints.json"
        self.status_file = self.path / "status.json"
        self.keys_dir = self.path / "keys"
        self.accounts_dir = self.path / "accounts"
        self.clients_dir = self.path / "clients"
        self.logs_dir = self.path / "logs"
        self.run_dir = self.path / "run"
        self.journal_dir = self.path / "journal"
        self.snapshots_dir = self.path / "snapshots"
        self.store_file = self.path / "perpx.duckdb"
        self.sql_socket = self.run_dir / "sql.ipc"


@dataclass(frozen=True)
class Source:
    """A producer of commands: its ring name suffix and whether it may send admin commands."""
    name: str
    privileged: bool
    capacity: int = 1 << 14


def engine_config_from(section: dict) -> EngineConfig:
    """The EngineConfig fields of an `engine` section (its other keys are process options)."""
    return EngineConfig(**{k: section[k] for k in EngineConfig.__dataclass_fields__
                           if k in section})


@dataclass(frozen=True)
class ExchangeSpec:
    prefix: str
    layout: StateLayout
    engine: EngineConfig
    markets: tuple             # Market, by id
    sources: tuple             # Source, in the matcher's polling order
    consumers: tuple           # event-ring consumer names
    doc: dict                  # the whole document: sections read by one process only

    @property
    def engine_options(self) -> dict:
        """The engine section's process options: batch, event_ring_capacity, ..."""
        return self.doc.get("engine", {})

    @property
    def ack_mode(self) -> str:
        return self.doc.get("exchange", {}).get("ack_mode", "durable")

    def section(self, name: str) -> dict:
        """A config section ("risk", "persistence", "exchange", "endpoints"); {} if absent."""
        return self.doc.get(name) or {}

    @classmethod
    def from_dict(cls, doc: dict) -> ExchangeSpec:
        try:
            return cls(prefix=doc["prefix"], layout=StateLayout(doc["state_dir"]),
                       engine=engine_config_from(doc["engine"]),
                       markets=tuple(Market.from_dict(m, i)
                                     for i, m in enumerate(doc["markets"])),
                       sources=tuple(Source(s["name"], bool(s["privileged"]),
                                            int(s["capacity"])) for s in doc.get("sources", ())),
                       consumers=tuple(doc.get("consumers", ())), doc=doc)
        except KeyError as e:
            raise ValueError(f"the exchange spec lacks {e.args[0]!r}") from None


def load_spec(path) -> ExchangeSpec:
    """Read exchange.json (written by `perpx up`)."""
    return ExchangeSpec.from_dict(json.loads(Path(path).read_text()))
