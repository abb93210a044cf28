"""Tests of the pancreas example's ``predict`` on every input users bring: a NIfTI file, a folder of
them, a DICOM series, an MSD ``Task07_Pancreas`` folder and an NIH Pancreas-CT folder, with the
faults of real downloads among them (a macOS ``._`` file, a truncated NIfTI, a DICOM series with
a missing slice, a patient folder without images, a stray text file).

The segmentations come from a stand-in for the network (``infer`` patched: the voxels above
240 HU, the top of the HU window, are "pancreas") and the checkpoint's spacing is the volumes'
own 2 mm, so every output is known exactly and a flip, shift or resampling error anywhere between
reading and writing shows up voxel for voxel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")
pytest.importorskip("pydicom")

from attention_gates.finetune import checkpoint_config  # noqa: E402
from examples.pancreas import predict as predict_module  # noqa: E402
from examples.pancreas.__main__ import main  # noqa: E402
from examples.pancreas.checkpoints import build_model, save_checkpoint  # noqa: E402
from examples.pancreas.config import preset  # noqa: E402
from examples.pancreas.predict import find_inputs, predict  # noqa: E402
from pancreas_folders import SHAPE, ct_volume, series_folder, unprivileged, write_dicom_series, write_msd, write_nifti, write_nih  # noqa: E402

MM = (2.0, 2.0, 2.0)
CUBE_HU = 300.0  # above the window's 240 HU: scaled to 1


def _cube_mask(volume: np.ndarray) -> np.ndarray:
    return (volume > 240).astype(np.uint8)


def _threshold(model, image, cfg, device="cpu"):
    """Stand-in for :func:`examples.pancreas.evaluate.infer`: class probabilities of "HU above the window"."""
    fg = (image[0].as_tensor() > 0.999).float()
    return torch.stack([1 - fg, fg])


@pytest.fixture
def checkpoint(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(predict_module, "infer", _threshold)
    cfg = preset("tiny", spacing=MM)
    model = build_model(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint({"model": model.state_dict(), "config": checkpoint_config(model), "step": 0, "args": cfg.to_dict()}, path)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def msd(tmp_path):
    """Task07_Pancreas: 3 training cases (the second truncated), a test case, a ``._`` file, a text file."""
    root = write_msd(tmp_path / "Task07_Pancreas", n=3, spacing=MM)
    _truncate(root / "imagesTr" / "pancreas_002.nii.gz")
    (root / "imagesTr" / "._pancreas_001.nii.gz").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (root / "imagesTr" / "README.txt").write_text("not an image")
    affine = np.diag([*MM, 1.0])
    affine[:3, 3] = [3.0, -7.0, 11.0]
    write_nifti(root / "imagesTs" / "pancreas_010.nii.gz", ct_volume(), affine)
    index = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**index, "test": ["./imagesTs/pancreas_010.nii.gz"]}))
    return root


@pytest.fixture
def nih(tmp_path):
    """Pancreas-CT: patient 1 fine (reversed instance numbers, a ``._`` file beside its slices),
    patient 2 with a slice missing, patient 3 without images."""
    root = write_nih(tmp_path / "NIH", numbers=(1,), spacing=MM, reverse=True)
    (series_folder(root, 1) / "._1-001.dcm").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    write_dicom_series(series_folder(root, 2), ct_volume(), spacing=MM, reverse=True, skip=(4,))
    (root / "Pancreas-CT" / "PANCREAS_0003" / "empty").mkdir(parents=True)
    return root


def _check_nifti_output(seg_path: Path, source: Path) -> None:
    seg, src = nib.load(str(seg_path)), nib.load(str(source))
    assert seg.shape == src.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(seg.affine, src.affine)
    assert int(seg.header["sform_code"]) == int(src.header["sform_code"])  # the input's meaning of its affine
    np.testing.assert_allclose(seg.get_qform(), src.affine, atol=1e-5)  # both forms set: any viewer overlays it
    np.testing.assert_array_equal(np.asarray(seg.dataobj), _cube_mask(np.asarray(src.dataobj)))


def _check_dicom_output(seg_path: Path, series: Path) -> None:
    """The series was written with reversed instance numbers: MONAI stacks it top slice first,
    so the output's z axis runs down, and its affine says so."""
    from monai.data import PydicomReader

    position_order = np.diag([-MM[0], -MM[1], MM[2], 1.0])
    position_order[:3, 3] = [-10.0, -20.0, 30.0]  # write_dicom_series's default origin, LPS -> RAS
    flip_z = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, SHAPE[2] - 1], [0, 0, 0, 1]], dtype=float)
    seg = nib.load(str(seg_path))
    assert seg.shape == SHAPE
    np.testing.assert_allclose(seg.affine, position_order @ flip_z, atol=1e-5)
    reader = PydicomReader()
    _, meta = reader.get_data(reader.read(str(series)))
    np.testing.assert_allclose(seg.affine, meta["affine"], atol=1e-5)  # as MONAI reads the series
    np.testing.assert_array_equal(np.asarray(seg.dataobj), _cube_mask(ct_volume(CUBE_HU)[:, :, ::-1]))


