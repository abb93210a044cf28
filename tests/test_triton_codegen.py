"""The fused gate's GPU code and launch structure, checked without a GPU.

The launches a call really makes are recorded (``benchmarks.gate_memory.recorded_launches``:
the launchers run, the kernels do not) as planned for an H100 (``launch.plan_for``), then

- each recorded kernel is compiled for sm_90 (Triton compiles for a target given explicitly;
  no driver needed) and its code is read: Hopper's tensor-core instructions (``wgmma``, or
  ``mma.sync`` where a dot has fewer than 64 rows) in every kernel with dot products, in TF32
  for float32 and in bfloat16 for bfloat16; no atomics (``atom.``/``red.``); no local-memory
  spills (ptxas' own report); shared memory within the limit; and as many programs per
  multiprocessor as the tile table's persistent grid assumes (registers and shared memory);
- the host work per call (torch operations, launches) stays within a budget per mode;
- the bytes the recorded launches move (``launch.PASSES``) stay within 1.5x the byte floor in
  eval and 2.5x in training (forward + backward) at the paper model's level-2 gate.

What runs on the GPU (speed, the numbers the table should come from) is not checked here.
These run in the unit suite (no ``TRITON_INTERPRET``): the kernels must be Triton's JIT
functions, not the interpreter's.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels are interpreted functions then: nothing to compile
    pytestmark = pytest.mark.skip(reason="compiles Triton kernels: runs in the unit suite, not the interpreter's")

from benchmarks.gate_memory import H100, gate_tensors, host_ops, mode_calls, recorded_launches, traffic  # noqa: E402

from attention_gates.ops.triton import kernels, launch, tiles  # noqa: E402

LEVELS = {  # the paper model's gates, batch 2 of 160x160x96: (x shape, g shape)
    2: ((2, 32, 80, 80, 48), (2, 64, 40, 40, 24)),
    3: ((2, 64, 40, 40, 24), (2, 128, 20, 20, 12)),
    4: ((2, 128, 20, 20, 12), (2, 256, 10, 10, 6)),
}
SM90 = (9, 0)
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024  # H100: 228 KB per multiprocessor, 227 KB for one block
SHARED_PER_BLOCK = 227 * 1024
DOT_KERNELS = {"coarse_fwd", "fine_stats", "fine_out", "fine_bwd_sums", "fine_bwd", "coarse_bwd", "patch_bwd"}
COARSE_KERNELS = {"coarse_fwd", "alpha_adjoint_kernel", "coarse_bwd", "patch_bwd"}


def record(level: int, dtype: torch.dtype, channels_last: bool) -> list:
    """Every launch of an eval forward, a training forward and a training backward of the
    level's gate (W + BatchNorm), planned for an H100."""
    with launch.plan_for(*H100), recorded_launches() as log:
        for call in mode_calls(*gate_tensors(*LEVELS[level], dtype, channels_last=channels_last)).values():
            call()
    return log


