"""The data module's planning step: the training cases' fingerprint and statistics in, a plan out.

Only the training split is read (never a test case, and a validation case only under ``medseg
cv``'s ``data.plan_cases: train_val``): the fingerprint that the plan is made from
(``pipeline.data.planning.rules``) and the CT normalisation statistics alike. The plan is
written to ``<cache>/plan.json`` (and, by ``RunSummary``, to the run directory).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.data.normalization import Normalization, needs_foreground, resolve_channels, to_plain
from pipeline.data.planning.fingerprint import Fingerprint
from pipeline.data.planning.rules import Plan, make_plan
from pipeline.files import write_json


def training_normalization(
    source: object, train: Sequence[str], norm: Normalization, modalities: Sequence[str | None]
) -> list[Normalization]:
    """One resolved ``Normalization`` per channel, data-set statistics from the cases ``train``."""
    foreground = source.foreground_sample(train) if needs_foreground(norm, modalities) else None
    return resolve_channels(norm, modalities, foreground)


def plan_volumes(datamodule: object, features: Sequence[int]) -> Plan:
    """The plan of a ``SegmentationDataModule``'s training cases, its explicit target spacing and
    slice axis kept, the resolved normalisation recorded; written to ``<cache>/plan.json``."""
    dm = datamodule
    train = dm.plan_ids()
    fingerprint = Fingerprint.of(dm.source.facts(train), dm.num_classes, dm.source.foreground_sample(train))
    axis = None if dm.slice_axis == "auto" else int(dm.slice_axis)
    norms = [to_plain(n) for n in dm.channel_normalization()]
    plan = make_plan(fingerprint, dm.plan_settings, features, dm.class_names, dm.target_spacing, axis, norms)
    write_json(dm.cache_dir / "plan.json", plan.to_json())
    return plan
