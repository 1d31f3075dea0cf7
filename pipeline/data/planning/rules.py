"""The plan: training settings derived from the training cases' fingerprint, one rule each.

Every rule can be said in one sentence (after nnU-Net v2's planner where it has one):

1. Target spacing: the median spacing of the training cases, per axis. For strongly anisotropic
   data (the coarsest axis more than 3x the finest, with under a third of their voxels) that axis
   takes the 10th percentile of its spacings instead (never finer than in-plane): resampling the
   thin-slice cases to the median thick slice would discard their resolution.
2. Slice axis (2D networks): the coarsest axis of the target spacing (ties: axial), so slices
   keep the finest grid.
3. Pooling per axis: level by level an axis is halved while its feature map stays at least
   ``min_feature_size`` voxels and (3D) its spacing is at most twice the finest one, so
   anisotropic data pool in plane first; a 3D kernel is 1 along an axis still more than twice as
   coarse as the finest and not yet pooled (a 3-voxel kernel across thick slices mixes unrelated
   anatomy). Levels
   beyond an axis's pooling get stride 1 along it: the network depth is the model's, the pooling
   stops where the feature map reaches 4-8 voxels.
4. Patch: the median case shape at the target spacing, each side rounded up to a multiple of its
   pooling factor, then shrunk (the side largest relative to the median, one pooling multiple at a
   time) until a batch of 2 fits the memory budget and, planning for a CPU, the compute budget.
5. Batch: as many patches as both budgets allow, at most 5% of the training voxels (nnU-Net's cap:
   one step should not see most of a small data set), between 2 and ``max_batch``.
6. Keyhole: when the 3D patch holds under a quarter of the median case's voxels (nnU-Net's
   threshold for its low-resolution stage), a low-resolution 3D plan is added: the target spacing
   grows 3% a step (axes more than twice finer than the coarsest first) until the patch planned
   there holds a quarter of the median case; ``medseg plan`` then recommends the 2D network, which
   sees whole slices, or that spacing.

Memory is estimated as ``ACTIVATION_TENSORS`` float32 tensors of every level's width and size per
sample (the convolution, normalisation and activation outputs that backward keeps, encoder and
decoder); compute as voxels per step, a 3D voxel counting 3x a 2D one (27 vs 9 kernel taps).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from pipeline.data.cache.resample import ANISOTROPY
from pipeline.data.planning.fingerprint import Fingerprint

ACTIVATION_TENSORS = 14  # float32 maps kept per level width and voxel for backward (enc + dec)
FIVE_PERCENT = 0.05
KEYHOLE = 0.25  # nnU-Net's lowres_creation_threshold: a smaller share of the median case is a keyhole
LOWRES_STEP = 1.03  # nnU-Net's spacing increase per step of its low-resolution search
MAX_LOWRES_STEPS = 200  # 1.03 ** 200 = 370x coarser: far past any scan's need
DEFAULT_FEATURES = (16, 32, 64, 128, 256)  # configs/model/unet.yaml's widths


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


@dataclass(frozen=True)
class LowResPlan:
    """Rule 6: a coarser target spacing (RAS, mm) at which the 3D patch sees a quarter of the median
    case; ``median_shape`` there (RAS order) and ``coverage`` (patch voxels / median case voxels)."""

    target_spacing: tuple[float, float, float]
    median_shape: tuple[float, float, float]
    net: NetworkPlan
    coverage: float


@dataclass(frozen=True)
class Plan:
    """Everything planned for a data set (``plan.json``); ``target_spacing`` in RAS axis order.

    ``spatial_dims`` names the network the plan was made for; its ``NetworkPlan`` holds what that
    network trains with (explicit settings applied, ``as_trained``), the other one what was planned.
    """

    target_spacing: tuple[float, float, float]
    slice_axis: int
    median_shape: tuple[float, float, float]
    spacing_range: tuple[tuple[float, ...], tuple[float, ...]]
    net_2d: NetworkPlan
    net_3d: NetworkPlan
    settings: PlanSettings
    fingerprint: dict = field(default_factory=dict)
    normalization: list[dict] = field(default_factory=list)
    spatial_dims: int = 2
    coverage_3d: float = 1.0
    lowres_3d: LowResPlan | None = None

    def network(self, spatial_dims: int | None = None) -> NetworkPlan:
        """The 2D or 3D network's plan; by default the one the plan was made for."""
        return self.net_3d if (spatial_dims or self.spatial_dims) == 3 else self.net_2d

    @property
    def keyhole(self) -> bool:
        """Rule 6: the 3D patch holds under a quarter of the median case."""
        return self.coverage_3d < KEYHOLE

    def to_json(self) -> dict:
        return asdict(self)


def xyz(values: Iterable[float]) -> tuple[float, float, float]:
    """Three values per RAS axis (a spacing or a shape) as a tuple of three floats."""
    x, y, z = (float(v) for v in values)
    return x, y, z


def target_spacing(fingerprint: Fingerprint) -> tuple[float, float, float]:
    """Rule 1: the median spacing; the 10th percentile along a strongly anisotropic coarse axis."""
    spacings, shapes = fingerprint.spacings, fingerprint.shapes
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    anisotropic = target[coarse] > ANISOTROPY * target[others].max()
    few_voxels = median_shape[coarse] * ANISOTROPY < median_shape[others].min()
    if anisotropic and few_voxels:
        target[coarse] = max(np.percentile(spacings[:, coarse], 10), target[others].max() + 1e-5)
    return xyz(target)


