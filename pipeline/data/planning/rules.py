"""The plan: training settings derived from the training cases' fingerprint, one rule each.

Every rule can be said in one sentence (after nnU-Net v2's planner where it has one):

1. Target spacing: the median spacing of the training cases, per axis. For strongly anisotropic
   data (the coarsest axis more than 3x the finest, with under a third of their voxels) that axis
   takes the 10th percentile of its spacings instead (never finer than in-plane): resampling the
   thin-slice cases to the median thick slice would discard their resolution.
2. Slice axis (2D networks): the coarsest axis of the target spacing (ties: axial), so slices
   keep the finest grid.
3-5. Pooling per axis, patch and batch, for each network: ``pipeline.data.planning.network_rules``.
6. Keyhole: when the 3D patch holds under a quarter of the median case's voxels (nnU-Net's
   threshold for its low-resolution stage), a low-resolution 3D plan is added: the target spacing
   grows 3% a step (axes more than twice finer than the coarsest first) until the patch planned
   there holds a quarter of the median case; ``medseg plan`` then recommends the 2D network or
   that spacing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from pipeline.data.cache.resample import ANISOTROPY
from pipeline.data.planning.fingerprint import Fingerprint
from pipeline.data.planning.network_rules import NetworkPlan, PlanSettings, activation_bytes, plan_network

KEYHOLE = 0.25  # nnU-Net's lowres_creation_threshold: a smaller share of the median case is a keyhole
LOWRES_STEP = 1.03  # nnU-Net's spacing increase per step of its low-resolution search
MAX_LOWRES_STEPS = 200  # 1.03 ** 200 = 370x coarser: far past any scan's need
DEFAULT_FEATURES = (16, 32, 64, 128, 256)  # configs/model/unet.yaml's widths


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
