"""``medseg fit | validate | test``: LightningCLI with medseg's run directory, loggers and safety nets.

What ``MedsegCLI`` adds to a plain LightningCLI, each a named step of ``instantiate_trainer``:
the run's identity and directory (``runs/<experiment>/<dataset>/<run>/``; a fresh fit never
writes into a directory holding another run), a preflight that reads the data and the checkpoint
before anything is written, the precision for the machine, atomic
weights-only checkpoint IO, the always-on callbacks (``always_on_callbacks``: their order
matters) and the loggers (W&B + the ``metrics.csv`` mirror, beside any logger of the config).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.plugins import CheckpointIO
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.cli.config_plan import plan_config
from pipeline.cli.progress_bar import ThrottledProgressBar
from pipeline.data.datamodule import SegmentationDataModule
from pipeline.models import net_knobs, net_spec, remember_spec
from pipeline.monitors.curves import TrainingCurves
from pipeline.run.directory import RunConfig, check_fresh_fit
from pipeline.run.loggers import build_loggers, finish_wandb, read_wandb_id
from pipeline.run.naming import RunIdentity, knob_tags, run_identity, variant_name
from pipeline.run.summary import RunSummary
from pipeline.training.checkpoint import SafeCheckpointIO, load_checkpoint
from pipeline.training.checks import StepChecks
from pipeline.training.guards import DivergenceGuard
from pipeline.training.module import SegmentationModule
from pipeline.training.precision import default_precision
from pipeline.training.resume import BatchSeed, SigtermCheckpoint

log = logging.getLogger("pipeline")


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested dict -> ``{"a.b.c": value}``."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class SaveAndLogConfig(SaveConfigCallback):
    """Writes ``config.yaml`` to the run directory and, in a fit, the flat config to every logger."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":  # validate/test keep the training run's W&B config as it is
            return
        config = flatten(self.config.as_dict())
        # The variant's knobs and size as plain config keys too, so W&B can filter and group by them.
        net = getattr(pl_module, "net", pl_module)
        config.update({f"variant.{k}": v for k, v in net_knobs(net).items()})
        config["variant.params"] = sum(p.numel() for p in net.parameters())
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


def always_on_callbacks(
    subcommand: str | None, identity: RunIdentity, run: RunConfig, seed: int | None
) -> list[Callback]:
    """The callbacks every fit gets, in this order: ``DivergenceGuard`` before ``RunSummary``, so its
    ``on_exception`` runs first and ``summary.json`` records it; ``SigtermCheckpoint`` after every
    other callback (Lightning still moves the ``ModelCheckpoint``s last), so an epoch-end save holds
    their epoch-end state. The guard and the SIGTERM handler share one ``StepChecks``, so their flags
    reach the host (and, under DDP, every rank) in one read. Validation and testing need none of them."""
    if subcommand != "fit":
        return []
    checks = StepChecks(run.sync_every_n_steps)
    summary = RunSummary(identity.directory, identity.name, run.experiment, seed, identity.dataset)
    return [DivergenceGuard(checks=checks), BatchSeed(), TrainingCurves(), summary, SigtermCheckpoint(checks)]


def record_network_spec(class_type: type, *args: Any, **kwargs: Any) -> object:
    """jsonargparse instantiator for networks: builds one and, for a network of another library,
    records its class path and init args, so checkpoints can rebuild it (``pipeline.models``)."""
    net = class_type(*args, **kwargs)
    if not args and "init_args" not in getattr(net, "__dict__", {}):
        remember_spec(net, f"{class_type.__module__}.{class_type.__qualname__}", kwargs)
    return net


