"""UNet (Ronneberger et al. 2015) with long skips as a switch and plain or residual blocks.

``UNet(use_skips=False)`` is the same network with the long skips cut: the decoder gets the
encoder's feature sizes but none of its features. ``block="residual"`` adds short identity skips
inside every level, so long x short skips gives the four networks of Drozdzal et al. 2016.
``spatial_dims=3`` builds the same network for volumes, with per-level ``strides`` and
``kernel_sizes`` for anisotropic data (nnU-Net's in-plane-only pooling of the first levels).
``deep_supervision=True`` adds auxiliary outputs at coarser decoder levels in training mode
(``pipeline.models.decoder.DeepSupervisionHeads``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pipeline.models.base import ACT, BLOCK, DEEP_SUPERVISION, DIMS, INIT, NORM, SKIPS, Knob, Network
from pipeline.models.blocks import Size, check_names, init_weights, make_block
from pipeline.models.decoder import DeepSupervisionHeads, UNetDecoder
from pipeline.models.nd import CONV, MAX_POOL, check_input, check_spatial_dims, per_level


class UNetEncoder(nn.ModuleDict):
    """Levels ``enc1`` ... ``enc{n-1}`` and ``bottleneck``, max pooling (ceil mode) between them.

    The pooling before level i has kernel = stride = ``strides[i - 1]`` (2 on every axis by
    default). Returns one feature per level, shallow to deep: level i has ``features[i]``
    channels and, on each axis, the size before it divided by its stride, rounded up.
    """

    def __init__(
        self,
        in_channels: int,
        features: Sequence[int],
        block: str,
        norm: str | None,
        act: str,
        dropout: float,
        strides: Sequence[Size] | None = None,
        kernel_sizes: Sequence[Size] | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        n = len(features)
        strides = per_level(strides, n - 1, spatial_dims, "strides", default=2)
        kernel_sizes = per_level(kernel_sizes, n, spatial_dims, "kernel_sizes", default=3)
        channels = [in_channels, *features]
        for i in range(n):
            name = "bottleneck" if i == n - 1 else f"enc{i + 1}"
            level_dropout = dropout if i >= n - 2 else 0.0  # dropout in the deepest levels only
            self[name] = make_block(
                block, channels[i], channels[i + 1], norm, act, level_dropout, kernel_sizes[i], spatial_dims
            )
        # Stateless, so kept out of the module tree: the levels stay this dict's only entries.
        self.pools = tuple(MAX_POOL[spatial_dims](s, s, ceil_mode=True) for s in strides)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, level in enumerate(self.values()):
            x = level(self.pools[i - 1](x) if i > 0 else x)
            features.append(x)
        return features


class UNet(Network):
    """UNet for 2D (images) or 3D (volumes) segmentation.

    Args:
        in_channels: image channels (1 for grayscale, 3 for RGB, one per modality).
        out_channels: classes including background; the output is logits.
        features: channels per level, shallow to deep; the last is the bottleneck. The input is
            pooled ``len(features) - 1`` times. Any input size works (odd sizes included).
        use_skips: long encoder-to-decoder skips (False: the no-skip variant).
        block: ``plain`` (two conv-norm-act) or ``residual`` (short identity skips).
        norm: ``batch``, ``instance``, ``group`` or ``none``.
        act: ``relu``, ``leaky_relu``, ``elu``, ``gelu``, ``sigmoid`` or ``tanh``.
        init: ``kaiming`` (He), ``xavier`` (Glorot) or ``default`` (PyTorch's).
        dropout: channel dropout in the two deepest levels and the decoder.
        spatial_dims: 2 (input (B, C, H, W)) or 3 (input (B, C, D, H, W)).
        strides: one per pooling step (``len(features) - 1``), shallow to deep, each an int or
            one per axis, e.g. (1, 2, 2) to pool in-plane only; the decoder upsamples each level
            by its stride. None: 2 on every axis (2x2 or 2x2x2 max pooling).
        kernel_sizes: one per level (``len(features)``), shallow to deep, each an int or one
            per axis, e.g. (1, 3, 3) for the first levels of anisotropic volumes; the decoder
            level of the same resolution uses the same kernel. None: 3 on every axis.
        deep_supervision: in training mode, return a list of logits: full resolution first, then
            1x1 conv heads on the coarser decoder levels (all but the deepest, at most three, finest
            first; ``DeepSupervisionHeads``), for ``pipeline.training.deep_supervision``'s loss.
            In eval mode (validation, inference, export) the output is the one tensor as without
            it. Needs at least 4 levels in ``features``.

    Example:
        >>> net = UNet(in_channels=1, out_channels=4, features=(16, 32, 64, 128, 256))
        >>> net(torch.zeros(2, 1, 97, 120)).shape
        torch.Size([2, 4, 97, 120])
        >>> net = UNet(1, 4, features=(8, 16, 32), spatial_dims=3, strides=[(1, 2, 2), 2])
        >>> net(torch.zeros(1, 1, 5, 37, 41)).shape
        torch.Size([1, 4, 5, 37, 41])
    """

    ARCH = "unet"
    KNOBS = (
        DIMS, SKIPS, BLOCK, ACT, INIT, NORM,
        Knob("depth", lambda net: len(net.init_args["features"]), lambda v: None if v == 5 else f"d{v}"),
        DEEP_SUPERVISION,
    )  # fmt: skip

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        use_skips: bool = True,
        block: str = "plain",
        norm: str | None = "batch",
        act: str = "relu",
        init: str = "kaiming",
        dropout: float = 0.0,
        spatial_dims: int = 2,
        strides: Sequence[Size] | None = None,
        kernel_sizes: Sequence[Size] | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        self.record_init_args(locals())
        check_names(norm, act, init, block)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 levels (encoder + bottleneck), got {list(features)}")
        n = len(features)
        strides = per_level(
            strides,
            n - 1,
            spatial_dims,
            "strides",
            default=2,
            entries="one per pooling step: len(features) - 1",
        )
        kernel_sizes = per_level(
            kernel_sizes, n, spatial_dims, "kernel_sizes", default=3, entries="one per level", odd=True
        )
        self.use_skips = use_skips
        self.encoder = UNetEncoder(
            in_channels, features, block, norm, act, dropout, strides, kernel_sizes, spatial_dims
        )
        self.decoder = UNetDecoder(
            features,
            list(features[:-1])[::-1],
            use_skips,
            block=block,
            norm=norm,
            act=act,
            dropout=dropout,
            strides=strides[::-1],
            kernel_sizes=kernel_sizes[:-1][::-1],
            spatial_dims=spatial_dims,
        )
        # before the head, so the head stays the last layer the monitors see (grad/first_last_ratio)
        self.aux_heads = (
            DeepSupervisionHeads(list(features[:-1])[::-1], out_channels, spatial_dims)
            if deep_supervision
            else None
        )
        self.head = CONV[spatial_dims](features[0], out_channels, kernel_size=1)
        init_weights(self, init, act)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """(B, in_channels, *spatial) -> logits (B, out_channels, *spatial); spatial is (H, W) or
        (D, H, W). With ``deep_supervision`` in training mode: a list, those logits first, then
        the auxiliary ones (B, out_channels, *coarser spatial), finest first."""
        check_input(x, self.spatial_dims, type(self).__name__)
        features, size = self.encoder(x), tuple(x.shape[2:])
        if self.aux_heads is not None and self.training:
            return self.aux_heads(self.decoder, self.head, features, size)
        return self.head(self.decoder(features, size))
