"""The files nnU-Net reads: a plans variant naming :class:`~attention_gates.integrations.nnunet.network.AttentionPlainConvUNet`, a trained
plain checkpoint turned into a gated one, and the folder nnU-Net searches for the trainer.

- :func:`write_attention_plans`: ``nnUNetPlans.json`` -> ``nnUNetAttentionPlans.json`` beside it,
  its configurations naming the gated network with the same ``arch_kwargs`` (and the gates'
  options). Train with nnU-Net's own trainer: ``nnUNetv2_train DATASET 3d_fullres FOLD -p
  nnUNetAttentionPlans``; the variant keeps each configuration's ``data_identifier``, so it uses
  the data already preprocessed for the source plans.
- :func:`convert_checkpoint`: a trained ``PlainConvUNet``'s ``checkpoint_final.pth`` -> an
  nnU-Net checkpoint of the gated network with pass-through gates (for ``-pretrained_weights``).
- :func:`trainer_dir`: the folder to add to ``nnUNet_extTrainer`` so that ``-tr
  nnUNetTrainerAttentionGates`` resolves.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ...files import atomic_write
from .network import (
    CLASS_NAME,
    GATE_DEFAULTS,
    AttentionPlainConvUNet,
    check_gate_options,
    is_gateable,
    plans_architecture,
    resolve_arch_kwargs,
)

__all__ = ["write_attention_plans", "convert_checkpoint", "attention_plans", "trainer_dir", "DEFAULT_PLANS_NAME"]

#: The plans identifier :func:`write_attention_plans` writes by default (``-p`` of nnU-Net's commands).
DEFAULT_PLANS_NAME = "nnUNetAttentionPlans"
_TRAINER_NAME = "nnUNetTrainerAttentionGates"

PathLike = Union[str, os.PathLike]


def trainer_dir() -> Path:
    """The folder to list in ``nnUNet_extTrainer`` for nnU-Net to find ``nnUNetTrainerAttentionGates``.

    nnU-Net (2.8) looks a trainer up by name in ``nnunetv2.training.nnUNetTrainer`` and then in each
    folder of ``nnUNet_extTrainer`` (``os.pathsep``-separated), importing the folder's modules; this
    folder's one module re-exports the trainer. In a shell:
    ``export nnUNet_extTrainer=$(attention-gates-nnunet trainer-dir)``.
    """
    return Path(__file__).resolve().parent / "trainers"


def attention_plans(
    plans: Mapping[str, Any],
    plans_name: str = DEFAULT_PLANS_NAME,
    configurations: Optional[Sequence[str]] = None,
    **gate_options: Any,
) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``plans`` (a plans file's dict) whose configurations name :class:`~attention_gates.integrations.nnunet.network.AttentionPlainConvUNet`.

    Args:
        plans: the source plans (nnU-Net's ``nnUNetPlans.json``, loaded).
        plans_name: the copy's ``plans_name`` (its identifier, ``-p`` of nnU-Net's commands).
        configurations: the configurations to convert; default every one whose network is
            ``PlainConvUNet`` (others, such as a residual encoder's, are left as they are).
            A configuration that inherits its architecture (``inherits_from``) gets its own.
        **gate_options: ``gated_skips``, ``gate_heads``, ``gate_norm``, ``gate_output_transform``
            (default :data:`~attention_gates.integrations.nnunet.network.GATE_DEFAULTS`); written
            out in full into each converted configuration's ``arch_kwargs``.

    Returns:
        ``(new plans, the converted configurations)``.

    Raises:
        ValueError: a requested configuration does not exist or names another network; none
            names ``PlainConvUNet``; gate options the network rejects (its own message).
        TypeError: unknown gate options.
    """
    check_gate_options(gate_options)
    names = list(plans.get("configurations", {})) if configurations is None else list(configurations)
    out = copy.deepcopy(dict(plans))
    out["plans_name"] = plans_name
    converted = []
    for name in names:
        cls_name, arch_kwargs, requires_import = plans_architecture(plans, name)
        if not is_gateable(cls_name):
            if configurations is None:
                continue
            raise ValueError(f"configuration {name!r} names {cls_name!r}: only PlainConvUNet's configurations can be gated")
        options = {**GATE_DEFAULTS, **{k: arch_kwargs[k] for k in GATE_DEFAULTS if k in arch_kwargs}, **gate_options}
        kwargs = {k: v for k, v in arch_kwargs.items() if k not in GATE_DEFAULTS}
        options["gated_skips"] = _gated_skips_of(kwargs, requires_import, options)  # checks every option
        out["configurations"][name]["architecture"] = {
            "network_class_name": CLASS_NAME,
            "arch_kwargs": {**kwargs, **options},
            "_kw_requires_import": list(requires_import),
        }
        converted.append(name)
    if not converted:
        raise ValueError(
            f"no configuration of these plans names PlainConvUNet (configurations: {sorted(plans.get('configurations', {}))})"
        )
    return out, converted


