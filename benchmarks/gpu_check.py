"""One prepared check of medseg's CUDA path on a GPU: ``make gpu-check``, under 8 minutes on an H100/H200.

    python benchmarks/gpu_check.py               # on a CUDA GPU (no make, no install step needed)
    python benchmarks/gpu_check.py --cpu         # every section with tiny settings on the CPU (dry run)
    python benchmarks/gpu_check.py --only train infer
    python benchmarks/gpu_check.py --budget 300  # every section's time budget scaled to 300 s in all

Writes ``results/gpu_check-<machine>-<date>.json`` (every figure) and ``.md`` (the headline table
with targets). A section that fails is recorded with its error, the others still run, and the
exit status is 1; so is an arm that fails (``torch.compile``): its row in the table holds its error.

Each section has its own time budget (``Settings.budgets``, 450 s in all on a GPU): a section
stops at it and records that it did (``stopped_at_budget``; the table's ``budget`` rows). The
measuring sections stop between units (an arm's warm-up, a round of arms, a worker count, a fit),
so they may run over by one unit; the child processes (``train``, ``infer``, ...) are killed at it
(exit status 124).

Host-to-device copies: the ``throughput`` arms all train on one batch already on the GPU (no copy
in any arm); in ``data_wait`` and ``overhead`` every arm, medseg's fit and the bare loops alike,
copies each batch from pinned host memory to the GPU inside its timed step. Sections:

- ``environment``: GPU, memory, SMs, driver (``nvidia-smi``, recorded as unavailable when it is
  missing or fails), CUDA, cuDNN, NCCL, bf16, TF32 settings, versions.
- ``throughput``: each entry of ``gpu_throughput.MODEL_CASES`` (the 2D UNet at 256x256; the 3D
  UNet at the 32x192x192 patch, batch 2, that the plan gives abdominal CT scans, 512x512x100 at
  0.78x0.78x2.5 mm, on 8 GB) trained on preloaded batches in fp32, bf16, bf16 + channels-last
  and + ``torch.compile`` (images or patches/s, medians of alternating rounds; target bf16 +
  channels-last >= 2x fp32), its forward + backward FLOPs per image, and the achieved TFLOP/s
  against a bf16 matmul measured here (utilisation). Each case gets an equal share of the budget.
- ``data_wait``: the 2D UNet fed by the real training loader and its workers (the default count
  and 2): the share of step time spent waiting for data in the steady state (an epoch longer
  than the loop, its first 2 x workers + 2 steps left out; target <= 0.1 with the default).
- ``train``: ``make train``'s command (``medseg fit`` with the default configs, bf16-mixed and
  channels-last chosen for the GPU) for one short epoch on ``medseg data synth`` phantoms, in a
  child process: exit status, seconds, the run's summary; DDP's stride-mismatch warning must
  not appear in its log.
- ``infer``: ``medseg infer`` with that run's checkpoint on ``medseg data synth --volumes``
  cases: exit status, cases written, cases/s.
- ``train3d``, ``infer3d``: the same with the 3D UNet (``make train MODEL=unet3d DATA=msd``: plan,
  3D patches, per-case 3D validation) on generated volumes, channels-last-3d weights.
- ``overhead``: the per-step cost of medseg's callbacks on the GPU: ``training_overhead`` (medseg
  fit vs a bare loop on the same batches, interleaved) with every default callback, without the
  monitors, and without monitors and guards; and the host synchronisations per training step
  (``host_syncs`` with CUDA's sync debug mode; target: median 0). Each of the four parts gets an
  equal share of what is left of the budget.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import monai  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks import gpu_throughput, host_syncs, training_overhead, user_runs  # noqa: E402
from benchmarks.common import (  # noqa: E402
    HEADER,
    RESULTS,
    machine_info,
    machine_slug,
    markdown_table,
    quiet,
    ratio,
    today,
    write_json,
)
from benchmarks.common import headline_row as row  # noqa: E402
from benchmarks.data_loading import default_workers  # noqa: E402
from benchmarks.run_all import error_cell, summarize  # noqa: E402
from pipeline.cli import lightning as cli  # noqa: E402

CONFIGS = REPO / "configs"
SECTIONS = ("environment", "throughput", "data_wait", "train", "infer", "train3d", "infer3d", "overhead")
# seconds per section on one H100: 450 in all, so that with start-up the check stays under 8 minutes
GPU_BUDGETS = MappingProxyType(
    dict(
        environment=10, throughput=170, data_wait=40, train=40, infer=25, train3d=45, infer3d=30, overhead=90
    )
)
# the dry run on 2 CPU cores takes about 2 minutes (torch.compile's first build included): room for a busy machine
CPU_BUDGETS = MappingProxyType(
    dict(
        environment=10, throughput=120, data_wait=30, train=60, infer=60, train3d=90, infer3d=90, overhead=120
    )
)


@dataclass(frozen=True)
class Settings:
    """How much each section runs: the defaults are the full check on a GPU."""

    cases: tuple[gpu_throughput.ModelCase, ...] = tuple(gpu_throughput.MODEL_CASES)
    steps: int = 30  # timed steps per arm and round
    warmup: int = 5
    repeats: int = 3
    compile: bool = True
    matmul: int = 8192  # side of the bf16 matmul that sets the utilisation's scale
    # 128 training phantoms (4 batches of 32) after the 20 % validation split; the loader's epoch
    # is set to the loop's length, so workers keep pipelining over the whole timed window
    wait_images: int = 160
    wait_steps: int = 40
    phantoms: int = 240  # make data's count
    train_batches: int = 30
    volumes: int = 12  # infer's cases, and the 3D fit's
    overhead: str = (
        "--size 256 --batch-size 32 --features 32 64 128 256 512 --steps 30 --warmup 5 --repeats 3"
    )
    sync_steps: int = 60
    medseg: str = ""  # more medseg fit flags
    infer: str = ""  # more medseg infer flags
    sync: str = ""  # more flags of the host-sync count's fit
    budgets: Mapping[str, float] = field(default_factory=lambda: GPU_BUDGETS)  # seconds per section


GPU = Settings()
CPU = Settings(  # the dry run: every section and arm (torch.compile's too: it runs on CPUs), tiny, on the CPU
    cases=(gpu_throughput.unet2d(32, 2, (4, 8)), gpu_throughput.unet3d((4, 8), memory_gb=0.001)),
    **dict(steps=1, warmup=1, repeats=1, compile=True, matmul=64, wait_images=8, wait_steps=2),
    **dict(phantoms=12, train_batches=2, volumes=6, sync_steps=3),  # 6 volumes: 4 to train, 1 to validate
    overhead="--size 32 --batch-size 2 --features 4 8 --steps 2 --warmup 1 --repeats 1 --no-monai",
    medseg="--trainer.accelerator cpu --model.net.init_args.features [4,8] --data.num_workers 0 "
    "--trainer.precision bf16-mixed --model.channels_last_on_cpu true",  # the GPU's fast path
    infer="--accelerator cpu --num-workers 0",
    sync="--run.sync_every_n_steps 50",  # a GPU's cadence: counts what would sync there
    budgets=CPU_BUDGETS,
)


@dataclass
class Budget:
    """A section's time budget, in seconds from its start (``time.perf_counter``).

    ``stop()`` is true once the budget is spent, and remembers that it was (``stopped``): the
    section stopped at its budget. ``part(n)`` is a budget of 1/n of what is left, for one of n
    parts still to run; its stop marks this budget stopped too.
    """

    seconds: float
    start: float = field(default_factory=time.perf_counter)
    parent: Budget | None = None
    stopped: bool = False

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def stop(self) -> bool:
        if self.left() <= 0:
            budget: Budget | None = self
            while budget is not None:
                budget.stopped, budget = True, budget.parent
        return self.stopped

    def part(self, parts: int) -> Budget:
        return Budget(max(self.left(), 0.0) / parts, parent=self)


def nvidia_smi() -> str:
    """Driver, maximum SM clock and power limit from ``nvidia-smi``, or why they are unavailable."""
    query = ["--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return "unavailable: nvidia-smi not found"
    try:
        smi = subprocess.run([binary, *query], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable: {type(err).__name__}: {err}"
    if smi.returncode != 0 or not smi.stdout.strip():
        return f"unavailable: exit status {smi.returncode}: {(smi.stderr or smi.stdout).strip()[:300]}"
    return smi.stdout.strip()


def environment(device: torch.device, budget: Budget) -> dict:
    """What a reader needs to compare two checks."""
    info = machine_info() | {"lightning": pl.__version__, "monai": monai.__version__}
    info |= {"loader_workers_default": default_workers(), "device_count": torch.cuda.device_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        }
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as err:  # a build without NCCL
            info["nccl"] = f"unavailable: {type(err).__name__}: {err}"
        info["nvidia_smi"] = nvidia_smi()
    return info


def throughput(device: torch.device, s: Settings, budget: Budget) -> dict:
    """Per model case, ``gpu_throughput``'s figures; each case gets an equal share of what is left."""
    arms = [name for name, (_, _, compiled) in gpu_throughput.ARMS.items() if s.compile or not compiled]
    matmul = gpu_throughput.matmul_tflops(
        device, s.matmul, 20 if device.type == "cuda" else 2, torch.bfloat16
    )
    cases = {}
    for i, case in enumerate(s.cases):
        part = budget.part(len(s.cases) - i)
        r = gpu_throughput.measure_case(case, device, s.steps, s.warmup, s.repeats, arms, part.stop)
        r["matmul_tflops"] = round(matmul, 2)
        r["fraction_of_matmul"] = {k: ratio(v, matmul) for k, v in r["achieved_tflops"].items()}
        r["budget_s"] = round(part.seconds, 1)
        cases[case.name] = r
    return cases


