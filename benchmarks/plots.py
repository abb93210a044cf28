"""Figures drawn from the stored JSON results of the benchmarks (matplotlib, written to files).

The documentation draws these when it is built (``docs/source/_ext/ag_docs.py``), from the JSON
under ``benchmarks/results/``, so that a figure always shows the numbers of the file beside it; a
benchmark script that wants the same figure calls the same function. Needs matplotlib (the
``examples`` extra); every function returns ``None`` without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from benchmarks import common

CROSSOVER_SIDES = {  # threshold -> (the path above the threshold, the path below it)
    "onednn_min_rows": ("oneDNN 1x1 convolution", "matrix product"),
    "patch_max_rows": ("oneDNN convolution", "product of gathered patches"),
    "transposed_min_numel": ("oneDNN transposed convolution", "product + strided add"),
}


def crossovers(sweeps: dict, title: str, path: Path) -> Optional[Path]:
    """One panel per threshold sweep of ``benchmarks.cpu_backends`` (its ``crossovers`` block).

    Each panel plots, against the swept size, the time of the path taken above the threshold over
    the time of the path below it (below 1: the path above is faster), with the threshold chosen
    from the sweep as a vertical line. Writes ``path`` (PNG) and returns it, or ``None`` without
    matplotlib or without a sweep.
    """
    plt = common.pyplot()
    if plt is None or not sweeps:
        return None
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.6), squeeze=False)
    for ax, (name, sweep) in zip(axes[0], sweeps.items()):
        above, below = CROSSOVER_SIDES.get(name, ("above", "below"))
        ax.plot(sweep["sizes"], sweep["above_over_below"], marker="o", label=f"{above} / {below}")
        ax.axhline(1.0, color="k", linewidth=0.8)
        if 0 < sweep["threshold"] <= max(sweep["sizes"]):
            ax.axvline(sweep["threshold"], color="tab:red", linestyle="--", label=f"threshold {sweep['threshold']}")
        ax.set(xscale="log", xlabel=sweep["swept"], ylabel="time ratio (median over rounds)", title=name)
        common.finish_axes(ax)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