def test_find_inputs_on_every_layout(msd, nih):
    imgs = msd / "imagesTr"
    assert [(i["name"], i["image"]) for i in find_inputs(imgs / "pancreas_001.nii.gz")] == [("pancreas_001", imgs / "pancreas_001.nii.gz")]
    assert [i["name"] for i in find_inputs(imgs)] == ["pancreas_001", "pancreas_002", "pancreas_003"]  # no ._ file, no README
    assert [i["name"] for i in find_inputs(msd)] == ["pancreas_001", "pancreas_002", "pancreas_003", "pancreas_010"]
    (msd / "dataset.json").unlink()  # without it: imagesTr/ and imagesTs/
    assert [i["name"] for i in find_inputs(msd)] == ["pancreas_001", "pancreas_002", "pancreas_003", "pancreas_010"]
    series = series_folder(nih, 1)
    assert [(i["name"], i["image"]) for i in find_inputs(series)] == [("Pancreas-99667", series)]
    found = find_inputs(nih)
    assert [(i["name"], "error" in i) for i in found] == [("PANCREAS_0001", False), ("PANCREAS_0002", False), ("PANCREAS_0003", True)]
    assert found[0]["image"] == series and "no DICOM" in found[2]["error"]


def test_find_inputs_errors(msd, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_inputs(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"must be a NIfTI file.*README\.txt"):
        find_inputs(msd / "imagesTr" / "README.txt")
    with pytest.raises(ValueError, match=r"must be a NIfTI file.*\._pancreas_001"):
        find_inputs(msd / "imagesTr" / "._pancreas_001.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no volumes in .*empty"):
        find_inputs(tmp_path / "empty")
    (msd / "dataset.json").unlink()
    write_nifti(msd / "imagesTs" / "pancreas_003.nii.gz", ct_volume(), np.eye(4))
    with pytest.raises(ValueError, match="same output names: pancreas_003"):
        find_inputs(msd)


def test_predict_msd_folder_writes_the_good_volumes_and_names_the_bad_one(checkpoint, msd, tmp_path):
    written, failed, _, _ = predict(checkpoint, msd, tmp_path / "seg", device="cpu")
    assert [p.name for p in written] == ["pancreas_001_seg.nii.gz", "pancreas_003_seg.nii.gz", "pancreas_010_seg.nii.gz"]
    assert len(failed) == 1 and "\n" not in failed[0]
    assert str(msd / "imagesTr" / "pancreas_002.nii.gz") in failed[0] and "not a NIfTI file: its gzip stream is cut short" in failed[0]
    for path in written:
        name = path.name.replace("_seg", "")
        _check_nifti_output(path, msd / ("imagesTs" if "010" in name else "imagesTr") / name)
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == [p.name for p in written]  # no temporary files left


def test_predict_nih_folder_keeps_the_series_geometry_and_names_the_bad_series(checkpoint, nih, tmp_path):
    written, failed, _, _ = predict(checkpoint, nih, tmp_path / "seg", device="cpu")
    assert [p.name for p in written] == ["PANCREAS_0001_seg.nii.gz"]
    _check_dicom_output(written[0], series_folder(nih, 1))
    assert len(failed) == 2 and not any("\n" in line for line in failed)
    assert str(series_folder(nih, 2)) in failed[0]
    assert "slices 1-003.dcm and 1-005.dcm are 4 mm apart, the other slices 2 mm: a slice is missing" in failed[0]
    assert "PANCREAS_0003" in failed[1] and "no DICOM" in failed[1]


def test_predict_one_file_a_nifti_folder_and_a_series_folder(checkpoint, msd, nih, tmp_path):
    source = msd / "imagesTr" / "pancreas_003.nii.gz"
    written, failed, _, _ = predict(checkpoint, source, tmp_path / "one", device="cpu")
    assert failed == [] and [p.name for p in written] == ["pancreas_003_seg.nii.gz"]
    _check_nifti_output(written[0], source)
    written, failed, _, _ = predict(checkpoint, msd / "imagesTr", tmp_path / "folder", device="cpu")
    assert [p.name for p in written] == ["pancreas_001_seg.nii.gz", "pancreas_003_seg.nii.gz"] and len(failed) == 1
    written, failed, _, _ = predict(checkpoint, series_folder(nih, 1), tmp_path / "series", device="cpu")
    assert failed == [] and [p.name for p in written] == ["Pancreas-99667_seg.nii.gz"]
    _check_dicom_output(written[0], series_folder(nih, 1))


def test_cli_predict_reports_failures_by_name_and_exits_non_zero(checkpoint, msd, nih, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(nih), "--out", str(tmp_path / "nih"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out.split() == [str(tmp_path / "nih" / "PANCREAS_0001_seg.nii.gz")]
    errors = captured.err.strip().splitlines()
    assert len(errors) == 3 and errors[0].startswith("error: ") and "1-003.dcm and 1-005.dcm" in errors[0]
    assert errors[1].startswith("error: ") and "PANCREAS_0003" in errors[1]
    assert errors[2] == f"1 of 3 volumes written to {tmp_path / 'nih'}; 2 failed"
    clean = msd / "imagesTr" / "pancreas_001.nii.gz"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(clean), "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- nothing clobbered


def _predict(*args: str) -> int:
    return main(["predict", *map(str, args), "--no-progress"])


def test_predict_keeps_existing_files_and_never_segments_a_segmentation(checkpoint, tmp_path, capsys):
    """Predicting into the input folder, which holds a manual label ``a_seg.nii.gz``: the label is
    neither replaced nor taken for a CT; ``--overwrite`` replaces it, and a second run takes its
    own output for no input either."""
    folder = tmp_path / "scans"
    affine = np.diag([*MM, 1.0])
    write_nifti(folder / "a.nii.gz", ct_volume(), affine)
    write_nifti(folder / "b.nii.gz", ct_volume(), affine)
    write_nifti(folder / "a_seg.nii.gz", np.full(SHAPE, 7, dtype=np.uint8), affine)  # the user's own label
    label = (folder / "a_seg.nii.gz").read_bytes()
    assert _predict("--checkpoint", checkpoint, "--input", folder, "--out", folder) == 1
    out, err = capsys.readouterr()
    assert out.split() == [str(folder / "b_seg.nii.gz")]
    assert err.strip().splitlines() == [
        f"skipped: {folder / 'a.nii.gz'}: its output {folder / 'a_seg.nii.gz'} exists (--overwrite replaces it)",
        f"skipped: {folder / 'a_seg.nii.gz'}: a segmentation (its name ends in _seg), not a CT",
        f"1 of 3 volumes written to {folder}; 2 skipped",
    ]
    assert (folder / "a_seg.nii.gz").read_bytes() == label
    assert sorted(p.name for p in folder.iterdir()) == ["a.nii.gz", "a_seg.nii.gz", "b.nii.gz", "b_seg.nii.gz"]  # no a_seg_seg
    assert _predict("--checkpoint", checkpoint, "--input", folder, "--out", folder, "--overwrite") == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(folder / "a_seg.nii.gz"), str(folder / "b_seg.nii.gz")]
    assert f"skipped: {folder / 'a_seg.nii.gz'}: a segmentation" in err and f"skipped: {folder / 'b_seg.nii.gz'}: a segmentation" in err
    _check_nifti_output(folder / "a_seg.nii.gz", folder / "a.nii.gz")  # replaced, as asked
    assert sorted(p.name for p in folder.iterdir()) == ["a.nii.gz", "a_seg.nii.gz", "b.nii.gz", "b_seg.nii.gz"]
    done = predict(checkpoint, folder / "a_seg.nii.gz", tmp_path / "o", device="cpu")
    assert done.written == [] and done.skipped == [f"{folder / 'a_seg.nii.gz'}: a segmentation (its name ends in _seg), not a CT"]


def test_predict_names_a_text_file_that_is_not_nifti(checkpoint, tmp_path, capsys):
    folder = tmp_path / "scans"
    write_nifti(folder / "good.nii.gz", ct_volume(), np.diag([*MM, 1.0]))
    (folder / "x.nii.gz").write_text("patient notes, not an image")
    assert _predict("--checkpoint", checkpoint, "--input", folder, "--out", tmp_path / "seg") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"error: case x: image {folder / 'x.nii.gz'} is not a NIfTI file: it is not gzip-compressed, as its .gz name says"
    assert "reader" not in err[0] and err[1] == f"1 of 2 volumes written to {tmp_path / 'seg'}; 1 failed"


def test_predict_refuses_an_explicit_backend_that_cannot_run_before_reading_inputs(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _predict("--checkpoint", checkpoint, "--input", tmp_path / "not read", "--out", tmp_path / "o", "--backend", "triton",
                    "--device", "cpu") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: --backend triton: expected a backend that can run the gates on cpu; the library says: "
        "x is on the CPU: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)"
    ]
    assert not (tmp_path / "o").exists()


def test_an_explicit_backend_is_used_on_the_cpu_not_folded_away(checkpoint):
    """optimize_for_inference folds the gates, which then ignore any backend: with an explicit
    backend the CPU model keeps its gates, and they run with it."""
    from attention_gates import GridAttentionGate
    from attention_gates.cpu import FoldedMultiAttentionGate
    from examples.pancreas.checkpoints import model_from_checkpoint
    from examples.pancreas.evaluate import inference_model

    folded = inference_model(model_from_checkpoint(checkpoint), "cpu")
    assert any(isinstance(m, FoldedMultiAttentionGate) for m in folded.modules())
    kept = inference_model(model_from_checkpoint(checkpoint, backend="reference"), "cpu")
    assert not any(isinstance(m, FoldedMultiAttentionGate) for m in kept.modules())
    assert {m.backend for m in kept.modules() if isinstance(m, GridAttentionGate)} == {"reference"}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_predict_into_a_read_only_folder_is_refused_first(checkpoint, msd, tmp_path):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [*unprivileged(), sys.executable, "-m", "examples.pancreas", "predict", "--checkpoint", str(checkpoint),
           "--input", str(msd), "--out", str(out), "--no-progress"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=170)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: --out: expected a folder this process can write in; got {out}: {out} is not writable by this user"]
    assert proc.stdout == "" and list(out.iterdir()) == []
