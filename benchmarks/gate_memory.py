"""What a gate keeps for backward, reference vs triton, and the bytes each pass moves.

``python -m benchmarks.gate_memory`` prints two tables and writes JSON
(``benchmarks/results/gate_memory.json``):

1. Saved for backward: the bytes of tensors that one training-mode :class:`GridAttentionGate3D`
   (``W`` + BatchNorm) saves for backward beyond its inputs, outputs and parameters (unique
   storages, counted with :func:`torch.autograd.graph.saved_tensors_hooks`). Counted for both
   backends at a small shape (the Triton kernels run through ``TRITON_INTERPRET=1`` without a
   GPU), counted for the reference at the paper model's gate shapes (batch 2, 160x160x96 input),
   and computed for triton there from what its autograd saves (alpha on theta's grid, float32,
   and W's mean and variance), a formula the small-shape count checks.
2. Traffic: for each mode (eval forward, training forward, training backward) the byte floor
   (each input read once, each output written once) and the bytes the fused launches move:
   the launches a call really makes, recorded (the launchers run, the kernels do not) as
   planned for an H100, each adding the tensors its kernel streams
   (:data:`attention_gates.ops.triton.launch.PASSES`, checked against the kernels' loads and
   stores under the interpreter by ``tests/test_triton.py``).
3. Host work per call: the torch operations and Triton launches the launchers issue for one
   eval forward, training forward and backward (kernels recorded, not run; ops counted with a
   ``TorchDispatchMode``). Each costs microseconds of CPU time per call, which small gates on a
   fast GPU cannot hide: a count that needs no GPU to measure (``tests/test_triton_codegen.py``
   keeps budgets on it).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attention_gates import GridAttentionGate3D

FILTERS = (16, 32, 64, 128, 256)
PAPER = (160, 160, 96)


def saved_bytes(gate: GridAttentionGate3D, x: torch.Tensor, g: torch.Tensor) -> int:
    """Bytes saved for backward beyond inputs, outputs and parameters (unique storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, alpha = gate(x, g)
    known = {p.untyped_storage().data_ptr() for p in gate.parameters()}
    known |= {t.untyped_storage().data_ptr() for t in (x, g, out, alpha)}
    return sum(n for ptr, n in seen.items() if ptr not in known)


def triton_saved_formula(x_shape, C: int, k: int = 2) -> int:
    """What the fused gate's autograd keeps besides inputs, outputs and parameters: alpha on
    theta's grid (float32) and W's batch mean and variance (float32)."""
    n = x_shape[0]
    coarse = math.prod(s // k for s in x_shape[2:])
    return 4 * n * coarse + 2 * 4 * C


class Launch(NamedTuple):
    """One kernel launch the launchers made: the kernel's name, its grid and its arguments by name."""

    kernel: str
    grid: tuple
    args: dict


class _KernelRecorder:
    """Stands for a Triton kernel: ``rec[grid](*args, **kwargs)`` records the launch and computes nothing."""

    def __init__(self, name: str, fn, log: list) -> None:
        self.name, self.arg_names, self.log = name, list(fn.arg_names), log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.name, tuple(grid), {**dict(zip(self.arg_names, args)), **kwargs}))

        return launch


@contextlib.contextmanager
def recorded_launches() -> Iterator[list]:
    """Inside: the fused gate's launchers record their kernel launches into the yielded list
    instead of running them (their outputs stay uninitialised; only the launches count)."""
    from types import SimpleNamespace

    from triton.runtime.jit import KernelInterface  # JITFunction, or the interpreter's InterpretedFunction

    from attention_gates.ops.triton import kernels, launch

    log: list = []
    real = launch.K
    launch.K = SimpleNamespace(**{
        n: _KernelRecorder(n, f, log) for n in dir(kernels) if isinstance(f := getattr(kernels, n), KernelInterface)
    })  # fmt: skip
    try:
        yield log
    finally:
        launch.K = real


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def launch_traffic(launches: list) -> int:
    """Bytes the launches move through device memory: per launch, every tensor its kernel
    streams (``attention_gates.ops.triton.launch.PASSES``) read or written once."""
    from attention_gates.ops.triton.launch import PASSES

    total = 0
    for rec in launches:
        reads, writes = PASSES[rec.kernel]
        streamed = {id(t): t for name in reads + writes if isinstance(t := rec.args.get(name), torch.Tensor)}
        total += sum(_nbytes(t) for t in streamed.values())  # a tensor passed twice is read once
    return total


