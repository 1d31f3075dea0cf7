"""Real scans at real size: every ``medseg`` command on generated CT of 512 x 512 x 80-130 voxels,
timed and measured, with the issue's acceptance targets; exits non-zero when one is missed.

    python benchmarks/real_size.py                   # 25-50 minutes on a busy 2-core CPU
    python benchmarks/real_size.py --minutes 30      # the issue's budget: ~50 minutes
    python benchmarks/real_size.py --cases 3 --minutes 1 --slices 80 90   # a quick look

Generates ``--cases`` CT volumes (``pipeline.data.synthesis.ct.generate_ct``: 512 x 512 in plane,
``--slices`` slices, each case its own spacing, ``.nii.gz``, a large organ and a small lesion) and
runs, each in a child process (``benchmarks.memory.measure``: wall and CPU seconds, the process's
peak RSS (VmHWM), the peak PSS summed over it and its loader workers, sampled every 0.25 s):

1. ``medseg data check ROOT``;
2. ``medseg plan ROOT`` (the default 2D UNet; it fingerprints the cases into the cache);
3. ``medseg fit`` with ``configs/default.yaml``, ``configs/model/unet.yaml`` (the 16..256 UNet) and
   ``configs/data/msd.yaml`` (planned patch and batch, 250 steps an epoch, 20% held out for test,
   default loader workers, ``ValidationBudget``), W&B off, ``--trainer.max_time`` of ``--minutes``;
   the cache is built by the fit (the resampled grids; the plan step has read the cases).
   ``benchmarks.step_timer.StepTimer``, appended to the callbacks on the command line, sums the
   seconds inside training steps, validations and checkpoint writes; lines the fit prints are
   timestamped as they arrive, which places the plan and the cache build. The figure is the share
   of the fit's wall time (launch to exit) outside training steps: start-up, caching, set-up,
   waiting for batches, validation, checkpoints, the end of the run (target <= 0.15). A model of
   ``ValidationBudget`` itself, on a clock the measured costs advance, projects that share to a
   30-minute budget (``projected_30min``),
   from the measured costs: a projection, not a measurement;
4. ``medseg test`` of the run's ``best.ckpt`` on the held-out cases (seconds per case);
5. ``medseg infer`` of ``best.ckpt`` on the first held-out case, against ``benchmarks/bare_infer.py``
   (a bare PyTorch + MONAI loop with the same network weights, patch, overlap, windows per forward,
   device and precision, reading the NIfTI and writing the mask: its docstring lists every step)
   in alternating order (``--repeats`` each): seconds per case, voxels (of the input) per second,
   and speed ratio medseg / bare (bare seconds over medseg seconds; target >= 0.85). The two
   masks are compared (organ Dice, voxels that agree).

Writes ``benchmarks/results/real_size.json`` and ``real_size.md`` (``--output``); the work folder is
a temporary one unless ``--workdir`` is given. Run it alone on the machine: every figure is a wall
time on a shared 2-core CPU, so the load average is recorded at every step.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from pytorch_lightning.callbacks import Timer  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    alternate,
    load_average,
    machine_info,
    markdown_table,
    median,
    write_json,
)
from benchmarks.memory import measure  # noqa: E402
from pipeline.data.synthesis.ct import generate_ct  # noqa: E402
from pipeline.training import validation_budget  # noqa: E402
from pipeline.training.validation_budget import ValidationBudget  # noqa: E402

CONFIGS = REPO / "configs"
MAX_OUTSIDE_SHARE = 0.15  # of a fit's wall time outside training steps
MIN_INFER_RATIO = 0.85  # medseg infer's speed over the bare loop's
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
ENV |= {
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PYTHONUNBUFFERED": "1",
}


def fit_args(root: Path, runs: Path, minutes: float, timer: Path, features: list[int] | None) -> list[str]:
    """``medseg fit`` as a user runs it on a volume data set, for ``minutes`` of training (the UNet's
    ``features`` changed if given)."""
    configs = [CONFIGS / "default.yaml", CONFIGS / "model" / "unet.yaml", CONFIGS / "data" / "msd.yaml"]
    seconds = round(minutes * 60)
    callback = {"class_path": "benchmarks.step_timer.StepTimer", "init_args": {"output": str(timer)}}
    return [
        "fit",
        *(a for c in configs for a in ("-c", str(c))),
        "--data.root", str(root),
        "--run.root", str(runs),
        "--run.name", "real-size",
        "--run.wandb", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.max_time", f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}",
        f"--trainer.callbacks+={json.dumps(callback)}",
        *(["--model.net.init_args.features", json.dumps(features)] if features else []),
    ]  # fmt: skip


def first_line(lines: list[tuple[float, str]], prefix: str) -> float | None:
    """Seconds since launch of the first printed line starting with ``prefix``."""
    return next((t for t, line in lines if line.startswith(prefix)), None)


def _between(lines: list[tuple[float, str]], first: str, last: str) -> float | None:
    """Seconds from the first line starting with ``first`` to the first starting with ``last``."""
    a, b = first_line(lines, first), first_line(lines, last)
    return None if a is None or b is None else round(b - a, 2)


def fit_breakdown(figures: dict, timer: dict, launched: float) -> dict:
    """Where the fit's wall time went, in seconds and as shares of it."""
    wall, stamps, lines = figures["wall_s"], timer["stamps"], figures["lines"]
    planned, cached = first_line(lines, "planned:"), first_line(lines, "data ")
    first_batch = stamps["first_batch"] - launched
    parts = {
        "start_to_plan": planned,  # interpreter, imports, config parsing, the plan (cases read from the cache)
        "cache_build": cached - planned if cached is not None and planned is not None else None,
        "setup": first_batch - (cached if cached is not None else 0.0),  # model, Trainer, loggers, workers
        "training_steps": timer["step_seconds"],
        "waiting_for_batches": timer["wait_seconds"],
        "validation": timer["validation_seconds"],
        "checkpoints": timer["checkpoint_seconds"],
        "end": wall - (stamps["fit_end"] - launched),  # after fit_end: summary, plots, teardown, exit
    }
    known = sum(v for v in parts.values() if v is not None)
    parts["other"] = wall - known  # epoch-end hooks, monitors, logging between epochs
    return {
        "seconds": {k: None if v is None else round(v, 2) for k, v in parts.items()},
        "shares": {k: None if v is None else round(v / wall, 4) for k, v in parts.items()},
        "outside_steps_share": round(1 - timer["step_seconds"] / wall, 4),
        "steps": timer["steps"],
        "seconds_per_step": round(timer["step_seconds"] / max(timer["steps"], 1), 3),
        "validations": timer["validations"],
        "seconds_per_validation": round(timer["validation_seconds"] / max(timer["validations"], 1), 2),
        "epochs": timer["epochs"],
    }


