"""U-Net building blocks, N-d: conv blocks, the gating signal, up blocks, deep-supervision heads."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .functional import resample
from .layers import conv_nd, init_kaiming, norm_nd

__all__ = ["ConvBlock", "GatingSignal", "UpBlock", "DeepSupervisionHead", "deep_supervision_weights"]


def _conv_norm_relu(spatial_dims: int, cin: int, cout: int, kernel_size: int, norm: str, num_groups: int) -> nn.Sequential:
    Conv = conv_nd(spatial_dims)
    return nn.Sequential(
        Conv(cin, cout, kernel_size, padding=kernel_size // 2, bias=True),
        norm_nd(norm, spatial_dims, cout, num_groups),
        nn.ReLU(inplace=True),
    )


class ConvBlock(nn.Module):
    """Two ``3^d`` convolutions, each with bias, norm and ReLU (the authors' ``UnetConv3``).

    Shapes: ``Tensor[N, in_channels, *S]`` -> ``Tensor[N, out_channels, *S]``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch", num_groups: int = 8) -> None:
        super().__init__()
        self.conv1 = _conv_norm_relu(spatial_dims, in_channels, out_channels, 3, norm, num_groups)
        self.conv2 = _conv_norm_relu(spatial_dims, out_channels, out_channels, 3, norm, num_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class GatingSignal(nn.Module):
    """The gating signal on the bottleneck: 1x1 conv + norm + ReLU (the authors' ``UnetGridGatingSignal3``).

    Shapes: ``Tensor[N, in_channels, *S]`` -> ``Tensor[N, out_channels, *S]``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch", num_groups: int = 8) -> None:
        super().__init__()
        self.conv1 = _conv_norm_relu(spatial_dims, in_channels, out_channels, 1, norm, num_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1(x)


class UpBlock(nn.Module):
    """Decoder block: parameter-free linear upsampling of the level below to the skip's size,
    concatenation ``[skip, up(below)]`` and a :class:`ConvBlock` (the authors' ``UnetUp3_CT``).

    Shapes: ``skip: Tensor[N, skip_channels, *S]``, ``below: Tensor[N, below_channels, *S_below]``
    -> ``Tensor[N, out_channels, *S]``.
    """

    def __init__(
        self,
        spatial_dims: int,
        skip_channels: int,
        below_channels: int,
        out_channels: int,
        norm: str = "batch",
        num_groups: int = 8,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.conv = ConvBlock(spatial_dims, skip_channels + below_channels, out_channels, norm, num_groups)

    def forward(self, skip: Tensor, below: Tensor) -> Tensor:
        up = resample(below, skip.shape[2:], self.align_corners)
        return self.conv(torch.cat([skip, up], dim=1))


def deep_supervision_weights(n: int) -> list[float]:
    """Loss weights of ``n`` deep-supervision outputs (full resolution first): ``1/2^i``, normalised to sum 1.

    Example:
        >>> deep_supervision_weights(3)
        [0.5714285714285714, 0.2857142857142857, 0.14285714285714285]
    """
    w = [1.0 / 2**i for i in range(n)]
    s = sum(w)
    return [v / s for v in w]


class DeepSupervisionHead(nn.Module):
    """The segmentation head over the decoder levels.

    ``convs[i]`` is a 1x1 conv from decoder level ``i + 1`` (``in_channels[i]`` channels, at
    ``1/2^i`` resolution) to ``out_channels`` logits. ``mode``:

    - ``"fused"`` (the authors'): every level's logits resampled to full size, concatenated and
      fused by the 1x1 conv ``fuse``; returns ``Tensor[N, out_channels, *S]``.
    - ``"per_scale"``: in training, the list of every level's logits at its own resolution (full
      resolution first) for a per-scale loss (weights :func:`deep_supervision_weights`); in eval,
      the full-resolution logits only.
    - ``"none"``: the full-resolution level's 1x1 conv only.
    """

    MODES = ("fused", "per_scale", "none")

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], out_channels: int, mode: str = "fused", align_corners: bool = False) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        Conv = conv_nd(spatial_dims)
        self.mode = mode
        self.align_corners = align_corners
        levels = in_channels if mode != "none" else in_channels[:1]
        self.convs = nn.ModuleList(Conv(c, out_channels, kernel_size=1) for c in levels)
        self.fuse: Optional[nn.Module] = Conv(out_channels * len(levels), out_channels, kernel_size=1) if mode == "fused" else None
        init_kaiming(self)

    def forward(self, features: Sequence[Tensor], size: Optional[Sequence[int]] = None):
        """``features[i]``: decoder level ``i + 1``'s output; ``size``: the full-resolution size (default: ``features[0]``'s)."""
        size = tuple(features[0].shape[2:]) if size is None else tuple(size)
        if self.mode == "none":
            return self.convs[0](features[0])
        logits = [conv(f) for conv, f in zip(self.convs, features)]
        if self.mode == "fused":
            return self.fuse(torch.cat([resample(z, size, self.align_corners) for z in logits], dim=1))
        return logits if self.training else logits[0]
