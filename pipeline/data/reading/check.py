"""``medseg data check``: validate a data set in one pass and report every problem at once.

Training stops at the first bad file; before a long run (or after copying a data set) it is
better to see them all. Each problem is a ``DataError`` naming one file: unreadable or truncated
files, DICOM series with duplicated, missing or unevenly spaced slices, images without masks
and masks without images, image/mask size or geometry mismatch, label values outside the
classes, NaN/Inf intensities, channel counts that differ between cases, and an empty data set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np

from pipeline.data.loading.datasets import apply_label_map, check_labels, pair_problems
from pipeline.data.reading.formats import read_image_2d, read_mask_2d
from pipeline.data.reading.layouts import Case, describe, resolve_class_names
from pipeline.data.reading.volumes import case_problems, is_volume_case, read_image, read_mask
from pipeline.errors import DataError
from pipeline.parallel import map_with_progress

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class CheckReport:
    """What ``check_dataset`` found; ``ok`` when ``problems`` is empty."""

    root: Path
    layout: str | None = None
    cases: int = 0
    channels: int | None = None
    class_names: list[str] = field(default_factory=list)
    problems: list[DataError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: ``OK: ...`` or ``FAILED: N problem(s) ...``."""
        classes = ", ".join(self.class_names) or "?"
        what = f"{self.cases} cases, {self.layout} layout, {self.channels} channel(s), classes: {classes}"
        return (
            f"OK: {what}" if self.ok else f"FAILED: {len(self.problems)} problem(s) in {self.root} ({what})"
        )


def _read(read: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> tuple[T | None, list[DataError]]:
    try:
        return read(*args, **kwargs), []
    except DataError as err:
        return None, [err]


def _check_volume(
    case: Case, class_names: list[str], label_map: dict[int, int] | None
) -> tuple[int | None, list[DataError]]:
    image, problems = _read(read_image, case)
    mask, mask_problems = _read(read_mask, case.mask, label_map) if case.mask else (None, [])
    problems += mask_problems
    if image is not None:
        problems += case_problems(case, image, mask, class_names)
    elif mask is not None and class_names:
        problems += _read(check_labels, mask.array, len(class_names), mask.path, class_names)[1]
    return (image.array.shape[-1] if image is not None else None), problems


def _check_2d(
    case: Case, class_names: list[str], label_map: dict[int, int] | None
) -> tuple[int | None, list[DataError]]:
    image, problems = _read(read_image_2d, case.images[0])
    mask, mask_problems = _read(read_mask_2d, case.mask) if case.mask else (None, [])
    problems += mask_problems
    if image is not None and not np.isfinite(image).all():
        problems.append(DataError(case.images[0], "image holds NaN or infinite intensities"))
    if mask is not None and case.mask is not None:
        mask = apply_label_map(mask, label_map)
        shape = image.shape[:2] if image is not None else mask.shape
        problems += pair_problems(case.images[0], case.mask, shape, mask, class_names) if class_names else []
    return (None if image is None else 1 if image.ndim == 2 else image.shape[-1]), problems


def _is_volume(case: Case) -> bool | None:
    """Whether the case is a volume; None for an ending no reader knows (reported by ``check_case``)."""
    try:
        return is_volume_case(case)
    except DataError:
        return None


def check_case(
    case: Case, class_names: list[str], label_map: dict[int, int] | None
) -> tuple[int | None, list[DataError]]:
    """One case's channel count (None if unreadable) and every problem of it."""
    kind, problems = _read(is_volume_case, case)
    if kind is None:
        return None, problems
    check = _check_volume if kind else _check_2d
    return check(case, class_names, label_map)


def check_dataset(
    root: str | Path,
    layout: str = "auto",
    class_names: list[str] | None = None,
    label_map: dict[int, int] | None = None,
    workers: int = 1,
    progress: bool = False,
) -> CheckReport:
    """Read every case under ``root`` and collect every problem (never raises ``DataError``).

    Args:
        workers: processes reading cases side by side.
        progress: show a progress bar over the cases.
    """
    report = CheckReport(Path(root))
    try:
        info = describe(root, layout, problems=report.problems)
    except DataError as err:
        report.problems.append(err)
        return report
    report.layout, report.cases = info.layout, len(info.cases)
    try:
        report.class_names = resolve_class_names(root, info, class_names)
    except DataError as err:
        report.problems.append(err)
    if not info.cases:
        report.problems.append(DataError(root, "empty data set: no cases found"))
    report.channels = len(info.modalities) if info.modalities else None
    first: Case | None = None
    checked = map_with_progress(
        functools.partial(check_case, class_names=report.class_names, label_map=label_map),
        info.cases,
        workers,
        "checking cases",
        progress,
    )
    for case, (channels, problems) in zip(info.cases, checked, strict=True):
        report.problems += problems
        if first is None and channels is not None:
            first = case
            report.channels = report.channels or channels
        if first is not None and channels is not None and channels != report.channels:
            report.problems.append(
                DataError(
                    case.images[0],
                    f"has {channels} channel(s); the data set has {report.channels} ({first.case_id})",
                )
            )
        kinds = (_is_volume(case), _is_volume(info.cases[0]))
        if None not in kinds and kinds[0] != kinds[1]:
            report.problems.append(DataError(case.images[0], "mixes 2D images and volumes in one data set"))
    return report
