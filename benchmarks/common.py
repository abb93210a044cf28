"""Shared pieces of the benchmark scripts: machine description, timing, backend probing, output."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from attention_gates.files import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GATE_BACKENDS = ("reference", "compile", "cpu", "triton")


def pick_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; otherwise ``name`` itself."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available in this torch build ({torch.__version__})")
    return device


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(query: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on (no host name), and the commit measured."""
    info = {
        "commit": commit(),
        "device": device.type,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "monai": _version("monai"),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "gpu": None,
        "cuda": None,
        "driver": None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_smi("driver_version")
    return info


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|R|TM)\)|cpu @.*$|processor", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def machine_tag(device: torch.device) -> str:
    """Default result folder name: ``cpu-<cpu model>`` or ``cuda-<gpu name>``."""
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    return "cpu-" + _slug(_cpu_model())


def load_average() -> Optional[list[float]]:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def summarize(samples: Sequence[float]) -> dict:
    """Median, quartiles, IQR, min and count of timings in seconds."""
    xs = sorted(samples)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": xs[0], "n": len(xs)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function, run round-robin: every repeat calls each function once.

    Interleaving spreads machine noise (other processes, frequency changes) over all functions
    alike instead of loading it onto whichever ran during a burst. On CUDA each call is timed
    with CUDA events and the device is synchronised after every round.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]  # no function always runs first
        if device.type == "cuda":
            events = {}
            for name in order:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                events[name] = (start, end)
            torch.cuda.synchronize(device)
            for name, (start, end) in events.items():
                times[name].append(start.elapsed_time(end) / 1e3)
        else:
            for name in order:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    return times


def allow_recompiles() -> None:
    """Let ``torch.compile`` keep one graph per benchmarked shape instead of falling back to eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def probe_backends(device: torch.device, *, compile_enabled: bool) -> tuple[list[str], dict[str, str]]:
    """The gate backends that run a small training gate on ``device``, and why the others are skipped.

    ``"compile"`` is tried only with ``compile_enabled``; every other backend is tried with a real
    forward and backward pass, so a backend that is declared but not built (or fails) is skipped
    with its error as the reason instead of aborting the benchmark.
    """
    from attention_gates import GridAttentionGate3D

    usable, skipped = [], {}
    for name in GATE_BACKENDS:
        if name == "compile" and not compile_enabled:
            skipped[name] = "torch.compile is off by default (its compile time): pass --compile"
            continue
        if name == "compile":
            allow_recompiles()
        gate = GridAttentionGate3D(4, 8, backend=name).to(device)
        x = torch.randn(2, 4, 4, 4, 4, device=device, requires_grad=True)
        g = torch.randn(2, 8, 2, 2, 2, device=device)
        try:
            out, _ = gate(x, g)
            out.sum().backward()
            synchronize(device)
        except Exception as e:  # noqa: BLE001 - any failure means "not usable here", reported verbatim
            skipped[name] = f"{type(e).__name__}: {' '.join(str(e).split())}"
            continue
        usable.append(name)
    return usable, skipped


def monai_nets():
    """``monai.networks.nets`` or ``None`` when MONAI is not installed."""
    try:
        import monai.networks.nets as nets
    except ImportError:
        return None
    return nets


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None or (isinstance(r, float) and math.isnan(r)) else f"{r:.3f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """``num / den``, ``None`` when either is missing or ``den`` is zero."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def write_json(path: Path, data, indent: int = 2) -> None:
    """Write ``data`` as JSON atomically (:func:`attention_gates.files.atomic_write`): a run cut
    short leaves the last complete file, never half of one."""
    atomic_write(path, json.dumps(data, indent=indent) + "\n")


def commit() -> str:
    """The git commit measured: ``$GIT_COMMIT`` where it is set (a copy of the tree without its git
    folder, such as the GPU machine's), else ``git rev-parse HEAD`` with ``-dirty`` appended when
    tracked files other than the results the benchmarks write themselves have uncommitted
    changes, else ``"unknown"``."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    written = [":(exclude)benchmarks/results", ":(exclude)attention_gates/ops/measured.json"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *written], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty.strip() else "")


def output_path(out: Optional[str], device: torch.device, script: str) -> Path:
    """``--out`` or the one current result of ``script`` on this machine: ``benchmarks/results/<machine tag>/<script>.json``."""
    path = Path(out) if out else RESULTS_DIR / machine_tag(device) / f"{script}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def output_dir(out: Optional[str], device: torch.device) -> Path:
    """``--out`` or ``benchmarks/results/<machine tag>``, created."""
    path = Path(out) if out else RESULTS_DIR / machine_tag(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def finish_axes(ax) -> None:
    """Grid, and a legend when something was drawn (else a 'not measured' mark)."""
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def set_threads(threads) -> None:
    """``torch.set_num_threads(threads)`` unless ``threads`` is ``None``; a positive int otherwise."""
    if threads is None:
        return
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    torch.set_num_threads(threads)


def pyplot():
    """matplotlib's pyplot on the Agg (file-only) backend, or ``None`` when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def peak_rss() -> int:
    """This process's peak resident set size in bytes.

    Linux's ``VmHWM`` belongs to the process's own address space; ``getrusage``'s ``ru_maxrss``
    would also carry the parent's peak at ``fork`` across ``exec``, so it is only the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def log(msg: str) -> None:
    """Progress goes to stderr; the tables go to stdout."""
    print(msg, file=sys.stderr, flush=True)


def warmup_repeats(timing: Mapping[str, tuple[int, int]], profile: str, args) -> tuple[int, int]:
    """The profile's ``(warm-up, repeats)`` from ``timing``, each overridden by ``args`` where given."""
    warmup, repeats = timing[profile]
    return (warmup if args.warmup is None else args.warmup, repeats if args.repeats is None else args.repeats)


def rss_in_child(module: str, spec: dict, *, what: str, timeout: float) -> dict:
    """Run ``python -m module --rss-child SPEC`` in a fresh process and return the JSON line it prints last.

    A fresh process is the only honest place for a peak RSS: this one's peak already holds every
    model it built before. ``what`` names the measurement in the error raised when the child fails.
    """
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", module, "--rss-child", json.dumps(spec)],
                          cwd=root, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"RSS subprocess for {what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
