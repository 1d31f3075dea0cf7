"""Writes each case's outputs as soon as it is predicted, and ``predictions.csv`` at the end.

Per case: the mask (for volumes in the input's format and geometry: ``.nrrd`` for ``.nrrd``,
``.mha`` for ``.mha``/``.mhd``, NIfTI for NIfTI and DICOM series, as the reader registry's
``mask_ending`` says; PNG of class indices for 2D images), optionally ``probabilities/<case>.npz`` and ``overlays/<case>.png``, all
written atomically. Each process keeps its own table rows; at the end (``write_table``) every
rank writes them to ``.predictions.rank<r>.csv`` and rank 0 merges those into ``predictions.csv``.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from pipeline.data.cache.slicing import from_slices
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.reading.formats import from_ras, write_png
from pipeline.data.reading.registry import mask_ending, write_mask
from pipeline.errors import DataError
from pipeline.files import atomic_write
from pipeline.inference.cases import InputCase, describe
from pipeline.inference.postprocess import class_counts, keep_largest_component, overlay

log = logging.getLogger(__name__)
TABLE = "predictions.csv"


@dataclass(frozen=True)
class OutputLayout:
    """Where each output of a case goes, inside ``folder`` and nowhere else.

    Attributes:
        folder: the output folder.
        probabilities: write ``probabilities/<case>.npz``.
        overlays: write ``overlays/<case>.png``.
    """

    folder: Path
    probabilities: bool = False
    overlays: bool = False

    @property
    def table(self) -> Path:
        return self.folder / TABLE

    def mask(self, case: InputCase) -> Path:
        return self._inside(self.folder / f"{case.name}{mask_ending(case.path)}")

    def probability_map(self, case: InputCase) -> Path:
        return self._inside(self.folder / "probabilities" / f"{case.name}.npz")

    def overlay(self, case: InputCase) -> Path:
        return self._inside(self.folder / "overlays" / f"{case.name}.png")

    def paths(self, case: InputCase) -> list[Path]:
        """Every file this case will write (none for an input that cannot be segmented)."""
        if case.kind == "unsupported":
            return []
        paths = [self.mask(case)]
        if self.probabilities:
            paths.append(self.probability_map(case))
        if self.overlays:
            paths.append(self.overlay(case))
        return paths

    def _inside(self, path: Path) -> Path:
        # case names are sanitised already; this guards the invariant itself
        if not path.resolve().is_relative_to(self.folder.resolve()):
            raise DataError(path, f"output would land outside {self.folder}")
        return path


def columns(class_names: tuple[str, ...]) -> list[str]:
    """``predictions.csv`` header: per foreground class its voxel (2D: pixel) count and mL."""
    per_class = [f"{kind}_{name}" for name in class_names[1:] for kind in ("voxels", "volume_ml")]
    return ["case", "input", "status", "error", "warning", "shape", "spacing_mm", *per_class, "seconds"]


def _fmt(values: tuple[float, ...] | None, digits: int = 4) -> str:
    return "" if values is None else "x".join(f"{v:.{digits}g}" for v in values)


class CaseWriter(BasePredictionWriter):
    """Prediction writer for ``CasePredictor`` (one case per batch).

    Args:
        layout: output paths.
        prep: the checkpoint's preprocessing (class names, slice axis).
        largest_component: the foreground classes (indices) of which only the largest connected
            component is kept.
    """

    def __init__(
        self, layout: OutputLayout, prep: Preprocessing, largest_component: Sequence[int] = ()
    ) -> None:
        super().__init__(write_interval="batch")
        self.layout = layout
        self.prep = prep
        self.largest_component = tuple(largest_component)
        self.rows: list[dict] = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict,
        batch_indices: object,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        case: InputCase = batch["case"]
        if batch.get("warning"):
            log.warning(batch["warning"])
        if "error" in prediction:
            self._failed(case, prediction["error"])
            return
        start = time.perf_counter()
        try:
            row = self._write(case, batch, prediction)
        except Exception as err:  # a failed write (disk full, permissions) skips this case only
            self._failed(case, describe(err))
            return
        row["seconds"] = f"{prediction['seconds'] + time.perf_counter() - start:.3f}"
        self.rows.append(row)

    def _failed(self, case: InputCase, reason: str) -> None:
        log.warning("skipped %s: %s", case.path, reason)
        self.rows.append({"case": case.name, "input": _inputs(case), "status": "failed", "error": reason})

    def _write(self, case: InputCase, batch: dict, prediction: dict) -> dict:
        labels = prediction["labels"].numpy()  # (S, H, W), the case's own grid in slice order
        names = self.prep.class_names
        if self.largest_component:
            labels = keep_largest_component(labels, len(names), self.largest_component)
        probs = prediction["probabilities"]
        probs = None if probs is None else np.moveaxis(probs.numpy(), 0, -1)  # (S, H, W, K)
        geometry = batch["geometry"]
        if case.is_volume:
            axis = self.prep.slice_axis
            write_mask(from_slices(labels, axis), geometry, self.layout.mask(case))
            if probs is not None:  # stored voxel order (x, y, z, K), like the mask
                probs = from_ras(from_slices(probs, axis), geometry)
            voxel_ml = abs(float(np.linalg.det(geometry.source_affine[:3, :3]))) / 1000.0
        else:
            write_png(self.layout.mask(case), labels[0])
            probs = None if probs is None else probs[0]  # (H, W, K)
            voxel_ml = None
        if probs is not None:
            self._save_npz(self.layout.probability_map(case), probs)
        if self.layout.overlays:
            image, grid_labels = prediction["overlay"]
            picture = overlay(image.numpy(), grid_labels.numpy())
            write_png(self.layout.overlay(case), np.rot90(picture) if case.is_volume else picture)
        counts = class_counts(labels, len(names))
        row = {
            "case": case.name,
            "input": _inputs(case),
            "status": "ok",
            "error": "",
            "shape": _fmt(batch["shape"]),
            "spacing_mm": _fmt(batch["spacing"]),
            "warning": batch.get("warning") or "",
        }
        for name, count in zip(names[1:], counts[1:], strict=True):
            row[f"voxels_{name}"] = int(count)
            row[f"volume_ml_{name}"] = "" if voxel_ml is None else f"{count * voxel_ml:.6f}"
        return row

    def _save_npz(self, path: Path, probs: np.ndarray) -> None:
        """float16 probabilities, channels last, in the mask's voxel order, with the class names."""
        names = np.array(self.prep.class_names)
        atomic_write(path, lambda tmp: np.savez_compressed(tmp, probabilities=probs, class_names=names))

    def write_table(self, trainer: pl.Trainer) -> None:
        """Every rank's rows into ``predictions.csv``, after ``trainer.predict``.

        Called by every process (not from a predict hook: a rank left without cases skips
        those, and would leave the others waiting at the barrier).
        """
        header = columns(self.prep.class_names)
        self._write_table(self._partial(trainer.global_rank), self.rows, header)
        trainer.strategy.barrier("medseg-infer-rows")
        if trainer.is_global_zero:
            rows: list[dict[str, str]] = []
            for rank in range(trainer.world_size):
                part = self._partial(rank)
                with part.open(newline="") as f:
                    rows.extend(csv.DictReader(f))
                part.unlink()
            self._write_table(self.layout.table, sorted(rows, key=lambda r: r["case"]), header)
        trainer.strategy.barrier("medseg-infer-table")

    def _partial(self, rank: int) -> Path:
        return self.layout.folder / f".predictions.rank{rank}.csv"

    @staticmethod
    def _write_table(path: Path, rows: list[dict], header: list[str]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


def _inputs(case: InputCase) -> str:
    return ";".join(str(p) for p in case.paths)
