"""The ``medseg`` command.

Training and evaluation are LightningCLI subcommands (configs compose left to right, the last wins)::

    medseg fit -c configs/default.yaml -c configs/model/unet.yaml -c configs/data/synthetic.yaml
    medseg validate -c <run>/config.yaml --ckpt_path <run>/checkpoints/best.ckpt
    medseg fit ... --print_config          # the full config, to start a new file

Other subcommands: ``medseg data synth`` (the default phantom data set), ``medseg infer`` (batch
inference on new scans, ``pipeline.inference``), ``medseg ablation`` (train a suite of variants,
``pipeline.ablation``), ``medseg compare`` (a report from run directories, ``pipeline.compare``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import CheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.ablation import ablation_command
from pipeline.callbacks.guards import DivergenceGuard, TrainingDiverged
from pipeline.callbacks.resume import BatchSeed, SigtermCheckpoint
from pipeline.checkpointing import SafeCheckpointIO, load_checkpoint
from pipeline.data import commands as volume_commands
from pipeline.data.datamodule import SegmentationDataModule
from pipeline.data.io import DataError
from pipeline.module import SegmentationModule
from pipeline.tracking import RunConfig, RunSummary, build_loggers, finish_wandb, knob_tags, variant_name

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
    """Writes ``config.yaml`` to the run directory and the flat config to every logger."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = flatten(self.config.as_dict())
        # The variant's knobs and size as plain config keys too, so W&B can filter and group by them.
        net = getattr(pl_module, "net", pl_module)
        config.update({f"variant.{k}": v for k, v in getattr(net, "knobs", {}).items()})
        config["variant.params"] = sum(p.numel() for p in net.parameters())
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class MedsegCLI(LightningCLI):
    """LightningCLI that names the run, creates its directory and sets up loggers and precision."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.link_arguments("data.in_channels", "model.net.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.net.init_args.out_channels", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.patch_size", "model.patch_size")

    def instantiate_trainer(self, **kwargs) -> object:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run: RunConfig = config["run"]
        seed = config.get("seed_everything")
        knobs = getattr(self.model.net, "knobs", {})
        name = run.name or f"{variant_name(knobs)}-s{seed}"
        run_dir = Path(run.root) / run.experiment / name
        ckpt = Path(str(config.get("ckpt_path") or ""))
        if self.subcommand != "fit" and ckpt.parent.name == "checkpoints":
            run_dir = ckpt.parent.parent  # validate/test/predict report into the checkpoint's run
        self._preflight(config.get("ckpt_path"), run_dir)
        trainer_config = config["trainer"]
        if trainer_config.get("precision") is None:
            kwargs["precision"] = self._default_precision(trainer_config.get("accelerator"))
        kwargs["default_root_dir"] = str(run_dir)
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, SafeCheckpointIO()]  # atomic writes, weights-only loads
        callbacks = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(RichProgressBar())
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint):
                callback.dirpath = str(run_dir / "checkpoints")
        if self.subcommand != "fit" and trainer_config.get("logger") is not False:
            # <run>/<stage>/metrics.csv, beside the fit's own files (not lightning_logs/version_N)
            kwargs["logger"] = CSVLogger(save_dir=str(run_dir), name="", version=self.subcommand)
        if self.subcommand == "fit":
            run_dir.mkdir(parents=True, exist_ok=True)
            if trainer_config.get("logger") is not False:
                resume = bool(config.get("ckpt_path"))
                kwargs["logger"] = build_loggers(run_dir, run, name, knob_tags(knobs), resume)
            # DivergenceGuard before RunSummary, so its on_exception runs first and summary.json
            # records it; SigtermCheckpoint after every other callback (Lightning still moves the
            # ModelCheckpoints last), so an epoch-end save holds their epoch-end state.
            callbacks += [DivergenceGuard(), BatchSeed()]
            callbacks += [RunSummary(run_dir, name, run.experiment, seed), SigtermCheckpoint()]
        kwargs["callbacks"] = callbacks
        params = sum(p.numel() for p in self.model.parameters())
        log.info("run %s -> %s (%s parameters, %s)", name, run_dir, f"{params:,}", knobs)
        return super().instantiate_trainer(**kwargs)

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
        if self.subcommand in ("fit", "validate", "test") and os.environ.get("LOCAL_RANK", "0") == "0":
            self.datamodule.prepare_data()
            self.datamodule.setup(self.subcommand)

    @staticmethod
    def _default_precision(accelerator: str | None) -> str:
        """bf16 mixed precision on a CUDA GPU that supports it, fp16 mixed on older GPUs, fp32 on CPU."""
        if accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available():
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return "32-true"


def run_lightning(args: Sequence[str] | None) -> None:
    """Run a LightningCLI subcommand; ``args`` None reads ``sys.argv``."""
    failed = True
    try:
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
    finally:
        finish_wandb(failed)


def data_command(args: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="medseg data", description="Data set tools.")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="generate the procedural phantom data set")
    synth.add_argument("--output", default=None, help="output folder (default: data/synthetic)")
    synth.add_argument("--num-images", type=int, default=None, help="number of images (default: 240)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    volume_commands.add_arguments(sub, synth)  # synth --volumes, check, prepare
    opts = parser.parse_args(args)
    if volume_commands.run(opts):
        return
    if opts.action == "synth":
        from pipeline.data.synthetic import generate_dataset

        out = generate_dataset(opts.output or "data/synthetic", opts.num_images or 240, opts.size, opts.seed)
        print(f"wrote {opts.num_images or 240} phantoms ({opts.size}x{opts.size}) to {out}")


def infer_command(args: Sequence[str]) -> None:
    # imported on use: pipeline.inference imports this module
    from pipeline.inference import infer_command as run_infer

    run_infer(args)


def compare_command(args: Sequence[str]) -> None:
    # imported on use: matplotlib is needed by this command only
    from pipeline.compare import compare_command as run_compare

    run_compare(args)


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "data": data_command,
    "infer": infer_command,
    "ablation": ablation_command,
    "compare": compare_command,
}


def main(argv: Sequence[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if words and words[0] in COMMANDS:
            COMMANDS[words[0]](words[1:])
        else:
            run_lightning(None if argv is None else words)
    except (DataError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except SIGTERMException:
        print("stopped by SIGTERM: last.ckpt saved; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, as if killed by it: schedulers and scripts see an interrupted job
