"""The ``"cpu"`` backend of the grid attention gate: channel matrix products and a recomputing backward.

Every 1x1 convolution of the gate is a matrix product over the channels of a
``Tensor[N, C, S]`` view (``S`` = the flattened spatial grid), done in the tensor's own
layout: ``[C, S]`` matrices for contiguous tensors, ``[S, C]`` matrices for channels-last
ones, so no operand is copied (:mod:`~attention_gates.ops.onednn`). The output transform never
materialises ``alpha * x``::

    W(alpha * x) = alpha * (W0 @ x) + b                          (per voxel, W0 = Tensor[C, C])

so it is one product over ``x`` and an in-place epilogue. Batch normalisation is folded
into ``W0`` and ``b`` in evaluation, and computed from the product in training.

The forward keeps for the backward (``_GridAttentionCPU``) only its inputs, theta's output
on the coarse grid and the batch ``1/std``, nothing of ``x``'s size: the backward recomputes the
attention map from them, gets every gradient of the output transform from ``C x C`` products
(``P = sum dy (alpha x)^T``, ``Q = sum (alpha x)(alpha x)^T``, ``alpha x`` centred in training)
and theta's input gradient as one product on the coarse grid added onto ``x``'s patches.
Under :func:`torch.compile` the dispatcher's ``"auto"`` takes the reference instead (the
backward calls :func:`torch.autograd.grad`, which dynamo does not trace), and tracing or export
cannot record it (a Python autograd function).

Where a path changes with the size (theta as a product of patches or a convolution, its input
gradient as a transposed convolution or a product) was measured per CPU
(:func:`attention_gates.ops.measured.cpu_thresholds`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from . import measured
from .layout import in_layout_of, is_channels_last
from .onednn import channel_product, conv, conv1x1, onednn_applies
from .reference import GateOptions, GateWeights, update_running_stats
from .reference import resample as interpolate
from .support import fused_math_reasons, unavailable

__all__ = ["grid_attention_cpu", "multi_gate_inference_cpu", "resample", "theta", "theta_backward"]

COARSE = ("phi_weight", "phi_bias", "psi_weight", "psi_bias")
"""The weights of eqs. 1-2 after theta: they act on the coarse grid."""
OUTPUT = ("W_weight", "W_bias", "norm_weight", "norm_bias")
"""The output transform's weights: they act on ``x``'s grid."""
_INPUTS = ("x", "g", *GateWeights._fields)  # the tensors _GridAttentionCPU.apply takes, in order


def _gram(A: Tensor, B: Tensor) -> Tensor:
    """``sum_n A[n] @ B[n]^T`` for ``Tensor[N, C, S]`` operands: ``Tensor[C, C]``."""
    return torch.matmul(A, B.mT).sum(0)


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype) -> Tensor:
    """Linear interpolation from ``n_in`` to ``n_out`` points as ``Tensor[n_out, n_in]``: torch's own
    weights, read off by interpolating the identity (a normal tensor even when built under inference mode)."""
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, dtype=dtype).unsqueeze(0)  # [1, n_in, n_in]: channel c is the c-th unit vector
        return F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)[0].t().contiguous()


def resample(t: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """:func:`attention_gates.ops.reference.resample` of ``Tensor[N, C, *T]`` as one matrix product per axis.

    (Bi/tri)linear interpolation is separable: ``out = U_1 x_1 U_2 x_2 U_3 t`` with ``U_i`` the 1D
    weights of axis ``i``. PyTorch's CPU kernel parallelises over ``N * C``, so the gate's
    single-channel attention map ran on one thread, and its backward took 2.6 ms for a
    ``24^3 -> 48^3`` map (0.1 ms as products). Equal to ``F.interpolate`` up to rounding; returns
    ``t`` itself when the size already matches; autograd goes through the products.

    A ``t`` holding NaN or infinity is resampled by ``F.interpolate`` itself: a product would
    multiply it by the zero weights of every other point of its axis (``0 * inf = NaN``), where
    the interpolation reaches only its neighbours.
    """
    size = tuple(int(s) for s in size)
    if tuple(t.shape[2:]) == size:
        return t
    if not _finite(t):
        return interpolate(t, size, align_corners)
    out, lead = t, t.shape[:2]
    for i, s in enumerate(size):
        shape = out.shape
        n_in = shape[2 + i]
        if n_in == s:
            continue
        U = _interpolation_matrix(n_in, s, align_corners, t.dtype)
        before, after = math.prod(shape[: 2 + i]), math.prod(shape[3 + i :])
        if after == 1:  # the last axis: one product over rows
            out = out.reshape(before, n_in) @ U.t()
        else:
            out = torch.matmul(U, out.reshape(before, n_in, after))
        out = out.view(*lead, *size[: i + 1], *shape[3 + i :])
    return out


def _finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or infinity, read off its sum (25x faster than ``isfinite().all()``
    here; a sum that overflows says no, and its caller takes its exact path for nothing)."""
    return bool(torch.isfinite(t.detach().sum()))


