"""The matching engine: records, rules (reference model), compiled matcher, invariants."""

import hashlib
import os
import sys
from pathlib import Path

# as numba spells it (abspath, not resolve): its cache subfolder is named from this path
_HERE = Path(os.path.abspath(os.path.dirname(__file__)))


def numba_cache_dir() -> Path:
    """Where numba keeps the compiled matcher: one place per checkout, whoever imports engine.

    NUMBA_CACHE_DIR wins when set. Otherwise a checkout (engine/ next to pyproject.toml, as in
    an editable install) caches in CHECKOUT/.numba-cache, so ./scripts/*, the `perpx` console
    script of any venv, the tests and CI all load the one compile; an installed copy caches in
    $XDG_CACHE_HOME/perpx/numba (numba keeps each source directory in its own subfolder).
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    checkout = _HERE.parent
    if (checkout / "pyproject.toml").is_file() and os.access(checkout, os.W_OK):
        return checkout / ".numba-cache"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "perpx" / "numba"


def _use_numba_cache_dir() -> Path:
    """Point numba at numba_cache_dir(), before engine/core/ decorates anything."""
    cache_dir = numba_cache_dir()
    os.environ["NUMBA_CACHE_DIR"] = str(cache_dir)     # child processes inherit it
    config = sys.modules.get("numba.core.config")
    if config is not None:       # numba was imported first: its config has read the env already
        config.CACHE_DIR = str(cache_dir)
    return cache_dir


def _numba_subfolder(cache_dir: Path, source_dir: Path) -> Path:
    """numba's cache subfolder for the functions defined in source_dir
    (numba.core.caching._CacheLocator.get_suitable_cache_subpath)."""
    return cache_dir / f"{source_dir.name}_{hashlib.sha1(str(source_dir).encode()).hexdigest()}"


def drop_stale_numba_cache(cache_dir: Path, owner: Path, sources_from: tuple) -> None:
    """Make numba recompile `owner`'s compiled code when any source it may have frozen
    changed, not only the defining file.

    numba keys its on-disk cache on the source file of each compiled function, but compiled
    code freezes constants and functions from other modules (the matcher: its own files in
    engine/core/, records, config, numbers); an edit there left stale machine code in use
    (seen here). So when the digest of every .py under `sources_from` (names and contents)
    differs from the one recorded (in the cache dir) at the last compile, the cache files of
    every source directory under `owner` are removed. engine/ is its own owner;
    gateway/__init__.py makes gateway/ one, with engine/ among its sources.
    """
    sources = sorted(p for d in sources_from for p in d.rglob("*.py"))
    digest = hashlib.blake2b(b"".join(str(p.relative_to(_HERE.parent)).encode() + b"\0" +
                                      p.read_bytes() for p in sources),
                             digest_size=16).hexdigest()
    own = _numba_subfolder(cache_dir, owner)
    stamp = own / "sources.stamp"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    for source_dir in sorted({p.parent for p in owner.rglob("*.py")}):
        for root in (_numba_subfolder(cache_dir, source_dir), source_dir / "__pycache__"):
            for cached in list(root.glob("*.nb[ic]")) if root.is_dir() else []:
                cached.unlink(missing_ok=True)
    try:
        own.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass   # an unwritable cache dir recompiles each time; still correct


drop_stale_numba_cache(_use_numba_cache_dir(), _HERE, (_HERE,))
