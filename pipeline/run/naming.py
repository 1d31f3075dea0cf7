"""Run names and W&B tags, derived from the network's declared knobs (``pipeline.models.base``)."""

from __future__ import annotations

from torch import nn

from pipeline.models import Network, net_knobs


def variant_name(net: nn.Module) -> str:
    """Short name of a network variant, e.g. ``unet-noskip-residual-sigmoid-xavier-nonorm-d6``."""
    return net.variant_name() if isinstance(net, Network) else str(net_knobs(net)["arch"])


def knob_tags(knobs: dict) -> list[str]:
    """W&B tags for a variant: ``skips:false``, ``act:sigmoid``, ..."""
    return [f"{k}:{str(v).lower()}" for k, v in knobs.items()]
