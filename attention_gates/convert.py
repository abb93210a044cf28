"""Loading checkpoints of the authors' implementation (Oktay et al., ``Attention-Gated-Networks``).

Three of the authors' 3D models map one to one onto ours:

=================================  ===============================================  =======
the authors' model                 ours                                             entries
=================================  ===============================================  =======
``unet_CT_multi_att_dsv_3D``       ``AttentionUNet3D(in_channels, n_classes)``      236
``unet_CT_single_att_dsv_3D``      ``AttentionUNet3D(in_channels, n_classes,        200
                                   heads=1)``
``unet_CT_dsv_3D``                 ``UNet3D(in_channels, n_classes)``               136
=================================  ===============================================  =======

(``feature_scale=4``, their default and ours; for another ``feature_scale`` build ours with the
same one.) Their key names become ours as follows (``k`` = 1..4, ``h`` = 1, 2)::

    conv1 .. conv4, center                ->  encoders.0 .. encoders.4
    gating                                ->  gating
    attentionblock{k}.gate_block_{h}      ->  gates.{k}.gates.{h-1}      (theta, phi, psi, W keep their names)
    attentionblock{k}.combine_gates       ->  gates.{k}.combine
    up_concat{k}.conv                     ->  decoders.{k-1}.conv
    dsv{k}.dsv.0 (k > 1), dsv1            ->  head.convs.{k-1}
    final                                 ->  head.fuse

Their code predates PyTorch 0.4, whose linear upsampling behaved as ``align_corners=True``
does now: build our model with ``align_corners=True`` to reproduce such a checkpoint's
outputs. Checkpoints saved before PyTorch 0.4.1 have no ``num_batches_tracked`` entries; they
load all the same (the counters start at zero).

Example:
    >>> import torch
    >>> from attention_gates.convert import convert_oktay_state_dict
    >>> sorted(convert_oktay_state_dict({"attentionblock3.gate_block_2.psi.bias": torch.zeros(1),
    ...                                  "dsv4.dsv.0.weight": torch.zeros(2, 128, 1, 1, 1)}))
    ['gates.3.gates.1.psi.bias', 'head.convs.3.weight']

    Loading a checkpoint of the multi-attention model (trained with PyTorch < 0.4). The authors'
    code saves ``network.state_dict()`` alone (``torch.save`` in their ``save_network``), named
    ``<epoch>_net_<label>.pth``; give its path, or the dict ``torch.load`` read from it::

        model = AttentionUNet3D(in_channels=1, out_channels=2, align_corners=True)
        load_oktay_state_dict(model, "300_net_S.pth")
"""

from __future__ import annotations

import os
import re
from typing import Mapping, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .nets import AttentionUNet, UNet

__all__ = ["load_oktay_state_dict", "convert_oktay_state_dict", "OktayCheckpointError", "IncompatibleKeys"]

_ENCODERS = ("conv1", "conv2", "conv3", "conv4", "center")


def _prefix_table() -> dict[str, str]:
    """Their module prefix -> ours; every key is renamed by its prefix alone."""
    table = {name: f"encoders.{i}" for i, name in enumerate(_ENCODERS)}
    table["gating"] = "gating"
    for k in (2, 3, 4):
        table[f"attentionblock{k}.combine_gates"] = f"gates.{k}.combine"
        for h in (1, 2):
            table[f"attentionblock{k}.gate_block_{h}"] = f"gates.{k}.gates.{h - 1}"
    for k in (1, 2, 3, 4):
        table[f"up_concat{k}.conv"] = f"decoders.{k - 1}.conv"
        table[f"dsv{k}.dsv.0" if k > 1 else "dsv1"] = f"head.convs.{k - 1}"
    table["final"] = "head.fuse"
    return table


_THEIRS_TO_OURS = _prefix_table()
_OURS_TO_THEIRS = {ours: theirs for theirs, ours in _THEIRS_TO_OURS.items()}
_VARIANTS = {2: "unet_CT_multi_att_dsv_3D", 1: "unet_CT_single_att_dsv_3D", 0: "unet_CT_dsv_3D"}
_OURS = {2: "AttentionUNet3D(heads=2)", 1: "AttentionUNet3D(heads=1)", 0: "UNet3D"}


