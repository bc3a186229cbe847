"""gateway/book_render.py against MarketData's Python packing of book deltas
(`packed_book_delta`, on the Python mirror): the same bytes for every batch of the fuzzers'
streams, on grids of several shapes."""

from __future__ import annotations

import msgpack
import numpy as np

from engine.market import Market
from engine.matcher import LocalEvents, Matcher
from gateway import book_render as br
from gateway.codec import pack
from gateway.market_data import MarketData
from gateway.mirror import Mirror, apply_events
from gateway.mirror_arrays import S_DIRTY_N, ArrayMirror
from tests.fuzz_streams import FUZZ_CONFIG, genesis, random_stream

GRIDS = [("0.01", "0.01"), ("0.07", "0.0001"), ("5", "3"), ("0.001", "0.001")]


def test_every_book_delta_renders_byte_identical():
    """Per batch, the deltas of every dirty market, ascending, as the Python path packs
    them; a market the gateway has no table for (None) is taken off the list and dropped."""
    cfg = FUZZ_CONFIG
    compared = levels = dropped = several = 0
    for seed, (tick, lot) in zip((11, 12, 13, 14), GRIDS):
        markets = [Market(f"M{m}-PERP", m, tick, lot) for m in range(cfg.max_markets)]
        markets[seed % cfg.max_markets] = None
        commands = np.concatenate([genesis(), random_stream(seed, 3000)])
        matcher = Matcher(cfg)
        ring = LocalEvents(1 << 14)
        py = Mirror(cfg.max_markets, track_dirty=True)
        arr = ArrayMirror.from_mirror(py, initial=16)
        oracle = MarketData("unused", py, markets, None, [])
        deltas = br.BookDeltas(arr, markets)
        deltas.out = np.zeros(br.deltas_bytes(1), np.uint8)     # it has to grow
        deltas.spans = np.zeros((1, 3), np.int64)                # and so has this
        start = 0
        while start < len(commands):
            done, end = matcher.process(commands, ring.sink, 0, ring.capacity, 0, True, start,
                                        int(1 + start % 29))
            raw = ring.slots[:end]
            apply_events(py, raw.tobytes(), end)
            arr.apply(raw.view(np.uint8).reshape(-1), end)
            start += done
            seq = py.applied_seq
            dirty = py.dirty_markets()
            want = oracle.packed_book_deltas(seq)
            assert deltas(seq) == want
            assert arr.st[S_DIRTY_N] == 0 and not any(b or a for b, a in py.dirty)
            compared += len(want)
            several += len(want) > 1
            dropped += len(dirty) - len(want)
            for _, payload in want:
                msg = msgpack.unpackb(payload)
                levels += len(msg["bids"]) + len(msg["asks"])
        assert len(deltas.out) > br.deltas_bytes(1) and len(deltas.spans) > 1
    # 630 deltas of 1,313 levels, 126 batches with several markets, 202 dropped
    assert compared > 500 and levels > 1000 and several > 50 and dropped > 100


def test_array_headers_of_every_size():
    """fixarray, array16 and array32 as msgspec writes them."""
    out = np.zeros(8, np.uint8)
    for n in (0, 1, 15, 16, 255, 256, 65535, 65536, 70000):
        end = br._w_array(out, 0, n)
        assert out[:end].tobytes() == pack([None] * n)[:end]
