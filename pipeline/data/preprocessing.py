"""The train <-> inference contract: everything inference must reproduce from training.

``SegmentationDataModule.preprocessing()`` builds it; every checkpoint stores it as plain types
(``checkpoint["medseg"]["preprocessing"]`` = ``Preprocessing.to_checkpoint()``), and ``medseg
infer`` reads it back with ``Preprocessing.from_checkpoint``. This class is the one place that
knows that format; older checkpoints (one normalisation for every channel, no slice axis) load too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.data.normalization import Normalization, from_plain, to_plain

DEFAULT_SLICE_AXIS = 2  # checkpoints written before the slice axis was stored trained on axial slices


@dataclass(frozen=True)
class Preprocessing:
    """What inference must reproduce from training.

    Attributes:
        class_names: class names in index order, background first.
        in_channels: image channels the network expects, stacked in ``modalities`` order.
        normalization: one resolved normalisation per input channel (data-set statistics included:
            CT ``window`` = foreground percentiles, ``mean``/``std`` in HU).
        configured: the normalisation as configured (its mode may be ``auto``).
        patch_size: training patch (H, W); larger images go through sliding-window inference.
        slice_axis: axis (0, 1, 2) of the canonical RAS+ volume that volumes are cut along.
        volumetric: whether the training data were volumes.
        modalities: modality name per channel, if known.
        layout: the training data's layout (folders, dicom, msd, nnunet).
        label_map: ``{stored mask value: class index}`` applied to masks on load.
        target_spacing: volumes: the spacing (mm, X, Y, Z of the RAS+ array) the model was trained
            at; inference resamples every scan there (None: no resampling, older checkpoints).
        spacing_range: volumes: (min, max) spacing per axis of the training cases, mm.
        spatial_dims: 2 (slices) or 3 (patches).
    """

    class_names: tuple[str, ...]
    in_channels: int
    normalization: tuple[Normalization, ...]
    configured: Normalization | None = None
    patch_size: tuple[int, ...] | None = None
    slice_axis: int = DEFAULT_SLICE_AXIS
    volumetric: bool = False
    modalities: tuple[str, ...] | None = None
    layout: str = ""
    label_map: Mapping[int, int] = field(default_factory=dict)
    target_spacing: tuple[float, float, float] | None = None
    spacing_range: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    spatial_dims: int = 2

    def to_checkpoint(self) -> dict:
        """Plain types (JSON-able), the format stored in checkpoints."""
        return {
            "class_names": list(self.class_names),
            "in_channels": self.in_channels,
            "normalization": to_plain(self.configured or self.normalization[0]),
            "channel_normalization": [to_plain(n) for n in self.normalization],
            "modalities": list(self.modalities) if self.modalities else None,
            "slice_axis": self.slice_axis if self.volumetric else None,
            "volumetric": self.volumetric,
            "layout": self.layout,
            "patch_size": list(self.patch_size) if self.patch_size else None,
            "label_map": {str(k): int(v) for k, v in self.label_map.items()},
            "target_spacing": list(self.target_spacing) if self.target_spacing else None,
            "spacing_range": [list(r) for r in self.spacing_range] if self.spacing_range else None,
            "spatial_dims": self.spatial_dims,
        }

    @classmethod
    def from_checkpoint(cls, stored: Mapping) -> Preprocessing:
        """Inverse of ``to_checkpoint``; raises ``KeyError``/``TypeError``/``ValueError`` on a bad entry."""
        channels = int(stored["in_channels"])
        per_channel = stored.get("channel_normalization")
        norms = (
            [from_plain(n) for n in per_channel]
            if per_channel
            else [from_plain(stored["normalization"])] * channels
        )
        patch, axis = stored.get("patch_size"), stored.get("slice_axis")
        modalities, spacing_range = stored.get("modalities"), stored.get("spacing_range")
        return cls(
            class_names=tuple(stored["class_names"]),
            in_channels=channels,
            normalization=tuple(norms),
            configured=from_plain(stored["normalization"]) if stored.get("normalization") else None,
            patch_size=tuple(patch) if patch else None,
            slice_axis=DEFAULT_SLICE_AXIS if axis is None else int(axis),
            volumetric=bool(stored.get("volumetric", axis is not None)),
            modalities=tuple(modalities) if modalities else None,
            layout=str(stored.get("layout", "")),
            label_map={int(k): int(v) for k, v in (stored.get("label_map") or {}).items()},
            target_spacing=tuple(stored["target_spacing"]) if stored.get("target_spacing") else None,
            spacing_range=(tuple(spacing_range[0]), tuple(spacing_range[1])) if spacing_range else None,
            spatial_dims=int(stored.get("spatial_dims", 2)),
        )
