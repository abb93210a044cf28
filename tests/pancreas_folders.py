"""Small data folders for the pancreas example's tests, written the way the real downloads are
laid out: NIfTI volumes, an MSD ``Task07_Pancreas`` folder, CT DICOM series and an NIH
Pancreas-CT folder (DICOM series per patient, NIfTI labels)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SHAPE = (12, 10, 8)  # (x, y, z) of the small test volumes
CUBE = (slice(3, 7), slice(2, 6), slice(2, 5))  # the "pancreas": off-centre on every axis, so any flip moves it


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def ct_volume(value_in_cube: float = 300.0) -> np.ndarray:
    """HU ``[x, y, z]``: air, a body of soft tissue (40 HU) and the cube at ``value_in_cube``."""
    vol = np.full(SHAPE, -1000.0, dtype=np.float32)
    vol[1:-1, 1:-1, :] = 40.0  # soft tissue around the cube: background patches come from here
    vol[CUBE] = value_in_cube
    return vol


def cube_label(tumour: bool = False) -> np.ndarray:
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[CUBE] = 1
    if tumour:
        lab[4:6, 3:5, 3] = 2
    return lab


def write_msd(root: Path, n: int = 3, dataset_json: bool = True, spacing=(1.5, 1.5, 2.0)) -> Path:
    """``imagesTr/``, ``labelsTr/`` (pancreas and tumour) and ``dataset.json`` with ``n`` cases."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 20.0]
    entries = []
    for i in range(1, n + 1):
        name = f"pancreas_{i:03d}.nii.gz"
        write_nifti(root / "imagesTr" / name, ct_volume(), affine)
        write_nifti(root / "labelsTr" / name, cube_label(tumour=True), affine)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    if dataset_json:
        (root / "dataset.json").write_text(json.dumps({"name": "Pancreas", "training": entries}))
    return root


def write_dicom_series(folder: Path, vol: np.ndarray, spacing=(1.5, 1.25, 2.0), origin=(10.0, 20.0, 30.0),
                       reverse: bool = False, skip: tuple[int, ...] = ()) -> np.ndarray:  # fmt: skip
    """Write ``vol`` (HU, [columns x, rows y, slices z] in LPS directions) as a CT series, one
    ``1-###.dcm`` file per slice; ``reverse`` numbers the instances from the top slice down (as
    the NIH Pancreas-CT series are), ``skip`` leaves those slices out. Returns the RAS affine of
    ``vol`` in slice-position order (MONAI's ``PydicomReader`` gives it for ``reverse=False``)."""
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = vol.shape
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(nz):
        if k in skip:
            continue
        number = nz - k if reverse else k + 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "anon", number
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # between rows (y), between columns (x)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.ascontiguousarray((vol[:, :, k].T + 1024).astype(np.int16)).tobytes()
        ds.save_as(folder / f"1-{number:03d}.dcm", enforce_file_format=True)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
    return affine


def series_folder(root: Path, n: int) -> Path:
    """Where :func:`write_nih` puts patient ``n``'s series (the TCIA download's nesting)."""
    return root / "Pancreas-CT" / f"PANCREAS_{n:04d}" / "11-24-2015-PANCREAS0001" / "Pancreas-99667"


def write_nih(root: Path, numbers=(1, 2), flip_label: bool = True, spacing=(1.5, 1.25, 2.0), reverse: bool = False) -> Path:
    """One DICOM series per patient and ``TCIA_pancreas_labels/label####.nii.gz``; ``flip_label``
    stores the labels with x and y reversed (the same world geometry through their affines)."""
    for n in numbers:
        affine = write_dicom_series(series_folder(root, n), ct_volume(), spacing=spacing, reverse=reverse)
        label = cube_label()
        if flip_label:  # the same world geometry stored with x and y reversed
            label = label[::-1, ::-1, :].copy()
            flip = np.array([[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
            affine = affine @ flip
        write_nifti(root / "TCIA_pancreas_labels" / f"label{n:04d}.nii.gz", label, affine)
    return root


def unprivileged() -> list[str]:
    """A command prefix under which permission bits hold (a folder made read-only with ``chmod``
    is read-only to the command): none for a normal user; for root, ``setpriv`` without the
    capabilities that override them. Skips the test where root has no ``setpriv``."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits do not hold for root")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
