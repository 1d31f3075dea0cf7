"""Divergence guard: stop training at the first optimiser step whose loss or gradient is not finite.

Each step's loss and global gradient norm are checked after the backward pass and before the
optimiser step (and before gradient clipping, which would hide an infinite norm). How often the
host looks (``pipeline.training.checks``):

- every step (the default on a CPU, where a host read is free): training stops at the bad step
  itself, before its update is applied;
- every ``every_n_steps`` steps (the default on a GPU: 50): the device keeps a flag and the first
  bad step, and training stops within N steps, naming that first step. The host also looks
  before every checkpoint is written and at every epoch's end (before validation), so no
  checkpoint ever holds the non-finite weights: ``last.ckpt`` and ``best.ckpt`` stay as they were.

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
from pipeline.training.checks import Reading, StepChecks
from pipeline.training.resume import last_checkpoint_path

log = logging.getLogger(__name__)


def gradient_norm(optimizer: torch.optim.Optimizer) -> Tensor:
    """Global L2 norm of the gradients the optimiser is about to apply (0-d tensor; inf/NaN kept).

    One fused ``torch._foreach_norm`` over all gradients, on their device, with no host read.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm([g.detach() for g in grads])
    return torch.linalg.vector_norm(torch.stack(norms).float())


class DivergenceGuard(pl.Callback):
    """Raises ``TrainingDiverged`` at the first step with a non-finite loss or gradient norm.

    With fp16 mixed precision the gradient scaler produces and skips infinite gradients by design,
    so only the loss is checked there.

    Args:
        every_n_steps: optimiser steps between host reads of the flags; None: every step on a CPU,
            every 50 on a GPU (see the module docstring).
        checks: the ``StepChecks`` shared with ``SigtermCheckpoint`` (``medseg fit`` passes one, so
            both flags travel in one read); default: the guard's own.
    """

    def __init__(self, every_n_steps: int | None = None, checks: StepChecks | None = None) -> None:
        if checks is not None and every_n_steps is not None:
            raise ValueError("give every_n_steps to the shared StepChecks, not to DivergenceGuard")
        self.checks = checks or StepChecks(every_n_steps)
        self._loss: Tensor | None = None
        self._where: dict[int, tuple[int, int]] = {}  # unread step -> (epoch, batch), host side
        self._interval = 1
        self.event: dict | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        norm = gradient_norm(optimizer)
        loss = self._loss if self._loss is not None else torch.zeros((), device=norm.device)
        bad = ~torch.isfinite(loss)
        if getattr(trainer.precision_plugin, "scaler", None) is None:  # fp16: the scaler skips inf steps
            bad = bad | ~torch.isfinite(norm.to(loss.device))
        step = trainer.global_step
        self.checks.record(bad, step, loss, norm.to(loss.device))
        self._where[step] = (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx)
        self._interval = self.checks.interval(loss.device)
        if self._interval == 1:  # exact: look now, before the update is applied
            self._stop_if_diverged(trainer, optimizer, self.checks.read(trainer, "step", through=step + 1))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        unread = self.checks.unread(trainer)
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch  # before validation runs
        if unread and (last or unread >= self._interval):
            self._stop_if_diverged(trainer, trainer.optimizers[0], self.checks.read(trainer, "batch_end"))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        # Raising here, while Lightning assembles the checkpoint, means the file is never written.
        if self.checks.unread(trainer):
            self._stop_if_diverged(trainer, trainer.optimizers[0], self.checks.read(trainer, "save"))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_diverged(trainer, trainer.optimizers[0], self.checks.read(trainer, "epoch_end"))

    def _stop_if_diverged(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, reading: Reading
    ) -> None:
        step = reading.first_bad_step
        if step is None:
            self._where.clear()
            return
        loss, norm = self.checks.first_values()
        raise TrainingDiverged(self._describe(trainer, optimizer, step, loss, norm))

    def _describe(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, step: int, loss: float, norm: float
    ) -> str:
        lr = optimizer.param_groups[0]["lr"]
        exact = step == trainer.global_step  # found before its update: the weights are the last good ones
        weights_finite = exact and all(
            torch.isfinite(p).all() for group in optimizer.param_groups for p in group["params"]
        )
        if exact and not weights_finite:
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
        epoch, batch = self._where.get(step, (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx))
        self.event = {
            "step": step,
            "epoch": epoch,
            "batch": batch,
            "found_at_step": trainer.global_step,
            "loss": loss if math.isfinite(loss) else str(loss),
            "grad_norm": norm if math.isfinite(norm) else str(norm),
            "lr": lr,
            "cause": cause,
            "checkpoint": last or None,
        }
        applied = "No update was applied" if exact else (
            f"Found at step {trainer.global_step} (checked every {self._interval} steps); the weights "
            f"since step {step} were never saved"
        )  # fmt: skip
        return (
            f"training diverged at step {step} (epoch {epoch}, batch {batch}): loss {loss:.4g}, gradient "
            f"norm {norm:.4g}. Likely cause: {cause}. {applied} and {kept}"
        )

    def summary(self) -> dict:
        """``{"diverged": False}``, or the step, loss, gradient norm, cause and kept checkpoint."""
        return {"diverged": True, **self.event} if self.event else {"diverged": False}
