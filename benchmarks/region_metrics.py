"""Scoring a trained checkpoint on held-out images the way DRIVE and ISBI 2012 EM are scored.

Binary segmentation (background, one foreground class). Every image may carry a region mask
(DRIVE's field of view): only pixels inside it count. Scores come from confusion counts
(``pipeline.metrics.confusion_per_image`` / ``scores_from_confusion``):

- per-image mean Dice (= F1) of the foreground, and the global Dice over all pixels of all images;
- global accuracy, sensitivity (recall), specificity and precision over all pixels;
- pixel error = 1 - global accuracy (the ISBI 2012 pixel error);
- AUC of the foreground probability over all pixels (ROC, exact).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from pipeline.data.datamodule import SegmentationDataModule
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.reading.formats import read_mask_2d
from pipeline.errors import DataError
from pipeline.metrics import confusion_per_image, scores_from_confusion
from pipeline.training.checkpoint import load_model
from pipeline.training.module import SegmentationModule


@dataclass
class Prediction:
    """One scored image: ``prob`` (H, W) foreground probability, ``target`` (H, W) 0/1 labels,
    ``region`` (H, W) bool pixels that count."""

    case_id: str
    prob: np.ndarray
    target: np.ndarray
    region: np.ndarray


def region_confusion(pred: np.ndarray, target: np.ndarray, region: np.ndarray) -> Tensor:
    """(H, W) 0/1 prediction and target, (H, W) bool region -> (2, 2) counts inside the region."""
    inside = torch.from_numpy(np.ascontiguousarray(region, dtype=bool))
    p = torch.from_numpy(np.asarray(pred, np.int64))[inside]
    t = torch.from_numpy(np.asarray(target, np.int64))[inside]
    return confusion_per_image(p[None], t[None], 2)[0]


def score(predictions: Iterable[Prediction], threshold: float = 0.5) -> tuple[dict, list[dict]]:
    """Foreground scores over all images and per image, counting only pixels inside each region.

    Returns:
        ``(summary, per_image)``: summary keys ``dice_mean`` (mean of per-image Dice),
        ``dice_global``, ``accuracy``, ``sensitivity``, ``specificity``, ``precision``,
        ``pixel_error``, ``auc``, ``images``, ``pixels``; per_image rows with ``case_id``,
        ``dice``, ``accuracy``, ``sensitivity``, ``specificity``.
    """
    ids, confusions, probs, targets = [], [], [], []
    for p in predictions:
        region = p.region.astype(bool)
        ids.append(p.case_id)
        confusions.append(region_confusion(p.prob > threshold, p.target, region))
        probs.append(torch.from_numpy(p.prob[region].astype(np.float32)))
        targets.append(torch.from_numpy(p.target[region].astype(np.int64)))
    if not ids:
        raise ValueError("no predictions to score")
    confusion = torch.stack(confusions)
    per = {k: v[:, 1] for k, v in scores_from_confusion(confusion).items()}
    total = {k: v[0, 1].item() for k, v in scores_from_confusion(confusion.sum(0, keepdim=True)).items()}
    target = torch.cat(targets)
    has_both = 0 < int(target.sum()) < target.numel()
    summary = {
        "dice_mean": per["dice"].nanmean().item(),
        "dice_global": total["dice"],
        "accuracy": total["accuracy"],
        "sensitivity": total["recall"],
        "specificity": total["specificity"],
        "precision": total["precision"],
        "pixel_error": 1.0 - total["accuracy"],
        "auc": binary_auroc(torch.cat(probs), target).item() if has_both else float("nan"),
        "images": len(ids),
        "pixels": int(confusion.sum()),
    }
    rows = [
        {
            "case_id": cid,
            "dice": per["dice"][i].item(),
            "accuracy": per["accuracy"][i].item(),
            "sensitivity": per["recall"][i].item(),
            "specificity": per["specificity"][i].item(),
        }
        for i, cid in enumerate(ids)
    ]
    return summary, rows


def load_module(checkpoint: str | Path) -> tuple[SegmentationModule, Preprocessing]:
    """The trained module (eval mode, CPU) and its preprocessing: ``medseg infer``'s loader."""
    return load_model(checkpoint)


def held_out_dataset(data: Path, split_file: Path, preprocessing: Preprocessing):
    """The ``test`` images of ``split_file``, preprocessed exactly as the checkpoint was trained."""
    dm = SegmentationDataModule(
        root=str(data),
        class_names=list(preprocessing.class_names),
        label_map=dict(preprocessing.label_map) or None,
        split_file=str(split_file),
        num_workers=0,
        normalization=preprocessing.configured,
    )
    dm.setup("test")
    if "test" not in dm.datasets:
        raise DataError(split_file, "the split has no test images")
    return dm.datasets["test"]


def read_region(region_dir: Path | None, case_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The case's region mask (nonzero = scored) from ``region_dir/<case_id>.png``; all pixels if None."""
    if region_dir is None:
        return np.ones(shape, bool)
    path = region_dir / f"{case_id}.png"
    region = read_mask_2d(path) > 0
    if region.shape != shape:
        raise DataError(path, f"region mask size {region.shape} differs from the image size {shape}")
    return region


def predictor(module: SegmentationModule) -> Callable[[dict], np.ndarray]:
    """Sample -> (H, W) float32 foreground probability from the module's own (sliding-window)
    inference, run on the module's device: the image goes there, the probability comes back."""
    device = next(module.parameters()).device

    @torch.no_grad()
    def predict(sample: dict) -> np.ndarray:
        logits = module.predict_logits(sample["image"][None].to(device))
        return logits.float().softmax(1)[0, 1].cpu().numpy()

    return predict


def predict_all(
    dataset, predict: Callable[[dict], np.ndarray], region_dir: Path | None
) -> Iterable[Prediction]:
    """Yield a ``Prediction`` for every sample of ``dataset``."""
    for i in range(len(dataset)):
        sample = dataset[i]
        target = sample["mask"].numpy()
        region = read_region(region_dir, sample["case_id"], target.shape)
        yield Prediction(sample["case_id"], predict(sample), target, region)
