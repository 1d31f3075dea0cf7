"""Segmentation networks: plain ``nn.Module``s handed to ``SegmentationModule``.

Every network records its constructor arguments in ``init_args`` (plain types), so a checkpoint
can rebuild it with ``build_net(net_spec(net))`` without unpickling code.
"""

from __future__ import annotations

import importlib

from torch import nn

from pipeline.models.resnet_unet import ResNetUNet
from pipeline.models.unet import UNet

__all__ = ["ResNetUNet", "UNet", "build_net", "net_spec"]


def net_spec(net: nn.Module) -> dict:
    """``{"class_path": ..., "init_args": {...}}`` for a network defined in ``pipeline.models``."""
    init_args = getattr(net, "init_args", None)
    if init_args is None:
        raise TypeError(
            f"{type(net).__name__} records no init_args; only pipeline.models networks can be saved"
        )
    return {"class_path": f"{type(net).__module__}.{type(net).__qualname__}", "init_args": dict(init_args)}


def build_net(spec: dict) -> nn.Module:
    """Rebuild a network from ``net_spec`` output; only classes inside ``pipeline.models`` are allowed."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    if not module_name.startswith("pipeline.models"):
        raise ValueError(f"refusing to build {spec['class_path']!r}: not a pipeline.models network")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**spec["init_args"])
