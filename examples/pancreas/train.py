"""Training: models from configs and checkpoints, the patch stream, and the training loop.

One process or many: under ``torchrun`` (``WORLD_SIZE`` > 1) the loop runs data-parallel
(DistributedDataParallel; NCCL on CUDA, Gloo on CPU), each rank drawing its own patches; rank 0
logs and writes the checkpoints.

Exact resume: every patch of every step is drawn from a random stream seeded by
``(seed, step, rank, draw)``, so the data of step ``s`` do not depend on what ran before; with
the model, optimizer, scheduler and RNG states restored from a checkpoint, a resumed run in
deterministic mode (``Config.deterministic``) repeats the losses of an uninterrupted one.

Checkpoint format (``checkpoint.pt`` in the run folder, written atomically every
``checkpoint_every`` steps and at the end; loadable with ``torch.load(weights_only=True)``)::

    {"model": state_dict, "config": attention_gates.finetune.checkpoint_config(model)
     (``"arch"``: "UNet" | "AttentionUNet", and the model's constructor arguments),
     "optimizer": ..., "scheduler": ..., "step": int, "rng": {...}, "args": Config.to_dict()}

so ``AttentionUNet3D.from_unet(path)`` reads a U-Net checkpoint of this example directly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from attention_gates import AttentionUNet, UNet, deep_supervision_weights
from attention_gates.finetune import checkpoint_config, freeze_backbone

from .config import Config
from .evaluate import preferred_layout

__all__ = [
    "CheckpointError",
    "model_config",
    "build_model",
    "model_from_config",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "load_cases",
    "split_cases",
    "PatchStream",
    "train",
]

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
ARCHS = {"UNet": UNet, "AttentionUNet": AttentionUNet}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the run."""


# ----------------------------------------------------------------------------- models


def model_config(cfg: Config) -> dict[str, Any]:
    """The constructor arguments (and ``"arch"``) of ``cfg``'s model, for :func:`model_from_config`."""
    config: dict[str, Any] = {
        "arch": "AttentionUNet" if cfg.model == "attention" else "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "filters": list(cfg.filters),
        "norm": cfg.norm,
        "deep_supervision": cfg.deep_supervision,
    }
    if cfg.model == "attention":
        config["heads"] = cfg.heads
    return config


def model_from_config(config: dict[str, Any], backend: Optional[str] = None) -> nn.Module:
    """Build the model a checkpoint's ``"config"`` describes (``backend``: the gates')."""
    if not isinstance(config, dict) or config.get("arch") not in ARCHS:
        raise CheckpointError(f"model config must be a dict with 'arch' in {tuple(ARCHS)}, got {config!r}")
    kwargs = {k: v for k, v in config.items() if k not in ("arch", "spatial_dims")}
    if config["arch"] == "AttentionUNet":
        kwargs["backend"] = backend
    return ARCHS[config["arch"]](config.get("spatial_dims", 3), **kwargs)