def slice_axis_of(spacing: Sequence[float]) -> int:
    """Rule 2: the coarsest axis (ties go to the axial axis 2)."""
    values = np.asarray(spacing, float)
    coarsest = np.flatnonzero(np.isclose(values, values.max()))
    return 2 if 2 in coarsest else int(coarsest[0])


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


def coverage(patch: Sequence[int], median_shape: Sequence[float]) -> float:
    """The share of the median case's voxels a patch holds (at most 1)."""
    return min(1.0, float(np.prod(patch)) / float(np.prod(median_shape)))


def lowres_plan(
    fingerprint: Fingerprint,
    target: Sequence[float],
    slice_axis: int,
    features: Sequence[int],
    settings: PlanSettings,
) -> LowResPlan | None:
    """Rule 6's low-resolution 3D plan, or None when no spacing within ``MAX_LOWRES_STEPS`` gives it."""
    spacing = np.asarray(target, float)
    order = [slice_axis, *(a for a in range(3) if a != slice_axis)]
    for _ in range(MAX_LOWRES_STEPS):
        finer = spacing.max() / spacing > 2  # bring the fine axes towards a thick one first
        spacing = np.where(finer, spacing * LOWRES_STEP, spacing) if finer.any() else spacing * LOWRES_STEP
        at_spacing = fingerprint.shapes * fingerprint.spacings / spacing
        median = np.median(at_spacing, axis=0)
        voxels = float(at_spacing.prod(axis=1).sum())
        net = plan_network(3, median[order], spacing[order], voxels, features, settings)
        covered = coverage(net.patch, median)
        if covered >= KEYHOLE:
            return LowResPlan(xyz(spacing), xyz(median), net, covered)
    return None


def make_plan(
    fingerprint: Fingerprint,
    settings: PlanSettings = PlanSettings(),
    features: Sequence[int] = DEFAULT_FEATURES,
    class_names: Sequence[str] = (),
    spacing: Sequence[float] | None = None,
    slice_axis: int | None = None,
    normalization: Sequence[dict] = (),
) -> Plan:
    """The plan for the training cases' ``fingerprint``; ``spacing`` and ``slice_axis`` override
    rules 1-2; ``normalization`` (the resolved per-channel settings) is recorded with it."""
    if fingerprint.cases == 0:
        raise ValueError("cannot plan from zero training cases")
    target = xyz(spacing) if spacing is not None else target_spacing(fingerprint)
    axis = slice_axis_of(target) if slice_axis is None else int(slice_axis)
    at_target = fingerprint.shapes * fingerprint.spacings / np.asarray(target)
    median_shape = np.median(at_target, axis=0)
    training_voxels = float(at_target.prod(axis=1).sum())
    order = [axis, *(a for a in range(3) if a != axis)]  # slice order: the slice axis first
    ordered_shape, ordered_spacing = median_shape[order], np.asarray(target)[order]
    net_2d = plan_network(2, ordered_shape[1:], ordered_spacing[1:], training_voxels, features, settings)
    net_3d = plan_network(3, ordered_shape, ordered_spacing, training_voxels, features, settings)
    covered = coverage(net_3d.patch, median_shape)
    lowres = lowres_plan(fingerprint, target, axis, features, settings) if covered < KEYHOLE else None
    return Plan(
        target, axis, xyz(median_shape),
        (tuple(fingerprint.spacings.min(0).tolist()), tuple(fingerprint.spacings.max(0).tolist())),
        net_2d, net_3d, settings, fingerprint.summary(class_names), list(normalization),
        coverage_3d=covered, lowres_3d=lowres,
    )  # fmt: skip


def per_axis(values: Sequence[int | Sequence[int]], spatial_dims: int) -> tuple[tuple[int, ...], ...]:
    """Per-level strides or kernel sizes as given to a network (``2`` or ``[1, 2, 2]`` per level)
    with every level spelt out per axis."""
    return tuple(
        tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),) * spatial_dims
        for value in values
    )


def as_trained(
    plan: Plan,
    spatial_dims: int,
    features: Sequence[int],
    patch: Sequence[int] | None = None,
    batch: int | None = None,
    strides: Sequence | None = None,
    kernel_sizes: Sequence | None = None,
) -> Plan:
    """``plan`` for the ``spatial_dims`` network with the settings given explicitly (patch, batch,
    the network's own strides and kernel sizes; None: planned) in place of the planned ones, its
    memory estimated again, so the plan records what trains."""
    planned = plan.network(spatial_dims)
    strides = per_axis(strides, spatial_dims) if strides is not None else planned.strides
    kernel_sizes = per_axis(kernel_sizes, spatial_dims) if kernel_sizes is not None else planned.kernel_sizes
    patch = tuple(int(n) for n in patch) if patch else planned.patch
    batch = int(batch or planned.batch)
    memory = round(batch * activation_bytes(patch, strides, features) / 2**30, 3)
    chosen = replace(
        planned, patch=patch, batch=batch, strides=strides, kernel_sizes=kernel_sizes, memory_gb=memory
    )
    if spatial_dims == 2:
        return replace(plan, spatial_dims=2, net_2d=chosen)
    return replace(plan, spatial_dims=3, net_3d=chosen, coverage_3d=coverage(patch, plan.median_shape))
