"""The grid attention gate for CPU tensors: channel matrix products and a recomputing backward.

Every 1x1 convolution of the gate is a matrix product over the channels of a
``Tensor[N, C, S]`` view (``S`` = the flattened spatial grid), done in the tensor's own
layout: ``[C, S]`` matrices for contiguous tensors, ``[S, C]`` matrices for channels-last
ones, so no operand is copied. The output transform never materialises ``alpha * x``::

    W(alpha * x) = alpha * (W0 @ x) + b                          (per voxel, W0 = Tensor[C, C])

so it is one product over ``x`` and an in-place epilogue. Batch normalisation is folded
into ``W0`` and ``b`` in evaluation, and computed from the product in training.

The forward keeps for the backward (``_GridAttentionCPU``) only its inputs, theta's output
on the coarse grid and the batch ``1/std``, nothing of ``x``'s size: the backward recomputes the
attention map from them, gets every gradient of the output transform from ``C x C`` products
(``P = sum dy (alpha x)^T``, ``Q = sum (alpha x)(alpha x)^T``, ``alpha x`` centred in training)
and theta's input gradient as one product on the coarse grid added onto ``x``'s patches.
Under :func:`torch.compile` the dispatcher's ``"auto"`` takes the reference instead (the
backward calls :func:`torch.autograd.grad`, which dynamo does not trace).
"""

from __future__ import annotations

import functools
import math
import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import GateOptions, GateWeights, update_running_stats

__all__ = ["grid_attention_cpu", "multi_gate_inference_cpu", "conv", "conv1x1", "onednn_applies"]

_CONV = (F.conv1d, F.conv2d, F.conv3d)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _channels_last(t: Tensor) -> bool:
    """Whether ``Tensor[N, C, *S]`` is stored channels-last (and not also contiguous)."""
    fmt = _CHANNELS_LAST.get(t.dim())
    return fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


