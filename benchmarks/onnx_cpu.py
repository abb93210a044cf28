"""CPU inference of the paper model: :func:`attention_gates.cpu.optimize_for_inference` against
ONNX Runtime (and an AOTInductor package), side by side in one process.

``python -m benchmarks.onnx_cpu`` builds the paper model (``AttentionUNet3D()``: filters 16..256,
eval, float32; Kaiming weights, batch-norm statistics drawn at random with seed 0 so that every
fold does work), exports it once with :func:`attention_gates.deploy.export_onnx` (dynamic batch
and spatial sizes, as a user deploys it) and, per input size (batch 1, ``--sizes``, default 64^3,
96^3 and 128^3), runs:

* ``eager``: the model as built;
* ``optimize_for_inference``: the transform with its defaults;
* ``relu_epilogue``: the transform with ``relu_epilogue=True`` (the ReLUs as oneDNN's epilogue;
  NaN becomes 0 there);
* ``fuse=False``: the transform without its ``fuse`` step (what it was before convolutions, batch
  norms and ReLUs were fused), for the step's gain;
* ``onnxruntime``: the exported model in ONNX Runtime's CPU provider with its default graph
  optimizations (``ORT_ENABLE_ALL``), ``intra_op_num_threads = --threads``,
  ``inter_op_num_threads = 1``;
* ``aotinductor``, at ``--aoti-sizes`` (default 64^3; none to skip: compiling takes a minute or
  more): the network through :func:`torch.export.export` at that size and
  ``torch._inductor.aoti_compile_and_package``, loaded back.

PyTorch runs on ``--threads`` threads (default 2). All paths run in the same rounds, their order
reversed every other round, after ``--warmup`` rounds; per size the JSON keeps each path's
median (``ms``, the field the docs read) and quartiles (``quartiles_ms``), the paired ratios to
ONNX Runtime (the median and quartiles over the rounds of each round's time over ONNX Runtime's
in that round) and each path's largest absolute difference from the model as built. Both
runtimes' worker threads wait the same way: ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts)
makes PyTorch's sleep at once, and then ONNX Runtime's are told not to spin either
(``session.intra_op.allow_spinning = 0``); by default both spin. The JSON goes to
``benchmarks/results/<machine>/onnx_cpu.json``; a short table is printed last. The machine may be
shared: read the paired ratios, and the load average recorded with them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from . import common
from attention_gates import AttentionUNet3D, deploy
from attention_gates.cpu import optimize_for_inference

ORT = "onnxruntime"
EAGER = "eager"
OURS = "optimize_for_inference"
EPILOGUE = "relu_epilogue"
BEFORE = "fuse=False"
AOTI = "aotinductor"
TRANSFORMS = {OURS: {}, EPILOGUE: {"relu_epilogue": True}, BEFORE: {"fuse": False}}  # path -> optimize_for_inference's options
QUICK_FILTERS = (4, 8, 16, 32, 64)
EXPORT_SIZE = 32  # the export's example: batch 2, 32^3 (export fixes sizes of 1 and a one-voxel bottleneck)


def paper_model(filters: Optional[Sequence[int]] = None, seed: int = 0) -> nn.Module:
    """``AttentionUNet3D`` (``filters``, default the paper's) in eval mode, its batch norms given
    random running statistics and affine parameters (seeded), so that folding them does work."""
    torch.manual_seed(seed)
    net = AttentionUNet3D(filters=None if filters is None else list(filters)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2)):
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return net


def spinning() -> bool:
    """Whether worker threads spin while they wait: PyTorch's (OpenMP) unless
    ``OMP_WAIT_POLICY=PASSIVE``; ONNX Runtime's are set to match."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"


def ort_session(path: Path, threads: int):
    """ONNX Runtime's CPU session of ``path``: all graph optimizations, ``threads`` intra-op threads,
    one inter-op thread, spinning as :func:`spinning` says."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning() else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def aoti_package(net: nn.Module, x: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` exported at ``x``'s shape and compiled by AOTInductor into ``path``, loaded back."""
    import torch._inductor

    with torch.no_grad():
        program = torch.export.export(net, (x,))
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return torch._inductor.aoti_load_package(str(path))


def measure_size(size: int, net: nn.Module, session, args, tmp: Path) -> dict:
    """One input size: every path's timings, paired ratios to ONNX Runtime, and differences from eager."""
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    row: dict = {"size": size, "load_average_start": common.load_average()}
    feed = {session.get_inputs()[0].name: x.numpy()}

    def inference(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                return model(x)

        return run

    paths: dict[str, Callable[[], torch.Tensor]] = {EAGER: inference(net)}
    paths.update({name: inference(optimize_for_inference(net, **options)) for name, options in TRANSFORMS.items()})
    paths[ORT] = lambda: torch.from_numpy(session.run(None, feed)[0])
    if size in args.aoti_sizes:
        common.log(f"{size}^3: compiling an AOTInductor package")
        t0 = time.perf_counter()
        paths[AOTI] = inference(aoti_package(net, x, tmp / f"model_{size}.pt2"))
        row["aoti_compile_seconds"] = time.perf_counter() - t0
    want = paths[EAGER]()
    row["tolerance"] = deploy.allowed_difference(want)
    row["max_abs_diff"] = {name: (fn() - want).abs().max().item() for name, fn in paths.items() if name != EAGER}
    row["outputs_match"] = all(d <= row["tolerance"] for d in row["max_abs_diff"].values())
    common.log(f"{size}^3: {len(paths)} paths x {args.rounds} rounds")
    times = common.time_interleaved(paths, warmup=args.warmup, repeats=args.rounds, device=torch.device("cpu"))
    summaries = {name: common.summarize(t) for name, t in times.items()}
    row["ms"] = {name: 1e3 * s["median"] for name, s in summaries.items()}
    row["quartiles_ms"] = {name: [1e3 * s["q1"], 1e3 * s["q3"]] for name, s in summaries.items()}
    row["samples_ms"] = {name: [1e3 * v for v in t] for name, t in times.items()}
    row["ratio_to_onnxruntime"] = {
        name: _quartiles([a / b for a, b in zip(t, times[ORT])]) for name, t in times.items() if name != ORT
    }
    row["load_average_end"] = common.load_average()
    return row


def _quartiles(values: Sequence[float]) -> dict:
    s = common.summarize(values)
    return {"median": s["median"], "q1": s["q1"], "q3": s["q3"]}


def table(result: dict) -> str:
    """The printed summary: per size, each path's median ms, its paired ratio to ONNX Runtime, its difference from eager."""
    rows = []
    for r in result["results"]:
        for name, ms in r["ms"].items():
            ratio = r["ratio_to_onnxruntime"].get(name)
            cell = "1" if ratio is None else f"{ratio['median']:.3f} [{ratio['q1']:.3f}, {ratio['q3']:.3f}]"
            diff = r["max_abs_diff"].get(name)
            rows.append([f"{r['size']}^3", name, f"{ms:.1f}", cell, "-" if diff is None else f"{diff:.1e}"])
    head = ["input", "path", "median ms", "/ onnxruntime (paired: median [q1, q3])", "max |diff| from eager"]
    return common.format_table(head, rows)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onnx_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128], help="input edges, multiples of 16 (default 64 96 128)")
    p.add_argument("--aoti-sizes", type=int, nargs="*", default=[64],
                   help="sizes that also run an AOTInductor package (default 64; give none to skip: it compiles for a minute or more)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per size (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds per size (default 2)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch's and ONNX Runtime's intra-op threads (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: filters 4..64, 16^3, 2 rounds, no AOTInductor")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<machine>/onnx_cpu.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.aoti_sizes, args.rounds, args.warmup = [16], [], 2, 1
    if any(s < 16 or s % 16 for s in args.sizes):
        p.error(f"--sizes must be multiples of 16 (the paper model pools 4 times), got {args.sizes}")
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be at least 1 and --warmup at least 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import onnx
    import onnxruntime

    args = parse_args(argv)
    common.set_threads(args.threads)
    cpu = torch.device("cpu")
    path = common.output_path(args.out, cpu, "onnx_cpu")
    machine = common.machine_info(cpu)
    machine.update(onnxruntime=onnxruntime.__version__, onnx=onnx.__version__, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    result = {
        "benchmark": "onnx_cpu",
        "machine": machine,
        "load_average": {"start": common.load_average()},
        "settings": {
            "model": "AttentionUNet3D(filters=%s), eval, float32, batch 1" % list(QUICK_FILTERS if args.quick else (16, 32, 64, 128, 256)),
            "sizes": args.sizes, "aoti_sizes": [s for s in args.aoti_sizes if s in args.sizes], "rounds": args.rounds,
            "warmup": args.warmup, "torch_threads": args.threads, "ort_intra_op_threads": args.threads, "ort_inter_op_threads": 1,
            "ort_graph_optimization": "ORT_ENABLE_ALL", "threads_spin": spinning(),
            "onnx_export": f"attention_gates.deploy.export_onnx, dynamic sizes, example 2x1x{EXPORT_SIZE}^3",
        },  # fmt: skip
        "results": [],
    }
    net = paper_model(QUICK_FILTERS if args.quick else None)
    with tempfile.TemporaryDirectory(prefix="onnx_cpu_") as tmp:
        common.log("exporting to ONNX (dynamic sizes)")
        t0 = time.perf_counter()
        onnx_path = deploy.export_onnx(net, torch.randn(2, 1, EXPORT_SIZE, EXPORT_SIZE, EXPORT_SIZE), Path(tmp) / "model.onnx")
        result["onnx_export_seconds"] = time.perf_counter() - t0
        session = ort_session(onnx_path, args.threads)
        for size in args.sizes:
            result["results"].append(measure_size(size, net, session, args, Path(tmp)))
    result["load_average"]["end"] = common.load_average()
    result["outputs_match"] = all(r["outputs_match"] for r in result["results"])
    common.write_json(path, result)
    print(table(result))
    print(f"\nload average start/end: {result['load_average']['start']} / {result['load_average']['end']}; "
          f"threads spin: {spinning()}; JSON: {path}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
