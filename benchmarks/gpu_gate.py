"""The fused gate on a GPU: the stages of ``benchmarks/gpu_check.sh``, one process each.

``python -m benchmarks.gpu_gate STAGE --out DIR`` with STAGE one of

- ``env``: the machine (GPU, driver, torch, Triton, multiprocessors, L2), a device-to-device
  copy's bandwidth (bytes read + written) and a bfloat16 matrix product's rate: ``env.json``;
- ``gate``: the paper model's level-2 gate (batch 2 of 160x160x96: x 2x32x80x80x48,
  g 2x64x40x40x24; one ``GridAttentionGate3D`` with W + BatchNorm) in one dtype, contiguous and
  channels-last, eval (eager and replayed as a CUDA graph) and training forward+backward, for
  the reference, ``compile`` and triton backends called eagerly, and for the gate called inside
  a ``torch.compile``'d function (the reference traced by inductor against the triton custom
  op); ``torch._dynamo.reset()`` before every compiled configuration. Writes
  ``gate_<dtype>.json`` and adds its rows to ``auto_rows.json``;
- ``tests``: the CUDA tests (``-m cuda``) dealt round-robin to ``--processes`` pytest processes
  (no pytest-xdist needed), stopped at ``--budget`` seconds: ``tests.json`` and one log each;
- ``levels``: the model's level-3 and level-4 gates, reference and triton, eager and graph eval
  and training, both dtypes: ``levels.json``;
- ``sanitize``: a small forward + backward of every kernel on odd sizes (run it under
  ``compute-sanitizer``);
- ``models``: UNet3D and AttentionUNet3D (reference and triton gates) training steps, time and
  peak memory (not in ``gpu_check.sh``'s default stages: its budget has no room);
- ``summary``: the short table of what the others wrote.

``python -m benchmarks.gpu_gate --check`` parses every stage's arguments and imports what they
use, without a GPU (what ``gpu_check.sh --dry-run`` runs). Times are medians of
``triton.testing.do_bench`` (CUDA events); JSON is written after every row (a stage cut by its
timeout keeps what it measured), atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import common

LEVELS = {  # the paper model's gates at batch 2 of 160x160x96: x and g shapes
    2: ((2, 32, 80, 80, 48), (2, 64, 40, 40, 24)),
    3: ((2, 64, 40, 40, 24), (2, 128, 20, 20, 12)),
    4: ((2, 128, 20, 20, 12), (2, 256, 10, 10, 6)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last")
STAGES = ("env", "gate", "tests", "levels", "sanitize", "models", "summary")
TEST_FILES = ("tests/test_triton.py",)  # the files with CUDA tests
DEVICE = "cuda"  # the tests run the gate stage's logic on the CPU with this set to "cpu"


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON atomically (:func:`benchmarks.common.write_json`)."""
    common.write_json(path, data, indent=1)


def read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def bench(fn: Callable[[], object], grads: Optional[list] = None) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``, after one untimed call)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median"))