def _dense(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in ``like``'s layout (channels-last or contiguous), copied only if it is not already."""
    fmt = _CHANNELS_LAST[t.dim()] if _channels_last(like) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _rows(X: Tensor) -> bool:
    """Whether ``X = Tensor[N, C, S]`` is stored as ``[N, S, C]`` (a channels-last tensor's view)."""
    return X.shape[1] > 1 and X.stride(1) == 1 and X.transpose(1, 2).is_contiguous()


def _mm(w: Tensor, X: Tensor, acc: Optional[Tensor] = None) -> Tensor:
    """``w @ X[n]`` for every sample: ``w = Tensor[Co, C]``, ``X = Tensor[N, C, S]``.

    The result is ``Tensor[N, Co, S]`` in ``X``'s layout. A channels-last ``X`` (``X[n]`` stored
    as ``[S, C]``) is multiplied as ``X[n]^T @ w^T``, all samples in one product. With ``acc``
    (same shape as the result) the product is added into ``acc`` in place.
    """
    n, c, s = X.shape
    if acc is not None and _rows(acc) != _rows(X):
        return acc.add_(_mm(w, X))
    if _rows(X):
        rows = X.transpose(1, 2).reshape(n * s, c)  # a view
        if acc is None:
            return (rows @ w.t()).view(n, s, -1).transpose(1, 2)
        acc.transpose(1, 2).view(n * s, -1).addmm_(rows, w.t())
        return acc
    if n == 1:  # torch.matmul would multiply X^T and copy the product back into [C, S] order
        if acc is None:
            return torch.mm(w, X[0]).unsqueeze(0)
        acc[0].addmm_(w, X[0])
        return acc
    if acc is None:
        return torch.bmm(w.expand(n, -1, -1), X)
    return acc.baddbmm_(w.expand(n, -1, -1), X)


def _gram(A: Tensor, B: Tensor) -> Tensor:
    """``sum_n A[n] @ B[n]^T`` for ``Tensor[N, C, S]`` operands: ``Tensor[C, C]``."""
    return torch.matmul(A, B.mT).sum(0)


def onednn_applies(t: Tensor) -> bool:
    """Whether oneDNN can take ``t``: a float32 CPU tensor, oneDNN built and enabled
    (``torch.backends.mkldnn``), outside :func:`torch.compile` and dispatch modes (which should
    see ``aten.convolution``, for example ``FlopCounterMode`` and fake tensors)."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and t.device.type == "cpu"
        and t.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def conv(t: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """``F.conv1d/2d/3d`` of ``Tensor[N, C, *S]``, by oneDNN whenever :func:`onednn_applies`.

    PyTorch chooses its CPU convolution by a rule written for 2D batches: with one sample it
    takes its slow reference loop when ``N * C * D * H <= 20480`` (3D) or for 1x1 kernels on one
    thread, 3-5x slower than oneDNN on 2 cores, and that loop copies a channels-last input.
    Results equal torch's up to float32 rounding. ``padding`` is an int or a tuple of ints.
    """
    d = t.dim() - 2
    if d in (2, 3) and onednn_applies(t) and weight.dtype == torch.float32:

        def per_axis(v) -> list[int]:
            return list(v) if isinstance(v, (tuple, list)) else [v] * d

        return torch.ops.aten.mkldnn_convolution(t, weight, bias, per_axis(padding), per_axis(stride), per_axis(dilation), groups)
    return _CONV[d - 1](t, weight, bias, stride, padding, dilation, groups)


_ONEDNN_MIN_ROWS = 16384


def conv1x1(t: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1 convolution of ``Tensor[N, C, *S]`` (``weight``: ``Tensor[Co, C]`` or ``Tensor[Co, C, 1, ...]``):
    ``Tensor[N, Co, *S]`` in ``t``'s layout.

    A channels-last float32 ``t`` of at least ``_ONEDNN_MIN_ROWS`` voxels (``N * S``) goes to
    oneDNN, which reads its ``[S, C]`` rows in place (about 1.15x faster than a matrix product on
    32768 rows, 2.5x for two outputs from 16 channels on 110592). Anything else is a matrix
    product on the rows or on the ``[C, S]`` planes: oneDNN's fixed cost per call (it reorders the
    weight) made it 1.1-1.7x slower on 64 to 4096 rows and 2x slower for psi's one output on
    13824, and it reorders a contiguous input too (6-9x slower for ``Tensor[1, 16, 64^3]`` to 2
    channels, a segmentation head). Measured on 2 cores.
    """
    w = weight.flatten(1)
    voxels = t.numel() // max(t.shape[1], 1)
    if voxels >= _ONEDNN_MIN_ROWS and _channels_last(t) and onednn_applies(t) and w.dtype == torch.float32:
        return conv(t, w.view(*w.shape, *[1] * (t.dim() - 2)), bias)
    X = t.flatten(2)
    if _rows(X):  # [S, C] rows times w^T, the bias added by the product
        rows = X.transpose(1, 2).reshape(-1, X.shape[1])  # a view
        y = torch.mm(rows, w.t()) if bias is None else torch.addmm(bias, rows, w.t())
        return y.view(t.shape[0], *t.shape[2:], -1).movedim(-1, 1)  # channels-last strides, the batch's too
    y = _mm(w, X)
    if bias is not None:
        y.add_(bias[:, None])  # y is the product's own new tensor
    return y.view(t.shape[0], -1, *t.shape[2:])


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype) -> Tensor:
    """Linear interpolation from ``n_in`` to ``n_out`` points as ``Tensor[n_out, n_in]``: torch's own
    weights, read off by interpolating the identity (a normal tensor even when built under inference mode)."""
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, dtype=dtype).unsqueeze(0)  # [1, n_in, n_in]: channel c is the c-th unit vector
        return F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)[0].t().contiguous()


