"""Does the k-fold ensemble beat one fold? Per-case Dice on held-out test volumes, CPU budget.

    python benchmarks/cv_ensemble.py                  # 24 volumes, 3 folds of 600 steps: ~25 min on 2 busy cores
    python benchmarks/cv_ensemble.py --cases 40 --folds 5 --epochs 8

Generates synthetic CT volumes (``medseg data synth --volumes``: MSD layout, every case with its
own spacing and shape) with a few more cases than its default, then runs ``medseg cv`` on them with
a fifth of the cases held out as a test split (``--data.test_fraction 0.2``; the folds are cut from
the rest): the default UNet config at a small width, 2D slices, the budget below. Each fold's best
checkpoint and the ensemble of all folds (``medseg infer --checkpoint f0 f1 ...``; and
``--model-dir``, which adds the postprocessing the CV chose on its out-of-fold predictions) then
segment the test volumes, and every prediction is scored per case in 3D on the case's own grid
(``pipeline.experiments.cv_scores``: what validation and the CV score). Written:
``results/cv_ensemble.json`` (settings, machine, times, the CV's summary, every case's Dice per
model) and the table printed at the end, for ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.common import RESULTS, load_average, machine_info, markdown_table, quiet, write_json  # noqa: E402
from pipeline.cli import main as medseg  # noqa: E402
from pipeline.cli.identity import fit_runner  # noqa: E402
from pipeline.data.reading.layouts import discover  # noqa: E402
from pipeline.experiments.cv import plan_cv  # noqa: E402
from pipeline.experiments.cv_scores import case_labels, score_case  # noqa: E402
from pipeline.inference.ensemble import CV_SUMMARY  # noqa: E402

CONFIGS = REPO / "configs"


def cv_args(data: Path, runs: Path, opts: argparse.Namespace) -> list[str]:
    """``medseg cv`` flags: the default UNet on volumes (``configs/data/msd.yaml``) at the budget."""
    return [
        *("-c", str(CONFIGS / "default.yaml"), "-c", str(CONFIGS / "model" / "unet.yaml")),
        *("-c", str(CONFIGS / "data" / "msd.yaml"), "--data.root", str(data)),
        *("--data.num_folds", str(opts.folds), "--data.test_fraction", "0.2"),
        *(
            "--data.patch_size",
            "null",
            "--data.batch_size",
            str(opts.batch_size),
        ),  # planned patch: whole slices
        *("--data.iterations_per_epoch", str(opts.iterations), "--trainer.max_epochs", str(opts.epochs)),
        *("--model.net.init_args.features", json.dumps(opts.features), "--model.hd95", "false"),
        *("--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "10"),
        *("--run.root", str(runs), "--run.experiment", "cv_ensemble", "--run.wandb", "false"),
    ]


def test_dice(data: Path, test: list[str], masks: Path, class_names: list[str]) -> dict[str, dict]:
    """Every test case's Dice (foreground mean and per class) of the masks ``medseg infer`` wrote."""
    cases = {case.case_id: case for case in discover(data)}
    scores = {}
    for case_id in test:
        predicted, truth, spacing = case_labels(cases[case_id], masks / f"{case_id}.nii.gz")
        scores[case_id] = {
            k: v for k, v in score_case(predicted, truth, class_names, spacing).items() if "dice" in k
        }
    return scores


def mean(values: list[float | None]) -> float:
    return statistics.fmean(v for v in values if v is not None)


def run(opts: argparse.Namespace, work: Path) -> dict:
    data, runs = work / "synthetic_volumes", work / "runs"
    medseg(
        ["data", "synth", "--volumes", "--num-images", str(opts.cases), "--output", str(data), "--seed", "0"]
    )
    args = cv_args(data, runs, opts)
    cv = plan_cv(args, fit_runner())
    test = cv.splits[0]["test"]
    inputs = [str(data / "imagesTr" / f"{case_id}.nii.gz") for case_id in test]
    started = time.perf_counter()
    medseg(["cv", *args])
    seconds = {"cv": time.perf_counter() - started}
    summary = json.loads((cv.folder / CV_SUMMARY).read_text())
    checkpoints = [str(cv.folder / path) for path in summary["checkpoints"]]
    models = {f"fold {f}": ["--checkpoint", c] for f, c in enumerate(checkpoints)}
    models["ensemble"] = ["--checkpoint", *checkpoints]
    models["ensemble + postprocessing"] = ["--model-dir", str(cv.folder)]
    per_case = {}
    for name, model in models.items():
        out = work / "test" / name.replace(" ", "_").replace("+", "")
        started = time.perf_counter()
        medseg(["infer", *model, "--input", *inputs, "--output", str(out), "--num-workers", "0"])
        seconds[f"infer {name}"] = time.perf_counter() - started
        per_case[name] = test_dice(data, test, out, summary["class_names"])
    means = {name: mean([s["dice"] for s in scores.values()]) for name, scores in per_case.items()}
    folds = [means[f"fold {f}"] for f in range(opts.folds)]
    return {
        "settings": {k: v for k, v in vars(opts).items() if k != "output"},
        "machine": machine_info(),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "load_average_end": load_average(),
        "test_cases": test,
        "mean_dice": means,
        "mean_single_fold_dice": statistics.fmean(folds),
        "sd_single_fold_dice": statistics.stdev(folds) if len(folds) > 1 else None,
        "ensemble_minus_mean_fold": means["ensemble"] - statistics.fmean(folds),
        "per_case": per_case,
        "cv": {k: summary[k] for k in ("mean_sd", "pooled", "postprocessing", "folds")},
    }


def table(result: dict) -> str:
    """Per test case: each fold's Dice, their mean, the ensemble's (and with postprocessing)."""
    per_case = result["per_case"]
    folds = [name for name in per_case if name.startswith("fold")]
    rows = []
    for case_id in result["test_cases"]:
        single = [per_case[f][case_id]["dice"] for f in folds]
        rows.append(
            (
                case_id,
                *single,
                statistics.fmean(single),
                *(per_case[e][case_id]["dice"] for e in per_case if e not in folds),
            )
        )
    means = result["mean_dice"]
    rows.append(("mean", *(means[f] for f in folds), result["mean_single_fold_dice"],
                 *(means[e] for e in per_case if e not in folds)))  # fmt: skip
    header = ("test case", *folds, "mean of folds", *(e for e in per_case if e not in folds))
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24, help="volumes generated (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=3, help="k (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs per fold (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=50, help="steps per epoch (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per step (default: %(default)s)")
    parser.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64], help="UNet widths")
    parser.add_argument("--output", type=Path, default=RESULTS / "cv_ensemble.json")
    opts = parser.parse_args(argv)
    quiet()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(opts, Path(tmp))
    write_json(opts.output, result)
    print(table(result))
    print(
        f"cv_ensemble: ensemble Dice {result['mean_dice']['ensemble']:.4f} vs mean single fold "
        f"{result['mean_single_fold_dice']:.4f} ({result['ensemble_minus_mean_fold']:+.4f}) on "
        f"{len(result['test_cases'])} test volumes; cv {result['seconds']['cv']:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()
