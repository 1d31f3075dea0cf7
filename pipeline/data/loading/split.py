"""Case-level splits: seeded train/validation/test fractions or k folds, or a ``split.json``.

Always by case (patient), never by slice, so no case is seen in training and scored in validation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

SPLITS = ("train", "val", "test")


def make_split(
    case_ids: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    num_folds: int = 0,
    fold: int = 0,
) -> dict[str, list[str]]:
    """Seeded split of case ids into train/val/test.

    With ``num_folds`` > 1, the cases left after the test set are cut into that many seeded folds
    and fold ``fold`` is the validation set (``val_fraction`` is then ignored).
    """
    rng = np.random.default_rng(seed)
    ids = sorted(case_ids)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_test = round(len(ids) * test_fraction)
    test, rest = order[:n_test], order[n_test:]
    if num_folds > 1:
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in 0..{num_folds - 1}, got {fold}")
        val = [cid for i, cid in enumerate(rest) if i % num_folds == fold]
    else:
        val = rest[: max(1, round(len(ids) * val_fraction))]
    train = [cid for cid in rest if cid not in set(val)]
    if not train or not val:
        raise DataError("split", f"{len(ids)} cases are too few for a train and a validation set")
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def read_split(path: str | Path, case_ids: list[str]) -> dict[str, list[str]]:
    """Load a ``split.json`` ({"train": [...], "val": [...], "test": [...]}) and check its ids."""
    try:
        split = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot read split file ({err})") from None
    known = set(case_ids)
    for name in SPLITS:
        missing = sorted(set(split.get(name, [])) - known)
        if missing:
            raise DataError(path, f"{name} lists cases not in the data set: {', '.join(missing[:5])}")
    if not split.get("train") or not split.get("val"):
        raise DataError(path, "split needs non-empty 'train' and 'val' lists")
    return {name: list(split.get(name, [])) for name in SPLITS}


def require_test_split(split: dict[str, list[str]], root: str | os.PathLike) -> None:
    """Refuse a test of a split without test cases, saying how to make one or score validation."""
    if not split["test"]:
        raise DataError(
            root,
            "this run has no test split, and scoring its validation cases as a test would report them "
            "twice: hold cases out with --data.test_fraction 0.2 (a new split: train again), or score "
            "the validation split on purpose with --data.test_split val",
        )
