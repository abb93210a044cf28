"""What the attention gates cost: U-Net vs Attention U-Net (per gate backend) vs MONAI's nets.

Run ``python -m benchmarks.overhead`` (``--help`` for options). For 2D and 3D, the paper's
default models and a sweep of input sizes, it measures side by side in one process:

* parameters and forward FLOPs (:class:`torch.utils.flop_counter.FlopCounterMode`: convolutions
  and matrix products, a multiply-add counted as 2 FLOPs; element-wise ops are not counted);
* inference time (eval mode, :func:`torch.inference_mode`; on the CPU every model, MONAI's too,
  after :func:`attention_gates.cpu.optimize_for_inference` with ``fold=False``: oneDNN for single
  volumes and channels-last, and the gates still on their backend) and training-step time (forward,
  cross-entropy against random labels, backward, SGD-with-momentum step), median and IQR over
  repeats, the models run round-robin inside every repeat;
* memory: the bytes saved for backward by one training forward (unique storages caught by
  :func:`torch.autograd.graph.saved_tensors_hooks`, parameters excluded, the input included
  when a layer saves it) plus the output; on the CPU the peak RSS of a fresh subprocess that
  builds the model and runs one training step; on CUDA the peak of
  :func:`torch.cuda.max_memory_allocated` during a training step over what was allocated
  before it.

It prints notes, a results table, the ratios (Attention U-Net / U-Net, ours / MONAI) and a
targets block last, and writes ``overhead.json`` and two PNG plots into the output folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.flop_counter import FlopCounterMode

from . import common
from attention_gates import AttentionUNet, UNet
from attention_gates.cpu import optimize_for_inference

CHANNELS = (16, 32, 64, 128, 256)
STRIDES = (2, 2, 2, 2)
IN_CHANNELS, OUT_CHANNELS = 1, 2

DEFAULTS = {  # device type -> dims -> (sizes, batch)
    "cpu": {3: (["32", "48", "64"], 1), 2: (["128", "256"], 2)},
    "cuda": {3: (["64", "96", "128", "160x160x96"], 2), 2: (["256", "512", "1024"], 8)},
    "quick": {3: (["32x16x16"], 1), 2: (["32x16"], 1)},
}
TIMING = {"cpu": (1, 5), "cuda": (3, 20), "quick": (1, 2)}  # (warm-up, repeats)

TRAIN_STEP = (
    "training step = zero_grad(set_to_none) + forward + cross-entropy against random labels + "
    "backward + torch.optim.SGD(lr=1e-3, momentum=0.9).step()"
)
MEMORY_NOTES = {
    "saved_bytes": (
        "bytes of the unique storages that autograd saves for backward during one training forward "
        "(torch.autograd.graph.saved_tensors_hooks; parameters excluded; the input counts when a layer "
        "saves it; views of one storage counted once)"
    ),
    "output_bytes": "bytes of the logits",
    "peak_rss_bytes": (
        "CPU only: peak RSS (VmHWM of /proc/self/status on Linux) of a fresh Python subprocess that imports torch (and "
        "MONAI for MONAI's nets), builds the model and input and runs one training step"
    ),
    "step_rss_bytes": "CPU only: how much that training step raised the subprocess's peak RSS",
    "cuda_step_bytes": (
        "CUDA only: torch.cuda.max_memory_allocated during one training step minus the memory allocated "
        "before it (after warm-up, gradients set to None; parameters and optimizer state are in the base)"
    ),
}
MODEL_NOTES = {
    "unet": (
        "ours, the authors' unet_CT_dsv: per level two 3^d conv + BN + ReLU, max-pool 2; decoder = "
        "parameter-free linear upsampling, concat with the skip, two 3^d conv + BN + ReLU; fused "
        "deep-supervision head (1x1 conv per decoder level, upsampled, 1x1 fuse)"
    ),
    "attention_unet": (
        "ours, the paper's pancreas model (unet_CT_multi_att_dsv): the U-Net above plus a 1x1 conv + BN + "
        "ReLU gating signal and two-head grid attention gates on the skips of levels 2, 3, 4; each gate "
        "computes on g's coarse grid (theta: 2^d stride-2 conv of x), upsamples alpha onto x's grid, then "
        "1x1 conv + BN of alpha*x; the two heads are fused by 1x1 conv + BN + ReLU"
    ),
    "monai_attention_unet": (
        "monai.networks.nets.AttentionUnet(channels=(16,32,64,128,256), strides=(2,2,2,2)): full-resolution "
        "block of two 3^d conv + BN + ReLU; each lower level downsamples with the first (stride-2) conv of "
        "its two 3^d conv + BN + ReLU block (no max-pool); decoder per level = 3^d transposed conv stride 2 + "
        "BN + ReLU, one single-head additive gate on every skip (all 4, the full-resolution one included) "
        "computed at the skip's own resolution with the up-converted lower output as g (1x1 W_g + BN, 1x1 "
        "W_x + BN, ReLU, 1x1 psi + BN, sigmoid; output alpha*x, no output transform), then one 3^d conv + "
        "instance norm + PReLU over concat(gated skip, up); final 1x1 conv; no deep supervision"
    ),
    "monai_unet": (
        "monai.networks.nets.UNet(channels=(16,32,64,128,256), strides=(2,2,2,2)), defaults num_res_units=0, "
        "PReLU, instance norm: one 3^d conv per level that strides by 2 (the first conv already halves the "
        "input: no full-resolution conv), one stride-1 conv at the bottom, one 3^d transposed conv stride 2 "
        "per decoder level over concat(skip, up) (the top one conv only); no gates, no deep supervision"
    ),
}


@dataclass(frozen=True)
class Model:
    """One benchmarked network: ``key`` is unique (``attention_unet[<backend>]`` per gate backend)."""

    key: str
    family: str  # "ours" or "monai"
    kind: str  # "unet" or "attention_unet"
    backend: Optional[str] = None

    @property
    def note_key(self) -> str:
        return self.kind if self.family == "ours" else f"monai_{self.kind}"


def build(model: Model, dims: int) -> nn.Module:
    """The network of ``model`` for ``dims`` spatial dims, seeded (every build is the same)."""
    torch.manual_seed(0)
    if model.family == "ours":
        if model.kind == "unet":
            return UNet(dims, IN_CHANNELS, OUT_CHANNELS, CHANNELS)
        return AttentionUNet(dims, IN_CHANNELS, OUT_CHANNELS, CHANNELS).set_backend(model.backend)
    nets = common.monai_nets()
    if model.kind == "unet":
        return nets.UNet(dims, IN_CHANNELS, OUT_CHANNELS, channels=CHANNELS, strides=STRIDES)
    return nets.AttentionUnet(dims, IN_CHANNELS, OUT_CHANNELS, channels=CHANNELS, strides=STRIDES)


def models_for(backends: Sequence[str], with_monai: bool) -> list[Model]:
    models = [Model("unet", "ours", "unet")]
    models += [Model(f"attention_unet[{b}]", "ours", "attention_unet", b) for b in backends]
    if with_monai:
        models += [Model("monai_unet", "monai", "unet"), Model("monai_attention_unet", "monai", "attention_unet")]
    return models


def parse_size(text: str, dims: int) -> tuple[int, ...]:
    """``"64"`` -> ``(64,) * dims``; ``"160x160x96"`` -> ``(160, 160, 96)``; every side a multiple of 16."""
    parts = [int(p) for p in text.lower().split("x")]
    size = tuple(parts * dims) if len(parts) == 1 else tuple(parts)
    if len(size) != dims or any(s < 16 or s % 16 for s in size):
        raise ValueError(
            f"input size must be one int or {dims} ints joined by 'x', each a multiple of 16 (>= 16, "
            f"as MONAI's nets need), got {text!r}"
        )
    return size


def size_label(size: Sequence[int]) -> str:
    return f"{size[0]}^{len(size)}" if len(set(size)) == 1 else "x".join(map(str, size))


class Runner:
    """A model with its input, labels and optimizer: one inference call, one training step.

    On the CPU, inference runs a copy made by :func:`~attention_gates.cpu.optimize_for_inference`
    (``fold=False``, so that the gates keep their backend) on a channels-last input."""

    def __init__(self, net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
        self.net, self.x, self.target = net, x, target
        self.opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        self.infer_net, self.infer_x = net, x
        if x.device.type == "cpu":
            self.infer_net = optimize_for_inference(net.eval(), fold=False)
            self.infer_x = x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)

    def infer(self) -> None:
        self.infer_net.eval()
        with torch.inference_mode():
            self.infer_net(self.infer_x)

    def train_step(self) -> None:
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.net(self.x), self.target).backward()
        self.opt.step()


def make_input(dims_size: Sequence[int], batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, IN_CHANNELS, *dims_size, generator=gen).to(device)
    target = torch.randint(0, OUT_CHANNELS, (batch, *dims_size), generator=gen).to(device)
    return x, target


def forward_flops(net: nn.Module, x: torch.Tensor) -> int:
    net.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    return int(counter.get_total_flops())


def saved_bytes(net: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes saved for backward by one training forward, bytes of its output); see MEMORY_NOTES."""
    net.train()
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    out_bytes = out.numel() * out.element_size()
    storages.pop(out.untyped_storage().data_ptr(), None)  # counted once, as the output
    total = sum(storages.values())
    del out
    return total, out_bytes


