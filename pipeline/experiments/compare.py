"""``medseg compare RUNS_DIR [--output report/]``: compare run directories, offline (no W&B needed).

Reads every run below ``RUNS_DIR`` (a folder holding the ``summary.json`` that ``medseg fit``
writes, with ``metrics.csv`` and ``config.yaml`` beside it) and writes into ``--output``:

- ``report.md``: one row per run (parameters, best validation Dice overall and per class and the
  HD95 at that epoch, seconds per epoch, the first/last gradient ratio at the first and the last
  gradient log, the vanishing/exploding flags), then mean ± sd per variant where a variant has
  several seeds, then the plots;
- ``runs.csv``: the same numbers at full precision, with the variant's knobs as columns;
- PNGs (``pipeline.experiments.compare_plots``): ``best_dice.png``, ``val_dice.png``, ``grad_depth.png``,
  ``weight_update.png``, ``dice_vs_gradient.png``.

A variant is a run name without its ``-s<seed>`` suffix: its runs differ only in the seed. Plots
draw the mean over a variant's seeds and the range between their minimum and maximum.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from pipeline.experiments.runs import SEED_SUFFIX, RunData, suite_record
from pipeline.files import atomic_write


def class_names(runs: Sequence[RunData]) -> list[str]:
    """Foreground class names with a per-class Dice, in the order they first appear."""
    names: dict[str, None] = {}
    for run in runs:
        for key in run.summary.get("best", {}):
            if key.startswith("val/dice_") and key != "val/dice_best":
                names.setdefault(key.removeprefix("val/dice_"))
    return list(names)


def knob_names(runs: Sequence[RunData]) -> list[str]:
    """The knobs the runs' networks declare (``summary.json`` ``variant``), in first-seen order."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.summary.get("variant") or {}))
    return list(names)


def run_row(run: RunData, classes: Sequence[str], knobs: Sequence[str] | None = None) -> dict[str, object]:
    """The table's values of one run, straight from its ``summary.json`` (None where absent).

    ``knobs``: the knob columns (default: the run's own knobs).
    """
    s, best = run.summary, run.summary.get("best", {})
    grads = s.get("GradientFlowMonitor") or {}
    ratio = grads.get("first_last_ratio") or {}
    seed = SEED_SUFFIX.search(run.name)
    row: dict[str, object] = {"run": run.name, "variant": run.variant}
    row["seed"] = s.get("seed", int(seed.group(1)) if seed else None)
    variant = s.get("variant") or {}
    row.update({f"knob_{k}": variant.get(k) for k in (variant if knobs is None else knobs)})
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
        ("hd95", "HD95 (px; mm for volumes)"), ("seconds_per_epoch", "s/epoch"), ("ratio_start", "grad first/last, start"),
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
    header = [
        "variant",
        "seeds",
        "best val Dice",
        *(f"Dice {c}" for c in classes),
        "HD95 (px; mm for volumes)",
        "s/epoch",
    ]
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
    from pipeline.experiments import compare_plots  # matplotlib on use

    output = Path(output)
    classes = class_names(runs)
    rows = [run_row(run, classes, knob_names(runs)) for run in runs]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(output / "runs.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    compare_plots.write_all(output, runs, classes)

    suite = suite_record(Path(source))
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
