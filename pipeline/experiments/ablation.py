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

import argparse
import fnmatch
import itertools
import json
import logging
import os
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from pipeline.cli.lightning import run_lightning
from pipeline.errors import DataError
from pipeline.files import atomic_write
from pipeline.models import build_net
from pipeline.run.naming import variant_name

log = logging.getLogger(__name__)
DEFAULT_SUITE = "configs/experiment/ablation.yaml"
# Set by the suite for every run: given as extra flags they would break the runs' names.
RESERVED = ("--model.net", "--seed_everything", "--run.name", "--run.experiment", "--run.root")
DONE = ("completed", "diverged")  # run states that are results: a diverged run would diverge again


@dataclass(frozen=True)
class Run:
    """One ``medseg fit`` of the suite: its name, run directory and complete arguments."""

    name: str
    directory: Path
    args: tuple[str, ...]


def load_suite(path: str | Path) -> dict:
    """Read and check a suite file (the format is documented in ``configs/experiment/ablation.yaml``)."""
    try:
        suite = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DataError(path, f"cannot read the suite file ({err})") from None
    if not isinstance(suite, dict) or not isinstance(suite.get("profiles"), dict) or not suite["profiles"]:
        raise DataError(path, "a suite needs a 'profiles' mapping (see configs/experiment/ablation.yaml)")
    unknown = set(suite) - {"configs", "model_dir", "profiles", "models", "grid"}
    if unknown:
        raise DataError(
            path, f"unknown keys {sorted(unknown)}; valid: configs, model_dir, profiles, models, grid"
        )
    if not suite.get("models") and not suite.get("grid"):
        raise DataError(path, "the suite lists no runs: give 'models' and/or a 'grid'")
    for name, profile in suite["profiles"].items():
        if not isinstance(profile, dict) or not profile.get("experiment"):
            raise DataError(path, f"profile {name!r} needs an 'experiment' (the run folder and W&B group)")
    return suite


def variants(suite: dict) -> list[tuple[str, dict]]:
    """``(model config name, knob overrides)`` pairs: the models as they are, then the grid."""
    pairs: list[tuple[str, dict]] = [(model, {}) for model in suite.get("models") or []]
    grid = suite.get("grid") or {}
    knobs = grid.get("knobs") or {}
    for model in grid.get("models") or []:
        for values in itertools.product(*knobs.values()):
            pairs.append((model, dict(zip(knobs, values, strict=True))))
    return pairs


def resolve_profile(suite: dict, profile: str) -> str:
    """``auto``: ``gpu`` when CUDA is available and the suite has that profile, else ``cpu``."""
    if profile == "auto":
        profile = "gpu" if torch.cuda.is_available() and "gpu" in suite["profiles"] else "cpu"
    if profile not in suite["profiles"]:
        raise ValueError(f"unknown profile {profile!r}; valid: auto, {', '.join(suite['profiles'])}")
    return profile


