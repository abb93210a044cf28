"""Tests of the pancreas example's training side: metrics, training, resume, checkpoints,
prediction geometry, the 2-process run and the command line's errors.

Runs on CPU with the ``"tiny"`` preset (a 40x40x32 phantom, 16^3 patches, a 3-level model).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")

from attention_gates import AttentionUNet, UNet, deep_supervision_weights  # noqa: E402
from examples.pancreas.__main__ import main  # noqa: E402
from examples.pancreas.config import Config, preset  # noqa: E402
from examples.pancreas.evaluate import summarize  # noqa: E402
from examples.pancreas.metrics import case_metrics, slicewise_surface_distance, surface_metrics  # noqa: E402
from examples.pancreas.cases import load_cases  # noqa: E402
from examples.pancreas.checkpoints import CheckpointError, load_checkpoint, model_from_checkpoint, read_log  # noqa: E402
from examples.pancreas.sampling import PatchDraws, StepSampler, collate_draws  # noqa: E402
from examples.pancreas.splits import split_cases  # noqa: E402
from examples.pancreas.train import loss_function, train  # noqa: E402
from examples.pancreas.transforms import split_at_first_random  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- metrics


def _cube(shape, lo, n):
    m = np.zeros(shape, bool)
    m[lo[0] : lo[0] + n, lo[1] : lo[1] + n, lo[2] : lo[2] + n] = True
    return m


def _boundary(mask):
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _brute_assd(a, b, spacing):
    """Mean over both surfaces of the distance to the other surface, by all pairs."""
    pa = np.argwhere(_boundary(a)) * np.asarray(spacing)
    pb = np.argwhere(_boundary(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.concatenate([d.min(1), d.min(0)]).mean())


def test_identical_masks_score_perfectly():
    m = _cube((20, 20, 20), (5, 5, 5), 8)
    r = case_metrics(m, m, (1.5, 1.5, 2.0))
    assert r["dice"] == r["precision"] == r["recall"] == 1.0
    assert r["assd"] == r["hd95"] == r["surface_distance"] == 0.0
    assert r["gt_ml"] == pytest.approx(8**3 * 1.5 * 1.5 * 2.0 / 1000)


@pytest.mark.parametrize("k", [1, 3])
def test_cubes_offset_by_k_voxels(k):
    n, spacing = 10, (2.0, 1.0, 1.5)
    a = _cube((24, 24, 24), (5, 6, 7), n)
    b = _cube((24, 24, 24), (5 + k, 6, 7), n)  # shifted by k voxels = 2k mm along x
    r = case_metrics(a, b, spacing)
    assert r["dice"] == pytest.approx((n - k) / n)
    assert r["precision"] == pytest.approx((n - k) / n)
    assert r["recall"] == pytest.approx((n - k) / n)
    # the faces normal to x are 2k mm apart and hold more than 5% of the surface
    assert r["hd95"] == pytest.approx(k * spacing[0])
    assert r["assd"] == pytest.approx(_brute_assd(a, b, spacing), rel=1e-6)
    # authors' distance: every axial slice holds the same two squares offset by k along x
    sq_a, sq_b = a[:, :, 7:8], b[:, :, 7:8]
    expected = _brute_assd_2d(sq_a[:, :, 0], sq_b[:, :, 0], spacing[:2])
    assert r["surface_distance"] == pytest.approx(expected, rel=1e-6)
    assert 0 < r["surface_distance"] <= k * spacing[0]


def _brute_assd_2d(a, b, spacing):
    from scipy import ndimage

    ca, cb = a & ~ndimage.binary_erosion(a, border_value=0), b & ~ndimage.binary_erosion(b, border_value=0)
    pa, pb = np.argwhere(ca) * np.asarray(spacing), np.argwhere(cb) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.concatenate([d.min(1), d.min(0)]).mean())


def test_slicewise_distance_uses_only_slices_with_both_masks():
    a = _cube((20, 20, 20), (4, 4, 4), 8)
    b = a.copy()
    b[:, :, 4:8] = False  # b lacks the lower half: those slices are skipped, the rest agree
    assert slicewise_surface_distance(a, b, (1, 1, 1)) == 0.0
    assert surface_metrics(a, b, (1, 1, 1))["assd"] > 0


def test_empty_prediction_is_infinite_and_counted_apart():
    gt = _cube((16, 16, 16), (4, 4, 4), 6)
    empty = np.zeros_like(gt)
    r = case_metrics(empty, gt, (1, 1, 1))
    assert r["dice"] == 0.0 and r["precision"] == 0.0 and r["recall"] == 0.0
    assert math.isinf(r["assd"]) and math.isinf(r["hd95"]) and math.isinf(r["surface_distance"])
    assert r["empty_pred"] == 1.0
    good = case_metrics(gt, gt, (1, 1, 1))
    s = summarize([{"case_id": "a", **r}, {"case_id": "b", **good}])
    assert s["empty_pred"] == 1
    assert s["dice"]["mean"] == pytest.approx(0.5) and s["dice"]["n_inf"] == 0
    assert s["assd"] == {"mean": 0.0, "std": 0.0, "n": 1, "n_inf": 1}


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1))


# ----------------------------------------------------------------------------- config


def test_config_checks_and_round_trip():
    cfg = preset("tiny", model="unet")
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="model must be one of"):
        preset("tiny", model="vnet")
    with pytest.raises(ValueError, match="multiple of 4"):
        preset("tiny", patch_size=(16, 16, 18))
    with pytest.raises(ValueError, match="unknown config keys"):
        Config.from_dict({**cfg.to_dict(), "learning_rate": 1.0})
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("huge")
    with pytest.raises(ValueError, match="patience=3 .* needs validation"):
        preset("tiny", val_every=0, patience=3)
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        preset("tiny", workers=-1)
    with pytest.raises(ValueError, match="cache_rate must be in"):
        preset("tiny", cache_rate=1.5)
    paper = preset("paper")
    assert paper.filters == (16, 32, 64, 128, 256) and paper.spacing == (2.0, 2.0, 2.0) and paper.batch_size == 2


def test_config_default_is_the_demo_preset():
    """``Config()`` is what ``demo`` runs; the other presets change some of its fields, and a
    flat config.json of an earlier run still reads."""
    assert Config() == preset("demo")
    assert (Config().patch_size, Config().hu_window, Config().lr, Config().val_every) == ((48, 48, 48), (-160.0, 240.0), 3e-3, 100)
    tiny = preset("tiny")
    assert (tiny.hu_window, tiny.warmup_steps, tiny.phantom_test_cases) == ((-100.0, 240.0), 0, 0)
    flat = {**preset("paper").to_dict()}
    assert Config.from_dict(flat) == preset("paper")


def _process_settings():
    import warnings

    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"), list(warnings.filters))  # fmt: skip


def test_process_settings_are_restored_on_exit_and_on_error():
    from examples.pancreas.runtime import process_settings

    before = _process_settings()
    torch.backends.cudnn.benchmark = True
    try:
        before = _process_settings()
        with process_settings(threads=1, deterministic=True, ignore_warnings=["some note"]):
            inside = _process_settings()
            assert inside[:5] == (1, True, False, False, ":4096:8") and inside[5] != before[5]
        assert _process_settings() == before
        with pytest.raises(_Interrupt), process_settings(threads=1, deterministic=True, device="cuda"):
            assert torch.is_deterministic_algorithms_warn_only_enabled()  # CUDA: warn-only
            raise _Interrupt
        assert _process_settings() == before
    finally:
        torch.backends.cudnn.benchmark = False


def test_train_gives_back_every_process_setting(tmp_path, tiny_cases):
    """train() sets the thread count, deterministic algorithms, cuDNN's benchmark flag and
    CUBLAS_WORKSPACE_CONFIG for the run; afterwards, and after a run that raised, every one is
    as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.backends.cudnn.benchmark = True
    try:
        before = _process_settings()
        cfg = preset("tiny", steps=2, threads=1, deterministic=True, val_every=0)
        seen = []
        train(cfg, tmp_path / "a", progress=False, cases=tiny_cases, on_step=lambda step, loss: seen.append(_process_settings()))
        assert seen[0][:5] == (1, True, False, False, ":4096:8")
        assert _process_settings() == before

        def fail(step, loss):
            raise _Interrupt

        with pytest.raises(_Interrupt):
            train(cfg, tmp_path / "b", progress=False, cases=tiny_cases, on_step=fail)
        assert _process_settings() == before
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_cases():
    return load_cases(preset("tiny"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_cases):
    out = tmp_path_factory.mktemp("run")
    cfg = preset("tiny", steps=4, checkpoint_every=2)
    result = train(cfg, out, progress=False, cases=tiny_cases)
    return cfg, out, result


def test_training_writes_checkpoint_log_and_learns_something(tiny_run):
    cfg, out, result = tiny_run
    assert len(result["losses"]) == 4 and all(math.isfinite(v) for v in result["losses"])
    assert result["losses"][-1] < result["losses"][0]
    for name in ("checkpoint.pt", "config.json", "splits.json", "log.csv"):
        assert (out / name).is_file()
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary files
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()


def test_checkpoint_alone_rebuilds_the_model(tiny_run):
    cfg, out, _ = tiny_run
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # no pickled code inside
    assert ckpt["step"] == 4
    expected = {"arch": "AttentionUNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                "filters": [4, 8, 16], "norm": "batch", "deep_supervision": "fused", "heads": 2}  # fmt: skip
    assert {k: ckpt["config"][k] for k in expected} == expected
    assert Config.from_dict(ckpt["args"]) == cfg
    model = model_from_checkpoint(out / "checkpoint.pt")
    assert isinstance(model, AttentionUNet) and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    x = torch.rand(1, 1, 16, 16, 16)
    logits, att = model(x, return_attention=True)
    assert logits.shape == (1, 2, 16, 16, 16) and len(att) == 1  # depth 3: level 2 is gated


def test_load_checkpoint_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"missing \['model', 'config', 'step'\]"):
        load_checkpoint(tmp_path / "other.pt")


def test_unet_and_per_scale_deep_supervision_train(tmp_path, tiny_cases):
    cfg = preset("tiny", model="unet", deep_supervision="per_scale", loss="dice_ce", optimizer="sgd", steps=2)
    result = train(cfg, tmp_path, progress=False, cases=tiny_cases)
    assert all(math.isfinite(v) for v in result["losses"])
    model = model_from_checkpoint(tmp_path / "checkpoint.pt")
    assert type(model) is UNet and model.deep_supervision == "per_scale"


def test_init_from_unet_trains_only_the_gates(tmp_path, tiny_cases):
    unet_cfg = preset("tiny", model="unet", steps=2)
    train(unet_cfg, tmp_path / "unet", progress=False, cases=tiny_cases)
    unet = model_from_checkpoint(tmp_path / "unet" / "checkpoint.pt")
    cfg = preset("tiny", init_from=str(tmp_path / "unet" / "checkpoint.pt"), train_params="gates", steps=2)
    train(cfg, tmp_path / "att", progress=False, cases=tiny_cases)
    net = model_from_checkpoint(tmp_path / "att" / "checkpoint.pt")
    assert isinstance(net, AttentionUNet)
    for k, v in unet.state_dict().items():  # the backbone, its batch-norm statistics included, is untouched
        assert torch.equal(net.state_dict()[k], v), k
    with pytest.raises(ValueError, match="needs model='attention'"):
        preset("tiny", model="unet", train_params="gates")


def test_per_scale_loss_weights_downsampled_labels():
    cfg = preset("tiny", deep_supervision="per_scale")
    loss = loss_function(cfg)
    base = loss_function(preset("tiny"))
    torch.manual_seed(0)
    label = (torch.rand(2, 1, 8, 8, 8) > 0.7).float()
    outs = [torch.randn(2, 2, 8, 8, 8), torch.randn(2, 2, 4, 4, 4)]
    w = deep_supervision_weights(2)
    # MONAI's DeepSupervisionLoss resamples the label "nearest-exact": voxel 2i + 1 of every pair
    expected = w[0] * base(outs[0], label) + w[1] * base(outs[1], label[:, :, 1::2, 1::2, 1::2])
    assert loss(outs, label).item() == pytest.approx(expected.item(), rel=1e-6)


def test_patch_draws_depend_only_on_seed_step_rank(tiny_cases):
    from functools import partial

    from monai.data import CacheDataset
    from torch.utils.data import DataLoader

    from examples.pancreas.transforms import train_transforms

    cfg = preset("tiny")
    train_cases = split_cases(cfg, tiny_cases)["train"]
    head, tail = split_at_first_random(train_transforms(cfg))
    cache = CacheDataset(train_cases, head, progress=False)
    before = cache[0]["image"].clone()
    draws = PatchDraws(cache, tail)
    n = len(train_cases)

    def batch(step, rank=0, world=1):
        (keys,) = StepSampler(list(range(n)), step, step + 1, draws=2, seed=3, rank=rank, world=world)
        return collate_draws([draws[k] for k in keys], batch_size=2)

    x5, y5 = batch(5)
    batch(1)
    x5b, y5b = batch(5)
    assert x5.shape == y5.shape == (2, 1, 16, 16, 16) and torch.equal(x5, x5b) and torch.equal(y5, y5b)
    assert not torch.equal(batch(6)[0], x5)
    assert not torch.equal(batch(5, rank=1, world=2)[0], x5)
    torch.testing.assert_close(cache[0]["image"], before, rtol=0, atol=0)  # drawing left the cache as it was
    # worker processes draw the same batches as the training process, in order, from any start step
    loader = DataLoader(draws, batch_sampler=StepSampler(list(range(n)), 3, 7, 2, seed=3), num_workers=2,
                        collate_fn=partial(collate_draws, batch_size=2))  # fmt: skip
    for step, (x, y) in enumerate(loader, start=3):
        assert torch.equal(x, batch(step)[0]) and torch.equal(y, batch(step)[1]), step
    # a pass over the cases visits each once; the ranks of a pass share them (MONAI's DistributedSampler)
    one_pass = [c for keys in StepSampler(list(range(n)), 0, n, 1, seed=3) for c, _ in keys]
    assert sorted(one_pass) == list(range(n))
    ranks = [[c for keys in StepSampler(list(range(n)), 0, 2, 1, seed=3, rank=r, world=2) for c, _ in keys] for r in (0, 1)]
    assert set(ranks[0]) | set(ranks[1]) == set(range(n))
    with pytest.raises(ValueError, match="at least one training case"):
        StepSampler([], 0, 1, 1, seed=0)


class _Interrupt(Exception):
    pass


def test_resume_with_validation_repeats_the_uninterrupted_run(tmp_path, tiny_cases):
    """Bitwise equal losses, validation Dice, best step and weights of both checkpoints: in
    deterministic mode on the CPU the resumed run does the same float operations in the same
    order, since every patch is drawn from its own step's seed, whichever process draws it (the
    resumed run loads with 2 worker processes, the first in the training process)."""
    cfg = preset("tiny", steps=6, checkpoint_every=4, val_every=2, deterministic=True, lr=3e-3, schedule="poly", warmup_steps=2)
    full = train(cfg, tmp_path / "full", progress=False, cases=tiny_cases)

    def crash(step, loss):
        if step == 5:  # after the checkpoint of step 4 (a validation step): step 5 is lost
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, tmp_path / "cut", progress=False, cases=tiny_cases, on_step=crash)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 4
    resumed = train(cfg.replace(workers=2), tmp_path / "cut", resume=True, progress=False, cases=tiny_cases)
    assert resumed["losses"] == full["losses"] and len(full["losses"]) == 6
    assert resumed["val_dice"] == full["val_dice"] and [s for s, _ in full["val_dice"]] == [2, 4, 6]
    assert resumed["best"] == full["best"] and resumed["checkpoint"].endswith("best.pt")
    for name in ("checkpoint.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "full" / name), load_checkpoint(tmp_path / "cut" / name)
        assert a["step"] == b["step"] and a.get("validation") == b.get("validation"), name
        for k, v in a["model"].items():
            assert torch.equal(v, b["model"][k]), (name, k)
    logs = [read_log(tmp_path / run / "log.csv", 6) for run in ("full", "cut")]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in rows] for rows in logs]
    assert str(strip[0]) == str(strip[1])  # str: NaN == NaN
    assert not torch.are_deterministic_algorithms_enabled()  # the global setting is restored