def data_wait(device: torch.device, s: Settings, budget: Budget) -> dict:
    """``gpu_throughput.data_wait`` for the first 2D case: the share of step time spent waiting for
    the loader, with the default worker count and 2 (the dry run: none, the main process loads)."""
    case = next(c for c in s.cases if len(c.spatial) == 2)
    default = default_workers() if device.type == "cuda" else 0
    workers = sorted({2, default}) if device.type == "cuda" else [default]
    waits = gpu_throughput.data_wait(case, workers, s.wait_images, s.wait_steps, device, budget.stop)
    measured = {w: r for w, r in waits.items() if "wait_fraction" in r}
    return {
        "case": case.name,
        "default_workers": default,
        "wait_fraction": {w: round(r["wait_fraction"], 4) for w, r in measured.items()},
        "fed_images_per_s": {w: round(r["images_per_s"], 2) for w, r in measured.items()},
        "not_run": {w: r["not_run"] for w, r in waits.items() if "not_run" in r},
        "runs": waits,
        "host_to_device": "every step copies its batch from the loader's pinned host memory to the device",
    }


def overhead(work: Path, s: Settings, budget: Budget) -> dict:
    """``training_overhead`` with every default callback, without the monitors and without both
    (the per-step cost of each, in ms), and the host synchronisations per training step. Each of
    the four parts gets an equal share of what is left of ``budget`` (a fit is not cut short: a
    part that starts runs one fit at least); a part that finds it spent is left out (``not_run``)."""
    config = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    checkpoints = [c for c in config["trainer"]["callbacks"] if "ModelCheckpoint" in c["class_path"]]
    no_monitors = work / "no_monitors.yaml"
    no_monitors.write_text(yaml.safe_dump({"trainer": {"callbacks": checkpoints}}))
    names = ("all", "no_monitors", "no_monitors_no_guards")
    results: dict = {"not_run": {}}
    for i, name in enumerate(names):
        part = budget.part(len(names) + 1 - i)
        if part.stop():
            results["not_run"][name] = "time budget spent before it started"
            continue
        extra = ["-c", str(no_monitors)] if name != "all" else []
        always_on = (lambda *args: []) if name == "no_monitors_no_guards" else cli.always_on_callbacks
        with mock.patch.object(cli, "always_on_callbacks", always_on):
            args = [*s.overhead.split(), "--budget", f"{part.left():.1f}", *s.medseg.split(), *extra]
            results[name] = training_overhead.main([*args, "--output", str(work / f"{name}.json")])
        if results[name]["stopped_at_budget"]:
            budget.stopped = True
    ms = {n: 1000 * results[n]["settings"]["batch_size"] / results[n]["images_per_s"]["pipeline"]
          for n in names if n in results}  # fmt: skip
    results["ms_per_step"] = {"pipeline": round(ms["all"], 3)} if "all" in ms else {}
    if {"all", "no_monitors"} <= set(ms):
        results["ms_per_step"]["monitors"] = round(ms["all"] - ms["no_monitors"], 3)
    if {"no_monitors", "no_monitors_no_guards"} <= set(ms):
        results["ms_per_step"]["guards"] = round(ms["no_monitors"] - ms["no_monitors_no_guards"], 3)
    if budget.part(1).stop():
        results["not_run"]["host_syncs"] = "time budget spent before it started"
    else:
        backend = "cuda" if torch.cuda.is_available() else "reads"
        flags = [*s.medseg.split(), *s.sync.split()]
        results["host_syncs"] = host_syncs.count_fit(s.sync_steps, backend, flags)
    results["host_to_device"] = training_overhead.HOST_TO_DEVICE[
        "cuda" if torch.cuda.is_available() else "cpu"
    ]
    return results


