"""Segment CT volumes with a trained checkpoint, in each input's own geometry.

Inputs (:func:`find_inputs`): a NIfTI file, a folder of NIfTI files, a DICOM series folder, or
a data folder in either layout that :mod:`examples.pancreas.cases` reads (MSD ``Task07_Pancreas``:
the images its ``dataset.json`` lists for training and test, or ``imagesTr/`` and ``imagesTs/``
without one; NIH Pancreas-CT: the DICOM series of every ``PANCREAS_####`` patient). Hidden files
(``._*``, dotfiles) and files that are not images are skipped, and so are segmentations
(``*_seg.nii.gz``, the name this module writes and a common one for manual labels): predicting
into the input folder, or again, never takes a prediction for a CT.

The checkpoint alone is enough: its ``"config"`` rebuilds the model and its ``"args"`` (the
run's :class:`~examples.pancreas.config.Config`) gives the preprocessing. Each volume goes
through :func:`examples.pancreas.transforms.image_transforms` (reorientation, resampling to the
training spacing, HU window), is segmented by sliding-window inference, and the label map is
taken back to the input's grid with MONAI's ``Invertd`` (nearest neighbour). It is written as
``<name>_seg.nii.gz``: with the input's affine and header for a NIfTI input, with the series'
affine (RAS, as MONAI's ``PydicomReader`` gives it) for a DICOM series, so it overlays the input
in any viewer. An existing file is never replaced unless asked (``overwrite``). A volume that
cannot be read or segmented is reported, and the others are still written.

Before any input is read, :func:`predict` checks its arguments (the checkpoint, a run folder
meaning its ``best.pt``; the device; an explicit backend, which must be able to run the gates
there; an output folder it can write in), each failure one line naming the argument
(:class:`~examples.pancreas.arguments.ArgumentError`).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch

from attention_gates.files import atomic_write

from .arguments import check_backend, check_device, check_out, resolve_checkpoint
from .cases import detect_layout, dicom_series, is_hidden, is_nifti, nih_patient_folders, strip_nifti, visible_files
from .checkpoints import load_checkpoint, model_from_checkpoint
from .config import Config
from .evaluate import infer, inference_model
from .transforms import image_transforms

__all__ = ["find_inputs", "predict", "Predictions", "is_segmentation", "SEGMENTATION"]

#: The ending of the files :func:`predict` writes: ``<name>_seg.nii.gz``.
SEGMENTATION = "_seg.nii.gz"

_EXPECTED = "a NIfTI file (.nii, .nii.gz), a folder of them, a DICOM series folder, or an MSD or NIH Pancreas-CT data folder"


def is_segmentation(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is named as a segmentation (``*_seg.nii.gz`` or ``*_seg.nii``, any case):
    what :func:`predict` writes, and a common name for manual labels; never an input."""
    name = Path(path).name.lower()
    return name.endswith(SEGMENTATION) or name.endswith(SEGMENTATION[: -len(".gz")])


def _nifti_item(path: Path) -> dict[str, Any]:
    item = {"name": strip_nifti(path.name), "image": path}
    if is_segmentation(path):
        item["skip"] = "a segmentation (its name ends in _seg), not a CT"
    return item


def _is_series(folder: Path) -> bool:
    """Whether ``folder`` itself holds DICOM files (by suffix, or by header for files without one)."""
    import pydicom

    return any(p.suffix.lower() == ".dcm" or (not p.suffix and pydicom.misc.is_dicom(p)) for p in visible_files(folder))


