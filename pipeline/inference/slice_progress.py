"""``medseg infer``'s progress: slices segmented out of all the input slices, and cases done.

A case's slice count is read from its header before any case is loaded (the reader registry's
header probe, as ``pipeline.data.reading.volumes.probe`` reads it: a volume file's header, a DICOM
series' file headers; 1 for a 2D image), so the bar's total is known at the start; the predictor
reports the fraction of each case it has finished after every forward pass (a batch of slices,
or of 3D sliding windows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import pytorch_lightning as pl
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from pipeline.data.reading.registry import read_header
from pipeline.errors import DataError
from pipeline.inference.cases import InputCase

if TYPE_CHECKING:
    from pipeline.inference.predictor import CasePredictor


def input_slices(case: InputCase, slice_axis: int) -> int:
    """Slices of ``case`` along ``slice_axis`` (of the RAS+ volume), from its header; 1 for an image
    and for an input that cannot be read (it fails on load and is reported then)."""
    if not case.is_volume:
        return 1
    try:
        return read_header(case.paths).slices(slice_axis)
    except DataError:
        return 1


class SliceProgress(pl.Callback):
    """A rich progress bar over input slices, advanced as the predictor reports.

    Under DDP the bar is rank zero's and counts the cases that rank segments (Lightning's
    unrepeated sampler gives rank r the cases r, r + world, ...).

    Args:
        cases: every case of the run, in dataset order.
        slice_axis: the model's slicing axis, to count each volume's slices.
    """

    def __init__(self, cases: Sequence[InputCase], slice_axis: int) -> None:
        self.slices = [input_slices(case, slice_axis) for case in cases]
        self.names = [case.name for case in cases]
        self.done: dict[int, float] = {}  # case index -> fraction segmented
        self._bar: Progress | None = None
        self._task = TaskID(0)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        own = range(0, len(self.slices), trainer.world_size)
        self._bar = Progress(
            TextColumn("segmenting {task.fields[case]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("slices"),
            TimeRemainingColumn(),
        )
        self._task = self._bar.add_task("infer", total=sum(self.slices[i] for i in own) or 1, case="")
        self._bar.start()
        cast("CasePredictor", pl_module).report_progress = self.advance  # the module medseg infer runs

    def advance(self, index: int, fraction: float) -> None:
        """The predictor has segmented ``fraction`` (0-1) of case ``index``."""
        if self._bar is None or not 0 <= index < len(self.slices):
            return
        self.done[index] = fraction
        completed = sum(f * self.slices[i] for i, f in self.done.items())
        self._bar.update(self._task, completed=completed, case=self.names[index])

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.update(self._task, case="done")
            self._bar.stop()
            self._bar = None
