"""HD95 and surface Dice of one real-size CT case against the network's forward pass over it.

    python benchmarks/surface_metrics.py                     # about 3 minutes on a 2-core CPU
    python benchmarks/surface_metrics.py --in-plane 256 --slices 80 --forward-slices 32   # a quick check

The case is the project's generated CT (``pipeline.data.synthesis.ct``: 512 x 512 in plane, 300
slices, its own spacing, a liver-like organ of millions of voxels and a lesion of a few hundred
inside it). The prediction is the ground truth shifted by one voxel in plane, the organ eroded by
one voxel and the lesion dilated by one, so both surfaces lie a few voxels apart. Arms, each
timed per case as a median of ``--repeats`` runs in alternating order:

- ``old``: the full-volume path before the crop (a copy below): one-hot label maps and MONAI's
  ``compute_hausdorff_distance`` and ``compute_surface_dice`` over every class, background too,
  one call each, as ``SegmentationMetrics.update`` made them.
- ``new``: ``pipeline.surface_distances.surface_scores_per_image``, both scores in one pass over the boxes
  around each foreground class (what ``SegmentationMetrics.update`` calls now).
- ``new_two_calls``: ``hd95_per_image`` and ``surface_dice_per_image`` called one after the other.
- ``forward``: the stock 3D network, ``UNet(1, 3, spatial_dims=3, features=(16, 32, 64, 128,
  256))`` in eval mode, through the project's sliding windows (``window_logits``: MONAI's
  Gaussian-weighted ``sliding_window_inference``, overlap 0.5, 4 windows per pass, the module's
  defaults) with a 32 x 96 x 96 window: larger than the ~20 x 32 x 32 training patch the plan
  gives a CPU, so the network runs at its fastest per voxel and the comparison is the stricter.
  A whole case is ~1,800 windows, over 15 minutes here, so the forward runs over a slab of
  ``--forward-slices`` slices (all 512 x 512 in plane) and is scaled by the windows a whole case
  takes over those the slab takes (the cost is per window).

The old and new scores are checked equal on the foreground classes (to 1e-6). The target: the new
metrics take no longer than the forward pass (``metrics_over_forward <= 1``); the script exits
non-zero when they do. Records ``benchmarks/results/surface_metrics.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.metrics import compute_hausdorff_distance, compute_surface_dice  # noqa: E402
from scipy import ndimage  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.common import RESULTS, alternate, load_average, machine_info, median, write_json  # noqa: E402
from pipeline.data.synthesis.ct import ct_volume, draw_case  # noqa: E402
from pipeline.models import UNet  # noqa: E402
from pipeline.surface_distances import (  # noqa: E402
    hd95_per_image,
    surface_dice_per_image,
    surface_scores_per_image,
)
from pipeline.training.prediction import count_windows, window_logits  # noqa: E402

CLASSES = 3  # background, organ, lesion
TOLERANCE = 2.0  # mm, surface Dice
OVERLAP, SW_BATCH = 0.5, 4  # SegmentationModule's sliding-window defaults


def old_surface_scores(
    pred: Tensor, target: Tensor, num_classes: int, tolerance: float, spacing: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """The baseline: ``hd95_per_image`` and ``surface_dice_per_image`` as they were before the
    crop, one-hot volumes of every class through MONAI; (B, C) HD95 and surface Dice, float64."""

    def onehot(labels: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 1)

    onehot_pred, onehot_gt = onehot(pred), onehot(target)
    with warnings.catch_warnings():  # MONAI warns for every empty mask
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(
            onehot_pred, onehot_gt, include_background=True, percentile=95, spacing=spacing
        )
    in_pred, in_gt = onehot_pred.flatten(2).any(-1), onehot_gt.flatten(2).any(-1)
    diagonal = math.hypot(*(n * s for n, s in zip(pred.shape[1:], spacing, strict=True)))
    hd = torch.where(in_gt, torch.where(in_pred, hd.to(torch.float64), diagonal), torch.nan)
    onehot_pred, onehot_gt = onehot(pred), onehot(target)  # the second function built them again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nsd = compute_surface_dice(
            onehot_pred, onehot_gt, [tolerance] * num_classes, include_background=True, spacing=spacing
        )
    in_gt = onehot_gt.flatten(2).any(-1)
    return hd, torch.where(in_gt, torch.nan_to_num(nsd.to(torch.float64), nan=0.0), torch.nan)


def make_case(in_plane: int, slices: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """(image, ground truth, prediction, spacing): (S, H, W) arrays in slice order, as the network
    sees a volume; spacing in mm along those axes."""
    image, mask, _ = ct_volume(seed, 0, in_plane, (slices, slices))
    spacing = tuple(reversed(draw_case(seed, 0, in_plane, (slices, slices)).spacing))
    image, target = np.ascontiguousarray(image.T), np.ascontiguousarray(mask.T).astype(np.int64)
    pred = np.roll(target, 1, axis=2)  # one voxel in plane
    organ, lesion = pred == 1, pred == 2
    pred[organ & ~ndimage.binary_erosion(organ)] = 0  # the organ one voxel thinner
    pred[ndimage.binary_dilation(lesion) & (pred != 2)] = 2  # the lesion one voxel thicker
    return image, target, pred, spacing


def time_forward(image: np.ndarray, slab: int, patch: Sequence[int], repeats: int) -> dict:
    """Seconds of the stock 3D UNet's sliding-window forward over the first ``slab`` slices of
    ``image`` (S, H, W), and the same scaled to the whole case by its window count."""
    torch.manual_seed(0)
    net = UNet(1, CLASSES, spatial_dims=3, features=(16, 32, 64, 128, 256)).eval()
    volume = torch.from_numpy(image[:slab].astype(np.float32))
    x = ((volume - volume.mean()) / volume.std())[None, None]
    seconds = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            window_logits(net, x, patch, SW_BATCH, OVERLAP)
            seconds.append(time.perf_counter() - start)
    windows_slab = count_windows(x.shape[2:], patch, OVERLAP)
    windows_case = count_windows(image.shape, patch, OVERLAP)
    return {
        "slab_shape": list(x.shape[2:]),
        "windows_slab": windows_slab,
        "windows_case": windows_case,
        "seconds_slab": median(seconds),
        "runs_slab": seconds,
        "seconds_case": median(seconds) * windows_case / windows_slab,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-plane", type=int, default=512, help="voxels a side in plane")
    parser.add_argument("--slices", type=int, default=300, help="slices of the case")
    parser.add_argument("--repeats", type=int, default=3, help="metric runs per arm, median reported")
    parser.add_argument("--forward-slices", type=int, default=32, help="slices of the slab the forward times")
    parser.add_argument("--forward-repeats", type=int, default=1, help="forward runs, median reported")
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 96, 96], help="sliding window (S, H, W)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "surface_metrics.json")
    opts = parser.parse_args(argv)
    load_start = load_average()
    image, target, pred, spacing = make_case(opts.in_plane, opts.slices, opts.seed)
    p, t, steps = torch.from_numpy(pred)[None], torch.from_numpy(target)[None], list(spacing)

    def old() -> tuple[float, tuple[Tensor, Tensor]]:
        start = time.perf_counter()
        scores = old_surface_scores(p, t, CLASSES, TOLERANCE, steps)
        return time.perf_counter() - start, scores

    def new() -> tuple[float, tuple[Tensor, Tensor]]:
        start = time.perf_counter()
        scores = surface_scores_per_image(p, t, CLASSES, steps, TOLERANCE)
        return time.perf_counter() - start, (scores["hd95"], scores["surface_dice"])

    def new_two_calls() -> tuple[float, tuple[Tensor, Tensor]]:
        start = time.perf_counter()
        scores = hd95_per_image(p, t, CLASSES, steps), surface_dice_per_image(p, t, CLASSES, TOLERANCE, steps)
        return time.perf_counter() - start, scores

    runs = alternate({"old": old, "new": new, "new_two_calls": new_two_calls}, opts.repeats)
    seconds = {arm: median(s for s, _ in r) for arm, r in runs.items()}
    (old_hd, old_nsd), (new_hd, new_nsd) = runs["old"][0][1], runs["new"][0][1]
    difference = max(
        (old_hd[:, 1:] - new_hd[:, 1:]).abs().max().item(),
        (old_nsd[:, 1:] - new_nsd[:, 1:]).abs().max().item(),
    )
    forward = time_forward(image, opts.forward_slices, opts.patch, opts.forward_repeats)
    result = {
        "machine": machine_info(),
        "load_start": load_start,
        "settings": vars(opts) | {"output": str(opts.output), "overlap": OVERLAP, "sw_batch_size": SW_BATCH},
        "case": {
            "shape": list(target.shape),
            "spacing_mm": list(spacing),
            "voxels": {"organ": int((target == 1).sum()), "lesion": int((target == 2).sum())},
            "hd95_mm": new_hd[0, 1:].tolist(),
            "surface_dice": new_nsd[0, 1:].tolist(),
        },
        "seconds_per_case": seconds | {"forward": forward["seconds_case"]},
        "runs": {arm: [s for s, _ in r] for arm, r in runs.items()},
        "forward": forward,
        "max_abs_difference_old_new": difference,
        "speedup": seconds["old"] / seconds["new"],
        "metrics_over_forward": seconds["new"] / forward["seconds_case"],
        "old_metrics_over_forward": seconds["old"] / forward["seconds_case"],
        "load_end": load_average(),
    }
    result["target_met"] = result["metrics_over_forward"] <= 1 and difference <= 1e-6
    write_json(opts.output, result)
    case = result["case"]
    print(f"case {tuple(case['shape'])} at {tuple(round(s, 3) for s in spacing)} mm, voxels {case['voxels']}")
    print(f"HD95 {case['hd95_mm']} mm, surface Dice at {TOLERANCE} mm {case['surface_dice']}")
    for arm, value in result["seconds_per_case"].items():
        print(f"  {arm:14s} {value:9.2f} s per case")
    print(
        f"forward: {forward['seconds_slab']:.1f} s over a {tuple(forward['slab_shape'])} slab "
        f"({forward['windows_slab']} windows of {tuple(opts.patch)}), x {forward['windows_case']} / "
        f"{forward['windows_slab']} windows for the case"
    )
    print(
        f"old / new: {result['speedup']:.1f}x; new metrics / forward: {result['metrics_over_forward']:.4f} "
        f"(target <= 1: {'met' if result['target_met'] else 'NOT MET'}); old metrics / forward: "
        f"{result['old_metrics_over_forward']:.3f}; old and new differ by at most {difference:.2g}"
    )
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["target_met"] else 1)
