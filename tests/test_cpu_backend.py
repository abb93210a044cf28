"""The cpu backend (attention_gates.ops.cpu_gate) against the reference gate: outputs, every gradient,
running statistics, layouts, dtypes, empty batches, NaN and infinity, and the dispatcher's choice of it;
the CPU convolution paths (attention_gates.ops.onednn) on both sides of their thresholds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_gates import GridAttentionGate2D, GridAttentionGate3D
from attention_gates.functional import GateOptions, GateWeights, grid_attention, grid_attention_reference
from attention_gates.ops import BackendUnavailableError, measured, not_supported_reasons, use_backend
from attention_gates.ops.cpu_gate import COARSE, grid_attention_cpu, resample, theta, theta_backward
from attention_gates.ops.onednn import conv1x1
from gate_cases import DT, GateShape, assert_close_nonfinite, clone_weights, gate_shapes, nonfinite_spots, random_gate, with_nonfinite

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
FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale=None) -> None:
    """``scale``: the magnitude errors are relative to (default: ``max|expected|``)."""
    rtol, atol = TOL[dtype]
    assert actual.shape == expected.shape, what
    if not expected.numel():
        return
    err = (actual.double() - expected.double()).abs().max().item()
    bound = atol + rtol * (expected.double().abs().max().item() if scale is None else scale)
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def shape(d: int, *, n=2, c=5, c_g=6, c_int=3, size=(9, 7, 6), factor=2, g_size=None) -> GateShape:
    """This file's usual gate call in ``d`` dims: 9x7x6 voxels (the first ``d``), subsample factor 2,
    ``g`` on theta's grid unless ``g_size`` says otherwise."""
    k = (factor,) * d if isinstance(factor, int) else tuple(factor)
    size = tuple(size[:d])
    g_size = tuple(g_size[:d]) if g_size is not None else tuple(s // kk for s, kk in zip(size, k))
    return GateShape(d, n, c, c_g, c_int, k, size, g_size)


def in_format(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors channels-last."""
    return tuple(t.contiguous(memory_format=FORMATS[t.dim() - 2]) for t in tensors)


def run(impl, x, g, w: GateWeights, *, requires=None, grad_out=True, grad_alpha=True, **options):
    """``impl(x, g, weights, GateOptions(**options))`` on fresh leaf copies; back-propagates fixed
    random weights of out and alpha.

    Returns ``(out, alpha, grads, stats_after)``, the gradients and the running statistics by name.
    """
    trainable = ["x", "g", *(f for f, t in w._asdict().items() if t is not None and not f.startswith("running_"))]
    requires = set(trainable if requires is None else requires)
    leaves = {k: None if v is None else v.detach().clone() for k, v in {"x": x, "g": g, **w._asdict()}.items()}
    for name in trainable:
        leaves[name].requires_grad_(name in requires)
    out, alpha = impl(leaves["x"], leaves["g"], GateWeights(**{f: leaves[f] for f in GateWeights._fields}), GateOptions(**options))
    gen = torch.Generator().manual_seed(123)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    w_alpha = torch.randn(alpha.shape, generator=gen, dtype=torch.float64).to(alpha.dtype)
    loss = (out * w_out).sum() * grad_out + (alpha * w_alpha).sum() * grad_alpha
    grads = {}
    if requires:
        loss.backward()
        grads = {k: leaves[k].grad for k in trainable if k in requires}
    stats = {k: leaves[k] for k in ("running_mean", "running_var") if leaves[k] is not None}
    return out.detach(), alpha.detach(), grads, stats


def compare(x, g, w: GateWeights, dtype=DT, ref_inputs=None, **kw):
    """The cpu backend and the reference on the same call: every output, gradient and statistic."""
    got = run(grid_attention_cpu, x, g, w, **kw)
    want = run(grid_attention_reference, *(ref_inputs or (x, g, w)), **kw)
    assert_close(got[0], want[0].to(got[0].dtype), dtype, "out")
    assert_close(got[1], want[1].to(got[1].dtype), dtype, "alpha")
    assert set(got[2]) == set(want[2])
    inputs = {"x": x, "g": g, **w._asdict()}
    for name in want[2]:
        assert got[2][name] is not None, f"no gradient for {name}"
        assert got[2][name].dtype == inputs[name].dtype
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
    x, g, w = random_gate(shape(dims), **case_kw)
    got, _ = compare(x, g, w, sigma1=sigma1, **call_kw)
    if call_kw.get("training"):  # the running statistics moved, identically
        assert not torch.equal(got[3]["running_mean"], w.running_mean)


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
    compare(*random_gate(shape(dims, size=size, factor=factor, g_size=g_size)), training=training)


@pytest.mark.parametrize("align_corners", [False, True])
def test_align_corners_and_batch_of_one(align_corners):
    compare(*random_gate(shape(3, n=1, size=(8, 10, 6), g_size=(3, 4, 5))), training=True, align_corners=align_corners)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_channels_last(dims, training):
    """Channels-last x is computed as [S, C] matrices and gives a channels-last out."""
    x, g, w = random_gate(shape(dims, size=(8, 6, 10)))
    x, g = in_format(x, g)
    got, _ = compare(x, g, w, training=training)
    assert got[0].is_contiguous(memory_format=FORMATS[dims])


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
    compare(*random_gate(shape(3)), requires=requires, grad_out=grad_out, grad_alpha=grad_alpha, training=True)


def test_no_affine_no_bias():
    x, g, w = random_gate(shape(2), bias=False, affine=False)
    w = w._replace(W_bias=None)
    compare(x, g, w, training=True)
    compare(x, g, w._replace(running_mean=None, running_var=None), training=True)  # no running statistics either


def test_float32():
    compare(*random_gate(shape(3, c=8, c_g=12, c_int=4, size=(12, 10, 8)), dtype=torch.float32), torch.float32, training=True)


def _mkldnn_calls(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}.get("aten::mkldnn_convolution", 0)


@needs_onednn
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dims,size", [(2, (12, 10)), (3, (12, 10, 8)), (2, (160, 128)), (3, (32, 32, 24))])
def test_float32_channels_last_products(dims, size, training):
    """float32 channels-last: a 1x1 product goes to oneDNN (on the tensor in place) only with at
    least this CPU's ``onednn_min_rows`` voxels, else it is a matrix product on the ``[S, C]`` rows;
    theta is a oneDNN convolution only for more than ``patch_max_rows`` coarse voxels, else a
    product of x's patches. Results as the reference's, out channels-last."""
    x, g, w = random_gate(shape(dims, n=1, c=8, c_g=12, c_int=4, size=size), dtype=torch.float32)
    x, g = in_format(x, g)
    # the gradients that pass through these products (the coarse side's, psi's bias a sum over
    # every voxel, are checked at float32 tolerance on smaller cases elsewhere)
    got, _ = compare(x, g, w, torch.float32, training=training, requires=["x", "W_weight", "theta_weight"])
    assert got[0].is_contiguous(memory_format=FORMATS[dims])
    t = measured.cpu_thresholds()
    fine, coarse = math.prod(size), math.prod(size) // 2**dims
    # theta once; W forward and W^T backward on x's grid; phi and psi on the coarse grid, each in
    # the forward and again in the backward's recomputation of alpha
    expected = (coarse > t.patch_max_rows) + 2 * (fine >= t.onednn_min_rows) + 4 * (coarse >= t.onednn_min_rows)
    assert _mkldnn_calls(lambda: run(grid_attention_cpu, x, g, w, training=training)) == expected


@needs_onednn
@pytest.mark.parametrize("c,co,size", [(16, 16, (8, 8, 8)), (32, 1, (16, 8, 4)), (5, 3, (6, 7))])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv1x1_on_both_sides_of_its_threshold(c, co, size, batch):
    """float32 channels-last: oneDNN (``onednn_min_rows=0``) and the product on the rows
    (``measured.NEVER``) both equal the convolution, in the input's layout."""
    gen = torch.Generator().manual_seed(c)
    (x,) = in_format(torch.randn(batch, c, *size, generator=gen))
    w, b = torch.randn(co, c, generator=gen), torch.randn(co, generator=gen)
    want = (F.conv2d if len(size) == 2 else F.conv3d)(x.double(), w.double().view(co, c, *[1] * len(size)), b.double())
    for min_rows, calls in ((0, 1), (measured.NEVER, 0)):
        got = conv1x1(x, w, b, onednn_min_rows=min_rows)
        assert _mkldnn_calls(lambda: conv1x1(x, w, b, onednn_min_rows=min_rows)) == calls
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert got.is_contiguous(memory_format=FORMATS[len(size)])


@pytest.mark.parametrize(
    "dims,n,size,factors,channels_last",
    [
        (3, 1, (9, 8, 7), [(2, 2, 2)], True),  # sizes the factor does not divide: the rest is cropped
        (3, 2, (8, 6, 10), [(2, 3, 2), (2, 3, 2)], True),  # per-axis factors, two heads' weights
        (2, 1, (11, 8), [(3, 2)] * 3, True),
        (3, 1, (8, 8, 8), [(2, 2, 2)], False),  # contiguous: the convolution
    ],
)
@pytest.mark.parametrize("patch_max_rows", [0, measured.NEVER], ids=["convolution", "patches"])
def test_theta_equals_the_strided_convolution(dims, n, size, factors, channels_last, patch_max_rows):
    """theta of several heads' weights at once, as a product of x's patches (channels-last, below
    ``patch_max_rows``) or a convolution, equals the strided convolution of each weight, concatenated."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, *size, generator=gen, dtype=torch.float64)
    if channels_last:
        (x,) = in_format(x)
    weights = [torch.randn(3 + i, 5, *k, generator=gen, dtype=torch.float64) for i, k in enumerate(factors)]
    conv = {2: F.conv2d, 3: F.conv3d}[dims]
    want = torch.cat([conv(x, w, stride=w.shape[2:]) for w in weights], dim=1)
    got = theta(x, weights, patch_max_rows=patch_max_rows)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()
    if patch_max_rows:  # the patches' product in x's layout (float64 convolutions leave torch's choice)
        assert got.is_contiguous(memory_format=FORMATS[dims]) == channels_last


@needs_onednn
@pytest.mark.parametrize("dims,size,factor", [(3, (20, 14, 13), (2, 2, 2)), (3, (11, 9, 10), (2, 3, 2)), (2, (31, 23), (3, 2))])
@pytest.mark.parametrize("transposed_min_numel", [0, measured.NEVER], ids=["transposed-convolution", "product"])
def test_theta_backward_on_both_sides_of_its_threshold(dims, size, factor, transposed_min_numel):
    """theta's input gradient plus the gate's path through alpha * x, by oneDNN's transposed
    convolution or a product and a strided add, equals autograd's through the strided convolution,
    with sizes the factor does not divide (the voxels left over get only the latter)."""
    gen = torch.Generator().manual_seed(dims)
    (x,) = in_format(torch.randn(1, 6, *size, generator=gen))
    w = torch.randn(4, 6, *factor, generator=gen)
    T = [s // k for s, k in zip(size, factor)]
    dt, h = torch.randn(1, 4, *T, generator=gen), torch.randn(x.shape, generator=gen)
    alpha = torch.rand(1, 1, *size, generator=gen)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    conv = {2: F.conv2d, 3: F.conv3d}[dims]
    want_x, want_w = torch.autograd.grad(conv(x64, w64, stride=factor), [x64, w64], dt.double())
    dx, dw = theta_backward(dt, x, w, need_weight=True, h=h, alpha=alpha, transposed_min_numel=transposed_min_numel)
    torch.testing.assert_close(dx.double(), want_x + h.double() * alpha.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), want_w, rtol=1e-5, atol=1e-4)
    assert dx.stride() == x.stride()


@needs_onednn
@pytest.mark.parametrize("dims,size,factor", [(3, (50, 36, 37), 2), (2, (199, 221), (3, 2))])
def test_float32_channels_last_theta_backward_follows_the_threshold(dims, size, factor):
    """Training on channels-last float32 x: theta's input gradient comes from oneDNN's transposed
    convolution exactly when x has at least this CPU's ``transposed_min_numel`` elements."""
    from torch.profiler import profile

    x, g, w = random_gate(shape(dims, n=1, c=12, c_g=12, c_int=8, size=size, factor=factor), dtype=torch.float32)
    x, g = in_format(x, g)
    got, _ = compare(x, g, w, torch.float32, training=True, requires=["x", "theta_weight"])
    assert got[2]["x"].stride() == x.stride()
    with profile(record_shapes=True) as prof:  # only x needs a gradient: theta's weight gradient is not called
        run(grid_attention_cpu, x, g, w, training=True, requires=["x"])
    on_x = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.key == "aten::convolution_backward" and e.input_shapes[1] == list(x.shape)]  # fmt: skip
    assert sum(e.count for e in on_x) == (x.numel() >= measured.cpu_thresholds().transposed_min_numel)


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
    from attention_gates.functional import resample as interpolate

    n_in, n_out = zip(*sizes[:dims])
    t = torch.randn(2, channels, *n_in, dtype=torch.float64, requires_grad=True)
    got, want = resample(t, n_out, align_corners), interpolate(t, n_out, align_corners)
    assert got.shape == want.shape == (2, channels, *n_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(want)
    (g_got,) = torch.autograd.grad(got, t, w)
    (g_want,) = torch.autograd.grad(want, t, w)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("align_corners", [False, True])
def test_resample_keeps_nonfinite_values_local(value, align_corners):
    """One NaN or infinity reaches only the points the interpolation reaches, as in F.interpolate."""
    from attention_gates.functional import resample as interpolate

    t = torch.randn(1, 2, 6, 5, 4, dtype=torch.float64)
    t[0, 1, 2, 3, 1] = value
    got, want = resample(t, (12, 10, 8), align_corners), interpolate(t, (12, 10, 8), align_corners)
    assert_close_nonfinite(got, want, rtol=1e-12, atol=1e-12, what="resampled")
    assert 0 < (~torch.isfinite(got)).sum() < got[0, 1].numel() // 4 and torch.isfinite(got[0, 0]).all()  # a neighbourhood


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
    gen = torch.Generator().manual_seed(n * 1000 + c * 100 + co)
    x = torch.randn(n, c, *size[:dims], generator=gen, dtype=torch.float64)
    if channels_last and dims > 1:
        (x,) = in_format(x)
    x.requires_grad_()
    w = torch.randn(co, c, *[1] * dims, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(co, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    got, want = conv1x1(x, w, b), conv(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # x's layout (a tensor that is also contiguous counts as contiguous), on every dim longer than 1
    fmt = torch.contiguous_format
    if channels_last and dims > 1 and not x.is_contiguous():
        fmt = FORMATS[dims]
    expected = torch.empty(want.shape).contiguous(memory_format=fmt).stride()
    assert [s for s, m in zip(got.stride(), got.shape) if m > 1] == [s for s, m in zip(expected, want.shape) if m > 1]
    leaves = [x, w] + ([b] if bias else [])
    wdy = torch.randn_like(want)
    for g_got, g_want in zip(torch.autograd.grad(got, leaves, wdy), torch.autograd.grad(want, leaves, wdy)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    """Half inputs: computed in float32, so the result is the float32 reference rounded once."""
    x, g, w = random_gate(shape(3, size=(8, 8, 6)), dtype=dtype)
    ref_inputs = (x.float(), g.float(), GateWeights(*(None if t is None else t.float() for t in w)))
    got, _ = compare(x, g, w, dtype, ref_inputs=ref_inputs, training=False)
    assert got[0].dtype == dtype and got[1].dtype == dtype


def test_gradcheck_float64():
    x, g, w = random_gate(shape(3, n=2, c=2, c_g=2, c_int=2, size=(4, 3, 2), factor=(2, 2, 1), g_size=(3, 2, 1)))
    trainable = [f for f in GateWeights._fields if getattr(w, f) is not None and not f.startswith("running_")]

    def f(x, g, *ps):
        weights = w._replace(**dict(zip(trainable, ps)), running_mean=w.running_mean.clone(), running_var=w.running_var.clone())
        return grid_attention_cpu(x, g, weights, GateOptions(training=True, momentum=0.0, sigma1="softplus"))

    inputs = [t.clone().requires_grad_() for t in (x, g, *(getattr(w, f) for f in trainable))]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, fast_mode=True)
    x, g, w = random_gate(shape(2, n=1, c=2, c_g=2, c_int=2, size=(5, 4)), W=False)
    names = ("theta_weight", *COARSE)
    inputs = [t.clone().requires_grad_() for t in (x, g, *(getattr(w, name) for name in names))]

    def gate(x, g, *ps):
        return grid_attention_cpu(x, g, GateWeights(**dict(zip(names, ps))))

    assert torch.autograd.gradcheck(gate, inputs, eps=1e-6, atol=1e-7)


OUTPUT_SIDES = {  # random_gate's arguments, the call's options
    "no-W": (dict(W=False), dict()),
    "W-none": (dict(norm="none"), dict(norm="none")),
    "W-batch-eval": (dict(), dict()),
    "W-batch-train": (dict(), dict(training=True)),
}


@settings(max_examples=8, deadline=None)
@given(s=gate_shapes(), side=st.sampled_from(sorted(OUTPUT_SIDES)))
def test_hypothesis_shapes(s, side):
    gate_kw, call_kw = OUTPUT_SIDES[side]
    if call_kw.get("training") and s.n * math.prod(s.size) < 2:
        return  # batch statistics of one value: refused by the input checks before any backend
    compare(*random_gate(s, **gate_kw), **call_kw)


@pytest.mark.parametrize("dims,channels_last", [(1, False), (2, False), (3, False), (2, True), (3, True)])
@pytest.mark.parametrize("side", ["no-W", "W-none", "W-batch-eval"])
def test_empty_batch(dims, side, channels_last):
    """A batch of no samples: empty outputs and an empty x gradient, zero weight gradients, as the reference."""
    gate_kw, call_kw = OUTPUT_SIDES[side]
    x, g, w = random_gate(shape(dims, n=0), **gate_kw)
    if channels_last:
        x, g = in_format(x, g)
    got, want = compare(x, g, w, **call_kw)
    assert got[0].shape == x.shape and got[1].shape == (0, 1, *x.shape[2:]) and got[2]["x"].shape == x.shape


def _nonfinite_case(s: GateShape, spots: dict, side: str, dtype=DT):
    gate_kw, call_kw = OUTPUT_SIDES[side]
    x, g, w = random_gate(s, dtype=dtype, **gate_kw)
    return with_nonfinite(x, spots.get("x", [])), with_nonfinite(g, spots.get("g", [])), w, call_kw


@settings(max_examples=20, deadline=None)
@given(data=st.data(), s=gate_shapes(), side=st.sampled_from(sorted(OUTPUT_SIDES)), channels_last=st.booleans())
def test_nonfinite_inputs_reach_what_they_reach_in_the_reference(data, s, side, channels_last):
    """NaN and infinity in x or g: out and alpha have NaN and infinities exactly where the
    reference has them (the resampling reaches only a point's neighbours), and agree elsewhere."""
    if side == "W-batch-train" and s.n * math.prod(s.size) < 2:
        return  # refused by the input checks before any backend
    x, g, w, call_kw = _nonfinite_case(s, data.draw(nonfinite_spots(s)), side)
    if channels_last and s.d > 1:
        x, g = in_format(x, g)
    opt = GateOptions(**call_kw)
    with torch.no_grad():
        got, want = grid_attention_cpu(x, g, clone_weights(w), opt), grid_attention_reference(x, g, clone_weights(w), opt)
    for a, b, what in zip(got, want, ("out", "alpha")):
        assert_close_nonfinite(a, b, rtol=1e-9, atol=1e-9, what=what)


@needs_onednn
@pytest.mark.parametrize("where", ["x", "g"])
def test_nonfinite_float32_channels_last_at_the_paper_models_sizes(where):
    """One NaN in x, or an infinity in g, at the sizes of a paper-model level (and the paths this
    CPU's thresholds pick there): alpha and out are non-finite where the reference's are, and only there."""
    s = shape(3, n=1, c=16, c_g=32, c_int=16, size=(32, 32, 24))
    spots = {"x": [(5 * 32 * 32 * 24 + 1000, float("nan"))]} if where == "x" else {"g": [(3 * 16 * 16 * 12 + 77, float("inf"))]}
    x, g, w, _ = _nonfinite_case(s, spots, "W-batch-eval", torch.float32)
    x, g = in_format(x, g)
    with torch.no_grad():
        got, want = grid_attention_cpu(x, g, w), grid_attention_reference(x, g, w)
    for a, b, what in zip(got, want, ("out", "alpha")):
        assert_close_nonfinite(a, b, rtol=1e-4, atol=1e-4, what=what)
    nonfinite = (~torch.isfinite(got[1])).sum().item()
    assert nonfinite < 100 and (nonfinite > 0 or where == "g")  # a neighbourhood, not the sample (an infinite
    # phi(g) may saturate the sigmoid to a finite alpha)


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


def test_unsupported_cases_are_refused_with_reasons():
    """Through the dispatcher and called directly: a BackendUnavailableError listing what the backend does not compute."""
    x, g, w = random_gate(shape(3), dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match=r"(?s)backend 'cpu' cannot run.*sigma2='softmax'"):
        grid_attention(x, g, *w, sigma2="softmax", backend="cpu")
    reasons = not_supported_reasons("cpu", x, g, w, GateOptions(norm="group", training=True, sigma2="softmax"))
    assert len(reasons) == 2 and "softmax" in reasons[0] and "norm='group'" in reasons[1]
    reasons = not_supported_reasons("cpu", x.double(), g.double(), w, GateOptions(training=True))
    assert reasons and "float64" in reasons[0]
    with pytest.raises(BackendUnavailableError, match=r"(?s)backend 'cpu' cannot run.*sigma2='softmax'"):
        grid_attention_cpu(x, g, w, GateOptions(sigma2="softmax"))
    with pytest.raises(BackendUnavailableError, match=r"norm='instance': only 'batch' or 'none'"):
        grid_attention_cpu(x, g, w, GateOptions(norm="instance"))


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
    x, g, w = random_gate(shape(3, n=1, c=8, c_g=12, c_int=4, size=(8, 8, 8)), dtype=torch.float32)
    x, g = in_format(x, g)
    out, alpha = grid_attention_cpu(x, g, w, GateOptions(training=training))
    assert out.stride() == x.stride() == (8**4, 1, 8 * 8 * 8, 8 * 8, 8)


def test_one_channels_last_sample_backward_stays_in_layout():
    """Training with a single channels-last sample: the backward's products over x read its
    tensors in place. (A view back from a flattened gradient once gave oneDNN another batch
    stride; it then reordered the gradient to NCDHW and every later x-sized op mixed layouts.)"""
    from torch.profiler import profile

    x, g, w = random_gate(shape(3, n=1, c=8, c_g=12, c_int=4, size=(8, 8, 8)), dtype=torch.float32)
    x, g = in_format(x, g)
    x.requires_grad_()
    out, _ = grid_attention_cpu(x, g, w, GateOptions(training=True))
    dout = torch.randn_like(out)
    with profile(record_shapes=True) as prof:
        out.backward(dout)
    copies = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::copy_" and list(x.shape) in e.input_shapes]
    assert not copies, [(e.key, e.input_shapes) for e in copies]
    assert x.grad.stride() == x.stride()
