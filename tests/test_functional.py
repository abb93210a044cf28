"""The reference grid attention gate against a direct transcription of Oktay et al. (2018), eqs. 1-2."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from attention_gates import GridAttentionGate2D
from attention_gates.functional import GateOptions, GateWeights, check_gate_inputs, grid_attention
from gate_cases import GateShape, gate_shapes, random_gate, reference

DT = torch.float64
LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


# ---------------------------------------------------------------------------------------------
# the paper's equations, written out independently of the library (einsum over channels)
# ---------------------------------------------------------------------------------------------


def _spatial_letters(d: int) -> str:
    return "ijk"[:d]


def theta_patch_sum(x, w):
    """W_x^T x on the coarse grid: for each coarse voxel, the sum over its k-patch and channels."""
    n, c = x.shape[:2]
    k = w.shape[2:]
    coarse = [s // kk for s, kk in zip(x.shape[2:], k)]
    x = x[(slice(None), slice(None)) + tuple(slice(0, s * kk) for s, kk in zip(coarse, k))]
    patches = x.reshape([n, c] + [v for s, kk in zip(coarse, k) for v in (s, kk)])
    sp, off = _spatial_letters(len(k)), "uvw"[: len(k)]
    spec = f"nc{''.join(a + o for a, o in zip(sp, off))},fc{off}->nf{sp}"
    return torch.einsum(spec, patches, w)


def pointwise(t, w, b):
    """A 1x1 conv: Tensor[N, C, *S] -> Tensor[N, F, *S] (weight Tensor[F, C, 1, ...])."""
    sp = _spatial_letters(t.dim() - 2)
    out = torch.einsum(f"nc{sp},fc->nf{sp}", t, w.reshape(w.shape[0], w.shape[1]))
    return out if b is None else out + b.reshape([1, -1] + [1] * (t.dim() - 2))


def resize(t, size, align_corners):
    return F.interpolate(t, size=tuple(size), mode=LINEAR[t.dim() - 2], align_corners=align_corners)


def normalise(y, norm, weight, bias, rm, rv, training, momentum, eps, groups):
    """Batch/instance/group normalisation from the means and variances, updating rm/rv in place."""
    n, c = y.shape[:2]
    if norm == "none":
        return y
    if norm == "batch" and not training:
        shape = [1, c] + [1] * (y.dim() - 2)
        z = (y - rm.reshape(shape)) / torch.sqrt(rv.reshape(shape) + eps)
    else:
        if norm == "batch":
            flat = y.transpose(0, 1).reshape(c, -1)  # [C, N * S]
        elif norm == "instance":
            flat = y.reshape(n * c, -1)  # [N * C, S]
        else:
            flat = y.reshape(n * groups, -1)  # [N * G, (C / G) * S]
        mean = flat.mean(dim=1, keepdim=True)
        var = ((flat - mean) ** 2).mean(dim=1, keepdim=True)  # biased, for normalising
        zflat = (flat - mean) / torch.sqrt(var + eps)
        if norm == "batch":
            z = zflat.reshape([c, n] + list(y.shape[2:])).transpose(0, 1)
            if rm is not None:
                m = flat.shape[1]
                with torch.no_grad():
                    rm.mul_(1 - momentum).add_(momentum * mean.flatten())
                    rv.mul_(1 - momentum).add_(momentum * var.flatten() * m / (m - 1))
        else:
            z = zflat.reshape(y.shape)
    if weight is not None:
        shape = [1, c] + [1] * (y.dim() - 2)
        z = z * weight.reshape(shape) + bias.reshape(shape)
    return z


def paper_gate(
    x, g, tw, pw, pb, sw, sb, Ww=None, Wb=None, nw=None, nb=None, rm=None, rv=None,
    *, norm="batch", num_groups=1, training=False, momentum=0.1, eps=1e-5,
    sigma1="relu", sigma2="sigmoid", align_corners=False,
):  # fmt: skip
    theta_x = theta_patch_sum(x, tw)
    phi_g = resize(pointwise(g, pw, pb), theta_x.shape[2:], align_corners)
    s = theta_x + phi_g
    f = torch.clamp(s, min=0) if sigma1 == "relu" else torch.log1p(torch.exp(s))
    q = pointwise(f, sw, sb)  # eq. 1
    if sigma2 == "sigmoid":
        a = 1 / (1 + torch.exp(-q))  # eq. 2
    else:
        e = torch.exp(q - q.amax(dim=tuple(range(2, q.dim())), keepdim=True))
        a = e / e.sum(dim=tuple(range(2, q.dim())), keepdim=True)
    alpha = resize(a, x.shape[2:], align_corners)
    y = alpha * x
    if Ww is not None:
        y = normalise(pointwise(y, Ww, Wb), norm, nw, nb, rm, rv, training, momentum, eps, num_groups)
    return y, alpha


def make_case(
    d=3, n=2, c_l=4, c_g=3, c_int=2, size=(7, 6, 5), g_size=(3, 2, 4), k=(2, 2, 2),
    *, transform=True, affine=True, batch=True, bias=True, dtype=DT, seed=0,
):  # fmt: skip
    """A :func:`gate_cases.random_gate` call as grid_attention's positional arguments ``[x, g, *GateWeights]``:
    ``transform`` keeps W, ``affine`` the norm's parameters, ``batch`` the running statistics."""
    shape = GateShape(d, n, c_l, c_g, c_int, tuple(k[:d]), tuple(size[:d]), tuple(g_size[:d]))
    norm = "batch" if batch else "instance" if affine else "none"
    x, g, w = random_gate(shape, W=transform, norm=norm, affine=affine, bias=bias, dtype=dtype, seed=seed)
    return [x, g, *w]


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, (2, 1, 3)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_paper_equations(d, k, align_corners):
    k = (k,) * 3 if isinstance(k, int) else k
    args = make_case(d=d, size=(7, 6, 5), g_size=(3, 5, 2), k=k)
    out, alpha = reference(*args, align_corners=align_corners)
    want, want_alpha = paper_gate(*args, align_corners=align_corners)
    assert out.shape == args[0].shape and alpha.shape == (args[0].shape[0], 1) + args[0].shape[2:]
    assert_close(alpha, want_alpha)
    assert_close(out, want)


