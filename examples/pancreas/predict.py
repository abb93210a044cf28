"""Segment new CT volumes with a trained checkpoint, in each input's own geometry.

The checkpoint alone is enough: its ``"config"`` rebuilds the model and its ``"args"`` (the
run's :class:`~examples.pancreas.config.Config`) gives the preprocessing. Each volume goes
through the image steps of the evaluation transforms (:func:`image_transforms`:
reorientation, resampling to the training spacing, HU window), is segmented by sliding-window inference, and the label map is taken back to the
input's grid with MONAI's ``Invertd`` (nearest neighbour); it is written with the input's
affine and header, so it overlays the input in any viewer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .config import Config
from .evaluate import infer
from .train import load_checkpoint, model_from_checkpoint

__all__ = ["find_volumes", "image_transforms", "predict"]

SUFFIXES = (".nii.gz", ".nii")


def _stem(path: Path) -> str:
    name = path.name
    return next(name[: -len(s)] for s in SUFFIXES if name.endswith(s))


def find_volumes(inputs: Union[str, Path]) -> list[Path]:
    """The NIfTI files (``.nii``, ``.nii.gz``) of a folder, sorted, or the one file ``inputs`` names."""
    inputs = Path(inputs)
    if inputs.is_file():
        if not inputs.name.endswith(SUFFIXES):
            raise ValueError(f"input must be a NIfTI file ({', '.join(SUFFIXES)}) or a folder of them, got {inputs}")
        return [inputs]
    if not inputs.is_dir():
        raise FileNotFoundError(f"input {inputs} does not exist")
    files = sorted(p for p in inputs.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
    if not files:
        raise ValueError(f"no NIfTI volumes ({', '.join(SUFFIXES)}) in {inputs}")
    return files


def image_transforms(cfg: Config):
    """The image half of :func:`examples.pancreas.data.eval_transforms`, for volumes without
    a label: read, orient to RAS, resample to ``cfg.spacing`` (bilinear), clip and scale
    ``cfg.hu_window`` to [0, 1]. Gives ``MetaTensor[1, X', Y', Z']`` under ``"image"``."""
    from monai.transforms import Compose, EnsureTyped, Orientationd, ScaleIntensityRanged, Spacingd

    from .data import LoadCased

    low, high = (float(v) for v in cfg.hu_window)
    return Compose([
        LoadCased("image"),
        Orientationd("image", axcodes="RAS", labels=None),  # as data.eval_transforms: the space of the image
        Spacingd("image", pixdim=tuple(float(s) for s in cfg.spacing), mode="bilinear"),
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped("image", dtype=torch.float32),
    ])  # fmt: skip


def predict(
    checkpoint: Union[str, Path],
    inputs: Union[str, Path],
    out: Union[str, Path],
    device: Optional[Union[str, torch.device]] = None,
    backend: Optional[str] = None,
) -> list[Path]:
    """Segment every NIfTI volume of ``inputs`` (a folder or one file) into ``out``.

    Writes ``<name>_seg.nii.gz`` (uint8: 0 background, 1 pancreas) per input, with the input's
    shape, affine and header. Returns the written paths.
    """
    import nibabel as nib
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    ckpt = load_checkpoint(checkpoint)
    if "args" not in ckpt:
        raise ValueError(f"checkpoint {checkpoint} has no 'args' (the run config), so its preprocessing is unknown")
    cfg = Config.from_dict(ckpt["args"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model_from_checkpoint(ckpt, backend).to(device)
    files = find_volumes(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    transform = image_transforms(cfg)
    invert = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)
    written = []
    for path in files:
        d = transform({"image": str(path)})
        image = d["image"]
        seg = infer(model, image, cfg, device).argmax(0, keepdim=True).float()
        d["pred"] = MetaTensor(seg, meta=image.meta, applied_operations=image.applied_operations)
        restored = np.asarray(invert(d)["pred"][0]).round().astype(np.uint8)
        original = nib.load(str(path))
        if restored.shape != original.shape[:3]:
            raise RuntimeError(f"{path}: segmentation came back as {restored.shape}, the input is {original.shape[:3]}")
        header = original.header.copy()
        header.set_data_dtype(np.uint8)
        result = nib.Nifti1Image(restored, original.affine, header)
        result.set_qform(original.affine, int(original.header["qform_code"]) or 1)
        result.set_sform(original.affine, int(original.header["sform_code"]) or 1)
        target = out / f"{_stem(path)}_seg.nii.gz"
        nib.save(result, str(target))
        written.append(target)
    return written
