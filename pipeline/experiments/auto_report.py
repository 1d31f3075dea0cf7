"""What ``medseg auto`` leaves: ``auto_summary.json`` (also the model folder's index that ``medseg
infer --model-dir`` reads), ``postprocessing.json``, ``auto_report.md``, and one W&B run in the
runs' group with the report attached."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.experiments.cv_report import number, table
from pipeline.experiments.cv_scores import mean_scores, postprocessed_dice
from pipeline.files import write_json, write_text
from pipeline.inference.ensemble import AUTO_SUMMARY, POSTPROCESSING

RUN_FIELDS = ("candidate", "fold", "limit_s", "fit_s", "oof_s", "steps", "screen_dice", "dice")


def summarise(state: dict, choice: dict, test: dict | None, used: float) -> dict:
    """``auto_summary.json``: every run, the choice and its reason, time per phase, the test scores."""
    settings = state["settings"]
    class_names = ["background", *choice["postprocessing"]["classes"]]
    adopted = choice["postprocessing"]["largest_component"]
    runs = []
    for name, entry in state["runs"].items():
        per_class = mean_scores([case["scores"] for case in entry.get("cases", [])])
        runs.append(
            {
                "run": name,
                **{k: entry[k] for k in RUN_FIELDS if k in entry},
                **{k: v for k, v in per_class.items() if k.startswith("dice_")},
            }
        )
    postprocessed = mean_scores([postprocessed_dice(r, adopted, class_names) for r in choice["results"]])
    return {
        "settings": settings,
        "budget_s": settings["budget"],
        "used_s": round(used, 1),
        "used_share": round(used / settings["budget"], 4),
        "phases_s": {**state["phases"], "other": round(used - sum(state["phases"].values()), 1)},
        "candidates": [c["name"] for c in state["candidates"]],
        "keyhole_3d": state["keyhole"],
        "folds_trained": state["folds_trained"],
        "finalists": state.get("finalists", []),
        "runs": runs,
        "segments": state["segments"],
        "choice": {k: v for k, v in choice.items() if k not in ("results", "postprocessing", "checkpoints")},
        "oof_dice_postprocessed": postprocessed.get("dice"),
        "checkpoints": choice["checkpoints"],
        "postprocessing": choice["postprocessing"],
        "test": test,
    }


def report_lines(summary: dict) -> list[str]:
    """``auto_report.md``'s lines."""
    settings, choice = summary["settings"], summary["choice"]
    lines = [
        f"# medseg auto on {settings['root']}",
        "",
        f"Budget {settings['budget']:.0f} s, used {summary['used_s']:.0f} s ({100 * summary['used_share']:.1f}%). "
        "Rule: every candidate screens on fold 0 for a quarter of a final run; the finalists continue "
        "fold 0 to a final run and train the other folds. "
        f"Candidates: {', '.join(summary['candidates'])}"
        + (" (full-resolution 3D left out: its patch is a keyhole)" if summary["keyhole_3d"] else "")
        + f"; {summary['folds_trained']} of {settings['folds']} folds trained; finalists: "
        f"{', '.join(summary['finalists'])}.",
        "",
        f"**Chosen: {choice['model']}** ({len(summary['checkpoints'])} checkpoint(s), folds "
        f"{', '.join(map(str, choice['folds']))}): {choice['reason']}. Pair: {choice['pair']}. "
        f"Postprocessing (largest component kept): {', '.join(summary['postprocessing']['largest_component']) or 'none'}; "
        f"out-of-fold Dice with it {number(summary['oof_dice_postprocessed'])}.",
        "",
        "Out-of-fold scores come from each run's final checkpoint (last.ckpt), never a checkpoint chosen "
        "on the same cases.",
        "",
        "## Runs",
        "",
    ]
    classes = [k for k in summary["runs"][0] if k.startswith("dice_")] if summary["runs"] else []
    rows = [
        [
            r["run"],
            str(r.get("steps", "")),
            number(r.get("limit_s"), 0),
            number(r.get("fit_s"), 0),
            number(r.get("oof_s"), 0),
            number(r.get("screen_dice")),
            number(r.get("dice")),
            *(number(r.get(c)) for c in classes),
        ]
        for r in summary["runs"]
    ]
    header = ["run", "steps", "limit s", "fit s", "oof s", "screening Dice", "oof Dice", *classes]
    lines += table(header, rows)
    notes = [f"- {key}: {seg.get('skipped') or seg.get('error')}" for key, seg in summary["segments"].items()
             if seg.get("skipped") or seg.get("error")]  # fmt: skip
    lines += ["", "Not trained or failed:", "", *notes] if notes else []
    lines += ["", "## Time per phase (s)", ""]
    lines += table(list(summary["phases_s"]), [[number(v, 1) for v in summary["phases_s"].values()]])
    if summary["test"]:
        mean = summary["test"]["mean"]
        keys = ["dice", *(k for k in mean if k.startswith("dice_")), "hd95"]
        lines += ["", f"## Held-out test cases ({len(summary['test']['cases'])})", ""]
        lines += table(
            ["case", *keys],
            [[c["case_id"], *(number(c.get(k)) for k in keys)] for c in summary["test"]["cases"]],
        )
        lines += [f"| mean | {' | '.join(number(mean.get(k)) for k in keys)} |"]
    return lines


def log_to_wandb(folder: Path, summary: dict, project: str, group: str) -> None:
    """One W&B run in the runs' group holding the summary and ``auto_report.md`` (offline without a key)."""
    import wandb

    from pipeline.run.loggers import finish_wandb, wandb_mode

    run = wandb.init(
        project=project, group=group, name=f"{group}/report", job_type="auto",
        dir=str(folder), mode="offline" if wandb_mode() in ("offline", "dryrun") else "online",
        config=summary["settings"],
    )  # fmt: skip
    run.summary.update({"choice": summary["choice"]["model"], "oof_dice": summary["oof_dice_postprocessed"]})
    artifact = wandb.Artifact("auto_report", type="report")
    artifact.add_file(str(folder / "auto_report.md"))
    run.log_artifact(artifact)
    finish_wandb(failed=False)


def write_outputs(
    folder: Path, state: dict, choice: dict, test: dict | None, used: float, report: Callable[[str], None]
) -> dict:
    """Write the model folder's files; returns ``auto_summary.json``'s content."""
    summary = summarise(state, choice, test, used)
    write_json(folder / POSTPROCESSING, choice["postprocessing"])
    write_json(folder / AUTO_SUMMARY, summary)
    write_text(folder / "auto_report.md", "\n".join(report_lines(summary)) + "\n")
    report(f"[auto] chose {choice['model']}: {choice['reason']}")
    report(
        f"[auto] model folder: {folder} (medseg infer --model-dir {folder}); report: {folder / 'auto_report.md'}"
    )
    return summary