@pytest.mark.parametrize("sigma1", ["relu", "softplus"])
@pytest.mark.parametrize("sigma2", ["sigmoid", "softmax"])
def test_activations(sigma1, sigma2):
    args = make_case(d=2, size=(9, 7), g_size=(2, 3), k=(3, 2))
    out, alpha = reference(*args, sigma1=sigma1, sigma2=sigma2)
    want, want_alpha = paper_gate(*args, sigma1=sigma1, sigma2=sigma2)
    assert_close(alpha, want_alpha)
    assert_close(out, want)
    if sigma2 == "softmax":  # with factor 1 and g on x's grid, alpha is unresampled: each sample sums to one
        args = make_case(d=2, size=(5, 3), g_size=(5, 3), k=(1, 1))
        _, alpha = reference(*args, sigma1=sigma1, sigma2=sigma2)
        assert_close(alpha.sum(dim=(1, 2, 3)), torch.ones(2, dtype=DT))


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("training", [False, True])
def test_output_transform_norms(norm, training):
    args = make_case(d=3, c_l=6, size=(5, 4, 6), g_size=(2, 2, 3))
    groups = 3 if norm == "group" else 1
    before = args[11].clone()
    mine = [a.clone() if a is not None else None for a in args]
    out, _ = reference(*mine, norm=norm, num_groups=groups, training=training, momentum=0.3)
    want, _ = paper_gate(*args, norm=norm, num_groups=groups, training=training, momentum=0.3)
    assert_close(out, want)
    # running statistics: updated as F.batch_norm does, by batch norm in training only
    assert_close(mine[11], args[11])
    assert_close(mine[12], args[12])
    assert (not torch.equal(mine[11], before)) == (norm == "batch" and training)


def test_running_stats_as_functional_batch_norm():
    args = make_case(d=2, c_l=5, size=(6, 6), g_size=(3, 3))
    rm, rv = torch.zeros(5, dtype=DT), torch.ones(5, dtype=DT)
    args[11], args[12] = rm, rv
    out, alpha = reference(*args, training=True, momentum=0.25, eps=1e-3)
    x, Ww, Wb, nw, nb = args[0], args[7], args[8], args[9], args[10]
    y = F.conv2d(alpha * x, Ww, Wb)
    rm2, rv2 = torch.zeros(5, dtype=DT), torch.ones(5, dtype=DT)
    want = F.batch_norm(y, rm2, rv2, nw, nb, True, 0.25, 1e-3)
    assert_close(out, want)
    assert_close(rm, rm2)
    assert_close(rv, rv2)
    assert not torch.equal(rv, torch.ones(5, dtype=DT))


