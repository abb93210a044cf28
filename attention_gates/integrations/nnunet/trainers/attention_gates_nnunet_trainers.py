"""Imported by nnU-Net as a top-level module when ``nnUNet_extTrainer`` lists this folder; it
re-exports every trainer of :mod:`attention_gates.integrations.nnunet.trainer` (its ``__all__``),
so the classes nnU-Net finds are the library's own."""

from attention_gates.integrations.nnunet.trainer import *  # noqa: F401,F403