def _scripted_validation(monkeypatch, scores, seen=None):
    """Replace the validation Dice by ``scores``, in order; ``seen`` collects the validated weights."""
    from examples.pancreas import train as train_module

    scores = iter(scores)

    def validation_dice(model, cases, cfg, device, rank=0, world=1):
        assert cases and all(c["image"].shape[0] == 1 for c in cases)
        if seen is not None:
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(train_module, "validation_dice", validation_dice)
    return scores


def test_validation_keeps_the_best_checkpoint_and_stops_early(tmp_path, tiny_cases, monkeypatch):
    from examples.pancreas.plots import plot_training_curves

    seen = []
    scores = _scripted_validation(monkeypatch, [0.2, 0.5, 0.3, 0.4, 0.9], seen)
    cfg = preset("tiny", steps=10, val_every=2, patience=2, checkpoint_every=100)
    result = train(cfg, tmp_path, progress=False, cases=tiny_cases)
    assert result["val_dice"] == [(2, 0.2), (4, 0.5), (6, 0.3), (8, 0.4)]  # two validations without a better Dice: stop
    assert result["stopped_early"] and result["steps"] == 8 and len(result["losses"]) == 8
    assert result["best"] == {"step": 4, "val_dice": 0.5} and result["checkpoint"] == str(tmp_path / "best.pt")
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 4 and best["val_dice"] == 0.5 and Config.from_dict(best["args"]) == cfg
    for k, v in seen[1].items():  # the weights validated at step 4
        assert torch.equal(best["model"][k], v), k
    assert isinstance(model_from_checkpoint(tmp_path / "best.pt"), AttentionUNet)
    last = load_checkpoint(tmp_path / "checkpoint.pt")
    assert last["step"] == 8 and last["validation"] == {"best": {"step": 4, "val_dice": 0.5}, "since_best": 2, "stopped": True}
    rows = read_log(tmp_path / "log.csv", 100)
    assert [r["val_dice"] for r in rows if not math.isnan(r["val_dice"])] == [0.2, 0.5, 0.3, 0.4]
    assert [r["step"] for r in rows if math.isnan(r["val_dice"])] == [1, 3, 5, 7]
    again = train(cfg, tmp_path, resume=True, progress=False, cases=tiny_cases)  # a stopped run stays stopped
    assert again["steps"] == 8 and again["losses"] == result["losses"] and again["best"] == result["best"]
    assert next(scores) == 0.9  # nothing was validated again
    plot_training_curves({"tiny": rows, "no validation": [{**r, "val_dice": math.nan} for r in rows]}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_resume_rebuilds_a_best_checkpoint_lost_between_the_two_writes(tmp_path, tiny_cases, monkeypatch):
    _scripted_validation(monkeypatch, [0.1, 0.2, 0.05])  # steps 2 and 4 improve, step 6 does not
    cfg = preset("tiny", steps=6, val_every=2, checkpoint_every=100)
    earlier = {}

    def crash(step, loss):
        if step == 2:
            earlier["best"] = (tmp_path / "best.pt").read_bytes()
        if step == 4:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, tmp_path, progress=False, cases=tiny_cases, on_step=crash)
    at_4 = load_checkpoint(tmp_path / "checkpoint.pt")
    (tmp_path / "best.pt").write_bytes(earlier["best"])  # as if stopped after checkpoint.pt, before best.pt
    result = train(cfg, tmp_path, resume=True, progress=False, cases=tiny_cases)
    assert result["best"] == {"step": 4, "val_dice": 0.2}
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 4 and best["val_dice"] == 0.2
    for k, v in at_4["model"].items():
        assert torch.equal(best["model"][k], v), k
    (tmp_path / "best.pt").write_bytes(earlier["best"])  # now the record (step 4) is older than the checkpoint (step 6)
    with pytest.raises(CheckpointError, match=r"best\.pt holds step 2.*names step 4.*changed by hand"):
        train(cfg, tmp_path, resume=True, progress=False, cases=tiny_cases)
    (tmp_path / "best.pt").unlink()
    with pytest.raises(CheckpointError, match=r"best\.pt is missing.*names step 4"):
        train(cfg, tmp_path, resume=True, progress=False, cases=tiny_cases)


