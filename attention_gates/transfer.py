"""Starting an Attention U-Net from a trained U-Net, and the checkpoint format that describes a network.

:func:`attention_unet_from_unet` (:meth:`AttentionUNet.from_unet
<attention_gates.nets.AttentionUNet.from_unet>`) starts an Attention U-Net from a trained U-Net:
it copies everything the two networks of the same settings share (``encoders``, ``decoders``,
``head``) and, by default, sets the gates to pass their skips through unchanged
(:func:`init_passthrough`), so that the new network starts out computing the U-Net
(:mod:`attention_gates.finetune` then trains the gates alone). It returns the model and a
:class:`TransferReport` of what was copied.

:func:`match_state` is the one comparison of a source state dict with a target's, gate entries
set aside (the nnU-Net integration's :meth:`~attention_gates.integrations.nnunet.network.AttentionPlainConvUNet.from_plain`
uses it too), and :func:`init_gate_passthrough` the one pass-through setting of a gate.

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
unknown ones are an error); :func:`checkpoint_config` writes it for a network and
:func:`network_from_config` builds the network it describes.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .gates import GridAttentionGate
from .layers import group_count
from .nets import GATE_MODULES, AttentionUNet, UNet, require_attention_unet, resolve_filters

__all__ = [
    "TransferReport",
    "attention_unet_from_unet",
    "init_passthrough",
    "init_gate_passthrough",
    "checkpoint_config",
    "network_from_config",
    "StateMatch",
    "match_state",
]

Source = Union[UNet, Mapping[str, Any], str, os.PathLike]

# the settings a U-Net's weights depend on: these must agree between the source and the model
_BACKBONE_KEYS = ("spatial_dims", "in_channels", "out_channels", "filters", "norm", "num_groups", "deep_supervision", "align_corners")
# the state-dict keys of an AttentionUNet's gates and gating signal
_GATE_PREFIXES = tuple(f"{name}." for name in GATE_MODULES)
# wrappers whose prefix a saved state dict may carry: DistributedDataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _constructor_keys(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


_CONFIG_KEYS = _constructor_keys(UNet) | _constructor_keys(AttentionUNet)


# --- state matching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateMatch:
    """How a source state dict fits a target's, the gate entries of both set aside (:func:`match_state`).

    Attributes:
        matched: the target's entries that the source has in the same shape (target order).
        missing: the target's entries absent from the source.
        misshaped: the entries of both whose shapes differ.
        unexpected: the source's entries absent from the target (source order).
        source_gates: the source's gate entries (set aside).
        target_gates: the target's gate entries (not taken from the source).
        problems: one message per missing, misshaped and unexpected entry, naming it and its
            shapes: the target's entries in its order, then the source's unexpected ones.
    """

    matched: list[str]
    missing: list[str]
    misshaped: list[str]
    unexpected: list[str]
    source_gates: list[str]
    target_gates: list[str]
    problems: list[str]

    def summary(self, first: Sequence[str] = ()) -> str:
        """The first problem and how many more there are (``""`` when none); ``first``: the
        caller's own problems, put before :attr:`problems`."""
        problems = [*first, *self.problems]
        if not problems:
            return ""
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return problems[0] + more


def match_state(source: Mapping[str, Tensor], target: Mapping[str, Tensor], gate_prefixes: Sequence[str]) -> StateMatch:
    """Compare a source state dict with a target's, entry by entry, gate entries set aside.

    Args:
        source: the state dict to load (e.g. a trained network's).
        target: the state dict of the model to load it into.
        gate_prefixes: the key prefixes of gate entries (``("gates.", "gating.")`` for an
            :class:`~attention_gates.nets.AttentionUNet`), which neither side needs to match.

    Returns:
        A :class:`StateMatch`; the source loads into the target (``load_state_dict(...,
        strict=False)``) when its ``problems`` are empty.

    Example:
        >>> m = match_state({"conv.weight": torch.zeros(2, 3), "gates.psi": torch.zeros(1)},
        ...                 {"conv.weight": torch.zeros(4, 3), "head.bias": torch.zeros(2)}, ["gates."])
        >>> m.problems
        ["'conv.weight' is shape [2, 3] in the source but [4, 3] in the model", "'head.bias' is absent from the source but shape [2] in the model"]
        >>> m.source_gates
        ['gates.psi']
    """
    prefixes = tuple(gate_prefixes)
    matched, missing, misshaped, problems = [], [], [], []
    for key, want in target.items():
        if key.startswith(prefixes):
            continue
        have = source.get(key)
        if have is None:
            missing.append(key)
            problems.append(f"{key!r} is absent from the source but shape {list(want.shape)} in the model")
        elif have.shape != want.shape:
            misshaped.append(key)
            problems.append(f"{key!r} is shape {list(have.shape)} in the source but {list(want.shape)} in the model")
        else:
            matched.append(key)
    unexpected = [k for k in source if k not in target and not k.startswith(prefixes)]
    problems += [f"{k!r} is shape {list(source[k].shape)} in the source but absent from the model" for k in unexpected]
    return StateMatch(
        matched=matched, missing=missing, misshaped=misshaped, unexpected=unexpected,
        source_gates=[k for k in source if k.startswith(prefixes)],
        target_gates=[k for k in target if k.startswith(prefixes)],
        problems=problems,
    )  # fmt: skip


