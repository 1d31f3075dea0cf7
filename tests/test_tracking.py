"""A short fit with W&B offline, read back from the run's files; then `medseg test` on its checkpoint."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.models import UNet
from pipeline.monitors.layers import parameter_layers
from tests.conftest import fit_args, run_path
from tests.helpers.wandb_records import OfflineRun, read_offline_run

CLASSES = ("organ", "lesion", "vessel")
# batch 2 over the 10 training phantoms: 5 optimiser steps, each logged (log_every_n_steps 1)
FIVE_STEPS = ("--data.batch_size", "2", "--trainer.limit_train_batches", "5")


@pytest.fixture(scope="module")
def offline_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One epoch of the reference UNet (skips, ReLU, batch norm, He init) with W&B offline."""
    runs = tmp_path_factory.mktemp("runs")
    hints: list[str] = []
    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        patch.setattr("pipeline.run.loggers.rank_zero_info", hints.append)
        main(fit_args(phantom_dir, runs, "--run.experiment", "wandb", "--run.log_model", "true", *FIVE_STEPS))
    run_dir = run_path(runs, "wandb", phantom_dir, "unet-relu-kaiming-d3-s0")
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    return {
        "dir": run_dir,
        "folder": folder,
        "records": read_offline_run(folder),
        "warnings": [str(w.message) for w in caught],
        "hints": hints,
    }


def layer_names() -> list[str]:
    return [layer.name for layer in parameter_layers(UNet(1, 4, features=(8, 16, 32)))]


def test_tracking_offline_run_summary_holds_val_dice_best_and_last_and_per_class_dice(offline_run):
    records: OfflineRun = offline_run["records"]
    assert set(records.summary["val/dice"]) == {"max", "last"}
    assert set(records.summary["val/loss"]) == {"min", "last"}
    with (offline_run["dir"] / "metrics.csv").open() as f:
        (logged,) = [row for row in csv.DictReader(f) if row.get("val/dice")]  # one validation
    for name in CLASSES:  # the values logged, not only numbers in range
        assert records.summary[f"val/dice_{name}"] == pytest.approx(
            float(logged[f"val/dice_{name}"]), rel=1e-6
        )
    per_class = [records.summary[f"val/dice_{name}"] for name in CLASSES]
    assert records.summary["val/dice"]["last"] == pytest.approx(sum(per_class) / len(per_class), rel=1e-5)
    assert records.summary["val/dice"]["last"] > 0.05  # seed 0, 5 steps: 0.10 (all background scores 0)
    assert records.metrics["val/dice"].summary.max and records.metrics["val/loss"].summary.min


def test_tracking_grad_and_update_keys_exist_for_every_parameterised_layer(offline_run):
    keys = offline_run["records"].history_keys()
    for name in layer_names():
        assert f"grad/{name}" in keys and f"update/{name}" in keys, name
    assert {"grad/global", "grad/first_last_ratio", "dead_relu/encoder.enc1.conv1"} <= keys
    grad_rows = [row for row in offline_run["records"].history if "grad/global" in row]
    assert [row["trainer/global_step"] for row in grad_rows] == [0, 1, 2, 3, 4]
    with open(offline_run["dir"] / "metrics.csv") as f:  # the CSV mirror gets the same scalars
        columns = set(next(csv.reader(f)))
    assert {k for k in keys if k.startswith(("grad/", "update/", "dead_relu/"))} <= columns


def test_tracking_prediction_images_are_logged_with_both_masks(offline_run):
    (row,) = [row for row in offline_run["records"].history if "val/predictions/filenames" in row]
    assert row["val/predictions/captions"] == ["phantom_02", "phantom_09"]  # the two validation phantoms
    files = offline_run["folder"] / "files"
    for name in row["val/predictions/filenames"]:
        assert (files / name).is_file()
    for masks in row["val/predictions/all_masks"]:
        assert set(masks) == {"prediction", "ground_truth"}
        assert all((files / mask["path"]).is_file() for mask in masks.values())


