"""Convolutions on the CPU: by oneDNN where PyTorch's own choice would not take it, and 1x1
convolutions as matrix products over the channels where oneDNN's fixed cost per call does not pay.

Used by the gate's cpu backend (:mod:`~attention_gates.ops.cpu_gate`) and by the inference
transform (:mod:`attention_gates.cpu`). Where a path changes (:func:`conv1x1`'s size threshold)
was measured on each CPU by ``benchmarks.cpu_backends`` (:func:`attention_gates.ops.measured.cpu_thresholds`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import measured
from .layout import is_channels_last, stored_as_rows

__all__ = ["onednn_applies", "conv", "conv1x1", "channel_product"]

_CONV = (F.conv1d, F.conv2d, F.conv3d)


def _in_dispatch_mode() -> bool:
    """Whether a ``TorchDispatchMode`` (``FlopCounterMode``, fake tensors, export's tracing) is active.

    PyTorch has no public API for this (``torch.utils._python_dispatch`` is private too); this is
    the one place that asks. Such modes must see ``aten.convolution``, which they know, not
    ``aten.mkldnn_convolution``.
    """
    return bool(torch._C._len_torch_dispatch_stack())


def onednn_applies(t: Tensor) -> bool:
    """Whether oneDNN can take ``t``: a float32 CPU tensor, oneDNN built and enabled
    (``torch.backends.mkldnn``), outside :func:`torch.compile` and dispatch modes (which should
    see ``aten.convolution``, for example ``FlopCounterMode`` and fake tensors)."""
    return (
        not torch.compiler.is_compiling()
        and not _in_dispatch_mode()
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
