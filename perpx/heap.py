"""The heap of the exchange's processes on transparent huge pages.

CPython allocates its objects from its own small-object allocator, in 1 MiB arenas (64-bit
builds), each mapped on its own: too small for a 2 MiB page. With `exchange.huge_pages =
true` (perpx/config.py; false by default) the supervisor starts every process of the exchange
with

    PYTHONMALLOC=malloc                   objects come from glibc's malloc
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 glibc asks for transparent huge pages (madvise
                                          MADV_HUGEPAGE) on the memory it takes for its heap

so that the interpreter's objects, the mirror and the buffers live on 2 MiB pages where the
kernel allows it (/sys/kernel/mm/transparent_hugepage/enabled "madvise" or "always"; with
"never" nothing changes). Off by default: on this VM it shortened a lone order's tail in one
phase and, in the later ones, only added CPU per order (glibc's malloc is slower than
CPython's for small objects); docs/tuning.md, "Eighth pass", has the runs. A venue measures
its own box both ways with `perpx bench latency` before turning it on.

What it costs: memory is taken in 2 MiB steps (RSS a few MiB higher per process), and with
the kernel's THP `defrag` at "madvise" a fault in such a region may compact memory first, on a
box whose memory is fragmented (docs/operations.md, "The host").
"""

from __future__ import annotations

TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def child_environment(env: dict, huge_pages: bool) -> dict:
    """`env` for a process of the exchange: with huge_pages, glibc's malloc for Python's objects
    and the hugetlb tunable added to any tunables already given; without, `env` as it is."""
    env = dict(env)
    if huge_pages:
        env["PYTHONMALLOC"] = "malloc"
        given = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
                 if t and not t.startswith("glibc.malloc.hugetlb=")]
        env["GLIBC_TUNABLES"] = ":".join(given + [TUNABLE])
    return env


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), None if this
    kernel has none."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_page_bytes(pid: int) -> int | None:
    """The anonymous memory of process `pid` on huge pages (AnonHugePages, smaps_rollup), None
    if it cannot be read (gone, or another user's)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return 0


def heap_line(heap: dict, processes: list) -> str:
    """`perpx status`'s line: what was asked (the supervisor's status `heap`) and what each
    process holds on huge pages."""
    if not heap["huge_pages"]:
        return "heap: Python's own allocator (exchange.huge_pages = false)"
    if heap["thp"] in (None, "never"):
        return (f"heap: huge pages asked for, none possible: the kernel's transparent huge "
                f"pages are {heap['thp'] or 'absent'} (exchange.huge_pages = true)")
    held = ", ".join(f"{p['name']} {p['huge_page_bytes'] >> 20} MiB" for p in processes
                     if p.get("huge_page_bytes") is not None)
    return f"heap on huge pages (THP {heap['thp']}): {held or '-'}"
