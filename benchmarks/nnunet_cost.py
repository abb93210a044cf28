"""What the attention gates cost inside nnU-Net: AttentionPlainConvUNet vs PlainConvUNet at nnU-Net's
default 3d_fullres plan for the MSD pancreas dataset.

The plan is nnU-Net's own: its default ``ExperimentPlanner`` (8 GB target) run on a dataset fingerprint
of 281 CT cases at the pancreas training set's median spacing (2.5 x 0.8027 x 0.8027 mm) and median
shape after cropping (93 x 512 x 512); ``--spacing``, ``--shape`` and ``--cases`` change them. Both
networks are built from that plan's ``arch_kwargs`` (the gates with their defaults) and measured side
by side:

* at the plan's patch and batch, without running them (meta tensors): parameters; FLOPs of a forward
  and of a training step (``FlopCounterMode``: convolutions and matrix products, a multiply-add = 2);
  nnU-Net's feature-map count (``compute_conv_feature_map_size``, what its planner budgets memory with);
* run at ``--patch`` and ``--batch`` (default: the plan's on CUDA; on the CPU a 16x96x96 patch, as
  the plan's takes minutes per step there): the forward pass as nnU-Net predicts (evaluation mode,
  no deep supervision, ``torch.inference_mode``) and a training step as nnU-Net trains (deep
  supervision, Dice + cross-entropy with its weights, SGD with Nesterov momentum 0.99, gradients
  clipped at 12; autocast and a grad scaler on CUDA), round-robin within every repeat: medians,
  their ratio, and the paired ratio (the median over rounds of the per-round ratio);
  the peak memory of a training step (CUDA: ``max_memory_allocated``; CPU: the peak RSS of a fresh
  process that runs one step).

Run from the repository root: ``python -m benchmarks.nnunet_cost`` (prints its table last; writes
``benchmarks/results/<machine tag>/nnunet_cost.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common
from benchmarks.overhead import cuda_step_bytes, forward_flops

MODELS = ("PlainConvUNet", "AttentionPlainConvUNet")
PANCREAS = {"spacing": [2.5, 0.8027, 0.8027], "shape": [93, 512, 512], "cases": 281}
QUICK = {"spacing": [2.0, 1.0, 1.0], "shape": [16, 48, 48], "cases": 5}
CPU_PATCH = [16, 96, 96]
TIMING = {"cpu": (1, 3), "cuda": (3, 20), "quick": (1, 2)}  # (warm-up rounds, timed rounds)
NUM_CLASSES = 3  # background, pancreas, tumour
TRAIN_STEP = ("nnU-Net's training step: deep supervision on, DC_and_CE_loss (soft Dice without background + "
              "cross-entropy) over the outputs weighted 1/2^i (the last 0, normalised), SGD(lr=1e-2, momentum=0.99, "
              "nesterov, weight_decay=3e-5), gradient norm clipped at 12; on CUDA under autocast with a GradScaler")  # fmt: skip
FORWARD = "nnU-Net's prediction forward: evaluation mode, deep supervision off, torch.inference_mode, one patch batch"


def plan(spacing: Sequence[float], shape: Sequence[int], cases: int) -> dict:
    """nnU-Net's default plans for a dataset of ``cases`` CT volumes, all at ``spacing`` and ``shape``."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    name = "Dataset999_Fingerprint"
    with tempfile.TemporaryDirectory() as tmp:
        raw, pre = Path(tmp, "raw", name), Path(tmp, "preprocessed", name)
        raw.mkdir(parents=True)
        pre.mkdir(parents=True)
        dataset = {
            "channel_names": {"0": "CT"}, "labels": {"background": 0, "pancreas": 1, "tumour": 2},
            "numTraining": cases, "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO",
            "dataset": {f"case{i}": {"images": [f"case{i}_0000.nii.gz"], "label": f"case{i}.nii.gz"} for i in range(cases)},
        }  # fmt: skip
        fingerprint = {
            "spacings": [list(spacing)] * cases, "shapes_after_crop": [list(shape)] * cases,
            "median_relative_size_after_cropping": 1.0,
            "foreground_intensity_properties_per_channel": {"0": {
                "max": 3000.0, "mean": 80.0, "median": 85.0, "min": -1000.0, "percentile_00_5": -90.0,
                "percentile_99_5": 220.0, "std": 60.0}},  # (the architecture does not depend on these)
        }  # fmt: skip
        (raw / "dataset.json").write_text(json.dumps(dataset))
        (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
        saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed")}
        os.environ.update(nnUNet_raw=str(raw.parent), nnUNet_preprocessed=str(pre.parent))
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the planner's report: progress, not results
                return ExperimentPlanner(name).plan_experiment()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v


def build(model: str, config: dict, device, deep_supervision: bool = True) -> torch.nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from attention_gates.integrations.nnunet.network import CLASS_NAME, PLAIN_CLASS_NAME

    arch = config["architecture"]
    name = CLASS_NAME if model == "AttentionPlainConvUNet" else PLAIN_CLASS_NAME
    with torch.device(device):
        return get_network_from_plans(name, arch["arch_kwargs"], arch["_kw_requires_import"], 1, NUM_CLASSES,
                                      allow_init=str(device) != "meta", deep_supervision=deep_supervision)  # fmt: skip


def nnunet_loss(config: dict, n_outputs: int):
    """nnU-Net's loss with deep supervision, as its trainer builds it for a dataset without regions or ignore label."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": config["batch_dice"], "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)  # fmt: skip
    weights = np.array([1 / 2**i for i in range(n_outputs)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def inputs(config: dict, patch: Sequence[int], batch: int, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A random patch batch and its labels at every deep-supervision scale (1 / cumprod(strides)[:-1])."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, *patch, generator=gen)
    scales = np.cumprod(np.array(config["architecture"]["arch_kwargs"]["strides"]), axis=0)[:-1]
    targets = [torch.randint(0, NUM_CLASSES, (batch, 1, *(p // s for p, s in zip(patch, sc))), generator=gen).float()
               for sc in scales]  # fmt: skip
    return x.to(device), [t.to(device) for t in targets]


class Runner:
    """One network with nnU-Net's optimizer and loss: a prediction forward and a training step."""

    def __init__(self, net: torch.nn.Module, config: dict, x: torch.Tensor, targets: list[torch.Tensor]) -> None:
        self.net, self.x, self.targets = net, x, targets
        self.loss = nnunet_loss(config, len(targets))
        self.opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
        self.cuda = x.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.cuda else None

    def forward(self) -> None:
        self.net.eval()
        self.net.decoder.deep_supervision = False
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.cuda):
            self.net(self.x)

    def train_step(self) -> None:
        self.net.train()
        self.net.decoder.deep_supervision = True
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=self.cuda):
            loss = self.loss(self.net(self.x), self.targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 12)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 12)
            self.opt.step()


