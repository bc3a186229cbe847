"""The matching engine: records, rules (reference model), compiled matcher, invariants."""

import hashlib
import os
from pathlib import Path


def _drop_stale_numba_cache() -> None:
    """Make numba recompile when any engine source changed, not only the defining file.

    numba keys its on-disk cache on the source file of each compiled function, but the
    compiled matcher freezes constants and functions from its sibling modules (records,
    config, numbers); an edit there left stale machine code in use (seen here). So when the
    digest of all engine sources differs from the one recorded at the last compile, the
    engine's cache files are removed.
    """
    here = Path(__file__).parent
    digest = hashlib.blake2b(b"".join(p.read_bytes() for p in sorted(here.glob("*.py"))),
                             digest_size=16).hexdigest()
    stamp = here / "__pycache__" / "numba-sources.stamp"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    roots = [here / "__pycache__"]
    if os.environ.get("NUMBA_CACHE_DIR"):
        roots.append(Path(os.environ["NUMBA_CACHE_DIR"]))
    for root in roots:
        for cached in list(root.rglob("*.nb[ic]")) if root.is_dir() else []:
            if root == roots[0] or "engine" in cached.parent.name:
                cached.unlink(missing_ok=True)
    try:
        stamp.parent.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass   # a read-only checkout recompiles each time; still correct


_drop_stale_numba_cache()
