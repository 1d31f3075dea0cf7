"""The one UNet decoder used by every variant.

Each decoder stage upsamples by its encoder level's stride (2 on every axis by default) with a
transposed convolution whose kernel is that stride, crops to the size of the encoder level it
rejoins, concatenates that level's features when long skips are in use, and runs a block. "No
skip" is a stage built with ``skip_channels=0``: it receives nothing from the encoder but the
target size, so the UNet with and without skips differ in exactly the long skips. Stages are 2D
or 3D (``spatial_dims``) with one code path. ``DeepSupervisionHeads`` put 1x1 conv heads on the
coarser stages' outputs for deep supervision (nnU-Net's auxiliary segmentation outputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.models.blocks import Size, make_block
from pipeline.models.nd import CONV, CONV_TRANSPOSE, per_axis, per_level

MAX_AUX_OUTPUTS = 3  # auxiliary outputs at most: a 4th would weigh 1/16 of the full one, before normalising


class DecoderStage(nn.Module):
    """Upsample by ``stride``, crop to ``size``, concatenate an optional skip, then a block.

    Shapes (2D; a 3D stage has a depth axis too): x (B, in_channels, h, w), skip
    (B, skip_channels, H, W) with H <= stride_h * h, W <= stride_w * w -> (B, out_channels, H, W).
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
        stride: Size = 2,
        kernel_size: Size = 3,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        stride = per_axis(stride, spatial_dims, "stride")
        self.up = CONV_TRANSPOSE[spatial_dims](in_channels, out_channels, kernel_size=stride, stride=stride)
        self.block = make_block(
            block, out_channels + skip_channels, out_channels, norm, act, dropout, kernel_size, spatial_dims
        )

    def forward(self, x: Tensor, size: Sequence[int], skip: Tensor | None = None) -> Tensor:
        # the index is built outside the brackets: mypy takes x[(..., *g)] for Python 3.11 syntax
        crop = (..., *(slice(0, s) for s in size))
        x = self.up(x)[crop]
        if self.skip_channels:
            if skip is None:
                raise ValueError("this decoder stage was built with skip channels but got no skip")
            x = torch.cat([skip, x], dim=1)
        return self.block(x)


class UNetDecoder(nn.ModuleDict):
    """Stages ``dec{n}`` ... ``dec1`` from the deepest encoder feature up to the input resolution.

    Args:
        encoder_channels: channels of the encoder features, shallow to deep; each feature is the
            previous one's spatial size divided by a stride (rounded up). The last one is the
            bottleneck.
        decoder_channels: output channels of each stage, deep to shallow. Stages beyond the
            available skips (e.g. the stride-2 -> stride-1 stage of a ResNet encoder) get no skip.
        use_skips: concatenate encoder features (long skips); False gives skip channels 0.
        block, norm, act, dropout: as in ``pipeline.models.blocks``.
        strides: each stage's upsampling factor, deep to shallow (the encoder's strides
            reversed), an int or one per axis; None: 2 on every axis.
        kernel_sizes: each stage's block kernel, deep to shallow, int or per axis; None: 3.
        spatial_dims: 2 (images) or 3 (volumes).
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
        strides: Sequence[Size] | None = None,
        kernel_sizes: Sequence[Size] | None = None,
        spatial_dims: int = 2,
    ) -> None:
        skips = list(encoder_channels[:-1])[::-1]
        if not len(skips) <= len(decoder_channels) <= len(skips) + 1:
            raise ValueError(
                f"decoder_channels has {len(decoder_channels)} stages but the encoder has "
                f"{len(skips)} skip levels; give one stage per level (plus one for a stride-2 encoder)"
            )
        skips += [0] * (len(decoder_channels) - len(skips))
        in_channels = [encoder_channels[-1], *decoder_channels[:-1]]
        n = len(decoder_channels)
        strides = per_level(strides, n, spatial_dims, "decoder strides", default=2)
        kernel_sizes = per_level(kernel_sizes, n, spatial_dims, "decoder kernel_sizes", default=3)
        super().__init__()
        stages = zip(in_channels, skips, decoder_channels, strides, kernel_sizes, strict=True)
        for i, (cin, cskip, cout, stride, kernel) in enumerate(stages):
            self[f"dec{n - i}"] = DecoderStage(
                cin,
                cskip if use_skips else 0,
                cout,
                block=block,
                norm=norm,
                act=act,
                dropout=dropout,
                stride=stride,
                kernel_size=kernel,
                spatial_dims=spatial_dims,
            )
        self.out_channels = decoder_channels[-1]

    def forward(self, features: Sequence[Tensor], out_size: Sequence[int]) -> Tensor:
        """Decode encoder ``features`` (shallow to deep) to (B, out_channels, *out_size)."""
        return self.outputs(features, out_size)[-1]

    def outputs(self, features: Sequence[Tensor], out_size: Sequence[int], last: int = 1) -> list[Tensor]:
        """The outputs of the last ``last`` stages, coarsest first: the last one is ``forward``'s.

        Stage outputs are (B, decoder_channels[i], *size_i), size_i the size of the encoder level
        the stage rejoins (``out_size`` for stages beyond the skips). Only the kept ones are held.
        """
        x = features[-1]
        skips = list(features[:-1])[::-1]
        kept = []
        for i, stage in enumerate(self.values()):
            skip = skips[i] if i < len(skips) else None
            size = tuple(skip.shape[2:]) if skip is not None else tuple(out_size)
            x = stage(x, size, skip if stage.skip_channels else None)
            if i >= len(self) - last:
                kept.append(x)
        return kept


class DeepSupervisionHeads(nn.ModuleList):
    """1x1 conv heads on the decoder's coarser stages: deep supervision's auxiliary outputs.

    Which stages: every stage but the full-resolution one (which has the network's own head) and
    the deepest one, at most ``MAX_AUX_OUTPUTS``, the finest first. nnU-Net supervises every
    decoder stage but gives the deepest (lowest-resolution) output weight 0, so it is left out
    here rather than computed for nothing; beyond the third auxiliary output the halving weights
    (1/16, 1/32, ...) add little, so deeper networks get three. The 5-level UNet thus gets outputs
    at 1/2 and 1/4 of the input size (strides 2), the ResNet-UNet at 1/2, 1/4 and 1/8.

    Args:
        decoder_channels: the decoder stages' output channels, deep to shallow (at least 3 stages).
        out_channels: classes including background.
        spatial_dims: 2 or 3.
    """

    def __init__(self, decoder_channels: Sequence[int], out_channels: int, spatial_dims: int = 2) -> None:
        coarse = list(decoder_channels[1:-1])[::-1][:MAX_AUX_OUTPUTS]  # finest first
        if not coarse:
            raise ValueError(
                f"deep_supervision needs a decoder of at least 3 stages (a UNet of at least 4 levels in "
                f"features), got {len(decoder_channels)}: add a level or turn deep_supervision off"
            )
        super().__init__(CONV[spatial_dims](c, out_channels, kernel_size=1) for c in coarse)

    def forward(
        self, decoder: UNetDecoder, head: nn.Module, features: Sequence[Tensor], out_size: Sequence[int]
    ) -> list[Tensor]:
        """Logits at full resolution through ``head``, then at each coarser stage, finest first:
        [(B, K, *out_size), (B, K, *size_1), ...], size_i the i-th stage's size above full resolution."""
        *coarse, fine = decoder.outputs(features, out_size, len(self) + 1)
        return [head(fine), *(aux(x) for aux, x in zip(self, reversed(coarse), strict=True))]
