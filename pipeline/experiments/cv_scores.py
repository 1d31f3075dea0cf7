"""Out-of-fold scores of a cross-validation, the postprocessing they choose, and their summary.

Each fold's validation cases are segmented by ``medseg infer`` with the fold's best checkpoint
(``<fold run>/validation/``) and scored here against their ground truth with ``pipeline.metrics``
on the case's own grid, as validation scores them: a volume per case in 3D with distances in mm,
a 2D image per image. The same predictions choose the postprocessing, as nnU-Net does: for each
foreground class, keeping only its largest connected component is adopted when it raises that
class's mean out-of-fold Dice (over the cases whose ground truth holds the class). Removing
components of one class turns them into background, which leaves every other class's Dice as it
was, so the classes are decided independently and the postprocessed Dice of a case follows from
the numbers kept here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.data.loading.datasets import apply_label_map
from pipeline.data.reading.formats import read_mask_2d
from pipeline.data.reading.layouts import Case
from pipeline.data.reading.volumes import is_volume_case, read_mask
from pipeline.errors import DataError
from pipeline.inference.postprocess import keep_largest_component
from pipeline.metrics import SegmentationMetrics, confusion_per_image, scores_from_confusion

SURFACE_TOLERANCE = 2.0  # mm for volumes, pixels for 2D images: SegmentationModule's default


@dataclass
class CaseResult:
    """One case's out-of-fold scores.

    Attributes:
        scores: ``dice``, ``dice_<class>``, ``iou``, ..., ``hd95_<class>``, ``surface_dice``...: the
            foreground mean and each class (None where undefined, as ``pipeline.metrics`` says).
        class_dice: per foreground class, its Dice in float64, as the postprocessing compares it.
        largest_component_dice: per foreground class, its Dice after keeping only its largest
            connected component (float64).
    """

    case_id: str
    fold: int
    scores: dict[str, float | None]
    class_dice: dict[str, float | None] = field(default_factory=dict)
    largest_component_dice: dict[str, float | None] = field(default_factory=dict)


def _plain(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def case_labels(
    case: Case, prediction: Path, label_map: dict[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
    """(prediction, ground truth, spacing in mm or None for 2D): label maps on the case's own grid,
    volumes both in RAS+ order (as ``medseg infer`` wrote the prediction with the input's geometry).

    Raises:
        DataError: the prediction is missing or its grid is not the ground truth's.
    """
    if not prediction.is_file():
        raise DataError(prediction, f"the out-of-fold prediction of {case.case_id} is missing")
    if case.mask is None:
        raise DataError(case.images[0], f"{case.case_id} has no ground truth mask to score against")
    spacing: tuple[float, ...] | None
    if is_volume_case(case):
        volume = read_mask(case.mask, label_map)
        truth, predicted, spacing = volume.array, read_mask(prediction).array, volume.spacing
    else:
        truth = apply_label_map(read_mask_2d(case.mask), label_map)
        predicted, spacing = read_mask_2d(prediction), None
    if predicted.shape != truth.shape:
        raise DataError(
            prediction, f"has shape {predicted.shape}, the ground truth {case.mask} {truth.shape}"
        )
    return np.array(predicted, np.int64), np.array(truth, np.int64), spacing  # writable, for torch


def score_case(
    predicted: np.ndarray, truth: np.ndarray, class_names: Sequence[str], spacing: Sequence[float] | None
) -> dict[str, float | None]:
    """Every metric of ``pipeline.metrics`` for one case: foreground mean and per class."""
    metrics = SegmentationMetrics(class_names, hd95=True, surface_tolerance=SURFACE_TOLERANCE)
    metrics.update(torch.from_numpy(predicted)[None], torch.from_numpy(truth)[None], spacing=spacing)
    return {k: _plain(v.item()) for k, v in metrics.compute().items() if k != "images"}


def class_dice(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) Dice of each class (NaN where the ground truth lacks it)."""
    confusion = confusion_per_image(
        torch.from_numpy(predicted)[None], torch.from_numpy(truth)[None], num_classes
    )
    return scores_from_confusion(confusion)["dice"][0].numpy()


def largest_component_dice(
    predicted: np.ndarray, truth: np.ndarray, class_names: Sequence[str]
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Per foreground class: its Dice as predicted, and after keeping only its largest connected
    component; both computed alike (float64), so an unchanged class ties exactly."""
    num_classes = len(class_names)
    before = class_dice(predicted, truth, num_classes)
    after = {}
    for c, name in enumerate(class_names[1:], start=1):
        kept = keep_largest_component(predicted, num_classes, [c])
        after[name] = _plain(class_dice(kept, truth, num_classes)[c])
    return {name: _plain(before[c]) for c, name in enumerate(class_names[1:], start=1)}, after


def evaluate_case(
    case: Case, prediction: Path, fold: int, class_names: Sequence[str], label_map: dict[int, int] | None
) -> CaseResult:
    """Score one out-of-fold prediction, with and without each class's largest-component step."""
    predicted, truth, spacing = case_labels(case, prediction, label_map)
    scores = score_case(predicted, truth, class_names, spacing)
    return CaseResult(case.case_id, fold, scores, *largest_component_dice(predicted, truth, class_names))


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return statistics.fmean(defined) if defined else None


def choose_postprocessing(results: Sequence[CaseResult], class_names: Sequence[str]) -> dict:
    """nnU-Net's decision per foreground class: keep only the largest connected component when
    that raises the class's mean out-of-fold Dice (strictly; a tie keeps the prediction as it is).

    Returns:
        ``{"largest_component": [adopted class names], "classes": {name: {"dice": before,
        "dice_largest_component": after, "adopted": bool, "cases": n}}, "criterion": ...}``.
    """
    classes = {}
    for name in class_names[1:]:
        before = _mean([r.class_dice[name] for r in results])
        after = _mean([r.largest_component_dice[name] for r in results])
        cases = sum(r.class_dice[name] is not None for r in results)
        adopted = before is not None and after is not None and after > before
        classes[name] = {"dice": before, "dice_largest_component": after, "adopted": adopted, "cases": cases}
    return {
        "largest_component": [name for name, c in classes.items() if c["adopted"]],
        "classes": classes,
        "criterion": "per foreground class, keep only the largest connected component (face-connected) "
        "when that raises the class's mean out-of-fold Dice",
    }


def postprocessed_dice(result: CaseResult, adopted: Sequence[str], class_names: Sequence[str]) -> dict:
    """A case's Dice per class and foreground mean with the adopted postprocessing applied."""
    per_class = {
        name: (result.largest_component_dice if name in adopted else result.class_dice)[name]
        for name in class_names[1:]
    }
    return {"dice": _mean(list(per_class.values())), **{f"dice_{k}": v for k, v in per_class.items()}}


def mean_scores(rows: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Key-wise mean over rows, undefined values left out."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: _mean([row.get(k) for row in rows]) for k in keys}


def mean_sd(rows: Sequence[dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Key-wise mean and sample standard deviation over rows (the folds)."""
    out = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [value for row in rows if (value := row.get(key)) is not None]
        out[key] = {
            "mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None,
        }
    return out


def summarise(results: Sequence[CaseResult], folds: int, class_names: Sequence[str]) -> dict:
    """Per fold, mean ± sd over folds, pooled over every case, and the postprocessing decision."""
    decision = choose_postprocessing(results, class_names)
    adopted = decision["largest_component"]
    per_fold, scores, postprocessed = [], [], []
    for fold in range(folds):
        rows = [r for r in results if r.fold == fold]
        scores.append(mean_scores([r.scores for r in rows]))
        postprocessed.append(mean_scores([postprocessed_dice(r, adopted, class_names) for r in rows]))
        per_fold.append(
            {"fold": fold, "cases": len(rows), "scores": scores[-1], "postprocessed": postprocessed[-1]}
        )
    return {
        "folds": per_fold,
        "mean_sd": mean_sd(scores),
        "mean_sd_postprocessed": mean_sd(postprocessed),
        "pooled": mean_scores([r.scores for r in results]),
        "postprocessing": decision,
        "cases": [
            {
                "case_id": r.case_id,
                "fold": r.fold,
                **r.scores,
                "postprocessed": postprocessed_dice(r, adopted, class_names),
            }
            for r in sorted(results, key=lambda r: (r.fold, r.case_id))
        ],
    }
