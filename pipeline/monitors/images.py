"""PredictionImageLogger: the same validation images with predicted and true masks, in W&B.

Key ``val/predictions``: a list of ``wandb.Image`` with ``masks={"prediction": ...,
"ground_truth": ...}`` and the class names as labels, so the W&B image panel can toggle each class
and each mask; the caption names the case (and slice). For volumes it is each case's slice with the
largest foreground area (predicted in 3D by a 3D network). Needs a W&B logger; without one it does
nothing.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from pipeline.monitors.outputs import log_media, wandb_run
from pipeline.monitors.samples import FixedSampleCallback


def display_image(image: Tensor) -> np.ndarray:
    """(C, H, W) normalised image -> (H, W) or (H, W, 3) uint8, scaled between its 1st and 99th percentiles.

    Three channels are shown as RGB; otherwise the first channel (e.g. the first modality).
    """
    x = image.float()
    x = x[:3].permute(1, 2, 0) if x.shape[0] == 3 else x[0]
    low, high = torch.quantile(x.flatten(), torch.tensor([0.01, 0.99], dtype=x.dtype)).tolist()
    scaled = ((x - low) / max(high - low, 1e-8)).clamp(0, 1) * 255
    return scaled.round().to(torch.uint8).numpy()


class PredictionImageLogger(FixedSampleCallback):
    """Every ``every_n_epochs`` validation epochs, logs the fixed validation images with masks.

    Args:
        every_n_epochs: log after every this many validation epochs, and after the first and
            the last epoch; 0 turns it off.
        num_samples: fixed validation images shown each time.
    """

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 4) -> None:
        super().__init__(every_n_epochs, num_samples)

    def due(self, trainer: pl.Trainer) -> bool:
        n, epoch = self.every_n_epochs, trainer.current_epoch
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs - 1
        return bool(n) and ((epoch + 1) % n == 0 or epoch == 0 or last)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if wandb_run(trainer) is None:
            return
        import wandb  # only with a W&B run: importing wandb costs about a second

        # Lightning's data connector sets trainer.datamodule; the Trainer class does not declare it
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        names = getattr(pl_module, "class_names", None) or getattr(datamodule, "class_names", [])
        labels = {i: name for i, name in enumerate(names)}
        predict = self.predictor(pl_module)
        with torch.no_grad():
            predictions = [
                p for batch in self.samples.batches(pl_module.device) for p in predict(batch).argmax(1)
            ]
        images = []
        samples = self.samples
        for prediction, image, mask, caption, show in zip(
            predictions, samples.images, samples.masks, samples.names, samples.display, strict=True
        ):
            if show is not None:  # a 3D block: its slice with the largest foreground area
                prediction, image, mask = prediction[show], image[:, show], mask[show]
            masks = {
                "prediction": {
                    "mask_data": prediction.cpu().numpy().astype(np.uint8),
                    "class_labels": labels,
                },
                "ground_truth": {"mask_data": mask.numpy().astype(np.uint8), "class_labels": labels},
            }
            images.append(wandb.Image(display_image(image), masks=masks, caption=caption))
        log_media(trainer, {"val/predictions": images})
