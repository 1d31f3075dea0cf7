"""The `medseg` command: fast help listing every subcommand, loggers of the config kept, W&B env."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import BasicUNet
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.cli import COMMANDS, main
from pipeline.inference.cases import find_inputs, load_case
from pipeline.training.checkpoint import load_model
from tests.conftest import fit_args, run_path

HELP_PROBE = "import sys; from pipeline.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"


def test_cli_help_lists_every_subcommand_without_importing_torch():
    out = subprocess.run(
        [sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, check=True
    ).stdout
    listed = {
        line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines() if line.startswith("  ")
    }
    for name, (_, text) in COMMANDS.items():  # the dispatch table: a command added there shows here
        assert listed.get(name) == text, name
    names = ("fit", "validate", "test", "infer", "plan", "data", "ablation", "cv", "compare", "export")
    assert set(COMMANDS) >= set(names)  # and none of these left the table
    assert out.strip().endswith("False")  # torch was never imported


def test_cli_predict_is_not_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict"])
    assert exit_info.value.code == 2 and "unknown command 'predict'" in capsys.readouterr().err


def test_cli_keeps_a_tensorboard_logger_of_the_config_beside_wandb(phantom_dir, tmp_path):
    config = tmp_path / "tensorboard.yaml"
    board = tmp_path / "tb"
    config.write_text(
        "trainer:\n  logger:\n    - class_path: pytorch_lightning.loggers.TensorBoardLogger\n"
        f"      init_args:\n        save_dir: {board}\n        name: mine\n"
    )
    main([*fit_args(phantom_dir, tmp_path / "runs"), "-c", str(config)])
    (events,) = board.rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/loss_step", "val/dice", "grad/global"} <= set(scalars)
    run = run_path(tmp_path / "runs", "default", phantom_dir, "unet-relu-kaiming-d3-s0")
    assert any((run / "wandb").glob("offline-run-*")) and "val/dice" in (run / "metrics.csv").read_text()


def test_cli_an_empty_wandb_mode_counts_as_unset(phantom_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    main(fit_args(phantom_dir, tmp_path / "runs"))
    run = run_path(tmp_path / "runs", "default", phantom_dir, "unet-relu-kaiming-d3-s0")
    assert any((run / "wandb").glob("offline-run-*"))  # offline: no key


def test_cli_a_monai_network_from_the_config_trains_checkpoints_and_infers(phantom_dir, tmp_path):
    net = [
        "--model.net.class_path",
        "monai.networks.nets.BasicUNet",
        "--model.net.init_args.spatial_dims",
        "2",
    ]
    net += ["--model.net.init_args.features", "[4, 4, 8, 16, 32, 4]", "--run.wandb", "false"]
    main(fit_args(phantom_dir, tmp_path / "runs", *net))
    checkpoint = (
        run_path(tmp_path / "runs", "default", phantom_dir, "basicunet-s0") / "checkpoints" / "best.ckpt"
    )
    images = phantom_dir / "images"
    main(
        ["infer", "--checkpoint", str(checkpoint), "--input", str(images), "--output", str(tmp_path / "out")]
    )
    masks = sorted(Path(tmp_path / "out").glob("*.png"))
    assert len(masks) == len(list(images.iterdir()))
    module, prep = load_model(checkpoint)  # the BasicUNet of the config, with its trained weights
    assert isinstance(module.net, BasicUNet) and list(prep.class_names) == [
        "background",
        "organ",
        "lesion",
        "vessel",
    ]
    foreground = 0
    for case in find_inputs([images]):
        with torch.no_grad():
            labels, _ = module.predict_case(load_case(case, prep)["image"])
        written = np.array(Image.open(tmp_path / "out" / f"{case.name}.png"))
        assert np.array_equal(written, labels[0].numpy()), case.name  # infer wrote what the network predicts
        foreground += int((written > 0).sum())
    assert foreground > 0


def test_cli_default_config_names_every_always_on_callback(tmp_path):
    # a reader of configs/default.yaml sees every callback a fit runs: the list in its comment is
    # the one always_on_callbacks builds, in its order
    import re

    from pipeline.cli.lightning import always_on_callbacks
    from pipeline.run.directory import RunConfig
    from pipeline.run.naming import run_identity

    identity = run_identity(RunConfig(root=str(tmp_path)), "unet", tmp_path, 0)
    built = [type(c).__name__ for c in always_on_callbacks("fit", identity, RunConfig(), 0)]
    text = (Path(__file__).parents[1] / "configs" / "default.yaml").read_text()
    listed = re.search(r"always_on_callbacks\):\n\s*#\s*(.+)\n", text).group(1)
    assert [name.strip() for name in listed.split(",")] == built
    assert always_on_callbacks("test", identity, RunConfig(), 0) == []
