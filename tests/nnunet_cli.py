"""Run one of nnU-Net's console commands in this process, by its installed entry point.

``python tests/nnunet_cli.py nnUNetv2_train 901 3d_fullres 0 -tr ...`` calls the function that the
``nnUNetv2_train`` script calls, with the same arguments. Used by ``tests/test_nnunet.py``.

One thing differs from the script: where ``import torchvision`` fails, nnU-Net's Primus trainers
module is replaced by an empty one first. nnU-Net looks a trainer up by importing every module of
its own trainers package before it searches ``nnUNet_extTrainer``, and its Primus trainers import
timm, which imports torchvision; the torchvision the package registry serves is a CUDA build that
cannot load beside a CPU-only torch (this project's set-up: the CPU torch wheel, the registry's
torchvision), so without this every trainer outside ``nnUNetTrainer.py`` fails to resolve there,
nnU-Net's own variants included. Nothing else changes: the lookup, planning, training and
prediction are nnU-Net's code.
"""

from __future__ import annotations

import sys
import types
from importlib.metadata import entry_points

PRIMUS = "nnunetv2.training.nnUNetTrainer.primus.primus_trainers"


def torchvision_is_broken() -> bool:
    """Whether ``import torchvision`` fails (a CUDA build beside a CPU torch raises RuntimeError, not ImportError)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001
        return True
    return False


def main(argv: list[str]) -> None:
    command, *args = argv
    (entry,) = entry_points(group="console_scripts", name=command)
    if torchvision_is_broken():
        sys.modules[PRIMUS] = types.ModuleType(PRIMUS)
    sys.argv = [command, *args]
    entry.load()()


if __name__ == "__main__":
    main(sys.argv[1:])
