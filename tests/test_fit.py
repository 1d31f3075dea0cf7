import csv
import json

import torch

from pipeline.cli import main
from tests.conftest import fit_args, run_path
from tests.helpers.scores import assert_scores_agree


def test_one_epoch_fit_writes_the_run_directory(phantom_dir, tmp_path):
    main(fit_args(phantom_dir, tmp_path / "runs", "--run.experiment", "smoke"))
    run = run_path(tmp_path / "runs", "smoke", phantom_dir, "unet-relu-kaiming-d3-s0")
    for name in ("config.yaml", "split.json", "metrics.csv", "summary.json", "plots/progress.png"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert any((run / "wandb").glob("offline-run-*"))

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1
    assert summary["params"] > 0 and summary["seconds_per_epoch"] > 0
    assert summary["variant"]["arch"] == "unet" and summary["variant"]["depth"] == 3
    assert_scores_agree(summary["best"], ("organ", "lesion", "vessel"))
    assert summary["best"]["val/dice"] > 0.05  # seed 0, 2 steps: 0.11 (all background scores 0)
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 12

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(row.get("train/loss_step") for row in rows) and any(row.get("val/dice") for row in rows)

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["medseg"]["net"]["init_args"]["out_channels"] == 4
    assert checkpoint["medseg"]["preprocessing"]["normalization"]["mode"] == "zscore"
