"""Planning a data module's volumes for a network: made once, recorded as trained.

Only the training split is read (never a test case, and a validation case only under ``medseg
cv``'s ``data.plan_cases: train_val``): the fingerprint that the plan is made from
(``pipeline.data.planning.rules``) and the normalisation statistics alike. ``plan_volumes`` is the
one function that makes a plan: ``medseg fit``, ``validate``, ``test``, ``cv`` (through ``fit``),
``plan`` and ``data prepare`` call it through ``SegmentationDataModule.resolve_plan`` with the
network the configuration names; it writes ``<cache>/plan.json`` (``RunSummary`` copies the same
plan into the run directory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.data.loading.sources import ImageSource, VolumeSource
from pipeline.data.normalization import Normalization, needs_foreground, resolve_channels, to_plain
from pipeline.data.planning.fingerprint import Fingerprint
from pipeline.data.planning.network_rules import PlanSettings
from pipeline.data.planning.rules import DEFAULT_FEATURES, Plan, as_trained, make_plan
from pipeline.errors import DataError
from pipeline.files import write_json


@dataclass(frozen=True)
class NetworkRequest:
    """What a plan needs to know of the network it is for.

    Attributes:
        spatial_dims: 2 (slices) or 3 (patches).
        features: channels per resolution level, full resolution first (memory and poolings).
        strides: the network's own strides per pooling step, or None to plan them.
        kernel_sizes: the network's own kernel sizes per level, or None to plan them.
    """

    spatial_dims: int = 2
    features: tuple[int, ...] = DEFAULT_FEATURES
    strides: tuple | None = None
    kernel_sizes: tuple | None = None

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")


class PlannedData(Protocol):
    """What ``plan_volumes`` reads of a ``SegmentationDataModule`` (whose module imports this one):
    its cases, the settings the plan keeps (None or ``auto``: planned) and where it writes."""

    root: Path
    source: ImageSource | VolumeSource
    class_names: list[str]
    slice_axis: int | str
    target_spacing: tuple[float, ...] | None
    patch_size: tuple[int, ...] | None
    batch_size: int | None
    plan_settings: PlanSettings
    cache_dir: Path

    @property
    def num_classes(self) -> int: ...

    def plan_ids(self) -> list[str]: ...

    def channel_normalization(self) -> list[Normalization]: ...


def training_normalization(
    source: ImageSource | VolumeSource,
    train: Sequence[str],
    norm: Normalization,
    modalities: Sequence[str | None],
) -> list[Normalization]:
    """One resolved ``Normalization`` per channel, data-set statistics from the cases ``train``."""
    foreground = source.foreground_sample(train) if needs_foreground(norm, modalities) else None
    return resolve_channels(norm, modalities, foreground)


def plan_volumes(datamodule: PlannedData, network: NetworkRequest) -> Plan:
    """The plan of a ``SegmentationDataModule``'s training cases for ``network``: its explicit
    target spacing, slice axis, patch and batch (and the network's own strides) kept, the resolved
    normalisation recorded; written to ``<cache>/plan.json``.

    Raises:
        DataError: the data module holds 2D images, which are not planned.
    """
    dm, source = datamodule, datamodule.source
    if not isinstance(source, VolumeSource):
        raise DataError(dm.root, "only volumes are planned; this data set holds 2D images")
    train = dm.plan_ids()
    fingerprint = Fingerprint.of(source.facts(train), dm.num_classes, source.foreground_sample(train))
    axis = None if dm.slice_axis == "auto" else int(dm.slice_axis)
    norms = [to_plain(n) for n in dm.channel_normalization()]
    planned = make_plan(
        fingerprint, dm.plan_settings, network.features, dm.class_names, dm.target_spacing, axis, norms
    )
    plan = as_trained(
        planned, network.spatial_dims, network.features, dm.patch_size, dm.batch_size,
        network.strides, network.kernel_sizes,
    )  # fmt: skip
    write_json(dm.cache_dir / "plan.json", plan.to_json())
    return plan
