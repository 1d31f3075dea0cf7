"""Host synchronisations per training step of ``medseg fit`` with its default callbacks.

    python benchmarks/host_syncs.py                          # CPU: counts the reads that would sync
    python benchmarks/host_syncs.py -- --run.sync_every_n_steps 50   # medseg flags after --: a GPU's cadence

A GPU runs ahead of the Python loop until something on the host needs a device value
(``loss.item()``, ``float(norm)``, ``.tolist()``, a Python ``if`` on a tensor); then it drains its
queue and idles while the host catches up. Two ways to count them per step:

- ``reads`` (any device): a ``TorchFunctionMode`` counts every read of a tensor's value on the
  host (``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``numpy``,
  ``cpu``, ``__format__``) and where it happens, less the reads of tensors that stay on the host
  in a GPU run too (``HOST_TENSORS``). On a CPU nothing syncs, but these are the reads that
  would, with the model and batch on a GPU;
- ``cuda``: ``torch.cuda.set_sync_debug_mode("warn")`` reports every synchronising CUDA call.

A step runs from one ``on_train_batch_start`` to the next (logging after the batch included),
on preloaded batches (no loader reads): the default configs of ``make train`` (progress bar
on), with the default UNet on small phantoms. Prints the count of every step and the places.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from benchmarks.common import RESULTS, machine_info, median, quiet, write_json  # noqa: E402
from benchmarks.preloaded import preload, preloaded_fit  # noqa: E402
from pipeline.data.synthesis.phantoms_2d import generate_dataset  # noqa: E402

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu", "__format__"}
# Reads of tensors that stay on the host in a GPU run too: not synchronisations.
# (file, function, a piece of the source line): why the tensor stays on the host.
HOST_TENSORS = {
    ("torch/optim/optimizer.py", "_get_value", ".item()"): "optimiser step counters (CPU unless capturable)",
    ("monai/losses/dice.py", "forward", "torch.arange("): "MONAI's list of axes to reduce, made on the CPU",
}


def _where(frame: traceback.FrameSummary) -> str:
    """A frame's file relative to site-packages or the repository."""
    name = frame.filename
    if "site-packages/" in name:
        return name.split("site-packages/")[-1]
    return str(Path(name).relative_to(REPO)) if Path(name).is_relative_to(REPO) else name


def _site() -> str | None:
    """``file:line function`` of a tensor read and of the nearest medseg or Lightning frame that
    led to it; None for a read of a host-resident tensor (``HOST_TENSORS``)."""
    stack = [f for f in traceback.extract_stack() if "host_syncs.py" not in f.filename]
    inner = stack[-1]
    if any(
        (_where(inner), inner.name) == (file, function) and code in (inner.line or "")
        for file, function, code in HOST_TENSORS
    ):
        return None
    callers = ("/pipeline/", "/pytorch_lightning/")
    via = next((f for f in reversed(stack[:-1]) if any(c in f.filename for c in callers)), None)
    return f"{_where(inner)}:{inner.lineno} {inner.name}" + (
        f" (via {_where(via)}:{via.lineno} {via.name})" if via is not None else ""
    )


class HostReads(TorchFunctionMode):
    """Counts device-to-host reads of tensors (see the module docstring), by place."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS and (site := _site()) is not None:
            self.sites.append(site)
        return func(*args, **(kwargs or {}))


class CudaSyncs:
    """Counts synchronising CUDA calls through ``torch.cuda.set_sync_debug_mode("warn")``."""

    def __init__(self) -> None:
        self.sites: list[str] = []
        self._catch = warnings.catch_warnings(record=True)
        self._records: list = []

    def __enter__(self) -> CudaSyncs:
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    def collect(self) -> None:
        """Move the synchronisation warnings recorded so far into ``sites``."""
        syncs = [r for r in self._records if "synchronizing" in str(r.message)]
        self.sites += [f"{Path(r.filename).name}:{r.lineno}" for r in syncs]
        self._records.clear()


class SyncsPerStep(pl.Callback):
    """Counts host synchronisations in each training step (``backend``: ``reads`` or ``cuda``).

    ``per_step[i]`` is the count of step i (the last, unfinished step is left out); ``sites``
    counts the places over all steps.
    """

    def __init__(self, backend: str = "reads") -> None:
        if backend not in ("reads", "cuda"):
            raise ValueError(f"backend must be 'reads' or 'cuda', got {backend!r}")
        self.backend = backend
        self.per_step: list[int] = []
        self.sites: collections.Counter[str] = collections.Counter()
        self._counter: HostReads | CudaSyncs | None = None
        self._mark: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counter = HostReads() if self.backend == "reads" else CudaSyncs()
        self._counter.__enter__()

    def _seen(self) -> list[str]:
        if isinstance(self._counter, CudaSyncs):
            self._counter.collect()
        return self._counter.sites

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        seen = self._seen()
        if self._mark is not None:
            self.per_step.append(len(seen) - self._mark)
            self.sites.update(seen[self._mark :])
        self._mark = len(seen)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def summary(self) -> dict:
        """Counts per step, their median and mean, and the places."""
        steps = self.per_step or [0]
        return {
            "per_step": self.per_step,
            "median": median(steps),
            "mean": round(sum(steps) / len(steps), 3),
            "sites": dict(self.sites.most_common()),
        }


def count_fit(steps: int, backend: str, extra: list[str], size: int = 64, batch_size: int = 4) -> dict:
    """Host synchronisations per step of a ``steps``-step default ``medseg fit`` on phantoms."""
    counter = SyncsPerStep(backend)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = generate_dataset(work / "data", num_images=max(10, 2 * batch_size), size=size)
        batches, _ = preload(root, batch_size, steps + 1)
        flags = ["--trainer.enable_progress_bar", "true", "--run.wandb", "false", *extra]
        preloaded_fit(work, root, batches, [counter], flags)
    return counter.summary()


def main(argv: list[str] | None = None) -> dict:
    words = list(sys.argv[1:] if argv is None else argv)
    extra = words[words.index("--") + 1 :] if "--" in words else []
    words = words[: words.index("--")] if "--" in words else words
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default: %(default)s)")
    parser.add_argument("--backend", choices=("reads", "cuda"), default=None, help="default: cuda on a GPU")
    parser.add_argument("--output", type=Path, default=RESULTS / "host_syncs.json")
    opts = parser.parse_args(words)
    quiet()
    backend = opts.backend or ("cuda" if torch.cuda.is_available() else "reads")
    result = count_fit(opts.steps, backend, extra) | {"backend": backend, "medseg_args": extra}
    result["machine"] = machine_info()
    print(
        f"host syncs per step ({backend}): {result['per_step']} (median {result['median']:g}, mean {result['mean']:g})"
    )
    for site, count in result["sites"].items():
        print(f"  {count:4d}  {site}")
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
