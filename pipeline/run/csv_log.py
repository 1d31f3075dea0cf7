"""``metrics.csv`` that survives a resume.

Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts, so a run resumed with
``--ckpt_path`` would keep only what it logged after the restart. ``ResumedCSVLogger`` keeps the
earlier rows: those logged before the step the run resumed at. Rows from the interrupted stretch
after its last checkpoint are dropped, because the resumed run logs those steps again.
"""

from __future__ import annotations

import csv
from typing import cast

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Instead of deleting metrics.csv: hold its rows until the first new step is known.
        self._kept: list[dict[str, str]] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self._kept = list(csv.DictReader(f))
            self._fs.rm_file(self.metrics_file_path)

    def save(self) -> None:
        if self._kept is not None and self.metrics:
            first = min(int(row["step"]) for row in self.metrics)
            earlier = [
                {k: v for k, v in row.items() if v not in ("", None)}
                for row in self._kept
                if row.get("step") and int(float(row["step"])) < first
            ]
            # the kept rows hold the CSV's strings, written back as they were read
            self.metrics = cast(list[dict[str, float]], earlier) + self.metrics
            self._kept = None
        super().save()


class ResumedCSVLogger(CSVLogger):
    """``CSVLogger`` for a resumed run: earlier rows of ``metrics.csv`` are kept (see module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        assert isinstance(self._experiment, ExperimentWriter)  # Lightning types it as Fabric's base class
        return self._experiment
