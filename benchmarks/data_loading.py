"""Samples per second of the augmented training loader per worker count, against the model's appetite.

    python benchmarks/data_loading.py                       # about 1-2 minutes on a 2-core CPU
    python benchmarks/data_loading.py --workers 0 1 2 4 --consumption 10.8

Builds the training loader exactly as ``medseg fit`` does (``SegmentationDataModule`` with the
default augmentation: flips, rotation/scaling, elastic, intensity; the foreground sampler; seeded
per-sample augmentation; persistent workers) over the default phantom data set (128x128), and
measures:

- ``loader``: samples/s of the loader alone (iterated without a model) for each worker count,
  worker start-up and the first ``warmup`` batches left out, epochs crossed as in training;
  the worker counts alternate over ``repeats`` rounds, medians reported;
- ``consumption``: images/s the default UNet trains at with the same batch (a bare loop on
  preloaded batches, or the figure given with ``--consumption``, e.g. from
  ``training_overhead.py``);
- ``wait_fraction``: a bare training loop fed by the real loader with the default worker count
  (``data.num_workers: null``: one per core, 2 here): the share of step time spent waiting for
  the next batch. On a CPU the model and the
  workers share the cores, so this is the honest end-to-end figure; the loader-alone rate has
  every core to itself.

``ratio`` = loader samples/s with the default workers / consumption (target >= 3 on the CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import torch  # noqa: E402
import yaml  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.common import RESULTS, alternate, machine_info, median, ratio, write_json  # noqa: E402
from pipeline.data.datamodule import SegmentationDataModule, auto_workers  # noqa: E402
from pipeline.data.synthetic import generate_dataset  # noqa: E402
from pipeline.models import UNet  # noqa: E402

CONFIGS = REPO / "configs"


def endless(loader: DataLoader) -> Iterator[dict]:
    """Batches of ``loader`` across epoch boundaries, as a training run sees them."""
    while True:
        yield from loader


def datamodule(root: Path, batch_size: int, workers: int, **kwargs: object) -> SegmentationDataModule:
    """The data module ``medseg fit`` builds for the data set at ``root``, set up for training."""
    data = SegmentationDataModule(root=str(root), batch_size=batch_size, num_workers=workers, **kwargs)
    data.setup("fit")
    return data


def loader_rate(loader: DataLoader, batches: int, warmup: int) -> float:
    """Samples/s of ``loader`` over ``batches`` batches after ``warmup`` (start-up) batches."""
    stream = endless(loader)
    for _ in range(warmup):
        next(stream)
    samples, start = 0, time.perf_counter()
    for _ in range(batches):
        samples += len(next(stream)["image"])
    return samples / (time.perf_counter() - start)


def wait_fraction(
    loader: DataLoader, step: Callable[[dict], None], steps: int, warmup: int, sync: Callable[[], None]
) -> dict:
    """Share of wall time a training loop spends waiting in ``next(loader)``.

    ``step(batch)`` trains on one batch (moving it to the device itself); ``sync()`` waits for the
    device (``torch.cuda.synchronize``, or nothing on a CPU), called at the window's ends only, so
    queued device work overlaps with loading as in real training.
    """
    stream = endless(loader)
    for _ in range(warmup):
        step(next(stream))
    sync()
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        batch = next(stream)
        waited += time.perf_counter() - before
        step(batch)
    sync()
    total = time.perf_counter() - start
    return {"wait_fraction": waited / total, "images_per_s": steps * len(batch["image"]) / total}


def training_step(
    net: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Callable[[dict], None]:
    """A bare AdamW step of ``net`` with MONAI's DiceCE loss; the batch is moved to ``device``
    without blocking, autocast to ``dtype`` if given, in ``memory_format`` (weights: the caller's)."""
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step(batch: dict) -> None:
        image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        mask = batch["mask"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(net(image), mask[:, None])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def default_workers() -> int:
    """The loader workers ``medseg fit`` uses with the default data config on this machine."""
    workers = yaml.safe_load((CONFIGS / "data" / "synthetic.yaml").read_text())["data"]["num_workers"]
    return auto_workers() if workers is None else workers


def default_net(in_channels: int, classes: int) -> torch.nn.Module:
    """The default model config's UNet (``configs/model/unet.yaml``)."""
    init_args = yaml.safe_load((CONFIGS / "model" / "unet.yaml").read_text())["model"]["net"]["init_args"]
    return UNet(in_channels, classes, **init_args)


def consumption_rate(root: Path, batch_size: int, steps: int) -> float:
    """Images/s the default UNet trains at on this CPU, on preloaded batches (median step)."""
    data = datamodule(root, batch_size, 0)
    batches = [b for _, b in zip(range(steps + 1), endless(data.train_dataloader()), strict=False)]
    step = training_step(default_net(data.in_channels, data.num_classes), torch.device("cpu"))
    step(batches[0])  # untimed: first-call allocations
    seconds = []
    for batch in batches[1:]:
        start = time.perf_counter()
        step(batch)
        seconds.append(time.perf_counter() - start)
    return batch_size / median(seconds)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="phantom folder (default: generate one)")
    parser.add_argument("--images", type=int, default=120, help="phantoms to generate (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="phantom side in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts to time")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first batches (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the worker counts")
    parser.add_argument("--consumption", type=float, default=None, help="model images/s (default: measure)")
    parser.add_argument("--wait-steps", type=int, default=8, help="timed steps of the wait-fraction loop")
    parser.add_argument("--output", type=Path, default=RESULTS / "data_loading.json")
    opts = parser.parse_args(argv)
    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = opts.data or generate_dataset(Path(tmp) / "data", num_images=opts.images, size=opts.size)
        runs = alternate(
            {
                w: lambda w=w: loader_rate(
                    datamodule(root, opts.batch_size, w).train_dataloader(), opts.batches, opts.warmup
                )
                for w in opts.workers
            },
            opts.repeats,
        )
        consumption = opts.consumption or consumption_rate(root, opts.batch_size, steps=4)
        data = datamodule(root, opts.batch_size, workers)
        step = training_step(default_net(data.in_channels, data.num_classes), torch.device("cpu"))
        waiting = wait_fraction(data.train_dataloader(), step, opts.wait_steps, 2, lambda: None)
    rates = {str(w): round(median(r), 2) for w, r in runs.items()}
    result = {
        "loader_samples_per_s": rates,
        "consumption_images_per_s": round(consumption, 3),
        "ratio": ratio(rates.get(str(workers), float("nan")), consumption, 2),
        "ratio_per_workers": {w: ratio(r, consumption, 2) for w, r in rates.items()},
        "wait_fraction": round(waiting["wait_fraction"], 4),
        "wait_fraction_workers": workers,
        "fed_training_images_per_s": round(waiting["images_per_s"], 3),
        "runs": {str(w): [round(x, 2) for x in r] for w, r in runs.items()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items() if k != "output"},
        "machine": machine_info(),
    }
    print(
        "data loading: "
        + ", ".join(f"{w} workers {r:.0f} samples/s" for w, r in rates.items())
        + f"; model trains at {consumption:.2f} img/s: {workers} workers = {result['ratio']:.1f}x "
        "(target >= 3x); "
        f"training fed by {workers} workers waits {100 * waiting['wait_fraction']:.1f}% of the time"
    )
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
