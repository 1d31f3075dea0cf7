"""``medseg plan``: the plan ``medseg fit`` would train with, printed as a table::

    medseg plan -c configs/default.yaml -c configs/model/unet3d.yaml -c configs/data/msd.yaml \
        --data.root /path/to/Task04_Hippocampus        # exactly what that fit plans
    medseg plan /path/to/Task04_Hippocampus           # ROOT: --data.root; no model: a 2D UNet
    medseg plan ROOT --data.plan.device gpu --data.plan.memory_gb 40   # for a large GPU

It takes ``medseg fit``'s arguments, parsed by fit's own parser, and plans through the same
function (``pipeline.cli.config_plan.plan_config``): the table is what that fit will use.
``pipeline.data.planning.rules`` lists the rules.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.cli.config_plan import coverage_2d, keyhole_advice, plan_config
from pipeline.data.cache.slicing import AXIS_NAMES
from pipeline.data.datamodule import SegmentationDataModule
from pipeline.data.planning.rules import Plan

DEFAULT_NET = "pipeline.models.UNet"  # planned for when the arguments name no network


def fit_arguments(args: Sequence[str]) -> list[str]:
    """``medseg fit`` arguments from ``medseg plan``'s: a leading ROOT is ``--data.root ROOT``, and
    without a config or a network, the network is ``pipeline.models.UNet`` with its defaults."""
    args = list(args)
    if args and not args[0].startswith("-"):
        args = ["--data.root", args[0], *args[1:]]
    named = any(a in ("-c", "--config") or a.startswith(("--config=", "--model.net")) for a in args)
    return ["fit", *([] if named else ["--model.net", DEFAULT_NET]), *args]


def planned_datamodule(args: Sequence[str]) -> tuple[SegmentationDataModule, Plan | None]:
    """The data module and plan of the fit that ``medseg plan``'s ``args`` describe."""
    from pipeline.cli.identity import fit_config

    return plan_config(fit_config(fit_arguments(args)))


def _x(values: Sequence[float], digits: int = 3) -> str:
    return " x ".join(f"{v:.{digits}g}" for v in values)


def plan_table(dm: SegmentationDataModule, plan: Plan) -> str:
    """The plan as a short table: the 2D and 3D networks side by side, the one that trains marked."""
    split, fp = dm.split, plan.fingerprint
    classes = ", ".join(
        f"{name} in {c['cases_with']}/{fp['cases']} cases ({100 * c['median_share']:.2g}% of voxels)"
        for name, c in list(fp["classes"].items())[1:]
    )
    nets = (plan.net_2d, plan.net_3d)
    covered = (coverage_2d(plan), plan.coverage_3d)
    rows = [
        ("patch", *(_x(n.patch) for n in nets)),
        ("batch", *(str(n.batch) for n in nets)),
        ("poolings per axis", *(", ".join(map(str, n.pools)) for n in nets)),
        ("first-level kernel", *(_x(n.kernel_sizes[0]) for n in nets)),
        ("memory (estimate)", *(f"{n.memory_gb:.2f} GB" for n in nets)),
        (
            "median case held",
            *(
                f"{100 * c:.3g}%" + (" (keyhole)" if i and plan.keyhole else "")
                for i, c in enumerate(covered)
            ),
        ),
    ]
    modalities: Sequence[str | None] = dm.modalities or [None] * dm.in_channels
    norms = "; ".join(
        f"{m or 'channel ' + str(c)}: {n['mode']}"
        + (
            f" clip [{n['window'][0]:.4g}, {n['window'][1]:.4g}], mean {n['mean']:.4g}, std {n['std']:.4g}"
            if n.get("window")
            else ""
        )
        for c, (m, n) in enumerate(zip(modalities, plan.normalization, strict=True))
    )
    budget = plan.settings
    device = "cpu" if budget.for_cpu() else "gpu"
    headers = [f"{d}D network" + (" (trains)" if d == plan.spatial_dims else "") for d in (2, 3)]
    lines = [
        f"plan for {dm.root} ({dm.info.layout}; {len(split['train'])} training, {len(split['val'])} validation, "
        f"{len(split['test'])} test cases; the plan uses the training cases only)",
        f"  spacing (mm)     min {_x(fp['spacing_mm']['min'])}, median {_x(fp['spacing_mm']['median'])}, "
        f"max {_x(fp['spacing_mm']['max'])}",
        f"  classes          {classes}",
        f"  target spacing   {_x(plan.target_spacing, 4)} mm",
        f"  slice axis       {plan.slice_axis} ({AXIS_NAMES[plan.slice_axis]})",
        f"  median shape     {_x(plan.median_shape)} voxels at the target spacing",
        f"  {'':<21}{headers[0]:<22}{headers[1]}",
        *(f"  {name:<21}{two:<22}{three}" for name, two, three in rows),
        *keyhole_lines(plan),
        f"  normalisation    {norms}",
        f"  budget           {device}: {budget.memory_gb:g} GB of activations"
        + (f", {budget.cpu_step_voxels} voxels per step" if device == "cpu" else ""),
    ]
    return "\n".join(lines)


def keyhole_lines(plan: Plan) -> list[str]:
    """The table's keyhole warning, wrapped, or nothing."""
    if not plan.keyhole:
        return []
    words, lines, line = keyhole_advice(plan).split(), [], ""
    for word in words:
        if line and len(line) + len(word) > 76:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    return [f"  {'keyhole' if i == 0 else '':<17}{text}" for i, text in enumerate([*lines, line])]


def plan_command(args: Sequence[str]) -> None:
    """``medseg plan [ROOT] [medseg fit arguments]``."""
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    dm, plan = planned_datamodule(args)
    if plan is None:
        print(f"{dm.root}: 2D images, nothing to plan (they train at their own size)")
        return
    print(plan_table(dm, plan))
    print(f"wrote {dm.cache_dir / 'plan.json'}")
