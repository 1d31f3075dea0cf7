"""The LightningModule that ``Trainer.predict`` runs: a trained model over whole cases."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor

from pipeline.inference.cases import describe
from pipeline.training.module import SegmentationModule

MIRRORS = ((-1,), (-2,), (-2, -1))  # flip W, flip H, flip both


class CasePredictor(pl.LightningModule):
    """Segments one case per step, its slices ``batch_size`` at a time.

    Labels are the argmax of ``SegmentationModule.predict_logits`` (sliding window beyond the
    training patch), the very call validation scores, so inference and validation agree voxel
    for voxel. With ``tta`` the softmax is averaged over the image and its three mirrorings.

    Args:
        segmenter: the trained module (``pipeline.training.checkpoint.load_model``).
        batch_size: slices per forward pass.
        tta: mirroring test-time augmentation (4 forward passes per slice).
        probabilities: also return the softmax probabilities.
    """

    def __init__(
        self,
        segmenter: SegmentationModule,
        batch_size: int = 8,
        tta: bool = False,
        probabilities: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.segmenter = segmenter
        self.batch_size = batch_size
        self.tta = tta
        self.probabilities = probabilities
        self.report_progress: Callable[[int, float], None] = lambda index, fraction: None  # SliceProgress

    def _segment(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, C, H, W) -> labels (B, H, W) and probabilities (B, K, H, W) or None."""
        logits = self.segmenter.predict_logits(x)
        if not self.tta:
            return logits.argmax(1), logits.float().softmax(1) if self.probabilities else None
        probs = logits.float().softmax(1)
        for dims in MIRRORS:
            probs += self.segmenter.predict_logits(x.flip(dims)).float().softmax(1).flip(dims)
        probs /= 1 + len(MIRRORS)
        return probs.argmax(1), probs if self.probabilities else None

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        # only the image goes to the device; case and geometry records stay as they are
        if "image" not in batch:
            return batch
        return {**batch, "image": batch["image"].to(device, non_blocking=True)}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One case (``InferenceDataset`` item) -> ``{"labels": uint8 (S, H, W), "probabilities":
        float16 (S, K, H, W) or None, "seconds"}`` on the CPU, or ``{"error": str}``."""
        if "error" in batch:
            return {"error": batch["error"]}
        start = time.perf_counter()
        labels, probs = [], []
        slices = len(batch["image"])
        try:
            for chunk in batch["image"].split(self.batch_size):
                chunk_labels, chunk_probs = self._segment(chunk)
                labels.append(chunk_labels.to(torch.uint8).cpu())
                if chunk_probs is not None:
                    probs.append(chunk_probs.half().cpu())
                self.report_progress(batch["index"], sum(map(len, labels)) / slices)
        except RuntimeError as err:  # e.g. out of memory on one huge case: report it, go on
            return {"error": describe(err)}
        return {
            "labels": torch.cat(labels),
            "probabilities": torch.cat(probs) if probs else None,
            "seconds": batch["seconds"] + time.perf_counter() - start,
        }
