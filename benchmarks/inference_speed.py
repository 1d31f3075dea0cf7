"""Throughput of ``medseg infer`` against a bare loop running the same model on the same slices.

    python benchmarks/inference_speed.py            # ~2-3 minutes on a 2-core CPU
    python benchmarks/inference_speed.py --cases 24 --depth 16 --repeats 5

Generates a folder of phantom volumes (NIfTI, 128x128 slices), saves a checkpoint of the default
UNet, then measures (medians over repeats):

- ``infer``: cases per second of ``pipeline.inference.infer`` on that folder, end to end in this
  process: checkpoint load, Trainer set-up, loader workers reading and preprocessing NIfTI,
  slice-batched prediction, writing NIfTI masks and ``predictions.csv``;
- ``bare``: cases per second of a loop that runs the same module's ``predict_logits`` + argmax
  over the same slices, preloaded and preprocessed, with the same batch size, on the device and
  in the precision ``medseg infer`` picks (``accelerator: auto``: on a GPU the slices are
  preloaded there and predicted under bf16 autocast, channels-last; fp32 on a CPU), the labels
  copied back to the host as ``infer`` needs them for writing.

The ratio infer / bare is the share of the model's throughput that survives IO and pre/post-
processing (target >= 0.85 with loader workers). The volumes have 48 slices (CT and MR volumes
have 50-300): ``medseg infer`` pays a fixed cost per call and per case (Trainer set-up, worker
start, file handling: a few tenths of a second on a 2-core CPU), which short volumes do not
amortise. Results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, alternate, machine_info, timed, write_json  # noqa: E402
from pipeline.data.datamodule import SegmentationDataModule  # noqa: E402
from pipeline.data.synthesis.phantoms_2d import CLASS_NAMES, generate_dataset, phantom  # noqa: E402
from pipeline.inference import infer  # noqa: E402
from pipeline.inference.cases import find_inputs, load_case  # noqa: E402
from pipeline.models import UNet, net_spec  # noqa: E402
from pipeline.training.checkpoint import load_model  # noqa: E402
from pipeline.training.module import CHECKPOINT_KEY, SegmentationModule  # noqa: E402
from pipeline.training.precision import autocast_dtype, default_precision  # noqa: E402


def make_volumes(folder: Path, cases: int, depth: int, size: int) -> None:
    """``cases`` NIfTI volumes of ``depth`` phantom slices (size x size), 0.8 x 0.8 x 3 mm."""
    folder.mkdir(parents=True)
    slices = [phantom(0, i, size)[0] for i in range(depth + cases)]
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    for c in range(cases):
        volume = np.stack(slices[c : c + depth], axis=-1).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, affine), folder / f"case_{c:03d}.nii.gz")


def make_checkpoint(path: Path, work: Path, features: list[int]) -> None:
    """A checkpoint in ``medseg fit``'s format: untrained UNet weights plus the data module's
    preprocessing (speed does not depend on training)."""
    data = SegmentationDataModule(root=str(generate_dataset(work / "phantoms", 2, 32)), num_workers=0)
    net = UNet(in_channels=1, out_channels=len(CLASS_NAMES), features=features)
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            CHECKPOINT_KEY: {
                "net": net_spec(net),
                "class_names": CLASS_NAMES,
                "preprocessing": data.preprocessing().to_checkpoint(),
            },
        },
        path,
    )


def infer_device() -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype ``medseg infer`` runs on here (``accelerator: auto``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, autocast_dtype(default_precision("auto"))


def bare_pass(
    module: SegmentationModule, images: list[torch.Tensor], batch_size: int, dtype: torch.dtype | None
) -> None:
    """The model alone over preloaded, preprocessed (S, C, H, W) cases on the module's device,
    autocast to ``dtype`` if given; the labels come back to the host."""
    device = next(module.parameters()).device
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for image in images:
            for chunk in image.split(batch_size):
                module.predict_logits(chunk).argmax(1).to(torch.uint8).cpu()


def infer_pass(checkpoint: Path, folder: Path, output: Path, batch_size: int, workers: int) -> None:
    """``infer`` end to end over ``folder``."""
    result = infer(checkpoint, [folder], output, batch_size=batch_size, num_workers=workers,
                   overwrite=True, progress_bar=False)  # fmt: skip
    if result.failed:
        raise RuntimeError(f"inference failed: {result.failed}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12, help="volumes (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=48, help="slices per volume (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="slice side in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default: %(default)s)")
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--output", type=Path, default=RESULTS / "inference_speed.json")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder, checkpoint = work / "volumes", work / "model.ckpt"
        make_volumes(folder, opts.cases, opts.depth, opts.size)
        make_checkpoint(checkpoint, work, opts.features)
        device, dtype = infer_device()
        module, prep = load_model(checkpoint)
        module = module.to(device)
        images = [load_case(case, prep)["image"].to(device) for case in find_inputs([folder])]
        bare_pass(module, images[:1], opts.batch_size, dtype)  # untimed: first-call allocations, autotuning
        load = os.getloadavg()[0]
        runs = alternate(  # ABBA order, so a change in machine load hits both alike
            {
                "bare": lambda: timed(lambda: bare_pass(module, images, opts.batch_size, dtype)),
                "infer": lambda: timed(
                    lambda: infer_pass(checkpoint, folder, work / "out", opts.batch_size, opts.workers)
                ),
            },
            opts.repeats,
        )
        bare, full = runs["bare"], runs["infer"]
    bare_rate, infer_rate = (opts.cases / statistics.median(t for t, _ in runs) for runs in (bare, full))
    cpu_ratio = statistics.median(c for _, c in bare) / statistics.median(c for _, c in full)
    result = {
        "infer_cases_per_s": round(infer_rate, 3),
        "bare_cases_per_s": round(bare_rate, 3),
        "ratio": round(infer_rate / bare_rate, 3),
        "cpu_time_ratio": round(cpu_ratio, 3),
        "infer_seconds": [round(t, 3) for t, _ in full],
        "bare_seconds": [round(t, 3) for t, _ in bare],
        "infer_cpu_seconds": [round(c, 3) for _, c in full],
        "bare_cpu_seconds": [round(c, 3) for _, c in bare],
        "device": str(device),
        "autocast": str(dtype) if dtype else None,
        "settings": {k: v for k, v in vars(opts).items() if k != "output"},
        "machine": machine_info() | {"load_average": [round(load, 2), round(os.getloadavg()[0], 2)]},
    }
    print(
        f"medseg infer: {infer_rate:.3f} cases/s, bare loop: {bare_rate:.3f} cases/s, "
        f"ratio {infer_rate / bare_rate:.3f} (CPU time ratio {cpu_ratio:.3f}; {opts.cases} cases of "
        f"{opts.depth}x{opts.size}x{opts.size}, batch {opts.batch_size}, {opts.workers} workers, "
        f"median of {opts.repeats}, load average {load:.1f}; bare loop on {device}, autocast {dtype})"
    )
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