def _compile(rec):
    """The recorded launch's kernel compiled for sm_90 as the JIT would specialise it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(kernels, rec.kernel)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [rec.args[name] for name in fn.arg_names]
    options = {k: v for k, v in rec.args.items() if k not in fn.arg_names}
    bound, specialization, opts = binder(*args, **options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)


def _ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes from ptxas' verbose report (the ptxas Triton itself uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return {"registers": int(re.search(r"Used (\d+) registers", out).group(1)), "spill_bytes": sum(spills), "ptxas": out}


@functools.lru_cache(maxsize=None)
def _facts(key):
    rec = _RECORDS[key]
    compiled = _compile(rec)
    ptx = compiled.asm["ptx"]
    return {
        **_ptxas_report(ptx),
        "wgmma": re.findall(r"wgmma\.mma_async\.\S+", ptx),
        "mma": re.findall(r"\bmma\.sync\.\S+", ptx),
        "atomics": re.findall(r"\b(?:atom|red)\.\S+", ptx),
        "local": re.findall(r"\b(?:ld|st)\.local\S*", ptx),
        "shared": compiled.metadata.shared,
        "warps": compiled.metadata.num_warps,
    }


_RECORDS: dict = {}


def kernel_facts(level: int, dtype: torch.dtype, channels_last: bool) -> dict:
    """Per distinct recorded kernel (name and compile-time constants): its launch and the facts of its sm_90 code."""
    out = {}
    for rec in record(level, dtype, channels_last):
        consts = tuple(sorted((k, v) for k, v in rec.args.items() if not isinstance(v, torch.Tensor) and k.isupper()))
        key = (rec.kernel, consts, str(dtype), channels_last)
        _RECORDS[key] = rec
        out[(rec.kernel, consts)] = (rec, _facts(key))
    return out


CONFIGS = [
    pytest.param(2, torch.float32, False, id="l2-fp32"),
    pytest.param(2, torch.bfloat16, True, id="l2-bf16-channels_last"),
    pytest.param(3, torch.float32, True, id="l3-fp32-channels_last", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("level,dtype,channels_last", CONFIGS)
def test_sm90_code(level, dtype, channels_last):
    """Every kernel of a training step compiles for sm_90 with tensor-core dots, no atomics,
    no spills, and the occupancy its persistent grid assumes."""
    facts = kernel_facts(level, dtype, channels_last)
    assert {name for name, _ in facts} >= DOT_KERNELS | {"sum_rows", "stats_combine", "alpha_adjoint_kernel"}
    row = tiles.lookup("sm90", launch.block_size(LEVELS[level][0][1]))  # F_int = F_l
    operand = {torch.float32: "tf32", torch.bfloat16: "bf16"}[dtype]
    for (name, _), (rec, f) in facts.items():
        where = f"{name} (level {level}, {dtype}, {'channels-last' if channels_last else 'contiguous'})"
        assert f["spill_bytes"] == 0 and not f["local"], f"{where} spills to local memory:\n{f['ptxas']}"
        assert not f["atomics"], f"{where} uses atomics: {f['atomics'][:3]}"
        assert f["shared"] <= SHARED_PER_BLOCK, f"{where}: {f['shared']} bytes of shared memory"
        if name in DOT_KERNELS:
            mma = f["wgmma"] + f["mma"]
            assert mma, f"{where}: no tensor-core instruction"
            assert all(f".{operand}" in m for m in mma), f"{where}: dots not in {operand}: {sorted(set(mma))[:3]}"
        if rec.grid[0] > 1 and name != "sum_rows":  # a persistent grid: its programs must fit on the SMs at once
            per_sm = row.coarse_per_sm if name in COARSE_KERNELS else row.fine_per_sm
            assert rec.grid[0] <= H100[1] * per_sm
            threads = 32 * f["warps"]
            assert f["registers"] * threads * per_sm <= REGISTERS_PER_SM, f"{where}: {f['registers']} registers x {threads} threads x {per_sm}"
            assert f["shared"] * per_sm <= SHARED_PER_SM, f"{where}: {f['shared']} bytes x {per_sm}"


def test_wgmma_at_level2_fp32():
    """At the paper's level-2 gate in float32 the big dots are Hopper's wgmma, in TF32."""
    facts = kernel_facts(2, torch.float32, False)
    for name in ("coarse_fwd", "fine_out", "coarse_bwd", "patch_bwd"):
        (f,) = [f for (n, _), (_, f) in facts.items() if n == name]
        assert f["wgmma"] and all(".tf32.tf32" in m for m in f["wgmma"]), name


def test_tf32x3_and_ieee_compile():
    """With TF32 turned off the float32 dots stay on the tensor cores (tf32x3, three TF32
    products); "ieee" (the interpreter's) has no tensor-core form: it is never chosen on a GPU."""
    rec = next(r for r in record(2, torch.float32, False) if r.kernel == "coarse_fwd")
    for prec, on_tensor_cores in (("tf32x3", True), ("ieee", False)):
        key = ("coarse_fwd-" + prec,)
        _RECORDS[key] = rec._replace(args={**rec.args, "PREC": prec})
        f = _facts(key)
        assert bool(f["wgmma"] or f["mma"]) is on_tensor_cores, prec


def test_dot_precision_follows_pytorch_flags():
    x32 = torch.empty(1, 2, 4, 4)
    assert launch.dot_precision(x32) == "ieee"  # CPU (or the interpreter): no tensor cores
    with launch.plan_for(*H100):
        assert launch.dot_precision(x32.bfloat16()) == "ieee"  # 16-bit operands: their own dtype
        assert launch.dot_precision(x32.double()) == "ieee"
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
            assert launch.dot_precision(x32) == "tf32"
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            assert launch.dot_precision(x32) == "tf32x3"
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):  # the newer API: cuDNN's convolutions alone
            before = conv.fp32_precision
            try:
                conv.fp32_precision = "ieee"
                assert launch.dot_precision(x32) == "tf32x3"
                conv.fp32_precision = "tf32"
                assert launch.dot_precision(x32) == "tf32"
            finally:
                conv.fp32_precision = before


