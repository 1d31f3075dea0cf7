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

Real size (``--real-size``, about 20 minutes on a busy 2-core CPU; writes ``real_size_memory.json``)::

    python benchmarks/memory.py --real-size                     # fit on 5 vs 40 cases, infer 1 vs 4
    python benchmarks/memory.py --real-size --cases 3 6 --slices 80 90 --steps 5   # a quick look

Generated CT (``pipeline.data.synthesis.ct.generate_ct``: 512 x 512 x ``--slices`` voxels, int16
HU, ``.nii.gz``, case ``i`` the same in both sets), the cache built by each fit. Both fits train
on the same grid (``--data.target_spacing``, ``REAL_SIZE_SPACING``) and validate the same case
(a split file: ``ct_000`` validates, no test cases, the rest train), so they differ only in the
number of cases; the network is ``configs/model/unet.yaml``'s with ``--features`` (default 8..64,
narrower than the config's 16..256 so that the whole-case validation fits the time: activations
of a 256 x 256 batch of 2 are a few hundred MB either way and do not depend on the data set).
Figures: peak RSS (target 40 / 5 cases <= 1.3) and peak PSS of the process tree (loader workers
included) per fit; then ``medseg infer`` with the small run's checkpoint on a tiny case (64 x 64 x
8: the fixed cost of the process: interpreter, torch, Lightning, the network), on the largest of
``ct_000``..``ct_003`` (the larger of its own and its training grid) alone and on all four: the
per-case peak RSS against the bound
``fixed + 2 x (classes + channels) x voxels x 4 bytes`` (two float32 maps of every class, the
probabilities on the training grid and their resampling back, and two of every input channel, the
case on the training grid and its standardised copy: all on the larger of the two grids), and 4 cases / 1 case
(target <= 1.3: memory does not grow with the number of inputs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import nibabel as nib  # noqa: E402
import psutil  # noqa: E402

from benchmarks.common import RESULTS, alternate, machine_info, markdown_table, median, ratio, write_json  # noqa: E402
from pipeline.data.synthesis.ct import generate_ct  # noqa: E402
from pipeline.data.synthesis.phantoms_3d import generate_volumes  # noqa: E402

CONFIGS = REPO / "configs"
MB = 2**20
TARGET = 1.5  # large / small peak RSS
REAL_SIZE_TARGET = 1.3  # real size: fit 40 / 5 cases, infer 4 / 1 case, peak RSS
REAL_SIZE_SPACING = (0.75, 0.75, 3.0)  # mm: the middle of the generated CT's spacings, both fits


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


# ``medseg <args>`` (or ``--script FILE <args>``: a Python script) that writes its own peak resident
# set (VmHWM, kB) and its reaped children's (the loader workers') largest ru_maxrss (kB) to
# $MEDSEG_PEAK_FILE as it exits.
CHILD = """
import atexit, os, re, resource, runpy, sys
from pathlib import Path

def report():
    hwm = re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    Path(os.environ["MEDSEG_PEAK_FILE"]).write_text(f"{hwm} {workers}")

atexit.register(report)
if sys.argv[1:2] == ["--script"]:
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    from pipeline.cli import main
    main(sys.argv[1:])
"""


def children_cpu_seconds() -> float:
    """User + system seconds of this process's reaped children (and theirs), so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(args: list[str], log: Path, env: dict[str, str] | None = None, check: bool = True) -> dict:
    """Run ``medseg <args>`` (or ``--script FILE <args>``) in a child process; its figures.

    Returns wall and CPU seconds (the child and its loader workers), the exit code, the peak
    memory figures (MB; see the module docstring) and ``lines``: every line it printed with the
    seconds since launch, also written to ``log`` as ``[+seconds] line``.

    Raises:
        RuntimeError: ``check`` and a non-zero exit code.
    """
    peak_file = log.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    lines: list[tuple[float, str]] = []
    cpu, start = children_cpu_seconds(), time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"MEDSEG_PEAK_FILE": str(peak_file)} | (env or {}),
    )
    sampler = TreeSampler(proc.pid)
    sampler.start()
    assert proc.stdout is not None
    with log.open("w") as out:
        for line in proc.stdout:  # timestamped as it arrives
            lines.append((round(time.perf_counter() - start, 3), line.rstrip("\n")))
            out.write(f"[+{lines[-1][0]:.1f}] {line}")
    proc.wait()
    wall = time.perf_counter() - start
    sampler.stopped.set()
    sampler.join()
    if check and proc.returncode:
        raise RuntimeError(f"medseg {args[0]} failed ({proc.returncode}); its output: {log}")
    hwm_kb, workers_kb = (int(x) for x in peak_file.read_text().split()) if peak_file.exists() else (0, 0)
    return {
        "returncode": proc.returncode,
        "wall_s": round(wall, 3),
        "cpu_s": round(children_cpu_seconds() - cpu, 3),
        "peak_rss_mb": round(hwm_kb * 1024 / MB, 1),
        "peak_workers_rss_mb": round(workers_kb * 1024 / MB, 1),
        "peak_pss_mb": round(sampler.peaks["Pss"] / MB, 1),
        "peak_pss_anon_mb": round(sampler.peaks["Pss_Anon"] / MB, 1),
        "peak_pss_file_mb": round(sampler.peaks["Pss_File"] / MB, 1),
        "lines": lines,
    }


def measure_fit(args: list[str], log: Path) -> dict:
    """Run ``medseg <args>`` in a child process and return its peak memory figures (MB)."""
    figures = measure(args, log)
    return {k: v for k, v in figures.items() if k.startswith("peak_")}


def folder_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / MB, 1)


def real_size_fit_args(root: Path, runs: Path, split: Path, steps: int, features: list[int]) -> list[str]:
    """``medseg fit`` on generated real-size CT: default configs, a fixed grid, split and step count."""
    configs = [CONFIGS / "default.yaml", CONFIGS / "model" / "unet.yaml", CONFIGS / "data" / "msd.yaml"]
    args = ["fit", *(a for c in configs for a in ("-c", str(c))), "--data.root", str(root)]
    args += ["--data.split_file", str(split), "--data.target_spacing", json.dumps(list(REAL_SIZE_SPACING))]
    args += ["--model.net.init_args.features", json.dumps(features), "--run.root", str(runs)]
    args += ["--run.wandb", "false", "--trainer.enable_progress_bar", "false", "--run.overwrite", "true"]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps)]
    return [*args, "--trainer.limit_val_batches", "1"]


def real_size(opts: argparse.Namespace) -> dict:
    """``--real-size``: fit on few and many real-size CT cases, infer on one and several."""
    small, large = opts.cases or (5, 40)
    output = opts.output or RESULTS / "real_size_memory.json"
    env = {"WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
    loads = [round(os.getloadavg()[0], 2)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        roots = {n: generate_ct(work / f"ct{n}", n, seed=0, slices=opts.slices) for n in (small, large)}
        generate_s = round(time.perf_counter() - start, 1)
        print(f"generated {small} + {large} cases in {generate_s} s", flush=True)
        fits = {}
        for n in (small, large):
            ids = [f"ct_{i:03d}" for i in range(n)]
            split = work / f"split{n}.json"
            split.write_text(json.dumps({"train": ids[1:], "val": ids[:1], "test": []}))
            args = real_size_fit_args(roots[n], work / "runs", split, opts.steps, opts.features)
            figures = measure(args, work / f"fit-{n}.log", env)
            fits[n] = {k: v for k, v in figures.items() if k != "lines"} | {
                "cache_mb": folder_mb(roots[n] / ".medseg-cache"),
                "data_mb": folder_mb(roots[n] / "imagesTr"),
            }
            loads.append(round(os.getloadavg()[0], 2))
            print(f"fit on {n} cases: peak RSS {figures['peak_rss_mb']:.0f} MB, PSS {figures['peak_pss_mb']:.0f} MB, "
                  f"{figures['wall_s']:.0f} s", flush=True)  # fmt: skip
        run = next((work / "runs").glob(f"*/ct{small}/*/checkpoints/last.ckpt"))  # the small set's run
        tiny = (
            generate_ct(work / "tiny", 1, seed=1, in_plane=64, slices=(8, 8)) / "imagesTr" / "ct_000.nii.gz"
        )
        images = sorted((roots[large] / "imagesTr").glob("ct_00[0-3].nii.gz"))
        voxels = {p.name: math.prod(nib.load(p).shape) for p in images}
        grids = {p.name: _training_grid_voxels(p) for p in images}
        # the case whose larger grid is the largest: what the bound, and the peak, scale with
        largest = max(images, key=lambda p: max(voxels[p.name], grids[p.name]))
        infers = {}
        for name, inputs in (("tiny", [tiny]), ("one", [largest]), ("four", images)):
            args = ["infer", "--checkpoint", str(run), "--input", *map(str, inputs)]
            figures = measure([*args, "--output", str(work / f"out-{name}")], work / f"infer-{name}.log", env)
            infers[name] = {k: v for k, v in figures.items() if k != "lines"} | {"cases": len(inputs)}
            loads.append(round(os.getloadavg()[0], 2))
            print(
                f"infer {name}: peak RSS {figures['peak_rss_mb']:.0f} MB, {figures['wall_s']:.0f} s",
                flush=True,
            )
    classes, channels = 3, 1
    worst = max(voxels[largest.name], grids[largest.name])
    bound = infers["tiny"]["peak_rss_mb"] + 2 * (classes + channels) * worst * 4 / MB
    result = {
        "fit_mb": {str(n): f for n, f in fits.items()},
        "fit_ratio_rss": ratio(fits[large]["peak_rss_mb"], fits[small]["peak_rss_mb"]),
        "fit_ratio_pss": ratio(fits[large]["peak_pss_mb"], fits[small]["peak_pss_mb"]),
        "fit_ratio_pss_anon": ratio(fits[large]["peak_pss_anon_mb"], fits[small]["peak_pss_anon_mb"]),
        "infer_mb": infers,
        "infer_voxels": {"own_grid": voxels, "training_grid": grids, "largest": largest.name},
        "infer_bound_mb": round(bound, 1),
        "infer_rss_over_bound": ratio(infers["one"]["peak_rss_mb"], bound),
        "infer_ratio_rss": ratio(infers["four"]["peak_rss_mb"], infers["one"]["peak_rss_mb"]),
        "infer_ratio_pss": ratio(infers["four"]["peak_pss_mb"], infers["one"]["peak_pss_mb"]),
        "generate_s": generate_s,
        "settings": {k: v for k, v in vars(opts).items() if k != "output"}
        | {"cases": [small, large], "target_spacing": REAL_SIZE_SPACING},
        "machine": machine_info(),
        "load_average": loads,
    }
    missed = [
        name
        for name, ok in (
            ("fit_ratio_rss", result["fit_ratio_rss"] <= REAL_SIZE_TARGET),
            ("infer_rss_over_bound", result["infer_rss_over_bound"] <= 1),
            ("infer_ratio_rss", result["infer_ratio_rss"] <= REAL_SIZE_TARGET),
        )
        if not ok
    ]
    result["missed"] = missed
    print(
        f"real size: fit peak RSS {fits[large]['peak_rss_mb']:.0f} MB on {large} cases vs "
        f"{fits[small]['peak_rss_mb']:.0f} MB on {small}: ratio {result['fit_ratio_rss']} (target <= "
        f"{REAL_SIZE_TARGET}); tree PSS ratio {result['fit_ratio_pss']}; infer peak RSS "
        f"{infers['one']['peak_rss_mb']:.0f} MB on one case ({worst:,} voxels) vs the bound {bound:.0f} MB "
        f"({infers['tiny']['peak_rss_mb']:.0f} MB fixed); 4 cases / 1 case: {result['infer_ratio_rss']} (target "
        f"<= {REAL_SIZE_TARGET}); load average {loads[0]} -> {loads[-1]}"
    )
    for name in missed:
        print(f"TARGET MISSED: {name}", file=sys.stderr)
    write_json(output, result)
    output.with_suffix(".md").write_text(real_size_report(result))
    return result


def real_size_report(result: dict) -> str:
    """``--real-size``'s markdown: every run's figures and the three targets."""
    small, large = result["settings"]["cases"]
    rows = [
        (
            f"fit, {n} cases",
            f["wall_s"],
            f["peak_rss_mb"],
            f["peak_pss_mb"],
            f["peak_pss_anon_mb"],
            f["cache_mb"],
        )
        for n, f in result["fit_mb"].items()
    ]
    rows += [
        (f"infer, {name} ({f['cases']} case{'s' if f['cases'] > 1 else ''})", f["wall_s"], f["peak_rss_mb"],
         f["peak_pss_mb"], f["peak_pss_anon_mb"], "")
        for name, f in result["infer_mb"].items()
    ]  # fmt: skip
    header = ("run", "wall s", "peak RSS MB", "peak PSS MB (tree)", "peak anon PSS MB", "cache MB")
    targets = [
        (f"fit peak RSS, {large} / {small} cases", result["fit_ratio_rss"], f"<= {REAL_SIZE_TARGET}"),
        ("infer peak RSS (largest case) / bound", result["infer_rss_over_bound"], "<= 1"),
        ("infer peak RSS, 4 cases / 1 case", result["infer_ratio_rss"], f"<= {REAL_SIZE_TARGET}"),
    ]
    met = ("fit_ratio_rss", "infer_rss_over_bound", "infer_ratio_rss")
    target_rows = [(*t, "NO" if m in result["missed"] else "yes") for t, m in zip(targets, met, strict=True)]
    load, voxels = result["load_average"], result["infer_voxels"]
    largest = voxels["largest"]
    return (
        "# Real-size memory: fit on few and many cases, infer on one and several\n\n"
        + markdown_table(header, [tuple(f"{v:,.0f}" if isinstance(v, float) else v for v in r) for r in rows])
        + f"\nInfer bound: {result['infer_bound_mb']:,.0f} MB = the tiny case's peak RSS + 2 x (3 classes + 1 channel) x "
        f"{max(v[largest] for v in (voxels['own_grid'], voxels['training_grid'])):,} voxels x 4 bytes (the "
        f"larger grid of {largest}, the largest case of the four).\n\n"
        + markdown_table(("measure", "value", "target", "met"), target_rows)
        + f"\nPSS ratios (process tree, loader workers included): fit {result['fit_ratio_pss']}, infer "
        f"{result['infer_ratio_pss']}. Load average (1 min) {load[0]} to {load[-1]}, max {max(load)}.\n"
    )


def _training_grid_voxels(image: Path) -> int:
    """Voxels of ``image`` on the real-size fits' grid (``REAL_SIZE_SPACING``)."""
    header = nib.as_closest_canonical(nib.load(image)).header
    zooms = header.get_zooms()[:3]
    return math.prod(
        max(1, round(n * s / t))
        for n, s, t in zip(header.get_data_shape()[:3], zooms, REAL_SIZE_SPACING, strict=True)
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", type=int, nargs=2, help="small and large set sizes (default: 20 400; 5 40 real size)"
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 64], help="volume shape (voxels)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default: %(default)s)")
    parser.add_argument(
        "--val-batches", type=int, default=4, help="validation batches (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (default: %(default)s)")
    parser.add_argument(
        "--real-size", action="store_true", help="generated 512 x 512 CT: fit and infer (see above)"
    )
    parser.add_argument("--slices", type=int, nargs=2, default=[80, 130], help="real size: slice count range")
    parser.add_argument(
        "--features", type=int, nargs="+", default=[8, 16, 32, 64], help="real size: UNet widths"
    )
    parser.add_argument(
        "--output", type=Path, help="default: results/memory.json (real size: real_size_memory.json)"
    )
    opts = parser.parse_args(argv)
    if opts.real_size:
        return real_size(opts)
    small, large = opts.cases or (20, 400)
    opts.output = opts.output or RESULTS / "memory.json"
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
