"""The measured results behind ``"auto"``: which implementation of the gate won, where.

``measured.json`` (beside this file) is a list of rows, each the medians of one benchmark
configuration of the paper model's level-2 gate on one kind of device, all measured side by
side in one run::

    {"device": "cuda", "capability": "9.0", "dtype": "float32", "mode": "eval",
     "layout": "contiguous", "context": "eager",
     "ms": {"reference": 0.56, "compile": 0.24, "triton": 0.50},
     "machine": "NVIDIA H200", "commit": "...", "source": "benchmarks/results/..."}

``capability`` is the CUDA compute capability (``"9.0"``) or, on the CPU, the processor
architecture (``platform.machine()``, e.g. ``"x86_64"``); ``mode`` is ``"train"`` when autograd
records the call (forward + backward measured), else ``"eval"``; ``layout`` is x's memory format
(``"channels_last"`` or ``"contiguous"``); ``context`` is ``"compiled"`` when the gate runs inside
a function being compiled by :func:`torch.compile`, else ``"eager"``.

A fused implementation wins a row when its median is at least :data:`MARGIN` times faster than
both the reference's and ``compile``'s (a row without both never names a winner; in the
``"compiled"`` context ``compile`` is ``null``: there it is the reference, traced by the same
compiler): so ``"auto"`` never takes a fused path where a measurement did not show it ahead. A
``null`` time is a configuration that failed or was not measured; it never wins. Rows are added by the
benchmarks (``python -m benchmarks.measured --add RESULTS.json``), never by hand.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import NamedTuple, Optional

__all__ = ["Key", "MARGIN", "PATH", "rows", "row_winner", "winner", "host_capability"]

PATH = Path(__file__).with_name("measured.json")
MARGIN = 1.05  # a win is 5% or more: less is within the run-to-run noise of the benchmarks
_BASELINES = ("reference", "compile")


class Key(NamedTuple):
    """What a measured row is about (see the module docstring)."""

    device: str
    capability: str
    dtype: str
    mode: str
    layout: str
    context: str


def host_capability() -> str:
    """The ``capability`` of CPU rows: this machine's processor architecture."""
    return platform.machine()


def _read(path: Path) -> tuple[dict, ...]:
    rows = json.loads(path.read_text())["rows"]
    missing = [(i, f) for i, r in enumerate(rows) for f in (*Key._fields, "ms") if f not in r]
    if missing:
        raise ValueError(f"{path}: row {missing[0][0]} has no {missing[0][1]!r} (a row needs {[*Key._fields, 'ms']})")
    return tuple(rows)


_ROWS = _read(PATH)  # read once, at import: lookups inside torch.compile's tracing are then plain dict reads


def rows() -> tuple[dict, ...]:
    """The committed rows."""
    return _ROWS


def row_winner(row: dict) -> Optional[str]:
    """The fused implementation that won a row of the table (the rule of the module docstring), or ``None``."""
    ms = row["ms"]
    needed = ("reference",) if row.get("context") == "compiled" else _BASELINES
    if any(ms.get(b) is None for b in needed):
        return None
    best = min(ms[b] for b in _BASELINES if ms.get(b) is not None)
    fused = [(t, name) for name, t in ms.items() if name not in _BASELINES and t is not None and t * MARGIN <= best]
    return min(fused)[1] if fused else None


_WINNERS = {Key(*(r[f] for f in Key._fields)): row_winner(r) for r in _ROWS}


def winner(key: Key) -> Optional[str]:
    """The fused implementation that won ``key``'s row, or ``None`` (no row, or the reference or
    ``compile`` was as fast)."""
    return _WINNERS.get(key)
