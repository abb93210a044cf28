"""nnU-Net's default network, ``PlainConvUNet``, with the paper's attention gates on its skips.

:class:`AttentionPlainConvUNet` takes the constructor of
``dynamic_network_architectures.architectures.unet.PlainConvUNet`` (the arguments a plans file's
``architecture.arch_kwargs`` holds) plus the gates' options, so that a plans file names it with
the same ``arch_kwargs``. Its decoder, :class:`AttentionUNetDecoder`, gates each chosen skip the
paper's way before concatenating it with the upsampled coarser feature:

- the gating signal ``g`` is the coarser decoder feature *before* its transposed convolution
  (the bottleneck for the deepest skip);
- theta's kernel and stride are the stride between the skip's stage and the next one, per axis,
  so that theta maps the skip onto ``g``'s grid (nnU-Net's anisotropic strides such as
  ``[1, 2, 2]`` give a ``1x2x2`` theta);
- the attention map ``alpha`` is resampled (trilinear/bilinear) onto the skip and multiplies it.

Everything else is ``PlainConvUNet``'s: the state dict holds every key of a ``PlainConvUNet`` of
the same arguments (same shapes) plus ``decoder.gates.<stage>.*``, so a trained plain network
loads into it (:meth:`AttentionPlainConvUNet.from_plain`), and with
:meth:`AttentionPlainConvUNet.init_passthrough` it computes the plain network's logits.

What the plans variants (:mod:`~attention_gates.integrations.nnunet.plans`) and the trainer need
to read a plans file the way this network takes it is public here: :func:`plans_architecture`,
:func:`resolve_arch_kwargs`, :func:`is_gateable` and :func:`check_gate_options`.
"""

from __future__ import annotations

import os
import pydoc
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import Tensor, nn

from ...gates import GridAttentionGate, MultiAttentionGate
from ...layers import NORMS
from ...transfer import init_gate_passthrough, match_state

__all__ = [
    "AttentionPlainConvUNet",
    "AttentionUNetDecoder",
    "CLASS_NAME",
    "PLAIN_CLASS_NAME",
    "GATE_DEFAULTS",
    "check_gate_options",
    "is_gateable",
    "plans_architecture",
    "resolve_arch_kwargs",
]

#: The name a plans file gives the network (``architecture.network_class_name``).
CLASS_NAME = "attention_gates.integrations.nnunet.AttentionPlainConvUNet"
#: nnU-Net's default network, as its plans files name it.
PLAIN_CLASS_NAME = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
#: The gates' options and their defaults (see :class:`AttentionPlainConvUNet`).
GATE_DEFAULTS: dict[str, Any] = {
    "gated_skips": None,
    "gate_heads": 1,
    "gate_norm": "instance",
    "gate_output_transform": False,
}
# plans' arch_kwargs that name classes (nnU-Net's "_kw_requires_import")
_CLASS_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin")
_GATES = "decoder.gates."
# the state-dict entries whose shapes give a PlainConvUNet's input channels and classes
_IN_PROJ, _HEAD = "encoder.stages.0.0.convs.0.conv.weight", "decoder.seg_layers.0.weight"

Source = Union[nn.Module, Mapping[str, Any], str, os.PathLike]


