"""``medseg export``: a trained network as ONNX or TorchScript with its ``preprocessing.json``
(``pipeline.experiments.export``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.experiments.export import FORMATS, export, export_model_dir


def export_command(args: Sequence[str]) -> None:
    """``medseg export --checkpoint best.ckpt | --model-dir DIR --format onnx|torchscript --output DIR``."""
    parser = argparse.ArgumentParser(
        prog="medseg export",
        description="Export a trained network (ONNX or TorchScript) with its preprocessing.json.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a medseg fit checkpoint (e.g. best.ckpt)")
    source.add_argument(
        "--model-dir", help="a medseg cv or medseg auto folder: every member, and ensemble.json"
    )
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="(default: %(default)s)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in the folder")
    opts = parser.parse_args(args)
    if opts.model_dir:
        files = export_model_dir(opts.model_dir, opts.output, opts.format, opts.overwrite)
    else:
        files = export(opts.checkpoint, opts.output, opts.format, opts.overwrite)
    print("\n".join(f"wrote {path}" for path in files))
