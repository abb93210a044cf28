"""One run end to end (train, evaluate, figures, report) and the Attention U-Net / U-Net comparison.

:func:`run` trains one model into its run folder and evaluates it on the held-out test
cases; :func:`compare` does it for both models on the same split with the same settings
(or loads given checkpoints), for one or several training seeds, compares them case by case
on every metric (:mod:`examples.pancreas.stats`: paired mean difference with a bootstrap
interval, Wilcoxon signed-rank test, wins) and writes the comparison report. The demo
(``python -m examples.pancreas demo``) is :func:`compare` with the ``"demo"`` preset on the
phantom, 24 held-out test cases.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import queue as queue_module
import signal
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from attention_gates.files import atomic_write

from .cases import load_cases
from .checkpoints import CHECKPOINT, LOG, CheckpointError, model_from_checkpoint, read_log
from .config import Config
from .evaluate import DISTANCES, METRICS, evaluate, jsonable, summarize, write_results
from .plots import attention_maps, plot_attention, plot_prediction, plot_training_curves
from .report import (
    LABELS,
    comparison_sentence,
    comparison_table,
    plain_table,
    results_table,
    spread_sentence,
    write_report,
)
from .runtime import forwarded_stop_signals, process_settings
from .splits import split_cases
from .stats import paired_comparison, seed_spread
from .train import TrainingInterrupted, train

__all__ = ["run", "compare", "compare_results"]

NAMES = {"attention": "Attention U-Net", "unet": "U-Net", "finetuned": "Attention U-Net from the U-Net"}


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
    # the evaluation after training runs on the training's threads
    with process_settings(threads=cfg.threads if "losses" in trained else 0):
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
        atomic_write(out / "results.json", json.dumps(jsonable(results), indent=2))
        figures = _run_figures(cfg, out, model, kept, device)
    if report:
        write_report(out / "report.md", f"{NAMES[cfg.model]} on the pancreas ({cfg.preset} preset)", cfg.to_dict(), {cfg.model: results},
                     figures=figures, notes=[f"training {train_seconds:.0f} s, evaluation {eval_seconds:.0f} s on {device}"])  # fmt: skip
    return results


def _run_figures(cfg: Config, out: Path, model: torch.nn.Module, kept: list[dict[str, Any]], device: torch.device) -> list[tuple[str, str]]:
    """Draw one run's figures in ``out`` (training curves, predictions on ``kept`` cases,
    attention maps); returns their ``(caption, file name)``."""
    name = NAMES[cfg.model]
    figures = []
    log = read_log(out / LOG, cfg.steps)
    if log:
        plot_training_curves({name: log}, out / "training_curves.png")
        figures.append(("Training loss and learning rate", "training_curves.png"))
    plot_prediction(kept, out / "prediction.png", title=name)
    figures.append((f"{name} on held-out cases: ground truth (green), prediction (red)", "prediction.png"))
    if cfg.model == "attention" and kept:
        plot_attention(attention_maps(model, kept[0]["image"], kept[0]["label"], cfg.patch_size, device), out / "attention.png", title=name)
        figures.append(("Attention coefficients of every gate head", "attention.png"))
    return figures


def _run_here(cfg, out, cases, checkpoint, resume, overwrite, device, progress) -> dict[str, Any]:
    """:func:`run` in this process (the arguments of :func:`_run_in_child`)."""
    return run(cfg, out, cases=cases, checkpoint=checkpoint, resume=resume, overwrite=overwrite, device=device, progress=progress)


def _child(queue, *args) -> None:
    if hasattr(os, "setpgrp"):  # a process group of its own: a terminal's Ctrl-C reaches the parent, which forwards it once
        os.setpgrp()
    try:
        queue.put(("ok", _run_here(*args)))
    except TrainingInterrupted as stop:  # the checkpoint is written: no traceback
        queue.put(("interrupted", (stop.signum, stop.step, stop.steps, stop.checkpoint)))
    except Exception as e:  # hand the error to the parent as text (exceptions need not pickle)
        bad_input = isinstance(e, (ValueError, FileNotFoundError))
        queue.put(("bad input", str(e)) if bad_input else ("error", f"{type(e).__name__}: {e}"))
        raise


def _run_in_child(cfg, out, cases, checkpoint, resume, overwrite, device, progress) -> dict[str, Any]:
    """:func:`run` in a fresh process, so that each model's peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, cfg, out, cases, checkpoint, resume, overwrite, str(_device(device)), progress))
    child.start()
    try:
        with forwarded_stop_signals(child) as received:  # Ctrl-C, SIGTERM: the child finishes its step and saves it
            while True:
                try:
                    status, value = queue.get(timeout=1.0)
                    break
                except queue_module.Empty:
                    if child.is_alive():
                        continue
                    if not received:
                        raise RuntimeError(f"the {cfg.model} run died (exit code {child.exitcode}) without a result") from None
                    status = "stopped at once"  # a second signal: this process stops as the child did
                    break
    finally:
        child.join()
    if status == "stopped at once":
        signal.raise_signal(received[-1])  # the handlers from before are back: KeyboardInterrupt, or the end of SIGTERM
    if status == "interrupted":
        raise TrainingInterrupted(*value)
    if status == "bad input":
        raise ValueError(value)
    if status == "error":
        raise RuntimeError(f"the {cfg.model} run failed: {value} (traceback above)")
    return value