# --- transfer --------------------------------------------------------------------------------


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
) -> tuple[AttentionUNet, TransferReport]:
    """An Attention U-Net holding a trained U-Net's weights, its gates new, and what was copied.

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
        ``(model, report)``: the model, on the device and in the floating dtype of the source's
        weights (a given ``model`` stays where it is), and a :class:`TransferReport`.

    Raises:
        ValueError: the source and the model differ in settings the copied weights depend on
            (spatial dims, in/out channels, filters, norm, num_groups, deep-supervision mode,
            align_corners): the message names the first differing entry with both shapes, and
            the differing settings where the source's are known. Also for ``passthrough=True``
            with gates that cannot pass through (see :func:`init_passthrough`).
        TypeError: ``source``, ``model`` or ``model_class`` of the wrong kind.

    Example:
        >>> from attention_gates import AttentionUNet3D, UNet3D
        >>> unet = UNet3D(filters=[4, 8, 16])
        >>> net, report = AttentionUNet3D.from_unet(unet)
        >>> len(report.copied) == len(unet.state_dict()), report.skipped
        (True, [])
    """
    if not (isinstance(model_class, type) and issubclass(model_class, AttentionUNet)):
        raise TypeError(f"model_class must be AttentionUNet or a subclass, got {model_class!r}")
    if model is not None:
        require_attention_unet(model)
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
    return model, report


