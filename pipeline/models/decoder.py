"""The one UNet decoder used by every variant.

Each decoder stage upsamples by 2 with a transposed convolution, crops to the size of the encoder
level it rejoins, concatenates that level's features when long skips are in use, and runs a block.
"No skip" is a stage built with ``skip_channels=0``: it receives nothing from the encoder but the
target size, so the UNet with and without skips differ in exactly the long skips.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.models.blocks import make_block


class DecoderStage(nn.Module):
    """Upsample x2, crop to ``size``, concatenate an optional skip, then a block.

    Shapes: x (B, in_channels, h, w), skip (B, skip_channels, H, W) with H <= 2h, W <= 2w
    -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        block: str = "plain",
        norm: str | None = "batch",
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.block = make_block(block, out_channels + skip_channels, out_channels, norm, act, dropout)

    def forward(self, x: Tensor, size: tuple[int, int], skip: Tensor | None = None) -> Tensor:
        x = self.up(x)[..., : size[0], : size[1]]
        if self.skip_channels:
            if skip is None:
                raise ValueError("this decoder stage was built with skip channels but got no skip")
            x = torch.cat([skip, x], dim=1)
        return self.block(x)


class UNetDecoder(nn.ModuleDict):
    """Stages ``dec{n}`` ... ``dec1`` from the deepest encoder feature up to the input resolution.

    Args:
        encoder_channels: channels of the encoder features, shallow to deep; each feature is half
            the spatial size (rounded up) of the previous one. The last one is the bottleneck.
        decoder_channels: output channels of each stage, deep to shallow. Stages beyond the
            available skips (e.g. the stride-2 -> stride-1 stage of a ResNet encoder) get no skip.
        use_skips: concatenate encoder features (long skips); False gives skip channels 0.
        block, norm, act, dropout: as in ``pipeline.models.blocks``.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        use_skips: bool = True,
        block: str = "plain",
        norm: str | None = "batch",
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        skips = list(encoder_channels[:-1])[::-1]
        if not len(skips) <= len(decoder_channels) <= len(skips) + 1:
            raise ValueError(
                f"decoder_channels has {len(decoder_channels)} stages but the encoder has "
                f"{len(skips)} skip levels; give one stage per level (plus one for a stride-2 encoder)"
            )
        skips += [0] * (len(decoder_channels) - len(skips))
        in_channels = [encoder_channels[-1], *decoder_channels[:-1]]
        super().__init__()
        n = len(decoder_channels)
        for i, (cin, cskip, cout) in enumerate(zip(in_channels, skips, decoder_channels, strict=True)):
            self[f"dec{n - i}"] = DecoderStage(
                cin, cskip if use_skips else 0, cout, block=block, norm=norm, act=act, dropout=dropout
            )
        self.out_channels = decoder_channels[-1]

    def forward(self, features: Sequence[Tensor], out_size: tuple[int, int]) -> Tensor:
        """Decode encoder ``features`` (shallow to deep) to (B, out_channels, *out_size)."""
        x = features[-1]
        skips = list(features[:-1])[::-1]
        for i, stage in enumerate(self.values()):
            skip = skips[i] if i < len(skips) else None
            size = tuple(skip.shape[-2:]) if skip is not None else out_size
            x = stage(x, size, skip if stage.skip_channels else None)
        return x
