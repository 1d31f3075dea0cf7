"""SegmentationModule: an injected network and loss, metrics per stage, AdamW + warm-up-cosine.

2D images are validated per image. Volumes are validated per case: the module predicts the whole
case on the training grid, brings the probabilities back to the case's own grid and scores it
there in 3D, distances in mm (``pipeline.metrics``); ``val/dice`` is then the mean per-case 3D
Dice and selects ``best.ckpt``, and the per-slice Dice stays available as ``val/dice_slice``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, cast

import pytorch_lightning as pl
import torch
from monai.losses import DiceCELoss
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics import MaxMetric

from pipeline.data.cache.resample import labels_from_probabilities
from pipeline.metrics import BatchMeanOnce, SegmentationMetrics
from pipeline.models import net_spec, network_dims
from pipeline.training.deep_supervision import deep_supervision_loss
from pipeline.training.layout import channels_last_format, match_state_layout
from pipeline.training.prediction import (
    Progress,
    softmax_,
    volume_logits,
    volume_probabilities,
    window_logits,
)
from pipeline.training.schedule import WarmupCosine, planned_steps

CHECKPOINT_KEY = "medseg"
STAGES = ("val", "test")
MAX_SLICES = 1 << 20  # slice ids of a case: case index x MAX_SLICES + slice


class Settings(Protocol):
    """``SegmentationModule.hparams`` as the module reads it: ``save_hyperparameters`` keeps every
    ``__init__`` argument but ``net`` and ``loss`` in an ``AttributeDict`` (typed a mapping)."""

    class_names: Sequence[str]
    lr: float
    weight_decay: float
    warmup_epochs: float
    min_lr_ratio: float
    patch_size: Sequence[int] | None
    sw_overlap: float
    sw_batch_size: int
    hd95: bool
    surface_tolerance: float
    channels_last: bool
    channels_last_on_cpu: bool
    compile: bool


class SegmentationModule(pl.LightningModule):
    """Trains a network mapping (B, C_in, *spatial) images to (B, num_classes, *spatial) logits.

    Args:
        net: the network (``pipeline.models``), built from the config and injected.
        loss: a loss on (logits, mask (B, 1, *spatial)); default Dice + cross-entropy (MONAI's
            ``DiceCELoss``, background excluded from the Dice term, batch Dice). A deeply
            supervised network's outputs are each scored by it (``pipeline.training.deep_supervision``);
            ``train/loss`` is then their weighted sum.
        class_names: class names, background first (linked from the data module).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up length (fractions allowed); cosine decay to
            ``lr * min_lr_ratio`` at the run's end (``pipeline.training.schedule``: with
            ``trainer.max_time``, where the time budget ends), stepped every optimiser step.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        patch_size: training patch, (H, W) or (S, H, W) (linked from the data module); larger
            inputs go through Gaussian-weighted sliding-window inference with this window.
        sw_overlap: sliding-window overlap fraction.
        sw_batch_size: windows (or volume slices) per forward pass in whole-image inference.
        hd95: compute HD95 in validation and test (CPU cost: distance transforms).
        surface_tolerance: volumes: the surface Dice's tolerance, mm.
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
        patch_size: Sequence[int] | None = None,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 4,
        hd95: bool = True,
        surface_tolerance: float = 2.0,
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
        self.spatial_dims = network_dims(net)
        self.metrics = nn.ModuleDict(
            {stage: SegmentationMetrics(self.class_names, hd95, surface_tolerance) for stage in STAGES}
        )
        self.slice_metrics = nn.ModuleDict(
            {stage: SegmentationMetrics(self.class_names, False) for stage in STAGES}
        )
        self.eval_loss = nn.ModuleDict({stage: BatchMeanOnce() for stage in STAGES})
        self.val_dice_best = MaxMetric()
        self.val_dice_best.persistent(True)  # in checkpoints, so a resumed run keeps its best
        self.schedule: WarmupCosine | None = None
        self.memory_format: torch.memory_format | None = None  # decided by configure_model or first use
        if compile:
            self.net.compile()  # compiled on first call, after configure_model has set the memory format

    @property
    def _settings(self) -> Settings:
        # an AttributeDict of the __init__ arguments (save_hyperparameters); read live, so a value
        # set on hparams later (Lightning's learning-rate finder sets hparams.lr) is the one used
        return cast(Settings, self.hparams)

    def _metrics(self, stage: str) -> SegmentationMetrics:
        return cast(SegmentationMetrics, self.metrics[stage])  # __init__ puts one in every stage

    def _slice_metrics(self, stage: str) -> SegmentationMetrics:
        return cast(SegmentationMetrics, self.slice_metrics[stage])  # __init__ puts one in every stage

    def _eval_loss(self, stage: str) -> BatchMeanOnce:
        return cast(BatchMeanOnce, self.eval_loss[stage])  # __init__ puts one in every stage

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, *spatial) -> logits (B, num_classes, *spatial)."""
        return self.net(x)

    def configure_model(self) -> None:
        # Lightning calls this before it moves the module, wraps it in DDP and builds the optimiser.
        self._set_memory_format(self.trainer.strategy.root_device)

    def _set_memory_format(self, device: torch.device) -> torch.memory_format:
        """Channels-last weights for ``device`` when configured (once; in place, so references hold).

        Returns:
            the weights' memory format, the one decided first.
        """
        if self.memory_format is not None:
            return self.memory_format
        h = self._settings
        wanted = h.channels_last and (device.type == "cuda" or h.channels_last_on_cpu)
        self.memory_format = channels_last_format(self.net) if wanted else torch.contiguous_format
        if wanted:
            self.net.to(memory_format=self.memory_format)
        return self.memory_format

    def _prepare(self, x: Tensor) -> Tensor:
        """``x`` in the weights' memory format; outside a Trainer (inference) it is set on first use."""
        memory_format = self._set_memory_format(x.device)  # the one set before, when there is one
        if memory_format == torch.contiguous_format:
            return x
        return x.contiguous(memory_format=memory_format)

    def on_train_start(self) -> None:
        # after Lightning restored a resumed optimiser state, which keeps the layout it was saved with
        for optimizer in self.trainer.optimizers:
            match_state_layout(optimizer)

    def predict_logits(self, x: Tensor, progress: Progress | None = None) -> Tensor:
        """(B, C, *spatial) -> logits; sliding windows where the input exceeds ``patch_size``."""
        h = self._settings
        return window_logits(
            self.net, self._prepare(x), self.patch_size, h.sw_batch_size, h.sw_overlap, progress
        )

    def predict_case(
        self,
        image: Tensor,
        size: Sequence[int] | None = None,
        tta: bool = False,
        chunk: int | None = None,
        progress: Progress | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Segment one case: (C, S, H, W) on the training grid (S = 1 for a 2D image).

        Args:
            size: the case's own (S0, H0, W0) grid, where labels are returned; None: this grid.
            tta: average the softmax over the mirrorings (``pipeline.training.prediction``).
            chunk: slices per forward pass of a 2D network; default ``sw_batch_size``.
            progress: told the fraction of the case done as it goes.

        Returns:
            labels uint8 (S0, H0, W0) and the probabilities (K, S, H, W) they come from.
        """
        chunk = chunk or self._settings.sw_batch_size
        probs = volume_probabilities(self.predict_logits, image, self.spatial_dims, chunk, tta, progress)
        return labels_from_probabilities(probs, size or probs.shape[1:]), probs

    def on_train_epoch_start(self) -> None:
        # Networks with a schedule of their own (ResNetUNet's encoder freezing) follow the epoch.
        set_epoch = getattr(self.net, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.current_epoch)
        if self.schedule is not None:
            self.schedule.total = planned_steps(self.trainer)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # a deeply supervised network returns a list here: full-resolution logits first, then coarser
        outputs = self.net(self._prepare(batch["image"]))
        loss = deep_supervision_loss(self.loss, outputs, batch["mask"][:, None])
        # not prog_bar: Lightning would copy it to the host after every batch; the bar reads it itself
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["mask"]))
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        if "target" in batch:  # a whole volume: predicted on the training grid, scored on its own
            self._eval_case(batch, stage)
            return
        logits = self.predict_logits(batch["image"])
        # index: an image (and a batch) that DDP padding repeats counts once
        self._eval_loss(stage).update(
            self.loss(logits, batch["mask"][:, None]), len(logits), batch.get("index")
        )
        self._metrics(stage).update(logits.argmax(1), batch["mask"], batch.get("index"))

    def _eval_case(self, batch: dict, stage: str) -> None:
        """``CaseDataset`` sample: loss on the training grid; metrics in 3D on the case's own grid
        (mm), and per slice (``<stage>/dice_slice``)."""
        chunk = self._settings.sw_batch_size
        logits = volume_logits(self.predict_logits, batch["image"], self.spatial_dims, chunk)
        index = torch.as_tensor([batch["index"]], device=logits.device)
        loss = self.loss(logits[None], batch["mask"][None, None].long())  # uint8 whole-case labels
        self._eval_loss(stage).update(loss, 1, index)
        target = batch["target"]
        labels = labels_from_probabilities(softmax_(logits.float()), target.shape)
        self._metrics(stage).update(labels[None], target[None], index, batch["spacing"].tolist())
        slices = index * MAX_SLICES + torch.arange(len(target), device=index.device)  # a repeat counts once
        self._slice_metrics(stage).update(labels, target, slices)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_metrics(self, stage: str) -> dict[str, Tensor]:
        eval_loss = self._eval_loss(stage)
        self.log(f"{stage}/loss", eval_loss.compute(), prog_bar=stage == "val")
        eval_loss.reset()
        values = self._metrics(stage).compute()
        self.log(f"{stage}/dice", values["dice"], prog_bar=True)
        self.log_dict({f"{stage}/{k}": v for k, v in values.items() if k != "dice"})
        slices = self._slice_metrics(stage)
        if slices.update_count:
            self.log(f"{stage}/dice_slice", slices.compute()["dice"])
        slices.reset()
        return values

    def on_validation_epoch_end(self) -> None:
        values = self._log_metrics("val")
        self._metrics("val").reset()
        if not self.trainer.sanity_checking and not torch.isnan(values["dice"]):
            self.val_dice_best.update(values["dice"])
            self.log("val/dice_best", self.val_dice_best.compute())

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def on_test_epoch_start(self) -> None:
        self._metrics("test").reset()

    @property
    def test_metrics(self) -> SegmentationMetrics:
        """The test stage's per-item scores (read by ``pipeline.monitors.report.TestReport``)."""
        return self._metrics("test")

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        h = self._settings
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in self.net.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on biases and norm weights
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": h.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=h.lr,
        )
        total = float(self.trainer.estimated_stepping_batches)
        if math.isfinite(total):
            epochs = max(1, self.trainer.max_epochs or 1)
            warmup = min(int(total) - 1, int(h.warmup_epochs * total / epochs))
        else:  # only a time budget: warm up for warmup_epochs epochs of steps
            per_epoch = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
            warmup = int(h.warmup_epochs * per_epoch)
        self.schedule = WarmupCosine(max(0, warmup), total, h.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store what inference needs, as plain types, beside the weights."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        checkpoint[CHECKPOINT_KEY] = {
            "net": net_spec(self.net),
            "class_names": self.class_names,
            "preprocessing": datamodule.preprocessing().to_checkpoint()
            if datamodule is not None and hasattr(datamodule, "preprocessing")
            else None,
        }
