"""SegmentationMetrics against hand-computed cases and against MONAI's metric functions."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from monai.metrics import (
    DiceMetric,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    get_confusion_matrix,
)

from pipeline.metrics import (
    BatchMeanOnce,
    SegmentationMetrics,
    confusion_per_image,
    hd95_per_image,
    scores_from_confusion,
)

NAMES = ("background", "a", "b")
NAN = float("nan")


def scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``compute()`` of one (H, W) prediction/ground-truth pair, as floats."""
    metric = SegmentationMetrics(NAMES)
    metric.update(pred[None], target[None])
    return {k: v.item() for k, v in metric.compute().items()}


def assert_scores(actual: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[key]), f"{key}: {actual[key]} instead of undefined (NaN)"
        else:
            assert actual[key] == pytest.approx(value, abs=1e-6), key


def square(size: int = 8) -> torch.Tensor:
    """8x8 ground truth: class a in a 2x2 square at the top left, class b in 2 pixels at the bottom."""
    target = torch.zeros(size, size, dtype=torch.long)
    target[0:2, 0:2] = 1
    target[7, 6:8] = 2
    return target


def test_metrics_perfect_prediction_scores_one_and_zero_distance():
    target = square()
    result = scores(target.clone(), target)
    for name in ("dice", "iou", "precision", "recall", "specificity", "accuracy"):
        assert_scores(result, {name: 1.0, f"{name}_a": 1.0, f"{name}_b": 1.0})
    assert_scores(result, {"hd95": 0.0, "hd95_a": 0.0, "hd95_b": 0.0})


def test_metrics_partial_overlap_matches_hand_computed_counts():
    target = square()
    pred = target.clone()
    pred[0:2, 2] = 1  # class a predicted as a 2x3 block: TP 4, FP 2, FN 0 (64 pixels)
    result = scores(pred, target)
    assert_scores(
        result,
        {
            "dice_a": 2 * 4 / (2 * 4 + 2),
            "iou_a": 4 / 6,
            "precision_a": 4 / 6,
            "recall_a": 1.0,
            "specificity_a": 58 / 60,
            "accuracy_a": 62 / 64,
            "dice_b": 1.0,
            "dice": (0.8 + 1.0) / 2,
            "hd95_a": 1.0,  # the predicted edge column lies one pixel from the true edge
        },
    )


def test_metrics_empty_prediction_scores_zero_and_worst_distance():
    target = square()
    result = scores(torch.zeros_like(target), target)
    assert_scores(
        result,
        {
            "dice_a": 0.0,
            "iou_a": 0.0,
            "recall_a": 0.0,
            "precision_a": NAN,  # nothing predicted: precision undefined
            "specificity_a": 1.0,
            "accuracy_a": 60 / 64,
            "accuracy_b": 62 / 64,
            "dice": 0.0,
            "hd95_a": math.hypot(8, 8),  # a missed structure: the image diagonal
            "hd95": math.hypot(8, 8),
        },
    )


def test_metrics_empty_ground_truth_leaves_the_image_out_but_false_positives_count():
    target = torch.zeros(8, 8, dtype=torch.long)
    pred = target.clone()
    pred[3, 3:6] = 1  # 3 false positives of class a
    result = scores(pred, target)
    assert_scores(
        result,
        {
            "dice_a": NAN,
            "iou_a": NAN,
            "recall_a": NAN,
            "hd95_a": NAN,
            "dice": NAN,  # no foreground class has a defined Dice
            "precision_a": 0.0,
            "specificity_a": 61 / 64,
            "accuracy_a": 61 / 64,
            "precision_b": NAN,
            "specificity_b": 1.0,
        },
    )


def test_metrics_missing_class_is_left_out_of_its_mean_and_of_the_foreground_mean():
    with_b, without_b = square(), square()
    without_b[7, 6:8] = 0  # second image: class b absent from ground truth and prediction
    pred_with_b = with_b.clone()
    pred_with_b[7, 7] = 0  # class b half found in the first image: Dice 2*1/(2*1+1) = 2/3
    metric = SegmentationMetrics(NAMES)
    metric.update(pred_with_b[None], with_b[None])
    metric.update(without_b[None], without_b[None])
    result = {k: v.item() for k, v in metric.compute().items()}
    assert_scores(result, {"dice_a": 1.0, "dice_b": 2 / 3, "dice": (1.0 + 2 / 3) / 2, "recall_b": 0.5})
    alone = scores(without_b.clone(), without_b)
    assert_scores(alone, {"dice_b": NAN, "dice": 1.0, "iou": 1.0, "hd95": 0.0})