def checkpoint_config(net: UNet) -> dict[str, Any]:
    """The ``"config"`` entry of a checkpoint of ``net``: its constructor arguments and ``"arch"``.

    Save ``{"model": net.state_dict(), "config": checkpoint_config(net)}``; then
    ``AttentionUNet3D.from_unet(path)`` rebuilds the settings from it, and
    :func:`network_from_config` the network. Holds only ints, strings, bools and lists, so that
    ``torch.load(path, weights_only=True)`` reads it; ``num_groups`` only for ``norm="group"``,
    and not the gates' ``backend`` (a choice of the machine that runs the network).

    Example:
        >>> checkpoint_config(UNet(2, filters=[4, 8]))
        {'arch': 'UNet', 'spatial_dims': 2, 'in_channels': 1, 'out_channels': 2, 'filters': [4, 8], 'norm': 'batch', 'deep_supervision': 'fused', 'align_corners': False}
    """
    if not isinstance(net, UNet):
        raise TypeError(f"net must be a UNet or AttentionUNet, got {type(net).__name__}")
    config: dict[str, Any] = {"arch": "AttentionUNet" if isinstance(net, AttentionUNet) else "UNet"}
    config.update(_backbone_config(net))
    if isinstance(net, AttentionUNet):
        config.update(
            attention_levels=list(net.attention_levels), heads=net.heads, subsample_factor=list(net.subsample_factor),
            sigma1=net.sigma1, sigma2=net.sigma2, gate_output_transform=net.gate_output_transform,
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
    config["filters"] = list(resolve_filters(config.get("filters"), config.pop("feature_scale", None)))
    return config


def _backbone_config(net: UNet) -> dict[str, Any]:
    """The constructor arguments of ``net`` its U-Net weights depend on (``num_groups`` only for group norm)."""
    arguments = net.arguments()
    config = {k: arguments[k] for k in _BACKBONE_KEYS}
    if net.norm != "group":
        del config["num_groups"]
    return config


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone settings of a constructor config, defaults filled in (``num_groups`` only for group norm)."""
    defaults = {k: p.default for k, p in inspect.signature(UNet.__init__).parameters.items() if p.default is not p.empty}
    s = {k: config[k] if k in config else defaults[k] for k in _BACKBONE_KEYS if k in config or k in defaults}
    s["filters"] = list(resolve_filters(s.get("filters"), None))
    if s.get("norm") != "group":
        s.pop("num_groups", None)
    return s


def _differences(source_config: Mapping[str, Any], model: UNet) -> list[str]:
    """``"name source vs model"`` for each backbone setting in which the two networks differ
    (``num_groups`` by the groups each level gets)."""
    want, have = _settings(source_config), _settings(_backbone_config(model))

    def effective(s: dict[str, Any], key: str) -> Any:
        return [group_count(s[key], c) for c in s["filters"]] if key == "num_groups" else s[key]

    return [f"{k} {want[k]!r} vs {have[k]!r}" for k in have if k in want and effective(want, k) != effective(have, k)]


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


def _match(
    model: AttentionUNet, state: dict[str, Tensor], source_config: Optional[dict[str, Any]]
) -> tuple[dict[str, Tensor], TransferReport]:
    """The source entries to load into ``model`` and the report; raises on any mismatch."""
    match = match_state(state, model.state_dict(), _GATE_PREFIXES)
    differ = _differences(source_config, model) if source_config is not None else []
    if match.problems:
        why = (
            f"; settings that differ, source vs model: {', '.join(differ)}"
            if differ
            else "; the source was built with other settings (spatial dims, in/out channels, filters, norm, deep_supervision?)"
        )
        raise ValueError(f"cannot copy the U-Net into {type(model).__name__}: {match.summary()}{why}")
    if differ:
        raise ValueError(
            f"cannot copy the U-Net into {type(model).__name__}: settings differ, source vs model: {', '.join(differ)}"
        )
    report = TransferReport(copied=match.matched, initialised=match.target_gates, skipped=match.source_gates)
    return {k: state[k] for k in match.matched}, report


# --- pass-through ------------------------------------------------------------------------------


def init_gate_passthrough(gate: GridAttentionGate, psi_bias: float = 12.0) -> GridAttentionGate:
    r"""Set ``gate``'s attention to the constant :math:`\alpha = \sigma(b_\psi)`: ``psi``'s weight 0, its bias ``psi_bias``.

    The gate then returns :math:`\alpha x` before its output transform (at 12,
    :math:`\alpha = 1 - 6.1 \cdot 10^{-6}`; at 40 it rounds to 1 in float32); ``theta`` and
    ``phi`` keep their values. The part of pass-through that every network's gates share:
    :func:`init_passthrough` (an :class:`~attention_gates.nets.AttentionUNet`) and
    :meth:`AttentionPlainConvUNet.init_passthrough
    <attention_gates.integrations.nnunet.network.AttentionPlainConvUNet.init_passthrough>` (nnU-Net's
    network) call it on each of theirs. Returns ``gate``.

    Raises:
        TypeError: ``gate`` is not a :class:`~attention_gates.gates.GridAttentionGate`.
    """
    if not isinstance(gate, GridAttentionGate):
        raise TypeError(f"gate must be a GridAttentionGate, got {type(gate).__name__}")
    with torch.no_grad():
        gate.psi.weight.zero_()
        gate.psi.bias.fill_(psi_bias)
    return gate


def _check_passthrough(model: AttentionUNet) -> None:
    for level, block in require_attention_unet(model).gates.items():
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
    r"""Set every gate of an :class:`~attention_gates.nets.AttentionUNet` to pass its skip through,
    so that ``model`` computes the U-Net it came from.

    Per gate: :func:`init_gate_passthrough` (``psi``'s weight 0 and bias ``psi_bias``, so
    :math:`\alpha = \sigma(b_\psi)` everywhere: at 12, :math:`1 - 6.1 \cdot 10^{-6}`); ``W``'s
    conv the identity and its batch norm the identity in eval mode (weight 1, bias 0, running
    mean 0, running variance ``1 - eps``). Per level, ``combine`` averages the heads (conv weight
    ``[I/heads, ...]``, bias 0, norm the identity); its ReLU leaves the skip (a ReLU output)
    unchanged. ``theta``, ``phi`` and the gating signal keep their values. Returns ``model``.

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
        TypeError: ``model`` is not an :class:`~attention_gates.nets.AttentionUNet`.
    """
    _check_passthrough(model)
    with torch.no_grad():
        for block in model.gates.values():
            for gate in block.gates:
                init_gate_passthrough(gate, psi_bias)
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
