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

from attention_gates.functional import grid_attention  # noqa: E402

DEVICES = [pytest.param("cpu", marks=pytest.mark.interpret), pytest.param("cuda", marks=pytest.mark.cuda)]
# atol per dtype, relative to each quantity's magnitude: float32 reductions in another order
# (atomics, blocked sums) differ by a few ulps times sqrt(terms); 16-bit storage is covered by
# the 2|ref_dtype - ref64| term, and TF32 products (16-bit inputs on the GPU) by 1e-3.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def make_case(d, N, C, CG, CI, S, k, Sg=None, W=True, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *shape, s=1.0: torch.randn(*shape, generator=gen, dtype=torch.float64) * s  # noqa: E731
    Sc = tuple(s // kk for s, kk in zip(S, k))
    x = rn(N, C, *S)
    g = rn(N, CG, *(Sc if Sg is None else Sg))
    one = (1,) * d
    params = [rn(CI, C, *k, s=0.3), rn(CI, CG, *one, s=0.3), rn(CI, s=0.1), rn(1, CI, *one, s=0.5), rn(1, s=0.1)]
    params += [rn(C, C, *one, s=0.3), rn(C, s=0.1), 1 + rn(C, s=0.1), rn(C, s=0.1)] if W else [None] * 4
    stats = [rn(C, s=0.1), torch.rand(C, generator=gen, dtype=torch.float64) + 0.5]
    return dict(x=x, g=g, params=params, stats=stats, device=device, dtype=dtype)


def run(case, backend, dtype, training, sigma1="relu", norm="batch", prepare=None, inputs_dtype=None, align_corners=False):
    """Forward + backward with fixed upstream gradients for out and alpha; returns everything.

    ``inputs_dtype``: round the inputs through this dtype first (so that a float64 reference
    sees the same inputs as a 16-bit run)."""
    dev = case["device"]
    rnd = (lambda t: t.to(inputs_dtype).to(dtype)) if inputs_dtype is not None else (lambda t: t.to(dtype))  # noqa: E731
    x = rnd(case["x"]).to(dev)
    g = rnd(case["g"]).to(dev)
    if prepare is not None:
        x, g = prepare(x), prepare(g)
    x.requires_grad_()
    g.requires_grad_()
    params = [None if p is None else rnd(p).to(dev).requires_grad_() for p in case["params"]]
    if norm == "none":
        params[7] = params[8] = None  # W without a norm: no norm parameters
    has_w = params[5] is not None
    rm, rv = (rnd(s).to(dev).clone() for s in case["stats"])
    out, alpha = grid_attention(
        x, g, *params, rm if has_w else None, rv if has_w else None,
        norm=norm if has_w else "none", training=training, sigma1=sigma1, align_corners=align_corners, backend=backend,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    do = rnd(torch.randn(out.shape, generator=gen, dtype=torch.float64)).to(dev)
    da = rnd(torch.randn(alpha.shape, generator=gen, dtype=torch.float64)).to(dev)
    inputs = [x, g] + [p for p in params if p is not None]
    grads = torch.autograd.grad([out, alpha], inputs, [do, da])
    return [out, alpha, rm, rv, *grads]


def assert_close_to_reference(case, dtype, training, tf32=False, **kw):
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):  # float32 against IEEE float32 by default
        fused = run(case, "triton", dtype, training, **kw)
        ref = run(case, "reference", dtype, training, **kw)
    ref64 = run(case, "reference", torch.float64, training, inputs_dtype=dtype, **kw)
    names = ["out", "alpha", "running_mean", "running_var", "dx", "dg", "dtheta", "dphi_w", "dphi_b", "dpsi_w", "dpsi_b"]
    names += ["dW_w", "dW_b", "dgamma", "dbeta"]
    for name, f, r, r64 in zip(names, fused, ref, ref64):
        f, r, r64 = f.double().cpu(), r.double().cpu(), r64.double().cpu()
        assert f.shape == r64.shape, name
        scale = max(r64.abs().max().item(), 1e-3)
        err, bound = (f - r64).abs().max().item(), 2 * (r - r64).abs().max().item() + ATOL[dtype] * scale
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (scale {scale:.3g})"


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
    d, N, C, CG, CI, S, k, Sg = case_args
    assert_close_to_reference(make_case(d, N, C, CG, CI, S, k, Sg, device=device), torch.float32, training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_args", [CASES[1], CASES[4], CASES[5]], ids=["3d-odd", "2d-k32", "1d"])
def test_align_corners(device, case_args):
    """alpha's resampling inside the fine kernels follows F.interpolate with align_corners=True too."""
    d, N, C, CG, CI, S, k, Sg = case_args
    case = make_case(d, N, C, CG, CI, S, k, Sg, device=device)
    assert_close_to_reference(case, torch.float32, True, align_corners=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["no_W", "softplus", "W_no_norm"])
def test_variants(device, variant):
    case = make_case(3, 2, 16, 24, 8, (6, 8, 6), (2, 2, 2), W=variant != "no_W", device=device)
    kw = {"sigma1": "softplus"} if variant == "softplus" else {"norm": "none"} if variant == "W_no_norm" else {}
    assert_close_to_reference(case, torch.float32, True, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(device, layout):
    """Channels-last inputs run without a copy; other strided views are copied first."""
    def prepare(t):
        if layout == "channels_last":
            return t.to(memory_format=torch.channels_last_3d)
        return t.transpose(2, 4).contiguous().transpose(2, 4)  # spatial axes not flattenable: copied

    case = make_case(3, 2, 16, 24, 8, (6, 8, 6), (2, 2, 2), device=device)
    assert_close_to_reference(case, torch.float32, True, prepare=prepare)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_in_channels_last_out(device, dims):
    """out, dx and dg keep the inputs' memory format (no copies into contiguous tensors)."""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    S, k = ((6, 8, 6), (2, 2, 2)) if dims == 3 else ((6, 8), (2, 2))
    case = make_case(dims, 2, 16, 24, 8, S, k, device=device)
    out, _, _, _, dx, dg, *_ = run(case, "triton", torch.float32, True, prepare=lambda t: t.contiguous(memory_format=fmt))
    for name, t in (("out", out), ("dx", dx), ("dg", dg)):
        assert t.is_contiguous(memory_format=fmt) and not t.is_contiguous(), name


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_bitwise_reproducible(device):
    """Two runs give bitwise-equal outputs and gradients: every sum has a fixed order (per-program
    partial rows reduced in row order, the resampling's adjoint a gather), no atomics."""
    case = make_case(3, 2, 12, 20, 16, (7, 9, 5), (2, 2, 1), Sg=(2, 3, 4), device=device)
    first = run(case, "triton", torch.float32, True)
    second = run(case, "triton", torch.float32, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_large_batch(device):
    """The batch is not a grid axis: more samples than programs (and than any grid limit) loop."""
    n = 9 if device == "cpu" else 70_000  # past CUDA's 65,535 limit on a grid's second axis
    case = make_case(2, n, 4, 6, 4, (4, 4), (2, 2), device=device)
    assert_close_to_reference(case, torch.float32, True)


@pytest.mark.cuda
def test_tf32_by_default_cuda():
    """With PyTorch's default flags the float32 dots take TF32 (as the reference's cuDNN
    convolutions do): within the tolerance the reference's own TF32 error sets."""
    assert_close_to_reference(make_case(3, 2, 32, 64, 32, (16, 16, 12), (2, 2, 2), device="cuda"), torch.float32, True, tf32=True)


@pytest.mark.interpret
def test_64bit_offsets(monkeypatch):
    """The 64-bit offset path (taken for samples of 2^31 elements or more) computes the same,
    forced here on a small case."""
    from attention_gates.ops.triton import launch

    monkeypatch.setattr(launch, "INT32_LIMIT", 1)
    assert_close_to_reference(make_case(3, 2, 12, 20, 16, (7, 9, 5), (2, 2, 1)), torch.float32, True)


@pytest.mark.parametrize(
    "device,dtype",
    [
        pytest.param("cpu", torch.float16, marks=pytest.mark.interpret),
        pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda),  # the interpreter's bfloat16 arithmetic is wrong
    ],
)
def test_half_dtypes(device, dtype):
    assert_close_to_reference(make_case(3, 2, 16, 24, 8, (8, 6, 10), (2, 2, 2), device=device), dtype, True)


@pytest.mark.interpret
def test_gradcheck_float64():
    """The backward is the derivative of the forward (float64 runs only through the interpreter)."""
    case = make_case(3, 1, 4, 6, 4, (4, 4, 2), (2, 2, 1))
    x = case["x"].requires_grad_()
    g = case["g"].requires_grad_()
    params = [p.requires_grad_() for p in case["params"]]

    def fn(x, g, *params):
        rm, rv = (s.clone() for s in case["stats"])
        return grid_attention(x, g, *params, rm, rv, training=True, backend="triton")

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
    case = make_case(3, 1, 16, 16, 8, (4, 4, 4), (2, 2, 2))
    x, g = (t.float().contiguous(memory_format=fmt) for t in (case["x"], case["g"]))
    p = [t.float().requires_grad_() for t in case["params"]]
    args = (x.requires_grad_(), g, *p, None, None, True, 1e-5, False, False)
    torch.library.opcheck(gate_fwd, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        _, _, alpha_c, mean, var = gate_fwd(*args)
    bwd_args = (torch.randn_like(x), None, x.detach(), g, *(t.detach() for t in p[:8]), alpha_c, mean, var, True, 1e-5, False, False)
    torch.library.opcheck(gate_bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.interpret
@settings(max_examples=6)
@given(
    d=st.sampled_from([2, 3]),
    n=st.integers(1, 2),
    c=st.integers(1, 20),
    cg=st.integers(1, 20),
    ci=st.integers(1, 20),
    sizes=st.lists(st.integers(2, 9), min_size=3, max_size=3),
    factors=st.lists(st.integers(1, 2), min_size=3, max_size=3),
    training=st.booleans(),
)
def test_hypothesis_shapes(d, n, c, cg, ci, sizes, factors, training):
    S, k = tuple(sizes[:d]), tuple(factors[:d])
    assert_close_to_reference(make_case(d, n, c, cg, ci, S, k, seed=c * 31 + ci), torch.float32, training)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("level", [(32, 64, (40, 40, 24)), (64, 128, (20, 20, 12)), (128, 256, (10, 10, 6))], ids=["l2", "l3", "l4"])
def test_paper_gate_shapes_cuda(level, dtype):
    """The paper model's three gates at half its training patch (80x80x48 input), batch 2."""
    C, CG, S = level
    case = make_case(3, 2, C, CG, C, S, (2, 2, 2), device="cuda")
    assert_close_to_reference(case, dtype, True)


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
    run(make_case(3, 2, 16, 24, 8, (8, 8, 4), (2, 2, 2)), "triton", torch.float32, True)
    assert set(checked) == set(launch.PASSES)  # every kernel ran
