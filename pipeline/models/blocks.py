"""Building blocks shared by every network: conv-norm-act units, plain and residual blocks,
and one factory each for activation, normalisation and weight initialisation.

Every factory takes a lower-case name and raises a ``ValueError`` listing the valid names, so a
typo in a YAML config fails at construction with a message that says how to fix it. Every block
takes ``spatial_dims`` (2: images (B, C, H, W), 3: volumes (B, C, D, H, W)) and builds its layers
from the tables of ``pipeline.models.nd``, so 2D and 3D share one code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

from torch import Tensor, nn

from pipeline.models.nd import BATCH_NORM, CONV, CONV_TRANSPOSE, DROPOUT, INSTANCE_NORM, per_axis

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
NORMS = ("batch", "instance", "group", "none")
INITS = ("kaiming", "xavier", "default")
BLOCKS = ("plain", "residual")


def _check(kind: str, name: str, valid: tuple[str, ...] | list[str]) -> None:
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


def make_act(name: str) -> nn.Module:
    """Activation module by name (one of ``ACTIVATIONS``)."""
    _check("activation", name, list(ACTIVATIONS))
    return ACTIVATIONS[name]()


def make_norm(name: str | None, channels: int, spatial_dims: int = 2) -> nn.Module:
    """Normalisation over ``channels`` feature maps: batch, instance (affine), group or none.

    Group norm uses 8 groups, or the largest divisor of ``channels`` below 8.
    """
    name = "none" if name is None else name
    _check("norm", name, NORMS)
    if name == "batch":
        return BATCH_NORM[spatial_dims](channels)
    if name == "instance":
        return INSTANCE_NORM[spatial_dims](channels, affine=True)
    if name == "group":
        groups = max(g for g in range(1, 9) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


def check_names(norm: str | None, act: str, init: str, block: str = "plain") -> None:
    """Validate the knob names of a network before anything is built."""
    _check("norm", "none" if norm is None else norm, NORMS)
    _check("activation", act, list(ACTIVATIONS))
    _check("init", init, INITS)
    _check("block", block, BLOCKS)


def init_weights(module: nn.Module, scheme: str, act: str = "relu") -> None:
    """Initialise every conv and linear weight under ``module`` in place (2D and 3D layers alike).

    Args:
        module: the modules to initialise (recursively).
        scheme: ``kaiming`` (He et al. 2015, normal, fan-in, std = sqrt(2 / fan_in) for ReLU;
            the leaky-ReLU gain for ``leaky_relu``), ``xavier`` (Glorot & Bengio 2010, normal,
            std = sqrt(2 / (fan_in + fan_out))) or ``default`` (PyTorch's own, left untouched).
        act: the network's activation, which picks the He gain.

    Biases are zeroed; normalisation layers start as the identity (weight 1, bias 0).
    """
    _check("init", scheme, INITS)
    if scheme == "default":
        return
    for m in module.modules():
        if isinstance(m, (*CONV.kinds, *CONV_TRANSPOSE.kinds, nn.Linear)):
            weight, bias = _tensor(m, "weight"), _tensor(m, "bias")
            if weight is not None and scheme == "kaiming":
                slope = 0.01 if act == "leaky_relu" else 0.0
                nonlinearity: Literal["leaky_relu", "relu"] = "leaky_relu" if act == "leaky_relu" else "relu"
                nn.init.kaiming_normal_(weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)
            elif weight is not None:
                nn.init.xavier_normal_(weight, gain=1.0)
            if bias is not None:
                nn.init.zeros_(bias)
        elif isinstance(m, (*BATCH_NORM.kinds, nn.GroupNorm, *INSTANCE_NORM.kinds)):
            weight, bias = _tensor(m, "weight"), _tensor(m, "bias")
            if weight is not None and bias is not None:  # affine
                nn.init.ones_(weight)
                nn.init.zeros_(bias)


def _tensor(layer: nn.Module, name: str) -> Tensor | None:
    """The layer's ``weight`` or ``bias`` tensor; None where it has none (no bias, a norm without
    affine). ``nn.Module`` types its attributes as ``Tensor | Module``."""
    value = getattr(layer, name, None)
    return value if isinstance(value, Tensor) else None


def expected_std(weight_shape: tuple[int, ...], scheme: str) -> float:
    """The standard deviation ``init_weights`` targets for a conv weight of this shape (ReLU gain).

    Fans are PyTorch's: dimension 1 x kernel size is the fan-in, dimension 0 x kernel size the
    fan-out, for transposed-conv weights (in, out, *kernel) too, as ``nn.init`` computes them.
    """
    receptive = math.prod(weight_shape[2:])
    fan_in = weight_shape[1] * receptive
    fan_out = weight_shape[0] * receptive
    if scheme == "kaiming":
        return math.sqrt(2.0 / fan_in)
    if scheme == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    raise ValueError(f"no closed-form std for init {scheme!r}")


Size = int | Sequence[int]  # a kernel size or stride: one for every axis, or one per axis


class ConvNormAct(nn.Sequential):
    """Conv -> norm -> activation (-> dropout): the unit the gradient monitor calls a layer.

    Shapes: (B, in_channels, *spatial) -> (B, out_channels, *spatial') with each axis
    ceil(size / stride) for odd kernels ("same" padding, kernel // 2 per axis). ``spatial_dims``
    picks Conv2d or Conv3d (and the matching norm and dropout); ``kernel_size`` and ``stride``
    are an int or one value per axis, e.g. (1, 3, 3) for an in-plane-only 3D kernel. The conv
    has no bias when a norm follows (the norm's shift replaces it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size = 3,
        stride: Size = 1,
        norm: str | None = "batch",
        act: str | None = "relu",
        dropout: float = 0.0,
        spatial_dims: int = 2,
    ) -> None:
        has_norm = norm not in (None, "none")
        kernel = per_axis(kernel_size, spatial_dims, "kernel_size")
        layers: dict[str, nn.Module] = {
            "conv": CONV[spatial_dims](
                in_channels,
                out_channels,
                kernel,
                per_axis(stride, spatial_dims, "stride"),
                padding=tuple(k // 2 for k in kernel),
                bias=not has_norm,
            )
        }
        if has_norm:
            layers["norm"] = make_norm(norm, out_channels, spatial_dims)
        if act is not None:
            layers["act"] = make_act(act)
        if dropout > 0:
            layers["drop"] = DROPOUT[spatial_dims](dropout)
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


class PlainBlock(nn.Sequential):
    """Two conv-norm-act units (3x3 by default), as in the original U-Net.

    (B, Cin, *spatial) -> (B, Cout, *spatial).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str | None,
        act: str,
        dropout: float = 0.0,
        kernel_size: Size = 3,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(
            in_channels,
            out_channels,
            kernel_size,
            norm=norm,
            act=act,
            dropout=dropout,
            spatial_dims=spatial_dims,
        )
        self.conv2 = ConvNormAct(
            out_channels, out_channels, kernel_size, norm=norm, act=act, spatial_dims=spatial_dims
        )


class ResidualBlock(nn.Module):
    """Two conv-norm units with an identity short skip (He et al. 2016), act after the sum.

    A 1x1 conv-norm projection replaces the identity where the channel count changes.
    (B, Cin, *spatial) -> (B, Cout, *spatial).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str | None,
        act: str,
        dropout: float = 0.0,
        kernel_size: Size = 3,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        unit = partial(ConvNormAct, norm=norm, spatial_dims=spatial_dims)
        self.conv1 = unit(in_channels, out_channels, kernel_size, act=act, dropout=dropout)
        self.conv2 = unit(out_channels, out_channels, kernel_size, act=None)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else unit(in_channels, out_channels, kernel_size=1, act=None)
        )
        self.act = make_act(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


def make_block(
    kind: str,
    in_channels: int,
    out_channels: int,
    norm: str | None,
    act: str,
    dropout: float = 0.0,
    kernel_size: Size = 3,
    spatial_dims: int = 2,
) -> nn.Module:
    """A ``plain`` or ``residual`` block; see ``PlainBlock`` and ``ResidualBlock``."""
    _check("block", kind, BLOCKS)
    cls = PlainBlock if kind == "plain" else ResidualBlock
    return cls(
        in_channels,
        out_channels,
        norm=norm,
        act=act,
        dropout=dropout,
        kernel_size=kernel_size,
        spatial_dims=spatial_dims,
    )
