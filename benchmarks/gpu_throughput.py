"""Training throughput of the UNet on a CUDA GPU: fp32 vs bf16 vs bf16 + channels-last vs + compile.

    python benchmarks/gpu_throughput.py             # on a CUDA GPU: a few minutes (compile included)
    python benchmarks/gpu_throughput.py --no-compile --batch-size 64

``measure_case`` measures any ``ModelCase`` (a network and its batch); ``gpu_check.py`` runs it
for every entry of ``MODEL_CASES`` (the 2D UNet, and the 3D UNet at the patch and batch
``pipeline.data.planning.rules`` gives a CT data set on an 8 GB budget: ``unet3d``), this script for the 2D UNet.

Without a CUDA GPU it prints that it skipped and records ``{"skipped": ...}`` (exit status 0).

The UNet at its full width (``features`` 32..512, as ``pipeline.models.UNet`` defaults) trains on
256x256 batches preloaded on the GPU (random data: speed does not depend on it; no arm copies from
the host) with AdamW and MONAI's DiceCE loss, in four arms, alternating over ``repeats`` rounds
(medians reported; an arm that fails is reported in ``errors``, the others still run):

- ``fp32``: float32 (with PyTorch's defaults, as ``precision: 32-true``: cuDNN may use TF32 for
  convolutions on Ampere and newer GPUs, matrix products stay float32);
- ``bf16``: ``torch.autocast(bfloat16)``, what ``precision: bf16-mixed`` does;
- ``bf16_cl``: bf16 + channels-last weights and inputs (``channels_last_3d`` for a 3D network), as
  ``SegmentationModule(channels_last=True)`` sets them on CUDA;
- ``bf16_cl_compile``: the same with ``net.compile()`` (``SegmentationModule(compile=True)``).

``cudnn.benchmark`` is on in every arm, as ``trainer.benchmark: true`` sets it. Also recorded:

- ``flops_per_image``: forward + backward FLOPs of one image (``torch.utils.flop_counter``);
  ``achieved_tflops`` per arm = FLOPs x images/s, and ``fraction_of_matmul`` against the bf16
  rate of a large matrix multiply measured in the same run (``matmul_tflops``), the best this
  device does in practice;
- ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` per arm;
- ``wait_fraction``: a bf16 + channels-last training loop fed by the real training loader
  (phantoms of the same size, default augmentation, pinned memory, persistent workers) with the
  default worker count (``data.num_workers: null``: one per CPU core, at most 16) and with 2:
  the share of step time spent waiting for data, in the steady state (an epoch longer than the
  loop, its first steps left out: ``data_wait``). Unlike the arms above, these steps include
  the copy of each batch from pinned host memory to the GPU, as in ``medseg fit``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    alternate,
    machine_info,
    median,
    ratio,
    train_flops,
    write_json,
)
from benchmarks.data_loading import datamodule, default_workers, training_step, wait_fraction  # noqa: E402
from pipeline.data.planning.fingerprint import Fingerprint  # noqa: E402
from pipeline.data.planning.network_rules import PlanSettings  # noqa: E402
from pipeline.data.planning.rules import make_plan  # noqa: E402
from pipeline.data.synthesis.phantoms_2d import CLASS_NAMES, generate_dataset  # noqa: E402
from pipeline.models import UNet  # noqa: E402
from pipeline.training.layout import channels_last_format  # noqa: E402

ARMS = {  # name: (autocast dtype or None, channels_last, compile)
    "fp32": (None, False, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16_cl": (torch.bfloat16, True, False),
    "bf16_cl_compile": (torch.bfloat16, True, True),
}
FULL_WIDTH = (32, 64, 128, 256, 512)
WIDTH_3D = (32, 64, 128, 256, 320)  # nnU-Net's 3D widths: the deepest level capped at 320 channels


@dataclass(frozen=True)
class ModelCase:
    """A network the GPU benchmarks train and the batch it trains on.

    Attributes:
        name: the case's key in the results (``unet2d``).
        build: ``(in_channels, classes) -> network``.
        spatial: the input's spatial shape, (H, W) or (D, H, W).
        batch_size: images (or patches) per step.
        about: where the shape and batch come from (recorded with the results).
    """

    name: str
    build: Callable[[int, int], nn.Module]
    spatial: tuple[int, ...]
    batch_size: int
    about: str = ""


def unet2d(size: int = 256, batch_size: int = 32, features: Sequence[int] = FULL_WIDTH) -> ModelCase:
    """The full-width 2D UNet on ``size`` x ``size`` images."""
    return ModelCase("unet2d", lambda c, k: UNet(c, k, features=tuple(features)), (size, size), batch_size)


def unet3d(
    features: Sequence[int] = WIDTH_3D,
    shape: Sequence[int] = (512, 512, 100),
    spacing: Sequence[float] = (0.78, 0.78, 2.5),
    memory_gb: float = 8.0,
) -> ModelCase:
    """The 3D UNet as ``medseg fit`` plans it for a GPU data set of CT scans of ``shape`` voxels at
    ``spacing`` mm (X, Y, Z) with ``memory_gb`` of activations (``pipeline.data.planning.rules``): patch,
    batch, strides and kernel sizes. The defaults, an abdominal CT with 2.5 mm slices, give a
    32 x 192 x 192 patch, batch 2, pooled in plane first with 1 x 3 x 3 kernels at full resolution."""
    cases = 40
    fingerprint = Fingerprint(
        np.tile(np.asarray(spacing, float), (cases, 1)),
        np.tile(np.asarray(shape, float), (cases, 1)),
        np.zeros((cases, len(CLASS_NAMES)), np.int64),
        None,
    )
    plan = make_plan(fingerprint, PlanSettings(device="gpu", memory_gb=memory_gb), features).net_3d
    args = {
        "features": tuple(features),
        "spatial_dims": 3,
        "strides": plan.strides,
        "kernel_sizes": plan.kernel_sizes,
    }
    about = (
        f"planned for {cases} CT scans of {'x'.join(map(str, shape))} voxels at "
        f"{'x'.join(map(str, spacing))} mm, {memory_gb:g} GB; strides {[list(s) for s in plan.strides]}"
    )
    return ModelCase("unet3d", lambda c, k: UNet(c, k, **args), plan.patch, plan.batch, about)


# The cases ``gpu_check.py`` measures.
MODEL_CASES = [unet2d(), unet3d()]


def matmul_tflops(device: torch.device, size: int, iterations: int, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of ``size`` x ``size`` matrix products in ``dtype`` (median of 3 timings)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # untimed: library selection
    timings = []
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(iterations):
            a @ b
        sync()
        timings.append(time.perf_counter() - start)
    return 2 * size**3 * iterations / median(timings) / 1e12


def arm_step(name: str, net: nn.Module, device: torch.device) -> Callable[[dict], None]:
    """The training step of arm ``name``, preparing ``net`` (memory format, compile) for it."""
    dtype, channels_last, compile_ = ARMS[name]
    memory_format = channels_last_format(net) if channels_last else torch.contiguous_format
    net.to(memory_format=memory_format)
    if compile_:
        net.compile()
    return training_step(net, device, dtype, memory_format)


def images_per_second(
    step: Callable[[dict], None], batch: dict, steps: int, sync: Callable[[], None]
) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    sync()
    return steps * len(batch["image"]) / (time.perf_counter() - start)


def short_error(err: BaseException, limit: int = 2000) -> str:
    """``Type: message`` of an error, cut to ``limit`` characters (compiler errors run to pages)."""
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[:limit] + " ..."


def free_device_memory(device: torch.device) -> None:
    """Return the cached blocks of a failed arm (an out-of-memory error) before the next one."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_case(
    case: ModelCase,
    device: torch.device,
    steps: int,
    warmup: int,
    repeats: int,
    arms: Sequence[str],
    stop: Callable[[], bool] | None = None,
) -> dict:
    """Images/s of ``case`` in each arm (medians over alternating rounds), FLOPs per image, peak memory.

    Every arm trains on the same batch, preloaded on ``device``: no arm includes a host-to-device
    copy. An arm that fails, in its warm-up (``torch.compile`` on some setups) or in a timed round
    (out of memory), leaves the timing and is reported in ``errors`` (``Type: message``); the
    others go on. ``stop()`` (a time budget spent), asked before each arm's warm-up and before each
    round after the first, leaves the arms not yet warmed up out (``not_run``) and ends the rounds.
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    classes = len(CLASS_NAMES)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(case.batch_size, 1, *case.spatial, generator=generator).to(device),
        "mask": torch.randint(classes, (case.batch_size, *case.spatial), generator=generator).to(device),
    }
    steps_of: dict[str, Callable[[dict], None]] = {}
    errors: dict[str, str] = {}
    not_run: dict[str, str] = {}
    for name in arms:
        if stop is not None and stop():
            not_run[name] = "time budget spent before its warm-up"
            continue
        try:  # the compiler runs in the first steps: a failure to compile shows here
            torch.manual_seed(0)
            step = arm_step(name, case.build(1, classes).to(device), device)
            for _ in range(warmup * (3 if ARMS[name][2] else 1)):
                step(batch)
            sync()
            steps_of[name] = step
        except Exception as err:  # report, keep the others
            errors[name] = short_error(err)
            free_device_memory(device)
    peaks: dict[str, float] = {}

    def run(name: str) -> float | None:
        if name in errors:  # failed in an earlier round
            return None
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            rate = images_per_second(steps_of[name], batch, steps, sync)
            if cuda:
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            return rate
        except Exception as err:
            errors[name] = short_error(err)
            steps_of.pop(name)  # its network and optimiser state go with it
            free_device_memory(device)
            return None

    runs = alternate({name: lambda name=name: run(name) for name in steps_of}, repeats, stop)
    rates = {name: median(r for r in rs if r is not None) for name, rs in runs.items() if name not in errors}
    flops = train_flops(case.build(1, classes).to(device), batch["image"], batch["mask"]) / case.batch_size
    return {
        "images_per_s": {k: round(v, 2) for k, v in rates.items()},
        "speedup_vs_fp32": {k: ratio(v, rates["fp32"]) for k, v in rates.items()} if "fp32" in rates else {},
        "flops_per_image": flops,
        "achieved_tflops": {k: round(flops * v / 1e12, 2) for k, v in rates.items()},
        "peak_memory_gib": {k: round(v, 2) for k, v in peaks.items()},
        "errors": errors,
        "not_run": not_run,
        "rounds": max((len(r) for r in runs.values()), default=0),
        "runs": runs,
        "input": {"spatial": list(case.spatial), "batch_size": case.batch_size, "about": case.about},
        "host_to_device": "none: every arm trains on one batch preloaded on the device",
    }


def data_wait(
    case: ModelCase,
    workers: Sequence[int],
    images: int,
    steps: int,
    device: torch.device,
    stop: Callable[[], bool] | None = None,
) -> dict[str, dict]:
    """Per worker count: the share of step time a bf16 + channels-last loop of the 2D ``case``, fed
    by the real training loader (``images`` phantoms of its size, default augmentation, pinned
    memory on CUDA, persistent workers), waits for data. Each step copies its batch from the
    loader's (pinned) host memory to ``device``, as ``medseg fit`` does.

    The figure is of the steady state: the loader's epoch holds every step of the loop
    (``iterations_per_epoch``), so no epoch restart falls inside it, and the first 2 x workers + 2
    steps are left out (``warmup_steps``): the workers' start and the first fill of their prefetch
    queues (2 batches each), which either wait for set-up or hand over batches made before the
    loop began. ``stop()`` (a time budget spent), asked before each worker count, leaves the
    remaining counts out (``{"not_run": ...}``).
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    waits: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_dataset(Path(tmp) / "data", num_images=images, size=case.spatial[-1])
        for count in workers:
            if stop is not None and stop():
                waits[str(count)] = {"not_run": "time budget spent before it started"}
                continue
            warmup = 2 * count + 2
            data = datamodule(root, case.batch_size, count, iterations_per_epoch=warmup + steps + 1)
            torch.manual_seed(0)
            step = arm_step("bf16_cl", case.build(data.in_channels, data.num_classes).to(device), device)
            loader = data.train_dataloader()
            waits[str(count)] = wait_fraction(loader, step, steps, warmup, sync) | {
                "warmup_steps": warmup,
                "steps": steps,
                "batches_per_epoch": len(loader),
            }
    return waits


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch (default: %(default)s)")
    parser.add_argument("--features", type=int, nargs="+", default=list(FULL_WIDTH))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per arm and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per arm (compile: more)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the arms (default: %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile arm")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the bf16 matmul benchmark")
    parser.add_argument(
        "--images",
        type=int,
        default=160,
        help="phantoms for the data-wait measurement (default: %(default)s)",
    )
    parser.add_argument(
        "--wait-workers", type=int, nargs="+", default=None, help="default: 2 and the config's"
    )
    parser.add_argument("--wait-steps", type=int, default=40, help="timed steps of the data-wait loop")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: the tests' dry run
    parser.add_argument("--output", type=Path, default=RESULTS / "gpu_throughput.json")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        result = {"skipped": "no CUDA GPU available", "machine": machine_info()}
        print("gpu throughput: skipped, no CUDA GPU available (run it on a GPU machine: make bench)")
        write_json(opts.output, result)
        return result
    torch.backends.cudnn.benchmark = True  # trainer.benchmark: true
    workers = default_workers()
    arms = [name for name in ARMS if not (opts.no_compile and ARMS[name][2])]
    case = unet2d(opts.size, opts.batch_size, opts.features)
    measured = measure_case(case, device, opts.steps, opts.warmup, opts.repeats, arms)
    matmul = matmul_tflops(device, opts.matmul_size, 20 if device.type == "cuda" else 2, torch.bfloat16)
    waits = data_wait(case, opts.wait_workers or sorted({2, workers}), opts.images, opts.wait_steps, device)
    rates = measured["images_per_s"]
    result = {
        "device": machine_info()["device"] if device.type == "cuda" else "cpu (dry run)",
        **measured,
        "matmul_tflops": round(matmul, 2),
        "fraction_of_matmul": {k: ratio(v, matmul) for k, v in measured["achieved_tflops"].items()},
        "wait_fraction": {w: round(r["wait_fraction"], 4) for w, r in waits.items()},
        "wait_fraction_default_workers": workers,
        "fed_images_per_s": {w: round(r["images_per_s"], 2) for w, r in waits.items()},
        "settings": {k: v for k, v in vars(opts).items() if k != "output"},
        "machine": machine_info(),
    }
    print(
        f"gpu throughput on {result['device']} ({opts.size}x{opts.size}, batch {opts.batch_size}): "
        + ", ".join(f"{k} {v:.1f} img/s ({result['speedup_vs_fp32'][k]:.2f}x)" for k, v in rates.items())
        + f"; {measured['flops_per_image'] / 1e9:.1f} GFLOP/image, matmul {matmul:.1f} TFLOP/s; data wait "
        + ", ".join(f"{w} workers {100 * r['wait_fraction']:.1f}%" for w, r in waits.items())
        + (f"; failed: {measured['errors']}" if measured["errors"] else "")
    )
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
