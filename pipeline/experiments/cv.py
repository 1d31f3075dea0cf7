"""``medseg cv``: k-fold cross-validation of one configuration, nnU-Net's workflow, resumable::

    medseg cv -c configs/default.yaml -c configs/model/unet.yaml -c configs/data/synthetic.yaml
    medseg cv ... --data.num_folds 3 --data.test_fraction 0.2   # k from the config (default 5)
    medseg cv --dry-run ...                                     # the folds and which are done
    medseg infer --model-dir runs/<experiment>/<dataset>/<variant>-cv5-s0 --input scans/ --output masks/

Every flag but ``--dry-run`` and ``--tta`` goes to each fold's ``medseg fit``. The folds train one
after the other in this process (``pipeline.experiments.ablation.run_all``: a completed fold is
skipped, an interrupted one resumes from its ``last.ckpt``), each an ordinary run named
``<variant>-f<fold>-s<seed>`` in the data set's folder of the experiment, all in one W&B group.
Folds are cut by case, seeded by ``data.seed`` (not the run's seed) after the test cases, so
variants compare on the same cases; ``splits.json`` stores them. Every fold plans and normalises
from all cases outside the test split (``data.plan_cases: train_val``, as nnU-Net), so the folds
share one preprocessing and their checkpoints ensemble.

Then each fold's final checkpoint (``last.ckpt``) segments its validation cases with ``medseg
infer`` (into ``<fold run>/validation_final/``; ``validation_final_tta/`` with ``--tta``), those
out-of-fold predictions are scored and choose the postprocessing (``pipeline.experiments.cv_scores``).
The final checkpoint, as nnU-Net: ``best.ckpt`` was chosen on these same cases, so its score
would be optimistic; the folds' final checkpoints are also what ``--model-dir`` ensembles. The CV folder ``<variant>-cv<k>-s<seed>/``
beside the fold runs holds ``splits.json``, ``folds.json`` (each fold's outcome and time),
``postprocessing.json``, ``cv_summary.json`` and ``cv_report.md``.
"""

from __future__ import annotations

import csv
import logging
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.loading.split import make_split
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.reading.layouts import Case, describe
from pipeline.data.reading.registry import mask_ending
from pipeline.errors import DataError
from pipeline.experiments.ablation import run_all
from pipeline.experiments.cv_report import write_report
from pipeline.experiments.cv_scores import CaseResult, evaluate_case, summarise
from pipeline.experiments.suite import Run
from pipeline.files import read_json, write_json
from pipeline.inference.ensemble import CV_SUMMARY, POSTPROCESSING, check_shared
from pipeline.inference.run import infer
from pipeline.run.directory import run_state
from pipeline.run.naming import FitRunner, FitSettings
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.module import CHECKPOINT_KEY

log = logging.getLogger(__name__)
DEFAULT_FOLDS = 5  # nnU-Net's
SPLITS = "splits.json"


@dataclass(frozen=True)
class CrossValidation:
    """The folds of one configuration.

    Attributes:
        folder: the CV folder, ``<experiment>/<dataset>/<variant>-cv<k>-s<seed>``.
        runs: one ``medseg fit`` per fold, in fold order.
        splits: per fold, its ``{"train", "val", "test"}`` case ids.
        settings: the parsed fit settings (data section, identity).
    """

    folder: Path
    runs: list[Run]
    splits: list[dict[str, list[str]]]
    settings: FitSettings