def test_shape_reasons():
    from attention_gates.ops.triton.support import shape_reasons

    def meta(*shape):
        return torch.empty(shape, device="meta")

    assert shape_reasons(meta(2, 256, 4, 4, 4), meta(2, 512, 2, 2, 2), meta(256, 256, 2, 2, 2)) == []
    reasons = shape_reasons(meta(2, 257, 4, 4, 4), meta(2, 513, 2, 2, 2), meta(300, 257, 2, 2, 2))
    assert len(reasons) == 3
    assert "x has 257 channels" in reasons[0] and "inter_channels 300" in reasons[1] and "g has 513 channels" in reasons[2]


def test_large_samples_take_64bit_offsets():
    """A sample of 2^31 elements or more is supported: its launches take 64-bit offsets."""
    from attention_gates.ops.triton.support import shape_reasons

    theta = torch.empty(32, 32, 2, 2, 2, device="meta")
    big = torch.empty(1, 32, 1024, 1024, 64, device="meta")  # 2^31 elements in one sample
    small = torch.empty(64, 32, 64, 64, 64, device="meta")  # 2^29 per sample, 2^35 in all
    assert shape_reasons(big, big[:, :, ::2, ::2, ::2], theta) == []
    assert launch.make_plan(big, big[:, :, ::2, ::2, ::2], theta, False, False).I64
    assert not launch.make_plan(small, small[:, :, ::2, ::2, ::2], theta, False, False).I64


