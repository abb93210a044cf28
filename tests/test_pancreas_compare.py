"""Tests of the pancreas comparison's test set and runs: the held-out phantom test cases
(deterministic, never trained or validated on), ``compare`` with several training seeds, and
the command line's ``--seeds`` and ``--phantom-test-cases``.

Runs on CPU with the ``"tiny"`` preset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("monai")
pytest.importorskip("scipy")

from examples.pancreas.cases import PHANTOM_TEST_SEED, held_out_phantom_seeds, load_cases  # noqa: E402
from examples.pancreas.config import preset  # noqa: E402
from examples.pancreas.phantom import phantom_id  # noqa: E402
from examples.pancreas.splits import split_cases  # noqa: E402

SMALL = dict(phantom_shape=(24, 24, 16), phantom_spacing=(4.0, 4.0, 5.0))


def _ids(split):
    return {k: [c["case_id"] for c in v] for k, v in split.items()}


def test_demo_tests_on_24_held_out_cases_apart_from_training_and_validation():
    cfg = preset("demo")
    assert cfg.phantom_test_cases >= 20
    fake = [{"case_id": phantom_id(s)} for s in [*range(cfg.phantom_cases), *held_out_phantom_seeds(cfg.phantom_test_cases, 0)]]
    split = _ids(split_cases(cfg, fake))
    assert split["test"] == [phantom_id(PHANTOM_TEST_SEED + i) for i in range(24)]
    assert (len(split["train"]), len(split["val"])) == (13, 3)
    assert sorted(split["train"] + split["val"]) == sorted(phantom_id(s) for s in range(16))
    assert set(split["test"]).isdisjoint(split["train"] + split["val"])


@pytest.mark.parametrize("data_seed", [0, 7])
def test_held_out_phantoms_are_deterministic_and_unlike_any_training_case(data_seed):
    cfg = preset("tiny", phantom_cases=4, phantom_test_cases=3, data_seed=data_seed, **SMALL)
    cases = load_cases(cfg)
    split = split_cases(cfg, cases)
    test_ids = [c["case_id"] for c in split["test"]]
    assert test_ids == [phantom_id(s) for s in held_out_phantom_seeds(3, data_seed)]
    seen = split["train"] + split["val"]
    assert len(seen) == 4 and set(test_ids).isdisjoint(c["case_id"] for c in seen)
    for t in split["test"]:  # other volumes, not just other names
        assert not any(np.array_equal(np.asarray(t["image"]), np.asarray(s["image"])) for s in seen)
    again = {c["case_id"]: c for c in load_cases(cfg)}
    for t in split["test"]:
        assert np.array_equal(np.asarray(t["image"]), np.asarray(again[t["case_id"]]["image"]))
        assert np.array_equal(np.asarray(t["label"]), np.asarray(again[t["case_id"]]["label"]))


def test_without_held_out_cases_the_split_takes_its_test_cases_from_the_phantoms():
    cfg = preset("tiny", **SMALL)
    assert cfg.phantom_test_cases == 0
    split = _ids(split_cases(cfg, load_cases(cfg)))
    assert len(split["test"]) == 1 and sorted(sum(split.values(), [])) == sorted(phantom_id(s) for s in range(5))


def test_real_data_ignore_the_held_out_phantom_count():
    cfg = preset("demo", data="/nowhere")
    split = _ids(split_cases(cfg, [{"case_id": f"case_{i:02d}"} for i in range(10)]))
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (6, 2, 2)


def test_held_out_cases_missing_or_repeated_are_refused():
    cfg = preset("tiny", phantom_cases=3, phantom_test_cases=2, **SMALL)
    ids = [phantom_id(s) for s in [0, 1, 2, PHANTOM_TEST_SEED]]
    with pytest.raises(ValueError, match="held-out phantom test cases once among the cases .* found 1"):
        split_cases(cfg, [{"case_id": i} for i in ids])
    with pytest.raises(ValueError, match="found 3"):
        split_cases(cfg, [{"case_id": i} for i in ids + [phantom_id(PHANTOM_TEST_SEED + 1), phantom_id(PHANTOM_TEST_SEED)]])


def test_held_out_count_is_checked():
    with pytest.raises(ValueError, match="phantom_test_cases must be an int >= 0"):
        preset("tiny", phantom_test_cases=-1)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        held_out_phantom_seeds(-2, 0)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_compare_with_two_seeds_on_held_out_cases(tmp_path, capsys):
    from examples.pancreas.compare import compare

    cfg = preset("tiny", steps=2, phantom_test_cases=6)
    doc = compare(cfg, tmp_path, device="cpu", progress=False, isolate=False, seeds=2)
    assert doc["seeds"] == [0, 1] and set(doc["results_by_seed"]) == {"0", "1"}
    test_ids = [phantom_id(s) for s in held_out_phantom_seeds(6, 0)]
    for by_model in doc["results_by_seed"].values():
        assert all(r["test_cases"] == test_ids for r in by_model.values())
    for seed in (0, 1):
        for model in ("attention", "unet"):
            assert (tmp_path / f"seed{seed}" / model / "checkpoint.pt").is_file()
            saved = json.loads((tmp_path / f"seed{seed}" / model / "config.json").read_text())
            assert saved["seed"] == seed
            splits = json.loads((tmp_path / f"seed{seed}" / model / "splits.json").read_text())
            assert splits["test"] == test_ids and set(test_ids).isdisjoint(splits["train"] + splits["val"])
    (comp,) = doc["comparisons"]
    dice = comp["metrics"]["dice"]
    assert (comp["a"], comp["b"], dice["n"]) == ("attention", "unet", 6)
    per_case = {m: np.mean([[r["dice"] for r in doc["results_by_seed"][s][m]["cases"]] for s in ("0", "1")], axis=0) for m in ("attention", "unet")}
    assert dice["mean_difference"] == pytest.approx(np.mean(per_case["attention"] - per_case["unet"]))
    assert len(comp["spread"]["dice"]["difference"]) == 2
    report = (tmp_path / "report.md").read_text()
    assert "seeds 0, 1" in report and "Across 2 training seeds" in report and "seed sd A − B" in report and "trained once" not in report
    assert "(seed0/attention/prediction.png)" in report and (tmp_path / "seed0" / "attention" / "prediction.png").is_file()
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["comparisons"][0]["metrics"]["dice"]["p_value"] == pytest.approx(dice["p_value"])
    assert "Across 2 training seeds" in capsys.readouterr().out


def test_compare_refuses_bad_seeds(tmp_path):
    from examples.pancreas.compare import compare

    with pytest.raises(ValueError, match="seeds must be an int >= 1"):
        compare(preset("tiny"), tmp_path, seeds=0)
    with pytest.raises(ValueError, match="give checkpoints or seeds > 1, not both"):
        compare(preset("tiny"), tmp_path, seeds=2, checkpoints={"unet": tmp_path / "u.pt"})


def test_compare_results_refuses_runs_on_different_cases():
    from examples.pancreas.compare import compare_results

    row = {"dice": 0.8, "precision": 0.8, "recall": 0.8, "assd": 1.0, "hd95": 2.0, "surface_distance": 1.0}
    results = {0: {"attention": {"test_cases": ["a", "b"], "cases": [row, row]}, "unet": {"test_cases": ["a", "c"], "cases": [row, row]}}}
    with pytest.raises(ValueError, match="different test cases"):
        compare_results(results, "attention", "unet")


def test_cli_seeds_and_held_out_flags(monkeypatch, tmp_path):
    import examples.pancreas.compare as compare_module
    from examples.pancreas.__main__ import main

    seen = {}
    monkeypatch.setattr(compare_module, "compare", lambda cfg, out, **kw: seen.update(cfg=cfg, **kw))
    assert main(["demo", "--out", str(tmp_path), "--seeds", "3", "--phantom-test-cases", "30"]) == 0
    assert seen["seeds"] == 3 and seen["cfg"].phantom_test_cases == 30
    assert main(["compare", "--out", str(tmp_path), "--preset", "tiny"]) == 0
    assert seen["seeds"] == 1 and seen["cfg"].phantom_test_cases == 0
