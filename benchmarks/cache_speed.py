"""Slices per second from the volume cache against reading the same slices from ``.nii.gz``.

    python benchmarks/cache_speed.py                 # about a minute on a 2-core CPU
    python benchmarks/cache_speed.py --shape 512 512 96 --cases 4 --repeats 3

Generates synthetic CT volumes (``pipeline.data.synthetic_volumes``: int16, LPS voxel order,
0.9 x 0.9 x 3 mm, gzip-compressed NIfTI), builds the cache (``medseg data prepare``), then reads
one fixed random list of (case, axial slice) pairs, image and mask, three ways:

- ``cache``: ``MappedArray`` slices of the memory-mapped ``.npy`` files (what training reads);
- ``cache_sample``: the whole validation sample from the cache (``SliceDataset`` item: read,
  normalise, tensors), for scale;
- ``nifti``: what training would do without the cache, ``read_nifti`` of image and mask (full
  decompression, RAS reorientation), then the slice;
- ``nifti_proxy``: the cheapest way to get one slice from a ``.nii.gz`` with nibabel, slicing its
  array proxy (decompresses the stream up to the slice, no reorientation).

Each way runs ``repeats`` times, alternating; the numbers are medians of slices per second over
the repeats. Every file was just written, so all three read from the OS page cache: the
comparison is decoding cost, not disk speed. Prints and records
``benchmarks/results/cache_speed.json``; ``ratio`` (cache / nifti) has a target of >= 10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RESULTS, machine_info, write_json  # noqa: E402
from pipeline.data.cache import open_case, prepare_cache  # noqa: E402
from pipeline.data.dataset import SliceDataset  # noqa: E402
from pipeline.data.io import read_nifti  # noqa: E402
from pipeline.data.layouts import describe  # noqa: E402
from pipeline.data.normalization import Normalization  # noqa: E402
from pipeline.data.slicing import to_slices  # noqa: E402
from pipeline.data.synthetic_volumes import CLASS_NAMES, generate_volumes  # noqa: E402
from pipeline.data.transforms import build_eval_transform  # noqa: E402


def _rate(read: Callable[[str, int], None], pairs: list[tuple[str, int]]) -> float:
    start = time.perf_counter()
    for case_id, index in pairs:
        read(case_id, index)
    return len(pairs) / (time.perf_counter() - start)


def measure(root: Path, cache_dir: Path, slices: int, nifti_slices: int, repeats: int, seed: int) -> dict:
    """Slices per second of the three readers (medians over ``repeats``)."""
    cases = {case.case_id: case for case in describe(root).cases}
    manifest, _ = prepare_cache(list(cases.values()), cache_dir, CLASS_NAMES)
    entries = manifest["cases"]
    arrays = {cid: open_case(cache_dir, cid, e, [Normalization("zscore")]) for cid, e in entries.items()}
    dataset = SliceDataset(list(arrays.values()), build_eval_transform())
    first = {
        cid: sum(len(arrays[c].image) for c in sorted(arrays)[:k]) for k, cid in enumerate(sorted(arrays))
    }
    rng = np.random.default_rng(seed)
    ids = sorted(cases)
    pairs = [(cid, int(rng.integers(entries[cid]["shape"][0]))) for cid in rng.choice(ids, slices)]

    def cache(cid: str, s: int) -> None:
        np.array(arrays[cid].image[s]), np.array(arrays[cid].mask[s])

    def cache_sample(cid: str, s: int) -> None:
        dataset[first[cid] + s]

    def nifti(cid: str, s: int) -> None:
        image, mask = read_nifti(cases[cid].images), read_nifti([cases[cid].mask])
        np.array(to_slices(image.array, 2)[s]), np.array(to_slices(mask.array, 2)[s])

    def nifti_proxy(cid: str, s: int) -> None:
        for path in (cases[cid].images[0], cases[cid].mask):
            np.asarray(nib.load(str(path)).dataobj[:, :, s])

    readers = {
        "cache": (cache, pairs),
        "cache_sample": (cache_sample, pairs),
        "nifti": (nifti, pairs[:nifti_slices]),
        "nifti_proxy": (nifti_proxy, pairs[:nifti_slices]),
    }
    rates: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(repeats):
        for name, (read, subset) in readers.items():
            rates[name].append(_rate(read, subset))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "slices_per_second": medians,
        "runs": rates,
        "ratio": medians["cache"] / medians["nifti"],
        "ratio_vs_proxy": medians["cache"] / medians["nifti_proxy"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[256, 256, 48], help="stored volume shape (voxels)"
    )
    parser.add_argument("--cases", type=int, default=6, help="volumes (default: %(default)s)")
    parser.add_argument("--slices", type=int, default=2000, help="slices read from the cache a repeat")
    parser.add_argument("--nifti-slices", type=int, default=40, help="slices read from .nii.gz a repeat")
    parser.add_argument(
        "--repeats", type=int, default=5, help="repeats, medians reported (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "cache_speed.json")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_volumes(Path(tmp) / "msd", opts.cases, opts.shape, seed=opts.seed)
        result = measure(root, Path(tmp) / "cache", opts.slices, opts.nifti_slices, opts.repeats, opts.seed)
    result["settings"] = vars(opts) | {"output": str(opts.output)}
    result["machine"] = machine_info()
    rates = result["slices_per_second"]
    print(f"volumes: {opts.cases} x {tuple(opts.shape)} int16 .nii.gz; image + mask slice per read")
    for name, rate in rates.items():
        print(f"  {name:12s} {rate:10.1f} slices/s")
    print(
        f"cache / nifti: {result['ratio']:.0f}x (target >= 10x); cache / nifti_proxy: {result['ratio_vs_proxy']:.0f}x"
    )
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