def plan_cv(fit_args: Sequence[str], runner: FitRunner) -> CrossValidation:
    """The folds of the configuration that ``fit_args`` (``medseg fit`` flags) describe, parsed by
    ``runner.settings``.

    Raises:
        DataError: ``--run.name`` or ``--data.split_file`` given (the CV names and cuts its folds),
            too few cases, or a missing data folder.
    """
    settings = runner.settings(["fit", *fit_args])
    data = settings.data
    if settings.run.name:
        problem = "medseg cv names its fold runs <variant>-f<fold>-s<seed>: drop it (--run.experiment keeps CVs apart)"
        raise DataError("--run.name", problem)
    if data["split_file"]:
        raise DataError(data["split_file"], "medseg cv cuts its own folds: drop --data.split_file")
    folds = data["num_folds"] if data["num_folds"] > 1 else DEFAULT_FOLDS
    identities = [settings.identity(fold=f) for f in range(folds)]
    name = f"{settings.variant}-cv{folds}-s{settings.seed}"
    group = f"{identities[0].dataset}/{name}"  # the W&B group of every fold
    ids = [case.case_id for case in describe(data["root"], data["layout"]).cases]
    splits = [
        make_split(ids, data["val_fraction"], data["test_fraction"], data["seed"], folds, f)
        for f in range(folds)
    ]
    shared = ["--data.num_folds", str(folds), "--data.plan_cases", "train_val", "--run.group", group]
    runs = [
        Run(identity.name, identity.directory, ("fit", *fit_args, *shared, "--data.fold", str(f)))
        for f, identity in enumerate(identities)
    ]
    return CrossValidation(identities[0].directory.parent / name, runs, splits, settings)


def write_splits(cv: CrossValidation) -> None:
    """``splits.json``; one written by an earlier start of this CV must hold the same folds."""
    path = cv.folder / SPLITS
    if path.is_file() and read_json(path).get("folds") != cv.splits:
        raise DataError(
            path,
            "holds other folds (the data, data.seed or data.test_fraction changed since this CV began): "
            "start a new CV with --run.experiment NAME",
        )
    write_json(path, {"seed": cv.settings.data["seed"], "folds": cv.splits})


def _predicted(table: Path, inputs: set[str], checkpoints: Sequence[Path]) -> bool:
    """Whether ``table`` lists every input as segmented, after every checkpoint was written."""
    written = max(path.stat().st_mtime_ns for path in checkpoints)
    if not table.is_file() or table.stat().st_mtime_ns < written:
        return False
    with table.open(newline="") as f:
        return {row["input"] for row in csv.DictReader(f) if row["status"] == "ok"} == inputs


def predict_fold(
    checkpoint: Path | Sequence[Path],
    cases: Sequence[Case],
    folder: Path,
    tta: bool = False,
    largest_component: Sequence[str] = (),
) -> list[tuple[Case, Path]]:
    """Segment ``cases`` with ``checkpoint`` (several: their ensemble) into ``folder`` (skipped when
    done after the checkpoints were written), keeping the largest component of the classes named;
    returns each case with its predicted mask."""
    checkpoints = [checkpoint] if isinstance(checkpoint, Path) else list(checkpoint)
    by_input = {";".join(map(str, case.images)): case for case in cases}
    table = folder / "predictions.csv"
    if not _predicted(table, set(by_input), checkpoints):
        result = infer(
            checkpoints,
            [p for case in cases for p in case.images],
            folder,
            tta=tta,
            overwrite=True,
            largest_component=list(largest_component),
            progress_bar=False,
        )
        if result.failed:
            raise DataError(result.failed[0][0], f"out-of-fold prediction failed: {result.failed[0][1]}")
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    # named as the writer names them: the input's own format (.mha in, .mha out), NIfTI for DICOM
    return [
        (by_input[r["input"]], folder / f"{r['case']}{mask_ending(by_input[r['input']].images[0])}")
        for r in rows
    ]


def fold_preprocessing(checkpoint: Path) -> Preprocessing:
    """The preprocessing stored in a fold's checkpoint (class names, label map, ...)."""
    return Preprocessing.from_checkpoint(load_checkpoint(checkpoint)[CHECKPOINT_KEY]["preprocessing"])


CHECKPOINT_RULE = (
    "each fold's final checkpoint (last.ckpt) predicts its validation cases and forms the ensemble: "
    "best.ckpt was chosen on those same cases, so its out-of-fold score would be optimistic"
)
FINAL = "last.ckpt"  # a completed run's last.ckpt holds its final weights


def final_checkpoint(run_dir: Path) -> Path:
    """The final checkpoint of a completed run (``checkpoints/last.ckpt``)."""
    return run_dir / "checkpoints" / FINAL


