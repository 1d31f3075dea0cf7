"""Run directories read back: ``summary.json``, ``metrics.csv`` and the network in ``config.yaml``.

``medseg compare`` and its plots read runs through here; nothing needs W&B.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.errors import DataError
from pipeline.files import read_json
from pipeline.models import build_net
from pipeline.monitors.layers import parameter_layers

SEED_SUFFIX = re.compile(r"-s(\d+)$")


@dataclass
class RunData:
    """One run directory, read.

    Attributes:
        layers: layer names in depth order (input to output), as the monitors name them.
        curves: ``val/<metric>`` -> [(epoch, value)] for every validation epoch.
        grad: ``start`` / ``end`` -> (len(layers),) gradient L2 norms at the first and the last
            logged step (NaN where a layer was not logged).
        update: ``first`` / ``last`` -> (len(layers),) relative weight update of that epoch.
    """

    name: str
    path: Path
    summary: dict
    layers: list[str] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    grad: dict[str, np.ndarray] = field(default_factory=dict)
    update: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return SEED_SUFFIX.sub("", self.name)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv`` as ``{key: value}``, empty cells (not logged then) left out."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def layer_order(run_dir: Path, logged: set[str]) -> list[str]:
    """Layers in depth order as the monitors list them, from the network in ``config.yaml``.

    Logged names the network does not have (or all of them, without a readable config) follow in
    name order.
    """
    try:
        net = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["net"]
        init_args = dict(net.get("init_args") or {})
        if "encoder_weights" in init_args:
            init_args["encoder_weights"] = None  # the names do not depend on the weights: nothing to fetch
        with torch.device("meta"):  # names only: no memory, no init work
            names = [layer.name for layer in parameter_layers(build_net({**net, "init_args": init_args}))]
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        names = []
    known = [name for name in names if name in logged]
    return known + sorted(logged - set(known))


def _profile(row: dict[str, float], prefix: str, layers: list[str]) -> np.ndarray:
    return np.array([row.get(f"{prefix}{layer}", math.nan) for layer in layers])


def load_run(run_dir: Path) -> RunData:
    """Read one run directory (``summary.json`` required, ``metrics.csv`` and ``config.yaml`` optional)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(run_dir / "summary.json", f"cannot read the run summary ({err})") from None
    run = RunData(str(summary.get("run_name") or run_dir.name), run_dir, summary)
    rows = read_metrics(run_dir / "metrics.csv")
    special = {"grad/global", "grad/first_last_ratio"}  # not layers
    keys = {k for row in rows for k in row if k.startswith(("grad/", "update/")) and k not in special}
    run.layers = layer_order(run_dir, {k.split("/", 1)[1] for k in keys})
    for row in rows:
        for key, value in row.items():
            if key.startswith("val/") and "epoch" in row:
                run.curves.setdefault(key, []).append((int(row["epoch"]), value))
    for prefix, labels in (("grad/", ("start", "end")), ("update/", ("first", "last"))):
        logs = [row for row in rows if any(k.startswith(prefix) and k not in special for k in row)]
        if logs:
            target = run.grad if prefix == "grad/" else run.update
            target[labels[0]] = _profile(logs[0], prefix, run.layers)
            target[labels[1]] = _profile(logs[-1], prefix, run.layers)
    return run


def load_runs(folder: str | Path) -> list[RunData]:
    """Every run below ``folder``, in the order of its ``suite.json`` if there is one, else by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "no such folder of run directories")
    runs = [load_run(path.parent) for path in sorted(folder.rglob("summary.json"))]
    if not runs:
        raise DataError(
            folder, "holds no run directories (no summary.json below it); run `make ablation` first"
        )
    order = list(suite_record(folder).get("runs", {}))
    return sorted(runs, key=lambda r: (order.index(r.name) if r.name in order else len(order), r.name))


def suite_record(folder: Path) -> dict:
    """The ``suite.json`` that ``medseg ablation`` keeps in an experiment folder (empty if none)."""
    return read_json(folder / "suite.json")
