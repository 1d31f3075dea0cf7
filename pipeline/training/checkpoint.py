"""Checkpoint files: written atomically, read with ``weights_only=True``.

Writing: the checkpoint goes to a hidden temporary file beside its target, is flushed to disk and
renamed over the target, so a kill at any moment (pre-emption, the OOM killer) leaves either the
old file or the new one, never half of one. Lightning's own writer stages the file in the system
temporary folder; where that is another file system than the run directory (a node-local /tmp
and a shared /scratch, as on most clusters) its final move is a copy, which a kill can cut short.

Reading: every checkpoint is unpickled with ``weights_only=True`` (tensors, numbers, strings and
plain containers only). A file whose pickle would import or call anything else is refused with
a ``CheckpointError`` naming the file and what it tried to load; nothing in it runs.

``SafeCheckpointIO`` puts both behind Lightning's ``CheckpointIO`` interface; ``medseg`` installs it
in every Trainer, so ``--ckpt_path`` for fit/validate/test loads safely. ``load_model`` rebuilds a
trained model for inference from the checkpoint alone: training stores, beside the weights,
``checkpoint["medseg"]`` = ``{"net": {"class_path", "init_args"}, "class_names", "preprocessing"}``
in plain types (``SegmentationModule.on_save_checkpoint``), so no config file is needed.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import CheckpointError
from pipeline.files import atomic_write
from pipeline.models import build_net
from pipeline.training.module import CHECKPOINT_KEY, SegmentationModule


def _refused_global(err: Exception) -> str:
    """What the pickle asked for, from torch's weights-only error (e.g. ``posix.system``)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else (str(err).strip().splitlines() or ["?"])[0]


def _translate(path: str | os.PathLike, err: BaseException) -> CheckpointError:
    """One clear ``CheckpointError`` for whatever ``torch.load`` or the file system raised."""
    if isinstance(err, pickle.UnpicklingError):
        return CheckpointError(
            path,
            f"refused to load: unpickling it would call {_refused_global(err)}, which could run any "
            "code; medseg loads only tensors, numbers, strings and plain containers (weights_only=True)",
        )
    if isinstance(err, FileNotFoundError):
        return CheckpointError(path, "checkpoint not found")
    if isinstance(err, IsADirectoryError):
        return CheckpointError(path, "is a folder, not a checkpoint file")
    if isinstance(err, PermissionError):
        return CheckpointError(path, "permission denied")
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return CheckpointError(path, "symbolic link loop: the link never reaches a file")
    if isinstance(err, OSError):
        return CheckpointError(path, f"cannot read ({err.strerror or err})")
    first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
    return CheckpointError(
        path, f"not a readable PyTorch checkpoint, truncated or corrupt? ({type(err).__name__}: {first})"
    )


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``.

    Args:
        path: a local checkpoint file, or an fsspec URL (``s3://...``).
        map_location: where tensors go (``torch.load``'s argument).

    Raises:
        CheckpointError: naming ``path``: missing, empty, unreadable, corrupt, not a dict, or
            refused because unpickling it would import or call code.
    """
    try:
        if "://" in str(path):
            with fsspec.open(str(path), "rb") as f:
                checkpoint = torch.load(f, map_location=map_location, weights_only=True)
        else:
            if Path(path).is_file() and Path(path).stat().st_size == 0:
                raise CheckpointError(path, "empty file (0 bytes): its write was interrupted")
            with open(path, "rb") as f:
                checkpoint = torch.load(f, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except (
        pickle.UnpicklingError,
        RuntimeError,
        OSError,
        EOFError,
        KeyError,
        ValueError,
        zipfile.BadZipFile,
    ) as err:
        raise _translate(path, err) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(path, f"holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must never expose a file the kernel has not written

    atomic_write(path, write)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes atomically and reads only weights.

    ``weights_only`` from the caller is ignored on purpose: loading is always weights-only.
    Remote paths (``s3://``, ...) are written by Lightning's fsspec writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, os.fspath(path), storage_options)
            return
        save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location)


def load_model(path: str | os.PathLike) -> tuple[SegmentationModule, Preprocessing]:
    """Rebuild the trained ``SegmentationModule`` (eval mode, CPU) and its preprocessing.

    Raises:
        CheckpointError: naming ``path``: missing, corrupt, unsafe (see ``load_checkpoint``), not
            written by ``medseg fit``, or weights that do not fit the stored network.
    """
    checkpoint = load_checkpoint(path)
    stored = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(stored, dict):
        raise CheckpointError(
            path, f"not a medseg checkpoint: no '{CHECKPOINT_KEY}' entry (written by medseg fit)"
        )
    if not stored.get("preprocessing"):
        raise CheckpointError(
            path, "checkpoint lacks the preprocessing settings; it was not saved by medseg fit"
        )
    try:
        prep = Preprocessing.from_checkpoint(stored["preprocessing"])
        net = build_net(stored["net"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(path, f"cannot rebuild the network or preprocessing ({err})") from None
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
        raise CheckpointError(path, f"weights do not fit the stored network ({err})") from None
    return module.eval(), prep
