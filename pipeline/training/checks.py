"""The per-step safety flags of a fit, read by the host together, every N steps on a GPU.

Reading a device value on the host (``float(loss)``, ``.item()``) waits for every kernel queued
before it: once a step, that stalls a GPU between steps. So the divergence guard records a
non-finite step on the device, with no host read, and ``StepChecks`` copies the flags to the
host in one transfer every ``every_n_steps`` optimiser steps (after one all-reduce under DDP, so
every rank acts on the same values at the same step). The SIGTERM request rides along in that
all-reduce. On a CPU a read is free, so the default there is every step (exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import Tensor

ACCELERATOR_EVERY_N_STEPS = 50  # on a GPU: ~1 s of 20 ms steps between reads
NO_STEP = -(2**62)  # "no non-finite step yet", as the negated step the all-reduce maximises


@dataclass(frozen=True)
class Reading:
    """What one read found, the same on every rank.

    Attributes:
        first_bad_step: the first optimiser step whose loss or gradient was not finite, or None.
        stop: a SIGTERM arrived on some rank.
    """

    first_bad_step: int | None = None
    stop: bool = False


class StepChecks:
    """Flags raised during training steps, read by the host together (see the module docstring).

    ``DivergenceGuard`` records each optimiser step's finiteness with ``record`` (device ops only),
    ``SigtermCheckpoint`` sets ``stop_requested`` from its signal handler; both call ``read``,
    which runs at most once per place and step, so sharing one ``StepChecks`` costs one read.

    Args:
        every_n_steps: optimiser steps between reads; None: 1 on a CPU, 50 on an accelerator.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                f"every_n_steps must be None (1 on a CPU, 50 on a GPU) or >= 1, got {every_n_steps}"
            )
        self.every_n_steps = every_n_steps
        self.stop_requested = False  # set by a signal handler: host memory, no device involved
        self.reading = Reading()
        self._first: Tensor | None = None  # 0-d int64 on the device: -(first non-finite step) or NO_STEP
        self._values: Tensor | None = None  # (2,) float32: loss and gradient norm at that step
        self._read_through = 0  # optimiser steps whose flags have been read
        self._read_at: tuple[str, int] | None = None

    def interval(self, device: torch.device) -> int:
        """Optimiser steps between reads on ``device``."""
        if self.every_n_steps is not None:
            return self.every_n_steps
        return 1 if device.type == "cpu" else ACCELERATOR_EVERY_N_STEPS

    def record(self, bad: Tensor, step: int, loss: Tensor, norm: Tensor) -> None:
        """Note optimiser step ``step``: ``bad`` (0-d bool), its ``loss`` and gradient ``norm``; device ops only."""
        if self._first is None or self._values is None or self._first.device != bad.device:
            # once per fit; a fill, not a copy
            self._first = torch.full((), NO_STEP, dtype=torch.int64, device=bad.device)
            self._values = torch.zeros(2, device=bad.device)
        first = bad & (self._first == NO_STEP)
        self._first = torch.where(first, -step, self._first)  # negated: the all-reduce takes the max
        self._values = torch.where(first, torch.stack([loss.detach().float(), norm.float()]), self._values)

    def unread(self, trainer: pl.Trainer) -> int:
        """Optimiser steps taken since the last read."""
        return trainer.global_step - self._read_through

    def read(self, trainer: pl.Trainer, place: str, through: int | None = None) -> Reading:
        """Copy the flags to the host (under DDP after one all-reduce, so all ranks agree).

        Args:
            place: where in the loop the read is (``step``, ``batch_end``, ``save``, ``epoch_end``):
                a second call at the same place and step returns the first one's reading.
            through: the optimiser steps the read covers (default ``trainer.global_step``; the
                step in flight counts when it is read before its update).
        """
        key = (place, trainer.global_step)
        if key == self._read_at:
            return self.reading
        first = self._first
        if first is None:
            first = torch.full((), NO_STEP, dtype=torch.int64, device=trainer.strategy.root_device)
        flags = torch.stack([first, torch.full_like(first, int(self.stop_requested))])
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # Lightning's strategy.reduce puts a barrier (a second collective) before its all-reduce
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        negative_first, stop = flags.tolist()  # the one host sync
        self.reading = Reading(None if negative_first == NO_STEP else -negative_first, bool(stop))
        self._read_at = key
        self._read_through = trainer.global_step if through is None else through
        return self.reading

    def first_values(self) -> tuple[float, float]:
        """This rank's loss and gradient norm at the first non-finite step (a host read: call on failure)."""
        if self._values is None:
            return float("nan"), float("nan")
        loss, norm = self._values.tolist()
        return loss, norm
