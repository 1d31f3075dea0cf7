"""Ensembles: `medseg infer --checkpoint a.ckpt b.ckpt` and `--model-dir` average the members'
softmax before one arg max, apply a CV's postprocessing, and refuse members that disagree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from pipeline.cli import main
from pipeline.inference.cases import find_inputs, load_case
from pipeline.inference.ensemble import Ensemble
from pipeline.training.checkpoint import load_model
from tests.conftest import fit_args, run_path
from tests.test_bad_inputs import medseg


@pytest.fixture(scope="module")
def checkpoints(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny UNets of one preprocessing (seeds 0, 1) and one normalised otherwise (percentile)."""
    runs = tmp_path_factory.mktemp("runs")
    paths = []
    for name, extra in (
        ("a", ["--seed_everything", "0"]),
        ("b", ["--seed_everything", "1"]),
        ("other", ["--data.normalization.mode", "percentile"]),
    ):
        main(
            fit_args(
                phantom_dir, runs, "--run.name", name, "--run.wandb", "false", "--model.hd95", "false", *extra
            )
        )
        paths.append(run_path(runs, "default", phantom_dir, name) / "checkpoints" / "best.ckpt")
    return paths


@pytest.mark.parametrize("tta", [False, True])
def test_ensemble_predicts_the_mean_of_its_members_softmax(tta, checkpoints, phantom_dir):
    (a, prep), (b, _) = load_model(checkpoints[0]), load_model(checkpoints[1])
    image = load_case(find_inputs([phantom_dir / "images"])[0], prep)["image"]
    with torch.no_grad():
        labels, probs = Ensemble([a, b]).predict_case(image, tta=tta)
        mean = (a.predict_case(image, tta=tta)[1] + b.predict_case(image, tta=tta)[1]) / 2
    assert torch.allclose(probs, mean, atol=1e-6)
    assert torch.equal(labels, mean.argmax(0).to(torch.uint8))


def read_masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_ensemble_infer_two_checkpoints_writes_the_mean_probabilities(checkpoints, phantom_dir, tmp_path):
    images = str(phantom_dir / "images")
    singles = []
    for i, checkpoint in enumerate(checkpoints[:2]):
        main(["infer", "--checkpoint", str(checkpoint), "--input", images, "--output", str(tmp_path / f"m{i}"),
              "--save-probabilities", "--num-workers", "0"])  # fmt: skip
        singles.append(tmp_path / f"m{i}")
    ensemble = tmp_path / "ensemble"
    main(["infer", "--checkpoint", *map(str, checkpoints[:2]), "--input", images, "--output", str(ensemble),
          "--save-probabilities", "--num-workers", "0"])  # fmt: skip
    written = sorted((ensemble / "probabilities").glob("*.npz"))
    cases = sorted(p.stem for p in (phantom_dir / "images").iterdir())
    assert [p.stem for p in written] == cases  # one file per case: an empty folder fails here
    for case in written:
        got = np.load(case)["probabilities"].astype(np.float32)
        mean = (
            sum(np.load(s / "probabilities" / case.name)["probabilities"].astype(np.float32) for s in singles)
            / 2
        )
        assert np.abs(got - mean).max() <= 2e-3  # float16 files
        assert (np.array(Image.open(ensemble / f"{case.stem}.png")) == got.argmax(-1)).mean() > 0.99


def test_ensemble_refuses_checkpoints_that_disagree_naming_the_pair(
    checkpoints, phantom_dir, tmp_path, capsys
):
    a, _, other = checkpoints
    out = tmp_path / "out"
    code, _, err = medseg(capsys, "infer", "--checkpoint", str(a), str(other), "--input",
                          str(phantom_dir / "images"), "--output", str(out))  # fmt: skip
    (line,) = err.strip().splitlines()
    assert code == 1 and line.startswith(f"error: {other}: disagrees with {a} on normalization")
    assert not out.exists()


def test_ensemble_model_dir_applies_the_chosen_postprocessing(checkpoints, phantom_dir, tmp_path, capsys):
    cv = tmp_path / "cv"
    cv.mkdir()
    code, _, err = medseg(
        capsys, "infer", "--model-dir", str(cv), "--input", str(phantom_dir), "--output", str(cv / "x")
    )
    assert code == 1 and "not a finished cross-validation" in err
    relative = [os.path.relpath(p, cv) for p in checkpoints[:2]]  # as medseg cv writes them
    (cv / "cv_summary.json").write_text(json.dumps({"checkpoints": relative}))
    (cv / "postprocessing.json").write_text(json.dumps({"largest_component": ["organ"]}))
    images = str(phantom_dir / "images")
    main(
        [
            "infer",
            "--model-dir",
            str(cv),
            "--input",
            images,
            "--output",
            str(tmp_path / "pp"),
            "--num-workers",
            "0",
        ]
    )
    main(["infer", "--checkpoint", *map(str, checkpoints[:2]), "--input", images, "--output", str(tmp_path / "plain"),
          "--num-workers", "0"])  # fmt: skip
    processed, plain = read_masks(tmp_path / "pp"), read_masks(tmp_path / "plain")
    assert processed.keys() == plain.keys() and len(processed) == 12
    for name, mask in processed.items():
        assert ndimage.label(mask == 1)[1] <= 1, name  # organ: its largest component only
        for cls in (2, 3):  # the other classes as the ensemble predicted them
            assert np.array_equal(mask == cls, plain[name] == cls), name
    assert any(ndimage.label(mask == 1)[1] > 1 for mask in plain.values())  # the step had work to do