def _scaled_product(x: Tensor, A: Tensor, bias: Optional[Tensor] = None, alpha: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """``act(bias + sum_h alpha_h * (A_h @ x))`` per voxel of ``x = Tensor[N, C, *S]``, in ``x``'s layout.

    ``A = Tensor[H * Co, C]`` holds the heads' matrices stacked, ``alpha = Tensor[N, H, *S]``
    their attention maps (``None``: one head, unscaled), ``bias = Tensor[Co]``: one product
    (:func:`~attention_gates.ops.onednn.conv1x1`) and an epilogue per head.
    """
    heads = 1 if alpha is None else alpha.shape[1]
    co = A.shape[0] // heads
    P = conv1x1(x, A, None if alpha is not None else bias)
    if alpha is None:
        return P.relu_() if relu else P
    Pf, a = P.flatten(2), alpha.flatten(2)  # [N, H * Co, S] (head i: channels i * Co to (i + 1) * Co) and [N, H, S]
    if heads == 1:  # the epilogue in place on the product
        out = P
    else:  # x's layout with its strides (N = 1 may infer odd ones)
        out = torch.empty_like(x) if co == x.shape[1] else x.new_empty((x.shape[0], co, *x.shape[2:]))
    o = out.flatten(2)
    if bias is None:
        torch.mul(Pf[:, :co], a[:, :1], out=o)
    else:
        torch.addcmul(bias[:, None], Pf[:, :co], a[:, :1], out=o)
    for i in range(1, heads):
        o.addcmul_(Pf[:, i * co : (i + 1) * co], a[:, i : i + 1])
    return out.relu_() if relu else out


def theta(x: Tensor, weights: Sequence[Tensor], *, patch_max_rows: Optional[int] = None) -> Tensor:
    """``W_x^T x`` on the coarse grid: the strided convolution (kernel = stride = subsample factor)
    of ``x = Tensor[N, C, *S]`` by the ``weights`` (``Tensor[F_i, C, *k]`` each; several heads'),
    their outputs concatenated: ``Tensor[N, sum F_i, *T]`` with ``T = S // k``.

    On a channels-last ``x`` whose coarse grid has at most ``patch_max_rows`` voxels (``N * T``;
    default this CPU's measured :attr:`~attention_gates.ops.measured.CpuThresholds.patch_max_rows`)
    it is one matrix product of x's ``k``-patches, gathered as rows, by the weights packed in the
    patches' order: on small grids oneDNN's cost per call dominates. Otherwise a oneDNN convolution.
    """
    k = tuple(weights[0].shape[2:])
    T = [s // kk for s, kk in zip(x.shape[2:], k)]
    w = torch.cat(weights) if len(weights) > 1 else weights[0]
    max_rows = measured.cpu_thresholds().patch_max_rows if patch_max_rows is None else patch_max_rows
    if all(kk == 1 for kk in k):
        return conv1x1(x, w, None)
    if not (is_channels_last(x) and x.shape[0] * math.prod(T) <= max_rows):
        return conv(x, w, None, stride=k)
    axes = range(len(k))  # einops' names: t0 t1 .. the coarse grid, k0 k1 .. a patch
    cropped = x[(..., *(slice(0, t * kk) for t, kk in zip(T, k)))]  # voxels beyond T * k belong to no patch
    fine, coarse, patch = (" ".join(pattern.format(i=i) for i in axes) for pattern in ("(t{i} k{i})", "t{i}", "k{i}"))
    rows = rearrange(cropped, f"n c {fine} -> (n {coarse}) ({patch} c)", **{f"k{i}": k[i] for i in axes})  # x's patches
    packed = w.movedim(1, -1).reshape(w.shape[0], -1)  # [F, (*k, C)]: the rows' column order
    return (rows @ packed.t()).view(x.shape[0], *T, w.shape[0]).movedim(-1, 1)  # [N, F, *T], channels-last


def theta_backward(
    dt: Tensor, x: Tensor, weight: Tensor, *, need_weight: bool, h: Optional[Tensor] = None, alpha: Optional[Tensor] = None,
    transposed_min_numel: Optional[int] = None,
) -> tuple[Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """Backward of :func:`theta` (one ``weight = Tensor[F_int, F_l, *k]``) from ``dt = Tensor[N, F_int, *T]``,
    with the gate's other path into ``x``.

    Returns ``x``'s whole gradient, ``h * alpha`` (``h = Tensor[N, F_l, *S]``, the gradient of
    ``alpha * x``; ``alpha = Tensor[N, 1, *S]``) plus theta's part, in ``x``'s strides, when ``h``
    is given; and the weight's gradient if ``need_weight``. Theta's part is ``weight^T @ dt`` on
    the coarse grid scattered onto ``x``'s ``k``-patches (voxels beyond ``T * k`` get none): for
    a channels-last float32 ``x`` of at least ``transposed_min_numel`` elements (default this CPU's
    measured :attr:`~attention_gates.ops.measured.CpuThresholds.transposed_min_numel`), oneDNN's
    transposed convolution writes it in place; otherwise one product and a strided add (oneDNN is
    slower on a contiguous ``x``, and on small ones torch's own rule leaves it on its slow loop).
    """
    k = tuple(weight.shape[2:])
    min_numel = measured.cpu_thresholds().transposed_min_numel if transposed_min_numel is None else transposed_min_numel
    weight_grad = _theta_weight_grad(dt, x, weight) if need_weight else None
    if h is None:
        return None, weight_grad
    if any(kk > 1 for kk in k) and x.numel() >= max(min_numel, 1) and is_channels_last(x) and onednn_applies(x):
        dx = _theta_conv_backward(in_layout_of(dt, x), x, weight, input_grad=True)  # the weight's gradient in
        # the same call took 1.3 ms longer than in its own
        return torch.addcmul(dx, h, alpha, out=dx if dx.stride() == x.stride() else torch.empty_like(x)), weight_grad
    D = in_layout_of(dt, x).flatten(2)
    dx = torch.mul(h, alpha, out=torch.empty_like(x))
    w = weight.flatten(1).t()  # [(F_l, *k), F_int]
    if all(kk == 1 for kk in k):
        channel_product(w, D, acc=dx.flatten(2))
        return dx, weight_grad
    T = dt.shape[2:]
    patches = channel_product(w, D).view(dt.shape[0], x.shape[1], *k, *T)  # [N, F_l, *k, *T]
    target = dx[(..., *(slice(0, t * kk) for t, kk in zip(T, k)))]
    for i in range(len(k)):  # a view of dx as [N, F_l, T1, k1, T2, k2, ...]
        target = target.unflatten(2 + 2 * i, (T[i], k[i]))
    order = [0, 1, *(3 + 2 * i for i in range(len(k))), *(2 + 2 * i for i in range(len(k)))]
    target.permute(order).add_(patches)  # in place, through the view
    return dx, weight_grad


def _theta_weight_grad(dt: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """theta's weight gradient from ``dt = Tensor[N, F_int, *T]``: a ``Tensor[F_int, F_l]`` product for
    a 1x1 theta, else the strided convolution's backward."""
    if all(kk == 1 for kk in weight.shape[2:]):
        return _gram(in_layout_of(dt, x).flatten(2), x.flatten(2)).view(weight.shape)
    return _theta_conv_backward(dt, x, weight, input_grad=False)


def _theta_conv_backward(dt: Tensor, x: Tensor, weight: Tensor, *, input_grad: bool) -> Tensor:
    """One gradient of theta's strided convolution (kernel = stride) from ``dt = Tensor[N, F_int, *T]``:
    ``x``'s if ``input_grad``, else the weight's."""
    k = list(weight.shape[2:])
    zeros = [0] * len(k)
    mask = [input_grad, not input_grad, False]
    return torch.ops.aten.convolution_backward(dt, x, weight, None, k, zeros, [1] * len(k), False, zeros, 1, mask)[0 if input_grad else 1]


def _attention(t: Tensor, g: Tensor, cfg: GateOptions, *, phi_weight, phi_bias, psi_weight, psi_bias) -> Tensor:
    """Eqs. 1-2 on theta's grid ``T``, from ``t = W_x^T x``: ``sigmoid(q_att)`` as ``Tensor[N, H, *T]``.

    ``H`` heads at once (``H = psi_weight.shape[0]``): ``t`` and ``phi_weight`` hold the heads'
    ``F_int`` channels one after the other, ``psi_weight = Tensor[H, F_int, 1, ...]`` maps each head's own.
    """
    p = resample(conv1x1(g, phi_weight, phi_bias), t.shape[2:], cfg.align_corners)
    f = (t + p).relu_() if cfg.sigma1 == "relu" else F.softplus(t + p)
    return _psi(f, psi_weight.flatten(1), psi_bias).sigmoid_()


def _psi(f: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Each head's ``psi`` on its own channels of ``f = Tensor[N, H * F_int, *T]`` (``weight = Tensor[H, F_int]``):
    ``Tensor[N, H, *T]``, as one product by the block-diagonal ``Tensor[H, H * F_int]``. Where ``f`` holds
    NaN or infinity, head by head: the product's zeros would carry them into the other heads (``0 * inf``)."""
    heads = weight.shape[0]
    if heads == 1 or _finite(f):
        return conv1x1(f, torch.block_diag(*weight) if heads > 1 else weight, bias)
    parts, biases = f.chunk(heads, dim=1), [None] * heads if bias is None else bias.split(1)
    return torch.cat([conv1x1(part, w[None], b) for part, w, b in zip(parts, weight, biases)], dim=1)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _as_input(grad: Optional[Tensor], inp: Optional[Tensor]) -> Optional[Tensor]:
    """``grad`` in ``inp``'s dtype and shape: viewed only where the shape differs (a same-shape view of
    one channels-last sample changes its batch stride)."""
    if grad is None:
        return None
    grad = grad.to(inp.dtype)
    return grad if grad.shape == inp.shape else grad.view(inp.shape)


class _GridAttentionCPU(torch.autograd.Function):
    """``(out, alpha)`` of the gate; saves the inputs, theta's output (coarse) and the batch ``invstd``."""

    @staticmethod
    def forward(ctx, x, g, *fields_and_options):  # apply takes tensors one by one: GateWeights' fields, then GateOptions
        *fields, cfg = fields_and_options
        w = GateWeights(*fields)
        dtype = _compute_dtype(x)
        xs, gs = x.to(dtype), g.to(dtype)
        coarse = {name: _cast(getattr(w, name), dtype) for name in COARSE}
        t = theta(xs, [w.theta_weight.to(dtype)])  # [N, F_int, *T], saved: the backward starts from it
        alpha = resample(_attention(t, gs, cfg, **coarse), x.shape[2:], cfg.align_corners)  # [N, 1, *S]
        if w.W_weight is None:
            out, invstd = xs * alpha, None
        else:
            out, invstd = _output_forward(xs, alpha, w, cfg, dtype)
        ctx.cfg = cfg
        uses_running = cfg.norm == "batch" and not cfg.training and w.W_weight is not None
        ctx.save_for_backward(x, g, t, invstd, *(w if uses_running else w._replace(running_mean=None, running_var=None)))
        return out.to(x.dtype), alpha.to(x.dtype)

    @staticmethod
    def backward(ctx, d_out, d_alpha):
        x, g, t, invstd, *fields = ctx.saved_tensors
        w, cfg = GateWeights(*fields), ctx.cfg
        needs = dict(zip(_INPUTS, ctx.needs_input_grad))
        dtype = _compute_dtype(x)
        # recompute alpha from theta's output, with a graph over the coarse inputs that need gradients
        wants = {"t": needs["x"] or needs["theta_weight"], "g": needs["g"], **{name: needs[name] for name in COARSE}}
        coarse_in = {"t": t, "g": g, **{name: getattr(w, name) for name in COARSE}}
        leaves = {n: None if v is None else v.detach().to(dtype).requires_grad_(wants[n]) for n, v in coarse_in.items()}
        wanted = [n for n, v in leaves.items() if v is not None and v.requires_grad]
        with torch.enable_grad():
            alpha = resample(_attention(leaves["t"], leaves["g"], cfg, **{n: leaves[n] for n in COARSE}), x.shape[2:], cfg.align_corners)
        xs = x.detach().to(dtype)
        a, X = alpha.detach().flatten(2), xs.flatten(2)
        dy5 = in_layout_of(d_out.to(dtype), xs)  # x's layout; its [N, C, S] view for the products
        grads: dict[str, Optional[Tensor]] = {}
        if w.W_weight is None:
            h = dy5.flatten(2)  # d(alpha x)
        else:
            h, output_grads = _output_backward(dy5, X, a, w, invstd, cfg, needs, dtype)
            grads.update(output_grads)
        if wanted:
            d_alpha = d_alpha.to(dtype) + (h * X).sum(1, keepdim=True).view_as(alpha)
            coarse_grads = dict(zip(wanted, torch.autograd.grad(alpha, [leaves[n] for n in wanted], d_alpha)))
            grads.update({n: coarse_grads.get(n) for n in ("g", *COARSE)})
            if "t" in coarse_grads:
                grads["x"], grads["theta_weight"] = theta_backward(
                    coarse_grads["t"], xs, w.theta_weight.to(dtype), need_weight=needs["theta_weight"],
                    h=h.view(x.shape) if needs["x"] else None, alpha=alpha.detach(),
                )  # fmt: skip
        inputs = dict(zip(_INPUTS, (x, g, *w)))
        return (*(_as_input(grads.get(n), inputs[n]) for n in _INPUTS), None)


def _output_params(w: GateWeights, dtype):
    """``W0 = Tensor[C, C]``, ``b``, and the norm's ``gamma``/``beta`` (identity when absent), in ``dtype``."""
    W0 = w.W_weight.flatten(1).to(dtype)
    c = W0.shape[0]
    b = w.W_bias.to(dtype) if w.W_bias is not None else W0.new_zeros(c)
    gamma = w.norm_weight.to(dtype) if w.norm_weight is not None else W0.new_ones(c)
    beta = w.norm_bias.to(dtype) if w.norm_bias is not None else W0.new_zeros(c)
    return W0, b, gamma, beta


def _output_forward(xs: Tensor, alpha: Tensor, w: GateWeights, cfg: GateOptions, dtype) -> tuple[Tensor, Optional[Tensor]]:
    """``norm(W(alpha * x))`` of ``xs = Tensor[N, C, *S]`` (in its layout) and ``alpha = Tensor[N, 1, *S]``,
    with the batch ``1/std`` in training with batch norm (else ``None``); updates the running statistics there."""
    W0, b, gamma, beta = _output_params(w, dtype)
    if not (cfg.norm == "batch" and cfg.training):
        if cfg.norm == "batch":  # fold the evaluation-mode affine map into W0 and b
            s = gamma * torch.rsqrt(w.running_var.to(dtype) + cfg.eps)
            W0, b = W0 * s[:, None], (b - w.running_mean.to(dtype)) * s + beta
        return _scaled_product(xs, W0, b, alpha), None  # alpha * (W0 x) + b
    a = alpha.flatten(2)
    n = xs.shape[0] * a.shape[2]
    out = conv1x1(xs, W0, None)  # W0 x, in x's layout
    U = out.flatten(2)  # a view (with N = 1 its batch stride is arbitrary: return out, not U)
    mean = torch.matmul(U, a.mT).sum(0).squeeze(1) / n  # mean of alpha * W0 x
    torch.addcmul(-mean[:, None], U, a, out=U)  # alpha * W0 x - mean, in place
    var = torch.matmul(U.square(), U.new_ones(U.shape[2], 1)).sum(0).squeeze(1) / n  # a product:
    # vector_norm over dims (0, 2) of a channels-last U took 4.4 ms, this 1.0 ms (same accuracy)
    invstd = torch.rsqrt(var + cfg.eps)
    torch.addcmul(beta[:, None], U, (gamma * invstd)[:, None], out=U)
    update_running_stats(w, mean + b, var, n, cfg.momentum)
    return out, invstd


def _output_backward(dy5, X, a, w: GateWeights, invstd, cfg: GateOptions, needs: dict, dtype) -> tuple[Tensor, dict]:
    """Gradients through ``out = norm(alpha * (W0 x) + b)``, from ``C x C`` products.

    Let ``ax = alpha * x`` and ``dv`` be the gradient at the norm's input; per channel
    ``dv = k1 dy`` without batch statistics. With them (training), ``ax`` is first centred over
    the voxels (``axc = ax - mean(ax)``, so the sums below do not cancel), ``xhat = invstd W0 axc``
    and ``dv = k1 dy + k2 W0 axc + k3``; since ``sum dv = 0``::

        dW0 = sum dv ax^T = k1 P + k2 W0 Q,             P = sum dy axc^T, Q = sum axc axc^T
        h   = W0^T dv     = (W0^T k1) dy + (W0^T k2 W0) axc + W0^T k3

    ``dy5`` is the output's gradient in ``x``'s layout, ``Tensor[N, C, *S]`` (the 1x1 products
    take it whole: a view back from its flattened form may carry another batch stride, which
    oneDNN reads as another layout); ``X`` and ``a`` are ``Tensor[N, C, S]`` views; ``invstd`` the
    forward's batch ``1/std`` (training with batch norm). Returns ``h = d(alpha x)`` as
    ``Tensor[N, C, S]`` and the gradients of the :data:`OUTPUT` weights that need one, by name.
    """
    dy = dy5.flatten(2)
    W0, b, gamma, beta = _output_params(w, dtype)
    n = X.shape[0] * X.shape[2]
    d_beta = dy.sum((0, 2))
    if cfg.norm == "batch" and cfg.training:
        ax_mean = torch.matmul(X, a.mT).sum(0) / n  # [C, 1]
        axc = torch.addcmul(-ax_mean, X, a, out=torch.empty_like(X))
        P = _gram(dy, axc)
        d_gamma = invstd * (W0 * P).sum(1)  # sum over voxels of dy * xhat
        k1 = gamma * invstd
        k2 = -k1 * invstd * d_gamma / n
        k3 = -k1 * d_beta / n
        d_W0 = k1[:, None] * P + k2[:, None] * (W0 @ _gram(axc, axc))
        d_b = torch.zeros_like(d_beta)  # batch statistics remove any per-channel shift
        h = conv1x1(dy5, (W0 * k1[:, None]).t(), None).flatten(2)  # (W0^T k1) dy
        channel_product(W0.t() @ (k2[:, None] * W0), axc, acc=h)
        h += (W0.t() @ k3)[:, None]
    else:
        P = _gram(dy, torch.mul(X, a, out=torch.empty_like(X)))  # sum dy ax^T
        k1, d_gamma = gamma.new_ones(()), None
        if cfg.norm == "batch":
            inv = torch.rsqrt(w.running_var.to(dtype) + cfg.eps)
            k1 = gamma * inv
            d_gamma = inv * ((W0 * P).sum(1) + (b - w.running_mean.to(dtype)) * d_beta)  # sum dy * (W(alpha x) - rm) * inv
        d_W0 = k1[..., None] * P
        d_b = k1 * d_beta
        h = conv1x1(dy5, (W0 * k1[..., None]).t(), None).flatten(2)
    computed = dict(zip(OUTPUT, (d_W0, d_b, d_gamma, d_beta)))
    return h, {name: computed[name] for name in OUTPUT if needs[name] and getattr(w, name) is not None}


def grid_attention_cpu(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions = GateOptions()) -> tuple[Tensor, Tensor]:
    """The grid attention gate on CPU tensors; same arguments, results and gradients as
    :func:`attention_gates.ops.reference.grid_attention_reference`.

    ``x = Tensor[N, F_l, *S]`` and ``g = Tensor[N, F_g, *S_g]`` with 1, 2 or 3 spatial dims, any
    subsample factor, any batch size (an empty one too); returns ``(out: Tensor[N, F_l, *S], alpha:
    Tensor[N, 1, *S])``, ``out`` in ``x``'s memory format. Updates the running statistics in place
    when ``opt.training`` and ``opt.norm="batch"``. NaN and infinity reach the outputs at the
    positions the reference's reach. float16/bfloat16 inputs are computed in float32, float64 in float64.

    Raises :class:`~attention_gates.ops.support.BackendUnavailableError` for what it does not
    compute: ``sigma2="softmax"``, or ``norm`` other than ``"batch"`` or ``"none"`` after ``W``.
    Use it through :func:`attention_gates.functional.grid_attention` with ``backend="cpu"``,
    which checks the inputs first.
    """
    reasons = fused_math_reasons(w, opt)
    if reasons:
        raise unavailable("cpu", x, reasons)
    if w.W_weight is None:
        opt = dataclasses.replace(opt, norm="none")
    x = x if is_channels_last(x) else x.contiguous()
    g = g if is_channels_last(g) else g.contiguous()
    return _GridAttentionCPU.apply(x, g, *w, opt)


def multi_gate_inference_cpu(
    x: Tensor, g: Tensor, heads: Sequence[GateWeights], A: Tensor, c: Tensor, *, sigma1: str = "relu", align_corners: bool = False
) -> tuple[Tensor, Tensor]:
    """Several sigmoid gates on one ``(x, g)`` whose outputs meet one affine map and a ReLU, in inference.

    With every map after the gates affine (each gate's ``W`` with its norm in evaluation, the
    fusing 1x1 conv and its norm), the block's output is, per voxel::

        out = relu(c + sum_i alpha_i * (A_i x)),          A = [A_1; ...; A_heads] = Tensor[heads * C, C]

    so it is one product over ``x`` and one epilogue, instead of a product per head, a
    concatenation and a product over it. ``heads`` holds each gate's
    :class:`~attention_gates.ops.reference.GateWeights` (only the coarse side is read: ``theta_weight``,
    ``phi_weight``, ``phi_bias``, ``psi_weight``, ``psi_bias``); ``A`` and ``c = Tensor[C]`` are the
    folded map (:meth:`attention_gates.gates.MultiAttentionGate.folded_output_map`).

    Returns ``(out: Tensor[N, C, *S], alpha: Tensor[N, heads, *S])``, in ``x``'s layout and dtype
    (float32; no autograd: use it under :func:`torch.no_grad` or :func:`torch.inference_mode`).
    """
    x = x if is_channels_last(x) else x.contiguous()
    g = g if is_channels_last(g) else g.contiguous()
    # every head's coarse side at once: theta's, phi's and psi's weights stacked
    coarse = {name: torch.cat([getattr(h, name) for h in heads]) for name in ("phi_weight", "psi_weight")}
    coarse.update({name: torch.cat([_bias(getattr(h, name), getattr(h, weight)) for h in heads])
                   for name, weight in (("phi_bias", "phi_weight"), ("psi_bias", "psi_weight"))})  # fmt: skip
    cfg = GateOptions(norm="none", sigma1=sigma1, align_corners=align_corners)
    q = _attention(theta(x, [h.theta_weight for h in heads]), g, cfg, **coarse)  # [N, H, *T]
    alpha = resample(q, x.shape[2:], align_corners)  # [N, H, *S]
    return _scaled_product(x, A, c, alpha, relu=True), alpha


def _bias(bias: Optional[Tensor], weight: Tensor) -> Tensor:
    """A 1x1 convolution's bias, zeros (one per output of ``weight``) where it has none."""
    return bias if bias is not None else weight.new_zeros(weight.shape[0])
