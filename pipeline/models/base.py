"""What every medseg network shares: its constructor arguments, recorded, and its knobs, declared.

``Network.record_init_args(locals())`` keeps the constructor arguments as plain types, so a
checkpoint rebuilds the network with ``build_net(net_spec(net))`` and unpickles no code. A
network declares its knobs once, as ``Knob`` entries in ``KNOBS``; the run name
(``unet-noskip-sigmoid-default-nonorm-s0``), the W&B tags (``skips:false``), the ``variant.*``
config keys and ``medseg compare``'s columns all follow from them, so a new knob is one line.
A knob may label the architecture itself rather than follow it: ``dims`` names a 3D UNet
``unet3d-noskip-...`` and leaves 2D names as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn


def _plain(value: object) -> object:
    """Tuples as lists, recursively: what YAML, JSON and ``weights_only`` checkpoints hold."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Knob:
    """One setting that tells variants of a network apart.

    Attributes:
        name: the key of the tag (``act:sigmoid``), the ``variant.<name>`` config key and the column.
        read: the knob's value, from the network (default: the init argument called ``name``).
        label: the run-name part for a value, or None to leave it out of the name.
        arch: the label is appended to the architecture (``unet`` + ``3d``) instead of joining
            the name as a part of its own.
    """

    name: str
    read: Callable[[Network], object] | None = None
    label: Callable[[object], str | None] = str
    arch: bool = False

    def value(self, net: Network) -> object:
        return self.read(net) if self.read else net.init_args[self.name]


# The knobs of every UNet-family network, in run-name order.
DIMS = Knob(
    "dims", lambda net: net.init_args["spatial_dims"], lambda v: f"{v}d" if v != 2 else None, arch=True
)
SKIPS = Knob("skips", lambda net: net.init_args["use_skips"], lambda v: None if v else "noskip")
BLOCK = Knob("block", label=lambda v: "residual" if v == "residual" else None)
ACT = Knob("act")
INIT = Knob("init")
NORM = Knob(
    "norm",
    lambda net: net.init_args["norm"] or "none",
    lambda v: None if v == "batch" else f"{'no' if v == 'none' else v}norm",
)
# read with a default: a checkpoint from before the knob existed has no such init arg
DEEP_SUPERVISION = Knob(
    "deep_supervision", lambda net: bool(net.init_args.get("deep_supervision")), lambda v: "ds" if v else None
)


class Network(nn.Module):
    """Base of the medseg networks: ``ARCH`` and ``KNOBS`` declared, init args recorded."""

    ARCH: ClassVar[str] = "net"
    KNOBS: ClassVar[tuple[Knob, ...]] = ()
    init_args: dict[str, Any]  # plain values (YAML/JSON types), set by record_init_args

    @classmethod
    def level_widths(cls, init_args: Mapping[str, Any]) -> list[int]:
        """Feature channels at each resolution level, full resolution first, for these init args
        (what the data plan estimates memory from and how many levels it pools)."""
        return [int(w) for w in init_args["features"]]

    def record_init_args(self, arguments: Mapping[str, object]) -> None:
        """Keep the constructor's arguments (its ``locals()`` on entry) as plain types."""
        self.init_args = {k: _plain(v) for k, v in arguments.items() if k not in ("self", "__class__")}

    @property
    def knobs(self) -> dict[str, object]:
        """``{"arch": ..., knob name: value}`` in declaration order."""
        return {"arch": self.ARCH, **{knob.name: knob.value(self) for knob in self.KNOBS}}

    def variant_name(self) -> str:
        """The architecture and the labels of its knobs, e.g. ``unet-noskip-sigmoid-xavier-nonorm``
        or, with an architecture knob, ``unet3d-noskip-sigmoid-default-nonorm``."""
        arch, parts = self.ARCH, []
        for knob in self.KNOBS:
            label = knob.label(knob.value(self))
            if label and knob.arch:
                arch += label
            elif label:
                parts.append(label)
        return "-".join([arch, *parts])
