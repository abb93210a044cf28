"""Cases, splits and MONAI transforms for the pancreas example.

Three sources give the same case dicts, ``{"image": ..., "label": ..., "case_id": str}``,
which the same transforms accept:

* the Medical Segmentation Decathlon ``Task07_Pancreas`` folder (``dataset.json``,
  ``imagesTr/*.nii.gz``, ``labelsTr/*.nii.gz``; labels 0 background, 1 pancreas, 2 tumour),
* the NIH Pancreas-CT collection (TCIA): one DICOM series per patient under
  ``PANCREAS_0001/...`` and labels ``label0001.nii.gz`` in a labels folder or beside them,
* the built-in synthetic phantom (:mod:`examples.pancreas.phantom`), generated in memory.

Nothing is downloaded: bring the data as a folder. The transforms read the files (MONAI
``NibabelReader`` / ``PydicomReader``), check the labels, put image and label in RAS
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
import os
import re
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.transforms import (
    Compose,
    EnsureTyped,
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

from .phantom import generate_phantom

__all__ = [
    "find_cases",
    "phantom_cases",
    "held_out_phantom_seeds",
    "PHANTOM_TEST_SEED",
    "make_splits",
    "save_splits",
    "load_splits",
    "train_transforms",
    "eval_transforms",
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
        if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir():
            layout = "msd"
        elif _nih_patient_folders(root) or any(root.rglob("*.dcm")):
            layout = "nih"
        else:
            raise FileNotFoundError(
                f"no cases found in {root}: expected an MSD folder (dataset.json, imagesTr/, labelsTr/) "
                "or NIH Pancreas-CT folders (PANCREAS_0001/.../*.dcm with label0001.nii.gz)"
            )
    cases = _find_msd(root) if layout == "msd" else _find_nih(root)
    if not cases:
        raise FileNotFoundError(f"no paired {layout.upper()} cases found in {root}")
    return cases


def _find_msd(root: Path) -> list[dict]:
    index = root / "dataset.json"
    if index.is_file():
        try:
            entries = json.loads(index.read_text())["training"]
            pairs = [(root / e["image"], root / e["label"]) for e in entries]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{index}: expected JSON with a 'training' list of {{'image': ..., 'label': ...}}, could not read it ({err})"
            ) from err
    else:
        images, labels = root / "imagesTr", root / "labelsTr"
        if not labels.is_dir():
            raise FileNotFoundError(f"MSD folder {root} has imagesTr/ but no labelsTr/ (and no dataset.json)")
        by_name = {p.name: p for p in labels.iterdir() if not p.name.startswith(".")}
        found = sorted(p for p in images.iterdir() if not p.name.startswith("."))
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


def _dicom_series(patient: Path) -> Path:
    folders = sorted({p.parent for p in patient.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm"})
    if len(folders) != 1:
        what = "no DICOM (.dcm) files" if not folders else f"{len(folders)} DICOM series folders ({', '.join(map(str, folders))})"
        raise ValueError(f"NIH case folder {patient}: expected one DICOM series, found {what}")
    return folders[0]


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
        {"image": str(_dicom_series(images[n])), "label": str(labels[n]), "case_id": f"PANCREAS_{n:04d}"}
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
    validation set and the rest the training set. With ``folds=k``, the remaining cases are
    cut into ``k`` near-equal folds: fold ``fold`` is the validation set and the others the
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
        parts = np.array_split(np.arange(len(rest)), folds)
        val = [rest[i] for i in parts[fold]]
        train = [rest[i] for p, part in enumerate(parts) if p != fold for i in part]
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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(splits, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        ValueError: a path that is neither NIfTI nor DICOM, or a file the reader cannot read;
            the message names the case and the file.
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


def _common(cfg) -> list:
    """Reading, checks and resampling shared by training and evaluation."""
    low, high = (float(v) for v in cfg.hu_window)
    return [
        LoadCased(_KEYS),
        CheckLabeld("label"),
        MergeTumourd("label", keep_tumour=bool(cfg.keep_tumour)),
        Orientationd(_KEYS, axcodes="RAS", labels=None),
        CheckGeometryd(_KEYS),
        Spacingd(_KEYS, pixdim=tuple(float(s) for s in cfg.spacing), mode=("bilinear", "nearest")),
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(_KEYS, dtype=torch.float32),
    ]


def train_transforms(cfg) -> Compose:
    """Transforms from a case dict to ``cfg.num_samples`` training patches.

    Read, check labels (values in {0, 1, 2}), merge tumour into pancreas unless
    ``cfg.keep_tumour``, orient to RAS, check that image and label share one grid, resample
    to ``cfg.spacing`` (bilinear image, nearest label), clip ``cfg.hu_window`` and scale it to
    [0, 1], pad volumes smaller than ``cfg.patch_size`` (or raise ``ValueError`` when
    ``cfg.allow_pad`` is False), sample patches centred on pancreas or on body voxels in the
    ratio ``cfg.pos_neg_ratio`` : 1, and, if ``cfg.augment``, flip, rotate slightly and zoom.

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
        RandCropByPosNegLabeld(
            _KEYS,
            label_key="label",
            spatial_size=patch,
            pos=float(cfg.pos_neg_ratio),
            neg=1.0,
            num_samples=int(cfg.num_samples),
            image_key="image",
            image_threshold=0.0,
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
    :func:`train_transforms`, without padding, cropping or augmentation. The outputs are
    MetaTensors that record every spatial step, so a prediction can be brought back to the
    original grid with ``monai.transforms.Invertd(keys="pred", transform=tf, orig_keys="image")``,
    where ``tf`` is the very Compose that made the input (MONAI matches transforms by
    identity).

    Returns:
        A :class:`monai.transforms.Compose` mapping ``{"image", "label", "case_id"}`` to a dict
        with ``"image"`` (``MetaTensor[1, X', Y', Z']`` float32 in [0, 1]) and ``"label"``
        (``MetaTensor[1, X', Y', Z']`` float32 class indices) at ``cfg.spacing``.
    """
    _check_cfg(cfg)
    return _Compose(_common(cfg))
