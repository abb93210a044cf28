"""A trained nnU-Net model folder -> ONNX with dynamic batch and spatial sizes (``attention-gates-nnunet export``).

The network exported is the one nnU-Net's own predictor runs:
``nnUNetPredictor.initialize_from_trained_model_folder`` builds it with the checkpoint's trainer
(``build_network_architecture``, deep supervision off) and loads the fold's weights; a gated
:class:`~attention_gates.integrations.nnunet.network.AttentionPlainConvUNet` or nnU-Net's plain
``PlainConvUNet``. :func:`torch.onnx.export` (``dynamo=True``) writes it with the batch and every
spatial size symbolic; before the file is written, ONNX Runtime runs it on a random volume of
another size than the one it was exported with, and its logits are compared with the
predictor's network's.

Sizes: ``PlainConvUNet`` has no padding inside, so each spatial size must be a multiple of the
product of the encoder's strides on that axis (:func:`size_multiples`; nnU-Net's plans choose
the patch size that way, and its sliding window only ever feeds patches). The ONNX model is the
network alone: the input is a volume preprocessed as nnU-Net preprocesses it (resampled to the
plans' spacing, normalised), and the output is logits, ``Tensor[N, classes, *S]``.

Needs the ``export`` extra (onnx, onnxscript, onnxruntime) beside the ``nnunet`` one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ... import deploy
from ...deploy import AXES, DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, TOLERANCE, ExportCheckError
from ...files import atomic_write

__all__ = [
    "export_onnx",
    "OnnxExport",
    "OnnxCheckError",
    "model_checkpoint",
    "size_multiples",
    "DEFAULT_OPSET",
    "TOLERANCE",
    "INPUT_NAME",
    "OUTPUT_NAME",
]

# DEFAULT_OPSET, INPUT_NAME ("image"), OUTPUT_NAME ("logits") and TOLERANCE (the largest difference from the
# predictor network's logits, as a fraction of the largest absolute logit) are attention_gates.deploy's, and so
# are the export, its check of the sizes and the check in ONNX Runtime
PathLike = Union[str, os.PathLike]


class OnnxCheckError(ExportCheckError):
    """The exported model fixed a size that must be symbolic, ONNX Runtime could not run it, or its
    logits differ from the predictor network's."""


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how it was checked.

    Attributes:
        path: the ONNX file.
        checkpoint: the nnU-Net checkpoint whose weights it holds.
        fold: the fold (``"0"``, ..., or ``"all"``).
        trainer: the trainer the checkpoint names (it built the network).
        network: the network's class name.
        in_channels, classes: ``C`` of the input and of the output.
        multiples: per spatial axis, the number every input size must be a multiple of.
        patch_size: the plans' patch size (what nnU-Net's sliding window feeds).
        opset: the ONNX opset.
        checked_shape: the random input ONNX Runtime was checked on, ``(N, C, *S)``.
        max_difference: the largest absolute difference of the logits there.
        tolerance: the largest one accepted.
    """

    path: Path
    checkpoint: Path
    fold: str
    trainer: str
    network: str
    in_channels: int
    classes: int
    multiples: tuple[int, ...]
    patch_size: tuple[int, ...]
    opset: int
    checked_shape: tuple[int, ...]
    max_difference: float
    tolerance: float

    def summary(self) -> str:
        """Where it wrote what, which sizes the model takes, and the check, in four lines."""
        letters = ", ".join(a[0].upper() for a in AXES[len(self.multiples)])
        return "\n".join([
            f"wrote {self.path} ({self.path.stat().st_size / 2**20:.1f} MiB, ONNX opset {self.opset}): {self.network} "
            f"of {self.trainer}, fold {self.fold}, {self.checkpoint.name}, deep supervision off",
            f"input {INPUT_NAME!r}: Tensor[N, {self.in_channels}, {letters}] float32, {letters} multiples of "
            f"{', '.join(map(str, self.multiples))} (nnU-Net's patch: {' x '.join(map(str, self.patch_size))}), "
            "preprocessed as nnU-Net does",
            f"output {OUTPUT_NAME!r}: Tensor[N, {self.classes}, {letters}] logits",
            f"checked in ONNX Runtime against nnU-Net's predictor network on a random Tensor{list(self.checked_shape)}: "
            f"max |difference| {self.max_difference:.2e} (tolerance {self.tolerance:.2e})",
        ])  # fmt: skip


def size_multiples(strides: Sequence[Union[int, Sequence[int]]], spatial_dims: int) -> tuple[int, ...]:
    """Per spatial axis, the product of the encoder's ``strides`` (the plans' ``arch_kwargs["strides"]``,
    one entry per stage, an int or one per axis): a ``PlainConvUNet`` takes the sizes that are
    multiples of it.

    >>> size_multiples([[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]], 3)
    (2, 8, 8)
    """
    per_stage = np.array([np.broadcast_to(np.asarray(s, dtype=np.int64), (spatial_dims,)) for s in strides])
    return tuple(int(m) for m in per_stage.prod(axis=0))


def _fold_name(fold: Union[int, str]) -> str:
    name = str(fold)
    if name != "all" and not (name.isdigit() and not isinstance(fold, bool)):
        raise ValueError(f"fold must be a fold number or 'all', got {fold!r}")
    return name


def model_checkpoint(model_folder: PathLike, fold: Optional[Union[int, str]] = None,
                     checkpoint: str = "checkpoint_final.pth") -> tuple[str, Path]:  # fmt: skip
    """The fold and the checkpoint file of a trained model folder, checked before anything is loaded.

    Args:
        model_folder: ``$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION``, as
            nnU-Net's training writes it (``plans.json``, ``dataset.json``, ``fold_<f>/``).
        fold: a fold number or ``"all"``; ``None``: ``0``, or ``"all"`` where the folder has no
            ``fold_0``.
        checkpoint: the file name in the fold's folder.

    Returns:
        ``(fold, path)``: the fold's name and the checkpoint's path.

    Raises:
        FileNotFoundError: the folder, the fold or the checkpoint does not exist.
        ValueError: the folder is not a trained model folder, or ``fold`` is not a fold.
    """
    folder = Path(model_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist or is not a folder")
    missing = [name for name in ("plans.json", "dataset.json") if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is not a trained nnU-Net model folder: it has no {' and no '.join(missing)} (expected "
            f"$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION, with plans.json, dataset.json and fold_<f>/)"
        )
    folds = sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if p.is_dir())
    if fold is None:
        fold = next((f for f in ("0", "all") if f in folds), None)
        if fold is None:
            raise FileNotFoundError(f"{folder} has no fold_0 and no fold_all (its folds: {folds}): pass the fold")
    fold = _fold_name(fold)
    if fold not in folds:
        raise FileNotFoundError(f"{folder} has no fold_{fold} (its folds: {folds})")
    path = folder / f"fold_{fold}" / checkpoint
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.pth"))
        raise FileNotFoundError(
            f"fold_{fold} of {folder} has no {checkpoint}; it has {present or 'no checkpoint'}. nnU-Net writes "
            f"checkpoint_final.pth when a training ends; while it runs, checkpoint_best.pth (at each new best EMA "
            f"pseudo Dice) and checkpoint_latest.pth (every 50 epochs): pass one of those as the checkpoint"
        )
    return fold, path


def _output_path(output: Optional[PathLike], checkpoint: Path, overwrite: bool) -> Path:
    return deploy.check_output(output if output is not None else checkpoint.with_suffix(".onnx"), overwrite, "onnx")


def _predictor_network(model_folder: Path, fold: str, checkpoint: str):
    """nnU-Net's predictor, initialised from the folder with the fold's weights, and its network (eval mode)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    try:
        predictor.initialize_from_trained_model_folder(str(model_folder), (fold,), checkpoint_name=checkpoint)
    except RuntimeError as e:
        if "Could not find requested nnunet trainer" in str(e):
            raise ValueError(
                f"nnU-Net cannot find the trainer that {model_folder.name} was trained with: list the folder that "
                f"defines it in nnUNet_extTrainer (for this library's trainers: export "
                f"nnUNet_extTrainer=$(attention-gates-nnunet trainer-dir)). nnU-Net said: {e}"
            ) from None
        if "torchvision" in str(e):
            raise ImportError(
                f"nnU-Net's trainer lookup imports torchvision (through timm), and that import failed: {e}. This is a "
                f"torchvision built for another torch (a CUDA torchvision beside a CPU-only torch, or the reverse): "
                f"install the torchvision build that matches your torch"
            ) from e
        raise
    network = getattr(predictor.network, "_orig_mod", predictor.network)  # nnUNet_compile wraps it in torch.compile
    return predictor, network.eval()


