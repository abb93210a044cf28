"""The cpu backend against the reference on the CPU: the paper model's level-2 gate and the whole net.

Run ``python -m benchmarks.cpu_gate`` (``--help`` for options). Measured, never asserted:

* the level-2 gate of the paper's model (``x: Tensor[1, 32, 48, 48, 48]``,
  ``g: Tensor[1, 64, 24, 24, 24]``, ``W`` = 1x1 conv + BatchNorm), eval forward under
  :func:`torch.inference_mode` and training forward + backward, for backends ``reference``,
  ``cpu``, ``cpu-torch`` (the same without its native kernel, when that is available; see
  :mod:`attention_gates.ops.native`) and ``compile`` (with ``--compile``), with ``x`` and ``g`` contiguous and
  channels-last, all interleaved call by call, medians;
* its byte floor: reading ``x`` and ``g`` once and writing ``out`` and ``alpha`` once, at the
  bandwidth of a large ``Tensor.copy_`` measured in the same run (target: eval within 3x of it);
  and its FLOP floors: the multiply-adds (``FlopCounterMode``) of the eval forward and of the
  reference's training forward + backward, at the rate of a 1024^3 float32 matrix product
  measured in the same run; and the gate's matrix products alone (bare ``torch.mm`` at its
  shapes, the same multiply-adds) timed in the gate's own rounds, then one by one;
* the model: ``AttentionUNet3D`` with its gates on ``reference`` and on ``cpu``, and ``UNet3D``,
  eval inference of ``Tensor[1, 1, S, S, S]``, contiguous and channels-last, interleaved
  (target: AttentionUNet3D(cpu) / UNet3D <= 1.03), and its attention modules' matrix products
  alone (bare ``torch.mm``) interleaved with ``UNet3D``;
* the glibc allocator: the model benchmark in two subprocesses, without and with
  ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` (big tensors then stay in the heap
  instead of being mapped, page-faulted and unmapped on every call): time and peak RSS.

The machine may be shared: timings are interleaved so noise hits every variant alike, the load
average is recorded before and after, and the thread count and ``MALLOC_*`` variables are part
of the JSON written to ``benchmarks/results/cpu_gate/``. The table comes last, then each CPU
target judged by the run's numbers, then what they advise for this machine (threads, layout,
allocator, backend).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from attention_gates.ops import native

from . import common
from .gates import GateCase, copy_bandwidth, tensor_bytes

OUT_DIR = common.RESULTS_DIR / "cpu_gate"
X_SHAPE, G_SHAPE = (1, 32, 48, 48, 48), (1, 64, 24, 24, 24)  # level 2 of the paper model, 96^3 input
ALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


LAYOUTS = {"contiguous": False, "channels_last": True}


BACKEND_OF = {"cpu-torch": "cpu"}  # the cpu backend with its native kernel switched off


def _variant(name: str, fn: Callable[[], None]) -> Callable[[], None]:
    if name != "cpu-torch":
        return fn

    def without_kernel() -> None:
        with native.disabled():
            fn()

    return without_kernel


def gate_bench(backends: list[str], warmup: int, repeats: int, x_shape=X_SHAPE, g_shape=G_SHAPE) -> dict:
    """Level-2 gate per layout, mode and backend: timing summaries, the byte floor and the FLOPs.

    Every (layout, backend) pair of one mode is timed in the same interleaved rounds, so their
    ratios are paired; so is ``products``, the gate's matrix products alone for that mode
    (:func:`gate_products`: the forward's for eval, all of them for train).
    """
    cpu = torch.device("cpu")
    cases = {(lay, name): GateCase(BACKEND_OF.get(name, name), 2, x_shape, g_shape, cpu, channels_last=cl)
             for lay, cl in LAYOUTS.items() for name in backends}  # fmt: skip
    products = gate_products(x_shape, g_shape, x_shape[1])  # GateCase's F_int is x's channel count
    mm = _product_fns(products)
    out: dict = {lay: {} for lay in LAYOUTS}
    for mode in ("eval", "train"):
        _progress(f"gate {list(x_shape)}: timing {mode}, {len(cases)} variants and the products alone x {repeats} rounds")
        fns = {f"{lay}/{n}": _variant(n, c.fn(mode)) for (lay, n), c in cases.items()}
        fns["products"] = _sequence([mm[p["name"]] for p in products if mode == "train" or p["phase"] == "forward"])
        times = common.time_interleaved(fns, warmup=warmup, repeats=repeats, device=cpu)
        for (lay, n) in cases:
            out[lay].setdefault(mode, {})[n] = common.summarize(times[f"{lay}/{n}"])
        out.setdefault("products", {})[mode] = common.summarize(times["products"])
    case = next(iter(cases.values()))
    alpha_bytes = case.x.numel() // case.x.shape[1] * case.x.element_size()
    out["floor_bytes"] = 2 * tensor_bytes(case.x) + tensor_bytes(case.g) + alpha_bytes  # x, g in; out, alpha out
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        case.gate.eval()(case.x.detach(), case.g.detach())
    out["eval_flops"] = counter.get_total_flops()  # theta, phi, psi and W as convolutions (multiply-add = 2)
    reference = cases[("contiguous", "reference")]
    counter = FlopCounterMode(display=False)
    with counter:
        reference.train_step()
    out["train_flops"] = counter.get_total_flops()  # the reference's forward and backward: its convolutions' data and weight gradients
    return out


def gate_products(x_shape, g_shape, inter_channels: int, factor: int = 2) -> list[dict]:
    """Every matrix product a grid attention gate with ``W`` = 1x1 conv needs, as ``(M, K, N)``:
    ``[M, K] @ [K, N]`` over voxel rows, for the eval forward (``phase="forward"``) and the data
    and weight gradients of its training backward (``phase="backward"``).

    theta is a product over the ``factor``-patches (``K = F_l * factor^d``), phi one over ``g``'s
    voxels, psi one to a single output, ``W`` one over ``x``'s voxels. Their multiply-adds
    (``2 M K N`` each) are what :class:`~torch.utils.flop_counter.FlopCounterMode` counts for
    the reference's convolutions: forward, then each conv's input and weight gradients.
    """
    n, c, *s = x_shape
    fine = n * math.prod(s)
    coarse = n * math.prod(v // factor for v in s)
    gating = n * math.prod(g_shape[2:])
    k = c * factor ** len(s)
    forward = {"theta": (coarse, k, inter_channels), "phi": (gating, g_shape[1], inter_channels),
               "psi": (coarse, inter_channels, 1), "W": (fine, c, c)}  # fmt: skip
    out = [{"name": name, "phase": "forward", "mkn": mkn, "weight_grad": False} for name, mkn in forward.items()]
    for name, (rows, cin, cout) in forward.items():
        out.append({"name": f"{name} input grad", "phase": "backward", "mkn": (rows, cout, cin), "weight_grad": False})
        out.append({"name": f"{name} weight grad", "phase": "backward", "mkn": (cin, rows, cout), "weight_grad": True})
    return out


def _product_fns(products: list[dict]) -> dict[str, Callable[[], object]]:
    """A bare float32 ``torch.mm`` per product on contiguous operands, activations stored as
    voxel rows: a weight gradient's left operand is rows ``[voxels, channels]`` transposed (no copy)."""
    fns = {}
    for p in products:
        m, k, n = p["mkn"]
        a = torch.randn(k, m).t() if p["weight_grad"] else torch.randn(m, k)
        b, out = torch.randn(k, n), torch.empty(m, n)
        fns[p["name"]] = lambda a=a, b=b, out=out: torch.mm(a, b, out=out)
    return fns


def _sequence(fns: list[Callable[[], object]]) -> Callable[[], None]:
    def run() -> None:
        for f in fns:
            f()

    return run


def product_breakdown(x_shape, g_shape, inter_channels: int, warmup: int, repeats: int) -> list[dict]:
    """Each of the gate's products (:func:`gate_products`) timed alone, interleaved: median, FLOPs,
    GFLOP/s. With 32 channels they run well below a large square product's rate."""
    products = gate_products(x_shape, g_shape, inter_channels)
    times = common.time_interleaved(_product_fns(products), warmup=warmup, repeats=repeats, device=torch.device("cpu"))
    for p in products:
        p["median_s"] = common.summarize(times[p["name"]])["median"]
        p["flops"] = 2 * math.prod(p["mkn"])
        p["GFLOPps"] = p["flops"] / p["median_s"] / 1e9
    return products


def gemm_rate(warmup: int, repeats: int, n: int = 1024) -> dict:
    """FLOP/s of a float32 ``n x n x n`` matrix product: what the machine's arithmetic gives at best."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = common.time_interleaved({"mm": lambda: a @ b}, warmup=warmup, repeats=repeats, device=torch.device("cpu"))["mm"]
    median = common.summarize(times)["median"]
    return {"n": n, "median_s": median, "GFLOPps": 2 * n**3 / median / 1e9}


class _GateClock:
    """A network's forward with the time of its attention modules (gated skips and gating conv)
    summed per call by forward hooks: ``calls`` holds ``(total_s, attention_s)`` per call."""

    def __init__(self, net, fn: Callable[[], object]) -> None:
        self.fn, self.calls, self._spent = fn, [], 0.0
        modules = [*getattr(net, "gates", {}).values(), *([net.gating] if getattr(net, "gating", None) is not None else [])]
        for m in modules:
            m.register_forward_pre_hook(self._start)
            m.register_forward_hook(self._stop)

    def _start(self, module, args) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, module, args, out) -> None:
        self._spent += time.perf_counter() - self._t0

    def __call__(self) -> None:
        self._spent, t0 = 0.0, time.perf_counter()
        self.fn()
        self.calls.append((time.perf_counter() - t0, self._spent))


def _timing_gates(net, fn: Callable[[], object]) -> Callable[[], object]:
    return _GateClock(net, fn) if len(getattr(net, "gates", ())) else fn


def _nets(size: int, batch: int = 1) -> dict[str, Callable[[], object]]:
    """``UNet3D`` and ``AttentionUNet3D`` (gates on ``reference`` and ``cpu``), each contiguous and
    channels-last (network and input converted once, outside the timing)."""
    from attention_gates import AttentionUNet3D, UNet3D

    torch.manual_seed(0)
    x = torch.randn(batch, 1, size, size, size)
    nets = {
        "UNet3D": UNet3D().eval(),
        "AttentionUNet3D[reference]": AttentionUNet3D(backend="reference").eval(),
        "AttentionUNet3D[cpu]": AttentionUNet3D(backend="cpu").eval(),
    }
    nets["AttentionUNet3D[cpu]"].load_state_dict(nets["AttentionUNet3D[reference]"].state_dict())

    def call(net, inp):
        def f():
            with torch.inference_mode():
                net(inp)

        return f

    fns = {}
    for name, net in nets.items():
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
        fns[name] = _timing_gates(net, call(net, x))
        fns[f"{name}, channels_last"] = _timing_gates(cl, call(cl, x.contiguous(memory_format=torch.channels_last_3d)))
    return fns


def _layout(name: str) -> str:
    return "channels-last" if name.endswith("channels_last") else "contiguous"


def _baseline(name: str) -> str:
    """The ``UNet3D`` entry in the same layout as the network entry ``name``."""
    return "UNet3D, channels_last" if name.endswith("channels_last") else "UNet3D"


def _progress(msg: str) -> None:
    """A progress line on stderr (the table and the JSON path go to stdout)."""
    print(f"  {msg}", file=sys.stderr, flush=True)


def model_bench(size: int, warmup: int, repeats: int, batch: int = 1) -> dict:
    """Every network interleaved; for ``AttentionUNet3D`` also ``attention_share``: the median over
    timed calls of (its attention modules' time) / (the rest of the same call), an estimate of its
    time over ``UNet3D``'s (the rest is ``UNet3D``'s layers) measured within each call, so that a
    busy machine's drift between calls does not enter it."""
    fns = _nets(size, batch)
    times = common.time_interleaved(fns, warmup=warmup, repeats=repeats, device=torch.device("cpu"))
    out = {name: common.summarize(t) for name, t in times.items()}
    for name, fn in fns.items():
        if isinstance(fn, _GateClock):
            timed = fn.calls[-repeats:]
            out[name]["attention_share"] = statistics.median(a / (t - a) for t, a in timed)
    return out


def allocator_bench(size: int, warmup: int, repeats: int, rounds: int = 2, batch: int = 1) -> dict:
    """The model benchmark in a subprocess per allocator setting, alternating, ``rounds`` each: time and peak RSS."""
    runs: dict[str, list[dict]] = {"default": [], "no-mmap": []}
    for r in range(rounds):
        for name in runs:
            _progress(f"allocator {name}: model benchmark in a subprocess, round {r + 1} of {rounds}")
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            if name == "no-mmap":
                env.update(ALLOC_ENV)
            cmd = [sys.executable, "-m", "benchmarks.cpu_gate", "--model-child", "--size", str(size), "--batch", str(batch),
                   "--warmup", str(warmup), "--repeats", str(repeats), "--threads", str(torch.get_num_threads())]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = {}
    for name, results in runs.items():
        out[name] = {
            "env": ALLOC_ENV if name == "no-mmap" else {},
            "best_run_median_s": {net: sorted(r["model"][net]["median"] for r in results)[0] for net in results[0]["model"]},
            "peak_rss_bytes": max((r["peak_rss_bytes"] or 0) for r in results) or None,
            "minor_page_faults": min(r["minor_page_faults"] for r in results),
            "runs": results,
        }
    return out


def advice(result: dict) -> list[str]:
    """What the run's own numbers say a user should do on this machine, one line each."""
    lines = []
    threads, cores = result["config"]["threads"], result["machine"]["cpu_count"]
    lines.append(f"threads: torch used {threads} of {cores} logical cores; set torch.set_num_threads (or OMP_NUM_THREADS) "
                 "to the physical cores you were given, fewer when other jobs share them")  # fmt: skip
    load = max((result.get("load_average_before") or [0])[0], (result.get("load_average_after") or [0])[0])
    if cores and load > 0.5 * cores:
        lines.append(f"this machine was busy (load average {load} on {cores} cores): expect noise, compare ratios only")
    model = result["model"]
    lines.append(f"layout: channels_last_3d made UNet3D {model['UNet3D']['median'] / model['UNet3D, channels_last']['median']:.2f}x "
                 "faster here (net.to(memory_format=torch.channels_last_3d) and the input, converted once)")  # fmt: skip
    alloc = result.get("allocator")
    if alloc:
        d, m = alloc["default"], alloc["no-mmap"]
        speed = d["best_run_median_s"]["UNet3D"] / m["best_run_median_s"]["UNet3D"]
        rss = (m["peak_rss_bytes"] or 0) / (d["peak_rss_bytes"] or 1) - 1
        env = " ".join(f"{k}={v}" for k, v in m["env"].items())
        lines.append(f"allocator: {env} made UNet3D {speed:.2f}x faster here, peak RSS {100 * rss:+.0f}% "
                     f"({d['minor_page_faults']:,} -> {m['minor_page_faults']:,} page faults)")  # fmt: skip
    for lay in LAYOUTS:
        eval_ = result["gate_level2"][lay]["eval"]
        lines.append(f"gates ({lay}): the cpu backend ran the level-2 gate's inference "
                     f"{eval_['reference']['median'] / eval_['cpu']['median']:.2f}x faster than the reference "
                     "(backend='auto' takes it for float32 CPU inference)")  # fmt: skip
    return lines


def targets(result: dict) -> list[dict]:
    """The CPU targets, each judged by this run's numbers: ``{"target", "met", "line", ...}``.

    1. The level-2 gate's inference within 3x its byte floor (the faster layout on ``cpu``).
    2. Its training step at least 3x faster than the reference's (the better layout).
    3. ``AttentionUNet3D[cpu]`` at most 1.03x ``UNet3D`` in inference, estimated by the in-call
       share of its attention modules (the whole-network ratio, noisier, is reported beside it,
       and so is the share its attention modules' products alone take, :func:`model_products_bench`).

    The gate's lines also give the time its matrix products alone took in the same rounds
    (``gate_level2["products"]``): a target below it asks for faster products than this
    machine's matrix library gives at the gate's shapes, with every other pass free.
    """
    gate = result["gate_level2"]
    products = {mode: gate["products"][mode]["median"] for mode in ("eval", "train")}
    fmt = common.fmt_seconds
    best_eval = min(LAYOUTS, key=lambda lay: gate[lay]["eval"]["cpu"]["median"])
    eval_s, want = gate[best_eval]["eval"]["cpu"]["median"], 3 * gate["floor_s"]
    out = [{
        "target": "L2 gate eval <= 3x byte floor", "met": eval_s <= want, "measured_s": eval_s, "target_s": want,
        "products_s": products["eval"],
        "line": f"L2 gate eval on cpu ({best_eval}) {fmt(eval_s)} = {eval_s / gate['floor_s']:.1f}x its byte floor; "
                f"3x is {fmt(want)}, its products alone took {fmt(products['eval'])} "
                f"({products['eval'] / gate['floor_s']:.1f}x)",
    }]  # fmt: skip
    speed = {lay: gate[lay]["train"]["reference"]["median"] / gate[lay]["train"]["cpu"]["median"] for lay in LAYOUTS}
    best = max(speed, key=speed.get)
    want = gate[best]["train"]["reference"]["median"] / 3
    out.append({
        "target": "L2 gate train >= 3x faster than reference", "met": speed[best] >= 3, "speedup": speed, "target_s": want,
        "products_s": products["train"],
        "line": f"L2 gate train on cpu {speed[best]:.2f}x the reference ({best}; "
                + ", ".join(f"{lay} {v:.2f}x" for lay, v in speed.items() if lay != best)
                + f"); 3x is {fmt(want)}, its products alone took {fmt(products['train'])}",
    })  # fmt: skip
    model = result["model"]
    nets = [n for n in model if n.startswith("AttentionUNet3D[cpu]")]
    share = {n: model[n]["attention_share"] for n in nets if "attention_share" in model[n]}
    ratio = {n: model[n]["median"] / model[_baseline(n)]["median"] for n in nets}
    out.append({
        "target": "AttentionUNet3D / UNet3D <= 1.03", "met": bool(share) and max(share.values()) <= 0.03,
        "attention_share": share, "ratio": ratio,
        "products_share": result["model_products"]["share"],
        "line": "AttentionUNet3D[cpu] / UNet3D, in-call: " + ", ".join(f"1 + {v:.3f} {_layout(n)}" for n, v in share.items())
                + "; whole network: " + ", ".join(f"{v:.3f} {_layout(n)}" for n, v in ratio.items())
                + f"; the attention modules' products alone: 1 + {result['model_products']['share']:.3f} (channels-last)",
    })  # fmt: skip
    return out


def attention_products(net, x: torch.Tensor) -> list[tuple[str, tuple[int, int, int]]]:
    """The matrix products ``(name, (M, K, N))`` that ``net``'s attention modules run on the
    ``cpu`` backend in inference, from the shapes one call on ``x`` feeds them: per gated skip
    theta over the patches, phi, psi (the heads stacked) and the folded output map
    (``Tensor[heads * F_l, F_l]``) over ``x``'s voxels; the gating signal's 1x1 convolution."""
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, (m, a[0].shape, a[1].shape)) and None)
             for name, m in net.gates.items()]  # fmt: skip
    hooks.append(net.gating.register_forward_pre_hook(lambda m, a: seen.setdefault("gating", (m, a[0].shape, None)) and None))
    try:
        with torch.inference_mode():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for name, (m, xs, gs) in seen.items():
        if gs is None:  # the gating signal
            conv = next(c for c in m.modules() if isinstance(c, torch.nn.Conv3d))
            out.append((name, (xs[0] * math.prod(xs[2:]), conv.in_channels, conv.out_channels)))
            continue
        theta = m.gates[0].theta.weight
        heads, inter, c, k = m.heads, theta.shape[0], xs[1], theta.shape[2:]
        coarse = xs[0] * math.prod(s // kk for s, kk in zip(xs[2:], k))
        out += [(f"level {name} theta", (coarse, c * math.prod(k), heads * inter)),
                (f"level {name} phi", (gs[0] * math.prod(gs[2:]), gs[1], heads * inter)),
                (f"level {name} psi", (coarse, heads * inter, heads)),
                (f"level {name} output", (xs[0] * math.prod(xs[2:]), c, heads * c))]  # fmt: skip
    return out


def model_products_bench(size: int, warmup: int, repeats: int, batch: int = 1) -> dict:
    """``AttentionUNet3D``'s attention products alone (:func:`attention_products`, bare
    ``torch.mm``) interleaved with ``UNet3D`` channels-last: the part of the 3% target that
    arithmetic takes, the rest of the attention modules' time being pointwise passes,
    resampling and per-call cost."""
    from attention_gates import AttentionUNet3D, UNet3D

    torch.manual_seed(0)
    fmt = torch.channels_last_3d
    x = torch.randn(batch, 1, size, size, size).contiguous(memory_format=fmt)
    unet = UNet3D().eval().to(memory_format=fmt)
    products = [{"name": name, "mkn": mkn, "weight_grad": False}
                for name, mkn in attention_products(AttentionUNet3D(backend="cpu").eval().to(memory_format=fmt), x)]  # fmt: skip

    def unet_call() -> None:
        with torch.inference_mode():
            unet(x)

    fns = {"UNet3D, channels_last": unet_call, "products": _sequence(list(_product_fns(products).values()))}
    times = common.time_interleaved(fns, warmup=warmup, repeats=repeats, device=torch.device("cpu"))
    out = {name: common.summarize(t) for name, t in times.items()}
    return {
        "products": [{"name": p["name"], "mkn": p["mkn"]} for p in products],
        "flops": sum(2 * math.prod(p["mkn"]) for p in products),
        "products_s": out["products"]["median"],
        "UNet3D_s": out["UNet3D, channels_last"]["median"],
        "share": statistics.median(p / u for p, u in zip(times["products"], times["UNet3D, channels_last"])),
    }


def _model_child(args) -> None:
    result = {"model": model_bench(args.size, args.warmup, args.repeats, args.batch)}
    result["peak_rss_bytes"] = common.peak_rss()
    result["minor_page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # memory faulted in afresh
    print(json.dumps(result))


def main(argv=None) -> Optional[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per measurement (default 15)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="model input edge S (input Nx1xSxSxS, default 64)")
    p.add_argument("--batch", type=int, default=1, help="model input batch N (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time the 'compile' backend on the gate")
    p.add_argument("--skip-alloc", action="store_true", help="skip the allocator subprocesses")
    p.add_argument("--out", default=None, help=f"JSON file (default {OUT_DIR}/<time>.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: a small gate and model, 2 rounds, one allocator run each")
    p.add_argument("--model-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.size = 2, 1, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_child:
        _model_child(args)
        return None

    cpu = torch.device("cpu")
    result: dict = {"machine": common.machine_info(cpu), "load_average_before": common.load_average()}
    result["native_kernel"] = {"available": native.available(), "unavailable_reason": native.unavailable_reason()}
    result["config"] = {"threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                        "repeats": args.repeats, "warmup": args.warmup, "model_size": args.size, "model_batch": args.batch, "quick": args.quick}  # fmt: skip
    bw = copy_bandwidth(cpu, 2**25, args.warmup, max(args.repeats, 5))
    result["copy_bandwidth"] = bw
    result["gemm"] = gemm = gemm_rate(args.warmup, max(args.repeats, 5))
    backends = ["reference", "cpu"] + (["cpu-torch"] if native.available() else []) + (["compile"] if args.compile else [])
    if args.compile:
        common.allow_recompiles()
    t0 = time.perf_counter()
    shapes = ((1, 8, 16, 16, 16), (1, 16, 8, 8, 8)) if args.quick else (X_SHAPE, G_SHAPE)
    gate = gate_bench(backends, args.warmup, args.repeats, *shapes)
    gate["floor_s"] = gate["floor_bytes"] / (bw["GBps"] * 1e9)
    gate["flop_floor_s"] = gate["eval_flops"] / (gemm["GFLOPps"] * 1e9)
    gate["train_flop_floor_s"] = gate["train_flops"] / (gemm["GFLOPps"] * 1e9)
    result["gate_level2"] = gate
    _progress(f"the gate's matrix products one by one: {len(gate_products(*shapes, shapes[0][1]))} products x {max(args.repeats, 5)} rounds")
    result["products"] = product_breakdown(*shapes, shapes[0][1], args.warmup, max(args.repeats, 5))
    _progress(f"models at {args.batch}x{args.size}^3: timing 6 variants x {max(args.repeats // 3, 3)} rounds")
    result["model"] = model_bench(args.size, args.warmup, max(args.repeats // 3, 3), args.batch)
    _progress(f"the attention modules' products alone against UNet3D, {max(args.repeats // 3, 3)} rounds")
    result["model_products"] = model_products_bench(args.size, args.warmup, max(args.repeats // 3, 3), args.batch)
    if not args.skip_alloc:
        result["allocator"] = allocator_bench(args.size, 1, max(args.repeats // 5, 3), rounds=1 if args.quick else 2, batch=args.batch)
    result["wall_s"] = time.perf_counter() - t0
    result["load_average_after"] = common.load_average()

    rows = []
    for lay in LAYOUTS:
        for mode in ("eval", "train"):
            ref = gate[lay][mode]["reference"]["median"]
            for name in backends:
                s = gate[lay][mode][name]
                if mode == "eval":
                    note = f"{s['median'] / gate['floor_s']:.1f} x bytes, {s['median'] / gate['flop_floor_s']:.1f} x FLOPs"
                else:
                    note = f"{s['median'] / gate['train_flop_floor_s']:.1f} x FLOPs"
                rows.append([f"gate L2 {mode}, {lay}", name, common.fmt_seconds(s["median"]), common.fmt_seconds(s["iqr"]),
                             common.fmt_ratio(ref / s["median"]), note])  # fmt: skip
    for mode in ("eval", "train"):
        s = gate["products"][mode]
        note = f"{s['median'] / gate['floor_s']:.1f} x bytes" if mode == "eval" else ""
        rows.append([f"gate L2 {mode}", "its products alone", common.fmt_seconds(s["median"]), common.fmt_seconds(s["iqr"]), "-",
                     f"{note}{', ' if note else ''}bare torch.mm, in the same rounds"])  # fmt: skip
    for name, s in result["model"].items():
        unet = result["model"][_baseline(name)]["median"]
        note = f"{s['median'] / unet:.3f} x UNet3D (same layout)"
        if "attention_share" in s:
            note += f"; in-call: 1 + {s['attention_share']:.3f}"
        rows.append([f"model {args.batch}x{args.size}^3 eval", name, common.fmt_seconds(s["median"]), common.fmt_seconds(s["iqr"]), "-", note])
    for name, a in result.get("allocator", {}).items():
        best = a["best_run_median_s"]
        for net, med in best.items():
            if net.startswith("UNet3D"):
                note = f"peak RSS {common.fmt_bytes(a['peak_rss_bytes'])}, {a['minor_page_faults']} page faults"
            else:  # the ratio of the best runs, and each run's in-call share
                note = f"{med / best[_baseline(net)]:.3f} x UNet3D (same layout)"
                shares = [r["model"][net]["attention_share"] for r in a["runs"] if "attention_share" in r["model"][net]]
                if shares:
                    note += "; in-call: 1 + " + " / ".join(f"{v:.3f}" for v in shares)
            rows.append([f"alloc {name}", net, common.fmt_seconds(med), "-", "-", note])
    headers = ["case", "variant", "median", "IQR", "speed-up vs reference", "vs floor / note"]
    result["table"] = [dict(zip(headers, row)) for row in rows]  # as printed (the docs render it)
    result["advice"] = advice(result)
    result["targets"] = targets(result)
    path = Path(args.out) if args.out else OUT_DIR / time.strftime("%Y%m%d-%H%M%S.json")
    common.write_json(path, result)
    kernel = "available" if native.available() else f"unavailable ({native.unavailable_reason()})"
    print(f"threads {torch.get_num_threads()}, MALLOC_* {result['machine']['malloc_env'] or 'unset'}, cpu backend's native kernel {kernel}, "
          f"load average {result['load_average_before']} -> {result['load_average_after']}; "
          f"copy {bw['GBps']:.1f} GB/s, L2 eval byte floor {common.fmt_seconds(gate['floor_s'])} "
          f"({common.fmt_bytes(gate['floor_bytes'])}); {gemm['n']}^3 float32 matmul {gemm['GFLOPps']:.0f} GFLOP/s, "
          f"L2 FLOP floors: eval {common.fmt_seconds(gate['flop_floor_s'])} ({gate['eval_flops'] / 1e9:.2f} GFLOP), "
          f"train {common.fmt_seconds(gate['train_flop_floor_s'])} ({gate['train_flops'] / 1e9:.2f} GFLOP); JSON: {path}")  # fmt: skip
    print(common.format_table(headers, rows))
    print("\nThe L2 gate's matrix products one by one (bare torch.mm, interleaved; GFLOP/s in brackets):")
    for phase in ("forward", "backward"):
        each = [f"{p['name']} {common.fmt_seconds(p['median_s'])} ({p['GFLOPps']:.0f})" for p in result["products"] if p["phase"] == phase]
        print(f"  {phase}: " + ", ".join(each))
    print("Targets (issue 8):")
    for t in result["targets"]:
        print(f"  - {'met' if t['met'] else 'not met'}: {t['line']}")
    print("\nOn this machine:")
    for line in result["advice"]:
        print(f"  - {line}")
    return result


if __name__ == "__main__":
    main()
