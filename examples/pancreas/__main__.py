"""Command line of the pancreas example: ``python -m examples.pancreas <command>``.

Commands:

- ``demo``: train the Attention U-Net and the U-Net the same way on the built-in phantom
  (``"demo"`` preset) and write the comparison report (default ``runs/demo``).
- ``train``: train one model (``--model attention|unet``) into a run folder, validating it every
  ``--val-every`` steps (the best checkpoint is kept as ``best.pt``), evaluate it on the
  held-out cases and write its report; ``--resume`` continues an interrupted run. Runs under
  ``torchrun`` for several processes, GPUs or nodes. Ctrl-C or SIGTERM: the step in progress
  finishes, its checkpoint is written, one line gives the command that resumes, and the exit
  status is 130 (SIGINT) or 143 (SIGTERM).
- ``compare``: ``demo`` for any preset and data, or for given checkpoints; ``demo --resume`` and
  ``compare --resume`` continue an interrupted comparison (the line printed on a stop signal says so).
- ``evaluate``: evaluate a checkpoint on its run's held-out cases, in their original geometry.
- ``predict``: segment NIfTI files, DICOM series or a whole MSD / NIH data folder with a
  checkpoint, each in its own geometry; existing ``<name>_seg.nii.gz`` files are kept unless
  ``--overwrite``, and never taken as inputs; exits with status 1 when some volume failed or an
  existing output was kept (each named on its own line) and the others were written.
- ``export``: write a checkpoint's model as TorchScript, a ``torch.export`` program or ONNX
  (``--format``), with dynamic batch and sizes, checked against eager PyTorch on a phantom-sized
  volume before it is written (default: beside the checkpoint); exit status 1 when the check fails.

``--checkpoint`` takes a checkpoint file or a run folder (its ``best.pt``, else its
``checkpoint.pt``). Arguments that cannot work (an ``--out`` that is a file or cannot be
written, a ``--device`` the machine lacks, a ``--backend`` that cannot run the gates there, a
checkpoint that is not there) are refused before any data is read or file written, with one
line naming the argument, and exit status 2.

``demo`` and ``compare`` pair the two models case by case on every metric (mean difference with
a bootstrap interval, Wilcoxon signed-rank test, wins); ``--seeds N`` trains both with ``N``
training seeds and reports the spread across them.

Every command prints ``--help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

# PyTorch's OpenMP threads spin while they wait; on a busy machine with few cores that slows
# training by up to ten times (measured on 2 shared cores), so they wait passively unless the
# user chose otherwise. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

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


def _check_run(cfg: Config, args: argparse.Namespace, gates: bool, training: bool) -> torch.device:
    """The checks of the commands that train or evaluate, before any data is read or file
    written: ``--out``, ``--device``, and an explicit backend on that device (``gates``: the
    run has an Attention U-Net). Returns the device."""
    from .arguments import check_backend, check_device, check_out
    from .checkpoints import build_model
    from .runtime import process_settings

    check_out(args.out)
    device = check_device(args.device)
    if gates and cfg.backend not in (None, "auto"):
        flag = "--backend" if getattr(args, "backend", None) is not None else "backend (the run's config)"
        model = build_model(cfg.replace(model="attention", init_from=None, train_params="all"))
        with process_settings(deterministic=cfg.deterministic and training, device=device):
            check_backend(model, device, cfg.backend, training, flag=flag)
    return device


def _cmd_train(args: argparse.Namespace) -> None:
    from .arguments import check_out
    from .compare import run

    if args.resume:  # its config.json is read from --out: check that first
        check_out(args.out)
    cfg = _config(args, args.resume)
    device = _check_run(cfg, args, gates=cfg.model == "attention", training=True)
    run(cfg, args.out, resume=args.resume, overwrite=args.overwrite, device=device, progress=not args.no_progress)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .arguments import resolve_checkpoint
    from .checkpoints import load_checkpoint
    from .compare import run

    checkpoint = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(checkpoint)
    cfg = Config.from_dict(ckpt["args"])
    if args.data is not None:
        cfg = cfg.replace(data=args.data)
    args.out = args.out or str(checkpoint.parent / "eval")
    device = _check_run(cfg, args, gates=cfg.model == "attention", training=False)
    results = run(cfg, args.out, checkpoint=checkpoint, device=device, report=False)
    for m, stat in results["summary"].items():
        if isinstance(stat, dict):
            print(f"{m:>18}: {stat['mean']:.4f} ± {stat['std']:.4f} (n={stat['n']}, inf={stat['n_inf']})")
    print(f"per-case results in {Path(args.out) / 'metrics_test.csv'} and .json")


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict

    done = predict(args.checkpoint, args.input, args.out, device=args.device, backend=args.backend, progress=not args.no_progress,
                   overwrite=args.overwrite)  # fmt: skip
    for path in done.written:
        print(path)
    for line in done.skipped:
        print(f"skipped: {line}", file=sys.stderr)
    for line in done.failed:
        print(f"error: {line}", file=sys.stderr)
    if done.skipped or done.failed:
        total = len(done.written) + len(done.skipped) + len(done.failed)
        parts = [f"{len(done.written)} of {total} volumes written to {args.out}"]
        parts += [f"{len(done.skipped)} skipped"] if done.skipped else []
        parts += [f"{len(done.failed)} failed"] if done.failed else []
        print("; ".join(parts), file=sys.stderr)
    return 1 if done.failed or done.kept else 0


def _cmd_compare(args: argparse.Namespace) -> None:
    from .arguments import resolve_checkpoint
    from .compare import compare

    cfg = preset(args.preset or "demo", **_overrides(args))
    given = (("attention", args.attention_checkpoint, "--attention-checkpoint"), ("unet", args.unet_checkpoint, "--unet-checkpoint"))
    checkpoints = {k: resolve_checkpoint(v, flag) for k, v, flag in given if v}
    device = _check_run(cfg, args, gates=True, training=True)
    compare(cfg, args.out, checkpoints=checkpoints, resume=args.resume, overwrite=args.overwrite, device=device, progress=not args.no_progress,
            finetune=args.finetune, seeds=args.seeds)  # fmt: skip


def _cmd_demo(args: argparse.Namespace) -> None:
    from .compare import compare

    cfg = preset("demo", **_overrides(args))
    device = _check_run(cfg, args, gates=True, training=True)
    compare(cfg, args.out, resume=args.resume, overwrite=args.overwrite, device=device, progress=not args.no_progress,
            title="Demo: Attention U-Net vs U-Net on the phantom pancreas", seeds=args.seeds)  # fmt: skip


def _cmd_export(args: argparse.Namespace) -> int:
    from attention_gates.deploy import ExportCheckError

    from .export import export_checkpoint

    try:
        done = export_checkpoint(args.checkpoint, args.format, args.out, overwrite=args.overwrite, attention=args.attention)
    except ExportCheckError as e:
        print(f"error: {e}; nothing written", file=sys.stderr)
        return 1
    print(done.summary())
    return 0


def _resume_line(args: argparse.Namespace, stop: Any) -> str:
    """The one line printed when a stop signal ended training: what was saved and the exact command that resumes."""
    if stop.checkpoint is None:
        return f"{stop}; run the same command again to start over"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node={world} -m examples.pancreas" if world > 1 else "python -m examples.pancreas"
    if args.command in ("demo", "compare"):  # the whole comparison: its own flags again, and --resume
        again = [a for a in args.argv if a not in ("--resume", "--overwrite")] + ["--resume"]
        return f"{stop}; resume the comparison with: {launcher} {shlex.join(again)}"
    extra = [f"--device {shlex.quote(args.device)}"] * (args.device is not None) + ["--no-progress"] * args.no_progress
    return f"{stop}; resume with: {launcher} train --out {shlex.quote(str(stop.checkpoint.parent))} --resume" + "".join(f" {e}" for e in extra)


def parser() -> argparse.ArgumentParser:
    """The argument parser of all commands."""
    p = argparse.ArgumentParser(
        prog="python -m examples.pancreas",
        description="Pancreas segmentation with the Attention U-Net (Oktay et al., 2018): train, evaluate, predict, compare, export.",
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
    q.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out (the same flags again)")
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
    q.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run folder (its best.pt, else its checkpoint.pt)")
    q.add_argument("--data", help="dataset folder, if it moved since training")
    q.add_argument("--out", help="where to write the metrics and figures (default: eval/ beside the checkpoint)")
    common(q)
    q.set_defaults(func=_cmd_evaluate)

    q = sub.add_parser("predict", help="segment NIfTI volumes or DICOM series with a checkpoint")
    q.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run folder (its best.pt, else its checkpoint.pt)")
    q.add_argument("--input", required=True, help="a NIfTI file, a folder of them, a DICOM series folder, or an MSD or NIH data folder")
    q.add_argument("--out", required=True, help="folder for the <name>_seg.nii.gz files")
    q.add_argument("--overwrite", action="store_true", help="replace <name>_seg.nii.gz files already in --out (default: keep them)")
    q.add_argument("--backend", choices=BACKENDS, help="the gates' backend")
    common(q)
    q.set_defaults(func=_cmd_predict)

    q = sub.add_parser("compare", help="train or load both models, compare them on the same split")
    q.add_argument("--out", required=True)
    q.add_argument("--resume", action="store_true", help="continue an interrupted comparison in --out (the same flags again)")
    q.add_argument("--overwrite", action="store_true", help="replace the runs already in --out")
    q.add_argument("--attention-checkpoint", help="use this trained Attention U-Net instead of training one")
    q.add_argument("--unet-checkpoint", help="use this trained U-Net instead of training one")
    q.add_argument("--finetune", choices=("gates", "all"),
                   help="add a third model: the Attention U-Net made from the trained U-Net, its gates (or all) trained")
    _add_config_flags(q, with_model=False)
    seeds(q)
    common(q)
    q.set_defaults(func=_cmd_compare)

    q = sub.add_parser("export", help="export a checkpoint to TorchScript, a torch.export program or ONNX, checked against PyTorch")
    q.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run folder (its best.pt, else its checkpoint.pt)")
    q.add_argument("--format", required=True, choices=("torchscript", "program", "onnx"),
                   help="torchscript (traced: MONAI Deploy, bundles), program (torch.export, AOTInductor) or onnx (ONNX Runtime, TensorRT)")
    q.add_argument("--out", help="the file to write (default: beside the checkpoint, best.torchscript.pt, best.pt2 or best.onnx)")
    q.add_argument("--attention", action="store_true", help="also output the attention maps (Attention U-Net)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=_cmd_export)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; bad input (flags, folders, checkpoints) prints ``error: ...`` and returns 2;
    ``predict`` returns 1 when some volumes failed or an existing output was kept. A stop
    signal during training (Ctrl-C, SIGTERM) prints one line, what was saved and the command
    that resumes, and returns 128 + the signal's number (130, 143); a second Ctrl-C stops at
    once, returning 130."""
    from .train import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(_resume_line(args, stop), file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("error: interrupted (the last checkpoint written is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
