"""Divergence guard: stop at the first optimiser step whose loss or gradient is not finite.

The check runs after the backward pass and before the optimiser step (and before gradient
clipping, which would hide an infinite norm), so the bad update is never applied and no
checkpoint with NaN weights is ever written: ``last.ckpt`` and ``best.ckpt`` stay as they were.
Training ends with ``TrainingDiverged``, whose message names the step and the likely cause;
``medseg`` prints it and exits 1, and ``summary.json`` records it under ``DivergenceGuard``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from pipeline.errors import TrainingDiverged
from pipeline.training.resume import last_checkpoint_path

log = logging.getLogger(__name__)


def gradient_norm(optimizer: torch.optim.Optimizer) -> Tensor:
    """Global L2 norm of the gradients the optimiser is about to apply (0-d tensor; inf/NaN kept)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
    )


class DivergenceGuard(pl.Callback):
    """Raises ``TrainingDiverged`` at the first step with a non-finite loss or gradient norm.

    Costs one host-device synchronisation per step (and, under DDP, one all-reduce of a flag so
    every rank stops at the same step). With fp16 mixed precision the gradient scaler produces
    and skips infinite gradients by design, so only the loss is checked there.
    """

    def __init__(self) -> None:
        self._loss: Tensor | None = None
        self.event: dict | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss = float(self._loss) if self._loss is not None else 0.0
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        norm = float("nan") if scaled else float(gradient_norm(optimizer))
        bad = not math.isfinite(loss) or (not scaled and not math.isfinite(norm))
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise TrainingDiverged(self._describe(trainer, optimizer, loss, norm))

    def _describe(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, loss: float, norm: float
    ) -> str:
        lr = optimizer.param_groups[0]["lr"]
        weights_finite = all(
            torch.isfinite(p).all() for group in optimizer.param_groups for p in group["params"]
        )
        if not weights_finite:
            cause = f"the previous update overflowed the weights: the learning rate ({lr:.3g}) is too high"
        elif not math.isfinite(loss):
            cause = (
                f"the learning rate ({lr:.3g}) is too high for this model and data, or an input holds "
                "extreme values; lower model.lr or lengthen model.warmup_epochs"
            )
        else:
            clip = trainer.gradient_clip_val
            clipping = f"clipped at norm {clip}" if clip else "not clipped"
            cause = (
                f"exploding gradients (the loss is finite, the gradient norm is not; gradients are "
                f"{clipping}): lower model.lr ({lr:.3g}) or set trainer.gradient_clip_val"
            )
        last = str(last_checkpoint_path(trainer))
        if not Path(last).is_file():
            last = getattr(trainer.checkpoint_callback, "best_model_path", "")
        kept = f"the last good checkpoint is kept: {last}" if last else "no checkpoint was written yet"
        self.event = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch": trainer.fit_loop.epoch_loop.batch_idx,
            "loss": loss if math.isfinite(loss) else str(loss),
            "grad_norm": norm if math.isfinite(norm) else str(norm),
            "lr": lr,
            "cause": cause,
            "checkpoint": last or None,
        }
        return (
            f"training diverged at step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{self.event['batch']}): loss {loss:.4g}, gradient norm {norm:.4g}. Likely cause: {cause}. "
            f"No update was applied and {kept}"
        )

    def summary(self) -> dict:
        """``{"diverged": False}``, or the step, loss, gradient norm, cause and kept checkpoint."""
        return {"diverged": True, **self.event} if self.event else {"diverged": False}
