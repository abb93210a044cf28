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


def gate_parameters(model: AttentionUNet) -> list[nn.Parameter]:
    """The parameters of ``model``'s gates and gating signal: what :func:`freeze_backbone` trains."""
    require_attention_unet(model)
    return [p for name in GATE_MODULES if getattr(model, name) is not None for p in getattr(model, name).parameters()]


def _backbone_modules(model: AttentionUNet):
    return [m for name, child in model.named_children() if name not in GATE_MODULES for m in child.modules()]


def _keep_eval(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a frozen norm: run on its running statistics, whatever ``train()`` said."""
    module.train(False)


def _has_keep_eval(module: nn.Module) -> list[int]:
    return [k for k, hook in module._forward_pre_hooks.items() if hook is _keep_eval]


def freeze_backbone(model: AttentionUNet) -> AttentionUNet:
    """Train only the gates: fix every other parameter and batch-norm statistic of ``model``.

    Sets ``requires_grad=False`` on every parameter outside :func:`gate_parameters` (and
    ``True`` on those), puts every normalisation layer outside the gates in eval mode, and
    registers on each a forward pre-hook that puts it back in eval mode before it runs, so
    that a later ``model.train()`` does not make it normalise with batch statistics or update
    its running statistics. The gates' own batch norms train as usual. Idempotent; undone by
    :func:`unfreeze`. Returns ``model``.

    Example:
        >>> import torch
        >>> from attention_gates import AttentionUNet3D
        >>> net = AttentionUNet3D(filters=[4, 8, 16])
        >>> opt = torch.optim.Adam(gate_parameters(freeze_backbone(net)), lr=1e-3)
    """
    trainable = {id(p) for p in gate_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    for m in _backbone_modules(model):
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if not _has_keep_eval(m):
                m.register_forward_pre_hook(_keep_eval)
            m.train(False)
    return model


def unfreeze(model: AttentionUNet) -> AttentionUNet:
    """Undo :func:`freeze_backbone`: every parameter trainable, every norm following ``model.train()``/``eval()``.

    Returns ``model``.
    """
    require_attention_unet(model)
    for p in model.parameters():
        p.requires_grad_(True)
    for m in model.modules():
        for key in _has_keep_eval(m):
            del m._forward_pre_hooks[key]
            m.train(model.training)
    return model