def score_fold(
    checkpoint: Path | Sequence[Path], cases: Sequence[Case], folder: Path, fold: int, tta: bool = False
) -> tuple[list[CaseResult], Preprocessing]:
    """Segment a fold's validation ``cases`` with ``checkpoint`` (several: their ensemble) into
    ``folder`` and score each."""
    prep = fold_preprocessing(checkpoint if isinstance(checkpoint, Path) else checkpoint[0])
    results = [
        evaluate_case(case, mask, fold, prep.class_names, dict(prep.label_map))
        for case, mask in predict_fold(checkpoint, cases, folder, tta)
    ]
    return results, prep


def out_of_fold(cv: CrossValidation, tta: bool = False) -> tuple[list[CaseResult], list[Preprocessing]]:
    """Predict and score every fold's validation cases with its final checkpoint."""
    data = cv.settings.data
    cases = {case.case_id: case for case in describe(data["root"], data["layout"]).cases}
    results, preps = [], []
    for fold, run in enumerate(cv.runs):
        if read_json(run.directory / "split.json") != cv.splits[fold]:
            raise DataError(run.directory / "split.json", f"is not fold {fold} of {cv.folder / SPLITS}")
        val = [cases[i] for i in cv.splits[fold]["val"]]
        folder = run.directory / ("validation_final_tta" if tta else "validation_final")
        scored, prep = score_fold(final_checkpoint(run.directory), val, folder, fold, tta)
        results += scored
        preps.append(prep)
        log.info("fold %d: %d out-of-fold cases scored", fold, len(val))
    return results, preps


def final_and_best(run_dir: Path) -> dict:
    """A fold run's ``final`` (last validation) and ``best`` metrics from its ``summary.json``."""
    summary = read_json(run_dir / "summary.json")
    return {"final": summary.get("final", {}), "best": summary.get("best", {})}


def cross_validate(
    fit_args: Sequence[str],
    runner: FitRunner,
    tta: bool = False,
    report: Callable[[str], None] = log.info,
) -> tuple[Path, dict]:
    """Train every fold (resumably), score the out-of-fold predictions, choose the postprocessing
    and write the CV folder; returns the folder and ``cv_summary.json``'s content.

    Args:
        fit_args: ``medseg fit`` flags shared by the folds.
        runner: parses and runs ``medseg fit`` (``pipeline.cli.identity.fit_runner``); a
            ``SystemExit`` from a fold stops the CV.
        tta: segment the validation cases with mirroring test-time augmentation.
        report: where the progress lines go.

    Raises:
        DataError: see ``plan_cv``; a fold that did not complete; folds that disagree on preprocessing.
    """
    cv = plan_cv(fit_args, runner)
    write_splits(cv)
    command = shlex.join(["medseg", "cv", *fit_args])
    run_all(cv.runs, cv.folder / "folds.json", command, runner.fit, report, label="cv", done=("completed",))
    unfinished = [run.name for run in cv.runs if run_state(run.directory) != "completed"]
    if unfinished:
        problem = f"fold run(s) {', '.join(unfinished)} did not complete (see above); run medseg cv again: "
        raise DataError(cv.folder, problem + "completed folds are kept, interrupted ones resume")
    results, preps = out_of_fold(cv, tta)
    checkpoints = [final_checkpoint(run.directory) for run in cv.runs]
    check_shared(checkpoints, preps)
    class_names = preps[0].class_names
    summary = summarise(results, len(cv.runs), class_names)
    write_json(cv.folder / POSTPROCESSING, summary["postprocessing"])
    identity = cv.settings.identity(fold=0)
    summary = {
        "command": command,
        "experiment": identity.experiment,
        "dataset": identity.dataset,
        "variant": cv.settings.variant,
        "seed": cv.settings.seed,
        "class_names": list(class_names),
        "volumetric": preps[0].volumetric,
        "tta": tta,
        "checkpoints": [os.path.relpath(path, cv.folder) for path in checkpoints],
        "checkpoint_rule": CHECKPOINT_RULE,
        "runs": [
            {"fold": f, "run": run.name, **final_and_best(run.directory)} for f, run in enumerate(cv.runs)
        ],
        **summary,
    }
    write_json(cv.folder / CV_SUMMARY, summary)
    write_report(cv.folder / "cv_report.md", summary)
    report(f"cv: {len(results)} out-of-fold cases scored")
    return cv.folder, summary
