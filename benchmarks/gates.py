"""Each grid attention gate of the paper's model at its real shapes, per backend, against its byte floor.

Run ``python -m benchmarks.gates`` (``--help`` for options). The paper's model gates the skips
of levels 2, 3 and 4; for an input ``S`` and batch ``N`` level ``l`` gates
``x: Tensor[N, f[l-1], *S / 2^(l-1)]`` with ``g: Tensor[N, f[l], *S / 2^l]``
(``f = 16, 32, 64, 128, 256``; ``F_int = f[l-1]``, subsample factor 2). On a GPU the default
input is the paper's batch 2 of 160x160x96 (level 2: x 2x32x80x80x48, g 2x64x40x40x24); on
the CPU a batch 2 of 64^3.

The model runs two gates (heads) per level; this benchmarks one :class:`GridAttentionGate3D`
per level (``W`` = 1x1 conv + BatchNorm, as in the model), in two modes:

* ``eval``: eval-mode forward under :func:`torch.inference_mode`;
* ``train``: training-mode forward (batch statistics) and backward of ``out`` with a given
  ``dout`` (gradients for ``x``, ``g`` and the weights).

The byte floor of a mode is what any implementation must move through memory at least once:
eval reads ``x``, ``g`` and the weights and writes ``out`` and ``alpha``; train also reads
``dout``, writes ``dx``, ``dg`` and the weight gradients and updates the running statistics.
Achieved GB/s = floor bytes / median time. The ceiling is a measured large ``Tensor.copy_``
(bytes read + written), reported as %-of-copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import common
from attention_gates import GridAttentionGate3D

FILTERS = (16, 32, 64, 128, 256)
LEVELS = (2, 3, 4)
DEFAULTS = {"cuda": ("160x160x96", 2), "cpu": ("64", 2), "quick": ("16", 2)}
TIMING = {"cuda": (10, 50), "cpu": (2, 10), "quick": (1, 2)}  # (warm-up, repeats) without do_bench
COPY_NUMEL = {"cuda": 2**28, "cpu": 2**25, "quick": 2**20}  # float32 elements of the copied tensor


def level_shapes(size: Sequence[int], batch: int, level: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(x shape, g shape)`` of the gate at ``level`` for a ``Tensor[batch, 1, *size]`` input."""
    xs = tuple(s // 2 ** (level - 1) for s in size)
    gs = tuple(s // 2**level for s in size)
    return (batch, FILTERS[level - 1], *xs), (batch, FILTERS[level], *gs)


def parse_size(text: str) -> tuple[int, int, int]:
    """``"64"`` -> ``(64, 64, 64)``; ``"160x160x96"`` -> ``(160, 160, 96)``; each side a multiple of 16."""
    parts = [int(p) for p in text.lower().split("x")]
    size = tuple(parts * 3) if len(parts) == 1 else tuple(parts)
    if len(size) != 3 or any(s < 16 or s % 16 for s in size):
        raise ValueError(f"--size must be one int or 3 ints joined by 'x', each a multiple of 16, got {text!r}")
    return size


def tensor_bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def byte_floor(gate: GridAttentionGate3D, x: torch.Tensor, g: torch.Tensor, mode: str) -> dict:
    """Bytes each mode must move at least once (see the module docstring), by part."""
    params = sum(tensor_bytes(p) for p in gate.parameters())
    buffers = sum(tensor_bytes(b) for b in gate.buffers() if b.is_floating_point())
    alpha = x.numel() // x.shape[1] * x.element_size()
    parts = {"x": tensor_bytes(x), "g": tensor_bytes(g), "out": tensor_bytes(x), "alpha": alpha, "weights": params + buffers}
    if mode == "train":
        parts.update(dout=tensor_bytes(x), dx=tensor_bytes(x), dg=tensor_bytes(g), weight_grads=params, running_stats=buffers)
    parts["total"] = sum(parts.values())
    return parts


class GateCase:
    """One gate (one backend) at one level: eval forward and train forward+backward callables.

    ``channels_last``: x, g and the output gradient stored channels_last_3d.
    """

    def __init__(self, backend: str, level: int, x_shape, g_shape, device: torch.device, channels_last: bool = False) -> None:
        torch.manual_seed(level)
        self.gate = GridAttentionGate3D(x_shape[1], g_shape[1], x_shape[1], backend=backend).to(device)
        gen = torch.Generator(device=device).manual_seed(level)
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.x = torch.randn(x_shape, device=device, generator=gen).contiguous(memory_format=fmt).requires_grad_()
        self.g = torch.randn(g_shape, device=device, generator=gen).contiguous(memory_format=fmt).requires_grad_()
        self.dout = torch.randn(x_shape, device=device, generator=gen).contiguous(memory_format=fmt)
        self.grads = [self.x, self.g, *self.gate.parameters()]

    def eval_forward(self) -> None:
        self.gate.eval()
        with torch.inference_mode():
            self.gate(self.x, self.g)

    def train_step(self) -> None:
        self.gate.train()
        for t in self.grads:
            t.grad = None
        out, _ = self.gate(self.x, self.g)
        out.backward(self.dout)

    def fn(self, mode: str) -> Callable[[], None]:
        return self.eval_forward if mode == "eval" else self.train_step


def do_bench_seconds(fn: Callable[[], None]) -> Optional[list[float]]:
    """Triton's ``do_bench`` quartiles (seconds), ``None`` when Triton is not importable."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    fn()  # compile / autotune first: do_bench sizes its repeats from its first timed calls
    torch.cuda.synchronize()
    q = do_bench(fn, quantiles=[0.25, 0.5, 0.75], return_mode="median")
    return [v / 1e3 for v in q]


def copy_bandwidth(device: torch.device, numel: int, warmup: int, repeats: int) -> dict:
    """A large float32 ``dst.copy_(src)``: bytes read + written per second."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    nbytes = 2 * tensor_bytes(src)
    q = do_bench_seconds(lambda: dst.copy_(src)) if device.type == "cuda" else None
    if q is None:
        stats = common.summarize(common.time_interleaved({"copy": lambda: dst.copy_(src)}, warmup=warmup,
                                                         repeats=max(repeats, 5), device=device)["copy"])  # fmt: skip
        q = [stats["q1"], stats["median"], stats["q3"]]
    return {"bytes": nbytes, "numel": numel, "median_s": q[1], "GBps": nbytes / q[1] / 1e9}


def time_cases(cases: dict[str, GateCase], mode: str, device: torch.device, warmup: int, repeats: int) -> dict[str, dict]:
    """Quartiles per backend: ``do_bench`` on CUDA with Triton, else interleaved timing."""
    out = {}
    if device.type == "cuda":
        for name, case in cases.items():
            q = do_bench_seconds(case.fn(mode))
            if q is not None:
                out[name] = {"q1": q[0], "median": q[1], "q3": q[2], "iqr": q[2] - q[0], "timer": "triton.testing.do_bench"}
    missing = {name: case.fn(mode) for name, case in cases.items() if name not in out}
    if missing:
        timer = "cuda events, interleaved" if device.type == "cuda" else "perf_counter, interleaved"
        for name, samples in common.time_interleaved(missing, warmup=warmup, repeats=repeats, device=device).items():
            out[name] = {**common.summarize(samples), "timer": timer, "samples": samples}
    return out


def plot(rows: list[dict], copy: dict, path: Path, device: torch.device) -> list[str]:
    plt = common.pyplot()
    if plt is None:
        return []
    modes = ["eval", "train"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    width = 0.8 / max(len(backends), 1)
    for ax, mode in zip(axes[0], modes):
        for i, b in enumerate(backends):
            pts = [r for r in rows if r["mode"] == mode and r["backend"] == b]
            ax.bar([r["level"] + (i - (len(backends) - 1) / 2) * width for r in pts], [r["GBps"] for r in pts], width, label=b)
        ax.axhline(copy["GBps"], color="k", linestyle="--", label=f"copy_ {copy['GBps']:.0f} GB/s")
        ax.set(xticks=list(LEVELS), xlabel="gated level", ylabel="GB/s over the byte floor",
               title=f"one gate, {mode} ({'forward' if mode == 'eval' else 'forward + backward'}), {device.type}")  # fmt: skip
        common.finish_axes(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gates", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:i]")
    p.add_argument("--size", help="the model's 3D input whose gates are benchmarked (default 160x160x96 on CUDA, 64 on the CPU)")
    p.add_argument("--batch", type=int, help="batch size (default 2)")
    p.add_argument("--warmup", type=int, help="untimed calls when not using do_bench (default 2 on the CPU)")
    p.add_argument("--repeats", type=int, help="timed calls when not using do_bench (default 10 on the CPU)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also benchmark the 'compile' backend (default: on CUDA only)")  # fmt: skip
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's)")
    p.add_argument("--quick", action="store_true", help="a 16^3 input, 1 warm-up, 2 repeats: checks that it runs")
    p.add_argument("--out", help="output folder (default: benchmarks/results/<machine tag>)")
    args = p.parse_args(argv)
    for name in ("batch", "warmup", "repeats", "threads"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (v == 0 and name != "warmup")):
            p.error(f"--{name} must be a positive int (warm-up may be 0), got {v}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    common.set_threads(args.threads)
    profile = "quick" if args.quick else device.type
    load_start = common.load_average()
    size_text, batch = DEFAULTS[profile]
    size = parse_size(args.size or size_text)
    batch = args.batch or batch
    warmup, repeats = common.warmup_repeats(TIMING, profile, args)
    compile_enabled = device.type == "cuda" if args.compile is None else args.compile
    backends, skipped = common.probe_backends(device, compile_enabled=compile_enabled)

    print(f"copy bandwidth ({common.fmt_bytes(4 * COPY_NUMEL[profile])} float32 copy_)", file=sys.stderr, flush=True)
    copy = copy_bandwidth(device, COPY_NUMEL[profile], warmup, repeats)
    rows = []
    for level in LEVELS:
        x_shape, g_shape = level_shapes(size, batch, level)
        cases = {b: GateCase(b, level, x_shape, g_shape, device) for b in backends}
        for mode in ("eval", "train"):
            print(f"level {level} {mode}: x {list(x_shape)}, g {list(g_shape)}", file=sys.stderr, flush=True)
            any_case = next(iter(cases.values()))
            floor = byte_floor(any_case.gate, any_case.x, any_case.g, mode)
            for b, t in time_cases(cases, mode, device, warmup, repeats).items():
                gbps = floor["total"] / t["median"] / 1e9
                rows.append({"level": level, "x_shape": list(x_shape), "g_shape": list(g_shape), "backend": b, "mode": mode,
                             "time_s": t, "floor_bytes": floor, "GBps": gbps, "pct_of_copy": 100 * gbps / copy["GBps"]})  # fmt: skip

    out_dir = common.output_dir(args.out, device)
    plots = plot(rows, copy, out_dir / f"gates_bandwidth_{device.type}.png", device)
    notes = [
        f"input {batch}x1x{'x'.join(map(str, size))}; one GridAttentionGate3D per level (the model runs 2 heads per "
        "level), F_int = F_l, subsample 2, W = 1x1 conv + BatchNorm, float32",
        "eval = eval-mode forward under inference_mode; train = training-mode forward + backward of out with a "
        "random dout (no optimizer step)",
        "byte floor: eval reads x, g, weights (+ BN running stats) and writes out, alpha; train adds reading dout "
        "and writing dx, dg, the weight gradients and the running statistics",
        f"ceiling: dst.copy_(src) of {COPY_NUMEL[profile]:,} float32 (bytes read + written) = {copy['GBps']:.1f} GB/s"
        + ("" if device.type == "cuda" else " (CPU: a DRAM copy with the torch threads, for scale)"),
    ]
    notes += [f"gate backend {k} skipped: {v}" for k, v in skipped.items()]
    result = {
        "benchmark": "gates",
        "machine": common.machine_info(device),
        "load_average": {"start": load_start, "end": common.load_average()},
        "settings": {"device": str(device), "profile": profile, "input": [batch, 1, *size], "warmup": warmup,
                     "repeats": repeats, "compile": compile_enabled, "dtype": "float32", "threads": torch.get_num_threads()},  # fmt: skip
        "backends": {"used": backends, "skipped": skipped},
        "copy": copy,
        "notes": notes,
        "results": rows,
        "plots": [Path(p).name for p in plots],
    }
    common.write_json(out_dir / "gates.json", result)

    print("notes:")
    for n in notes:
        print(f"  - {n}")
    print(f"\nload average: start {load_start}, end {result['load_average']['end']}; torch threads {torch.get_num_threads()}")
    print(f"written: {out_dir / 'gates.json'}" + "".join(f", {p}" for p in plots))
    headers = ["level", "x", "g", "mode", "backend", "median (IQR)", "floor", "GB/s", "% of copy"]
    body = [[str(r["level"]), "x".join(map(str, r["x_shape"])), "x".join(map(str, r["g_shape"])), r["mode"], r["backend"],
             f"{common.fmt_seconds(r['time_s']['median'])} ({common.fmt_seconds(r['time_s']['iqr'])})",
             common.fmt_bytes(r["floor_bytes"]["total"]), f"{r['GBps']:.2f}", f"{r['pct_of_copy']:.1f}"]
            for r in rows]  # fmt: skip
    print()
    print(common.format_table(headers, body))
    return result


if __name__ == "__main__":
    main()
