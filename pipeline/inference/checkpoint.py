"""Load a trained model for inference from its checkpoint alone, without unpickling code.

Training stores, beside the weights, ``checkpoint["medseg"]`` = ``{"net": {"class_path",
"init_args"}, "class_names", "preprocessing"}`` in plain types (``SegmentationModule.
on_save_checkpoint``). That is everything inference needs: no config file, and a checkpoint that
would need arbitrary unpickling is refused.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.io import DataError
from pipeline.data.normalization import Normalization, channel_normalizations
from pipeline.models import build_net
from pipeline.module import CHECKPOINT_KEY, SegmentationModule

DEFAULT_SLICE_AXIS = 2  # checkpoints written before the slice axis was stored trained on axial slices


@dataclass(frozen=True)
class Preprocessing:
    """What inference must reproduce from training.

    Attributes:
        class_names: class names in index order, background first.
        in_channels: image channels the network expects.
        normalization: one resolved normalisation per input channel (data-set statistics included).
        patch_size: training patch (H, W); larger images go through sliding-window inference.
        slice_axis: axis (0, 1, 2) of the canonical RAS+ volume that volumes are cut along.
    """

    class_names: tuple[str, ...]
    in_channels: int
    normalization: tuple[Normalization, ...]
    patch_size: tuple[int, int] | None
    slice_axis: int = DEFAULT_SLICE_AXIS


def read_preprocessing(stored: dict) -> Preprocessing:
    """``SegmentationDataModule.preprocessing()`` output (plain types) -> ``Preprocessing``.

    The one place that reads that format. Checkpoints without ``slice_axis`` (2D training, or
    written before it was stored) cut volumes into axial slices.
    """
    patch = stored.get("patch_size")
    axis = stored.get("slice_axis")
    return Preprocessing(
        class_names=tuple(stored["class_names"]),
        in_channels=int(stored["in_channels"]),
        normalization=tuple(channel_normalizations(stored)),
        patch_size=tuple(patch) if patch else None,
        slice_axis=DEFAULT_SLICE_AXIS if axis is None else int(axis),
    )


def _blocked_global(err: Exception) -> str:
    """The line of torch's weights-only error that names what it refused to unpickle."""
    lines = [line.strip() for line in str(err).splitlines()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])


def _load_plain(path: Path) -> dict:
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DataError(
            path,
            "refusing to load: torch.load(weights_only=True) failed because the checkpoint contains "
            f"code objects ({_blocked_global(err)}); medseg only loads plain data (tensors, numbers, "
            "strings, lists, dicts), since unpickling code can run anything",
        ) from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(path, f"cannot read checkpoint, truncated or corrupt? ({err})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(CHECKPOINT_KEY), dict):
        raise DataError(path, f"not a medseg checkpoint: no '{CHECKPOINT_KEY}' entry (written by medseg fit)")
    if not checkpoint[CHECKPOINT_KEY].get("preprocessing"):
        raise DataError(path, "checkpoint lacks the preprocessing settings; it was not saved by medseg fit")
    return checkpoint


def load_model(path: str | Path) -> tuple[SegmentationModule, Preprocessing]:
    """Rebuild the trained ``SegmentationModule`` (eval mode, CPU) and its preprocessing.

    Raises:
        DataError: the file is missing, corrupt, not a medseg checkpoint, needs unpickling code,
            or its weights do not fit the stored network.
    """
    path = Path(path)
    checkpoint = _load_plain(path)
    stored = checkpoint[CHECKPOINT_KEY]
    try:
        prep = read_preprocessing(stored["preprocessing"])
        net = build_net(stored["net"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(path, f"cannot rebuild the network or preprocessing ({err})") from None
    hparams = checkpoint.get("hyper_parameters") or {}
    module = SegmentationModule(
        net,
        class_names=prep.class_names,
        patch_size=prep.patch_size,
        sw_overlap=hparams.get("sw_overlap", 0.5),
        sw_batch_size=hparams.get("sw_batch_size", 4),
        hd95=False,
        channels_last=hparams.get("channels_last", True),
    )
    weights = {
        k[len("net.") :]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("net.")
    }
    try:
        module.net.load_state_dict(weights)
    except RuntimeError as err:
        raise DataError(path, f"weights do not fit the stored network ({err})") from None
    return module.eval(), prep
