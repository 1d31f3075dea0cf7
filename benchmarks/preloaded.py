"""``medseg fit`` over batches held in memory: the training benchmarks' way to leave data loading out.

``preload`` makes the batches with the training loader ``medseg fit`` would use (2D images, or 3D
patches of volumes at their planned patch and batch; in pinned host memory where CUDA is
available, as the loader hands them over there); ``preloaded_fit`` runs medseg's own entry point
with that loader swapped for the batches, plus any callbacks that time or count its steps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar
from unittest import mock

import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader

from pipeline.cli import lightning as cli
from pipeline.data.datamodule import SegmentationDataModule
from pipeline.data.planning.planner import NetworkRequest
from pipeline.data.planning.rules import DEFAULT_FEATURES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIGS_OF = {2: ("model/unet", "data/synthetic"), 3: ("model/unet3d", "data/msd")}  # by spatial dims


class PreloadedFitCLI(cli.MedsegCLI):
    """``medseg fit`` whose training loader yields ``batches`` (already in memory), with
    ``extra_callbacks`` added to its callbacks."""

    batches: ClassVar[list[dict]] = []
    extra_callbacks: ClassVar[list[pl.Callback]] = []

    def _run_subcommand(self, subcommand: str | None) -> None:
        self.datamodule.train_dataloader = lambda: DataLoader(self.batches, batch_size=None)
        self.trainer.callbacks.extend(self.extra_callbacks)
        super()._run_subcommand(subcommand)


def model_init_args(model: str = "model/unet") -> dict:
    """A model config's network arguments (default ``configs/model/unet.yaml``)."""
    return yaml.safe_load((CONFIGS / f"{model}.yaml").read_text())["model"]["net"]["init_args"]


def preload(
    root: Path,
    batch_size: int | None,
    count: int,
    features: Sequence[int] = DEFAULT_FEATURES,
    spatial_dims: int = 2,
    **settings,
) -> tuple[list[dict], SegmentationDataModule]:
    """``count`` augmented training batches of the data set at ``root``, as the training loader
    makes them (cycling through its epochs as needed), and its data module: volumes are planned
    first for a ``spatial_dims`` network of ``features`` widths (patch, batch and strides left
    unset in ``settings``, ``SegmentationDataModule`` arguments, are filled in)."""
    data = SegmentationDataModule(root=str(root), batch_size=batch_size, num_workers=0, **settings)
    data.resolve_plan(NetworkRequest(spatial_dims, tuple(features)))  # nothing for 2D images
    data.setup("fit")
    batches: list[dict] = []
    while len(batches) < count:
        batches += list(data.train_dataloader())
    if torch.cuda.is_available():  # pinned, as the training loader hands them over on a GPU
        batches = [{k: pinned(v) for k, v in batch.items()} for batch in batches]
    return batches[:count], data


def pinned(value: object) -> object:
    """A host tensor in page-locked memory (its copy to the GPU can run asynchronously); other
    values as they are."""
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.is_pinned():
        return value.pin_memory()
    return value


def preloaded_fit(
    work: Path,
    root: Path,
    batches: list[dict],
    callbacks: list[pl.Callback],
    extra: list[str],
    configs: Sequence[str] = CONFIGS_OF[2],
) -> None:
    """One ``medseg fit`` (``configs/default.yaml`` and ``configs``, run by medseg's own entry point)
    over ``batches``, with ``callbacks`` added; ``extra`` flags go last (``--trainer.enable_progress_bar true`` ...)."""
    PreloadedFitCLI.batches, PreloadedFitCLI.extra_callbacks = batches, callbacks
    args = ["fit", *(a for c in ("default", *configs) for a in ("-c", str(CONFIGS / f"{c}.yaml")))]
    args += ["--data.root", str(root)]
    args += ["--data.num_workers", "0", "--data.batch_size", str(len(batches[0]["image"]))]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(len(batches))]
    args += ["--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.enable_model_summary", "false"]
    # the same run again on every repeat: each replaces the last (they are measurements, not results)
    args += ["--run.root", str(work / "runs"), "--run.name", "bench", "--run.overwrite", "true", *extra]
    with mock.patch.object(cli, "MedsegCLI", PreloadedFitCLI):
        cli.run_lightning(args)


def planned_network(data: SegmentationDataModule, dims: int) -> tuple[dict, list[str]]:
    """The planned patch, strides and kernel sizes of volumes: the bare networks' arguments and the
    fit's flags that give it the same (nothing for 2D images)."""
    if data.plan is None:
        return {}, []
    net = data.plan.network(dims)
    init = {"strides": [list(s) for s in net.strides], "kernel_sizes": [list(k) for k in net.kernel_sizes]}
    flags = ["--data.patch_size", json.dumps(list(data.patch_size))]
    flags += [
        arg for key, value in init.items() for arg in (f"--model.net.init_args.{key}", json.dumps(value))
    ]
    return init, flags