def test_validation_needs_validation_cases(tmp_path, tiny_cases):
    with pytest.raises(ValueError, match=r"val_every=2 needs validation cases, the split has none \(val_fraction=0.0\)"):
        train(preset("tiny", val_fraction=0.0), tmp_path, progress=False, cases=tiny_cases)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_validation_dice_is_that_of_the_best_checkpoint(tmp_path, tiny_cases):
    from examples.pancreas.evaluate import validation_dice
    from examples.pancreas.transforms import eval_transforms

    cfg = preset("tiny", steps=4, val_every=2)
    result = train(cfg, tmp_path, progress=False, cases=tiny_cases)
    assert result["best"]["step"] in (2, 4) and max(d for _, d in result["val_dice"]) == result["best"]["val_dice"]
    val = [eval_transforms(cfg)(dict(c)) for c in split_cases(cfg, tiny_cases)["val"]]
    again = validation_dice(model_from_checkpoint(tmp_path / "best.pt"), val, cfg)
    assert 0.0 <= again <= 1.0 and again == pytest.approx(result["best"]["val_dice"], abs=1e-6)


def test_evaluation_scores_in_each_cases_original_geometry(tmp_path, monkeypatch):
    """Trained on a grid twice as fine as the data, a segmenter exact on the data's own voxels
    (the cube above the HU window) scores Dice 1 and the true volumes: the metrics are taken on
    the label's grid. On the training grid the same segmentation would score less."""
    from pancreas_folders import CUBE, write_msd

    from examples.pancreas import evaluate as evaluate_module
    from examples.pancreas.cases import find_cases
    from examples.pancreas.metrics import overlap_metrics

    def threshold(model, image, cfg, device="cpu"):
        fg = (image[0].as_tensor() > 0.999).float()
        return torch.stack([1 - fg, fg])

    monkeypatch.setattr(evaluate_module, "infer", threshold)
    monkeypatch.setattr(evaluate_module, "inference_model", lambda model, device: model)  # no model: the threshold segments
    cfg = preset("tiny", spacing=(0.75, 0.75, 1.0))
    (case,) = find_cases(write_msd(tmp_path, n=1, spacing=(1.5, 1.5, 2.0)))
    rows, kept = evaluate_module.evaluate(None, [case], cfg, keep=1)
    cube_ml = np.prod([s.stop - s.start for s in CUBE]) * 1.5 * 1.5 * 2.0 / 1000
    assert rows[0]["dice"] == 1.0 and rows[0]["hd95"] == 0.0 and rows[0]["assd"] == 0.0
    assert rows[0]["gt_ml"] == pytest.approx(cube_ml) and rows[0]["pred_ml"] == pytest.approx(cube_ml)
    assert kept[0]["pred"].shape == (23, 19, 15) and kept[0]["spacing"] == (0.75, 0.75, 1.0)  # the figures: the model's grid
    assert overlap_metrics(kept[0]["pred"], kept[0]["label"])["dice"] < 0.95


