"""What a ``medseg fit`` would be called and where it would write, read from its arguments
without running it.

``medseg ablation`` and ``medseg cv`` decide before each fit whether its run is done, to be
resumed or new, so they need its directory first. It is parsed here by the parser ``medseg fit``
itself uses (``MedsegCLI``), so config files, flags and their order count exactly as they do
there; nothing is instantiated but the network, on the meta device (no weights, no downloads),
to read its knobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.cli.lightning import MedsegCLI
from pipeline.data.datamodule import SegmentationDataModule
from pipeline.models import build_net
from pipeline.run.directory import RunConfig
from pipeline.run.naming import RunIdentity, run_identity, variant_name
from pipeline.training.module import SegmentationModule


@dataclass(frozen=True)
class FitSettings:
    """The settings of a fit that name its run, plus its ``data:`` section as plain values.

    Attributes:
        run: the ``run:`` section.
        variant: ``variant_name`` of the configured network.
        seed: ``seed_everything``.
        data: the ``data:`` section (``root``, ``num_folds``, ``fold``, ``seed``, ...).
    """

    run: RunConfig
    variant: str
    seed: int | None
    data: dict

    def identity(self, fold: int | None = None) -> RunIdentity:
        """The run's identity, as ``fold`` of k-fold cross-validation or (None) as configured."""
        if fold is None and self.data["num_folds"] > 1:
            fold = self.data["fold"]
        return run_identity(self.run, self.variant, self.data["root"], self.seed, fold)


class _ParseOnly(MedsegCLI):
    """``MedsegCLI`` that stops after parsing: no seeding, no planning, no classes, no run."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass  # planning reads the data; what it fills in (patch, spacing, strides) names no run

    def instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
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


def fit_settings(args: Sequence[str]) -> FitSettings:
    """Parse ``medseg fit`` arguments (``["fit", "-c", ...]``) as ``medseg fit`` would.

    Raises:
        SystemExit: a bad flag or config (LightningCLI's own message, exit code 2).
    """
    cli = _ParseOnly(
        SegmentationModule,
        SegmentationDataModule,
        seed_everything_default=0,
        args=list(args),
        auto_configure_optimizers=False,
    )
    return cli.settings
