"""Convolutions on the CPU: by oneDNN where PyTorch's own choice would not take it, 1x1
convolutions as matrix products over the channels where oneDNN's fixed cost per call does not pay,
and convolutions with their ReLU fused and their weights packed once for inference.

Used by the gate's cpu backend (:mod:`~attention_gates.ops.cpu_gate`) and by the inference
transform (:mod:`attention_gates.cpu`). Where a path changes (:func:`conv1x1`'s size threshold)
was measured on each CPU by ``benchmarks.cpu_backends`` (:func:`attention_gates.ops.measured.cpu_thresholds`).

:func:`pack_weight` and :func:`conv_relu` call two private operators of PyTorch's oneDNN
bindings, ``torch.ops.mkldnn._reorder_convolution_weight`` and
``torch.ops.mkldnn._convolution_pointwise`` (what inductor's CPU freezing path calls for the same
fusions); PyTorch has no public API for a convolution with a ReLU epilogue or for a weight kept in
oneDNN's own layout. They are asked for here only, and a build without them (or without oneDNN)
takes the plain ``F.conv2d/3d`` and ``relu_``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import measured
from .layout import is_channels_last, stored_as_rows

__all__ = ["is_recording", "onednn_applies", "conv", "conv1x1", "channel_product", "fused_ops_available", "pack_weight", "conv_relu"]

_CONV = (F.conv1d, F.conv2d, F.conv3d)


def _mkldnn_op(name: str):
    """``torch.ops.mkldnn.<name>``, or ``None`` where this torch build does not register it."""
    try:
        return getattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):
        return None


# private operators (see the module's docstring); None on builds without them
_CONV_POINTWISE = _mkldnn_op("_convolution_pointwise")
_REORDER_WEIGHT = _mkldnn_op("_reorder_convolution_weight")


def _per_axis(v, d: int) -> list[int]:
    """A convolution's ``stride``/``padding``/``dilation`` (an int or one per axis) as ``d`` ints."""
    return list(v) if isinstance(v, (tuple, list)) else [v] * d


def _in_dispatch_mode() -> bool:
    """Whether a ``TorchDispatchMode`` (``FlopCounterMode``, fake tensors, export's tracing) is active.

    PyTorch has no public API for this (``torch.utils._python_dispatch`` is private too); this is
    the one place that asks. Such modes must see ``aten.convolution``, which they know, not
    ``aten.mkldnn_convolution``.
    """
    return bool(torch._C._len_torch_dispatch_stack())


