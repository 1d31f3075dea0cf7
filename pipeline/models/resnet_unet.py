"""UNet on a torchvision ResNet encoder, for transfer learning, with the decoder every UNet shares.

The encoder is torchvision's ResNet without its pooling and classifier; its five feature maps
(strides 2 to 32) feed ``UNetDecoder``: four stages that rejoin the encoder features (long skips,
switchable) and one more to full resolution without a skip. Encoder weights come from ImageNet
(torchvision's weights API), from a local torchvision state dict, or from a random init. In 3D
(``spatial_dims=3``) the ResNet's layers become their 3D kinds and 2D weights are inflated (I3D).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from pipeline.errors import DataError
from pipeline.models.base import ACT, BLOCK, DIMS, INIT, NORM, SKIPS, Knob, Network
from pipeline.models.blocks import check_names, init_weights
from pipeline.models.decoder import UNetDecoder
from pipeline.models.nd import BATCH_NORM, CONV, MAX_POOL, check_input, check_spatial_dims, per_level

log = logging.getLogger(__name__)

# builder, ImageNet weights (torchvision's best published for each), channel expansion of a block
ENCODERS: dict[str, tuple[Callable[..., tvm.ResNet], tvm.WeightsEnum, int]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 1),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, 1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, 4),
}
WEIGHTS_OPTION = "--model.net.init_args.encoder_weights"


def inflate_to_3d(module: nn.Module) -> None:
    """Replace, in place, every Conv2d, BatchNorm2d and MaxPool2d under ``module`` with its 3D kind.

    The replacements keep their module's name (so state-dict keys stay as they were) and its
    settings, the depth axis taking the first in-plane value: a k x k kernel becomes k x k x k, a
    stride or padding (s, s) becomes (s, s, s). New convs are initialised as torchvision
    initialises a ResNet (He normal, fan-out); new batch norms start as the identity.
    """
    for name, child in module.named_children():
        if isinstance(child, CONV[2]):
            new = CONV[3](
                child.in_channels,
                child.out_channels,
                _with_depth(child.kernel_size),
                stride=_with_depth(child.stride),
                padding=_with_depth(child.padding),
                dilation=_with_depth(child.dilation),
                groups=child.groups,
                bias=child.bias is not None,
            )
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(child, BATCH_NORM[2]):
            new = BATCH_NORM[3](
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
        elif isinstance(child, MAX_POOL[2]):
            new = MAX_POOL[3](
                child.kernel_size, child.stride, child.padding, child.dilation, ceil_mode=child.ceil_mode
            )
        else:
            inflate_to_3d(child)
            continue
        setattr(module, name, new)


def _with_depth(value: int | tuple[int, ...]) -> int | tuple[int, ...]:
    """A 2D layer setting for 3D: an int stays (it applies to every axis), (a, b) -> (a, a, b)."""
    return value if isinstance(value, int) else (value[0], *value)


def inflate_state(state: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """2D conv kernels of ``state`` inflated to the 3D kernels of ``own`` (I3D, Carreira & Zisserman 2017).

    A kernel (O, I, k, k) where ``own`` holds (O, I, kd, k, k) is repeated kd times along depth and
    divided by kd, so a volume of identical slices gets, away from its depth borders, the response
    the 2D kernel gives to one slice. Everything else (batch norm, 3D kernels) is returned as it is.
    """
    inflated = dict(state)
    for key, value in state.items():
        target = own.get(key)
        if (
            target is not None
            and (value.ndim, target.ndim) == (4, 5)
            and (target.shape[:2], target.shape[3:]) == (value.shape[:2], value.shape[2:])
        ):
            depth = target.shape[2]
            inflated[key] = value.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    return inflated


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``; parameter names match torchvision's.

    Shapes: (B, in_channels, *spatial) -> five features, shallow to deep, after the downsampling
    steps stem conv, max pool, layer2, layer3 and layer4 (each axis ceil(size / stride) per step;
    strides 2, 4, 8, 16, 32 by default), with ``out_channels`` channels each. ``spatial_dims=3``
    turns torchvision's ResNet into a 3D one (``inflate_to_3d``), module names unchanged.
    """

    def __init__(
        self,
        name: str,
        in_channels: int = 3,
        spatial_dims: int = 2,
        strides: Sequence[int | Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        builder, _, expansion = ENCODERS[name]
        strides = resnet_strides(strides, spatial_dims)
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
        if spatial_dims == 3:
            inflate_to_3d(self)
        self.conv1.stride = strides[0]
        self.maxpool.stride = strides[1]
        for layer, stride in zip((self.layer2, self.layer3, self.layer4), strides[2:], strict=True):
            for m in layer[0].modules():  # the strided conv of the first block and its shortcut
                if isinstance(m, CONV.kinds) and max(m.stride) > 1:
                    m.stride = stride

    def load_rgb_state(self, state: dict[str, Tensor], source: str | os.PathLike) -> None:
        """Load a torchvision ResNet state dict made for RGB input; ``fc.*`` is ignored.

        For C != 3 input channels each channel of the first conv gets the RGB kernels summed and
        divided by C, so one gray channel (or C copies of it) gives the response the pretrained
        net gives to an RGB image with that value in every channel. A 3D encoder takes a 2D state
        dict inflated (``inflate_state``) or a 3D one (5-D conv weights) as it is.

        Raises:
            DataError: naming ``source`` when keys or shapes do not match this ResNet.
        """
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        channels = self.conv1.in_channels
        rgb = state.get("conv1.weight")
        if channels != 3 and rgb is not None and rgb.ndim in (4, 5) and rgb.shape[1] == 3:
            repeats = (1, channels, *[1] * (rgb.ndim - 2))
            state["conv1.weight"] = rgb.sum(1, keepdim=True).repeat(*repeats) / channels
        own = self.state_dict()
        state = inflate_state(state, own)
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
        """(B, C, H, W) -> [(B, out_channels[i], ceil(H / 2**(i+1)), ceil(W / 2**(i+1))) for i in 0..4]
        with the default strides; a 3D encoder takes (B, C, D, H, W) likewise."""
        x = self.relu(self.bn1(self.conv1(x)))
        features = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


def resnet_strides(strides: Sequence[int | Sequence[int]] | None, spatial_dims: int) -> list[tuple[int, ...]]:
    """The five downsampling strides of a ResNet encoder (stem conv, max pool, layer2, layer3,
    layer4) as per-axis tuples; None: 2 on every axis.

    Raises:
        ValueError: unless there are five entries, each 1 or 2 (an int or one per axis).
    """
    check_spatial_dims(spatial_dims)
    steps = per_level(
        strides, 5, spatial_dims, "strides", default=2, entries="stem conv, max pool, layer2, layer3, layer4"
    )
    for i, step in enumerate(steps):
        if any(s > 2 for s in step):
            raise ValueError(
                f"strides[{i}] of a ResNet encoder must be 1 or 2 on every axis (torchvision's kernels "
                f"and padding are made for stride 2), got {strides[i]!r}"  # type: ignore[index]
            )
    return steps


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
        spatial_dims: 2 (input (B, C, H, W)) or 3 (input (B, C, D, H, W)): the ResNet's convs,
            batch norms and max pool become 3D (k x k kernels k x k x k) under torchvision's
            module names, and 2D weights (``"imagenet"`` or a 2D state dict file) are inflated
            (``inflate_state``); a file of 3D weights loads as it is.
        strides: the five downsampling steps (stem conv, max pool, layer2, layer3, layer4),
            each 1 or 2, an int or one per axis, e.g. (1, 2, 2) to keep the depth of a thin
            volume; the decoder upsamples by the same steps. None: 2 on every axis.

    Example:
        >>> net = ResNetUNet(in_channels=1, out_channels=4, encoder_name="resnet18")
        >>> net(torch.zeros(2, 1, 97, 120)).shape
        torch.Size([2, 4, 97, 120])
    """

    ARCH = "resnet_unet"
    KNOBS = (
        DIMS,
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
        spatial_dims: int = 2,
        strides: Sequence[int | Sequence[int]] | None = None,
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
        init_weights(self.decoder, init, act)
        init_weights(self.head, init, act)

    @classmethod
    def level_widths(cls, init_args: Mapping[str, object]) -> list[int]:
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

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, *spatial) -> logits (B, out_channels, *spatial); spatial is (H, W) or (D, H, W)."""
        check_input(x, self.spatial_dims, type(self).__name__)
        return self.head(self.decoder(self.encoder(x), tuple(x.shape[2:])))
