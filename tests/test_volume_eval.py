"""Volumes end to end: per-case 3D scores in mm equal an independent computation on the masks
`medseg infer` writes, a 3D network's inference equals what validation scored, voxel for voxel, and
val/dice is the mean per-case 3D Dice that picks best.ckpt."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.cli import main
from pipeline.data.cache.slicing import to_slices
from pipeline.data.reading.formats import read_nifti
from tests.conftest import run_path, volume_fit_args
from tests.helpers.validation import scored_cases


def fit_volumes(data: Path, runs: Path, model: str, *extra: str) -> Path:
    """A seconds-long fit on volumes with the planned settings; returns the run directory."""
    extra = ("--run.name", "run", "--trainer.max_epochs", "2", "--data.iterations_per_epoch", "3", *extra)
    main(volume_fit_args(data, runs, model, "--model.net.init_args.features", "[4, 8, 16, 32]", *extra))
    return run_path(runs, "default", data, "run")


def hd95_mm(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """HD95 by its definition: boundary voxels (a voxel minus its 6-neighbour erosion), each
    boundary's distances to the other (Euclidean distance transform in mm), the larger of the two
    95th percentiles."""
    edges = [mask ^ ndimage.binary_erosion(mask) for mask in (pred, truth)]
    forward = ndimage.distance_transform_edt(~edges[1], sampling=spacing)[edges[0]]
    backward = ndimage.distance_transform_edt(~edges[0], sampling=spacing)[edges[1]]
    return max(np.percentile(forward, 95), np.percentile(backward, 95))


def test_volume_eval_case_scores_in_mm_equal_scipy_on_the_written_masks(mixed_volume_dir, tmp_path):
    run = fit_volumes(mixed_volume_dir, tmp_path / "runs", "unet")
    checkpoint = run / "checkpoints" / "best.ckpt"
    main(["test", "-c", str(run / "config.yaml"), "--ckpt_path", str(checkpoint), "--data.test_split", "val"])
    with open(run / "test_cases.csv") as f:
        rows = {row["case_id"]: row for row in csv.DictReader(f)}
    images = mixed_volume_dir / "imagesTr"
    main(["infer", "--checkpoint", str(checkpoint), "--input", *(str(images / f"{c}.nii.gz") for c in rows),
          "--output", str(tmp_path / "out")])  # fmt: skip
    spacings, distances = set(), 0
    for case, row in rows.items():
        truth_file = nib.load(mixed_volume_dir / "labelsTr" / f"{case}.nii.gz")
        pred_file = nib.load(tmp_path / "out" / f"{case}.nii.gz")
        assert pred_file.shape == truth_file.shape and np.allclose(
            pred_file.affine, truth_file.affine, atol=1e-6
        )
        pred, truth = np.asanyarray(pred_file.dataobj), np.asanyarray(truth_file.dataobj)
        spacing = np.linalg.norm(truth_file.affine[:3, :3], axis=0)
        spacings.add(tuple(spacing.round(3)))
        for k, name in ((1, "organ"), (2, "lesion")):
            p, t = pred == k, truth == k
            dice = 2 * (p & t).sum() / (p.sum() + t.sum())
            assert float(row[f"dice_{name}"]) == pytest.approx(dice, rel=1e-5, abs=1e-6), (case, name)
            if p.any():
                expected = hd95_mm(p, t, spacing)
                assert float(row[f"hd95_{name}"]) == pytest.approx(expected, rel=1e-5), (case, name)
                distances += 1
    assert distances >= 2 and len(spacings) == len(rows)  # every case at its own spacing
    assert max(s[2] / s[0] for s in spacings) > 2  # anisotropic


def test_volume_eval_3d_network_inference_equals_validation(mixed_volume_dir, tmp_path, monkeypatch):
    run = fit_volumes(mixed_volume_dir, tmp_path / "runs", "unet3d")
    checkpoint = run / "checkpoints" / "last.ckpt"
    stored = torch.load(checkpoint, weights_only=True)["medseg"]
    assert stored["preprocessing"]["spatial_dims"] == 3 and len(stored["preprocessing"]["patch_size"]) == 3
    scored = scored_cases(run, checkpoint, monkeypatch)
    assert sorted(scored) == json.loads((run / "split.json").read_text())["val"]
    out = tmp_path / "out"
    main(["infer", "--checkpoint", str(checkpoint), "--input",
          *(str(mixed_volume_dir / "imagesTr" / f"{c}.nii.gz") for c in scored), "--output", str(out)])  # fmt: skip
    for case, expected in scored.items():
        written = nib.load(out / f"{case}.nii.gz")
        source = nib.load(mixed_volume_dir / "imagesTr" / f"{case}.nii.gz")  # oblique, LPS-like, anisotropic
        assert written.shape == source.shape and np.allclose(written.affine, source.affine, atol=1e-6)
        labels = to_slices(
            read_nifti([out / f"{case}.nii.gz"]).array[..., 0], stored["preprocessing"]["slice_axis"]
        )
        assert np.array_equal(labels, expected), case
        # not one label everywhere (all background would match anything as broken): two labels of
        # 1% of the voxels or more (seed 0: organ about 85%, lesion 12-18%)
        shares = np.bincount(expected.ravel(), minlength=3) / expected.size
        assert (shares >= 0.01).sum() >= 2 and shares[1:].sum() >= 0.01, (case, shares)


def case_dice(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> list[float]:
    """Per foreground class, the 3D Dice of one case; NaN where the truth lacks the class."""
    return [
        (2 * ((pred == k) & (truth == k)).sum() / ((pred == k).sum() + (truth == k).sum())).item()
        if (truth == k).any()
        else float("nan")
        for k in range(1, num_classes)
    ]


def test_volume_eval_val_dice_is_the_mean_case_dice_and_best_ckpt_follows_it(
    volume_dir, tmp_path, monkeypatch
):
    # Validation predictions scripted from the truth: epoch 0 misses the organ in its smallest slice
    # (a slice Dice of 0, little volume), epoch 1 misses every fifth organ voxel (each slice 0.89).
    # Per case in 3D epoch 0 scores higher, per slice epoch 1: best.ckpt must be epoch 0.
    import pipeline.training.module as module_code
    from pipeline.training.module import SegmentationModule

    seen: dict = {}
    scored: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {0: [], 1: []}
    validation_step = SegmentationModule.validation_step

    def remember(self, batch, batch_idx):
        seen.update(batch=batch, epoch=self.current_epoch, classes=len(self.class_names))
        return validation_step(self, batch, batch_idx)

    def scripted(predict, image, spatial_dims, chunk, progress=None):
        batch, epoch = seen["batch"], seen["epoch"]
        truth = batch["target"].long()
        assert torch.equal(batch["mask"].long(), truth)  # the training grid is the case's own grid
        organ, pred = truth == 1, truth.clone()
        if epoch == 0:
            area = organ.flatten(1).sum(1)
            smallest = int(torch.where(area > 0, area, area.max() + 1).argmin())
            pred[smallest][organ[smallest]] = 0
        else:
            pred[tuple(organ.nonzero()[::5].T)] = 0
        scored[epoch].append((pred, truth))
        return torch.nn.functional.one_hot(pred, seen["classes"]).movedim(-1, 0).float() * 20

    monkeypatch.setattr(SegmentationModule, "validation_step", remember)
    monkeypatch.setattr(module_code, "volume_logits", scripted)
    run = fit_volumes(volume_dir, tmp_path / "runs", "unet", "--data.cache_dir", str(tmp_path / "cache"))
    monkeypatch.undo()

    def mean_case_dice(cases):
        per_case = np.array([case_dice(pred, truth, seen["classes"]) for pred, truth in cases])
        return float(np.nanmean(np.nanmean(per_case, axis=0)))

    def mean_slice_dice(cases):
        per_slice = [
            case_dice(p, t, seen["classes"])
            for pred, truth in cases
            for p, t in zip(pred, truth, strict=True)
        ]
        return float(np.nanmean(np.nanmean(np.array(per_slice), axis=0)))

    with open(run / "metrics.csv") as f:
        logged = {int(r["epoch"]): r for r in csv.DictReader(f) if r.get("val/dice")}
    assert sorted(logged) == [0, 1] and all(len(scored[e]) == len(scored[0]) > 0 for e in (0, 1))
    expected = {epoch: mean_case_dice(scored[epoch]) for epoch in (0, 1)}
    for epoch in (0, 1):
        assert float(logged[epoch]["val/dice"]) == pytest.approx(expected[epoch], rel=1e-5), epoch
    # the scores disagree on the best epoch, the module's per-slice one too
    assert expected[0] > expected[1] + 0.02
    assert mean_slice_dice(scored[1]) > mean_slice_dice(scored[0]) + 0.05
    assert float(logged[1]["val/dice_slice"]) > float(logged[0]["val/dice_slice"]) + 0.05
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert best["epoch"] == 0
    (state,) = [v for v in best["callbacks"].values() if str(v.get("best_model_path")).endswith("best.ckpt")]
    assert state["monitor"] == "val/dice" and float(state["best_model_score"]) == pytest.approx(
        expected[0], rel=1e-5
    )
