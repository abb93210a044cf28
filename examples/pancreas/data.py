"""Cases, splits and MONAI transforms for the pancreas example.

Three sources give the same case dicts, ``{"image": ..., "label": ..., "case_id": str}``,
which the same transforms accept:

* the Medical Segmentation Decathlon ``Task07_Pancreas`` folder (``dataset.json``,
  ``imagesTr/*.nii.gz``, ``labelsTr/*.nii.gz``; labels 0 background, 1 pancreas, 2 tumour),
* the NIH Pancreas-CT collection (TCIA): one DICOM series per patient under
  ``PANCREAS_0001/...`` and labels ``label0001.nii.gz`` in a labels folder or beside them,
* the built-in synthetic phantom (:mod:`examples.pancreas.phantom`), generated in memory.

Nothing is downloaded: bring the data as a folder. Hidden files (``._*`` macOS resource forks,
dotfiles) are never taken for data. The transforms read the files (MONAI ``NibabelReader`` /
``PydicomReader``; a DICOM series must have evenly spaced slices, so that a missing slice is an
error rather than a silently wrong geometry), check the labels, put image and label in RAS
orientation through their affines and refuse a pair whose geometries then disagree, resample
to ``cfg.spacing`` (bilinear image, nearest label), clip and scale the HU window to [0, 1],
and, for training, pad or refuse volumes smaller than the patch, sample patches around the
pancreas and augment.

The ``cfg`` of :func:`train_transforms` / :func:`eval_transforms` is any object with the
attributes ``spacing`` (mm, ``(x, y, z)``), ``hu_window`` (``(low, high)`` HU),
``patch_size`` (voxels), ``pos_neg_ratio``, ``num_samples``, ``keep_tumour`` and ``augment``;
``allow_pad`` (default True) is optional.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader, PydicomReader, load_decathlon_datalist, partition_dataset, select_cross_validation_folds
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImage,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotated,
    RandZoomd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from attention_gates.files import atomic_write

from .phantom import generate_phantom

__all__ = [
    "find_cases",
    "is_hidden",
    "detect_layout",
    "dicom_series",
    "phantom_cases",
    "held_out_phantom_seeds",
    "PHANTOM_TEST_SEED",
    "make_splits",
    "save_splits",
    "load_splits",
    "train_transforms",
    "eval_transforms",
    "image_transforms",
    "LoadCased",
    "CheckLabeld",
    "MergeTumourd",
    "CheckGeometryd",
    "CheckPatchd",
    "AFFINE_TOL",
]

#: Seed of the first held-out phantom test case, plus ``data_seed`` (:func:`held_out_phantom_seeds`).
PHANTOM_TEST_SEED = 100_000

#: Largest distance (mm) allowed between where the image and the label put the same voxel.
AFFINE_TOL = 0.1

_NIFTI = (".nii", ".nii.gz")
_NIH_CASE = re.compile(r"^PANCREAS_(\d+)$", re.IGNORECASE)
_NIH_LABEL = re.compile(r"^label(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_KEYS = ("image", "label")
#: Slice steps of a DICOM series may differ from their median by this share (a missing slice: 100%).
SLICE_STEP_TOL = 0.1

# MONAI's LoadImage builds every default reader, and its nvImageCodec DICOM reader logs that the
# optional GPU codec is missing each time: noise on every machine without it.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").addFilter(lambda r: "nvImageCodec is not available" not in r.getMessage())


def is_hidden(path: str | os.PathLike) -> bool:
    """Whether a file is hidden (a dotfile, or a macOS ``._*`` resource fork): never data."""
    return Path(path).name.startswith(".")


def _visible_files(folder: Path) -> list[Path]:
    """The files directly in ``folder``, hidden ones (:func:`is_hidden`) left out, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not is_hidden(p))


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI)


def _strip_nifti(name: str) -> str:
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