def headline(sections: dict) -> list[tuple]:
    """The table: each figure against its baseline and target (``run_all``'s rows where they exist)."""
    rows = [(n, "failed", error_cell(r["error"].strip().splitlines()[-1]), "", "", "", "NO")
            for n, r in sections.items() if "error" in r]  # fmt: skip
    for case, r in sections.get("throughput", {}).items():
        rows += [(case, *row[1:]) for row in summarize("gpu", r)]
    if "wait_fraction" in (w := sections.get("data_wait", {})):
        default, case = str(w["default_workers"]), w["case"]
        rows += [
            row("data_wait", f"{case}: share of step time waiting for data, {n} workers (steady state)",
                share, "", share, "<= 0.1" if n == default else "")
            for n, share in w["wait_fraction"].items()
        ]  # fmt: skip
        rows += [
            ("data_wait", f"{n} workers not run", why, "", "", "", "") for n, why in w["not_run"].items()
        ]
    for name in ("train", "train3d"):
        if "exit" in (t := sections.get(name, {})):
            problems = t["exit"] + t["stride_warnings"]
            rows.append(
                row(
                    name, "medseg fit: exit status + stride-mismatch warnings", problems, "", problems, "<= 0"
                )
            )
            cl, convs = t["channels_last_weights"], t["conv_weights"]
            rows.append(
                row(name, "conv weights trained channels-last, of all", cl, convs, ratio(cl, convs), ">= 1")
            )
            rows.append(row(name, "bf16-mixed chosen (1: yes)", int(t["bf16"]), "", int(t["bf16"]), ">= 1"))
    for name in ("infer", "infer3d"):
        if "exit" in (i := sections.get(name, {})):
            cases = (i["ok"], i["cases"], ratio(i["ok"], i["cases"]))
            rows.append(row(name, "medseg infer: cases written", *cases, ">= 1"))
    o = sections.get("overhead", {})
    if "all" in o:
        rows += [("overhead", *row[1:]) for row in summarize("training", o["all"])]
    for name in ("no_monitors", "no_monitors_no_guards"):
        if name in o:
            r = o[name]["images_per_s"]
            rows.append(
                row("overhead", f"{name} vs bare loop (img/s)", r["pipeline"], r["bare"], o[name]["ratio"])
            )
    rows += [
        row("overhead", f"ms per step: {part}", ms, "", ms) for part, ms in o.get("ms_per_step", {}).items()
    ]
    if "host_syncs" in o:
        syncs = o["host_syncs"]
        median, mean = syncs["median"], syncs["mean"]
        rows.append(row("overhead", "host syncs per step (median, mean)", median, mean, median, "<= 0"))
    rows += [("overhead", f"{n} not run", why, "", "", "", "") for n, why in o.get("not_run", {}).items()]
    return rows


