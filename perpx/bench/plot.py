"""Latency pictures for the benchmarks: percentile spectra as HdrHistogram draws them.

x is 1/(1-q) on a log scale, so 50%, 90%, 99%, 99.9% ... are evenly spaced and the tail gets
as much room as the median; y is the latency (ms, log scale: a 20 ms stall and a 0.3 ms median
fit one panel). One panel per series group (an ack mode and client count, say), one line per
series (a rate, say). matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99, 99.999)


def spectrum(samples_ns: np.ndarray, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """(1/(1-q), latency ms) at `points` quantiles evenly spaced on the log axis, up to the
    largest sample (the last point is the max, at 1/(1-q) = the sample count)."""
    a = np.sort(np.asarray(samples_ns, dtype=np.float64)) / 1e6
    n = len(a)
    x = np.logspace(0, np.log10(max(n, 2)), points)
    q = 1.0 - 1.0 / x
    return x, a[np.minimum((q * n).astype(np.int64), n - 1)]


def write_spectra(path, panels: list[tuple[str, list[tuple[str, np.ndarray]]]],
                  title: str) -> Path:
    """A PNG with one panel per (panel title, [(series label, samples in ns)]); returns path."""
    path = Path(path)
    panels = [(t, [(label, s) for label, s in series if len(s)]) for t, series in panels]
    panels = [(t, series) for t, series in panels if series]
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    top = max((len(s) for _, series in panels for _, s in series), default=10)
    ticks = [p for p in PERCENTILES if 1 / (1 - p / 100) <= top * 1.01]
    for ax, (panel_title, series) in zip(axes.flat, panels):
        for label, samples in series:
            x, y = spectrum(samples)
            ax.plot(x, y, label=f"{label} (n={len(samples):,})", linewidth=1.3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1 / (1 - p / 100) for p in ticks])
        ax.set_xticklabels([f"{p:g}%" for p in ticks])
        ax.minorticks_off()
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (ms)")
        ax.set_title(panel_title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
