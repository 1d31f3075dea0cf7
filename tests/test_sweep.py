"""The W&B sweep file: a grid over the ablation suite's knobs whose every run `medseg fit` accepts."""

from __future__ import annotations

import itertools

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, load_sweep_config

from pipeline.cli import main
from pipeline.experiments.suite import load_suite
from tests.conftest import CONFIGS, REPO

SWEEP = CONFIGS / "sweeps" / "ablation.yaml"


def grid(parameters: dict) -> list[dict]:
    """Every combination of the sweep's parameters, in W&B's grid order (the last varies fastest)."""
    values = {k: spec["values"] if "values" in spec else [spec["value"]] for k, spec in parameters.items()}
    return [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]


def test_sweep_is_a_grid_over_the_knobs_of_the_suite():
    config = load_sweep_config(str(SWEEP))
    assert config["method"] == "grid" and config["metric"] == {"name": "val/dice", "goal": "maximize"}
    suite = load_suite(CONFIGS / "experiment" / "ablation.yaml")
    parameters = config["parameters"]
    for knob, values in suite["grid"]["knobs"].items():
        assert parameters[f"model.net.init_args.{knob}"]["values"] == values, knob
    assert parameters["model.net.init_args.use_skips"]["values"] == [True, False]
    assert (
        parameters["model.net.init_args.features"]["value"]
        == suite["profiles"]["cpu"]["net"]["UNet"]["features"]
    )
    assert len(grid(parameters)) == 16
    command = config["command"]
    assert command[:5] == ["${env}", "${interpreter}", "-m", "pipeline", "fit"] and command[-1] == "${args}"


@pytest.mark.parametrize("which", [0, -1], ids=["first", "last"])
def test_sweep_command_with_wandb_args_parses_as_medseg_fit(which, monkeypatch, capsys):
    # the first and the last grid cell hold every value of every parameter between them
    monkeypatch.chdir(REPO)  # the command's config paths are relative to the repository root
    config = load_sweep_config(str(SWEEP))
    combo = grid(config["parameters"])[which]
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in combo.items()}})["args"]
    assert all(arg.startswith("--") and "=" in arg for arg in args)  # wandb's --name=value form
    with pytest.raises(SystemExit) as stopped:
        main([*config["command"][4:-1], *args, "--print_config"])
    assert not stopped.value.code
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in combo.items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == value, key