class MedsegCLI(LightningCLI):
    """LightningCLI that names the run, creates its directory and sets up loggers and precision."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no `predict`: the module has no predict step; `medseg infer` segments new scans
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.link_arguments("data.in_channels", "model.net.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.out_channels", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.patch_size", "model.patch_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # volume data: the plan fills what the config leaves unset, so config.yaml records it
        _, self.plan = plan_config(self.config[self.subcommand])

    def instantiate_classes(self) -> None:
        from torch import nn

        self.parser.add_instantiator(record_network_spec, nn.Module, subclasses=True, prepend=True)
        super().instantiate_classes()
        net_spec(self.model.net)  # a network that cannot be saved fails now, not at the first save

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # LightningCLI builds the trainer inside instantiate_classes, right after the data module:
        # the plan made above goes to it before the preflight's setup(), which then plans nothing
        if self.plan is not None:
            self.datamodule.adopt_plan(self.plan)
        config = self.config_init[self.subcommand]
        run: RunConfig = config["run"]
        identity = self._run_identity(config)
        name, run_dir = identity.name, identity.directory
        replace = self._check_run_directory(config.get("ckpt_path"), run, run_dir)
        self._preflight(config.get("ckpt_path"), run_dir)
        if replace:
            log.info("replacing the run in %s (--run.overwrite true)", run_dir)
            shutil.rmtree(run_dir)
        trainer_config = config["trainer"]
        if trainer_config.get("precision") is None:
            kwargs["precision"] = default_precision(trainer_config.get("accelerator"))
        kwargs["default_root_dir"] = str(run_dir)
        kwargs["plugins"] = self._plugins(trainer_config.get("plugins"))
        callbacks = self._configured_callbacks(trainer_config, run_dir, run)
        kwargs["callbacks"] = callbacks + always_on_callbacks(
            self.subcommand, identity, run, config.get("seed_everything")
        )
        if trainer_config.get("logger") is not False:
            kwargs["logger"] = self._loggers(trainer_config.get("logger"), run, identity, config)
        if self.subcommand == "fit":
            run_dir.mkdir(parents=True, exist_ok=True)
        params = sum(p.numel() for p in self.model.parameters())
        log.info("run %s -> %s (%s parameters, %s)", name, run_dir, f"{params:,}", net_knobs(self.model.net))
        return super().instantiate_trainer(**kwargs)

    def _run_identity(self, config: dict) -> RunIdentity:
        """The run's name (given, or from the network's knobs, the fold and the seed) and its
        directory. validate/test report into the run of the checkpoint they score."""
        data = self.datamodule
        fold = data.fold if data.num_folds > 1 else None
        identity = run_identity(
            config["run"], variant_name(self.model.net), data.root, config.get("seed_everything"), fold
        )
        ckpt = Path(str(config.get("ckpt_path") or ""))
        if self.subcommand != "fit" and ckpt.parent.name == "checkpoints":
            identity = dataclasses.replace(identity, directory=ckpt.parent.parent)
        return identity

    def _check_run_directory(self, ckpt_path: str | None, run: RunConfig, run_dir: Path) -> bool:
        """A fit that does not resume this run's own checkpoint must not write into another run:
        True when that run is to be replaced (``run.overwrite``). Checked once, by the process
        that starts the fit (DDP workers started later find the directory in use by their own run)."""
        # rank_zero_only.rank: set by Lightning on the function at import, undeclared in its type
        if self.subcommand != "fit" or rank_zero_only.rank != 0:  # type: ignore[attr-defined]
            return False
        own = run_dir / "checkpoints"
        resuming = (ckpt_path == "last" and (own / "last.ckpt").is_file()) or (
            ckpt_path not in (None, "last") and Path(ckpt_path).resolve().parent == own.resolve()
        )
        return False if resuming else check_fresh_fit(run_dir, run.overwrite)

    @staticmethod
    def _plugins(configured: object) -> list:
        """The configured plugins, plus atomic writes and weights-only loads unless a CheckpointIO is given."""
        plugins = list(configured) if isinstance(configured, list) else [configured] if configured else []
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        return plugins

    def _configured_callbacks(self, trainer_config: dict, run_dir: Path, run: RunConfig) -> list[Callback]:
        """The config's callbacks with checkpoints in ``<run>/checkpoints``, and a rich progress bar
        (reading the loss every ``run.sync_every_n_steps``) unless the config has one or turns it off."""
        callbacks = list(trainer_config.get("callbacks") or [])
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(ThrottledProgressBar(run.sync_every_n_steps))
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint):
                callback.dirpath = str(run_dir / "checkpoints")
        return callbacks

    def _loggers(
        self, configured: object, run: RunConfig, identity: RunIdentity, config: dict
    ) -> list[Logger]:
        """W&B and the CSV mirror, then the config's own loggers (TensorBoard, MLflow, ...).

        fit: ``<run>/metrics.csv`` and a new (or, with ``--ckpt_path``, the continued) W&B run,
        named ``<dataset>/<run>`` and tagged with the data set, in the run's group.
        validate/test: ``<run>/<stage>/metrics.csv`` (first, so ``config.yaml`` goes there too) and
        the training run's own W&B run, resumed by its id, so the scores sit beside its curves.
        """
        run_dir, name = identity.directory, identity.wandb_name
        user = [
            c for c in (configured if isinstance(configured, list) else [configured]) if isinstance(c, Logger)
        ]
        if self.subcommand == "fit":
            resume = bool(config.get("ckpt_path"))
            tags = [*knob_tags(net_knobs(self.model.net)), f"dataset:{identity.dataset}"]
            return [*build_loggers(run_dir, run, name, tags, resume, group=identity.group), *user]
        stage_csv = CSVLogger(save_dir=str(run_dir), name="", version=self.subcommand)
        wandb_id = read_wandb_id(run_dir)
        wandb = [
            logger
            for logger in build_loggers(run_dir, run, name, [], resume=True, csv=False, group=identity.group)
            if wandb_id is not None
        ]
        return [stage_csv, *wandb, *user]

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here with a bare torch.load (weights
        # only, but a bad file escapes as a raw traceback): read it with load_checkpoint first, so a
        # missing, corrupt or unsafe checkpoint is one clear error before anything runs.
        ckpt_path = (
            self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        )
        if ckpt_path and ckpt_path not in ("last", "best", "hpc"):
            load_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def _preflight(self, ckpt_path: str | None, run_dir: Path) -> None:
        """Read the checkpoint and the data before anything is written (run directory, W&B, config),
        so a bad input fails with one clear error and leaves no partial run behind."""
        last = run_dir / "checkpoints" / "last.ckpt"
        if ckpt_path == "last" and last.is_file():  # other paths were read by _parse_ckpt_path
            load_checkpoint(last)
        # In the process that launches DDP workers, or rank 0 of an external launcher; Lightning's own
        # prepare_data/setup calls then find the work done.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            self.datamodule.prepare_data()
            self.datamodule.setup(self.subcommand)


def run_lightning(args: Sequence[str] | None) -> None:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test`` and its arguments); ``args``
    None reads ``sys.argv``. SIGTERM during a fit exits 143 after ``last.ckpt`` is saved."""
    failed = True
    try:
        warnings.filterwarnings(
            "ignore", message=".*LightningCLI's args parameter is intended"
        )  # medseg passes them
        MedsegCLI(
            SegmentationModule,
            SegmentationDataModule,
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True, "config_filename": "config.yaml"},
            seed_everything_default=0,
            args=None if args is None else list(args),
            auto_configure_optimizers=False,
        )
        failed = False
    except SIGTERMException:
        print("stopped by SIGTERM: last.ckpt saved; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, as if killed by it: schedulers and scripts see an interrupted job
    finally:
        finish_wandb(failed)


def fit_command(args: Sequence[str]) -> None:
    run_lightning(["fit", *args])


def validate_command(args: Sequence[str]) -> None:
    run_lightning(["validate", *args])


def test_command(args: Sequence[str]) -> None:
    run_lightning(["test", *args])
