"""``medseg plan ROOT``: the plan of a volume data set, printed as a table and written to the cache.

    medseg plan /path/to/Task04_Hippocampus               # the split and budgets fit would use
    medseg plan ROOT --device gpu --memory-gb 40          # what a large GPU would train with

The plan comes from the training cases of the split that ``medseg fit`` makes with the same
settings (seeded fractions, folds or a split file): ``pipeline.data.planning.rules`` lists its rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import logging
from collections.abc import Sequence

from jsonargparse import Namespace

from pipeline.data.cache.slicing import AXIS_NAMES
from pipeline.data.reading.layouts import LAYOUTS

log = logging.getLogger(__name__)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The data set, split and budget options shared by ``medseg plan`` and ``medseg data prepare``."""
    add = parser.add_argument
    add("root", help="data set folder (MSD, nnU-Net raw, or images/ + masks/ of volumes)")
    add("--layout", choices=LAYOUTS, default="auto", help="layout (default: auto-detect)")
    add("--cache", default=None, help="cache folder (default: <root>/.medseg-cache)")
    add("--val-fraction", type=float, default=0.2, help="validation fraction (default: %(default)s)")
    add("--test-fraction", type=float, default=0.0, help="test fraction (default: %(default)s)")
    add("--num-folds", type=int, default=0, help="k folds (> 1: cross-validation; default: none)")
    add("--fold", type=int, default=0, help="the validation fold (default: %(default)s)")
    add("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    add("--split-file", default=None, help="a split.json instead of a seeded split")
    add(
        "--slice-axis",
        choices=("auto", "0", "1", "2"),
        default="auto",
        help="0, 1, 2 or auto (planned; default)",
    )
    add("--target-spacing", type=float, nargs=3, default=None, help="X Y Z mm (default: planned)")
    add("--device", choices=("auto", "cpu", "gpu"), default="auto", help="size batches for (default: auto)")
    add("--memory-gb", type=float, default=8.0, help="activation memory per step (default: %(default)s)")
    add("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="network widths per level")


def planned_datamodule(opts: argparse.Namespace) -> object:
    """The data module ``medseg fit`` would build with these options, its plan resolved."""
    from pipeline.data.datamodule import SegmentationDataModule
    from pipeline.data.planning.rules import PlanSettings

    axis = opts.slice_axis if opts.slice_axis == "auto" else int(opts.slice_axis)
    dm = SegmentationDataModule(
        root=opts.root, layout=opts.layout, cache_dir=opts.cache, val_fraction=opts.val_fraction,
        test_fraction=opts.test_fraction, num_folds=opts.num_folds, fold=opts.fold, seed=opts.seed,
        split_file=opts.split_file, slice_axis=axis, target_spacing=opts.target_spacing,
        plan=PlanSettings(memory_gb=opts.memory_gb, device=opts.device), num_workers=0,
    )  # fmt: skip
    dm.resolve_plan(opts.features)
    return dm


def _x(values: Sequence[float], digits: int = 3) -> str:
    return " x ".join(f"{v:.{digits}g}" for v in values)


def plan_table(dm: object) -> str:
    """The plan of a data module as a short table (the 2D and 3D networks side by side)."""
    plan, split = dm.plan, dm.split
    fp = plan.fingerprint
    classes = ", ".join(
        f"{name} in {c['cases_with']}/{fp['cases']} cases ({100 * c['median_share']:.2g}% of voxels)"
        for name, c in list(fp["classes"].items())[1:]
    )
    rows = [
        ("patch", *(_x(n.patch) for n in (plan.net_2d, plan.net_3d))),
        ("batch", str(plan.net_2d.batch), str(plan.net_3d.batch)),
        ("poolings per axis", *(", ".join(map(str, n.pools)) for n in (plan.net_2d, plan.net_3d))),
        ("first-level kernel", *(_x(n.kernel_sizes[0]) for n in (plan.net_2d, plan.net_3d))),
        ("memory (estimate)", *(f"{n.memory_gb:.2f} GB" for n in (plan.net_2d, plan.net_3d))),
    ]
    norms = "; ".join(
        f"{m or 'channel ' + str(c)}: {n['mode']}"
        + (
            f" clip [{n['window'][0]:.4g}, {n['window'][1]:.4g}], mean {n['mean']:.4g}, std {n['std']:.4g}"
            if n.get("window")
            else ""
        )
        for c, (m, n) in enumerate(
            zip(dm.modalities or [None] * dm.in_channels, plan.normalization, strict=True)
        )
    )
    budget = plan.settings
    device = "cpu" if budget.for_cpu() else "gpu"
    lines = [
        f"plan for {dm.root} ({dm.info.layout}; {len(split['train'])} training, {len(split['val'])} validation, "
        f"{len(split['test'])} test cases; the plan uses the training cases only)",
        f"  spacing (mm)     min {_x(fp['spacing_mm']['min'])}, median {_x(fp['spacing_mm']['median'])}, "
        f"max {_x(fp['spacing_mm']['max'])}",
        f"  classes          {classes}",
        f"  target spacing   {_x(plan.target_spacing, 4)} mm",
        f"  slice axis       {plan.slice_axis} ({AXIS_NAMES[plan.slice_axis]})",
        f"  median shape     {_x(plan.median_shape)} voxels at the target spacing",
        f"  {'':<21}{'2D network':<22}3D network",
        *(f"  {name:<21}{two:<22}{three}" for name, two, three in rows),
        f"  normalisation    {norms}",
        f"  budget           {device}: {budget.memory_gb:g} GB of activations"
        + (f", {budget.cpu_step_voxels} voxels per step" if device == "cpu" else ""),
    ]
    return "\n".join(lines)


def import_class(class_path: str) -> type:
    """The class a config's ``class_path`` names."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def from_namespace(cls: type, namespace: Namespace) -> object:
    """``cls`` built from a config section; dataclass arguments given as mappings become dataclasses
    (lists as tuples, as their fields are typed)."""
    kwargs = namespace.as_dict()
    for name, parameter in inspect.signature(cls).parameters.items():
        default = parameter.default
        if dataclasses.is_dataclass(default) and isinstance(kwargs.get(name), dict):
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs[name].items()}
            kwargs[name] = type(default)(**fields)
    return cls(**kwargs)


def plan_config(config: Namespace) -> None:
    """Plan volume data from its training cases before anything is built (``medseg fit``,
    ``validate``, ``test``): the settings the config leaves unset (target spacing, slice axis, patch,
    batch, and a medseg network's strides and kernel sizes) are filled into ``config``, so the run's
    ``config.yaml`` records the values it used. 2D image data is left as it is."""
    from pipeline.data.datamodule import SegmentationDataModule
    from pipeline.data.planning.rules import DEFAULT_FEATURES
    from pipeline.models import Network

    net = config.model.net
    init = net.get("init_args") or Namespace()
    config.data.spatial_dims = int(init.get("spatial_dims") or 2)
    net_class = import_class(net.class_path)
    ours = issubclass(net_class, Network)
    widths = net_class.level_widths(init.as_dict()) if ours else DEFAULT_FEATURES
    datamodule = from_namespace(SegmentationDataModule, config.data)
    plan = datamodule.resolve_plan(widths)
    if plan is None:
        return
    config.data.target_spacing = list(datamodule.target_spacing)
    config.data.slice_axis = datamodule.slice_axis
    config.data.patch_size = config.model.patch_size = list(datamodule.patch_size)
    config.data.batch_size = datamodule.batch_size
    planned = plan.network(config.data.spatial_dims)
    accepted = inspect.signature(net_class).parameters if ours else {}
    for key in ("strides", "kernel_sizes"):  # per-axis pooling for anisotropic volumes
        if key in accepted and init.get(key) is None:
            init[key] = [list(value) for value in getattr(planned, key)]
    net.init_args = init
    log.info(
        "planned: spacing %s mm, patch %s, batch %s",
        plan.target_spacing,
        datamodule.patch_size,
        datamodule.batch_size,
    )


def plan_command(args: Sequence[str]) -> None:
    """``medseg plan ROOT [options]``."""
    parser = argparse.ArgumentParser(
        prog="medseg plan", description="Plan a volume data set from its training cases (nnU-Net's rules)."
    )
    add_plan_arguments(parser)
    dm = planned_datamodule(parser.parse_args(args))
    if dm.plan is None:
        print(f"{dm.root}: 2D images, nothing to plan (they train at their own size)")
        return
    print(plan_table(dm))
    print(f"wrote {dm.cache_dir / 'plan.json'}")
