"""The baseline of ``benchmarks/real_size.py``'s inference figure: a bare PyTorch + MONAI loop that
segments one NIfTI volume with a ``medseg fit`` checkpoint's network, written as one would by hand.

    python benchmarks/bare_infer.py --checkpoint best.ckpt --input case.nii.gz --output mask.nii.gz

What it does, in order, each step timed (``--timings`` JSON):

1. ``import``: torch, numpy, nibabel, MONAI's ``sliding_window_inference`` and the network class
   (``pipeline.models``, for the same module the checkpoint holds);
2. ``load``: ``torch.load`` of the checkpoint (``weights_only``), the network built from its stored
   spec and given its ``net.*`` weights, eval mode;
3. ``read``: nibabel reads the volume (gzip included), ``as_closest_canonical`` (RAS+);
4. ``preprocess``: cut along the checkpoint's slice axis, resampled to its target spacing as the
   pipeline's resampling does (bicubic in plane, linear across slices, ``F.interpolate``,
   ``align_corners=False``), CT normalisation from the checkpoint (clip to the window, subtract the
   mean, divide by the standard deviation);
5. ``predict``: every slice through MONAI's ``sliding_window_inference`` in one call (Gaussian
   weights; the checkpoint's patch, ``sw_overlap`` and ``sw_batch_size`` windows per forward),
   under ``torch.inference_mode``, then the softmax over classes;
6. ``postprocess``: the probabilities resampled back to the case's own grid (trilinear: bilinear
   in plane and linear across slices, all classes in one ``F.interpolate``), the arg max as uint8,
   back to the input's voxel order (``nibabel.orientations``);
7. ``write``: the mask as ``.nii.gz`` (uint8) with the input's affine.

Only a 2D network (slices) is handled, the case of the real-size plan on a CPU; the loop runs on
the CPU in fp32, as ``medseg infer`` does there.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the network class, run from anywhere

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import pipeline.models  # noqa: E402, F401  (the network classes the checkpoint names)


def build_net(checkpoint: dict) -> torch.nn.Module:
    """The checkpoint's network with its weights, in eval mode."""
    spec = checkpoint["medseg"]["net"]
    module, name = spec["class_path"].rsplit(".", 1)
    net = getattr(importlib.import_module(module), name)(**spec["init_args"])
    weights = {k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(weights)
    return net.eval()


def resample(volume: torch.Tensor, size: tuple[int, int, int], in_plane: str) -> torch.Tensor:
    """(N, S, H, W) -> (N, *size): ``in_plane`` interpolation within slices, linear across them."""
    n, s, h, w = volume.shape
    if (h, w) != size[1:]:
        flat = volume.reshape(n * s, 1, h, w)
        volume = F.interpolate(flat, size=size[1:], mode=in_plane, align_corners=False).reshape(
            n, s, *size[1:]
        )
    if s != size[0]:
        columns = volume.permute(0, 2, 3, 1).reshape(-1, 1, s)
        columns = F.interpolate(columns, size=size[0], mode="linear", align_corners=False)
        volume = columns.reshape(n, *size[1:], size[0]).permute(0, 3, 1, 2)
    return volume


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--input", type=Path, required=True, help="a NIfTI volume")
    parser.add_argument("--output", type=Path, required=True, help="the mask, .nii.gz")
    parser.add_argument("--timings", type=Path, help="write the step timings here (JSON)")
    opts = parser.parse_args(argv)
    seconds = {"import": time.perf_counter() - START}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    checkpoint = torch.load(opts.checkpoint, map_location="cpu", weights_only=True)
    prep, hparams = checkpoint["medseg"]["preprocessing"], checkpoint["hyper_parameters"]
    if prep["spatial_dims"] != 2 or prep["in_channels"] != 1:
        raise SystemExit("bare_infer.py handles single-channel 2D networks only")
    net = build_net(checkpoint)
    lap("load")

    source = nib.load(opts.input)
    canonical = nib.as_closest_canonical(source)
    array = np.asarray(canonical.dataobj, dtype=np.float32)  # (X, Y, Z)
    lap("read")

    axis = prep["slice_axis"]
    order = [axis, *(a for a in range(3) if a != axis)]
    spacing = np.asarray(canonical.header.get_zooms()[:3], float)[order]
    target = np.asarray(prep["target_spacing"], float)[order]
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, axis, 0)))  # (S, H, W)
    own = tuple(slices.shape)
    grid = tuple(max(1, round(n * s / t)) for n, s, t in zip(own, spacing, target, strict=True))
    with torch.inference_mode():
        image = resample(slices[None], grid, "bicubic")[0]  # type: ignore[arg-type]
        norm = prep["channel_normalization"][0]
        if norm["mode"] != "ct" or norm["window"] is None:
            raise SystemExit(f"bare_infer.py handles CT normalisation with a window only, got {norm['mode']}")
        lo, hi = norm["window"]
        image = (image.clamp(lo, hi) - norm["mean"]) / norm["std"]
        lap("preprocess")

        logits = sliding_window_inference(
            image[:, None],
            tuple(prep["patch_size"]),
            sw_batch_size=hparams["sw_batch_size"],
            predictor=net,
            overlap=hparams["sw_overlap"],
            mode="gaussian",
        )  # fmt: skip  (S, K, H, W)
        probabilities = logits.softmax(1).movedim(1, 0)  # (K, S, H, W)
        lap("predict")

        # bilinear in plane and linear across slices is trilinear: one call (separable, same weights)
        own_grid = F.interpolate(probabilities[None], size=own, mode="trilinear", align_corners=False)[0]
        labels = own_grid.argmax(0).to(torch.uint8).numpy()
    mask = np.moveaxis(labels, 0, axis)  # canonical (X, Y, Z)
    back = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(source.affine)
    )
    mask = nib.orientations.apply_orientation(mask, back)
    lap("postprocess")

    opts.output.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(mask), source.affine), opts.output)
    lap("write")
    result = {
        "seconds": seconds,
        "grid": list(grid),
        "shape": list(own),
        "windows_per_forward": hparams["sw_batch_size"],
    }
    if opts.timings:
        opts.timings.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
