"""Time per 3D training patch from a memory-mapped volume, against a plain crop of the same size.

    python benchmarks/augmentation_3d.py                   # about two minutes on a 2-core CPU
    python benchmarks/augmentation_3d.py --samples 5 --repeats 1 --shape 64 128 128 --patch 32 64 64

Writes one int16 volume (default 200 x 512 x 512, the cache's (S, H, W, C) layout) and its
uint8 mask as ``.npy`` files, opens them as the cache does (``MappedArray``: memory-mapped), and
times ``PatchAugmenter3D`` on one core (BLAS and torch threads pinned to 1, as in a loader worker) for
each arm, alternating (``benchmarks.common.alternate``):

- ``crop``: augmentation off (the validation crop): the baseline;
- ``default``: ``Augmentation()`` as configured, each transform drawn with its probability;
- ``spatial``: every spatial transform drawn (rotation + scaling, flips), no intensity change;
- ``all``: every transform drawn in every sample, elastic deformation and low resolution included.

Half the samples are foreground patches (a class drawn, ``draw_center``), half uniform; each
sample has its own seed, the same across arms. Figures: median over repeats of the mean time per
sample, in ms, and its ratio to ``crop``; and the voxels read from the volume per patch voxel (a
patch rotated about every axis reads its bounding box). Prints and records
``benchmarks/results/augmentation_3d.json``.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one core, as a loader worker has; before numpy loads BLAS

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, alternate, machine_info, median, ratio, write_json  # noqa: E402
from pipeline.data.augment.transforms2d import Augmentation  # noqa: E402
from pipeline.data.augment.transforms3d import PatchAugmenter3D, class_locations  # noqa: E402
from pipeline.data.cache.store import MappedArray  # noqa: E402
from pipeline.data.normalization import IntensityStats  # noqa: E402

ALL_ON = dict(
    flip_p=1.0,
    affine_p=1.0,
    elastic_3d_p=1.0,
    brightness_contrast_p=1.0,
    gamma_p=1.0,
    noise_p=1.0,
    lowres_p=1.0,
)
ARMS = {
    "crop": Augmentation(enabled=False),
    "default": Augmentation(),
    "spatial": Augmentation(
        flip_p=1.0, affine_p=1.0, brightness_contrast_p=0.0, gamma_p=0.0, noise_p=0.0, lowres_p=0.0
    ),
    "all": Augmentation(**ALL_ON),
}


def write_volume(folder: Path, shape: tuple[int, int, int], seed: int) -> tuple[MappedArray, MappedArray]:
    """An int16 CT-like volume (S, H, W, 1) with two spherical classes, and its mask, written slice
    by slice (a 200 x 512 x 512 volume never sits in memory whole) and memory-mapped."""
    rng = np.random.default_rng(seed)
    image = np.lib.format.open_memmap(folder / "image.npy", "w+", np.int16, (*shape, 1))
    mask = np.lib.format.open_memmap(folder / "mask.npy", "w+", np.uint8, shape)
    rows, cols = np.ogrid[: shape[1], : shape[2]]
    spheres = [((0.5, 0.5, 0.5), 0.3), ((0.3, 0.6, 0.4), 0.05)]  # (centre, radius) as fractions
    for s in range(shape[0]):
        for label, (centre, radius) in enumerate(spheres, start=1):
            axes = zip((s, rows, cols), centre, shape, strict=True)
            mask[s][sum(((g - c * n) / (radius * n)) ** 2 for g, c, n in axes) <= 1] = label
        noise = rng.normal(0, 30, shape[1:]).astype(np.int16)
        image[s, ..., 0] = noise + np.array([-800, 40, 120], np.int16)[mask[s]]
    image.flush(), mask.flush()
    return MappedArray(folder / "image.npy", (*shape, 1)), MappedArray(folder / "mask.npy", shape)


class CountedReads:
    """An (S, H, W, C) array that counts the voxels read through it."""

    def __init__(self, array: MappedArray) -> None:
        self.array, self.shape, self.voxels = array, array.shape, 0

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        box = self.array[index]
        self.voxels += int(np.prod(box.shape[:3]))
        return box


def measure(
    shape: tuple[int, int, int], patch: tuple[int, int, int], samples: int, repeats: int, seed: int
) -> dict:
    """ms per sample of each arm (medians over ``repeats`` of the mean over ``samples``)."""
    with tempfile.TemporaryDirectory() as tmp:
        image, mask = write_volume(Path(tmp), shape, seed)
        stats = IntensityStats(*(np.array([v]) for v in (-1000.0, 1000.0, 0.5, 0.2)))  # a CT window in HU
        locations = class_locations(mask.open(), seed=seed)
        labels = sorted(locations)

        reads = {name: CountedReads(image) for name in ARMS}

        def arm(name: str) -> Callable[[], float]:
            augment = PatchAugmenter3D(ARMS[name])

            def run() -> float:
                start = time.perf_counter()
                for sample in range(samples):
                    augment.set_random_seed(seed * 100_003 + sample)
                    label = labels[sample % len(labels)] if sample % 2 else 0
                    centre = augment.draw_center(locations[label]) if label else None
                    augment(reads[name], mask, stats, patch, centre, crop_class=label)
                return (time.perf_counter() - start) / samples * 1000

            return run

        runs = alternate({name: arm(name) for name in ARMS}, repeats)
    ms = {name: median(values) for name, values in runs.items()}
    return {
        "ms_per_sample": ms,
        "ratio_vs_crop": {name: ratio(value, ms["crop"]) for name, value in ms.items()},
        # voxels read from the volume per patch voxel: 1 for a crop inside the volume
        "read_per_patch_voxel": {
            name: round(counted.voxels / (samples * repeats * np.prod(patch)), 2)
            for name, counted in reads.items()
        },
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[200, 512, 512], help="volume (S, H, W) voxels")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128], help="patch (D, H, W) voxels")
    parser.add_argument("--samples", type=int, default=20, help="samples per arm and repeat")
    parser.add_argument(
        "--repeats", type=int, default=3, help="repeats, medians reported (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "augmentation_3d.json")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)  # a DataLoader worker's setting
    result = measure(tuple(opts.shape), tuple(opts.patch), opts.samples, opts.repeats, opts.seed)
    result["settings"] = vars(opts) | {"output": str(opts.output)}
    result["machine"] = machine_info()
    print(f"patch {tuple(opts.patch)} from a {tuple(opts.shape)} int16 memory-mapped volume, one core")
    for name, ms in result["ms_per_sample"].items():
        read = result["read_per_patch_voxel"][name]
        print(
            f"  {name:8s} {ms:7.1f} ms/sample  ({result['ratio_vs_crop'][name]:.1f}x crop), reads {read:.1f}x the patch"
        )
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