class AttentionUNetDecoder(UNetDecoder):
    """``UNetDecoder`` whose skips pass through attention gates before the concatenation.

    Takes ``UNetDecoder``'s first five arguments and the gates' options of
    :class:`AttentionPlainConvUNet` (without their ``gate_`` prefix). ``gates`` maps the encoder
    stage of each gated skip (``"1"``, ``"2"``, ...; 0 is full resolution) to a
    :class:`~attention_gates.gates.GridAttentionGate` (``heads=1``) or a
    :class:`~attention_gates.gates.MultiAttentionGate`.

    Shapes:
        ``forward(skips)`` takes the encoder's outputs, full resolution first, and returns the
        logits: ``Tensor[N, num_classes, *S]`` (``S``: the encoder input's spatial size), or
        with ``deep_supervision`` a list of ``n_stages - 1`` of them, the full resolution first
        and each next one on the next stage's grid. ``forward(skips, return_attention=True)``
        returns ``(logits, attention)``, ``attention`` a tuple with one
        ``Tensor[N, heads, *S_i]`` per gated skip ``i`` (ascending), on that skip's grid.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        n_conv_per_stage: Union[int, Sequence[int]],
        deep_supervision: bool,
        nonlin_first: bool = False,
        *,
        gated_skips: Optional[Sequence[int]] = None,
        heads: int = 1,
        norm: str = "instance",
        output_transform: bool = False,
    ) -> None:
        super().__init__(encoder, num_classes, n_conv_per_stage, deep_supervision, nonlin_first=nonlin_first)
        n_skips = len(encoder.output_channels) - 1
        self.gated_skips = _check_gated_skips(gated_skips, n_skips)
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            raise ValueError(f"gate_heads must be a positive int, got {heads!r}")
        if norm not in NORMS:
            raise ValueError(f"gate_norm must be one of {NORMS}, got {norm!r}")
        if not isinstance(output_transform, bool):
            raise ValueError(f"gate_output_transform must be a bool, got {output_transform!r}")
        self.heads, self.norm, self.output_transform = heads, norm, output_transform
        dims = convert_conv_op_to_dim(encoder.conv_op)
        self.gates = nn.ModuleDict()
        for i in self.gated_skips:
            channels, gating_channels = encoder.output_channels[i], encoder.output_channels[i + 1]
            factor = tuple(int(s) for s in encoder.strides[i + 1])  # from skip i's grid to g's
            options = dict(inter_channels=channels, subsample_factor=factor, norm=norm, output_transform=output_transform)
            if heads == 1:
                self.gates[str(i)] = GridAttentionGate(dims, channels, gating_channels, **options)
            else:
                self.gates[str(i)] = MultiAttentionGate(dims, channels, gating_channels, heads=heads, **options)

    def forward(self, skips: Sequence[Tensor], return_attention: bool = False):
        lres_input = skips[-1]
        seg_outputs, attention = [], []
        n = len(self.stages)
        for s in range(n):
            i = n - 1 - s  # the skip this stage merges: skips[-(s + 2)]
            skip = skips[i]
            if str(i) in self.gates:
                skip, alpha = self.gates[str(i)](skip, lres_input)  # gated by the feature before upsampling
                attention.append(alpha)
            x = torch.cat((self.transpconvs[s](lres_input), skip), 1)
            x = self.stages[s](x)
            if self.deep_supervision:
                seg_outputs.append(self.seg_layers[s](x))
            elif s == n - 1:
                seg_outputs.append(self.seg_layers[-1](x))
            lres_input = x
        seg_outputs = seg_outputs[::-1]  # full resolution first
        out = seg_outputs if self.deep_supervision else seg_outputs[0]
        return (out, tuple(attention[::-1])) if return_attention else out

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """``UNetDecoder``'s count (elements of the feature maps, for nnU-Net's memory estimate)
        plus the gates': per head theta, phi and psi on the coarse grid, alpha and ``alpha * x``
        (and ``W``'s output) on the skip's grid; ``combine``'s output for several heads."""
        output = super().compute_conv_feature_map_size(input_size)
        sizes, size = [], list(input_size)
        for stride in self.encoder.strides:
            size = [a // b for a, b in zip(size, stride)]
            sizes.append(size)
        for key, gate in self.gates.items():
            i = int(key)
            fine, coarse = np.prod(sizes[i], dtype=np.int64), np.prod(sizes[i + 1], dtype=np.int64)
            channels = self.encoder.output_channels[i]
            head = gate.gates[0] if isinstance(gate, MultiAttentionGate) else gate
            per_head = (2 * head.inter_channels + 1) * coarse + (1 + channels) * fine
            if head.W is not None:
                per_head += channels * fine
            output += self.heads * per_head + (channels * fine if self.heads > 1 else 0)
        return output


def _check_gated_skips(gated_skips: Optional[Sequence[int]], n_skips: int) -> tuple[int, ...]:
    """The gated skips, sorted; by default every skip but the full-resolution one."""
    if gated_skips is None:
        if n_skips < 2:
            raise ValueError(
                f"a network of {n_skips + 1} stages has only the full-resolution skip, which is not gated by "
                "default: pass gated_skips=[0] to gate it"
            )
        return tuple(range(1, n_skips))
    skips = tuple(gated_skips)
    ok = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_skips for i in skips)
    if not ok or len(set(skips)) != len(skips):
        raise ValueError(
            f"gated_skips must be distinct encoder stages in 0..{n_skips - 1} (0 = full resolution; the "
            f"bottleneck, stage {n_skips}, has no skip), got {list(skips)!r}"
        )
    return tuple(sorted(skips))


class AttentionPlainConvUNet(PlainConvUNet):
    """``PlainConvUNet`` (nnU-Net's default network) with attention gates on its skips.

    The first eighteen arguments are ``PlainConvUNet``'s, as nnU-Net passes them from a plans
    file (``input_channels``, ``n_stages``, ``features_per_stage``, ``conv_op``, ``kernel_sizes``,
    ``strides``, ``n_conv_per_stage``, ``num_classes``, ``n_conv_per_stage_decoder``,
    ``conv_bias``, ``norm_op``, ``norm_op_kwargs``, ``dropout_op``, ``dropout_op_kwargs``,
    ``nonlin``, ``nonlin_kwargs``, ``deep_supervision``, ``nonlin_first``); the gates' options
    are keyword-only (in a plans file, more ``arch_kwargs``):

    Args:
        gated_skips: the encoder stages whose skips are gated (0 = full resolution, up to
            ``n_stages - 2``); default all but the full-resolution one, as in the paper's model.
        gate_heads: gates per skip; 1 is the paper's single-attention gate, more are fused by
            :class:`~attention_gates.gates.MultiAttentionGate`'s 1x1 conv + norm + ReLU.
        gate_norm: the gates' normalisation (``W`` and ``combine``): ``"instance"`` (as nnU-Net's
            own layers), ``"batch"``, ``"group"`` or ``"none"``; unused by the default gate.
        gate_output_transform: keep the gate's ``W`` (1x1 conv + norm of ``alpha * x``); the
            default ``False`` passes ``alpha * x`` straight to the decoder's convolutions.

    What nnU-Net relies on holds: ``forward`` returns logits only (a list of ``n_stages - 1``
    tensors, full resolution first, with deep supervision); ``decoder.deep_supervision`` can be
    changed after construction and the parameters do not depend on it;
    ``compute_conv_feature_map_size`` counts the gates; ``initialize`` (``PlainConvUNet``'s He
    initialisation) covers the gates' convolutions; the network compiles with
    :func:`torch.compile`.

    Shapes:
        ``forward(x: Tensor[N, input_channels, *S])`` returns ``Tensor[N, num_classes, *S]`` or
        the deep-supervision list; ``forward(x, return_attention=True)`` returns
        ``(logits, attention)`` (see :class:`AttentionUNetDecoder`). ``S`` must be divisible by
        the product of the strides, as nnU-Net's patch sizes are.

    Example:
        >>> net = AttentionPlainConvUNet(
        ...     input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d,
        ...     kernel_sizes=3, strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], n_conv_per_stage=2,
        ...     num_classes=2, n_conv_per_stage_decoder=2, norm_op=nn.InstanceNorm3d,
        ...     nonlin=nn.LeakyReLU, deep_supervision=True)
        >>> [o.shape[2:] for o in net(torch.randn(1, 1, 8, 16, 16))]
        [torch.Size([8, 16, 16]), torch.Size([8, 8, 8])]
        >>> net.decoder.gates["1"].subsample_factor
        (2, 2, 2)
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: Union[int, Sequence[int]],
        conv_op: type[nn.Module],
        kernel_sizes: Union[int, Sequence[int], Sequence[Sequence[int]]],
        strides: Union[int, Sequence[int], Sequence[Sequence[int]]],
        n_conv_per_stage: Union[int, Sequence[int]],
        num_classes: int,
        n_conv_per_stage_decoder: Union[int, Sequence[int]],
        conv_bias: bool = False,
        norm_op: Optional[type[nn.Module]] = None,
        norm_op_kwargs: Optional[dict] = None,
        dropout_op: Optional[type[nn.Module]] = None,
        dropout_op_kwargs: Optional[dict] = None,
        nonlin: Optional[type[nn.Module]] = None,
        nonlin_kwargs: Optional[dict] = None,
        deep_supervision: bool = False,
        nonlin_first: bool = False,
        *,
        gated_skips: Optional[Sequence[int]] = None,
        gate_heads: int = 1,
        gate_norm: str = "instance",
        gate_output_transform: bool = False,
    ) -> None:
        super().__init__(
            input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
            num_classes, n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs, dropout_op,
            dropout_op_kwargs, nonlin, nonlin_kwargs, deep_supervision, nonlin_first,
        )  # fmt: skip
        # PlainConvUNet builds its UNetDecoder inside its constructor; this one replaces it (same
        # submodules and keys, plus the gates)
        self.decoder = AttentionUNetDecoder(
            self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision, nonlin_first=nonlin_first,
            gated_skips=gated_skips, heads=gate_heads, norm=gate_norm, output_transform=gate_output_transform,
        )  # fmt: skip

    def forward(self, x: Tensor, return_attention: bool = False):
        return self.decoder(self.encoder(x), return_attention)

    @property
    def gate_options(self) -> dict[str, Any]:
        """The gates' constructor options (as a plans file's ``arch_kwargs`` holds them)."""
        d = self.decoder
        return {"gated_skips": list(d.gated_skips), "gate_heads": d.heads, "gate_norm": d.norm, "gate_output_transform": d.output_transform}

    @classmethod
    def from_plain(
        cls,
        source: Source,
        arch_kwargs: Optional[Mapping[str, Any]] = None,
        *,
        configuration: Optional[str] = None,
        deep_supervision: Optional[bool] = None,
        passthrough: bool = True,
        psi_bias: float = 12.0,
        **gate_options: Any,
    ) -> "AttentionPlainConvUNet":
        """This network holding a trained ``PlainConvUNet``'s weights, its gates new.

        Args:
            source: the trained ``PlainConvUNet`` (or its ``torch.compile`` wrapper), its
                ``state_dict()``, or an nnU-Net checkpoint (``checkpoint_final.pth``: the path
                or the loaded dict, whose ``network_weights`` are loaded). Checkpoint files are
                read with ``torch.load(weights_only=False)``, as nnU-Net reads them: load only
                files you trust.
            arch_kwargs: ``PlainConvUNet``'s constructor arguments without ``input_channels``
                and ``num_classes`` (which the weights' shapes give): a plans file's
                ``arch_kwargs``, with class names as strings or as classes. Default: the plans
                stored in the checkpoint (``init_args``), at its configuration.
            configuration: the plans configuration to read ``arch_kwargs`` from (default: the
                checkpoint's own).
            deep_supervision: the network's flag (default: that of ``arch_kwargs``, else off, as
                ``PlainConvUNet``'s constructor; nnU-Net's plans do not hold it).
            passthrough: set the gates to pass their skips through (:meth:`init_passthrough`),
                so that the network computes the plain one's logits.
            psi_bias: for :meth:`init_passthrough`.
            **gate_options: ``gated_skips``, ``gate_heads``, ``gate_norm``, ``gate_output_transform``.

        Returns:
            The network, on the device and in the floating dtype of the source's weights.

        Raises:
            ValueError: the weights do not fit ``arch_kwargs`` (the message names the first
                differing entries and their shapes); the checkpoint's plans name another network;
                no ``arch_kwargs`` and no plans in the source; pass-through with gates that
                cannot pass through (see :meth:`init_passthrough`).
            TypeError: a source of another kind.
        """
        state, arch_kwargs = _read_plain_source(source, arch_kwargs, configuration)
        check_gate_options(gate_options)
        for key in (_IN_PROJ, _HEAD):
            if key not in state:
                raise ValueError(f"the source has no {key!r}: it is not the state of a PlainConvUNet")
        if deep_supervision is not None:
            arch_kwargs["deep_supervision"] = deep_supervision
        net = cls(input_channels=state[_IN_PROJ].shape[1], num_classes=state[_HEAD].shape[0], **arch_kwargs, **gate_options)
        _load_plain_state(net, state)
        floating = next((t for t in state.values() if t.is_floating_point()), None)
        if floating is not None:
            net.to(device=floating.device, dtype=floating.dtype)
        if passthrough:
            net.init_passthrough(psi_bias)
        return net

    def init_passthrough(self, psi_bias: float = 12.0) -> "AttentionPlainConvUNet":
        r"""Set every gate to pass its skip through: ``psi``'s weight 0, its bias ``psi_bias``
        (:func:`~attention_gates.transfer.init_gate_passthrough` on each).

        Then :math:`\alpha = \sigma(b_\psi)` everywhere (at 12, :math:`1 - 6.1 \cdot 10^{-6}`) and
        each gate returns :math:`\alpha x`, so the network computes the ``PlainConvUNet`` it holds
        the weights of, in training and in evaluation mode alike, up to the factor :math:`\alpha`
        on the gated skips: the tests compare the logits at a relative ``2e-5``; at
        ``psi_bias=40`` :math:`\alpha` rounds to 1 in float32 and the logits are the plain ones.
        ``theta`` and ``phi`` keep their values. Returns the network.

        Training from here: ``psi``'s zero weight passes no gradient to ``theta`` and ``phi`` until
        it moves, and :math:`\partial\alpha/\partial b_\psi = \alpha(1 - \alpha)` is ``6e-6`` at 12,
        so under nnU-Net's SGD the gates leave 1 slowly; a smaller ``psi_bias`` (4:
        :math:`\alpha = 0.982`, gradient ``0.018``) trades exactness for that.

        Raises:
            ValueError: gates that do not return :math:`\alpha x` (``gate_heads > 1``, whose heads are
                fused by a conv, a norm and a ReLU; ``gate_output_transform=True``, whose ``W``
                normalises the skip): they cannot pass it through unchanged.
        """
        d = self.decoder
        if d.heads != 1 or d.output_transform:
            raise ValueError(
                "pass-through needs gates that return alpha * x (gate_heads=1, gate_output_transform=False); got "
                f"gate_heads={d.heads}, gate_output_transform={d.output_transform}: several heads are fused by a "
                "conv + norm + ReLU and W normalises the skip, neither is the identity; use passthrough=False"
            )
        for gate in d.gates.values():
            init_gate_passthrough(gate, psi_bias)
        return self


def check_gate_options(gate_options: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` for gate options that are not among :data:`GATE_DEFAULTS` (the options'
    values are checked where the network is built)."""
    unknown = sorted(set(gate_options) - set(GATE_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown gate options {unknown}; expected some of {sorted(GATE_DEFAULTS)}")


def is_gateable(class_name: str) -> bool:
    """Whether a plans' ``network_class_name`` is ``PlainConvUNet`` or this network: the ones whose
    ``arch_kwargs`` :class:`AttentionPlainConvUNet` takes."""
    return pydoc.locate(class_name) in (PlainConvUNet, AttentionPlainConvUNet)


def resolve_arch_kwargs(arch_kwargs: Mapping[str, Any], requires_import: Sequence[str] = _CLASS_KWARGS) -> dict[str, Any]:
    """``arch_kwargs`` with the class names among ``requires_import`` (default: those of
    ``PlainConvUNet``'s arguments that name classes) imported, as nnU-Net does.

    Raises:
        ValueError: a name that does not import (named with its argument).
    """
    kwargs = dict(arch_kwargs)
    for key in requires_import:
        value = kwargs.get(key)
        if isinstance(value, str):
            located = pydoc.locate(value)
            if located is None:
                raise ValueError(f"arch_kwargs[{key!r}] = {value!r} does not name an importable class")
            kwargs[key] = located
    return kwargs


def _read_plain_source(
    source: Source, arch_kwargs: Optional[Mapping[str, Any]], configuration: Optional[str]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state dict, resolved arch_kwargs)`` of a plain network, its state dict or an nnU-Net checkpoint."""
    checkpoint = None
    if isinstance(source, nn.Module):
        source = getattr(source, "_orig_mod", source)  # torch.compile's wrapper
        if isinstance(source, AttentionPlainConvUNet) or not isinstance(source, PlainConvUNet):
            raise TypeError(f"source must be a PlainConvUNet, got {type(source).__name__}")
        state = source.state_dict()
    elif isinstance(source, (str, os.PathLike)):
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
        if not (isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("network_weights"), Mapping)):
            raise ValueError(f"{os.fspath(source)!r} is not an nnU-Net checkpoint: it has no 'network_weights' dict")
        state = checkpoint["network_weights"]
    elif isinstance(source, Mapping):
        if isinstance(source.get("network_weights"), Mapping):
            checkpoint, state = source, source["network_weights"]
        else:
            state = source
    else:
        raise TypeError(
            f"source must be a PlainConvUNet, a state dict, an nnU-Net checkpoint dict or its path, got {type(source).__name__}"
        )
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"the weights must map names to tensors; got non-tensor entries {bad[:5]}")
    if arch_kwargs is None:
        if checkpoint is None or "init_args" not in checkpoint:
            raise ValueError(
                "arch_kwargs are needed: the source holds no plans (an nnU-Net checkpoint's 'init_args' has them); "
                "pass the plans' arch_kwargs of the network"
            )
        name, arch_kwargs, requires_import = plans_architecture(
            checkpoint["init_args"]["plans"], configuration or checkpoint["init_args"]["configuration"]
        )
        if pydoc.locate(name) is not PlainConvUNet:
            raise ValueError(f"the checkpoint's plans name {name!r}, not {PLAIN_CLASS_NAME!r}: from_plain takes a PlainConvUNet")
        return dict(state), resolve_arch_kwargs(arch_kwargs, requires_import)
    return dict(state), resolve_arch_kwargs(arch_kwargs)


def plans_architecture(plans: Mapping[str, Any], configuration: str) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """``(network_class_name, arch_kwargs, _kw_requires_import)`` of a plans configuration,
    inheritance (``inherits_from``) resolved by nnU-Net's own ``PlansManager``.

    Args:
        plans: a plans file's dict (``nnUNetPlans.json``, loaded).
        configuration: one of its configurations (``"3d_fullres"``, ...).

    Raises:
        ValueError: the plans have no such configuration (their configurations listed).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if configuration not in plans.get("configurations", {}):
        raise ValueError(f"the plans have no configuration {configuration!r}; they have {sorted(plans.get('configurations', {}))}")
    config = PlansManager(dict(plans)).get_configuration(configuration)
    return config.network_arch_class_name, dict(config.network_arch_init_kwargs), tuple(config.network_arch_init_kwargs_req_import)


def _load_plain_state(net: AttentionPlainConvUNet, state: Mapping[str, Tensor]) -> None:
    """Load a plain network's ``state`` into ``net``'s non-gate entries; raise on any mismatch."""
    match = match_state(state, net.state_dict(), [_GATES])
    gates = [f"{key!r} is a gate's: the source is not a plain network" for key in match.source_gates]
    if gates or match.problems:
        raise ValueError(
            f"the weights do not fit {type(net).__name__} built from these arch_kwargs: {match.summary(gates)}; "
            "were they trained with other plans (stages, features, kernels, strides, convs per stage)?"
        )
    net.load_state_dict(state, strict=False)