def export_onnx(
    model_folder: PathLike,
    fold: Optional[Union[int, str]] = None,
    checkpoint: str = "checkpoint_final.pth",
    output: Optional[PathLike] = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
) -> OnnxExport:
    """Export a trained nnU-Net model folder's network to ONNX and check it in ONNX Runtime.

    The model takes ``Tensor[N, C, *S]`` (float32) with any ``N`` and each spatial size a multiple
    of :func:`size_multiples` of the plans' strides, and returns the logits
    ``Tensor[N, classes, *S]``. It is exported at twice those multiples (batch 2) and checked at
    three times them (batch 1) against the network of ``nnUNetPredictor``; only then is the file
    written (atomically).

    Args:
        model_folder: the trained model folder (see :func:`model_checkpoint`).
        fold: the fold whose weights are exported (``None``: 0, else ``"all"``).
        checkpoint: the checkpoint file of that fold.
        output: the ONNX file (default: the checkpoint's path with ``.onnx``).
        opset: the ONNX opset (18 or later).
        overwrite: replace an existing ``output``.

    Returns:
        :class:`OnnxExport`: the file, the sizes it takes, the check's largest difference.

    Raises:
        FileNotFoundError, ValueError: see :func:`model_checkpoint`; also a ``ValueError`` for an
            opset before 18, an ``output`` that is a folder, or a trainer nnU-Net cannot find.
        FileExistsError: ``output`` exists and ``overwrite`` is false.
        ImportError: onnx, onnxscript or onnxruntime is not installed, or nnU-Net's trainer lookup
            fails to import a torchvision built for another torch.
        OnnxCheckError: the exported graph fixed a size, ONNX Runtime cannot run the model, or
            its logits differ by more than :data:`TOLERANCE` of the largest logit.
    """
    deploy.check_opset(opset)
    fold, path = model_checkpoint(model_folder, fold, checkpoint)
    destination = _output_path(output, path, overwrite)
    deploy.require_export_packages()
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    predictor, network = _predictor_network(Path(model_folder), fold, checkpoint)
    conf = predictor.configuration_manager
    multiples = size_multiples(conf.pool_op_kernel_sizes, len(conf.patch_size))
    channels = determine_num_input_channels(predictor.plans_manager, conf, predictor.dataset_json)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, *(3 * m for m in multiples), generator=gen)  # an odd multiple of every size
    with torch.no_grad():
        expected = network(x)
    if not isinstance(expected, Tensor):
        raise ValueError(f"the predictor's network returns {type(expected).__name__}, not one Tensor of logits "
                         "(deep supervision on?): nothing to export")  # fmt: skip
    metadata = {
        "nnunet.model_folder": Path(model_folder).resolve().name,  # TRAINER__PLANS__CONFIGURATION
        "nnunet.trainer": predictor.trainer_name,
        "nnunet.fold": fold,
        "nnunet.checkpoint": path.name,
        "nnunet.patch_size": list(conf.patch_size),
        "nnunet.spacing": list(conf.spacing),
        "nnunet.size_multiples": list(multiples),
    }
    example = torch.randn(2, channels, *(2 * m for m in multiples), generator=gen)
    try:
        model = deploy.onnx_model(network, example, multiples=multiples, opset=opset, metadata=metadata)
        difference = deploy.check_onnx(model, network, x, tolerance=TOLERANCE)
    except ExportCheckError as e:
        raise OnnxCheckError(f"{e}; nothing written") from None
    tolerance = deploy.allowed_difference(expected, TOLERANCE)
    atomic_write(destination, model.SerializeToString())
    return OnnxExport(
        path=destination, checkpoint=path, fold=fold, trainer=predictor.trainer_name, network=type(network).__name__,
        in_channels=channels, classes=int(expected.shape[1]), multiples=multiples,
        patch_size=tuple(conf.patch_size), opset=opset, checked_shape=tuple(x.shape),
        max_difference=difference, tolerance=tolerance,
    )  # fmt: skip
