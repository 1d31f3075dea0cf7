"""SegmentationMetrics against hand-computed cases and against MONAI's metric functions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (
    DiceMetric,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
    get_confusion_matrix,
)
from scipy import ndimage

from pipeline import surface_distances as metrics_module
from pipeline.metrics import BatchMeanOnce, SegmentationMetrics, confusion_per_image, scores_from_confusion
from pipeline.surface_distances import hd95_per_image, surface_dice_per_image, surface_scores_per_image

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
    both[:, 0] = False  # the background is not scored
    assert hd[:, 0].isnan().all()
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


SPACING = (2.5, 0.75, 0.9)  # mm per axis, anisotropic
TOLERANCE = 2.0  # mm; no voxel-to-voxel distance on this grid equals it, so float32 and float64 agree


def blob_volumes(seed: int, shape: tuple[int, int, int] = (96, 80, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, *shape) prediction and ground truth with 6 classes: 1 large blobs over half the volume
    (touching every face), 2 small blobs and a corner cube, 3 only in the prediction, 4 only in the
    ground truth, 5 in neither. The prediction thresholds the ground truth's smooth fields plus noise.
    """
    rng = np.random.default_rng(seed)
    fields = ndimage.gaussian_filter(rng.standard_normal((2, 2, *shape)), sigma=(0, 0, 5, 5, 3))
    noise = ndimage.gaussian_filter(rng.standard_normal((2, 2, *shape)), sigma=(0, 0, 2, 2, 1))

    def labels(f: np.ndarray) -> np.ndarray:
        out = np.zeros((2, *shape), dtype=np.int64)
        out[f[:, 0] > np.median(f[:, 0])] = 1
        out[f[:, 1] > np.quantile(f[:, 1], 0.98)] = 2
        return out

    target, pred = labels(fields), labels(fields + 0.3 * fields.std() / noise.std() * noise)
    target[:, :3, :4, -3:] = 2  # a small object in a corner: its box is clipped on three faces
    pred[:, :4, 1:4, -2:] = 2
    pred[:, 10:14, -10:, :5] = 3
    target[:, 50:53, 5:9, 30:33] = 4
    return torch.from_numpy(pred), torch.from_numpy(target)


