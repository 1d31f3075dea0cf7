"""SegmentationDataModule: discover cases, split by case, build augmented slice loaders.

2D images are read into memory. Volumes are decoded once into a memory-mapped cache
(``pipeline.data.cache``, built by ``prepare_data`` or ``medseg data prepare``) and train as 2D
slices along ``slice_axis``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pipeline.data import cache
from pipeline.data.dataset import CaseArrays, SliceDataset
from pipeline.data.layouts import Case, describe, resolve_class_names
from pipeline.data.normalization import Normalization, needs_foreground, resolve_channels
from pipeline.data.order import global_seed, resumable_loader, resume_position
from pipeline.data.preprocessing import DEFAULT_SLICE_AXIS, Preprocessing
from pipeline.data.sampling import EvalBatches, ForegroundSampler
from pipeline.data.sources import case_source
from pipeline.data.transforms import Augmentation, build_eval_transform, build_train_transform
from pipeline.errors import DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
MAX_AUTO_WORKERS = 16


def auto_workers(devices: int = 1) -> int:
    """Loader workers for ``num_workers: null``: the CPU cores this process may use, shared among
    the node's ``devices`` (a fast GPU eats augmented 2D slices faster than two workers make them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cores // max(1, devices)))


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
        layout: ``auto`` or a layout name from ``pipeline.data.layouts`` (folders, dicom, msd, nnunet).
        class_names: class names in index order, background first; default from ``dataset.json``
            or ``classes.json``.
        modalities: one modality name per input channel (``CT``, ``T2``, ``rgb``, ...) for
            ``normalization.mode: auto``; default from ``dataset.json`` (none: z-score).
        label_map: optional ``{stored value: class index}`` applied to masks on load.
        val_fraction: fraction of cases for validation (when not using folds or a split file).
        test_fraction: fraction of cases held out for ``medseg test``.
        num_folds: > 1 for k-fold cross-validation; ``fold`` picks the validation fold.
        fold: validation fold index in 0..num_folds-1.
        split_file: a ``split.json`` to use instead of a seeded split.
        seed: seed of the split, fixed across a run's seeds so that they compare on the same cases.
            The training order, foreground oversampling and augmentation follow the run's seed
            (``seed_everything``), so runs with different seeds also see different draws.
        batch_size: training batch size; ``val_batch_size`` for validation/test (default: the same).
        num_workers: loader worker processes; None: one per CPU core, shared among the node's
            devices, at most 16 (``auto_workers``).
        pin_memory: pin host memory; None pins when CUDA is available.
        patch_size: (H, W) random training crops; None trains on whole images.
        normalization: intensity normalisation (stored in the checkpoint); ``auto`` picks it per
            channel from the modality (CT: foreground-percentile clip + z-score, MR: z-score).
        augmentation: training augmentation.
        slice_axis: volumes: the axis (0, 1, 2 of the RAS+ array: sagittal, coronal, axial) to cut
            2D slices along; ``auto`` = the coarsest median spacing of the data set.
        foreground_fraction: probability that a training draw is forced to show foreground
            (a class drawn first, then a slice and a patch that show it), as nnU-Net's 1/3.
        cache_dir: volume cache folder; default ``<root>/.medseg-cache``.
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
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        patch_size: tuple[int, int] | None = None,
        normalization: Normalization = Normalization(mode="auto"),
        augmentation: Augmentation = Augmentation(),
        modalities: list[str] | None = None,
        slice_axis: int | str = "auto",
        foreground_fraction: float = 1 / 3,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError("val_fraction must be in (0, 1), test_fraction in [0, 1), and their sum below 1")
        if slice_axis not in (0, 1, 2, "auto"):
            raise ValueError(f"slice_axis must be 0, 1, 2 or 'auto', got {slice_axis!r}")
        if not 0 <= foreground_fraction <= 1:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
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
        self.slice_axis, self.foreground_fraction = slice_axis, foreground_fraction
        self.cache_dir = Path(cache_dir) if cache_dir else cache.default_cache_dir(self.root)
        self.info = describe(self.root, layout)
        self.cases: list[Case] = self.info.cases
        self.class_names = resolve_class_names(self.root, self.info, class_names)
        self.source = case_source(
            self.root, self.cases, self.class_names, label_map, self.cache_dir, slice_axis, self.info.layout
        )
        self.volumetric = self.source.volumetric
        self.modalities = list(modalities) if modalities else self.info.modalities
        self.in_channels = len(self.modalities) if self.modalities else self.source.channels()
        self.split: dict[str, list[str]] = {}
        self.datasets: dict[str, SliceDataset] = {}
        self._channel_norms: list[Normalization] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        """Bring the volume cache up to date (Lightning calls this once per node, before ``setup``)."""
        self.source.prepare()

    def channel_normalization(self) -> list[Normalization]:
        """One resolved ``Normalization`` per input channel (data-set statistics filled in)."""
        if self._channel_norms is None:
            modalities = self.modalities or [None] * self.in_channels
            foreground = None
            if needs_foreground(self.normalization, modalities):
                foreground = self.source.foreground_sample()
            self._channel_norms = resolve_channels(self.normalization, modalities, foreground)
        return self._channel_norms

    def _load(self, ids: list[str]) -> list[CaseArrays]:
        by_id = {case.case_id: case for case in self.cases}
        arrays = self.source.load(ids, self.channel_normalization())
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
        foreground_tf = build_train_transform(self.augmentation, self.patch_size, foreground_crop=True)
        eval_tf = build_eval_transform()
        for name in SPLITS:
            if self.split[name]:
                if name == "train":
                    self.datasets[name] = SliceDataset(
                        self._load(self.split[name]), train_tf, None, foreground_tf
                    )
                else:
                    self.datasets[name] = SliceDataset(self._load(self.split[name]), eval_tf)
        sizes = sorted({tuple(c.image.shape[1:3]) for c in self.datasets["train"].cases})
        if self.patch_size is None and len(sizes) > 1:
            raise DataError(
                self.root, f"training slices differ in size ({sizes[0]} ... {sizes[-1]}); set data.patch_size"
            )
        log.info("data %s: %s", self.root, {k: len(v) for k, v in self.split.items()})

    def save_split(self, path: str | Path) -> None:
        """Write the case split as JSON (the run directory's ``split.json``)."""
        Path(path).write_text(json.dumps(self.split, indent=2))

    def _loader(self, name: str) -> DataLoader:
        """Training: ``batch_size`` items drawn by a ``ForegroundSampler``; evaluation: whole slices
        in batches of one size (``EvalBatches``), up to ``val_batch_size`` each."""
        if name not in self.datasets:
            raise DataError(
                self.root, f"the {name} split is empty (set data.test_fraction or data.split_file)"
            )
        dataset = self.datasets[name]
        workers = self.num_workers
        if workers is None:
            workers = auto_workers(self.trainer.num_devices if self.trainer is not None else 1)
        common = dict(num_workers=workers, pin_memory=self.pin_memory, persistent_workers=workers > 0)
        if name != "train":
            return DataLoader(EvalBatches(dataset, self.val_batch_size), batch_size=None, **common)
        seed = global_seed(self.seed)
        sampler = ForegroundSampler(len(dataset), dataset.class_items(), self.foreground_fraction, seed)
        drop_last = len(dataset) > self.batch_size
        # Resumable mid-epoch, split across DDP ranks, augmentation seeded per sample (pipeline.data.order).
        start, self._train_start = getattr(self, "_train_start", (0, 0)), (0, 0)
        return resumable_loader(
            self.trainer, dataset, sampler, self.batch_size, seed, start, drop_last=drop_last, **common
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val")

    def preprocessing(self) -> Preprocessing:
        """What inference needs to reproduce this data's preprocessing (stored in every checkpoint)."""
        return Preprocessing(
            class_names=tuple(self.class_names),
            in_channels=self.in_channels,
            normalization=tuple(self.channel_normalization()),
            configured=self.normalization,
            patch_size=self.patch_size,
            slice_axis=self.source.slice_axis if self.volumetric else DEFAULT_SLICE_AXIS,
            volumetric=self.volumetric,
            modalities=tuple(self.modalities) if self.modalities else None,
            layout=self.info.layout,
            label_map=dict(self.label_map or {}),
        )

    def state_dict(self) -> dict:
        # train_position: (epoch, batches trained in it), where a resumed fit's data order continues.
        position = resume_position(self.trainer)
        return {
            "preprocessing": self.preprocessing().to_checkpoint(),
            "split": self.split,
            "train_position": position,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_start = tuple(state_dict.get("train_position", (0, 0)))
