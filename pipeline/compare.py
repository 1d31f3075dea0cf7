"""``medseg compare RUNS_DIR [--output report/]``: compare run directories, offline (no W&B needed).

Reads every run below ``RUNS_DIR`` (a folder holding the ``summary.json`` that ``medseg fit``
writes, with ``metrics.csv`` and ``config.yaml`` beside it) and writes into ``--output``:

- ``report.md``: one row per run (parameters, best validation Dice overall and per class and the
  HD95 at that epoch, seconds per epoch, the first/last gradient ratio at the first and the last
  gradient log, the vanishing/exploding flags), then mean ± sd per variant where a variant has
  several seeds, then the plots;
- ``runs.csv``: the same numbers at full precision, with the variant's knobs as columns;
- PNGs (``pipeline.compare_plots``): ``best_dice.png``, ``val_dice.png``, ``grad_depth.png``,
  ``weight_update.png``, ``dice_vs_gradient.png``.

A variant is a run name without its ``-s<seed>`` suffix: its runs differ only in the seed. Plots
draw the mean over a variant's seeds and the range between their minimum and maximum.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.callbacks.layers import parameter_layers
from pipeline.data.io import DataError, atomic_write
from pipeline.models import build_net

SEED_SUFFIX = re.compile(r"-s(\d+)$")
KNOBS = ("arch", "encoder", "skips", "block", "act", "init", "norm", "depth")


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
    order = list(_suite(folder).get("runs", {}))
    return sorted(runs, key=lambda r: (order.index(r.name) if r.name in order else len(order), r.name))


def _suite(folder: Path) -> dict:
    try:
        return json.loads((folder / "suite.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def class_names(runs: Sequence[RunData]) -> list[str]:
    """Foreground class names with a per-class Dice, in the order they first appear."""
    names: dict[str, None] = {}
    for run in runs:
        for key in run.summary.get("best", {}):
            if key.startswith("val/dice_") and key != "val/dice_best":
                names.setdefault(key.removeprefix("val/dice_"))
    return list(names)


def run_row(run: RunData, classes: Sequence[str]) -> dict[str, object]:
    """The table's values of one run, straight from its ``summary.json`` (None where absent)."""
    s, best = run.summary, run.summary.get("best", {})
    grads = s.get("GradientFlowMonitor") or {}
    ratio = grads.get("first_last_ratio") or {}
    seed = SEED_SUFFIX.search(run.name)
    row: dict[str, object] = {"run": run.name, "variant": run.variant}
    row["seed"] = s.get("seed", int(seed.group(1)) if seed else None)
    row.update({f"knob_{k}": (s.get("variant") or {}).get(k) for k in KNOBS})
    row["status"] = (
        "diverged" if (s.get("DivergenceGuard") or {}).get("diverged") else str(s.get("status")).split(":")[0]
    )
    row.update(
        params=s.get("params"),
        epochs=s.get("epochs"),
        best_epoch=best.get("epoch"),
        dice=best.get("val/dice"),
    )
    row.update({f"dice_{c}": best.get(f"val/dice_{c}") for c in classes})
    row.update(hd95=best.get("val/hd95"), seconds_per_epoch=s.get("seconds_per_epoch"))
    row.update(ratio_start=ratio.get("start"), ratio_end=ratio.get("end"))
    row["vanishing"] = (grads.get("vanishing") or {}).get("detected")
    row["exploding"] = (grads.get("exploding") or {}).get("detected")
    return row