def bench_graph(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` captured once as a CUDA graph and replayed."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


# ---------------------------------------------------------------- env


def stage_env(args) -> dict:
    import triton
    from triton.testing import do_bench

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    src = torch.randn(2**28, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm = do_bench(lambda: a @ b, return_mode="median")
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem", "--format=csv,noheader"],
                         capture_output=True, text=True)  # fmt: skip
    env = {
        "gpu": torch.cuda.get_device_name(dev), "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count, "l2_bytes": getattr(props, "L2_cache_size", None),
        "memory_bytes": props.total_memory, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "python": sys.version.split()[0], "nvidia_smi": smi.stdout.strip(), "commit": common.commit(),
        "copy_GBps": 2 * src.numel() * 4 / ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm / 1e9,
    }  # fmt: skip
    write_json(args.out / "env.json", env)
    print(json.dumps(env, indent=1))
    return env


# ---------------------------------------------------------------- the gate


class Gate:
    """One level's gate (W + BatchNorm) with inputs in a dtype and layout: a module per backend
    (the same weights), and their eval and training calls."""

    BACKENDS = ("reference", "compile", "triton")

    def __init__(self, level: int, dtype: torch.dtype, layout: str, seed: int = 0) -> None:
        import copy

        from attention_gates import GridAttentionGate3D

        xs, gs = LEVELS[level]
        fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        torch.manual_seed(seed)
        base = GridAttentionGate3D(xs[1], gs[1], xs[1]).to(DEVICE, dtype)
        self.gates = {}
        for backend in self.BACKENDS:
            self.gates[backend] = copy.deepcopy(base)
            self.gates[backend].backend = backend
        self.x = torch.randn(xs, device=DEVICE, generator=gen).to(dtype).contiguous(memory_format=fmt).requires_grad_()
        self.g = torch.randn(gs, device=DEVICE, generator=gen).to(dtype).contiguous(memory_format=fmt).requires_grad_()
        self.dout = torch.randn(xs, device=DEVICE, generator=gen).to(dtype).contiguous(memory_format=fmt)

    def forward(self, backend: str) -> Callable:
        """``(x, g) -> out`` of the backend's gate (what ``torch.compile`` wraps in the compiled context)."""
        gate = self.gates[backend]
        return lambda x, g: gate(x, g)[0]

    def eval_call(self, backend: str, fn: Callable) -> Callable[[], object]:
        gate = self.gates[backend]

        def call():
            gate.eval()
            with torch.no_grad():
                return fn(self.x, self.g)

        return call

    def train_call(self, backend: str, fn: Callable) -> Callable[[], object]:
        gate = self.gates[backend]

        def call():
            gate.train()
            fn(self.x, self.g).backward(self.dout)

        return call

    def grads(self, backend: str) -> list:
        return [self.x, self.g, *self.gates[backend].parameters()]


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def _measure(gate: Gate, backend: str, mode: str, compiled: bool = False) -> dict:
    """The backend's gate in ``mode``, called eagerly or inside a ``torch.compile``'d function:
    ``{"ms"}`` (and for eager eval ``"graph_ms"``, replayed as a CUDA graph), or ``{"error"}``
    where it raised (reported in the JSON; the stage goes on)."""
    try:
        fn = torch.compile(gate.forward(backend)) if compiled else gate.forward(backend)
        call = gate.eval_call(backend, fn) if mode == "eval" else gate.train_call(backend, fn)
        out = {"ms": bench(call, grads=gate.grads(backend) if mode == "train" else None)}
        if mode == "eval" and not compiled:
            out["graph_ms"] = bench_graph(call)
        return out
    except Exception as e:  # noqa: BLE001
        return {"error": _failure(e)}


def _error(gate: Gate, backend: str) -> float:
    """Largest |out - reference| / max |reference| in eval (a check that the timed code is right)."""
    ref = gate.eval_call("reference", gate.forward("reference"))().float()
    out = gate.eval_call(backend, gate.forward(backend))().float()
    return float((out - ref).abs().max() / ref.abs().max())


def stage_gate(args) -> list:
    """The level's gate in one dtype: the rows of ``auto_rows.json`` and everything measured."""
    import torch._dynamo

    env = read_json(args.out / "env.json", {})
    on_gpu = DEVICE == "cuda"
    gpu = env.get("gpu") or (torch.cuda.get_device_name() if on_gpu else "cpu")
    capability = "{}.{}".format(*torch.cuda.get_device_capability()) if on_gpu else "cpu"
    name = args.dtype
    detail_path = args.out / f"gate_{name}.json"
    detail = {"level": args.level, "dtype": name, "x": LEVELS[args.level][0], "g": LEVELS[args.level][1], "results": []}
    sha = common.commit()

    def record(result: dict) -> None:
        detail["results"].append(result)
        write_json(detail_path, detail)
        print(json.dumps(result), flush=True)

    rows = []
    for layout in LAYOUTS:
        gate = Gate(args.level, DTYPES[name], layout)
        for mode in ("eval", "train"):
            eager = {}
            for backend in ("reference", "triton", "compile"):
                if backend == "compile":
                    torch._dynamo.reset()
                eager[backend] = _measure(gate, backend, mode)
                record({"layout": layout, "mode": mode, "context": "eager", "backend": backend, **eager[backend]})
            compiled = {}
            for backend in ("reference", "triton"):  # the gate inside a compiled function
                torch._dynamo.reset()
                compiled[backend] = _measure(gate, backend, mode, compiled=True)
                record({"layout": layout, "mode": mode, "context": "compiled", "backend": backend, **compiled[backend]})
            for context, ms in (
                ("eager", {b: eager[b].get("ms") for b in ("reference", "compile", "triton")}),
                # inside torch.compile "compile" traces the reference too: one measurement, no separate number
                ("compiled", {"reference": compiled["reference"].get("ms"), "compile": None, "triton": compiled["triton"].get("ms")}),
            ):
                rows.append({"device": DEVICE, "capability": capability, "gpu": gpu, "dtype": name,
                             "mode": mode, "layout": layout, "context": context, "ms": ms, "commit": sha,
                             "machine": gpu, "source": "benchmarks/gpu_check.sh (auto_rows.json)"})  # fmt: skip
            _merge_rows(args.out / "auto_rows.json", rows)
        try:
            error = _error(gate, "triton")
        except Exception as e:  # noqa: BLE001
            error = _failure(e)
        detail.setdefault("eval_error_triton", {})[layout] = error
        write_json(detail_path, detail)
        del gate
        _free()
    return rows


def _free() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _merge_rows(path: Path, rows: list) -> None:
    """Add ``rows`` to the list in ``path``, replacing rows of the same (gpu, dtype, mode, layout, context)."""
    key = lambda r: (r["gpu"], r["dtype"], r["mode"], r["layout"], r["context"])  # noqa: E731
    new = {key(r) for r in rows}
    write_json(path, [r for r in read_json(path, []) if key(r) not in new] + rows)


def stage_levels(args) -> list:
    out_path = args.out / "levels.json"
    results = []
    for level in args.levels:
        for name in args.dtypes:
            gate = Gate(level, DTYPES[name], "contiguous")
            for mode in ("eval", "train"):
                for backend in ("reference", "triton"):
                    results.append({"level": level, "dtype": name, "mode": mode, "backend": backend, **_measure(gate, backend, mode)})
                    write_json(out_path, results)
                    print(json.dumps(results[-1]), flush=True)
            del gate
            _free()
    return results


def _pytest(*argv: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", *argv]


def stage_tests(args) -> dict:
    import re
    import time

    listed = subprocess.run(_pytest("--collect-only", *TEST_FILES), capture_output=True, text=True)
    ids = [line.strip() for line in listed.stdout.splitlines() if "::" in line]
    if not ids:
        raise SystemExit(f"no CUDA tests collected:\n{listed.stdout[-2000:]}{listed.stderr[-2000:]}")
    if args.collect_only:
        print(f"{len(ids)} CUDA tests collected from {', '.join(TEST_FILES)}")
        return {"collected": len(ids)}
    deadline = time.monotonic() + args.budget - 5
    procs = []
    for i in range(args.processes):
        log = open(args.out / f"tests_{i}.log", "w")
        procs.append((subprocess.Popen(_pytest("--timeout=60", "-rfE", *ids[i :: args.processes]), stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    counts = {"collected": len(ids), "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "unfinished_processes": 0}
    for i, (proc, _) in enumerate(procs):
        text = (args.out / f"tests_{i}.log").read_text()
        if proc.returncode is None or proc.returncode < 0:
            counts["unfinished_processes"] += 1
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped)", text.splitlines()[-1] if text.strip() else ""):
            counts["errors" if what.startswith("error") else what] += int(n)
        counts.setdefault("failures", []).extend(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.MULTILINE))
    write_json(args.out / "tests.json", counts)
    print(f"CUDA tests: {counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
          f"{counts['skipped']} skipped of {len(ids)} in {args.processes} processes; unfinished: {counts['unfinished_processes']}")  # fmt: skip
    for failure in counts.get("failures", []):
        print("  " + failure)
    return counts


def stage_sanitize(args) -> None:
    """Every kernel once, forward and backward, on odd sizes with masked tails (for compute-sanitizer)."""
    from attention_gates import GridAttentionGate3D

    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            gate = GridAttentionGate3D(20, 36, 12, subsample_factor=(2, 2, 1), backend="triton").cuda().to(dtype).train()
            x = torch.randn(2, 20, 9, 11, 7, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
            g = torch.randn(2, 36, 3, 4, 5, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
            out, alpha = gate(x, g)
            (out.float().square().mean() + alpha.float().mean()).backward()
            torch.cuda.synchronize()
            assert torch.isfinite(x.grad).all() and torch.isfinite(g.grad).all(), (dtype, fmt)
    print("fused forward + backward ran: float32, bfloat16; contiguous, channels-last")


def stage_models(args) -> list:
    from attention_gates import AttentionUNet3D, UNet3D

    x = torch.randn(2, 1, 160, 160, 96, device="cuda")
    rows = []
    for amp in (False, True):
        for name, make in (("UNet3D", lambda: UNet3D(1, 2)), ("AttentionUNet3D[reference]", lambda: AttentionUNet3D(1, 2, backend="reference")),
                           ("AttentionUNet3D[triton]", lambda: AttentionUNet3D(1, 2, backend="triton"))):  # fmt: skip
            net = make().cuda().train()
            opt = torch.optim.Adam(net.parameters(), 1e-4)

            def step():
                with torch.autocast("cuda", torch.bfloat16, enabled=amp):
                    y = net(x)
                y.float().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()
            torch.cuda.reset_peak_memory_stats()
            ms = bench(step)
            rows.append({"model": name, "amp_bf16": amp, "step_ms": ms, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30})
            write_json(args.out / "models.json", rows)
            print(json.dumps(rows[-1]), flush=True)
            net = opt = None
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- summary


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def summary_lines(out: Path) -> list[str]:
    """The short table: the machine, the level-2 rows (ms, and triton's speed-up over the best
    other), levels 3-4, and the tests' and the sanitizer's last lines."""
    lines = []
    env = read_json(out / "env.json", None)
    if env:
        lines.append(f"{env['gpu']} (sm {env['capability']}, {env['multiprocessors']} SMs), torch {env['torch']}, "
                     f"Triton {env['triton']}: copy {env['copy_GBps']:.0f} GB/s, bf16 mm {env['bf16_matmul_TFLOPs']:.0f} TFLOP/s")  # fmt: skip
    rows = read_json(out / "auto_rows.json", [])
    if rows:
        lines.append(f"{'dtype':9} {'mode':5} {'layout':13} {'context':8} {'reference':>9} {'compile':>8} {'triton':>8} {'best/triton':>11}")
        for r in rows:
            ms = r["ms"]
            others = [v for k, v in ms.items() if k != "triton" and v is not None]
            ratio = min(others) / ms["triton"] if others and ms.get("triton") else None
            lines.append(f"{r['dtype']:9} {r['mode']:5} {r['layout']:13} {r['context']:8} {_fmt(ms['reference']):>9} "
                         f"{_fmt(ms['compile']):>8} {_fmt(ms['triton']):>8} {_fmt(ratio):>11}")  # fmt: skip
    copy = env["copy_GBps"] if env else None
    for name, dtype in DTYPES.items():
        detail = read_json(out / f"gate_{name}.json", None)
        if not detail:
            continue
        x, g = detail["x"], detail["g"]
        el = torch.empty(0, dtype=dtype).element_size()
        floor = el * (2 * math.prod(x) + math.prod(g) + math.prod(x) // x[1])  # x, g in; out, alpha out
        for layout in LAYOUTS:
            graph = {d["backend"]: d.get("graph_ms") for d in detail["results"]
                     if d["layout"] == layout and d["mode"] == "eval" and d["context"] == "eager"}  # fmt: skip
            pct = f", triton at {100 * floor / graph['triton'] / 1e6 / copy:.0f}% of copy" if copy and graph.get("triton") else ""
            lines.append(f"eval as a CUDA graph, {name} {layout}: " + ", ".join(f"{b} {_fmt(v)} ms" for b, v in graph.items()) + pct)
    for r in read_json(out / "levels.json", []):
        lines.append(f"level {r['level']} {r['dtype']:9} {r['mode']:5} {r['backend']:9} "
                     + (f"{r['ms']:.3f} ms" + (f", graph {r['graph_ms']:.3f}" if "graph_ms" in r else "") if "ms" in r else r.get("error", "")))  # fmt: skip
    for log in ("tests.log", "memcheck.log", "stages.json"):
        path = out / log
        if path.exists():
            tail = [ln for ln in path.read_text().splitlines() if ln.strip()][-2:]
            lines.append(f"{log}: " + " | ".join(tail))
    return lines


def stage_summary(args) -> None:
    print("\n".join(summary_lines(args.out)))


# ---------------------------------------------------------------- entry


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", nargs="?", choices=STAGES, help="what to run (see the module docstring)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/gpu")), help="output folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="gate: the inputs' dtype")
    p.add_argument("--level", type=int, choices=sorted(LEVELS), default=2, help="gate: which of the model's gates")
    p.add_argument("--levels", type=int, nargs="+", choices=sorted(LEVELS), default=[3, 4], help="levels: which gates")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES), help="levels: which dtypes")
    p.add_argument("--processes", type=int, default=4, help="tests: parallel pytest processes")
    p.add_argument("--budget", type=float, default=60.0, help="tests: seconds before the processes are stopped")
    p.add_argument("--collect-only", action="store_true", help="tests: only collect (no GPU needed)")
    p.add_argument("--check", action="store_true", help="parse every stage's arguments and import what it uses (no GPU)")
    return p


CHECK_ARGS = {  # the arguments gpu_check.sh passes, parsed by --check
    "env": [], "gate": ["--dtype", "bfloat16"], "tests": ["--budget", "60"], "levels": ["--levels", "3", "4"],
    "sanitize": [], "models": [], "summary": [],
}


def check() -> None:
    """What ``gpu_check.sh --dry-run`` runs: every stage's arguments parse, its function exists,
    and the packages the stages import are importable."""
    import attention_gates  # noqa: F401
    import triton.testing  # noqa: F401

    from attention_gates import AttentionUNet3D, GridAttentionGate3D, UNet3D  # noqa: F401

    for stage, argv in CHECK_ARGS.items():
        args = parser().parse_args([stage, *argv])
        assert callable(globals()[f"stage_{args.stage}"]), stage
    print(f"gpu_gate: {len(CHECK_ARGS)} stages parse ({', '.join(CHECK_ARGS)}); torch {torch.__version__}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.check:
        check()
        return 0
    if args.stage is None:
        parser().error("a stage is required (or --check)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage not in ("summary", "tests") and DEVICE == "cuda" and not torch.cuda.is_available():
        print(f"stage {args.stage!r} needs a CUDA GPU (torch {torch.__version__} sees none)", file=sys.stderr)
        return 2
    globals()[f"stage_{args.stage}"](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
