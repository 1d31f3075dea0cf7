"""Several checkpoints as one model (``medseg infer --checkpoint a.ckpt b.ckpt ...`` or
``--model-dir`` of a ``medseg cv`` folder), nnU-Net's ensembling of cross-validation folds.

The members must share one preprocessing (classes, channels, per-channel normalisation with its
statistics, target spacing, slice axis): then one resampled, normalised input serves them all,
2D and 3D networks alike (each predicts it slice by slice or window by window, as it trained). Each member's softmax on the training grid (averaged over the mirrorings with TTA, as
``SegmentationModule.predict_case`` does) is summed, divided by the number of members, brought
back to the case's own grid, and the arg max is taken once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from pipeline.data.cache.resample import labels_from_probabilities
from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import CheckpointError, DataError
from pipeline.files import read_json
from pipeline.training.checkpoint import load_model
from pipeline.training.module import SegmentationModule
from pipeline.training.prediction import Progress, volume_probabilities

# What members must agree on (``Preprocessing`` fields) for one input to serve them all.
SHARED = (
    "class_names",
    "in_channels",
    "volumetric",
    "slice_axis",
    "target_spacing",
    "normalization",
)
CV_SUMMARY = "cv_summary.json"  # written by medseg cv: "checkpoints", relative to the CV folder
AUTO_SUMMARY = "auto_summary.json"  # written by medseg auto: the same "checkpoints" of its choice
POSTPROCESSING = "postprocessing.json"  # written by medseg cv and auto: "largest_component", class names


class Ensemble(nn.Module):
    """Trained models of one preprocessing, predicting as one: the mean of their softmax.

    Args:
        members: the trained modules (``pipeline.training.checkpoint.load_model``).
    """

    def __init__(self, members: Sequence[SegmentationModule]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    def predict_case(
        self,
        image: Tensor,
        size: Sequence[int] | None = None,
        tta: bool = False,
        chunk: int | None = None,
        progress: Progress | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``SegmentationModule.predict_case`` for the ensemble: (C, S, H, W) on the training grid ->
        labels uint8 on ``size`` (default this grid) and the mean probabilities (K, S, H, W)."""
        count = len(self.members)
        total: Tensor | None = None
        for i, member in enumerate(self.members):
            assert isinstance(member, SegmentationModule)  # the only members __init__ takes
            told = None if progress is None else lambda fraction, i=i: progress((i + fraction) / count)
            probs = volume_probabilities(
                member.predict_logits,
                image,
                member.spatial_dims,
                chunk or member.hparams["sw_batch_size"],
                tta,
                told,
            )
            total = probs if total is None else total.add_(probs)
        assert total is not None  # __init__ refuses fewer than 2 members
        probs = total / count
        return labels_from_probabilities(probs, size or probs.shape[1:]), probs


def check_shared(paths: Sequence[str | os.PathLike], preps: Sequence[Preprocessing]) -> None:
    """Refuse checkpoints that disagree on the preprocessing an ensemble shares.

    Raises:
        CheckpointError: naming the first pair that disagrees, the setting and both values.
    """
    for path, prep in zip(paths[1:], preps[1:], strict=True):
        for name in SHARED:
            ours, theirs = getattr(preps[0], name), getattr(prep, name)
            if ours != theirs:
                raise CheckpointError(
                    path,
                    f"disagrees with {paths[0]} on {name} ({theirs} vs {ours}): an ensemble needs "
                    "checkpoints of one preprocessing (train the folds with medseg cv)",
                )


def load_models(paths: Sequence[str | os.PathLike]) -> tuple[SegmentationModule | Ensemble, Preprocessing]:
    """One checkpoint as it is, or several as an ``Ensemble`` (eval mode, CPU), and the
    preprocessing they share.

    Raises:
        CheckpointError: a checkpoint cannot be loaded, or two disagree (``check_shared``).
    """
    if not paths:
        raise ValueError("no checkpoint given")
    loaded = [load_model(path) for path in paths]
    if len(loaded) == 1:
        return loaded[0]
    check_shared(paths, [prep for _, prep in loaded])
    return Ensemble([module for module, _ in loaded]).eval(), loaded[0][1]


def read_model_dir(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """The checkpoints of a ``medseg cv`` folder (its folds' final checkpoints) or a ``medseg auto``
    folder (those of its choice), and the classes whose largest connected component is kept (the
    postprocessing chosen on the out-of-fold predictions).

    Raises:
        DataError: the folder is no finished cross-validation or auto run, or a checkpoint it lists is gone.
    """
    folder = Path(folder)
    name = AUTO_SUMMARY if (folder / AUTO_SUMMARY).is_file() else CV_SUMMARY
    summary = read_json(folder / name)
    if not summary.get("checkpoints"):
        raise DataError(
            folder,
            f"not a finished cross-validation or auto run (no {name}): run medseg cv or medseg auto first",
        )
    checkpoints = [folder / path for path in summary["checkpoints"]]
    for path in checkpoints:
        if not path.is_file():
            raise CheckpointError(path, f"listed in {folder / name} but not found")
    decision = read_json(folder / POSTPROCESSING)
    if "largest_component" not in decision:
        raise DataError(folder / POSTPROCESSING, "missing or unreadable: run medseg cv again to write it")
    return checkpoints, list(decision["largest_component"])
