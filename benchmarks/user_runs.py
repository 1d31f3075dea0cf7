"""``make train`` and ``medseg infer`` end to end, as a user runs them: child processes, real files.

``gpu_check.py`` runs both on a GPU (and in its CPU dry run), with the 2D UNet on phantoms and the
3D UNet on generated volumes: exit status, seconds, what the run wrote, whether the weights
trained channels-last (the checkpoint keeps their strides), and the warnings that only a GPU run
shows (DDP's stride mismatch) counted in the log.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.run.naming import dataset_name

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
STRIDE_WARNING = "Grad strides do not match bucket view strides"


TIMED_OUT = 124  # the exit status recorded for a child stopped at its time limit, as timeout(1) gives


def medseg(args: list[str], log: Path, timeout: float | None = None) -> tuple[int, float, str]:
    """``python -m pipeline <args>`` in a child process: (exit status, seconds, its output). After
    ``timeout`` seconds the child and its own children (loader workers) are killed and the status
    is ``TIMED_OUT``."""
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=REPO,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group, so a kill reaches its workers too
        )
        try:
            code = child.wait(timeout=None if timeout is None else max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            code = TIMED_OUT
    return code, round(time.perf_counter() - start, 1), log.read_text()


def seconds_left(deadline: float | None) -> float | None:
    """Seconds to ``deadline`` (a ``time.perf_counter()`` value; None: no limit)."""
    return None if deadline is None else deadline - time.perf_counter()


def train(
    work: Path,
    count: int,
    batches: int,
    flags: list[str],
    spatial_dims: int = 2,
    deadline: float | None = None,
) -> dict:
    """``make train``'s command (the default configs; ``MODEL=unet3d DATA=msd`` for ``spatial_dims``
    3) for one epoch of at most ``batches`` steps on ``count`` images from ``medseg data synth``
    (3D: volumes, ``--volumes``), with more medseg ``flags``; its children are killed at
    ``deadline`` (``time.perf_counter()``; ``timed_out`` then true)."""
    tag = "" if spatial_dims == 2 else "3d"
    data, runs, name = work / f"train{tag}-data", work / "runs", f"gpu-check{tag}"
    synth = ["data", "synth", "--output", str(data), "--num-images", str(count)]
    made, _, _ = medseg(
        [*synth, *(["--volumes"] if tag else [])], work / f"synth{tag}.log", seconds_left(deadline)
    )
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
    fit = [*args, "--trainer.enable_progress_bar", "false", *flags]
    code, seconds, log = (
        medseg(fit, log_file, seconds_left(deadline)) if made != TIMED_OUT else (TIMED_OUT, 0.0, "")
    )
    run = runs / "default" / dataset_name(data) / name
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    last = run / "checkpoints" / "last.ckpt"
    weights = torch.load(last, weights_only=True)["state_dict"].values() if last.is_file() else []
    # conv weights, where the two layouts differ
    convs = [w for w in weights if w.ndim == spatial_dims + 2 and min(w.shape[1:]) > 1]
    layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    return {
        "exit": code,
        "timed_out": code == TIMED_OUT,
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


def infer(
    work: Path, checkpoint: str, cases: int, flags: list[str], tag: str = "", deadline: float | None = None
) -> dict:
    """``medseg infer`` with ``checkpoint`` on ``cases`` volumes from ``medseg data synth --volumes``
    (in folders named with ``tag``, so several checkpoints' runs keep apart); its children are
    killed at ``deadline`` (``time.perf_counter()``; ``timed_out`` then true)."""
    volumes, masks = work / f"volumes{tag}", work / f"masks{tag}"
    made, _, _ = medseg(
        ["data", "synth", "--volumes", "--output", str(volumes), "--num-images", str(cases)],
        work / f"v{tag}.log",
        seconds_left(deadline),
    )
    args = ["infer", "--checkpoint", checkpoint, "--input", str(volumes / "imagesTr"), "--output", str(masks)]
    code, seconds, log = (
        medseg([*args, *flags], work / f"infer{tag}.log", seconds_left(deadline))
        if made != TIMED_OUT
        else (TIMED_OUT, 0.0, "")
    )
    table = masks / "predictions.csv"
    rows = list(csv.DictReader(table.open())) if table.is_file() else []
    ok = sum(row["status"] == "ok" for row in rows)
    return {
        "exit": code,
        "timed_out": code == TIMED_OUT,
        "seconds": seconds,
        "cases": cases,
        "ok": ok,
        "cases_per_s": round(ok / seconds, 3) if seconds else 0.0,
        "log_tail": log[-2000:] if code else "",
    }
