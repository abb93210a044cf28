"""U-Net and Attention U-Net, N-d, with their 2D and 3D faces.

The defaults build the paper's pancreas model as the authors' ``unet_CT_multi_att_dsv_3D``
builds it: filters ``[16, 32, 64, 128, 256]``, two ``3^d`` conv + BN + ReLU per level,
max-pool 2, a 1x1 conv + BN + ReLU gating signal on the bottleneck, the skips of levels 2-4
gated by two-head grid attention (level 4 by the gating signal, levels 3 and 2 by the
decoder output below them), parameter-free linear upsampling, and the fused multi-scale
deep-supervision head. :class:`UNet` is the same network without the gates and the gating
signal (the authors' ``unet_CT_dsv_3D``).

Every network keeps its constructor arguments as attributes and prints them (``repr(net)``
says how to build it again). Starting an Attention U-Net from a trained U-Net
(:meth:`AttentionUNet.from_unet`) and the checkpoint format are :mod:`attention_gates.transfer`'s.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvBlock, DeepSupervisionHead, GatingSignal, UpBlock
from .gates import GridAttentionGate, MultiAttentionGate, scripting_refused
from .layers import Factor, as_tuple, check_spatial_dims, constructor_repr, init_kaiming
from .ops import check_name
from .ops.reference import input_check

__all__ = [
    "UNet",
    "AttentionUNet",
    "UNet2D",
    "UNet3D",
    "AttentionUNet2D",
    "AttentionUNet3D",
    "GATE_MODULES",
    "resolve_filters",
    "require_attention_unet",
]

PAPER_FILTERS = (64, 128, 256, 512, 1024)
#: The modules an :class:`AttentionUNet` has and a :class:`UNet` has not (the gates' and the gating
#: signal's; the first component of their state-dict keys).
GATE_MODULES = ("gates", "gating")


def resolve_filters(filters: Optional[Sequence[int]], feature_scale: Optional[int]) -> tuple[int, ...]:
    """The channels per level that ``filters`` or ``feature_scale`` give (see :class:`UNet`); checked."""
    if filters is not None and feature_scale is not None:
        raise ValueError("give filters or feature_scale, not both")
    if filters is None:
        scale = 4 if feature_scale is None else feature_scale
        if not isinstance(scale, int) or scale < 1 or any(f % scale for f in PAPER_FILTERS):
            raise ValueError(f"feature_scale must be a positive int dividing {PAPER_FILTERS}, got {feature_scale!r}")
        return tuple(f // scale for f in PAPER_FILTERS)
    filters = tuple(filters)
    if len(filters) < 2 or not all(isinstance(f, int) and f >= 1 for f in filters):
        raise ValueError(f"filters must be at least 2 positive ints (one per level), got {filters!r}")
    return filters


class UNet(nn.Module):
    """Plain U-Net, N-d, of the same shape as :class:`AttentionUNet` (no gates, no gating signal).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        out_channels: classes (logit channels).
        filters: channels per level, top to bottom; its length is the depth.
        feature_scale: instead of ``filters``, ``[64, 128, 256, 512, 1024] // feature_scale``
            (the authors' parameter; default 4 gives ``[16, 32, 64, 128, 256]``). Kept as the
            ``filters`` it gives.
        norm: ``"batch"``, ``"instance"``, ``"group"`` or ``"none"``.
        num_groups: groups for ``norm="group"`` (the largest divisor of the channels up to it).
        deep_supervision: ``"fused"`` (the authors' multi-scale head), ``"per_scale"`` (a list of
            logits per level in training, for per-scale losses) or ``"none"``; see
            :class:`~attention_gates.blocks.DeepSupervisionHead`.
        align_corners: for all linear resampling (``True`` for checkpoints of PyTorch < 0.4).

    Any input size works: the input is padded (edge replication) to a multiple of
    ``2^(depth - 1)`` and the outputs are cropped back.

    Shapes:
        ``forward(x: Tensor[N, in_channels, *S])`` returns ``Tensor[N, out_channels, *S]`` (a list
        of ``Tensor[N, out_channels, *ceil(S / 2^i)]`` with ``deep_supervision="per_scale"`` in
        training).

    Example:
        >>> UNet(2, filters=[4, 8], norm="group", num_groups=2).extra_repr()  # repr(net) starts with it
        "spatial_dims=2, in_channels=1, out_channels=2, filters=[4, 8], norm='group', num_groups=2, deep_supervision='fused', align_corners=False"
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 2,
        filters: Optional[Sequence[int]] = None,
        *,
        feature_scale: Optional[int] = None,
        norm: str = "batch",
        num_groups: int = 8,
        deep_supervision: str = "fused",
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if deep_supervision not in DeepSupervisionHead.MODES:
            raise ValueError(f"deep_supervision must be one of {DeepSupervisionHead.MODES}, got {deep_supervision!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.filters = resolve_filters(filters, feature_scale)
        self.norm = norm
        self.num_groups = num_groups
        self.deep_supervision = deep_supervision
        self.align_corners = align_corners
        f = self.filters
        self.encoders = nn.ModuleList(
            ConvBlock(spatial_dims, in_channels if i == 0 else f[i - 1], f[i], norm, num_groups) for i in range(len(f))
        )
        # decoders[i] produces level i + 1 from its skip (f[i]) and the level below (f[i + 1])
        self.decoders = nn.ModuleList(
            UpBlock(spatial_dims, f[i], f[i + 1], f[i], norm, num_groups, align_corners) for i in range(len(f) - 1)
        )
        self.head = DeepSupervisionHead(spatial_dims, f[:-1], out_channels, deep_supervision, align_corners)
        init_kaiming(self)

    @property
    def depth(self) -> int:
        return len(self.filters)

    def _pool(self, h: Tensor) -> Tensor:
        return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.spatial_dims - 1](h, 2)

    @input_check
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects Tensor[N, {self.in_channels}, *S] with {self.spatial_dims} spatial dims, "
                f"got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        weights = self.encoders[0].conv1[0].weight.dtype
        if x.dtype != weights and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x must have the dtype of {type(self).__name__}'s weights, {weights}, got {x.dtype}: convert one "
                "of them (x.to(dtype) or net.to(dtype)), or run under torch.autocast"
            )

    def skip_connection(self, level: int, skip: Tensor, below: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """What the decoder of ``level`` takes from its skip: ``(skip, attention or None)``.

        The decoder step's hook: :class:`UNet` passes the skip unchanged (no attention);
        :class:`AttentionUNet` gates the skips of its ``attention_levels``.

        Args:
            level: the skip's level, 1 (full resolution) to ``depth - 1``.
            skip: the encoder's output at ``level``, ``Tensor[N, filters[level - 1], *S_level]``.
            below: the feature one level below, ``Tensor[N, filters[level], *S_below]``: the
                bottleneck's output for ``level = depth - 1``, else the decoder output of ``level + 1``.
        """
        return skip, None

    def forward(self, x: Tensor, return_attention: bool = False):
        """Segment ``x``; with ``return_attention=True`` return ``(logits, attention)``.

        ``attention`` is a tuple with one ``Tensor[N, heads, *S_level]`` per gated level
        (ascending levels, each on its skip's grid, ``S_level = ceil(S / 2^(level - 1))``);
        empty for :class:`UNet`. The maps are cropped only when they are asked for.

        The padding and the crops are operations on the input's sizes, with no Python branch on
        them, so that :func:`torch.jit.trace`, :func:`torch.export.export` and the ONNX exporter
        record a network that takes other sizes (see :doc:`/deploy`).
        """
        self._check_input(x)
        size = x.shape[2:]
        x = _pad_to_multiple(x, 2 ** (self.depth - 1))
        skips = []
        h = x
        for i, enc in enumerate(self.encoders):
            h = enc(h if i == 0 else self._pool(h))
            skips.append(h)
        below = skips.pop()
        attention = []
        decoded = [None] * (self.depth - 1)
        for i in reversed(range(self.depth - 1)):
            skip, alpha = self.skip_connection(i + 1, skips[i], below)
            if alpha is not None and return_attention:
                attention.append(_crop(alpha, size, i))
            below = decoded[i] = self.decoders[i](skip, below)
        out = self.head(decoded, x.shape[2:])
        if isinstance(out, list):
            out = [_crop(o, size, i) for i, o in enumerate(out)]
        else:
            out = _crop(out, size, 0)
        if return_attention:
            return out, tuple(reversed(attention))
        return out

    def __prepare_scriptable__(self):
        raise scripting_refused(self)

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments that build this network again (``feature_scale`` as its ``filters``)."""
        return dict(
            spatial_dims=self.spatial_dims, in_channels=self.in_channels, out_channels=self.out_channels,
            filters=list(self.filters), norm=self.norm, num_groups=self.num_groups,
            deep_supervision=self.deep_supervision, align_corners=self.align_corners,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return constructor_repr(self, self.arguments())


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """``x: Tensor[N, C, *S]`` padded at the end of each axis (edge replication) to the next multiple of ``multiple``.

    The pads are integer arithmetic on the sizes, ``(-s) % multiple``, and ``x`` is padded even by
    zero: no Python branch on a size, so that the sizes stay symbolic under :func:`torch.export.export`
    and recorded under :func:`torch.jit.trace` (a branch would fix them in the graph). The copy takes
    well under 1% of the network's time.
    """
    return F.pad(x, _end_pads([(-s) % multiple for s in x.shape[2:]]), mode="replicate")


def _end_pads(amounts: Sequence) -> list:
    """:func:`torch.nn.functional.pad`'s list for ``amounts`` added at the end of each spatial axis (last axis first)."""
    return [p for a in reversed(amounts) for p in (0, a)]


def _crop(t: Tensor, size: Sequence[int], level: int) -> Tensor:
    """Crop ``t`` (on the grid of ``level``, 0 = full resolution) to the unpadded ``ceil(size / 2^level)``.

    By :func:`torch.nn.functional.pad` with negative pads (a copy), not by slicing: slicing makes
    :func:`torch.export.export` add guards on the padded sizes (``padded != size``) that then fail
    at the sizes that are already multiples; ``(s + f - 1) // f`` keeps the sizes symbolic.
    """
    f = 2**level
    return F.pad(t, _end_pads([(s + f - 1) // f - have for s, have in zip(size, t.shape[2:])]))


class AttentionUNet(UNet):
    """Attention U-Net (Oktay et al., 2018), N-d: :class:`UNet` with gated skips.

    Takes :class:`UNet`'s arguments and these:

    Args:
        attention_levels: the levels whose skips are gated (1 = full resolution); default all
            but the top one and the bottleneck (``(2, 3, 4)`` at depth 5). The deepest skip
            (``depth - 1``) is gated by the gating signal, the others by the decoder output below.
        heads: gates per level (2 in the paper's model; 1 for the single-attention model).
        subsample_factor: theta's kernel and stride, an int or one per axis.
        sigma1, sigma2, gate_output_transform: see :class:`~attention_gates.gates.GridAttentionGate`.
        backend: the gates' implementation (see :mod:`attention_gates.ops.dispatch`).

    Example:
        >>> net = AttentionUNet(3, in_channels=1, out_channels=2)
        >>> sum(p.numel() for p in net.parameters())
        6472784
        >>> logits, att = net(torch.randn(1, 1, 32, 32, 32), return_attention=True)
        >>> logits.shape, [a.shape[1:] for a in att]
        (torch.Size([1, 2, 32, 32, 32]), [torch.Size([2, 16, 16, 16]), torch.Size([2, 8, 8, 8]), torch.Size([2, 4, 4, 4])])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 2,
        filters: Optional[Sequence[int]] = None,
        *,
        attention_levels: Optional[Sequence[int]] = None,
        heads: int = 2,
        subsample_factor: Factor = 2,
        sigma1: str = "relu",
        sigma2: str = "sigmoid",
        gate_output_transform: bool = True,
        backend: Optional[str] = None,
        **kwargs,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, filters, **kwargs)
        depth = self.depth
        levels = tuple(range(2, depth)) if attention_levels is None else tuple(attention_levels)
        if not all(isinstance(lv, int) and 1 <= lv <= depth - 1 for lv in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"attention_levels must be distinct ints in 1..{depth - 1} (the skips), got {levels!r}")
        self.attention_levels = tuple(sorted(levels))
        self.heads = heads
        self.subsample_factor = as_tuple(subsample_factor, spatial_dims)
        self.sigma1, self.sigma2 = sigma1, sigma2
        self.gate_output_transform = gate_output_transform
        self.backend = None if backend is None else check_name(backend)
        f = self.filters
        self.gates = nn.ModuleDict()  # registered first: the state dict lists gates.* before gating.*
        self.gating: Optional[GatingSignal] = None
        if depth - 1 in levels:
            self.gating = GatingSignal(spatial_dims, f[-1], f[-1], self.norm, self.num_groups)
            init_kaiming(self.gating)
        for lv in self.attention_levels:
            self.gates[str(lv)] = MultiAttentionGate(
                spatial_dims, f[lv - 1], f[lv], inter_channels=f[lv - 1], subsample_factor=self.subsample_factor,
                heads=heads, norm=self.norm, num_groups=self.num_groups, sigma1=sigma1, sigma2=sigma2,
                output_transform=gate_output_transform, align_corners=self.align_corners, backend=self.backend,
            )  # fmt: skip

    def skip_connection(self, level: int, skip: Tensor, below: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The gated skip and its attention ``Tensor[N, heads, *S_level]`` at the ``attention_levels``
        (the deepest skip gated by the gating signal of ``below``, the others by ``below``), else
        :class:`UNet`'s (the skip unchanged)."""
        key = str(level)
        if key not in self.gates:
            return super().skip_connection(level, skip, below)
        g = self.gating(below) if level == self.depth - 1 else below
        return self.gates[key](skip, g)

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments that build this network again (``feature_scale`` as its ``filters``)."""
        return dict(
            super().arguments(), attention_levels=self.attention_levels, heads=self.heads,
            subsample_factor=self.subsample_factor, sigma1=self.sigma1, sigma2=self.sigma2,
            gate_output_transform=self.gate_output_transform, backend=self.backend,
        )  # fmt: skip

    @classmethod
    def from_unet(cls, source, **config):
        """This network with a trained :class:`UNet`'s weights and pass-through gates, and the report.

        ``source`` is the U-Net, its state dict or a checkpoint path; see
        :func:`attention_gates.transfer.attention_unet_from_unet` (called with ``model_class=cls``).

        Returns:
            ``(model, report)``: the network and a :class:`~attention_gates.transfer.TransferReport`
            of what was copied, e.g. ``model, report = AttentionUNet3D.from_unet(unet)``.
        """
        # the transfer builds on this module; imported on call so that the imports go nets <- transfer
        from .transfer import attention_unet_from_unet

        return attention_unet_from_unet(source, model_class=cls, **config)

    def set_backend(self, backend: Optional[str]) -> "AttentionUNet":
        """Set the backend of every :class:`~attention_gates.gates.GridAttentionGate` in the network
        (``None`` follows the global default) and the network's ``backend``; returns ``self``."""
        name = None if backend is None else check_name(backend)
        for m in self.modules():
            if isinstance(m, GridAttentionGate):
                m.backend = name
        self.backend = name
        return self


def require_attention_unet(model: Any) -> AttentionUNet:
    """``model`` if it is an :class:`AttentionUNet` (any face), else a ``TypeError`` naming what came."""
    if not isinstance(model, AttentionUNet):
        raise TypeError(f"model must be an AttentionUNet, got {type(model).__name__}")
    return model


def _face(base: type, dims: int, name: str, doc: str) -> type:
    def __init__(self, in_channels: int = 1, out_channels: int = 2, filters: Optional[Sequence[int]] = None, **kwargs) -> None:
        base.__init__(self, dims, in_channels, out_channels, filters, **kwargs)

    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


UNet2D = _face(UNet, 2, "UNet2D", "2D :class:`UNet`: ``Tensor[N, C, H, W]`` in, ``Tensor[N, out_channels, H, W]`` out.")
UNet3D = _face(
    UNet, 3, "UNet3D",
    """3D :class:`UNet`: ``Tensor[N, C, D, H, W]`` in, ``Tensor[N, out_channels, D, H, W]`` out.

    Example:
        >>> sum(p.numel() for p in UNet3D(in_channels=1, out_channels=2).parameters())
        5887466
    """,
)  # fmt: skip
AttentionUNet2D = _face(
    AttentionUNet, 2, "AttentionUNet2D",
    "2D :class:`AttentionUNet`: ``Tensor[N, C, H, W]`` in, ``Tensor[N, out_channels, H, W]`` out.",
)  # fmt: skip
AttentionUNet3D = _face(
    AttentionUNet, 3, "AttentionUNet3D",
    """3D :class:`AttentionUNet`, by default the paper's pancreas model.

    ``Tensor[N, C, D, H, W]`` in, ``Tensor[N, out_channels, D, H, W]`` out.

    Example:
        >>> net = AttentionUNet3D(in_channels=1, out_channels=2)
        >>> sum(p.numel() for p in net.parameters())
        6472784
    """,
)  # fmt: skip
