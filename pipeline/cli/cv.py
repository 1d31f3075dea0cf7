"""``medseg cv``: k-fold cross-validation of one configuration (``pipeline.experiments.cv``)::

medseg cv -c configs/default.yaml -c configs/model/unet.yaml -c configs/data/synthetic.yaml
medseg cv ... --data.num_folds 3 --data.test_fraction 0.2   # k from the config (default 5)
medseg cv --dry-run ...                                     # the folds and which are done
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

from pipeline.cli.identity import fit_runner
from pipeline.experiments.cv import cross_validate, plan_cv
from pipeline.experiments.cv_report import mean_sd_text
from pipeline.run.directory import run_state


def cv_command(args: Sequence[str]) -> None:
    """``medseg cv [--dry-run] [--tta] <medseg fit flags>``."""
    parser = argparse.ArgumentParser(
        prog="medseg cv",
        allow_abbrev=False,
        description="k-fold cross-validation of one configuration: every fold (resumable), out-of-fold "
        "scores, postprocessing chosen on them.",
        epilog="Every other flag goes to each fold's medseg fit, e.g. -c configs/default.yaml "
        "--data.num_folds 3 (k; default 5).",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the folds and their state, train nothing"
    )
    parser.add_argument("--tta", action="store_true", help="segment the validation folds with mirroring TTA")
    opts, fit_args = parser.parse_known_args(args)
    if opts.dry_run:
        cv = plan_cv(fit_args, fit_runner())
        for run in cv.runs:
            print(f"{run_state(run.directory):>9}  {run.name}")
        print(
            f"{len(cv.runs)} folds; results in {cv.folder}\nthe first: medseg {shlex.join(cv.runs[0].args)}"
        )
        return
    folder, summary = cross_validate(fit_args, fit_runner(), tta=opts.tta, report=print)
    chosen = ", ".join(summary["postprocessing"]["largest_component"]) or "no class"
    print(f"out-of-fold Dice, mean ± sd over folds: {mean_sd_text(summary['mean_sd']['dice'])}")
    print(f"postprocessing: largest connected component kept for {chosen} -> {folder}")
