"""Order entry and market data: ZeroMQ (CURVE, msgpack) in front of the matcher's rings."""

import os
from pathlib import Path

from engine import drop_stale_numba_cache, numba_cache_dir

# The compiled lane (gateway/compiled_pass.py and the modules it calls) freezes the engine's
# record layouts and codes and this package's constants: any change of either recompiles it.
_HERE = Path(os.path.abspath(os.path.dirname(__file__)))
drop_stale_numba_cache(numba_cache_dir(), _HERE, (_HERE.parent / "engine", _HERE))