# ----------------------------------------------------------------------------- cases


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
    if _nih_patient_folders(root) or any(not is_hidden(p) for p in root.rglob("*.dcm")):
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
            if not _is_nifti(path):
                raise ValueError(f"MSD case file {path} is not NIfTI: expected a .nii or .nii.gz file")
        cases.append({"image": str(image), "label": str(label), "case_id": _strip_nifti(image.name)})
    return _unique_sorted(cases, root)


def _nih_patient_folders(root: Path) -> list[Path]:
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


def _check_series(folder: Path) -> None:
    """Refuse a DICOM series folder that MONAI's ``PydicomReader`` would stack into a wrong
    volume: mixed series, slices without position tags, or slices whose positions along the
    slice normal, in instance-number order (the reader's stacking order), are not evenly spaced
    (a missing or duplicated slice). Hidden and non-DICOM files are left out, as the reader does."""
    import pydicom

    visible = _visible_files(folder)
    files = [p for p in visible if pydicom.misc.is_dicom(p)]
    fake = next((p for p in visible if p.suffix.lower() == ".dcm" and p not in files), None)
    if fake is not None:
        raise ValueError(f"{fake.name} is not a DICOM file (no DICM header)")
    if len(files) < 2:
        raise ValueError(f"expected a series folder of at least 2 slices, found {len(files)} DICOM file(s)")
    tags = ["SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient"]
    heads = [pydicom.dcmread(p, stop_before_pixels=True, specific_tags=tags) for p in files]
    lacking = next(((p, t) for p, h in zip(files, heads) for t in tags if t not in h), None)
    if lacking is not None:
        raise ValueError(f"slice {lacking[0].name} has no {lacking[1]}")
    uids = sorted({str(h.SeriesInstanceUID) for h in heads})
    if len(uids) > 1:
        raise ValueError(f"the folder holds {len(uids)} series ({', '.join(uids)}); give each its own folder")
    order = sorted(range(len(files)), key=lambda i: int(heads[i].InstanceNumber))
    row_col = np.asarray(heads[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(row_col[:3], row_col[3:])
    z = np.array([float(normal @ np.asarray(heads[i].ImagePositionPatient, dtype=np.float64)) for i in order])
    steps = np.diff(z)
    names = [files[i].name for i in order]
    wrong = np.sign(steps) != np.sign(np.median(steps))
    if wrong.any() or not steps.any():
        k = int(np.flatnonzero(wrong)[0]) if wrong.any() else 0
        raise ValueError(
            f"slices {names[k]} and {names[k + 1]} lie at {z[k]:.2f} and {z[k + 1]:.2f} mm along the "
            "slice normal: the positions repeat or do not follow the instance numbers"
        )
    median = float(np.median(np.abs(steps)))
    k = int(np.argmax(np.abs(np.abs(steps) - median)))
    if abs(abs(steps[k]) - median) > SLICE_STEP_TOL * median:
        raise ValueError(
            f"slices {names[k]} and {names[k + 1]} are {abs(steps[k]):.3g} mm apart, the other slices "
            f"{median:.3g} mm: a slice is missing or the spacing is uneven"
        )


def _find_nih(root: Path) -> list[dict]:
    images = {}
    for folder in _nih_patient_folders(root):
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
        :class:`LoadCased` would give for files.

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


# ----------------------------------------------------------------------------- splits


def make_splits(
    case_ids: Sequence[str],
    seed: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, list[str]]:
    """Split case ids into train, validation and test sets, deterministically.

    The ids are sorted, then shuffled with ``seed``. The first ``round(test_fraction * n)``
    are the test set. Without ``folds``, the next ``round(val_fraction * n)`` are the
    validation set and the rest the training set (every case lands in one set, which MONAI's
    ratio ``partition_dataset`` does not promise). With ``folds=k``, the remaining cases are
    dealt into ``k`` near-equal folds (MONAI's ``partition_dataset`` and
    ``select_cross_validation_folds``): fold ``fold`` is the validation set and the others the
    training set (``val_fraction`` is then unused), so over ``fold = 0 .. k-1`` every non-test
    case is validated exactly once, and the test set stays the same.

    Args:
        case_ids: unique case ids, at least 2.
        seed: shuffling seed.
        val_fraction, test_fraction: shares of the cases, each in ``[0, 1)``, sum below 1.
        folds: number of cross-validation folds (>= 2), or ``None``.
        fold: which fold validates, ``0 <= fold < folds``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, disjoint, each sorted; the
        training set is never empty.

    Raises:
        ValueError: repeated ids, fractions out of range, a bad ``folds``/``fold`` or too
            few cases for the request.
    """
    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"case_ids must be unique, repeated: {', '.join(twice)}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    n_test = int(round(test_fraction * len(ids)))
    test, rest = shuffled[:n_test], shuffled[n_test:]
    if folds is None:
        n_val = int(round(val_fraction * len(ids)))
        val, train = rest[:n_val], rest[n_val:]
    else:
        if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
            raise ValueError(f"folds must be an int >= 2 or None, got {folds!r}")
        if not 0 <= fold < folds:
            raise ValueError(f"fold must be in [0, {folds}), got {fold}")
        if len(rest) < folds:
            raise ValueError(f"{folds} folds need at least {folds} non-test cases, got {len(rest)}")
        parts = partition_dataset(rest, num_partitions=folds)
        val = select_cross_validation_folds(parts, fold)
        train = select_cross_validation_folds(parts, [k for k in range(folds) if k != fold])
    if not train:
        raise ValueError(
            f"no training cases left: {len(ids)} cases, test_fraction={test_fraction}, val_fraction={val_fraction}, folds={folds}"
        )
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def save_splits(splits: Mapping[str, Sequence[str]], path: str | os.PathLike) -> None:
    """Write splits (``{"train": [...], "val": [...], "test": [...]}``) to a JSON file.

    The file is written to a temporary name in the same folder and moved into place, so a
    reader never sees half a file. Raises ``ValueError`` for splits :func:`load_splits` would
    refuse.
    """
    splits = _check_splits(splits, str(path))
    path = Path(path)
    atomic_write(path, json.dumps(splits, indent=2) + "\n")


def load_splits(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read splits written by :func:`save_splits`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, keys other than ``train``, ``val``, ``test``, ids that are not
            strings, or sets that overlap.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"splits file {path} is not JSON: {err}") from err
    return _check_splits(data, str(path))


def _check_splits(splits, where: str) -> dict[str, list[str]]:
    if not isinstance(splits, Mapping) or set(splits) != {"train", "val", "test"}:
        got = sorted(splits) if isinstance(splits, Mapping) else type(splits).__name__
        raise ValueError(f"splits {where}: expected the keys ['test', 'train', 'val'], got {got}")
    out = {}
    for key in ("train", "val", "test"):
        ids = splits[key]
        if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"splits {where}: {key!r} must be a list of case id strings, got {ids!r}")
        out[key] = list(ids)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        common = sorted(set(out[a]) & set(out[b]))
        if common:
            raise ValueError(f"splits {where}: {a!r} and {b!r} share cases {', '.join(common)}")
    return out


# ----------------------------------------------------------------------------- transforms


def _case(data: Mapping) -> str:
    return str(data.get("case_id", "?"))


def _source(value) -> str:
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", "<in memory>"))
    return str(value)


class LoadCased(MapTransform):
    """Read the image and label of a case: NIfTI files with MONAI's ``NibabelReader``, DICOM
    series (a folder, or ``.dcm`` files) with ``PydicomReader``.

    Each key becomes a float32 ``MetaTensor[1, X, Y, Z]`` carrying its affine (RAS mm).
    Values that already are tensors or arrays (the phantom's in-memory cases) pass through,
    with a channel dimension added to ``[X, Y, Z]`` arrays.

    Raises:
        ValueError: a path that is neither NIfTI nor DICOM, a file the reader cannot read, or
            a DICOM series folder with fewer than 2 slices, mixed series, or unevenly spaced
            slices (a missing slice); the message names the case and the file.
        FileNotFoundError: a path that does not exist.
    """

    def __init__(self, keys=_KEYS):
        super().__init__(keys)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            self._nifti = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)
            self._dicom = LoadImage(reader=PydicomReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                d[key] = self._load(Path(value), key, _case(d))
            elif isinstance(value, (np.ndarray, torch.Tensor)):
                tensor = value if isinstance(value, MetaTensor) else MetaTensor(torch.as_tensor(value))
                d[key] = tensor[None] if tensor.ndim == 3 else tensor
            else:
                raise TypeError(f"case {_case(d)}: {key!r} must be a file path or an array, got {type(value).__name__}")
        return d

    def _load(self, path: Path, key: str, case: str) -> MetaTensor:
        if not path.exists():
            raise FileNotFoundError(f"case {case}: {key} {path} does not exist")
        if _is_nifti(path):
            loader, kind = self._nifti, "NIfTI"
        elif path.is_dir() or path.suffix.lower() == ".dcm":
            loader, kind = self._dicom, "DICOM"
        else:
            raise ValueError(f"case {case}: {key} {path} is neither NIfTI (.nii, .nii.gz) nor DICOM (.dcm files or a series folder)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if path.is_dir():
                    _check_series(path)
                image = loader(str(path))
            except Exception as err:  # the readers raise many types; name the file instead
                raise ValueError(f"case {case}: could not read {key} {path} as {kind}: {type(err).__name__}: {err}") from err
        # MONAI skips the files of a series it cannot read with a warning: make that an error
        failed = [str(w.message) for w in caught if str(w.message).startswith("Failed to read")]
        if failed:
            raise ValueError(f"case {case}: could not read {key} {path} as {kind}: {len(failed)} unreadable file(s); {failed[0]}")
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return image


class CheckLabeld(MapTransform):
    """Refuse a label with values outside ``allowed`` (default ``{0, 1, 2}``).

    Raises:
        ValueError: naming the case, the label's source and the unexpected values.
    """

    def __init__(self, keys="label", allowed: Sequence[int] = (0, 1, 2)):
        super().__init__(keys)
        self.allowed = sorted(allowed)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.unique(torch.as_tensor(d[key])).tolist()
            bad = [v for v in values if v not in self.allowed]
            if bad:
                shown = ", ".join(f"{v:g}" for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
                raise ValueError(f"case {_case(d)}: label {_source(d[key])} has values {shown}; expected only {self.allowed}")
        return d


class MergeTumourd(MapTransform):
    """Merge pancreas (1) and tumour (2) into one foreground class (1), unless ``keep_tumour``."""

    def __init__(self, keys="label", keep_tumour: bool = False):
        super().__init__(keys)
        self.keep_tumour = keep_tumour

    def __call__(self, data):
        d = dict(data)
        if not self.keep_tumour:
            for key in self.key_iterator(d):
                d[key] = (d[key] > 0).to(d[key].dtype)
        return d


class CheckGeometryd(MapTransform):
    """Refuse an image and label whose grids differ: spatial shape, or the world position of
    any voxel by more than ``tol`` mm (measured at the grid's corners, where an affine
    difference is largest). Run it after orientation, so that a label stored with another
    axis order or flips but the same world geometry passes.

    Raises:
        ValueError: naming the case, both sources, shapes and affines.
    """

    def __init__(self, keys=_KEYS, tol: float = AFFINE_TOL):
        super().__init__(keys)
        self.tol = tol

    def __call__(self, data):
        d = dict(data)
        image_key, label_key = self.keys
        image, label = d[image_key], d[label_key]
        shape = tuple(image.shape[1:])
        a_img, a_lab = np.asarray(image.affine, dtype=np.float64), np.asarray(label.affine, dtype=np.float64)
        if shape == tuple(label.shape[1:]):
            corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], [1], indexing="ij")).reshape(len(shape) + 1, -1)
            offset = float(np.abs((a_img - a_lab) @ corners).max())
            if offset <= self.tol:
                return d
            why = f"voxels {offset:.3g} mm apart"
        else:
            why = "different shapes"
        with np.printoptions(precision=3, suppress=True):
            raise ValueError(
                f"case {_case(d)}: image and label geometries disagree after orientation to RAS ({why}, tolerance {self.tol} mm):\n"
                f"  image {_source(image)}: shape {shape}, affine\n{a_img}\n"
                f"  label {_source(label)}: shape {tuple(label.shape[1:])}, affine\n{a_lab}"
            )