def _msd_images(root: Path) -> list[Path]:
    """The images of an MSD folder: ``dataset.json``'s training and test lists (MONAI's
    ``load_decathlon_datalist``), or the NIfTI files of ``imagesTr/`` and ``imagesTs/``."""
    from monai.data import load_decathlon_datalist

    index = root / "dataset.json"
    if not index.is_file():
        return [p for sub in ("imagesTr", "imagesTs") if (root / sub).is_dir() for p in visible_files(root / sub) if is_nifti(p)]
    images = []
    for key in ("training", "test"):
        try:
            entries = load_decathlon_datalist(index, is_segmentation=key == "training", data_list_key=key, base_dir=root)
        except (ValueError, IndexError):  # the list is absent, or empty
            continue
        images += [Path(e["image"]) for e in entries]
    return images


def find_inputs(inputs: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The volumes to segment in ``inputs`` (see the module docstring for what is accepted).

    Returns:
        ``[{"name": str, "image": Path}, ...]``: ``image`` a NIfTI file or a DICOM series
        folder, ``name`` the output's name (``<name>_seg.nii.gz``): the NIfTI file's name
        without its suffix, the NIH patient's folder name, or the series folder's name. An NIH
        patient folder without exactly one DICOM series comes as ``{"name", "image": the
        patient folder, "error": why}``, a segmentation (:func:`is_segmentation`) as ``{"name",
        "image", "skip": why}``.

    Raises:
        FileNotFoundError: ``inputs`` does not exist.
        ValueError: a file that is not NIfTI, a folder with no volume, or two volumes whose
            outputs would have the same name.
    """
    inputs = Path(inputs)
    if not inputs.exists():
        raise FileNotFoundError(f"input {inputs} does not exist")
    if inputs.is_file():
        if is_hidden(inputs) or not is_nifti(inputs):
            raise ValueError(f"input must be {_EXPECTED}; got the file {inputs}")
        return [_nifti_item(inputs)]
    if _is_series(inputs):
        items = [{"name": inputs.name, "image": inputs}]
    elif detect_layout(inputs) == "msd":
        items = [_nifti_item(p) for p in _msd_images(inputs)]
    elif patients := nih_patient_folders(inputs):  # detect_layout's "nih" with patient folders
        items = []
        for patient in patients:
            try:
                items.append({"name": patient.name, "image": dicom_series(patient)})
            except ValueError as err:
                items.append({"name": patient.name, "image": patient, "error": str(err)})
    else:
        items = [_nifti_item(p) for p in visible_files(inputs) if is_nifti(p)]
    if not items:
        raise ValueError(f"no volumes in {inputs}: expected {_EXPECTED}")
    names = [i["name"] for i in items if "skip" not in i]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"inputs in {inputs} would be written to the same output names: {', '.join(twice)}")
    return sorted(items, key=lambda i: i["name"])


def _save(seg: np.ndarray, source: Path, affine: np.ndarray, target: Path) -> None:
    """Write ``seg`` (``np.ndarray[X, Y, Z]`` uint8) atomically as NIfTI: with the source's
    affine and header when the source is NIfTI, else with ``affine`` (RAS mm)."""
    import nibabel as nib

    if is_nifti(source):
        original = nib.load(str(source))
        if seg.shape != original.shape[:3]:
            raise RuntimeError(f"{source}: segmentation came back as {seg.shape}, the input is {original.shape[:3]}")
        header = original.header.copy()
        header.set_data_dtype(np.uint8)
        affine, codes = original.affine, (int(original.header["qform_code"]) or 1, int(original.header["sform_code"]) or 1)
        result = nib.Nifti1Image(seg, affine, header)
    else:
        result, codes = nib.Nifti1Image(seg, affine), (1, 1)
        result.header.set_xyzt_units("mm")
    result.set_qform(affine, codes[0])
    result.set_sform(affine, codes[1])
    atomic_write(target, gzip.compress(result.to_bytes(), compresslevel=6, mtime=0))  # target: <name>.nii.gz


class Predictions(NamedTuple):
    """What :func:`predict` did: ``written``, the segmentations written; ``failed``, one line per
    volume that could not be read or segmented; ``skipped``, one line per input not segmented
    and why (a segmentation among the inputs, or an output that exists); ``kept``, the existing
    outputs left as they were (not ``overwrite``)."""

    written: list[Path]
    failed: list[str]
    skipped: list[str]
    kept: list[Path]


def _segment(model, transform, invert, cfg: Config, device: torch.device, source: Path, name: str, target: Path) -> None:
    """Segment one volume and write it to ``target`` on the input's grid."""
    from monai.data import MetaTensor

    d = transform({"image": str(source), "case_id": name})
    image = d["image"]
    seg = infer(model, image, cfg, device).argmax(0, keepdim=True).float()
    d["pred"] = MetaTensor(seg, meta=image.meta, applied_operations=image.applied_operations)
    back = invert(d)["pred"]
    _save(np.asarray(back[0]).round().astype(np.uint8), source, np.asarray(back.affine, dtype=np.float64), target)


def predict(
    checkpoint: Union[str, Path],
    inputs: Union[str, Path],
    out: Union[str, Path],
    device: Optional[Union[str, torch.device]] = None,
    backend: Optional[str] = None,
    progress: bool = False,
    overwrite: bool = False,
) -> Predictions:
    """Segment every volume of ``inputs`` (:func:`find_inputs`) into ``out``.

    Writes ``<name>_seg.nii.gz`` (uint8: 0 background, 1 pancreas) per volume, on the input's
    grid (see the module docstring). An existing output is kept unless ``overwrite``; inputs
    named as segmentations are not segmented. A volume that cannot be read or segmented does not
    stop the others. ``checkpoint``: a checkpoint file, or a run folder (its ``best.pt``, else
    its ``checkpoint.pt``). ``backend``: the gates' (an explicit one must be able to run on
    ``device``, and is used as given: on the CPU the gates are then not folded).
    ``progress``: a progress bar over the volumes.

    Returns:
        :class:`Predictions` ``(written, failed, skipped, kept)``.

    Raises:
        ArgumentError: (a ``ValueError``) a checkpoint path that names no checkpoint, a device
            this machine lacks, a backend that cannot run the gates on it, or an ``out`` that
            cannot be written; each before any input is read.
        CheckpointError: the checkpoint cannot be read (:func:`~examples.pancreas.checkpoints.load_checkpoint`).
        ValueError, FileNotFoundError: from :func:`find_inputs`, or a checkpoint without its run config.
    """
    from monai.transforms import Invertd
    from tqdm.auto import tqdm

    checkpoint = resolve_checkpoint(checkpoint)
    device = check_device(device)
    ckpt = load_checkpoint(checkpoint)
    if "args" not in ckpt:
        raise ValueError(f"checkpoint {checkpoint} has no 'args' (the run config), so its preprocessing is unknown")
    cfg = Config.from_dict(ckpt["args"])
    model = model_from_checkpoint(ckpt, backend).to(device)
    check_backend(model, device, backend, training=False)
    out = check_out(out)
    items = find_inputs(inputs)
    model = inference_model(model, device)
    out.mkdir(parents=True, exist_ok=True)
    transform = image_transforms(cfg)
    invert = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)
    done = Predictions([], [], [], [])
    for item in tqdm(items, desc="predict", unit="volume", disable=not progress):
        source, target = Path(item["image"]), out / f"{item['name']}{SEGMENTATION}"
        if "skip" in item:
            done.skipped.append(f"{source}: {item['skip']}")
            continue
        if target.exists() and not overwrite:
            done.skipped.append(f"{source}: its output {target} exists (--overwrite replaces it)")
            done.kept.append(target)
            continue
        try:
            if "error" in item:
                raise ValueError(item["error"])
            _segment(model, transform, invert, cfg, device, source, item["name"], target)
        except (ValueError, OSError, EOFError, RuntimeError) as err:  # one bad volume must not cost the others
            why = " ".join(str(err).split())
            done.failed.append(why if str(source) in why else f"{source}: {why}")
        else:
            done.written.append(target)
    return done
