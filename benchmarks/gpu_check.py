"""One prepared check of medseg's CUDA path on a GPU: ``make gpu-check``, under 8 minutes on an H100/H200.

    python benchmarks/gpu_check.py               # on a CUDA GPU
    python benchmarks/gpu_check.py --cpu         # every section with tiny settings on the CPU (dry run)
    python benchmarks/gpu_check.py --only train infer

Writes ``results/gpu_check-<machine>-<date>.json`` (every figure) and ``.md`` (the headline table
with targets). A section that fails is recorded with its error, the others still run, and the
exit status is 1. Sections:

- ``environment``: GPU, memory, SMs, driver, CUDA, cuDNN, NCCL, bf16, TF32 settings, versions.
- ``throughput``: each entry of ``gpu_throughput.MODEL_CASES`` (the 2D UNet at 256x256; the 3D
  UNet at the 32x192x192 patch, batch 2, that the plan gives abdominal CT scans, 512x512x100 at
  0.78x0.78x2.5 mm, on 8 GB) trained on preloaded batches in fp32, bf16, bf16 + channels-last
  and + ``torch.compile`` (images or patches/s, medians of alternating rounds; target bf16 +
  channels-last >= 2x fp32), its forward + backward FLOPs per image, and the achieved TFLOP/s
  against a bf16 matmul measured here (utilisation).
- ``data_wait``: the 2D UNet fed by the real training loader and its workers (the default count
  and 2): the share of step time spent waiting for data (target <= 0.1 with the default).
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
  (``host_syncs`` with CUDA's sync debug mode; target: median 0).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
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
from benchmarks.run_all import summarize  # noqa: E402
from pipeline.cli import lightning as cli  # noqa: E402

CONFIGS = REPO / "configs"
SECTIONS = ("environment", "throughput", "train", "infer", "train3d", "infer3d", "overhead")


@dataclass(frozen=True)
class Settings:
    """How much each section runs: the defaults are the full check on a GPU."""

    cases: tuple[gpu_throughput.ModelCase, ...] = tuple(gpu_throughput.MODEL_CASES)
    steps: int = 30  # timed steps per arm and round
    warmup: int = 5
    repeats: int = 3
    compile: bool = True
    matmul: int = 8192  # side of the bf16 matmul that sets the utilisation's scale
    wait_images: int = 64
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


GPU = Settings()
CPU = Settings(  # the dry run: every section, tiny, on the CPU
    cases=(gpu_throughput.unet2d(32, 2, (4, 8)), gpu_throughput.unet3d((4, 8), memory_gb=0.001)),
    **dict(steps=1, warmup=1, repeats=1, compile=False, matmul=64, wait_images=8, wait_steps=2),
    **dict(phantoms=12, train_batches=2, volumes=6, sync_steps=3),  # 6 volumes: 4 to train, 1 to validate
    overhead="--size 32 --batch-size 2 --features 4 8 --steps 2 --warmup 1 --repeats 1 --no-monai",
    medseg="--trainer.accelerator cpu --model.net.init_args.features [4,8] --data.num_workers 0 "
    "--trainer.precision bf16-mixed --model.channels_last_on_cpu true",  # the GPU's fast path
    infer="--accelerator cpu --num-workers 0",
    sync="--run.sync_every_n_steps 50",  # a GPU's cadence: counts what would sync there
)


def environment(device: torch.device) -> dict:
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
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        }
        query = [
            "nvidia-smi",
            "--query-gpu=driver_version,clocks.max.sm,power.limit",
            "--format=csv,noheader",
        ]
        smi = subprocess.run(query, capture_output=True, text=True, check=False)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def throughput(device: torch.device, s: Settings) -> dict:
    """Per model case, ``gpu_throughput``'s figures (the 2D case with its data wait)."""
    arms = [name for name, (_, _, compiled) in gpu_throughput.ARMS.items() if s.compile or not compiled]
    matmul = gpu_throughput.matmul_tflops(
        device, s.matmul, 20 if device.type == "cuda" else 2, torch.bfloat16
    )
    workers = sorted({2, default_workers()}) if device.type == "cuda" else [0]
    cases = {}
    for case in s.cases:
        r = gpu_throughput.measure_case(case, device, s.steps, s.warmup, s.repeats, arms)
        r["matmul_tflops"] = round(matmul, 2)
        r["fraction_of_matmul"] = {k: ratio(v, matmul) for k, v in r["achieved_tflops"].items()}
        waits = (
            gpu_throughput.data_wait(case, workers, s.wait_images, s.wait_steps, device)
            if len(case.spatial) == 2
            else {}
        )
        r["wait_fraction"] = {w: round(x["wait_fraction"], 4) for w, x in waits.items()}
        r["wait_fraction_default_workers"] = workers[-1] if device.type == "cuda" else 0
        cases[case.name] = r
    return cases


