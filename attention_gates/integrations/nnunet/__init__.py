"""Attention gates inside nnU-Net v2 (``pip install 'attention-gates[nnunet]'``).

- :class:`~attention_gates.integrations.nnunet.network.AttentionPlainConvUNet`: nnU-Net's default network (``PlainConvUNet``) with the
  paper's gates on its skips; a plans file can name it
  (``"network_class_name": "attention_gates.integrations.nnunet.AttentionPlainConvUNet"``).
- :class:`nnUNetTrainerAttentionGates`: nnU-Net's default trainer with that network, for
  ``nnUNetv2_train ... -tr nnUNetTrainerAttentionGates`` once ``nnUNet_extTrainer`` lists
  :func:`trainer_dir`.
- :func:`write_attention_plans`: a plans variant naming the network, for nnU-Net's own trainer.
- :meth:`AttentionPlainConvUNet.from_plain <attention_gates.integrations.nnunet.network.AttentionPlainConvUNet.from_plain>` and :func:`convert_checkpoint`: a trained
  ``PlainConvUNet`` with pass-through gates
  (:meth:`AttentionPlainConvUNet.init_passthrough <attention_gates.integrations.nnunet.network.AttentionPlainConvUNet.init_passthrough>`),
  computing the same logits.

The command line ``attention-gates-nnunet`` (or ``python -m attention_gates.integrations.nnunet``)
prints :func:`trainer_dir` and writes plans variants and converted checkpoints. The trainer is
imported on first use (it imports nnU-Net's training code).
"""

import importlib.util

_missing = [m for m in ("nnunetv2", "dynamic_network_architectures") if importlib.util.find_spec(m) is None]
if _missing:
    raise ImportError(
        f"attention_gates.integrations.nnunet needs nnU-Net v2 ({', '.join(_missing)} not installed): "
        "pip install 'attention-gates[nnunet]'"
    )

from .network import GATE_DEFAULTS, AttentionPlainConvUNet, AttentionUNetDecoder  # noqa: E402
from .plans import DEFAULT_PLANS_NAME, attention_plans, convert_checkpoint, trainer_dir, write_attention_plans  # noqa: E402

__all__ = [
    "AttentionPlainConvUNet",
    "AttentionUNetDecoder",
    "GATE_DEFAULTS",
    "nnUNetTrainerAttentionGates",
    "trainer_dir",
    "attention_plans",
    "write_attention_plans",
    "convert_checkpoint",
    "DEFAULT_PLANS_NAME",
]


def __getattr__(name: str):
    if name == "nnUNetTrainerAttentionGates":  # imported on first use: it loads nnU-Net's training code
        from .trainer import nnUNetTrainerAttentionGates

        return nnUNetTrainerAttentionGates
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
