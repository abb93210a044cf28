"""Train only the gates of an Attention U-Net started from a trained U-Net.

:meth:`AttentionUNet.from_unet <attention_gates.nets.AttentionUNet.from_unet>`
(:func:`~attention_gates.transfer.attention_unet_from_unet`) copies a trained U-Net into an Attention
U-Net with pass-through gates; :func:`freeze_backbone` then trains the gates (and the gating
signal) alone, with the copied layers' batch-norm statistics held fixed, and :func:`unfreeze`
trains everything again. The transfer's names (:mod:`attention_gates.transfer`) are importable
from here too.
"""

from __future__ import annotations

from torch import nn

from .nets import GATE_MODULES, AttentionUNet, require_attention_unet
from .transfer import TransferReport, attention_unet_from_unet, checkpoint_config, init_passthrough

__all__ = [
    "TransferReport",
    "attention_unet_from_unet",
    "checkpoint_config",
    "init_passthrough",
    "gate_parameters",
    "freeze_backbone",
    "unfreeze",
]

# the attribute of a norm frozen by freeze_backbone: the RemovableHandle of its forward pre-hook
_KEEP_EVAL_HANDLE = "_attention_gates_keep_eval"


def gate_parameters(model: AttentionUNet) -> list[nn.Parameter]:
    """The parameters of ``model``'s gates and gating signal: what :func:`freeze_backbone` trains."""
    require_attention_unet(model)
    return [p for name in GATE_MODULES if getattr(model, name) is not None for p in getattr(model, name).parameters()]


def _backbone_norms(model: AttentionUNet) -> list[nn.Module]:
    """The normalisation layers with running statistics (batch and instance norms) outside the
    gates and the gating signal."""
    return [
        m
        for name, child in model.named_children()
        if name not in GATE_MODULES
        for m in child.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
    ]


def _keep_eval(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a frozen norm: run on its running statistics, whatever ``train()`` said."""
    module.train(False)


def freeze_backbone(model: AttentionUNet) -> AttentionUNet:
    """Train only the gates: fix every other parameter and batch-norm statistic of ``model``.

    Sets ``requires_grad=False`` on every parameter outside :func:`gate_parameters` (and
    ``True`` on those), puts every normalisation layer outside the gates in eval mode, and
    registers on each a forward pre-hook that puts it back in eval mode before it runs, so
    that a later ``model.train()`` does not make it normalise with batch statistics or update
    its running statistics. The gates' own batch norms train as usual. Idempotent (one hook per
    layer, whose handle the layer keeps); undone by :func:`unfreeze`. Returns ``model``.

    Example:
        >>> import torch
        >>> from attention_gates import AttentionUNet3D
        >>> net = AttentionUNet3D(filters=[4, 8, 16])
        >>> opt = torch.optim.Adam(gate_parameters(freeze_backbone(net)), lr=1e-3)
    """
    trainable = {id(p) for p in gate_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    for norm in _backbone_norms(model):
        if getattr(norm, _KEEP_EVAL_HANDLE, None) is None:
            setattr(norm, _KEEP_EVAL_HANDLE, norm.register_forward_pre_hook(_keep_eval))
        norm.train(False)
    return model


def unfreeze(model: AttentionUNet) -> AttentionUNet:
    """Undo :func:`freeze_backbone`: every parameter trainable, every norm following ``model.train()``/``eval()``.

    Removes the hooks of :func:`freeze_backbone` through their handles (other hooks stay).
    Returns ``model``.
    """
    require_attention_unet(model)
    for p in model.parameters():
        p.requires_grad_(True)
    for m in model.modules():
        handle = getattr(m, _KEEP_EVAL_HANDLE, None)
        if handle is not None:
            handle.remove()
            delattr(m, _KEEP_EVAL_HANDLE)
            m.train(model.training)
    return model