def gate_tensors(x_shape, g_shape, dtype=torch.float32, device="meta", channels_last=False):
    """A level's gate as the launchers see it: ``(x, g, coarse, transform, running)`` with W +
    BatchNorm (``launch.CoarseWeights``, ``launch.OutputTransform``, the running statistics as
    ``launch.NormStats``), F_int = F_l, subsample factor 2 (tensors on ``device``: ``"meta"``
    allocates nothing)."""
    from attention_gates.ops.triton.launch import CoarseWeights, NormStats, OutputTransform

    C, CG = x_shape[1], g_shape[1]
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.empty(x_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    g = torch.empty(g_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)

    def f32(*shape):
        return torch.empty(shape, device=device, dtype=torch.float32)

    coarse = CoarseWeights(theta_w=f32(C, C, 2, 2, 2), phi_w=f32(C, CG, 1, 1, 1), phi_b=f32(C), psi_w=f32(1, C, 1, 1, 1), psi_b=f32(1))
    transform = OutputTransform(W_w=f32(C, C, 1, 1, 1), W_b=f32(C), gamma=f32(C), beta=f32(C))
    return x, g, coarse, transform, NormStats(mean=f32(C), var=f32(C))


def mode_calls(x, g, coarse, transform, running) -> dict:
    """Per mode, a call of the launchers for one gate (W + BatchNorm): eval forward, training
    forward, training backward (with the forward's outputs of the right shapes)."""
    from attention_gates.ops.triton.launch import GateFlags, NormStats, gate_backward, gate_forward

    N, C = x.shape[:2]
    f32 = dict(device=x.device, dtype=torch.float32)
    alpha_c = torch.empty((N, 1) + tuple(g.shape[2:]), **f32)
    batch = NormStats(mean=torch.empty(C, **f32), var=torch.empty(C, **f32))
    dout = torch.empty_like(x)

    def flags(training: bool) -> GateFlags:
        return GateFlags(use_batch_stats=training, eps=1e-5, softplus=False, align_corners=False)

    return {
        "eval_forward": lambda: gate_forward(x, g, coarse, transform, flags(False), running=running),
        "train_forward": lambda: gate_forward(x, g, coarse, transform, flags(True)),
        "train_backward": lambda: gate_backward(dout, None, x, g, coarse, transform._replace(beta=None), alpha_c, batch, flags(True)),
    }


H100 = ("sm90", 132)  # the GPU the traffic is planned for: Hopper tiles, 132 multiprocessors


def traffic(x_shape, g_shape, dtype=torch.float32, target=H100) -> dict:
    """Per mode, the byte floor (each input read once, each output written once; weights and
    per-channel vectors ignored) and the bytes the launches of one call move
    (``launch_traffic`` over the launches the launchers really make for ``target``, recorded)."""
    from attention_gates.ops.triton.launch import plan_for

    x, g, *groups = gate_tensors(x_shape, g_shape, dtype)
    X, G, A = _nbytes(x), _nbytes(g), _nbytes(x) // x.shape[1]
    floor = {"eval_forward": X + G + X + A, "train_forward": X + G + X + A, "train_backward": X + X + G + X + G}
    moved = {}
    for mode, call in mode_calls(x, g, *groups).items():
        with plan_for(*target), recorded_launches() as log:
            call()
        moved[mode] = launch_traffic(log)
    return {"floor": floor, "moved": moved}


class _CountingMode(TorchDispatchMode):
    """Counts the torch operations dispatched inside it; views and allocations apart (no device work)."""

    HOST_ONLY = ("empty", "new_empty", "empty_like", "view", "_unsafe_view", "reshape", "detach", "t", "permute",
                 "transpose", "expand", "alias", "slice", "select", "as_strided", "unsqueeze", "squeeze")  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        device = [op for op in self.ops if op not in self.HOST_ONLY]
        return {"torch_ops": len(self.ops), "device_ops": len(device), "ops": self.ops}


def host_ops(x_shape=(2, 32, 16, 16, 12), g_shape=(2, 64, 8, 8, 6)) -> dict:
    """Per mode, the torch ops (all, and those that do device work) and Triton launches (by
    kernel) the fused gate's launchers issue for one call of a gate with W and BatchNorm
    (float32, CPU tensors; the kernels recorded, not run)."""
    out = {}
    for mode, call in mode_calls(*gate_tensors(x_shape, g_shape, device="cpu")).items():
        with recorded_launches() as log, torch.no_grad(), _CountingMode() as counter:
            call()
        out[mode] = {**counter.summary(), "launches": len(log), "kernels": [rec.kernel for rec in log]}
    return out


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first compiled
    out_dir = Path(argv[0] if argv else "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    from .common import machine_info, write_json

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"machine": machine_info(dev), "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
              "small": [], "paper": []}
    # 1. counted, both backends, small shape
    small = (2, 32, 16, 16, 12)
    x = torch.randn(small, requires_grad=True)
    g = torch.randn(2, 64, 8, 8, 6, requires_grad=True)
    gate = GridAttentionGate3D(32, 64, 32).train()
    counts = {b: saved_bytes(gate.__setattr__("backend", b) or gate, x, g) for b in ("reference", "triton")}
    formula = triton_saved_formula(small, 32)
    result["small"] = {"x": list(small), "x_bytes": x.numel() * 4, **counts, "triton_formula": formula}
    # 2. paper shapes: reference counted, triton computed
    for level in (2, 3, 4):
        xs = (2, FILTERS[level - 1], *(s // 2 ** (level - 1) for s in PAPER))
        gs = (2, FILTERS[level], *(s // 2**level for s in PAPER))
        x = torch.randn(xs, requires_grad=True)
        g = torch.randn(gs, requires_grad=True)
        gate = GridAttentionGate3D(xs[1], gs[1], xs[1], backend="reference").train()
        ref = saved_bytes(gate, x, g)
        tri = triton_saved_formula(xs, xs[1])
        row = {"level": level, "x": list(xs), "g": list(gs), "x_bytes": x.numel() * 4, "reference": ref, "triton": tri}
        row["traffic_fp32"] = traffic(xs, gs, torch.float32)
        row["traffic_bf16"] = traffic(xs, gs, torch.bfloat16)
        result["paper"].append(row)
        del x, g, gate
    result["host_ops"] = host_ops()
    write_json(out_dir / "gate_memory.json", result, indent=1)

    s = result["small"]
    print(f"saved for backward at x={s['x']} (counted): reference {s['reference']:,} B, triton {s['triton']:,} B "
          f"({100 * s['triton'] / s['reference']:.1f}%), triton formula {s['triton_formula']:,} B")
    print("\nsaved for backward, paper model gates (batch 2, 160x160x96 input), one gate, training mode:")
    print(f"{'level':>5} {'x':>22} {'x MB':>8} {'reference MB':>13} {'ref/x':>6} {'triton MB':>10} {'triton/ref':>10}")
    for r in result["paper"]:
        print(f"{r['level']:>5} {str(r['x']):>22} {r['x_bytes'] / 1e6:8.1f} {r['reference'] / 1e6:13.1f} "
              f"{r['reference'] / r['x_bytes']:6.2f} {r['triton'] / 1e6:10.2f} {100 * r['triton'] / r['reference']:9.2f}%")
    print("\ntraffic per mode (MB), fused passes vs byte floor:")
    print(f"{'level':>5} {'dtype':>6} {'mode':>15} {'floor':>9} {'moved':>9} {'moved/floor':>11}")
    for r in result["paper"]:
        for dt in ("fp32", "bf16"):
            t = r[f"traffic_{dt}"]
            for mode in ("eval_forward", "train_forward", "train_backward"):
                f, m = t["floor"][mode], t["moved"][mode]
                print(f"{r['level']:>5} {dt:>6} {mode:>15} {f / 1e6:9.1f} {m / 1e6:9.1f} {m / f:11.2f}")
    print("\nhost work per call of the fused gate (W + BatchNorm): torch ops (those doing device work) and Triton launches:")
    for mode, h in result["host_ops"].items():
        print(f"{mode:>15} {h['torch_ops']:>4} ops ({h['device_ops']} device) {h['launches']:>3} launches")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
