"""Helpers shared by the test modules."""

import torch
from torch import nn

from attention_gates.functional import GateOptions, GateWeights, grid_attention_reference


def flat(impl):
    """``impl(x, g, GateWeights, GateOptions)`` called with :func:`~attention_gates.functional.grid_attention`'s
    flat arguments: the weights in :class:`GateWeights`' order or by name, the options by name."""

    def call(x, g, *weights, **kw):
        named = {k: kw.pop(k) for k in list(kw) if k in GateWeights._fields}
        return impl(x, g, GateWeights(*weights, **named), GateOptions(**kw))

    return call


reference = flat(grid_attention_reference)


DT = torch.float64


def inputs(d=3, n=2, c_l=4, c_g=6, size=(6, 5, 7), g_size=(3, 2, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_l, *size[:d], generator=gen, dtype=DT)
    g = torch.randn(n, c_g, *g_size[:d], generator=gen, dtype=DT)
    return x, g


def randomise(module, seed=1):
    """Random values for every parameter and normalisation buffer (so that no test passes on an identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if name.endswith("1.weight") else 0.0))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return module


def functional_args(gate):
    """The gate's parameters in grid_attention's argument order (running statistics cloned)."""
    conv, nrm = gate.W[0], gate.W[1]
    return [
        gate.theta.weight, gate.phi.weight, gate.phi.bias, gate.psi.weight, gate.psi.bias,
        conv.weight, conv.bias, nrm.weight, nrm.bias, nrm.running_mean.clone(), nrm.running_var.clone(),
    ]  # fmt: skip


# --- random gate calls, shared by the tests of every implementation ---------------------------

import math  # noqa: E402
from typing import NamedTuple, Optional  # noqa: E402

from hypothesis import strategies as st  # noqa: E402


class GateShape(NamedTuple):
    """The sizes of one gate call: ``x = Tensor[n, c_l, *size]``, ``g = Tensor[n, c_g, *g_size]``,
    theta ``Tensor[c_int, c_l, *k]`` (``d`` spatial dims)."""

    d: int
    n: int
    c_l: int
    c_g: int
    c_int: int
    k: tuple
    size: tuple
    g_size: tuple


@st.composite
def gate_shapes(draw, dims=(1, 2, 3), n=(1, 2), c_l=(1, 4), c_g=(1, 4), c_int=(1, 3), k=(1, 3), extra=(0, 4), g_size=(1, 5)):
    """A :class:`GateShape`: every size at least the factor along its axis (odd ones included);
    ``g_size=None`` puts g on theta's grid (``size // k``, no resampling of g). Each argument is an
    inclusive ``(low, high)`` range (``dims`` the choices)."""
    d = draw(st.sampled_from(dims))
    kk = tuple(draw(st.integers(*k)) for _ in range(d))
    size = tuple(f + draw(st.integers(*extra)) for f in kk)
    gs = tuple(s // f for s, f in zip(size, kk)) if g_size is None else tuple(draw(st.integers(*g_size)) for _ in range(d))
    return GateShape(d, draw(st.integers(*n)), draw(st.integers(*c_l)), draw(st.integers(*c_g)), draw(st.integers(*c_int)), kk, size, gs)


def random_gate(shape: GateShape, *, W: bool = True, norm: str = "batch", affine: bool = True, bias: bool = True,
                dtype=DT, seed: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor, GateWeights]:  # fmt: skip
    """``(x, g, GateWeights)`` of ``shape`` with weights scaled by fan-in (outputs of order one, away
    from any identity); ``W=False`` leaves out the output transform, ``norm`` decides which of the
    norm's tensors exist (``"batch"``: affine parameters and running statistics)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    s = shape
    one = (1,) * s.d
    x, g = r(s.n, s.c_l, *s.size), r(s.n, s.c_g, *s.g_size)
    theta = r(s.c_int, s.c_l, *s.k, scale=1 / math.sqrt(s.c_l * math.prod(s.k)))
    phi_w, phi_b = r(s.c_int, s.c_g, *one, scale=1 / math.sqrt(s.c_g)), (r(s.c_int) if bias else None)
    psi_w, psi_b = r(1, s.c_int, *one, scale=1 / math.sqrt(s.c_int)), (r(1) if bias else None)
    w = GateWeights(theta, phi_w, phi_b, psi_w, psi_b)
    if W:
        extra = dict(W_weight=r(s.c_l, s.c_l, *one, scale=1 / math.sqrt(s.c_l)), W_bias=r(s.c_l))
        if norm != "none" and affine:
            extra.update(norm_weight=1 + 0.3 * r(s.c_l), norm_bias=r(s.c_l))
        if norm == "batch":
            var = (0.5 + torch.rand(s.c_l, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)
            extra.update(running_mean=r(s.c_l), running_var=var)
        w = w._replace(**extra)
    return x, g, w


def clone_weights(w: GateWeights, requires_grad: Optional[bool] = None) -> GateWeights:
    """A copy of ``w`` (running statistics included, so that an update in place shows in one copy only)."""
    def c(t, statistic):
        if t is None:
            return None
        t = t.detach().clone()
        return t.requires_grad_(requires_grad) if requires_grad is not None and not statistic else t

    return GateWeights(*(c(t, name.startswith("running_")) for name, t in zip(GateWeights._fields, w)))


# --- non-finite inputs, shared by the fused implementations' comparisons with the reference ---

NONFINITE = (float("nan"), float("inf"), float("-inf"))


@st.composite
def nonfinite_spots(draw, shape: GateShape):
    """Where to put NaN or +-inf in a gate call of ``shape``: ``{"x": [(flat index, value), ...],
    "g": [...]}``, one or two spots in x, in g, or in both."""
    where = draw(st.sampled_from(["x", "g", "both"]))
    sizes = {"x": shape.n * shape.c_l * math.prod(shape.size), "g": shape.n * shape.c_g * math.prod(shape.g_size)}
    spots = {}
    for name in ("x", "g"):
        if where in (name, "both") and sizes[name]:
            spot = st.tuples(st.integers(0, sizes[name] - 1), st.sampled_from(NONFINITE))
            spots[name] = draw(st.lists(spot, min_size=1, max_size=2))
    return spots


def with_nonfinite(t: torch.Tensor, spots) -> torch.Tensor:
    """A copy of ``t`` (same layout) with ``value`` at each ``(flat index, value)`` of ``spots``
    (indices into ``t``'s logical, row-major order)."""
    t = t.clone()
    flat = t.view(-1) if t.is_contiguous() else None
    for index, value in spots:
        if flat is not None:
            flat[index] = value
        else:
            t[tuple(torch.unravel_index(torch.tensor(index), t.shape))] = value
    return t


def assert_close_nonfinite(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str) -> None:
    """NaN and infinities at the same positions (``equal_nan``), and the finite values close there."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: the finite positions differ"
    torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol, msg=lambda m: f"{what} (finite positions): {m}")