def static_costs(model: str, config: dict) -> dict:
    """Parameters, FLOPs and nnU-Net's feature-map count at the plan's patch and batch (meta tensors)."""
    patch, batch = config["patch_size"], config["batch_size"]
    net = build(model, config, "meta")
    x = torch.empty(batch, 1, *patch, device="meta")
    net.decoder.deep_supervision = False
    forward = forward_flops(net, x)
    counter = FlopCounterMode(display=False)
    with counter:
        net.train()
        net.decoder.deep_supervision = True
        sum(o.sum() for o in net(x)).backward()
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "forward_flops": forward,
        "train_step_flops": int(counter.get_total_flops()),
        "feature_map_size": int(net.compute_conv_feature_map_size(patch)),
    }


def rss_child(spec: dict) -> dict:
    """In a fresh process: build, then one training step; the peak RSS and how much the step raised it."""
    common.set_threads(spec["threads"])
    config = spec["config"]
    x, targets = inputs(config, spec["patch"], spec["batch"], "cpu")
    runner = Runner(build(spec["model"], config, "cpu"), config, x, targets)
    before = common.peak_rss()
    runner.train_step()
    peak = common.peak_rss()
    return {"peak_rss_bytes": peak, "step_rss_bytes": peak - before}


def measure_rss(model: str, config: dict, patch: Sequence[int], batch: int) -> dict:
    spec = {"model": model, "config": config, "patch": list(patch), "batch": batch, "threads": torch.get_num_threads()}
    return common.rss_in_child("benchmarks.nnunet_cost", spec, what=model, timeout=1800)


