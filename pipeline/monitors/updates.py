"""WeightUpdateMonitor: how far each layer's weights move in an epoch, and which layers do not learn.

Key: ``update/<layer>`` = ||W_end - W_start|| / ||W_start|| over the layer's parameters for one
training epoch (logged at the epoch's end). A layer below ``min_update`` is reported as not
learning: the "weights stay constant over epochs" symptom of vanished gradients or a dead unit.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from pipeline.monitors.layers import Layer, grouped_norms, layer_index, monitored_net, parameter_layers
from pipeline.monitors.outputs import log_scalars


class WeightUpdateMonitor(pl.Callback):
    """Per layer and epoch, the relative weight update; warns once about layers that do not learn.

    Keeps one copy of the weights from the start of a measured epoch (the parameters' memory
    again); the end-of-epoch norms come from fused ``torch._foreach_norm`` calls and one host copy.
    Layers whose parameters are all frozen (``requires_grad=False``) are skipped.

    Args:
        every_n_epochs: measure every this many epochs (the first included); 0 turns it off.
        min_update: a relative update below this marks a layer as not learning.
    """

    def __init__(self, every_n_epochs: int = 1, min_update: float = 1e-6) -> None:
        if every_n_epochs < 0 or not min_update > 0:
            raise ValueError(
                f"every_n_epochs must be >= 0 (0: off) and min_update > 0, got {every_n_epochs}, {min_update}"
            )
        self.every_n_epochs = every_n_epochs
        self.min_update = min_update
        self.layers: list[Layer] = []
        self._start: list[torch.Tensor] | None = None
        self.last: dict[str, float] = {}
        self.not_learning: dict[str, int] = {}  # layer -> first epoch it was found below min_update
        self._warned = False

    def _due(self, trainer: pl.Trainer) -> bool:
        n = self.every_n_epochs
        return bool(n) and trainer.current_epoch % n == 0 and trainer.is_global_zero

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = parameter_layers(monitored_net(pl_module))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer) and self.layers:
            self._start = [p.detach().clone() for layer in self.layers for p in layer.params]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None:
            return
        start, self._start = self._start, None
        params = [p.detach() for layer in self.layers for p in layer.params]
        index = layer_index(self.layers, params[0].device)
        n = len(self.layers)
        start_norms = grouped_norms(start, index, n)
        torch._foreach_sub_(start, params)  # reuse the copy for the differences
        norms = torch.cat([start_norms, grouped_norms(start, index, n)]).tolist()  # one host sync
        before, moved = norms[:n], norms[n + 1 : 2 * n + 1]
        self.last = {}
        for layer, b, m in zip(self.layers, before, moved, strict=True):
            if any(p.requires_grad for p in layer.params):
                self.last[layer.name] = m / b if b > 0 else (0.0 if m == 0 else float("inf"))
        log_scalars(trainer, {f"update/{name}": value for name, value in self.last.items()})
        stuck = [name for name, value in self.last.items() if value < self.min_update]
        for name in stuck:
            self.not_learning.setdefault(name, trainer.current_epoch)
        if stuck and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{len(stuck)} layer(s) not learning in epoch {trainer.current_epoch} (relative weight "
                f"update below {self.min_update:g}): {', '.join(stuck[:8])}{' ...' if len(stuck) > 8 else ''}"
            )

    def state_dict(self) -> dict:
        """The last measurement and the not-learning record. (A run resumed in the middle of an
        epoch has no start-of-epoch copy of the weights, so that epoch goes unmeasured.)"""
        return {"last": self.last, "not_learning": self.not_learning, "warned": self._warned}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last, self.not_learning = dict(state_dict["last"]), dict(state_dict["not_learning"])
        self._warned = state_dict["warned"]

    def summary(self) -> dict:
        """Last epoch's relative updates and the layers found not learning, for ``summary.json``."""
        return {
            "min_update": self.min_update,
            "last": self.last,
            "not_learning": [name for name, value in self.last.items() if value < self.min_update],
            "not_learning_since_epoch": self.not_learning,
        }
