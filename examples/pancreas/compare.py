"""One run end to end (train, evaluate, figures, report) and the Attention U-Net / U-Net comparison.

:func:`run` trains one model into its run folder and evaluates it on the held-out test
cases; :func:`compare` does it for both models on the same split with the same settings
(or loads given checkpoints), runs a paired test on the per-case Dice, and writes the
comparison report. The demo (``python -m examples.pancreas demo``) is :func:`compare` with
the ``"demo"`` preset on the phantom.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import queue as queue_module
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .config import Config
from .evaluate import _jsonable, evaluate, summarize, write_results
from .plots import attention_maps, plot_attention, plot_prediction, plot_training_curves
from .report import plain_table, results_table, write_report
from .train import CHECKPOINT, LOG, CheckpointError, _read_log, load_cases, model_from_checkpoint, split_cases, train

__all__ = ["paired_test", "run", "compare"]

NAMES = {"attention": "Attention U-Net", "unet": "U-Net", "finetuned": "Attention U-Net from the U-Net"}


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of paired per-case values ``a`` vs ``b``.

    Wilcoxon rather than the paired t-test: per-case Dice is bounded and skewed (a few
    failures pull the mean), and with the handful of test cases of a pancreas study normality
    cannot be checked; the signed-rank test assumes only symmetric differences. With ``n``
    cases the exact test cannot give ``p`` below ``2 / 2^n``, so ``note`` warns when ``n`` is
    too small for any ``p < 0.05`` (``n <= 5``) and, below 10 cases, that the power is low.
    Returns ``{"test", "n", "statistic", "p_value", "mean_difference", "note"}``.
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D sequences of the same length, got {a.shape} and {b.shape}")
    n = int(a.size)
    diff = a - b
    result = {"test": "Wilcoxon signed-rank, two-sided", "n": n, "mean_difference": float(diff.mean()) if n else math.nan}
    if n == 0 or not np.any(diff):
        result.update(statistic=math.nan, p_value=math.nan, note="No non-zero differences: the test is not defined")
        return result
    res = wilcoxon(a, b, alternative="two-sided")
    result.update(statistic=float(res.statistic), p_value=float(res.pvalue))
    if n <= 5:
        result["note"] = f"With {n} cases the smallest possible p is {2 / 2**n:.3g}: this test cannot show a difference"
    elif n < 10:
        result["note"] = f"With {n} cases the test has little power; treat the p-value as indicative"
    else:
        result["note"] = ""
    return result


def _device(device: Optional[Union[str, torch.device]]) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run(
    cfg: Config,
    out: Union[str, Path],
    *,
    cases: Optional[list[dict[str, Any]]] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    resume: bool = False,
    overwrite: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    report: bool = True,
) -> Optional[dict[str, Any]]:
    """Train ``cfg``'s model into ``out`` (or load ``checkpoint``), evaluate it on the test
    cases, draw the figures and write ``results.json`` and ``report.md``.

    ``cases``: the loaded cases (loaded from ``cfg`` when ``None``). Under torchrun only rank 0
    evaluates; the other ranks return ``None``. Returns the results dict: ``"model"``,
    ``"summary"``, ``"cases"`` (per-case rows), ``"test_cases"``, ``"params"``,
    ``"seconds_per_step"``, ``"peak_memory_mb"``, ``"train_seconds"``, ``"eval_seconds"``.
    """
    out = Path(out)
    device = _device(device)
    cases = load_cases(cfg) if cases is None else cases
    t0 = time.perf_counter()
    if checkpoint is None:
        trained = train(cfg, out, resume=resume, overwrite=overwrite, device=device, progress=progress, cases=cases)
        if int(os.environ.get("RANK", "0")) != 0:
            return None
        checkpoint = trained["checkpoint"]
    else:
        trained = {"seconds_per_step": math.nan, "peak_memory_mb": math.nan}
        out.mkdir(parents=True, exist_ok=True)
    train_seconds = time.perf_counter() - t0
    model = model_from_checkpoint(checkpoint, cfg.backend).to(device)
    test_cases = split_cases(cfg, cases)["test"]
    t0 = time.perf_counter()
    rows, kept = evaluate(model, test_cases, cfg, device, keep=3)
    eval_seconds = time.perf_counter() - t0
    summary = summarize(rows)
    results = {
        "model": cfg.model, "summary": summary, "cases": rows, "test_cases": [c["case_id"] for c in test_cases],
        "params": sum(p.numel() for p in model.parameters()), "seconds_per_step": trained["seconds_per_step"],
        "peak_memory_mb": trained["peak_memory_mb"], "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "checkpoint": str(checkpoint),
    }  # fmt: skip
    write_results(rows, summary, out, "test", extra={k: v for k, v in results.items() if k not in ("summary", "cases")})
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    name = NAMES[cfg.model]
    figures = []
    log = _read_log(out / LOG, cfg.steps)
    if log:
        plot_training_curves({name: log}, out / "training_curves.png")
        figures.append(("Training loss and learning rate", "training_curves.png"))
    plot_prediction(kept, out / "prediction.png", title=name)
    figures.append((f"{name} on held-out cases: ground truth (green), prediction (red)", "prediction.png"))
    if cfg.model == "attention" and kept:
        plot_attention(attention_maps(model, kept[0]["image"], kept[0]["label"], cfg.patch_size, device), out / "attention.png", title=name)
        figures.append(("Attention coefficients of every gate head", "attention.png"))
    if report:
        write_report(out / "report.md", f"{name} on the pancreas ({cfg.preset} preset)", cfg.to_dict(), {cfg.model: results}, figures=figures,
                     notes=[f"training {train_seconds:.0f} s, evaluation {eval_seconds:.0f} s on {device}"])  # fmt: skip
    return results


def _child(queue, cfg, out, cases, checkpoint, overwrite, device, progress) -> None:
    try:
        queue.put(("ok", run(cfg, out, cases=cases, checkpoint=checkpoint, overwrite=overwrite, device=device, progress=progress)))
    except Exception as e:  # hand the error to the parent as text (exceptions need not pickle)
        bad_input = isinstance(e, (ValueError, FileNotFoundError))
        queue.put(("bad input", str(e)) if bad_input else ("error", f"{type(e).__name__}: {e}"))
        raise


def _run_in_child(cfg, out, cases, checkpoint, overwrite, device, progress) -> dict[str, Any]:
    """:func:`run` in a fresh process, so that each model's peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, cfg, out, cases, checkpoint, overwrite, str(_device(device)), progress))
    child.start()
    try:
        while True:
            try:
                status, value = queue.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not child.is_alive():
                    raise RuntimeError(f"the {cfg.model} run died (exit code {child.exitcode}) without a result") from None
    finally:
        child.join()
    if status == "bad input":
        raise ValueError(value)
    if status == "error":
        raise RuntimeError(f"the {cfg.model} run failed: {value} (traceback above)")
    return value


