"""Imports run one way (DESIGN.md: processes meet only in shared memory).

    shm/       mechanisms: imports nothing of the project but itself
    engine/    the domain: engine/ and, in the matcher's process wrapper and the state's
               attach for other processes alone, shm/; its pure modules import no shm, zmq,
               duckdb or posix_ipc
    gateway/, riskd/, persistd/   one process each: themselves, engine/ and shm/ only
    perpx/     operations (CLI, supervisor, client, benchmarks): anything

Every import statement counts, at the top of a module or inside a function.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"shm", "engine", "gateway", "riskd", "persistd", "perpx"}
ALLOWED = {
    "shm": {"shm"},
    "engine": {"engine"},
    "gateway": {"gateway", "engine", "shm"},
    "riskd": {"riskd", "engine", "shm"},
    "persistd": {"persistd", "engine", "shm"},
}
# engine/ modules that touch shared memory (not part of the pure domain): the matcher's loop
# over the rings, and how other processes attach its state
ENGINE_PROCESS_MODULES = {"engine/service.py": {"shm"}, "engine/shared_state.py": {"shm"}}
IO_LIBRARIES = {"zmq", "duckdb", "posix_ipc"}


def imported_modules(path: Path):
    """(line, top-level package) for every import in the file, relative ones resolved."""
    package = path.relative_to(ROOT).parts[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, package
            elif node.module:
                yield node.lineno, node.module.split(".")[0]


def layer_violations() -> list[str]:
    out = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            extra = ENGINE_PROCESS_MODULES.get(rel, set())
            for line, top in imported_modules(path):
                if top in PROJECT and top not in allowed | extra:
                    out.append(f"{rel}:{line} imports {top} ({package}/ may import "
                               f"{', '.join(sorted(allowed | extra))})")
                if package == "engine" and not extra and top in IO_LIBRARIES:
                    out.append(f"{rel}:{line} imports {top} (engine/ is the pure domain)")
    return out


def test_imports_run_one_way():
    assert layer_violations() == []


def test_the_walk_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker itself: a nested import of another process's package is found."""
    fake = tmp_path / "riskd"
    fake.mkdir()
    (fake / "x.py").write_text("import os\n\ndef f():\n    from gateway.codec import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = layer_violations()
    assert found == ["riskd/x.py:4 imports gateway (riskd/ may import engine, riskd, shm)"]


def compilers_loaded_by(code: str) -> list[str]:
    """Run `code` in a fresh interpreter at the checkout; which of numba and llvmlite it
    imported."""
    probe = (code + "\nimport sys\n"
             "print(' '.join(m for m in ('numba', 'llvmlite') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_a_gateway_loads_no_compiler():
    """Importing the gateway does not import numba: only its compiled lane does
    (gateway/compiled_pass.py, loaded when the gateway starts with it), so a gateway on the
    Python pass (PERPX_GATEWAY_PASS=python) costs ~60 MB of RSS and ~0.15 s of start less."""
    assert compilers_loaded_by("import gateway.server") == []
