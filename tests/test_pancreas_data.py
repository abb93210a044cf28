"""Tests of the pancreas example's data: phantom, MSD and NIH loaders, transforms, splits."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

from monai.transforms import Invertd  # noqa: E402
from examples.pancreas.cases import find_cases, phantom_cases  # noqa: E402
from examples.pancreas.splits import load_splits, make_splits, save_splits  # noqa: E402
from examples.pancreas.transforms import eval_transforms, train_transforms  # noqa: E402
from examples.pancreas.phantom import generate_phantom, threshold_baseline  # noqa: E402
from pancreas_folders import SHAPE, cube_label, ct_volume, series_folder, write_dicom_series, write_msd, write_nifti, write_nih  # noqa: E402

SMALL = (48, 48, 32)  # phantom size for the transform tests (the anatomy scales with it)


def cfg(**changes):
    base = dict(
        spacing=(2.0, 2.0, 2.0),
        hu_window=(-100.0, 240.0),
        patch_size=(8, 8, 8),
        pos_neg_ratio=1.0,
        num_samples=2,
        keep_tumour=False,
        augment=False,
        allow_pad=True,
    )
    base.update(changes)
    return SimpleNamespace(**base)


# ----------------------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def phantoms():
    return [generate_phantom(seed) for seed in range(3)]


def test_phantom_is_deterministic_in_its_seed(phantoms):
    again = generate_phantom(0)
    np.testing.assert_array_equal(again["image"], phantoms[0]["image"])
    np.testing.assert_array_equal(again["label"], phantoms[0]["label"])
    assert not np.array_equal(phantoms[0]["label"], phantoms[1]["label"])
    assert np.abs(phantoms[0]["image"] - phantoms[1]["image"]).mean() > 10.0


def test_phantom_arrays_labels_and_affine(phantoms):
    case = phantoms[0]
    assert case["image"].shape == (96, 96, 64) and case["image"].dtype == np.float32
    assert case["label"].shape == (96, 96, 64) and case["label"].dtype == np.uint8
    assert set(np.unique(case["label"]).tolist()) == {0, 1}
    assert ndimage.label(case["label"])[1] == 1  # one gland, no crumbs
    np.testing.assert_allclose(np.diag(case["affine"]), [2.0, 2.0, 2.5, 1.0])
    assert case["case_id"] == "phantom_0"
    # air around the body, bone in the spine, soft tissue in the pancreas
    assert case["image"][0, 0, 0] < -900 and case["image"].max() > 400
    assert 40 < np.median(case["image"][case["label"] == 1]) < 130


def test_phantom_pancreas_is_small_and_beats_no_hu_threshold(phantoms):
    result = threshold_baseline(phantoms)
    assert result["cases"] == 3
    assert all(0.001 < f < 0.01 for f in result["pancreas_fraction_per_case"])
    assert result["dice"] <= 0.3
    assert max(result["dice_per_case"]) <= 0.3


def test_phantom_pancreas_sits_in_the_expected_place(phantoms):
    """Left-right and anterior-posterior layout: head right of the midline, tail to the left,
    in front of the spine, and a vein brighter than the pancreas along its back."""
    for case in phantoms:
        xs, ys, _ = np.nonzero(case["label"])
        assert xs.min() < 40 < 56 < xs.max()  # crosses the midline (x = 48)
        assert 30 < ys.mean() < 60  # the spine is at y ~ 25, the front wall at y ~ 80
        behind = np.roll(case["label"], -4, axis=1) & (case["label"] == 0)
        assert np.percentile(case["image"][behind.astype(bool)], 90) > 140  # splenic vein / SMV


def test_phantom_scales_to_another_shape():
    case = generate_phantom(5, shape=(32, 40, 24), spacing=(3.0, 3.0, 4.0))
    assert case["image"].shape == case["label"].shape == (32, 40, 24)
    assert case["label"].sum() > 0
    np.testing.assert_allclose(np.diag(case["affine"])[:3], [3.0, 3.0, 4.0])


def test_threshold_baseline_finds_a_separable_interval():
    image = np.full((10, 10, 10), -50.0, dtype=np.float32)
    label = np.zeros((10, 10, 10), dtype=np.uint8)
    label[2:4, 2:4, 2:4] = 1
    image[label == 1] = 62.0
    image[7:, 7:, 7:] = 300.0
    result = threshold_baseline([{"image": image, "label": label}])
    assert result["dice"] == pytest.approx(1.0)
    low, high = result["interval"]
    assert low <= 62.0 < high and high <= 300.0 and low > -50.0
    assert result["pancreas_fraction"] == pytest.approx(8 / 1000)


def test_phantom_and_baseline_errors():
    with pytest.raises(TypeError, match="seed"):
        generate_phantom(1.5)
    with pytest.raises(ValueError, match="shape"):
        generate_phantom(0, shape=(8, 96, 64))
    with pytest.raises(ValueError, match="spacing"):
        generate_phantom(0, spacing=(2.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="at least one case"):
        threshold_baseline([])
    with pytest.raises(ValueError, match="no pancreas"):
        threshold_baseline([{"image": np.zeros((4, 4, 4)), "label": np.zeros((4, 4, 4)), "case_id": "empty"}])


# ----------------------------------------------------------------------------- folders

def _aligned(out: dict) -> None:
    image, label = out["image"][0].numpy(), out["label"][0].numpy()
    assert image.shape == label.shape
    np.testing.assert_array_equal(image > 0.5, label > 0)
    assert label.sum() > 0


def test_msd_cases_load_aligned_with_tumour_merged_or_kept(tmp_path):
    root = write_msd(tmp_path / "Task07_Pancreas")
    cases = find_cases(root)
    assert [c["case_id"] for c in cases] == ["pancreas_001", "pancreas_002", "pancreas_003"]
    assert all(Path(c["image"]).is_file() and Path(c["label"]).is_file() for c in cases)
    merged = eval_transforms(cfg(spacing=(1.5, 1.5, 2.0)))(cases[0])
    _aligned(merged)
    assert set(torch.unique(merged["label"]).tolist()) == {0.0, 1.0}
    kept = eval_transforms(cfg(spacing=(1.5, 1.5, 2.0), keep_tumour=True))(cases[0])
    assert set(torch.unique(kept["label"]).tolist()) == {0.0, 1.0, 2.0}
    assert int((kept["label"] == 2).sum()) == 4


def test_msd_without_dataset_json_warns_about_unpaired_files(tmp_path):
    root = write_msd(tmp_path, n=2, dataset_json=False)
    write_nifti(root / "imagesTr" / "pancreas_009.nii.gz", ct_volume(), np.eye(4))
    (root / "imagesTr" / "._pancreas_001.nii.gz").write_bytes(b"macOS resource fork")
    with pytest.warns(UserWarning, match="pancreas_009"):
        cases = find_cases(root, layout="msd")
    assert [c["case_id"] for c in cases] == ["pancreas_001", "pancreas_002"]


def test_nih_dicom_and_label_pair_and_align_through_affines(tmp_path):
    root = write_nih(tmp_path)
    cases = find_cases(root)
    assert [c["case_id"] for c in cases] == ["PANCREAS_0001", "PANCREAS_0002"]
    assert Path(cases[0]["image"]).is_dir() and cases[0]["image"].endswith("Pancreas-99667")
    tf = eval_transforms(cfg(spacing=(1.5, 1.25, 2.0)))
    out = tf(cases[1])
    _aligned(out)
    assert out["image"].shape[1:] == SHAPE
    # resampled to a coarser grid, still aligned
    coarse = eval_transforms(cfg(spacing=(3.0, 2.5, 2.0)))(cases[0])
    assert coarse["image"].shape[1:3] < SHAPE[:2] and coarse["image"].shape[3] == SHAPE[2]
    _aligned(coarse)


def test_nih_reports_unpaired_cases(tmp_path):
    root = write_nih(tmp_path, numbers=(1, 2, 3))
    (root / "TCIA_pancreas_labels" / "label0002.nii.gz").rename(root / "TCIA_pancreas_labels" / "label0007.nii.gz")
    with pytest.warns(UserWarning, match=r"no label for PANCREAS_0002.*no image for label0007"):
        cases = find_cases(root, layout="nih")
    assert [c["case_id"] for c in cases] == ["PANCREAS_0001", "PANCREAS_0003"]


def test_nih_label_beside_the_dicom_folder(tmp_path):
    affine = write_dicom_series(tmp_path / "PANCREAS_0004" / "a" / "b", ct_volume())
    write_nifti(tmp_path / "PANCREAS_0004" / "label0004.nii.gz", cube_label(), affine)
    (case,) = find_cases(tmp_path)
    assert case["case_id"] == "PANCREAS_0004"
    _aligned(eval_transforms(cfg(spacing=(1.5, 1.25, 2.0)))(case))


def test_nih_series_numbered_top_down_with_a_hidden_file_loads_aligned_and_quietly(tmp_path, capfd):
    """The NIH series number their slices from the top; a macOS ``._`` file sits among them."""
    root = write_nih(tmp_path, numbers=(3,), reverse=True)
    (series_folder(root, 3) / "._1-001.dcm").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (case,) = find_cases(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _aligned(eval_transforms(cfg(spacing=(1.5, 1.25, 2.0)))(case))
    assert capfd.readouterr().err == ""  # no "nvImageCodec is not available" from MONAI's DICOM readers


def _second_series(folder):
    other = write_dicom_series(folder.parent / "other", ct_volume())
    for f in sorted((folder.parent / "other").iterdir()):
        f.rename(folder / f"2{f.name[1:]}")
    return other


def _swap_instance_numbers(folder):
    a, b = pydicom.dcmread(folder / "1-002.dcm"), pydicom.dcmread(folder / "1-005.dcm")
    a.InstanceNumber, b.InstanceNumber = 5, 2
    a.save_as(folder / "1-002.dcm"), b.save_as(folder / "1-005.dcm")


@pytest.mark.parametrize(
    "fault, message",
    [
        ("missing", r"slices 1-005\.dcm and 1-007\.dcm are 4 mm apart, the other slices 2 mm: a slice is missing"),
        ("mixed", r"the folder holds 2 series"),
        ("not dicom", r"1-009\.dcm is not a DICOM file"),
        ("order", r"slices 1-005\.dcm and 1-003\.dcm lie at 38\.00 and 34\.00 mm along the slice normal: the positions repeat or do not"),
        ("one slice", r"expected a series folder of at least 2 slices, found 1 DICOM file"),
        ("no position", r"slice 1-003\.dcm has no ImagePositionPatient"),
    ],
)
def test_broken_dicom_series_are_refused_naming_the_slices(tmp_path, fault, message):
    folder = tmp_path / "PANCREAS_0009" / "series"
    write_dicom_series(folder, ct_volume(), skip=(5,) if fault == "missing" else tuple(range(1, 8)) if fault == "one slice" else ())
    if fault == "mixed":
        _second_series(folder)
    elif fault == "not dicom":
        (folder / "1-009.dcm").write_text("not DICOM")
    elif fault == "order":
        _swap_instance_numbers(folder)
    elif fault == "no position":
        ds = pydicom.dcmread(folder / "1-003.dcm")
        del ds.ImagePositionPatient
        ds.save_as(folder / "1-003.dcm")
    case = {"image": str(folder), "label": str(folder), "case_id": "PANCREAS_0009"}
    with pytest.raises(ValueError, match=rf"PANCREAS_0009: could not read image .*series as DICOM: ValueError: {message}"):
        eval_transforms(cfg())(case)


@pytest.mark.parametrize("change", ["shift", "shape"])
def test_geometry_mismatch_is_refused_naming_the_case(tmp_path, change):
    root = write_nih(tmp_path, numbers=(5,), flip_label=False)
    label_path = root / "TCIA_pancreas_labels" / "label0005.nii.gz"
    img = nib.load(str(label_path))
    affine, data = img.affine.copy(), np.asarray(img.dataobj)
    if change == "shift":
        affine[0, 3] += 5.0
    else:
        data = data[:, :, :-1]
    write_nifti(label_path, data, affine)
    (case,) = find_cases(root)
    why = "5 mm apart" if change == "shift" else "different shapes"
    with pytest.raises(ValueError, match=rf"(?s)PANCREAS_0005.*geometries disagree.*{why}.*shape \(12, 10, 8\).*shape"):
        eval_transforms(cfg())(case)


def test_geometry_within_tolerance_is_accepted(tmp_path):
    root = write_nih(tmp_path, numbers=(6,), flip_label=False)
    label_path = root / "TCIA_pancreas_labels" / "label0006.nii.gz"
    img = nib.load(str(label_path))
    affine = img.affine.copy()
    affine[:3, 3] += 0.01  # rounding-level differences between a DICOM header and a NIfTI
    write_nifti(label_path, np.asarray(img.dataobj), affine)
    (case,) = find_cases(root)
    _aligned(eval_transforms(cfg(spacing=(1.5, 1.25, 2.0)))(case))


def test_label_with_unexpected_values_is_refused(tmp_path):
    root = write_msd(tmp_path, n=1)
    bad = cube_label()
    bad[0, 0, 0] = 3
    write_nifti(root / "labelsTr" / "pancreas_001.nii.gz", bad, np.diag([1.5, 1.5, 2.0, 1.0]))
    (case,) = find_cases(root)
    with pytest.raises(ValueError, match=r"pancreas_001.*labelsTr.*values 3.*expected only \[0, 1, 2\]"):
        eval_transforms(cfg())(case)


def test_files_that_are_not_nifti_or_dicom(tmp_path):
    root = write_msd(tmp_path / "msd", n=1)
    image = root / "imagesTr" / "pancreas_001.nii.gz"
    whole = image.read_bytes()
    image.write_bytes(whole[:-20])  # cut short after its header
    (case,) = find_cases(root)
    with pytest.raises(ValueError, match=r"pancreas_001.*could not read image .*imagesTr.*as NIfTI"):
        eval_transforms(cfg())(case)
    image.write_text("not an image")  # a text file named .nii.gz: named as such, not a reader's install advice
    with pytest.raises(ValueError, match=r"case pancreas_001: image .*pancreas_001\.nii\.gz is not a NIfTI file: it is not gzip-compressed") as info:
        eval_transforms(cfg())(case)
    assert "reader" not in str(info.value)
    with pytest.raises(ValueError, match=r"neither NIfTI .* nor DICOM"):
        eval_transforms(cfg())({"image": str(root / "dataset.json"), "label": case["label"], "case_id": "x"})
    listed = json.loads((root / "dataset.json").read_text())
    listed["training"][0]["image"] = "./imagesTr/pancreas_001.mha"
    (root / "imagesTr" / "pancreas_001.mha").write_text("")
    (root / "dataset.json").write_text(json.dumps(listed))
    with pytest.raises(ValueError, match=r"pancreas_001\.mha is not NIfTI"):
        find_cases(root)
    nih = write_nih(tmp_path / "nih", numbers=(1,))
    dcm = next((nih / "Pancreas-CT" / "PANCREAS_0001").rglob("*.dcm"))
    dcm.write_bytes(b"garbage")
    (case,) = find_cases(nih)
    with pytest.raises(ValueError, match=r"PANCREAS_0001.*could not read image .*as DICOM"):
        eval_transforms(cfg())(case)


def test_missing_empty_and_unrecognised_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_cases(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is empty"):
        find_cases(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="no cases found"):
        find_cases(tmp_path)
    with pytest.raises(ValueError, match="layout"):
        find_cases(tmp_path, layout="nifti")
    (tmp_path / "dataset.json").write_text("{broken")
    with pytest.raises(ValueError, match="dataset.json"):
        find_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match=r"imagesTr.a\.nii\.gz does not exist"):
        find_cases(tmp_path)
    write_nifti(tmp_path / "PANCREAS_0001" / "label0001.nii.gz", cube_label(), np.eye(4))
    with pytest.raises(ValueError, match=r"PANCREAS_0001.*no DICOM"):
        find_cases(tmp_path, layout="nih")


# ----------------------------------------------------------------------------- transforms


def test_patch_larger_than_volume_pads_or_is_refused(tmp_path):
    (case,) = find_cases(write_msd(tmp_path, n=1))
    big = (16, 12, 12)  # the volume is (12, 10, 8) at its own spacing
    patches = train_transforms(cfg(spacing=(1.5, 1.5, 2.0), patch_size=big, num_samples=3))(case)
    assert len(patches) == 3 and all(p["image"].shape[1:] == big and p["label"].shape[1:] == big for p in patches)
    assert all(p["case_id"] == "pancreas_001" for p in patches)
    with pytest.raises(ValueError, match=r"pancreas_001.*resampled volume \(12, 10, 8\).*patch \(16, 12, 12\)"):
        train_transforms(cfg(spacing=(1.5, 1.5, 2.0), patch_size=big, allow_pad=False))(case)


def test_positive_patches_are_centred_on_the_pancreas():
    (case,) = phantom_cases(1, seed=2, shape=SMALL, spacing=(4.0, 4.0, 5.0))
    tf = train_transforms(cfg(spacing=(4.0, 4.0, 5.0), patch_size=(9, 9, 9), pos_neg_ratio=1e9, num_samples=8))
    tf.set_random_state(0)
    patches = tf(case)
    assert len(patches) == 8
    assert all(p["label"][0, 4, 4, 4] == 1 for p in patches)


def test_phantom_cases_run_through_train_and_eval_transforms():
    cases = phantom_cases(2, seed=7, shape=SMALL, spacing=(4.0, 4.0, 5.0))
    assert [c["case_id"] for c in cases] == ["phantom_7", "phantom_8"]
    assert cases[0]["image"].shape == (1, *SMALL)
    tf = train_transforms(cfg(spacing=(4.0, 4.0, 5.0), patch_size=(16, 16, 16), augment=True, pos_neg_ratio=2.0))
    tf.set_random_state(1)
    for p in tf(cases[0]):
        assert p["image"].shape == p["label"].shape == (1, 16, 16, 16)
        assert p["image"].dtype == torch.float32 and 0.0 <= float(p["image"].min()) <= float(p["image"].max()) <= 1.0
        assert set(torch.unique(p["label"]).tolist()) <= {0.0, 1.0}
    assert find_cases(None, n_phantom=1, seed=3)[0]["case_id"] == "phantom_3"


def test_eval_transforms_keep_whole_volumes_and_invert_to_the_original_grid():
    (case,) = phantom_cases(1, seed=4, shape=SMALL, spacing=(4.0, 4.0, 5.0))
    tf = eval_transforms(cfg(spacing=(6.0, 6.0, 7.5)))
    out = tf(case)
    assert tuple(out["image"].shape[1:3]) == (32, 32) and out["image"].shape[3] in (21, 22)
    np.testing.assert_allclose(np.diag(out["image"].affine.numpy())[:3], [6.0, 6.0, 7.5])
    back = Invertd(keys="pred", transform=tf, orig_keys="image", nearest_interp=True)(
        {"pred": out["label"].clone(), "image": out["image"]}
    )
    assert back["pred"].shape == case["label"].shape
    np.testing.assert_allclose(back["pred"].affine.numpy(), case["label"].affine.numpy())
    overlap = float((back["pred"] * case["label"]).sum() / case["label"].sum())
    assert overlap > 0.6  # the label survived the round trip through a coarser grid


def test_transforms_check_the_config():
    with pytest.raises(TypeError, match="patch_size"):
        train_transforms(SimpleNamespace(spacing=(1, 1, 1)))
    with pytest.raises(ValueError, match="hu_window"):
        eval_transforms(cfg(hu_window=(240, -100)))


# ----------------------------------------------------------------------------- splits

IDS = [f"case_{i:02d}" for i in range(20)]


def test_splits_are_deterministic_disjoint_and_complete():
    a = make_splits(IDS, seed=1)
    assert a == make_splits(list(reversed(IDS)), seed=1)
    assert a != make_splits(IDS, seed=2)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (12, 4, 4)
    assert sorted(a["train"] + a["val"] + a["test"]) == IDS


def test_k_fold_validates_every_case_once_with_a_fixed_test_set():
    folds = [make_splits(IDS, seed=3, test_fraction=0.2, folds=4, fold=k) for k in range(4)]
    assert all(f["test"] == folds[0]["test"] for f in folds)
    validated = [c for f in folds for c in f["val"]]
    assert sorted(validated) == sorted(set(IDS) - set(folds[0]["test"]))
    for f in folds:
        assert set(f["train"]).isdisjoint(f["val"]) and set(f["train"]).isdisjoint(f["test"])
        assert sorted(f["train"] + f["val"] + f["test"]) == IDS


@given(n=st.integers(2, 40), val=st.floats(0.0, 0.45), test=st.floats(0.0, 0.45), seed=st.integers(0, 2**31))
def test_splits_partition_any_case_list(n, val, test, seed):
    ids = [f"c{i:02d}" for i in range(n)]
    try:
        s = make_splits(ids, seed=seed, val_fraction=val, test_fraction=test)
    except ValueError as err:  # only refused when nothing is left to train on
        assert "no training cases" in str(err)
        assert n - round(test * n) - round(val * n) <= 0
        return
    assert sorted(s["train"] + s["val"] + s["test"]) == ids
    assert len(s["test"]) == round(test * n) and s["train"]


def test_split_errors():
    with pytest.raises(ValueError, match="unique.*case_01"):
        make_splits(IDS + ["case_01"], seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        make_splits(IDS, seed=0, val_fraction=1.2)
    with pytest.raises(ValueError, match="below 1"):
        make_splits(IDS, seed=0, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="fold must be in"):
        make_splits(IDS, seed=0, folds=5, fold=5)
    with pytest.raises(ValueError, match="folds must be"):
        make_splits(IDS, seed=0, folds=1)
    with pytest.raises(ValueError, match="no training cases"):
        make_splits(["a", "b"], seed=0, val_fraction=0.4, test_fraction=0.4)


def test_save_and_load_splits(tmp_path):
    splits = make_splits(IDS, seed=5)
    path = tmp_path / "run" / "splits.json"
    path.parent.mkdir()
    save_splits(splits, path)
    assert load_splits(path) == splits
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]
    path.write_text(json.dumps({"train": ["a"], "val": ["a"], "test": []}))
    with pytest.raises(ValueError, match="'train' and 'val' share cases a"):
        load_splits(path)
    path.write_text("[1, 2")
    with pytest.raises(ValueError, match="not JSON"):
        load_splits(path)
    with pytest.raises(ValueError, match="keys"):
        save_splits({"train": ["a"]}, path)
    with pytest.raises(FileNotFoundError):
        load_splits(tmp_path / "none.json")


def test_no_warnings_from_a_clean_msd_folder(tmp_path):
    (case, *_) = find_cases(write_msd(tmp_path, n=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eval_transforms(cfg(spacing=(1.5, 1.5, 2.0)))(case)


# ----------------------------------------------------------------------------- checks without the transforms


def test_case_files_check_passes_what_the_transforms_accept(tmp_path):
    """Headers and labels only: the MSD cases, NIH series numbered top down with labels stored
    flipped (the same world grid), an in-memory phantom; each also passes the transforms."""
    from examples.pancreas.volumes import check_case_files

    cases = find_cases(write_msd(tmp_path / "msd", n=1)) + find_cases(write_nih(tmp_path / "nih", numbers=(1,), reverse=True))
    cases += phantom_cases(1, seed=0, shape=SMALL, spacing=(4.0, 4.0, 5.0))
    for case in cases:
        check_case_files(case)
        assert eval_transforms(cfg())(case)["image"].shape == eval_transforms(cfg())(case)["label"].shape


@pytest.mark.parametrize(
    "fault, message",
    [
        ("shift", r"geometries disagree after orientation to RAS \(voxels 5 mm apart, tolerance 0\.1 mm\): image shape \(12, 10, 8\)"),
        ("shape", r"geometries disagree .*\(different shapes.*label shape \(12, 10, 7\)"),
        ("values", r"label .*label0005\.nii\.gz has values 3; expected only \[0, 1, 2\]"),
        ("cut short", r"could not read label .*label0005\.nii\.gz as NIfTI"),
        ("text", r"label .*label0005\.nii\.gz is not a NIfTI file: it is not gzip-compressed"),
        ("missing slice", r"image .*Pancreas-99667 is not a readable DICOM series: slices 1-004\.dcm and 1-006\.dcm are 4 mm apart"),
        ("missing", r"label .*label0005\.nii\.gz does not exist"),
    ],
)
def test_case_files_check_names_the_case_the_file_and_the_fault_in_one_line(tmp_path, fault, message):
    from examples.pancreas.volumes import check_case_files

    root = write_nih(tmp_path, numbers=(5,), flip_label=False)
    label_path = root / "TCIA_pancreas_labels" / "label0005.nii.gz"
    img = nib.load(str(label_path))
    affine, data = img.affine.copy(), np.asarray(img.dataobj).copy()
    if fault == "shift":
        affine[0, 3] += 5.0
    elif fault == "shape":
        data = data[:, :, :-1]
    elif fault == "values":
        data[0, 0, 0] = 3
    write_nifti(label_path, data, affine)
    if fault == "cut short":
        label_path.write_bytes(label_path.read_bytes()[:-20])
    elif fault == "text":
        label_path.write_text("label notes")
    elif fault == "missing slice":
        next(p for p in series_folder(root, 5).iterdir() if p.name == "1-005.dcm").unlink()
    (case,) = find_cases(root)
    if fault == "missing":
        label_path.unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=rf"^case PANCREAS_0005: .*{message}") as info:
        check_case_files(case)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
def test_nifti_data_problem_finds_a_file_cut_after_its_header(tmp_path, name):
    """The image's header reads but its voxels are cut short: named with what is missing, compressed or not;
    the whole file passes."""
    import nibabel as nib

    from examples.pancreas.volumes import nifti_data_problem

    path = tmp_path / name
    write_nifti(path, ct_volume(), np.eye(4))
    assert nifti_data_problem(path, nib.load(str(path))) is None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])  # the header (352 bytes) is kept
    why = nifti_data_problem(path, nib.load(str(path)))
    need = 352 + int(np.prod(SHAPE)) * 4
    expected = rf"holds {len(data) * 3 // 4} bytes where its header's shape \(12, 10, 8\) of float32 needs {need}" if name == "ct.nii" \
        else r"gzip stream is cut short or damaged after \d+ bytes of data \(EOFError"  # fmt: skip
    assert why is not None and re.search(expected, why), why
