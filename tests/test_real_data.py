"""The real-data benchmark (benchmarks/real_data.py): scoring inside a region, the quick run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from benchmarks.real_data import drive_split, isbi_split, run
from benchmarks.region_metrics import Prediction, held_out_dataset, load_module, predict_all, predictor, score

KEYS = ("dice_mean", "dice_global", "accuracy", "sensitivity", "specificity", "precision", "auc")


def disc(shape: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < radius**2


def test_region_score_ignores_pixels_outside_the_region():
    target = (np.random.default_rng(0).random((20, 24)) < 0.3).astype(np.int64)
    region = disc(target.shape, 8)
    prob = np.where(region, target, 1 - target).astype(np.float32)  # right inside, wrong outside
    inside, rows = score([Prediction("a", prob, target, region)])
    assert all(inside[key] == pytest.approx(1.0) for key in KEYS), inside
    assert inside["pixel_error"] == 0.0 and inside["pixels"] == region.sum() and rows[0]["dice"] == 1.0
    whole, _ = score([Prediction("a", prob, target, np.ones_like(region))])
    assert whole["accuracy"] == pytest.approx(region.mean())


def test_region_score_counts_per_image_mean_and_global_pixels():
    # a: region is the first row: target 1 1 1 0, prediction 1 1 0 0 -> TP 2, FN 1, TN 1: Dice 0.8
    a_target = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    a_prob = np.array([[0.9, 0.8, 0.2, 0.1], [0.0, 0.0, 0.0, 0.0]])
    a_region = np.array([[1, 1, 1, 1], [0, 0, 0, 0]])
    # b: all 8 pixels: target 1 0 0 0 0 0 0 0, prediction 1 1 1 0 ... -> TP 1, FP 2, TN 5: Dice 0.5
    b_target = np.array([[1, 0, 0, 0], [0, 0, 0, 0]])
    b_prob = np.array([[0.9, 0.7, 0.6, 0.1], [0.1, 0.1, 0.1, 0.1]])
    summary, rows = score(
        [
            Prediction("a", a_prob, a_target, a_region),
            Prediction("b", b_prob, b_target, np.ones((2, 4))),
        ]
    )
    assert [row["dice"] for row in rows] == pytest.approx([0.8, 0.5])
    assert summary["dice_mean"] == pytest.approx(0.65)
    assert summary["dice_global"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # TP 3, FP 2, FN 1, TN 6
    assert summary["accuracy"] == pytest.approx(9 / 12) and summary["pixel_error"] == pytest.approx(3 / 12)
    assert summary["sensitivity"] == pytest.approx(3 / 4) and summary["specificity"] == pytest.approx(6 / 8)
    assert summary["pixels"] == 12 and summary["images"] == 2


class OffHost(nn.Module):
    """A module whose weights live off the host (the meta device stands in for a GPU) and whose
    logits come back in bf16, as under autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros((), device="meta"))

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        assert x.device == self.weight.device, "the image was not moved to the module's device"
        return torch.zeros(1, 2, *x.shape[-2:], dtype=torch.bfloat16)


def test_region_predictor_runs_on_the_module_device_and_returns_float32_on_the_host():
    prob = predictor(OffHost())({"image": torch.rand(1, 6, 8)})
    assert prob.dtype == np.float32 and prob.shape == (6, 8)
    assert np.allclose(prob, 0.5)


def test_real_data_splits_follow_the_official_and_seeded_protocols():
    drive = drive_split([f"{i:02d}" for i in range(1, 41)], seed=0)
    assert drive["test"] == [f"{i:02d}" for i in range(1, 21)]
    assert len(drive["val"]) == 4 and sorted(drive["train"] + drive["val"]) == [f"{i}" for i in range(21, 41)]
    ids = [f"{i:02d}" for i in range(30)]
    em = isbi_split(ids, seed=0)
    assert (len(em["train"]), len(em["val"]), len(em["test"])) == (21, 3, 6)
    assert sorted(em["train"] + em["val"] + em["test"]) == ids
    assert isbi_split(ids, seed=0) == em and isbi_split(ids, seed=1)["test"] != em["test"]


def make_fundus_set(root: Path, ids: list[str], shape: tuple[int, int] = (150, 144)) -> Path:
    """RGB 'fundus' images: a bright disc (the FOV) with dark vessel lines, the mask 0/1, fov/ 0/1."""
    rng = np.random.default_rng(0)
    fov = disc(shape, min(shape) / 2 - 4)
    for name in ("images", "masks", "fov"):
        (root / name).mkdir(parents=True)
    for cid in ids:
        vessels = np.zeros(shape, bool)
        for _ in range(3):  # 3 px wide horizontal and vertical "vessels"
            row, col = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
            vessels[row : row + 3] = vessels[:, col : col + 3] = True
        vessels &= fov
        image = np.zeros((*shape, 3), np.uint8)
        image[fov] = (200, 90, 40)
        image[vessels] = (90, 30, 10)
        noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / "images" / f"{cid}.png")
        Image.fromarray(vessels.astype(np.uint8)).save(root / "masks" / f"{cid}.png")
        Image.fromarray(fov.astype(np.uint8)).save(root / "fov" / f"{cid}.png")
    return root


@pytest.mark.slow
def test_real_data_quick_run_writes_scores_inside_the_fov(tmp_path):
    root = make_fundus_set(tmp_path / "drive", ["01", "02", "21", "22", "23", "24", "25"])
    out = tmp_path / "out"
    report = run(["drive", "--quick", "--data", str(root), "--out", str(out), "--", "--run.wandb", "false"])
    run_dir = out / "drive" / "drive" / "unet-f8-p128-e2"  # experiment, data folder, run
    written = json.loads((run_dir / "benchmark.json").read_text())
    assert written["split"] == {"train": 4, "val": 1, "test": 2} and written["scored_region"] == "fov"
    assert all(0.0 <= written["test"][key] <= 1.0 for key in KEYS if key != "auc")
    assert written["test"]["pixels"] == 2 * np.count_nonzero(disc((150, 144), 144 / 2 - 4))
    assert written == report
    per_image = list(csv.DictReader((run_dir / "per_image.csv").open()))
    assert len(per_image) == 2
    # the scores agree with each other, as any network's must (a range check fails only on NaN):
    # the mean Dice is the images', the pooled Dice the harmonic mean of pooled precision and recall
    test = written["test"]
    assert test["dice_mean"] == pytest.approx(np.mean([float(row["dice"]) for row in per_image]), rel=1e-6)
    precision, recall = test["precision"], test["sensitivity"]
    assert test["dice_global"] == pytest.approx(2 * precision * recall / (precision + recall), rel=1e-6)
    assert {p.name for p in (run_dir / "predictions").iterdir()} == {"01.png", "02.png"}

    # the benchmark's own data path: a prediction wrong only outside the FOV scores perfectly
    _, preprocessing = load_module(run_dir / "checkpoints" / "best.ckpt")
    dataset = held_out_dataset(root, out / "drive" / "split.json", preprocessing)
    fov = disc((150, 144), 144 / 2 - 4)

    def right_inside_fov(sample: dict) -> np.ndarray:
        mask = sample["mask"].numpy()
        return np.where(fov, mask, 1 - mask).astype(np.float32)

    summary, _ = score(predict_all(dataset, right_inside_fov, root / "fov"))
    assert all(summary[key] == pytest.approx(1.0) for key in KEYS), summary