def full_volume_scores(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(HD95, surface Dice) of two non-empty (*spatial) binary masks, without any crop: edges by
    erosion of the whole volume and scipy's Euclidean distance transform over it, in float64."""
    edges_pred, edges_gt = (m & ~ndimage.binary_erosion(m) for m in (pred, target))
    to_gt = ndimage.distance_transform_edt(~edges_gt, sampling=SPACING)[edges_pred]
    to_pred = ndimage.distance_transform_edt(~edges_pred, sampling=SPACING)[edges_gt]
    hd95 = max(np.quantile(to_gt, 0.95), np.quantile(to_pred, 0.95))
    within = (to_gt <= TOLERANCE).sum() + (to_pred <= TOLERANCE).sum()
    return float(hd95), float(within / (len(to_gt) + len(to_pred)))


def monai_scores(pred: torch.Tensor, target: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C - 1) HD95 and surface Dice of the foreground classes from MONAI's functions on the whole
    one-hot volumes (the old path)."""
    p, y = onehot(pred, classes), onehot(target, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns for every empty mask
        hd = compute_hausdorff_distance(p, y, percentile=95, spacing=list(SPACING))
        nsd = compute_surface_dice(p, y, [TOLERANCE] * (classes - 1), spacing=list(SPACING))
    return hd.double(), nsd.double()


@pytest.mark.parametrize("seed", [0, 1])
def test_surface_scores_cropped_equal_the_full_volume_computation(seed):
    pred, target = blob_volumes(seed)
    classes = 6
    for labels in (pred, target):  # class 1 reaches every face of the volume
        for axis in (1, 2, 3):
            mask = labels == 1
            assert mask.select(axis, 0).any() and mask.select(axis, -1).any()
    scores = surface_scores_per_image(pred, target, classes, list(SPACING), TOLERANCE)
    hd, nsd = scores["hd95"], scores["surface_dice"]
    monai_hd, monai_nsd = monai_scores(pred, target, classes)
    diagonal = math.hypot(*(n * s for n, s in zip(pred.shape[1:], SPACING, strict=True)))
    for i, c in np.ndindex(2, classes):
        in_pred, in_gt = bool((pred[i] == c).any()), bool((target[i] == c).any())
        if c == 0 or not in_gt:  # background, 5, and 3 (only predicted): undefined
            assert hd[i, c].isnan() and nsd[i, c].isnan(), (i, c)
        elif not in_pred:  # 4: missed
            assert hd[i, c].item() == diagonal and nsd[i, c].item() == 0.0, (i, c)
        else:
            assert hd[i, c].item() == pytest.approx(monai_hd[i, c - 1].item(), abs=1e-6), (i, c)
            assert nsd[i, c].item() == pytest.approx(monai_nsd[i, c - 1].item(), abs=1e-6), (i, c)
            full_hd, full_nsd = full_volume_scores((pred[i] == c).numpy(), (target[i] == c).numpy())
            assert hd[i, c].item() == pytest.approx(full_hd, rel=1e-6), (i, c)  # float32 distances
            assert nsd[i, c].item() == pytest.approx(full_nsd, abs=1e-12), (i, c)
            assert hd[i, c] > 0 and 0 < nsd[i, c] < 1, (i, c)  # non-trivial distances
    torch.testing.assert_close(hd95_per_image(pred, target, classes, list(SPACING)), hd, equal_nan=True)
    torch.testing.assert_close(
        surface_dice_per_image(pred, target, classes, TOLERANCE, list(SPACING)), nsd, equal_nan=True
    )


def test_surface_scores_crop_a_large_volume_to_each_object(monkeypatch):
    shape = (256, 256, 64)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    target = np.zeros(shape, dtype=np.int64)
    target[((z - 120) / 80) ** 2 + ((y - 130) / 70) ** 2 + ((x - 30) / 25) ** 2 <= 1] = 1  # organ
    target[((z - 60) / 4) ** 2 + ((y - 200) / 3) ** 2 + ((x - 50) / 3) ** 2 <= 1] = 2  # lesion
    pred = np.roll(target, 1, axis=0)
    pred[ndimage.binary_dilation(pred == 2, iterations=1)] = 2  # lesion over-segmented
    organ = ndimage.binary_erosion(pred == 1, iterations=2)  # organ under-segmented
    pred[(pred == 1) & ~organ] = 0
    pred, target = torch.from_numpy(pred)[None], torch.from_numpy(target)[None]
    boxes = []

    def spy(seg_pred, seg_gt, crop):
        boxes.append(seg_pred.shape)
        return get_mask_edges(seg_pred, seg_gt, crop=crop)

    get_mask_edges = metrics_module.get_mask_edges
    monkeypatch.setattr(metrics_module, "get_mask_edges", spy)
    scores = surface_scores_per_image(pred, target, 3, list(SPACING), TOLERANCE)
    organ_box, lesion_box = boxes
    assert math.prod(organ_box) < math.prod(shape) / 2
    lesion = ((pred == 2) | (target == 2))[0].nonzero()
    assert lesion_box == tuple((lesion.amax(0) - lesion.amin(0) + 3).tolist())  # one voxel each side
    monai_hd, monai_nsd = monai_scores(pred, target, 3)
    torch.testing.assert_close(scores["hd95"][:, 1:], monai_hd, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores["surface_dice"][:, 1:], monai_nsd, rtol=0, atol=1e-6)
    assert (scores["hd95"][0, 1:] > 0).all() and (scores["surface_dice"][0, 1:] < 1).all()


def test_surface_scores_of_a_speckled_prediction_come_from_a_distance_transform(monkeypatch):
    # an untrained network's speckle: more edge voxels than EDT_SHARE of the box, where a k-d tree
    # query per edge voxel is slower than one distance transform; the scores stay MONAI's
    from pipeline.surface_distances import EDT_SHARE

    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:48, :64, :64]
    target = np.zeros((48, 64, 64), dtype=np.int64)
    target[((z - 24) / 9) ** 2 + ((y - 32) / 14) ** 2 + ((x - 32) / 14) ** 2 <= 1] = 1
    pred = target.copy()
    pred[rng.random(pred.shape) < 0.05] = 1
    pred[rng.random(pred.shape) < 0.02] = 0
    edges, _ = metrics_module.get_mask_edges(pred == 1, target == 1, crop=False)
    assert edges.sum() > edges.size * EDT_SHARE  # the branch this test is about
    trees = []
    surface_distance = metrics_module.get_surface_distance
    monkeypatch.setattr(
        metrics_module, "get_surface_distance", lambda *a: trees.append(1) or surface_distance(*a)
    )
    pred, target = torch.from_numpy(pred)[None], torch.from_numpy(target)[None]
    scores = surface_scores_per_image(pred, target, 2, list(SPACING), TOLERANCE)
    assert len(trees) == 1  # the clean ground truth's few edges still query a k-d tree
    monai_hd, monai_nsd = monai_scores(pred, target, 2)
    torch.testing.assert_close(scores["hd95"][:, 1:], monai_hd, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores["surface_dice"][:, 1:], monai_nsd, rtol=0, atol=1e-6)
    assert scores["hd95"][0, 1] > 1 and scores["surface_dice"][0, 1] < 0.9


def test_metrics_hd95_percentile_takes_more_distances_than_torch_quantile_allows():
    # a salt-and-pepper prediction on a real-size CT has tens of millions of surface voxels: torch
    # before 2.x refuses over 2**24 values in quantile; percentile_95 must equal its interpolation
    from pipeline.surface_distances import QUANTILE_MAX, percentile_95

    distances = torch.rand(QUANTILE_MAX + 1000, generator=torch.Generator().manual_seed(0)) * 50
    assert percentile_95(distances[:1000]) == torch.quantile(distances[:1000], 0.95).item()  # MONAI's
    expected = np.percentile(distances.double().numpy(), 95)
    assert percentile_95(distances) == pytest.approx(expected, abs=1e-5)
