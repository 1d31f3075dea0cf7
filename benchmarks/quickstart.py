"""The README's first figures, measured: ``make train``'s time and Dice, and the "Train on your own
volumes" transcript, each command run as the README shows it and its lines recorded.

    python benchmarks/quickstart.py                    # both, ~15 minutes on a 2-core CPU
    python benchmarks/quickstart.py --only transcript  # the volume transcript alone (~5 minutes)

``train``: ``medseg fit`` with ``make train``'s configs (default UNet on the default 2D phantom
set, generated first as ``make data`` does) in a temporary folder, W&B off: wall seconds from
launch to exit and the run's best ``val/dice`` from its ``summary.json``.

``transcript``: generates the 20-volume demo task, then runs ``data check``, ``plan``, a
``--trainer.max_time`` fit, ``test`` of its ``best.ckpt`` and ``infer`` on the images folder, and keeps
the lines of each command's output that the README shows (``KEEP``; the elided ones become
``...``). ``benchmarks/readme_figures.py`` writes the transcript into the README between
``<!-- transcript:begin -->`` and ``<!-- transcript:end -->``, and the train figures inline.

Writes ``benchmarks/results/quickstart.json`` (``--output``), merging with the section it did not
run, so ``--only`` refreshes one section without losing the other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.common import RESULTS, load_average, machine_info, today, write_json  # noqa: E402

MEDSEG = [sys.executable, "-m", "pipeline"]
CONFIGS = ["-c", "configs/default.yaml", "-c", "configs/model/unet.yaml"]
VOLUME_CONFIGS = [*CONFIGS, "-c", "configs/data/msd.yaml"]
RUN = "runs/default/Task_demo/unet-relu-kaiming-s0"

# (command as the README prints it, lines of its output to keep, the README's comment on it)
STEPS = [
    (
        "medseg data check data/Task_demo",
        r"^(OK|error)",
        "every problem at once, one line per file; exit 1 if any",
    ),
    (
        "medseg plan " + " ".join(VOLUME_CONFIGS) + " --data.root data/Task_demo",
        r"^(plan for|  \S|\s{20,}\S)",
        "exactly what the fit below plans (fit's own arguments)",
    ),
    (
        "medseg fit "
        + " ".join(VOLUME_CONFIGS)
        + " --data.root data/Task_demo --trainer.max_time {max_time}",
        r"^(planned:|run |Time limit|wrote .*summary)",
        "2D; configs/model/unet3d.yaml for 3D",
    ),
    (
        f"medseg test -c {RUN}/config.yaml --ckpt_path {RUN}/checkpoints/best.ckpt",
        r"^(test report|.*test/(dice(_(?!slice)\w+)?|hd95)\s)",
        "per-case 3D scores of the held-out test cases",
    ),
    (
        f"medseg infer --checkpoint {RUN}/checkpoints/best.ckpt --input data/Task_demo/imagesTr --output masks/",
        r"^\d+ ok, \d+ failed",
        "one row per case: voxels and mL per class, spacing, warnings",
    ),
]


def run(command: list[str], cwd: Path) -> tuple[float, str]:
    """Run ``command`` in ``cwd`` (W&B off, no colour); (wall seconds, stdout and stderr).
    A failure raises with the command's last lines."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), "NO_COLOR": "1", "COLUMNS": "100"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    if done.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(command)} exited {done.returncode}:\n{tail}")
    return seconds, output


def kept_lines(output: str, keep: str) -> list[str]:
    """The lines of ``output`` matching ``keep``, with ``...`` where lines were left out between
    or after them (rich's table borders and progress bars are never kept)."""
    pattern, lines, skipped = re.compile(keep), [], False
    for line in output.splitlines():
        if pattern.search(line):
            if skipped and lines:
                lines.append("...")
            lines.append(line.rstrip())
            skipped = False
        else:
            skipped = True
    if skipped and lines:
        lines.append("...")
    return lines


def measure_train(work: Path) -> dict:
    """``make data`` then ``make train``'s fit in ``work``: seconds and best ``val/dice``."""
    data_seconds, _ = run([*MEDSEG, "data", "synth", "--output", "data/synthetic"], work)
    seconds, _ = run([*MEDSEG, "fit", *CONFIGS, "-c", "configs/data/synthetic.yaml"], work)
    run_dir = next(path.parent for path in (work / "runs").rglob("summary.json"))
    return {
        "data_seconds": round(data_seconds, 1),
        "seconds": round(seconds, 1),
        "minutes": round(seconds / 60, 1),
        "best_dice": round(float(json.loads((run_dir / "summary.json").read_text())["best"]["val/dice"]), 3),
        "run": str(run_dir.relative_to(work)),
        "load_average_end": load_average(),
    }


def measure_transcript(work: Path, max_time: str) -> dict:
    """The volume transcript in ``work``: each step's command, kept lines and seconds."""
    run([*MEDSEG, "data", "synth", "--volumes", "--output", "data/Task_demo", "--num-images", "20"], work)
    steps = []
    for command, keep, comment in STEPS:
        shown = command.format(max_time=max_time)
        seconds, output = run([*MEDSEG, *shlex.split(shown)[1:]], work)
        steps.append(
            {
                "command": shown,
                "comment": comment,
                "lines": kept_lines(output, keep),
                "seconds": round(seconds, 1),
            }
        )
    best = json.loads((work / RUN / "summary.json").read_text())["best"]
    return {
        "max_time": max_time,
        "best_dice": round(float(best["val/dice"]), 3),
        "best_step": int(best["step"]),
        "steps": steps,
        "load_average_end": load_average(),
    }


def link_repo(work: Path) -> None:
    """``configs/`` where the commands expect them, as in a checkout."""
    (work / "configs").symlink_to(REPO / "configs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["train", "transcript"])
    parser.add_argument("--max-time", default="00:00:03:00", help="the transcript fit's --trainer.max_time")
    parser.add_argument("--output", type=Path, default=RESULTS / "quickstart.json")
    opts = parser.parse_args(argv)
    result = json.loads(opts.output.read_text()) if opts.output.is_file() else {}
    result.update({"machine": machine_info(), "date": today()})
    with tempfile.TemporaryDirectory(prefix="medseg-quickstart-") as tmp:
        work = Path(tmp)
        link_repo(work)
        if opts.only in (None, "transcript"):
            result["transcript"] = measure_transcript(work, opts.max_time)
            print("\n".join(line for step in result["transcript"]["steps"] for line in step["lines"]))
        if opts.only in (None, "train"):
            result["train"] = measure_train(work)
            print(
                f"make train: {result['train']['minutes']} min, best val/dice {result['train']['best_dice']}"
            )
    write_json(opts.output, result)
    print(f"wrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
