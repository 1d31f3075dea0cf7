"""`medseg cv`: k folds trained resumably, out-of-fold scores, the postprocessing they choose, the
CV folder (splits, summary, report) and its ensemble through `medseg infer --model-dir`."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.data.loading.split import make_split
from pipeline.data.reading.layouts import discover
from pipeline.experiments.cv_scores import (
    CaseResult,
    choose_postprocessing,
    largest_component_dice,
    score_case,
)
from pipeline.run.naming import dataset_name
from tests.helpers.cv import cv_args
from tests.helpers.resume import finish, start_fit
from tests.test_bad_inputs import medseg

VARIANT = "unet-relu-kaiming-d3"
CLASSES = ("background", "organ")


@pytest.fixture(scope="module")
def cross_validation(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The CV killed (SIGKILL) in fold 1, then run again: its folder, the fold runs, what it printed."""
    folder = tmp_path_factory.mktemp("cv")
    args = cv_args(phantom_dir, folder)
    code, err = finish(start_fit(args))
    assert code == -9, err[-3000:]
    runs = folder / "runs" / "default" / dataset_name(phantom_dir)
    states = {p.name: sorted(q.name for q in (p / "checkpoints").glob("*.ckpt")) for p in runs.glob("*-f*")}
    fold_0 = runs / f"{VARIANT}-f0-s0"
    finished = {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in [*fold_0.rglob("*.ckpt"), fold_0 / "summary.json"]
    }
    last_1 = runs / f"{VARIANT}-f1-s0" / "checkpoints" / "last.ckpt"
    last_step = torch.load(last_1, weights_only=False)["global_step"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return {
        "fold_0_files": finished,  # (mtime, bytes) of fold 0's checkpoints and summary after the kill
        "fold_1_last_step": last_step,  # of the last.ckpt the kill left in fold 1
        "starts": [json.loads(line) for line in (folder / "train_starts.jsonl").read_text().splitlines()],
        "runs": runs,
        "cv": runs / f"{VARIANT}-cv3-s0",
        "killed": states,
        "out": out.getvalue(),
        "data": phantom_dir,
    }


def test_cv_killed_in_fold_1_resumes_it_and_skips_fold_0(cross_validation):
    killed, out = cross_validation["killed"], cross_validation["out"]
    # when killed: fold 0 done, fold 1 with epoch 0's last.ckpt, fold 2 not started
    assert killed == {
        f"{VARIANT}-f0-s0": ["best.ckpt", "last.ckpt"],
        f"{VARIANT}-f1-s0": ["best.ckpt", "last.ckpt"],
    }
    assert f"[1/3] {VARIANT}-f0-s0: skipped (completed)" in out
    assert f"[2/3] {VARIANT}-f1-s0: training (resuming from last.ckpt)" in out
    assert f"[3/3] {VARIANT}-f2-s0: training\n" in out
    # what the files say: fold 0 untouched, fold 1 went on from its last.ckpt (epoch 0's 2 steps)
    assert len(cross_validation["fold_0_files"]) == 3
    for path, (mtime, content) in cross_validation["fold_0_files"].items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, path
    assert cross_validation["fold_1_last_step"] == 2
    starts = [(s["fold"], s["global_step"], s["after_kill"]) for s in cross_validation["starts"]]
    assert starts == [(0, 0, False), (1, 0, False), (1, 2, True), (2, 0, True)]
    for fold in range(3):
        summary = json.loads(
            (cross_validation["runs"] / f"{VARIANT}-f{fold}-s0" / "summary.json").read_text()
        )
        assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["steps"] == 4


def test_cv_writes_splits_summary_and_report(cross_validation):
    cv, data = cross_validation["cv"], cross_validation["data"]
    ids = [case.case_id for case in discover(data)]
    splits = json.loads((cv / "splits.json").read_text())["folds"]
    assert splits == [make_split(ids, 0.2, 0.0, 0, 3, fold) for fold in range(3)]  # seeded by data.seed
    assert sorted(i for split in splits for i in split["val"]) == sorted(ids)  # each case validated once

    summary = json.loads((cv / "cv_summary.json").read_text())
    assert summary["checkpoints"] == [f"../{VARIANT}-f{f}-s0/checkpoints/last.ckpt" for f in range(3)]
    assert sorted(case["case_id"] for case in summary["cases"]) == sorted(ids)
    for fold, run in zip(summary["folds"], summary["runs"], strict=True):
        # the out-of-fold predictions (medseg infer, last.ckpt) score what the final validation scored
        # (to a few pixels: validation predicts 4 images a batch, infer one, and a convolution's
        # float32 sums depend on the batch; best.ckpt's epoch scores 0.098 against 0.092 in fold 0)
        assert fold["cases"] == 4 and fold["scores"]["dice"] == pytest.approx(
            run["final"]["val/dice"], abs=1e-4
        )
        assert {"dice_organ", "dice_lesion", "dice_vessel", "hd95", "surface_dice"} <= set(fold["scores"])
    dice = [fold["scores"]["dice"] for fold in summary["folds"]]
    assert summary["mean_sd"]["dice"]["mean"] == pytest.approx(np.mean(dice))
    assert summary["mean_sd"]["dice"]["sd"] == pytest.approx(np.std(dice, ddof=1))
    decision = json.loads((cv / "postprocessing.json").read_text())
    assert decision == summary["postprocessing"] and set(decision["classes"]) == {"organ", "lesion", "vessel"}

    report = (cv / "cv_report.md").read_text()
    assert "| mean ± sd |" in report and "## Postprocessing chosen" in report
    assert "final checkpoint (last.ckpt)" in report
    assert all(case_id in report for case_id in ids)
    for fold in range(3):
        assert (
            len(list((cross_validation["runs"] / f"{VARIANT}-f{fold}-s0" / "validation_final").glob("*.png")))
            == 4
        )


def test_cv_run_again_trains_nothing_and_writes_the_same_result(cross_validation, capsys):
    cv = cross_validation["cv"]
    before = (cv / "cv_summary.json").read_text()
    args = cv_args(cross_validation["data"], cv.parents[3])
    main(args)
    assert capsys.readouterr().out.count("skipped (completed)") == 3
    assert (cv / "cv_summary.json").read_text() == before
    main([*args, "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("completed  unet-relu-kaiming-d3-f") == 3 and f"results in {cv}" in out


def test_cv_scores_out_of_fold_with_final_checkpoints_not_best(cross_validation, tmp_path, capsys):
    """best.ckpt was chosen on the fold's validation cases: with it gone (and the predictions), a
    second run predicts again from last.ckpt and gets the same scores."""
    runs = tmp_path / "runs" / "default"
    shutil.copytree(cross_validation["runs"].parent, runs)
    folder = runs / dataset_name(cross_validation["data"])
    before = json.loads((folder / f"{VARIANT}-cv3-s0" / "cv_summary.json").read_text())
    for fold in range(3):
        run = folder / f"{VARIANT}-f{fold}-s0"
        (run / "checkpoints" / "best.ckpt").unlink()
        shutil.rmtree(run / "validation_final")
    main(cv_args(cross_validation["data"], tmp_path))
    capsys.readouterr()
    after = json.loads((folder / f"{VARIANT}-cv3-s0" / "cv_summary.json").read_text())
    assert [f["scores"] for f in after["folds"]] == [f["scores"] for f in before["folds"]]
    assert all(
        (folder / f"{VARIANT}-f{f}-s0" / "validation_final" / "predictions.csv").is_file() for f in range(3)
    )


def case_result(predicted: np.ndarray, truth: np.ndarray) -> CaseResult:
    scores = score_case(predicted, truth, CLASSES, None)
    return CaseResult("c", 0, scores, *largest_component_dice(predicted, truth, CLASSES))


def test_cv_postprocessing_adopted_for_a_spurious_second_blob_only():
    truth = np.zeros((32, 32), np.int64)
    truth[8:20, 8:20] = 1
    spurious = truth.copy()
    spurious[26:30, 26:30] = 1  # a false blob apart from the organ
    decision = choose_postprocessing([case_result(spurious, truth)], CLASSES)
    assert decision["largest_component"] == ["organ"]
    assert (
        decision["classes"]["organ"]["dice_largest_component"] == 1.0 > decision["classes"]["organ"]["dice"]
    )

    # an organ in two parts: keeping the larger one loses the other, so it is not adopted
    split = np.zeros((32, 32), np.int64)
    split[2:10, 2:10] = 1
    split[20:30, 20:30] = 1
    decision = choose_postprocessing([case_result(split, split)], CLASSES)
    assert decision["largest_component"] == [] and not decision["classes"]["organ"]["adopted"]
    # one blob, imperfect (Dice 242 / 276): nothing to remove, an exact tie, not adopted
    shifted = np.zeros((32, 32), np.int64)
    shifted[9:21, 8:19] = 1
    decision = choose_postprocessing([case_result(shifted, truth)], CLASSES)
    assert decision["classes"]["organ"]["dice"] == decision["classes"]["organ"]["dice_largest_component"]
    assert decision["largest_component"] == []


def test_cv_refuses_a_run_name_and_a_split_file(phantom_dir, tmp_path, capsys):
    args = cv_args(phantom_dir, tmp_path)
    code, _, err = medseg(capsys, *args, "--run.name", "mine")
    assert code == 1 and "error: --run.name: medseg cv names its fold runs" in err
    code, _, err = medseg(capsys, *args, "--data.split_file", str(tmp_path / "split.json"))
    assert code == 1 and "medseg cv cuts its own folds" in err
    assert not (tmp_path / "runs").exists()
