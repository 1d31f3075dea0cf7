"""``cv_report.md``: a cross-validation's ``cv_summary.json`` as tables a person reads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.files import write_text

METRICS = ("dice", "iou", "precision", "recall", "hd95", "surface_dice")


def number(value: float | None, digits: int = 4) -> str:
    """A score for a Markdown table: ``digits`` decimals; empty when undefined."""
    return "" if value is None else f"{value:.{digits}f}"


def mean_sd_text(entry: dict) -> str:
    """``0.9423 ± 0.0181`` from ``{"mean", "sd"}``; empty when undefined."""
    mean, sd = entry.get("mean"), entry.get("sd")
    return "" if mean is None else f"{mean:.4f} ± {sd or 0:.4f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines: the header, the rule, a line per row."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def report_lines(summary: dict) -> list[str]:
    """The report's Markdown lines (see ``write_report``)."""
    classes = summary["class_names"][1:]
    keys = [*METRICS, *(f"dice_{c}" for c in classes), *(f"hd95_{c}" for c in classes)]
    unit = "mm" if summary["volumetric"] else "pixels"
    lines = [
        f"# Cross-validation: {summary['variant']} on {summary['dataset']} ({len(summary['folds'])} folds, "
        f"seed {summary['seed']})",
        "",
        f"`{summary['command']}`",
        "",
        "Out-of-fold scores: each fold's final checkpoint segments its validation cases (`medseg infer`"
        f"{', with TTA' if summary['tta'] else ''}), scored "
        + ("per case in 3D on its own grid" if summary["volumetric"] else "per image")
        + f"; HD95 in {unit}. A class's mean leaves out cases whose ground truth lacks it. "
        f"Checkpoint: {summary['checkpoint_rule']}.",
        "",
        "## Per fold, and mean ± sd over folds",
        "",
    ]
    rows = [
        [
            str(fold["fold"]),
            str(fold["cases"]),
            number(run["final"].get("val/dice")),
            number(run["best"].get("val/dice")),
            *(number(fold["scores"].get(k)) for k in keys),
        ]
        for fold, run in zip(summary["folds"], summary["runs"], strict=True)
    ]
    rows.append(["mean ± sd", "", "", "", *(mean_sd_text(summary["mean_sd"].get(k, {})) for k in keys)])
    rows.append(
        ["all cases", str(len(summary["cases"])), "", "", *(number(summary["pooled"].get(k)) for k in keys)]
    )
    lines += table(["fold", "cases", "final val/dice", "best val/dice", *keys], rows)
    decision = summary["postprocessing"]
    lines += [
        "",
        "## Postprocessing chosen on the out-of-fold predictions",
        "",
        f"Rule: {decision['criterion']} (nnU-Net's). Adopted for: "
        f"{', '.join(decision['largest_component']) or 'no class'}.",
        "",
    ]
    lines += table(
        ["class", "cases", "Dice", "Dice, largest component only", "adopted"],
        [
            [
                name,
                str(c["cases"]),
                number(c["dice"]),
                number(c["dice_largest_component"]),
                str(c["adopted"]),
            ]
            for name, c in decision["classes"].items()
        ],
    )
    after = summary["mean_sd_postprocessed"]["dice"]
    lines += [
        "",
        f"Mean Dice over folds with it: {mean_sd_text(after)} (without: {mean_sd_text(summary['mean_sd']['dice'])}).",
        "",
    ]
    lines += ["## Every case, out of fold", ""]
    case_keys = ["dice", *(f"dice_{c}" for c in classes), "hd95", "surface_dice"]
    lines += table(
        ["case", "fold", *case_keys, "dice postprocessed"],
        [
            [
                case["case_id"],
                str(case["fold"]),
                *(number(case.get(k)) for k in case_keys),
                number(case["postprocessed"]["dice"]),
            ]
            for case in summary["cases"]
        ],
    )
    return lines


def write_report(path: Path, summary: dict) -> None:
    """Write ``cv_report.md``: per fold and mean ± sd per class, the postprocessing decision, and
    every case's out-of-fold scores."""
    write_text(path, "\n".join(report_lines(summary)) + "\n")
