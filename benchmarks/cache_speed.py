"""Slices per second from the volume cache against the cheapest correct read of the NIfTI files.

    python benchmarks/cache_speed.py                 # about a minute on a 2-core CPU
    python benchmarks/cache_speed.py --shape 512 512 96 --cases 4 --repeats 3

Generates synthetic CT volumes (``pipeline.data.synthesis.phantoms_3d``: int16, LPS voxel order,
0.9 x 0.9 x 3 mm, gzip-compressed NIfTI, as MSD ships them), writes an uncompressed ``.nii``
copy of each, builds the cache (``medseg data prepare``), then reads one fixed random list of
(case, axial slice) pairs, image and mask, in these ways:

- ``cache``: ``MappedArray`` slices of the memory-mapped ``.npy`` files (what training reads);
- ``dataset_item``: the whole ``SliceDataset`` item from the cache (read, normalise, tensors):
  what a loader worker produces per sample, without augmentation;
- ``nii``: the baseline, the cheapest correct read without a cache: nibabel's array proxy of the
  uncompressed ``.nii`` (image opened once per case, only the slice's bytes read), the slice
  turned into the cache's RAS orientation (checked equal to the cache's slices);
- ``nii_gz``: the same from the ``.nii.gz`` (the stream decompressed up to the slice);
- ``nifti_full``: ``read_nifti`` of the ``.nii.gz`` (whole volume, RAS), then the slice: what
  training without a cache would do per sample.

Each way runs ``repeats`` times in turn (ABBA order); the numbers are medians of slices per
second. Every file was just written, so all read from the OS page cache: the comparison is
decoding and indexing cost, not disk speed. Targets: ``ratio`` = cache / nii >= 5 (a cache that
reopened files or stored slices scattered would fall towards 1), ``ratio_vs_nii_gz`` >= 100 (no
decompression per read), ``dataset_item_vs_nii`` >= 1 (a whole normalised sample from the cache
comes faster than nibabel reads the raw slice of an uncompressed file). Records
``benchmarks/results/cache_speed.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform  # noqa: E402

from benchmarks.common import RESULTS, alternate, machine_info, median, write_json  # noqa: E402
from pipeline.data.augment.transforms2d import build_eval_transform  # noqa: E402
from pipeline.data.cache.facts import prepare_facts  # noqa: E402
from pipeline.data.cache.grids import open_case, prepare_grid  # noqa: E402
from pipeline.data.cache.slicing import to_slices  # noqa: E402
from pipeline.data.loading.datasets import SliceDataset  # noqa: E402
from pipeline.data.normalization import Normalization  # noqa: E402
from pipeline.data.reading.formats import read_nifti  # noqa: E402
from pipeline.data.reading.layouts import describe  # noqa: E402
from pipeline.data.synthesis.phantoms_3d import CLASS_NAMES, generate_volumes  # noqa: E402

SPACING = (0.9, 0.9, 3.0)  # mm, every generated volume's


def _rate(read: Callable[[str, int], None], pairs: list[tuple[str, int]]) -> float:
    start = time.perf_counter()
    for case_id, index in pairs:
        read(case_id, index)
    return len(pairs) / (time.perf_counter() - start)


class ProxySlices:
    """Slices of one NIfTI file along RAS axis ``axis``, read through nibabel's array proxy and
    turned into the cache's orientation (RAS, slice axis first): the cheapest correct read."""

    def __init__(self, path: Path, axis: int) -> None:
        self.image = nib.load(str(path))  # once: the header parsed, the file mapped or opened
        transform = ornt_transform(io_orientation(self.image.affine), axcodes2ornt("RAS"))
        self.stored_axis = int(np.flatnonzero(transform[:, 0] == axis)[0])
        self.flipped = transform[self.stored_axis, 1] == -1
        in_plane = np.delete(transform, self.stored_axis, axis=0)
        in_plane[:, 0] = np.argsort(np.argsort(in_plane[:, 0]))  # the two RAS axes left, as 0 and 1
        self.in_plane = in_plane

    def __getitem__(self, index: int) -> np.ndarray:
        stored = self.image.shape[self.stored_axis] - 1 - index if self.flipped else index
        where = [slice(None)] * 3
        where[self.stored_axis] = stored
        return apply_orientation(np.asarray(self.image.dataobj[tuple(where)]), self.in_plane)


def uncompressed_copy(path: Path, folder: Path) -> Path:
    """``path`` (.nii.gz) written uncompressed under ``folder`` (in a subfolder named as its own:
    images and labels share file names), header and data unchanged."""
    image = nib.load(str(path))
    target = folder / path.parent.name / path.name.replace(".nii.gz", ".nii")
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header), str(target))
    return target