def cuda_step_bytes(runner: Runner, device: torch.device) -> int:
    runner.opt.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.train_step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def rss_child(spec: dict) -> dict:
    """In a fresh process: build, then one training step; peak RSS before and after it."""
    common.set_threads(spec["threads"])
    if spec["backend"] == "compile":
        common.allow_recompiles()
    model = Model(spec["key"], spec["family"], spec["kind"], spec["backend"])
    runner = Runner(build(model, spec["dims"]), *make_input(spec["size"], spec["batch"], torch.device("cpu")))
    before = common.peak_rss()
    runner.train_step()
    peak = common.peak_rss()
    return {"peak_rss_bytes": peak, "step_rss_bytes": peak - before}


def measure_rss(model: Model, dims: int, size: Sequence[int], batch: int) -> dict:
    spec = {"key": model.key, "family": model.family, "kind": model.kind, "backend": model.backend,
            "dims": dims, "size": list(size), "batch": batch, "threads": torch.get_num_threads()}  # fmt: skip
    return common.rss_in_child("benchmarks.overhead", spec, what=f"{model.key} {list(size)}", timeout=600)


def bench_size(
    models: Sequence[Model], nets: dict, dims: int, size: tuple[int, ...], batch: int, device: torch.device,
    warmup: int, repeats: int, rss: bool,
) -> list[dict]:  # fmt: skip
    x, target = make_input(size, batch, device)
    runners = {m.key: Runner(nets[m.key], x, target) for m in models}
    rows = {}
    for m in models:
        net = nets[m.key]
        sb, ob = saved_bytes(net, x)
        rows[m.key] = {
            "dims": dims, "size": list(size), "size_label": size_label(size), "batch": batch, "model": m.key,
            "family": m.family, "kind": m.kind, "backend": m.backend,
            "params": sum(p.numel() for p in net.parameters()), "forward_flops": forward_flops(net, x),
            "saved_bytes": sb, "output_bytes": ob, "saved_plus_output_bytes": sb + ob,
        }  # fmt: skip
    common.log(f"  {dims}D {size_label(size)} batch {batch}: timing inference")
    inf = common.time_interleaved({k: r.infer for k, r in runners.items()}, warmup=warmup, repeats=repeats, device=device)
    common.log(f"  {dims}D {size_label(size)} batch {batch}: timing training steps")
    trn = common.time_interleaved(
        {k: r.train_step for k, r in runners.items()}, warmup=warmup, repeats=repeats, device=device
    )
    for key, row in rows.items():
        row["inference_s"] = common.summarize(inf[key])
        row["train_step_s"] = common.summarize(trn[key])
        row["inference_s"]["samples"] = inf[key]
        row["train_step_s"]["samples"] = trn[key]
        if device.type == "cuda":
            row["cuda_step_bytes"] = cuda_step_bytes(runners[key], device)
    if rss:
        for m in models:
            common.log(f"  {dims}D {size_label(size)}: peak RSS of a fresh process, {m.key}")
            rows[m.key].update(measure_rss(m, dims, size, batch))
    return list(rows.values())


