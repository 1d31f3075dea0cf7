"""``medseg data``: generate, validate and cache data sets::

medseg data synth [--output DIR] [--num-images N] [--size PX]      # the 2D phantom data set
medseg data synth --volumes [--layout msd|nnunet] [--output DIR]   # small synthetic NIfTI set
medseg data check <root> [--layout ...]       # every problem, one line each; exit 1 if any
medseg data prepare <root> [--cache DIR]      # decode volumes once into the slice cache
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipeline.data.layouts import LAYOUTS
from pipeline.data.slicing import AXIS_NAMES

VOLUMES_OUTPUT = "data/synthetic_volumes"


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _slice_axis(text: str) -> int | str:
    if text == "auto":
        return text
    if text in ("0", "1", "2"):
        return int(text)
    raise argparse.ArgumentTypeError(f"slice axis must be 0, 1, 2 or auto, got {text!r}")


def parser() -> argparse.ArgumentParser:
    """The ``medseg data`` parser: ``synth``, ``check`` and ``prepare``."""
    parser = argparse.ArgumentParser(prog="medseg data", description="Data set tools.")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="generate the procedural phantom data set (or --volumes)")
    synth.add_argument("--output", default=None, help="output folder (default: data/synthetic)")
    synth.add_argument("--num-images", type=int, default=None, help="number of images (default: 240)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    synth.add_argument(
        "--volumes", action="store_true", help=f"write NIfTI volumes (default output {VOLUMES_OUTPUT})"
    )
    synth.add_argument(
        "--layout", choices=("msd", "nnunet"), default="msd", help="volume layout (default: msd)"
    )
    synth.add_argument("--modalities", nargs="+", default=["CT"], help="volume channels (default: CT)")
    check = sub.add_parser("check", help="validate a data set and report every problem")
    check.add_argument("root", help="data set folder")
    check.add_argument("--layout", choices=LAYOUTS, default="auto", help="layout (default: auto-detect)")
    check.add_argument(
        "--workers", type=int, default=default_workers(), help="processes (default: %(default)s)"
    )
    prepare = sub.add_parser("prepare", help="decode volumes once into the memory-mapped slice cache")
    prepare.add_argument("root", help="data set folder")
    prepare.add_argument("--cache", default=None, help="cache folder (default: <root>/.medseg-cache)")
    prepare.add_argument("--layout", choices=LAYOUTS, default="auto", help="layout (default: auto-detect)")
    prepare.add_argument(
        "--slice-axis", type=_slice_axis, default="auto", help="0, 1, 2 or auto (coarsest spacing; default)"
    )
    return parser


def synth_images(opts: argparse.Namespace) -> None:
    from pipeline.data.synthetic import generate_dataset

    count = opts.num_images or 240
    out = generate_dataset(opts.output or "data/synthetic", count, opts.size, opts.seed)
    print(f"wrote {count} phantoms ({opts.size}x{opts.size}) to {out}")


def synth_volumes(opts: argparse.Namespace) -> None:
    from pipeline.data.synthetic_volumes import generate_volumes

    cases = opts.num_images or 6
    out = generate_volumes(
        opts.output or VOLUMES_OUTPUT, cases, seed=opts.seed, modalities=opts.modalities, layout=opts.layout
    )
    print(f"wrote {cases} volumes ({opts.layout} layout, {', '.join(opts.modalities)}) to {out}")


def check(opts: argparse.Namespace) -> None:
    from pipeline.data.check import check_dataset

    report = check_dataset(opts.root, opts.layout, workers=opts.workers, progress=sys.stderr.isatty())
    for problem in report.problems:
        print(problem)
    print(report.summary())
    if not report.ok:
        sys.exit(1)


def prepare(opts: argparse.Namespace) -> None:
    from pipeline.data.cache import default_cache_dir, prepare_cache
    from pipeline.data.layouts import describe, resolve_class_names
    from pipeline.data.volumes import is_volume_case

    info = describe(opts.root, opts.layout)
    volumes = [case for case in info.cases if is_volume_case(case)]
    if not volumes:
        print(
            f"{opts.root}: no volumes ({info.layout} layout); 2D images are read into memory, nothing to prepare"
        )
        return
    cache_dir = opts.cache or default_cache_dir(opts.root)
    names = resolve_class_names(opts.root, info)
    manifest, written = prepare_cache(volumes, cache_dir, names, opts.slice_axis, None, info.layout)
    axis = manifest["slice_axis"]
    print(
        f"cache {cache_dir}: {len(volumes)} cases, {written} decoded, {len(volumes) - written} unchanged; "
        f"slice axis {axis} ({AXIS_NAMES[axis]})"
    )


def data_command(args: Sequence[str]) -> None:
    """``medseg data <action> ...``."""
    opts = parser().parse_args(args)
    if opts.action == "synth":
        (synth_volumes if opts.volumes else synth_images)(opts)
    elif opts.action == "check":
        check(opts)
    else:
        prepare(opts)
