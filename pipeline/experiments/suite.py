"""An ablation suite file (``configs/experiment/ablation.yaml``) turned into the ``medseg fit`` runs it lists.

A suite names shared configs, model configs, profiles (experiment folder, seeds, per-network widths)
and an optional grid of network knobs; ``plan`` composes each run's complete arguments and names
it exactly as ``medseg fit`` would (from the network's knobs and the seed), in the data set's
folder of the experiment (``runs/<experiment>/<dataset>/<run>``).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.errors import DataError
from pipeline.models import build_net
from pipeline.run.naming import FitSettings, variant_name

DEFAULT_SUITE = "configs/experiment/ablation.yaml"
# Set by the suite for every run: given as extra flags they would break the runs' names.
RESERVED = ("--model.net", "--seed_everything", "--run.name", "--run.experiment", "--run.root")


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
    *,
    parse: Callable[[Sequence[str]], FitSettings],
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
        parse: parses fit arguments as ``medseg fit`` does (``FitRunner.settings``): the runs'
            directories are where their fits will write.
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
    runs: list[tuple[str, list[str]]] = []
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
            runs.append((name, args))
    if not runs:
        return experiment, []
    # Every run reads the same data: its folder (the data set's name) is parsed once, as `fit` would.
    folder = parse(runs[0][1]).identity().directory.parent
    return experiment, [Run(name, folder / name, tuple(args)) for name, args in runs]
