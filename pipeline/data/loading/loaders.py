"""The data module's loaders: a resumable, class-first training order and whole-item evaluation.

Training draws ``draws`` items an epoch through a ``ForegroundSampler`` (a third forced to show a
foreground class, nnU-Net's share) in a seeded order that DDP ranks split and a resumed run
continues mid-epoch (``pipeline.data.loading.order``). Evaluation reads whole volumes one case a batch, or
whole 2D images in batches of one size (``EvalBatches``).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from pipeline.data.loading.datasets import CaseDataset, SliceDataset
from pipeline.data.loading.order import resumable_loader
from pipeline.data.loading.patches import PatchDataset
from pipeline.data.loading.sampling import EvalBatches, ForegroundSampler
from pipeline.parallel import usable_cores

MAX_AUTO_WORKERS = 16
VOLUME_ITERATIONS = 250  # nnU-Net's epoch: a fixed number of steps, whatever the data set's size


def auto_workers(devices: int = 1) -> int:
    """Loader workers for ``num_workers: null``: the CPU cores this process may use, shared among
    the node's ``devices`` (a fast GPU eats augmented 2D slices faster than two workers make them)."""
    return max(1, min(MAX_AUTO_WORKERS, usable_cores() // max(1, devices)))


def epoch_draws(
    iterations: int | None, volumetric: bool, batch_size: int, world_size: int, items: int
) -> int:
    """Training samples drawn per epoch over all processes: ``iterations`` steps (None: 250 for
    volumes, or one pass over the ``items`` for 2D images) of ``batch_size`` on every process."""
    iterations = iterations or (VOLUME_ITERATIONS if volumetric else None)
    return items if iterations is None else iterations * batch_size * world_size


def training_loader(
    trainer: pl.Trainer | None,
    dataset: SliceDataset | PatchDataset,
    batch_size: int,
    draws: int,
    foreground_fraction: float,
    seed: int,
    start: tuple[int, int] = (0, 0),
    **options: Any,
) -> DataLoader:
    """``draws`` samples an epoch over all processes (the dataset's ``class_items`` say which items
    show each class), ``batch_size`` a step; ``start`` (epoch, batches done) resumes mid-epoch."""
    sampler = ForegroundSampler(len(dataset), dataset.class_items(), foreground_fraction, seed, draws)
    drop_last = draws > batch_size
    return resumable_loader(
        trainer, dataset, sampler, batch_size, seed, start, drop_last=drop_last, **options
    )


def evaluation_loader(
    dataset: SliceDataset | CaseDataset, batch_size: int | None, **options: Any
) -> DataLoader:
    """Whole items: a ``CaseDataset``'s volumes as they are (``batch_size`` None), else 2D images in
    batches of up to ``batch_size`` of one size."""
    batches: Dataset
    if batch_size is None:
        batches = dataset
        if options.get("num_workers"):
            options["prefetch_factor"] = 1  # a whole case ahead per worker, not two: memory, not speed
    elif isinstance(dataset, SliceDataset):
        batches = EvalBatches(dataset, batch_size)
    else:
        raise ValueError("volumes are evaluated one case a batch: batch_size None")
    return DataLoader(batches, batch_size=None, **options)
