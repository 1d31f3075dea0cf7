"""TestReport: per-case scores and the confusion matrix of a test run, in the run directory.

``<run>/test_cases.csv`` has one row per test image or volume (``case_id``, ``slice_index``, -1
for 2D images and volumes scored as a whole case), then each metric as the mean over foreground classes and per class (``dice``,
``dice_<class>``, ...); an empty cell is a score that is undefined for that image (see
``pipeline.metrics``). ``<run>/plots/test_confusion.png`` is the pixel confusion matrix over the
whole test set. With a W&B run, both are logged too (``test/cases`` table, ``plots/test_confusion``).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch

from pipeline.files import atomic_write
from pipeline.metrics import SegmentationMetrics
from pipeline.monitors.outputs import log_media, plot_dir, wandb_run
from pipeline.monitors.plots import confusion_png

log = logging.getLogger(__name__)


def _gather(obj: object, trainer: pl.Trainer) -> list:
    """``obj`` of every process, in rank order (just ``[obj]`` in a single process)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    parts: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, obj)
    return parts


def _cell(value: object) -> object:
    """CSV cell: floats to 6 significant digits, undefined (NaN) scores empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def first_occurrences(cases: list[tuple[str, int, int | None]]) -> list[tuple[str, int, int | None]]:
    """``cases`` without repeats of a sample index (all kept when the batches carry no index)."""
    seen: set[int] = set()
    kept = []
    for case in cases:
        if case[2] is None or case[2] not in seen:
            kept.append(case)
            if case[2] is not None:
                seen.add(case[2])
    return kept


class TestReport(pl.Callback):
    """Writes the per-case CSV and the confusion matrix PNG at the end of a test run.

    Reads the per-image scores that ``SegmentationModule.test_metrics`` accumulated, in the order
    of the test batches, and the case ids of those batches. Under DDP both are gathered from every
    process; an image scored twice (DistributedSampler pads with repeats) is reported once, as
    the metric counts it once, when the batches carry the sample ``index``.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self) -> None:
        self.cases: list[tuple[str, int, int | None]] = []  # case_id, slice_index, sample index

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cases = []

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if "target" in batch:  # one whole volume (``CaseDataset``), scored as one case
            self.cases.append((str(batch["case_id"]), -1, int(batch["index"])))
            return
        n = len(batch["image"])
        slices = batch.get("slice_index", [-1] * n)
        index = batch.get("index", [None] * n)
        self.cases += [
            (str(batch["case_id"][i]), int(slices[i]), None if index[i] is None else int(index[i]))
            for i in range(n)
        ]

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = getattr(pl_module, "test_metrics", None)
        if not isinstance(metrics, SegmentationMetrics) or not self.cases:
            return
        cases = first_occurrences([case for part in _gather(self.cases, trainer) for case in part])
        with metrics.sync_context(should_sync=trainer.world_size > 1):  # every process's images
            scores = metrics.per_image()
            confusion = metrics.total_confusion().cpu().numpy()
        if not trainer.is_global_zero:
            return
        scored = len(next(iter(scores.values())))
        if scored != len(cases):
            log.warning("test report skipped: %d scored images but %d test samples", scored, len(cases))
            return
        names = metrics.class_names
        columns, values = [], []
        for metric, per_class in scores.items():  # per_class: (N, C)
            columns.append(metric)
            values.append(per_class[:, 1:].nanmean(dim=1))
            for c, name in enumerate(names[1:], start=1):
                columns.append(f"{metric}_{name}")
                values.append(per_class[:, c])
        table = torch.stack(values, dim=1).tolist()  # (N, columns), one host copy
        rows = [[case, index, *row] for (case, index, _), row in zip(cases, table, strict=True)]
        header = ["case_id", "slice_index", *columns]
        self._write(Path(trainer.default_root_dir) / "test_cases.csv", header, rows)
        png = confusion_png(plot_dir(trainer) / "test_confusion.png", confusion, names)
        log.info("test report: %s, %s", Path(trainer.default_root_dir) / "test_cases.csv", png)
        if wandb_run(trainer) is not None:
            import wandb

            cells = [[None if isinstance(v, float) and math.isnan(v) else v for v in row] for row in rows]
            table_columns: list[str | int] = list(header)  # wandb's type for columns (a list is invariant)
            log_media(
                trainer,
                {
                    "test/cases": wandb.Table(columns=table_columns, data=cells),
                    "plots/test_confusion": wandb.Image(str(png)),
                },
            )

    @staticmethod
    def _write(path: Path, header: list[str], rows: list[list]) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                out = csv.writer(f)
                out.writerow(header)
                for row in rows:
                    out.writerow([_cell(v) for v in row])

        atomic_write(path, write)
