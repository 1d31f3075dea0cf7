"""``make train`` and ``medseg infer`` end to end, as a user runs them: child processes, real files.

``gpu_check.py`` runs both on a GPU (and in its CPU dry run): exit status, seconds, what the run
wrote, whether the weights trained channels-last (the checkpoint keeps their strides), and the
warnings that only a GPU run shows (DDP's stride mismatch) counted in the log.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

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


def train(work: Path, phantoms: int, batches: int, flags: list[str]) -> dict:
    """``make train``'s command (the default configs) for one epoch of at most ``batches`` steps on
    ``phantoms`` images from ``medseg data synth``, with more medseg ``flags``."""
    data, runs = work / "phantoms", work / "runs"
    medseg(["data", "synth", "--output", str(data), "--num-images", str(phantoms)], work / "synth.log")
    configs = ("default", "model/unet", "data/synthetic")
    args = [
        "fit",
        *(a for c in configs for a in ("-c", str(CONFIGS / f"{c}.yaml"))),
        "--data.root",
        str(data),
    ]
    args += ["--run.root", str(runs), "--run.name", "gpu-check", "--run.wandb", "false"]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(batches)]
    code, seconds, log = medseg([*args, "--trainer.enable_progress_bar", "false", *flags], work / "train.log")
    run = runs / "default" / "gpu-check"
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    last = run / "checkpoints" / "last.ckpt"
    weights = torch.load(last, weights_only=True)["state_dict"].values() if last.is_file() else []
    convs = [w for w in weights if w.ndim == 4 and min(w.shape[1:]) > 1]  # where the two layouts differ
    return {
        "exit": code,
        "seconds": seconds,
        "status": summary.get("status"),
        "seconds_per_epoch": summary.get("seconds_per_epoch"),
        "val_dice": summary.get("final", {}).get("val/dice"),
        "bf16": "bfloat16" in log,
        "channels_last_weights": sum(w.is_contiguous(memory_format=torch.channels_last) for w in convs),
        "conv_weights": len(convs),
        "stride_warnings": log.count(STRIDE_WARNING),
        "checkpoint": str(last),
        "log_tail": log[-2000:] if code else "",
    }


def infer(work: Path, checkpoint: str, cases: int, flags: list[str]) -> dict:
    """``medseg infer`` with ``checkpoint`` on ``cases`` volumes from ``medseg data synth --volumes``."""
    volumes, masks = work / "volumes", work / "masks"
    medseg(
        ["data", "synth", "--volumes", "--output", str(volumes), "--num-images", str(cases)],
        work / "v.log",
    )
    args = ["infer", "--checkpoint", checkpoint, "--input", str(volumes / "imagesTr"), "--output", str(masks)]
    code, seconds, log = medseg([*args, *flags], work / "infer.log")
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
