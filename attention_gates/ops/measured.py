"""The measured results behind ``"auto"``: which implementation of the gate won, where, and where
the CPU paths change strategy.

``measured.json`` (beside this file) holds two lists, both written by the benchmarks (``python -m
benchmarks.measured_table --add RESULTS.json``, or ``python -m benchmarks.cpu_backends
--write-table``), never by hand.

``rows``: each the medians of one benchmark configuration of the paper model's level-2 gate on one
kind of device, all measured side by side in one run::

    {"device": "cuda", "capability": "9.0", "dtype": "float32", "mode": "eval",
     "layout": "contiguous", "context": "eager",
     "ms": {"reference": 0.56, "compile": 0.24, "triton": 0.50},
     "machine": "NVIDIA H200", "commit": "...", "source": "benchmarks/results/..."}

``capability`` is the CUDA compute capability (``"9.0"``) or, on the CPU, what decides the speed of
its paths (:func:`host_capability`): the vendor, the instruction set PyTorch's CPU kernels use and
the class of the core count, e.g. ``"GenuineIntel AVX512 1-2 cores"``. A CPU whose key has no row
takes the reference until someone measures it: one machine's measurement says nothing of another
vendor's cores, of another instruction set or of a 64-core server. ``mode`` is ``"train"`` when
autograd records the call (forward + backward measured), else ``"eval"``; ``layout`` is x's
memory format (``"channels_last"`` or ``"contiguous"``); ``context`` is ``"compiled"`` when the
gate runs inside a function being compiled by :func:`torch.compile`, else ``"eager"``.

A fused implementation wins a row when its median is at least :data:`MARGIN` times faster than
both the reference's and ``compile``'s (a row without both never names a winner; in the
``"compiled"`` context ``compile`` is ``null``: there it is the reference, traced by the same
compiler): so ``"auto"`` never takes a fused path where a measurement did not show it ahead. A
``null`` time is a configuration that failed or was not measured; it never wins.

``cpu_thresholds``: per CPU ``capability``, the sizes at which the CPU paths
(:mod:`~attention_gates.ops.onednn`, :mod:`~attention_gates.ops.cpu_gate`) change strategy
(:class:`CpuThresholds`), measured by ``benchmarks.cpu_backends`` in the run that measured that
CPU's rows. A CPU without an entry takes :data:`DEFAULT_CPU_THRESHOLDS`.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import NamedTuple, Optional

import torch

__all__ = [
    "Key", "MARGIN", "NEVER", "PATH", "CpuInfo", "CpuThresholds", "DEFAULT_CPU_THRESHOLDS", "rows", "row_winner", "winner",
    "has_rows", "host_capability", "cpu_info", "cpu_thresholds",
]  # fmt: skip

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


class CpuThresholds(NamedTuple):
    """Where the CPU paths change strategy, in voxels or elements of the tensors they take."""

    onednn_min_rows: int
    """A 1x1 convolution of a channels-last float32 ``Tensor[N, C, *S]`` with at least this many
    voxels (``N * S``) goes to oneDNN, which reads the rows in place; a smaller one is a matrix product."""
    patch_max_rows: int
    """theta (kernel = stride) of a channels-last ``x`` whose coarse grid has at most this many
    voxels (``N * T``) is one matrix product of x's gathered patches; a larger one a oneDNN convolution."""
    transposed_min_numel: int
    """theta's input gradient for a channels-last float32 ``x`` of at least this many elements is
    oneDNN's transposed convolution; for a smaller one a matrix product and a strided add."""


NEVER = 2**62
"""The threshold that no tensor reaches as a minimum, and that every tensor stays under as a maximum (one path always)."""

DEFAULT_CPU_THRESHOLDS = CpuThresholds(onednn_min_rows=16384, patch_max_rows=2048, transposed_min_numel=2**19)
"""The thresholds of a CPU without measured ones, defaults and not measurements of the CPU at hand.
They are the crossovers first found, by hand, on a 2-core Intel Xeon; every choice they make
computes the same result, only at another speed."""


class CpuInfo(NamedTuple):
    """What this machine's CPU is, as far as the speed of the CPU paths goes."""

    vendor: str  #: ``vendor_id`` of ``/proc/cpuinfo`` (``"GenuineIntel"``, ``"AuthenticAMD"``), else the platform's name
    model: str  #: the model name, as the system reports it
    isa: str  #: the instruction set PyTorch's CPU kernels were dispatched to (``torch.backends.cpu.get_cpu_capability()``)
    cores: int  #: the cores this process may run on


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo`."""
    fields = _cpuinfo_fields()
    vendor = fields.get("vendor_id") or fields.get("CPU implementer") or platform.processor() or platform.machine() or "unknown"
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(vendor, model, torch.backends.cpu.get_cpu_capability(), cores)


def _core_class(cores: int) -> str:
    """``"1-2 cores"``, ``"3-4 cores"``, ``"5-8 cores"``, ...: the power-of-two bracket of ``cores``."""
    high = max(2, 2 ** math.ceil(math.log2(max(cores, 1))))
    return f"{1 if high == 2 else high // 2 + 1}-{high} cores"


def host_capability() -> str:
    """The ``capability`` of this machine's CPU rows: vendor, instruction set and core class,
    e.g. ``"AuthenticAMD AVX2 1-2 cores"``."""
    info = cpu_info()
    return f"{info.vendor} {info.isa} {_core_class(info.cores)}"


def _read(path: Path) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    data = json.loads(path.read_text())
    table = data["rows"]
    missing = [(i, f) for i, r in enumerate(table) for f in (*Key._fields, "ms") if f not in r]
    if missing:
        raise ValueError(f"{path}: row {missing[0][0]} has no {missing[0][1]!r} (a row needs {[*Key._fields, 'ms']})")
    thresholds = data.get("cpu_thresholds", [])
    needed = ("capability", *CpuThresholds._fields)
    missing = [(i, f) for i, r in enumerate(thresholds) for f in needed if not isinstance(r.get(f), int if f != "capability" else str)]
    if missing:
        raise ValueError(f"{path}: cpu_thresholds entry {missing[0][0]} has no {missing[0][1]!r} of the right type (an entry needs {list(needed)})")
    return tuple(table), tuple(thresholds)


_ROWS, _THRESHOLD_ROWS = _read(PATH)  # read once, at import: lookups inside torch.compile's tracing are then plain dict reads
_HOST = host_capability()


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
_MEASURED_DEVICES = frozenset((r["device"], r["capability"]) for r in _ROWS)
_THRESHOLDS = {r["capability"]: CpuThresholds(*(r[f] for f in CpuThresholds._fields)) for r in _THRESHOLD_ROWS}


def winner(key: Key) -> Optional[str]:
    """The fused implementation that won ``key``'s row, or ``None`` (no row, or the reference or
    ``compile`` was as fast)."""
    return _WINNERS.get(key)


def has_rows(device: str, capability: str) -> bool:
    """Whether the table holds any row of this kind of device."""
    return (device, capability) in _MEASURED_DEVICES


def cpu_thresholds(capability: Optional[str] = None) -> CpuThresholds:
    """The measured thresholds of the CPU ``capability`` (default: this machine's), else
    :data:`DEFAULT_CPU_THRESHOLDS`."""
    return _THRESHOLDS.get(_HOST if capability is None else capability, DEFAULT_CPU_THRESHOLDS)
