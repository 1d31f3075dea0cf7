"""Run names, data-set names and W&B tags, derived from the network's declared knobs
(``pipeline.models.base``), the data folder, the fold and the seed."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.data.planning.rules import Plan
from pipeline.models import Network, net_knobs
from pipeline.run.directory import RunConfig

UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def variant_name(net: nn.Module) -> str:
    """Short name of a network variant, e.g. ``unet-noskip-residual-sigmoid-xavier-nonorm-d6``."""
    return net.variant_name() if isinstance(net, Network) else str(net_knobs(net)["arch"])


def run_name(variant: str, seed: int | None, fold: int | None = None) -> str:
    """``<variant>[-f<fold>]-s<seed>``, e.g. ``unet-relu-kaiming-f2-s0``; no fold outside k-fold CV."""
    return f"{variant}{'' if fold is None else f'-f{fold}'}-s{seed}"


def dataset_name(root: str | Path) -> str:
    """The data folder's name as run folders use it (``Task09_Spleen``, ``synthetic``): the last
    part of the resolved path, runs of characters other than letters, digits, ``.``, ``_`` and
    ``-`` replaced by ``_``."""
    return UNSAFE.sub("_", Path(root).resolve().name).strip("._") or "data"


def knob_tags(knobs: dict) -> list[str]:
    """W&B tags for a variant: ``skips:false``, ``act:sigmoid``, ..."""
    return [f"{k}:{str(v).lower()}" for k, v in knobs.items()]


@dataclass(frozen=True)
class RunIdentity:
    """Who a run is and where it lives.

    Attributes:
        experiment: the experiment folder.
        dataset: the data-set folder inside it (``dataset_name`` of the data root, or ``run.dataset``).
        name: the run name.
        directory: ``<run.root>/<experiment>/<dataset>/<name>``.
        group: the W&B group (``run.group``, default the experiment).
    """

    experiment: str
    dataset: str
    name: str
    directory: Path
    group: str

    @property
    def wandb_name(self) -> str:
        """The W&B run name: ``<dataset>/<name>``, so runs of two data sets tell apart in one group."""
        return f"{self.dataset}/{self.name}"


def run_identity(
    run: RunConfig, variant: str, data_root: str | Path, seed: int | None, fold: int | None = None
) -> RunIdentity:
    """The identity of a fit: names given in ``run`` win, the rest is derived.

    Args:
        run: the ``run:`` settings.
        variant: ``variant_name`` of the network.
        data_root: the data folder (its name is the data set's unless ``run.dataset`` is set).
        seed: the run's seed (``seed_everything``).
        fold: the validation fold under k-fold cross-validation, else None.
    """
    name = run.name or run_name(variant, seed, fold)
    dataset = run.dataset or dataset_name(data_root)
    directory = Path(run.root) / run.experiment / dataset / name
    return RunIdentity(run.experiment, dataset, name, directory, run.group or run.experiment)


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


@dataclass(frozen=True)
class FitRunner:
    """How the experiments (ablation, cv, auto) run ``medseg fit`` without importing the CLI,
    which builds this and hands it over.

    Attributes:
        settings: parses ``medseg fit`` arguments (``["fit", ...]``) as ``medseg fit`` would.
        fit: runs one ``medseg fit`` (arguments ``["fit", ...]``).
        plan: the plan that fit would train with (``pipeline.data.planning.rules.Plan``; None
            for 2D images), as ``medseg plan`` prints it.
    """

    settings: Callable[[Sequence[str]], FitSettings]
    fit: Callable[[Sequence[str]], None]
    plan: Callable[[Sequence[str]], Plan | None] | None = None
