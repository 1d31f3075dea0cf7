"""Shared fixtures: tiny generated data sets in temporary folders, CPU only, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 phantoms of 64x64 in the image/mask folder layout (read-only: copy before changing)."""
    from pipeline.data.synthesis.phantoms_2d import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("phantoms"), num_images=12, size=64, seed=0)


@pytest.fixture(scope="session")
def volume_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 synthetic CT volumes of 40x40x12 voxels at 0.9 x 0.9 x 3 mm in MSD layout (read-only: give
    the data module a ``cache_dir`` in ``tmp_path``, and copy the folder before changing it)."""
    from pipeline.data.synthesis.phantoms_3d import generate_volumes

    return generate_volumes(
        tmp_path_factory.mktemp("volumes") / "msd", num_cases=6, shape=(40, 40, 12), spacing=(0.9, 0.9, 3.0)
    )


@pytest.fixture(scope="session")
def mixed_volume_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic CT volumes, each with its own spacing (in-plane 0.6-1.2 mm, slices 1-5 mm) and
    shape, in MSD layout (read-only, as ``volume_dir``)."""
    from pipeline.data.synthesis.phantoms_3d import generate_volumes

    return generate_volumes(tmp_path_factory.mktemp("mixed") / "msd", num_cases=8, seed=1)


@pytest.fixture(scope="session")
def micro_ablation(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The experiment folder of a two-variant `medseg ablation` (tiny UNet with and without long
    skips, one epoch; tests/helpers/ablation.py), read-only."""
    from tests.helpers.ablation import run_micro_ablation

    return run_micro_ablation(phantom_dir, tmp_path_factory.mktemp("ablation"))


def run_path(runs: Path, experiment: str, data_root: Path, name: str) -> Path:
    """Where ``medseg fit`` writes run ``name`` of ``experiment`` on ``data_root``."""
    from pipeline.run.naming import dataset_name

    return runs / experiment / dataset_name(data_root) / name


def fit_args(data_root: Path, runs: Path, *extra: str) -> list[str]:
    """``medseg fit`` arguments for a seconds-long CPU run on tiny data."""
    return [
        "fit",
        "-c",
        str(CONFIGS / "default.yaml"),
        "-c",
        str(CONFIGS / "model" / "unet.yaml"),
        "-c",
        str(CONFIGS / "data" / "synthetic.yaml"),
        "--data.root",
        str(data_root),
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "4",
        "--model.net.init_args.features",
        "[8, 16, 32]",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        "--run.root",
        str(runs),
        *extra,
    ]


def volume_fit_args(data_root: Path, runs: Path, model: str = "unet", *extra: str) -> list[str]:
    """``medseg fit`` arguments for a CPU run on generated volumes, planned by ``configs/data/msd.yaml``:
    no test split, no loader workers, no W&B, no progress bar."""
    return [
        "fit",
        "-c",
        str(CONFIGS / "default.yaml"),
        "-c",
        str(CONFIGS / "model" / f"{model}.yaml"),
        "-c",
        str(CONFIGS / "data" / "msd.yaml"),
        "--data.root",
        str(data_root),
        "--data.test_fraction",
        "0",
        "--data.num_workers",
        "0",
        "--run.root",
        str(runs),
        "--run.wandb",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
