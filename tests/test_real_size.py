"""Real scans at real size: generated CT of 512 x 512 in plane and 80-90 slices, with a large organ
and a small lesion, through the real commands: ``data check``, ``plan``, a short 2D ``fit``,
``test`` on the held-out case and ``infer`` on it.

Every other volume test uses phantoms of at most 64 voxels a side, where a whole case is one
window; here the 2D network's planned patch (256 x 256) is smaller than the slices, so validation,
testing and inference go through sliding windows, and the cache, the resampling and the writer
handle tens of millions of voxels a case. The network is narrow (4..32 features) and the fit is 3
steps: about 40 s on a quiet 2-core CPU, a few minutes on a busy one (``make test-slow``).
"""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from tests.conftest import run_path, volume_fit_args

pytestmark = pytest.mark.slow

# the organ's scores that are defined whenever the ground truth has the organ, whatever the
# network predicts (HD95 and surface Dice of a missed organ are the worst case, not NaN);
# precision is NaN when nothing is predicted, so an untrained network may leave it undefined
ORGAN_SCORES = ("dice", "iou", "recall", "specificity", "hd95", "surface_dice")


def test_real_size_ct_checks_plans_trains_tests_and_infers(tmp_path, capsys, monkeypatch):
    from pipeline.data.synthesis.ct import generate_ct

    monkeypatch.chdir(tmp_path)  # nothing written outside tmp_path, not even by a library
    # 3 cases of 512 x 512 x 80-90 voxels in MSD layout; .nii: no gzip time in generation or reads
    data = generate_ct(tmp_path / "ct", num_cases=3, slices=(80, 90), compress=False)
    shapes = {nib.load(f).shape for f in (data / "imagesTr").iterdir()}
    assert all(s[:2] == (512, 512) and 80 <= s[2] <= 90 for s in shapes), shapes

    main(["data", "check", str(data)])
    assert capsys.readouterr().out.strip().startswith("OK: 3 cases")

    main(["plan", str(data)])
    table = capsys.readouterr().out
    assert "(keyhole)" in table and "train the 2D" in table  # a CPU's 3D patch holds < 1% of a case
    assert "2D network (trains)" in table

    runs = tmp_path / "runs"
    main(volume_fit_args(
        data, runs, "unet", "--model.net.init_args.features", "[4, 8, 16, 32]", "--run.name", "run",
        "--trainer.max_epochs", "1", "--data.iterations_per_epoch", "3",
        "--data.test_fraction", "0.34",  # round(3 x 0.34) = 1 case held out for `medseg test`
    ))  # fmt: skip
    run = run_path(runs, "default", data, "run")
    split = json.loads((run / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    with (run / "metrics.csv").open() as f:
        validated = [row for row in csv.DictReader(f) if row.get("val/dice_organ")]
    assert len(validated) == 1 and math.isfinite(float(validated[0]["val/dice_organ"]))
    assert json.loads((run / "plan.json").read_text())["net_2d"]["patch"] == [
        256,
        256,
    ]  # windows, not whole slices

    checkpoint = run / "checkpoints" / "best.ckpt"
    main(["test", "-c", str(run / "config.yaml"), "--ckpt_path", str(checkpoint)])
    with (run / "test_cases.csv").open() as f:
        rows = list(csv.DictReader(f))
    (case,) = split["test"]
    assert [row["case_id"] for row in rows] == [case]
    for name in ORGAN_SCORES:
        assert math.isfinite(float(rows[0][f"{name}_organ"])), name
    # Not asserted: a high organ Dice. Three steps of a 4..32-feature network need not find the
    # organ (it often does: the organ is the brightest soft tissue inside the CT window).
    assert 0 <= float(rows[0]["dice_organ"]) <= 1

    source_path = data / "imagesTr" / f"{case}.nii"
    out = tmp_path / "out"
    main(["infer", "--checkpoint", str(checkpoint), "--input", str(source_path), "--output", str(out),
          "--num-workers", "0"])  # fmt: skip
    written, source = nib.load(out / f"{case}.nii.gz"), nib.load(source_path)
    assert written.shape == source.shape
    assert np.array_equal(written.affine, source.affine)  # exactly: the input's own geometry
    labels = np.asanyarray(written.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    # the mask infer writes is the one test scored: the same Dice on the same case
    truth = np.asanyarray(nib.load(data / "labelsTr" / f"{case}.nii").dataobj) == 1
    predicted = labels == 1
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert float(rows[0]["dice_organ"]) == pytest.approx(dice, rel=1e-5, abs=1e-6)
    with (out / "predictions.csv").open() as f:
        (prediction,) = csv.DictReader(f)
    assert prediction["status"] == "ok" and prediction["shape"] == "x".join(map(str, source.shape))