def test_no_output_transform_is_alpha_times_x():
    args = make_case(d=3, transform=False)
    out, alpha = reference(*args)
    assert_close(out, alpha * args[0])
    assert_close(out, paper_gate(*args)[0])


def test_optional_biases_and_affine():
    args = make_case(d=2, size=(6, 5), g_size=(3, 3), bias=False, affine=False, batch=False)
    out, alpha = grid_attention(*args, training=True)
    want, want_alpha = paper_gate(*args, training=True)
    assert_close(alpha, want_alpha)
    assert_close(out, want)


def test_g_on_theta_grid_is_not_resampled():
    # g already on theta's grid: phi(g) is used as is, so the gate is exactly eq. 1 voxel by voxel
    args = make_case(d=2, size=(8, 6), g_size=(4, 3), transform=False)
    _, alpha = reference(*args, align_corners=True)
    x, g, tw, pw, pb, sw, sb, *no_transform = args
    assert not any(no_transform)
    q = F.conv2d(F.relu(F.conv2d(x, tw, stride=2) + F.conv2d(g, pw, pb)), sw, sb)
    assert_close(alpha, resize(torch.sigmoid(q), (8, 6), True))


def test_public_function_equals_reference():
    args = make_case(d=3)
    for training in (False, True):
        a = [t.clone() if t is not None else None for t in args]
        b = [t.clone() if t is not None else None for t in args]
        out_a, alpha_a = grid_attention(*a, training=training, backend="reference")
        out_b, alpha_b = reference(*b, training=training)
        assert_close(out_a, out_b, 0)
        assert_close(alpha_a, alpha_b, 0)
        assert_close(a[11], b[11], 0)


