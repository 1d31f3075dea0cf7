"""The plan filled into a parsed ``medseg fit`` config, before anything is built.

``plan_config`` builds the data module the config describes, plans its volumes for the network
the config names (``SegmentationDataModule.resolve_plan``: the one planning function) and writes
the planned values into the config, so the run's ``config.yaml`` records what it used; the
returned plan is handed to the data module ``medseg`` then builds (``adopt_plan``), which does not
plan again.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from typing import TypeVar

from jsonargparse import Namespace

from pipeline.data.datamodule import SegmentationDataModule
from pipeline.data.planning.planner import NetworkRequest
from pipeline.data.planning.rules import DEFAULT_FEATURES, Plan, coverage
from pipeline.models import Network, spatial_dims_of

log = logging.getLogger(__name__)
POOLING = ("strides", "kernel_sizes")  # what a medseg network takes from the plan
T = TypeVar("T")


def import_class(class_path: str) -> type:
    """The class a config's ``class_path`` names."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def from_namespace(cls: type[T], namespace: Namespace) -> T:
    """``cls`` built from a config section; dataclass arguments given as mappings become dataclasses
    (lists as tuples, as their fields are typed)."""
    kwargs = namespace.as_dict()
    for name, parameter in inspect.signature(cls).parameters.items():
        default = parameter.default
        if (
            dataclasses.is_dataclass(default)
            and not isinstance(default, type)
            and isinstance(kwargs.get(name), dict)
        ):
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs[name].items()}
            kwargs[name] = type(default)(**fields)
    return cls(**kwargs)


def network_request(net_class: type, init_args: dict) -> NetworkRequest:
    """What the plan needs of the configured network: its dimensions, level widths and the
    strides and kernel sizes it sets itself. A network of another library is planned for with
    the default widths, its pooling its own (recorded as 2 on every axis at every level)."""
    dims = spatial_dims_of(net_class, init_args)
    if not issubclass(net_class, Network):
        return NetworkRequest(dims, DEFAULT_FEATURES, ((2,) * dims,) * (len(DEFAULT_FEATURES) - 1))
    fixed = {key: init_args.get(key) for key in POOLING}
    return NetworkRequest(dims, tuple(net_class.level_widths(init_args)), *fixed.values())


def coverage_2d(plan: Plan) -> float:
    """The share of a median slice the 2D patch holds."""
    return coverage(plan.net_2d.patch, [n for a, n in enumerate(plan.median_shape) if a != plan.slice_axis])


def keyhole_advice(plan: Plan) -> str:
    """What to train instead of a 3D network that sees the median case through a keyhole (rule 6)."""
    advice = (
        f"the 3D patch holds {100 * plan.coverage_3d:.3g}% of the median case (under a quarter): train the "
        f"2D network (configs/model/unet.yaml; its patch holds {100 * coverage_2d(plan):.3g}% of a median slice)"
    )
    low = plan.lowres_3d
    if low is None:
        return advice
    return advice + (
        f", or 3D at low resolution: --data.target_spacing {' '.join(f'{s:.4g}' for s in low.target_spacing)} "
        f"(patch {' x '.join(map(str, low.net.patch))}, batch {low.net.batch}, {100 * low.coverage:.3g}% of the median case "
        f"of {' x '.join(f'{n:.3g}' for n in low.median_shape)} voxels)"
    )


def plan_config(config: Namespace) -> tuple[SegmentationDataModule, Plan | None]:
    """Plan the volumes of a parsed fit config for its network and fill what the config leaves
    unset (target spacing, slice axis, patch, batch; a medseg network's strides and kernel sizes).

    Returns:
        The data module the config describes (planned) and its plan; None for 2D image data,
        which is left as it is.
    """
    net = config.model.net
    init = net.get("init_args") or Namespace()
    net_class = import_class(net.class_path)
    datamodule = from_namespace(SegmentationDataModule, config.data)
    plan = datamodule.resolve_plan(network_request(net_class, init.as_dict()))
    if plan is None:
        return datamodule, None
    network = plan.network()
    config.data.target_spacing = list(plan.target_spacing)
    config.data.slice_axis = plan.slice_axis
    config.data.patch_size = list(network.patch)
    config.data.batch_size = network.batch
    if issubclass(net_class, Network):
        accepted = inspect.signature(net_class).parameters
        for key in POOLING:  # per-axis pooling for anisotropic volumes
            if key in accepted and init.get(key) is None:
                init[key] = [list(value) for value in getattr(network, key)]
        net.init_args = init
    log.info("planned: spacing %s mm, patch %s, batch %s", plan.target_spacing, network.patch, network.batch)
    if plan.spatial_dims == 3 and plan.keyhole:
        log.warning("warning: %s", keyhole_advice(plan))
    return datamodule, plan