class CheckPatchd(MapTransform):
    """Refuse a volume smaller than the patch along any axis (the strict mode of the training
    transforms, ``cfg.allow_pad=False``; otherwise they pad).

    Raises:
        ValueError: naming the case, the resampled volume size and the patch size.
    """

    def __init__(self, keys="image", patch_size: Sequence[int] = (96, 96, 96)):
        super().__init__(keys)
        self.patch_size = tuple(int(p) for p in patch_size)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            size = tuple(d[key].shape[1:])
            if any(s < p for s, p in zip(size, self.patch_size)):
                raise ValueError(
                    f"case {_case(d)}: the resampled volume {size} is smaller than the patch {self.patch_size}; "
                    "use a smaller patch_size or allow padding (allow_pad=True)"
                )
        return d


class _Compose(Compose):
    """A MONAI Compose that lets the data's own errors through.

    MONAI wraps any exception raised inside a transform in ``RuntimeError("applying transform
    ...")``. For the errors that describe bad input (``ValueError``, ``FileNotFoundError``,
    ``TypeError``: wrong file kind, unexpected label values, disagreeing geometries, a patch
    larger than the volume) this re-raises the original, which names the case and the file.
    """

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as err:
            cause = err
            while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
                cause = cause.__cause__
            if isinstance(cause, (ValueError, FileNotFoundError, TypeError)):
                raise cause from None
            raise


