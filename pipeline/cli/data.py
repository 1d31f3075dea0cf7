"""``medseg data``: generate, validate and cache data sets::

medseg data synth [--output DIR] [--num-images N] [--size PX]      # the 2D phantom data set
medseg data synth --volumes [--layout msd|nnunet] [--output DIR]   # small synthetic NIfTI set
medseg data synth --volumes --real-size [--slices MIN MAX]         # 512x512 CT, 80-300 slices
medseg data check <root> [--layout ...]       # every problem, one line each; exit 1 if any
medseg data prepare [<root>] [medseg fit arguments]   # plan as fit would, then resample into the cache
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.data.reading.layouts import LAYOUTS
from pipeline.parallel import usable_cores

VOLUMES_OUTPUT = "data/synthetic_volumes"
CT_OUTPUT = "data/synthetic_ct"


def parser() -> argparse.ArgumentParser:
    """The ``medseg data`` parser: ``synth``, ``check`` and ``prepare``."""
    parser = argparse.ArgumentParser(prog="medseg data", description="Data set tools.")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="generate the procedural phantom data set (or --volumes)")
    synth.add_argument("--output", default=None, help="output folder (default: data/synthetic)")
    synth.add_argument(
        "--num-images", type=int, default=None, help="number of images (default: 240; volumes 6; CT 3)"
    )
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    synth.add_argument(
        "--volumes", action="store_true", help=f"write NIfTI volumes (default output {VOLUMES_OUTPUT})"
    )
    synth.add_argument(
        "--layout", choices=("msd", "nnunet"), default="msd", help="volume layout (default: msd)"
    )
    synth.add_argument("--modalities", nargs="+", default=["CT"], help="volume channels (default: CT)")
    synth.add_argument(
        "--real-size",
        action="store_true",
        help=f"real-size CT volumes in HU, MSD layout (implies --volumes; default output {CT_OUTPUT})",
    )
    synth.add_argument(
        "--slices",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=(80, 300),
        help="--real-size: slice count range, each case draws one (default: 80 300)",
    )
    synth.add_argument(
        "--in-plane", type=int, default=512, help="--real-size: voxels a side in plane (default: %(default)s)"
    )
    synth.add_argument(
        "--uncompressed", action="store_true", help="--real-size: write .nii instead of .nii.gz (faster)"
    )
    check = sub.add_parser("check", help="validate a data set and report every problem")
    check.add_argument("root", help="data set folder")
    check.add_argument("--layout", choices=LAYOUTS, default="auto", help="layout (default: auto-detect)")
    check.add_argument("--workers", type=int, default=usable_cores(), help="processes (default: %(default)s)")
    prepare = sub.add_parser(
        "prepare",
        help="plan as medseg fit would, then resample every volume into the cache once",
        description="Takes medseg plan's arguments: [ROOT] and any medseg fit arguments (-c ..., --data.*).",
    )
    prepare.add_argument("fit_args", nargs=argparse.REMAINDER, help="[ROOT] and medseg fit arguments")
    return parser


def synth_images(opts: argparse.Namespace) -> None:
    from pipeline.data.synthesis.phantoms_2d import generate_dataset

    count = opts.num_images or 240
    out = generate_dataset(opts.output or "data/synthetic", count, opts.size, opts.seed)
    print(f"wrote {count} phantoms ({opts.size}x{opts.size}) to {out}")


def synth_volumes(opts: argparse.Namespace) -> None:
    """Small phantom volumes, or with ``--real-size`` CT of real size in HU (MSD layout only)."""
    if opts.real_size:
        from pipeline.data.synthesis.ct import generate_ct

        if opts.layout != "msd" or opts.modalities != ["CT"]:
            sys.exit(
                "medseg data synth --real-size writes one CT channel in MSD layout: drop --layout/--modalities"
            )
        cases, side, (low, high) = opts.num_images or 3, opts.in_plane, opts.slices
        out = generate_ct(
            opts.output or CT_OUTPUT, cases, opts.seed, side, (low, high), not opts.uncompressed
        )
        print(f"wrote {cases} CT volumes ({side}x{side}, {low}-{high} slices, msd layout) to {out}")
        return
    from pipeline.data.synthesis.phantoms_3d import generate_volumes

    cases = opts.num_images or 6
    out = generate_volumes(
        opts.output or VOLUMES_OUTPUT, cases, seed=opts.seed, modalities=opts.modalities, layout=opts.layout
    )
    print(f"wrote {cases} volumes ({opts.layout} layout, {', '.join(opts.modalities)}) to {out}")


def check(opts: argparse.Namespace) -> None:
    from pipeline.data.reading.check import check_dataset

    report = check_dataset(opts.root, opts.layout, workers=opts.workers, progress=sys.stderr.isatty())
    for problem in report.problems:
        print(problem)
    print(report.summary())
    if not report.ok:
        sys.exit(1)


def prepare(opts: argparse.Namespace) -> None:
    """Plan the data set and resample every case into the cache, as ``medseg fit`` would."""
    from pipeline.cli.plan import plan_table, planned_datamodule
    from pipeline.data.loading.sources import VolumeSource

    dm, plan = planned_datamodule(opts.fit_args)
    if plan is None:
        print(f"{dm.root}: 2D images are read into memory, nothing to prepare")
        return
    dm.setup("fit")
    print(plan_table(dm, plan))
    source = dm.source
    assert isinstance(source, VolumeSource) and source.grid is not None  # planned volumes, set up
    grid = dm.cache_dir / "grids" / source.grid
    print(f"cache {dm.cache_dir}: {len(dm.cases)} cases; resampled to {grid}")


def data_command(args: Sequence[str]) -> None:
    """``medseg data <action> ...``."""
    opts = parser().parse_args(args)
    if opts.action == "synth":
        (synth_volumes if opts.volumes or opts.real_size else synth_images)(opts)
    elif opts.action == "check":
        check(opts)
    else:
        prepare(opts)
