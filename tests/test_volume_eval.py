"""Volumes end to end: per-case 3D scores in mm equal an independent computation on the masks
`medseg infer` writes, and a 3D network's inference equals what validation scored, voxel for voxel."""

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
