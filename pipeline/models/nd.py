"""Layers by spatial dimensionality: one table per kind, so every network has one 2D/3D code path.

``CONV[spatial_dims]`` is ``nn.Conv2d`` or ``nn.Conv3d``, ``CONV_TRANSPOSE``, ``BATCH_NORM``,
``INSTANCE_NORM``, ``MAX_POOL`` and ``DROPOUT`` likewise (in the spirit of MONAI's
``Conv[Conv.CONV, dims]``). ``ByDims.kinds`` holds every class of a table, for ``isinstance``
checks that must treat a 3D layer like its 2D kind. ``per_axis`` expands an ``int`` or per-axis
kernel size or stride into one value per spatial axis.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

SPATIAL_DIMS = (2, 3)


def check_spatial_dims(spatial_dims: object) -> int:
    """``spatial_dims`` when it is 2 or 3, else a ``ValueError`` saying so."""
    if isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
    return int(spatial_dims)  # numpy ints and 2.0 as plain ints


class ByDims:
    """A layer class per spatial dimensionality: ``table[spatial_dims]`` -> class."""

    def __init__(self, kind: str, classes: dict[int, type[nn.Module]]) -> None:
        self.kind = kind
        self._classes = classes

    def __getitem__(self, spatial_dims: int) -> type[nn.Module]:
        return self._classes[check_spatial_dims(spatial_dims)]

    @property
    def kinds(self) -> tuple[type[nn.Module], ...]:
        """Every class of the table (2D and 3D)."""
        return tuple(self._classes.values())

    def __repr__(self) -> str:
        return f"ByDims({self.kind!r}, {self._classes})"


CONV = ByDims("conv", {2: nn.Conv2d, 3: nn.Conv3d})
CONV_TRANSPOSE = ByDims("transposed conv", {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d})
BATCH_NORM = ByDims("batch norm", {2: nn.BatchNorm2d, 3: nn.BatchNorm3d})
INSTANCE_NORM = ByDims("instance norm", {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d})
MAX_POOL = ByDims("max pooling", {2: nn.MaxPool2d, 3: nn.MaxPool3d})
DROPOUT = ByDims("channel dropout", {2: nn.Dropout2d, 3: nn.Dropout3d})


def per_axis(value: int | Sequence[int], spatial_dims: int, what: str, minimum: int = 1) -> tuple[int, ...]:
    """``value`` (an int for every axis, or one int per axis) as a tuple of ``spatial_dims`` ints.

    Raises:
        ValueError: naming ``what`` when the value has the wrong length, is not an int or is
            below ``minimum``.
    """
    # typed object: the checks below also guard values straight from YAML (a string, a float)
    values: object = (
        [value] * spatial_dims if isinstance(value, int) and not isinstance(value, bool) else value
    )
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or len(values) != spatial_dims
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values)
    ):
        raise ValueError(
            f"{what} must be an int >= {minimum} or {spatial_dims} of them (one per axis), got {value!r}"
        )
    return tuple(values)


def per_level(
    values: Sequence[int | Sequence[int]] | None,
    count: int,
    spatial_dims: int,
    what: str,
    default: int,
    minimum: int = 1,
    entries: str = "",
    odd: bool = False,
) -> list[tuple[int, ...]]:
    """``count`` per-axis tuples from ``values`` (one entry each, int or per-axis); None: ``default``.

    Args:
        entries: what one entry is for, e.g. ``one per pooling step``, for the error message.
        odd: every value must be odd (a kernel whose "same" padding keeps the size).

    Raises:
        ValueError: naming ``what`` when there are not ``count`` entries or one is invalid.
    """
    if values is None:
        values = [default] * count
    if isinstance(values, (int, str)) or not isinstance(values, Sequence) or len(values) != count:
        raise ValueError(f"{what} needs {count} entries{f' ({entries})' if entries else ''}, got {values!r}")
    levels = [per_axis(v, spatial_dims, f"{what}[{i}]", minimum) for i, v in enumerate(values)]
    for i, level in enumerate(levels):
        if odd and any(v % 2 == 0 for v in level):
            raise ValueError(
                f"{what}[{i}] must be odd on every axis (padding then keeps the size), got {values[i]!r}"
            )
    return levels


def check_input(x: Tensor, spatial_dims: int, network: str) -> None:
    """Raise a ``ValueError`` unless ``x`` is a batch (B, C, *spatial) of ``spatial_dims`` axes.

    A 3D conv would read a 2D batch (B, C, H, W) as one unbatched volume (C, D, H, W) and fail
    far from the cause, or not at all.
    """
    if x.ndim != spatial_dims + 2:
        axes = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
        raise ValueError(
            f"{network}(spatial_dims={spatial_dims}) takes {axes} input, got shape {tuple(x.shape)}"
        )
