"""Run identity: the data set and the fold name the run directory, and a fit never writes into
another run (resume with --ckpt_path last, rename with --run.name, replace with --run.overwrite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli.identity import fit_settings
from pipeline.errors import DataError
from pipeline.run.directory import RunConfig, check_fresh_fit
from pipeline.run.naming import dataset_name, run_name
from tests.conftest import fit_args, run_path
from tests.test_bad_inputs import medseg

NAME = "unet-relu-kaiming-d3-s0"


def snapshot(folder: Path) -> dict[Path, tuple[int, int]]:
    """Every file below ``folder`` with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_identity_names_the_data_set_and_the_fold():
    assert dataset_name("/data/msd/Task09_Spleen/") == "Task09_Spleen"
    assert dataset_name("/data/my scans (2024)") == "my_scans_2024"
    assert run_name("unet-relu-kaiming", 0) == "unet-relu-kaiming-s0"
    assert run_name("unet-relu-kaiming", 1, fold=2) == "unet-relu-kaiming-f2-s1"
    with pytest.raises(ValueError, match="one folder name"):
        RunConfig(name="a/b")


def test_run_identity_two_data_sets_keep_their_runs_and_a_second_fresh_fit_writes_nothing(
    phantom_dir, volume_dir, tmp_path, capsys
):
    runs = tmp_path / "runs"
    quiet = ("--run.wandb", "false")
    first = run_path(runs, "default", phantom_dir, NAME)
    main_ok(capsys, fit_args(phantom_dir, runs, *quiet))
    before = snapshot(first)
    volumes = (
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--data.patch_size",
        "[32, 32]",
        "--model.hd95",
        "false",
    )
    main_ok(capsys, fit_args(volume_dir, runs, *quiet, *volumes))
    second = run_path(runs, "default", volume_dir, NAME)
    assert first != second and snapshot(first) == before  # the first run is untouched
    for run in (first, second):
        assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "metrics.csv").is_file()
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"

    # the same fit again: stopped before anything is written, saying how to go on
    code, _, err = medseg(capsys, *fit_args(phantom_dir, runs, *quiet))
    assert code == 1 and snapshot(first) == before
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {first}: holds a completed run")
    for advice in ("--ckpt_path last", "--run.name", "--run.overwrite true"):
        assert advice in line

    # --ckpt_path last resumes it (one more epoch), into the same directory
    main_ok(capsys, fit_args(phantom_dir, runs, *quiet, "--ckpt_path", "last", "--trainer.max_epochs", "2"))
    summary = json.loads((first / "summary.json").read_text())
    assert (
        summary["status"] == "completed"
        and summary["epochs"] == 2
        and summary["dataset"] == first.parent.name
    )


def test_run_identity_overwrite_replaces_the_run(phantom_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    run = run_path(runs, "default", phantom_dir, "mine")
    args = fit_args(phantom_dir, runs, "--run.wandb", "false", "--run.name", "mine")
    main_ok(capsys, args)
    (run / "validation").mkdir()
    (run / "validation" / "stale.txt").write_text("from the old run")
    main_ok(capsys, [*args, "--run.overwrite", "true"])
    assert not (run / "validation").exists() and (run / "checkpoints" / "best.ckpt").is_file()


def test_run_identity_fit_settings_name_the_directory_fit_writes(phantom_dir, tmp_path, capsys):
    args = fit_args(
        phantom_dir, tmp_path / "runs", "--run.wandb", "false", "--data.num_folds", "3", "--data.fold", "1"
    )
    main_ok(capsys, args)
    identity = fit_settings(args).identity()
    assert identity.name == "unet-relu-kaiming-d3-f1-s0" and identity.dataset == dataset_name(phantom_dir)
    assert (identity.directory / "summary.json").is_file()
    assert fit_settings(args).identity(fold=2).directory == identity.directory.with_name(
        "unet-relu-kaiming-d3-f2-s0"
    )


def test_run_identity_a_run_without_a_checkpoint_is_no_run_to_keep(tmp_path):
    (tmp_path / "config.yaml").write_text("{}")  # a fit that died before its first checkpoint
    assert check_fresh_fit(tmp_path, overwrite=False) is False
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"")
    with pytest.raises(DataError, match=r"holds a run's checkpoint \(checkpoints/best.ckpt\)"):
        check_fresh_fit(tmp_path, overwrite=False)
    assert check_fresh_fit(tmp_path, overwrite=True) is True


def main_ok(capsys: pytest.CaptureFixture, args: list[str]) -> None:
    code, _, err = medseg(capsys, *args)
    assert code == 0, err[-2000:]
