"""``medseg infer`` on generated data with a model trained for a few steps (session fixture)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from pipeline.cli import main
from pipeline.data.cache.slicing import to_slices
from pipeline.data.reading.formats import read_image_2d, read_mask_2d, read_nifti
from pipeline.data.synthesis.phantoms_3d import generate_volumes
from pipeline.inference.cases import find_inputs, safe_name
from pipeline.inference.writer import OutputLayout
from tests.conftest import REPO, fit_args, run_path
from tests.helpers.dicom import axial_series
from tests.helpers.validation import scored_by_validation, scored_cases
from tests.test_io import oblique_affine


@pytest.fixture(scope="session")
def trained_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with a tiny UNet trained for two steps on 48x48 patches of 64x64 phantoms,
    so whole images go through sliding-window inference."""
    runs = tmp_path_factory.mktemp("runs")
    extra = ["--run.experiment", "infer", "--run.name", "tiny", "--run.wandb", "false"]
    main(fit_args(phantom_dir, runs, *extra, "--data.patch_size", "[48, 48]", "--model.hd95", "false"))
    return run_path(runs, "infer", phantom_dir, "tiny")


@pytest.fixture(scope="session")
def checkpoint(trained_run: Path) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


def infer(checkpoint: Path, inputs: list[Path], output: Path, *flags: str) -> int:
    """Run ``medseg infer``; returns its exit code (0 when it returns normally)."""
    args = ["infer", "--checkpoint", str(checkpoint), "--input", *map(str, inputs), "--output", str(output)]
    try:
        main([*args, "--num-workers", "0", *flags])
    except SystemExit as stop:
        return int(stop.code)
    return 0


def table(output: Path) -> dict[str, dict]:
    return {row["case"]: row for row in csv.DictReader((output / "predictions.csv").open())}


