"""Train medseg on DRIVE or ISBI 2012 EM and score the held-out images as the field does.

    python benchmarks/real_data.py drive --data ../shared/data/drive_retinal_vessels
    python benchmarks/real_data.py isbi_em --data ../shared/data/isbi2012_em_membranes
    python benchmarks/real_data.py drive --quick          # about a minute: checks the whole path
    python benchmarks/real_data.py drive -- --trainer.accelerator gpu   # medseg flags after `--`

- ``drive``: the official split: trains on ids 21-40 (4 of them validate and pick the best
  checkpoint) and tests on ids 01-20, scoring only pixels inside each image's field of view
  (``fov/<id>.png``): vessel F1 (= Dice) per image and over all test pixels, accuracy,
  sensitivity, specificity, AUC.
- ``isbi_em``: a seeded 24/6 split of the 30 labelled slices (3 of the 24 validate), membrane as
  the foreground class (``configs/data/isbi_em.yaml`` swaps the stored labels); membrane Dice and
  pixel error (1 - pixel accuracy) on the 6 held-out slices.

Steps: write ``<out>/<set>/split.json``; ``medseg fit`` with ``configs/default.yaml``,
``configs/model/unet.yaml`` and ``configs/data/<set>.yaml``; load ``best.ckpt``; predict the test
images with the module's own sliding-window ``predict_logits``; write ``benchmark.json``,
``per_image.csv`` and ``predictions/<id>.png`` into the run directory ``<out>/<set>/<name>/``.
The data path defaults to ``../shared/data/<folder>`` beside the repository.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from benchmarks.region_metrics import (  # noqa: E402
    Prediction,
    held_out_dataset,
    load_module,
    predict_all,
    predictor,
    score,
)
from pipeline.cli import main as medseg  # noqa: E402
from pipeline.data.datamodule import make_split  # noqa: E402
from pipeline.data.reading.formats import write_png  # noqa: E402
from pipeline.data.reading.layouts import discover  # noqa: E402
from pipeline.errors import DataError  # noqa: E402
from pipeline.files import atomic_write  # noqa: E402
from pipeline.run.naming import dataset_name  # noqa: E402


def drive_split(ids: list[str], seed: int) -> dict[str, list[str]]:
    """DRIVE's official split: ids 01-20 test, 21-40 train (a seeded 20% of those validate)."""
    try:
        test = [cid for cid in ids if int(cid) <= 20]
    except ValueError:
        raise DataError("split", f"DRIVE ids are numbers 01-40, got {ids[:3]}...") from None
    split = make_split([cid for cid in ids if cid not in test], 0.2, 0.0, seed)
    return {**split, "test": sorted(test)}


def isbi_split(ids: list[str], seed: int) -> dict[str, list[str]]:
    """A seeded 24/6 split of the slices; a seeded 10% of all slices (3 of the 24) validate."""
    return make_split(ids, 0.1, 0.2, seed)


@dataclass(frozen=True)
class DataSet:
    """A benchmark data set: its folder under ``../shared/data``, scored region masks, split, budget."""

    folder: str
    region: str | None
    split: Callable[[list[str], int], dict[str, list[str]]]
    epochs: int
    val_every: int


SETS = {
    # ~1.4 s per step of 8 crops on 2 CPU cores; 16 (DRIVE) or 21 (EM) training images = 2 steps an epoch
    "drive": DataSet("drive_retinal_vessels", "fov", drive_split, epochs=400, val_every=100),
    "isbi_em": DataSet("isbi2012_em_membranes", None, isbi_split, epochs=250, val_every=50),
}
FULL = {"features": [16, 32, 64, 128, 256], "patch": 128, "batch_size": 8}
QUICK = {
    "features": [8, 16, 32],
    "patch": 128,
    "batch_size": 4,
    "epochs": 2,
    "val_every": 2,
    "test_images": 4,
}


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Benchmark options, and the medseg flags given after ``--``."""
    words = list(argv)
    extra = words[words.index("--") + 1 :] if "--" in words else []
    words = words[: words.index("--")] if "--" in words else words
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(SETS))
    parser.add_argument("--data", type=Path, help="data folder (default: ../shared/data/<folder>)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "real_data", help="output folder")
    parser.add_argument(
        "--name", default=None, help="run name (default: unet-f<first width>-p<patch>-e<epochs>)"
    )
    parser.add_argument("--epochs", type=int, help="training epochs (default: the set's CPU budget)")
    parser.add_argument("--val-every", type=int, help="validate every N epochs")
    parser.add_argument("--features", type=int, nargs="+", help="UNet widths per level")
    parser.add_argument("--patch", type=int, help="square training patch side in px")
    parser.add_argument("--batch-size", type=int, help="training batch size")
    parser.add_argument("--test-images", type=int, help="score only the first N test images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    parser.add_argument("--skip-fit", action="store_true", help="score the run already in the output folder")
    parser.add_argument("--quick", action="store_true", help="a tiny run (about a minute) of the whole path")
    opts = parser.parse_args(words)
    data_set = SETS[opts.dataset]
    defaults = {**FULL, "epochs": data_set.epochs, "val_every": data_set.val_every}
    for key, value in (QUICK if opts.quick else defaults).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.data = opts.data or REPO.parent / "shared" / "data" / data_set.folder
    opts.name = opts.name or f"unet-f{opts.features[0]}-p{opts.patch}-e{opts.epochs}"
    return opts, extra


def write_split(data: Path, data_set: DataSet, seed: int, path: Path) -> dict[str, list[str]]:
    """Split the cases found in ``data`` and write ``path`` (the data module's ``split_file``)."""
    split = data_set.split(sorted(case.case_id for case in discover(data)), seed)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(split, indent=2)))
    return split


