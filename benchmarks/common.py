"""What every benchmark shares: alternating arms, medians and ratios, machine facts, result files.

Benchmarks run on shared, noisy machines, so every figure is a ratio against a baseline measured
in the same run: ``alternate`` runs the arms in turn (ABBA order, so a steady drift in machine
load hits every arm alike), and the figures are medians over the repeats.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


def alternate(
    arms: dict[str, Callable[[], T]], repeats: int, stop: Callable[[], bool] | None = None
) -> dict[str, list[T]]:
    """Run every arm ``repeats`` times, in turn: A B C, C B A, A B C, ...

    Reversing the order on every other round cancels a linear drift (load, temperature) between
    arms, and no arm always runs first after a pause. Returns each arm's results in run order.
    ``stop()``, asked before every round after the first, ends the rounds early when true (a time
    budget spent): every arm still has the same number of results.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(arms)
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_ in range(repeats):
        if round_ and stop is not None and stop():
            break
        for name in names if round_ % 2 == 0 else reversed(names):
            results[name].append(arms[name]())
    return results


def median(values: Iterable[float]) -> float:
    """Median of ``values`` (ValueError when empty, rather than a silent NaN)."""
    values = list(values)
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def ratio(numerator: float, denominator: float, digits: int = 3) -> float:
    """``numerator / denominator`` rounded; NaN when the baseline is 0 or missing."""
    if not denominator:
        return float("nan")
    return round(numerator / denominator, digits)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader workers), in seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def load_average() -> float:
    """1-minute load average (runnable processes, all users); compare with ``os.cpu_count()``."""
    return round(os.getloadavg()[0], 2)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """The facts a reader needs to compare two result files (plain types)."""
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return info


def machine_slug(info: dict | None = None) -> str:
    """File-name-safe machine name: the GPU's (``nvidia-h100-80gb-hbm3``) or ``cpu<N>-<model>``."""
    info = info or machine_info()
    name = info["device"] if info["device"] != "cpu" else f"cpu{info['cpu_count']}-{info['cpu']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def today() -> str:
    """UTC date, ``YYYY-MM-DD``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def write_json(path: str | os.PathLike | None, result: dict) -> None:
    """Write ``result`` as indented JSON, atomically (nothing written for ``path`` None)."""
    if path is None:
        return
    text = json.dumps(result, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; floats with 3 significant digits."""

    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def headline_row(
    bench: str, measure: str, value: object, baseline: object, ratio: float, target: str = ""
) -> tuple:
    """One row of a headline table: ``(bench, measure, value, baseline, ratio, target, met)``;
    ``target`` like ``>= 0.95`` or ``<= 1.5`` (empty: for information; ``met`` then empty too)."""
    met = ""
    if target:
        op, bound = target.split()
        met = "yes" if (ratio >= float(bound) if op == ">=" else ratio <= float(bound)) else "NO"
    return (bench, measure, value, baseline, ratio, target, met)


HEADER = ("benchmark", "measure", "value", "baseline", "ratio", "target", "met")


def quiet() -> None:
    """Keep the console to the benchmarks' own lines: W&B offline and silent, Lightning's set-up
    messages and Python's user and deprecation warnings off."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "pipeline"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def train_flops(net: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> int:
    """FLOPs of one forward + backward pass of ``net`` on ``image`` (B, C, *spatial: 2D or 3D) with
    DiceCE loss against ``mask`` (B, *spatial): multiply-adds count 2, as ``torch.utils.flop_counter`` counts."""
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    with FlopCounterMode(display=False) as counter:
        loss_fn(net(image), mask[:, None]).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()