METRICS = {  # ratio name -> (row field, sub-field or None)
    "inference": ("inference_s", "median"),
    "train_step": ("train_step_s", "median"),
    "forward_flops": ("forward_flops", None),
    "params": ("params", None),
    "saved_plus_output_bytes": ("saved_plus_output_bytes", None),
    "peak_rss": ("peak_rss_bytes", None),
    "step_rss": ("step_rss_bytes", None),
    "cuda_step_bytes": ("cuda_step_bytes", None),
}


def metric(row: dict, name: str) -> Optional[float]:
    field, sub = METRICS[name]
    value = row.get(field)
    return value[sub] if sub is not None and value is not None else value


def paired_ratio(num: dict, den: dict, field: str) -> Optional[float]:
    """Median over repeats of the per-round ratio: the two ran in the same round, under the same load."""
    a, b = num[field].get("samples"), den[field].get("samples")
    if not a or not b or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b))


def ratios(rows: list[dict]) -> list[dict]:
    """Attention U-Net (each backend) / U-Net, and ours / MONAI, per dims and size, for every metric.

    Each metric is a ratio of the two models' values (of medians, for times); ``*_paired`` is
    the median of the per-round time ratios, steadier on a loaded machine.
    """
    out = []
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["dims"], tuple(row["size"])), {})[row["model"]] = row
    for (dims, size), by in groups.items():
        pairs = [(k, "unet") for k in by if k.startswith("attention_unet[")]
        pairs += [(k, "monai_attention_unet") for k in by if k.startswith("attention_unet[")]
        pairs += [("unet", "monai_unet")]
        for num, den in pairs:
            if num in by and den in by:
                values = {name: common.ratio(metric(by[num], name), metric(by[den], name)) for name in METRICS}
                for name, field in (("inference_paired", "inference_s"), ("train_step_paired", "train_step_s")):
                    values[name] = paired_ratio(by[num], by[den], field)
                out.append({"dims": dims, "size": list(size), "numerator": num, "denominator": den,
                            **{k: v for k, v in values.items() if v is not None}})  # fmt: skip
    return out


