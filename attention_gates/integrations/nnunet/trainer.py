"""``nnUNetTrainerAttentionGates``: nnU-Net's default trainer, training :class:`~attention_gates.integrations.nnunet.network.AttentionPlainConvUNet`.

nnU-Net looks trainers up by class name (``nnUNetv2_train ... -tr NAME``, and again at
inference) in its own package and then in the folders listed in the environment variable
``nnUNet_extTrainer``; :func:`~attention_gates.integrations.nnunet.plans.trainer_dir` is the
folder to list there for this trainer (see the nnU-Net page of the docs).
"""

from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from .network import CLASS_NAME, PLAIN_CLASS_NAME, _gateable

__all__ = ["nnUNetTrainerAttentionGates"]


class nnUNetTrainerAttentionGates(nnUNetTrainer):
    """nnU-Net's trainer with :class:`~attention_gates.integrations.nnunet.network.AttentionPlainConvUNet`
    as the network: everything else (data, augmentation, loss, deep supervision, schedule,
    inference) is ``nnUNetTrainer``'s.

    The network is built from the configuration's ``arch_kwargs`` whether the plans name
    ``PlainConvUNet`` (nnU-Net's default plans: the gates take their defaults) or
    ``AttentionPlainConvUNet`` (a plans variant, whose ``arch_kwargs`` may set the gates' options).
    """

    @staticmethod
    def build_network_architecture(
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """The gated network of this configuration, He-initialised as nnU-Net initialises its own.

        Raises:
            ValueError: the plans name another network (a residual encoder, ...), whose
                ``arch_kwargs`` are not ``PlainConvUNet``'s.
        """
        name = configuration_manager.network_arch_class_name
        if not _gateable(name):
            raise ValueError(
                f"nnUNetTrainerAttentionGates gates {PLAIN_CLASS_NAME!r}; these plans name {name!r}, whose "
                f"arch_kwargs it cannot take: use plans with the default network (nnUNetPlans)"
            )
        return get_network_from_plans(
            CLASS_NAME,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels,
            num_output_channels,
            allow_init=True,
            deep_supervision=enable_deep_supervision,
        )
