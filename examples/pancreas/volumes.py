"""Checks of volume files and grids that do not need the MONAI transforms: a file named NIfTI
that is not one, a DICOM series that would stack into a wrong volume, label values, whether two
voxel grids are the same one, and a case's files checked by their headers, the image's data
stream and the label (:func:`check_case_files`, much cheaper than reading and resampling the image)."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .cases import is_nifti, visible_files

__all__ = [
    "nifti_problem",
    "nifti_data_problem",
    "check_series",
    "series_grid",
    "canonical_grid",
    "grid_disagreement",
    "unexpected_values",
    "check_case_files",
    "LABEL_VALUES",
    "AFFINE_TOL",
    "SLICE_STEP_TOL",
]

#: The values a label may hold: background, pancreas, tumour (the MSD's labels).
LABEL_VALUES = (0, 1, 2)

#: Largest distance (mm) allowed between where the image and the label put the same voxel.
AFFINE_TOL = 0.1

#: Slice steps of a DICOM series may differ from their median by this share (a missing slice: 100%).
SLICE_STEP_TOL = 0.1


def _series_headers(folder: Path, extra: Sequence[str] = ()) -> tuple[list[str], list[Any]]:
    """The names and headers (the position tags and ``extra``) of a series' slices, in
    instance-number order, after the checks of :func:`check_series`."""
    import pydicom

    visible = visible_files(folder)
    files = [p for p in visible if pydicom.misc.is_dicom(p)]
    fake = next((p for p in visible if p.suffix.lower() == ".dcm" and p not in files), None)
    if fake is not None:
        raise ValueError(f"{fake.name} is not a DICOM file (no DICM header)")
    if len(files) < 2:
        raise ValueError(f"expected a series folder of at least 2 slices, found {len(files)} DICOM file(s)")
    tags = ["SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient"]
    heads = [pydicom.dcmread(p, stop_before_pixels=True, specific_tags=tags + list(extra)) for p in files]
    lacking = next(((p, t) for p, h in zip(files, heads) for t in tags + list(extra) if t not in h), None)
    if lacking is not None:
        raise ValueError(f"slice {lacking[0].name} has no {lacking[1]}")
    uids = sorted({str(h.SeriesInstanceUID) for h in heads})
    if len(uids) > 1:
        raise ValueError(f"the folder holds {len(uids)} series ({', '.join(uids)}); give each its own folder")
    order = sorted(range(len(files)), key=lambda i: int(heads[i].InstanceNumber))
    names, heads = [files[i].name for i in order], [heads[i] for i in order]
    row_col = np.asarray(heads[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(row_col[:3], row_col[3:])
    z = np.array([float(normal @ np.asarray(h.ImagePositionPatient, dtype=np.float64)) for h in heads])
    steps = np.diff(z)
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
    return names, heads


def check_series(folder: str | os.PathLike) -> None:
    """Refuse a DICOM series folder that MONAI's ``PydicomReader`` would stack into a wrong
    volume: mixed series, slices without position tags, or slices whose positions along the
    slice normal, in instance-number order (the reader's stacking order), are not evenly spaced
    (a missing or duplicated slice). Hidden and non-DICOM files are left out, as the reader does.
    Reads the slices' headers only.

    Raises:
        ValueError: naming the slices at fault and what is wrong with them.
    """
    _series_headers(Path(folder))


def series_grid(folder: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of the volume a DICOM series folder holds, from its headers alone
    (checked as :func:`check_series` does): ``(columns, rows, slices)`` and the voxel-to-RAS
    (mm) affine of that array with the slices in instance-number order, the axes MONAI's
    ``PydicomReader`` gives (its slice order may be the reverse: :func:`canonical_grid` of both
    is the same grid)."""
    _, heads = _series_headers(Path(folder), extra=("Rows", "Columns", "PixelSpacing"))
    first, last = (np.asarray(h.ImagePositionPatient, dtype=np.float64) for h in (heads[0], heads[-1]))
    row_col = np.asarray(heads[0].ImageOrientationPatient, dtype=np.float64)
    dy, dx = (float(v) for v in heads[0].PixelSpacing)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_col[:3] * dx, row_col[3:] * dy, (last - first) / (len(heads) - 1), first
    return (int(heads[0].Columns), int(heads[0].Rows), len(heads)), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def canonical_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` of the same grid with its axes in RAS order and direction, as MONAI's
    ``Orientationd(axcodes="RAS")`` (nibabel's ``io_orientation``) would give the array."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(affine)
    shape = tuple(int(n) for n in shape[:3])
    reordered = tuple(shape[int(np.flatnonzero(ornt[:, 0] == axis)[0])] for axis in range(3))
    return reordered, affine @ inv_ornt_aff(ornt, shape)


def grid_disagreement(
    shape: Sequence[int], affine: np.ndarray, other_shape: Sequence[int], other_affine: np.ndarray, tol: float = AFFINE_TOL
) -> Optional[str]:
    """How two voxel grids differ, or ``None`` when they are one grid: ``"different shapes"``, or
    ``"voxels D mm apart"`` when some voxel's world position (``affine``: voxel to mm, 4x4)
    differs by more than ``tol`` mm, measured at the grid's corners, where an affine difference
    is largest. Compare grids in the same axis order (e.g. both oriented to RAS)."""
    shape, other_shape = tuple(int(n) for n in shape), tuple(int(n) for n in other_shape)
    if shape != other_shape:
        return "different shapes"
    a, b = np.asarray(affine, dtype=np.float64), np.asarray(other_affine, dtype=np.float64)
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], [1], indexing="ij")).reshape(len(shape) + 1, -1)
    offset = float(np.abs((a - b) @ corners).max())
    return None if offset <= tol else f"voxels {offset:.3g} mm apart"


def nifti_problem(path: str | os.PathLike) -> Optional[str]:
    """Why the file ``path`` is not a NIfTI file (its gzip stream, its header's size and magic:
    ``n+1``/``ni1`` for NIfTI-1, ``n+2``/``ni2`` for NIfTI-2), or ``None``. Reads its first
    bytes only, so a file cut short after its header passes."""
    path = Path(path)
    gz_name = path.name.lower().endswith(".gz")
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            if compressed != gz_name:
                return "its content is gzip-compressed but its name does not end in .gz" if compressed else "it is not gzip-compressed, as its .gz name says"
            try:
                header = gzip.GzipFile(fileobj=f).read(544) if compressed else f.read(544)
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                return f"its gzip stream is cut short or damaged ({type(e).__name__}: {e})"
    except OSError as e:
        return f"it cannot be read ({type(e).__name__}: {e})"
    sizes = {int.from_bytes(header[:4], order) for order in ("little", "big")}
    if (348 in sizes and header[344:347] in (b"n+1", b"ni1")) or (540 in sizes and header[4:7] in (b"n+2", b"ni2")):
        return None
    return "it has no NIfTI header (sizeof_hdr 348 with magic n+1, or 540 with n+2)"


def nifti_data_problem(path: str | os.PathLike, image: Any) -> Optional[str]:
    """Why the voxel data of the NIfTI file ``path`` cannot be read in full, or ``None``.

    ``image`` is the file as nibabel loads it (lazily: its header and data proxy): the data need
    ``offset + prod(shape) * itemsize`` bytes. A compressed file is streamed through once
    without being kept (its gzip check sum and length catch a file cut short or damaged; about a
    second for a CT volume), an uncompressed one is measured.
    """
    path = Path(path)
    proxy = image.dataobj
    need = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    if not path.name.lower().endswith(".gz"):
        have = path.stat().st_size
    else:
        have = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    have += len(chunk)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            return f"its gzip stream is cut short or damaged after {have} bytes of data ({type(e).__name__}: {e})"
    if have < need:
        return f"it holds {have} bytes where its header's shape {tuple(proxy.shape)} of {np.dtype(proxy.dtype)} needs {need}"
    return None


def unexpected_values(values: Iterable[float], allowed: Sequence[int] = LABEL_VALUES) -> Optional[str]:
    """``"has values 3, 7; expected only [0, 1, 2]"`` for the label ``values`` outside ``allowed``, or ``None``."""
    bad = sorted(float(v) for v in values if v not in allowed)
    if not bad:
        return None
    shown = ", ".join(f"{v:g}" for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
    return f"has values {shown}; expected only {sorted(allowed)}"


def _nifti(path: Path, key: str, case: str):
    """The header of a NIfTI file (nibabel, lazily: no voxel data read), or a one-line ``ValueError``."""
    import nibabel as nib

    why = nifti_problem(path)
    if why is not None:
        raise ValueError(f"case {case}: {key} {path} is not a NIfTI file: {why}")
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises many types; name the file instead
        raise ValueError(f"case {case}: could not read {key} {path} as NIfTI: {type(e).__name__}: {' '.join(str(e).split())}") from None


def check_case_files(case: Mapping[str, Any], tol: float = AFFINE_TOL) -> None:
    """Check a case's files as the transforms would, without decoding the image: the image is a
    NIfTI file with a header (:func:`nifti_problem`) and all its data (:func:`nifti_data_problem`)
    or a DICOM series folder (:func:`series_grid`), the label a readable NIfTI file with values in :data:`LABEL_VALUES`,
    and both hold the same grid once oriented to RAS (:func:`grid_disagreement`). In-memory
    cases (the phantom's arrays) pass: they were made, not read.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: one line naming the case, the file and what is wrong.
    """
    cid, image, label = str(case.get("case_id", "?")), case["image"], case["label"]
    if not isinstance(image, (str, os.PathLike)) or not isinstance(label, (str, os.PathLike)):
        return
    image, label = Path(image), Path(label)
    for key, path in (("image", image), ("label", label)):
        if not path.exists():
            raise FileNotFoundError(f"case {cid}: {key} {path} does not exist")
    if image.is_dir():
        try:
            image_grid = series_grid(image)
        except ValueError as e:
            raise ValueError(f"case {cid}: image {image} is not a readable DICOM series: {e}") from None
    elif is_nifti(image):
        header = _nifti(image, "image", cid)
        why = nifti_data_problem(image, header)
        if why is not None:
            raise ValueError(f"case {cid}: image {image} cannot be read in full: {why}")
        image_grid = (header.shape[:3], header.affine)
    else:
        return  # single DICOM files: read by the transforms
    seg = _nifti(label, "label", cid)
    try:
        values = np.unique(np.asanyarray(seg.dataobj))
    except Exception as e:  # a cut-off or damaged file: zlib, EOF, nibabel errors
        raise ValueError(f"case {cid}: could not read label {label} as NIfTI: {type(e).__name__}: {' '.join(str(e).split())}") from None
    bad = unexpected_values(values.tolist())
    if bad:
        raise ValueError(f"case {cid}: label {label} {bad}")
    (shape, affine), (l_shape, l_affine) = canonical_grid(*image_grid), canonical_grid(seg.shape, seg.affine)
    why = grid_disagreement(shape, affine, l_shape, l_affine, tol)
    if why:
        raise ValueError(
            f"case {cid}: image {image} and label {label} geometries disagree after orientation to RAS "
            f"({why}, tolerance {tol} mm): image shape {shape}, label shape {l_shape}"
        )
