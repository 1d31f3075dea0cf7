"""The vanishing-gradient warning on real fits: the deep no-skip sigmoid UNet gets it, the reference does not."""

from __future__ import annotations

import json
import warnings

import pytest

from pipeline.cli import main
from tests.conftest import fit_args, run_path

DEEP = "[4, 8, 16, 32, 64, 64, 64]"  # seven levels: 26 conv layers between the input and the head
VARIANTS = {
    "noskip-sigmoid": ("false", "sigmoid", "none", "default", True),
    "reference": ("true", "relu", "batch", "kaiming", False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_flow_vanishing_warning_in_the_first_epoch_only_for_the_deep_noskip_sigmoid_unet(
    variant, phantom_dir, tmp_path
):
    skips, act, norm, init, vanishes = VARIANTS[variant]
    knobs = {"features": DEEP, "use_skips": skips, "act": act, "norm": norm, "init": init}
    args = [arg for knob, value in knobs.items() for arg in (f"--model.net.init_args.{knob}", value)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            fit_args(
                phantom_dir,
                tmp_path / "runs",
                *args,
                "--run.name",
                variant,
                "--run.wandb",
                "false",
                "--data.batch_size",
                "2",  # 10 training phantoms: 5 logged steps in the one epoch
                "--trainer.limit_train_batches",
                "5",
            )
        )
    messages = [str(w.message) for w in caught if "vanishing gradients" in str(w.message)]
    summary = json.loads(
        (run_path(tmp_path / "runs", "default", phantom_dir, variant) / "summary.json").read_text()
    )
    grads = summary["GradientFlowMonitor"]
    assert summary["epochs"] == 1 and grads["logs"] == 5
    if vanishes:
        (message,) = messages
        assert message.startswith("vanishing gradients in the early layers: ")
        assert "encoder.enc1.conv1 / head" in message
        assert grads["vanishing"]["detected"] and grads["vanishing"]["step"] < 5
        assert grads["first_last_ratio"]["end"] < 1e-3
    else:
        assert not messages and not grads["vanishing"]["detected"]
        assert grads["first_last_ratio"]["min"] > 1e-3
