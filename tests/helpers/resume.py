"""Helpers for tests that run ``medseg fit`` and interrupt it: a signal at a chosen step, configs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import yaml
from torch import Tensor

from pipeline.training.checkpoint import load_checkpoint
from tests.conftest import REPO, fit_args

BEST = {  # as in configs/default.yaml
    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
    "init_args": {
        "monitor": "val/dice",
        "mode": "max",
        "filename": "best",
        "auto_insert_metric_name": False,
        "enable_version_counter": False,
    },
}

# The monitors whose state a resumed run continues (their history is in the checkpoint).
MONITORS = [
    {"class_path": "pipeline.monitors.gradients.GradientFlowMonitor"},
    {"class_path": "pipeline.monitors.updates.WeightUpdateMonitor"},
]


def last_every(n_steps: int) -> dict:
    """configs/default.yaml's ``last.ckpt`` callback; ``n_steps`` > 0 writes it every that many steps instead."""
    triggers = {"every_n_train_steps": n_steps} if n_steps else {}
    return {
        "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
        "init_args": {"filename": "last", "enable_version_counter": False, **triggers},
    }


def kill_at(step: int, signal_name: str) -> dict:
    return {
        "class_path": "tests.helpers.resume.KillAtStep",
        "init_args": {"step": step, "signal_name": signal_name},
    }


class KillAtStep(pl.Callback):
    """Sends a signal to its own process in the middle of optimiser step ``step`` (after the forward pass).

    Args:
        step: the ``trainer.global_step`` at which to signal.
        signal_name: ``SIGKILL`` (no clean-up at all) or ``SIGTERM`` (pre-emption).
    """

    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step = step
        self.signum = getattr(signal, signal_name)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def run_args(data: Path, runs: Path, callbacks: list[dict], *extra: str) -> list[str]:
    """``medseg fit`` arguments: 2 epochs of 3 steps, dropout (so per-batch seeding matters), the given callbacks."""
    runs.mkdir(parents=True, exist_ok=True)
    config = runs / f"callbacks-{len(list(runs.glob('callbacks-*.yaml')))}.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return fit_args(
        data,
        runs,
        "-c",
        str(config),
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "3",
        "--data.batch_size",
        "2",
        "--model.net.init_args.dropout",
        "0.1",
        "--model.hd95",
        "false",
        "--trainer.deterministic",
        "true",
        "--run.experiment",
        "resume",
        *extra,
    )


def start_fit(args: list[str]) -> subprocess.Popen:
    """``python -m pipeline`` with ``args`` in a child process group (stdout/stderr captured as text)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "CUDA_VISIBLE_DEVICES": ""}
    # Its own W&B service: through this process's (inherited WANDB_SERVICE) a killed child's run
    # would stay registered there, and resuming it here would fail with "run ID ... is in use".
    env.pop("WANDB_SERVICE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: DDP workers included in a kill on timeout
    )


def finish(child: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for ``child``: (exit code, stderr). A hang (e.g. a DDP deadlock) kills its group and fails."""
    try:
        _, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        _, err = child.communicate()
        raise AssertionError(f"medseg fit hung for {timeout} s and was killed:\n{err[-3000:]}") from None
    return child.returncode, err


def final_state(run: Path, steps: int = 6) -> tuple[dict, float, list[tuple[int, float]], dict]:
    """The last checkpoint's weights, the final val/dice, metrics.csv's (step, train loss) rows and
    the monitors' summaries, after checking that the run completed 2 epochs in ``steps`` steps."""
    weights = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == steps and summary["epochs"] == 2
    with (run / "metrics.csv").open() as f:
        losses = [
            (int(r["step"]), float(r["train/loss_step"])) for r in csv.DictReader(f) if r["train/loss_step"]
        ]
    monitors = {k: summary.get(k) for k in ("GradientFlowMonitor", "WeightUpdateMonitor")}
    return weights, summary["final"]["val/dice"], losses, monitors


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
