"""``attention-gates-nnunet``: the trainer folder for ``nnUNet_extTrainer``, plans variants, checkpoint conversion, ONNX export.

::

    attention-gates-nnunet trainer-dir
    attention-gates-nnunet plans DATASET [-p nnUNetPlans] [-o nnUNetAttentionPlans] [-c 3d_fullres ...] [gate options]
    attention-gates-nnunet convert CHECKPOINT OUTPUT [-c CONFIGURATION] [--psi-bias 12] [gate options]
    attention-gates-nnunet export MODEL_FOLDER [-f FOLD] [-c checkpoint_final.pth] [-o OUTPUT.onnx] [--opset 18] [--overwrite]

A wrong argument (a missing file or folder, a bad value, an output that exists) is one line on
standard error and exit status 2; an exported model that ONNX Runtime cannot run or that
disagrees with nnU-Net's network, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ...layers import NORMS
from .export import DEFAULT_OPSET, OnnxCheckError, export_onnx
from .plans import DEFAULT_PLANS_NAME, convert_checkpoint, trainer_dir, write_attention_plans


def _add_gate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gated-skips", type=int, nargs="*", metavar="STAGE",
                   help="encoder stages whose skips are gated (0 = full resolution; default: all but 0)")  # fmt: skip
    p.add_argument("--heads", type=int, help="gates per skip (default 1)")
    p.add_argument("--gate-norm", choices=NORMS, help="the gates' normalisation when they have one (default instance)")
    p.add_argument("--output-transform", action="store_true", help="keep the gate's W (1x1 conv + norm); default off")


def _gate_options(args: argparse.Namespace) -> dict:
    options = {"gated_skips": args.gated_skips, "gate_heads": args.heads, "gate_norm": args.gate_norm}
    options = {k: v for k, v in options.items() if v is not None}
    if args.output_transform:
        options["gate_output_transform"] = True
    return options


def _plans_file(dataset: str, plans: str) -> Path:
    """``$nnUNet_preprocessed/<dataset name>/<plans>.json`` for a dataset name or id."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed:
        raise SystemExit("error: nnUNet_preprocessed is not set (nnU-Net's folder of preprocessed datasets)")
    name = maybe_convert_to_dataset_name(int(dataset) if dataset.isdigit() else dataset)
    return Path(os.fspath(nnUNet_preprocessed)) / name / f"{plans}.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="attention-gates-nnunet",
        description="Attention gates in nnU-Net v2: the trainer folder for nnUNet_extTrainer, plans variants, checkpoint conversion, ONNX export.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("trainer-dir", help="print the folder to list in nnUNet_extTrainer (for -tr nnUNetTrainerAttentionGates and its _<n>epochs variants)")
    plans = sub.add_parser("plans", help="write a plans variant whose configurations name AttentionPlainConvUNet")
    plans.add_argument("dataset", help="dataset name or id, as for nnUNetv2_train (read from $nnUNet_preprocessed)")
    plans.add_argument("-p", "--plans", default="nnUNetPlans", help="source plans identifier (default nnUNetPlans)")
    plans.add_argument("-o", "--output", default=DEFAULT_PLANS_NAME, help=f"new plans identifier (default {DEFAULT_PLANS_NAME})")
    plans.add_argument("-c", "--configurations", nargs="+", help="configurations to convert (default: every PlainConvUNet one)")
    _add_gate_options(plans)
    conv = sub.add_parser("convert", help="a trained PlainConvUNet checkpoint -> a gated one with pass-through gates")
    conv.add_argument("checkpoint", help="nnU-Net checkpoint of the plain network (checkpoint_final.pth)")
    conv.add_argument("output", help="where to write the gated checkpoint")
    conv.add_argument("-c", "--configuration", help="plans configuration of the network (default: the checkpoint's)")
    conv.add_argument("--psi-bias", type=float, default=12.0, help="psi's bias of the pass-through gates (default 12)")
    _add_gate_options(conv)
    export = sub.add_parser("export", help="a trained model folder -> ONNX with dynamic batch and spatial sizes, checked in ONNX Runtime")
    export.add_argument("model_folder", help="the trained model folder: $nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION")
    export.add_argument("-f", "--fold", help="the fold whose weights are exported: a number or 'all' (default: 0, else all)")
    export.add_argument("-c", "--checkpoint", default="checkpoint_final.pth", help="the fold's checkpoint file (default checkpoint_final.pth)")
    export.add_argument("-o", "--output", help="the ONNX file to write (default: the checkpoint's path with .onnx)")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"the ONNX opset, {DEFAULT_OPSET} or later (default {DEFAULT_OPSET})")
    export.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.command == "trainer-dir":
        print(trainer_dir())
        return
    try:
        if args.command == "plans":
            out = write_attention_plans(_plans_file(args.dataset, args.plans), args.output, args.configurations,
                                        **_gate_options(args))  # fmt: skip
        elif args.command == "convert":
            out = convert_checkpoint(args.checkpoint, args.output, configuration=args.configuration,
                                     psi_bias=args.psi_bias, **_gate_options(args))  # fmt: skip
        else:
            out = export_onnx(args.model_folder, args.fold, args.checkpoint, args.output, args.opset, args.overwrite).summary()
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OnnxCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(out)


if __name__ == "__main__":
    main()