def _check_cfg(cfg) -> None:
    missing = [a for a in ("spacing", "hu_window", "patch_size", "pos_neg_ratio", "num_samples", "keep_tumour", "augment") if not hasattr(cfg, a)]
    if missing:
        raise TypeError(f"cfg must have the attributes {', '.join(missing)} ({type(cfg).__name__} lacks them)")
    if len(cfg.spacing) != 3 or min(cfg.spacing) <= 0:
        raise ValueError(f"cfg.spacing must be three positive sizes in mm, got {cfg.spacing}")
    if len(cfg.hu_window) != 2 or cfg.hu_window[0] >= cfg.hu_window[1]:
        raise ValueError(f"cfg.hu_window must be (low, high) with low < high, got {cfg.hu_window}")
    if len(cfg.patch_size) != 3 or min(cfg.patch_size) < 1:
        raise ValueError(f"cfg.patch_size must be three sizes >= 1, got {cfg.patch_size}")


def _common(cfg, keys: Sequence[str] = _KEYS, native_label: bool = False) -> list:
    """Reading, checks and resampling shared by training, evaluation and prediction (``keys``:
    image and label, or the image alone); ``native_label`` keeps a copy of the label on the
    input's own grid (after orientation, before resampling) as ``"native_label"``."""
    low, high = (float(v) for v in cfg.hu_window)
    keys = tuple(keys)
    labelled = "label" in keys
    steps: list = [LoadCased(keys)]
    if labelled:
        steps += [CheckLabeld("label"), MergeTumourd("label", keep_tumour=bool(cfg.keep_tumour))]
    steps.append(Orientationd(keys, axcodes="RAS", labels=None))
    if labelled:
        steps.append(CheckGeometryd(keys))
    if native_label:
        steps.append(CopyItemsd("label", names="native_label"))
    return steps + [
        Spacingd(keys, pixdim=tuple(float(s) for s in cfg.spacing), mode=tuple("nearest" if k == "label" else "bilinear" for k in keys)),
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys, dtype=torch.float32),
    ]