def configured_share() -> float:
    """``ValidationBudget``'s ``max_share`` in ``configs/default.yaml``: what the fit ran with."""
    callbacks = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())["trainer"]["callbacks"]
    return next(
        c["init_args"]["max_share"] for c in callbacks if c["class_path"].endswith("ValidationBudget")
    )


def projected_share(breakdown: dict, minutes: float, steps_per_epoch: int, max_share: float) -> dict:
    """The outside-steps share at a ``minutes`` budget, from the measured costs: medseg's own
        ``ValidationBudget`` driven through a run on a clock that the measured step and validation
        times advance. A model, not a measurement: it assumes those times hold.

        Lightning's ``Timer`` counts from the start of training, validation included, and checks the
        time only after a training step, so an epoch that starts runs at least one step, even when the
        previous validation used the budget up; the epoch the ``Timer`` stops is validated (the
    callback's own per-step rule), unless it began with the budget already spent.
    """
    seconds = breakdown["seconds"]
    step = breakdown["seconds_per_step"] + seconds["waiting_for_batches"] / max(breakdown["steps"], 1)
    validation, epoch = breakdown["seconds_per_validation"], steps_per_epoch * step
    budget, clock, validations, training = minutes * 60, [0.0], 0, 0.0
    callback, timer = ValidationBudget(max_share), Timer(duration=timedelta(minutes=minutes))
    timer.time_remaining = lambda stage=None: budget - clock[0]  # type: ignore[method-assign]
    trainer = SimpleNamespace(
        max_epochs=None, current_epoch=0, callbacks=[timer], sanity_checking=False, should_stop=False
    )
    trainer.strategy = SimpleNamespace(broadcast=lambda value: value)
    original = validation_budget.time.monotonic
    validation_budget.time.monotonic = lambda: clock[0]
    try:
        while True:
            callback.on_train_epoch_start(trainer, None)
            run = min(epoch, max(step, budget - clock[0]))  # at least one step, at most an epoch
            clock[0] += run
            training += run
            trainer.should_stop = clock[0] >= budget  # the Timer stops the run at this step
            callback.on_train_batch_end(trainer, None, None, None, 0)  # which then validates it
            if trainer.check_val_every_n_epoch == 1:
                callback.on_validation_start(trainer, None)
                clock[0] += validation
                callback.on_validation_end(trainer, None)
                validations += 1
            callback.on_train_epoch_end(trainer, None)
            trainer.current_epoch += 1
            if clock[0] >= budget:
                break
    finally:
        validation_budget.time.monotonic = original
    fixed = sum(seconds[k] or 0.0 for k in ("start_to_plan", "cache_build", "setup", "end"))
    wall = fixed + clock[0] + seconds["checkpoints"] / max(breakdown["validations"], 1) * validations
    steps_seconds = training * breakdown["seconds_per_step"] / step
    return {
        "minutes": minutes,
        "validations": validations,
        "wall_s": round(wall, 1),
        "outside_steps_share": round(1 - steps_seconds / wall, 4),
        "validation_share": round(validations * validation / wall, 4),
    }


