"""``nnUNetTrainerAttentionGates``: nnU-Net's default trainer, training :class:`~attention_gates.integrations.nnunet.network.AttentionPlainConvUNet`,
and its variants with fewer epochs (``nnUNetTrainerAttentionGates_1epoch``, ``_5epochs``, ...), named
and counted as nnU-Net names its own (``nnUNetTrainer_1epoch``, ...).

nnU-Net looks trainers up by class name (``nnUNetv2_train ... -tr NAME``, and again at
inference) in its own package and then in the folders listed in the environment variable
``nnUNet_extTrainer``; :func:`~attention_gates.integrations.nnunet.plans.trainer_dir` is the
folder to list there for these trainers (see the nnU-Net page of the docs).
"""

from __future__ import annotations

from typing import Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from .network import CLASS_NAME, PLAIN_CLASS_NAME, is_gateable

__all__ = [
    "nnUNetTrainerAttentionGates",
    "nnUNetTrainerAttentionGates_1epoch",
    "nnUNetTrainerAttentionGates_5epochs",
    "nnUNetTrainerAttentionGates_10epochs",
    "nnUNetTrainerAttentionGates_20epochs",
    "nnUNetTrainerAttentionGates_50epochs",
    "nnUNetTrainerAttentionGates_100epochs",
    "nnUNetTrainerAttentionGates_250epochs",
    "nnUNetTrainerAttentionGates_500epochs",
    "nnUNetTrainerAttentionGates_750epochs",
    "nnUNetTrainerAttentionGates_2000epochs",
    "nnUNetTrainerAttentionGates_4000epochs",
    "nnUNetTrainerAttentionGates_8000epochs",
]


class nnUNetTrainerAttentionGates(nnUNetTrainer):
    """nnU-Net's trainer with :class:`~attention_gates.integrations.nnunet.network.AttentionPlainConvUNet`
    as the network: everything else (data, augmentation, loss, deep supervision, schedule,
    inference) is ``nnUNetTrainer``'s.

    The network is built from the configuration's ``arch_kwargs`` whether the plans name
    ``PlainConvUNet`` (nnU-Net's default plans: the gates take their defaults) or
    ``AttentionPlainConvUNet`` (a plans variant, whose ``arch_kwargs`` may set the gates' options).

    Attributes:
        EPOCHS: the number of epochs a subclass trains for (``num_epochs``); ``None`` keeps
            ``nnUNetTrainer``'s (1000). The variants ``nnUNetTrainerAttentionGates_<n>epochs`` set it.
    """

    EPOCHS: Optional[int] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        # nnUNetTrainer's signature, unchanged: nnU-Net records these arguments by name for its checkpoints
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.EPOCHS is not None:
            self.num_epochs = self.EPOCHS

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
        if not is_gateable(name):
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


class nnUNetTrainerAttentionGates_1epoch(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for one epoch, as ``nnUNetTrainer_1epoch`` is ``nnUNetTrainer`` for one epoch."""

    EPOCHS = 1


class nnUNetTrainerAttentionGates_5epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 5 epochs, as ``nnUNetTrainer_5epochs`` is ``nnUNetTrainer`` for 5 epochs."""

    EPOCHS = 5


class nnUNetTrainerAttentionGates_10epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 10 epochs, as ``nnUNetTrainer_10epochs`` is ``nnUNetTrainer`` for 10 epochs."""

    EPOCHS = 10


class nnUNetTrainerAttentionGates_20epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 20 epochs, as ``nnUNetTrainer_20epochs`` is ``nnUNetTrainer`` for 20 epochs."""

    EPOCHS = 20


class nnUNetTrainerAttentionGates_50epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 50 epochs, as ``nnUNetTrainer_50epochs`` is ``nnUNetTrainer`` for 50 epochs."""

    EPOCHS = 50


class nnUNetTrainerAttentionGates_100epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 100 epochs, as ``nnUNetTrainer_100epochs`` is ``nnUNetTrainer`` for 100 epochs."""

    EPOCHS = 100


class nnUNetTrainerAttentionGates_250epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 250 epochs, as ``nnUNetTrainer_250epochs`` is ``nnUNetTrainer`` for 250 epochs."""

    EPOCHS = 250


class nnUNetTrainerAttentionGates_500epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 500 epochs, as ``nnUNetTrainer_500epochs`` is ``nnUNetTrainer`` for 500 epochs."""

    EPOCHS = 500


class nnUNetTrainerAttentionGates_750epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 750 epochs, as ``nnUNetTrainer_750epochs`` is ``nnUNetTrainer`` for 750 epochs."""

    EPOCHS = 750


class nnUNetTrainerAttentionGates_2000epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 2000 epochs, as ``nnUNetTrainer_2000epochs`` is ``nnUNetTrainer`` for 2000 epochs."""

    EPOCHS = 2000


class nnUNetTrainerAttentionGates_4000epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 4000 epochs, as ``nnUNetTrainer_4000epochs`` is ``nnUNetTrainer`` for 4000 epochs."""

    EPOCHS = 4000


class nnUNetTrainerAttentionGates_8000epochs(nnUNetTrainerAttentionGates):
    """:class:`nnUNetTrainerAttentionGates` for 8000 epochs, as ``nnUNetTrainer_8000epochs`` is ``nnUNetTrainer`` for 8000 epochs."""

    EPOCHS = 8000