@given(
    s=gate_shapes(),
    sigma1=st.sampled_from(["relu", "softplus"]),
    sigma2=st.sampled_from(["sigmoid", "softmax"]),
    norm=st.sampled_from(["batch", "instance", "group", "none"]),
    training=st.booleans(),
    align_corners=st.booleans(),
)
def test_property_matches_paper_equations(s, sigma1, sigma2, norm, training, align_corners):
    if (norm == "batch" and training and s.n * math.prod(s.size) < 2) or (norm == "instance" and math.prod(s.size) < 2):
        s = s._replace(size=(s.size[0] + 1, *s.size[1:]))  # statistics of one value: refused, tested elsewhere
    x, g, w = random_gate(s, norm=norm)
    args = [x, g, *w]
    kw = dict(norm=norm, training=training, sigma1=sigma1, sigma2=sigma2, align_corners=align_corners)
    mine = [a.clone() if a is not None else None for a in args]
    out, alpha = grid_attention(*mine, backend="reference", **kw)
    want, want_alpha = paper_gate(*args, **kw)
    assert_close(alpha, want_alpha)
    assert_close(out, want)
    assert_close(mine[11], args[11])


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d,norm,training,sigma1,sigma2",
    [
        (1, "batch", True, "relu", "sigmoid"),
        (2, "batch", False, "softplus", "softmax"),
        (2, "instance", True, "softplus", "sigmoid"),
        (3, "group", True, "relu", "sigmoid"),
        (2, "none", False, "relu", "softmax"),
    ],
)
def test_gradcheck(d, norm, training, sigma1, sigma2):
    args = make_case(d=d, n=2, c_l=4, c_g=2, c_int=2, size=(5, 4, 3), g_size=(2, 3, 2), k=(2, 2, 1), seed=d)
    rm, rv = args[11], args[12]
    diff = [i for i in range(11) if args[i] is not None]  # x, g and every weight
    inputs = tuple(args[i].requires_grad_(True) for i in diff)

    def fn(*ts):
        full = list(args)
        for i, t in zip(diff, ts):
            full[i] = t
        full[11], full[12] = rm.clone(), rv.clone()
        return reference(
            *full, norm=norm, num_groups=2, training=training, sigma1=sigma1, sigma2=sigma2
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# errors: each names the argument, what was expected and what came
# ---------------------------------------------------------------------------------------------


def _with(index, value, **case):
    args = make_case(**case)
    args[index] = value
    return args


BASE = dict(d=2, n=2, c_l=4, c_g=3, c_int=2, size=(6, 6), g_size=(3, 3), k=(2, 2), dtype=torch.float32)


@pytest.mark.parametrize(
    "index,value,exc,match",
    [
        (0, [1.0], TypeError, r"x must be a torch\.Tensor, got list"),
        (0, torch.ones(2, 4, 6, 6, dtype=torch.long), TypeError, r"x must be a floating-point tensor.*int64"),
        (1, torch.ones(2, 3, 3, 3, dtype=torch.int32), TypeError, r"g must be a floating-point tensor.*int32"),
        (0, torch.randn(2, 4), ValueError, r"x must be Tensor\[N, C, \*spatial\].*got 2 dims"),
        (1, torch.randn(2, 3, 1, 3, 3, 3), ValueError, r"g must be Tensor\[N, C, \*spatial\].*got 6 dims"),
        (1, torch.randn(2, 3, 3, 3, 3), ValueError, r"x and g must have the same number of spatial dims"),
        (1, torch.randn(3, 3, 3, 3), ValueError, r"x and g must have the same batch size.*\[3, 3, 3, 3\]"),
        (2, None, ValueError, r"theta_weight is required, got None"),
        (2, [[1.0]], TypeError, r"theta_weight must be a torch\.Tensor, got list"),
        (2, torch.randn(2, 4, 2), ValueError, r"theta_weight must be Tensor\[F_int, F_l.*2 kernel dims.*\[2, 4, 2\]"),
        (2, torch.randn(2, 5, 2, 2), ValueError, r"theta_weight must have shape \[2, 4, 2, 2\] to match x's channels.*got \[2, 5, 2, 2\]"),
        (3, torch.randn(2, 4, 1, 1), ValueError, r"phi_weight must have shape \[2, 3, 1, 1\].*g's channels.*got \[2, 4, 1, 1\]"),
        (3, None, ValueError, r"phi_weight is required, got None"),
        (4, torch.randn(3), ValueError, r"phi_bias must have shape \[2\].*got \[3\]"),
        (5, torch.randn(1, 3, 1, 1), ValueError, r"psi_weight must have shape \[1, 2, 1, 1\].*got \[1, 3, 1, 1\]"),
        (5, None, ValueError, r"psi_weight is required, got None"),
        (6, torch.randn(2), ValueError, r"psi_bias must have shape \[1\].*got \[2\]"),
        (7, torch.randn(4, 3, 1, 1), ValueError, r"W_weight must have shape \[4, 4, 1, 1\].*got \[4, 3, 1, 1\]"),
        (8, torch.randn(5), ValueError, r"W_bias must have shape \[4\].*got \[5\]"),
        (9, torch.randn(3), ValueError, r"norm_weight must have shape \[4\].*got \[3\]"),
        (10, torch.randn(3), ValueError, r"norm_bias must have shape \[4\].*got \[3\]"),
        (11, torch.randn(2), ValueError, r"running_mean must have shape \[4\].*got \[2\]"),
        (12, torch.randn(6), ValueError, r"running_var must have shape \[4\].*got \[6\]"),
        (3, torch.ones(2, 3, 1, 1, dtype=torch.int64), TypeError, r"phi_weight must be a floating-point tensor.*int64"),
        (4, [0.0, 0.0], TypeError, r"phi_bias must be a torch\.Tensor or None, got list"),
        (2, torch.randn(2, 4, 7, 2), ValueError, r"theta_weight's kernel size \(the subsample factor\) \(7, 2\) does not fit.*\[6, 6\]"),
    ],
)
def test_input_errors(index, value, exc, match):
    with pytest.raises(exc, match=match):
        grid_attention(*_with(index, value, **BASE))


@pytest.mark.parametrize("index,name", [(2, "theta_weight"), (3, "phi_weight"), (7, "W_weight"), (11, "running_mean")])
def test_weight_on_another_device(index, name):
    args = make_case(**BASE)
    args[index] = args[index].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        grid_attention(*args)


def test_g_on_another_device():
    args = make_case(**BASE)
    args[1] = args[1].to("meta")
    with pytest.raises(ValueError, match=r"x is on cpu but g is on meta"):
        grid_attention(*args)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(sigma1="gelu"), r"sigma1 must be one of \('relu', 'softplus'\), got 'gelu'"),
        (dict(sigma2="tanh"), r"sigma2 must be one of \('sigmoid', 'softmax'\), got 'tanh'"),
        (dict(norm="layer"), r"norm must be one of .*got 'layer'"),
        (dict(backend="cuda"), r"backend must be one of .*got 'cuda'"),
        (dict(norm="group", num_groups=3), r"num_groups=3 must divide x's 4 channels"),
    ],
)
def test_option_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        grid_attention(*make_case(**BASE), **kw)


