"""``medseg compare RUNS_DIR``: report.md, runs.csv and plots of run directories
(``pipeline.experiments.compare``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.experiments.compare import write_report
from pipeline.experiments.runs import load_runs


def compare_command(args: Sequence[str]) -> None:
    """``medseg compare RUNS_DIR [--output DIR]``."""
    parser = argparse.ArgumentParser(
        prog="medseg compare", description="Compare run directories: report.md, runs.csv and plots."
    )
    parser.add_argument("runs_dir", help="a folder of run directories, e.g. runs/ablation")
    parser.add_argument("--output", default="report", help="output folder (default: %(default)s)")
    opts = parser.parse_args(args)
    runs = load_runs(opts.runs_dir)
    report = write_report(runs, opts.output, opts.runs_dir)
    print(f"compared {len(runs)} runs ({len({r.variant for r in runs})} variants): {report}")
