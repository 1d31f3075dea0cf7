"""The fixed validation samples that the activation monitor and the image logger look at each time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import pytorch_lightning as pl
import torch
from torch import Tensor

if TYPE_CHECKING:
    from pipeline.training.module import SegmentationModule


class FixedSamples:
    """The first ``num_samples`` validation samples of a run, captured once, kept on the CPU.

    The validation loader does not shuffle, so these are the same images every epoch. Feed
    ``capture`` every validation batch and call ``close`` at the end of every validation epoch:
    capturing stops after the first validation pass (the sanity check, when there is one). A whole
    volume (a ``CaseDataset`` sample) gives its slice with the largest foreground area, or, for a 3D
    network, a block of ``depth`` slices around it (``display`` then names that slice in the block).
    """

    def __init__(self, num_samples: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.images: list[Tensor] = []
        self.masks: list[Tensor] = []
        self.names: list[str] = []
        self.display: list[int | None] = []  # the slice to show of a 3D block, None for 2D samples
        self.closed = False

    def __len__(self) -> int:
        return len(self.names)

    def capture(self, batch: dict, spatial_dims: int = 2, depth: int = 1) -> None:
        """Keep samples of a batch dict (``image`` (B, C, H, W), ``mask`` (B, H, W), ``case_id``, ...)
        or of a whole volume (``image`` (C, S, H, W), ``mask`` (S, H, W), ``target``)."""
        if self.closed or len(self) >= self.num_samples:
            return
        if "target" in batch:
            self._capture_volume(batch, spatial_dims, depth)
            return
        take = min(self.num_samples - len(self), len(batch["image"]))
        slices = batch.get("slice_index", [-1] * take)
        for i in range(take):
            index = int(slices[i])
            case = str(batch["case_id"][i]) if "case_id" in batch else f"sample {len(self)}"
            self.images.append(batch["image"][i].detach().cpu())
            self.masks.append(batch["mask"][i].detach().cpu())
            self.names.append(case if index < 0 else f"{case} slice {index}")
            self.display.append(None)

    def _capture_volume(self, batch: dict, spatial_dims: int, depth: int) -> None:
        image, mask = batch["image"].detach().cpu(), batch["mask"].detach().cpu().long()
        count = len(mask)
        best = int(mask.flatten(1).count_nonzero(1).argmax())  # the largest foreground area
        name = f"{batch['case_id']} slice {best}"
        if spatial_dims == 3:
            start = max(0, min(best - depth // 2, count - depth))
            self.images.append(image[:, start : start + depth])
            self.masks.append(mask[start : start + depth])
            self.display.append(best - start)
        else:
            self.images.append(image[:, best])
            self.masks.append(mask[best])
            self.display.append(None)
        self.names.append(name)

    def close(self) -> None:
        """End of a validation pass: the samples captured so far (if any) are the fixed ones."""
        self.closed = len(self) > 0

    def batches(self, device: torch.device) -> list[Tensor]:
        """The images as (N, C, H, W) batches on ``device``, in order: one batch per run of equal sizes.

        One batch runs several times faster than single images on a CPU; sizes may differ.
        """
        runs: list[list[Tensor]] = []
        for image in self.images:
            if runs and runs[-1][0].shape == image.shape:
                runs[-1].append(image)
            else:
                runs.append([image])
        return [torch.stack(run).to(device) for run in runs]


class FixedSampleCallback(pl.Callback):
    """Base of the callbacks that look at the fixed validation samples after validation epochs.

    Captures the samples from the first validation pass, then calls ``measure`` on rank zero
    after each validation epoch that ``due`` selects (never the sanity check).

    Args:
        every_n_epochs: measure after every this many validation epochs; 0 turns it off.
        num_samples: how many fixed validation images.
    """

    def __init__(self, every_n_epochs: int, num_samples: int) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0: off), got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.samples = FixedSamples(num_samples)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.every_n_epochs and dataloader_idx == 0 and trainer.is_global_zero:
            module = cast("SegmentationModule", pl_module)  # the module these callbacks watch
            dims, patch = module.spatial_dims, module.patch_size
            self.samples.capture(batch, dims, patch[0] if dims == 3 and patch else 1)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.samples.close()
        if trainer.is_global_zero and not trainer.sanity_checking and len(self.samples) and self.due(trainer):
            self.measure(trainer, pl_module)

    def due(self, trainer: pl.Trainer) -> bool:
        """Whether to measure after this epoch's validation: every ``every_n_epochs``-th, from the first."""
        return bool(self.every_n_epochs) and trainer.current_epoch % self.every_n_epochs == 0

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    @staticmethod
    def predictor(pl_module: pl.LightningModule) -> Callable[[Tensor], Tensor]:
        """Whole-image logits: the module's ``predict_logits`` (sliding window) or its forward."""
        return getattr(pl_module, "predict_logits", pl_module)
