"""Finding the cases of a data set: the folders users bring, and the built-in phantom.

Three sources give the same case dicts, ``{"image": ..., "label": ..., "case_id": str}``,
which the transforms of :mod:`examples.pancreas.transforms` accept:

* the Medical Segmentation Decathlon ``Task07_Pancreas`` folder (``dataset.json``,
  ``imagesTr/*.nii.gz``, ``labelsTr/*.nii.gz``; labels 0 background, 1 pancreas, 2 tumour),
* the NIH Pancreas-CT collection (TCIA): one DICOM series per patient under
  ``PANCREAS_0001/...`` and labels ``label0001.nii.gz`` in a labels folder or beside them,
* the built-in synthetic phantom (:mod:`examples.pancreas.phantom`), generated in memory.

Nothing is downloaded: bring the data as a folder. Hidden files (``._*`` macOS resource forks,
dotfiles) are never taken for data. Finding a case reads no volume: the files are read and
checked by the transforms, or up front by :func:`examples.pancreas.volumes.check_case_files`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, load_decathlon_datalist

from .phantom import generate_phantom

__all__ = [
    "find_cases",
    "load_cases",
    "is_hidden",
    "is_nifti",
    "strip_nifti",
    "visible_files",
    "detect_layout",
    "nih_patient_folders",
    "dicom_series",
    "phantom_cases",
    "held_out_phantom_seeds",
    "PHANTOM_TEST_SEED",
]

#: Seed of the first held-out phantom test case, plus ``data_seed`` (:func:`held_out_phantom_seeds`).
PHANTOM_TEST_SEED = 100_000

_NIFTI = (".nii", ".nii.gz")
_NIH_CASE = re.compile(r"^PANCREAS_(\d+)$", re.IGNORECASE)
_NIH_LABEL = re.compile(r"^label(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_KEYS = ("image", "label")


def is_hidden(path: str | os.PathLike) -> bool:
    """Whether a file is hidden (a dotfile, or a macOS ``._*`` resource fork): never data."""
    return Path(path).name.startswith(".")


def visible_files(folder: str | os.PathLike) -> list[Path]:
    """The files directly in ``folder``, hidden ones (:func:`is_hidden`) left out, sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not is_hidden(p))


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as a NIfTI file (``.nii`` or ``.nii.gz``, any case); its content is not read."""
    return Path(path).name.lower().endswith(_NIFTI)


def strip_nifti(name: str) -> str:
    """``name`` without its ``.nii.gz`` or ``.nii`` suffix (``"a.nii.gz"`` -> ``"a"``)."""
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def find_cases(
    root: str | os.PathLike | None, layout: str = "auto", *, n_phantom: int = 20, seed: int = 0
) -> list[dict]:
    """List the cases of a data folder, or make phantom cases.

    Args:
        root: the data folder; ``None`` for the synthetic phantom.
        layout: ``"msd"`` (``dataset.json``, ``imagesTr/``, ``labelsTr/``), ``"nih"``
            (``PANCREAS_####/`` DICOM folders and ``label####.nii.gz`` files) or ``"auto"``
            (decided from the folder's content).
        n_phantom, seed: number of phantom cases and the seed of the first; used only when
            ``root`` is ``None`` (see :func:`phantom_cases`).

    Returns:
        ``[{"image": str, "label": str, "case_id": str}, ...]`` sorted by ``case_id``: file
        paths (for NIH, ``"image"`` is the DICOM series folder). With ``root=None``, the
        in-memory cases of :func:`phantom_cases`. Unpaired NIH cases or MSD files are left out
        with a :class:`UserWarning` that lists them.

    Raises:
        FileNotFoundError: ``root`` or a file named in ``dataset.json`` does not exist, or the
            folder holds no cases.
        ValueError: an unknown ``layout``, a file that is not NIfTI where NIfTI is expected, a
            patient folder without exactly one DICOM series, an unreadable ``dataset.json``
            or a case listed twice.
    """
    if layout not in ("auto", "msd", "nih"):
        raise ValueError(f"layout must be 'auto', 'msd' or 'nih', got {layout!r}")
    if root is None:
        return phantom_cases(n_phantom, seed)
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} is not a folder")
    if not any(root.iterdir()):
        raise FileNotFoundError(f"data folder {root} is empty: expected an MSD Task07_Pancreas or NIH Pancreas-CT folder")
    if layout == "auto":
        layout = detect_layout(root)
        if layout is None:
            raise FileNotFoundError(
                f"no cases found in {root}: expected an MSD folder (dataset.json, imagesTr/, labelsTr/) "
                "or NIH Pancreas-CT folders (PANCREAS_0001/.../*.dcm with label0001.nii.gz)"
            )
    cases = _find_msd(root) if layout == "msd" else _find_nih(root)
    if not cases:
        raise FileNotFoundError(f"no paired {layout.upper()} cases found in {root}")
    return cases


def detect_layout(root: str | os.PathLike) -> str | None:
    """``"msd"`` for a folder with ``dataset.json`` or ``imagesTr/``, ``"nih"`` for one with
    ``PANCREAS_####`` patient folders or DICOM files, else ``None``."""
    root = Path(root)
    if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir():
        return "msd"
    if nih_patient_folders(root) or any(not is_hidden(p) for p in root.rglob("*.dcm")):
        return "nih"
    return None


def _find_msd(root: Path) -> list[dict]:
    index = root / "dataset.json"
    if index.is_file():
        try:
            entries = load_decathlon_datalist(index, is_segmentation=True, data_list_key="training", base_dir=root)
            pairs = [(Path(e["image"]), Path(e["label"])) for e in entries]
        except (json.JSONDecodeError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{index}: expected JSON with a 'training' list of {{'image': ..., 'label': ...}}, could not read it ({err})"
            ) from err
    else:
        images, labels = root / "imagesTr", root / "labelsTr"
        if not labels.is_dir():
            raise FileNotFoundError(f"MSD folder {root} has imagesTr/ but no labelsTr/ (and no dataset.json)")
        by_name = {p.name: p for p in labels.iterdir() if not is_hidden(p)}
        found = sorted(p for p in images.iterdir() if not is_hidden(p))
        pairs = [(p, by_name[p.name]) for p in found if p.name in by_name]
        unpaired = sorted({p.name for p in found} ^ set(by_name))
        if unpaired:
            warnings.warn(f"MSD folder {root}: {len(unpaired)} file(s) without a partner left out: {', '.join(unpaired)}", stacklevel=3)
    cases = []
    for image, label in pairs:
        for path in (image, label):
            if not path.is_file():
                raise FileNotFoundError(f"MSD case file {path} does not exist")
            if not is_nifti(path):
                raise ValueError(f"MSD case file {path} is not NIfTI: expected a .nii or .nii.gz file")
        cases.append({"image": str(image), "label": str(label), "case_id": strip_nifti(image.name)})
    return _unique_sorted(cases, root)


def nih_patient_folders(root: str | os.PathLike) -> list[Path]:
    """The ``PANCREAS_####`` patient folders anywhere under ``root`` (not looking inside a patient), in walk order."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        patients = sorted(n for n in dirnames if _NIH_CASE.match(n))
        found += [Path(dirpath) / n for n in patients]
        dirnames[:] = sorted(n for n in dirnames if n not in patients)  # do not descend into a patient
    return found


def dicom_series(patient: str | os.PathLike) -> Path:
    """The one folder under ``patient`` that holds ``.dcm`` files (hidden files and folders
    aside). Raises ``ValueError`` naming the folder when there is none, or more than one."""
    patient = Path(patient)
    folders = sorted(
        {p.parent for p in patient.rglob("*.dcm") if p.is_file() and not any(is_hidden(q) for q in p.relative_to(patient).parts)}
    )
    if len(folders) != 1:
        what = "no DICOM (.dcm) files" if not folders else f"{len(folders)} DICOM series folders ({', '.join(map(str, folders))})"
        raise ValueError(f"NIH case folder {patient}: expected one DICOM series, found {what}")
    return folders[0]


def _find_nih(root: Path) -> list[dict]:
    images = {}
    for folder in nih_patient_folders(root):
        number = int(_NIH_CASE.match(folder.name).group(1))
        if number in images:
            raise ValueError(f"NIH case {number:04d} appears twice: {images[number]} and {folder}")
        images[number] = folder
    labels = {}
    for path in sorted(root.rglob("label*")):
        match = _NIH_LABEL.match(path.name)
        if match and path.is_file():
            number = int(match.group(1))
            if number in labels:
                raise ValueError(f"NIH label {number:04d} appears twice: {labels[number]} and {path}")
            labels[number] = path
    only_image = sorted(set(images) - set(labels))
    only_label = sorted(set(labels) - set(images))
    if only_image or only_label:
        parts = []
        if only_image:
            parts.append("no label for " + ", ".join(f"PANCREAS_{n:04d}" for n in only_image))
        if only_label:
            parts.append("no image for " + ", ".join(labels[n].name for n in only_label))
        warnings.warn(f"NIH folder {root}: unpaired cases left out: {'; '.join(parts)}", stacklevel=3)
    cases = [
        {"image": str(dicom_series(images[n])), "label": str(labels[n]), "case_id": f"PANCREAS_{n:04d}"}
        for n in sorted(set(images) & set(labels))
    ]
    return _unique_sorted(cases, root)


def _unique_sorted(cases: list[dict], root: Path) -> list[dict]:
    ids = [c["case_id"] for c in cases]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ValueError(f"data folder {root}: case ids listed more than once: {', '.join(twice)}")
    return sorted(cases, key=lambda c: c["case_id"])


def phantom_cases(
    n: int, seed: int, shape: Sequence[int] = (96, 96, 64), spacing: Sequence[float] = (2.0, 2.0, 2.5)
) -> list[dict]:
    """Make ``n`` phantom cases in memory, seeds ``seed, seed + 1, ...``.

    Args:
        n: number of cases, at least 1.
        seed: seed of the first case.
        shape, spacing: passed to :func:`~examples.pancreas.phantom.generate_phantom`.

    Returns:
        ``[{"image": MetaTensor[1, X, Y, Z], "label": MetaTensor[1, X, Y, Z], "case_id": str}]``:
        float32 HU image and float32 label (0 or 1), both carrying the phantom's affine, as
        :class:`~examples.pancreas.transforms.LoadCased` would give for files.

    Raises:
        ValueError: ``n`` is below 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    cases = []
    for s in range(int(seed), int(seed) + int(n)):
        case = generate_phantom(s, shape=shape, spacing=spacing)
        affine = torch.as_tensor(case["affine"], dtype=torch.float64)
        entry = {"case_id": case["case_id"]}
        for key in _KEYS:
            meta = {"filename_or_obj": case["case_id"], "original_affine": affine.clone(), "space": "RAS"}
            array = case[key][None].astype(np.float32)
            entry[key] = MetaTensor(torch.from_numpy(array), affine=affine.clone(), meta=meta)
        cases.append(entry)
    return cases


def held_out_phantom_seeds(n: int, data_seed: int) -> range:
    """Seeds of the ``n`` held-out phantom test cases of ``data_seed``.

    They run from ``PHANTOM_TEST_SEED + data_seed`` up, apart from the seeds ``data_seed,
    data_seed + 1, ...`` of the phantoms trained and validated on (:func:`phantom_cases` of
    ``data_seed``): the two sets share no case while there are fewer than ``PHANTOM_TEST_SEED``
    of the latter. The same ``n`` and ``data_seed`` always give the same test cases.

    Raises:
        ValueError: ``n`` is negative.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    start = PHANTOM_TEST_SEED + int(data_seed)
    return range(start, start + int(n))



def load_cases(cfg: Any) -> list[dict[str, Any]]:
    """The cases of a run's :class:`~examples.pancreas.config.Config`: those of ``cfg.data``
    (:func:`find_cases` with ``cfg.layout``), or with ``cfg.data = None`` the
    ``cfg.phantom_cases`` phantoms seeded by ``cfg.data_seed`` followed by the
    ``cfg.phantom_test_cases`` held-out ones (:func:`held_out_phantom_seeds`), of
    ``cfg.phantom_shape`` and ``cfg.phantom_spacing``."""
    if cfg.data is None:
        geometry = dict(shape=cfg.phantom_shape, spacing=cfg.phantom_spacing)
        held_out = held_out_phantom_seeds(cfg.phantom_test_cases, cfg.data_seed)
        cases = phantom_cases(cfg.phantom_cases, cfg.data_seed, **geometry)
        return cases + (phantom_cases(len(held_out), held_out.start, **geometry) if held_out else [])
    return find_cases(cfg.data, layout=cfg.layout)
