"""Segmentation networks: plain ``nn.Module``s handed to ``SegmentationModule``.

A checkpoint stores its network as ``{"class_path", "init_args"}`` in plain types and rebuilds it
with ``build_net`` without unpickling code: medseg networks record their init args themselves
(``pipeline.models.base.Network``); a network from another library (``monai.networks.nets.*``)
given in the config has them recorded by ``medseg``'s config parser (``remember_spec``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from pipeline.models.base import Network
from pipeline.models.resnet_unet import ResNetUNet
from pipeline.models.unet import UNet

__all__ = [
    "Network",
    "ResNetUNet",
    "UNet",
    "build_net",
    "net_knobs",
    "net_spec",
    "network_dims",
    "remember_spec",
    "spatial_dims_of",
]

# Packages whose networks a checkpoint may name (building one imports and calls its class).
TRUSTED = ("pipeline.models", "monai.networks.nets")
SPEC = "medseg_spec"  # attribute holding a third-party network's recorded spec


def remember_spec(net: nn.Module, class_path: str, init_args: dict) -> nn.Module:
    """Record how a network from another library was built, so checkpoints can rebuild it."""
    object.__setattr__(net, SPEC, {"class_path": class_path, "init_args": dict(init_args)})
    return net


def net_spec(net: nn.Module) -> dict:
    """``{"class_path": ..., "init_args": {...}}`` of a medseg network or a recorded one."""
    if isinstance(net, Network):
        return {
            "class_path": f"{type(net).__module__}.{type(net).__qualname__}",
            "init_args": dict(net.init_args),
        }
    spec = getattr(net, SPEC, None)
    if spec is None:
        raise TypeError(
            f"{type(net).__name__} records no init args: give it in the config (model.net: class_path, "
            "init_args) or subclass pipeline.models.base.Network"
        )
    return spec


def net_knobs(net: nn.Module) -> dict[str, object]:
    """The variant's knobs; a network without declared knobs is known by its class name."""
    return net.knobs if isinstance(net, Network) else {"arch": type(net).__name__.lower()}


def spatial_dims_of(cls: type, init_args: Mapping[str, Any]) -> int:
    """The spatial dimensions (2 or 3) of the network ``cls(**init_args)`` would build: its
    ``spatial_dims`` argument, given or defaulted (MONAI's networks default to 3); 2 without one."""
    if init_args.get("spatial_dims") is not None:
        return int(init_args["spatial_dims"])
    parameter = inspect.signature(cls).parameters.get("spatial_dims")
    if parameter is not None and parameter.default is not inspect.Parameter.empty:
        return int(parameter.default)
    return 2


def network_dims(net: nn.Module) -> int:
    """The spatial dimensions of a built network (``spatial_dims_of`` its recorded init args): the
    one source of a run's dimensionality."""
    init_args = net.init_args if isinstance(net, Network) else getattr(net, SPEC, {}).get("init_args", {})
    return spatial_dims_of(type(net), init_args)


def build_net(spec: dict) -> nn.Module:
    """Rebuild a network from ``net_spec`` output; only classes in ``TRUSTED`` packages are built."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    if not module_name.startswith(TRUSTED):
        raise ValueError(f"refusing to build {spec['class_path']!r}: not a network of {', '.join(TRUSTED)}")
    cls = getattr(importlib.import_module(module_name), class_name)
    net = cls(**spec["init_args"])
    return net if isinstance(net, Network) else remember_spec(net, spec["class_path"], spec["init_args"])