def compare_results(results: Mapping[int, Mapping[str, Mapping[str, Any]]], a: str, b: str) -> dict[str, Any]:
    """Paired comparison of model ``a`` with model ``b`` on every metric.

    Args:
        results: training seed -> model name -> :func:`run`'s results (``"cases"``: per-case
            rows, ``"test_cases"``), every run on the same test cases.
        a, b: the model names compared (``"attention"``, ``"unet"``, ``"finetuned"``).

    Returns:
        ``{"a", "b", "metrics": {metric: paired_comparison}, "spread": {metric: seed_spread}
        or None}``: the per-case values averaged over the seeds are paired, and with more than
        one seed ``spread`` holds their spread across seeds.

    Raises:
        ValueError: the runs were not evaluated on the same cases in the same order.
    """
    runs = [by_model[m] for by_model in results.values() for m in (a, b)]
    if any(r["test_cases"] != runs[0]["test_cases"] for r in runs):
        raise ValueError(f"the {a} and {b} runs were evaluated on different test cases; a paired comparison needs the same ones")
    values = {  # model -> metric -> float[seeds, cases]
        m: {k: np.array([[row[k] for row in by_model[m]["cases"]] for by_model in results.values()]) for k in METRICS} for m in (a, b)
    }
    metrics = {k: paired_comparison(values[a][k].mean(axis=0), values[b][k].mean(axis=0), higher_is_better=k not in DISTANCES)
               for k in METRICS}  # fmt: skip
    spread = {k: seed_spread(values[a][k], values[b][k]) for k in METRICS} if len(results) > 1 else None
    return {"a": a, "b": b, "metrics": metrics, "spread": spread}