def fmt(key: str, value: object) -> str:
    """A table cell: Dice to 3 decimals, HD95 and seconds to 1, ratios in scientific notation."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "params":
        return f"{value:,}"
    if key.startswith("dice"):
        return f"{value:.3f}"
    if key.startswith("ratio"):
        return f"{value:.2e}"
    if key in ("hd95", "seconds_per_epoch"):
        return f"{value:.1f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def run_columns(classes: Sequence[str]) -> list[tuple[str, str]]:
    """``(row key, header)`` of the per-run table."""
    return [
        ("run", "run"), ("status", "status"), ("params", "params"), ("epochs", "epochs"),
        ("dice", "best val Dice"), *((f"dice_{c}", f"Dice {c}") for c in classes),
        ("hd95", "HD95 (px)"), ("seconds_per_epoch", "s/epoch"), ("ratio_start", "grad first/last, start"),
        ("ratio_end", "grad first/last, end"), ("vanishing", "vanishing"), ("exploding", "exploding"),
    ]  # fmt: skip


def _spread(values: list[float], key: str) -> str:
    """Mean ± sd (Dice, HD95, seconds) or geometric mean [min, max] (gradient ratios) over seeds."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if key.startswith("ratio"):
        if min(values) <= 0:
            return f"[{fmt(key, min(values))}, {fmt(key, max(values))}]"
        geo = math.exp(statistics.fmean(math.log(v) for v in values))
        return f"{fmt(key, geo)} [{fmt(key, min(values))}, {fmt(key, max(values))}]"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt(key, statistics.fmean(values))} ± {fmt(key, sd)}"


def variant_table(rows: Sequence[dict], classes: Sequence[str]) -> str:
    """Mean and spread over the seeds of each variant (markdown)."""
    keys = ["dice", *(f"dice_{c}" for c in classes), "hd95", "seconds_per_epoch", "ratio_start", "ratio_end"]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row["variant"]), []).append(row)
    body = []
    for variant, members in groups.items():
        flags = [f"{sum(bool(r[k]) for r in members)}/{len(members)}" for k in ("vanishing", "exploding")]
        body.append(
            [variant, str(len(members)), *(_spread([r[k] for r in members], k) for k in keys), *flags]
        )
    header = ["variant", "seeds", "best val Dice", *(f"Dice {c}" for c in classes), "HD95 (px)", "s/epoch"]
    return markdown_table(
        [*header, "grad first/last, start", "grad first/last, end", "vanishing", "exploding"], body
    )


PLOTS = {
    "best_dice.png": "Best validation Dice per variant (bars: mean over seeds; lines: min to max).",
    "val_dice.png": "Validation Dice per epoch, overall and per class (dashed: no long skips).",
    "grad_depth.png": "Gradient L2 norm by layer depth at the first and the last logged step (log scale).",
    "weight_update.png": "Relative weight update ‖ΔW‖/‖W‖ by layer in the first and the last epoch (log scale).",
    "dice_vs_gradient.png": "Best validation Dice against the first/last gradient ratio at the start.",
}


def write_report(runs: Sequence[RunData], output: str | Path, source: str | Path) -> Path:
    """Write ``report.md``, ``runs.csv`` and the PNGs into ``output``; returns the report's path."""
    from pipeline import compare_plots  # matplotlib on use

    output = Path(output)
    classes = class_names(runs)
    rows = [run_row(run, classes) for run in runs]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(output / "runs.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    compare_plots.write_all(output, runs, classes)

    suite = _suite(Path(source))
    columns = run_columns(classes)
    lines = [f"# Comparison of {len(runs)} runs in `{source}`", ""]
    if suite.get("command"):
        lines += [f"Made by `{suite['command']}`, then `medseg compare {source}`.", ""]
    lines += [
        "Best val Dice: the highest mean foreground Dice over the validation epochs; the per-class Dice and "
        "HD95 are those of the same epoch. grad first/last: the first conv layer's gradient norm over the "
        "last's (the head), at the first and the last gradient log; `vanishing` when it stayed below the "
        "monitor's threshold for its patience. Full precision in `runs.csv`.",
        "",
        markdown_table([h for _, h in columns], [[fmt(k, row[k]) for k, _ in columns] for row in rows]),
        "",
    ]
    if any(sum(r["variant"] == row["variant"] for r in rows) > 1 for row in rows):
        lines += ["## Variants over seeds", "", variant_table(rows, classes), ""]
    for name, caption in PLOTS.items():
        lines += [f"## {caption}", "", f"![{name}]({name})", ""]
    report = output / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return report


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
