"""Where a run lives: ``RunConfig`` (the ``run:`` section of a config) and the run directory.

Every fit writes ``runs/<experiment>/<run_name>/``: ``config.yaml``, ``split.json``,
``checkpoints/{best,last}.ckpt``, ``metrics.csv``, ``summary.json`` and the W&B files.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunConfig:
    """Where a run is written and how it is tracked.

    Args:
        experiment: experiment name: the folder under ``root`` and the W&B group.
        name: run name; default derived from the variant and seed (``unet-noskip-sigmoid-xavier-s0``).
        root: folder holding all experiments.
        wandb: log to Weights & Biases (online with a key, offline otherwise).
        project: W&B project.
        tags: extra W&B tags (the variant's knobs are always added).
        log_model: upload checkpoints as W&B artifacts (``true``: at the end, ``all``: every save).
        sync_every_n_steps: optimiser steps between the host's reads of per-step device values:
            the divergence and SIGTERM flags (``pipeline.training.checks``) and the progress bar's
            loss; null: every step on a CPU, every 50 on a GPU, where each read waits for the GPU.
    """

    experiment: str = "default"
    name: str | None = None
    root: str = "runs"
    wandb: bool = True
    project: str = "medseg"
    tags: list[str] = field(default_factory=list)
    log_model: bool | str = False
    sync_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        if self.sync_every_n_steps is not None and self.sync_every_n_steps < 1:
            raise ValueError(
                f"run.sync_every_n_steps must be null (every step on a CPU, 50 on a GPU) or >= 1, "
                f"got {self.sync_every_n_steps}"
            )