def fit_args(opts: argparse.Namespace, split_file: Path, extra: Sequence[str]) -> list[str]:
    """The ``medseg fit`` command line of the benchmark."""
    configs = REPO / "configs"
    args = [
        "fit",
        *("-c", str(configs / "default.yaml")),
        *("-c", str(configs / "model" / "unet.yaml")),
        *("-c", str(configs / "data" / f"{opts.dataset}.yaml")),
        *("--data.root", str(opts.data), "--data.split_file", str(split_file)),
        *("--data.patch_size", f"[{opts.patch}, {opts.patch}]", "--data.batch_size", str(opts.batch_size)),
        *("--model.net.init_args.features", json.dumps(opts.features)),
        *("--trainer.max_epochs", str(opts.epochs)),
        *("--trainer.check_val_every_n_epoch", str(min(opts.val_every, opts.epochs))),
        *("--trainer.enable_progress_bar", "false", "--seed_everything", str(opts.seed)),
        *("--run.root", str(opts.out), "--run.experiment", opts.dataset, "--run.name", opts.name),
    ]
    if opts.quick:
        args += ["--trainer.num_sanity_val_steps", "0", "--model.hd95", "false", "--data.num_workers", "0"]
    return [*args, *extra]


def machine() -> dict:
    """Where the numbers were measured."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__,
    }


def saving(predictions: Iterable[Prediction], folder: Path) -> Iterable[Prediction]:
    """Pass predictions through, writing each as a 0/255 PNG (``folder/<case_id>.png``)."""
    for p in predictions:
        write_png(folder / f"{p.case_id}.png", np.where(p.prob > 0.5, 255, 0).astype(np.uint8))
        yield p


def evaluate(
    run_dir: Path, data: Path, split_file: Path, region: str | None, limit: int | None = None
) -> tuple[dict, list[dict]]:
    """Score ``run_dir``'s best checkpoint on the split's test images (inside ``region`` masks)."""
    module, preprocessing = load_module(run_dir / "checkpoints" / "best.ckpt")
    if torch.cuda.is_available():
        module = module.cuda()
    dataset = held_out_dataset(data, split_file, preprocessing)
    if limit:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    predictions = predict_all(dataset, predictor(module), data / region if region else None)
    return score(saving(predictions, run_dir / "predictions"))


def write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run(argv: Sequence[str]) -> dict:
    """Split, train, evaluate and write the report; returns the report."""
    opts, extra = parse(argv)
    data_set = SETS[opts.dataset]
    split_file = opts.out / opts.dataset / "split.json"
    split = write_split(opts.data, data_set, opts.seed, split_file)
    args = fit_args(opts, split_file, extra)
    run_dir = opts.out / opts.dataset / dataset_name(opts.data) / opts.name
    start = time.perf_counter()
    if not opts.skip_fit:
        medseg(args)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    test, per_image = evaluate(run_dir, opts.data, split_file, data_set.region, opts.test_images)
    summary = json.loads((run_dir / "summary.json").read_text())
    report = {
        "dataset": opts.dataset,
        "data": str(opts.data),
        "command": shlex.join(["python", "benchmarks/real_data.py", *argv]),
        "medseg_args": args,
        "split": {k: len(v) for k, v in split.items()},
        "scored_region": data_set.region,
        "epochs": summary["epochs"],
        "steps": summary["steps"],
        "params": summary["params"],
        "best_epoch": summary["best"].get("epoch"),
        "val_dice_best": summary["best"].get("val/dice"),
        "fit_seconds": None if opts.skip_fit else round(fit_seconds, 1),  # wall: training + validation
        "train_seconds": round(summary["epochs"] * summary["seconds_per_epoch"], 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "machine": machine(),
        "test": test,
    }
    atomic_write(run_dir / "benchmark.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    atomic_write(run_dir / "per_image.csv", lambda tmp: write_rows(Path(tmp), per_image))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    report = run(sys.argv[1:] if argv is None else argv)
    test = report["test"]
    print(
        f"{report['dataset']}: {test['images']} test images, {report['epochs']} epochs, fit {report['fit_seconds']} s"
    )
    for key in ("dice_mean", "dice_global", "accuracy", "sensitivity", "specificity", "pixel_error", "auc"):
        print(f"  {key:12s} {test[key]:.4f}")


if __name__ == "__main__":
    main()
