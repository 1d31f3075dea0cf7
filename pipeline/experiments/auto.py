"""``medseg auto ROOT --budget HH:MM:SS``: from a data folder and a time budget to the best model
it can buy, chosen on out-of-fold predictions, in one model folder::

    medseg auto /data/Task09_Spleen --budget 02:00:00
    medseg auto ROOT --budget 00:30:00 --test-fraction 0.2      # hold cases out, score the choice
    medseg infer --model-dir runs/auto/Task09_Spleen --input scans/ --output masks/

Phases, every one counted against the budget: plan (once, as ``medseg plan`` prints it), train
(the runs ``pipeline.experiments.auto_schedule`` decides, each an ordinary ``medseg fit`` named
``<candidate>-f<fold>`` whose learning-rate schedule follows its own ``trainer.max_time``), out of
fold (after each run, its final checkpoint segments the fold's validation cases, scored per case
in 3D as ``medseg cv`` scores them), choice (the better finalist, or the two as an ensemble when
that scores higher on the same cases; postprocessing chosen on the same predictions), test (with
``--test-fraction``) and report (``auto_summary.json``, ``auto_report.md``).

``auto_state.json`` records every decision and measurement as it is made: ``medseg auto`` after a
kill goes on where it stopped (finished runs kept, the interrupted one resumed from its
``last.ckpt`` with its own time limit), and on a finished folder it only reports. The time
between the last record and a kill is not counted.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.loading.split import make_split
from pipeline.data.reading.layouts import describe
from pipeline.data.reading.volumes import is_volume_case
from pipeline.errors import DataError
from pipeline.experiments import auto_schedule as rule
from pipeline.experiments.auto_choice import choose, mean_dice, test_scores
from pipeline.experiments.auto_report import log_to_wandb, write_outputs
from pipeline.experiments.cv import final_checkpoint, score_fold
from pipeline.files import read_json, write_json
from pipeline.inference.ensemble import AUTO_SUMMARY
from pipeline.run.directory import run_state
from pipeline.run.loggers import wandb_mode
from pipeline.run.naming import FitRunner, dataset_name

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STATE = "auto_state.json"
COST_GUESS = 0.15  # a run's cost outside training (setup, out-of-fold prediction) before one is measured
CLOSING_SHARE = 0.03  # of the budget, kept for the choice and the report
NO_VALIDATION = 2**31 - 1  # check_val_every_n_epoch that no run reaches
SHORTEST_RUN = 30.0  # s of training: below this a run is not started (the budget is spent)


@dataclass(frozen=True)
class AutoSettings:
    """What ``medseg auto`` was asked for; a second call on the same folder must ask the same.

    Attributes:
        root: the data folder (MSD or nnU-Net raw layout, or 2D image/mask folders).
        budget: seconds, everything included.
        folds: the folds the cases are cut into (nnU-Net's 5); the budget decides how many train.
        min_run: seconds of training a run should get; fewer folds train when it cannot.
        test_fraction: cases held out and scored with the chosen model (0: every case in the folds).
        resnet: add the UNet on a ResNet-34 encoder (2D) to the candidates.
        experiment: the folder under ``runs_root`` (``runs/<experiment>/<dataset>/``).
        seed: the folds' and the runs' seed.
        extra: ``medseg fit`` flags added to every run.
    """

    root: str
    budget: float
    folds: int = 5
    min_run: float = 600.0
    test_fraction: float = 0.0
    resnet: bool = False
    experiment: str = "auto"
    runs_root: str = "runs"
    seed: int = 0
    extra: tuple[str, ...] = ()

    @property
    def folder(self) -> Path:
        """``<runs_root>/<experiment>/<dataset>``: the runs and the model folder."""
        return Path(self.runs_root) / self.experiment / dataset_name(self.root)

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "extra": list(self.extra)}


class Budget:
    """Seconds used of the budget: what earlier calls recorded plus this call's time."""

    def __init__(self, total: float, used_before: float, started: float | None = None) -> None:
        self.total, self.before = total, used_before
        self.start = time.time() if started is None else started

    @property
    def used(self) -> float:
        return self.before + time.time() - self.start

    @property
    def left(self) -> float:
        return self.total - self.used

    def line(self, phase: str) -> str:
        """One progress line: the phase, time used and left."""
        return f"[auto] {phase}: {minutes(self.used)} used, {minutes(max(0.0, self.left))} left of {minutes(self.total)}"


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def wandb_group(settings: AutoSettings) -> str:
    """The W&B group of every run and of the report: ``<dataset>/<experiment>``."""
    return f"{dataset_name(settings.root)}/{settings.experiment}"


def fit_args(settings: AutoSettings, volumes: bool, candidate: rule.Candidate, fold: int) -> list[str]:
    """The ``medseg fit`` arguments of one run (without its time limit)."""
    data = "msd" if volumes else "synthetic"
    configs = ["default.yaml", f"model/{candidate.model}.yaml", f"data/{data}.yaml"]
    for config in configs:
        if not (CONFIGS / config).is_file():
            raise DataError(CONFIGS / config, "medseg auto trains from the project's configs: it is missing")
    args = ["fit", *(a for config in configs for a in ("-c", str(CONFIGS / config)))]
    args += ["--data.root", settings.root, "--data.num_folds", str(settings.folds), "--data.fold", str(fold)]
    args += ["--data.plan_cases", "train_val", "--data.test_fraction", str(settings.test_fraction)]
    args += ["--data.seed", str(settings.seed), "--seed_everything", str(settings.seed)]
    args += ["--run.root", settings.runs_root, "--run.experiment", settings.experiment]
    args += ["--run.name", f"{candidate.name}-f{fold}", "--run.group", wandb_group(settings)]
    args += ["--trainer.max_epochs", "1000000", *candidate.flags]  # the time limit ends every run
    # no validation inside the runs: the out-of-fold prediction of the final checkpoint is it
    args += ["--trainer.check_val_every_n_epoch", str(NO_VALIDATION)]
    return [*args, *settings.extra]


class Auto:
    """One ``medseg auto``: its settings, state (``auto_state.json``), budget and data."""

    def __init__(
        self,
        settings: AutoSettings,
        runner: FitRunner,
        report: Callable[[str], None],
        started: float | None = None,
    ) -> None:
        self.settings, self.runner, self.report = settings, runner, report
        self.folder = settings.folder
        self.state = read_json(self.folder / STATE)
        if self.state and self.state["settings"] != settings.record():
            raise DataError(
                self.folder / STATE,
                f"holds a medseg auto run with other settings ({self.state['settings']}): go on with the "
                "same settings, or start another with --experiment NAME",
            )
        self.state.setdefault("settings", settings.record())
        self.state.setdefault("phases", {})
        self.state.setdefault("runs", {})
        self.state.setdefault("segments", {})
        self.budget = Budget(settings.budget, self.state.get("used_s", 0.0), started)
        info = describe(settings.root)
        self.cases = {case.case_id: case for case in info.cases}
        self.volumes = is_volume_case(info.cases[0])
        in_folds = len(info.cases) - round(len(info.cases) * settings.test_fraction)
        if in_folds < 2:
            raise DataError(
                settings.root, f"{in_folds} case(s) outside the test split: too few for two folds"
            )
        if settings.folds > in_folds:  # a fold per case at most: every fold needs a validation case
            report(
                f"[auto] {in_folds} cases outside the test split: {in_folds} folds instead of {settings.folds}"
            )
            self.settings = dataclasses.replace(settings, folds=in_folds)

    def save(self) -> None:
        self.state["used_s"] = round(self.budget.used, 1)
        write_json(self.folder / STATE, self.state)

    def timed(self, phase: str, began: float) -> None:
        """Add the time since ``began`` (perf_counter) to ``phase``."""
        phases = self.state["phases"]
        phases[phase] = round(phases.get(phase, 0.0) + time.perf_counter() - began, 1)

    def split(self, fold: int) -> dict[str, list[str]]:
        ids = sorted(self.cases)
        return make_split(
            ids, 0.2, self.settings.test_fraction, self.settings.seed, self.settings.folds, fold
        )

    def plan(self) -> list[rule.Candidate]:
        """Plan once (recorded); the candidates the plan offers and the folds the budget allows."""
        if "candidates" not in self.state:
            began = time.perf_counter()
            self.report(self.budget.line("plan"))
            if self.runner.plan is None:
                raise ValueError("medseg auto needs a runner that plans (pipeline.cli.identity.fit_runner)")
            probe = fit_args(self.settings, self.volumes, rule.Candidate("3d_fullres", "unet3d"), 0)
            plan = self.runner.plan(probe) if self.volumes else None
            found = rule.candidates(plan, self.settings.resnet)
            self.state["candidates"] = [dataclasses.asdict(c) for c in found]
            self.state["keyhole"] = bool(plan is not None and plan.keyhole)
            self.timed("plan", began)
            train = (self.budget.left - CLOSING_SHARE * self.settings.budget) / (1 + COST_GUESS)
            names = [c.name for c in found]
            finalists = rule.expected_finalists(found)
            self.state["folds_trained"] = rule.fold_count(
                names, finalists, self.settings.folds, train, self.settings.min_run
            )
            self.save()
        return [
            rule.Candidate(c["name"], c["model"], tuple(c["flags"]), c["grid"])
            for c in self.state["candidates"]
        ]

    def segments(self) -> list[rule.Segment]:
        """Every stretch of training; before the finalists are known, as many as there will be."""
        candidates = self.plan()
        names = [c.name for c in candidates]
        chosen = self.state.get("finalists") or names[: rule.expected_finalists(candidates)]
        return rule.segments(names, chosen, self.state["folds_trained"])

    def open_segments(self) -> list[rule.Segment]:
        """Segments not yet done, skipped or failed."""
        done = self.state["segments"]
        return [
            seg
            for seg in self.segments()
            if not any(key in done.get(seg.key, {}) for key in ("oof_s", "skipped", "error"))
        ]

    def cost_per_segment(self, seconds: float) -> float:
        """Measured mean cost of a segment outside its training time; a guess before any."""
        costs = [
            max(0.0, seg["fit_s"] - seg["trains_s"]) + seg["oof_s"]
            for seg in self.state["segments"].values()
            if "oof_s" in seg and "fit_s" in seg
        ]
        return statistics.fmean(costs) if costs else COST_GUESS * seconds

    def closing_reserve(self) -> float:
        """Time kept for the choice (the finalists' ensemble predicting every trained fold's
        validation cases, when there are two), the test cases and the report."""
        oof = [seg["oof_s"] for seg in self.state["segments"].values() if "oof_s" in seg]
        candidates = self.plan()
        pair = len(self.state.get("finalists") or [None] * rule.expected_finalists(candidates)) > 1
        members = 2 if pair else 1
        per_fold = members * statistics.fmean(oof) if oof else 0.0
        ensemble = per_fold * self.state["folds_trained"] if pair else 0.0
        test = (
            per_fold
            * self.state["folds_trained"]
            * len(self.split(0)["test"])
            / max(1, len(self.split(0)["val"]))
        )
        return CLOSING_SHARE * self.settings.budget + ensemble + test

    def final_length(self) -> float:
        """L: the training time left (budget, less the closing reserve and each open segment's
        measured cost), over the open segments' lengths in final runs."""
        open_segments = self.open_segments()
        guess = self.budget.left / max(1, len(open_segments))
        left = self.budget.left - self.closing_reserve() - len(open_segments) * self.cost_per_segment(guess)
        return rule.final_length(max(0.0, left), open_segments)

    def limit(self, segment: rule.Segment) -> tuple[float, float]:
        """(the run's ``max_time`` in s, the segment's own training time in s) for a new segment;
        a fold-0 continuation's limit adds to its screening run's."""
        length = self.final_length() * rule.WEIGHTS[segment.kind]
        shortest = min(SHORTEST_RUN, self.settings.min_run)
        while length < shortest and segment.kind == "fold" and self.state["folds_trained"] > segment.fold + 1:
            self.state["folds_trained"] -= 1  # fewer folds rather than runs too short to learn
            length = self.final_length() * rule.WEIGHTS[segment.kind]
        finalists = self.state.get("finalists", [])
        while length < shortest and segment.kind == "continue" and len(finalists) > 1:
            finalists = self.state["finalists"] = finalists[:1]  # one finalist at length, not two cut short
            length = self.final_length() * rule.WEIGHTS[segment.kind]
        if segment.kind != "continue":
            return length, length
        screened = self.state["segments"][f"{segment.run}:screen"]["limit_s"]
        return screened + length, length

    def train(self, candidate: rule.Candidate, segment: rule.Segment) -> None:
        """Train one segment (or resume it), then score its fold's validation cases with the run's final checkpoint."""
        seg = self.state["segments"].setdefault(segment.key, {})
        if any(key in seg for key in ("oof_s", "skipped", "error")):
            return
        directory = self.folder / segment.run
        if "limit_s" not in seg:
            limit, trains = self.limit(segment)
            if segment not in self.segments():  # its finalist was dropped to make room
                del self.state["segments"][segment.key]
                self.save()
                return
            if trains < min(SHORTEST_RUN, self.settings.min_run) and (
                segment.fold or segment.kind == "continue"
            ):
                seg["skipped"] = f"budget spent: {trains:.0f} s of training left for it"
                self.report(f"[auto] {segment.run}: not trained ({seg['skipped']})")
                self.save()
                return
            seg.update(limit_s=round(limit, 1), trains_s=round(trains, 1))
            self.save()
        if not seg.get("trained"):
            resume = segment.kind == "continue" or run_state(directory) == "resume"
            words = f"{segment.kind} {segment.run} to {minutes(seg['limit_s'])}"
            self.report(self.budget.line(words + (" (from its last.ckpt)" if resume else "")))
            args = fit_args(self.settings, self.volumes, candidate, segment.fold)
            args += [
                "--trainer.max_time",
                rule.clock(seg["limit_s"]),
                *(("--ckpt_path", "last") if resume else ()),
            ]
            began = time.perf_counter()
            try:
                self.runner.fit(args)
            except DataError:
                raise
            except Exception as err:  # one broken configuration must not stop the others
                log.exception("%s failed", segment.run)
                seg["error"] = f"{type(err).__name__}: {err}"
            seg["fit_s"] = round(seg.get("fit_s", 0.0) + time.perf_counter() - began, 1)
            self.timed("train", began)
            if run_state(directory) != "completed":
                seg.setdefault("error", f"the run ended {run_state(directory)}")
            seg["trained"] = "error" not in seg
            self.save()
            if not seg["trained"]:
                return
        self.score(segment, seg)

    def score(self, segment: rule.Segment, seg: dict) -> None:
        """Out-of-fold scores of a run's final checkpoint on its fold's validation cases."""
        began = time.perf_counter()
        directory = self.folder / segment.run
        if read_json(directory / "split.json") != self.split(segment.fold):
            raise DataError(directory / "split.json", f"is not fold {segment.fold} of this medseg auto")
        val = [self.cases[i] for i in self.split(segment.fold)["val"]]
        results, _ = score_fold(
            final_checkpoint(directory), val, directory / "validation_final", segment.fold
        )
        run = self.state["runs"].setdefault(
            segment.run, {"candidate": segment.candidate, "fold": segment.fold}
        )
        if segment.kind == "continue":
            run["screen_dice"] = run.get("dice")
        run.update(
            limit_s=seg["limit_s"],
            steps=read_json(directory / "summary.json").get("steps"),
            cases=[dataclasses.asdict(r) for r in results],
            dice=mean_dice(results),
        )
        run["fit_s"] = round(run.get("fit_s", 0.0) + seg["fit_s"], 1)
        seg["oof_s"] = round(time.perf_counter() - began, 1)
        run["oof_s"] = round(run.get("oof_s", 0.0) + seg["oof_s"], 1)
        self.timed("out_of_fold", began)
        self.save()
        dice = "undefined" if run["dice"] is None else f"{run['dice']:.4f}"
        self.report(f"[auto] {segment.run}: out-of-fold Dice {dice} over {len(results)} cases")

    def run(self) -> dict:
        """Every phase, resumably; returns ``auto_summary.json``'s content."""
        if self.state.get("finished") and (self.folder / AUTO_SUMMARY).is_file():
            self.report(f"[auto] finished before: {self.folder / 'auto_report.md'}")
            return read_json(self.folder / AUTO_SUMMARY)
        self.folder.mkdir(parents=True, exist_ok=True)
        splits = [self.split(f) for f in range(self.settings.folds)]
        write_json(self.folder / "splits.json", {"seed": self.settings.seed, "folds": splits})
        by_name = {c.name: c for c in self.plan()}
        self.report(
            f"[auto] candidates: {', '.join(by_name)}; {self.state['folds_trained']} of "
            f"{self.settings.folds} folds"
        )
        while todo := self.open_segments():
            segment = todo[0]
            if segment.kind != "screen" and "finalists" not in self.state:  # the screening is over
                scores = {name: self.state["runs"].get(f"{name}-f0", {}).get("dice") for name in by_name}
                self.state["finalists"] = rule.finalists(scores, {n: c.grid for n, c in by_name.items()})
                self.save()
                self.report(f"[auto] finalists: {', '.join(self.state['finalists'])}")
                continue
            self.train(by_name[segment.candidate], segment)
        if "finalists" not in self.state:  # a single candidate's only fold was skipped or failed
            self.state["finalists"] = list(by_name)[:1]
        began = time.perf_counter()
        self.report(self.budget.line("choose"))
        choice = choose(self.state, self.folder, self.cases, self.split)
        self.timed("choice", began)
        began = time.perf_counter()
        test = test_scores(choice, self.folder, [self.cases[i] for i in self.split(0)["test"]])
        self.timed("test", began)
        self.state["finished"] = True
        self.save()
        probe = fit_args(self.settings, self.volumes, rule.Candidate("2d", "unet"), 0)
        run = self.runner.settings(probe).run
        project = run.project if run.wandb and wandb_mode() != "disabled" else None
        summary = write_outputs(self.folder, self.state, choice, test, self.budget.used, self.report)
        if project:
            log_to_wandb(self.folder, summary, project, wandb_group(self.settings))
        self.report(self.budget.line("done"))
        return summary


def auto(
    settings: AutoSettings,
    runner: FitRunner,
    report: Callable[[str], None] = log.info,
    started: float | None = None,
) -> dict:
    """Run (or go on with, or report) ``medseg auto``; see the module docstring.

    Args:
        started: when this call began (``time.time()``; default now): the command's start, so its
            imports count against the budget too.

    Raises:
        DataError: bad data, a folder holding an auto run with other settings.
    """
    return Auto(settings, runner, report, started).run()