def mask_agreement(a: Path, b: Path, source: Path) -> dict:
    """Shapes and affines of two written masks against the input; organ Dice and voxel agreement."""
    first, second, image = nib.load(a), nib.load(b), nib.load(source)
    x, y = np.asanyarray(first.dataobj), np.asanyarray(second.dataobj)
    organ_x, organ_y = x == 1, y == 1
    total = organ_x.sum() + organ_y.sum()
    return {
        "same_shape_as_input": [first.shape == image.shape, second.shape == image.shape],
        "same_affine_as_input": [
            bool(np.array_equal(first.affine, image.affine)),
            bool(np.array_equal(second.affine, image.affine)),
        ],
        "organ_dice": round(float(2 * (organ_x & organ_y).sum() / total), 5) if total else None,
        "voxels_equal": round(float((x == y).mean()), 6),
    }


def run_infer_pair(work: Path, checkpoint: Path, case: Path, repeats: int) -> dict:
    """``medseg infer`` and the bare loop on one case, alternating, ``repeats`` each."""
    counter = iter(range(10**6))
    bare_out = work / "infer_bare" / "mask.nii.gz"

    def medseg() -> dict:
        out = work / "infer_medseg"
        args = ["infer", "--checkpoint", str(checkpoint), "--input", str(case), "--output", str(out)]
        figures = measure([*args, "--overwrite"], work / f"infer-{next(counter)}.log", ENV)
        with (out / "predictions.csv").open() as f:
            (row,) = csv.DictReader(f)
        return figures | {"load": load_average(), "case_seconds": float(row["seconds"])}

    def bare() -> dict:
        timings = work / "bare_timings.json"
        args = ["--script", str(REPO / "benchmarks" / "bare_infer.py"), "--checkpoint", str(checkpoint)]
        args += ["--input", str(case), "--output", str(bare_out), "--timings", str(timings)]
        figures = measure(args, work / f"bare-{next(counter)}.log", ENV)
        return figures | {"load": load_average(), "steps": json.loads(timings.read_text())["seconds"]}

    runs = alternate({"bare": bare, "medseg": medseg}, repeats)
    voxels = math.prod(nib.load(case).shape)
    summary = {}
    for arm, rs in runs.items():
        wall = median(r["wall_s"] for r in rs)
        summary[arm] = {
            "seconds_per_case": round(wall, 2),
            "cpu_seconds": round(median(r["cpu_s"] for r in rs), 2),
            "voxels_per_s": round(voxels / wall),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "peak_pss_mb": max(r["peak_pss_mb"] for r in rs),
        }
    bare_steps = {k: round(median(r["steps"][k] for r in runs["bare"]), 2) for k in runs["bare"][0]["steps"]}
    stripped = {arm: [{k: v for k, v in r.items() if k != "lines"} for r in rs] for arm, rs in runs.items()}
    return {
        "case": str(case.name),
        "voxels": voxels,
        **summary,
        "bare_steps_seconds": bare_steps,
        "medseg_predict_seconds": round(median(r["case_seconds"] for r in runs["medseg"]), 2),
        "ratio": round(summary["bare"]["seconds_per_case"] / summary["medseg"]["seconds_per_case"], 3),
        "cpu_ratio": round(summary["bare"]["cpu_seconds"] / summary["medseg"]["cpu_seconds"], 3),
        "agreement": mask_agreement(work / "infer_medseg" / case.name, bare_out, case),
        "runs": stripped,
    }