# ----------------------------------------------------------------------------- prediction


def test_predict_keeps_the_input_geometry(tiny_run, tmp_path):
    from examples.pancreas.phantom import generate_phantom
    from examples.pancreas.predict import predict

    _, out, _ = tiny_run
    case = generate_phantom(7, shape=(36, 30, 20), spacing=(2.0, 2.5, 3.0))
    c, s = math.cos(0.3), math.sin(0.3)
    affine = np.array([[-2.0 * c, 2.5 * s, 0, 31.5], [-2.0 * s, -2.5 * c, 0, -12.0], [0, 0, 3.0, -80.25], [0, 0, 0, 1]])
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(case["image"].astype(np.int16), affine), str(inputs / "ct.nii.gz"))
    written, failed, _, _ = predict(out / "checkpoint.pt", inputs, tmp_path / "seg", device="cpu")
    assert [p.name for p in written] == ["ct_seg.nii.gz"] and failed == []
    seg = nib.load(str(written[0]))
    assert seg.shape == (36, 30, 20)
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


def test_predict_preprocessing_matches_evaluation(tiny_cases):
    from examples.pancreas.transforms import eval_transforms, image_transforms

    cfg = preset("tiny")
    case = tiny_cases[0]
    a = eval_transforms(cfg)(dict(case))["image"]
    b = image_transforms(cfg)({"image": case["image"]})["image"]
    assert a.shape == b.shape
    torch.testing.assert_close(a.as_tensor(), b.as_tensor())
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine))


