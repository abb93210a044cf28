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
   (each input read once, each output written once) and the bytes the fused passes move, from
   the pass structure in :mod:`attention_gates.ops.triton.launch`.
3. Host work per call: the torch operations and Triton launches the launchers issue for one
   eval forward, training forward and backward (kernels stubbed, ops counted with a
   ``TorchDispatchMode``). Each costs microseconds of CPU time per call, which small gates on a
   fast GPU cannot hide: a count that needs no GPU to measure.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

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


def traffic(x_shape, g_shape, el: int) -> dict:
    """Byte floor and bytes moved by the fused passes, per mode (weights and per-channel vectors ignored)."""
    n, c = x_shape[:2]
    S = math.prod(x_shape[2:])
    X = n * c * S * el
    G = math.prod(g_shape) * el
    A = n * S * el  # alpha on x's grid, in x's dtype
    A32 = n * S * 4  # alpha as the kernels read it (float32)
    Ac = n * math.prod(g_shape[2:]) * 4  # alpha on theta's grid
    dx32 = n * c * S * 4
    floor = {"eval_forward": X + G + X + A, "train_forward": X + G + X + A, "train_backward": X + G + X + X + G}
    # passes (see attention_gates/ops/triton/launch.py); the fine kernels resample alpha from
    # alpha_c (Ac, small and cache-resident) themselves
    coarse_fwd = X + G + Ac
    fine_stats = X + Ac
    fine_out = X + Ac + X + A  # x in; out and alpha (x's dtype) out
    moved_eval = coarse_fwd + fine_out
    moved_train_fwd = moved_eval + fine_stats
    bwd_sums = X + X + Ac  # x, dout
    fine_bwd = X + X + Ac + dx32 + A32  # x, dout -> dx (float32), d alpha (float32)
    adjoint = A32 + Ac
    coarse_bwd = X + G + 2 * Ac + 2 * dx32 + G  # x, g, alpha_c, d alpha_c, dx read-modify-write, dg
    cast_dx = (dx32 + X) if el != 4 else 0
    moved_bwd = bwd_sums + fine_bwd + adjoint + coarse_bwd + cast_dx
    return {
        "floor": floor,
        "moved": {"eval_forward": moved_eval, "train_forward": moved_train_fwd, "train_backward": moved_bwd},
    }


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


class _KernelStub:
    """Stands for a Triton kernel: ``stub[grid](*args)`` counts the launch and computes nothing."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1

        return launch


def host_ops(x_shape=(2, 32, 16, 16, 12), g_shape=(2, 64, 8, 8, 6)) -> dict:
    """Per mode, the torch ops (all, and those that do device work) and Triton launches the fused
    gate's launchers issue for one call of a gate with W and BatchNorm (float32, CPU tensors; the
    kernels stubbed, so their outputs are garbage and only the counts mean anything)."""
    from types import SimpleNamespace

    from attention_gates.ops.triton import kernels, launch

    from triton.runtime.jit import KernelInterface  # JITFunction, or the interpreter's InterpretedFunction

    stubs = {n: _KernelStub() for n in dir(kernels) if isinstance(getattr(kernels, n), KernelInterface)}
    real = launch.K
    launch.K = SimpleNamespace(**stubs)
    try:
        C, CI = x_shape[1], x_shape[1]
        gate = GridAttentionGate3D(C, g_shape[1], CI)
        x, g = torch.randn(x_shape), torch.randn(g_shape)
        bn, conv = gate.W[1], gate.W[0]
        weights = (gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias, conv.weight, conv.bias, bn.weight, bn.bias)
        def count(call) -> tuple[dict, object]:
            before = sum(s.launches for s in stubs.values())
            with torch.no_grad(), _CountingMode() as counter:
                result = call()
            return {**counter.summary(), "launches": sum(s.launches for s in stubs.values()) - before}, result

        out = {}
        for mode, batch_stats in (("eval_forward", False), ("train_forward", True)):
            out[mode], fwd = count(
                lambda: launch.gate_forward(x, g, *weights, bn.running_mean, bn.running_var, batch_stats, 1e-5, False, False)
            )
        _, _, alpha_c, mean, var = fwd
        dout, alpha_c, var = torch.randn(x_shape), alpha_c.abs(), var.abs() + 1
        out["train_backward"], _ = count(
            lambda: launch.gate_backward(dout, None, x, g, *weights[:8], alpha_c, mean, var, True, 1e-5, False, False)
        )
        return out
    finally:
        launch.K = real


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first compiled
    out_dir = Path(argv[0] if argv else "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    from .common import machine_info

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
        row["traffic_fp32"] = traffic(xs, gs, 4)
        row["traffic_bf16"] = traffic(xs, gs, 2)
        result["paper"].append(row)
        del x, g, gate
    result["host_ops"] = host_ops()
    (out_dir / "gate_memory.json").write_text(json.dumps(result, indent=1))

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
