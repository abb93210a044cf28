"""Splitting the cases of a run into training, validation and test sets, and the run's ``splits.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import partition_dataset, select_cross_validation_folds

from attention_gates.files import atomic_write

from .cases import held_out_phantom_seeds
from .phantom import phantom_id

__all__ = ["make_splits", "split_cases", "save_splits", "load_splits"]


def make_splits(
    case_ids: Sequence[str],
    seed: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, list[str]]:
    """Split case ids into train, validation and test sets, deterministically.

    The ids are sorted, then shuffled with ``seed``. The first ``round(test_fraction * n)``
    are the test set. Without ``folds``, the next ``round(val_fraction * n)`` are the
    validation set and the rest the training set (every case lands in one set, which MONAI's
    ratio ``partition_dataset`` does not promise). With ``folds=k``, the remaining cases are
    dealt into ``k`` near-equal folds (MONAI's ``partition_dataset`` and
    ``select_cross_validation_folds``): fold ``fold`` is the validation set and the others the
    training set (``val_fraction`` is then unused), so over ``fold = 0 .. k-1`` every non-test
    case is validated exactly once, and the test set stays the same.

    Args:
        case_ids: unique case ids, at least 2.
        seed: shuffling seed.
        val_fraction, test_fraction: shares of the cases, each in ``[0, 1)``, sum below 1.
        folds: number of cross-validation folds (>= 2), or ``None``.
        fold: which fold validates, ``0 <= fold < folds``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, disjoint, each sorted; the
        training set is never empty.

    Raises:
        ValueError: repeated ids, fractions out of range, a bad ``folds``/``fold`` or too
            few cases for the request.
    """
    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"case_ids must be unique, repeated: {', '.join(twice)}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    n_test = int(round(test_fraction * len(ids)))
    test, rest = shuffled[:n_test], shuffled[n_test:]
    if folds is None:
        n_val = int(round(val_fraction * len(ids)))
        val, train = rest[:n_val], rest[n_val:]
    else:
        if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
            raise ValueError(f"folds must be an int >= 2 or None, got {folds!r}")
        if not 0 <= fold < folds:
            raise ValueError(f"fold must be in [0, {folds}), got {fold}")
        if len(rest) < folds:
            raise ValueError(f"{folds} folds need at least {folds} non-test cases, got {len(rest)}")
        parts = partition_dataset(rest, num_partitions=folds)
        val = select_cross_validation_folds(parts, fold)
        train = select_cross_validation_folds(parts, [k for k in range(folds) if k != fold])
    if not train:
        raise ValueError(
            f"no training cases left: {len(ids)} cases, test_fraction={test_fraction}, val_fraction={val_fraction}, folds={folds}"
        )
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def save_splits(splits: Mapping[str, Sequence[str]], path: str | os.PathLike) -> None:
    """Write splits (``{"train": [...], "val": [...], "test": [...]}``) to a JSON file.

    The file is written to a temporary name in the same folder and moved into place, so a
    reader never sees half a file. Raises ``ValueError`` for splits :func:`load_splits` would
    refuse.
    """
    splits = _check_splits(splits, str(path))
    path = Path(path)
    atomic_write(path, json.dumps(splits, indent=2) + "\n")


def load_splits(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read splits written by :func:`save_splits`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, keys other than ``train``, ``val``, ``test``, ids that are not
            strings, or sets that overlap.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"splits file {path} is not JSON: {err}") from err
    return _check_splits(data, str(path))


def _check_splits(splits, where: str) -> dict[str, list[str]]:
    if not isinstance(splits, Mapping) or set(splits) != {"train", "val", "test"}:
        got = sorted(splits) if isinstance(splits, Mapping) else type(splits).__name__
        raise ValueError(f"splits {where}: expected the keys ['test', 'train', 'val'], got {got}")
    out = {}
    for key in ("train", "val", "test"):
        ids = splits[key]
        if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"splits {where}: {key!r} must be a list of case id strings, got {ids!r}")
        out[key] = list(ids)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        common = sorted(set(out[a]) & set(out[b]))
        if common:
            raise ValueError(f"splits {where}: {a!r} and {b!r} share cases {', '.join(common)}")
    return out



def split_cases(cfg: Any, cases: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``{"train", "val", "test"}`` lists of ``cases``, split by case id with the split settings
    of a :class:`~examples.pancreas.config.Config` (``data_seed``, ``val_fraction``,
    ``test_fraction``, ``folds``, ``fold``; :func:`make_splits`).

    On the phantom with ``cfg.phantom_test_cases``, the held-out phantoms are the test set and
    the others are split into training and validation; ``ValueError`` if ``cases`` lacks them."""
    held_out = set()
    if cfg.data is None:
        held_out = {phantom_id(s) for s in held_out_phantom_seeds(cfg.phantom_test_cases, cfg.data_seed)}
    ids = [c["case_id"] for c in cases]
    rest = [i for i in ids if i not in held_out]
    if len(ids) - len(rest) != len(held_out):
        raise ValueError(f"expected each of the {len(held_out)} held-out phantom test cases once among the cases "
                         f"(load_cases makes them), found {len(ids) - len(rest)}")  # fmt: skip
    splits = make_splits(
        rest, seed=cfg.data_seed, val_fraction=cfg.val_fraction,
        test_fraction=0.0 if held_out else cfg.test_fraction, folds=cfg.folds, fold=cfg.fold,
    )  # fmt: skip
    splits["test"] = sorted(held_out) if held_out else splits["test"]
    by_id = {c["case_id"]: c for c in cases}
    return {name: [by_id[i] for i in splits[name]] for name in ("train", "val", "test")}
