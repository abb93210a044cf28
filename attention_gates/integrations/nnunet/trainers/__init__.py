"""The folder to list in nnU-Net's ``nnUNet_extTrainer``: its modules re-export this library's
trainers, so that nnU-Net finds them by name (see
:func:`attention_gates.integrations.nnunet.plans.trainer_dir`)."""
