"""Command line of the pancreas example: ``python -m examples.pancreas <command>``.

Commands:

- ``demo``: train the Attention U-Net and the U-Net the same way on the built-in phantom
  (``"demo"`` preset) and write the comparison report (default ``runs/demo``).
- ``train``: train one model (``--model attention|unet``) into a run folder, validating it every
  ``--val-every`` steps (the best checkpoint is kept as ``best.pt``), evaluate it on the
  held-out cases and write its report; ``--resume`` continues an interrupted run. Runs under
  ``torchrun`` for several processes, GPUs or nodes.
- ``evaluate``: evaluate a checkpoint on its run's held-out cases, in their original geometry.
- ``predict``: segment NIfTI files, DICOM series or a whole MSD / NIH data folder with a
  checkpoint, each in its own geometry; exits with status 1 when some volume failed (each named
  on its own line) and the others were written.
- ``compare``: ``demo`` for any preset and data, or for given checkpoints.

``demo`` and ``compare`` pair the two models case by case on every metric (mean difference with
a bootstrap interval, Wilcoxon signed-rank test, wins); ``--seeds N`` trains both with ``N``
training seeds and reports the spread across them.

Every command prints ``--help``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

# PyTorch's OpenMP threads spin while they wait; on a busy machine with few cores that slows
# training by up to ten times (measured on 2 shared cores), so they wait passively unless the
# user chose otherwise. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from attention_gates.ops.dispatch import BACKENDS  # noqa: E402

from .config import PRESETS, Config, preset  # noqa: E402

# flag -> (Config field, argparse kwargs); every default is None: "keep the preset's value"
CONFIG_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--data": ("data", dict(help="dataset folder (MSD Task07 or NIH Pancreas-CT); default: the phantom")),
    "--layout": ("layout", dict(choices=("auto", "msd", "nih"), help="dataset layout")),
    "--phantom-cases": ("phantom_cases", dict(type=int, help="number of phantom cases to train and validate on")),
    "--phantom-test-cases": ("phantom_test_cases", dict(type=int, help="held-out phantom test cases (0: test on part of --phantom-cases)")),
    "--model": ("model", dict(choices=("attention", "unet"), help="Attention U-Net or plain U-Net")),
    "--filters": ("filters", dict(type=int, nargs="+", help="channels per level, e.g. 16 32 64 128 256")),
    "--spacing": ("spacing", dict(type=float, nargs=3, metavar=("X", "Y", "Z"), help="resampling spacing (mm)")),
    "--patch-size": ("patch_size", dict(type=int, nargs=3, metavar=("X", "Y", "Z"), help="training patch (voxels)")),
    "--pos-neg-ratio": ("pos_neg_ratio", dict(type=float, help="pancreas-centred : background patches")),
    "--augment": ("augment", dict(action=argparse.BooleanOptionalAction, help="random augmentation")),
    "--loss": ("loss", dict(choices=("dice", "dice_ce"), help="Dice (the paper's) or Dice + cross-entropy")),
    "--optimizer": ("optimizer", dict(choices=("adam", "sgd"), help="Adam (the paper's) or SGD with Nesterov momentum")),
    "--lr": ("lr", dict(type=float, help="peak learning rate")),
    "--schedule": ("schedule", dict(choices=("poly", "cosine", "constant"), help="learning-rate schedule")),
    "--steps": ("steps", dict(type=int, help="optimizer steps in all")),
    "--batch-size": ("batch_size", dict(type=int, help="patches per step and process")),
    "--deep-supervision": ("deep_supervision", dict(choices=("fused", "per_scale"), help="fused head or per-scale loss")),
    "--backend": ("backend", dict(choices=BACKENDS, help="the gates' backend")),
    "--amp": ("amp", dict(action=argparse.BooleanOptionalAction, help="bf16 autocast (CUDA)")),
    "--deterministic": ("deterministic", dict(action=argparse.BooleanOptionalAction, help="deterministic algorithms")),
    "--seed": ("seed", dict(type=int, help="training seed")),
    "--folds": ("folds", dict(type=int, help="k-fold cross-validation: number of folds (the test cases stay fixed)")),
    "--fold": ("fold", dict(type=int, help="with --folds: the fold validated on (0-based)")),
    "--checkpoint-every": ("checkpoint_every", dict(type=int, help="steps between checkpoints")),
    "--val-every": ("val_every", dict(type=int, help="steps between validations (sliding-window Dice; 0: none)")),
    "--patience": ("patience", dict(type=int, help="stop after this many validations without a better Dice (0: never)")),
    "--threads": ("threads", dict(type=int, help="CPU threads per process (0: PyTorch's default)")),
    "--workers": ("workers", dict(type=int, help="data-loading worker processes per training process (0: none)")),
    "--cache-rate": ("cache_rate", dict(type=float, help="share of the cases whose preprocessing is cached in memory")),
    "--init-from": ("init_from", dict(help="a trained U-Net checkpoint to add (pass-through) gates to")),
    "--train": ("train_params", dict(choices=("all", "gates"), help="with --init-from: train all weights or the gates only")),
}


def _add_config_flags(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    p.add_argument("--preset", choices=tuple(PRESETS), help="starting settings (default: demo; on --resume: the run's)")
    for flag, (dest, kwargs) in CONFIG_FLAGS.items():
        if flag == "--model" and not with_model:
            continue
        p.add_argument(flag, dest=dest, default=None, **kwargs)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {dest: getattr(args, dest) for dest, _ in CONFIG_FLAGS.values() if getattr(args, dest, None) is not None}


def _config(args: argparse.Namespace, resume: bool = False) -> Config:
    overrides = _overrides(args)
    if resume:
        saved = Path(args.out) / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist (no run was started in {args.out})")
        cfg = Config.from_dict(json.loads(saved.read_text()))
        if args.preset is not None and args.preset != cfg.preset:
            raise ValueError(f"cannot resume: {args.out} is a {cfg.preset!r} run, --preset {args.preset!r} was given")
        return cfg.replace(**overrides)
    return preset(args.preset or "demo", **overrides)


def _cmd_train(args: argparse.Namespace) -> None:
    from .compare import run

    cfg = _config(args, args.resume)
    run(cfg, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device, progress=not args.no_progress)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .compare import run
    from .checkpoints import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    cfg = Config.from_dict(ckpt["args"])
    if args.data is not None:
        cfg = cfg.replace(data=args.data)
    out = args.out or str(Path(args.checkpoint).parent / "eval")
    results = run(cfg, out, checkpoint=args.checkpoint, device=args.device, report=False)
    for m, stat in results["summary"].items():
        if isinstance(stat, dict):
            print(f"{m:>18}: {stat['mean']:.4f} ± {stat['std']:.4f} (n={stat['n']}, inf={stat['n_inf']})")
    print(f"per-case results in {Path(out) / 'metrics_test.csv'} and .json")


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict

    written, failed = predict(args.checkpoint, args.input, args.out, device=args.device, backend=args.backend, progress=not args.no_progress)
    for path in written:
        print(path)
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(written) + len(failed)} volumes failed; the others are in {args.out}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_compare(args: argparse.Namespace) -> None:
    from .compare import compare

    cfg = preset(args.preset or "demo", **_overrides(args))
    checkpoints = {k: v for k, v in (("attention", args.attention_checkpoint), ("unet", args.unet_checkpoint)) if v}
    compare(cfg, args.out, checkpoints=checkpoints, overwrite=args.overwrite, device=args.device, progress=not args.no_progress,
            finetune=args.finetune, seeds=args.seeds)  # fmt: skip


def _cmd_demo(args: argparse.Namespace) -> None:
    from .compare import compare

    cfg = preset("demo", **_overrides(args))
    compare(cfg, args.out, overwrite=args.overwrite, device=args.device, progress=not args.no_progress,
            title="Demo: Attention U-Net vs U-Net on the phantom pancreas", seeds=args.seeds)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The argument parser of all commands."""
    p = argparse.ArgumentParser(
        prog="python -m examples.pancreas",
        description="Pancreas segmentation with the Attention U-Net (Oktay et al., 2018): train, evaluate, predict, compare.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    def seeds(q: argparse.ArgumentParser) -> None:
        q.add_argument("--seeds", type=int, default=1,
                       help="train both models with this many training seeds (--seed, --seed + 1, ...) and report the spread across them")

    q = sub.add_parser("demo", help="both models on the phantom, with the report (the default run)")
    q.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    q.add_argument("--overwrite", action="store_true", help="replace the runs already in --out")
    _add_config_flags(q, with_model=False)
    seeds(q)
    common(q)
    q.set_defaults(func=_cmd_demo)

    q = sub.add_parser("train", help="train one model, evaluate it, write its report")
    q.add_argument("--out", required=True, help="run folder")
    q.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    q.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    _add_config_flags(q)
    common(q)
    q.set_defaults(func=_cmd_train)

    q = sub.add_parser("evaluate", help="evaluate a checkpoint on its held-out cases")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--data", help="dataset folder, if it moved since training")
    q.add_argument("--out", help="where to write the metrics and figures (default: eval/ beside the checkpoint)")
    common(q)
    q.set_defaults(func=_cmd_evaluate)

    q = sub.add_parser("predict", help="segment NIfTI volumes or DICOM series with a checkpoint")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--input", required=True, help="a NIfTI file, a folder of them, a DICOM series folder, or an MSD or NIH data folder")
    q.add_argument("--out", required=True, help="folder for the <name>_seg.nii.gz files")
    q.add_argument("--backend", choices=BACKENDS, help="the gates' backend")
    common(q)
    q.set_defaults(func=_cmd_predict)

    q = sub.add_parser("compare", help="train or load both models, compare them on the same split")
    q.add_argument("--out", required=True)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--attention-checkpoint", help="use this trained Attention U-Net instead of training one")
    q.add_argument("--unet-checkpoint", help="use this trained U-Net instead of training one")
    q.add_argument("--finetune", choices=("gates", "all"),
                   help="add a third model: the Attention U-Net made from the trained U-Net, its gates (or all) trained")
    _add_config_flags(q, with_model=False)
    seeds(q)
    common(q)
    q.set_defaults(func=_cmd_compare)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; bad input (flags, folders, checkpoints) prints ``error: ...`` and returns 2;
    ``predict`` returns 1 when some volumes failed and the others were written."""
    args = parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
