"""Memory layouts of ``Tensor[N, C, *S]`` as the CPU paths read them: channels-last or contiguous."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CHANNELS_LAST", "is_channels_last", "in_layout_of", "stored_as_rows"]

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
"""The channels-last memory format of a tensor with 4 or 5 dims (2 or 3 spatial); 3-dim tensors have none."""


def is_channels_last(t: Tensor) -> bool:
    """Whether ``Tensor[N, C, *S]`` is stored channels-last (and not also contiguous, as a tensor
    with one channel or one voxel is)."""
    fmt = CHANNELS_LAST.get(t.dim())
    return fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


def in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in ``like``'s layout (channels-last or contiguous), copied only if it is not already."""
    fmt = CHANNELS_LAST[t.dim()] if is_channels_last(like) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def stored_as_rows(X: Tensor) -> bool:
    """Whether ``X = Tensor[N, C, S]`` is stored as ``[N, S, C]`` rows (the flattened view of a
    channels-last tensor)."""
    return X.shape[1] > 1 and X.stride(1) == 1 and X.transpose(1, 2).is_contiguous()
