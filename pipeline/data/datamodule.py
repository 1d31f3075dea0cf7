"""SegmentationDataModule: discover cases, split by case, plan volumes, build the loaders.

2D images are read into memory and train as they are. Volumes follow nnU-Net's path: the training
cases' fingerprint gives a plan (``pipeline.data.planning.rules``: target spacing, slice axis, patch, batch;
explicit settings win), the cases are resampled once into the memory-mapped cache
(``pipeline.data.cache.facts``), a 2D network trains on slices and a 3D network on patches of it, and
validation scores each case in 3D on its own grid (``CaseDataset``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pipeline.data.augment.transforms2d import Augmentation, build_eval_transform, build_train_transform
from pipeline.data.augment.transforms3d import PatchAugmenter3D
from pipeline.data.cache.store import default_cache_dir
from pipeline.data.checkpoint_state import DataCheckpointState
from pipeline.data.loading.datasets import CaseArrays, CaseDataset, SliceDataset, require_one_size
from pipeline.data.loading.loaders import auto_workers, epoch_draws, evaluation_loader, training_loader
from pipeline.data.loading.order import global_seed
from pipeline.data.loading.patches import PatchDataset
from pipeline.data.loading.sources import VolumeSource, case_source
from pipeline.data.loading.split import SPLITS, make_split, read_split, require_test_split
from pipeline.data.normalization import Normalization, from_plain
from pipeline.data.planning.network_rules import PlanSettings
from pipeline.data.planning.planner import NetworkRequest, plan_volumes, training_normalization
from pipeline.data.planning.rules import Plan
from pipeline.data.reading.layouts import Case, describe, resolve_class_names
from pipeline.errors import DataError
from pipeline.parallel import usable_cores

log = logging.getLogger(__name__)
IMAGE_BATCH = 8  # 2D images are not planned: their batch unless set


class SegmentationDataModule(DataCheckpointState, pl.LightningDataModule):
    """Cases split by patient; volumes planned and resampled; augmented training loaders.

    Args:
        root: data folder (see ``data/README.md`` for the layouts).
        layout: ``auto`` or a layout name from ``pipeline.data.reading.layouts`` (folders, dicom, msd, nnunet).
        class_names: class names, background first; default from ``dataset.json``/``classes.json``.
        label_map: optional ``{stored value: class index}`` applied to masks on load.
        val_fraction: fraction of cases for validation (when not using folds or a split file).
        test_fraction: fraction of cases held out for ``medseg test``.
        num_folds: > 1 for k-fold cross-validation; ``fold`` picks the validation fold.
        fold: validation fold index in 0..num_folds-1.
        split_file: a ``split.json`` to use instead of a seeded split.
        seed: seed of the split, fixed across a run's seeds so that they compare on the same cases.
            The training order, foreground oversampling and augmentation follow the run's seed
            (``seed_everything``), so runs with different seeds also see different draws.
        batch_size: training batch per process; None: planned (volumes) or 8 (2D images).
        val_batch_size: 2D images per validation batch (default: ``batch_size``).
        num_workers: loader workers; None: the CPU cores shared among the node's devices, <= 16.
        pin_memory: pin host memory; None pins when CUDA is available.
        patch_size: training patch, (H, W) or (S, H, W); None: planned (volumes), whole 2D images.
        normalization: intensity normalisation (stored in the checkpoint); ``auto`` picks it per
            channel from the modality (CT: foreground-percentile clip + z-score, MR: z-score).
        augmentation: training augmentation.
        modalities: one modality name per input channel (``CT``, ``T2``, ``rgb``, ...) for
            ``normalization.mode: auto``; default from ``dataset.json`` (none: z-score).
        slice_axis: volumes: the axis (0, 1, 2 of the RAS+ array: sagittal, coronal, axial) slices
            and patches are cut along; ``auto``: planned (the coarsest target spacing).
        target_spacing: volumes: the spacing (mm, along X, Y, Z of the RAS+ array) they are
            resampled to; None: planned (the training cases' median, see ``pipeline.data.planning.rules``).
        plan: the budgets the plan sizes patches and batches for.
        iterations_per_epoch: steps an epoch; None: 250 (volumes, nnU-Net's), one pass (2D images).
        test_split: what ``medseg test`` scores: ``test`` (the held-out cases; refused when there
            are none) or ``val`` (the validation cases, on purpose).
        foreground_fraction: share of training draws forced to show a class (nnU-Net's 1/3).
        cache_dir: volume cache folder; default ``<root>/.medseg-cache``.
        plan_cases: what the plan and statistics are measured on: ``train``, or ``train_val`` (all but
            the test split, as nnU-Net's CV: ``medseg cv`` sets it, so its folds can be ensembled).
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
        batch_size: int | None = None,
        val_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        patch_size: Sequence[int] | None = None,
        normalization: Normalization = Normalization(mode="auto"),
        augmentation: Augmentation = Augmentation(),
        modalities: list[str] | None = None,
        slice_axis: int | str = "auto",
        target_spacing: Sequence[float] | None = None,
        plan: PlanSettings = PlanSettings(),
        iterations_per_epoch: int | None = None,
        test_split: str = "test",
        foreground_fraction: float = 1 / 3,
        cache_dir: str | None = None,
        plan_cases: str = "train",
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError("val_fraction must be in (0, 1), test_fraction in [0, 1), and their sum below 1")
        choices = {
            "slice_axis": (slice_axis, (0, 1, 2, "auto")),
            "test_split": (test_split, ("test", "val")),
            "plan_cases": (plan_cases, ("train", "train_val")),
        }
        for name, (value, valid) in choices.items():
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}")
        if not 0 <= foreground_fraction <= 1:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        if iterations_per_epoch is not None and iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be >= 1 (or null), got {iterations_per_epoch}")
        if target_spacing is not None and (len(target_spacing) != 3 or min(target_spacing) <= 0):
            raise ValueError(
                f"target_spacing must be 3 positive mm values (X, Y, Z), got {list(target_spacing)}"
            )
        self.root = Path(root)
        self.layout = layout
        self.label_map = label_map
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_folds, self.fold, self.split_file, self.seed = num_folds, fold, split_file, seed
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.patch_size = tuple(patch_size) if patch_size else None
        self.normalization = normalization
        self.augmentation = augmentation
        self.slice_axis, self.foreground_fraction = slice_axis, foreground_fraction
        self.target_spacing = tuple(float(s) for s in target_spacing) if target_spacing else None
        self.plan_settings = plan
        self.spatial_dims = 2  # the network's, from the plan made for it (2D images: slices)
        self.iterations_per_epoch, self.test_split = iterations_per_epoch, test_split
        self.plan_cases = plan_cases
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(self.root)
        self.info = describe(self.root, layout)
        self.cases: list[Case] = self.info.cases
        self.class_names = resolve_class_names(self.root, self.info, class_names)
        self.source = case_source(
            self.root,
            self.cases,
            self.class_names,
            label_map,
            self.cache_dir,
            self.info.layout,
            usable_cores(),
        )
        self.volumetric = self.source.volumetric
        self.modalities = list(modalities) if modalities else self.info.modalities
        self.in_channels = len(self.modalities) if self.modalities else self.source.channels()
        self.split: dict[str, list[str]] = {}
        self.plan: Plan | None = None
        self.datasets: dict[str, SliceDataset | PatchDataset | CaseDataset] = {}
        self._channel_norms: list[Normalization] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        """Bring the volume cache's facts up to date (Lightning calls this once per node)."""
        self.source.prepare()

    def make_split(self) -> dict[str, list[str]]:
        """The case split (seeded, k-fold or from ``split_file``), made once."""
        if not self.split:
            ids = [case.case_id for case in self.cases]
            if self.split_file:
                self.split = read_split(self.split_file, ids)
            else:
                self.split = make_split(
                    ids, self.val_fraction, self.test_fraction, self.seed, self.num_folds, self.fold
                )
        return self.split

    def plan_ids(self) -> list[str]:
        """The cases the plan and the statistics come from (``plan_cases``), sorted."""
        split = self.make_split()
        return sorted(split["train"] + (split["val"] if self.plan_cases == "train_val" else []))

    def channel_normalization(self) -> list[Normalization]:
        """One resolved ``Normalization`` per input channel, data-set statistics from the training
        cases only (``plan_cases``: with the validation cases too under ``medseg cv``; a test case
        never shapes them)."""
        if self._channel_norms is None:
            modalities: Sequence[str | None] = self.modalities or [None] * self.in_channels
            self._channel_norms = training_normalization(
                self.source, self.plan_ids(), self.normalization, modalities
            )
        return self._channel_norms

    def resolve_plan(self, network: NetworkRequest = NetworkRequest()) -> Plan | None:
        """Plan volumes for ``network`` from the training cases (``plan_cases``;
        ``pipeline.data.planning.planner``) and adopt the plan. None for 2D images.

        Raises:
            DataError: a 3D network for 2D images, or a patch that has not ``spatial_dims`` sides.
        """
        if network.spatial_dims == 3 and not self.volumetric:
            raise DataError(self.root, "a 3D network needs volumes; this data set holds 2D images")
        if self.patch_size is not None and len(self.patch_size) != network.spatial_dims:
            dims = network.spatial_dims
            raise DataError(
                self.root, f"patch_size {list(self.patch_size)} has not {dims} sides ({dims}D network)"
            )
        if not self.volumetric:
            return None
        self.adopt_plan(plan_volumes(self, network))
        return self.plan

    def adopt_plan(self, plan: Plan) -> None:
        """Train as ``plan`` says: its network's dimensions, patch and batch, its target spacing,
        slice axis and normalisation (made once, by ``resolve_plan`` here or in ``medseg``'s CLI)."""
        self.plan, network = plan, plan.network()
        self.spatial_dims = plan.spatial_dims
        self.target_spacing, self.slice_axis = plan.target_spacing, plan.slice_axis
        self.patch_size, self.batch_size = network.patch, network.batch
        self._channel_norms = [from_plain(n) for n in plan.normalization]

    def _load(self, ids: list[str]) -> list[CaseArrays]:
        by_id = {case.case_id: case for case in self.cases}
        norms = self.channel_normalization()
        if isinstance(self.source, VolumeSource):
            # planned by now (setup resolves the plan first): a spacing and an axis number
            assert self.target_spacing is not None and isinstance(self.slice_axis, int)
            arrays = self.source.load(ids, norms, self.target_spacing, self.slice_axis)
        else:
            arrays = self.source.load(ids, norms)
        for case, array in zip(ids, arrays, strict=True):
            if array.image.shape[-1] != self.in_channels:
                raise DataError(
                    by_id[case].images[0],
                    f"has {array.image.shape[-1]} channels, the data set has {self.in_channels}",
                )
        return arrays

    def setup(self, stage: str | None = None) -> None:
        split = self.make_split()
        if stage == "test" and self.test_split == "test":
            require_test_split(split, self.root)
        if self.datasets:
            return
        if self.plan is None:
            self.resolve_plan()  # without medseg's CLI: for a 2D network (2D images: only checked)
        self.batch_size = self.batch_size or IMAGE_BATCH
        for name in SPLITS:
            if not split[name]:
                continue
            cases = self._load(split[name])
            if name == "train":
                self.datasets[name] = self._training_set(cases)
            elif self.volumetric:
                self.datasets[name] = CaseDataset(cases)
            else:
                self.datasets[name] = SliceDataset(cases, build_eval_transform())
        if self.patch_size is None:  # 2D images only: volumes are always planned
            require_one_size(self.datasets["train"].cases, self.root)
        log.info("data %s: %s", self.root, {k: len(v) for k, v in split.items()})

    def _training_set(self, cases: list[CaseArrays]) -> SliceDataset | PatchDataset:
        """Augmented 2D slices (random or class-centred crops of ``patch_size``), or 3D patches."""
        patch = self.patch_size
        if self.spatial_dims == 3:
            assert patch is not None  # 3D networks train on volumes, always planned
            return PatchDataset(cases, patch, PatchAugmenter3D(self.augmentation))
        assert patch is None or len(patch) == 2  # resolve_plan checked it against the 2D network
        train = build_train_transform(self.augmentation, patch)
        foreground = build_train_transform(self.augmentation, patch, foreground_crop=True)
        return SliceDataset(cases, train, None, foreground)

    def _loader(self, name: str) -> DataLoader:
        """Training: ``batch_size`` items a step, drawn by a ``ForegroundSampler``; evaluation: whole
        cases (volumes) or whole 2D images in batches of one size (``pipeline.data.loading.loaders``)."""
        dataset = self.datasets[name]
        workers = self.num_workers
        if workers is None:
            workers = auto_workers(self.trainer.num_devices if self.trainer is not None else 1)
        options = dict(num_workers=workers, pin_memory=self.pin_memory, persistent_workers=workers > 0)
        if name != "train":
            assert not isinstance(dataset, PatchDataset)  # patches only train
            batch = None if self.volumetric else self.val_batch_size or self.batch_size
            return evaluation_loader(dataset, batch, **options)
        batch_size = self.batch_size
        assert batch_size is not None and not isinstance(dataset, CaseDataset)  # set in setup; cases evaluate
        world = self.trainer.world_size if self.trainer is not None else 1
        start, self._train_start = getattr(self, "_train_start", (0, 0)), (0, 0)
        return training_loader(
            self.trainer, dataset, batch_size,
            epoch_draws(self.iterations_per_epoch, self.volumetric, batch_size, world, len(dataset)),
            self.foreground_fraction,
            global_seed(self.seed), start, **options,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("val" if self.test_split == "val" else "test")
