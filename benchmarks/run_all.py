"""Every benchmark in one run: ``make bench``; results in ``benchmarks/results/<machine>-<date>.{json,md}``.

    python benchmarks/run_all.py                    # about 20-30 minutes on a busy 2-core CPU
    python benchmarks/run_all.py --only training data_loading
    python benchmarks/run_all.py --quick            # small settings: checks the suite in minutes

Runs each script's ``main()`` in turn (see benchmarks/README.md for what each measures); every
figure is a ratio against a baseline measured in the same run, a median over repeats. A benchmark that
fails is recorded with its error and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.common import (  # noqa: E402
    HEADER,
    RESULTS,
    headline_row,
    load_average,
    machine_info,
    machine_slug,
    markdown_table,
    quiet,
    today,
    write_json,
)

# name: (module, its arguments, more in --quick mode)
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "training": ("training_overhead", "", "--steps 3 --warmup 1 --repeats 1"),
    "training_3d": ("training_overhead", "--dims 3", "--steps 3 --warmup 1 --repeats 1 --volumes 8"),
    "data_loading": ("data_loading", "", "--images 40 --batches 10 --repeats 1 --fed-steps 3"),
    "cache": ("cache_speed", "", "--shape 64 64 16 --cases 3 --slices 200 --nifti-slices 6 --repeats 2"),
    "inference": ("inference_speed", "", "--cases 3 --depth 8 --repeats 1"),
    "gradient_monitor": ("gradient_monitor_overhead", "", "--size 64 --steps 4 --warmup 1 --repeats 1"),
    "memory": ("memory", "", "--cases 4 8 --shape 40 40 12 --steps 3 --val-batches 1"),
    "gpu": ("gpu_throughput", "", "--steps 5 --repeats 1 --no-compile --wait-steps 10"),
}


def error_cell(error: str, limit: int = 300) -> str:
    """The first line of an arm's ``Type: message`` error, short and safe in a markdown table."""
    line = next((line for line in error.strip().splitlines() if line.strip()), "")
    return line[:limit].replace("|", "\\|")


