"""Training throughput of ``medseg fit`` against a bare PyTorch loop on the same batches.

    python benchmarks/training_overhead.py            # about 3-5 minutes on a 2-core CPU
    python benchmarks/training_overhead.py --steps 20 --repeats 5
    python benchmarks/training_overhead.py --dims 3   # the 3D UNet on planned patches of volumes

Three arms train the default UNet (``configs/model/unet.yaml``: features 16..256) on the same
preloaded batches (default phantoms, 128x128, batch 8, augmented once by the training loader and
kept in memory, so data loading is out of the comparison; ``data_loading.py`` measures it).
``--dims 3`` trains the 3D UNet (``configs/model/unet3d.yaml``, ``configs/data/msd.yaml``) on 3D
patches of ``medseg data synth --volumes`` cases instead, at the patch, batch, strides and kernel
sizes the plan gives them on this device (``--patch``, ``--batch-size`` override them): the fit
and the bare loop get that planned network, MONAI's baseline is its 3D ``BasicUNet``, and every
figure per image is per patch.

- ``pipeline``: what ``medseg fit -c configs/default.yaml -c configs/model/unet.yaml -c
  configs/data/synthetic.yaml`` builds (``pipeline.cli.lightning.run_lightning``): SegmentationModule, every
  callback of ``default.yaml`` (gradient-flow logging at its default ``log_every_n_steps`` 10,
  weight-update, activation and image monitors, checkpoints, learning-rate monitor), the callbacks
  ``medseg fit`` adds (divergence guard, batch seeds, SIGTERM checkpoint, run summary), W&B
  (offline) and CSV loggers, gradient clipping at 1.0, the precision the CLI chooses. Off: the
  progress bar and the model summary (terminal displays) and validation (limit_val_batches 0).
- ``bare``: a hand-written step with the same network, loss (MONAI DiceCE), AdamW parameter
  groups, per-step warm-up/cosine schedule and gradient clipping, in the same precision (bf16
  autocast and channels-last where the pipeline uses them, on CUDA).
- ``monai``: the same bare step with MONAI's ``BasicUNet`` of the same widths, batch norm and
  ReLU: how our UNet compares with the field's reference implementation. The two do different
  work per image (BasicUNet's decoder convolves at other widths): ``flops_per_image`` (forward +
  backward, ``torch.utils.flop_counter``) states it, and ``ours_vs_monai_flop_rate`` compares
  the FLOP/s each achieves.

Every arm starts its step from the same batch in pinned host memory and copies it to the GPU
(asynchronously, ``non_blocking``) inside its timed step: Lightning does so for the pipeline, each
bare step for itself (``host_to_device`` in the result says so; on a CPU there is no copy).

The arms are interleaved step by step, so a burst of load from other jobs on a shared machine hits
them alike: before every pipeline step, a callback runs one bare step of each baseline network on
the same batch, timing each; the pipeline step is timed from the end of that callback to its next
call (everything Lightning does per step: hooks, forward, backward, callbacks, logging,
optimiser, fetching the next batch). Each fit skips ``warmup`` steps, then times ``steps`` (a
multiple of the logging interval, so logging steps count at their real share); a fit's images/s
per arm is ``steps x batch / time``, and the figures are medians over ``repeats`` fits.
``ratio`` = pipeline / bare (target >= 0.95); ``cpu_ratio`` compares this process's CPU seconds
per step the same way; ``median_step_ratio`` the median step times over all fits (robust to load
spikes, but blind to work done every n steps, such as logging).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.networks.nets import BasicUNet  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import RESULTS, machine_info, median, quiet, ratio, train_flops, write_json  # noqa: E402
from benchmarks.preloaded import CONFIGS, CONFIGS_OF, model_init_args, planned_network, preload, preloaded_fit  # noqa: E402
from pipeline.data.synthesis.phantoms_2d import generate_dataset  # noqa: E402
from pipeline.data.synthesis.phantoms_3d import generate_volumes  # noqa: E402
from pipeline.models import UNet  # noqa: E402
from pipeline.training.precision import autocast_dtype  # noqa: E402

HOST_TO_DEVICE = {  # what every arm's timed step includes, by device
    "cuda": "every arm copies its batch from pinned host memory to the GPU within its timed step",
    "cpu": "no copy: the batches are in the memory the CPU trains in",
}


def bare_step(
    net: nn.Module,
    lr: float,
    clip: float,
    total: int,
    dtype: torch.dtype | None,
    memory_format: torch.memory_format = torch.contiguous_format,
    device: torch.device | None = None,
) -> Callable[[dict], None]:
    """One hand-written training step of ``net``: DiceCE, AdamW (no decay on biases and norms),
    linear warm-up then cosine over ``total`` steps, global-norm clipping at ``clip``; weights and
    inputs in ``memory_format``, autocast to ``dtype`` if given. With ``device``, the step first
    copies the batch there (``non_blocking``, as Lightning moves a batch: asynchronous from pinned
    memory); a batch already there is not copied."""
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / total) * 0.5 * (1 + math.cos(math.pi * step / total))
    )
    net.to(memory_format=memory_format)  # before the optimiser state exists, as medseg fit does
    net.train()

    def step(batch: dict) -> None:
        image, mask = batch["image"], batch["mask"]
        if device is not None:
            image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        with torch.autocast(image.device.type, dtype=dtype, enabled=dtype is not None):
            logits = net(image.contiguous(memory_format=memory_format))
            loss = loss_fn(logits, mask[:, None])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
        schedule.step()

    return step


class PairedSteps(pl.Callback):
    """Before every pipeline step, one bare step of each baseline network on the same batch.

    Args:
        baselines: name -> a function building the baseline network (on the CPU).
        lr, clip: the pipeline's learning rate and gradient clipping.
        host_batches: the fit's batches in host memory, in the order it trains on them (one
            epoch). Given, each baseline step starts from batch k's host copy and moves it to the
            device itself, inside its timed step, as the pipeline's step includes Lightning's
            copy of the next batch; without them the baselines get the batch Lightning already
            moved (no copy: the same on a CPU, not on a GPU).

    ``seconds[name]`` and ``cpu[name]`` hold per-step wall and process CPU seconds for every
    baseline and for ``pipeline`` (its step k runs from the end of this hook at batch k to its
    start at batch k + 1).
    """

    def __init__(
        self,
        baselines: dict[str, Callable[[], nn.Module]],
        lr: float,
        clip: float,
        host_batches: list[dict] | None = None,
    ) -> None:
        self.baselines, self.lr, self.clip, self.host_batches = baselines, lr, clip, host_batches
        self.steps: dict[str, Callable[[dict], None]] = {}
        self.seconds: dict[str, list[float]] = {name: [] for name in ["pipeline", *baselines]}
        self.cpu: dict[str, list[float]] = {name: [] for name in self.seconds}
        self._sync: Callable[[], None] = lambda: None
        self._end: tuple[float, float] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cuda = pl_module.device.type == "cuda"
        dtype = autocast_dtype(trainer.precision)
        total = trainer.estimated_stepping_batches
        for name, build in self.baselines.items():
            torch.manual_seed(0)
            net = build().to(pl_module.device)
            # the memory format SegmentationModule chose for this device
            self.steps[name] = bare_step(
                net, self.lr, self.clip, total, dtype, pl_module.memory_format, pl_module.device
            )
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)

    def _mark(self) -> tuple[float, float]:
        self._sync()
        return time.perf_counter(), time.process_time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        start = self._mark()
        if self._end is not None:
            self.seconds["pipeline"].append(start[0] - self._end[0])
            self.cpu["pipeline"].append(start[1] - self._end[1])
        names = list(self.steps) if batch_idx % 2 == 0 else list(reversed(self.steps))  # no arm always first
        if self.host_batches is not None:
            batch = self.host_batches[batch_idx]
        for name in names:
            self.steps[name](batch)
            end = self._mark()
            self.seconds[name].append(end[0] - start[0])
            self.cpu[name].append(end[1] - start[1])
            start = end
        self._end = start

    def rates(self, warmup: int, steps: int, batch_size: int) -> dict[str, dict[str, float]]:
        """Per arm: images/s and CPU seconds per step over steps ``warmup`` .. ``warmup + steps``."""
        window = slice(warmup, warmup + steps)
        out = {}
        for name, seconds in self.seconds.items():
            if len(seconds) < warmup + steps:
                raise RuntimeError(f"{name}: only {len(seconds)} steps timed, {warmup + steps} needed")
            out[name] = {
                "images_per_s": steps * batch_size / sum(seconds[window]),
                "cpu_s_per_step": sum(self.cpu[name][window]) / steps,
            }
        return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D UNet or 3D (default: 2)")
    parser.add_argument(
        "--size", type=int, default=128, help="2D: phantom side in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--volumes", type=int, default=20, help="3D: generated volumes (default: %(default)s)"
    )
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="3D: D H W (default: planned)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 (2D), planned (3D)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per fit (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="fits (default: %(default)s)")
    parser.add_argument("--features", type=int, nargs="+", default=None, help="default: the model config's")
    parser.add_argument("--no-monai", action="store_true", help="leave out the MONAI BasicUNet arm")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds: start no further fit after this (>= 1 fit)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "training_overhead.json")
    # the other arguments go to medseg fit (e.g. --trainer.accelerator cpu)
    opts, extra = parser.parse_known_args(argv)
    began = time.perf_counter()  # of the budget: data and batches included
    quiet()  # W&B offline; Lightning's set-up lines and known warnings off
    configs = CONFIGS_OF[opts.dims]
    init_args = model_init_args(configs[0]) | ({"features": opts.features} if opts.features else {})
    features = list(init_args["features"])
    defaults = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    lr, clip = defaults["model"]["lr"], defaults["trainer"]["gradient_clip_val"]
    if opts.features:
        extra += ["--model.net.init_args.features", str(features)]
    runs: list[dict] = []
    steps: dict[str, list[float]] = {}  # every timed step's seconds, per arm
    count = opts.warmup + opts.steps + 1  # the last batch's start closes the pipeline's timed window
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if opts.dims == 3:
            root = generate_volumes(work / "data", num_cases=opts.volumes)
            settings = {"spatial_dims": 3, "patch_size": opts.patch, "iterations_per_epoch": count}
        else:
            opts.batch_size, settings = opts.batch_size or 8, {}
            root = generate_dataset(work / "data", num_images=max(10, 2 * opts.batch_size), size=opts.size)
        batches, data = preload(root, opts.batch_size, count, features, **settings)
        planned, flags = planned_network(data, opts.dims)
        init_args |= planned
        extra = [*flags, *extra]
        channels, classes, batch_size = data.in_channels, data.num_classes, data.batch_size
        baselines = {"bare": lambda: UNet(channels, classes, **init_args)}
        # BasicUNet has five levels and halves every side four times
        if not opts.no_monai and len(features) == 5 and min(batches[0]["image"].shape[2:]) >= 16:
            baselines["monai"] = lambda: BasicUNet(
                opts.dims, channels, classes, (*features, features[0]), act="relu", norm="batch"
            )
        for _ in range(opts.repeats):
            if runs and opts.budget is not None and time.perf_counter() - began > opts.budget:
                break
            paired = PairedSteps(baselines, lr, clip, host_batches=batches)
            preloaded_fit(work, root, batches, [paired], extra, configs)
            runs.append(paired.rates(opts.warmup, opts.steps, batch_size))
            window = slice(opts.warmup, opts.warmup + opts.steps)
            for name, seconds in paired.seconds.items():
                steps.setdefault(name, []).extend(seconds[window])
        # FLOPs of one training image (patch), so the two networks' speeds compare per unit of work
        image, mask = batches[0]["image"][:2], batches[0]["mask"][:2]
        flops = {name: train_flops(build(), image, mask) / len(image) for name, build in baselines.items()}
    rates = {name: median(r[name]["images_per_s"] for r in runs) for name in runs[0]}
    cpu = {name: median(r[name]["cpu_s_per_step"] for r in runs) for name in runs[0]}
    shape = list(batches[0]["image"].shape[2:])
    result = {
        "images_per_s": {k: round(v, 3) for k, v in rates.items()},
        "ratio": ratio(rates["pipeline"], rates["bare"]),
        "cpu_ratio": ratio(cpu["bare"], cpu["pipeline"]),
        # robust to load spikes, blind to work done every n steps (logging): a cross-check
        "median_step_ratio": ratio(median(steps["bare"]), median(steps["pipeline"])),
        "median_step_s": {k: round(median(v), 4) for k, v in steps.items()},
        "cpu_s_per_step": {k: round(v, 4) for k, v in cpu.items()},
        "flops_per_image": flops,
        "runs": runs,
        "fits": len(runs),
        "stopped_at_budget": len(runs) < opts.repeats,
        "host_to_device": HOST_TO_DEVICE["cuda" if torch.cuda.is_available() else "cpu"],
        "settings": {k: v for k, v in vars(opts).items() if k != "output"}
        | {"features": features, "batch_size": batch_size, "input": shape, **planned},
        "machine": machine_info(),
    }
    if "monai" in rates:
        result["ours_vs_monai"] = ratio(rates["bare"], rates["monai"])
        # achieved FLOP/s, ours / MONAI's: above 1, ours runs faster per FLOP, not just does fewer
        result["ours_vs_monai_flop_rate"] = ratio(
            rates["bare"] * flops["bare"], rates["monai"] * flops["monai"]
        )
    unit, per_s = ("patch", "patches/s") if opts.dims == 3 else ("image", "img/s")
    print(
        f"training {opts.dims}D: medseg fit {rates['pipeline']:.2f} {per_s}, bare loop {rates['bare']:.2f} "
        f"{per_s}, ratio {result['ratio']:.3f} (target >= 0.95; CPU time {result['cpu_ratio']:.3f})"
        + (
            f"; bare UNet / MONAI BasicUNet {result['ours_vs_monai']:.3f} ({flops['bare'] / 1e9:.2f} vs "
            f"{flops['monai'] / 1e9:.2f} GFLOP/{unit}; per FLOP {result['ours_vs_monai_flop_rate']:.3f})"
            if "monai" in rates
            else ""
        )
        + f" ({'x'.join(map(str, shape))}, batch {batch_size}, {opts.steps} steps x {len(runs)} fits"
        + (f", stopped at the {opts.budget:g} s budget" if result["stopped_at_budget"] else "")
        + f"; {result['host_to_device']})"
    )
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