def best_backend(by: dict[str, dict], name: str) -> Optional[str]:
    """The Attention U-Net entry with the lowest value of metric ``name``."""
    cands = [(metric(r, name), k) for k, r in by.items() if k.startswith("attention_unet[") and metric(r, name) is not None]
    return min(cands)[1] if cands else None


def targets(rows: list[dict], device: torch.device) -> list[dict]:
    """The issue's targets at the largest 3D input, measured value and whether it is met (never asserted)."""
    rows3 = [r for r in rows if r["dims"] == 3]
    if not rows3:
        return []
    largest = max(rows3, key=lambda r: math.prod(r["size"]))["size"]
    by = {r["model"]: r for r in rows3 if r["size"] == largest}
    where = f"3D {size_label(largest)}"
    out = []

    def add(name: str, num: Optional[str], den: str, what: str, target: Optional[float], note: str = "") -> None:
        value = common.ratio(metric(by[num], what), metric(by[den], what)) if num in by and den in by else None
        met = None if value is None or target is None else value <= target
        paired = paired_ratio(by[num], by[den], METRICS[what][0]) if what in ("inference", "train_step") else None
        out.append({"name": name, "at": where, "numerator": num, "denominator": den, "metric": what,
                    "measured": value, "paired": paired, "target": target, "met": met, "note": note})  # fmt: skip

    for what, target in (("inference", 1.03), ("train_step", 1.05)):
        best = best_backend(by, what)
        add(f"AttentionUNet3D/UNet3D {what} time (best backend)", best, "unet", what, target)
    if "attention_unet[triton]" in by and device.type == "cuda":
        add("AttentionUNet3D/UNet3D training memory (triton)", "attention_unet[triton]", "unet", "cuda_step_bytes", 1.10)
    else:
        out.append({"name": "AttentionUNet3D/UNet3D training memory (triton)", "at": where, "measured": None,
                    "target": 1.10, "met": None, "note": "n/a: the triton backend runs on CUDA only"})  # fmt: skip
    best = best_backend(by, "train_step")
    if "monai_attention_unet" in by and best:
        for what in ("train_step", "inference", "forward_flops", "saved_plus_output_bytes", "step_rss", "cuda_step_bytes"):
            if metric(by[best], what) is not None:
                add(f"ours/MONAI AttentionUnet {what}", best, "monai_attention_unet", what, None, "reported, no target")
    return out