def _s(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def step_row(name: str, figures: dict, note: str = "") -> tuple:
    return (
        name,
        _s(figures["wall_s"]),
        _s(figures["cpu_s"]),
        _mb(figures["peak_rss_mb"]),
        _mb(figures["peak_pss_mb"]),
        note,
    )


def report(result: dict) -> str:
    """The markdown summary: every step, the fit's breakdown, inference, targets."""
    steps, fit, infer = result["steps"], result["fit"], result["infer"]
    header = ("step", "wall s", "CPU s", "peak RSS MB", "peak PSS MB (tree)", "note")
    rows = [
        ("generate", _s(result["generate_s"]), "", "", "", f"{result['settings']['cases']} cases, in this process"),
        step_row("data check", steps["check"]),
        step_row("plan", steps["plan"]),
        step_row("fit", steps["fit"], f"max_time {result['settings']['minutes']} min, {fit['steps']} steps"),
        step_row("test", steps["test"], f"{result['test']['cases']} case(s), {result['test']['seconds_per_case']} s each "
            f"({result['test']['scoring_seconds']} s predicting and scoring)"),
        ("infer (medseg)", _s(infer["medseg"]["seconds_per_case"]), _s(infer["medseg"]["cpu_seconds"]),
         _mb(infer["medseg"]["peak_rss_mb"]), _mb(infer["medseg"]["peak_pss_mb"]),
         f"1 case, {infer['voxels']:,} voxels, {infer['medseg']['voxels_per_s']:,} voxels/s (median of {len(infer['runs']['medseg'])})"),
        ("infer (bare loop)", _s(infer["bare"]["seconds_per_case"]), _s(infer["bare"]["cpu_seconds"]),
         _mb(infer["bare"]["peak_rss_mb"]), _mb(infer["bare"]["peak_pss_mb"]),
         f"benchmarks/bare_infer.py, {infer['bare']['voxels_per_s']:,} voxels/s"),
    ]  # fmt: skip
    parts = ["# Real-size CT: medseg end to end\n", markdown_table(header, rows)]
    shares = fit["shares"]
    parts.append("\nFit wall time by part (share of the fit's wall time):\n")
    parts.append(
        markdown_table(
            ("part", "seconds", "share"),
            [(k, _s(v), "" if shares[k] is None else f"{shares[k]:.3f}") for k, v in fit["seconds"].items()],
        )
    )
    targets = [
        (
            "fit: share of wall time outside training steps",
            fit["outside_steps_share"],
            f"<= {MAX_OUTSIDE_SHARE}",
        ),
        ("infer: speed medseg / bare loop", infer["ratio"], f">= {MIN_INFER_RATIO}"),
    ]
    parts.append("\nTargets:\n")
    parts.append(
        markdown_table(
            ("measure", "value", "target", "met"),
            [
                (m, v, t, "yes" if name not in result["missed"] else "NO")
                for (m, v, t), name in zip(targets, ("fit_outside_share", "infer_ratio"), strict=True)
            ],
        )
    )
    parts.append(
        f"\nInfer, other views of the same runs: fastest run of each arm {infer['ratio_fastest']}, CPU seconds "
        f"{infer['cpu_ratio']}; the two masks: organ Dice {infer['agreement']['organ_dice']}, voxels equal "
        f"{infer['agreement']['voxels_equal']}, shape and affine of the input {infer['agreement']['same_affine_as_input']}.\n"
    )
    projection = result["projected_30min"]
    parts.append(
        f"\nProjected to a 30-minute budget (ValidationBudget's rule on the measured costs, not measured): "
        f"{projection['validations']} validations, outside-steps share {projection['outside_steps_share']}, "
        f"validation share {projection['validation_share']}.\n"
    )
    for note in result.get("notes", []):  # added by hand after a run, e.g. a re-measured step
        parts.append(f"\nNote: {note}\n")
    load = result["load_average"]
    parts.append(
        f"\nMachine: {result['machine']['cpu']} ({result['machine']['cpu_count']} cores); load average "
        f"(1 min) from {load[0]} to {load[-1]}, max {max(load)} over the steps.\n"
    )
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6, help="generated cases (default: %(default)s)")
    parser.add_argument("--slices", type=int, nargs=2, default=[80, 130], help="slice count range")
    parser.add_argument("--minutes", type=float, default=3.0, help="fit's max_time (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="infer runs per arm (default: %(default)s)")
    parser.add_argument(
        "--features", type=int, nargs="+", help="UNet widths (default: configs/model/unet.yaml's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", type=Path, help="keep the data and runs here (default: a temporary folder)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "real_size.json")
    parser.add_argument(
        "--report", type=Path, help="only rewrite the derived figures and markdown of this result file"
    )
    opts = parser.parse_args(argv)
    if opts.report:
        return finish(json.loads(opts.report.read_text()), opts.report)
    if opts.cases < 3:
        parser.error("--cases must be at least 3 (training, validation and test cases)")
    tmp = None if opts.workdir else tempfile.mkdtemp(prefix="medseg-real-size-")
    work = opts.workdir or Path(tmp)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    loads = [load_average()]
    try:
        start = time.perf_counter()
        root = generate_ct(work / "ct", opts.cases, opts.seed, slices=opts.slices)
        generate_s = round(time.perf_counter() - start, 2)
        shutil.rmtree(root / ".medseg-cache", ignore_errors=True)
        shutil.rmtree(work / "runs", ignore_errors=True)
        steps = {}
        for name, args in (("check", ["data", "check", str(root)]), ("plan", ["plan", str(root)])):
            steps[name] = measure(args, work / f"{name}.log", ENV)
            loads.append(load_average())
            print(
                f"{name}: {steps[name]['wall_s']:.1f} s, peak RSS {steps[name]['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        timer_file = work / "step_timer.json"
        launched = time.time()
        steps["fit"] = measure(
            fit_args(root, work / "runs", opts.minutes, timer_file, opts.features), work / "fit.log", ENV
        )
        loads.append(load_average())
        timer = json.loads(timer_file.read_text())
        fit = fit_breakdown(steps["fit"], timer, launched)
        print(
            f"fit: {steps['fit']['wall_s']:.0f} s, outside steps {fit['outside_steps_share']:.3f}", flush=True
        )
        run = work / "runs" / "default" / root.name / "real-size"
        split = json.loads((run / "split.json").read_text())
        checkpoint = run / "checkpoints" / "best.ckpt"
        test_args = ["test", "-c", str(run / "config.yaml"), "--ckpt_path", str(checkpoint)]
        steps["test"] = measure(
            [*test_args, "--trainer.enable_progress_bar", "false"], work / "test.log", ENV
        )
        loads.append(load_average())
        with (run / "test_cases.csv").open() as f:
            test_rows = list(csv.DictReader(f))
        print(f"test: {steps['test']['wall_s']:.0f} s for {len(test_rows)} case(s)", flush=True)
        case = root / "imagesTr" / f"{split['test'][0]}.nii.gz"
        infer = run_infer_pair(work, checkpoint, case, opts.repeats)
        loads.append(load_average())
        print(f"infer: medseg {infer['medseg']['seconds_per_case']} s, bare {infer['bare']['seconds_per_case']} s, "
              f"ratio {infer['ratio']}", flush=True)  # fmt: skip
        plan = json.loads((run / "plan.json").read_text())
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "settings": {k: v for k, v in vars(opts).items() if k not in ("output", "workdir")},
        "machine": machine_info(),
        "load_average": loads,
        "generate_s": generate_s,
        "steps": {k: {f: v for f, v in s.items() if f != "lines"} for k, s in steps.items()},
        "plan": {k: plan.get(k) for k in ("target_spacing", "net_2d", "coverage_3d", "lowres_3d")},
        "split": {k: len(v) for k, v in split.items()},
        "fit": fit,
        "test": {
            "cases": len(test_rows),
            "seconds_per_case": round(steps["test"]["wall_s"] / max(len(test_rows), 1), 1),
            # from the weights loaded to the report written: prediction and scoring of the cases
            "scoring_seconds": _between(steps["test"]["lines"], "Loaded model weights", "test report"),
            "dice_organ": [float(r["dice_organ"]) for r in test_rows],
        },
        "infer": infer,
        "targets": {"fit_outside_share": f"<= {MAX_OUTSIDE_SHARE}", "infer_ratio": f">= {MIN_INFER_RATIO}"},
    }
    return finish(result, opts.output)


def finish(result: dict, output: Path) -> int:
    """Derive the projection and the targets' verdicts, write the JSON and the markdown, print
    them; 1 when a target is missed."""
    result["projected_30min"] = projected_share(result["fit"], 30, 250, configured_share())
    # the fastest run of each arm: on a shared machine noise only adds time (for information)
    fastest = {arm: min(r["wall_s"] for r in rs) for arm, rs in result["infer"]["runs"].items()}
    result["infer"]["ratio_fastest"] = round(fastest["bare"] / fastest["medseg"], 3)
    result["missed"] = [
        name
        for name, ok in (
            ("fit_outside_share", result["fit"]["outside_steps_share"] <= MAX_OUTSIDE_SHARE),
            ("infer_ratio", result["infer"]["ratio"] >= MIN_INFER_RATIO),
        )
        if not ok
    ]
    write_json(output, result)
    markdown = report(result)
    output.with_suffix(".md").write_text(markdown)
    print(markdown)
    for name in result["missed"]:
        print(f"TARGET MISSED: {name} ({result['targets'][name]})", file=sys.stderr)
    return 1 if result["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
