"""U-Net and Attention U-Net, N-d, with their 2D and 3D faces.

The defaults build the paper's pancreas model as the authors' ``unet_CT_multi_att_dsv_3D``
builds it: filters ``[16, 32, 64, 128, 256]``, two ``3^d`` conv + BN + ReLU per level,
max-pool 2, a 1x1 conv + BN + ReLU gating signal on the bottleneck, the skips of levels 2-4
gated by two-head grid attention (level 4 by the gating signal, levels 3 and 2 by the
decoder output below them), parameter-free linear upsampling, and the fused multi-scale
deep-supervision head. :class:`UNet` is the same network without the gates and the gating
signal (the authors' ``unet_CT_dsv_3D``).

:meth:`AttentionUNet.from_unet` (:func:`attention_unet_from_unet`) starts an Attention U-Net from
a trained U-Net: it copies everything the two networks of the same settings share (``encoders``,
``decoders``, ``head``) and, by default, sets the gates to pass their skips through unchanged
(:func:`init_passthrough`), so that the new network starts out computing the U-Net
(:mod:`attention_gates.finetune` then trains the gates alone).

Checkpoint files
----------------
A checkpoint is a :func:`torch.save`'d dict::

    {
        "model": state_dict,              # or "state_dict": state_dict
        "config": {                       # optional
            "arch": "UNet",               # or "AttentionUNet"; informational only
            "spatial_dims": 3,
            "in_channels": 1, "out_channels": 2, "filters": [16, 32, 64, 128, 256],
            "norm": "batch", "num_groups": 8, "deep_supervision": "fused", "align_corners": False,
            # an AttentionUNet's also: "attention_levels", "heads", "subsample_factor",
            # "sigma1", "sigma2", "gate_output_transform"
        },
        ...                               # anything else (optimizer, epoch) is ignored
    }

``"config"`` holds constructor arguments of :class:`~attention_gates.nets.UNet` /
:class:`~attention_gates.nets.AttentionUNet` (missing ones take the constructors' defaults;
unknown ones are an error); :func:`checkpoint_config` writes it for a network.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvBlock, DeepSupervisionHead, GatingSignal, UpBlock
from .gates import MultiAttentionGate
from .layers import Factor, check_spatial_dims, group_count, init_kaiming
from .ops import check_name

__all__ = [
    "UNet",
    "AttentionUNet",
    "UNet2D",
    "UNet3D",
    "AttentionUNet2D",
    "AttentionUNet3D",
    "TransferReport",
    "attention_unet_from_unet",
    "checkpoint_config",
    "network_from_config",
    "init_passthrough",
]

PAPER_FILTERS = (64, 128, 256, 512, 1024)


def _filters(filters: Optional[Sequence[int]], feature_scale: Optional[int]) -> tuple[int, ...]:
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
            (the authors' parameter; default 4 gives ``[16, 32, 64, 128, 256]``).
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
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.filters = _filters(filters, feature_scale)
        self.norm = norm
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
        self.gating: Optional[GatingSignal] = None
        self.gates = nn.ModuleDict()
        init_kaiming(self)

    @property
    def depth(self) -> int:
        return len(self.filters)

    def _pool(self, h: Tensor) -> Tensor:
        return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.spatial_dims - 1](h, 2)

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

    def forward(self, x: Tensor, return_attention: bool = False):
        """Segment ``x``; with ``return_attention=True`` return ``(logits, attention)``.

        ``attention`` is a tuple with one ``Tensor[N, heads, *S_level]`` per gated level
        (ascending levels, each on its skip's grid, ``S_level = ceil(S / 2^(level - 1))``);
        empty for :class:`UNet`.
        """
        self._check_input(x)
        size = tuple(x.shape[2:])
        m = 2 ** (self.depth - 1)
        padded = tuple(math.ceil(s / m) * m for s in size)
        if padded != size:
            pad = []
            for s, p in zip(reversed(size), reversed(padded)):
                pad += [0, p - s]
            x = F.pad(x, pad, mode="replicate")
        skips = []
        h = x
        for i, enc in enumerate(self.encoders):
            h = enc(h if i == 0 else self._pool(h))
            skips.append(h)
        below = skips.pop()
        gating = self.gating(below) if self.gating is not None else None
        attention = []
        decoded = [None] * (self.depth - 1)
        for i in reversed(range(self.depth - 1)):
            skip = skips[i]
            gate = self.gates[str(i + 1)] if str(i + 1) in self.gates else None
            if gate is not None:
                g = gating if i + 1 == self.depth - 1 else below
                skip, alpha = gate(skip, g)
                attention.append(_crop(alpha, size, i))
            below = decoded[i] = self.decoders[i](skip, below)
        out = self.head(decoded, padded)
        if isinstance(out, list):
            out = [_crop(o, size, i) for i, o in enumerate(out)]
        else:
            out = _crop(out, size, 0)
        if return_attention:
            return out, tuple(reversed(attention))
        return out

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"filters={list(self.filters)}, norm={self.norm!r}, deep_supervision={self.deep_supervision!r}"
        )


def _crop(t: Tensor, size: Sequence[int], level: int) -> Tensor:
    """Crop ``t`` (on the grid of ``level``, 0 = full resolution) to the unpadded ``ceil(size / 2^level)``."""
    want = tuple(math.ceil(s / 2**level) for s in size)
    if tuple(t.shape[2:]) == want:
        return t
    return t[(slice(None), slice(None)) + tuple(slice(0, w) for w in want)]


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
        f = self.filters
        num_groups = kwargs.get("num_groups", 8)
        if depth - 1 in levels:
            self.gating = GatingSignal(spatial_dims, f[-1], f[-1], self.norm, num_groups)
            init_kaiming(self.gating)
        for lv in self.attention_levels:
            self.gates[str(lv)] = MultiAttentionGate(
                spatial_dims, f[lv - 1], f[lv], inter_channels=f[lv - 1], subsample_factor=subsample_factor,
                heads=heads, norm=self.norm, num_groups=num_groups, sigma1=sigma1, sigma2=sigma2,
                output_transform=gate_output_transform, align_corners=self.align_corners, backend=backend,
            )  # fmt: skip
        self.heads = heads

    @classmethod
    def from_unet(cls, source, **config) -> "AttentionUNet":
        """This network with a trained :class:`UNet`'s weights and pass-through gates.

        ``source`` is the U-Net, its state dict or a checkpoint path; see
        :func:`attention_unet_from_unet` (called with ``model_class=cls``).
        """
        return attention_unet_from_unet(source, model_class=cls, **config)

    def set_backend(self, backend: Optional[str]) -> "AttentionUNet":
        """Set every gate's backend (``None`` follows the global default); returns ``self``."""
        name = None if backend is None else check_name(backend)
        for m in self.modules():
            if hasattr(m, "backend") and m is not self:
                m.backend = name
        return self


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


# --- Starting an Attention U-Net from a trained U-Net ---------------------------------------------

Source = Union[UNet, Mapping[str, Any], str, os.PathLike]

#: the modules an AttentionUNet has and a UNet has not
GATE_MODULES = ("gates", "gating")
# the settings a U-Net's weights depend on: these must agree between the source and the model
_BACKBONE_KEYS = ("spatial_dims", "in_channels", "out_channels", "filters", "norm", "num_groups", "deep_supervision", "align_corners")
# wrappers whose prefix a saved state dict may carry: DistributedDataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _constructor_keys(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


_CONFIG_KEYS = _constructor_keys(UNet) | _constructor_keys(AttentionUNet)


@dataclass
class TransferReport:
    """What :func:`attention_unet_from_unet` did, by state-dict key of the model (or of the source).

    Attributes:
        copied: the model's entries copied from the source (every weight and buffer of
            ``encoders``, ``decoders`` and ``head``).
        initialised: the model's entries not taken from the source: the gates and the gating
            signal, set to pass-through or left as constructed.
        skipped: the source's entries the model has no use for (the gates of an
            :class:`~attention_gates.nets.AttentionUNet` source); empty for a U-Net source.
    """

    copied: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def attention_unet_from_unet(
    source: Source,
    *,
    model: Optional[AttentionUNet] = None,
    model_class: type[AttentionUNet] = AttentionUNet,
    passthrough: bool = True,
    **config: Any,
) -> AttentionUNet:
    """An Attention U-Net holding a trained U-Net's weights, its gates new.

    Args:
        source: a trained :class:`~attention_gates.nets.UNet` (any face, e.g. ``UNet3D``), its
            ``state_dict()``, a checkpoint dict, or the path of a checkpoint file (see the
            module docstring for the format). Keys prefixed ``module.`` (DistributedDataParallel)
            or ``_orig_mod.`` (``torch.compile``) are accepted.
        model: an :class:`~attention_gates.nets.AttentionUNet` to copy into, instead of building
            one; then ``config`` must be empty.
        model_class: the class to build (``AttentionUNet``, ``AttentionUNet2D``, ``AttentionUNet3D``).
        passthrough: set the gates to pass-through (:func:`init_passthrough`), so that the model
            reproduces the U-Net in eval mode; ``False`` leaves them freshly initialised.
        **config: constructor arguments of the model: the gates' settings (``heads``,
            ``attention_levels``, ``subsample_factor``, ...) and, for a bare state dict, the
            U-Net's (``spatial_dims``, ``filters``, ...). The U-Net's own settings come from a
            U-Net source or from a checkpoint's ``"config"``; keys given here override them.

    Returns:
        The model, on the device and in the floating dtype of the source's weights (a given
        ``model`` stays where it is), with a :class:`TransferReport` as ``model.transfer_report``.

    Raises:
        ValueError: the source and the model differ in settings the copied weights depend on
            (spatial dims, in/out channels, filters, norm, deep-supervision mode, align_corners):
            the message names the first differing entry with both shapes, and the differing
            settings where the source's are known. Also for ``passthrough=True`` with gates that
            cannot pass through (see :func:`init_passthrough`).
        TypeError: ``source``, ``model`` or ``model_class`` of the wrong kind.

    Example:
        >>> from attention_gates import AttentionUNet3D, UNet3D
        >>> unet = UNet3D(filters=[4, 8, 16])
        >>> net = AttentionUNet3D.from_unet(unet)
        >>> len(net.transfer_report.copied) == len(unet.state_dict())
        True
    """
    if not (isinstance(model_class, type) and issubclass(model_class, AttentionUNet)):
        raise TypeError(f"model_class must be AttentionUNet or a subclass, got {model_class!r}")
    if model is not None:
        if not isinstance(model, AttentionUNet):
            raise TypeError(f"model must be an AttentionUNet, got {type(model).__name__}")
        if config:
            raise ValueError(f"give model or config, not both: got model and config keys {sorted(config)}")
    state, source_config = _read_source(source)
    if model is None:
        unknown = sorted(set(config) - _CONFIG_KEYS)
        if unknown:
            raise TypeError(f"unknown {model_class.__name__} arguments {unknown}; expected some of {sorted(_CONFIG_KEYS)}")
        model = _build(model_class, source_config, config)
        floating = next((t for t in state.values() if t.is_floating_point()), None)
        if floating is not None:
            model.to(device=floating.device, dtype=floating.dtype)
    backbone, report = _match(model, state, source_config)
    if passthrough:
        _check_passthrough(model)
    model.load_state_dict(backbone, strict=False)
    if passthrough:
        init_passthrough(model)
    model.transfer_report = report
    return model


def checkpoint_config(net: UNet) -> dict[str, Any]:
    """The ``"config"`` entry of a checkpoint of ``net``: its constructor arguments and ``"arch"``.

    Save ``{"model": net.state_dict(), "config": checkpoint_config(net)}``; then
    ``AttentionUNet3D.from_unet(path)`` rebuilds the settings from it. Holds only ints, strings,
    bools and lists, so that ``torch.load(path, weights_only=True)`` reads it.
    """
    if not isinstance(net, UNet):
        raise TypeError(f"net must be a UNet or AttentionUNet, got {type(net).__name__}")
    config: dict[str, Any] = {"arch": "AttentionUNet" if isinstance(net, AttentionUNet) else "UNet"}
    config.update(_backbone_config(net))
    if isinstance(net, AttentionUNet) and len(net.gates):
        gate = next(iter(net.gates.values())).gates[0]
        config.update(
            attention_levels=list(net.attention_levels), heads=net.heads,
            subsample_factor=list(gate.subsample_factor), sigma1=gate.sigma1, sigma2=gate.sigma2,
            gate_output_transform=gate.W is not None,
        )  # fmt: skip
    return config


def network_from_config(config: Mapping[str, Any], **overrides: Any) -> UNet:
    """The network a checkpoint's ``"config"`` describes (the inverse of :func:`checkpoint_config`).

    ``config["arch"]`` names the class (``"UNet"`` or ``"AttentionUNet"``); the other entries are
    its constructor arguments, ``overrides`` (e.g. ``backend=``) replace or add some. The weights
    are not loaded: ``net.load_state_dict(checkpoint["model"])`` does that.

    Raises:
        TypeError: ``config`` is not a dict.
        ValueError: an unknown ``"arch"``, or arguments the class does not take (named).

    Example:
        >>> net = AttentionUNet(3, filters=[4, 8, 16])
        >>> type(network_from_config(checkpoint_config(net))).__name__
        'AttentionUNet'
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (a checkpoint's 'config'), got {type(config).__name__}")
    classes = {"UNet": UNet, "AttentionUNet": AttentionUNet}
    cls = classes.get(config.get("arch"))
    if cls is None:
        raise ValueError(f"config['arch'] must be one of {sorted(classes)}, got {config.get('arch')!r}")
    kwargs = {**{k: v for k, v in config.items() if k != "arch"}, **overrides}
    takes = _CONFIG_KEYS if cls is AttentionUNet else _constructor_keys(UNet)
    unknown = sorted(set(kwargs) - takes)
    if unknown:
        raise ValueError(f"{cls.__name__} does not take {unknown}; it takes {sorted(takes)}")
    return cls(**kwargs)


def _read_source(source: Source) -> tuple[dict[str, Tensor], Optional[dict[str, Any]]]:
    """``(state_dict, backbone settings or None)`` of a U-Net, state dict, checkpoint or path."""
    if isinstance(source, UNet):
        return source.state_dict(), _backbone_config(source)
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(source, Mapping):
            raise TypeError(f"the checkpoint file must hold a dict, got {type(source).__name__}")
    if not isinstance(source, Mapping):
        raise TypeError(
            f"source must be a UNet, a state dict, a checkpoint dict or a checkpoint path, got {type(source).__name__}"
        )
    config = None
    for key in ("model", "state_dict"):
        if isinstance(source.get(key), Mapping):
            config = _checkpoint_settings(source.get("config"))
            source = source[key]
            break
    bad = [k for k, v in source.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(
            "source must map names to tensors (a state dict) or hold one under 'model' or 'state_dict' "
            f"(a checkpoint); got non-tensor entries {bad[:5]}"
        )
    return _strip_wrappers(dict(source)), config


def _strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _checkpoint_settings(config: Any) -> Optional[dict[str, Any]]:
    """A checkpoint's ``"config"`` without ``"arch"``, checked, with ``filters`` resolved."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise TypeError(f"a checkpoint's 'config' must be a dict, got {type(config).__name__}")
    config = {k: v for k, v in config.items() if k != "arch"}
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"the checkpoint's config has unknown keys {unknown}; expected some of {sorted(_CONFIG_KEYS)}")
    config["filters"] = list(_filters(config.get("filters"), config.pop("feature_scale", None)))
    return config


