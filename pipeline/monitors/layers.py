"""What the monitors call a layer: parameterised units of any network, named and ordered by depth.

A conv-norm-act unit (``pipeline.models.blocks.ConvNormAct``) is one layer named by the unit
(``encoder.enc1.conv1``); any other module holding parameters of its own is a layer named by its
qualified name (``head``, ``decoder.dec4.up``, or ``encoder.conv1`` and ``encoder.bn1`` in a
torchvision ResNet). Layers come in registration order, which for the networks here is the order
the data flows through them: encoder (shallow to deep), decoder (deep to shallow), head.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import nn

from pipeline.models.blocks import ConvNormAct

UNITS: tuple[type[nn.Module], ...] = (ConvNormAct,)
CONVS = (nn.modules.conv._ConvNd,)


@dataclass(frozen=True)
class Layer:
    """A named group of parameters; ``conv`` marks layers that hold a convolution."""

    name: str
    params: tuple[nn.Parameter, ...]
    conv: bool


def monitored_net(pl_module: pl.LightningModule) -> nn.Module:
    """The network the monitors watch: ``pl_module.net`` when there is one, else the module itself."""
    net = getattr(pl_module, "net", None)
    return net if isinstance(net, nn.Module) else pl_module


def unit_name(name: str, net: nn.Module) -> str:
    """The name of the conv-norm-act unit holding the submodule ``name`` of ``net``, else ``name``."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        if isinstance(net.get_submodule(parent), UNITS):
            return parent
    return name


def parameter_layers(net: nn.Module) -> list[Layer]:
    """The parameterised layers of ``net`` in registration order (see the module docstring).

    A parameter shared by several modules belongs to the first layer that holds it.
    """
    layers: list[Layer] = []
    seen: set[int] = set()
    skip_prefixes: list[str] = []
    for name, module in net.named_modules():
        if any(name.startswith(prefix) for prefix in skip_prefixes):
            continue
        if isinstance(module, UNITS):
            params = module.parameters()
            skip_prefixes.append(f"{name}.")
            conv = True
        else:
            params = module.parameters(recurse=False)
            conv = isinstance(module, CONVS)
        own = tuple(p for p in params if id(p) not in seen)
        seen.update(id(p) for p in own)
        if own:
            layers.append(Layer(name or type(net).__name__, own, conv))
    return layers


def layer_index(layers: list[Layer], device: torch.device) -> torch.Tensor:
    """(P,) int64: the layer of each parameter, parameters in ``layers`` order."""
    sizes = torch.tensor([len(layer.params) for layer in layers])
    return torch.repeat_interleave(torch.arange(len(layers)), sizes).to(device)


def grouped_norms(tensors: list[torch.Tensor], index: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Per-layer L2 norms of ``tensors`` (grouped by ``index``) and their global norm, on device.

    One fused ``torch._foreach_norm`` over all tensors (computed in float32 whatever their dtype),
    then a scatter-add of the squares: no host synchronisation.

    Returns:
        (num_layers + 1,) float32: the layer norms, then the global norm.
    """
    squares = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square()
    per_layer = torch.zeros(num_layers, device=squares.device).index_add_(0, index, squares)
    return torch.cat([per_layer, squares.sum()[None]]).sqrt()
