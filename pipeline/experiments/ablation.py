"""``medseg ablation``: train every variant of a suite (``configs/experiment/ablation.yaml``), resumably.

    medseg ablation                                  # profile auto: gpu with CUDA, cpu otherwise
    medseg ablation --profile gpu --seeds 5
    medseg ablation --dry-run                        # the runs and which of them are done
    medseg ablation --only '*sigmoid*'               # a subset, by run name
    medseg ablation -- --trainer.max_epochs 2        # LightningCLI flags added to every run

Each run is a ``medseg fit`` in this process, composed from the suite file: its shared configs, the
model's config, the profile's configs, then the network knobs as flags. Runs are named from their
knobs as any fit is (``unet-noskip-sigmoid-default-nonorm-s0``) and share one experiment folder,
which is also their W&B group. A run whose ``summary.json`` says completed (or diverged: that is
a result too) is skipped; an interrupted one resumes from its ``last.ckpt``. ``suite.json`` in the
experiment folder records the command, each run's outcome, seconds and the load average.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import DataError
from pipeline.experiments.suite import Run
from pipeline.files import atomic_write, read_json
from pipeline.run.directory import run_state

log = logging.getLogger(__name__)
DONE = ("completed", "diverged")  # run states that are results: a diverged run would diverge again


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _best_dice(directory: Path) -> str:
    best = read_json(directory / "summary.json").get("best", {})
    dice = best.get("val/dice")
    return f", best val/dice {dice:.3f} (epoch {best.get('epoch')})" if dice is not None else ""


def run_all(
    runs: Sequence[Run],
    record: Path,
    command: str,
    fit: Callable[[Sequence[str]], None],
    report: Callable[[str], None] = log.info,
    label: str = "ablation",
    done: Sequence[str] = DONE,
) -> dict[str, int]:
    """Fit every run that is not done, one after the other; returns the count of each outcome.

    A run that raises is reported and the suite goes on; ``SystemExit`` (Ctrl-C, SIGTERM, a bad
    flag) and ``DataError`` (bad or missing data, shared by every run) stop it. ``record`` (``suite.json``) is rewritten after every run.

    Args:
        runs: from ``plan``.
        record: the ``suite.json`` to write; entries of runs from earlier invocations are kept.
        command: the command line, for the record.
        fit: runs ``medseg`` with the given arguments (``pipeline.cli.lightning.run_lightning``).
        report: where the progress lines go.
        label: the command named in the closing line.
        done: the run states that are skipped (``medseg cv`` needs every fold completed: a
            diverged fold is fitted again, which stops unless it is resumed or replaced).
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state = {"command": command, "started": started, "runs": read_json(record).get("runs", {})}
    counts = {"trained": 0, "skipped": 0, "diverged": 0, "failed": 0}
    start, trained_seconds = time.perf_counter(), []
    width = len(str(len(runs)))
    for i, run in enumerate(runs, 1):
        prefix = f"[{i:>{width}}/{len(runs)}] {run.name}"
        before = run_state(run.directory)
        if before in done:
            counts["skipped"] += 1
            report(f"{prefix}: skipped ({before})")
            continue
        report(f"{prefix}: training{' (resuming from last.ckpt)' if before == 'resume' else ''}")
        began = time.perf_counter()
        error = None
        try:
            fit([*run.args, *(("--ckpt_path", "last") if before == "resume" else ())])
        except DataError:  # the data every run reads: the others would fail the same way
            raise
        except Exception as err:  # one broken variant must not stop the others
            error = f"{type(err).__name__}: {err}"
            log.exception("%s failed", run.name)
        seconds = time.perf_counter() - began
        outcome = run_state(run.directory)
        outcome = outcome if outcome in DONE else "failed"
        counts["trained" if outcome == "completed" else outcome] += 1
        trained_seconds.append(seconds)
        left = statistics.fmean(trained_seconds) * sum(run_state(r.directory) not in done for r in runs[i:])
        detail = _best_dice(run.directory) if outcome != "failed" else f": {error or 'no summary.json'}"
        report(
            f"{prefix}: {outcome} in {seconds:.0f} s{detail} "
            f"(elapsed {_minutes(time.perf_counter() - start)}, about {_minutes(left)} left)"
        )
        state["runs"][run.name] = {
            "outcome": outcome,
            "seconds": round(seconds, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            **({"error": error} if error else {}),
        }
        state["wall_seconds"] = round(time.perf_counter() - start, 1)
        atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2)))
    report(
        f"{label}: {counts['trained']} trained, {counts['skipped']} skipped, {counts['diverged']} "
        f"diverged, {counts['failed']} failed in {_minutes(time.perf_counter() - start)}"
    )
    return counts