def _backbone_config(net: UNet) -> dict[str, Any]:
    """The settings of ``net`` its U-Net weights depend on (``num_groups`` only for group norm)."""
    config = {k: getattr(net, k) for k in _BACKBONE_KEYS if k != "num_groups"}
    config["filters"] = list(net.filters)
    if net.norm == "group":
        config["num_groups"] = max(m.num_groups for m in net.encoders.modules() if isinstance(m, nn.GroupNorm))
    return config


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """The backbone settings of a constructor config, defaults filled in, ``num_groups`` as effective."""
    defaults = {k: p.default for k, p in inspect.signature(UNet.__init__).parameters.items()}
    s = {k: config.get(k, defaults.get(k)) for k in _BACKBONE_KEYS}
    s["filters"] = list(_filters(s["filters"], None))
    if s["norm"] == "group":
        s["num_groups"] = max(group_count(s["num_groups"], c) for c in s["filters"])
    else:
        del s["num_groups"]
    return s


def _build(model_class: type[AttentionUNet], source_config: Optional[dict[str, Any]], config: dict[str, Any]) -> AttentionUNet:
    kwargs = dict(source_config or {})
    if "feature_scale" in config:
        kwargs.pop("filters", None)
    kwargs.update(config)
    if "spatial_dims" in inspect.signature(model_class).parameters:
        if "spatial_dims" not in kwargs:
            raise ValueError(
                f"spatial_dims is needed to build {model_class.__name__} from a state dict without a config: "
                "pass spatial_dims=2 or 3 (or use AttentionUNet2D / AttentionUNet3D)"
            )
    else:
        kwargs.pop("spatial_dims", None)  # a 2D/3D face fixes it; a different source shows up in _match
    return model_class(**kwargs)