def measure(root: Path, work: Path, slices: int, nifti_slices: int, repeats: int, seed: int) -> dict:
    """Slices per second of each way (medians over ``repeats``), after checking that the proxy
    reads give the cache's slices."""
    cases = {case.case_id: case for case in describe(root).cases}
    cache_dir, plain = work / "cache", work / "nii"
    plain.mkdir()
    facts = prepare_facts(list(cases.values()), cache_dir, CLASS_NAMES)
    axis = 2  # the volumes' own spacing as the target: the grid holds their own slices, read as stored
    key, entries = prepare_grid(list(cases.values()), cache_dir, SPACING, axis, CLASS_NAMES)
    norms = [Normalization("zscore")]
    arrays = {cid: open_case(cache_dir, key, cid, facts[cid], e, norms, axis) for cid, e in entries.items()}
    dataset = SliceDataset(list(arrays.values()), build_eval_transform())
    first = {
        cid: sum(len(arrays[c].image) for c in sorted(arrays)[:k]) for k, cid in enumerate(sorted(arrays))
    }
    proxies = {
        kind: {
            cid: (ProxySlices(folder(case.images[0]), axis), ProxySlices(folder(case.mask), axis))
            for cid, case in cases.items()
        }
        for kind, folder in (("nii", lambda p: uncompressed_copy(p, plain)), ("nii_gz", lambda p: p))
    }
    rng = np.random.default_rng(seed)
    pairs = [(cid, int(rng.integers(entries[cid]["shape"][0]))) for cid in rng.choice(sorted(cases), slices)]
    for cid, s in pairs[:5]:  # the baseline reads what training reads
        image, mask = proxies["nii"][cid]
        assert np.allclose(image[s], arrays[cid].image[s][..., 0]) and np.array_equal(
            mask[s], arrays[cid].mask[s]
        )

    def cache(cid: str, s: int) -> None:
        np.array(arrays[cid].image[s]), np.array(arrays[cid].mask[s])

    def dataset_item(cid: str, s: int) -> None:
        dataset[first[cid] + s]

    def proxy(kind: str) -> Callable[[str, int], None]:
        return lambda cid, s: [reader[s] for reader in proxies[kind][cid]]

    def nifti_full(cid: str, s: int) -> None:
        image, mask = read_nifti(cases[cid].images), read_nifti([cases[cid].mask])
        np.array(to_slices(image.array, axis)[s]), np.array(to_slices(mask.array, axis)[s])

    readers = {
        "cache": (cache, pairs),
        "dataset_item": (dataset_item, pairs),
        "nii": (proxy("nii"), pairs),
        "nii_gz": (proxy("nii_gz"), pairs[:nifti_slices]),
        "nifti_full": (nifti_full, pairs[:nifti_slices]),
    }
    rates = alternate({name: lambda r=reader: _rate(*r) for name, reader in readers.items()}, repeats)
    medians = {name: median(values) for name, values in rates.items()}
    return {
        "slices_per_second": medians,
        "runs": rates,
        "ratio": medians["cache"] / medians["nii"],
        "ratio_vs_nii_gz": medians["cache"] / medians["nii_gz"],
        "ratio_vs_full_read": medians["cache"] / medians["nifti_full"],
        "dataset_item_vs_nii": medians["dataset_item"] / medians["nii"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[256, 256, 48], help="stored volume shape (voxels)"
    )
    parser.add_argument("--cases", type=int, default=6, help="volumes (default: %(default)s)")
    parser.add_argument(
        "--slices", type=int, default=2000, help="slices read from the cache and .nii a repeat"
    )
    parser.add_argument("--nifti-slices", type=int, default=40, help="slices read from .nii.gz a repeat")
    parser.add_argument(
        "--repeats", type=int, default=5, help="repeats, medians reported (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "cache_speed.json")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_volumes(Path(tmp) / "msd", opts.cases, opts.shape, seed=opts.seed, spacing=SPACING)
        result = measure(root, Path(tmp), opts.slices, opts.nifti_slices, opts.repeats, opts.seed)
    result["settings"] = vars(opts) | {"output": str(opts.output)}
    result["machine"] = machine_info()
    rates = result["slices_per_second"]
    print(f"volumes: {opts.cases} x {tuple(opts.shape)} int16 .nii.gz; image + mask slice per read")
    for name, rate in rates.items():
        print(f"  {name:12s} {rate:10.1f} slices/s")
    print(
        f"cache / nii (nibabel proxy, uncompressed): {result['ratio']:.1f}x (target >= 5); cache / nii.gz "
        f"proxy: {result['ratio_vs_nii_gz']:.0f}x (>= 100); dataset items / nii: "
        f"{result['dataset_item_vs_nii']:.2f}x (>= 1)"
    )
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
