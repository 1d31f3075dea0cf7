"""Deep supervision (``deep_supervision=True`` on the UNet family): auxiliary outputs in training
mode only, their loss against down-sampled labels, the run name, and a fit that trains with it and
then infers and exports with one output, in 2D and 3D."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from pipeline.cli import main
from pipeline.experiments.export import export_torchscript, exported_runner, parity
from pipeline.models import ResNetUNet, UNet
from pipeline.monitors.layers import parameter_layers
from pipeline.run.naming import knob_tags, variant_name
from pipeline.training.checkpoint import load_model
from pipeline.training.deep_supervision import deep_supervision_loss, deep_supervision_weights, resize_labels
from tests.conftest import fit_args, run_path, volume_fit_args

# (network, input, expected training-mode output sizes: full resolution first, then finest first)
CASES = {
    "unet2d": (
        lambda: UNet(1, 3, features=(4, 8, 16, 32, 64), deep_supervision=True),
        (2, 1, 37, 41),
        [(37, 41), (19, 21), (10, 11)],  # 1/2 and 1/4 (ceil); the 1/8 level gets no head
    ),
    "unet3d_anisotropic": (
        lambda: UNet(
            1, 3, features=(4, 8, 16, 32, 64), spatial_dims=3, strides=[[1, 2, 2], [2, 2, 2], 2, 2],
            deep_supervision=True,
        ),
        (1, 1, 6, 24, 23),
        [(6, 24, 23), (6, 12, 12), (3, 6, 6)],  # depth kept by the in-plane-only first pooling
    ),
    "resnet_unet2d": (
        lambda: ResNetUNet(1, 3, encoder_name="resnet18", deep_supervision=True),
        (1, 1, 64, 48),
        [(64, 48), (32, 24), (16, 12), (8, 6)],  # three auxiliary outputs, the deepest stage left out
    ),
    "resnet_unet3d": (
        lambda: ResNetUNet(
            1, 2, encoder_name="resnet18", spatial_dims=3, strides=[[1, 2, 2], [1, 2, 2], 2, 2, 2],
            decoder_channels=(32, 16, 8, 8, 4), deep_supervision=True,
        ),
        (2, 1, 8, 64, 64),
        [(8, 64, 64), (8, 32, 32), (8, 16, 16), (4, 8, 8)],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_deep_supervision_training_gives_coarser_outputs_and_eval_one_tensor(name):
    make, shape, sizes = CASES[name]
    torch.manual_seed(0)
    net, x = make(), torch.randn(*shape)
    outputs = net.train()(x)
    assert isinstance(outputs, list)
    assert [tuple(o.shape[2:]) for o in outputs] == sizes
    assert all(o.shape[:2] == (shape[0], net.init_args["out_channels"]) for o in outputs)
    mask = torch.randint(net.init_args["out_channels"], (shape[0], 1, *shape[2:]))
    deep_supervision_loss(DiceCELoss(to_onehot_y=True, softmax=True), outputs, mask).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.aux_heads.parameters())
    with torch.no_grad():
        single = net.eval()(x)
    assert isinstance(single, torch.Tensor) and single.shape[2:] == shape[2:]


def test_deep_supervision_eval_output_is_the_network_without_it():
    # the auxiliary heads are extra layers only: with the same other weights, eval logits are identical
    torch.manual_seed(0)
    settings = {"features": (4, 8, 16, 32, 64), "spatial_dims": 3, "strides": [[1, 2, 2], 2, 2, 2]}
    on, off = UNet(1, 3, **settings, deep_supervision=True), UNet(1, 3, **settings)
    missing = off.load_state_dict(on.state_dict(), strict=False)
    assert missing.missing_keys == [] and set(missing.unexpected_keys) == {
        f"aux_heads.{i}.{p}" for i in range(2) for p in ("weight", "bias")
    }
    x = torch.randn(2, 1, 5, 20, 19)
    with torch.no_grad():
        assert torch.equal(on.eval()(x), off.eval()(x))
    assert [layer.name for layer in parameter_layers(on)][-3:] == ["aux_heads.0", "aux_heads.1", "head"]


def test_deep_supervision_needs_a_decoder_level_to_supervise():
    with pytest.raises(ValueError, match="at least 4 levels in features"):
        UNet(1, 2, features=(4, 8, 16), deep_supervision=True)


def test_deep_supervision_weights_halve_per_level_and_sum_to_one():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert sum(deep_supervision_weights(4)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_deep_supervision_labels_resized_to_each_outputs_exact_size_by_nearest_neighbour():
    mask = torch.arange(6 * 8 * 10).reshape(1, 1, 6, 8, 10) % 3
    small = resize_labels(mask, (6, 4, 5))  # anisotropic: depth kept, in-plane halved
    assert small.shape == (1, 1, 6, 4, 5) and small.dtype == mask.dtype
    assert torch.equal(small, mask[..., 1::2, 1::2])  # each output voxel takes the label at its centre
    assert resize_labels(mask, (6, 8, 10)) is mask
    odd = resize_labels(torch.randint(4, (2, 1, 37, 41)), (10, 11))
    assert odd.shape == (2, 1, 10, 11) and set(odd.unique().tolist()) <= {0, 1, 2, 3}


def test_deep_supervision_loss_is_the_weighted_sum_and_a_tensor_is_scored_as_it_is():
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    torch.manual_seed(0)
    mask = torch.randint(3, (2, 1, 16, 12))
    outputs = [torch.randn(2, 3, 16, 12), torch.randn(2, 3, 8, 6), torch.randn(2, 3, 4, 3)]
    expected = sum(
        w * loss(o, resize_labels(mask, o.shape[2:]))
        for w, o in zip([4 / 7, 2 / 7, 1 / 7], outputs, strict=True)
    )
    assert torch.allclose(deep_supervision_loss(loss, outputs, mask), expected)
    assert not torch.allclose(deep_supervision_loss(loss, outputs, mask), loss(outputs[0], mask))
    assert torch.equal(deep_supervision_loss(loss, outputs[0], mask), loss(outputs[0], mask))


def test_deep_supervision_is_a_knob_named_only_when_on():
    assert variant_name(UNet(features=(4, 8, 16, 32))) == "unet-relu-kaiming-d4"  # unchanged when off
    assert variant_name(UNet(features=(4, 8, 16, 32), deep_supervision=True)) == "unet-relu-kaiming-d4-ds"
    assert variant_name(UNet(spatial_dims=3, deep_supervision=True)) == "unet3d-relu-kaiming-ds"
    net = ResNetUNet(encoder_name="resnet18", deep_supervision=True)
    assert variant_name(net) == "resnet_unet-resnet18-relu-kaiming-ds"
    assert "deep_supervision:true" in knob_tags(net.knobs)
    assert "deep_supervision:false" in knob_tags(UNet().knobs)
    old = UNet()
    del old.init_args["deep_supervision"]  # a checkpoint from before the knob
    assert old.knobs["deep_supervision"] is False and variant_name(old) == "unet-relu-kaiming"


def test_deep_supervision_fit_2d_then_infer_and_export_with_one_output(phantom_dir, tmp_path):
    runs = tmp_path / "runs"
    extra = ("--run.wandb", "false", "--data.patch_size", "[48, 48]", "--model.hd95", "false",
             "--model.net.init_args.features", "[4, 8, 16, 32]", "--model.net.init_args.deep_supervision", "true")  # fmt: skip
    main(fit_args(phantom_dir, runs, *extra))
    run = run_path(runs, "default", phantom_dir, "unet-relu-kaiming-d4-ds-s0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["variant"]["deep_supervision"] is True
    assert np.isfinite(summary["final"]["val/loss"])
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"grad/aux_heads.0", "grad/head", "update/aux_heads.0"} <= set(header)  # the heads are layers too
    checkpoint = run / "checkpoints" / "last.ckpt"
    module, _ = load_model(checkpoint)
    assert module.net.init_args["deep_supervision"] and module.net.aux_heads is not None
    main(["infer", "--checkpoint", str(checkpoint), "--input", str(phantom_dir / "images"),
          "--output", str(tmp_path / "out"), "--num-workers", "0"])  # fmt: skip
    written = sorted((tmp_path / "out").glob("*.png"))
    assert len(written) == len(list((phantom_dir / "images").iterdir()))
    path = str(tmp_path / "model.pt")
    export_torchscript(module.net.eval(), torch.randn(1, 1, 48, 48), path)
    run_exported = exported_runner("torchscript", path)
    assert run_exported is not None
    checks = parity(module.net.eval(), run_exported, [torch.randn(2, 1, 37, 53)])
    assert checks[0]["max_abs_logit_difference"] <= 1e-4


def test_deep_supervision_fit_3d_then_infer_keeps_the_scans_shape(volume_dir, tmp_path):
    extra = ("--run.name", "ds3d", "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1",
             "--data.iterations_per_epoch", "2", "--model.net.init_args.features", "[4, 8, 16, 32]",
             "--model.net.init_args.deep_supervision", "true")  # fmt: skip
    main(volume_fit_args(volume_dir, tmp_path / "runs", "unet3d", *extra))
    run = run_path(tmp_path / "runs", "default", volume_dir, "ds3d")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["variant"]["deep_supervision"] is True
    assert summary["steps"] == 2 and np.isfinite(summary["final"]["val/dice"])
    stored = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["medseg"]
    strides = stored["net"]["init_args"]["strides"]
    assert stored["net"]["init_args"]["deep_supervision"] and strides[0] == [1, 2, 2]  # anisotropic plan
    source = volume_dir / "imagesTr" / "vol_000.nii.gz"
    main(["infer", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--input", str(source),
          "--output", str(tmp_path / "out"), "--num-workers", "0"])  # fmt: skip
    image, written = nib.load(source), nib.load(tmp_path / "out" / "vol_000.nii.gz")
    assert written.shape == image.shape[:3] and np.allclose(written.affine, image.affine)
