"""Checks on a run's logged scores that hold for any network, trained or not: they fail on a wrong
aggregation, where a range check (0 <= dice <= 1) fails only on NaN."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest


def assert_scores_agree(scores: Mapping[str, float], classes: Sequence[str], stage: str = "val") -> None:
    """``<stage>/dice`` is the mean of the per-class Dice (every class scored), and each class's IoU
    lies between half its Dice and its Dice (per image IoU = D / (2 - D), a mean keeps the bounds)."""
    per_class = [scores[f"{stage}/dice_{c}"] for c in classes]
    assert scores[f"{stage}/dice"] == pytest.approx(np.mean(per_class), rel=1e-5), per_class
    for c in classes:
        dice, iou = scores[f"{stage}/dice_{c}"], scores[f"{stage}/iou_{c}"]
        assert dice / 2 - 1e-6 <= iou <= dice + 1e-6, (c, dice, iou)
