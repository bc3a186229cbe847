"""The matcher's state tables as other processes see them: attached from shared memory, read
through snapshots or consistent copies, never written (the matcher, engine/service.py, is their
only writer). Apart from the matcher's own process wrapper, the only part of engine/ that
touches shared memory, and it loads no compiled code: the CLI and the gateways read the state
without paying for the matcher's import."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.state import layout_version, state_in_buffer
from shm import names
from shm.region import Region


def attach_state(prefix: str, cfg: EngineConfig):
    """Another process's view of the live state tables (read them via snapshots or copies):
    (the mapped region, the tables in it); close the region when done."""
    region = Region.attach(names.state_region(prefix), layout_version(cfg))
    return region, state_in_buffer(cfg, region.payload, fresh=False)