def is_recording() -> bool:
    """Whether the running code is being recorded rather than run: :func:`torch.compile`,
    :func:`torch.jit.trace` or a dispatch mode (:func:`torch.export.export` and the ONNX exporter,
    fake tensors, ``FlopCounterMode``). Those should see standard operators (``aten.convolution``),
    which they know, and no data-dependent Python branch."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or _in_dispatch_mode()


def onednn_applies(t: Tensor) -> bool:
    """Whether oneDNN can take ``t``: a float32 CPU tensor, oneDNN built and enabled
    (``torch.backends.mkldnn``), and nothing recording the code (:func:`is_recording`)."""
    return (
        not is_recording()
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
        return torch.ops.aten.mkldnn_convolution(t, weight, bias, _per_axis(padding, d), _per_axis(stride, d), _per_axis(dilation, d), groups)
    return _CONV[d - 1](t, weight, bias, stride, padding, dilation, groups)


def conv1x1(t: Tensor, weight: Tensor, bias: Optional[Tensor], *, onednn_min_rows: Optional[int] = None) -> Tensor:
    """A 1x1 convolution of ``Tensor[N, C, *S]`` (``weight``: ``Tensor[Co, C]`` or ``Tensor[Co, C, 1, ...]``):
    ``Tensor[N, Co, *S]`` in ``t``'s layout.

    A channels-last float32 ``t`` of at least ``onednn_min_rows`` voxels (``N * S``; default this
    CPU's measured :attr:`~attention_gates.ops.measured.CpuThresholds.onednn_min_rows`) goes to
    oneDNN, which reads its ``[S, C]`` rows in place. Anything else is a matrix product on the rows
    or on the ``[C, S]`` planes: oneDNN's fixed cost per call (it reorders the weight) makes it
    slower on small inputs, and it reorders a contiguous input too.
    """
    w = weight.flatten(1)
    co, c = w.shape
    n, spatial = t.shape[0], t.shape[2:]
    voxels = t.numel() // max(c, 1)
    min_rows = measured.cpu_thresholds().onednn_min_rows if onednn_min_rows is None else onednn_min_rows
    if voxels >= max(min_rows, 1) and is_channels_last(t) and onednn_applies(t) and w.dtype == torch.float32:
        return conv(t, w.view(co, c, *[1] * len(spatial)), bias)
    X = t.flatten(2)
    if stored_as_rows(X):  # [S, C] rows times w^T, the bias added by the product
        rows = X.transpose(1, 2).reshape(-1, c)  # a view
        y = torch.mm(rows, w.t()) if bias is None else torch.addmm(bias, rows, w.t())
        return y.view(n, *spatial, co).movedim(-1, 1)  # channels-last strides, the batch's too
    y = channel_product(w, X)
    if bias is not None:
        y.add_(bias[:, None])  # y is the product's own new tensor
    return y.view(n, co, *spatial)


def channel_product(w: Tensor, X: Tensor, acc: Optional[Tensor] = None) -> Tensor:
    """``w @ X[n]`` for every sample: ``w = Tensor[Co, C]``, ``X = Tensor[N, C, S]``.

    The result is ``Tensor[N, Co, S]`` in ``X``'s layout. ``X`` stored as ``[N, S, C]`` rows (a
    channels-last tensor's view) is multiplied as ``X[n]^T @ w^T``, all samples in one product.
    With ``acc`` (same shape as the result) the product is added into ``acc`` in place.
    """
    n, c, s = X.shape
    co = w.shape[0]
    if acc is not None and stored_as_rows(acc) != stored_as_rows(X):
        return acc.add_(channel_product(w, X))
    if stored_as_rows(X):
        rows = X.transpose(1, 2).reshape(n * s, c)  # a view
        if acc is None:
            return (rows @ w.t()).view(n, s, co).transpose(1, 2)
        acc.transpose(1, 2).view(n * s, co).addmm_(rows, w.t())  # view: the product lands in acc
        return acc
    if n == 1:  # torch.matmul would multiply X^T and copy the product back into [C, S] order
        if acc is None:
            return torch.mm(w, X[0]).unsqueeze(0)
        acc[0].addmm_(w, X[0])
        return acc
    if acc is None:
        return torch.bmm(w.expand(n, -1, -1), X)
    return acc.baddbmm_(w.expand(n, -1, -1), X)


def fused_ops_available() -> bool:
    """Whether this torch build has the oneDNN operators that :func:`pack_weight` and
    :func:`conv_relu` call (oneDNN itself may still be disabled: see :func:`onednn_applies`)."""
    return _CONV_POINTWISE is not None and _REORDER_WEIGHT is not None and torch.backends.mkldnn.is_available()


def pack_weight(weight: Tensor, input_shape: Sequence[int], stride=1, padding=0, dilation=1, groups: int = 1) -> Optional[Tensor]:
    """``weight`` (``Tensor[Co, C / groups, *K]``, float32, 2 or 3 spatial dims) reordered once
    into the blocked layout oneDNN's convolution of an input of ``input_shape`` reads, for
    :func:`conv_relu`'s ``packed``; ``None`` where :func:`fused_ops_available` is false.

    Without it every oneDNN convolution reorders its weight on each call (a parallel pass of its
    own). The layout oneDNN picks depends on the input's batch and spatial size as well as on the
    channels, so a packed weight is made per input shape. The result is an opaque ``torch._mkldnn``
    tensor: keep it beside the weight, never in a state dict.
    """
    d = weight.dim() - 2
    if not fused_ops_available() or d not in (2, 3) or weight.dtype != torch.float32 or len(input_shape) != d + 2:
        return None
    return _REORDER_WEIGHT(
        weight, _per_axis(padding, d), _per_axis(stride, d), _per_axis(dilation, d), groups, [int(s) for s in input_shape]
    )


def conv_relu(
    t: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    relu: bool,
    packed: Optional[Tensor] = None,
) -> Tensor:
    """``F.conv2d/3d`` of ``Tensor[N, C, *S]``, then ``relu`` when asked: one oneDNN call with the
    ReLU as its epilogue whenever :func:`onednn_applies` and :func:`fused_ops_available`.

    ``packed`` is :func:`pack_weight`'s reordering of ``weight`` for ``t``'s shape (``weight``
    itself is read where it is ``None`` or oneDNN does not apply). Otherwise :func:`conv` and an
    in-place ReLU on its result. Results equal ``F.relu(F.conv3d(...))`` up to float32 rounding,
    except at NaN: oneDNN's ReLU epilogue gives 0 there, where ``torch.relu`` (the fallback) keeps
    the NaN; pass ``relu=False`` and apply ``relu_`` to keep it. No autograd: for inference.
    """
    d = t.dim() - 2
    if d in (2, 3) and fused_ops_available() and onednn_applies(t) and weight.dtype == torch.float32:
        w = weight if packed is None else packed
        args = (_per_axis(padding, d), _per_axis(stride, d), _per_axis(dilation, d), groups)
        return _CONV_POINTWISE(t, w, bias, *args, "relu" if relu else "none", [], "")
    y = conv(t, weight, bias, stride, padding, dilation, groups)
    return y.relu_() if relu else y
