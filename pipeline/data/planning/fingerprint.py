"""What a data set's training cases say about themselves: the fingerprint the plan is made from.

Per case (``CaseFacts``, read once from the raw volume and kept in the cache): voxel spacing and
shape in canonical RAS+ order, voxel count per class, and a sample of foreground intensities per
channel. ``Fingerprint`` summarises the training cases only: everything learned from data comes
from the training split (the validation and test cases never shape the plan or the statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CaseFacts:
    """One case as the planner sees it.

    Attributes:
        case_id: the case.
        spacing: voxel size along X, Y, Z of the RAS+ array, mm.
        shape: voxels along X, Y, Z.
        class_voxels: class index -> voxels of that class (0 for absent classes is omitted).
    """

    case_id: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    class_voxels: Mapping[int, int]


@dataclass(frozen=True)
class Fingerprint:
    """The training cases summarised.

    Attributes:
        spacings: (N, 3) per-case spacing, mm (RAS axes).
        shapes: (N, 3) per-case shape, voxels.
        class_voxels: (N, K) voxels of each class per case.
        foreground: (M, C) foreground intensities sampled over the cases (None: no foreground).
    """

    spacings: np.ndarray
    shapes: np.ndarray
    class_voxels: np.ndarray
    foreground: np.ndarray | None

    @classmethod
    def of(cls, facts: Sequence[CaseFacts], num_classes: int, foreground: np.ndarray | None) -> Fingerprint:
        """The fingerprint of ``facts`` (the training cases) and their foreground sample (M, C)."""
        counts = np.zeros((len(facts), num_classes), np.int64)
        for row, case in zip(counts, facts, strict=True):
            for label, voxels in case.class_voxels.items():
                row[int(label)] = voxels
        return cls(
            np.array([f.spacing for f in facts], float),
            np.array([f.shape for f in facts], float),
            counts,
            foreground,
        )

    @property
    def cases(self) -> int:
        return len(self.spacings)

    def summary(self, class_names: Sequence[str]) -> dict:
        """Plain-type summary for ``plan.json``: spacing and shape ranges, class shares, intensities."""
        total = self.class_voxels.sum(axis=1, keepdims=True).clip(min=1)
        share = self.class_voxels / total
        out = {
            "cases": self.cases,
            "spacing_mm": {
                "min": self.spacings.min(0).round(4).tolist(),
                "median": np.median(self.spacings, 0).round(4).tolist(),
                "max": self.spacings.max(0).round(4).tolist(),
            },
            "shape": {
                "min": self.shapes.min(0).astype(int).tolist(),
                "median": np.median(self.shapes, 0).tolist(),
                "max": self.shapes.max(0).astype(int).tolist(),
            },
            "classes": {
                name: {
                    "cases_with": int((self.class_voxels[:, k] > 0).sum()),
                    "median_share": float(np.median(share[:, k])),
                }
                for k, name in enumerate(class_names)
            },
        }
        if self.foreground is not None and len(self.foreground):
            values = self.foreground.astype(np.float64)
            out["foreground_intensity"] = {
                "mean": values.mean(0).tolist(),
                "std": values.std(0).tolist(),
                "p00_5": np.percentile(values, 0.5, axis=0).tolist(),
                "p99_5": np.percentile(values, 99.5, axis=0).tolist(),
            }
        return out