# ----------------------------------------------------------------------------- command line errors


def _cli(*args):
    return main([*map(str, args)])


def test_cli_resume_without_a_run(tmp_path, capsys):
    assert _cli("train", "--preset", "tiny", "--out", tmp_path / "none", "--resume") == 2
    assert "cannot resume" in capsys.readouterr().err


def test_cli_corrupt_checkpoint(tiny_run, tmp_path, capsys):
    cfg, _, _ = tiny_run
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert _cli("train", "--out", tmp_path, "--resume") == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert _cli("predict", "--checkpoint", tmp_path / "checkpoint.pt", "--input", tmp_path, "--out", tmp_path / "o") == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_cli_refuses_other_config_and_overwriting_a_run(tiny_run, capsys):
    _, out, _ = tiny_run
    before = (out / "checkpoint.pt").read_bytes()
    assert _cli("train", "--out", out, "--resume", "--lr", "0.5") == 2
    err = capsys.readouterr().err
    assert "different config" in err and "lr: saved 0.001, given 0.5" in err
    assert _cli("train", "--out", out, "--resume", "--preset", "demo") == 2
    assert "'tiny' run" in capsys.readouterr().err
    assert _cli("train", "--preset", "tiny", "--out", out) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing lost


def test_cli_predict_needs_volumes(tiny_run, tmp_path, capsys):
    _, out, _ = tiny_run
    assert _cli("predict", "--checkpoint", out / "checkpoint.pt", "--input", tmp_path, "--out", tmp_path / "o") == 2
    assert "no volumes in" in capsys.readouterr().err


