"""`medseg export`: ONNX and TorchScript files whose logits match PyTorch's to 1e-4 on a patch and a
whole image of any size, and a preprocessing.json that holds the checkpoint's preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.data.preprocessing import Preprocessing
from pipeline.experiments.export import export_onnx, exported_runner, parity
from pipeline.inference.cases import find_inputs, load_case
from pipeline.models import UNet
from pipeline.training.checkpoint import load_model
from tests.conftest import fit_args, run_path
from tests.test_bad_inputs import medseg


@pytest.fixture(scope="module")
def checkpoint(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny UNet trained for two steps on 48x48 patches of the 64x64 phantoms."""
    runs = tmp_path_factory.mktemp("runs")
    extra = [
        "--run.name",
        "tiny",
        "--run.wandb",
        "false",
        "--data.patch_size",
        "[48, 48]",
        "--model.hd95",
        "false",
    ]
    main(fit_args(phantom_dir, runs, *extra))
    return run_path(runs, "default", phantom_dir, "tiny") / "checkpoints" / "best.ckpt"


def whole_image(phantom_dir: Path, prep: Preprocessing) -> torch.Tensor:
    """A phantom preprocessed as ``medseg infer`` does: (1, C, 64, 64), larger than the 48x48 patch."""
    case = find_inputs([phantom_dir / "images"])[0]
    return load_case(case, prep)["image"].movedim(1, 0)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_logits_on_a_patch_and_a_whole_image(fmt, checkpoint, phantom_dir, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / "exported"
    main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--output", str(out)])
    module, prep = load_model(checkpoint)
    model = out / ("model.onnx" if fmt == "onnx" else "model.pt")
    run = exported_runner(fmt, str(model))
    patch = torch.randn(3, prep.in_channels, 48, 48)
    image = whole_image(phantom_dir, prep)
    odd = torch.randn(1, prep.in_channels, 37, 53)
    for check in parity(module.net.eval(), run, [patch, image, odd]):
        assert check["max_abs_logit_difference"] <= 1e-4, check

    described = json.loads((out / "preprocessing.json").read_text())
    assert Preprocessing.from_checkpoint(described["preprocessing"]) == prep  # the whole contract
    assert described["class_names"] == list(prep.class_names) and described["in_channels"] == 1
    assert described["normalization"][0]["mode"] == "zscore" and described["patch_size"] == [48, 48]
    assert described["input"]["dynamic"] == ["batch", "H", "W"]
    assert [c["shape"] for c in described["checked"]] == [[2, 1, 48, 48], [1, 1, 49, 49]]
    assert all(c["max_abs_logit_difference"] <= 1e-4 for c in described["checked"])


def test_export_refuses_to_replace_an_export_without_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "exported"
    args = ["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--output", str(out)]
    assert medseg(capsys, *args)[0] == 0
    before = (out / "model.pt").stat().st_mtime_ns
    code, _, err = medseg(capsys, *args)
    assert code == 1 and "holds an export already" in err and "--overwrite" in err
    assert (out / "model.pt").stat().st_mtime_ns == before
    assert medseg(capsys, *args, "--overwrite")[0] == 0


def test_export_onnx_3d_unet_takes_any_volume_size(tmp_path):
    pytest.importorskip("onnxruntime")
    net = UNet(2, 3, features=(4, 8, 16), spatial_dims=3, strides=[[1, 2, 2], 2]).eval()
    path = str(tmp_path / "unet3d.onnx")
    export_onnx(net, torch.randn(2, 2, 8, 24, 24), path)
    checks = parity(
        net, exported_runner("onnx", path), [torch.randn(1, 2, 5, 17, 23), torch.randn(3, 2, 9, 8, 31)]
    )
    assert np.max([c["max_abs_logit_difference"] for c in checks]) <= 1e-4