def budget_rows(report: dict) -> list[tuple]:
    """Per section: seconds taken against its budget, and whether it stopped at it."""
    rows = []
    for name, seconds in report["seconds"].items():
        limit, stopped = report["budget_s"][name], report["stopped_at_budget"][name]
        measure = f"{name}: seconds vs budget" + (" (stopped at its budget)" if stopped else "")
        rows.append(row("budget", measure, seconds, limit, ratio(seconds, limit)))
    total, limit = sum(report["seconds"].values()), sum(report["budget_s"].values())
    rows.append(row("budget", "all sections: seconds vs budget", round(total, 1), limit, ratio(total, limit)))
    return rows


def write_report(report: dict, folder: Path) -> tuple[Path, Path]:
    """``gpu_check-<machine>-<date>.json`` (everything) and ``.md`` (the headline table) in ``folder``."""
    m = report["machine"]
    stem = f"gpu_check-{machine_slug(m)}-{report['date']}"
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    write_json(json_path, report)
    md_path.write_text(
        f"# medseg GPU check: {m['device']}, {report['date']}{' (dry run on the CPU)' if report['dry_run'] else ''}\n\n"
        f"torch {m['torch']}. Medians over repeats; every ratio is against a baseline measured in the "
        f"same run. {report['host_to_device']} Full results: `{json_path.name}`.\n\n"
        + markdown_table(HEADER, headline(report["sections"]) + budget_rows(report))
    )
    return json_path, md_path


