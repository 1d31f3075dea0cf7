"""``medseg infer``: segment new scans with a trained checkpoint, no config needed
(``pipeline.inference.run``)::

    medseg infer --checkpoint runs/default/<dataset>/<run>/checkpoints/best.ckpt --input scans/ --output masks/
    medseg infer ... --tta --largest-component --save-probabilities --overlays --devices 2
    medseg infer --checkpoint f0.ckpt f1.ckpt f2.ckpt ...     # an ensemble: the mean softmax
    medseg infer --model-dir runs/default/<dataset>/<variant>-cv5-s0 ...   # a CV's folds + postprocessing
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.inference.ensemble import read_model_dir
from pipeline.inference.run import infer


def infer_command(args: Sequence[str]) -> None:
    """``medseg infer``: prints a summary; exits 1 when any case failed."""
    parser = argparse.ArgumentParser(prog="medseg infer", description="Segment new scans with a checkpoint.")
    add = parser.add_argument
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument(
        "--checkpoint", nargs="+", help="a medseg fit checkpoint (e.g. best.ckpt); several: their ensemble"
    )
    models.add_argument(
        "--model-dir",
        help="a medseg cv folder: the ensemble of its folds' best checkpoints, with the postprocessing "
        "chosen on their validation",
    )
    add("--input", required=True, nargs="+", help="NIfTI files, DICOM series folders, images, folders")
    add("--output", required=True, help="output folder")
    add(
        "--batch-size",
        type=int,
        default=None,
        help="slices or windows per forward pass (default: the checkpoint's)",
    )
    add("--tta", action="store_true", help="mirroring test-time augmentation (2D: 4x the compute, 3D: 8x)")
    add("--devices", type=int, default=1, help="processes (GPUs); > 1 uses DDP (default: %(default)s)")
    add("--accelerator", default="auto", help="auto, cpu, gpu, ... (default: %(default)s)")
    add("--num-workers", type=int, default=2, help="loader workers (default: %(default)s)")
    add("--overwrite", action="store_true", help="replace existing outputs")
    add("--save-probabilities", action="store_true", help="write probabilities/<case>.npz (float16)")
    add("--overlays", action="store_true", help="write overlays/<case>.png")
    add(
        "--largest-component",
        action="store_true",
        help="keep each class's largest connected component (with --model-dir: for every class, not "
        "only those the CV chose)",
    )
    opts = parser.parse_args(args)
    checkpoints, largest = opts.checkpoint, opts.largest_component
    if opts.model_dir:
        checkpoints, chosen = read_model_dir(opts.model_dir)
        largest = largest or chosen
    result = infer(
        checkpoints,
        opts.input,
        opts.output,
        batch_size=opts.batch_size,
        tta=opts.tta,
        devices=opts.devices,
        accelerator=opts.accelerator,
        num_workers=opts.num_workers,
        overwrite=opts.overwrite,
        save_probabilities=opts.save_probabilities,
        overlays=opts.overlays,
        largest_component=largest,
    )
    if result.is_global_zero:
        print(f"{len(result.ok)} ok, {len(result.failed)} failed -> {result.table}")
        for path, reason in result.failed:
            print(f"  failed: {path}: {reason}")
    if result.failed:
        sys.exit(1)