def test_plan_for_is_per_thread():
    """``plan_for`` in one thread plans that thread's calls for the GPU it names and leaves
    another thread's calls, made while it is open, planned for their own (CPU) tensors."""
    import threading

    x, g = (torch.empty(shape, device="meta") for shape in LEVELS[2])
    theta = torch.empty(32, 32, 2, 2, 2, device="meta")
    opened, looked = threading.Event(), threading.Event()
    seen = {}

    def plan(key: str) -> None:
        p = launch.make_plan(x, g, theta, False, False)
        seen[key] = (p.fine.programs, p.PREC, launch.dot_precision(torch.empty(1, 1, 1)))

    def planning_thread() -> None:
        with launch.plan_for(*H100):
            plan("inside")
            opened.set()
            looked.wait(timeout=60)
            plan("inside, after the other thread")
        plan("after")

    def other_thread() -> None:
        opened.wait(timeout=60)
        plan("other")
        looked.set()

    threads = [threading.Thread(target=planning_thread), threading.Thread(target=other_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    tf32 = "tf32" if launch.cudnn_conv_tf32() else "tf32x3"  # PyTorch's flags (process-wide) decide which
    gpu = (H100[1] * tiles.lookup("sm90", 32).fine_per_sm, tf32, tf32)
    cpu = (tiles.INTERPRETER_PROGRAMS, "ieee", "ieee")
    assert seen == {"inside": gpu, "inside, after the other thread": gpu, "other": cpu, "after": cpu}


def test_plan_for_rejects_unknown_arch():
    with pytest.raises(ValueError, match="arch must be one of"):
        with launch.plan_for("sm75", 40):
            pass


def test_tile_table_rows():
    """Every architecture has a row for every channel bucket the kernels take, and the
    lookup takes the first bucket that holds the channels."""
    from attention_gates.ops.triton.support import MAX_CHANNELS

    for arch, rows in tiles.TABLE.items():
        assert max(rows) >= MAX_CHANNELS, arch
        for bucket, row in rows.items():
            assert min(row.coarse_block, row.patch_block, row.fine_block) >= 16  # tl.dot's smallest operand
            assert row.coarse_per_sm >= 1 and row.fine_per_sm >= 1
    assert tiles.lookup("sm90", 16) == tiles.TABLE["sm90"][32]
    assert tiles.lookup("sm90", 128) == tiles.TABLE["sm90"][128]
    assert tiles.arch_key((9, 0)) == "sm90" and tiles.arch_key((8, 0)) == "default"
    with pytest.raises(ValueError, match="goes up to"):
        tiles.lookup("sm90", 512)


# launches and host operations per call of a gate with W + BatchNorm (float32)
KERNELS = {
    "eval_forward": ["coarse_fwd", "fine_out"],
    "train_forward": ["coarse_fwd", "fine_stats", "stats_combine", "fine_out"],
    "train_backward": ["fine_bwd_sums", "sum_rows", "fine_bwd", "alpha_adjoint_kernel", "coarse_bwd", "patch_bwd", "sum_rows"],
}
TORCH_OPS = {"eval_forward": 16, "train_forward": 17, "train_backward": 21}  # views, allocations, detach: no device work


def test_host_work_per_call():
    """The launchers issue exactly these kernels and no torch operation that does device
    work (no zero-fills, casts or copies): their torch operations are allocations and views."""
    counts = host_ops()
    for mode, expected in KERNELS.items():
        assert counts[mode]["kernels"] == expected, mode
        assert counts[mode]["device_ops"] == 0, (mode, counts[mode]["ops"])
        assert counts[mode]["torch_ops"] <= TORCH_OPS[mode], (mode, counts[mode]["ops"])


def test_empty_batch_launches_no_zero_grid():
    """N = 0: the launchers make the same launches as for any batch, each with at least one
    program (which finds no tile), as planned for an H100 and for the CPU's interpreter."""
    for target in (H100, None):
        for mode, call in mode_calls(*gate_tensors((0, 32, 16, 16, 12), (0, 64, 8, 8, 6), device="cpu")).items():
            with launch.plan_for(*target) if target else contextlib.nullcontext(), recorded_launches() as log:
                call()
            assert [rec.kernel for rec in log] == KERNELS[mode], (target, mode)
            assert all(len(rec.grid) == 1 and rec.grid[0] >= 1 for rec in log), (target, mode, [rec.grid for rec in log])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_traffic_at_level2(dtype):
    """The bytes the recorded launches move against the byte floor, paper level-2 gate."""
    t = traffic(*LEVELS[2], dtype)
    assert t["moved"]["eval_forward"] <= 1.5 * t["floor"]["eval_forward"]
    train = ("train_forward", "train_backward")
    assert sum(t["moved"][m] for m in train) <= 2.5 * sum(t["floor"][m] for m in train)
    # x is read twice in eval (alpha needs a grid-wide pass first): the model cannot go below that
    x_bytes = torch.empty(LEVELS[2][0], dtype=dtype, device="meta").nbytes
    assert t["moved"]["eval_forward"] >= t["floor"]["eval_forward"] + x_bytes


def test_traffic_counts_what_launches_pass():
    """The traffic model adds up the streamed arguments of the recorded launches: one more
    pass over x in a kernel's declaration moves x's bytes more."""
    from benchmarks.gate_memory import launch_traffic

    x, g, *groups = gate_tensors(*LEVELS[2])
    with launch.plan_for(*H100), recorded_launches() as log:
        mode_calls(x, g, *groups)["eval_forward"]()
    base = launch_traffic(log)
    reads, writes = launch.PASSES["fine_out"]
    try:
        launch.PASSES["fine_out"] = (reads, writes + ("out_ptr", "x_ptr"))  # a tensor twice counts once
        assert launch_traffic(log) == base
        launch.PASSES["fine_out"] = (reads[1:], writes)  # x no longer streamed by fine_out
        assert launch_traffic(log) == base - x.nbytes
    finally:
        launch.PASSES["fine_out"] = (reads, writes)
