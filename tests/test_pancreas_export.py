"""``python -m examples.pancreas export``: a run folder's checkpoint, exported in each format, equal to
the model the checkpoint rebuilds at other sizes; what it prints; files never replaced unasked;
a failed check writes nothing and exits with status 1."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from examples.pancreas import export as export_module  # noqa: E402
from examples.pancreas.__main__ import main  # noqa: E402
from examples.pancreas.checkpoints import (  # noqa: E402
    BEST,
    best_state,
    build_model,
    model_from_checkpoint,
    save_checkpoint,
    training_state,
)
from examples.pancreas.config import preset  # noqa: E402

pytestmark = pytest.mark.export


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder holding the ``best.pt`` of a tiny-preset Attention U-Net (filters 4, 8, 16: depth 3),
    its batch norms' running statistics off the identity."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folder = tmp_path / "run"
    save_checkpoint(best_state(training_state(model, step=4, args=cfg.to_dict()), val_dice=0.5), folder / BEST)
    return folder


def export(*args: str, capsys) -> tuple[int, str, str]:
    code = main(["export", *args])
    out, err = capsys.readouterr()
    return code, out, err


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_onnx_from_a_run_folder_runs_in_onnx_runtime_at_other_sizes(run, capsys):
    import onnxruntime as ort

    code, out, err = export("--checkpoint", str(run), "--format", "onnx", capsys=capsys)
    assert code == 0, err
    path = run / "best.onnx"
    lines = out.splitlines()
    wrote = rf"wrote {re.escape(str(path))} \(\d+\.\d MiB, ONNX\): AttentionUNet of {re.escape(str(run / BEST))}, step 4"
    assert re.fullmatch(wrote, lines[0]), lines[0]
    assert lines[1].startswith("input 'image': Tensor[N, 1, X, Y, Z] float32, any N, any X, Y, Z, preprocessed as the run was")
    assert lines[2] == "outputs: 'logits'; 'logits' is Tensor[N, 2, X, Y, Z]"
    # tiny preset: a 40 x 40 x 32 phantom at 2 x 2 x 2.5 mm, resampled to 4 mm
    checked = re.fullmatch(r"checked against eager PyTorch on a random Tensor\[1, 1, 20, 20, 20\]: max \|difference\| (\S+)", lines[3])
    assert checked and float(checked.group(1)) < 1e-4
    model = model_from_checkpoint(run / BEST)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (randn(1, 1, 13, 7, 22, seed=1), randn(2, 1, 16, 16, 16, seed=2)):
        (logits,) = session.run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            assert np.abs(logits - model(x).numpy()).max() < 1e-4


def test_torchscript_with_attention_maps_and_an_out_path(run, tmp_path, capsys):
    out_path = tmp_path / "deploy" / "model.pt"
    code, out, err = export("--checkpoint", str(run / BEST), "--format", "torchscript", "--attention", "--out", str(out_path),
                            capsys=capsys)  # fmt: skip
    assert code == 0, err
    assert f"wrote {out_path} (" in out and "TorchScript (traced)" in out
    assert "outputs: 'logits', 'attention_level2'; 'logits' is Tensor[N, 2, X, Y, Z]" in out
    model = model_from_checkpoint(run / BEST)
    x = randn(1, 1, 11, 9, 6, seed=3)
    logits, level2 = torch.jit.load(str(out_path))(x)
    with torch.no_grad():
        want, (want2,) = model(x, return_attention=True)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(level2, want2, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["model.pt"]  # no temporary left


def test_program_takes_sizes_above_the_bottleneck_multiple(run, capsys):
    code, out, err = export("--checkpoint", str(run), "--format", "program", capsys=capsys)
    assert code == 0, err
    assert "input 'image': Tensor[N, 1, X, Y, Z] float32, any N, X, Y, Z of at least 5," in out
    module = torch.export.load(str(run / "best.pt2")).module()
    x = randn(1, 1, 5, 9, 7, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model_from_checkpoint(run / BEST)(x), rtol=1e-5, atol=1e-5)


def test_existing_files_are_kept_unless_overwrite(run, capsys):
    taken = run / "best.torchscript.pt"
    taken.write_bytes(b"mine")
    code, out, err = export("--checkpoint", str(run), "--format", "torchscript", capsys=capsys)
    assert code == 2 and out == ""
    assert err == f"error: --out: output {taken} exists: pass overwrite=True (--overwrite) to replace it\n"
    assert taken.read_bytes() == b"mine"
    code, out, err = export("--checkpoint", str(run), "--format", "torchscript", "--overwrite", capsys=capsys)
    assert code == 0 and taken.read_bytes() != b"mine" and torch.jit.load(str(taken)) is not None


def test_bad_arguments_exit_2_before_anything_is_exported(run, tmp_path, capsys):
    code, _, err = export("--checkpoint", str(tmp_path / "nothing"), "--format", "onnx", capsys=capsys)
    missing = tmp_path / "nothing"
    assert code == 2 and err == f"error: --checkpoint: expected a checkpoint file or a run folder; got {missing}, which does not exist\n"
    code, _, err = export("--checkpoint", str(run), "--format", "onnx", "--out", str(run), capsys=capsys)
    assert code == 2 and err == f"error: --out: output {run} is a folder; expected the ONNX file to write\n"
    unet = run.parent / "unet"
    cfg = preset("tiny", model="unet")
    save_checkpoint(best_state(training_state(build_model(cfg), step=2, args=cfg.to_dict()), val_dice=0.1), unet / BEST)
    code, _, err = export("--checkpoint", str(unet), "--format", "onnx", "--attention", capsys=capsys)
    assert code == 2 and err == "error: --attention: attention=True needs an AttentionUNet; UNet has no attention maps\n"
    assert sorted(p.name for p in run.iterdir()) == [BEST] and sorted(p.name for p in unet.iterdir()) == [BEST]


def test_a_failed_check_writes_nothing_and_exits_1(run, monkeypatch, capsys):
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # no difference is small enough
    code, out, err = export("--checkpoint", str(run), "--format", "torchscript", capsys=capsys)
    assert code == 1 and out == ""
    assert re.fullmatch(r"error: TorchScript's logits differ from the PyTorch model's by up to \S+ on Tensor\[1, 1, 20, 20, 20\] "
                        r"\(tolerance -\S+\); nothing written\n", err)  # fmt: skip
    assert sorted(p.name for p in run.iterdir()) == [BEST]
