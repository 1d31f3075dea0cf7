"""SegmentationDataModule: discover cases, split by case, build augmented slice loaders."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pipeline.data.dataset import CaseArrays, SliceDataset, load_case_2d
from pipeline.data.io import DataError, read_image_2d
from pipeline.data.layouts import Case, discover, read_class_names
from pipeline.data.normalization import Normalization
from pipeline.data.transforms import Augmentation, build_eval_transform, build_train_transform

log = logging.getLogger(__name__)
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


class SegmentationDataModule(pl.LightningDataModule):
    """Image/mask data split by case, with albumentations augmentation for training.

    Args:
        root: data folder (see ``data/README.md`` for the layouts).
        layout: ``auto`` or a layout name from ``pipeline.data.layouts``.
        class_names: class names in index order, background first; default from ``classes.json``.
        label_map: optional ``{stored value: class index}`` applied to masks on load.
        val_fraction: fraction of cases for validation (when not using folds or a split file).
        test_fraction: fraction of cases held out for ``medseg test``.
        num_folds: > 1 for k-fold cross-validation; ``fold`` picks the validation fold.
        fold: validation fold index in 0..num_folds-1.
        split_file: a ``split.json`` to use instead of a seeded split.
        seed: seed of the split.
        batch_size: training batch size; ``val_batch_size`` for validation/test (default: the same).
        num_workers: loader worker processes.
        pin_memory: pin host memory; None pins when CUDA is available.
        patch_size: (H, W) random training crops; None trains on whole images.
        normalization: intensity normalisation (stored in the checkpoint).
        augmentation: training augmentation.
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        layout: str = "auto",
        class_names: list[str] | None = None,
        label_map: dict[int, int] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        num_folds: int = 0,
        fold: int = 0,
        split_file: str | None = None,
        seed: int = 0,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        patch_size: tuple[int, int] | None = None,
        normalization: Normalization = Normalization(),
        augmentation: Augmentation = Augmentation(),
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError("val_fraction must be in (0, 1), test_fraction in [0, 1), and their sum below 1")
        self.root = Path(root)
        self.layout = layout
        self.label_map = label_map
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_folds, self.fold, self.split_file, self.seed = num_folds, fold, split_file, seed
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.patch_size = tuple(patch_size) if patch_size else None
        self.normalization = normalization
        self.augmentation = augmentation
        self.cases: list[Case] = discover(self.root, layout)
        self.class_names = list(class_names) if class_names else self._read_class_names()
        self.in_channels = self._probe_channels()
        self.split: dict[str, list[str]] = {}
        self.datasets: dict[str, SliceDataset] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _read_class_names(self) -> list[str]:
        path = self.root / "classes.json"
        if not path.exists():
            raise DataError(path, "no class names: write classes.json or set data.class_names in the config")
        return read_class_names(path)

    def _probe_channels(self) -> int:
        image = read_image_2d(self.cases[0].images[0])
        return 1 if image.ndim == 2 else image.shape[-1]

    def _load(self, ids: list[str]) -> list[CaseArrays]:
        by_id = {case.case_id: case for case in self.cases}
        arrays = [
            load_case_2d(by_id[cid], self.normalization, self.class_names, self.label_map) for cid in ids
        ]
        for case, array in zip(ids, arrays, strict=True):
            if array.image.shape[-1] != self.in_channels:
                raise DataError(
                    by_id[case].images[0],
                    f"has {array.image.shape[-1]} channels, the data set has {self.in_channels}",
                )
        return arrays

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        ids = [case.case_id for case in self.cases]
        if self.split_file:
            self.split = read_split(self.split_file, ids)
        else:
            self.split = make_split(
                ids, self.val_fraction, self.test_fraction, self.seed, self.num_folds, self.fold
            )
        train_tf = build_train_transform(self.augmentation, self.patch_size)
        eval_tf = build_eval_transform()
        for name in SPLITS:
            if self.split[name]:
                tf = train_tf if name == "train" else eval_tf
                self.datasets[name] = SliceDataset(self._load(self.split[name]), tf)
        log.info("data %s: %s", self.root, {k: len(v) for k, v in self.split.items()})

    def save_split(self, path: str | Path) -> None:
        """Write the case split as JSON (the run directory's ``split.json``)."""
        Path(path).write_text(json.dumps(self.split, indent=2))

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.datasets:
            raise DataError(
                self.root, f"the {name} split is empty (set data.test_fraction or data.split_file)"
            )
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size if name == "train" else self.val_batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(self.datasets[name]) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val", shuffle=False)

    def preprocessing(self) -> dict:
        """What inference needs to reproduce the preprocessing, as plain types."""
        norm = asdict(self.normalization)
        return {
            "class_names": self.class_names,
            "in_channels": self.in_channels,
            "normalization": {k: list(v) if isinstance(v, tuple) else v for k, v in norm.items()},
            "patch_size": list(self.patch_size) if self.patch_size else None,
            "label_map": {str(k): v for k, v in (self.label_map or {}).items()},
        }

    def state_dict(self) -> dict:
        return {"preprocessing": self.preprocessing(), "split": self.split}
