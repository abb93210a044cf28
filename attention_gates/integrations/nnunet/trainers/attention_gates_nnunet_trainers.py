"""Imported by nnU-Net as a top-level module when ``nnUNet_extTrainer`` lists this folder; it
re-exports the trainers, so the classes nnU-Net finds are the library's own."""

from attention_gates.integrations.nnunet.trainer import nnUNetTrainerAttentionGates  # noqa: F401