def compare(
    cfg: Config,
    out: Union[str, Path],
    *,
    checkpoints: Optional[Mapping[str, Union[str, Path]]] = None,
    overwrite: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    title: Optional[str] = None,
    isolate: bool = True,
    finetune: Optional[str] = None,
) -> dict[str, Any]:
    """Train (or load, ``checkpoints``: model name -> path) both models the same way on the
    same split, print the comparison table and write ``report.md`` (with the phantom's
    threshold baseline when the data are the phantom), ``comparison.json`` and the figures in
    ``out``; each model's own run lives in ``out/attention`` and ``out/unet``. With
    ``isolate`` each model runs in a process of its own, so that the CPU peak memory is
    measured per model; without, both run in this process (faster to start).

    ``finetune`` (``"gates"`` or ``"all"``) adds a third model in ``out/finetuned``: an
    Attention U-Net made from the trained U-Net (pass-through gates,
    :meth:`~attention_gates.AttentionUNet.from_unet`), trained for the same number of steps,
    the gates only or everything, and compared with the U-Net it started from."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = dict(checkpoints or {})
    if finetune not in (None, "gates", "all"):
        raise ValueError(f"finetune must be None, 'gates' or 'all', got {finetune!r}")
    unknown = sorted(set(checkpoints) - set(NAMES))
    if unknown:
        raise ValueError(f"checkpoints keys must be in {tuple(NAMES)}, got {unknown}")
    runs = {"attention": cfg.replace(model="attention"), "unet": cfg.replace(model="unet")}
    if finetune is not None:  # after the U-Net: it starts from the U-Net's checkpoint
        unet_ckpt = checkpoints.get("unet", out / "unet" / CHECKPOINT)
        runs["finetuned"] = cfg.replace(model="attention", init_from=str(unet_ckpt), train_params=finetune)
    for model in runs:
        if model not in checkpoints and not overwrite and (out / model / CHECKPOINT).exists():
            raise CheckpointError(f"{out / model} already holds a run ({CHECKPOINT}); pass --overwrite to replace it or choose another --out")
    start, load0 = time.perf_counter(), os.getloadavg()
    cases = load_cases(cfg)
    results = {}
    for model, model_cfg in runs.items():
        model_out, checkpoint = out / model, checkpoints.get(model)
        if isolate:
            results[model] = _run_in_child(model_cfg, model_out, cases, checkpoint, overwrite, device, progress)
        else:
            results[model] = run(model_cfg, model_out, cases=cases, checkpoint=checkpoint, overwrite=overwrite, device=device, progress=progress)
    dice = {m: [r["dice"] for r in res["cases"]] for m, res in results.items()}
    test = paired_test(dice["attention"], dice["unet"])
    test_finetuned = paired_test(dice["finetuned"], dice["unet"]) if "finetuned" in dice else None
    baseline = None
    if cfg.data is None:
        from .phantom import threshold_baseline

        test_cases = split_cases(cfg, cases)["test"]
        baseline = threshold_baseline(
            [{"image": np.asarray(c["image"])[0], "label": np.asarray(c["label"])[0], "case_id": c["case_id"]} for c in test_cases]
        )
    logs = {NAMES[m]: _read_log(out / m / LOG, cfg.steps) for m in results}
    figures = []
    if any(logs.values()):
        plot_training_curves(logs, out / "training_curves.png")
        figures.append(("Training loss of both models", "training_curves.png"))
    figures += [("Attention U-Net on held-out cases: ground truth (green), prediction (red)", "attention/prediction.png"),
                ("U-Net on held-out cases: ground truth (green), prediction (red)", "unet/prediction.png"),
                ("Attention coefficients of every gate head of the Attention U-Net", "attention/attention.png")]  # fmt: skip
    if "finetuned" in results:
        figures += [(f"{NAMES['finetuned']} ({finetune}) on held-out cases", "finetuned/prediction.png"),
                    (f"Attention coefficients of the {NAMES['finetuned']}", "finetuned/attention.png")]  # fmt: skip
    seconds = time.perf_counter() - start
    load1 = os.getloadavg()
    named = {NAMES[m]: r for m, r in results.items()}
    notes = [
        f"total time {seconds:.0f} s on {_device(device)}, {cfg.threads or torch.get_num_threads()} threads per training process; "
        f"load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end ({os.cpu_count()} CPUs)",
        *(f"{NAMES[m]}: training {r['train_seconds']:.0f} s, evaluation {r['eval_seconds']:.0f} s" for m, r in results.items()),
    ]
    if test_finetuned is not None:
        notes.append(
            f"{NAMES['finetuned']} (trained: {finetune}, {cfg.steps} steps from the U-Net's weights) vs the U-Net, "
            f"paired on Dice ({test_finetuned['test']}, n = {test_finetuned['n']}): mean difference "
            f"{test_finetuned['mean_difference']:+.3f}, p = {test_finetuned['p_value']:.3g}. {test_finetuned['note']}"
        )
    write_report(out / "report.md", title or f"Attention U-Net vs U-Net on the pancreas ({cfg.preset} preset)", cfg.to_dict(), named,
                 baseline=baseline, test=test, figures=figures, notes=notes)  # fmt: skip
    doc = {"results": results, "paired_test": test, "threshold_baseline": baseline, "seconds": seconds, "config": cfg.to_dict()}
    if test_finetuned is not None:
        doc["paired_test_finetuned_vs_unet"] = test_finetuned
    (out / "comparison.json").write_text(json.dumps(_jsonable(doc), indent=2))
    print(plain_table(results_table(named)))
    print(f"paired test on Dice ({test['test']}): p = {test['p_value']:.3g}. {test['note']}")
    if baseline is not None:
        print(f"threshold baseline Dice {baseline['dice']:.3f}")
    print(f"report: {out / 'report.md'} ({seconds:.0f} s in all)")
    return doc
