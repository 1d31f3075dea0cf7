"""The data module's part of a checkpoint: the preprocessing record that the module stores for
inference (``checkpoint["medseg"]["preprocessing"]``, the one copy), and, as the data module's own
state, the split and where a resumed fit's training order continues."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.data.loading.order import resume_position
from pipeline.data.preprocessing import DEFAULT_SLICE_AXIS, Preprocessing

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from pipeline.data.normalization import Normalization
    from pipeline.data.planning.rules import Plan
    from pipeline.data.reading.layouts import DataSetInfo


class DataCheckpointState:
    """Mixed into ``SegmentationDataModule``: reads its settings, resolved plan and split."""

    if TYPE_CHECKING:  # what the data module sets in __init__ and when it adopts a plan
        class_names: list[str]
        in_channels: int
        normalization: Normalization
        patch_size: tuple[int, ...] | None
        slice_axis: int | str
        volumetric: bool
        modalities: list[str] | None
        info: DataSetInfo
        label_map: dict[int, int] | None
        target_spacing: tuple[float, ...] | None
        plan: Plan | None
        spatial_dims: int
        split: dict[str, list[str]]
        trainer: pl.Trainer | None
        _train_start: tuple[int, ...]

        def channel_normalization(self) -> list[Normalization]: ...

    def preprocessing(self) -> Preprocessing:
        """What inference needs to reproduce this data's preprocessing (stored in every checkpoint)."""
        spacing = self.target_spacing if self.volumetric else None
        if spacing is not None and len(spacing) != 3:
            raise ValueError(f"target_spacing of volumes has 3 values (mm, X, Y, Z), got {list(spacing)}")
        return Preprocessing(
            class_names=tuple(self.class_names),
            in_channels=self.in_channels,
            normalization=tuple(self.channel_normalization()),
            configured=self.normalization,
            patch_size=self.patch_size,
            slice_axis=int(self.slice_axis) if self.volumetric else DEFAULT_SLICE_AXIS,
            volumetric=self.volumetric,
            modalities=tuple(self.modalities) if self.modalities else None,
            layout=self.info.layout,
            label_map=dict(self.label_map or {}),
            target_spacing=spacing,
            spacing_range=self.plan.spacing_range if self.plan else None,
            spatial_dims=self.spatial_dims,
        )

    def state_dict(self) -> dict[str, Any]:
        # train_position: (epoch, batches trained in it), where a resumed fit's data order continues.
        position = resume_position(self.trainer)
        return {"split": self.split, "train_position": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_start = tuple(state_dict.get("train_position", (0, 0)))
