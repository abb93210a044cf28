"""The fused Triton gate against the reference.

Each test runs on the CPU through the Triton interpreter (marker ``interpret``: its own pytest
run with ``TRITON_INTERPRET=1``, small shapes, float32/float16/float64) and on a CUDA GPU
(marker ``cuda``: larger shapes, bfloat16 too).

Tolerance (flash-attention's rule, on the largest error of each quantity):
``max|fused - ref64| <= 2 max|ref_dtype - ref64| + atol * scale``, where ``ref_dtype`` is the
reference run in the tested dtype, ``ref64`` in float64 on the same (rounded) inputs and
``scale`` the largest magnitude of the quantity. The fused path accumulates in float32 whatever
the storage dtype, so it is never worse than the dtype's own reference beyond reduction-order
noise (atol). On a GPU, float32 dot products take TF32 where cuDNN would (the reference's
convolutions then too); the float32 comparisons turn TF32 off for both, so that the fused
kernels use tf32x3 and the reference IEEE float32.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from attention_gates.functional import GateWeights, grid_attention  # noqa: E402
from gate_cases import GateShape, gate_shapes, random_gate  # noqa: E402

DEVICES = [pytest.param("cpu", marks=pytest.mark.interpret), pytest.param("cuda", marks=pytest.mark.cuda)]
# atol per dtype, relative to each quantity's magnitude: float32 reductions in another order
# (atomics, blocked sums) differ by a few ulps times sqrt(terms); 16-bit storage is covered by
# the 2|ref_dtype - ref64| term, and TF32 products (16-bit inputs on the GPU) by 1e-3.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
STATISTICS = ("running_mean", "running_var")


def run(gate, backend, dtype, training, *, device="cpu", sigma1="relu", norm="batch", prepare=None,
        inputs_dtype=None, align_corners=False) -> dict:  # fmt: skip
    """Forward + backward of ``gate = (x, g, GateWeights)`` (``random_gate``'s, float64) with fixed
    upstream gradients for out and alpha: ``{name: tensor}`` of the outputs, the running
    statistics after the call and the gradients (``d`` + the input's name).

    ``inputs_dtype``: round the inputs through this dtype first (so that a float64 reference
    sees the same inputs as a 16-bit run)."""
    rnd = (lambda t: t.to(inputs_dtype).to(dtype)) if inputs_dtype is not None else (lambda t: t.to(dtype))  # noqa: E731
    x64, g64, w64 = gate
    x, g = rnd(x64).to(device), rnd(g64).to(device)
    if prepare is not None:
        x, g = prepare(x), prepare(g)
    x.requires_grad_()
    g.requires_grad_()
    w = GateWeights(*(None if t is None else rnd(t).to(device).clone() for t in w64))
    w = GateWeights(*(t if t is None or name in STATISTICS else t.requires_grad_() for name, t in zip(w._fields, w)))
    norm = norm if w.W_weight is not None else "none"
    out, alpha = grid_attention(x, g, *w, norm=norm, training=training, sigma1=sigma1, align_corners=align_corners, backend=backend)
    gen = torch.Generator().manual_seed(7)
    do = rnd(torch.randn(out.shape, generator=gen, dtype=torch.float64)).to(device)
    da = rnd(torch.randn(alpha.shape, generator=gen, dtype=torch.float64)).to(device)
    inputs = {"x": x, "g": g, **{name: t for name, t in zip(w._fields, w) if t is not None and name not in STATISTICS}}
    grads = torch.autograd.grad([out, alpha], list(inputs.values()), [do, da])
    stats = {name: getattr(w, name) for name in STATISTICS if getattr(w, name) is not None}
    return {"out": out, "alpha": alpha, **stats, **{"d" + name: d for name, d in zip(inputs, grads)}}


def assert_close_to_reference(gate, dtype, training, tf32=False, **kw):
    """Every output, statistic and gradient of the fused gate against the reference's: NaN and
    each infinity exactly where the reference (in the tested dtype) has them, and the finite
    values within the tolerance rule of the module docstring."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):  # float32 against IEEE float32 by default
        fused = run(gate, "triton", dtype, training, **kw)
        ref = run(gate, "reference", dtype, training, **kw)
    ref64 = run(gate, "reference", torch.float64, training, inputs_dtype=dtype, **kw)
    assert fused.keys() == ref.keys()
    for name in ref:
        f, r, r64 = fused[name].double().cpu(), ref[name].double().cpu(), ref64[name].double().cpu()
        assert f.shape == r.shape == r64.shape, name
        for where in (torch.isnan, torch.isposinf, torch.isneginf):
            differ = (where(f) != where(r)).nonzero().tolist()
            assert not differ, f"{name}: {where.__name__} differs from the reference's at {len(differ)} positions, first {differ[:3]}"
        finite = torch.isfinite(r) & torch.isfinite(r64)
        if not finite.any():
            continue
        f, r, r64 = f[finite], r[finite], r64[finite]
        scale = max(r64.abs().max().item(), 1e-3)
        err, bound = (f - r64).abs().max().item(), 2 * (r - r64).abs().max().item() + ATOL[dtype] * scale
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (scale {scale:.3g})"


def case(d, n, c_l, c_g, c_int, size, k, g_size=None, **kw):
    """``random_gate`` of these sizes (float64); ``g_size=None``: g on theta's grid."""
    g_size = tuple(s // f for s, f in zip(size, k)) if g_size is None else g_size
    return random_gate(GateShape(d, n, c_l, c_g, c_int, tuple(k), tuple(size), tuple(g_size)), **kw)


# (spatial_dims, N, F_l, F_g, F_int, S, subsample factor, g's size or None = theta's grid)
CASES = [
    (3, 2, 16, 24, 8, (8, 6, 10), (2, 2, 2), None),
    (3, 1, 12, 20, 16, (7, 9, 5), (2, 2, 1), None),  # odd sizes, anisotropic factor, channels not a power of two
    (3, 2, 16, 32, 16, (8, 8, 8), (2, 2, 2), (3, 5, 2)),  # g of another size: phi(g) resized
    (2, 2, 16, 24, 8, (9, 7), (2, 1), (3, 5)),
    (2, 3, 8, 8, 4, (12, 10), (3, 2), None),  # factor 3
    (1, 2, 16, 16, 8, (21,), (2,), None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_args", CASES, ids=lambda a: f"{a[0]}d-C{a[2]}-k{''.join(map(str, a[6]))}")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(device, case_args, training):
    assert_close_to_reference(case(*case_args), torch.float32, training, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_args", [CASES[1], CASES[4], CASES[5]], ids=["3d-odd", "2d-k32", "1d"])
def test_align_corners(device, case_args):
    """alpha's resampling inside the fine kernels follows F.interpolate with align_corners=True too."""
    assert_close_to_reference(case(*case_args), torch.float32, True, device=device, align_corners=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["no_W", "softplus", "W_no_norm"])
def test_variants(device, variant):
    norm = "none" if variant == "W_no_norm" else "batch"
    gate = case(3, 2, 16, 24, 8, (6, 8, 6), (2, 2, 2), W=variant != "no_W", norm=norm)
    sigma1 = "softplus" if variant == "softplus" else "relu"
    assert_close_to_reference(gate, torch.float32, True, device=device, norm=norm, sigma1=sigma1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(device, layout):
    """Channels-last inputs run without a copy; other strided views are copied first."""
    def prepare(t):
        if layout == "channels_last":
            return t.to(memory_format=torch.channels_last_3d)
        return t.transpose(2, 4).contiguous().transpose(2, 4)  # spatial axes not flattenable: copied

    assert_close_to_reference(case(3, 2, 16, 24, 8, (6, 8, 6), (2, 2, 2)), torch.float32, True, device=device, prepare=prepare)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_in_channels_last_out(device, dims):
    """out, dx and dg keep the inputs' memory format (no copies into contiguous tensors)."""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    S, k = ((6, 8, 6), (2, 2, 2)) if dims == 3 else ((6, 8), (2, 2))
    result = run(case(dims, 2, 16, 24, 8, S, k), "triton", torch.float32, True, device=device,
                 prepare=lambda t: t.contiguous(memory_format=fmt))  # fmt: skip
    for name in ("out", "dx", "dg"):
        assert result[name].is_contiguous(memory_format=fmt) and not result[name].is_contiguous(), name


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_bitwise_reproducible(device):
    """Two runs give bitwise-equal outputs and gradients: every sum has a fixed order (per-program
    partial rows reduced in row order, the resampling's adjoint a gather), no atomics."""
    gate = case(3, 2, 12, 20, 16, (7, 9, 5), (2, 2, 1), g_size=(2, 3, 4))
    first = run(gate, "triton", torch.float32, True, device=device)
    second = run(gate, "triton", torch.float32, True, device=device)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_large_batch(device):
    """The batch is not a grid axis: more samples than programs (and than any grid limit) loop."""
    n = 9 if device == "cpu" else 70_000  # past CUDA's 65,535 limit on a grid's second axis
    assert_close_to_reference(case(2, n, 4, 6, 4, (4, 4), (2, 2)), torch.float32, True, device=device)


# variants of the output transform: (W, norm, training)
EMPTY_BATCH = [(True, "batch", False), (True, "none", True), (False, "none", True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("W,norm,training", EMPTY_BATCH, ids=["W+BN-eval", "W-train", "no_W-train"])
def test_empty_batch(device, W, norm, training):
    """N = 0, which the reference takes (batch norm in training refuses it: no statistics):
    empty outputs and dx, dg, zero weight gradients, running statistics untouched; the
    launchers launch their usual grids of programs that find no tile (never a zero grid)."""
    gate = case(3, 0, 5, 6, 3, (4, 5, 3), (2, 2, 1), g_size=(3, 2, 2), W=W, norm=norm)
    assert_close_to_reference(gate, torch.float32, training, device=device, norm=norm)
    result = run(gate, "triton", torch.float32, training, device=device, norm=norm)
    assert result["out"].shape == (0, 5, 4, 5, 3) and result["alpha"].shape == (0, 1, 4, 5, 3)
    assert all(not d.any() for name, d in result.items() if name.startswith("d") and name not in ("dx", "dg"))


# the non-finite value's positions: a first index along every axis (where the resampling's source
# clamps to 0 and its backward adds with weight 0 into coarse index 1) and an interior voxel
NON_FINITE_AT = {"x": [(0, 1, 0, 0, 0), (1, 3, 5, 3, 1)], "g": [(0, 1, 0, 0, 0), (1, 4, 1, 1, 1)]}
# the subsample factor: on the CPU with an axis that is not resampled, which F.interpolate copies
# (no neighbour read); CUDA's trilinear kernels copy only when every axis keeps its size and
# read the neighbour with weight 0 otherwise (a NaN there spreads one voxel further than on the
# CPU), so on CUDA every axis is resampled
NON_FINITE_FACTOR = {"cpu": (2, 2, 1), "cuda": (2, 2, 2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["x", "g"])
@pytest.mark.parametrize("norm,training", [("batch", False), ("batch", True), ("none", True)], ids=["BN-eval", "BN-train", "train"])
def test_non_finite_inputs(device, value, where, norm, training):
    """NaN or inf in x or g: the fused gate's outputs, statistics and gradients are NaN (and
    infinite) exactly where the reference's are, and agree elsewhere: a NaN voxel reaches the
    neighbourhood the resampling reaches, and the whole batch only through batch statistics.
    The case has padded channels (F_l, F_int not powers of two), g off theta's grid and, on the
    CPU, an axis that is not resampled."""
    x, g, w = case(3, 2, 5, 6, 3, (8, 7, 3), NON_FINITE_FACTOR[device], g_size=(3, 2, 2), norm=norm)
    for index in NON_FINITE_AT[where]:
        (x if where == "x" else g)[index] = value
    assert_close_to_reference((x, g, w), torch.float32, training, device=device, norm=norm)


@pytest.mark.cuda
def test_tf32_by_default_cuda():
    """With PyTorch's default flags the float32 dots take TF32 (as the reference's cuDNN
    convolutions do): within the tolerance the reference's own TF32 error sets."""
    assert_close_to_reference(case(3, 2, 32, 64, 32, (16, 16, 12), (2, 2, 2)), torch.float32, True, device="cuda", tf32=True)


@pytest.mark.interpret
def test_64bit_offsets(monkeypatch):
    """The 64-bit offset path (taken for samples of 2^31 elements or more) computes the same,
    forced here on a small case."""
    from attention_gates.ops.triton import launch

    monkeypatch.setattr(launch, "INT32_LIMIT", 1)
    assert_close_to_reference(case(3, 2, 12, 20, 16, (7, 9, 5), (2, 2, 1)), torch.float32, True)


@pytest.mark.parametrize(
    "device,dtype",
    [
        pytest.param("cpu", torch.float16, marks=pytest.mark.interpret),
        pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda),  # the interpreter's bfloat16 arithmetic is wrong
    ],
)
def test_half_dtypes(device, dtype):
    assert_close_to_reference(case(3, 2, 16, 24, 8, (8, 6, 10), (2, 2, 2)), dtype, True, device=device)


@pytest.mark.interpret
def test_gradcheck_float64():
    """The backward is the derivative of the forward (float64 runs only through the interpreter)."""
    x, g, w = case(3, 1, 4, 6, 4, (4, 4, 2), (2, 2, 1))
    x.requires_grad_()
    g.requires_grad_()
    params = [t.requires_grad_() for name, t in zip(w._fields, w) if name not in STATISTICS]

    def fn(x, g, *params):
        return grid_attention(x, g, *params, w.running_mean.clone(), w.running_var.clone(), training=True, backend="triton")

    assert torch.autograd.gradcheck(fn, (x, g, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_keeps_only_what_backward_needs(device):
    """Saved for backward: x, g, parameters and the small coarse tensors, all via save_for_backward.

    Counted with saved_tensors_hooks (unique storages beyond inputs, outputs and parameters):
    the fused gate keeps at most 10% of what the reference keeps. And no tensor hides on an
    autograd node outside save_for_backward.
    """
    from attention_gates import GridAttentionGate3D

    dev = torch.device(device)
    gate = GridAttentionGate3D(16, 32, 16).to(dev).train()
    x = torch.randn(2, 16, 16, 16, 12, device=dev, requires_grad=True)
    g = torch.randn(2, 32, 8, 8, 6, device=dev, requires_grad=True)
    param_storages = {p.untyped_storage().data_ptr() for p in gate.parameters()}

    def saved_bytes(backend):
        gate.backend = backend
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, alpha = gate(x, g)
        known = param_storages | {t.untyped_storage().data_ptr() for t in (x, g, out, alpha)}
        return sum(n for ptr, n in seen.items() if ptr not in known), out

    ref_bytes, _ = saved_bytes("reference")
    tri_bytes, out = saved_bytes("triton")
    assert ref_bytes > 0
    assert tri_bytes <= 0.10 * ref_bytes, (tri_bytes, ref_bytes)

    # walk the graph: no tensor stored as a plain attribute of any node
    stack, visited = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        hidden = [k for k, v in getattr(node, "__dict__", {}).items() if isinstance(v, torch.Tensor)
                  or (isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v))]  # fmt: skip
        assert not hidden, f"{node.name()} keeps tensors outside save_for_backward: {hidden}"
        stack.extend(fn for fn, _ in node.next_functions)


@pytest.mark.parametrize("device", DEVICES)
def test_module_running_stats_and_compile_fullgraph(device):
    """A gate module under torch.compile(fullgraph=True) traces the custom op, and updates its
    BatchNorm statistics as the reference module does."""
    from attention_gates import GridAttentionGate3D

    torch.manual_seed(0)
    dev = torch.device(device)
    ref = GridAttentionGate3D(16, 24, 8, backend="reference").to(dev).train()
    fused = GridAttentionGate3D(16, 24, 8, backend="triton").to(dev).train()
    fused.load_state_dict(ref.state_dict())
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(2, 16, 8, 8, 6, device=dev)
    g = torch.randn(2, 24, 4, 4, 3, device=dev)
    # the reference's cuDNN convolutions would run in TF32 on the GPU by default: compare in IEEE float32
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for _ in range(2):
            out_r, _ = ref(x, g)
            out_f, _ = compiled(x, g)
            out_f.sum().backward()
    torch.testing.assert_close(out_f, out_r, atol=1e-4, rtol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.W[1], name), getattr(ref.W[1], name), atol=1e-5, rtol=1e-5)
    assert fused.theta.weight.grad is not None and fused.W[1].weight.grad is not None


@pytest.mark.interpret
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_opcheck(channels_last):
    """Schema, fake (meta) kernels and autograd registration of both custom ops
    (torch.library.opcheck): the fake kernels' outputs have the real ones' shapes, dtypes and
    strides, channels-last included."""
    from attention_gates.ops.triton.autograd import gate_bwd, gate_fwd

    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x, g, w = case(3, 1, 16, 16, 8, (4, 4, 4), (2, 2, 2))
    x, g = (t.float().contiguous(memory_format=fmt) for t in (x, g))
    w = GateWeights(*(t.float().requires_grad_() for t in w))
    coarse = dict(theta_w=w.theta_weight, phi_w=w.phi_weight, phi_b=w.phi_bias, psi_w=w.psi_weight, psi_b=w.psi_bias)
    transform = dict(W_w=w.W_weight, W_b=w.W_bias, gamma=w.norm_weight)
    flags = dict(use_batch_stats=True, eps=1e-5, softplus=False, align_corners=False)
    fwd = dict(x=x.requires_grad_(), g=g, **coarse, **transform, beta=w.norm_bias, mean_in=None, var_in=None, **flags)
    torch.library.opcheck(gate_fwd, (), fwd, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        _, _, alpha_c, mean, var = gate_fwd(**fwd)
    detached = {name: t.detach() for name, t in {"x": x, **coarse, **transform}.items()}
    bwd = dict(dout=torch.randn_like(x), dalpha=None, g=g, **detached, alpha_c=alpha_c, mean=mean, var=var, **flags)
    torch.library.opcheck(gate_bwd, (), bwd, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.interpret
@settings(max_examples=6)
@given(shape=gate_shapes(c_l=(1, 20), c_g=(1, 20), c_int=(1, 20), k=(1, 3), extra=(0, 6)), training=st.booleans())
def test_hypothesis_shapes(shape, training):
    assert_close_to_reference(random_gate(shape, seed=shape.c_l * 31 + shape.c_int), torch.float32, training)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("level", [(32, 64, (40, 40, 24)), (64, 128, (20, 20, 12)), (128, 256, (10, 10, 6))], ids=["l2", "l3", "l4"])
def test_paper_gate_shapes_cuda(level, dtype):
    """The paper model's three gates at half its training patch (80x80x48 input), batch 2."""
    C, CG, S = level
    assert_close_to_reference(case(3, 2, C, CG, C, S, (2, 2, 2)), dtype, True, device="cuda")


@pytest.mark.interpret
def test_model_compiles_fullgraph_with_fused_gates():
    """torch.compile(fullgraph=True) traces a whole Attention U-Net whose gates are the custom op;
    its logits and attention maps equal the eager model's with reference gates."""
    from attention_gates import AttentionUNet2D

    torch.manual_seed(0)
    net = AttentionUNet2D(1, 2, filters=(8, 16, 16), backend="triton").eval()
    x = torch.randn(1, 1, 20, 24)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    logits, att = compiled(x, return_attention=True)
    net.set_backend("reference")
    ref_logits, ref_att = net(x, return_attention=True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(att[0], ref_att[0], atol=1e-5, rtol=1e-5)


@pytest.mark.interpret
def test_traffic_declarations_match_the_kernels_accesses(monkeypatch):
    """``launch.PASSES``, what the traffic model in ``benchmarks/gate_memory.py`` counts, is what
    each launch really touches: under the interpreter every load and store is recorded, and
    each big tensor a launch passes is touched in full where declared streamed and not at all
    where not (a training step of a gate with W + BatchNorm, sizes divisible by the factor)."""
    import numpy as np
    from types import SimpleNamespace

    from triton.runtime import interpreter

    from attention_gates.ops.triton import kernels, launch

    builder = interpreter.interpreter_builder
    seen: list = []

    def watch(method):
        def wrapped(ptrs, *args):
            mask = args[0] if method == "create_masked_load" else args[1]
            addresses = np.broadcast_to(ptrs.data, mask.data.shape)[mask.data.astype(bool)]
            seen.append((addresses.astype(np.uint64), ptrs.get_element_ty().primitive_bitwidth // 8))
            return getattr(type(builder), method)(builder, ptrs, *args)

        return wrapped

    for method in ("create_masked_load", "create_masked_store"):
        monkeypatch.setattr(builder, method, watch(method))
    big = {"x_ptr", "g_ptr", "do_ptr", "dalpha_ptr", "out_ptr", "alpha_ptr", "ac_ptr", "daf_ptr", "dac_ptr", "df_ptr", "dx_ptr", "dg_ptr"}
    checked = []

    class Watched:
        def __init__(self, name, fn):
            self.name, self.fn, self.arg_names = name, fn, fn.arg_names

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.clear()
                self.fn[grid](*args, **kwargs)
                touched = np.unique(np.concatenate([a[:, None] + np.arange(el, dtype=np.uint64) for a, el in seen]))
                named = {**dict(zip(self.arg_names, args)), **kwargs}
                reads, writes = launch.PASSES[self.name]
                for name, t in named.items():
                    if not isinstance(t, torch.Tensor) or (name not in reads + writes and name not in big):
                        continue
                    lo = t.data_ptr()
                    inside = np.count_nonzero((touched >= lo) & (touched < lo + t.nbytes))
                    fraction = inside / t.nbytes
                    if name in reads + writes:
                        assert fraction == 1.0, f"{self.name}: {name} declared streamed, {fraction:.1%} touched"
                    elif not any(t is named[n] for n in reads + writes if isinstance(named.get(n), torch.Tensor)):
                        assert fraction == 0.0, f"{self.name}: {name} not declared, {fraction:.1%} touched"
                checked.append(self.name)

            return run

    monkeypatch.setattr(launch, "K", SimpleNamespace(**{n: Watched(n, f) for n, f in vars(kernels).items() if hasattr(f, "arg_names")}))
    run(case(3, 2, 16, 24, 8, (8, 8, 4), (2, 2, 2)), "triton", torch.float32, True)
    assert set(checked) == set(launch.PASSES)  # every kernel ran
