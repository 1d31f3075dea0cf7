"""`medseg auto` end to end on tiny volumes: killed (SIGKILL) in the middle of a run and started
again, it goes on where it stopped; its out-of-fold scores come from final checkpoints; its model
folder segments new scans with `medseg infer --model-dir`; a second call only reports, and a call
with other settings is refused."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from pipeline.inference.run import infer
from pipeline.run.naming import dataset_name
from tests.helpers.resume import finish, start_fit
from tests.test_bad_inputs import medseg

pytestmark = pytest.mark.slow
LAST = {  # configs/default.yaml's last.ckpt: the final weights, at the end of every epoch
    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
    "init_args": {"filename": "last", "enable_version_counter": False, "save_on_train_epoch_end": True},
}
LAST_EVERY_2 = {
    "class_path": LAST["class_path"],
    "init_args": {**LAST["init_args"], "every_n_train_steps": 2},
}


def auto_args(data: Path, folder: Path, *options: str) -> list[str]:
    """3 minutes, 3 folds, runs of at least 5 s; last.ckpt also every 2 steps, so that the first
    fold-1 run, SIGKILLed in its step 3 (the first time only), resumes from step 2; every run's
    start is recorded in ``folder/train_starts.jsonl``."""
    marker = str(folder / "killed")
    kill = {
        "class_path": "tests.helpers.cv.KillFoldOnce",
        "init_args": {"fold": 1, "step": 3, "marker": marker},
    }
    starts = {
        "class_path": "tests.helpers.cv.RecordTrainStart",
        "init_args": {"path": str(folder / "train_starts.jsonl"), "marker": marker},
    }
    config = folder / "callbacks.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [LAST, LAST_EVERY_2, kill, starts]}}))
    return [
        "auto", str(data), "--budget", "00:03:00", "--folds", "3", "--min-run", "00:00:05",
        "--runs-root", str(folder / "runs"), *options, "--",
        "-c", str(config), "--data.num_workers", "0", "--data.cache_dir", str(folder / "cache"),
        "--model.net.init_args.features", "[8, 16, 32]", "--model.hd95", "false",
        "--run.wandb", "false", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def killed_auto(volume_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("auto")
    args = auto_args(volume_dir, folder)
    code, err = finish(start_fit(args), timeout=900)
    assert code == -9, err[-3000:]
    auto = folder / "runs" / "auto" / dataset_name(volume_dir)
    killed_state = json.loads((auto / "auto_state.json").read_text())
    fold_0 = {
        path: (path.stat().st_mtime_ns, path.read_bytes())
        for name in killed_state["finalists"]
        for path in [auto / f"{name}-f0" / "checkpoints" / "last.ckpt", auto / f"{name}-f0" / "summary.json"]
    }
    child = start_fit(args)
    out, err = child.communicate(timeout=900)
    assert child.returncode == 0, err[-3000:]
    return {
        "folder": folder,
        "auto": auto,
        "killed": killed_state,
        "fold_0": fold_0,
        "out": out,
        "args": args,
    }


def test_auto_killed_in_a_run_resumes_it_and_keeps_the_finished_ones(killed_auto):
    killed, auto = killed_auto["killed"], killed_auto["auto"]
    first = f"{killed['finalists'][0]}-f1"
    # when killed: both screens and the finalists' continuations scored, the fold-1 run started
    scored = {key for key, seg in killed["segments"].items() if "oof_s" in seg}
    assert {f"{name}-f0:screen" for name in ("2d", "3d_fullres")} <= scored
    assert {f"{name}-f0:continue" for name in killed["finalists"]} <= scored
    assert "limit_s" in killed["segments"][f"{first}:fold"] and first + ":fold" not in scored
    out = killed_auto["out"]
    assert f"fold {first} to" in out and "(from its last.ckpt)" in out
    assert "[auto] screen" not in out and "[auto] continue" not in out  # nothing trained again
    for path, (mtime, content) in killed_auto["fold_0"].items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, path
    starts = [
        json.loads(line) for line in (killed_auto["folder"] / "train_starts.jsonl").read_text().splitlines()
    ]
    resumed = next(s for s in starts if s["fold"] == 1 and s["after_kill"])
    assert resumed["global_step"] == 2  # from the last.ckpt written at step 2, not from scratch
    state = json.loads((auto / "auto_state.json").read_text())
    assert state["finished"] and state["used_s"] >= killed["used_s"]  # the time before the kill counts


def test_auto_scores_out_of_fold_with_each_runs_final_checkpoint(killed_auto, volume_dir, tmp_path):
    auto = killed_auto["auto"]
    summary = json.loads((auto / "auto_summary.json").read_text())
    for run in summary["runs"]:
        directory = auto / run["run"]
        last = directory / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=False)["global_step"] == run["steps"]  # the final weights
        assert not (directory / "checkpoints" / "best.ckpt").exists()  # nothing chosen on these cases
    # the fold's validation masks are what its last.ckpt predicts now
    run = summary["runs"][-1]
    val = json.loads((auto / "splits.json").read_text())["folds"][run["fold"]]["val"]
    again = infer(
        auto / run["run"] / "checkpoints" / "last.ckpt",
        [volume_dir / "imagesTr" / f"{case}.nii.gz" for case in val],
        tmp_path,
        progress_bar=False,
    )
    assert again.ok
    for case in val:
        ours = np.asanyarray(nib.load(auto / run["run"] / "validation_final" / f"{case}.nii.gz").dataobj)
        assert np.array_equal(ours, np.asanyarray(nib.load(tmp_path / f"{case}.nii.gz").dataobj))


def test_auto_model_folder_segments_with_infer_model_dir(killed_auto, volume_dir, tmp_path, capsys):
    auto = killed_auto["auto"]
    summary = json.loads((auto / "auto_summary.json").read_text())
    assert summary["choice"]["model"] in ("2d", "3d_fullres", "2d+3d_fullres", "3d_fullres+2d")
    assert len(summary["checkpoints"]) == len(summary["choice"]["members"]) * len(summary["choice"]["folds"])
    assert (auto / "postprocessing.json").is_file() and "## Runs" in (auto / "auto_report.md").read_text()
    scan = volume_dir / "imagesTr" / "vol_000.nii.gz"
    code, _, err = medseg(
        capsys, "infer", "--model-dir", str(auto), "--input", str(scan), "--output", str(tmp_path)
    )
    assert code == 0, err
    written, source = nib.load(tmp_path / "vol_000.nii.gz"), nib.load(scan)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    exported = tmp_path / "export"
    code, _, err = medseg(
        capsys, "export", "--model-dir", str(auto), "--format", "torchscript", "--output", str(exported)
    )
    assert code == 0, err
    index = json.loads((exported / "ensemble.json").read_text())
    assert len(index["members"]) == len(summary["checkpoints"])
    assert all((exported / member / "preprocessing.json").is_file() for member in index["members"])


def test_auto_again_only_reports_and_other_settings_are_refused(killed_auto, capsys):
    auto, args = killed_auto["auto"], killed_auto["args"]
    before = (auto / "auto_summary.json").read_text()
    code, out, _ = medseg(capsys, *args)
    assert code == 0 and "finished before" in out and "train" not in out
    assert (auto / "auto_summary.json").read_text() == before
    other = [*args[: args.index("--")], "--seed", "1", *args[args.index("--") :]]
    code, _, err = medseg(capsys, *other)
    assert code == 1 and "auto_state.json" in err and "other settings" in err
