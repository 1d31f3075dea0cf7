"""A two-variant micro-ablation (tiny UNet with and without long skips, one epoch) through `medseg ablation`."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "micro"
RUNS = ("unet-relu-kaiming-d3-s0", "unet-noskip-relu-kaiming-d3-s0")
TINY = [
    "--data.num_workers", "0",
    "--data.batch_size", "4",
    "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1",
    "--trainer.log_every_n_steps", "1",
    "--run.wandb", "false",
]  # fmt: skip


def micro_suite(folder: Path) -> Path:
    """A suite file with the repository's configs, one tiny profile and the models unet, unet_noskip."""
    configs = REPO / "configs"
    suite = {
        "configs": [str(configs / "default.yaml"), str(configs / "data" / "synthetic.yaml")],
        "model_dir": str(configs / "model"),
        "profiles": {
            "tiny": {
                "experiment": EXPERIMENT,
                "seeds": 1,
                "configs": [str(configs / "experiment" / "ablation_cpu.yaml")],
                "net": {"UNet": {"features": [4, 8, 16]}},
            }
        },
        "models": ["unet", "unet_noskip"],
    }
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def ablation_args(suite: Path, root: Path, data_root: Path) -> list[str]:
    """``medseg ablation`` arguments running the micro suite on ``data_root`` into ``root``."""
    return [
        "ablation",
        "--suite",
        str(suite),
        "--profile",
        "tiny",
        "--root",
        str(root),
        "--",
        "--data.root",
        str(data_root),
        *TINY,
    ]


def run_micro_ablation(data_root: Path, folder: Path) -> Path:
    """Run the micro-ablation into ``folder/runs``; returns its experiment folder."""
    main(ablation_args(micro_suite(folder), folder / "runs", data_root))
    return folder / "runs" / EXPERIMENT
