"""What ``medseg auto`` trains and for how long: the candidate configurations a plan offers and
the rule that shares the time budget among them and their folds.

The rule, successive halving on fold 0 and then folds: every candidate trains fold 0 for a
screening run of a quarter of the final run length L; the finalists (the best by out-of-fold
Dice of the final checkpoints, and the best of the others that can form an ensemble with it) continue their
fold-0 runs to L (resumed: the learning-rate schedule stretches to the new end) and train folds
1..k-1 for L each, k being the most folds (up to ``--folds``) that leave L >= ``min_run``. L
follows from the training time left, and is computed again before every run from the budget left
and the measured cost of the runs so far. A single candidate needs no screening.

A candidate is a configuration nnU-Net would also consider: the 2D UNet; the full-resolution 3D
UNet unless the plan says its patch sees the median case through a keyhole (under a quarter of
it: ``pipeline.data.planning.rules``); then the low-resolution 3D UNet the plan adds; the UNet on
a ResNet-34 encoder on request. Candidates on one grid share a preprocessing and can ensemble;
the low-resolution 3D network is on its own grid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.data.planning.rules import Plan

FINALISTS = 2  # at most: the best, and one to ensemble it with
SCREEN = 0.25  # a screening run's length, as a share of a final run's
WEIGHTS = {"screen": SCREEN, "continue": 1 - SCREEN, "fold": 1.0}  # each segment's length in final runs
BUDGET_FORMAT = re.compile(r"^(?:(\d+):)?(\d+):(\d+):(\d+)$")


@dataclass(frozen=True)
class Candidate:
    """One configuration: its name (``2d``, ``3d_fullres``, ``3d_lowres``, ``resnet_2d``), the
    model config under ``configs/model/``, the fit flags it adds, and its grid (``plan``: the
    plan's target spacing; ``lowres``: its own): candidates on one grid can ensemble."""

    name: str
    model: str
    flags: tuple[str, ...] = ()
    grid: str = "plan"


@dataclass(frozen=True)
class Segment:
    """One stretch of training: a ``screen`` run of fold 0, its ``continue`` to the final length,
    or a whole ``fold`` run (the folds after 0, and fold 0 of a single candidate)."""

    candidate: str
    fold: int
    kind: str

    @property
    def run(self) -> str:
        """The run it trains: ``<candidate>-f<fold>``."""
        return f"{self.candidate}-f{self.fold}"

    @property
    def key(self) -> str:
        return f"{self.run}:{self.kind}"


def parse_budget(text: str) -> float:
    """``HH:MM:SS`` or ``DD:HH:MM:SS`` -> seconds.

    Raises:
        ValueError: another format, or no time at all.
    """
    match = BUDGET_FORMAT.match(text.strip())
    if not match:
        raise ValueError(f"budget {text!r}: give HH:MM:SS (e.g. 00:30:00) or DD:HH:MM:SS")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"budget {text!r} is no time at all")
    return float(total)


def clock(seconds: float) -> str:
    """Seconds as ``trainer.max_time``'s ``DD:HH:MM:SS`` (whole seconds, at least 1)."""
    whole = max(1, int(seconds))
    return f"{whole // 86400:02d}:{whole // 3600 % 24:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def candidates(plan: Plan | None, resnet: bool = False) -> list[Candidate]:
    """The configurations worth training for a data set with this plan (None: 2D images)."""
    found = [Candidate("2d", "unet")]
    if plan is not None:
        if not plan.keyhole:
            found.append(Candidate("3d_fullres", "unet3d"))
        if plan.lowres_3d is not None:
            spacing = "[" + ", ".join(f"{s:.6g}" for s in plan.lowres_3d.target_spacing) + "]"
            found.append(Candidate("3d_lowres", "unet3d", ("--data.target_spacing", spacing), "lowres"))
    if resnet:
        found.append(Candidate("resnet_2d", "resnet_unet"))
    return found


def finalists(scores: dict[str, float | None], grids: dict[str, str]) -> list[str]:
    """The best candidate by out-of-fold Dice (an undefined score last; ties in the given order),
    and the best of the others on its grid (one it can ensemble with), if any."""
    order = sorted(scores, key=lambda name: -rank(scores[name]))
    partners = [name for name in order[1:] if grids[name] == grids[order[0]]]
    return order[:1] + partners[: FINALISTS - 1]


def expected_finalists(candidates: Sequence[Candidate]) -> int:
    """Finalists to plan for before the screening: two when any two candidates share a grid."""
    grids = [c.grid for c in candidates]
    return min(FINALISTS, len(grids)) if len(set(grids)) < len(grids) else 1


def rank(dice: float | None) -> float:
    """A score to sort by: an undefined Dice ranks below every defined one."""
    return -math.inf if dice is None else dice


def segments(names: Sequence[str], chosen: Sequence[str], folds: int) -> list[Segment]:
    """Every stretch of training in order: the screening runs, the ``chosen`` finalists'
    continuations, then their folds 1..folds-1 (fold by fold)."""
    if len(names) == 1:
        return [Segment(names[0], fold, "fold") for fold in range(folds)]
    runs = [Segment(name, 0, "screen") for name in names]
    runs += [Segment(name, 0, "continue") for name in chosen]
    return runs + [Segment(name, fold, "fold") for fold in range(1, folds) for name in chosen]


def final_length(seconds: float, segments_left: Sequence[Segment]) -> float:
    """L, the final run length, when ``seconds`` of training are left for ``segments_left``."""
    return seconds / max(WEIGHTS["screen"], sum(WEIGHTS[s.kind] for s in segments_left))


def fold_count(names: Sequence[str], finalists: int, max_folds: int, seconds: float, min_run: float) -> int:
    """The most folds (1..max_folds) that leave a final run length of at least ``min_run`` out of
    ``seconds`` of training; 1 when even one fold cannot (then the runs are shorter)."""
    for folds in range(max_folds, 1, -1):
        if final_length(seconds, segments(names, names[:finalists], folds)) >= min_run:
            return folds
    return 1