def _match(model: AttentionUNet, state: dict[str, Tensor], source_config: Optional[dict[str, Any]]):
    """The source entries to load into ``model`` and the report; raises on any mismatch."""
    target = model.state_dict()
    wanted = [k for k in target if not _is_gate(k)]
    problems = []
    for k in wanted:
        if k not in state:
            problems.append(f"{k!r} is absent from the source but {_shape(target[k])} in the model")
        elif state[k].shape != target[k].shape:
            problems.append(f"{k!r} is {_shape(state[k])} in the source but {_shape(target[k])} in the model")
    problems += [
        f"{k!r} is {_shape(state[k])} in the source but absent from the model"
        for k in state
        if k not in target and not _is_gate(k)
    ]
    differ = []
    if source_config is not None:
        have, want = _settings(_backbone_config(model)), _settings(source_config)
        differ = [f"{k} {want[k]!r} vs {have[k]!r}" for k in have if have.get(k) != want.get(k)]
    if problems:
        more = f" (and {len(problems) - 1} more entries)" if len(problems) > 1 else ""
        why = (
            f"; settings that differ, source vs model: {', '.join(differ)}"
            if differ
            else "; the source was built with other settings (spatial dims, in/out channels, filters, norm, deep_supervision?)"
        )
        raise ValueError(f"cannot copy the U-Net into {type(model).__name__}: {problems[0]}{more}{why}")
    if differ:
        raise ValueError(
            f"cannot copy the U-Net into {type(model).__name__}: settings differ, source vs model: {', '.join(differ)}"
        )
    report = TransferReport(
        copied=wanted,
        initialised=[k for k in target if _is_gate(k)],
        skipped=[k for k in state if k not in target or _is_gate(k)],
    )
    return {k: state[k] for k in wanted}, report


