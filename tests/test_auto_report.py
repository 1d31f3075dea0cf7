"""`medseg auto`'s record of what it did: `auto_summary.json` and `auto_report.md` from a state,
and the W&B run (offline) holding the report in the runs' group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.experiments.auto_report import log_to_wandb, write_outputs
from pipeline.experiments.cv_scores import CaseResult, choose_postprocessing
from tests.helpers.wandb_records import read_offline_run

CLASSES = ("background", "organ")


def case(case_id: str, fold: int, dice: float, largest: float) -> CaseResult:
    scores = {"dice": dice, "dice_organ": dice, "hd95": 2.0}
    return CaseResult(case_id, fold, scores, {"organ": dice}, {"organ": largest})


@pytest.fixture()
def finished(tmp_path: Path) -> tuple[Path, dict]:
    """A finished auto's state and choice: 2d screened and continued, 3d_lowres screened only."""
    results = [case("a", 0, 0.8, 0.9), case("b", 0, 0.6, 0.5)]
    state = {
        "settings": {"root": "/data/Task", "budget": 600.0, "folds": 5},
        "phases": {"plan": 5.0, "train": 500.0, "out_of_fold": 40.0},
        "candidates": [{"name": "2d"}, {"name": "3d_lowres"}],
        "keyhole": True,
        "folds_trained": 1,
        "finalists": ["2d"],
        "segments": {"3d_lowres-f1:fold": {"skipped": "budget spent: 3 s of training left for it"}},
        "runs": {
            "2d-f0": {"candidate": "2d", "fold": 0, "limit_s": 400.0, "steps": 900, "screen_dice": 0.5,
                      "dice": 0.7, "cases": [vars(r) for r in results]},
            "3d_lowres-f0": {"candidate": "3d_lowres", "fold": 0, "limit_s": 100.0, "steps": 80, "dice": 0.4,
                             "cases": [vars(case("a", 0, 0.4, 0.4))]},
        },
    }  # fmt: skip
    choice = {
        "model": "2d",
        "members": ["2d"],
        "folds": [0],
        "checkpoints": ["2d-f0/checkpoints/last.ckpt"],
        "oof_dice": {"2d": 0.7},
        "cases": 2,
        "reason": "highest mean out-of-fold Dice on the same 2 cases (2d 0.7000)",
        "pair": "one finalist: nothing to ensemble",
        "postprocessing": choose_postprocessing(results, CLASSES),
        "results": results,
    }
    lines: list[str] = []
    summary = write_outputs(tmp_path, state, choice, None, 590.0, lines.append)
    assert any("chose 2d" in line for line in lines)
    return tmp_path, summary


def test_auto_summary_holds_runs_choice_phases_and_the_postprocessed_dice(finished):
    folder, summary = finished
    assert json.loads((folder / "auto_summary.json").read_text()) == summary
    assert summary["used_share"] == pytest.approx(590 / 600, abs=1e-4)
    assert summary["phases_s"]["other"] == pytest.approx(590 - 545)
    runs = {r["run"]: r for r in summary["runs"]}
    assert runs["2d-f0"]["dice_organ"] == pytest.approx(0.7) and runs["2d-f0"]["screen_dice"] == 0.5
    # keeping the largest component raised the mean organ Dice (0.7 -> 0.7): a tie keeps nothing
    assert summary["postprocessing"]["largest_component"] == []
    assert summary["oof_dice_postprocessed"] == pytest.approx(0.7)
    assert json.loads((folder / "postprocessing.json").read_text()) == summary["postprocessing"]
    report = (folder / "auto_report.md").read_text()
    assert "**Chosen: 2d**" in report and "keyhole" in report and "budget spent" in report
    assert "| 2d-f0 | 900 | 400 |" in report


def test_auto_report_is_a_wandb_run_in_the_group_with_the_report(finished, monkeypatch):
    folder, summary = finished
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_to_wandb(folder, summary, "medseg-test", "Task/auto")
    (run_dir,) = (folder / "wandb").glob("offline-run-*")
    records = read_offline_run(run_dir)
    assert (
        records.run is not None
        and records.run.run_group == "Task/auto"
        and records.run.project == "medseg-test"
    )
    assert records.summary["choice"] == "2d" and records.summary["oof_dice"] == pytest.approx(0.7)
    assert [a.name for a in records.artifacts] == ["auto_report"]
