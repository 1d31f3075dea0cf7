"""``medseg ablation``: train every variant of a suite, resumably (``pipeline.experiments.ablation``)::

medseg ablation                                  # profile auto: gpu with CUDA, cpu otherwise
medseg ablation --profile gpu --seeds 5
medseg ablation --dry-run                        # the runs and which of them are done
medseg ablation --only '*sigmoid*'               # a subset, by run name
medseg ablation -- --trainer.max_epochs 2        # LightningCLI flags added to every run
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import split_passthrough
from pipeline.cli.identity import fit_runner
from pipeline.experiments.ablation import run_all
from pipeline.experiments.suite import DEFAULT_SUITE, plan
from pipeline.run.directory import run_state


def ablation_command(args: Sequence[str]) -> None:
    """``medseg ablation [options] [-- LightningCLI flags]``."""
    words, extra = split_passthrough(args)
    parser = argparse.ArgumentParser(
        prog="medseg ablation",
        description="Train every variant of an ablation suite; completed runs are skipped.",
        epilog="Flags after -- go to every run's `medseg fit`, e.g. -- --trainer.max_epochs 2",
    )
    parser.add_argument("--suite", default=DEFAULT_SUITE, help="suite file (default: %(default)s)")
    parser.add_argument("--profile", default="auto", help="a profile of the suite, or auto (default)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the profile's)")
    parser.add_argument("--root", default="runs", help="folder of experiment folders (default: %(default)s)")
    parser.add_argument("--only", action="append", default=[], help="run-name pattern (fnmatch), repeatable")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    opts = parser.parse_args(words)
    runner = fit_runner()
    try:
        experiment, runs = plan(
            opts.suite, opts.profile, opts.seeds, opts.root, extra, opts.only, parse=runner.settings
        )
    except ValueError as err:
        parser.error(str(err))
    folder = Path(opts.root) / experiment
    if opts.dry_run:
        for run in runs:
            print(f"{run_state(run.directory):>9}  {run.name}")
        print(f"{len(runs)} runs in {folder}")
        if runs:
            print(f"the first: medseg {shlex.join(runs[0].args)}")
        return
    print(f"ablation: {len(runs)} runs in {folder} (W&B group {experiment!r})")
    command = shlex.join(["medseg", "ablation", *args])
    counts = run_all(runs, folder / "suite.json", command, runner.fit, print)
    print(f"compare them: medseg compare {folder}")
    if counts["failed"]:
        raise SystemExit(1)