def test_inference_nifti_keeps_oblique_geometry_and_slices_like_training(checkpoint, phantom_dir, tmp_path):
    # Every axial slice of the canonical volume is the same phantom, so each must be labelled
    # exactly as the 2D image is; the volume is stored oblique, anisotropic, in LPS-like order.
    phantom = read_image_2d(phantom_dir / "images" / "phantom_00.png").astype(np.float32)
    canonical = np.repeat(phantom[:, :, None], 3, axis=2)  # (X, Y, Z) in RAS+ order
    affine = oblique_affine()
    stored = canonical[::-1, ::-1].copy()  # the affine's first two axes point left and posterior
    nib.save(nib.Nifti1Image(stored, affine), tmp_path / "scan.nii.gz")
    flags = ("--save-probabilities", "--overlays")
    out = tmp_path / "out"
    assert (
        infer(checkpoint, [tmp_path / "scan.nii.gz", phantom_dir / "images" / "phantom_00.png"], out, *flags)
        == 0
    )

    mask = nib.load(out / "scan.nii.gz")
    assert np.allclose(mask.affine, affine, atol=1e-6) and mask.shape == stored.shape
    labels = np.asanyarray(mask.dataobj)
    assert labels.dtype == np.uint8 and labels.max() < 4
    expected = read_mask_2d(out / "phantom_00.png")
    for z in range(3):
        assert np.array_equal(labels[::-1, ::-1, z], expected), z

    row = table(out)["scan"]
    assert row["status"] == "ok" and row["shape"] == "64x64x3" and row["spacing_mm"] == "0.8x0.8x3"
    organ = int(row["voxels_organ"])
    assert organ == int((labels == 1).sum()) and float(row["volume_ml_organ"]) == pytest.approx(
        organ * 1.92e-3
    )
    probs = np.load(out / "probabilities" / "scan.npz")
    assert probs["probabilities"].shape == (64, 64, 3, 4) and list(probs["class_names"])[1] == "organ"
    p = probs["probabilities"].astype(np.float32)  # stored as float16: near-ties may round together
    assert np.allclose(p.sum(-1), 1.0, atol=1e-2)
    top2 = np.sort(p, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-2
    assert clear.mean() > 0.5 and np.array_equal(p.argmax(-1)[clear], labels[clear])
    assert read_image_2d(out / "overlays" / "scan.png").shape == (64, 64, 3)


def test_inference_dicom_series_gives_nifti_in_patient_geometry(checkpoint, tmp_path):
    axial_series(tmp_path / "series", [0.0, 5.0, 10.0])
    out = tmp_path / "out"
    assert infer(checkpoint, [tmp_path / "series"], out, "--batch-size", "2") == 0
    mask = nib.load(out / "series.nii.gz")
    ds = pydicom.dcmread(next((tmp_path / "series").iterdir()))
    row_dir, col_dir = (
        np.array(ds.ImageOrientationPatient[:3], float),
        np.array(ds.ImageOrientationPatient[3:], float),
    )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * float(ds.PixelSpacing[1])
    lps[:3, 1] = col_dir * float(ds.PixelSpacing[0])
    lps[:3, 2] = [0.0, 0.0, 5.0]  # slices 5 mm apart along +z
    lps[:3, 3] = [-158.135803, -179.035797, 0.0]
    assert np.allclose(mask.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-5)
    assert mask.shape == (ds.Columns, ds.Rows, 3) and np.asanyarray(mask.dataobj).max() < 4
    assert table(out)["series"]["spacing_mm"].endswith("x5")


def test_inference_skips_bad_files_names_them_and_exits_1(checkpoint, phantom_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((32, 40, 2)).astype(np.float32), np.eye(4)),
        inputs / "good.nii.gz",
    )
    raw = (inputs / "good.nii.gz").read_bytes()
    (inputs / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    (inputs / "notes.txt").write_text("not an image")
    shutil.copy(phantom_dir / "images" / "phantom_01.png", inputs / "phantom_01.png")
    out = tmp_path / "out"
    code = infer(checkpoint, [inputs], out, "--num-workers", "2", "--largest-component")
    assert code == 1
    printed = capsys.readouterr().out
    assert "2 ok, 2 failed" in printed
    assert f"{inputs / 'cut.nii.gz'}: cannot read as NIfTI" in printed
    assert f"{inputs / 'notes.txt'}: not a supported input" in printed
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", "phantom_01.png", "predictions.csv"]
    rows = table(out)
    assert [rows[c]["status"] for c in ("cut", "good", "notes", "phantom_01")] == [
        "failed",
        "ok",
        "failed",
        "ok",
    ]
    labels = read_mask_2d(out / "phantom_01.png")
    for cls in (1, 2, 3):  # largest component only: at most one 4-connected blob per class
        from scipy import ndimage

        assert ndimage.label(labels == cls)[1] <= 1


def test_inference_refuses_to_clobber_without_overwrite(checkpoint, phantom_dir, tmp_path, capsys):
    image = phantom_dir / "images" / "phantom_02.png"
    out = tmp_path / "out"
    assert infer(checkpoint, [image], out) == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*")}
    assert infer(checkpoint, [image], out, "--tta") == 1
    err = capsys.readouterr().err
    assert "2 output(s) exist already" in err and "phantom_02.png" in err and "--overwrite" in err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*")} == before
    assert infer(checkpoint, [image], out, "--tta", "--overwrite") == 0
    assert {p.name for p in out.iterdir()} == {"phantom_02.png", "predictions.csv"}  # no temporaries left


def test_inference_refuses_a_checkpoint_that_needs_unpickling_code(checkpoint, tmp_path, capsys):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    plain = torch.load(checkpoint, weights_only=True)
    torch.save({**plain, "extra": Payload()}, tmp_path / "evil.ckpt")
    code = infer(tmp_path / "evil.ckpt", [tmp_path], tmp_path / "out")
    err = capsys.readouterr().err
    assert (
        code == 1 and "refused to load: unpickling it would call posix.system" in err and "evil.ckpt" in err
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_inference_equals_what_validation_scores_2d(
    trained_run, checkpoint, phantom_dir, tmp_path, monkeypatch
):
    scored = scored_by_validation(trained_run, checkpoint, monkeypatch)
    val_ids = json.loads((trained_run / "split.json").read_text())["val"]
    assert sorted(cid for cid, _ in scored) == sorted(val_ids) and len(val_ids) >= 2

    out = tmp_path / "out"
    assert infer(checkpoint, [phantom_dir / "images" / f"{cid}.png" for cid in val_ids], out) == 0
    for (cid, _), expected in scored.items():
        assert np.array_equal(read_mask_2d(out / f"{cid}.png"), expected), cid


def test_inference_equals_what_validation_scores_on_volumes(tmp_path, monkeypatch):
    # Two-channel nnU-Net raw volumes (CT + MR: per-channel normalisation with data-set CT
    # statistics), stored oblique and LPS-like, each case with its own spacing and shape: both
    # paths resample to the planned spacing and score on the case's own grid.
    data = generate_volumes(tmp_path / "data", num_cases=5, modalities=("CT", "T2"), layout="nnunet", seed=3)
    extra = ["--run.experiment", "vol", "--run.name", "tiny", "--run.wandb", "false", "--model.hd95", "false",
             "--data.patch_size", "[24, 24]", "--data.normalization.mode", "auto",
             "--data.iterations_per_epoch", "2"]  # fmt: skip
    main(fit_args(data, tmp_path / "runs", *extra))
    run = run_path(tmp_path / "runs", "vol", data, "tiny")
    checkpoint = run / "checkpoints" / "last.ckpt"
    scored = scored_cases(run, checkpoint, monkeypatch)
    assert sorted(scored) == json.loads((run / "split.json").read_text())["val"]

    out = tmp_path / "out"
    inputs = [data / "imagesTr" / f"{cid}_{c:04d}.nii.gz" for cid in scored for c in (0, 1)]
    assert infer(checkpoint, inputs, out) == 0
    axis = torch.load(checkpoint, weights_only=True)["medseg"]["preprocessing"]["slice_axis"]
    for cid, expected in scored.items():
        labels = to_slices(read_nifti([out / f"{cid}.nii.gz"]).array[..., 0], axis)
        assert labels.shape == expected.shape and np.array_equal(labels, expected), cid


def test_inference_case_names_stay_inside_the_output_folder(tmp_path):
    for raw in ("../../etc/passwd", "..", ".hidden", "a/b\\c", "ok name (1)"):
        name = safe_name(raw)
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name
    (tmp_path / "..weird name.png").write_bytes(b"")
    (cases,) = find_inputs([tmp_path / "..weird name.png"])
    layout = OutputLayout(tmp_path / "out", probabilities=True, overlays=True)
    for path in layout.paths(cases):
        assert path.resolve().is_relative_to((tmp_path / "out").resolve())
    assert layout.mask(cases).name == "weird_name.png"


def test_inference_finds_inputs_by_content_and_groups_channel_files(tmp_path):
    (tmp_path / "in").mkdir()
    axial_series(tmp_path / "in" / "ct series", [0.0, 5.0])
    for path in (tmp_path / "in" / "ct series").iterdir():
        path.rename(path.with_suffix(""))  # DICOM files often have no suffix: found by their preamble
    for name in ("b_0000.nii.gz", "b_0001.nii.gz", "a.png", "notes.txt"):
        (tmp_path / "in" / "more" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "more" / name).write_bytes(b"")
    found = {
        c.name: (c.kind, [p.name for p in c.paths]) for c in find_inputs([tmp_path / "in"], in_channels=2)
    }
    assert found == {
        "a": ("image", ["a.png"]),
        "b": ("nifti", ["b_0000.nii.gz", "b_0001.nii.gz"]),
        "ct_series": ("dicom", ["ct series"]),
        "notes": ("unsupported", ["notes.txt"]),
    }


@pytest.mark.slow
def test_inference_splits_cases_over_ddp_processes_once_each(checkpoint, phantom_dir, tmp_path):
    images = [phantom_dir / "images" / f"phantom_{i:02d}.png" for i in range(5)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "infer", "--checkpoint", str(checkpoint), "--input", *map(str, images),
               "--output", str(out), "--devices", "2", "--accelerator", "cpu", "--num-workers", "0"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "5 ok, 0 failed" in done.stdout
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert sorted(r["case"] for r in rows) == [p.stem for p in images]  # each case exactly once
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in images), "predictions.csv"])


def test_inference_warns_about_a_spacing_far_outside_the_training_range():
    from pipeline.data.normalization import Normalization
    from pipeline.data.preprocessing import Preprocessing
    from pipeline.inference.cases import spacing_warning

    prep = Preprocessing(
        ("background", "organ"), 1, (Normalization(),), spacing_range=((0.6, 0.6, 1.0), (1.2, 1.2, 5.0))
    )
    assert spacing_warning("ct1", (0.4, 0.4, 8.0), prep) is None  # within half / twice the range
    message = spacing_warning("ct2", (0.25, 0.25, 3.0), prep)
    assert message.startswith("ct2: spacing 0.25x0.25x3 mm is far outside the training cases' (0.6-1.2 x")
    assert spacing_warning("ct3", (0.25, 0.25, 3.0), Preprocessing(("b", "o"), 1, (Normalization(),))) is None