def explain(rows: list[dict]) -> list[str]:
    """Sentences relating the ours/MONAI time ratios to the FLOP and byte ratios that explain them."""
    lines = []
    for r in ratios(rows):
        if r["denominator"] != "monai_attention_unet" or r["dims"] != 3:
            continue
        lines.append(
            f"3D {size_label(r['size'])}: {r['numerator']} / MONAI AttentionUnet: training step x{r.get('train_step', float('nan')):.2f}, "
            f"inference x{r.get('inference', float('nan')):.2f}, forward FLOPs x{r['forward_flops']:.2f}, "
            f"saved+output bytes x{r['saved_plus_output_bytes']:.2f}"
        )
    if lines:
        lines.append(
            "why: ours runs two 3^d convs per decoder level over concat(skip, up) where MONAI runs one 3^d transposed "
            "conv and one 3^d conv, and ours adds the deep-supervision head; MONAI gates every skip (the "
            "full-resolution one too) at the skip's resolution with BN on W_g, W_x and psi, while our gates run "
            "theta/phi/psi on the coarse grid but add an output 1x1 conv + BN per head and a 1x1 combine; a time ratio "
            "close to the FLOP ratio says the step is compute bound, one close to the byte ratio says memory bound"
        )
    return lines


def plot(rows: list[dict], path_time: Path, path_mem: Path, device: torch.device) -> list[str]:
    plt = common.pyplot()
    if plt is None:
        return []
    dims_list = sorted({r["dims"] for r in rows})
    keys = list(dict.fromkeys(r["model"] for r in rows))

    def series(dims: int, key: str, field: str):
        pts = [r for r in rows if r["dims"] == dims and r["model"] == key and r.get(field) is not None]
        pts.sort(key=lambda r: math.prod(r["size"]))
        return pts

    fig, axes = plt.subplots(2, len(dims_list), figsize=(6 * len(dims_list), 8), squeeze=False)
    for j, dims in enumerate(dims_list):
        for i, (field, title) in enumerate((("inference_s", "inference"), ("train_step_s", "training step"))):
            ax = axes[i][j]
            for key in keys:
                pts = series(dims, key, field)
                if not pts:
                    continue
                xs = [math.prod(r["size"]) * r["batch"] for r in pts]
                med = [r[field]["median"] for r in pts]
                err = [[r[field]["median"] - r[field]["q1"] for r in pts], [r[field]["q3"] - r[field]["median"] for r in pts]]
                ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=key)
            ax.set(xscale="log", yscale="log", xlabel="input voxels (batch x size)", ylabel="seconds (median, IQR bars)",
                   title=f"{dims}D {title} on {device.type}")  # fmt: skip
            common.finish_axes(ax)
    fig.tight_layout()
    fig.savefig(path_time, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(dims_list), figsize=(6 * len(dims_list), 8), squeeze=False)
    for j, dims in enumerate(dims_list):
        ax = axes[0][j]
        for key in keys:
            pts = series(dims, key, "saved_plus_output_bytes")
            ax.plot([math.prod(r["size"]) * r["batch"] for r in pts], [r["saved_plus_output_bytes"] / 2**20 for r in pts],
                    marker="o", label=key)  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="input voxels (batch x size)", ylabel="MiB",
               title=f"{dims}D saved for backward + output")  # fmt: skip
        common.finish_axes(ax)
        _memory_bars(axes[1][j], [r for r in rows if r["dims"] == dims], device)
    fig.tight_layout()
    fig.savefig(path_mem, dpi=110)
    plt.close(fig)
    return [str(path_time), str(path_mem)]


def _memory_bars(ax, rows: list[dict], device: torch.device) -> None:
    """Bars per model at the largest size measured: the CUDA step peak, or the peak RSS split at the step."""
    field = "cuda_step_bytes" if device.type == "cuda" else "step_rss_bytes"
    measured = [r for r in rows if r.get(field) is not None]
    if measured:
        largest = max(measured, key=lambda r: math.prod(r["size"]))["size"]
        bars = [r for r in measured if r["size"] == largest]
        names = [r["model"] for r in bars]
        if device.type == "cuda":
            ax.bar(names, [r[field] / 2**20 for r in bars], label="max_memory_allocated - allocated before")
        else:
            before = [(r["peak_rss_bytes"] - r["step_rss_bytes"]) / 2**20 for r in bars]
            ax.bar(names, before, label="peak RSS before the step (imports, model, input)", color="0.75")
            ax.bar(names, [r[field] / 2**20 for r in bars], bottom=before, label="added by one training step")
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        ax.set(ylabel="MiB", title=f"{rows[0]['dims']}D {'CUDA step peak' if device.type == 'cuda' else 'peak RSS, fresh process'}"
               f" at {bars[0]['batch']}x{size_label(largest)}")  # fmt: skip
    common.finish_axes(ax)


