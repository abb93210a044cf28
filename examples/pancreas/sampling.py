"""Training patches: which case and random stream every patch of every step comes from, and the loader that draws them.

Every patch of every step is drawn from a random stream seeded by ``(seed, step, rank, draw)``,
whichever worker draws it, so the data of step ``s`` do not depend on what ran before: a resumed
run draws what an uninterrupted one would. The cases follow MONAI's ``DistributedSampler``, so
that under ``torchrun`` each rank draws its own share.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .runtime import ignore_stop_signals

__all__ = ["PatchDraws", "StepSampler", "collate_draws", "patch_loader"]


def _plain(t: Tensor) -> Tensor:
    """A MetaTensor's plain tensor (the network does not need the metadata)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def _draw_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


class PatchDraws(Dataset):
    """Training patches keyed by draw, for a :class:`~torch.utils.data.DataLoader`.

    ``cache``: the training and validation cases after the deterministic head of the training
    transforms (reading, resampling, intensity scaling, padding, the pancreas and body voxel
    lists), e.g. a :class:`monai.data.CacheDataset`; ``tail``: the random rest (patch sampling,
    augmentation). Item ``(case, seed)`` is ``tail`` applied to ``cache[case]`` with its random
    state set from ``seed``: ``(image: Tensor[num_samples, 1, *patch] float32, label:
    Tensor[num_samples, 1, *patch])``, plain tensors. It depends on the key alone, whichever
    worker process draws it; the cached case is left as it was (the tail makes new tensors).
    """

    def __init__(self, cache, tail) -> None:
        self.cache, self.tail = cache, tail

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        case, seed = key
        self.tail.set_random_state(seed=seed)
        out = self.tail(dict(self.cache[case]))
        out = out if isinstance(out, list) else [out]
        return torch.stack([_plain(d["image"]).float() for d in out]), torch.stack([_plain(d["label"]) for d in out])


class StepSampler(Sampler):
    """The draws of one rank for steps ``start .. steps - 1``: per step, a list of ``draws`` keys
    ``(case, seed)`` for :class:`PatchDraws` (a ``batch_sampler``).

    ``cases`` are the indices of the training cases in the dataset. Their order is MONAI's
    :class:`~monai.data.DistributedSampler` over them, reshuffled every pass (``set_epoch``,
    seeded by ``seed``): the rank's ``q``-th draw (``q = step * draws + j``) is place
    ``q mod m`` of pass ``q // m``, ``m`` the rank's share of a pass, and its random seed is
    derived from ``(seed, step, rank, j)``. So a step's batch depends only on ``(seed, step,
    rank, world)``, and a resumed run continues mid-pass exactly where the first one stopped.
    """

    def __init__(self, cases: list[int], start: int, steps: int, draws: int, seed: int, rank: int = 0, world: int = 1) -> None:
        from monai.data import DistributedSampler

        if not cases:
            raise ValueError("StepSampler needs at least one training case, got none")
        self.cases, self.start, self.steps, self.draws, self.seed, self.rank = list(cases), start, steps, draws, seed, rank
        self.sampler = DistributedSampler(range(len(self.cases)), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self._pass: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def _case(self, q: int) -> int:
        epoch, place = divmod(q, len(self.sampler))
        if self._pass[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._pass = (epoch, list(self.sampler))
        return self.cases[self._pass[1][place]]

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield [(self._case(step * self.draws + j), _draw_seed(self.seed, step, self.rank, j)) for j in range(self.draws)]


def collate_draws(items: list[tuple[Tensor, Tensor]], batch_size: int) -> tuple[Tensor, Tensor]:
    """One step's draws as ``(image: Tensor[B, 1, *patch], label: Tensor[B, 1, *patch])``."""
    return torch.cat([i for i, _ in items])[:batch_size], torch.cat([l for _, l in items])[:batch_size]


def patch_loader(cache: Any, tail: Any, n_train: int, start: int, stop: int, cfg: Any, rank: int = 0, world: int = 1,
                 pin_memory: bool = False) -> DataLoader:  # fmt: skip
    """The batches of steps ``start .. stop - 1`` of one rank: a :class:`~torch.utils.data.DataLoader`
    over :class:`PatchDraws` of ``cache`` (its first ``n_train`` cases are the training cases) and
    ``tail``, in the order of :class:`StepSampler`, with ``cfg.workers`` worker processes (which
    ignore Ctrl-C and SIGTERM: the training process stops them, after its step in progress); each
    batch is ``(image: Tensor[cfg.batch_size, 1, *patch], label: Tensor[cfg.batch_size, 1, *patch])``."""
    draws = -(-cfg.batch_size // cfg.num_samples)
    return DataLoader(
        PatchDraws(cache, tail),
        batch_sampler=StepSampler(list(range(n_train)), start, stop, draws, cfg.seed, rank, world),
        num_workers=cfg.workers,
        collate_fn=functools.partial(collate_draws, batch_size=cfg.batch_size),
        pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global random state alone
    )