def build_model(cfg: Config) -> nn.Module:
    """A fresh model for ``cfg``, or with ``cfg.init_from`` the Attention U-Net made from a
    trained U-Net checkpoint (pass-through gates, :mod:`attention_gates.finetune`), with only
    the gates trainable when ``cfg.train_params == "gates"``."""
    if cfg.init_from is None:
        return model_from_config(model_config(cfg), cfg.backend)
    if cfg.model != "attention":
        raise ValueError("init_from (a U-Net checkpoint to add gates to) needs model='attention'")
    from attention_gates import AttentionUNet3D

    unet = model_from_checkpoint(cfg.init_from)
    if isinstance(unet, AttentionUNet):
        raise CheckpointError(f"init_from must be a UNet checkpoint, got an AttentionUNet from {cfg.init_from}")
    model = AttentionUNet3D.from_unet(unet, heads=cfg.heads)
    if tuple(model.filters) != tuple(cfg.filters):
        raise ValueError(f"init_from has filters {list(model.filters)}, the run asks for {list(cfg.filters)}")
    if cfg.backend is not None:
        model.set_backend(cfg.backend)
    if cfg.train_params == "gates":
        freeze_backbone(model)
    return model


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; ``CheckpointError`` names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, foreign pickle...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in ("model", "config", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a pancreas-example checkpoint (missing {missing})")
    return ckpt


def model_from_checkpoint(
    checkpoint: Union[str, Path, dict[str, Any]], backend: Optional[str] = None, map_location: str = "cpu"
) -> nn.Module:
    """Rebuild the trained model from a checkpoint (path or loaded dict) alone, in eval mode."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location)
    model = model_from_config(ckpt["config"], backend)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its own model config: {e}") from None
    return model.eval()


def save_checkpoint(state: dict[str, Any], path: Union[str, Path]) -> None:
    """``torch.save`` atomically: write a temporary file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------- data


def load_cases(cfg: Config) -> list[dict[str, Any]]:
    """The cases of ``cfg.data`` (``None``: ``cfg.phantom_cases`` phantoms seeded by ``cfg.data_seed``,
    then the ``cfg.phantom_test_cases`` held-out ones, :func:`~examples.pancreas.data.held_out_phantom_seeds`)."""
    from . import data

    if cfg.data is None:
        geometry = dict(shape=cfg.phantom_shape, spacing=cfg.phantom_spacing)
        held_out = data.held_out_phantom_seeds(cfg.phantom_test_cases, cfg.data_seed)
        cases = data.phantom_cases(cfg.phantom_cases, cfg.data_seed, **geometry)
        return cases + (data.phantom_cases(len(held_out), held_out.start, **geometry) if held_out else [])
    return data.find_cases(cfg.data, layout=cfg.layout)


def split_cases(cfg: Config, cases: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``{"train", "val", "test"}`` lists of cases, split by case id with ``cfg``'s split settings.

    On the phantom with ``cfg.phantom_test_cases``, the held-out phantoms are the test set and
    the others are split into training and validation; ``ValueError`` if ``cases`` lacks them."""
    from . import data
    from .phantom import phantom_id

    held_out = set()
    if cfg.data is None:
        held_out = {phantom_id(s) for s in data.held_out_phantom_seeds(cfg.phantom_test_cases, cfg.data_seed)}
    ids = [c["case_id"] for c in cases]
    rest = [i for i in ids if i not in held_out]
    if len(ids) - len(rest) != len(held_out):
        raise ValueError(f"expected each of the {len(held_out)} held-out phantom test cases once among the cases "
                         f"(load_cases makes them), found {len(ids) - len(rest)}")  # fmt: skip
    splits = data.make_splits(
        rest, seed=cfg.data_seed, val_fraction=cfg.val_fraction,
        test_fraction=0.0 if held_out else cfg.test_fraction, folds=cfg.folds, fold=cfg.fold,
    )  # fmt: skip
    splits["test"] = sorted(held_out) if held_out else splits["test"]
    by_id = {c["case_id"]: c for c in cases}
    return {name: [by_id[i] for i in splits[name]] for name in ("train", "val", "test")}


def _plain(t: Tensor) -> Tensor:
    """A MetaTensor's plain tensor (the network does not need the metadata)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def _draw_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


class PatchStream:
    """Training batches that depend only on ``(seed, step, rank)``.

    The deterministic head of ``transform`` (loading, resampling, intensity scaling: every
    transform before the first random one) runs once per case and is kept; the random tail
    (patch sampling, augmentation) runs per draw, seeded by ``(seed, step, rank, draw)``.
    Cases are visited in a shuffled order per pass over the training set (the flat draw index
    ``(step * world + rank) * draws_per_step + draw`` runs through one permutation per pass),
    so the ranks share the passes as a distributed sampler would.

    ``batch(step)`` returns ``(image: Tensor[B, 1, *patch], label: Tensor[B, 1, *patch])``.
    """

    def __init__(self, cases: list[dict[str, Any]], transform, seed: int, batch_size: int, num_samples: int = 1,
                 rank: int = 0, world: int = 1) -> None:  # fmt: skip
        from monai.transforms import Compose, Randomizable

        if not cases:
            raise ValueError("PatchStream needs at least one training case, got none")
        steps = list(transform.flatten().transforms if isinstance(transform, Compose) else [transform])
        cut = next((i for i, t in enumerate(steps) if isinstance(t, Randomizable)), len(steps))
        head, self.tail = Compose(steps[:cut]), Compose(steps[cut:])
        self.cached = [head(dict(c)) for c in cases]
        self.seed, self.batch_size, self.rank, self.world = seed, batch_size, rank, world
        self.draws = math.ceil(batch_size / num_samples)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        n = len(self.cached)
        images, labels = [], []
        for j in range(self.draws):
            k = (step * self.world + self.rank) * self.draws + j
            epoch, pos = divmod(k, n)
            case = self.cached[int(np.random.default_rng([self.seed, epoch]).permutation(n)[pos])]
            self.tail.set_random_state(seed=_draw_seed(self.seed, step, self.rank, j))
            out = self.tail({k_: (v.clone() if isinstance(v, Tensor) else v) for k_, v in case.items()})
            for d in out if isinstance(out, list) else [out]:
                images.append(_plain(d["image"]).float())
                labels.append(_plain(d["label"]))
        return torch.stack(images[: self.batch_size]), torch.stack(labels[: self.batch_size])


# ----------------------------------------------------------------------------- training


def _loss_fn(cfg: Config) -> Callable[[Any, Tensor], Tensor]:
    """The paper's soft Dice loss (or Dice + cross-entropy) on softmax outputs; with per-scale
    deep supervision, the sum over scales weighted by ``deep_supervision_weights``, the labels
    downsampled by nearest neighbour to each scale."""
    from monai.losses import DiceCELoss, DiceLoss

    base = DiceLoss(to_onehot_y=True, softmax=True) if cfg.loss == "dice" else DiceCELoss(to_onehot_y=True, softmax=True)

    def loss(out, label: Tensor) -> Tensor:
        if isinstance(out, Tensor):
            return base(out.float(), label)
        weights = deep_supervision_weights(len(out))
        total = out[0].new_zeros((), dtype=torch.float32)
        for w, o in zip(weights, out):
            target = label if o.shape[2:] == label.shape[2:] else F.interpolate(label.float(), size=o.shape[2:], mode="nearest")
            total = total + w * base(o.float(), target)
        return total

    return loss


def _optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def _lr_factor(cfg: Config) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        if cfg.schedule == "poly":
            return (1 - t) ** 0.9
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return factor


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """Python's RNG state with its tuples restored (a checkpoint round trip may give lists)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _distributed() -> tuple[int, int, int]:
    """``(rank, world, local_rank)``, initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: saved {a.get(k)!r}, given {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _read_log(path: Path, upto: int) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= upto]


def _write_log(path: Path, rows: list[dict[str, float]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: on CUDA the peak PyTorch allocated since the run's start; on the CPU
    the peak resident set of the whole process (run one model per process to compare them,
    as :func:`examples.pancreas.compare.compare` does)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return math.nan
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_run_dir(cfg: Config, out: Union[str, Path], resume: bool, overwrite: bool = False) -> Optional[dict[str, Any]]:
    """Check ``out`` for a new run or a resumed one; return the checkpoint to resume from (or ``None``).

    A new run refuses a folder holding another run's checkpoint unless ``overwrite`` (which
    deletes that checkpoint and its log, so that a later ``resume`` cannot pick them up); a
    resumed run needs the folder's checkpoint and the same config it was started with (the
    checkpoint's ``"args"``). Nothing is written or deleted when a check fails.
    """
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    if not resume:
        if ckpt_path.exists():
            if not overwrite:
                raise CheckpointError(
                    f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it, --overwrite to replace it, "
                    "or choose another --out"
                )
            if int(os.environ.get("RANK", "0")) == 0:
                for name in (CHECKPOINT, LOG):
                    (out / name).unlink(missing_ok=True)
        return None
    ckpt = load_checkpoint(ckpt_path)
    diff = _config_diff(ckpt.get("args") or {}, cfg.to_dict())
    if diff:
        raise CheckpointError(f"{out} was started with a different config; cannot resume with this one: " + "; ".join(diff))
    return ckpt


def train(
    cfg: Config,
    out: Union[str, Path],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    on_step: Optional[Callable[[int, float], None]] = None,
    cases: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    """Train ``cfg``'s model into the run folder ``out`` (see the module docstring).

    Writes ``config.json``, ``splits.json``, ``log.csv`` (step, loss, lr, seconds) and
    ``checkpoint.pt``. ``resume`` continues the run in ``out`` from its checkpoint (the steps
    after it are redone); ``overwrite`` lets a new run replace one. ``on_step(step, loss)`` is
    called after every optimizer step (steps count from 1). ``cases``: the loaded cases
    (default: :func:`load_cases` of ``cfg``).

    Returns ``{"losses", "steps", "seconds_per_step", "peak_memory_mb", "params",
    "checkpoint", "splits"}`` (losses averaged over the ranks; ``seconds_per_step`` leaves
    out the first step).
    """
    from tqdm.auto import tqdm

    from . import data

    out = Path(out)
    rank, world, local_rank = _distributed()
    ckpt = prepare_run_dir(cfg, out, resume, overwrite)
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    was_deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # CUDA has no deterministic trilinear-upsampling backward: warn there instead of failing
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    _seed_everything(cfg.seed)

    splits = split_cases(cfg, load_cases(cfg) if cases is None else cases)
    stream = PatchStream(splits["train"], data.train_transforms(cfg), cfg.seed, cfg.batch_size, cfg.num_samples, rank, world)
    layout = preferred_layout(device)  # channels-last on the CPU
    model = build_model(cfg).to(device, memory_format=layout)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg))
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    loss_fn = _loss_fn(cfg)
    amp = cfg.amp and device.type == "cuda"

    log_rows = _read_log(out / LOG, start) if resume else []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        data.save_splits({k: [c["case_id"] for c in v] for k, v in splits.items()}, out / "splits.json")

    def checkpoint(step: int) -> None:
        if rank != 0:
            return
        state = {
            "model": model.state_dict(), "config": checkpoint_config(model),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
            "rng": _rng_state(), "args": cfg.to_dict(),
        }  # fmt: skip
        save_checkpoint(state, out / CHECKPOINT)
        _write_log(out / LOG, log_rows)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", unit="step", disable=not progress or rank != 0)
    step_times = []
    net.train()
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            image, label = stream.batch(step)
            image, label = image.to(device, non_blocking=True).contiguous(memory_format=layout), label.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                output = net(image)
            loss = loss_fn(output, label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            value = loss.detach()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            value = float(value)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step + 1}; lower --lr or check the data")
            dt = time.perf_counter() - t0
            step_times.append(dt)
            log_rows.append({"step": step + 1, "loss": value, "lr": lr, "seconds": dt})
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2g}")
            bar.update()
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                checkpoint(step + 1)
            if on_step is not None:
                on_step(step + 1, value)
    finally:
        bar.close()
        torch.use_deterministic_algorithms(was_deterministic[0], warn_only=was_deterministic[1])
    if world > 1:  # every rank has written what it had to; rank 0 evaluates alone
        dist.barrier()
        dist.destroy_process_group()
    timed = step_times[1:] or step_times
    return {
        "losses": [r["loss"] for r in log_rows],
        "steps": cfg.steps,
        "seconds_per_step": float(np.mean(timed)) if timed else float("nan"),
        "peak_memory_mb": _peak_memory_mb(device),
        "params": sum(p.numel() for p in model.parameters()),
        "checkpoint": str(out / CHECKPOINT),
        "splits": {k: [c["case_id"] for c in v] for k, v in splits.items()},
    }

