"""``medseg auto``'s choice: the best finalist or the ensemble of the two, by mean out-of-fold
Dice on the same cases, and the postprocessing those predictions choose; then the test cases.

Every score here comes from final checkpoints: a run's ``last.ckpt`` predicted its fold's
validation cases (``pipeline.experiments.auto``), and the two finalists' ``last.ckpt`` of one fold
predict them together as an ensemble (the mean softmax, as ``medseg infer`` will). Two finalists
ensemble only when they share one preprocessing (``pipeline.inference.ensemble.check_shared``):
the 2D and the full-resolution 3D network do; the low-resolution 3D network, on its own grid,
does not.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pipeline.data.reading.layouts import Case
from pipeline.errors import CheckpointError
from pipeline.experiments.auto_schedule import rank
from pipeline.experiments.cv import final_checkpoint, fold_preprocessing, predict_fold, score_fold
from pipeline.experiments.cv_scores import CaseResult, choose_postprocessing, evaluate_case, mean_scores
from pipeline.inference.ensemble import check_shared


def mean_dice(results: list[CaseResult]) -> float | None:
    """Mean over cases of each case's foreground-mean Dice (undefined cases left out)."""
    return mean_scores([r.scores for r in results]).get("dice")


def scored_runs(state: dict, candidate: str) -> dict[int, list[CaseResult]]:
    """A candidate's out-of-fold results by fold, for its runs that were scored."""
    return {
        entry["fold"]: [CaseResult(**case) for case in entry["cases"]]
        for entry in state["runs"].values()
        if entry["candidate"] == candidate and "cases" in entry
    }


def _pair(
    names: list[str], folds: list[int], folder: Path, val: Callable[[int], list[Case]]
) -> tuple[list[CaseResult] | None, str]:
    """The two finalists' ensemble scored on the folds both trained, or None and why not."""
    first = [final_checkpoint(folder / f"{name}-f{folds[0]}") for name in names]
    try:
        check_shared(first, [fold_preprocessing(path) for path in first])
    except CheckpointError as err:
        return None, f"not ensembled: {err}"
    results = []
    for fold in folds:
        members = [final_checkpoint(folder / f"{name}-f{fold}") for name in names]
        scored, _ = score_fold(members, val(fold), folder / "ensembles" / f"{'+'.join(names)}-f{fold}", fold)
        results += scored
    return results, "ensembled on the folds both trained"


def choose(state: dict, folder: Path, cases: dict[str, Case], split: Callable[[int], dict]) -> dict:
    """The model ``medseg auto`` keeps: ``{"model", "members", "folds", "checkpoints", "oof_dice",
    "cases", "reason", "pair", "postprocessing", "results"}``.

    The finalists are compared on the folds every one of them trained (the same cases); when that
    leaves none (a finalist's runs failed), every candidate with a scored run is compared on its own.
    """
    by_candidate = {c["name"]: scored_runs(state, c["name"]) for c in state["candidates"]}
    finalists = [n for n in state.get("finalists", []) if by_candidate[n]]
    shared = sorted(set.intersection(*(set(by_candidate[n]) for n in finalists))) if finalists else []
    if not shared:
        finalists = [n for n, runs in by_candidate.items() if runs]
        if not finalists:
            raise CheckpointError(folder, "no run of medseg auto finished: nothing to choose from")
    options: dict[str, list[CaseResult]] = {
        name: [r for fold, rs in by_candidate[name].items() if not shared or fold in shared for r in rs]
        for name in finalists
    }
    pair_note = "one finalist: nothing to ensemble" if len(finalists) < 2 else ""
    if len(finalists) == 2 and shared:
        ensemble, pair_note = _pair(finalists, shared, folder, lambda f: [cases[i] for i in split(f)["val"]])
        if ensemble is not None:
            options["+".join(finalists)] = ensemble
    dice = {name: mean_dice(results) for name, results in options.items()}
    best = max(dice, key=lambda name: rank(dice[name]))  # a tie keeps the single configuration
    members = best.split("+")
    folds = shared or sorted(by_candidate[best])
    checkpoints = [final_checkpoint(folder / f"{m}-f{f}") for f in folds for m in members]
    class_names = fold_preprocessing(checkpoints[0]).class_names
    compared = ", ".join(f"{n} {'undefined' if d is None else f'{d:.4f}'}" for n, d in dice.items())
    return {
        "model": best,
        "members": members,
        "folds": folds,
        "checkpoints": [os.path.relpath(path, folder) for path in checkpoints],
        "oof_dice": dice,
        "cases": len(options[best]),
        "reason": f"highest mean out-of-fold Dice on the same {len(options[best])} cases ({compared})",
        "pair": pair_note,
        "postprocessing": choose_postprocessing(options[best], class_names),
        "results": options[best],
    }


def test_scores(choice: dict, folder: Path, cases: list[Case]) -> dict | None:
    """The chosen model, with its postprocessing, on the held-out cases (None without any)."""
    if not cases:
        return None
    checkpoints = [folder / path for path in choice["checkpoints"]]
    prep = fold_preprocessing(checkpoints[0])
    adopted = choice["postprocessing"]["largest_component"]
    results = [
        evaluate_case(case, mask, -1, prep.class_names, dict(prep.label_map))
        for case, mask in predict_fold(checkpoints, cases, folder / "test", largest_component=adopted)
    ]
    return {
        "cases": [{"case_id": r.case_id, **r.scores} for r in results],
        "mean": mean_scores([r.scores for r in results]),
    }
