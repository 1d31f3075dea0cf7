"""Does deep supervision pay at equal CPU time? Per-case 3D Dice on held-out generated volumes.

    python benchmarks/deep_supervision.py                  # 4 arms x 3 minutes, about 16 minutes
    python benchmarks/deep_supervision.py --minutes 1 --arms 3d_off 3d_on

Four arms train for the same wall time each on the same training cases (``medseg data synth
--volumes``: CT-like, every case with its own spacing, the split of ``benchmarks/volume_plan.py``)
and are scored on the same held-out cases, per case in 3D on their own grid (Dice per class from
the NIfTI masks ``medseg infer`` writes):

- ``2d_off``, ``2d_on``: ``configs/model/unet.yaml`` + ``configs/data/msd.yaml`` as they come, with
  ``deep_supervision`` off and on (auxiliary losses at 1/2 and 1/4 of the patch).
- ``3d_off``, ``3d_on``: the same with ``configs/model/unet3d.yaml`` on the plan's 3D patch.

Every arm is planned, trained and scored alike; only the knob differs within a dimension, so a
difference in steps is deep supervision's cost (its heads and extra loss terms) and one in Dice
what it bought within the same time. Arms run in the order 2d_off, 2d_on, 3d_on, 3d_off, so a
steady drift in machine load does not favour one setting in both dimensions; the load average
before and after each arm is recorded. Arguments that this script does not know go to every
``medseg fit`` (e.g. ``--data.num_workers 0``). Results: ``results/deep_supervision.json`` and
``.md`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.common import RESULTS, load_average, machine_info, markdown_table, write_json  # noqa: E402
from benchmarks.volume_plan import class_names, dice_per_case, fit_medseg, infer, make_data, summarise  # noqa: E402

ARMS = ("2d_off", "2d_on", "3d_on", "3d_off")  # ABBA: the knob's order flips between the dimensions
KNOB = ("--model.net.init_args.deep_supervision", "true")


def run_arm(arm: str, work: Path, data: Path, test: list[str], minutes: float, extra: list[str]) -> dict:
    """Fit one arm for ``minutes``, infer the held-out cases, score them: the arm's result entry."""
    model = "unet3d" if arm.startswith("3d") else "unet"
    knob = KNOB if arm.endswith("_on") else ()
    load_before, start = load_average(), time.perf_counter()
    checkpoint, steps = fit_medseg(work, data, arm, minutes, model, *knob, *extra)
    fit_seconds = time.perf_counter() - start
    predictions = infer(checkpoint, data / "imagesTr", test, work / "predictions" / arm)
    classes = class_names(data)
    scores = dice_per_case(predictions, data / "labelsTr", test, classes)
    summary = json.loads((checkpoint.parents[1] / "summary.json").read_text())
    return {
        "model": model,
        "deep_supervision": bool(knob),
        "variant": summary.get("variant"),
        "dice": summarise(scores, classes),
        "per_case": scores,
        "steps": steps,
        "val_dice_best": summary.get("final", {}).get("val/dice_best"),
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - start,
        "load_before": load_before,
        "load_after": load_average(),
    }


def table(result: dict, classes: tuple[str, ...]) -> str:
    """The markdown table: one row per arm, Dice per class and mean, steps, seconds, load."""
    rows = [
        (arm, r["steps"], round(r["fit_seconds"]), round(r["seconds"]),
         *(f"{r['dice'][k]:.3f}" for k in (*classes, "mean")), f"{r['load_before']} / {r['load_after']}")
        for arm, r in result["arms"].items()
    ]  # fmt: skip
    dice = (*(f"Dice {c}" for c in classes), "mean Dice")
    header = ("arm", "steps", "fit s", "fit + infer s", *dice, "load before / after")
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24, help="generated volumes (default: %(default)s)")
    parser.add_argument("--test-cases", type=int, default=6, help="cases held out (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None, help="an MSD task instead of generated volumes")
    parser.add_argument("--minutes", type=float, default=3.0, help="wall time per arm (default: %(default)s)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "deep_supervision", help="work folder")
    parser.add_argument("--output", type=Path, default=RESULTS / "deep_supervision.json")
    opts, extra = parser.parse_known_args(argv)
    data, split = make_data(opts.work, opts.cases, opts.seed, opts.test_cases, opts.data)
    classes = class_names(data)
    result = {"machine": machine_info(), "load_start": load_average(), "data": str(opts.data or "generated"),
              "cases": sum(map(len, split.values())), "split": split, "minutes_per_arm": opts.minutes,
              "fit_args": extra, "arms": {}}  # fmt: skip
    for arm in opts.arms:
        result["arms"][arm] = run_arm(arm, opts.work, data, split["test"], opts.minutes, extra)
        print(arm, result["arms"][arm]["steps"], "steps", result["arms"][arm]["dice"], flush=True)
    result["load_end"] = load_average()
    write_json(opts.output, result)
    text = table(result, classes)
    opts.output.with_suffix(".md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
