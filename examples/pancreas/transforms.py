"""MONAI transforms of the pancreas example: reading a case, checking it, and preprocessing it
for training, evaluation and prediction.

The transforms read the files (MONAI ``NibabelReader`` / ``PydicomReader``; a DICOM series must
have evenly spaced slices, :func:`~examples.pancreas.volumes.check_series`, so that a missing
slice is an error rather than a silently wrong geometry), check the labels, put image and label
in RAS orientation through their affines and refuse a pair whose geometries then disagree,
resample to ``cfg.spacing`` (bilinear image, nearest label), clip and scale the HU window to
[0, 1], and, for training, pad or refuse volumes smaller than the patch, sample patches around
the pancreas and augment. The case dicts come from :mod:`examples.pancreas.cases`.

The ``cfg`` of :func:`train_transforms` / :func:`eval_transforms` is any object with the
attributes ``spacing`` (mm, ``(x, y, z)``), ``hu_window`` (``(low, high)`` HU),
``patch_size`` (voxels), ``pos_neg_ratio``, ``num_samples``, ``keep_tumour`` and ``augment``;
``allow_pad`` (default True) is optional.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImage,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    Randomizable,
    RandFlipd,
    RandRotated,
    RandZoomd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from .cases import is_nifti
from .volumes import AFFINE_TOL, LABEL_VALUES, check_series, grid_disagreement, nifti_problem, unexpected_values

__all__ = [
    "train_transforms",
    "eval_transforms",
    "image_transforms",
    "split_at_first_random",
    "LoadCased",
    "CheckLabeld",
    "MergeTumourd",
    "CheckGeometryd",
    "CheckPatchd",
]

_KEYS = ("image", "label")

# MONAI's LoadImage builds every default reader, and its nvImageCodec DICOM reader logs that the
# optional GPU codec is missing each time: noise on every machine without it.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").addFilter(lambda r: "nvImageCodec is not available" not in r.getMessage())


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
        ValueError: a path that is neither NIfTI nor DICOM, a NIfTI name on a file that is not
            one (:func:`~examples.pancreas.volumes.nifti_problem`), a file the reader cannot read, or
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
        if is_nifti(path):
            why = None if path.is_dir() else nifti_problem(path)
            if why is not None:
                raise ValueError(f"case {case}: {key} {path} is not a NIfTI file: {why}")
            loader, kind = self._nifti, "NIfTI"
        elif path.is_dir() or path.suffix.lower() == ".dcm":
            loader, kind = self._dicom, "DICOM"
        else:
            raise ValueError(f"case {case}: {key} {path} is neither NIfTI (.nii, .nii.gz) nor DICOM (.dcm files or a series folder)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if path.is_dir():
                    check_series(path)
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

    def __init__(self, keys="label", allowed: Sequence[int] = LABEL_VALUES):
        super().__init__(keys)
        self.allowed = sorted(allowed)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            bad = unexpected_values(torch.unique(torch.as_tensor(d[key])).tolist(), self.allowed)
            if bad:
                raise ValueError(f"case {_case(d)}: label {_source(d[key])} {bad}")
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
        a_img, a_lab = np.asarray(image.affine, dtype=np.float64), np.asarray(label.affine, dtype=np.float64)
        why = grid_disagreement(image.shape[1:], a_img, label.shape[1:], a_lab, self.tol)
        if why is None:
            return d
        with np.printoptions(precision=3, suppress=True):
            raise ValueError(
                f"case {_case(d)}: image and label geometries disagree after orientation to RAS ({why}, tolerance {self.tol} mm):\n"
                f"  image {_source(image)}: shape {tuple(image.shape[1:])}, affine\n{a_img}\n"
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


def split_at_first_random(transform: Compose) -> tuple[Compose, Compose]:
    """``(head, tail)``: the steps of ``transform`` (flattened) before its first random one, and
    the rest, each as a Compose of ``transform``'s type. The head is deterministic: a
    :class:`monai.data.CacheDataset` can run it once per case."""
    steps = list(transform.flatten().transforms)
    cut = next((i for i, t in enumerate(steps) if isinstance(t, Randomizable)), len(steps))
    return type(transform)(steps[:cut]), type(transform)(steps[cut:])
