"""GradientFlowMonitor: per-layer gradient norms, vanishing/exploding detection, depth plots.

Keys (every ``log_every_n_steps`` optimiser steps, to W&B and ``metrics.csv``): ``grad/<layer>``
(L2 norm of the layer's gradient), ``grad/global`` (L2 norm over all parameters) and
``grad/first_last_ratio`` (first conv layer's norm / last conv layer's norm, the head for our
networks). Layers are those of ``pipeline.monitors.layers``. Each epoch the depth profile (mean
norm of each layer over the epoch's logs) and a layer x step heatmap go to ``<run>/plots/`` and W&B.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from pipeline.monitors.layers import Layer, grouped_norms, layer_index, monitored_net, parameter_layers
from pipeline.monitors.outputs import log_media, log_scalars, plot_dir, wandb_run
from pipeline.monitors.plots import depth_profile_png, heatmap_png

MAX_EVENTS = 10  # exploding-gradient steps kept for summary.json (the count is kept in full)


def _number(x: float) -> float | str:
    """JSON-safe float: non-finite values as strings ("inf", "nan")."""
    return x if math.isfinite(x) else str(x)


class GradientFlowMonitor(pl.Callback):
    """Logs per-layer gradient norms and warns about vanishing or exploding gradients.

    Norms are taken in ``on_before_optimizer_step``, where gradients are final: accumulated,
    unscaled by a mixed-precision grad scaler, not yet clipped. All norms of a step come from one
    fused ``torch._foreach_norm`` and one device-to-host copy.

    Args:
        log_every_n_steps: log every this many optimiser steps (step 0 included); None follows
            the trainer's ``log_every_n_steps``; 0 turns the monitor off.
        vanishing_ratio: ``grad/first_last_ratio`` below this counts as vanishing.
        vanishing_patience: consecutive logs below ``vanishing_ratio`` before the one warning.
        exploding_norm: a global norm above this (or non-finite) is reported as exploding.
        plot_every_n_epochs: depth profile and heatmap every this many epochs; 0: never.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        vanishing_ratio: float = 1e-3,
        vanishing_patience: int = 3,
        exploding_norm: float = 1e3,
        plot_every_n_epochs: int = 1,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 0:
            raise ValueError(
                f"log_every_n_steps must be None (the trainer's), 0 (off) or > 0, got {log_every_n_steps}"
            )
        if not vanishing_ratio > 0 or not exploding_norm > 0:
            raise ValueError("vanishing_ratio and exploding_norm must be > 0")
        if vanishing_patience < 1 or plot_every_n_epochs < 0:
            raise ValueError("vanishing_patience must be >= 1 and plot_every_n_epochs >= 0 (0: no plots)")
        self.log_every_n_steps = log_every_n_steps
        self.vanishing_ratio = vanishing_ratio
        self.vanishing_patience = vanishing_patience
        self.exploding_norm = exploding_norm
        self.plot_every_n_epochs = plot_every_n_epochs
        self.layers: list[Layer] = []
        self._params: list[torch.nn.Parameter] = []
        self._param_layer: list[int] = []
        self._index: torch.Tensor | None = None
        self.steps: list[int] = []
        self.epochs: list[int] = []  # the training epoch of each log
        self.history: list[np.ndarray] = []  # one (num_layers,) row per log, NaN where no gradient
        self.ratios: list[float] = []
        self.global_norms: list[float] = []
        self._below: list[int] = []  # steps of the current run of logs below vanishing_ratio
        self.vanishing: dict | None = None
        self.exploding: list[dict] = []
        self.exploding_count = 0
        self.overflow_count = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = parameter_layers(monitored_net(pl_module))
        self._params = [p for layer in self.layers for p in layer.params]
        self._param_layer = [i for i, layer in enumerate(self.layers) for _ in layer.params]
        self._index = None

    def _every(self, trainer: pl.Trainer) -> int:
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        # Lightning's logger connector sets trainer.log_every_n_steps; the Trainer class does not declare it
        return int(trainer.log_every_n_steps)  # type: ignore[attr-defined]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        every = self._every(trainer)
        if not every or trainer.global_step % every or not trainer.is_global_zero or not self._params:
            return
        grads = [p.grad for p in self._params]
        if self._index is None:
            self._index = layer_index(self.layers, self._params[0].device)
        index, present = self._index, list(range(len(self.layers)))
        found = [g for g in grads if g is not None]
        if len(found) < len(grads):  # frozen or unused parameters: their layers sit this one out
            keep = [i for i, g in enumerate(grads) if g is not None]
            if not keep:
                return
            index = self._index[torch.tensor(keep, device=self._index.device)]
            present = sorted({self._param_layer[i] for i in keep})
        *norms, total = grouped_norms(found, index, len(self.layers)).tolist()  # the one host sync
        has_grad = np.zeros(len(self.layers), dtype=bool)
        has_grad[list(present)] = True
        self._record(trainer, np.where(has_grad, norms, np.nan), has_grad, total)

    def _record(self, trainer: pl.Trainer, row: np.ndarray, has_grad: np.ndarray, total: float) -> None:
        """Log one step's layer norms ``row`` (NaN where ``has_grad`` is False) and run the checks."""
        step = trainer.global_step
        metrics = {f"grad/{self.layers[i].name}": float(row[i]) for i in np.flatnonzero(has_grad)}
        metrics["grad/global"] = total
        convs = [i for i, layer in enumerate(self.layers) if layer.conv and has_grad[i]]
        ratio = math.nan
        if len(convs) >= 2 and row[convs[-1]] > 0:
            ratio = float(row[convs[0]] / row[convs[-1]])
            metrics["grad/first_last_ratio"] = ratio
        log_scalars(trainer, metrics)
        self.steps.append(step)
        self.epochs.append(trainer.current_epoch)
        self.history.append(row)
        self.ratios.append(ratio)
        self.global_norms.append(total)
        self._check_vanishing(step, ratio, convs)
        self._check_exploding(trainer, step, total)

    def _check_vanishing(self, step: int, ratio: float, convs: list[int]) -> None:
        self._below = [*self._below, step] if ratio < self.vanishing_ratio else []
        if self.vanishing is not None or len(self._below) < self.vanishing_patience:
            return
        first, last = self.layers[convs[0]].name, self.layers[convs[-1]].name
        message = (
            f"vanishing gradients in the early layers: grad/first_last_ratio ({first} / {last}) stayed "
            f"below {self.vanishing_ratio:g} for {len(self._below)} consecutive logs (steps "
            f"{self._below[0]}-{step}, now {ratio:.2e}); long skips, residual blocks, ReLU-family "
            "activations, normalisation or He init let the gradient reach the first layers"
        )
        self.vanishing = {"step": step, "since_step": self._below[0], "ratio": ratio, "message": message}
        rank_zero_warn(message)

    def _check_exploding(self, trainer: pl.Trainer, step: int, total: float) -> None:
        if math.isfinite(total) and total <= self.exploding_norm:
            return
        if not math.isfinite(total) and getattr(trainer.precision_plugin, "scaler", None) is not None:
            self.overflow_count += 1  # fp16 loss scaling: the scaler skips this step and lowers its scale
            return
        self.exploding_count += 1
        if len(self.exploding) < MAX_EVENTS:
            self.exploding.append({"step": step, "norm": _number(total)})
        if self.exploding_count == 1:
            rank_zero_warn(
                f"exploding gradients at step {step}: grad/global = {total:.3g} "
                f"({'non-finite' if not math.isfinite(total) else f'above {self.exploding_norm:g}'}); "
                "lower the learning rate, clip gradients (trainer.gradient_clip_val) or check the data"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.plot_every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0 and trainer.is_global_zero and self.history:
            self._plot(trainer)

    def profiles(self) -> list[tuple[int, np.ndarray]]:
        """(epoch, (num_layers,) mean norm of each layer over the epoch's logs) per logged epoch."""
        rows, epochs = np.stack(self.history), np.asarray(self.epochs)
        with warnings.catch_warnings():  # a layer without gradients all epoch stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return [(int(e), np.nanmean(rows[epochs == e], axis=0)) for e in np.unique(epochs)]

    def _plot(self, trainer: pl.Trainer) -> None:
        names = [layer.name for layer in self.layers]
        folder = plot_dir(trainer)
        profiles = self.profiles()
        depth_profile_png(folder / "grad_depth_profile.png", names, profiles, "mean gradient L2 norm")
        heatmap = heatmap_png(
            folder / "grad_heatmap.png", names, self.steps, np.stack(self.history).T, "gradient L2 norm"
        )
        if wandb_run(trainer) is None:
            return
        import wandb  # only with a W&B run: importing wandb costs about a second

        line = wandb.plot.line_series(
            xs=list(range(len(names))),
            ys=[np.nan_to_num(values, nan=0.0).tolist() for _, values in profiles],
            keys=[f"epoch {epoch}" for epoch, _ in profiles],
            title="mean gradient L2 norm by layer depth (input -> output)",
            xname="layer depth",
        )
        log_media(
            trainer, {"plots/grad_depth_profile": line, "plots/grad_heatmap": wandb.Image(str(heatmap))}
        )

    def state_dict(self) -> dict:
        """Everything logged so far (plain types and tensors, loadable with ``weights_only``), so a
        resumed run's plots, summary and vanishing check continue the interrupted run's."""
        return {
            "steps": self.steps,
            "epochs": self.epochs,
            "history": torch.from_numpy(np.stack(self.history)) if self.history else None,
            "ratios": self.ratios,
            "global_norms": self.global_norms,
            "below": self._below,
            "vanishing": self.vanishing,
            "exploding": self.exploding,
            "exploding_count": self.exploding_count,
            "overflow_count": self.overflow_count,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        history = state.pop("history")
        self.history = list(history.numpy()) if history is not None else []
        self._below = list(state.pop("below"))
        for name, value in state.items():
            setattr(self, name, value)

    def summary(self) -> dict:
        """The gradient summary for ``summary.json``."""
        ratios = [r for r in self.ratios if not math.isnan(r)]
        convs = [layer.name for layer in self.layers if layer.conv]
        return {
            "layers": len(self.layers),
            "first_conv_layer": convs[0] if convs else None,
            "last_conv_layer": convs[-1] if convs else None,
            "logs": len(self.steps),
            "first_last_ratio": {
                "start": ratios[0] if ratios else None,
                "end": ratios[-1] if ratios else None,
                "min": min(ratios) if ratios else None,
            },
            "global_norm": {
                "start": _number(self.global_norms[0]) if self.global_norms else None,
                "end": _number(self.global_norms[-1]) if self.global_norms else None,
                "max": _number(max(self.global_norms, key=lambda g: -math.inf if math.isnan(g) else g))
                if self.global_norms
                else None,
            },
            "vanishing": {"detected": self.vanishing is not None, **(self.vanishing or {})},
            "exploding": {
                "detected": bool(self.exploding_count),
                "count": self.exploding_count,
                "steps": self.exploding,
            },
            "grad_scaler_overflows": self.overflow_count,
        }