ROWS = [  # (label, key, kind)
    ("parameters", "params", "count"),
    ("forward GFLOPs (plan's patch x batch)", "forward_flops", "gflops"),
    ("training-step GFLOPs (plan's patch x batch)", "train_step_flops", "gflops"),
    ("nnU-Net feature-map count (plan's patch)", "feature_map_size", "count"),
    ("forward, median", "forward_s", "seconds"),
    ("training step, median", "train_step_s", "seconds"),
    ("training step peak memory", "step_memory_bytes", "bytes"),
]


def _cell(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "seconds":
        return common.fmt_seconds(value)
    if kind == "bytes":
        return common.fmt_bytes(value)
    if kind == "gflops":
        return f"{value / 1e9:,.1f}"
    return f"{value:,}"


def paired_ratio(samples: dict, key: str) -> float:
    """The median over rounds of gated / plain, both timed in the same round (less noisy than a ratio of medians)."""
    pairs = zip(samples[MODELS[1]][key], samples[MODELS[0]][key])
    return statistics.median(g / p for g, p in pairs)


def table(by_model: dict[str, dict], ratios: dict[str, Optional[float]], paired: dict[str, float]) -> str:
    rows = []
    for label, key, kind in ROWS:
        cells = [_cell(by_model[m].get(key), kind) for m in MODELS]
        rows.append([label, *cells, common.fmt_ratio(ratios.get(key)), common.fmt_ratio(paired.get(key))])
    return common.format_table(["", *MODELS, "ratio", "paired ratio"], rows)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nnunet_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:i]")
    p.add_argument("--spacing", type=float, nargs=3, default=PANCREAS["spacing"], help="median spacing (mm), z y x")
    p.add_argument("--shape", type=int, nargs=3, default=PANCREAS["shape"], help="median shape after cropping, z y x")
    p.add_argument("--cases", type=int, default=PANCREAS["cases"], help="training cases (the planner caps the batch by it)")
    p.add_argument("--patch", type=int, nargs=3, help=f"timed patch, z y x (default: the plan's on CUDA, {CPU_PATCH} on the CPU)")
    p.add_argument("--batch", type=int, help="timed batch (default: the plan's)")
    p.add_argument("--warmup", type=int, help="untimed rounds (default: 1 on the CPU, 3 on CUDA)")
    p.add_argument("--repeats", type=int, help="timed rounds (default: 3 on the CPU, 20 on CUDA)")
    p.add_argument("--no-rss", action="store_true", help="CPU: skip the peak-RSS subprocesses")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the run and its subprocesses")
    p.add_argument("--quick", action="store_true", help="a tiny dataset's plan, 1 warm-up, 2 repeats: checks that it runs")
    p.add_argument("--out", help="output folder (default: benchmarks/results/<machine tag>)")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("cases", "batch", "repeats", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be a positive int, got {v}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(json.loads(args.rss_child))))
        return {}
    device = common.pick_device(args.device)
    common.set_threads(args.threads)
    load_start = common.load_average()
    fingerprint = QUICK if args.quick else {"spacing": args.spacing, "shape": args.shape, "cases": args.cases}
    common.log(f"planning: nnU-Net's ExperimentPlanner on {fingerprint}")
    config = plan(fingerprint["spacing"], fingerprint["shape"], fingerprint["cases"])["configurations"]["3d_fullres"]
    config = json.loads(json.dumps(config))  # plain lists and ints (the planner holds numpy values)
    profile = "quick" if args.quick else device.type
    warmup, repeats = common.warmup_repeats(TIMING, profile, args)
    patch = args.patch or (config["patch_size"] if device.type == "cuda" or args.quick else CPU_PATCH)
    batch = args.batch or config["batch_size"]
    strides = np.prod(np.array(config["architecture"]["arch_kwargs"]["strides"]), axis=0)
    if any(p % s for p, s in zip(patch, strides)):
        raise SystemExit(f"error: --patch {list(patch)} must be divisible by the plan's total strides {strides.tolist()}")

    common.log("static costs at the plan's patch and batch (meta tensors)")
    by_model = {m: {"model": m, **static_costs(m, config)} for m in MODELS}
    x, targets = inputs(config, patch, batch, device)
    runners = {m: Runner(build(m, config, device), config, x, targets) for m in MODELS}
    common.log(f"timing the forward at patch {list(patch)} x batch {batch}, {warmup} warm-up + {repeats} rounds")
    fwd = common.time_interleaved({m: r.forward for m, r in runners.items()}, warmup=warmup, repeats=repeats, device=device)
    common.log("timing the training step")
    trn = common.time_interleaved({m: r.train_step for m, r in runners.items()}, warmup=warmup, repeats=repeats, device=device)
    samples = {}
    for m in MODELS:
        f, t = common.summarize(fwd[m]), common.summarize(trn[m])
        by_model[m].update(forward_s=f["median"], forward_iqr_s=f["iqr"], train_step_s=t["median"], train_step_iqr_s=t["iqr"])
        samples[m] = {"forward_s": fwd[m], "train_step_s": trn[m]}
    if device.type == "cuda":
        for m in MODELS:
            by_model[m]["step_memory_bytes"] = cuda_step_bytes(runners[m], device)
        memory = "torch.cuda.max_memory_allocated over one training step, above the memory allocated before it"
    elif args.no_rss:
        memory = "not measured (--no-rss)"
    else:
        del runners
        gc.collect()
        for m in MODELS:
            common.log(f"peak RSS of a fresh process running one training step: {m}")
            rss = measure_rss(m, config, patch, batch)
            by_model[m].update(step_memory_bytes=rss["step_rss_bytes"], peak_rss_bytes=rss["peak_rss_bytes"])
        memory = "peak RSS (VmHWM) of a fresh process: how much one training step raised it"
    ratios = {key: common.ratio(by_model[MODELS[1]].get(key), by_model[MODELS[0]].get(key)) for _, key, _ in ROWS}
    paired = {key: paired_ratio(samples, key) for key in ("forward_s", "train_step_s")}

    from attention_gates.integrations.nnunet import GATE_DEFAULTS

    gated = build(MODELS[1], config, "meta").gate_options
    result = {
        "benchmark": "nnunet_cost",
        "machine": common.machine_info(device),
        "load_average": {"start": load_start, "end": common.load_average()},
        "settings": {
            "device": str(device), "profile": profile, "warmup": warmup, "repeats": repeats, "dtype": "float32",
            "timed_patch": list(patch), "timed_batch": batch, "threads": torch.get_num_threads(),
            "fingerprint": fingerprint, "gates": gated, "gate_defaults": GATE_DEFAULTS,
        },  # fmt: skip
        "plan": {k: config[k] for k in ("patch_size", "batch_size", "spacing")} | {"arch_kwargs": config["architecture"]["arch_kwargs"]},
        "notes": [FORWARD, TRAIN_STEP, f"memory: {memory}",
                  "FLOPs: FlopCounterMode (convolutions and matrix products, multiply-add = 2) at the plan's patch and batch; "
                  "the training step's are its forward (deep supervision on) and backward"],  # fmt: skip
        "results": list(by_model.values()),
        "ratios": [{"metric": key, "gated_over_plain": ratios[key], "paired": paired.get(key)} for _, key, _ in ROWS],
        "samples": samples,
    }
    out = common.output_dir(args.out, device) / "nnunet_cost.json"
    common.write_json(out, result)
    arch = config["architecture"]["arch_kwargs"]
    print(f"plan (nnU-Net's ExperimentPlanner, 3d_fullres): patch {config['patch_size']}, batch {config['batch_size']}, "
          f"spacing {config['spacing']}, {arch['n_stages']} stages, features {arch['features_per_stage']}, strides {arch['strides']}")  # fmt: skip
    print(f"gates: {gated}")
    for n in result["notes"]:
        print(f"  - {n}")
    print(f"timed at patch {list(patch)} x batch {batch} on {device}; load average {load_start} -> {result['load_average']['end']}; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"written: {out}\n")
    print(table(by_model, ratios, paired))
    return result


if __name__ == "__main__":
    main()
