"""What ``medseg validate`` scored, recorded by patching the module and the metric."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.cli import main
from pipeline.metrics import SegmentationMetrics
from pipeline.training.module import SegmentationModule


def recorded_validation(
    run: Path,
    checkpoint: Path,
    monkeypatch,
    keys_of: Callable[[dict], list],
    preds_of: Callable[[SegmentationMetrics, object], list],
) -> dict:
    """``medseg validate`` of ``checkpoint`` on the run's validation split: {key: prediction}, the
    keys from each batch (``keys_of``), the predictions from each metric update (``preds_of``)."""
    keys, preds = [], []
    validation_step, update = SegmentationModule.validation_step, SegmentationMetrics.update

    def record_step(self, batch, batch_idx):
        keys.extend(keys_of(batch))
        return validation_step(self, batch, batch_idx)

    def record_update(self, pred, *args):
        preds.extend(preds_of(self, pred))
        return update(self, pred, *args)

    monkeypatch.setattr(SegmentationModule, "validation_step", record_step)
    monkeypatch.setattr(SegmentationMetrics, "update", record_update)
    main(["validate", "-c", str(run / "config.yaml"), "--ckpt_path", str(checkpoint),
          "--trainer.limit_val_batches", "1.0", "--trainer.logger", "false"])  # fmt: skip
    monkeypatch.undo()
    return dict(zip(keys, preds, strict=True))


def scored_by_validation(run: Path, checkpoint: Path, monkeypatch) -> dict[tuple[str, int], np.ndarray]:
    """2D images: {(case, slice index): the (H, W) arg max that the metrics scored}."""
    return recorded_validation(
        run, checkpoint, monkeypatch,
        lambda batch: list(zip(batch["case_id"], batch["slice_index"].tolist(), strict=True)),
        lambda metric, pred: list(pred.cpu().numpy()),
    )  # fmt: skip


def scored_cases(run: Path, checkpoint: Path, monkeypatch) -> dict[str, np.ndarray]:
    """Volumes: {case: the (S, H, W) labels its 3D metrics scored, on the case's own grid in slice
    order} (the per-case metric's updates, not the per-slice one's)."""
    return recorded_validation(
        run, checkpoint, monkeypatch,
        lambda batch: [batch["case_id"]],
        lambda metric, pred: [pred[0].cpu().numpy()] if metric.surface_tolerance is not None else [],
    )  # fmt: skip
