"""The augmented training loader while it feeds training, against training on preloaded batches.

    python benchmarks/data_loading.py                       # about 1-2 minutes on a 2-core CPU
    python benchmarks/data_loading.py --workers 0 1 2 4 --fed-steps 20

Builds the training loader exactly as ``medseg fit`` does (``SegmentationDataModule`` with the
default augmentation: flips, rotation/scaling, elastic, intensity; the foreground sampler; seeded
per-sample augmentation; persistent workers) over the default phantom data set (128x128), and
measures, for the default UNet with the same batch:

- ``fed``: a bare training loop fed by that loader with the default worker count
  (``data.num_workers: null``: one per core, 2 here): images/s, and the share of step time spent
  waiting for the next batch (``wait_fraction``). On a CPU the workers share the cores with the
  model, so this is the figure that counts: what the loader delivers while training runs;
- ``preloaded``: the same loop, the same network, on batches the loader made beforehand, in
  memory: what training would do with a loader that costs nothing. The two alternate (ABBA)
  over ``repeats`` rounds, medians reported;
- ``loader``: samples/s of the loader alone (iterated without a model, every core to itself) per
  worker count, for scale.

``ratio`` = fed / preloaded images/s (target >= 0.9); ``wait_fraction`` target <= 0.1.
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
from pipeline.data.synthesis.phantoms_2d import generate_dataset  # noqa: E402
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


def fed_and_preloaded(root: Path, batch_size: int, workers: int, steps: int, repeats: int) -> dict[str, list]:
    """``wait_fraction`` results of the loop fed by the loader with ``workers`` and of the same loop
    on preloaded batches, alternating over ``repeats`` rounds."""
    data = datamodule(root, batch_size, workers)
    preloaded = [
        b
        for _, b in zip(
            range(steps + 2), endless(datamodule(root, batch_size, 0).train_dataloader()), strict=False
        )
    ]
    step = training_step(default_net(data.in_channels, data.num_classes), torch.device("cpu"))
    loader = data.train_dataloader()  # persistent workers: started once, kept across the rounds

    def no_sync() -> None:
        pass

    return alternate(
        {
            "fed": lambda: wait_fraction(loader, step, steps, 2, no_sync),
            "preloaded": lambda: wait_fraction(preloaded, step, steps, 2, no_sync),
        },
        repeats,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="phantom folder (default: generate one)")
    parser.add_argument("--images", type=int, default=120, help="phantoms to generate (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="phantom side in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (default: %(default)s)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts of the loader alone"
    )
    parser.add_argument("--batches", type=int, default=30, help="timed batches of the loader alone")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first batches (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default: %(default)s)")
    parser.add_argument("--fed-steps", type=int, default=12, help="timed steps of the training loops")
    parser.add_argument("--output", type=Path, default=RESULTS / "data_loading.json")
    opts = parser.parse_args(argv)
    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = opts.data or generate_dataset(Path(tmp) / "data", num_images=opts.images, size=opts.size)
        alone = alternate(
            {
                w: lambda w=w: loader_rate(
                    datamodule(root, opts.batch_size, w).train_dataloader(), opts.batches, opts.warmup
                )
                for w in opts.workers
            },
            opts.repeats,
        )
        loops = fed_and_preloaded(root, opts.batch_size, workers, opts.fed_steps, opts.repeats)
    rates = {str(w): round(median(r), 2) for w, r in alone.items()}
    fed, preloaded = (median(r["images_per_s"] for r in loops[arm]) for arm in ("fed", "preloaded"))
    waiting = median(r["wait_fraction"] for r in loops["fed"])
    result = {
        "fed_images_per_s": round(fed, 3),
        "preloaded_images_per_s": round(preloaded, 3),
        "ratio": ratio(fed, preloaded),
        "wait_fraction": round(waiting, 4),
        "fed_workers": workers,
        "loader_samples_per_s": rates,
        "loader_vs_preloaded_training": {w: ratio(r, preloaded, 2) for w, r in rates.items()},
        "runs": {"loader": {str(w): [round(x, 2) for x in r] for w, r in alone.items()}, **loops},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items() if k != "output"},
        "machine": machine_info(),
    }
    print(
        f"data loading: training fed by {workers} workers {fed:.2f} img/s vs {preloaded:.2f} on preloaded "
        f"batches: ratio {result['ratio']:.3f} (target >= 0.9), waiting {100 * waiting:.1f}% of step time "
        "(target <= 10%); the loader alone: "
        + ", ".join(f"{w} workers {r:.0f} samples/s" for w, r in rates.items())
    )
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
