"""Sample order and identity: what makes a resumed or distributed run equal to a plain one.

- ``ResumableSampler``: the training order of epoch ``e`` is a permutation seeded by (seed, e),
  split across DDP ranks, and it can start part-way through an epoch, so a run resumed from a
  mid-epoch checkpoint sees exactly the batches the uninterrupted run saw next.
- ``SeededSamples``: each drawn sample carries a seed from the same stream, and its augmentation
  is seeded with it; augmentation then depends on (seed, epoch, position) only, not on the
  process, the worker or whether the run was interrupted. (Albumentations otherwise seeds itself
  from the operating system, so even two fresh runs with one seed would differ.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

if TYPE_CHECKING:
    from pytorch_lightning.loops.progress import _ProcessedTracker


class SizedDataset(Protocol):
    """A map-style dataset with a length, as every medseg dataset is (torch's ``Dataset`` declares
    no ``__len__``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any) -> Any: ...


def global_seed(default: int = 0) -> int:
    """The run's seed (``seed_everything``, which LightningCLI calls), else ``default``."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A torch generator that depends only on (seed, epoch), well mixed for nearby values."""
    state = np.random.SeedSequence([abs(seed), epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def resume_position(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(epoch, batches already trained in it): where the data order continues after this moment.

    Lightning counts an epoch ``processed`` once its last batch is done; until then (started but
    not processed) the epoch is in progress and its processed batches are skipped on resume.
    """
    if trainer is None:
        return 0, 0
    # Lightning types both trackers as their base class; the fit loop's count processed events too
    epochs = cast("_ProcessedTracker", trainer.fit_loop.epoch_progress.current)
    batches = cast("_ProcessedTracker", trainer.fit_loop.epoch_loop.batch_progress.current)
    in_progress = epochs.started > epochs.processed
    return epochs.processed, batches.processed if in_progress else 0


class ResumableSampler(DistributedSampler):
    """A seeded random order per epoch over ``num_replicas`` ranks; yields ``(item, sample_seed)``.

    Args:
        dataset: the training dataset (only its length is used unless ``sampler`` is given).
        seed: the order and sample seeds of epoch ``e`` depend only on (seed, e).
        num_replicas: DDP world size (1 in a single process).
        rank: this process's rank.
        sampler: optional base sampler deciding which items an epoch draws (e.g. foreground
            oversampling): a torch sampler with a ``generator`` attribute (reseeded per epoch) or
            one with ``set_epoch``. Default: a uniform permutation of the dataset.

    Like ``DistributedSampler`` (Lightning leaves it in place under DDP), the epoch's list is
    padded with repeats to a multiple of ``num_replicas`` and rank ``r`` takes items r, r+R, ...
    """

    def __init__(
        self,
        dataset: SizedDataset,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        sampler: Sampler | None = None,
    ) -> None:
        items = sampler if sampler is not None else dataset
        # DistributedSampler only takes the length of what it is given (a dataset, here also a sampler)
        super().__init__(cast(Dataset, items), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.sampler = sampler
        self._dataset_size = len(dataset)
        self._start = 0

    def start_at(self, epoch: int, position: int) -> None:
        """Make the next iteration epoch ``epoch`` from this rank's item ``position`` (once)."""
        self.epoch, self._start = epoch, position

    def _epoch_items(self, generator: torch.Generator) -> list[Any]:
        if self.sampler is None:
            return torch.randperm(self._dataset_size, generator=generator).tolist()
        if hasattr(self.sampler, "generator"):
            self.sampler.generator = generator
        elif hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        return list(self.sampler)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        generator = epoch_generator(self.seed, self.epoch)
        items = self._epoch_items(generator)
        seeds = torch.randint(2**31 - 1, (len(items),), generator=generator).tolist()
        pairs = list(zip(items, seeds, strict=True))
        while len(pairs) < self.total_size:  # pad with repeats, as DistributedSampler does
            pairs += pairs[: self.total_size - len(pairs)]
        start, self._start = self._start, 0
        return iter(pairs[self.rank : self.total_size : self.num_replicas][start:])


class SeededSamples(Dataset):
    """Wraps a dataset so that ``dataset[(item, seed)]`` seeds its augmentation, then returns ``dataset[item]``.

    Every albumentations pipeline the dataset holds (any attribute with ``set_random_seed``) is
    reseeded per sample.
    """

    def __init__(self, dataset: SizedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[Any, int]) -> dict:
        item, seed = key
        for value in vars(self.dataset).values():
            if callable(getattr(value, "set_random_seed", None)):
                value.set_random_seed(seed)
        return self.dataset[item]


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over a ``ResumableSampler``, declared resumable to Lightning.

    Lightning restores loader state only when it builds the loaders after loading a checkpoint,
    but ``configure_optimizers`` (``estimated_stepping_batches``) builds them before; so the
    position is restored through ``SegmentationDataModule``'s checkpoint state instead, and this
    loader's own state is empty. Having one tells Lightning the order is resumable (it otherwise
    warns, wrongly here, that a mid-epoch resume is unreliable).
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def resumable_loader(
    trainer: pl.Trainer | None,
    dataset: SizedDataset,
    sampler: Sampler | None,
    batch_size: int,
    seed: int,
    start: tuple[int, int] = (0, 0),
    **kwargs: Any,
) -> ResumableLoader:
    """The training loader: ``sampler``'s draws in a resumable, rank-split order, seeded augmentation.

    Args:
        trainer: the trainer, for the DDP world size and rank (None: one process).
        dataset: the training dataset.
        sampler: base sampler (see ``ResumableSampler``), or None for a uniform permutation.
        batch_size: items a batch (per process).
        seed: seed of the order and of the per-sample augmentation seeds.
        start: (epoch, batches already trained in it) of a resumed fit: the first iteration
            begins right after them (``resume_position`` at the time the checkpoint was saved).
        **kwargs: further ``DataLoader`` arguments (``drop_last``, ``num_workers``, ...).
    """
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    order = ResumableSampler(dataset, seed=seed, num_replicas=world, rank=rank, sampler=sampler)
    epoch, batches = start
    order.start_at(epoch, batches * batch_size)
    return ResumableLoader(SeededSamples(dataset), batch_size=batch_size, sampler=order, **kwargs)
