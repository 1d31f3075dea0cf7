"""Step-time overhead of GradientFlowMonitor logging every step, against the same fit without it.

    python benchmarks/gradient_monitor_overhead.py             # about 1-2 minutes on a 2-core CPU
    python benchmarks/gradient_monitor_overhead.py --size 64 --repeats 5

Generates phantoms (the default data set's 128x128), then runs the same short fit of the default
UNet (features 16..256, batch 8, AdamW, Dice + CE, W&B offline + CSV loggers as ``medseg fit``
sets them up, ``log_every_n_steps`` 1) ``repeats`` times with and ``repeats`` times without
``GradientFlowMonitor(log_every_n_steps=1)``, alternating, so a change in machine load hits both
alike. A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
backward, the monitor, the optimiser step); the first ``warmup`` steps of each fit are left out.

Prints and records (``benchmarks/results/gradient_monitor_overhead.json``):

- ``ratio``: median step time with the monitor / median step time without (target <= 1.03);
- ``ratio_cpu``: the same with this process's CPU time, less sensitive to other processes on a
  shared machine (the W&B service process is not counted in it);
- ``hook_share``: median time inside the monitor's hook / median step time without it, the same
  overhead measured directly, free of the step-to-step noise of a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import pytorch_lightning as pl  # noqa: E402

from benchmarks.common import RESULTS, machine_info, write_json  # noqa: E402
from pipeline.data.datamodule import SegmentationDataModule  # noqa: E402
from pipeline.data.synthesis.phantoms_2d import generate_dataset  # noqa: E402
from pipeline.models import UNet  # noqa: E402
from pipeline.monitors.gradients import GradientFlowMonitor  # noqa: E402
from pipeline.run.loggers import RunConfig, build_loggers  # noqa: E402
from pipeline.training.module import SegmentationModule  # noqa: E402


class StepTimer(pl.Callback):
    """Wall and process CPU time of every training step (the batch loop body), in seconds."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start[0])
        self.cpu_seconds.append(time.process_time() - self._start[1])


class TimedMonitor(GradientFlowMonitor):
    """GradientFlowMonitor that also records the wall time of its per-step hook."""

    def __init__(self) -> None:
        super().__init__(log_every_n_steps=1, plot_every_n_epochs=0)
        self.hook_seconds: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.hook_seconds.append(time.perf_counter() - start)


def one_fit(data: Path, work: Path, monitor: bool, steps: int, batch_size: int, features: list[int]) -> dict:
    """Step times (and hook times with the monitor) of one fit of ``steps`` training steps."""
    import wandb

    pl.seed_everything(0, verbose=False)
    datamodule = SegmentationDataModule(root=str(data), batch_size=batch_size, num_workers=0)
    net = UNet(datamodule.in_channels, datamodule.num_classes, features=features)
    module = SegmentationModule(net, class_names=datamodule.class_names, lr=3e-3, hd95=False)
    timer, callbacks = StepTimer(), []
    if monitor:
        callbacks.append(TimedMonitor())
    run_dir = work / ("with" if monitor else "without")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        log_every_n_steps=1,
        logger=build_loggers(run_dir, RunConfig(), run_dir.name, []),
        callbacks=[timer, *callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    trainer.fit(module, datamodule)
    wandb.finish()
    return {
        "steps": timer.seconds,
        "cpu": timer.cpu_seconds,
        "hooks": callbacks[0].hook_seconds if monitor else [],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="phantom side in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per fit (default: %(default)s)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed first steps per fit (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="fits per arm (default: %(default)s)")
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--output", type=Path, default=RESULTS / "gradient_monitor_overhead.json")
    opts = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    times: dict[str, list[float]] = {"with": [], "without": []}
    cpu: dict[str, list[float]] = {"with": [], "without": []}
    hooks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = opts.batch_size * opts.steps * 5 // 4 + 1  # 80% train split covers every step
        data = generate_dataset(work / "data", num_images=images, size=opts.size, seed=0)
        for _ in range(opts.repeats):
            for arm in ("with", "without"):
                fit = one_fit(data, work, arm == "with", opts.steps, opts.batch_size, opts.features)
                times[arm] += fit["steps"][opts.warmup :]
                cpu[arm] += fit["cpu"][opts.warmup :]
                hooks += fit["hooks"][opts.warmup :]
    with_s, without_s = statistics.median(times["with"]), statistics.median(times["without"])
    result = {
        "ratio": round(with_s / without_s, 4),
        "ratio_cpu": round(statistics.median(cpu["with"]) / statistics.median(cpu["without"]), 4),
        "hook_share": round(statistics.median(hooks) / without_s, 4),
        "median_step_s": {"with": round(with_s, 4), "without": round(without_s, 4)},
        "median_hook_ms": round(1000 * statistics.median(hooks), 3),
        "timed_steps_per_arm": len(times["with"]),
        "settings": {k: v for k, v in vars(opts).items() if k != "output"},
        "machine": machine_info(),
    }
    print(
        f"GradientFlowMonitor every step: median step {1000 * with_s:.1f} ms with, {1000 * without_s:.1f} ms "
        f"without, ratio {result['ratio']:.4f} (process CPU time: {result['ratio_cpu']:.4f}); hook {result['median_hook_ms']:.2f} ms = "
        f"{100 * result['hook_share']:.2f}% of a step ({len(times['with'])} steps per arm, "
        f"{opts.size}x{opts.size}, batch {opts.batch_size})"
    )
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
