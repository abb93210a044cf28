"""Run configurations of the pancreas example, and its presets.

A :class:`Config` holds everything a run depends on: the data and its preprocessing (the
attributes :func:`examples.pancreas.transforms.train_transforms` reads), the model, the loss, the
optimiser and its schedule, and the step budget. It is saved as ``config.json`` in the run
folder and inside every checkpoint, so that a checkpoint alone rebuilds the model and
preprocesses new volumes the way the model was trained.

Presets:

- ``"paper"``: the paper's pancreas model and training (Oktay et al., 2018): CT resampled to
  2 mm, 160x160x96 patches, filters ``[16, 32, 64, 128, 256]``, two-head gates, fused deep
  supervision, Dice loss, Adam, batch size 2. The learning rate (1e-4, poly decay), weight
  decay, step budget, augmentation, validation every 500 steps and 8 data-loading workers
  are this example's choices. Needs real data (``--data``) and a GPU.
- ``"demo"``: the built-in phantom (16 cases to train and validate on, 24 more held out for
  the test) at 3 mm with 48^3 patches, filters ``[8, 16, 32, 64, 128]`` and 200 steps, sized
  to train both networks on 2 CPU cores in a few minutes (held-out Dice about 0.85 for both;
  64^3 patches learn no better per step and cost 3 times as much). 24 test cases let the
  paired signed-rank test decide (3 never could: its smallest p is then 0.25). Validated at
  steps 100 and 200 only (a validation costs about 4 training steps), and no loader workers (on
  2 cores they would take the training threads' time), so that it trains no slower than before
  validation existed.
- ``"tiny"``: a few-second run for tests and smoke checks (small phantom, small model,
  validated every 2 steps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Config", "PRESETS", "preset"]

MODELS = ("attention", "unet")
LOSSES = ("dice", "dice_ce")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("poly", "cosine", "constant")
DEEP_SUPERVISION = ("fused", "per_scale")
TRAINABLE = ("all", "gates")


@dataclass
class Config:
    """One run's settings (see the module docstring for the presets); ``Config()`` is the
    ``"demo"`` preset, and the other presets change some of its fields (:data:`PRESETS`).

    Data: ``data`` (a dataset folder, ``None`` for the phantom), ``layout`` (``"msd"``,
    ``"nih"``, ``"auto"``), ``phantom_cases``/``phantom_shape``/``phantom_spacing`` (the phantom's
    size), ``data_seed`` (seeds the phantom and the split)/``val_fraction``/``test_fraction``/``folds``/``fold`` (the split).
    ``phantom_test_cases``: on the phantom, when above 0, that many test cases generated apart
    (seeds ``PHANTOM_TEST_SEED + data_seed`` up, never used for training or validation) are
    the test set, and the ``phantom_cases`` are split into training and validation only
    (``test_fraction`` is then unused); 0 takes the test cases out of ``phantom_cases``. Real
    data (``data``) ignore it.

    Preprocessing (read by the data transforms): ``spacing`` (mm, x y z), ``hu_window``
    (HU clipped and scaled to [0, 1]), ``patch_size`` (voxels, x y z), ``pos_neg_ratio``
    (pancreas-centred to background-centred patches), ``num_samples`` (patches per volume
    draw), ``keep_tumour``, ``augment``.

    Model: ``model`` (``"attention"`` or ``"unet"``), ``filters``, ``norm``, ``heads``,
    ``deep_supervision`` (``"fused"``: the model's fused head; ``"per_scale"``: a loss on every
    decoder level), ``backend`` (the gates' implementation).

    Training: ``loss`` (``"dice"`` or ``"dice_ce"``), ``optimizer`` (``"adam"`` or ``"sgd"``),
    ``lr``, ``weight_decay``, ``momentum`` (SGD), ``schedule`` (``"poly"``, ``"cosine"``,
    ``"constant"``) with ``warmup_steps``, ``batch_size`` (per process), ``steps`` (optimizer
    steps in all), ``checkpoint_every``, ``seed``, ``deterministic``, ``amp`` (bf16 autocast,
    CUDA only), ``threads`` (CPU threads per process, 0 = PyTorch's default), ``workers``
    (data-loading processes per training process, 0 = load in the training process),
    ``cache_rate`` (share of the cases whose preprocessing is cached in memory).

    Validation: ``val_every`` (steps between sliding-window Dice measurements on the validation
    cases, 0 = none; the best one is kept as ``best.pt``), ``patience`` (stop after this many
    validations without a better Dice, 0 = never stop early).

    Evaluation: ``sw_batch_size`` and ``sw_overlap`` of the sliding-window inference.
    """

    preset: str = "demo"
    # data
    data: Optional[str] = None
    layout: str = "auto"
    phantom_cases: int = 16
    phantom_test_cases: int = 24
    phantom_shape: tuple[int, ...] = (96, 96, 64)
    phantom_spacing: tuple[float, ...] = (2.0, 2.0, 2.5)
    data_seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    folds: Optional[int] = None
    fold: int = 0
    # preprocessing; the window the demo was tuned with keeps the phantom's fat (about -100 HU) above the floor
    spacing: tuple[float, ...] = (3.0, 3.0, 3.0)
    hu_window: tuple[float, float] = (-160.0, 240.0)
    patch_size: tuple[int, ...] = (48, 48, 48)
    pos_neg_ratio: float = 1.0
    num_samples: int = 1
    keep_tumour: bool = False
    augment: bool = False
    # model
    model: str = "attention"
    filters: tuple[int, ...] = (8, 16, 32, 64, 128)
    norm: str = "batch"
    heads: int = 2
    deep_supervision: str = "fused"
    backend: Optional[str] = None
    # training
    loss: str = "dice"
    optimizer: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "poly"
    warmup_steps: int = 10
    batch_size: int = 2
    steps: int = 200
    checkpoint_every: int = 50
    seed: int = 0
    deterministic: bool = False
    amp: bool = False
    threads: int = 2
    workers: int = 0
    cache_rate: float = 1.0
    init_from: Optional[str] = None
    train_params: str = "all"
    # validation
    val_every: int = 100
    patience: int = 0
    # evaluation
    sw_batch_size: int = 4
    sw_overlap: float = 0.25

    def __post_init__(self) -> None:
        for name in ("phantom_shape", "phantom_spacing", "spacing", "hu_window", "patch_size", "filters"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"{name} must be a sequence, got {type(value).__name__}")
            setattr(self, name, tuple(value))
        for name, allowed in (
            ("model", MODELS), ("loss", LOSSES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
            ("deep_supervision", DEEP_SUPERVISION), ("train_params", TRAINABLE),
        ):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "steps", "checkpoint_every", "num_samples", "sw_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("threads", "workers", "val_every", "patience", "phantom_test_cases"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not 0.0 <= self.cache_rate <= 1.0:
            raise ValueError(f"cache_rate must be in [0, 1], got {self.cache_rate!r}")
        if self.patience and not self.val_every:
            raise ValueError(f"patience={self.patience} (early stopping) needs validation: set val_every > 0")
        if len(self.spacing) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"spacing and patch_size need 3 values (x, y, z), got {self.spacing} and {self.patch_size}")
        multiple = 2 ** (len(self.filters) - 1)
        if any(p % multiple for p in self.patch_size):
            raise ValueError(f"patch_size must be a multiple of {multiple} (2^(depth - 1)) per axis, got {self.patch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.train_params == "gates" and self.model != "attention":
            raise ValueError("train_params='gates' needs model='attention' (the U-Net has no gates)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` applied (and validated)."""
        return Config.from_dict({**self.to_dict(), **changes})


#: The presets' settings where they differ from :class:`Config`'s defaults (the ``"demo"`` preset).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        preset="paper", phantom_test_cases=0, spacing=(2.0, 2.0, 2.0), patch_size=(160, 160, 96), filters=(16, 32, 64, 128, 256),
        hu_window=(-100.0, 240.0), pos_neg_ratio=1.0, lr=1e-4, weight_decay=1e-6, schedule="poly", warmup_steps=0,
        steps=30000, checkpoint_every=500, sw_batch_size=2, sw_overlap=0.5, augment=True, threads=0,
        val_every=500, workers=8,
    ),
    "demo": dict(preset="demo"),
    "tiny": dict(
        preset="tiny", phantom_cases=5, phantom_test_cases=0, phantom_shape=(40, 40, 32), phantom_spacing=(2.0, 2.0, 2.5),
        spacing=(4.0, 4.0, 4.0), hu_window=(-100.0, 240.0), patch_size=(16, 16, 16), filters=(4, 8, 16), heads=2, lr=1e-3,
        schedule="constant", warmup_steps=0, steps=4, checkpoint_every=2, sw_batch_size=1, threads=1, val_every=2,
    ),
}


def preset(name: str, **overrides: Any) -> Config:
    """The preset ``name`` (``"paper"``, ``"demo"`` or ``"tiny"``) with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return Config(**{**PRESETS[name], **overrides})