HOST_TO_DEVICE = (
    "Host-to-device copies: the throughput arms all train on a batch already on the device (no copy "
    "in any arm); in data_wait and overhead every arm, medseg fit and the bare loops alike, copies "
    "each batch from pinned host memory to the device within its timed step."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu", action="store_true", help="dry run of every section on the CPU, tiny settings"
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all the sections run, shared as their budgets are (default: "
        f"{sum(GPU_BUDGETS.values()):g} on a GPU, {sum(CPU_BUDGETS.values()):g} with --cpu)",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)"
    )
    opts = parser.parse_args(argv)
    quiet()
    if not opts.cpu and not torch.cuda.is_available():
        print("gpu check: no CUDA GPU here; run it on a GPU machine (or --cpu for a dry run)")
        return 1
    device, s = (torch.device("cpu"), CPU) if opts.cpu else (torch.device("cuda"), GPU)
    names = opts.only or SECTIONS
    scale = 1.0 if opts.budget is None else opts.budget / sum(s.budgets[n] for n in names)
    torch.backends.cudnn.benchmark = True  # trainer.benchmark: true
    report: dict = {"date": today(), "dry_run": opts.cpu, "seconds": {}, "budget_s": {}}
    copies = HOST_TO_DEVICE + (" (On the CPU of a dry run nothing is copied.)" if opts.cpu else "")
    report |= {"stopped_at_budget": {}, "host_to_device": copies, "sections": {}}
    sections = report["sections"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def checkpoint(train: str) -> str:
            return sections.get(train, {}).get("checkpoint", "")

        run: dict[str, Callable[[Budget], dict]] = {
            "environment": lambda b: environment(device, b),
            "throughput": lambda b: throughput(device, s, b),
            "data_wait": lambda b: data_wait(device, s, b),
            "train": lambda b: user_runs.train(
                work, s.phantoms, s.train_batches, s.medseg.split(), 2, b.deadline
            ),
            "infer": lambda b: user_runs.infer(
                work, checkpoint("train"), s.volumes, s.infer.split(), "", b.deadline
            ),
            "train3d": lambda b: user_runs.train(
                work, s.volumes, s.train_batches, s.medseg.split(), 3, b.deadline
            ),
            "infer3d": lambda b: user_runs.infer(
                work, checkpoint("train3d"), s.volumes, s.infer.split(), "3d", b.deadline
            ),
            "overhead": lambda b: overhead(work, s, b),
        }
        for name in names:
            budget = Budget(s.budgets[name] * scale)
            print(f"== {name} (budget {budget.seconds:.0f} s)", flush=True)
            try:
                sections[name] = run[name](budget)
            except Exception:  # record it, run the others
                traceback.print_exc()
                sections[name] = {"error": traceback.format_exc()}
            if sections[name].get("timed_out"):
                budget.stopped = True
            report["seconds"][name] = round(time.perf_counter() - budget.start, 1)
            report["budget_s"][name] = round(budget.seconds, 1)
            report["stopped_at_budget"][name] = budget.stopped
    report["machine"] = machine_info()
    json_path, md_path = write_report(report, opts.output)
    print(f"\n{md_path.read_text()}\nwritten: {json_path}, {md_path}")
    missed = not opts.cpu and any(row[-1] == "NO" for row in headline(sections))  # the dry run has no targets
    return 1 if missed or any("error" in r for r in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
