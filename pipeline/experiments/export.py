"""``medseg export``: a trained network for use outside Python, with the preprocessing it needs::

    medseg export --checkpoint runs/<experiment>/<dataset>/<run>/checkpoints/best.ckpt --format onnx --output exported/
    medseg export --checkpoint best.ckpt --format torchscript --output exported/

Writes ``model.onnx`` (``torch.onnx.export`` through ``torch.export``, weights inside the file) or
``model.pt`` (TorchScript, traced), taking ``image`` float32 (B, C, *spatial) and returning
``logits`` (B, K, *spatial), the batch and every spatial size dynamic, and ``preprocessing.json``:
classes, channels, per-channel normalisation with its statistics, target spacing, slice axis,
patch and sliding-window settings, the steps that turn a scan into the network's input, and the
checkpoint's own preprocessing record (``Preprocessing.to_checkpoint``), so ``medseg infer`` can
be reproduced from the two files. Before anything is written the exported network is run on the
example (the training patch) and on a size that is odd on every axis, and its logits compared with
PyTorch's (ONNX Runtime for ONNX when installed); the differences are stored in the JSON.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import DataError
from pipeline.files import atomic_write, write_json
from pipeline.inference.ensemble import read_model_dir
from pipeline.training.checkpoint import load_model
from pipeline.training.module import SegmentationModule

log = logging.getLogger(__name__)
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
PREPROCESSING_FILE = "preprocessing.json"
OPSET = 18
TOLERANCE = 1e-4  # max |logit difference| accepted between the exported network and PyTorch
DEFAULT_SIDE = {2: 64, 3: 32}  # example size per axis when the checkpoint has no training patch
STEPS = [
    "volumes: reorient to RAS+ (nibabel as_closest_canonical), move slice_axis first, and resample "
    "to target_spacing (mm, X Y Z of the RAS+ array; bicubic in plane, linear across slices)",
    "per channel c with normalization[c]: lo, hi = (zscore: the case's min and max; percentile: the "
    "case's percentiles; ct: window; rgb: 0, 255; none: 0, 1); unit = clip((x - lo) / (hi - lo), 0, 1)",
    "mean, std = those of unit over the case (ct with mean/std given: (mean - lo) / (hi - lo), "
    "std / (hi - lo)); input = (unit - mean) / std",
    "spatial_dims 2: each slice (C, H, W) is one batch item; 3: the volume (C, S, H, W); inputs "
    "larger than patch_size go through Gaussian-weighted sliding windows of patch_size (overlap)",
    "softmax over axis 1 (mean over mirrored inputs with TTA), resample the probabilities linearly "
    "back to the scan's own grid, arg max -> class indices",
]


def example_input(prep: Preprocessing, batch: int = 2) -> Tensor:
    """(batch, C, *patch) seeded Gaussian noise; the batch is 2 so that torch.export keeps it dynamic
    (it specialises sizes 0 and 1)."""
    side = DEFAULT_SIDE[prep.spatial_dims]
    patch = prep.patch_size or (side,) * prep.spatial_dims
    return torch.randn(batch, prep.in_channels, *patch, generator=torch.Generator().manual_seed(0))


def odd_input(example: Tensor) -> Tensor:
    """One item of a size odd on every axis and unlike the example's (a whole image, not a patch)."""
    sizes = [n + 1 if n % 2 == 0 else n + 2 for n in example.shape[2:]]
    return torch.randn(1, example.shape[1], *sizes, generator=torch.Generator().manual_seed(1))


def export_onnx(net: nn.Module, example: Tensor, path: str) -> None:
    """ONNX through ``torch.export`` with the batch and every spatial axis dynamic, weights inside."""
    dims = {0: torch.export.Dim.DYNAMIC, **{a: torch.export.Dim.DYNAMIC for a in range(2, example.ndim)}}
    torch.onnx.export(
        net,
        (example,),
        path,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=(dims,),
        opset_version=OPSET,
        dynamo=True,
        external_data=False,  # one file (our networks are far below ONNX's 2 GB limit)
        verbose=False,
    )