class OktayCheckpointError(ValueError):
    """A state dict that does not fit the authors' layout or the model it is loaded into."""


class IncompatibleKeys(NamedTuple):
    """What ``strict=False`` skipped, in the authors' key names: keys the model has and the
    checkpoint lacks (``missing_keys``) and the reverse (``unexpected_keys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _rename(key: str, table: Mapping[str, str]) -> Optional[str]:
    """``key`` with its module prefix (up to 4 components, then a parameter name) renamed, or None."""
    parts = key.split(".")
    for n in range(1, min(len(parts), 5)):
        prefix = ".".join(parts[:n])
        if prefix in table:
            return table[prefix] + key[len(prefix) :]
    return None


def _split(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """(converted state dict, our key -> their key, their keys that fit no rule)."""
    converted, origin, unknown = {}, {}, []
    for key, value in state_dict.items():
        ours = _rename(key, _THEIRS_TO_OURS)
        if ours is None:
            unknown.append(key)
        else:
            converted[ours] = value
            origin[ours] = key
    return converted, origin, unknown


def _read_state_dict(state_dict: Union[Mapping[str, Tensor], str, os.PathLike]) -> Mapping[str, Tensor]:
    """The authors' state dict: ``state_dict`` itself, or the one in the file it names."""
    if isinstance(state_dict, (str, os.PathLike)):
        path = os.fspath(state_dict)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"the file {path!r} must hold the authors' state dict (a dict), got {type(state_dict).__name__}")
    elif not isinstance(state_dict, Mapping):
        raise TypeError(
            "state_dict must be the authors' state dict (a dict of tensors, e.g. from torch.load) or the path of "
            f"their checkpoint file, got {type(state_dict).__name__}"
        )
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"state_dict must map names to tensors; got non-tensor entries {bad[:5]}")
    return state_dict


def convert_oktay_state_dict(state_dict: Union[Mapping[str, Tensor], str, os.PathLike]) -> dict[str, Tensor]:
    """The authors' state dict (or that of their checkpoint file) under our key names (the same tensors, not copied).

    Raises:
        OktayCheckpointError: for keys outside the authors' modules (listed). Keys are renamed
            by their module prefix alone; :func:`load_oktay_state_dict` checks them against a model.
        TypeError: ``state_dict`` is neither a dict of tensors nor a path.
    """
    converted, _, unknown = _split(_read_state_dict(state_dict))
    if unknown:
        raise OktayCheckpointError(f"keys not of the authors' unet_CT_*_dsv_3D layout: {_some(unknown)}")
    return converted


def _some(keys: list[str], limit: int = 10) -> str:
    return f"{len(keys)}: {keys[:limit]}" + (" ..." if len(keys) > limit else "")


def _heads(state_dict: Mapping[str, Tensor]) -> int:
    """Attention heads per gated level in the authors' checkpoint: 2 (multi), 1 (single) or 0 (plain)."""
    blocks = [re.match(r"attentionblock[2-4]\.gate_block_([12])\.", k) for k in state_dict]
    return max((int(m[1]) for m in blocks if m), default=0)


def _check_model(model: nn.Module, heads: int) -> None:
    variant = f"the checkpoint is the authors' {_VARIANTS[heads]}, which loads into {_OURS[heads]}"
    if not isinstance(model, UNet):
        raise TypeError(f"model must be a UNet or AttentionUNet, got {type(model).__name__}")
    model_heads = model.heads if isinstance(model, AttentionUNet) else 0
    if model_heads != heads:
        raise OktayCheckpointError(
            f"{variant}, but the model is {type(model).__name__} with {model_heads} attention head(s) per gate"
        )
    wrong = []
    if model.spatial_dims != 3:
        wrong.append(f"spatial_dims={model.spatial_dims} (want 3)")
    if model.depth != 5:
        wrong.append(f"{model.depth} levels (want 5)")
    if model.norm != "batch":
        wrong.append(f"norm={model.norm!r} (want 'batch')")
    if model.deep_supervision != "fused":
        wrong.append(f"deep_supervision={model.deep_supervision!r} (want 'fused')")
    if heads and model.attention_levels != (2, 3, 4):
        wrong.append(f"attention_levels={model.attention_levels} (want (2, 3, 4))")
    if heads and any(gate.W is None for block in model.gates.values() for gate in block.gates):
        wrong.append("gate_output_transform=False (want True)")
    if wrong:
        raise OktayCheckpointError(f"{variant}; the model differs: {', '.join(wrong)}")


