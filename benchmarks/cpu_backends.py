"""Which implementation of the gate wins on this CPU, where its paths cross over, and what the CPU
inference transform gains.

``python -m benchmarks.cpu_backends`` measures, side by side in interleaved rounds (medians):

1. **the crossovers**: where each size-dependent choice of the CPU paths should switch, the
   :class:`~attention_gates.ops.measured.CpuThresholds` of this CPU: a 1x1 convolution of a
   channels-last input by oneDNN or as a matrix product (``onednn_min_rows``), theta as a product
   of gathered patches or a oneDNN convolution (``patch_max_rows``), theta's input gradient by
   oneDNN's transposed convolution or a product and a strided add (``transposed_min_numel``): both
   sides of each over a sweep of sizes (:data:`SWEEPS`); the threshold is the one switch that makes
   the sweep fastest (:func:`crossing`).
2. **the gate**: the paper model's level-2 gate (``x: Tensor[1, 32, 48, 48, 48]``,
   ``g: Tensor[1, 64, 24, 24, 24]``, ``W`` + BatchNorm), eval forward under
   :func:`torch.inference_mode` and a training forward + backward, ``x`` contiguous and
   channels-last, on every gate backend that runs on the CPU: ``reference``, ``compile``
   (inductor) and ``cpu``. These are the rows of :mod:`attention_gates.ops.measured` for this
   machine's CPU (:func:`~attention_gates.ops.measured.host_capability`); ``--write-table`` adds
   them, and the crossovers, to the table.
3. **the network**: the paper's ``AttentionUNet3D`` with its gates on each backend, and
   ``UNet3D``, channels-last, batch 1 at ``--sizes`` (default 64^3 and 96^3): inference and a
   training step (forward + backward).
4. **the transform**: inference of ``AttentionUNet3D`` and ``UNet3D`` as built, and after
   :func:`attention_gates.cpu.optimize_for_inference` with every step and with each step left out.
5. **the allocator**: inference of the transformed ``AttentionUNet3D`` in child processes with
   glibc's default allocator and with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` (large
   tensors then stay in the heap instead of being mapped, page-faulted and unmapped on every
   call), the two alternating.

The gate rows are measured with the thresholds in effect when the run starts (the table's for this
CPU, else the defaults; the JSON records them): a run that changes the thresholds is followed by
another to measure the rows with them. The tables are printed last; the JSON (the commit measured,
the machine, its load, every timing summary) goes to ``benchmarks/results/<machine>/cpu_backends.json``.
The machine may be shared: only ratios from the same rounds mean anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from attention_gates import AttentionUNet3D, UNet3D
from attention_gates.cpu import optimize_for_inference
from attention_gates.ops import cpu_gate, measured, onednn

from . import common
from .gates import GateCase
from .measured_table import add_rows

X_SHAPE, G_SHAPE = (1, 32, 48, 48, 48), (1, 64, 24, 24, 24)  # level 2 of the paper model, 96^3 input
LAYOUTS = {"contiguous": False, "channels_last": True}
CL = torch.channels_last_3d


BACKENDS = ("reference", "compile", "cpu")
ALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def _ms(times: Sequence[float]) -> float:
    return 1e3 * common.summarize(times)["median"]


CL_FMT = {False: torch.contiguous_format, True: CL}
NEVER = measured.NEVER
SWEEPS = {
    # threshold: (the swept size's name, its values, the (channels in, channels out) configurations,
    #             the elements of x per unit of the size in the smallest configuration)
    "onednn_min_rows": ("voxels", [2**k for k in range(10, 18)], [(16, 16), (32, 32), (64, 64), (32, 1), (16, 2)], 16),
    "patch_max_rows": ("coarse voxels", [2**k for k in range(6, 14)], [(32, 32), (64, 64), (128, 128)], 8 * 32),
    "transposed_min_numel": ("elements of x", [2**k for k in range(16, 23)], [(16, 8), (32, 16), (32, 32)], 1),
}
"""What :func:`crossover_sweeps` measures for each :class:`~attention_gates.ops.measured.CpuThresholds` field."""
SAMPLE_ELEMENTS = 2**17  # a sweep's sample repeats a call on fewer elements of x until it covers about this many


def _cube(voxels: int) -> tuple[int, int, int]:
    """A 3D grid of ``voxels`` (a power of two) voxels, as near a cube as powers of two allow."""
    k = int(math.log2(voxels))
    a, b = k // 3, (k - k // 3) // 2
    return 2**a, 2**b, 2 ** (k - a - b)


def _sweep_point(threshold: str, size: int, c_in: int, c_out: int) -> dict[str, Callable[[], object]]:
    """The two sides of ``threshold``'s choice at one size: ``{"above": ..., "below": ...}``, where
    "above" is the path taken at sizes from the threshold on (oneDNN; for ``patch_max_rows`` the
    convolution) and "below" the other."""
    gen = torch.Generator().manual_seed(size + c_in)
    if threshold == "onednn_min_rows":
        x = torch.randn(1, c_in, *_cube(size), generator=gen).contiguous(memory_format=CL)
        w = torch.randn(c_out, c_in, generator=gen)
        return {"above": lambda: onednn.conv1x1(x, w, None, onednn_min_rows=0), "below": lambda: onednn.conv1x1(x, w, None, onednn_min_rows=NEVER)}
    if threshold == "patch_max_rows":
        x = torch.randn(1, c_in, *(2 * t for t in _cube(size)), generator=gen).contiguous(memory_format=CL)
        w = [torch.randn(c_out, c_in, 2, 2, 2, generator=gen)]
        return {"above": lambda: cpu_gate.theta(x, w, patch_max_rows=0), "below": lambda: cpu_gate.theta(x, w, patch_max_rows=NEVER)}
    voxels = size // c_in
    x = torch.randn(1, c_in, *_cube(voxels), generator=gen).contiguous(memory_format=CL)
    h, alpha = torch.randn_like(x), torch.rand(1, 1, *x.shape[2:], generator=gen).contiguous(memory_format=CL)
    w = torch.randn(c_out, c_in, 2, 2, 2, generator=gen)
    dt = torch.randn(1, c_out, *(s // 2 for s in x.shape[2:]), generator=gen).contiguous(memory_format=CL)

    def side(min_numel: int) -> Callable[[], object]:
        return lambda: cpu_gate.theta_backward(dt, x, w, need_weight=False, h=h, alpha=alpha, transposed_min_numel=min_numel)

    return {"above": side(0), "below": side(NEVER)}


def crossing(sizes: Sequence[int], ratios: Sequence[float], *, maximum: bool) -> int:
    """The threshold a sweep gives: ``ratios[i]`` is the time of the path taken above the threshold
    over that of the path below it, at ``sizes[i]`` (ascending).

    The one switch that makes the sweep fastest: the path above is taken from the size ``i`` that
    minimises ``sum(log(ratios[i:]))`` (the sweep's total log time; one noisy size cannot move the
    switch past the sizes around it). A minimum (``maximum=False``: the smallest size that takes the
    path above) is that size, a maximum (the largest size that takes the path below,
    ``patch_max_rows``) the size before it, 0 when the path above wins from the smallest size;
    :data:`NEVER` when no switch gains (the path below up to the largest size).
    """
    gains = [sum(math.log(r) for r in ratios[i:]) for i in range(len(sizes) + 1)]  # the last: never switch
    start = min(range(len(gains)), key=lambda i: (gains[i], -i))  # a tie keeps the path below longer
    if start == len(sizes):
        return NEVER
    if maximum:
        return sizes[start - 1] if start > 0 else 0
    return sizes[start]


def _repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def crossover_sweeps(warmup: int, repeats: int, points: Optional[int] = None) -> dict:
    """Per :data:`SWEEPS` threshold: both paths at every size and configuration, in interleaved rounds.

    A sample of a small size repeats the call (``calls``: about :data:`SAMPLE_ELEMENTS` elements
    per sample), so that no sample is a few microseconds of a machine that time-slices. Per size,
    the ratio ``above / below`` is the median over the rounds of each round's ratio of the two
    paths' times summed over the configurations: paired, and weighted by what each configuration
    costs (a path that is 5x slower on a cheap one-output product and 1.3x faster on the costly
    square one is faster overall). ``points`` keeps that many sizes of each sweep (the smallest; ``--quick``)."""
    cpu, out = torch.device("cpu"), {}
    for threshold, (what, sizes, configs, unit) in SWEEPS.items():
        sizes = sizes[:points] if points else sizes
        calls = {s: max(1, SAMPLE_ELEMENTS // (s * unit)) for s in sizes}
        fns = {f"{size}|{ci}x{co}|{side}": _repeated(fn, calls[size]) for size in sizes for ci, co in configs
               for side, fn in _sweep_point(threshold, size, ci, co).items()}  # fmt: skip
        _progress(f"crossover {threshold}: {len(fns)} variants x {repeats} rounds")
        times = common.time_interleaved(fns, warmup=warmup, repeats=repeats, device=cpu)
        ratios = []
        for s in sizes:
            total = {side: [sum(r) for r in zip(*(times[f"{s}|{ci}x{co}|{side}"] for ci, co in configs))] for side in ("above", "below")}
            ratios.append(common.summarize([a / b for a, b in zip(total["above"], total["below"])])["median"])
        out[threshold] = {
            "swept": what, "sizes": sizes, "configs": [list(c) for c in configs], "calls_per_sample": calls,
            "ms": {k: _ms(v) / calls[int(k.split("|")[0])] for k, v in times.items()},  # per call
            "above_over_below": ratios, "threshold": crossing(sizes, ratios, maximum=threshold == "patch_max_rows"),
        }  # fmt: skip
    return out


def gate_rows(warmup: int, repeats: int, x_shape=X_SHAPE, g_shape=G_SHAPE) -> list[dict]:
    """One row per (mode, layout): the median ms of every backend, all in the same rounds per mode."""
    cpu, rows = torch.device("cpu"), []
    cases = {(lay, b): GateCase(b, 2, x_shape, g_shape, cpu, channels_last=cl) for lay, cl in LAYOUTS.items() for b in BACKENDS}
    for mode in ("eval", "train"):
        _progress(f"gate {list(x_shape)}, {mode}: {len(cases)} variants x {repeats} rounds")
        times = common.time_interleaved({f"{lay}/{b}": c.fn(mode) for (lay, b), c in cases.items()}, warmup=warmup, repeats=repeats, device=cpu)
        for lay in LAYOUTS:
            rows.append({
                "device": "cpu", "capability": measured.host_capability(), "dtype": "float32", "mode": mode,
                "layout": lay, "context": "eager", "ms": {b: _ms(times[f"{lay}/{b}"]) for b in BACKENDS},
            })  # fmt: skip
    return rows


class _Net:
    """A network on ``backend`` (``None`` for UNet3D), channels-last, with its inference and training-step callables."""

    def __init__(self, net: torch.nn.Module, size: int, backend: Optional[str] = None) -> None:
        torch.manual_seed(0)
        self.net = net.to(memory_format=CL)
        if backend is not None:
            self.net.set_backend(backend)
        self.x = torch.randn(1, 1, size, size, size).contiguous(memory_format=CL)

    def infer(self) -> None:
        self.net.eval()
        with torch.inference_mode():
            self.net(self.x)

    def train_step(self) -> None:
        self.net.train()
        self.net.zero_grad(set_to_none=True)
        self.net(self.x).sum().backward()

    def fn(self, mode: str) -> Callable[[], None]:
        return self.infer if mode == "eval" else self.train_step


def network_rows(sizes: Sequence[int], warmup: int, repeats: int) -> list[dict]:
    """Per size and mode: the median ms of AttentionUNet3D on each gate backend and of UNet3D, in the same rounds."""
    rows, cpu = [], torch.device("cpu")
    for size in sizes:
        nets = {b: _Net(AttentionUNet3D(), size, b) for b in BACKENDS}
        nets["UNet3D"] = _Net(UNet3D(), size)
        for mode in ("eval", "train"):
            _progress(f"AttentionUNet3D at {size}^3, {mode}: {len(nets)} variants x {repeats} rounds")
            times = common.time_interleaved({k: n.fn(mode) for k, n in nets.items()}, warmup=warmup, repeats=repeats, device=cpu)
            rows.append({"size": size, "mode": mode, "ms": {k: _ms(t) for k, t in times.items()}})
    return rows


SECTIONS = ("crossovers", "gate", "network", "transform", "allocator")  # in the order they run

TRANSFORMS = {
    "as built": None,
    "optimize_for_inference": {},
    "  without fold": {"fold": False},
    "  without onednn": {"onednn": False},
    "  without channels_last": {"channels_last": False},
}


def transform_rows(sizes: Sequence[int], warmup: int, repeats: int) -> list[dict]:
    """Per size: inference of AttentionUNet3D and UNet3D as built and after the transform (and
    each of its steps left out), all in the same rounds; the input in the layout each model takes."""
    rows, cpu = [], torch.device("cpu")
    for size in sizes:
        fns = {}
        for arch, cls in (("AttentionUNet3D", AttentionUNet3D), ("UNet3D", UNet3D)):
            torch.manual_seed(0)
            base = cls().eval()
            for name, options in TRANSFORMS.items():
                net = base if options is None else optimize_for_inference(base, **options)
                cl = options is not None and options.get("channels_last", True)
                x = torch.randn(1, 1, size, size, size)
                x = x.contiguous(memory_format=CL) if cl else x

                def infer(net=net, x=x) -> None:
                    with torch.inference_mode():
                        net(x)

                fns[f"{arch}|{name}"] = infer
        _progress(f"transform at {size}^3: {len(fns)} variants x {repeats} rounds")
        times = common.time_interleaved(fns, warmup=warmup, repeats=repeats, device=cpu)
        rows.append({"size": size, "ms": {k: _ms(t) for k, t in times.items()}})
    return rows


def _allocator_child(size: int, warmup: int, repeats: int) -> None:
    """In a child process: median seconds of the transformed AttentionUNet3D's inference, as JSON on stdout."""
    torch.manual_seed(0)
    net = optimize_for_inference(AttentionUNet3D().eval())
    x = torch.randn(1, 1, size, size, size).contiguous(memory_format=CL)

    def infer() -> None:
        with torch.inference_mode():
            net(x)

    times = common.time_interleaved({"infer": infer}, warmup=warmup, repeats=repeats, device=torch.device("cpu"))["infer"]
    print(json.dumps({"median_s": common.summarize(times)["median"], "peak_rss": common.peak_rss()}))


