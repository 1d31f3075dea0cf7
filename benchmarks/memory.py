"""Peak memory of a training run on a large volume data set against the same run on a small one.

    python benchmarks/memory.py                      # about 5 minutes on a 2-core CPU
    python benchmarks/memory.py --cases 20 400 --shape 128 128 64

Generates synthetic CT volume sets (``pipeline.data.synthesis.phantoms_3d``, what ``medseg data synth
--volumes`` writes, MSD layout) of each size, then runs the same ``medseg fit`` on each in a child
process: default configs with ``configs/data/msd.yaml`` (whole 64x64 slices), the volume cache
built by the fit itself on first use (decoding every case), then a fixed number of training steps
with the default 2 loader workers and a short validation; W&B off (its service process is not
part of the training process). The cache is memory-mapped, so a run should not hold the data set
in memory: only the slices it touches, as shared, reclaimable page-cache pages.

The large set is big enough for the target to catch a run that holds it: 400 volumes of
128 x 128 x 64 decode to about 1.2 GB (int16 images, uint8 masks), most of the small run's peak
RSS again, so a run holding them would score far above 1.5. ``ratio_if_held`` (small run's peak
RSS + the large set's decoded size, over the small run's peak RSS) states it for every result:
below 1.5 (small settings, ``--quick``) the figure cannot fail, and the report says so.

Measured per run:

- ``peak_rss_mb``: the training process's peak resident set, its ``VmHWM`` read by the process
  itself as it exits, the acceptance figure (200 volumes / 20 volumes <= 1.5). (Not ``ru_maxrss``
  of ``wait4``: Linux carries the spawning process's resident size into it, so a child started
  from a large benchmark process reports that size.) The loader workers' own figure is
  ``peak_workers_rss_mb`` (``ru_maxrss`` of the process's reaped children, the largest of them);
- ``peak_pss_mb``: the peak over time of the proportional set size summed over the process and
  its workers (sampled every 0.25 s from ``/proc/<pid>/smaps_rollup``; a page shared by k
  processes counts 1/k in each, so the sum counts it once);
- ``peak_pss_anon_mb`` / ``peak_pss_file_mb``: the same split into anonymous memory (what the run
  owns; pages of the memory-mapped cache never add to it) and file-backed pages (libraries and
  the touched pages of the cache: page cache, which the kernel can reclaim).

RSS counts a mapped file page once a process touches it; unmapped page cache (the kernel caching
the ``.npy`` files after the cache is written) is not counted. The runs differ only in the data
set's size, so a ratio near 1 says memory does not grow with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import psutil  # noqa: E402

from benchmarks.common import RESULTS, alternate, machine_info, median, ratio, write_json  # noqa: E402
from pipeline.data.synthesis.phantoms_3d import generate_volumes  # noqa: E402

CONFIGS = REPO / "configs"
MB = 2**20
TARGET = 1.5  # large / small peak RSS


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` in bytes: ``Pss``, ``Pss_Anon``, ``Pss_File``, ..."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return fields


class TreeSampler(threading.Thread):
    """Samples the proportional set size summed over a process and its descendants until stopped:
    total (``Pss``), anonymous (``Pss_Anon``) and file-backed (``Pss_File``), peaks kept."""

    KEYS = ("Pss", "Pss_Anon", "Pss_File")

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.peaks = dict.fromkeys(self.KEYS, 0)
        self.stopped = threading.Event()

    def sample(self) -> None:
        totals = dict.fromkeys(self.KEYS, 0)
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                fields = smaps_rollup(proc.pid)
            except OSError:  # exited between listing and reading
                continue
            for key in self.KEYS:
                totals[key] += fields.get(key, 0)
        self.peaks = {key: max(self.peaks[key], totals[key]) for key in self.KEYS}

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.sample()
            except psutil.Error:  # the training process itself has exited
                return


def fit_args(root: Path, runs: Path, steps: int, val_batches: int) -> list[str]:
    """``medseg fit`` on a volume data set: default configs, a fixed number of steps."""
    configs = [CONFIGS / "default.yaml", CONFIGS / "model" / "unet.yaml", CONFIGS / "data" / "msd.yaml"]
    args = ["fit", *(a for c in configs for a in ("-c", str(c)))]
    args += ["--data.root", str(root), "--data.patch_size", "null", "--run.root", str(runs)]
    args += ["--run.wandb", "false", "--trainer.enable_progress_bar", "false"]
    args += ["--run.overwrite", "true"]  # a repeat replaces the same size's run: only its memory counts
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps)]
    args += ["--trainer.limit_val_batches", str(val_batches), "--trainer.num_sanity_val_steps", "0"]
    return args


# ``medseg <args>`` that writes its own peak resident set (VmHWM, kB) and its reaped children's
# (the loader workers') largest ru_maxrss (kB) to $MEDSEG_PEAK_FILE as it exits.
CHILD = """
import atexit, os, re, resource, sys
from pathlib import Path
from pipeline.cli import main