def test_batch_norm_training_needs_two_values():
    args = make_case(**{**BASE, "n": 1, "size": (1, 1), "g_size": (1, 1), "k": (1, 1)})
    with pytest.raises(ValueError, match=r"batch normalisation in training needs more than one value per channel"):
        grid_attention(*args, training=True)
    out, _ = grid_attention(*args, training=False)  # eval uses the running statistics: fine
    assert out.shape == args[0].shape


def test_eval_batch_norm_needs_running_statistics():
    args = make_case(**BASE)
    args[11] = args[12] = None
    with pytest.raises(ValueError, match=r"running_mean and running_var are required for norm='batch' when training=False"):
        grid_attention(*args)
    out, _ = grid_attention(*args, training=True)  # batch statistics need none
    assert out.shape == args[0].shape


def test_check_gate_inputs_accepts_valid_call():
    x, g, *weights = make_case(**BASE)
    assert check_gate_inputs(x, g, GateWeights(*weights), GateOptions()) is None


def test_options_are_checked_when_made():
    with pytest.raises(ValueError, match=r"sigma1 must be one of \('relu', 'softplus'\), got 'tanh'"):
        GateOptions(sigma1="tanh")
    with pytest.raises(dataclasses.FrozenInstanceError):
        GateOptions().training = True


# ---------------------------------------------------------------------------------------------
# dtypes: one for every tensor, said before any convolution meets two
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "index,dtype,match",
    [
        (1, torch.float16, r"x's dtype torch.float32: .*got g torch.float16"),
        (2, torch.float64, r"got theta_weight torch.float64"),
        (7, torch.bfloat16, r"got W_weight torch.bfloat16"),
        (12, torch.float64, r"got running_var torch.float64"),
    ],
)
def test_a_tensor_of_another_dtype_is_named(index, dtype, match):
    args = make_case(**BASE)
    args[index] = args[index].to(dtype)
    with pytest.raises(TypeError, match=match):
        grid_attention(*args)


def test_every_other_dtype_is_named_at_once():
    args = make_case(**BASE)
    x = args[0].half()
    with pytest.raises(TypeError) as err:
        grid_attention(x, *args[1:])
    msg = str(err.value)
    assert "x's dtype torch.float16" in msg and "g torch.float32" in msg and "theta_weight torch.float32" in msg
    assert "running_mean torch.float32" in msg and ".to(torch.float16)" in msg


def test_meta_tensors_give_shapes_and_still_name_another_dtype():
    """On the meta device (no autocast there: shape inference, as nnU-Net's cost planning does) the gate
    gives its output shapes, and a dtype mismatch is still a TypeError naming the tensor."""
    gate = GridAttentionGate2D(4, 6).to("meta").eval()
    out, alpha = gate(torch.empty(2, 4, 8, 8, device="meta"), torch.empty(2, 6, 4, 4, device="meta"))
    assert out.shape == (2, 4, 8, 8) and alpha.shape == (2, 1, 8, 8) and out.device.type == "meta"
    with pytest.raises(TypeError, match=r"got g torch.float16"):
        gate(torch.empty(2, 4, 8, 8, device="meta"), torch.empty(2, 6, 4, 4, device="meta", dtype=torch.float16))


def test_a_module_with_other_weights_than_its_input_says_which():
    """The gate module with half weights and a float32 input (issue 24): a TypeError before any convolution."""
    gate = GridAttentionGate2D(4, 6).half().eval()
    with pytest.raises(TypeError, match=r"x's dtype torch.float32: g and every weight must have it too.*got theta_weight torch.float16"):
        gate(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4))


def test_under_autocast_the_dtypes_may_differ():
    """torch.autocast casts the convolutions' operands itself: a float32 gate takes a bfloat16 input."""
    gate = GridAttentionGate2D(4, 6, backend="reference").eval()
    x, g = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.randn(2, 6, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, alpha = gate(x, g)
    assert out.shape == x.shape and alpha.shape == (2, 1, 8, 8)


def test_an_empty_batch_in_training_is_refused_with_batch_norm_and_computed_without():
    args = make_case(**{**BASE, "n": 0})
    with pytest.raises(ValueError, match=r"batch normalisation in training needs more than one value per channel.*\[0, 4, 6, 6\]"):
        grid_attention(*args, training=True)
    out, alpha = grid_attention(*args, training=False)
    assert out.shape == (0, 4, 6, 6) and alpha.shape == (0, 1, 6, 6)
    out, _ = grid_attention(*args, norm="none", training=True)
    assert out.shape == (0, 4, 6, 6)
