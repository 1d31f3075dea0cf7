"""UNet on a torchvision ResNet encoder, for transfer learning, with the decoder every UNet shares.

The encoder is torchvision's ResNet without its pooling and classifier; its five feature maps
(strides 2 to 32) feed ``UNetDecoder``: four stages that rejoin the encoder features (long skips,
switchable) and one more to full resolution without a skip. Encoder weights come from ImageNet
(torchvision's weights API), from a local torchvision state dict, or from a random init.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from pipeline.errors import DataError
from pipeline.models.base import ACT, BLOCK, INIT, NORM, SKIPS, Knob, Network
from pipeline.models.blocks import check_names, init_weights
from pipeline.models.decoder import UNetDecoder

log = logging.getLogger(__name__)

# builder, ImageNet weights (torchvision's best published for each), channel expansion of a block
ENCODERS: dict[str, tuple[Callable[..., tvm.ResNet], tvm.WeightsEnum, int]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, 1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, 4),
}
WEIGHTS_OPTION = "--model.net.init_args.encoder_weights"


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``; parameter names match torchvision's.

    Shapes: (B, in_channels, H, W) -> five features, shallow to deep, at strides 2, 4, 8, 16, 32
    (spatial size ceil(H / stride)), with ``out_channels`` channels each.
    """

    def __init__(self, name: str, in_channels: int = 3) -> None:
        super().__init__()
        builder, _, expansion = ENCODERS[name]
        resnet = builder(weights=None)
        self.name = name
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1,
            resnet.layer2,
            resnet.layer3,
            resnet.layer4,
        )
        self.out_channels = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
        if in_channels != 3:
            # A fresh first conv for the channel count, initialised as torchvision initialises convs.
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def load_rgb_state(self, state: dict[str, Tensor], source: str | os.PathLike) -> None:
        """Load a torchvision ResNet state dict made for RGB input; ``fc.*`` is ignored.

        For C != 3 input channels each channel of the first conv gets the RGB kernels summed and
        divided by C, so one gray channel (or C copies of it) gives the response the pretrained
        net gives to an RGB image with that value in every channel.

        Raises:
            DataError: naming ``source`` when keys or shapes do not match this ResNet.
        """
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        channels = self.conv1.in_channels
        rgb = state.get("conv1.weight")
        if channels != 3 and rgb is not None and rgb.ndim == 4 and rgb.shape[1] == 3:
            state["conv1.weight"] = rgb.sum(1, keepdim=True).repeat(1, channels, 1, 1) / channels
        own = self.state_dict()
        problems = {
            "missing": sorted(own.keys() - state.keys()),
            "unexpected": sorted(state.keys() - own.keys()),
            "wrong shape": [
                f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
                for k, v in own.items()
                if k in state and state[k].shape != v.shape
            ],
        }
        if any(problems.values()):
            details = "; ".join(
                f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in problems.items()
                if keys
            )
            raise DataError(source, f"not a torchvision {self.name} state dict ({details})")
        self.load_state_dict(state)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, C, H, W) -> [(B, out_channels[i], ceil(H / 2**(i+1)), ceil(W / 2**(i+1))) for i in 0..4]."""
        x = self.relu(self.bn1(self.conv1(x)))
        features = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


def read_state_dict(path: str | os.PathLike, encoder_name: str) -> dict[str, Tensor]:
    """Read a state dict saved with ``torch.save(model.state_dict(), path)``, tensors only.

    Raises:
        DataError: naming ``path`` when it is missing, unreadable or not a state dict.
    """
    hint = f"save one with torch.save(torchvision.models.{encoder_name}(weights=...).state_dict(), '{path}')"
    if not Path(path).is_file():
        raise DataError(path, f"encoder weights file not found; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a bad file (pickle, zip, EOF, ...)
        problem = f"not a file written by torch.save ({type(err).__name__}: {err})"
        raise DataError(path, f"cannot read encoder weights: {problem}; {hint}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(path, f"not a state dict of tensors ({type(state).__name__}); {hint}")
    return state


def imagenet_state_dict(name: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for encoder ``name`` (downloaded once into the torch hub cache).

    Raises:
        DataError: when they cannot be downloaded; the message says how to use a local file.
    """
    weights = ENCODERS[name][1]
    try:
        # weights_only: torch.hub defaults to full unpickling, and the cached file could be replaced
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except OSError as err:  # URLError, HTTPError and socket errors are all OSErrors
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise DataError(
            weights.url,
            f"could not download the ImageNet weights of {name} ({err}). Offline, fetch that file on a "
            f"machine with network and either copy it to {cache} or pass its path with "
            f"{WEIGHTS_OPTION} /path/to/{cache.name}",
        ) from None


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

    Example:
        >>> net = ResNetUNet(in_channels=1, out_channels=4, encoder_name="resnet18")
        >>> net(torch.zeros(2, 1, 97, 120)).shape
        torch.Size([2, 4, 97, 120])
    """

    ARCH = "resnet_unet"
    KNOBS = (
        Knob("encoder", lambda net: net.init_args["encoder_name"]),
        Knob("weights", lambda net: net.weights_kind, lambda v: None if v == "none" else v),
        Knob("freeze", lambda net: net.init_args["freeze_encoder_epochs"], lambda v: f"freeze{v}" if v else None),
        SKIPS, BLOCK, ACT, INIT, NORM,
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
    ) -> None:
        super().__init__()
        self.record_init_args(locals())
        # A checkpoint already holds the trained weights: rebuilding it must not fetch them again.
        self.init_args["encoder_weights"] = None
        check_names(norm, act, init, block)
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

        self.encoder = ResNetEncoder(encoder_name, in_channels)
        self.decoder = UNetDecoder(
            self.encoder.out_channels,
            decoder_channels,
            use_skips,
            block=block,
            norm=norm,
            act=act,
            dropout=dropout,
        )
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, kernel_size=1)
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
        init_weights(self.decoder, init, act)
        init_weights(self.head, init, act)

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

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> logits (B, out_channels, H, W)."""
        return self.head(self.decoder(self.encoder(x), tuple(x.shape[-2:])))