def summarize(name: str, r: dict) -> list[tuple]:
    """The headline rows of benchmark ``name``'s result ``r``."""
    row = functools.partial(headline_row, name)
    if "error" in r:
        return [(name, "failed", r["error"].strip().splitlines()[-1], "", "", "", "NO")]
    if "skipped" in r:
        return [(name, "skipped", r["skipped"], "", "", "", "")]
    if name in ("training", "training_3d"):
        ips, cpu = r["images_per_s"], r["cpu_s_per_step"]
        steps = (r["median_step_s"]["bare"], r["median_step_s"]["pipeline"])
        settings, unit, rate, what = r.get("settings", {}), "image", "img/s", ""
        if settings.get("dims") == 3:  # the patch and batch: planned, so they say what was measured
            unit, rate = "patch", "patches/s"
            what = f"3D UNet, {'x'.join(map(str, settings['input']))} x {settings['batch_size']}: "
        rows = [
            row(f"{what}medseg fit vs bare loop ({rate})", ips["pipeline"], ips["bare"], r["ratio"], ">= 0.95"),
            row("bare loop vs medseg fit (CPU s/step)", cpu["bare"], cpu["pipeline"], r["cpu_ratio"]),
            row("bare loop vs medseg fit (median step, s)", *steps, r["median_step_ratio"]),
        ]  # fmt: skip
        if "monai" in ips and "flops_per_image" in r:
            ours, theirs = (r["flops_per_image"][k] / 1e9 for k in ("bare", "monai"))
            rows.append(row(f"our UNet ({ours:.2f} GFLOP/{unit}) vs MONAI BasicUNet ({theirs:.2f}) ({rate})",
                            ips["bare"], ips["monai"], r["ours_vs_monai"]))  # fmt: skip
            rows.append(row("the same, per FLOP (achieved FLOP/s)", "", "", r["ours_vs_monai_flop_rate"]))
        elif "monai" in ips:  # recorded before FLOPs were counted
            rows.append(
                row("our UNet vs MONAI BasicUNet (img/s)", ips["bare"], ips["monai"], r["ours_vs_monai"])
            )
        return rows
    if name == "data_loading":
        if "fed_images_per_s" not in r:  # recorded before the loader was measured feeding training
            consumption, default = r["consumption_images_per_s"], str(r["wait_fraction_workers"])
            return [
                row(f"loader alone, {w} workers (samples/s) vs model (img/s)", rate, consumption,
                    r["ratio_per_workers"][w], ">= 3" if w == default else "")
                for w, rate in r["loader_samples_per_s"].items()
            ]  # fmt: skip
        workers, share = r["fed_workers"], r["wait_fraction"]
        fed, preloaded = r["fed_images_per_s"], r["preloaded_images_per_s"]
        return [
            row(f"training fed by {workers} workers vs on preloaded batches (img/s)", fed, preloaded, r["ratio"], ">= 0.9"),
            row(f"share of step time waiting for data, {workers} workers", share, "", share, "<= 0.1"),
            *(
                row(f"loader alone, {w} workers (samples/s) vs preloaded training (img/s)", rate, preloaded,
                    r["loader_vs_preloaded_training"][w])
                for w, rate in r["loader_samples_per_s"].items()
            ),
        ]  # fmt: skip
    if name == "cache":
        rates = r["slices_per_second"]
        if "nii" not in rates:  # recorded before the uncompressed proxy baseline
            return [
                row("cache vs NIfTI reads (slices/s)", rates["cache"], rates["nifti"], r["ratio"], ">= 10")
            ]
        nii, nii_gz, item = rates["nii"], rates["nii_gz"], rates["dataset_item"]
        return [
            row("cache vs nibabel proxy read of .nii (slices/s)", rates["cache"], nii, r["ratio"], ">= 5"),
            row(
                "cache vs nibabel proxy read of .nii.gz (slices/s)",
                rates["cache"],
                nii_gz,
                r["ratio_vs_nii_gz"],
                ">= 100",
            ),
            row(
                "SliceDataset items from the cache vs .nii proxy (/s)",
                item,
                nii,
                r["dataset_item_vs_nii"],
                ">= 1",
            ),
        ]
    if name == "inference":
        infer, bare = r["infer_cases_per_s"], r["bare_cases_per_s"]
        return [row("medseg infer vs bare loop (cases/s)", infer, bare, r["ratio"], ">= 0.85")]
    if name == "gradient_monitor":
        steps, hook = r["median_step_s"], r["median_hook_ms"] / 1000
        return [
            row(
                "step, monitor every step vs off (s)", steps["with"], steps["without"], r["ratio"], "<= 1.03"
            ),
            row("time in the monitor's hook vs step without it (s)", hook, steps["without"], r["hook_share"]),
        ]
    if name == "memory":
        f = r["figures_mb"]
        small, large = sorted(f, key=int)
        rss, pss = (
            (f[large]["peak_rss_mb"], f[small]["peak_rss_mb"]),
            (f[large]["peak_pss_mb"], f[small]["peak_pss_mb"]),
        )
        rows = [
            row(f"peak RSS (MB), {large} vs {small} volumes", *rss, r["ratio"], "<= 1.5"),
            row("peak PSS of process + workers (MB), same runs", *pss, r["ratio_pss"]),
        ]
        if "ratio_if_held" in r:  # the large set decoded, held in memory: the figure can fail only above 1.5
            held = f[small]["peak_rss_mb"] + f[large]["cache_mb"]
            rows.append(
                row("peak RSS (MB) if the large set were held", held, rss[1], r["ratio_if_held"], ">= 1.5")
            )
        return rows
    if name == "gpu":
        ips, default = r["images_per_s"], str(r.get("wait_fraction_default_workers"))
        speedup, tflops, matmul = r["speedup_vs_fp32"], r["achieved_tflops"], r["matmul_tflops"]
        rows = [
            row(f"{arm} vs fp32 (img/s)", rate, ips["fp32"], speedup[arm], ">= 2" if arm == "bf16_cl" else "")
            for arm, rate in ips.items() if arm != "fp32" and arm in speedup
        ]  # fmt: skip
        # an arm that failed (torch.compile, memory) or that a time budget left out: a row each
        rows += [
            (name, f"{arm} failed", error_cell(error), "", "", "", "NO")
            for arm, error in r.get("errors", {}).items()
        ]
        rows += [(name, f"{arm} not run", why, "", "", "", "") for arm, why in r.get("not_run", {}).items()]
        rows += [
            row(f"{arm}: model TFLOP/s vs bf16 matmul", tflops[arm], matmul, r["fraction_of_matmul"][arm])
            for arm in ips
        ]
        rows += [
            row(f"share of step time waiting for data, {w} workers", share, "", share,
                "<= 0.1" if w == default else "")
            for w, share in r.get("wait_fraction", {}).items()  # gpu_check measures it apart
        ]  # fmt: skip
        return rows
    return []