def test_tracking_config_name_group_and_tags_describe_the_variant(offline_run):
    records = offline_run["records"]
    for knob, value in {
        "use_skips": True,
        "act": "relu",
        "norm": "batch",
        "init": "kaiming",
        "block": "plain",
    }.items():
        assert records.config[f"model.net.init_args.{knob}"] == value
    assert records.config["model.net.init_args.features"] == [8, 16, 32]
    assert records.config["variant.act"] == "relu" and records.config["variant.params"] > 0
    assert records.config["trainer.max_epochs"] == 1 and records.config["model.lr"] == 0.003
    dataset = offline_run["dir"].parent.name  # the data set's name is part of the W&B run's
    assert (
        records.run.display_name == f"{dataset}/unet-relu-kaiming-d3-s0" and records.run.run_group == "wandb"
    )
    assert {"skips:true", "act:relu", "init:kaiming", f"dataset:{dataset}"} <= set(records.run.tags)


def test_tracking_checkpoints_are_artifacts_and_the_sync_hint_comes_once(offline_run):
    artifacts = offline_run["records"].artifacts
    assert {a.type for a in artifacts} >= {"model"}
    assert any("best" in a.aliases for a in artifacts if a.type == "model")
    (hint,) = offline_run["hints"]
    assert f"wandb sync {offline_run['folder']}" in hint


def test_tracking_summary_json_has_the_gradient_summary_and_plots_exist(offline_run):
    summary = json.loads((offline_run["dir"] / "summary.json").read_text())
    grads = summary["GradientFlowMonitor"]
    assert grads["logs"] == 5 and grads["first_conv_layer"] == "encoder.enc1.conv1"
    assert grads["first_last_ratio"]["start"] > 1e-3 and grads["first_last_ratio"]["end"] > 1e-3
    assert not grads["vanishing"]["detected"] and not grads["exploding"]["detected"]
    assert not any("vanishing" in w for w in offline_run["warnings"])  # the reference UNet is healthy
    assert set(summary["WeightUpdateMonitor"]["last"]) == set(layer_names())
    assert summary["ActivationMonitor"]["dead_relu/encoder.enc1.conv1"] < 1.0
    for name in ("grad_depth_profile.png", "grad_heatmap.png"):
        assert (offline_run["dir"] / "plots" / name).stat().st_size > 1000


def test_tracking_test_stage_writes_per_case_csv_and_confusion_png_into_the_run(offline_run):
    run_dir: Path = offline_run["dir"]
    main(
        [
            "test",
            "-c",
            str(run_dir / "config.yaml"),
            "--ckpt_path",
            str(run_dir / "checkpoints" / "best.ckpt"),
            "--run.root",
            str(run_dir.parent.parent / "elsewhere"),  # the checkpoint's run still gets the report
            "--data.test_split",
            "val",  # the run holds out no test cases: score the validation cases, on purpose
        ]
    )
    with open(run_dir / "test_cases.csv") as f:
        rows = list(csv.DictReader(f))
    split = json.loads((run_dir / "split.json").read_text())
    assert not split["test"] and sorted(row["case_id"] for row in rows) == sorted(split["val"])
    assert {"dice", "dice_organ", "hd95_vessel", "specificity"} <= set(rows[0])
    assert all(row["slice_index"] == "-1" for row in rows)
    assert (run_dir / "plots" / "test_confusion.png").stat().st_size > 1000
    with open(run_dir / "test" / "metrics.csv") as f:  # the stage's own log, not lightning_logs/
        assert "test/dice" in next(csv.reader(f))
    assert not (run_dir / "lightning_logs").exists()
    # the scores went to the training run's own W&B run (resumed by id), beside its curves
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    folders = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2 and folders[0] == offline_run["folder"]
    tested = read_offline_run(folders[1]).history_keys()  # folders are named by the run id
    assert "test/dice" in tested and "test/cases/path" in tested  # the scores and the per-case table


def test_tracking_test_without_a_test_split_refuses_and_says_how(phantom_dir, tmp_path, capsys):
    main(fit_args(phantom_dir, tmp_path / "runs", "--run.wandb", "false"))
    run_dir = run_path(tmp_path / "runs", "default", phantom_dir, "unet-relu-kaiming-d3-s0")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "test",
                "-c",
                str(run_dir / "config.yaml"),
                "--ckpt_path",
                str(run_dir / "checkpoints" / "best.ckpt"),
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "this run has no test split" in err
    assert "--data.test_fraction" in err and "--data.test_split val" in err
    assert not (run_dir / "test").exists()  # refused before anything was written