def report():
    hwm = re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    Path(os.environ["MEDSEG_PEAK_FILE"]).write_text(f"{hwm} {workers}")

atexit.register(report)
main(sys.argv[1:])
"""


def measure_fit(args: list[str], log: Path) -> dict:
    """Run ``medseg <args>`` in a child process and return its peak memory figures (MB)."""
    peak_file = log.with_suffix(".peak")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | {"MEDSEG_PEAK_FILE": str(peak_file)},
        )
        sampler = TreeSampler(proc.pid)
        sampler.start()
        proc.wait()
        sampler.stopped.set()
        sampler.join()
    if proc.returncode:
        raise RuntimeError(f"medseg fit failed ({proc.returncode}); its output: {log}")
    hwm_kb, workers_kb = (int(x) for x in peak_file.read_text().split())
    return {
        "peak_rss_mb": round(hwm_kb * 1024 / MB, 1),
        "peak_workers_rss_mb": round(workers_kb * 1024 / MB, 1),
        "peak_pss_mb": round(sampler.peaks["Pss"] / MB, 1),
        "peak_pss_anon_mb": round(sampler.peaks["Pss_Anon"] / MB, 1),
        "peak_pss_file_mb": round(sampler.peaks["Pss_File"] / MB, 1),
    }


def folder_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / MB, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs=2, default=[20, 400], help="small and large set sizes")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 64], help="volume shape (voxels)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default: %(default)s)")
    parser.add_argument(
        "--val-batches", type=int, default=4, help="validation batches (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=RESULTS / "memory.json")
    opts = parser.parse_args(argv)
    small, large = opts.cases
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = {n: generate_volumes(work / f"set{n}", n, opts.shape, seed=0) for n in (small, large)}
        counter = iter(range(10**6))

        def run(n: int) -> dict:
            cache = roots[n] / ".medseg-cache"  # built by every fit itself, as on first use
            shutil.rmtree(cache, ignore_errors=True)
            args = fit_args(roots[n], work / "runs", opts.steps, opts.val_batches)
            figures = measure_fit(args, work / f"fit-{n}-{next(counter)}.log")
            return figures | {"cache_mb": folder_mb(cache)}

        runs = alternate({str(small): lambda: run(small), str(large): lambda: run(large)}, opts.repeats)
    figures = {n: {k: median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    s, g = figures[str(small)], figures[str(large)]
    result = {
        "figures_mb": figures,
        "ratio": ratio(g["peak_rss_mb"], s["peak_rss_mb"]),
        "ratio_pss": ratio(g["peak_pss_mb"], s["peak_pss_mb"]),
        "ratio_pss_anon": ratio(g["peak_pss_anon_mb"], s["peak_pss_anon_mb"]),
        # what the ratio would be if the run held the large set in memory: above TARGET, it can fail
        "ratio_if_held": ratio(s["peak_rss_mb"] + g["cache_mb"], s["peak_rss_mb"]),
        "runs": runs,
        "settings": {k: v for k, v in vars(opts).items() if k != "output"},
        "machine": machine_info(),
    }
    print(
        f"memory: peak RSS {g['peak_rss_mb']:.0f} MB with {large} volumes ({g['cache_mb']:.0f} MB cache) vs "
        f"{s['peak_rss_mb']:.0f} MB with {small}: ratio {result['ratio']:.3f} (target <= 1.5); "
        f"process tree PSS ratio {result['ratio_pss']:.3f}, "
        f"anonymous PSS ratio {result['ratio_pss_anon']:.3f}; holding the {large} volumes would give "
        f"{result['ratio_if_held']:.2f}"
        + ("" if result["ratio_if_held"] > TARGET else " (too small to fail)")
    )
    write_json(opts.output, result)
    return result


if __name__ == "__main__":
    main()
