"""UNet (Ronneberger et al. 2015) with long skips as a switch and plain or residual blocks.

``UNet(use_skips=False)`` is the same network with the long skips cut: the decoder gets the
encoder's feature sizes but none of its features. ``block="residual"`` adds short identity skips
inside every level, so long x short skips gives the four networks of Drozdzal et al. 2016.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from pipeline.models.base import ACT, BLOCK, INIT, NORM, SKIPS, Knob, Network
from pipeline.models.blocks import check_names, init_weights, make_block
from pipeline.models.decoder import UNetDecoder


class UNetEncoder(nn.ModuleDict):
    """Levels ``enc1`` ... ``enc{n-1}`` and ``bottleneck``, 2x2 max-pooling (ceil) between them.

    Returns one feature per level, shallow to deep: level i has ``features[i]`` channels and
    spatial size ceil(H / 2**i) x ceil(W / 2**i).
    """

    def __init__(
        self,
        in_channels: int,
        features: Sequence[int],
        block: str,
        norm: str | None,
        act: str,
        dropout: float,
    ) -> None:
        super().__init__()
        channels = [in_channels, *features]
        for i in range(len(features)):
            name = "bottleneck" if i == len(features) - 1 else f"enc{i + 1}"
            level_dropout = dropout if i >= len(features) - 2 else 0.0  # dropout in the deepest levels only
            self[name] = make_block(block, channels[i], channels[i + 1], norm, act, level_dropout)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, level in enumerate(self.values()):
            x = level(F.max_pool2d(x, 2, ceil_mode=True) if i > 0 else x)
            features.append(x)
        return features


class UNet(Network):
    """UNet for 2D segmentation.

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

    Example:
        >>> net = UNet(in_channels=1, out_channels=4, features=(16, 32, 64, 128, 256))
        >>> net(torch.zeros(2, 1, 97, 120)).shape
        torch.Size([2, 4, 97, 120])
    """

    ARCH = "unet"
    KNOBS = (
        SKIPS, BLOCK, ACT, INIT, NORM,
        Knob("depth", lambda net: len(net.init_args["features"]), lambda v: None if v == 5 else f"d{v}"),
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
    ) -> None:
        super().__init__()
        self.record_init_args(locals())
        check_names(norm, act, init, block)
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 levels (encoder + bottleneck), got {list(features)}")
        self.use_skips = use_skips
        self.encoder = UNetEncoder(in_channels, features, block, norm, act, dropout)
        self.decoder = UNetDecoder(
            features, list(features[:-1])[::-1], use_skips, block=block, norm=norm, act=act, dropout=dropout
        )
        self.head = nn.Conv2d(features[0], out_channels, kernel_size=1)
        init_weights(self, init, act)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> logits (B, out_channels, H, W)."""
        features = self.encoder(x)
        return self.head(self.decoder(features, tuple(x.shape[-2:])))
