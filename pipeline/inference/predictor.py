"""The LightningModule that ``Trainer.predict`` runs: a trained model over whole cases."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch

from pipeline.data.cache.resample import resample_probabilities
from pipeline.inference.cases import describe
from pipeline.inference.ensemble import Ensemble
from pipeline.training.module import SegmentationModule


class CasePredictor(pl.LightningModule):
    """Segments one case per step with ``SegmentationModule.predict_case``, the very call
    validation scores, so inference and validation agree voxel for voxel: the case on the
    training grid (slices ``batch_size`` at a time, sliding windows beyond the training patch),
    probabilities brought back to the case's own grid before the arg max.

    Args:
        segmenter: the trained module (``pipeline.training.checkpoint.load_model``), or an
            ``Ensemble`` of several with the same ``predict_case``.
        batch_size: slices (or windows) per forward pass; None: the checkpoint's ``sw_batch_size``,
            as validation uses.
        tta: mirroring test-time augmentation (every spatial axis the network sees).
        probabilities: also return the softmax probabilities on the case's own grid.
    """

    def __init__(
        self,
        segmenter: SegmentationModule | Ensemble,
        batch_size: int | None = None,
        tta: bool = False,
        probabilities: bool = False,
    ) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.segmenter = segmenter
        self.batch_size = batch_size
        self.tta = tta
        self.probabilities = probabilities
        self.report_progress: Callable[[int, float], None] = lambda index, fraction: None  # SliceProgress

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        # only the image goes to the device; case and geometry records stay as they are
        if "image" not in batch:
            return batch
        return {**batch, "image": batch["image"].to(device, non_blocking=True)}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One case (``InferenceDataset`` item) -> ``{"labels": uint8 (S0, H0, W0), "probabilities":
        float16 (K, S0, H0, W0) or None, "overlay": (image (C, H, W), labels (H, W)) of the middle
        slice on the network's grid, "seconds"}`` on the CPU, or ``{"error": str}``."""
        if "error" in batch:
            return {"error": batch["error"]}
        start = time.perf_counter()
        index = batch["index"]
        try:
            labels, probs = self.segmenter.predict_case(
                batch["image"], batch["size"], self.tta, self.batch_size,
                lambda fraction: self.report_progress(index, fraction),
            )  # fmt: skip
        except RuntimeError as err:  # e.g. out of memory on one huge case: report it, go on
            return {"error": describe(err)}
        middle = probs.shape[1] // 2
        own = resample_probabilities(probs, batch["size"]).half().cpu() if self.probabilities else None
        return {
            "labels": labels.cpu(),
            "probabilities": own,
            "overlay": (batch["image"][:, middle].float().cpu(), probs[:, middle].argmax(0).cpu()),
            "seconds": batch["seconds"] + time.perf_counter() - start,
        }