def train_transforms(cfg) -> Compose:
    """Transforms from a case dict to ``cfg.num_samples`` training patches.

    Read, check labels (values in {0, 1, 2}), merge tumour into pancreas unless
    ``cfg.keep_tumour``, orient to RAS, check that image and label share one grid, resample
    to ``cfg.spacing`` (bilinear image, nearest label), clip ``cfg.hu_window`` and scale it to
    [0, 1], pad volumes smaller than ``cfg.patch_size`` (or raise ``ValueError`` when
    ``cfg.allow_pad`` is False), list the pancreas and body voxels once (MONAI's
    ``FgBgToIndicesd``, so that a cached volume is not searched again for every patch), sample
    patches centred on pancreas or on body voxels in the ratio ``cfg.pos_neg_ratio`` : 1, and,
    if ``cfg.augment``, flip, rotate slightly and zoom. Everything before the patch sampling is
    deterministic: a :class:`monai.data.CacheDataset` runs it once per case.

    Returns:
        A :class:`monai.transforms.Compose` mapping ``{"image", "label", "case_id"}`` to a list
        of ``cfg.num_samples`` dicts with ``"image"`` (``MetaTensor[1, *patch_size]`` float32 in
        [0, 1]) and ``"label"`` (``MetaTensor[1, *patch_size]`` float32 class indices).
    """
    _check_cfg(cfg)
    patch = tuple(int(p) for p in cfg.patch_size)
    size_guard = SpatialPadd(_KEYS, spatial_size=patch) if getattr(cfg, "allow_pad", True) else CheckPatchd("image", patch)
    steps = _common(cfg) + [
        size_guard,
        FgBgToIndicesd("label", image_key="image", image_threshold=0.0),
        RandCropByPosNegLabeld(
            _KEYS,
            label_key="label",
            spatial_size=patch,
            pos=float(cfg.pos_neg_ratio),
            neg=1.0,
            num_samples=int(cfg.num_samples),
            fg_indices_key="label_fg_indices",
            bg_indices_key="label_bg_indices",
        ),
    ]
    if cfg.augment:
        steps += [
            RandFlipd(_KEYS, prob=0.2, spatial_axis=0),
            RandFlipd(_KEYS, prob=0.2, spatial_axis=1),
            RandRotated(_KEYS, range_x=0.15, range_y=0.15, range_z=0.15, prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandZoomd(_KEYS, prob=0.2, min_zoom=0.9, max_zoom=1.1, mode=("trilinear", "nearest")),
        ]
    return _Compose(steps)


def eval_transforms(cfg) -> Compose:
    """Transforms from a case dict to a whole, resampled volume for sliding-window inference.

    The same reading, checks, orientation, resampling and intensity scaling as
    :func:`train_transforms`, without padding, cropping or augmentation, and a copy of the label
    on the input's own grid (oriented to RAS, not resampled) for metrics in the original
    geometry. The outputs are MetaTensors that carry their affines and record every spatial
    step, so a prediction can be brought back to the original grid, e.g. with
    ``monai.transforms.ResampleToMatch`` onto ``"native_label"``.

    Returns:
        A :class:`monai.transforms.Compose` mapping ``{"image", "label", "case_id"}`` to a dict
        with ``"image"`` (``MetaTensor[1, X', Y', Z']`` float32 in [0, 1]) and ``"label"``
        (``MetaTensor[1, X', Y', Z']`` float32 class indices) at ``cfg.spacing``, and
        ``"native_label"`` (``MetaTensor[1, X, Y, Z]``, named so because MONAI takes keys starting with ``"label_"`` for metadata) at the input's spacing.
    """
    _check_cfg(cfg)
    return _Compose(_common(cfg, native_label=True))


def image_transforms(cfg) -> Compose:
    """The image half of :func:`eval_transforms`, for volumes without a label (prediction):
    read, orient to RAS, resample to ``cfg.spacing`` (bilinear), clip and scale
    ``cfg.hu_window`` to [0, 1]. Maps ``{"image": path or array}`` to ``{"image":
    MetaTensor[1, X', Y', Z']}``; ``monai.transforms.Invertd(keys="pred", transform=tf,
    orig_keys="image")`` with this very Compose ``tf`` takes a prediction back to the input's
    grid (MONAI matches the transforms by identity)."""
    _check_cfg(cfg)
    return _Compose(_common(cfg, keys=("image",)))
