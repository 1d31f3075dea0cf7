"""``medseg auto ROOT --budget HH:MM:SS``: the best model a time budget can buy
(``pipeline.experiments.auto``)::

medseg auto /data/Task09_Spleen --budget 02:00:00
medseg auto ROOT --budget 00:30:00 --test-fraction 0.2     # score the choice on held-out cases
medseg auto ROOT --budget 08:00:00 --resnet                # the ResNet-34 UNet as a candidate too
medseg auto ROOT --budget 00:30:00 -- --run.wandb false    # flags after -- go to every run's fit
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.cli import STARTED, split_passthrough
from pipeline.cli.identity import fit_runner
from pipeline.experiments.auto import AutoSettings, auto
from pipeline.experiments.auto_schedule import parse_budget


def auto_command(args: Sequence[str]) -> None:
    """``medseg auto ROOT --budget HH:MM:SS [options] [-- medseg fit flags]``."""
    words, extra = split_passthrough(args)
    parser = argparse.ArgumentParser(
        prog="medseg auto",
        allow_abbrev=False,
        description="Plan, train the configurations the plan offers in folds within a time budget, "
        "choose the best (or the ensemble of two) on out-of-fold predictions of final checkpoints, "
        "choose postprocessing, write one model folder. Run it again after a kill to go on.",
        epilog="Flags after -- go to every run's medseg fit, e.g. -- --trainer.accelerator cpu",
    )
    parser.add_argument("root", help="data folder (MSD or nnU-Net raw layout, or image/mask folders)")
    parser.add_argument("--budget", required=True, help="all the time it may take: HH:MM:SS or DD:HH:MM:SS")
    parser.add_argument("--folds", type=int, default=5, help="folds the cases are cut into (default: 5)")
    parser.add_argument(
        "--min-run",
        default="00:10:00",
        help="training time a run should get; fewer folds train when it cannot (default: %(default)s)",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.0, help="cases held out to score the choice (default: none)"
    )
    parser.add_argument("--resnet", action="store_true", help="add the ResNet-34 UNet (2D) as a candidate")
    parser.add_argument(
        "--experiment", default="auto", help="folder under --runs-root (default: %(default)s)"
    )
    parser.add_argument("--runs-root", default="runs", help="folder of experiments (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and the runs (default: 0)")
    opts = parser.parse_args(words)
    try:
        budget, min_run = parse_budget(opts.budget), parse_budget(opts.min_run)
    except ValueError as err:
        parser.error(str(err))
    if opts.folds < 2 or not 0 <= opts.test_fraction < 1:
        parser.error("--folds must be >= 2 and --test-fraction in [0, 1)")
    settings = AutoSettings(
        opts.root, budget, opts.folds, min_run, opts.test_fraction, opts.resnet,
        opts.experiment, opts.runs_root, opts.seed, tuple(extra),
    )  # fmt: skip
    auto(settings, fit_runner(), print, STARTED[0])