def _resample(t: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """:func:`attention_gates.functional.resample` of ``Tensor[N, C, *T]`` as one matrix product per axis.

    (Bi/tri)linear interpolation is separable: ``out = U_1 x_1 U_2 x_2 U_3 t`` with ``U_i`` the 1D
    weights of axis ``i``. PyTorch's CPU kernel parallelises over ``N * C``, so the gate's
    single-channel attention map ran on one thread, and its backward took 2.6 ms for a
    ``24^3 -> 48^3`` map (0.1 ms as products). Equal to ``F.interpolate`` up to rounding; returns
    ``t`` itself when the size already matches; autograd goes through the products.
    """
    size = tuple(int(s) for s in size)
    if tuple(t.shape[2:]) == size:
        return t
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


def _scaled_product(x: Tensor, A: Tensor, bias: Optional[Tensor] = None, alpha: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """``act(bias + sum_h alpha_h * (A_h @ x))`` per voxel of ``x = Tensor[N, C, *S]``, in ``x``'s layout.

    ``A = Tensor[H * Co, C]`` holds the heads' matrices stacked, ``alpha = Tensor[N, H, *S]``
    their attention maps (``None``: one head, unscaled), ``bias = Tensor[Co]``: one product
    (:func:`conv1x1`) and an epilogue per head.
    """
    heads = 1 if alpha is None else alpha.shape[1]
    co = A.shape[0] // heads
    P = conv1x1(x, A, None if alpha is not None else bias)
    if alpha is None:
        return P.relu_() if relu else P
    Pf, a = P.flatten(2), alpha.flatten(2)
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


_PATCH_MAX_ROWS = 2048


def _theta(x: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """``W_x^T x`` on the coarse grid: the strided convolution (kernel = stride = subsample factor)
    of ``x = Tensor[N, C, *S]`` by the ``weights`` (``Tensor[F_i, C, *k]`` each; several heads'),
    their outputs concatenated: ``Tensor[N, sum F_i, *T]``.

    On a channels-last ``x`` whose coarse grid has at most ``_PATCH_MAX_ROWS`` voxels (``N * T``)
    it is one matrix product of x's ``k``-patches, gathered as rows, by the weights stacked in the
    patches' order (1.2-1.7x faster than oneDNN on the paper model's two coarsest gated skips,
    where its per-call cost dominates; 0.8x at 4096 voxels). Otherwise a oneDNN convolution.
    """
    k = tuple(weights[0].shape[2:])
    T = [s // kk for s, kk in zip(x.shape[2:], k)]
    pointwise = all(kk == 1 for kk in k)
    if pointwise or not (_channels_last(x) and x.shape[0] * math.prod(T) <= _PATCH_MAX_ROWS):
        w = torch.cat(weights) if len(weights) > 1 else weights[0]
        return conv1x1(x, w, None) if pointwise else conv(x, w, None, stride=k)
    d = len(k)
    r = x.movedim(1, -1)[(slice(None), *(slice(0, t * kk) for t, kk in zip(T, k)))]  # [N, *S (cropped), C]
    for i in range(d):  # [N, T1, k1, ..., Td, kd, C]
        r = r.unflatten(1 + 2 * i, (T[i], k[i]))
    order = [0, *(1 + 2 * i for i in range(d)), *(2 + 2 * i for i in range(d)), 2 * d + 1]
    rows = r.permute(order).reshape(x.shape[0] * math.prod(T), -1)  # [N * T, (k1, ..., kd, C)]
    w = torch.cat([wi.movedim(1, -1) for wi in weights]).view(-1, rows.shape[1])  # the same column order
    return (rows @ w.t()).view(x.shape[0], *T, w.shape[0]).movedim(-1, 1)


_TRANSPOSED_MIN_NUMEL = 2**19


def _theta_backward(
    dt: Tensor, x: Tensor, weight: Tensor, need_weight: bool, h: Optional[Tensor] = None, alpha: Optional[Tensor] = None
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Backward of :func:`_theta` from ``dt = Tensor[N, F_int, *T]``, with the gate's other path into ``x``.

    Returns ``x``'s whole gradient, ``h * alpha`` (``h = Tensor[N, F_l, *S]``, the gradient of
    ``alpha * x``; ``alpha = Tensor[N, 1, *S]``) plus theta's part, in ``x``'s strides, when ``h``
    is given; and the weight's gradient if ``need_weight``. Theta's part is ``weight^T @ dt`` on
    the coarse grid scattered onto ``x``'s ``k``-patches (voxels beyond ``T * k`` get none): for
    a channels-last float32 ``x`` of at least ``_TRANSPOSED_MIN_NUMEL`` elements, oneDNN's transposed
    convolution writes it in place (1.4-2.5x faster than the product and the strided add for 0.9M
    to 3.5M elements on 2 cores; 0.65x for 0.2M, where torch's rule leaves it on its slow loop);
    otherwise one product and a strided add (oneDNN is slower on a contiguous ``x``).
    """
    k = tuple(weight.shape[2:])
    d = len(k)
    if h is not None and any(kk > 1 for kk in k) and x.numel() >= _TRANSPOSED_MIN_NUMEL and _channels_last(x) and onednn_applies(x):
        dx = _theta_conv_backward(_dense(dt, x), x, weight, input_grad=True)  # the weight's gradient in
        # the same call took 1.3 ms longer than in its own
        dx = torch.addcmul(dx, h, alpha, out=dx if dx.stride() == x.stride() else torch.empty_like(x))
        return dx, _theta_conv_backward(dt, x, weight, input_grad=False) if need_weight else None
    D = _dense(dt, x).flatten(2)
    dx = None if h is None else torch.mul(h, alpha, out=torch.empty_like(x))
    if all(kk == 1 for kk in k):
        if dx is not None:
            _mm(weight.flatten(1).t(), D, acc=dx.flatten(2))
        return dx, _gram(D, x.flatten(2)).view(weight.shape) if need_weight else None
    if dx is not None:
        T = dt.shape[2:]
        patches = _mm(weight.flatten(1).t(), D).view(dt.shape[0], x.shape[1], *k, *T)  # [N, F_l, *k, *T]
        target = dx[(..., *(slice(0, t * kk) for t, kk in zip(T, k)))]
        for i in range(d):  # [N, F_l, T1, k1, T2, k2, ...]
            target = target.unflatten(2 + 2 * i, (T[i], k[i]))
        order = [0, 1, *(3 + 2 * i for i in range(d)), *(2 + 2 * i for i in range(d))]
        target.permute(order).add_(patches)
    return dx, _theta_conv_backward(dt, x, weight, input_grad=False) if need_weight else None


def _theta_conv_backward(dt: Tensor, x: Tensor, weight: Tensor, *, input_grad: bool) -> Tensor:
    """One gradient of theta's strided convolution (kernel = stride) from ``dt = Tensor[N, F_int, *T]``:
    ``x``'s if ``input_grad``, else the weight's."""
    k = list(weight.shape[2:])
    zeros = [0] * len(k)
    mask = [input_grad, not input_grad, False]
    return torch.ops.aten.convolution_backward(dt, x, weight, None, k, zeros, [1] * len(k), False, zeros, 1, mask)[0 if input_grad else 1]


def _attention(t: Tensor, g, phi_weight, phi_bias, psi_weight, psi_bias, cfg: GateOptions) -> Tensor:
    """Eqs. 1-2 on theta's grid ``T``, from ``t = W_x^T x``: ``sigmoid(q_att)`` as ``Tensor[N, 1, *T]``."""
    p = _resample(conv1x1(g, phi_weight, phi_bias), t.shape[2:], cfg.align_corners)
    f = (t + p).relu_() if cfg.sigma1 == "relu" else F.softplus(t + p)
    return conv1x1(f, psi_weight, psi_bias).sigmoid_()


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


class _GridAttentionCPU(torch.autograd.Function):
    """``(out, alpha)`` of the gate; saves the inputs, theta's output (coarse) and the batch ``invstd``."""

    @staticmethod
    def forward(ctx, x, g, *args):  # args: the fields of GateWeights, then GateOptions (apply takes tensors one by one)
        *weights, cfg = args
        w = GateWeights(*weights)
        dtype = _compute_dtype(x)
        xs, gs = x.to(dtype), g.to(dtype)
        coarse = [_cast(t, dtype) for t in w[:5]]
        t = _theta(xs, [coarse[0]])  # [N, F_int, *T], saved: the backward starts from it
        alpha = _resample(_attention(t, gs, *coarse[1:], cfg), x.shape[2:], cfg.align_corners)  # [N, 1, *S]
        a, X = alpha.flatten(2), xs.flatten(2)
        stats: tuple = ()
        if w.W_weight is None:
            out = xs * alpha
        else:
            W0, b, gamma, beta = _output_params(w, dtype)
            n = X.shape[0] * X.shape[2]
            if cfg.norm == "batch" and cfg.training:
                out = conv1x1(xs, W0, None)  # W0 x, in x's layout
                U = out.flatten(2)  # a view (with N = 1 its batch stride is arbitrary: return out, not U)
                mean = torch.matmul(U, a.mT).sum(0).squeeze(1) / n  # mean of alpha * W0 x
                torch.addcmul(-mean[:, None], U, a, out=U)  # alpha * W0 x - mean, in place
                var = torch.matmul(U.square(), U.new_ones(U.shape[2], 1)).sum(0).squeeze(1) / n  # a product:
                # vector_norm over dims (0, 2) of a channels-last U took 4.4 ms, this 1.0 ms (same accuracy)
                invstd = torch.rsqrt(var + cfg.eps)
                torch.addcmul(beta[:, None], U, (gamma * invstd)[:, None], out=U)
                update_running_stats(w, mean + b, var, n, cfg.momentum)
                stats = (invstd,)
            else:
                if cfg.norm == "batch":  # fold the evaluation-mode affine map into W0 and b
                    s = gamma * torch.rsqrt(w.running_var.to(dtype) + cfg.eps)
                    W0, b = W0 * s[:, None], (b - w.running_mean.to(dtype)) * s + beta
                out = _scaled_product(xs, W0, b, alpha)  # alpha * (W0 x) + b
        keep_stats = cfg.norm == "batch" and not cfg.training and w.W_weight is not None
        ctx.cfg = cfg
        running = (w.running_mean, w.running_var) if keep_stats else (None, None)
        ctx.save_for_backward(x, g, *w[:9], *running, t, *stats)
        return out.to(x.dtype), alpha.to(x.dtype)

    @staticmethod
    def backward(ctx, d_out, d_alpha):
        x, g, *saved = ctx.saved_tensors
        w, (t, *stats) = GateWeights(*saved[:11]), saved[11:]
        cfg: GateOptions = ctx.cfg
        needs = ctx.needs_input_grad
        dtype = _compute_dtype(x)
        # recompute alpha from theta's output with a graph over the coarse inputs that need gradients
        needs_t = needs[0] or needs[2]
        coarse_in = [t, g, *w[1:5]]
        coarse_needs = [needs_t, needs[1], *needs[3:7]]
        leaves = [None if v is None else v.detach().to(dtype).requires_grad_(n) for v, n in zip(coarse_in, coarse_needs)]
        wanted = [i for i, v in enumerate(leaves) if v is not None and v.requires_grad]
        with torch.enable_grad():
            alpha = _resample(_attention(*leaves, cfg), x.shape[2:], cfg.align_corners)
        xs = x.detach().to(dtype)
        a, X = alpha.detach().flatten(2), xs.flatten(2)
        dy5 = _dense(d_out.to(dtype), xs)  # x's layout; its [N, C, S] view for the products
        dy = dy5.flatten(2)
        grads: list[Optional[Tensor]] = [None] * 11
        if w.W_weight is None:
            h = dy  # d(alpha x)
        else:
            h, w_grads = _output_backward(dy5, X, a, w, stats, cfg, needs, dtype)
            grads[7:11] = w_grads
        if wanted:
            d_alpha = d_alpha.to(dtype) + (h * X).sum(1, keepdim=True).view_as(alpha)
            coarse_grads = dict(zip(wanted, torch.autograd.grad(alpha, [leaves[i] for i in wanted], d_alpha)))
            grads[1], grads[3:7] = coarse_grads.get(1), [coarse_grads.get(i) for i in range(2, 6)]
            if needs_t:
                h_x = h.view(x.shape) if needs[0] else None
                grads[0], grads[2] = _theta_backward(coarse_grads[0], xs, w.theta_weight.to(dtype), needs[2], h_x, alpha.detach())
        inputs = (x, g, *w[:9])
        # view only where the shape differs: a same-shape view of one channels-last sample changes its batch stride
        grads = [None if gr is None else gr.to(inp.dtype) if gr.shape == inp.shape else gr.to(inp.dtype).view(inp.shape)
                 for gr, inp in zip(grads, inputs)]  # fmt: skip
        return (*grads, None, None, None)


def _output_params(w: GateWeights, dtype):
    """``W0 = Tensor[C, C]``, ``b``, and the norm's ``gamma``/``beta`` (identity when absent), in ``dtype``."""
    W0 = w.W_weight.flatten(1).to(dtype)
    c = W0.shape[0]
    b = w.W_bias.to(dtype) if w.W_bias is not None else W0.new_zeros(c)
    gamma = w.norm_weight.to(dtype) if w.norm_weight is not None else W0.new_ones(c)
    beta = w.norm_bias.to(dtype) if w.norm_bias is not None else W0.new_zeros(c)
    return W0, b, gamma, beta


def _output_backward(dy5, X, a, w: GateWeights, stats, cfg: GateOptions, needs, dtype):
    """Gradients through ``out = norm(alpha * (W0 x) + b)``, from ``C x C`` products.

    Let ``ax = alpha * x`` and ``dv`` be the gradient at the norm's input; per channel
    ``dv = k1 dy`` without batch statistics. With them (training), ``ax`` is first centred over
    the voxels (``axc = ax - mean(ax)``, so the sums below do not cancel), ``xhat = invstd W0 axc``
    and ``dv = k1 dy + k2 W0 axc + k3``; since ``sum dv = 0``::

        dW0 = sum dv ax^T = k1 P + k2 W0 Q,             P = sum dy axc^T, Q = sum axc axc^T
        h   = W0^T dv     = (W0^T k1) dy + (W0^T k2 W0) axc + W0^T k3

    ``dy5`` is the output's gradient in ``x``'s layout, ``Tensor[N, C, *S]`` (the 1x1 products
    take it whole: a view back from its flattened form may carry another batch stride, which
    oneDNN reads as another layout); ``X`` and ``a`` are ``Tensor[N, C, S]`` views. Returns
    ``h = d(alpha x)`` as ``Tensor[N, C, S]`` and the gradients of ``(W_w, W_b, norm_w, norm_b)``.
    """
    dy = dy5.flatten(2)
    W0, b, gamma, beta = _output_params(w, dtype)
    n = X.shape[0] * X.shape[2]
    d_beta = dy.sum((0, 2))
    if cfg.norm == "batch" and cfg.training:
        (invstd,) = stats
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
        _mm(W0.t() @ (k2[:, None] * W0), axc, acc=h)
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
    return h, [
        d_W0 if needs[7] else None,
        d_b if needs[8] and w.W_bias is not None else None,
        d_gamma if needs[9] and w.norm_weight is not None else None,
        d_beta if needs[10] and w.norm_bias is not None else None,
    ]


def grid_attention_cpu(x: Tensor, g: Tensor, w: GateWeights, opt: GateOptions = GateOptions()) -> tuple[Tensor, Tensor]:
    """The grid attention gate on CPU tensors; same arguments, results and gradients as
    :func:`attention_gates.ops.reference.grid_attention_reference`.

    ``x = Tensor[N, F_l, *S]`` and ``g = Tensor[N, F_g, *S_g]`` with 1, 2 or 3 spatial dims, any
    subsample factor; returns ``(out: Tensor[N, F_l, *S], alpha: Tensor[N, 1, *S])``, ``out`` in
    ``x``'s memory format. Updates the running statistics in place when ``opt.training`` and
    ``opt.norm="batch"``. Supports ``sigma2="sigmoid"`` and ``norm`` ``"batch"`` or ``"none"`` (or no
    ``W``). float16/bfloat16 inputs are computed in float32, float64 in float64.

    Use it through :func:`attention_gates.functional.grid_attention` with ``backend="cpu"``,
    which checks the inputs first.
    """
    if opt.sigma2 != "sigmoid":
        raise ValueError(f"sigma2 must be 'sigmoid' for the cpu backend, got {opt.sigma2!r}")
    if w.W_weight is not None and opt.norm not in ("batch", "none"):
        raise ValueError(f"norm must be 'batch' or 'none' for the cpu backend, got {opt.norm!r}")
    if w.W_weight is None:
        opt = dataclasses.replace(opt, norm="none")
    x = x if _channels_last(x) else x.contiguous()
    g = g if _channels_last(g) else g.contiguous()
    return _GridAttentionCPU.apply(x, g, *w, opt)


def multi_gate_inference_cpu(
    x: Tensor,
    g: Tensor,
    heads: Sequence[tuple[Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor]]],
    A: Tensor,
    c: Tensor,
    *,
    sigma1: str = "relu",
    align_corners: bool = False,
) -> tuple[Tensor, Tensor]:
    """Several sigmoid gates on one ``(x, g)`` whose outputs meet one affine map and a ReLU, in inference.

    With every map after the gates affine (each gate's ``W`` with its norm in evaluation, the
    fusing 1x1 conv and its norm), the block's output is, per voxel::

        out = relu(c + sum_i alpha_i * (A_i x)),          A = [A_1; ...; A_heads] = Tensor[heads * C, C]

    so it is one product over ``x`` and one epilogue, instead of a product per head, a
    concatenation and a product over it. ``heads`` holds each gate's ``(theta_weight, phi_weight,
    phi_bias, psi_weight, psi_bias)``; ``A`` and ``c = Tensor[C]`` are the folded map
    (:meth:`attention_gates.gates.MultiAttentionGate.folded_output_map`).

    Returns ``(out: Tensor[N, C, *S], alpha: Tensor[N, heads, *S])``, in ``x``'s layout and dtype
    (float32; no autograd: use it under :func:`torch.no_grad` or :func:`torch.inference_mode`).
    """
    x = x if _channels_last(x) else x.contiguous()
    g = g if _channels_last(g) else g.contiguous()
    H = len(heads)
    # every head's coarse side at once: theta's and phi's weights stacked, psi block-diagonal
    phi_w, phi_b, psi_b = (torch.cat([_bias(h, i) for h in heads]) for i in (1, 2, 4))
    CI = heads[0][0].shape[0]
    psi_blocks = torch.block_diag(*(h[3].reshape(1, CI) for h in heads))  # [H, H * CI]
    cfg = GateOptions(norm="none", sigma1=sigma1, align_corners=align_corners)
    q = _attention(_theta(x, [h[0] for h in heads]), g, phi_w, phi_b, psi_blocks, psi_b, cfg)  # [N, H, *T]
    alpha = _resample(q, x.shape[2:], align_corners)  # [N, H, *S]
    return _scaled_product(x, A, c, alpha, relu=True), alpha


def _bias(head: tuple, i: int) -> Tensor:
    """Entry ``i`` of a head's ``(theta_weight, phi_weight, phi_bias, psi_weight, psi_bias)``, a missing bias as zeros."""
    if head[i] is not None:
        return head[i]
    return head[i - 1].new_zeros(head[i - 1].shape[0])