def random_masks(
    seed: int, batch: int = 6, classes: int = 4, size: int = 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blobby random label maps where some images lack a class in the ground truth or prediction."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (2, batch, 1, size // 4, size // 4), generator=g).float()
    pred, target = (
        torch.nn.functional.interpolate(coarse.flatten(0, 1), size=size).long().reshape(2, batch, size, size)
    )
    target[0][target[0] == classes - 1] = 0  # image 0: last class absent from the ground truth
    pred[1][pred[1] == 1] = 0  # image 1: class 1 absent from the prediction
    pred[2][pred[2] == 2] = 0
    target[2][target[2] == 2] = 0  # image 2: class 2 absent from both
    return pred, target


def onehot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).movedim(-1, 1).float()


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_monai_per_image_and_class(seed):
    pred, target = random_masks(seed)
    c = 4
    ours = scores_from_confusion(confusion_per_image(pred, target, c))
    p, y = onehot(pred, c), onehot(target, c)
    confusion = get_confusion_matrix(p, y, include_background=True)
    monai = {
        "dice": compute_dice(p, y, include_background=True, ignore_empty=True),
        "iou": compute_iou(p, y, include_background=True, ignore_empty=True),
        "precision": compute_confusion_matrix_metric("precision", confusion),
        "recall": compute_confusion_matrix_metric("sensitivity", confusion),
        "specificity": compute_confusion_matrix_metric("specificity", confusion),
        "accuracy": compute_confusion_matrix_metric("accuracy", confusion),
    }
    for name, expected in monai.items():
        torch.testing.assert_close(ours[name].float(), expected.float(), equal_nan=True, msg=name)
    assert ours["dice"].isnan().any() and ours["precision"].isnan().any()  # the empty cases were exercised

    hd = hd95_per_image(pred, target, c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = compute_hausdorff_distance(p, y, include_background=True, percentile=95).double()
    both = p.flatten(2).any(-1) & y.flatten(2).any(-1)
    torch.testing.assert_close(hd[both], expected[both])
    only_gt = ~p.flatten(2).any(-1) & y.flatten(2).any(-1)
    assert only_gt.any() and torch.all(hd[only_gt] == math.hypot(24, 24))
    assert torch.all(hd[~y.flatten(2).any(-1)].isnan())


def test_metrics_foreground_mean_matches_monai_dice_metric():
    pred, target = random_masks(3)
    metric = SegmentationMetrics(("background", "a", "b", "c"), hd95=False)
    reference = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    for half in (slice(0, 3), slice(3, 6)):  # two batches, accumulated
        metric.update(pred[half], target[half])
        reference(onehot(pred[half], 4), onehot(target[half], 4))
    per_class = reference.aggregate()
    result = metric.compute()
    for i, name in enumerate(("a", "b", "c")):
        assert result[f"dice_{name}"].item() == pytest.approx(per_class[i].item(), abs=1e-6)
    assert result["dice"].item() == pytest.approx(per_class.nanmean().item(), abs=1e-6)


def test_metrics_hd95_of_two_single_pixels_is_their_distance():
    pred = torch.zeros(1, 16, 16, dtype=torch.long)
    target = torch.zeros_like(pred)
    pred[0, 4, 3], target[0, 4, 8] = 1, 1  # 5 pixels apart on a row
    assert hd95_per_image(pred, target, 2)[0, 1].item() == pytest.approx(5.0)


def test_metrics_batch_mean_weights_by_size_and_counts_a_repeated_batch_once():
    mean = BatchMeanOnce()
    mean.update(torch.tensor(1.0), 3, torch.tensor([0, 1, 2]))
    mean.update(torch.tensor(4.0), 1, torch.tensor([3]))
    assert mean.compute().item() == pytest.approx((3 * 1.0 + 4.0) / 4)
    mean.update(torch.tensor(1.0), 3, torch.tensor([2, 0, 1]))  # DDP padding: the first batch again
    assert mean.compute().item() == pytest.approx(7 / 4)
    without_ids = BatchMeanOnce()
    for value in (1.0, 1.0, 4.0):
        without_ids.update(torch.tensor(value), 2)
    assert without_ids.compute().item() == pytest.approx(2.0)
    assert math.isnan(BatchMeanOnce().compute().item())