# ----------------------------------------------------------------------------- distributed


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_process_gloo_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "examples.pancreas", "train", "--preset", "tiny", "--steps", "3", "--checkpoint-every", "2",
           "--out", str(tmp_path), "--no-progress", "--threads", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 3
    assert len((tmp_path / "log.csv").read_text().strip().splitlines()) == 4  # header + 3 steps
    assert (tmp_path / "results.json").is_file()  # rank 0 evaluated


def test_cli_evaluate_writes_per_case_metrics(tiny_run, tmp_path, capsys):
    cfg, out, _ = tiny_run
    assert _cli("evaluate", "--checkpoint", out / "checkpoint.pt", "--out", tmp_path) == 0
    assert "dice" in capsys.readouterr().out
    doc = json.loads((tmp_path / "metrics_test.json").read_text())
    test_ids = json.loads((out / "splits.json").read_text())["test"]
    assert [c["case_id"] for c in doc["cases"]] == test_ids
    assert doc["summary"]["cases"] == len(test_ids)
    header = (tmp_path / "metrics_test.csv").read_text().splitlines()[0]
    assert header.startswith("case_id,dice,precision,recall,assd,hd95,surface_distance")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_compare_writes_report_table_and_figures(tmp_path, capsys):
    from examples.pancreas.compare import compare

    doc = compare(preset("tiny", steps=2), tmp_path, device="cpu", progress=False, isolate=False)
    printed = capsys.readouterr().out
    assert "Attention U-Net" in printed and "threshold baseline Dice" in printed
    report = (tmp_path / "report.md").read_text()
    assert "| DSC |" in report and "Threshold baseline" in report and "Wilcoxon" in report
    for png in ("training_curves.png", "attention/attention.png", "attention/prediction.png", "unet/prediction.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    a, u = doc["results"]["attention"], doc["results"]["unet"]
    assert a["test_cases"] == u["test_cases"]  # the same split for both models
    assert a["params"] > u["params"]
    assert 0.0 <= doc["threshold_baseline"]["dice"] <= 1.0


def test_cli_demo_refuses_to_replace_a_run(tmp_path, capsys):
    (tmp_path / "attention").mkdir()
    (tmp_path / "attention" / "checkpoint.pt").write_bytes(b"earlier run")
    assert _cli("demo", "--out", tmp_path) == 2
    assert "pass --resume to continue the comparison, --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "attention" / "checkpoint.pt").read_bytes() == b"earlier run"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_compare_with_the_attention_unet_made_from_the_unet(tmp_path, capsys):
    """--finetune adds a third model, started from the trained U-Net's weights, gates only trained."""
    import torch

    from examples.pancreas.compare import compare
    from examples.pancreas.checkpoints import CHECKPOINT

    doc = compare(preset("tiny", steps=2), tmp_path, device="cpu", progress=False, isolate=False, finetune="gates")
    f, u = doc["results"]["finetuned"], doc["results"]["unet"]
    assert f["test_cases"] == u["test_cases"] and f["params"] == doc["results"]["attention"]["params"]
    assert doc["comparisons"][1]["a"] == "finetuned" and doc["comparisons"][1]["metrics"]["dice"]["n"] == len(u["test_cases"])
    assert "Attention U-Net from the U-Net" in (tmp_path / "report.md").read_text()
    # the backbone was frozen: the fine-tuned model's encoder equals the U-Net's
    unet = torch.load(tmp_path / "unet" / CHECKPOINT, weights_only=False)["model"]
    tuned = torch.load(tmp_path / "finetuned" / CHECKPOINT, weights_only=False)["model"]
    for key in ("encoders.0.conv1.0.weight", "decoders.0.conv.conv2.0.bias", "head.fuse.weight"):
        assert torch.equal(tuned[key], unet[key]), key
    assert not torch.equal(tuned["gates.2.gates.0.psi.weight"], torch.zeros_like(tuned["gates.2.gates.0.psi.weight"]))


def test_cli_folds_flags_reach_the_config():
    from examples.pancreas.__main__ import _config, parser

    args = parser().parse_args(["train", "--out", "x", "--folds", "4", "--fold", "2", "--val-every", "10", "--patience", "3",
                                "--workers", "2", "--cache-rate", "0.5"])  # fmt: skip
    cfg = _config(args)
    assert (cfg.folds, cfg.fold, cfg.val_every, cfg.patience, cfg.workers, cfg.cache_rate) == (4, 2, 10, 3, 2, 0.5)


def test_cpu_inference_runs_the_transformed_model_and_leaves_the_model_as_it_was(tiny_run, tiny_cases):
    """On the CPU, inference_model() is optimize_for_inference's copy (channels-last windows, folded
    gates); infer() with it gives the probabilities of the model as trained, which stays trainable
    and contiguous. Off the CPU the model itself is used."""
    from attention_gates.cpu import FoldedMultiAttentionGate
    from examples.pancreas.evaluate import infer, inference_model
    from examples.pancreas.transforms import eval_transforms

    cfg, out, _ = tiny_run
    model = model_from_checkpoint(out / "checkpoint.pt")
    conv = next(p for p in model.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2:].numel() > 1)
    image = eval_transforms(cfg)(dict(tiny_cases[0]))["image"]
    net = inference_model(model, "cpu")
    assert net is not model and any(isinstance(m, FoldedMultiAttentionGate) for m in net.modules())
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    probs = infer(net, image, cfg, "cpu")
    assert seen and all(seen) and conv.is_contiguous()
    assert inference_model(model, "meta") is model
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    from monai.inferers import sliding_window_inference

    model.eval()
    with torch.no_grad():
        want = torch.softmax(sliding_window_inference(x[None].float(), cfg.patch_size, cfg.sw_batch_size, model,
                                                      overlap=cfg.sw_overlap, mode="gaussian"), dim=1)[0]  # fmt: skip
    torch.testing.assert_close(probs, want, rtol=1e-4, atol=1e-5)
    model.train()
    model(torch.rand(2, 1, *cfg.patch_size)).sum().backward()  # the model's own parameters stay trainable
    assert conv.grad is not None and conv.is_contiguous()


def test_cpu_training_runs_channels_last(tiny_run):
    """On the CPU the model trains channels-last (oneDNN's fast layout): the checkpoint's 3D conv
    weights keep that layout, and a contiguous model loads them."""
    cfg, out, _ = tiny_run
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    convs = [v for v in ckpt["model"].values() if v.dim() == 5 and v.shape[1] > 1 and v.shape[2:].numel() > 1]  # layouts differ
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last_3d) and not v.is_contiguous() for v in convs)
    model = model_from_checkpoint(out / "checkpoint.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