def write_report(report: dict, folder: Path) -> tuple[Path, Path]:
    """``<machine>-<date>.json`` (everything) and ``.md`` (the headline table) in ``folder``; a
    later run of the same day adds the UTC time, ``<machine>-<date>-<hhmmss>``, keeping the first."""
    stem = f"{report['machine_slug']}-{report['date']}"
    if (folder / f"{stem}.json").exists():
        stem += time.strftime("-%H%M%S", time.gmtime())
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    write_json(json_path, report)
    rows = [row for name, result in report["benchmarks"].items() for row in summarize(name, result)]
    m = report["machine"]
    text = (
        f"# medseg benchmarks: {report['machine_slug']}, {report['date']}\n\n"
        f"{m['device']}; CPU {m['cpu']} x {m['cpu_count']}; torch {m['torch']}; load average (1 min) "
        f"{report['load_average']['start']} at the start, {report['load_average']['end']} at the end "
        f"({report['seconds']:.0f} s). Medians over repeats; every ratio is against a baseline "
        "measured in the same run (benchmarks/README.md). Full results: "
        f"`{json_path.name}`.\n\n" + markdown_table(HEADER, rows)
    )
    md_path.write_text(text)
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument(
        "--quick", action="store_true", help="small settings (checks the suite, noisy figures)"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)"
    )
    opts = parser.parse_args(argv)
    quiet()
    names = opts.only or list(BENCHMARKS)
    report: dict = {"date": today(), "machine": machine_info(), "quick": opts.quick, "benchmarks": {}}
    report["machine_slug"] = machine_slug(report["machine"])
    report["load_average"] = {"start": load_average()}
    report["seconds_per_benchmark"] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            module, args, quick_args = BENCHMARKS[name]
            args = [*args.split(), *(quick_args.split() if opts.quick else [])]
            args += ["--output", str(Path(tmp) / f"{name}.json")]
            print(f"== {name} (load average {load_average()})", flush=True)
            began = time.perf_counter()
            try:
                result = importlib.import_module(f"benchmarks.{module}").main(args)
            except Exception:  # record it, run the others
                traceback.print_exc()
                result = {"error": traceback.format_exc()}
            report["seconds_per_benchmark"][name] = round(time.perf_counter() - began, 1)
            report["benchmarks"][name] = result
    report["load_average"]["end"] = load_average()
    report["seconds"] = round(time.perf_counter() - start, 1)
    json_path, md_path = write_report(report, opts.output)
    print(f"\n{md_path.read_text()}\nwritten: {json_path}, {md_path}")
    return 1 if any("error" in r for r in report["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