def _is_gate(key: str) -> bool:
    return key.split(".", 1)[0] in GATE_MODULES


def _shape(t: Tensor) -> str:
    return f"shape {list(t.shape)}"


def _attention_unet(model: Any) -> AttentionUNet:
    if not isinstance(model, AttentionUNet):
        raise TypeError(f"model must be an AttentionUNet, got {type(model).__name__}")
    return model


def _check_passthrough(model: AttentionUNet) -> None:
    for level, block in _attention_unet(model).gates.items():
        for gate in block.gates:
            if gate.sigma2 != "sigmoid":
                raise ValueError(
                    f"pass-through needs sigma2='sigmoid', got {gate.sigma2!r} at level {level} "
                    "(a spatial softmax cannot be 1 everywhere); use passthrough=False"
                )
        if model.norm not in ("batch", "none"):
            raise ValueError(
                f"pass-through needs norm 'batch' or 'none' in the gates, got {model.norm!r}: "
                "instance or group normalisation of the skip is not the identity; use passthrough=False"
            )


def init_passthrough(model: AttentionUNet, psi_bias: float = 12.0) -> AttentionUNet:
    r"""Set every gate to pass its skip through, so that ``model`` computes the U-Net it came from.

    Per gate: ``psi``'s weight 0 and bias ``psi_bias``, so :math:`\alpha = \sigma(b_\psi)`
    everywhere (at 12, :math:`1 - 6.1 \cdot 10^{-6}`); ``W``'s conv the identity and its
    batch norm the identity in eval mode (weight 1, bias 0, running mean 0, running variance
    ``1 - eps``). Per level, ``combine`` averages the heads (conv weight ``[I/heads, ...]``, bias 0,
    norm the identity); its ReLU leaves the skip (a ReLU output) unchanged. ``theta``, ``phi``
    and the gating signal keep their values. Returns ``model``.

    Exactness: in eval mode the model then computes the U-Net up to the factor :math:`\alpha`
    on each gated skip. Measured on random U-Nets (2D and 3D, float32 and float64, random
    batch-norm statistics, and the paper's 3D model) the logits differ from the U-Net's by at
    most ``9e-6`` times their largest magnitude at ``psi_bias=12`` (the tests allow ``2e-5``);
    at ``psi_bias=40`` (:math:`\alpha` rounds to 1) they came out identical. In training mode
    ``W``'s and ``combine``'s batch norms normalise with the batch's statistics, so the
    identity does not hold there.

    Training from here: ``psi``'s zero weight passes no gradient to ``theta`` and ``phi`` until
    it moves, and :math:`\partial\alpha/\partial b_\psi = \alpha(1-\alpha)` is ``6e-6`` at 12, so
    the attention maps leave 1 slowly under plain SGD. Adam, whose steps do not scale with the
    gradient while it exceeds Adam's ``eps``, moves ``psi``'s weight at its usual pace (measured
    gradients: ~1e-6 on ``psi``'s weight, ~1e-14 on its bias). A smaller ``psi_bias``
    (3: :math:`\alpha = 0.95`) trades exactness for larger gradients.

    Raises:
        ValueError: gates with ``sigma2="softmax"`` or with instance or group norm, which cannot
            pass through.
    """
    _check_passthrough(model)
    with torch.no_grad():
        for block in model.gates.values():
            for gate in block.gates:
                gate.psi.weight.zero_()
                gate.psi.bias.fill_(psi_bias)
                if gate.W is not None:
                    conv = gate.W[0]
                    conv.weight.view(conv.out_channels, conv.in_channels)[:] = torch.eye(conv.out_channels)
                    conv.bias.zero_()
                    _identity_norm(gate.W[1])
            conv = block.combine[0]
            c = conv.out_channels
            conv.weight.view(c, block.heads, c)[:] = torch.eye(c).unsqueeze(1) / block.heads
            conv.bias.zero_()
            _identity_norm(block.combine[1])
    return model


def _identity_norm(norm: nn.Module) -> None:
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)  # (x - 0) / sqrt(1 - eps + eps) = x
        norm.num_batches_tracked.zero_()
