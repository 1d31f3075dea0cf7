"""Which slices a loader reads, and in which groups.

``ForegroundSampler`` draws training items so that a set fraction of them shows foreground, as
nnU-Net does (it forces 1/3 of each batch's patches to contain foreground): most slices of a
volume are often background only, and a uniform draw would starve the small classes. Each
epoch is a seeded permutation of all items (repeated or cut to the epoch's number of draws) in
which each position is, with probability ``fraction``, replaced by a forced draw: a foreground class drawn uniformly among those the data
shows, then an item that shows it (nnU-Net's class-first rule: a lesion in 3 slices is drawn as
often as an organ in 40). Forced draws are yielded as ``(index, label)``, the others as
``(index, 0)``, so the dataset crops the patch around that class
(``SliceDataset.foreground_transform``).

It is deterministic for a seed and an epoch, so every DDP rank builds the same list and can take
its own shard of it: the data module hands it to ``pipeline.data.loading.order.ResumableSampler``, which
does that (and resumes mid-epoch); used on its own in a ``DataLoader``, Lightning's
``DistributedSamplerWrapper`` shards it the same way and forwards ``set_epoch`` to it.

``EvalBatches`` groups validation slices into batches of one size each (slices of one case,
or consecutive 2D images of one size), because whole slices of different cases may differ in
size and cannot be stacked; the loader then runs with ``batch_size=None``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset, Sampler, default_collate

from pipeline.data.loading.datasets import SliceDataset


class ForegroundSampler(Sampler):
    """Yields ``(index, label)`` for one epoch of draws; ``label`` 0 for a uniform draw.

    Args:
        size: number of items.
        class_items: foreground class -> indices of the items that show it
            (``SliceDataset.class_items``).
        fraction: probability in [0, 1] that a draw is forced to show foreground; with no
            foreground in the data, draws stay uniform.
        seed: seed of the draws; epoch e draws from ``np.random.default_rng([seed, e])``.
        draws: draws per epoch (an epoch of fixed length); default ``size``, one pass.
    """

    def __init__(
        self,
        size: int,
        class_items: Mapping[int, Sequence[int] | np.ndarray],
        fraction: float = 1 / 3,
        seed: int = 0,
        draws: int | None = None,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"foreground fraction must be in [0, 1], got {fraction}")
        self.size = size
        self.class_items = {int(k): np.asarray(v, dtype=np.int64) for k, v in class_items.items() if len(v)}
        self.fraction = fraction if self.class_items else 0.0
        self.seed = seed
        self.draws = size if draws is None else draws
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.draws

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = self.draws
        passes = -(-n // self.size)  # whole permutations, the last one cut
        order = np.concatenate([rng.permutation(self.size) for _ in range(passes)])[:n]
        forced = rng.random(n) < self.fraction
        labels = sorted(self.class_items)
        drawn = rng.integers(len(labels), size=n) if labels else np.zeros(n, np.int64)
        where = rng.random(n)  # the item within the drawn class's list, as a fraction
        for i, force, k, u in zip(
            order.tolist(), forced.tolist(), drawn.tolist(), where.tolist(), strict=True
        ):
            if force:
                items = self.class_items[labels[k]]
                yield int(items[int(u * len(items))]), labels[k]
            else:
                yield i, 0


class EvalBatches(Dataset):
    """A ``SliceDataset`` as a dataset of whole batches, each of slices of one size, in order.

    Args:
        dataset: the slices.
        batch_size: at most this many slices a batch.
    """

    def __init__(self, dataset: SliceDataset, batch_size: int) -> None:
        self.dataset = dataset
        self.batches: list[list[int]] = []
        previous = None
        for index, (c, _) in enumerate(dataset.slices):
            size = tuple(dataset.cases[c].image.shape[1:3])
            if size != previous or len(self.batches[-1]) == batch_size:
                self.batches.append([])
            self.batches[-1].append(index)
            previous = size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        return default_collate([self.dataset[i] for i in self.batches[index]])