def results_table(rows: list[dict], device: torch.device) -> str:
    mem_field = "cuda_step_bytes" if device.type == "cuda" else "peak_rss_bytes"
    headers = ["dims", "input", "model", "params", "GFLOP fwd", "inference (IQR)", "train step (IQR)", "saved+out",
               "CUDA step" if device.type == "cuda" else "peak RSS"]  # fmt: skip
    body = []
    for r in rows:
        inf, trn = r["inference_s"], r["train_step_s"]
        body.append([
            f"{r['dims']}D", f"{r['batch']}x{r['size_label']}", r["model"], f"{r['params']:,}",
            f"{r['forward_flops'] / 1e9:.2f}", f"{common.fmt_seconds(inf['median'])} ({common.fmt_seconds(inf['iqr'])})",
            f"{common.fmt_seconds(trn['median'])} ({common.fmt_seconds(trn['iqr'])})",
            common.fmt_bytes(r["saved_plus_output_bytes"]), common.fmt_bytes(r.get(mem_field)),
        ])  # fmt: skip
    return common.format_table(headers, body)


def ratios_table(rs: list[dict]) -> str:
    headers = ["dims", "input", "ratio", "inference", "(paired)", "train step", "(paired)", "FLOPs", "params",
               "saved+out", "step RSS", "CUDA step"]  # fmt: skip
    body = [[f"{r['dims']}D", size_label(r["size"]), f"{r['numerator']} / {r['denominator']}"]
            + [common.fmt_ratio(r.get(k)) for k in ("inference", "inference_paired", "train_step", "train_step_paired",
                                                  "forward_flops", "params", "saved_plus_output_bytes", "step_rss",
                                                  "cuda_step_bytes")]
            for r in rs]  # fmt: skip
    return common.format_table(headers, body)


