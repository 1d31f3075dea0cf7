"""``medseg data`` subcommands for volume data sets (``pipeline.cli.data_command`` registers them)::

medseg data synth --volumes [--layout msd|nnunet] [--output DIR]   # small synthetic NIfTI set
medseg data check <root> [--layout ...]       # every problem, one line each; exit 1 if any
medseg data prepare <root> [--cache DIR]      # decode volumes once into the slice cache
"""

from __future__ import annotations

import argparse
import sys

from pipeline.data.layouts import LAYOUTS
from pipeline.data.slicing import AXIS_NAMES

VOLUMES_OUTPUT = "data/synthetic_volumes"


def _slice_axis(text: str) -> int | str:
    if text == "auto":
        return text
    if text in ("0", "1", "2"):
        return int(text)
    raise argparse.ArgumentTypeError(f"slice axis must be 0, 1, 2 or auto, got {text!r}")


def add_arguments(sub: argparse._SubParsersAction, synth: argparse.ArgumentParser) -> None:
    """Add ``synth --volumes`` options and the ``check`` and ``prepare`` subcommands."""
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
    prepare = sub.add_parser("prepare", help="decode volumes once into the memory-mapped slice cache")
    prepare.add_argument("root", help="data set folder")
    prepare.add_argument("--cache", default=None, help="cache folder (default: <root>/.medseg-cache)")
    prepare.add_argument("--layout", choices=LAYOUTS, default="auto", help="layout (default: auto-detect)")
    prepare.add_argument(
        "--slice-axis", type=_slice_axis, default="auto", help="0, 1, 2 or auto (coarsest spacing; default)"
    )


def synth_volumes(opts: argparse.Namespace) -> None:
    from pipeline.data.synthetic_volumes import generate_volumes

    cases = opts.num_images or 6
    out = generate_volumes(
        opts.output or VOLUMES_OUTPUT, cases, seed=opts.seed, modalities=opts.modalities, layout=opts.layout
    )
    print(f"wrote {cases} volumes ({opts.layout} layout, {', '.join(opts.modalities)}) to {out}")


def check(opts: argparse.Namespace) -> None:
    from pipeline.data.check import check_dataset

    report = check_dataset(opts.root, opts.layout)
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


def run(opts: argparse.Namespace) -> bool:
    """Run ``opts.action`` if it is one of these; False otherwise."""
    if opts.action == "synth" and opts.volumes:
        synth_volumes(opts)
    elif opts.action == "check":
        check(opts)
    elif opts.action == "prepare":
        prepare(opts)
    else:
        return False
    return True
