"""What ``medseg validate`` scored, recorded by patching the module and the metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cli import main
from pipeline.metrics import SegmentationMetrics
from pipeline.training.module import SegmentationModule


def scored_cases(run: Path, checkpoint: Path, monkeypatch) -> dict[str, np.ndarray]:
    """``medseg validate`` on a volume run: {case: the (S, H, W) labels its 3D metrics scored, on the
    case's own grid in slice order}."""
    keys, preds = [], []
    validation_step, update = SegmentationModule.validation_step, SegmentationMetrics.update

    def record_step(self, batch, batch_idx):
        keys.append(batch["case_id"])
        return validation_step(self, batch, batch_idx)

    def record_update(self, pred, *args):
        if self.surface_tolerance is not None:  # the per-case metric, not the per-slice one
            preds.append(pred[0].cpu().numpy())
        return update(self, pred, *args)

    monkeypatch.setattr(SegmentationModule, "validation_step", record_step)
    monkeypatch.setattr(SegmentationMetrics, "update", record_update)
    main(["validate", "-c", str(run / "config.yaml"), "--ckpt_path", str(checkpoint),
          "--trainer.limit_val_batches", "1.0", "--trainer.logger", "false"])  # fmt: skip
    monkeypatch.undo()
    return dict(zip(keys, preds, strict=True))
