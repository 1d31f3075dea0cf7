"""The ResNet encoder of ``ResNetUNet``: torchvision's ResNet without pooling and classifier,
2D or 3D (every layer replaced by its 3D kind under the same name), and its weights: ImageNet
(torchvision's weights API), a local torchvision state dict, or a 3D state dict; 2D weights
are inflated to 3D as in I3D (Carreira & Zisserman 2017).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import overload

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from pipeline.errors import DataError
from pipeline.models.nd import check_spatial_dims, per_level

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
        new: nn.Module
        if isinstance(child, nn.Conv2d):
            new = nn.Conv3d(
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
        elif isinstance(child, nn.BatchNorm2d):
            new = nn.BatchNorm3d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
        elif isinstance(child, nn.MaxPool2d):
            new = nn.MaxPool3d(
                child.kernel_size, child.stride, child.padding, child.dilation, ceil_mode=child.ceil_mode
            )
        else:
            inflate_to_3d(child)
            continue
        setattr(module, name, new)


@overload
def _with_depth(value: str) -> str: ...
@overload
def _with_depth(value: int | tuple[int, ...]) -> int | tuple[int, int, int]: ...
def _with_depth(value: str | int | tuple[int, ...]) -> str | int | tuple[int, int, int]:
    """A 2D layer setting for 3D: an int or a padding mode stays (it applies to every axis),
    (a, b) -> (a, a, b)."""
    return value if isinstance(value, (int, str)) else (value[0], value[0], value[1])


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
                if isinstance(m, (nn.Conv2d, nn.Conv3d)) and max(m.stride) > 1:
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