def allocator_rows(sizes: Sequence[int], warmup: int, repeats: int, rounds: int = 3, threads: Optional[int] = None) -> list[dict]:
    """Per size: the transformed network's inference in child processes, default allocator and
    :data:`ALLOC_ENV` alternating ``rounds`` times; the medians of the children's medians."""
    rows = []
    for size in sizes:
        _progress(f"allocator at {size}^3: 2 settings x {rounds} child processes")
        got: dict[str, list[dict]] = {"default": [], "MALLOC_MMAP_MAX_=0": []}
        for _ in range(rounds):
            for name, extra in (("default", {}), ("MALLOC_MMAP_MAX_=0", ALLOC_ENV)):
                env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra
                cmd = [sys.executable, "-m", "benchmarks.cpu_backends", "--allocator-child", str(size),
                       "--warmup", str(warmup), "--repeats", str(repeats)] + (["--threads", str(threads)] if threads else [])  # fmt: skip
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                got[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        rows.append({
            "size": size,
            "ms": {k: 1e3 * common.summarize([r["median_s"] for r in v])["median"] for k, v in got.items()},
            "peak_rss": {k: max(r["peak_rss"] for r in v) for k, v in got.items()},
        })  # fmt: skip
    return rows


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def tables(result: dict) -> str:
    out = []
    if "crossovers" in result:
        out.append(f"crossovers on {result['thresholds']['capability']} (above/below: paired median over the rounds of the "
                   f"times summed over the configurations; below 1: the oneDNN or convolution side is faster):")  # fmt: skip
        for name, sweep in result["crossovers"].items():
            ratios = "  ".join(f"{s}: {r:.2f}" for s, r in zip(sweep["sizes"], sweep["above_over_below"]))
            value = "2**62 (one path always)" if sweep["threshold"] == NEVER else sweep["threshold"]
            out.append(f"  {name} = {value} ({sweep['swept']}; {ratios})")
        out.append("")
    if "gate" in result:
        out.append(f"level-2 gate {result['gate_shapes']} (ms, median; speed-up over the reference):")
        rows = [[r["mode"], r["layout"], *(f"{r['ms'][b]:.2f} ({r['ms']['reference'] / r['ms'][b]:.2f}x)" for b in BACKENDS),
                 measured.row_winner(r) or "reference"] for r in result["gate"]]  # fmt: skip
        out.append(common.format_table(["mode", "layout", *BACKENDS, "auto takes"], rows))
    for r in result.get("network", []):
        ms = r["ms"]
        out.append(f"\nAttentionUNet3D, channels-last, 1x1x{r['size']}^3, {r['mode']} (ms; speed-up over the reference gates; / UNet3D):")
        out.append(common.format_table(
            ["variant", "ms", "speed-up", "/ UNet3D"],
            [[k, f"{v:.1f}", f"{ms['reference'] / v:.3f}", f"{v / ms['UNet3D']:.3f}"] for k, v in ms.items()],
        ))  # fmt: skip
    for r in result.get("transform", []):
        ms = r["ms"]
        out.append(f"\ninference at 1x1x{r['size']}^3 (ms; speed-up over the model as built):")
        body = []
        for arch in ("AttentionUNet3D", "UNet3D"):
            built = ms[f"{arch}|as built"]
            body += [[f"{arch} {name.strip()}" if not name.startswith(" ") else f"  {name.strip()}", f"{ms[f'{arch}|{name}']:.1f}",
                      f"{built / ms[f'{arch}|{name}']:.3f}"] for name in TRANSFORMS]  # fmt: skip
        out.append(common.format_table(["model", "ms", "speed-up"], body))
        a, u = ms["AttentionUNet3D|optimize_for_inference"], ms["UNet3D|optimize_for_inference"]
        out.append(f"transformed AttentionUNet3D / transformed UNet3D: {a / u:.3f}")
    for r in result.get("allocator", []):
        d, m = r["ms"]["default"], r["ms"]["MALLOC_MMAP_MAX_=0"]
        out.append(f"\ntransformed AttentionUNet3D at 1x1x{r['size']}^3, allocator: default {d:.1f} ms, "
                   f"MALLOC_MMAP_MAX_=0 {m:.1f} ms ({d / m:.3f}x; peak RSS {common.fmt_bytes(r['peak_rss']['default'])} "
                   f"vs {common.fmt_bytes(r['peak_rss']['MALLOC_MMAP_MAX_=0'])})")  # fmt: skip
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_backends", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per gate measurement (default 15)")
    p.add_argument("--network-repeats", type=int, default=7, help="interleaved rounds per network measurement (default 7)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="network input edges (default 64 96)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="smoke run: a small gate, 24^3 networks, 2 rounds")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<machine>/cpu_backends.json)")
    p.add_argument("--write-table", action="store_true", help="add the gate rows and the crossovers to attention_gates/ops/measured.json")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure (default: all)")
    p.add_argument("--allocator-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    if args.allocator_child is not None:
        return _allocator_child(args.allocator_child, args.warmup, args.repeats)
    common.allow_recompiles()
    cpu = torch.device("cpu")
    shapes = ((1, 8, 8, 8, 8), (1, 16, 4, 4, 4)) if args.quick else (X_SHAPE, G_SHAPE)
    repeats, net_repeats, sizes = (2, 2, [24]) if args.quick else (args.repeats, args.network_repeats, args.sizes)
    result = {"script": "cpu_backends", "machine": common.machine_info(cpu), "load_before": common.load_average()}
    path = common.output_path(args.out, cpu, "cpu_backends")
    root = common.RESULTS_DIR.parent.parent
    source = str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)  # where rows point
    if "crossovers" in args.sections:
        result["crossovers"] = crossover_sweeps(args.warmup, repeats, points=2 if args.quick else None)
        result["thresholds"] = {
            "capability": measured.host_capability(), **{name: sweep["threshold"] for name, sweep in result["crossovers"].items()},
            "commit": result["machine"]["commit"], "machine": result["machine"]["cpu_model"], "source": source,
        }  # fmt: skip
    if "gate" in args.sections:
        result["gate_shapes"] = {"x": list(shapes[0]), "g": list(shapes[1])}
        result["gate_thresholds"] = measured.cpu_thresholds()._asdict()  # in effect for the gate rows
        result["gate"] = gate_rows(args.warmup, repeats, *shapes)
        for row in result["gate"]:
            row.update(commit=result["machine"]["commit"], machine=result["machine"]["cpu_model"], source=source)
    if "network" in args.sections:
        result["network"] = network_rows(sizes, args.warmup, net_repeats)
    if "transform" in args.sections:
        result["transform"] = transform_rows(sizes, args.warmup, net_repeats)
    if "allocator" in args.sections:
        result["allocator"] = allocator_rows(sizes, args.warmup, net_repeats, rounds=1 if args.quick else 3, threads=args.threads)
    result["load_after"] = common.load_average()
    common.write_json(path, result)
    if args.write_table and not args.quick:
        add_rows(result.get("gate", []), thresholds=[result["thresholds"]] if "thresholds" in result else [])
    print(tables(result))
    print(f"\nload average before/after: {result['load_before']} / {result['load_after']}; JSON: {path}")
    return result


if __name__ == "__main__":
    main()
