"""The ``medseg`` command: one subcommand per job; ``medseg --help`` lists them all.

Each subcommand's module is imported only when it runs, so ``medseg --help`` answers without
loading torch. Training and evaluation are LightningCLI subcommands (configs compose left to
right, the last wins)::

    medseg fit -c configs/default.yaml -c configs/model/unet.yaml -c configs/data/synthetic.yaml
    medseg validate -c <run>/config.yaml --ckpt_path <run>/checkpoints/best.ckpt
    medseg cv -c configs/default.yaml -c configs/model/unet.yaml -c configs/data/synthetic.yaml
    medseg fit ... --print_config          # the full config, to start a new file
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Sequence

from pipeline.errors import DataError, TrainingDiverged

# name: ("module:function" taking the remaining words, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("pipeline.cli.lightning:fit_command", "train a model (LightningCLI: -c configs..., --key value)"),
    "validate": ("pipeline.cli.lightning:validate_command", "score a checkpoint on the validation split"),
    "test": ("pipeline.cli.lightning:test_command", "score a checkpoint on the held-out test split"),
    "infer": (
        "pipeline.cli.infer:infer_command",
        "segment new scans with a checkpoint (batch inference)",
    ),
    "plan": (
        "pipeline.cli.plan:plan_command",
        "plan a volume data set: spacing, patch, batch, pooling (2D, 3D)",
    ),
    "data": (
        "pipeline.cli.data:data_command",
        "data sets: synth (generate), check (validate), prepare (cache)",
    ),
    "ablation": (
        "pipeline.cli.ablation:ablation_command",
        "train every variant of an ablation suite",
    ),
    "cv": (
        "pipeline.cli.cv:cv_command",
        "k-fold cross-validation: train every fold, out-of-fold scores, postprocessing",
    ),
    "auto": (
        "pipeline.cli.auto:auto_command",
        "the best model a time budget buys: plan, 2D/3D in folds, choose, ensemble, postprocess",
    ),
    "compare": ("pipeline.cli.compare:compare_command", "compare run directories: report and plots"),
    "export": (
        "pipeline.cli.export:export_command",
        "export a network to ONNX or TorchScript with its preprocessing.json",
    ),
}


def usage() -> str:
    """``medseg --help``: every subcommand with its line of help."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(
        [
            "usage: medseg <command> [options]     (medseg <command> --help for its options)",
            "",
            "Medical image segmentation with PyTorch Lightning: train, evaluate, segment, compare.",
            "",
            "commands:",
            *lines,
            "",
            "start with: make train, or medseg fit -c configs/default.yaml -c configs/model/unet.yaml "
            "-c configs/data/synthetic.yaml",
        ]
    )


def split_passthrough(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """A command's own words and the ``medseg fit`` flags after ``--`` (for every run it starts)."""
    words = list(args)
    if "--" not in words:
        return words, []
    return words[: words.index("--")], words[words.index("--") + 1 :]


# when the running command began, before its imports: medseg auto's budget counts them
STARTED = [time.time()]


def main(argv: Sequence[str] | None = None) -> None:
    STARTED[0] = time.time()
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if words else 2)
    if words[0] not in COMMANDS:
        print(f"medseg: unknown command {words[0]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module, function = COMMANDS[words[0]][0].split(":")
    try:
        getattr(importlib.import_module(module), function)(words[1:])
    except (DataError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
