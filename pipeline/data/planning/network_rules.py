"""The plan's rules 3-5 for one network (``pipeline.data.planning.rules`` has the others), after
nnU-Net v2's planner:

3. Pooling per axis: level by level an axis is halved while its feature map stays at least
   ``min_feature_size`` voxels and (3D) its spacing is at most twice the finest one, so
   anisotropic data pool in plane first; a 3D kernel is 1 along an axis still more than twice as
   coarse as the finest and not yet pooled (a 3-voxel kernel across thick slices mixes unrelated
   anatomy). Levels beyond an axis's pooling get stride 1 along it: the network depth is the model's, the pooling
   stops where the feature map reaches 4-8 voxels.
4. Patch: the median case shape at the target spacing, each side rounded up to a multiple of its
   pooling factor, then shrunk (the side largest relative to the median, one pooling multiple at a
   time) until a batch of 2 fits the memory budget and, planning for a CPU, the compute budget.
5. Batch: as many patches as both budgets allow, at most 5% of the training voxels (nnU-Net's cap:
   one step should not see most of a small data set), between 2 and ``max_batch``.

Memory is estimated as ``ACTIVATION_TENSORS`` float32 tensors of every level's width and size per
sample (the convolution, normalisation and activation outputs that backward keeps, encoder and
decoder); compute as voxels per step, a 3D voxel counting 3x a 2D one (27 vs 9 kernel taps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ACTIVATION_TENSORS = 14  # float32 maps kept per level width and voxel for backward (enc + dec)
FIVE_PERCENT = 0.05


@dataclass(frozen=True)
class PlanSettings:
    """The budgets the plan sizes patches and batches for (the ``data.plan`` config section).

    Args:
        memory_gb: activation memory of one training step, GB (a GPU's, or RAM on a CPU).
        device: what the batch is sized for: ``gpu``, ``cpu`` or ``auto`` (gpu when CUDA is available).
        cpu_step_voxels: planning for a CPU, voxels per step (2D-equivalent: a 3D voxel counts 3x).
        min_feature_size: the smallest feature map side an axis is pooled down to.
        max_batch: the largest batch.
    """

    memory_gb: float = 8.0
    device: str = "auto"
    cpu_step_voxels: int = 131072
    min_feature_size: int = 4
    max_batch: int = 512

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"plan.device must be auto, cpu or gpu, got {self.device!r}")
        if self.memory_gb <= 0 or self.cpu_step_voxels < 1 or self.min_feature_size < 1 or self.max_batch < 2:
            raise ValueError(
                "plan budgets must be positive (memory_gb > 0, cpu_step_voxels >= 1, max_batch >= 2)"
            )

    def for_cpu(self) -> bool:
        return self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())


@dataclass(frozen=True)
class NetworkPlan:
    """Patch, batch and pooling for a 2D or 3D network; axes in slice order ((H, W) or (S, H, W)).

    Attributes:
        spatial_dims: 2 or 3.
        patch: training patch, voxels per axis.
        batch: patches per step (per process).
        strides: per pooling step, the stride along each axis (``UNet(strides=...)``).
        kernel_sizes: per level, the kernel size along each axis (``UNet(kernel_sizes=...)``).
        spacing: the target spacing along the patch axes, mm.
        memory_gb: estimated activation memory of one batch.
    """

    spatial_dims: int
    patch: tuple[int, ...]
    batch: int
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    spacing: tuple[float, ...]
    memory_gb: float

    @property
    def pools(self) -> tuple[int, ...]:
        """Poolings along each axis (the network divides each side by 2 that many times)."""
        return tuple(sum(s[a] == 2 for s in self.strides) for a in range(len(self.patch)))


def pooling(
    patch: Sequence[float] | np.ndarray,
    spacing: Sequence[float] | np.ndarray,
    levels: int,
    min_size: int,
    anisotropic: bool,
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """Rule 3: (strides per pooling step, kernel sizes per level) for a patch at ``spacing``."""
    sizes, current = list(map(float, patch)), list(map(float, spacing))
    pooled = [False] * len(sizes)

    def kernels() -> tuple[int, ...]:
        # kernel 1 across native thick slices only: an axis that stopped pooling for its size
        # is not made 1 by the other axes' pooling catching up and passing it
        finest = min(current)
        return tuple(
            1 if anisotropic and s > 2 * finest and not p else 3 for s, p in zip(current, pooled, strict=True)
        )

    strides, kernel_sizes = [], [kernels()]
    for _ in range(levels - 1):
        finest = min(current)
        step = tuple(
            2 if size / 2 >= min_size and (not anisotropic or s <= 2 * finest) else 1
            for size, s in zip(sizes, current, strict=True)
        )
        for a, stride in enumerate(step):
            sizes[a] /= stride
            current[a] *= stride
            pooled[a] = pooled[a] or stride == 2
        strides.append(step)
        kernel_sizes.append(kernels())
    return tuple(strides), tuple(kernel_sizes)


def activation_bytes(
    patch: Sequence[int], strides: Sequence[Sequence[int]], features: Sequence[int]
) -> float:
    """Estimated activation memory of one sample (see the module docstring), bytes."""
    sizes, total = np.asarray(patch, float), 0.0
    for level, width in enumerate(features):
        if level:
            sizes = np.ceil(sizes / np.asarray(strides[level - 1]))
        total += width * float(np.prod(sizes))
    return ACTIVATION_TENSORS * 4 * total


def plan_network(
    spatial_dims: int,
    median_shape: Sequence[float] | np.ndarray,
    spacing: Sequence[float] | np.ndarray,
    training_voxels: float,
    features: Sequence[int],
    settings: PlanSettings,
) -> NetworkPlan:
    """Rules 3-5 for one network: ``median_shape`` and ``spacing`` along the patch axes."""
    levels, cost = len(features), 3 if spatial_dims == 3 else 1
    median = np.asarray(median_shape, float)
    budget = settings.memory_gb * 2**30
    step_voxels = settings.cpu_step_voxels / cost if settings.for_cpu() else math.inf
    patch = median.copy()
    while True:
        strides, kernels = pooling(patch, spacing, levels, settings.min_feature_size, spatial_dims == 3)
        multiple = np.array([2 ** sum(s[a] == 2 for s in strides) for a in range(spatial_dims)])
        rounded = (np.ceil(patch / multiple) * multiple).astype(int)
        per_sample = activation_bytes(rounded, strides, features)
        voxels = float(np.prod(rounded))
        fits = 2 * per_sample <= budget and 2 * voxels <= step_voxels
        smallest = rounded <= multiple * 2
        if fits or smallest.all():
            break
        axis = int(np.argmax(np.where(smallest, -np.inf, rounded / median)))
        patch[axis] = rounded[axis] - multiple[axis]
    batch = min(
        budget // per_sample,
        step_voxels // voxels,
        FIVE_PERCENT * training_voxels // voxels,
        settings.max_batch,
    )
    batch = int(max(2, batch))
    return NetworkPlan(
        spatial_dims, tuple(int(n) for n in rounded), batch, strides, kernels,
        tuple(float(s) for s in spacing), round(batch * per_sample / 2**30, 3),
    )  # fmt: skip