def load_oktay_state_dict(
    model: nn.Module, state_dict: Union[Mapping[str, Tensor], str, os.PathLike], *, strict: bool = True
) -> IncompatibleKeys:
    """Load a state dict of the authors' ``unet_CT_{multi_att,single_att,}_dsv_3D`` into ``model``.

    See the module docstring for which model takes which checkpoint; build ours with
    ``align_corners=True`` for checkpoints trained with PyTorch < 0.4.

    Args:
        model: :class:`~attention_gates.AttentionUNet3D` (``heads=2`` or ``heads=1``) or
            :class:`~attention_gates.UNet3D`, with the checkpoint's channels and filters.
        state_dict: the authors' ``network.state_dict()`` (e.g. from :func:`torch.load`), or the
            path of their checkpoint file (read with ``torch.load(weights_only=True)`` onto the CPU).
        strict: raise for missing and unexpected keys; with ``False`` they are skipped and
            returned. Shapes must match either way.

    Returns:
        :class:`IncompatibleKeys` (both lists empty when ``strict``).

    Raises:
        OktayCheckpointError: (a ``ValueError``) for a checkpoint of another variant than the
            model, a model that differs from the authors' layout, mis-shaped tensors (naming the
            key, the model's and the checkpoint's shape) and, when ``strict``, missing or
            unexpected keys (naming them).
        TypeError: ``model`` is not a :class:`~attention_gates.nets.UNet`; ``state_dict`` is neither
            a dict of tensors nor a path (or the file holds no dict).
    """
    state_dict = _read_state_dict(state_dict)
    converted, origin, unknown = _split(state_dict)
    if not converted:
        raise OktayCheckpointError(
            f"no key of the state dict is of the authors' unet_CT_*_dsv_3D layout (e.g. 'conv1.conv1.0.weight'), "
            f"got {list(state_dict)[:5]}"
        )
    _check_model(model, _heads(state_dict))
    own = model.state_dict()
    unexpected = unknown + [origin[k] for k in converted if k not in own]
    missing = [  # in their names; batch counters are optional (absent before PyTorch 0.4.1)
        _rename(k, _OURS_TO_THEIRS) or k
        for k in own
        if k not in converted and not k.endswith(".num_batches_tracked")
    ]
    if strict and (missing or unexpected):
        parts = [f"missing {_some(missing)}"] if missing else []
        parts += [f"unexpected {_some(unexpected)}"] if unexpected else []
        raise OktayCheckpointError("the checkpoint does not fit the model: " + "; ".join(parts))
    converted = {k: v for k, v in converted.items() if k in own}
    for key, value in converted.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise OktayCheckpointError(
                f"{origin[key]} (our {key}) has shape {list(value.shape)} in the checkpoint, but the model expects "
                f"{list(own[key].shape)}; {_describe(state_dict)}"
            )
    for key in own:  # checkpoints of PyTorch < 0.4.1 have no batch counters: start them at zero
        if key.endswith(".num_batches_tracked") and key not in converted:
            converted[key] = own[key].new_zeros(())
    model.load_state_dict(converted, strict=False)
    return IncompatibleKeys(missing, unexpected)


def _describe(state_dict: Mapping[str, Tensor]) -> str:
    """The model the checkpoint was saved from, as far as its shapes tell."""
    try:
        filters = [int(state_dict[f"{name}.conv1.0.weight"].shape[0]) for name in _ENCODERS]
        c_in = int(state_dict["conv1.conv1.0.weight"].shape[1])
        c_out = int(state_dict["final.weight"].shape[0])
    except (KeyError, AttributeError, IndexError):
        return "the checkpoint's filters could not be read"
    return f"the checkpoint has in_channels={c_in}, out_channels={c_out}, filters={filters}"
