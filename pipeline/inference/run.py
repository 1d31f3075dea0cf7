"""``medseg infer``: segment new scans with a trained checkpoint, no config needed::

    medseg infer --checkpoint runs/default/<dataset>/<run>/checkpoints/best.ckpt --input scans/ --output masks/
    medseg infer ... --tta --largest-component --save-probabilities --overlays --devices 2
    medseg infer --checkpoint f0.ckpt f1.ckpt f2.ckpt ...     # an ensemble: the mean softmax
    medseg infer --model-dir runs/default/<dataset>/<variant>-cv5-s0 ...   # a CV's folds + postprocessing

``Trainer.predict`` runs ``CasePredictor`` over an ``InferenceDataset`` (one case per step, loaded
in loader workers) and ``CaseWriter`` writes each case as it is done. With ``devices`` > 1 the
cases are split over the processes by Lightning's unrepeated distributed sampler, so every case
is predicted and written by exactly one rank.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pipeline.errors import DataError
from pipeline.inference.cases import InferenceDataset, InputCase, find_inputs, first_item
from pipeline.inference.ensemble import load_models
from pipeline.inference.predictor import CasePredictor
from pipeline.inference.slice_progress import SliceProgress
from pipeline.inference.writer import CaseWriter, OutputLayout
from pipeline.training.precision import default_precision

log = logging.getLogger(__name__)
MAX_LISTED = 5


@dataclass(frozen=True)
class InferenceResult:
    """What a run did, read back from the merged ``predictions.csv``.

    Attributes:
        ok: names of the cases segmented.
        failed: (input path, reason) of each case skipped.
        table: the ``predictions.csv`` path.
        is_global_zero: this process is rank 0 (the one that reports).
    """

    ok: list[str]
    failed: list[tuple[str, str]]
    table: Path
    is_global_zero: bool


def _trainer(
    accelerator: str, devices: int, layout: OutputLayout, writer: CaseWriter, progress: SliceProgress | None
) -> pl.Trainer:
    """A Trainer that only predicts: no logger, no checkpoints, medseg's own progress bar."""
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision=default_precision(accelerator),
        logger=False,
        callbacks=[writer, progress] if progress else [writer],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=layout.folder,
    )


def check_outputs(cases: Sequence[InputCase], layout: OutputLayout, overwrite: bool) -> None:
    """Refuse, before any work, to replace an input or (without ``overwrite``) an existing output."""
    inputs = {p.resolve() for case in cases for p in case.paths}
    planned = [layout.table, *(p for case in cases for p in layout.paths(case))]
    for path in planned:
        if path.resolve() in inputs:
            raise DataError(path, "is an input and would be replaced by an output; choose another --output")
    existing = [str(p) for p in planned if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - MAX_LISTED} more" if len(existing) > MAX_LISTED else ""
        raise DataError(
            layout.folder,
            f"{len(existing)} output(s) exist already ({', '.join(existing[:MAX_LISTED])}{more}); "
            "pass --overwrite to replace them",
        )


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up lines (accelerators found, tips) and the libraries' deprecation
    notices, so ``medseg infer`` shows its own lines and real warnings only."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def infer(
    checkpoint: str | Path | Sequence[str | Path],
    inputs: Sequence[str | Path],
    output: str | Path,
    batch_size: int | None = None,
    tta: bool = False,
    devices: int = 1,
    accelerator: str = "auto",
    num_workers: int = 2,
    overwrite: bool = False,
    save_probabilities: bool = False,
    overlays: bool = False,
    largest_component: bool | Sequence[str] = False,
    progress_bar: bool = True,
) -> InferenceResult:
    """Segment every case under ``inputs`` into ``output``; see the module docstring.

    Args:
        checkpoint: a ``medseg fit`` checkpoint (loaded with ``weights_only=True``), or several:
            an ensemble averaging their softmax (``pipeline.inference.ensemble``).
        inputs: files and folders (NIfTI, DICOM series folders, 2D images).
        output: output folder (created if needed).
        batch_size: slices (or windows) per forward pass; None: the checkpoint's, as validation.
        tta: mirroring test-time augmentation.
        devices: processes (GPUs, or CPU processes with ``accelerator="cpu"``); > 1 uses DDP.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``, ...).
        num_workers: loader worker processes reading and preprocessing cases ahead.
        overwrite: replace existing outputs (otherwise refuse before doing any work).
        save_probabilities: write float16 softmax probabilities per case (``.npz``).
        overlays: write overlay PNGs (the middle slice of volumes).
        largest_component: keep only the largest connected component of each foreground class
            (True) or of the classes named.
        progress_bar: show a progress bar over the input slices.

    Raises:
        DataError: a bad checkpoint, checkpoints that disagree, an unknown class, missing inputs,
            or outputs that exist already.
    """
    if devices < 1 or num_workers < 0:
        raise ValueError(f"devices must be >= 1 and num_workers >= 0, got {devices} and {num_workers}")
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    module, prep = load_models(paths)
    kept = component_classes(largest_component, prep.class_names, paths[0])
    cases = find_inputs(inputs, prep.in_channels)
    layout = OutputLayout(Path(output), save_probabilities, overlays)
    check_outputs(cases, layout, overwrite)
    layout.folder.mkdir(parents=True, exist_ok=True)
    if devices > len(cases):  # Lightning's unrepeated sampler needs a case for every rank
        log.info("%d case(s): using %d device(s) instead of %d", len(cases), len(cases), devices)
        devices = len(cases)
    writer = CaseWriter(layout, prep, kept)
    with quiet_lightning():
        trainer = _trainer(
            accelerator,
            devices,
            layout,
            writer,
            SliceProgress(cases, prep.slice_axis) if progress_bar else None,
        )
        workers = min(num_workers, len(cases))
        loader = DataLoader(
            InferenceDataset(cases, prep),
            batch_size=1,
            collate_fn=first_item,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=1 if workers else None,  # whole cases: one ahead per worker bounds memory
        )
        predictor = CasePredictor(module, batch_size, tta, save_probabilities)
        trainer.predict(predictor, dataloaders=loader, return_predictions=False)
        writer.write_table(trainer)
    with layout.table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return InferenceResult(
        ok=[r["case"] for r in rows if r["status"] == "ok"],
        failed=[(r["input"], r["error"]) for r in rows if r["status"] != "ok"],
        table=layout.table,
        is_global_zero=trainer.is_global_zero,
    )


def component_classes(
    chosen: bool | Sequence[str], class_names: Sequence[str], checkpoint: str | Path
) -> list[int]:
    """Class indices for ``largest_component``: every foreground class for True, none for False.

    Raises:
        DataError: a name that is no foreground class of the checkpoint.
    """
    if isinstance(chosen, bool):
        return list(range(1, len(class_names))) if chosen else []
    unknown = [name for name in chosen if name not in class_names[1:]]
    if unknown:
        raise DataError(
            checkpoint,
            f"has no foreground class {unknown[0]!r} to post-process; its classes: {list(class_names)}",
        )
    return [class_names.index(name) for name in chosen]