def _flag_value(value: object) -> str:
    """A knob value as LightningCLI reads it from the command line (lists and booleans as JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


def _model_config(model_dir: Path, model: str) -> tuple[Path, dict]:
    path = model_dir / f"{model}.yaml"
    try:
        net = yaml.safe_load(path.read_text())["model"]["net"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise DataError(path, f"cannot read the network of model config {model!r} ({err!r})") from None
    return path, net


def plan(
    suite_path: str | Path = DEFAULT_SUITE,
    profile: str = "auto",
    seeds: int | None = None,
    root: str | Path = "runs",
    extra: Sequence[str] = (),
    only: Sequence[str] = (),
) -> tuple[str, list[Run]]:
    """The suite's runs for one profile: ``(experiment, runs)``, in suite order, seeds innermost.

    Each variant's network is built once (on the meta device: no weights) to read its knobs, so a
    run is named exactly as ``medseg fit`` would name it. Variants that resolve to the same network (a
    grid cell equal to a listed model) run once.

    Args:
        suite_path: the suite file.
        profile: a profile of the suite, or ``auto``.
        seeds: seeds 0..seeds-1; default the profile's.
        root: the folder holding experiment folders.
        extra: LightningCLI flags added to every run (not the network or naming flags).
        only: fnmatch patterns on run names; empty keeps every run.
    """
    bad = [arg for arg in extra if arg.startswith(RESERVED)]
    if bad:
        raise ValueError(
            f"{bad[0]} is set by the suite (network knobs name the runs): change the suite file instead"
        )
    suite = load_suite(suite_path)
    profile = resolve_profile(suite, profile)
    settings = suite["profiles"][profile]
    seeds = settings.get("seeds", 1) if seeds is None else seeds
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    experiment = str(settings["experiment"])
    model_dir = Path(suite.get("model_dir", "configs/model"))
    shared = [arg for config in suite.get("configs") or [] for arg in ("-c", str(config))]
    profile_configs = [arg for config in settings.get("configs") or [] for arg in ("-c", str(config))]
    tags = json.dumps(["ablation", f"profile:{profile}"])
    runs: list[Run] = []
    networks: dict[str, dict] = {}
    for model, knobs in variants(suite):
        config, net = _model_config(model_dir, model)
        class_name = net["class_path"].rsplit(".", 1)[-1]
        overrides = {**(settings.get("net") or {}).get(class_name, {}), **knobs}
        spec = {"class_path": net["class_path"], "init_args": {**(net.get("init_args") or {}), **overrides}}
        with torch.device("meta"):  # shapes only: no memory, no init work
            variant = variant_name(build_net(spec))
        if variant in networks:
            if networks[variant] != spec:
                raise ValueError(f"two different networks of the suite are both named {variant!r}")
            continue
        networks[variant] = spec
        knob_flags = [
            arg for k, v in overrides.items() for arg in (f"--model.net.init_args.{k}", _flag_value(v))
        ]
        for seed in range(seeds):
            name = f"{variant}-s{seed}"
            if only and not any(fnmatch.fnmatchcase(name, pattern) for pattern in only):
                continue
            args = ["fit", *shared, "-c", str(config), *profile_configs, *knob_flags]
            args += ["--seed_everything", str(seed), "--run.experiment", experiment, "--run.name", name]
            args += ["--run.root", str(root), "--run.tags", tags, *extra]
            runs.append(Run(name, Path(root) / experiment / name, tuple(args)))
    return experiment, runs


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_state(directory: Path) -> str:
    """``completed`` or ``diverged`` (done), ``resume`` (a ``last.ckpt`` to go on from) or ``new``."""
    summary = _read_json(directory / "summary.json")
    if summary.get("status") == "completed":
        return "completed"
    if (summary.get("DivergenceGuard") or {}).get("diverged"):
        return "diverged"
    return "resume" if (directory / "checkpoints" / "last.ckpt").is_file() else "new"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _best_dice(directory: Path) -> str:
    best = _read_json(directory / "summary.json").get("best", {})
    dice = best.get("val/dice")
    return f", best val/dice {dice:.3f} (epoch {best.get('epoch')})" if dice is not None else ""


def run_all(
    runs: Sequence[Run],
    record: Path,
    command: str,
    fit: Callable[[Sequence[str]], None],
    report: Callable[[str], None] = log.info,
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
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state = {"command": command, "started": started, "runs": _read_json(record).get("runs", {})}
    counts = {"trained": 0, "skipped": 0, "diverged": 0, "failed": 0}
    start, trained_seconds = time.perf_counter(), []
    width = len(str(len(runs)))
    for i, run in enumerate(runs, 1):
        prefix = f"[{i:>{width}}/{len(runs)}] {run.name}"
        before = run_state(run.directory)
        if before in DONE:
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
        left = statistics.fmean(trained_seconds) * sum(run_state(r.directory) not in DONE for r in runs[i:])
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
        f"ablation: {counts['trained']} trained, {counts['skipped']} skipped, {counts['diverged']} "
        f"diverged, {counts['failed']} failed in {_minutes(time.perf_counter() - start)}"
    )
    return counts


def ablation_command(args: Sequence[str]) -> None:
    """``medseg ablation [options] [-- LightningCLI flags]``."""
    words = list(args)
    extra = words[words.index("--") + 1 :] if "--" in words else []
    words = words[: words.index("--")] if "--" in words else words
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
    try:
        experiment, runs = plan(opts.suite, opts.profile, opts.seeds, opts.root, extra, opts.only)
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
    counts = run_all(runs, folder / "suite.json", command, run_lightning, print)
    print(f"compare them: medseg compare {folder}")
    if counts["failed"]:
        raise SystemExit(1)
