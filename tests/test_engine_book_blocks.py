"""Deep book sides in blocks (engine/core/book_sides.py): levels come and go anywhere in a side
of hundreds, so blocks split (the top one and others), merge, empty and come back, while both
engines run every command and the invariants (engine/invariants.py: blocks sorted, none empty
but an empty side's top, no two neighbours at half a block or less, the pool shared out) are
checked after each."""

import numpy as np

from engine.book import side_levels
from engine.config import EngineConfig
from engine.records import EV_ACK, SIDE_BUY, SIDE_SELL, TIF_IOC
from engine.state import book_block_size
from tests.engine_helpers import (MARK, USDC, Engines, buy, cancel, deposit, market_commands,
                                  pick, sell)

LEVELS = 256                                  # blocks of 32 levels
CONFIG = EngineConfig(max_accounts=8, max_markets=2, max_orders=2 * LEVELS,
                      max_levels_per_side=LEVELS)


def book_prices(eng, side):
    """The side's prices best first, read through the blocks (engine/book.py)."""
    return [price for price, _ in side_levels(eng.st, 0, side)]


def test_levels_anywhere_in_a_deep_side_keep_it_sorted_in_few_blocks():
    assert book_block_size(LEVELS) == 32
    eng = Engines(CONFIG, check_every_step=False)
    eng.admin(market_commands(max_open_orders=2 * LEVELS), deposit(1, 10_000_000 * USDC),
              deposit(2, 10_000_000 * USDC))
    rng = np.random.default_rng(7)
    resting = {}                              # cid -> price of account 1's bids
    most_blocks = 0
    for step in range(1500):
        if len(resting) < 40 or (len(resting) < LEVELS - 1 and rng.random() < 0.55):
            price = MARK - int(rng.integers(1, 4 * LEVELS))
            cid = step + 1
            if price not in resting.values() and pick(eng.client(buy(1, 1, price, cid=cid)),
                                                      EV_ACK):
                resting[cid] = price
        else:
            cid = list(resting)[int(rng.integers(len(resting)))]
            eng.client(cancel(1, cid=cid))
            del resting[cid]
        if step % 50 == 0:
            eng.check()
        most_blocks = max(most_blocks, int(eng.st.book_nblocks[0, SIDE_BUY]))
    assert book_prices(eng, SIDE_BUY) == sorted(resting.values(), reverse=True)
    # the side used several blocks, and no more than the bound: fewer than 4 L / B + 1
    assert 4 < most_blocks < 4 * LEVELS // 32 + 1
    # a sell sweeps the side from the best: its levels leave in order, down to the top block
    eng.client(sell(2, len(resting), MARK - 4 * LEVELS, cid=1, tif=TIF_IOC))
    assert book_prices(eng, SIDE_BUY) == [] and int(eng.st.book_nblocks[0, SIDE_BUY]) == 1
    eng.check()
    eng.client(buy(1, 1, MARK - 5, cid=99_999))
    assert book_prices(eng, SIDE_BUY) == [MARK - 5] and book_prices(eng, SIDE_SELL) == []
