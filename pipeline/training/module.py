"""SegmentationModule: an injected network and loss, metrics per stage, AdamW + warmup-cosine."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import Tensor, nn
from torchmetrics import MaxMetric

from pipeline.metrics import BatchMeanOnce, SegmentationMetrics
from pipeline.models import net_spec
from pipeline.training.layout import channels_last_format, match_state_layout

CHECKPOINT_KEY = "medseg"


class SegmentationModule(pl.LightningModule):
    """Trains any network mapping (B, C_in, H, W) images to (B, num_classes, H, W) logits.

    Args:
        net: the network (``pipeline.models``), built from the config and injected.
        loss: a loss on (logits, mask (B, 1, H, W)); default Dice + cross-entropy (MONAI's
            ``DiceCELoss``, background excluded from the Dice term, batch Dice).
        class_names: class names, background first (linked from the data module).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up length (fractions allowed); cosine decay to
            ``lr * min_lr_ratio`` afterwards, stepped every optimiser step.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        patch_size: training patch (H, W) (linked from the data module); larger validation and
            test images go through Gaussian-weighted sliding-window inference with this window.
        sw_overlap: sliding-window overlap fraction.
        sw_batch_size: windows per forward pass in sliding-window inference (raise it on a GPU).
        hd95: compute HD95 in validation and test (CPU cost: distance transforms).
        channels_last: use the channels-last memory format on CUDA (faster convolutions); the
            weights take it in ``configure_model``, before DDP or the optimiser see them.
        channels_last_on_cpu: use it on the CPU too (slower there): runs the CUDA path's memory
            format on a CPU, for tests.
        compile: compile the network with ``torch.compile`` (through ``nn.Module.compile``, in
            place, so checkpoints keep their ``net.*`` keys). Off by default: the first steps
            then take a minute or more, and the gain is on GPUs (``benchmarks/gpu_throughput.py``).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module | None = None,
        class_names: Sequence[str] = ("background", "foreground"),
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        patch_size: tuple[int, int] | None = None,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 4,
        hd95: bool = True,
        channels_last: bool = True,
        channels_last_on_cpu: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss"])
        self.net = net
        self.loss = loss or DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
        self.class_names = list(class_names)
        self.patch_size = tuple(patch_size) if patch_size else None
        self.val_metrics = SegmentationMetrics(self.class_names, hd95=hd95)
        self.test_metrics = SegmentationMetrics(self.class_names, hd95=hd95)
        self.eval_loss = nn.ModuleDict({"val": BatchMeanOnce(), "test": BatchMeanOnce()})
        self.val_dice_best = MaxMetric()
        self.val_dice_best.persistent(True)  # in checkpoints, so a resumed run keeps its best
        self.memory_format: torch.memory_format | None = None  # decided by configure_model or first use
        if compile:
            self.net.compile()  # compiled on first call, after configure_model has set the memory format

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> logits (B, num_classes, H, W)."""
        return self.net(x)

    def configure_model(self) -> None:
        # Lightning calls this before it moves the module, wraps it in DDP and builds the optimiser.
        self._set_memory_format(self.trainer.strategy.root_device)

    def _set_memory_format(self, device: torch.device) -> None:
        """Channels-last weights for ``device`` when configured (once; in place, so references hold)."""
        if self.memory_format is not None:
            return
        wanted = self.hparams.channels_last and (device.type == "cuda" or self.hparams.channels_last_on_cpu)
        self.memory_format = channels_last_format(self.net) if wanted else torch.contiguous_format
        if wanted:
            self.net.to(memory_format=self.memory_format)

    def _prepare(self, x: Tensor) -> Tensor:
        """``x`` in the weights' memory format; outside a Trainer (inference) it is set on first use."""
        if self.memory_format is None:
            self._set_memory_format(x.device)
        if self.memory_format == torch.contiguous_format:
            return x
        return x.contiguous(memory_format=self.memory_format)

    def on_train_start(self) -> None:
        # after Lightning restored a resumed optimiser state, which keeps the layout it was saved with
        for optimizer in self.trainer.optimizers:
            match_state_layout(optimizer)

    def predict_logits(self, x: Tensor) -> Tensor:
        """Whole-image logits; sliding-window inference where the image exceeds ``patch_size``."""
        x = self._prepare(x)
        if self.patch_size and any(s > p for s, p in zip(x.shape[-2:], self.patch_size, strict=True)):
            return sliding_window_inference(
                x,
                self.patch_size,
                sw_batch_size=self.hparams.sw_batch_size,
                predictor=self.net,
                overlap=self.hparams.sw_overlap,
                mode="gaussian",
            )
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        # Networks with a schedule of their own (ResNetUNet's encoder freezing) follow the epoch.
        if hasattr(self.net, "set_epoch"):
            self.net.set_epoch(self.current_epoch)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self.net(self._prepare(batch["image"]))
        loss = self.loss(logits, batch["mask"][:, None])
        # not prog_bar: Lightning would copy it to the host after every batch; the bar reads it itself
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(logits))
        return loss

    def _eval_step(self, batch: dict, stage: str, metrics: SegmentationMetrics) -> Tensor:
        logits = self.predict_logits(batch["image"])
        # index: an image (and a batch) that DDP padding repeats counts once
        self.eval_loss[stage].update(
            self.loss(logits, batch["mask"][:, None]), len(logits), batch.get("index")
        )
        metrics.update(logits.argmax(1), batch["mask"], batch.get("index"))
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: SegmentationMetrics) -> dict[str, Tensor]:
        self.log(f"{stage}/loss", self.eval_loss[stage].compute(), prog_bar=stage == "val")
        self.eval_loss[stage].reset()
        values = metrics.compute()
        self.log(f"{stage}/dice", values["dice"], prog_bar=True)
        self.log_dict({f"{stage}/{k}": v for k, v in values.items() if k != "dice"})
        return values

    def on_validation_epoch_end(self) -> None:
        values = self._log_metrics("val", self.val_metrics)
        self.val_metrics.reset()
        if not self.trainer.sanity_checking and not torch.isnan(values["dice"]):
            self.val_dice_best.update(values["dice"])
            self.log("val/dice_best", self.val_dice_best.compute())

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()

    def configure_optimizers(self) -> dict:
        decay, no_decay = [], []
        for p in self.net.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on biases and norm weights
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        total = max(1, self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(total - 1, int(self.hparams.warmup_epochs * total / epochs))
        floor = self.hparams.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store what inference needs, as plain types, beside the weights."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        checkpoint[CHECKPOINT_KEY] = {
            "net": net_spec(self.net),
            "class_names": self.class_names,
            "preprocessing": datamodule.preprocessing().to_checkpoint()
            if hasattr(datamodule, "preprocessing")
            else None,
        }
