"""``make train`` and ``medseg infer`` end to end, as a user runs them: child processes, real files.

``gpu_check.py`` runs both on a GPU (and in its CPU dry run), with the 2D UNet on phantoms and the
3D UNet on generated volumes: exit status, seconds, what the run wrote, whether the weights
trained channels-last (the checkpoint keeps their strides), and the warnings that only a GPU run
shows (DDP's stride mismatch) counted in the log.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.run.naming import dataset_name

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
STRIDE_WARNING = "Grad strides do not match bucket view strides"


def medseg(args: list[str], log: Path) -> tuple[int, float, str]:
    """``python -m pipeline <args>`` in a child process: (exit status, seconds, its output)."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "pipeline", *args], cwd=REPO, stdout=out, stderr=out
        ).returncode
    return code, round(time.perf_counter() - start, 1), log.read_text()


def train(work: Path, count: int, batches: int, flags: list[str], spatial_dims: int = 2) -> dict:
    """``make train``'s command (the default configs; ``MODEL=unet3d DATA=msd`` for ``spatial_dims``
    3) for one epoch of at most ``batches`` steps on ``count`` images from ``medseg data synth``
    (3D: volumes, ``--volumes``), with more medseg ``flags``."""
    tag = "" if spatial_dims == 2 else "3d"
    data, runs, name = work / f"train{tag}-data", work / "runs", f"gpu-check{tag}"
    synth = ["data", "synth", "--output", str(data), "--num-images", str(count)]
    medseg([*synth, *(["--volumes"] if tag else [])], work / f"synth{tag}.log")
    configs = ("default", "model/unet3d", "data/msd") if tag else ("default", "model/unet", "data/synthetic")
    args = [
        "fit",
        *(a for c in configs for a in ("-c", str(CONFIGS / f"{c}.yaml"))),
        "--data.root",
        str(data),
    ]
    args += ["--run.root", str(runs), "--run.name", name, "--run.wandb", "false"]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(batches)]
    log_file = work / f"train{tag}.log"
    code, seconds, log = medseg([*args, "--trainer.enable_progress_bar", "false", *flags], log_file)
    run = runs / "default" / dataset_name(data) / name
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    last = run / "checkpoints" / "last.ckpt"
    weights = torch.load(last, weights_only=True)["state_dict"].values() if last.is_file() else []
    # conv weights, where the two layouts differ
    convs = [w for w in weights if w.ndim == spatial_dims + 2 and min(w.shape[1:]) > 1]
    layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    return {
        "exit": code,
        "seconds": seconds,
        "status": summary.get("status"),
        "seconds_per_epoch": summary.get("seconds_per_epoch"),
        "val_dice": summary.get("final", {}).get("val/dice"),
        "bf16": "bfloat16" in log,
        "channels_last_weights": sum(w.is_contiguous(memory_format=layout) for w in convs),
        "conv_weights": len(convs),
        "stride_warnings": log.count(STRIDE_WARNING),
        "checkpoint": str(last),
        "log_tail": log[-2000:] if code else "",
    }


def infer(work: Path, checkpoint: str, cases: int, flags: list[str], tag: str = "") -> dict:
    """``medseg infer`` with ``checkpoint`` on ``cases`` volumes from ``medseg data synth --volumes``
    (in folders named with ``tag``, so several checkpoints' runs keep apart)."""
    volumes, masks = work / f"volumes{tag}", work / f"masks{tag}"
    medseg(
        ["data", "synth", "--volumes", "--output", str(volumes), "--num-images", str(cases)],
        work / f"v{tag}.log",
    )
    args = ["infer", "--checkpoint", checkpoint, "--input", str(volumes / "imagesTr"), "--output", str(masks)]
    code, seconds, log = medseg([*args, *flags], work / f"infer{tag}.log")
    table = masks / "predictions.csv"
    rows = list(csv.DictReader(table.open())) if table.is_file() else []
    ok = sum(row["status"] == "ok" for row in rows)
    return {
        "exit": code,
        "seconds": seconds,
        "cases": cases,
        "ok": ok,
        "cases_per_s": round(ok / seconds, 3),
        "log_tail": log[-2000:] if code else "",
    }
