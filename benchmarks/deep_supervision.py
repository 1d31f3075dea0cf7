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

Steps within the same minutes depend on the machine's load as much as on the knob, so
``--step-cost-only`` then measures the knob's cost alone, into the same files: training steps
(forward, loss, backward, AdamW) of each arm's planned network on its planned batch of random
data, knob off and on in turn (``alternate``, ABBA), the median seconds a step of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from monai.losses import DiceCELoss

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.common import (  # noqa: E402
    RESULTS,
    alternate,
    load_average,
    machine_info,
    markdown_table,
    median,
    write_json,
)
from benchmarks.volume_plan import class_names, dice_per_case, fit_medseg, infer, make_data, summarise  # noqa: E402
from pipeline.models import build_net  # noqa: E402
from pipeline.run.naming import dataset_name  # noqa: E402
from pipeline.training.deep_supervision import deep_supervision_loss  # noqa: E402

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


def step_timer(spec: dict, batch: int, patch: list[int], seed: int) -> Callable[[], float]:
    """A callable that runs one training step of ``build_net(spec)`` on a fixed random batch and
    returns its wall seconds (the network, its optimiser and the batch are built once)."""
    torch.manual_seed(seed)
    net = build_net(spec).train()
    init = spec["init_args"]
    image = torch.randn(batch, init["in_channels"], *patch)
    mask = torch.randint(init["out_channels"], (batch, 1, *patch))
    optimizer = torch.optim.AdamW(net.parameters(), 1e-4)
    loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        deep_supervision_loss(loss, net(image), mask).backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def step_cost(work: Path, data: Path, repeats: int, seed: int) -> dict:
    """Median seconds a training step, knob off and on, on each dimension's planned network and
    batch (read from the ``*_off`` arm's run), the two settings timed in turn."""
    out = {}
    for dims in ("2d", "3d"):
        run = work / "runs" / "default" / dataset_name(data) / f"{dims}_off"
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        stored = checkpoint["medseg"]
        batch = yaml.safe_load((run / "config.yaml").read_text())["data"]["batch_size"]
        patch = stored["preprocessing"]["patch_size"]
        init_args = stored["net"]["init_args"]
        specs = {
            knob: {**stored["net"], "init_args": {**init_args, "deep_supervision": knob == "on"}}
            for knob in ("off", "on")
        }
        steps = {knob: step_timer(spec, batch, patch, seed) for knob, spec in specs.items()}
        for step in steps.values():
            step()  # warm-up, not timed
        times = alternate(steps, repeats)
        off, on = median(times["off"]), median(times["on"])
        out[dims] = {"batch": batch, "patch": patch, "seconds_off": off, "seconds_on": on, "ratio": on / off}
    return out


def table(result: dict, classes: tuple[str, ...]) -> str:
    """The markdown table: one row per arm, Dice per class and mean, steps, seconds, load."""
    rows = [
        (arm, r["steps"], round(r["fit_seconds"]), round(r["seconds"]),
         *(f"{r['dice'][k]:.3f}" for k in (*classes, "mean")), f"{r['load_before']} / {r['load_after']}")
        for arm, r in result["arms"].items()
    ]  # fmt: skip
    dice = (*(f"Dice {c}" for c in classes), "mean Dice")
    header = ("arm", "steps", "fit s", "fit + infer s", *dice, "load before / after")
    text = markdown_table(header, rows)
    cost = result.get("step_cost")
    if cost:
        rows = [
            (
                dims,
                " x ".join(map(str, [c["batch"], *c["patch"]])),
                c["seconds_off"],
                c["seconds_on"],
                c["ratio"],
            )
            for dims, c in cost.items()
        ]
        header = ("network", "batch", "s a step, off", "s a step, on", "on / off")
        text += "\n" + markdown_table(header, rows)
    return text


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
    parser.add_argument(
        "--step-cost-only",
        action="store_true",
        help="only time training steps knob off and on, on the planned networks of the runs in --work",
    )
    parser.add_argument("--step-repeats", type=int, default=20, help="timed steps per setting (default: 20)")
    opts, extra = parser.parse_known_args(argv)
    data, split = make_data(opts.work, opts.cases, opts.seed, opts.test_cases, opts.data)
    classes = class_names(data)
    if opts.step_cost_only:
        result = json.loads(opts.output.read_text())
        result["step_cost"] = step_cost(opts.work, data, opts.step_repeats, opts.seed)
        result["step_cost_load"] = load_average()
        write_json(opts.output, result)
        opts.output.with_suffix(".md").write_text(table(result, classes))
        print(table(result, classes))
        return result
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