def _gated_skips_of(arch_kwargs: dict[str, Any], requires_import: Sequence[str], options: dict[str, Any]) -> list[int]:
    """The gated skips the network takes from these arguments, as a list; building it (on the
    ``meta`` device: no memory, no initialisation) checks every gate option."""
    with torch.device("meta"):
        net = AttentionPlainConvUNet(input_channels=1, num_classes=2, **resolve_arch_kwargs(arch_kwargs, requires_import), **options)
    return list(net.decoder.gated_skips)


def write_attention_plans(
    plans_file: PathLike,
    plans_name: str = DEFAULT_PLANS_NAME,
    configurations: Optional[Sequence[str]] = None,
    **gate_options: Any,
) -> Path:
    """Write the plans variant of :func:`attention_plans` beside ``plans_file``, as ``<plans_name>.json``.

    ``plans_file`` is usually ``$nnUNet_preprocessed/DatasetXXX_Name/nnUNetPlans.json``; then
    ``nnUNetv2_train DatasetXXX_Name 3d_fullres 0 -p <plans_name>`` trains the gated network with
    nnU-Net's own trainer. The file is written atomically (a temporary file, then renamed).

    Returns:
        The path written.

    Raises:
        FileNotFoundError: no ``plans_file``.
        ValueError: ``plans_name`` would overwrite ``plans_file``; see :func:`attention_plans`.
    """
    source = Path(plans_file)
    if not source.is_file():
        raise FileNotFoundError(f"no plans file {str(source)!r}")
    target = source.with_name(f"{plans_name}.json")
    if target.resolve() == source.resolve():
        raise ValueError(f"plans_name {plans_name!r} would overwrite the source plans {str(source)!r}: choose another name")
    plans, _ = attention_plans(json.loads(source.read_text()), plans_name, configurations, **gate_options)
    atomic_write(target, json.dumps(plans, indent=4) + "\n")
    return target


def convert_checkpoint(
    checkpoint: PathLike,
    output: PathLike,
    *,
    configuration: Optional[str] = None,
    psi_bias: float = 12.0,
    **gate_options: Any,
) -> Path:
    """Turn a trained ``PlainConvUNet``'s nnU-Net checkpoint into one of :class:`~attention_gates.integrations.nnunet.network.AttentionPlainConvUNet`.

    The output is the input checkpoint with ``network_weights`` those of
    :meth:`AttentionPlainConvUNet.from_plain <attention_gates.integrations.nnunet.network.AttentionPlainConvUNet.from_plain>` (the trained weights, pass-through gates), its stored
    plans naming the gated network at ``configuration`` (default: the checkpoint's), and
    ``trainer_name`` ``nnUNetTrainerAttentionGates``; the optimizer's and grad scaler's states,
    which belong to the plain network's parameters, are dropped. Written atomically.

    Start a training from it with ``nnUNetv2_train ... -tr nnUNetTrainerAttentionGates
    -pretrained_weights OUTPUT`` (same gate options on both sides): nnU-Net loads every weight
    but the segmentation layers (``seg_layers``), which it initialises anew, as it does for any
    ``-pretrained_weights``.

    Raises:
        ValueError: ``output`` is ``checkpoint``; see :meth:`AttentionPlainConvUNet.from_plain <attention_gates.integrations.nnunet.network.AttentionPlainConvUNet.from_plain>`.
    """
    source, target = Path(checkpoint), Path(output)
    if target.exists() and target.resolve() == source.resolve():
        raise ValueError(f"output {str(target)!r} is the input checkpoint: write the gated one elsewhere")
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    net = AttentionPlainConvUNet.from_plain(ckpt, configuration=configuration, psi_bias=psi_bias, **gate_options)
    init_args = dict(ckpt["init_args"])
    configuration = configuration or init_args["configuration"]
    plans, _ = attention_plans(init_args["plans"], init_args["plans"].get("plans_name", DEFAULT_PLANS_NAME),
                               [configuration], **net.gate_options)  # fmt: skip
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer_state", "grad_scaler_state")}
    out.update(network_weights=net.state_dict(), init_args={**init_args, "plans": plans, "configuration": configuration},
               trainer_name=_TRAINER_NAME)  # fmt: skip
    atomic_write(target, lambda f: torch.save(out, f))
    return target