def targets_table(ts: list[dict]) -> str:
    headers = ["target", "at", "measured", "(paired)", "target", "met"]
    body = []
    for t in ts:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "no")
        measured = common.fmt_ratio(t["measured"]) if t["measured"] is not None else t["note"]
        body.append([t["name"] + (f" [{t['numerator']}]" if t.get("numerator") else ""), t["at"], measured,
                     common.fmt_ratio(t.get("paired")),
                     "-" if t["target"] is None else f"<= {t['target']:.2f}", met])  # fmt: skip
    return common.format_table(headers, body)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:i]")
    p.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    p.add_argument("--sizes3d", nargs="+", help="3D inputs, e.g. 32 48 64 or 160x160x96 (default: per device)")
    p.add_argument("--sizes2d", nargs="+", help="2D inputs, e.g. 128 256 (default: per device)")
    p.add_argument("--batch3d", type=int, help="3D batch size (default: 1 on the CPU, 2 on CUDA)")
    p.add_argument("--batch2d", type=int, help="2D batch size (default: 2 on the CPU, 8 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed rounds before timing (default: 1 on the CPU, 3 on CUDA)")
    p.add_argument("--repeats", type=int, help="timed rounds (default: 5 on the CPU, 20 on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="also benchmark the 'compile' gate backend (off by default: the sweep compiles one graph per "
                        "gate shape and grad mode, about 40 on CUDA, minutes of compile time)")  # fmt: skip
    p.add_argument("--no-monai", action="store_true", help="leave MONAI's nets out")
    p.add_argument("--rss", choices=("largest", "all", "none"), default="largest",
                   help="CPU peak RSS in a fresh subprocess per model: at the largest size per dims (default), all, none")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the run and its subprocesses (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 warm-up, 2 repeats: checks that it runs")
    p.add_argument("--out", help="output folder (default: benchmarks/results/<machine tag>)")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch3d", "batch2d", "warmup", "repeats", "threads"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (v == 0 and name != "warmup")):
            p.error(f"--{name} must be a positive int (warm-up may be 0), got {v}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(json.loads(args.rss_child))))
        return {}
    device = common.pick_device(args.device)
    common.set_threads(args.threads)
    profile = "quick" if args.quick else device.type
    load_start = common.load_average()
    warmup, repeats = common.warmup_repeats(TIMING, profile, args)
    compile_enabled = args.compile
    backends, skipped = common.probe_backends(device, compile_enabled=compile_enabled)
    nets_mod = None if args.no_monai else common.monai_nets()
    if args.no_monai:
        monai_note = "skipped: --no-monai"
    elif nets_mod is None:
        monai_note = "skipped: monai not installed"
    else:
        monai_note = f"monai {common.machine_info(device)['monai']}"
    models = models_for(backends, nets_mod is not None)
    rss_sizes = args.rss if device.type == "cpu" else "none"
    plan = []
    for dims in sorted(args.dims):
        sizes, batch = DEFAULTS[profile][dims]
        sizes = getattr(args, f"sizes{dims}d") or sizes
        batch = getattr(args, f"batch{dims}d") or batch
        plan.append((dims, sorted((parse_size(s, dims) for s in sizes), key=math.prod), batch))

    rows: list[dict] = []
    for dims, sizes, batch in plan:
        nets = {m.key: build(m, dims).to(device) for m in models}
        for size in sizes:
            rss = rss_sizes == "all" or (rss_sizes == "largest" and size == sizes[-1])
            rows += bench_size(models, nets, dims, size, batch, device, warmup, repeats, rss)
        del nets
        gc.collect()

    out_dir = common.output_dir(args.out, device)
    tag = device.type
    plots = plot(rows, out_dir / f"overhead_time_{tag}.png", out_dir / f"overhead_memory_{tag}.png", device)
    rs = ratios(rows)
    ts = targets(rows, device)
    why = explain(rows)
    notes = [TRAIN_STEP, f"MONAI: {monai_note}"]
    notes += [f"gate backend {k} skipped: {v}" for k, v in skipped.items()]
    notes += [f"{k}: {v}" for k, v in MODEL_NOTES.items() if nets_mod is not None or not k.startswith("monai")]
    notes += [f"{k}: {v}" for k, v in MEMORY_NOTES.items()]
    notes.append("FLOPs: FlopCounterMode, forward pass, convolutions and matrix products (multiply-add = 2), "
                 "element-wise ops, pooling and interpolation not counted")  # fmt: skip
    notes.append("ours pads inputs to a multiple of 16 (none here: every size is a multiple of 16)")
    result = {
        "benchmark": "overhead",
        "machine": common.machine_info(device),
        "load_average": {"start": load_start, "end": common.load_average()},
        "settings": {
            "device": str(device), "profile": profile, "warmup": warmup, "repeats": repeats, "dtype": "float32",
            "channels": list(CHANNELS), "in_channels": IN_CHANNELS, "out_channels": OUT_CHANNELS,
            "plan": [{"dims": d, "sizes": [list(s) for s in ss], "batch": b} for d, ss, b in plan],
            "train_step": TRAIN_STEP, "compile": compile_enabled, "rss_sizes": rss_sizes,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "monai": {"available": nets_mod is not None, "note": monai_note},
        "backends": {"used": backends, "skipped": skipped},
        "models": {m.key: {"family": m.family, "kind": m.kind, "backend": m.backend, "description": MODEL_NOTES[m.note_key]}
                   for m in models},  # fmt: skip
        "memory_notes": MEMORY_NOTES,
        "notes": notes,
        "results": rows,
        "ratios": rs,
        "explanation": why,
        "targets": ts,
        "plots": [Path(p).name for p in plots],
    }
    common.write_json(out_dir / "overhead.json", result)

    print("notes:")
    for n in notes + why:
        print(f"  - {n}")
    print(f"\nload average: start {load_start}, end {result['load_average']['end']}; torch threads {torch.get_num_threads()}")
    print(f"written: {out_dir / 'overhead.json'}" + "".join(f", {p}" for p in plots))
    print("\nresults (median, IQR in parentheses):")
    print(results_table(rows, device))
    print("\nratios:")
    print(ratios_table(rs))
    print("\ntargets (reported, never asserted):")
    print(targets_table(ts))
    return result


if __name__ == "__main__":
    main()