def _plan(cfg: Config, out: Path, checkpoints: dict[str, Any], resume: bool, overwrite: bool, finetune: Optional[str], seeds: int
          ) -> tuple[dict[int, dict[str, Config]], dict[int, Path]]:  # fmt: skip
    """``(runs, folders)``: per training seed, the config of every model, and the seed's folder;
    refuses bad arguments and run folders that hold a run already (unless ``resume`` or ``overwrite``)."""
    if resume and overwrite:
        raise ValueError("resume continues the runs in the folder and overwrite replaces them: give one of them")
    if finetune not in (None, "gates", "all"):
        raise ValueError(f"finetune must be None, 'gates' or 'all', got {finetune!r}")
    unknown = sorted(set(checkpoints) - set(NAMES))
    if unknown:
        raise ValueError(f"checkpoints keys must be in {tuple(NAMES)}, got {unknown}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    if seeds > 1 and checkpoints:
        raise ValueError(f"a checkpoint is one trained model: give checkpoints or seeds > 1, not both (got seeds={seeds})")
    seed_list = [cfg.seed + k for k in range(seeds)]
    folders = {s: out if seeds == 1 else out / f"seed{s}" for s in seed_list}
    runs = {}
    for s in seed_list:
        base = cfg.replace(seed=s)
        runs[s] = {"attention": base.replace(model="attention"), "unet": base.replace(model="unet")}
        if finetune is not None:  # after the U-Net: it starts from the U-Net's checkpoint
            unet_ckpt = checkpoints.get("unet", folders[s] / "unet" / CHECKPOINT)
            runs[s]["finetuned"] = base.replace(model="attention", init_from=str(unet_ckpt), train_params=finetune)
    for s, by_model in runs.items():
        for model in by_model:
            run_dir = folders[s] / model
            if model not in checkpoints and not (resume or overwrite) and (run_dir / CHECKPOINT).exists():
                raise CheckpointError(
                    f"{run_dir} already holds a run ({CHECKPOINT}); pass --resume to continue the comparison, "
                    "--overwrite to replace it, or choose another --out"
                )
    return runs, folders


def _figures(logs: dict[str, list], out: Path, seed: int, seeds: int, finetune: Optional[str]) -> list[tuple[str, str]]:
    """The report's figures, ``(caption, path relative to out)``; draws the training curves of the first seed."""
    prefix = "" if seeds == 1 else f"seed{seed}/"
    figures = []
    if any(logs.values()):
        plot_training_curves(logs, out / "training_curves.png")
        figures.append(("Training loss of both models" + ("" if seeds == 1 else f", seed {seed}"), "training_curves.png"))
    figures += [("Attention U-Net on held-out cases: ground truth (green), prediction (red)", f"{prefix}attention/prediction.png"),
                ("U-Net on held-out cases: ground truth (green), prediction (red)", f"{prefix}unet/prediction.png"),
                ("Attention coefficients of every gate head of the Attention U-Net", f"{prefix}attention/attention.png")]  # fmt: skip
    if finetune is not None:
        figures += [(f"{NAMES['finetuned']} ({finetune}) on held-out cases", f"{prefix}finetuned/prediction.png"),
                    (f"Attention coefficients of the {NAMES['finetuned']}", f"{prefix}finetuned/attention.png")]  # fmt: skip
    return figures


def _print_summary(first: Mapping[str, Any], named: list[dict[str, Any]], baseline: Optional[Mapping[str, Any]], out: Path, seconds: float) -> None:
    """The results and comparison tables and sentences, on the terminal."""
    print(plain_table(results_table({NAMES[m]: r for m, r in first.items()})))
    for comp in named:
        print(f"\nA = {comp['a']}, B = {comp['b']}, paired on the test cases:")
        print(plain_table(comparison_table(comp["metrics"], comp["a"], comp["b"], comp["spread"])))
        print(comparison_sentence(comp["metrics"]["dice"], comp["a"], comp["b"], LABELS["dice"]))
        if comp["spread"] is not None:
            print(spread_sentence(comp["spread"]["dice"], comp["metrics"]["dice"], comp["a"], comp["b"], LABELS["dice"]))
    if baseline is not None:
        print(f"threshold baseline Dice {baseline['dice']:.3f}")
    print(f"report: {out / 'report.md'} ({seconds:.0f} s in all)")


def compare(
    cfg: Config,
    out: Union[str, Path],
    *,
    checkpoints: Optional[Mapping[str, Union[str, Path]]] = None,
    resume: bool = False,
    overwrite: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    title: Optional[str] = None,
    isolate: bool = True,
    finetune: Optional[str] = None,
    seeds: int = 1,
) -> dict[str, Any]:
    """Train (or load, ``checkpoints``: model name -> path) both models the same way on the
    same split, compare them case by case (:func:`compare_results`), print the tables and
    write ``report.md`` (with the phantom's threshold baseline when the data are the phantom),
    ``comparison.json`` and the figures in ``out``; each model's own run lives in
    ``out/attention`` and ``out/unet``. With ``isolate`` each model runs in a process of its
    own, so that the CPU peak memory is measured per model; without, both run in this process
    (faster to start).

    ``resume`` continues an interrupted comparison in ``out`` with the same settings: each run
    folder that holds a checkpoint resumes from it (a finished run is evaluated again, without
    training), the others start.

    ``seeds`` > 1 trains both models with the training seeds ``cfg.seed, cfg.seed + 1, ...``
    (runs in ``out/seed<s>/<model>``; the data and split stay the same), compares the per-case
    values averaged over the seeds, and reports how much each model moves across seeds beside
    the difference between them (on small data the seed can matter more than the gates).

    ``finetune`` (``"gates"`` or ``"all"``) adds a third model in ``out/finetuned``: an
    Attention U-Net made from the trained U-Net (pass-through gates,
    :meth:`~attention_gates.AttentionUNet.from_unet`), trained for the same number of steps,
    the gates only or everything, and compared with the U-Net it started from.

    Returns ``{"results": {model: run results} (the first seed's), "comparisons": [...]
    (:func:`compare_results`' dicts with model keys), "seeds", "threshold_baseline",
    "seconds", "config"}``, plus ``"results_by_seed"`` with several seeds; this is also
    ``comparison.json``."""
    out = Path(out)
    checkpoints = dict(checkpoints or {})
    runs, folders = _plan(cfg, out, checkpoints, resume, overwrite, finetune, seeds)
    seed_list = list(runs)
    out.mkdir(parents=True, exist_ok=True)
    start, load0 = time.perf_counter(), os.getloadavg()
    cases = load_cases(cfg)
    load_seconds = time.perf_counter() - start
    results: dict[int, dict[str, Any]] = {}
    for s, by_model in runs.items():
        results[s] = {}
        for model, model_cfg in by_model.items():
            how = _run_in_child if isolate else _run_here
            run_dir = folders[s] / model
            resumed = resume and model not in checkpoints and (run_dir / CHECKPOINT).exists()
            results[s][model] = how(model_cfg, run_dir, cases, checkpoints.get(model), resumed, overwrite, device, progress)
    comparisons = [compare_results(results, "attention", "unet")]
    if finetune is not None:
        comparisons.append(compare_results(results, "finetuned", "unet"))
    baseline = None
    if cfg.data is None:
        from .phantom import threshold_baseline

        test_cases = split_cases(cfg, cases)["test"]
        baseline = threshold_baseline(
            [{"image": np.asarray(c["image"])[0], "label": np.asarray(c["label"])[0], "case_id": c["case_id"]} for c in test_cases]
        )
    first = results[seed_list[0]]
    logs = {NAMES[m]: read_log(folders[seed_list[0]] / m / LOG, cfg.steps) for m in first}
    figures = _figures(logs, out, seed_list[0], seeds, finetune)
    seconds = time.perf_counter() - start
    load1 = os.getloadavg()
    notes = [
        f"total time {seconds:.0f} s on {_device(device)}, {cfg.threads or torch.get_num_threads()} threads per training process; "
        f"load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end ({os.cpu_count()} CPUs)",
        f"{len(cases)} cases {'generated' if cfg.data is None else 'listed'} in {load_seconds:.1f} s",
        *(f"{'' if seeds == 1 else f'seed {s}: '}{NAMES[m]}: training {r['train_seconds']:.0f} s, evaluation {r['eval_seconds']:.0f} s"
          for s, by_model in results.items() for m, r in by_model.items()),
    ]  # fmt: skip
    if finetune is not None:
        notes.append(f"{NAMES['finetuned']}: trained {finetune}, {cfg.steps} steps from the U-Net's weights")
    named = [{**comp, "a": NAMES[comp["a"]], "b": NAMES[comp["b"]]} for comp in comparisons]
    write_report(out / "report.md", title or f"Attention U-Net vs U-Net on the pancreas ({cfg.preset} preset)", cfg.to_dict(),
                 {NAMES[m]: r for m, r in first.items()}, baseline=baseline, comparisons=named, seeds=seed_list, figures=figures,
                 notes=notes)  # fmt: skip
    doc = {"results": first, "comparisons": comparisons, "seeds": seed_list, "threshold_baseline": baseline, "seconds": seconds,
           "config": cfg.to_dict()}  # fmt: skip
    if seeds > 1:
        doc["results_by_seed"] = {str(s): r for s, r in results.items()}
    atomic_write(out / "comparison.json", json.dumps(jsonable(doc), indent=2))
    _print_summary(first, named, baseline, out, seconds)
    return doc