def export_torchscript(net: nn.Module, example: Tensor, path: str) -> None:
    """TorchScript by tracing: the UNets' crops read sizes with traced shape ops, so every size works."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit; still loadable
        torch.jit.trace(net, example).save(path)


def exported_runner(format: str, path: str) -> Callable[[Tensor], np.ndarray] | None:
    """Runs the exported file on an input; None when its runtime is not installed (ONNX Runtime)."""
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(path)
        return lambda x: model(x).detach().numpy()
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x.numpy()})[0]


def parity(net: nn.Module, run: Callable[[Tensor], np.ndarray], inputs: Sequence[Tensor]) -> list[dict]:
    """Max |logit difference| between PyTorch and the exported network on each input."""
    checks = []
    for x in inputs:
        with torch.no_grad():
            reference = net(x).numpy()
        got = run(x)
        difference = float(np.abs(got - reference).max()) if got.shape == reference.shape else float("inf")
        checks.append({"shape": list(x.shape), "max_abs_logit_difference": difference})
    return checks


def describe(prep: Preprocessing, format: str, module: SegmentationModule, checks: list[dict]) -> dict:
    """The content of ``preprocessing.json``."""
    spatial = ["S", "H", "W"][-prep.spatial_dims :]
    hparams = module.hparams
    return {
        "format": format,
        "model": FORMATS[format],
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": ["batch", "channels", *spatial],
            "dynamic": ["batch", *spatial],
            "sizes": "any size >= 1 on every spatial axis (checked at export on the sizes in 'checked')",
        },
        "output": {"name": "logits", "shape": ["batch", "classes", *spatial]},
        "class_names": list(prep.class_names),
        "in_channels": prep.in_channels,
        "modalities": list(prep.modalities) if prep.modalities else None,
        "normalization": prep.to_checkpoint()["channel_normalization"],
        "spatial_dims": prep.spatial_dims,
        "volumetric": prep.volumetric,
        "slice_axis": prep.slice_axis if prep.volumetric else None,
        "target_spacing": list(prep.target_spacing) if prep.target_spacing else None,
        "patch_size": list(prep.patch_size) if prep.patch_size else None,
        "sliding_window": {
            "overlap": hparams["sw_overlap"],
            "mode": "gaussian",
            "batch": hparams["sw_batch_size"],
        },
        "steps": STEPS,
        "checked": checks,
        "preprocessing": prep.to_checkpoint(),
    }


def export(
    checkpoint: str | os.PathLike, output: str | os.PathLike, format: str = "onnx", overwrite: bool = False
) -> list[Path]:
    """Export ``checkpoint``'s network and its ``preprocessing.json`` into ``output``.

    Args:
        checkpoint: a ``medseg fit`` checkpoint.
        output: the folder (created if needed).
        format: ``onnx`` or ``torchscript``.
        overwrite: replace files of an earlier export.

    Returns:
        The files written.

    Raises:
        DataError: a bad checkpoint, files that exist already, or an exported network whose logits
            differ from PyTorch's by more than 1e-4.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    module, prep = load_model(checkpoint)
    net = module.net.eval()
    folder = Path(output)
    files = [folder / FORMATS[format], folder / PREPROCESSING_FILE]
    existing = [str(p) for p in files if p.exists()]
    if existing and not overwrite:
        raise DataError(
            folder, f"holds an export already ({', '.join(existing)}); pass --overwrite to replace it"
        )
    example = example_input(prep)
    checks: list[dict] = []

    def write_checked(tmp: str) -> None:
        # exported and checked under a temporary name: a failed check replaces nothing
        with torch.no_grad():
            (export_onnx if format == "onnx" else export_torchscript)(net, example, tmp)
        run = exported_runner(format, tmp)
        if run is None:
            log.info(
                "onnxruntime is not installed: the exported network was not run (pip install onnxruntime)"
            )
            return
        checks.extend(parity(net, run, [example, odd_input(example)]))
        worst = max(checks, key=lambda c: c["max_abs_logit_difference"])
        if worst["max_abs_logit_difference"] > TOLERANCE:
            raise DataError(
                checkpoint,
                f"the {format} export differs from PyTorch by {worst['max_abs_logit_difference']:.3g} "
                f"(> {TOLERANCE}) on input {worst['shape']}; nothing was written",
            )

    atomic_write(files[0], write_checked)
    write_json(files[1], describe(prep, format, module, checks))
    log.info("exported %s -> %s", checkpoint, ", ".join(map(str, files)))
    return files


def export_model_dir(
    folder: str | os.PathLike, output: str | os.PathLike, format: str = "onnx", overwrite: bool = False
) -> list[Path]:
    """Export every member of a ``medseg cv`` or ``medseg auto`` model folder into
    ``output/<run>/`` and write ``output/ensemble.json``: the members, how to combine them (the
    mean of their softmax on the grid of their shared preprocessing) and the postprocessing.

    Raises:
        DataError: see ``export`` and ``pipeline.inference.ensemble.read_model_dir``.
    """
    checkpoints, largest = read_model_dir(folder)
    files = []
    for checkpoint in checkpoints:
        files += export(checkpoint, Path(output) / checkpoint.parent.parent.name, format, overwrite)
    index = Path(output) / "ensemble.json"
    write_json(
        index,
        {
            "members": [checkpoint.parent.parent.name for checkpoint in checkpoints],
            "combine": "mean of the members' softmax probabilities, then the arg max",
            "largest_component": largest,
            "source": str(folder),
        },
    )
    return [*files, index]
