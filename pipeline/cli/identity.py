"""What a ``medseg fit`` would be called, where it would write and its config, read from its
arguments without running it.

``medseg ablation`` and ``medseg cv`` decide before each fit whether its run is done, to be
resumed or new, so they need its directory first. It is parsed here by the parser ``medseg fit``
itself uses (``MedsegCLI``), so config files, flags and their order count exactly as they do
there; nothing is instantiated but the network, on the meta device (no weights, no downloads),
to read its knobs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from jsonargparse import Namespace

from pipeline.cli.lightning import MedsegCLI, run_lightning
from pipeline.data.datamodule import SegmentationDataModule
from pipeline.data.planning.rules import Plan
from pipeline.models import build_net
from pipeline.run.directory import RunConfig
from pipeline.run.naming import FitRunner, FitSettings, variant_name
from pipeline.training.module import SegmentationModule


class _ParseOnly(MedsegCLI):
    """``MedsegCLI`` that stops after parsing: no seeding, no planning, no classes, no run."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass  # planning reads the data; what it fills in (patch, spacing, strides) names no run

    def instantiate_classes(self) -> None:
        config = self.parsed = self.config[self.subcommand]
        net = config.model.net.as_dict()
        init_args = dict(net.get("init_args") or {})
        if "encoder_weights" in init_args:
            init_args["encoder_weights"] = None  # the knobs do not depend on the weights: nothing to load
        with torch.device("meta"):
            variant = variant_name(build_net({**net, "init_args": init_args}))
        self.settings = FitSettings(
            RunConfig(**config.run.as_dict()), variant, config.seed_everything, config.data.as_dict()
        )

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def _parse(args: Sequence[str]) -> _ParseOnly:
    warnings.filterwarnings(
        "ignore", message=".*LightningCLI's args parameter is intended"
    )  # medseg passes them
    return _ParseOnly(
        SegmentationModule,
        SegmentationDataModule,
        seed_everything_default=0,
        args=list(args),
        auto_configure_optimizers=False,
    )


def fit_settings(args: Sequence[str]) -> FitSettings:
    """Parse ``medseg fit`` arguments (``["fit", "-c", ...]``) as ``medseg fit`` would.

    Raises:
        SystemExit: a bad flag or config (LightningCLI's own message, exit code 2).
    """
    return _parse(args).settings


def fit_config(args: Sequence[str]) -> Namespace:
    """The config ``medseg fit`` would run with these arguments (``["fit", "-c", ...]``), parsed
    the same way and not yet planned.

    Raises:
        SystemExit: a bad flag or config (LightningCLI's own message, exit code 2).
    """
    return _parse(args).parsed


def fit_plan(args: Sequence[str]) -> Plan | None:
    """The plan ``medseg fit`` would train with for these arguments (None for 2D images)."""
    from pipeline.cli.config_plan import plan_config

    return plan_config(fit_config(args))[1]


def fit_runner() -> FitRunner:
    """``medseg fit`` for the experiments (ablation, cv, auto): parsed by its own parser, planned
    by its own planning, run in-process."""
    return FitRunner(fit_settings, run_lightning, fit_plan)
