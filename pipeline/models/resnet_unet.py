"""UNet on a torchvision ResNet encoder, for transfer learning, with the decoder every UNet shares.

The encoder is torchvision's ResNet without its pooling and classifier; its five feature maps
(strides 2 to 32) feed ``UNetDecoder``: four stages that rejoin the encoder features (long skips,
switchable) and one more to full resolution without a skip. Encoder weights come from ImageNet
(torchvision's weights API), from a local torchvision state dict, or from a random init. In 3D
(``spatial_dims=3``) the ResNet's layers become their 3D kinds and 2D weights are inflated (I3D).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from pipeline.models.base import ACT, BLOCK, DEEP_SUPERVISION, DIMS, INIT, NORM, SKIPS, Knob, Network
from pipeline.models.blocks import check_names, init_weights
from pipeline.models.decoder import DeepSupervisionHeads, UNetDecoder
from pipeline.models.nd import CONV, check_input, check_spatial_dims
from pipeline.models.resnet_encoder import (
    ENCODERS,
    ResNetEncoder,
    imagenet_state_dict,
    read_state_dict,
    resnet_strides,
)

log = logging.getLogger(__name__)


class ResNetUNet(Network):
    """UNet with a torchvision ResNet encoder (optionally pretrained) and the shared UNet decoder.

    Args:
        in_channels: image channels; other than 3, the pretrained first conv is adapted (see
            ``ResNetEncoder.load_rgb_state``).
        out_channels: classes including background; the output is logits.
        encoder_name: ``resnet18``, ``resnet34`` or ``resnet50`` (torchvision's architectures).
        encoder_weights: ``None`` (random init), ``"imagenet"`` (torchvision's weights API; needs
            network or the torch hub cache) or a path to a torchvision ResNet state dict.
        freeze_encoder_epochs: keep the encoder fixed (no updates, batch-norm statistics frozen)
            for this many epochs, then train everything; driven by ``set_epoch``.
        use_skips: long encoder-to-decoder skips (False: the decoder gets no encoder features).
        decoder_channels: output channels of the five decoder stages, deep to shallow.
        block, norm, act, dropout: the decoder's blocks, as in ``UNet`` (the encoder keeps
            torchvision's batch norm and ReLU).
        init: ``kaiming``, ``xavier`` or ``default``, for the decoder and head, and for the
            encoder only when no pretrained weights are loaded (``default`` keeps torchvision's).
        spatial_dims: 2 (input (B, C, H, W)) or 3 (input (B, C, D, H, W)): the ResNet's convs,
            batch norms and max pool become 3D (k x k kernels k x k x k) under torchvision's
            module names, and 2D weights (``"imagenet"`` or a 2D state dict file) are inflated
            (``inflate_state``); a file of 3D weights loads as it is.
        strides: the five downsampling steps (stem conv, max pool, layer2, layer3, layer4),
            each 1 or 2, an int or one per axis, e.g. (1, 2, 2) to keep the depth of a thin
            volume; the decoder upsamples by the same steps. None: 2 on every axis.
        deep_supervision: as in ``UNet``: in training mode a list of logits, full resolution
            first, then 1x1 conv heads on the decoder stages at 1/2, 1/4 and 1/8 of the input
            (all but the deepest stage, at most three). Eval mode returns the one tensor.

    Example:
        >>> net = ResNetUNet(in_channels=1, out_channels=4, encoder_name="resnet18")
        >>> net(torch.zeros(2, 1, 97, 120)).shape
        torch.Size([2, 4, 97, 120])
    """

    ARCH = "resnet_unet"
    KNOBS = (
        DIMS,
        Knob("encoder", lambda net: net.init_args["encoder_name"]),
        Knob("weights", lambda net: net.weights_kind, lambda v: None if v == "none" else str(v)),
        Knob("freeze", lambda net: net.init_args["freeze_encoder_epochs"], lambda v: f"freeze{v}" if v else None),
        SKIPS, BLOCK, ACT, INIT, NORM, DEEP_SUPERVISION,
    )  # fmt: skip

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        freeze_encoder_epochs: int = 0,
        use_skips: bool = True,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        block: str = "plain",
        norm: str | None = "batch",
        act: str = "relu",
        init: str = "kaiming",
        dropout: float = 0.0,
        spatial_dims: int = 2,
        strides: Sequence[int | Sequence[int]] | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        self.record_init_args(locals())
        # A checkpoint already holds the trained weights: rebuilding it must not fetch them again.
        self.init_args["encoder_weights"] = None
        check_names(norm, act, init, block)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        steps = resnet_strides(strides, spatial_dims)
        if encoder_name not in ENCODERS:
            raise ValueError(f"unknown encoder_name {encoder_name!r}; valid: {', '.join(ENCODERS)}")
        if len(decoder_channels) != 5:
            raise ValueError(
                f"decoder_channels needs 5 stages (strides 16 to 1), got {list(decoder_channels)}"
            )
        if freeze_encoder_epochs < 0:
            raise ValueError(f"freeze_encoder_epochs must be >= 0, got {freeze_encoder_epochs}")
        self.weights_kind = (
            "none" if encoder_weights is None else "imagenet" if encoder_weights == "imagenet" else "file"
        )
        self.freeze_encoder_epochs = freeze_encoder_epochs
        self.encoder_frozen = False

        self.encoder = ResNetEncoder(encoder_name, in_channels, spatial_dims, steps)
        self.decoder = UNetDecoder(
            self.encoder.out_channels,
            decoder_channels,
            use_skips,
            block=block,
            norm=norm,
            act=act,
            dropout=dropout,
            strides=steps[::-1],
            spatial_dims=spatial_dims,
        )
        # before the head, so the head stays the last layer the monitors see (grad/first_last_ratio)
        self.aux_heads = (
            DeepSupervisionHeads(decoder_channels, out_channels, spatial_dims) if deep_supervision else None
        )
        self.head = CONV[spatial_dims](decoder_channels[-1], out_channels, kernel_size=1)
        if encoder_weights is None:
            init_weights(self.encoder, init, act)
        else:
            source = "imagenet" if encoder_weights == "imagenet" else encoder_weights
            state = (
                imagenet_state_dict(encoder_name)
                if source == "imagenet"
                else read_state_dict(source, encoder_name)
            )
            self.encoder.load_rgb_state(state, source)
            log.info("loaded %s encoder weights from %s", encoder_name, source)
        for part in (self.decoder, self.aux_heads, self.head):
            if part is not None:
                init_weights(part, init, act)

    @classmethod
    def level_widths(cls, init_args: Mapping[str, Any]) -> list[int]:
        """The last decoder stage's width at full resolution, then the encoder's five features."""
        expansion = ENCODERS[init_args.get("encoder_name", "resnet34")][2]
        decoder = init_args.get("decoder_channels") or (256, 128, 64, 32, 16)
        return [int(decoder[-1]), 64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]

    def set_epoch(self, epoch: int) -> None:
        """Freeze the encoder while ``epoch < freeze_encoder_epochs`` (0-based), unfreeze after.

        Frozen: its parameters stop requiring gradients (so the optimiser, weight decay included,
        skips them) and its batch norms stay in eval mode. Called at every training epoch start.
        """
        frozen = epoch < self.freeze_encoder_epochs
        if frozen != self.encoder_frozen:
            log.info("epoch %d: encoder %s", epoch, "frozen" if frozen else "unfrozen, training everything")
        self.encoder_frozen = frozen
        self.encoder.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNetUNet:
        """As ``nn.Module.train``, but a frozen encoder stays in eval mode (fixed batch-norm statistics)."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """(B, in_channels, *spatial) -> logits (B, out_channels, *spatial); spatial is (H, W) or
        (D, H, W). With ``deep_supervision`` in training mode: a list, as ``UNet``'s."""
        check_input(x, self.spatial_dims, type(self).__name__)
        features, size = self.encoder(x), tuple(x.shape[2:])
        if self.aux_heads is not None and self.training:
            return self.aux_heads(self.decoder, self.head, features, size)
        return self.head(self.decoder(features, size))
