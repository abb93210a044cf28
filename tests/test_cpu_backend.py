"""The cpu backend (attention_gates.ops.cpu) against the reference gate: outputs, every gradient,
running statistics, layouts, dtypes, and the dispatcher's choice of it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_gates import GridAttentionGate2D, GridAttentionGate3D
from attention_gates.functional import GateOptions, GateWeights, grid_attention
from attention_gates.ops import BackendUnavailableError, not_supported_reasons, use_backend
from attention_gates.ops import cpu
from gate_cases import flat, reference

grid_attention_cpu = flat(cpu.grid_attention_cpu)

# Tolerance per compute dtype, as (rtol, atol) on max|cpu - reference| <= atol + rtol * max|reference|.
# float64: both sides are exact up to summation order (~1e-16 relative per operation).
# float32: the cpu path sums in another order (channel products instead of convolutions, batch
#   statistics and weight gradients from C x C Gram matrices over every voxel), so values agree to
#   ~1e-6 relative and gradients, sums over up to ~1e4 voxels here, to ~1e-5.
# bfloat16/float16 inputs are computed in float32 and compared with the float32 reference on the
#   same (rounded) inputs: the only difference is the final rounding to 8 (bf16) or 11 (fp16) bits.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
PARAMS = ("theta_weight", "phi_weight", "phi_bias", "psi_weight", "psi_bias", "W_weight", "W_bias", "norm_weight", "norm_bias")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale=None) -> None:
    """``scale``: the magnitude errors are relative to (default: ``max|expected|``)."""
    rtol, atol = TOL[dtype]
    assert actual.shape == expected.shape, what
    err = (actual.double() - expected.double()).abs().max().item()
    bound = atol + rtol * (expected.double().abs().max().item() if scale is None else scale)
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def make_case(
    dims: int, *, n: int = 2, c: int = 5, c_g: int = 6, c_int: int = 3, size=None, factor=2, g_size=None,
    W: bool = True, norm: str = "batch", dtype=torch.float64, seed: int = 0,
):  # fmt: skip
    """Random gate inputs: ``(x, g, params, running_stats)`` with parameters away from identity."""
    gen = torch.Generator().manual_seed(seed)
    size = tuple(size or (9, 7, 6)[:dims])
    k = (factor,) * dims if isinstance(factor, int) else tuple(factor)
    g_size = tuple(g_size or [s // kk for s, kk in zip(size, k)])
    one = (1,) * dims

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x, g = rnd(n, c, *size), rnd(n, c_g, *g_size)
    params = {
        "theta_weight": rnd(c_int, c, *k, scale=0.5),
        "phi_weight": rnd(c_int, c_g, *one, scale=0.5),
        "phi_bias": rnd(c_int),
        "psi_weight": rnd(1, c_int, *one),
        "psi_bias": rnd(1),
    }
    stats = {}
    if W:
        params.update(W_weight=rnd(c, c, *one, scale=0.5), W_bias=rnd(c))
        if norm == "batch":
            params.update(norm_weight=(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype), norm_bias=rnd(c))
            stats = {"running_mean": rnd(c), "running_var": (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)}
    return x, g, params, stats


def run(fn, x, g, params, stats, *, grad_out=True, grad_alpha=True, requires=None, **kw):
    """Call ``fn`` on fresh leaf copies, back-propagate fixed random weights of out and alpha.

    Returns ``(out, alpha, grads, stats_after)`` with ``grads`` keyed by input name.
    """
    requires = set(requires if requires is not None else ["x", "g", *params])
    leaves = {"x": x.clone(), "g": g.clone(), **{k: v.clone() for k, v in params.items() if v is not None}}
    for name, t in leaves.items():
        t.requires_grad_(name in requires)
    stats = {k: v.clone() for k, v in stats.items()}
    args = {**params, **{k: v for k, v in leaves.items() if k not in ("x", "g")}}
    out, alpha = fn(leaves["x"], leaves["g"], **args, **stats, **kw)
    gen = torch.Generator().manual_seed(123)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    w_alpha = torch.randn(alpha.shape, generator=gen, dtype=torch.float64).to(alpha.dtype)
    loss = (out * w_out).sum() * grad_out + (alpha * w_alpha).sum() * grad_alpha
    grads = {}
    if any(t.requires_grad for t in leaves.values()):
        loss.backward()
        grads = {k: t.grad for k, t in leaves.items() if t.requires_grad}
    return out.detach(), alpha.detach(), grads, stats


def compare(case, dtype=torch.float64, ref_case=None, **kw):
    """The cpu backend and the reference on the same case: every output, gradient and statistic."""
    got = run(grid_attention_cpu, *case, **kw)
    want = run(reference, *(ref_case or case), **kw)
    assert_close(got[0], want[0].to(got[0].dtype), dtype, "out")
    assert_close(got[1], want[1].to(got[1].dtype), dtype, "alpha")
    assert set(got[2]) == set(want[2])
    for name in want[2]:
        assert got[2][name] is not None, f"no gradient for {name}"
        assert got[2][name].dtype == {"x": case[0], "g": case[1], **case[2]}[name].dtype
        scale = None
        if name == "W_bias" and kw.get("training") and "norm_weight" in want[2]:
            # exactly 0 through training-mode batch norm (the cpu path returns 0): the reference's
            # value is the rounding noise of a sum over every voxel, as large as d(norm_bias)'s eps
            scale = want[2]["norm_bias"].abs().max().item()
        assert_close(got[2][name], want[2][name].to(got[2][name].dtype), dtype, f"d{name}", scale)
    for name in want[3]:
        assert_close(got[3][name], want[3][name], dtype, name)
    return got, want


OUTPUT_SIDE = [
    pytest.param(dict(W=False), dict(), id="no-W"),
    pytest.param(dict(norm="none"), dict(norm="none"), id="W-none"),
    pytest.param(dict(), dict(training=False), id="W-batch-eval"),
    pytest.param(dict(), dict(training=True, momentum=0.3), id="W-batch-train"),
]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("sigma1", ["relu", "softplus"])
@pytest.mark.parametrize("case_kw,call_kw", OUTPUT_SIDE)
def test_matches_reference(dims, sigma1, case_kw, call_kw):
    case = make_case(dims, **case_kw)
    got, want = compare(case, sigma1=sigma1, **call_kw)
    if call_kw.get("training"):  # the running statistics moved, identically
        assert not torch.equal(got[3]["running_mean"], case[3]["running_mean"])


@pytest.mark.parametrize(
    "dims,size,factor,g_size",
    [
        (3, (9, 11, 7), (2, 3, 1), (3, 5, 4)),  # odd sizes, per-axis factors, g of another size
        (3, (8, 8, 8), 1, (3, 3, 3)),  # theta as a 1x1 product
        (2, (13, 10), (3, 2), (7, 7)),
        (1, (17,), 4, (6,)),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_shapes(dims, size, factor, g_size, training):
    compare(make_case(dims, size=size, factor=factor, g_size=g_size), training=training)


@pytest.mark.parametrize("align_corners", [False, True])
def test_align_corners_and_batch_of_one(align_corners):
    case = make_case(3, n=1, size=(8, 10, 6), g_size=(3, 4, 5))
    compare(case, training=True, align_corners=align_corners)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_channels_last(dims, training):
    """Channels-last x is computed as [S, C] matrices and gives a channels-last out."""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    x, g, params, stats = make_case(dims, size=(8, 6, 10)[:dims])
    x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    got, _ = compare((x, g, params, stats), training=training)
    assert got[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize(
    "requires,grad_out,grad_alpha",
    [
        (["x"], True, False),  # frozen gate
        (["W_weight", "norm_weight", "norm_bias"], True, False),  # only the output transform trains
        (["g", "psi_weight"], False, True),  # only alpha is used
        (["theta_weight"], True, True),  # x needs no gradient, theta does
    ],
)
def test_partial_gradients(requires, grad_out, grad_alpha):
    compare(make_case(3), requires=requires, grad_out=grad_out, grad_alpha=grad_alpha, training=True)


def test_no_affine_no_bias():
    x, g, params, stats = make_case(2)
    for name in ("phi_bias", "psi_bias", "W_bias", "norm_weight", "norm_bias"):
        params[name] = None
    compare((x, g, params, stats), training=True)
    compare((x, g, params, {}), training=True)  # no running statistics either


def test_float32():
    compare(make_case(3, c=8, c_g=12, c_int=4, size=(12, 10, 8), dtype=torch.float32), torch.float32, training=True)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dims,size,large", [(2, (12, 10), False), (3, (12, 10, 8), False), (2, (160, 128), True), (3, (32, 32, 24), True)])
def test_float32_channels_last_products(dims, size, large, training):
    """float32 channels-last: a 1x1 product goes to oneDNN (on the tensor in place) only with at
    least ``_ONEDNN_MIN_ROWS`` voxels and 8 outputs, else it is a matrix product on the ``[S, C]``
    rows; theta is a oneDNN convolution only for more than ``_PATCH_MAX_ROWS`` coarse voxels, else a
    product of x's patches. Results as the reference's, out channels-last."""
    from torch.profiler import profile

    from attention_gates.ops.cpu import _ONEDNN_MIN_ROWS, _PATCH_MAX_ROWS

    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    x, g, params, stats = make_case(dims, n=1, c=8, c_g=12, c_int=4, size=size, dtype=torch.float32)
    assert (math.prod(size) >= _ONEDNN_MIN_ROWS) == (math.prod(size) // 2**dims > _PATCH_MAX_ROWS) == large
    x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    # the gradients that pass through these products (the coarse side's, psi's bias a sum over
    # every voxel, are checked at float32 tolerance on smaller cases elsewhere)
    got, _ = compare((x, g, params, stats), torch.float32, training=training, requires=["x", "W_weight", "theta_weight"])
    assert got[0].is_contiguous(memory_format=fmt)
    with profile() as prof:
        run(grid_attention_cpu, x, g, params, stats, training=training)
    calls = {e.key: e.count for e in prof.key_averages()}
    # theta, W (forward) and W^T (backward, run in both modes) when large; phi and psi act on the
    # coarse grid (a quarter or an eighth of the voxels, below the threshold), psi has one output
    assert calls.get("aten::mkldnn_convolution", 0) == (3 if large else 0), calls


@pytest.mark.parametrize(
    "dims,n,size,factors,channels_last",
    [
        (3, 1, (9, 8, 7), [(2, 2, 2)], True),  # sizes the factor does not divide: the rest is cropped
        (3, 2, (8, 6, 10), [(2, 3, 2), (2, 3, 2)], True),  # per-axis factors, two heads' weights
        (2, 1, (11, 8), [(3, 2)] * 3, True),
        (3, 1, (8, 8, 8), [(2, 2, 2)], False),  # contiguous: the convolution
    ],
)
def test_theta_patch_product_equals_the_strided_convolution(dims, n, size, factors, channels_last):
    """theta of several heads' weights at once, as a product of x's patches (channels-last, small
    coarse grid) or a convolution, equals the strided convolution of each weight, concatenated."""
    from attention_gates.ops.cpu import _theta

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, *size, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format={2: torch.channels_last, 3: torch.channels_last_3d}[dims])
    weights = [torch.randn(3 + i, 5, *k, generator=gen, dtype=torch.float64) for i, k in enumerate(factors)]
    conv = {2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[dims]
    want = torch.cat([conv(x, w, stride=w.shape[2:]) for w in weights], dim=1)
    got = _theta(x, weights)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()
    assert got.is_contiguous(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last) == channels_last


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("dims,size,factor", [(3, (50, 36, 37), 2), (3, (49, 35, 33), (2, 3, 2)), (2, (199, 221), (3, 2))])
def test_float32_channels_last_theta_backward(dims, size, factor):
    """Training on channels-last float32 x: theta's input gradient comes from oneDNN's transposed
    convolution (x of at least 2^19 elements, one sample: torch's rule then picks oneDNN), plus the gradient
    through alpha * x, with sizes that the subsample factor does not divide (the voxels left over
    get only the latter)."""
    from torch.profiler import profile

    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    x, g, params, stats = make_case(dims, n=1, c=12, c_g=12, c_int=8, size=size, factor=factor, dtype=torch.float32)
    x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    got, _ = compare((x, g, params, stats), torch.float32, training=True, requires=["x", "theta_weight"])
    assert got[2]["x"].stride() == x.stride()
    with profile(record_shapes=True) as prof:  # only x needs a gradient: theta's weight gradient is not called
        run(grid_attention_cpu, x, g, params, stats, training=True, requires=["x"])
    on_x = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.key == "aten::convolution_backward" and e.input_shapes[1] == list(x.shape)]  # fmt: skip
    assert len(on_x) == 1 and on_x[0].count == 1


@pytest.mark.parametrize("dims", [1, 2, 3])
@settings(max_examples=12, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 19)), min_size=3, max_size=3),
    channels=st.integers(1, 3),
    align_corners=st.booleans(),
)
def test_resample_is_torch_interpolation(dims, sizes, channels, align_corners):
    """The cpu backend's separable resampling (a product per axis) equals F.interpolate, up and
    down, with its gradient."""
    from attention_gates.functional import resample
    from attention_gates.ops.cpu import _resample

    n_in, n_out = zip(*sizes[:dims])
    t = torch.randn(2, channels, *n_in, dtype=torch.float64, requires_grad=True)
    got, want = _resample(t, n_out, align_corners), resample(t, n_out, align_corners)
    assert got.shape == want.shape == (2, channels, *n_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(want)
    (g_got,) = torch.autograd.grad(got, t, w)
    (g_want,) = torch.autograd.grad(want, t, w)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 2, 3])
@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 12),
    co=st.integers(1, 12),
    size=st.lists(st.integers(1, 7), min_size=3, max_size=3),
    channels_last=st.booleans(),
    bias=st.booleans(),
)
def test_conv1x1_is_the_convolution_in_its_input_layout(dims, n, c, co, size, channels_last, bias):
    """``conv1x1`` (a product on rows or planes) equals ``F.conv{1,2,3}d`` with its gradients, and its
    output keeps the input's layout, the batch stride of a single channels-last sample included."""
    from attention_gates.ops.cpu import conv1x1

    gen = torch.Generator().manual_seed(n * 1000 + c * 100 + co)
    x = torch.randn(n, c, *size[:dims], generator=gen, dtype=torch.float64)
    if channels_last and dims > 1:
        x = x.contiguous(memory_format={2: torch.channels_last, 3: torch.channels_last_3d}[dims])
    x.requires_grad_()
    w = torch.randn(co, c, *[1] * dims, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(co, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[dims - 1]
    got, want = conv1x1(x, w, b), conv(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # x's layout (a tensor that is also contiguous counts as contiguous), on every dim longer than 1
    fmt = torch.contiguous_format
    if channels_last and dims > 1 and not x.is_contiguous():
        fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    expected = torch.empty(want.shape).contiguous(memory_format=fmt).stride()
    assert [s for s, m in zip(got.stride(), got.shape) if m > 1] == [s for s, m in zip(expected, want.shape) if m > 1]
    leaves = [x, w] + ([b] if bias else [])
    wdy = torch.randn_like(want)
    for g_got, g_want in zip(torch.autograd.grad(got, leaves, wdy), torch.autograd.grad(want, leaves, wdy)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    """Half inputs: computed in float32, so the result is the float32 reference rounded once."""
    case = make_case(3, size=(8, 8, 6), dtype=dtype)
    ref_case = tuple(
        {k: v.float() for k, v in part.items()} if isinstance(part, dict) else part.float() for part in case
    )
    got, _ = compare(case, dtype, ref_case=ref_case, training=False)
    assert got[0].dtype == dtype and got[1].dtype == dtype


def test_gradcheck_float64():
    x, g, params, stats = make_case(3, n=2, c=2, c_g=2, c_int=2, size=(4, 3, 2), factor=(2, 2, 1), g_size=(3, 2, 1))
    names = list(params)

    def f(x, g, *ps):
        return grid_attention_cpu(x, g, **dict(zip(names, ps)), training=True, momentum=0.0, sigma1="softplus")

    inputs = [t.clone().requires_grad_() for t in (x, g, *params.values())]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, fast_mode=True)
    x, g, params, _ = make_case(2, n=1, c=2, c_g=2, c_int=2, size=(5, 4), W=False)
    inputs = [t.clone().requires_grad_() for t in (x, g, *params.values())]
    assert torch.autograd.gradcheck(lambda x, g, *ps: grid_attention_cpu(x, g, *ps), inputs, eps=1e-6, atol=1e-7)


@settings(max_examples=8, deadline=None)
@given(
    dims=st.integers(1, 3),
    n=st.integers(1, 3),
    c=st.integers(1, 6),
    c_int=st.integers(1, 4),
    factors=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    extra=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    g_sizes=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    training=st.booleans(),
)
def test_hypothesis_shapes(dims, n, c, c_int, factors, extra, g_sizes, training):
    k = factors[:dims]
    size = [2 * kk + e for kk, e in zip(k, extra)]
    case = make_case(dims, n=n, c=c, c_int=c_int, size=size, factor=k, g_size=g_sizes[:dims])
    compare(case, training=training)


def test_gate_module_training_step_matches_reference():
    """A module in training mode: outputs, gradients and running statistics (momentum=None too)."""
    torch.manual_seed(0)
    ref_gate = GridAttentionGate2D(6, 8, 4, subsample_factor=(2, 3), backend="reference")
    ref_gate.W[1].momentum = None  # cumulative average: the counter must advance the same way
    cpu_gate = GridAttentionGate2D(6, 8, 4, subsample_factor=(2, 3), backend="cpu")
    cpu_gate.load_state_dict(ref_gate.state_dict())
    cpu_gate.W[1].momentum = None
    x, g = torch.randn(2, 6, 10, 12), torch.randn(2, 8, 5, 4)
    # a loss linear in out: one such as sum(out^2) makes dW a small difference of large sums, where
    # both sides' float32 rounding, not the backend, decides the digits compared
    w_out, w_alpha = torch.randn(2, 6, 10, 12), torch.randn(2, 1, 10, 12)
    for _ in range(2):
        results = []
        for gate in (ref_gate, cpu_gate):
            gate.zero_grad()
            out, alpha = gate(x, g)
            ((out * w_out).sum() + (alpha * w_alpha).sum()).backward()
            results.append((out, alpha, {k: p.grad for k, p in gate.named_parameters()}, list(gate.buffers())))
        (o1, a1, g1, b1), (o2, a2, g2, b2) = results
        assert_close(o2, o1, torch.float32, "out")
        assert_close(a2, a1, torch.float32, "alpha")
        for name in g1:  # W's bias: exactly 0 on the cpu path, rounding noise in the reference
            scale = g1["W.1.bias"].abs().max().item() if name == "W.0.bias" else None
            assert_close(g2[name], g1[name], torch.float32, f"d{name}", scale)
        for t1, t2 in zip(b1, b2):
            assert_close(t2.double(), t1.double(), torch.float32, "buffer")


def test_inference_mode_eval():
    gate = GridAttentionGate3D(4, 6, backend="cpu").eval()
    ref = GridAttentionGate3D(4, 6, backend="reference").eval()
    ref.load_state_dict(gate.state_dict())
    x, g = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 6, 4, 4, 4)
    with torch.inference_mode():
        (o1, a1), (o2, a2) = gate(x, g), ref(x, g)
    assert_close(o1, o2, torch.float32, "out")
    assert_close(a1, a2, torch.float32, "alpha")


def _weights(params, stats=None) -> GateWeights:
    return GateWeights(**params, **(stats or {}))


def test_dispatcher_refuses_unsupported_cases_with_reasons():
    x, g, params, stats = make_case(3, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match=r"(?s)backend 'cpu' cannot run.*sigma2='softmax'"):
        grid_attention(x, g, **params, **stats, sigma2="softmax", backend="cpu")
    reasons = not_supported_reasons("cpu", x, g, _weights(params), GateOptions(norm="group", training=True, sigma2="softmax"))
    assert len(reasons) == 2 and "softmax" in reasons[0] and "norm='group'" in reasons[1]
    reasons = not_supported_reasons("cpu", x.double(), g.double(), _weights(params), GateOptions(training=True))
    assert reasons and "float64" in reasons[0]
    with pytest.raises(ValueError, match="sigma2 must be 'sigmoid'"):
        grid_attention_cpu(x, g, **params, **stats, sigma2="softmax")


@pytest.mark.slow  # about 10 s of compilation on 2 cores
def test_auto_under_torch_compile_uses_the_reference():
    """torch.compile(fullgraph=True) traces "auto" gates: they take the reference there."""
    torch.manual_seed(0)
    gate = GridAttentionGate2D(4, 6).train()  # backend None: the global default, "auto"
    x, g = torch.randn(2, 4, 8, 6, requires_grad=True), torch.randn(2, 6, 4, 3)
    out, alpha = torch.compile(gate, fullgraph=True, backend="aot_eager")(x, g)
    out.sum().backward()
    with use_backend("reference"):
        assert_close(out, gate(x, g)[0], torch.float32, "out")


@pytest.mark.parametrize("training", [False, True])
def test_one_channels_last_sample_keeps_x_strides(training):
    """out has x's strides, also the batch stride of a single sample (which flatten/view may change,
    and which torch.cat reads when it picks its path)."""
    x, g, params, stats = make_case(3, n=1, c=8, c_g=12, c_int=4, size=(8, 8, 8), dtype=torch.float32)
    x, g = x.contiguous(memory_format=torch.channels_last_3d), g.contiguous(memory_format=torch.channels_last_3d)
    out, alpha = grid_attention_cpu(x, g, **params, **stats, training=training)
    assert out.stride() == x.stride() == (8**4, 1, 8 * 8 * 8, 8 * 8, 8)


def test_one_channels_last_sample_backward_stays_in_layout():
    """Training with a single channels-last sample: the backward's products over x read its
    tensors in place. (A view back from a flattened gradient once gave oneDNN another batch
    stride; it then reordered the gradient to NCDHW and every later x-sized op mixed layouts.)"""
    from torch.profiler import profile

    x, g, params, stats = make_case(3, n=1, c=8, c_g=12, c_int=4, size=(8, 8, 8), dtype=torch.float32)
    fmt = torch.channels_last_3d
    x, g = x.contiguous(memory_format=fmt).requires_grad_(), g.contiguous(memory_format=fmt)
    out, _ = grid_attention_cpu(x, g, **params, **stats, training=True)
    dout = torch.randn_like(out)
    with profile(record_shapes=True) as prof:
        out.backward(dout)
    copies = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::copy_" and list(x.shape) in e.input_shapes]
    assert not copies, [(e.key, e.input_shapes) for e in copies]
    assert x.grad.stride() == x.stride()