def overhead(work: Path, s: Settings) -> dict:
    """``training_overhead`` with every default callback, without the monitors and without both
    (the per-step cost of each, in ms), and the host synchronisations per training step."""
    config = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    checkpoints = [c for c in config["trainer"]["callbacks"] if "ModelCheckpoint" in c["class_path"]]
    no_monitors = work / "no_monitors.yaml"
    no_monitors.write_text(yaml.safe_dump({"trainer": {"callbacks": checkpoints}}))
    results = {}
    for name in ("all", "no_monitors", "no_monitors_no_guards"):
        extra = ["-c", str(no_monitors)] if name != "all" else []
        always_on = (lambda *args: []) if name == "no_monitors_no_guards" else cli.always_on_callbacks
        with mock.patch.object(cli, "always_on_callbacks", always_on):
            args = [*s.overhead.split(), *s.medseg.split(), *extra, "--output", str(work / f"{name}.json")]
            results[name] = training_overhead.main(args)
    ms = {n: 1000 * r["settings"]["batch_size"] / r["images_per_s"]["pipeline"] for n, r in results.items()}
    results["ms_per_step"] = {
        "monitors": round(ms["all"] - ms["no_monitors"], 3),
        "guards": round(ms["no_monitors"] - ms["no_monitors_no_guards"], 3),
        "pipeline": round(ms["all"], 3),
    }
    backend = "cuda" if torch.cuda.is_available() else "reads"
    results["host_syncs"] = host_syncs.count_fit(s.sync_steps, backend, [*s.medseg.split(), *s.sync.split()])
    return results


def headline(sections: dict) -> list[tuple]:
    """The table: each figure against its baseline and target (``run_all``'s rows where they exist)."""
    rows = [
        (n, "failed", r["error"].strip().splitlines()[-1], "", "", "", "NO")
        for n, r in sections.items()
        if "error" in r
    ]
    for case, r in sections.get("throughput", {}).items():
        rows += [(case, *row[1:]) for row in summarize("gpu", r)]
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
    if "all" in (o := sections.get("overhead", {})):
        rows += [("overhead", *row[1:]) for row in summarize("training", o["all"])]
        for name in ("no_monitors", "no_monitors_no_guards"):
            r = o[name]["images_per_s"]
            rows.append(
                row("overhead", f"{name} vs bare loop (img/s)", r["pipeline"], r["bare"], o[name]["ratio"])
            )
        rows += [row("overhead", f"ms per step: {part}", ms, "", ms) for part, ms in o["ms_per_step"].items()]
        syncs = o["host_syncs"]
        median, mean = syncs["median"], syncs["mean"]
        rows.append(row("overhead", "host syncs per step (median, mean)", median, mean, median, "<= 0"))
    return rows


def write_report(report: dict, folder: Path) -> tuple[Path, Path]:
    """``gpu_check-<machine>-<date>.json`` (everything) and ``.md`` (the headline table) in ``folder``."""
    m = report["machine"]
    stem = f"gpu_check-{machine_slug(m)}-{report['date']}"
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    write_json(json_path, report)
    md_path.write_text(
        f"# medseg GPU check: {m['device']}, {report['date']}{' (dry run on the CPU)' if report['dry_run'] else ''}\n\n"
        f"torch {m['torch']}; seconds per section {report['seconds']}. Medians over repeats; every ratio is "
        f"against a baseline measured in the same run. Full results: `{json_path.name}`.\n\n"
        + markdown_table(HEADER, headline(report["sections"]))
    )
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu", action="store_true", help="dry run of every section on the CPU, tiny settings"
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)"
    )
    opts = parser.parse_args(argv)
    quiet()
    if not opts.cpu and not torch.cuda.is_available():
        print("gpu check: no CUDA GPU here; run it on a GPU machine (or --cpu for a dry run)")
        return 1
    device, s = (torch.device("cpu"), CPU) if opts.cpu else (torch.device("cuda"), GPU)
    torch.backends.cudnn.benchmark = True  # trainer.benchmark: true
    report: dict = {"date": today(), "dry_run": opts.cpu, "seconds": {}, "sections": {}}
    sections = report["sections"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def checkpoint(train: str) -> str:
            return sections.get(train, {}).get("checkpoint", "")

        run = {
            "environment": lambda: environment(device),
            "throughput": lambda: throughput(device, s),
            "train": lambda: user_runs.train(work, s.phantoms, s.train_batches, s.medseg.split()),
            "infer": lambda: user_runs.infer(work, checkpoint("train"), s.volumes, s.infer.split()),
            "train3d": lambda: user_runs.train(work, s.volumes, s.train_batches, s.medseg.split(), 3),
            "infer3d": lambda: user_runs.infer(work, checkpoint("train3d"), s.volumes, s.infer.split(), "3d"),
            "overhead": lambda: overhead(work, s),
        }
        for name in opts.only or SECTIONS:
            print(f"== {name}", flush=True)
            began = time.perf_counter()
            try:
                sections[name] = run[name]()
            except Exception:  # record it, run the others
                traceback.print_exc()
                sections[name] = {"error": traceback.format_exc()}
            report["seconds"][name] = round(time.perf_counter() - began, 1)
    report["machine"] = machine_info()
    json_path, md_path = write_report(report, opts.output)
    print(f"\n{md_path.read_text()}\nwritten: {json_path}, {md_path}")
    missed = not opts.cpu and any(row[-1] == "NO" for row in headline(sections))  # the dry run has no targets
    return 1 if missed or any("error" in r for r in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
