"""The networks in 3D: one code path with 2D, same checkpoint keys and monitor layer names, inflated
ImageNet-style weights, the encoder freeze schedule and the vanishing-gradient finding on volumes."""

from __future__ import annotations

import itertools
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torchvision
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.models import ResNetUNet, UNet, build_net, net_spec
from pipeline.models.blocks import ConvNormAct, expected_std, init_weights
from pipeline.monitors.activations import ActivationMonitor
from pipeline.monitors.gradients import GradientFlowMonitor
from pipeline.monitors.layers import parameter_layers
from pipeline.monitors.updates import WeightUpdateMonitor
from pipeline.run.naming import variant_name
from pipeline.training.module import SegmentationModule
from tests.conftest import CONFIGS
from tests.test_resnet_unet import SMALL_DECODER, EncoderSnapshots

# (norm, act, init, dropout): every norm, activation and init at least once
KNOB_SETS = [
    ("batch", "relu", "kaiming", 0.0),
    ("instance", "leaky_relu", "xavier", 0.1),
    ("group", "gelu", "default", 0.0),
    ("none", "sigmoid", "default", 0.0),
    ("batch", "tanh", "xavier", 0.1),
    ("none", "elu", "kaiming", 0.0),
]


def grads_finite(net: nn.Module) -> bool:
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize(
    ("block", "use_skips", "knobs"), itertools.product(("plain", "residual"), (True, False), KNOB_SETS)
)
def test_unet3d_every_variant_trains_at_odd_sizes(block, use_skips, knobs):
    norm, act, init, dropout = knobs
    torch.manual_seed(0)
    net = UNet(2, 3, (4, 8, 16), use_skips, block, norm, act, init, dropout, spatial_dims=3)
    for size in ((7, 13, 11), (9, 8, 15)):
        y = net(torch.randn(2, 2, *size))
        assert y.shape == (2, 3, *size)
        y.square().mean().backward()
        assert grads_finite(net)
    assert any(isinstance(m, nn.Dropout3d) for m in net.modules()) == (dropout > 0)
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.InstanceNorm2d)) for m in net.modules())


def test_unet3d_anisotropic_strides_keep_the_depth_where_the_stride_is_one():
    net = UNet(
        1,
        2,
        features=(4, 8, 16, 32),
        spatial_dims=3,
        strides=[(1, 2, 2), (1, 2, 2), (2, 2, 2)],
        kernel_sizes=[(1, 3, 3), (1, 3, 3), 3, 3],
    )
    x = torch.randn(2, 1, 5, 37, 41)  # a thin volume: 5 thick slices
    shapes = [tuple(f.shape[2:]) for f in net.encoder(x)]
    assert shapes == [(5, 37, 41), (5, 19, 21), (5, 10, 11), (3, 5, 6)]  # ceil division per axis
    assert net.encoder.enc1.conv1.conv.weight.shape == (4, 1, 1, 3, 3)
    assert net.encoder.enc3.conv1.conv.weight.shape == (16, 8, 3, 3, 3)
    # each decoder stage upsamples by its level's stride (kernel = stride), with that level's kernel
    assert net.decoder.dec3.up.weight.shape == (32, 16, 2, 2, 2)
    assert net.decoder.dec1.up.weight.shape == (8, 4, 1, 2, 2)
    assert net.decoder.dec1.block.conv1.conv.weight.shape == (4, 8, 1, 3, 3)
    y = net(x)
    assert y.shape == (2, 2, 5, 37, 41)
    y.square().mean().backward()
    assert grads_finite(net)


def test_unet2d_takes_per_axis_strides_and_kernels_too():
    net = UNet(1, 2, features=(4, 8, 16), strides=[(1, 2), 2], kernel_sizes=[(1, 3), 3, 5])
    assert [tuple(f.shape[2:]) for f in net.encoder(torch.randn(1, 1, 33, 17))] == [
        (33, 17),
        (33, 9),
        (17, 5),
    ]
    assert net(torch.randn(2, 1, 33, 17)).shape == (2, 2, 33, 17)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spatial_dims": 1}, "spatial_dims must be 2 \\(images\\) or 3 \\(volumes\\), got 1"),
        ({"strides": [2, 2]}, "strides needs 3 entries \\(one per pooling step: len\\(features\\) - 1\\)"),
        ({"strides": [2, (1, 2), 2]}, "strides\\[1\\] must be an int >= 1 or 3 of them \\(one per axis\\)"),
        ({"strides": [2, 2, 0]}, "strides\\[2\\] must be an int >= 1"),
        ({"kernel_sizes": [3, 3, 3]}, "kernel_sizes needs 4 entries \\(one per level\\)"),
        ({"kernel_sizes": [3, (1, 2, 2), 3, 3]}, "kernel_sizes\\[1\\] must be odd on every axis"),
    ],
)
def test_unet3d_rejects_bad_strides_and_kernel_sizes_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(1, 2, features=(4, 8, 16, 32), **{"spatial_dims": 3, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"strides": [2, 2, 2, 2]},
            "strides needs 5 entries \\(stem conv, max pool, layer2, layer3, layer4\\)",
        ),
        ({"strides": [2, 2, (1, 3, 3), 2, 2]}, "strides\\[2\\] of a ResNet encoder must be 1 or 2"),
        ({"spatial_dims": 0}, "spatial_dims must be 2"),
    ],
)
def test_resnet_unet3d_rejects_bad_strides(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNetUNet(1, 2, "resnet18", **{"spatial_dims": 3, **kwargs})


@pytest.mark.parametrize(("spatial_dims", "shape"), [(3, (1, 1, 32, 32)), (2, (1, 1, 8, 32, 32))])
def test_networks_name_the_input_layout_they_expect(spatial_dims, shape):
    """A 3D conv would read a (B, C, H, W) batch as one unbatched volume; say so instead."""
    for net in (UNet(1, 2, (4, 8), spatial_dims=spatial_dims), ResNetUNet(spatial_dims=spatial_dims)):
        with pytest.raises(ValueError, match=f"\\(spatial_dims={spatial_dims}\\) takes \\(B, C, "):
            net(torch.zeros(shape))


@pytest.mark.parametrize("scheme", ["kaiming", "xavier"])
def test_init_weights_treats_3d_layers_like_their_2d_kinds(scheme):
    torch.manual_seed(0)
    net = UNet(1, 2, features=(8, 16, 32, 64), spatial_dims=3, init=scheme)
    big = [
        m
        for m in net.modules()
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and m.weight.numel() >= 10_000
    ]
    assert len(big) >= 4 and any(isinstance(m, nn.ConvTranspose3d) for m in big)
    for m in big:
        target = expected_std(tuple(m.weight.shape), scheme)
        assert abs(m.weight.std().item() / target - 1) < 0.1, (m, m.weight.std().item(), target)
    for norm in ("batch", "instance"):
        unit = ConvNormAct(4, 8, norm=norm, spatial_dims=3)
        with torch.no_grad():
            unit.norm.weight.fill_(3.0)
            unit.norm.bias.fill_(2.0)
        init_weights(unit, scheme)
        assert isinstance(unit.norm, (nn.BatchNorm3d, nn.InstanceNorm3d))
        assert torch.all(unit.norm.weight == 1) and torch.all(unit.norm.bias == 0)


def unet_keys(spatial_dims: int) -> list[tuple[str, tuple[int, ...]]]:
    """State-dict keys and shapes of ``UNet(1, 3, features=(4, 8, 16))``: 2D as before N-D models,
    3D the same keys with a depth axis on every kernel."""
    k3, k2, k1 = ((3,) * spatial_dims), ((2,) * spatial_dims), ((1,) * spatial_dims)

    def unit(name: str, cin: int, cout: int) -> list[tuple[str, tuple[int, ...]]]:
        norm = [(f"{name}.norm.{p}", (cout,)) for p in ("weight", "bias", "running_mean", "running_var")]
        return [(f"{name}.conv.weight", (cout, cin, *k3)), *norm, (f"{name}.norm.num_batches_tracked", ())]

    def up(name: str, cin: int, cout: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{name}.weight", (cin, cout, *k2)), (f"{name}.bias", (cout,))]

    return [
        *unit("encoder.enc1.conv1", 1, 4), *unit("encoder.enc1.conv2", 4, 4),
        *unit("encoder.enc2.conv1", 4, 8), *unit("encoder.enc2.conv2", 8, 8),
        *unit("encoder.bottleneck.conv1", 8, 16), *unit("encoder.bottleneck.conv2", 16, 16),
        *up("decoder.dec2.up", 16, 8),
        *unit("decoder.dec2.block.conv1", 16, 8), *unit("decoder.dec2.block.conv2", 8, 8),
        *up("decoder.dec1.up", 8, 4),
        *unit("decoder.dec1.block.conv1", 8, 4), *unit("decoder.dec1.block.conv2", 4, 4),
        ("head.weight", (3, 4, *k1)), ("head.bias", (3,)),
    ]  # fmt: skip


UNET_LAYERS = [
    "encoder.enc1.conv1", "encoder.enc1.conv2", "encoder.enc2.conv1", "encoder.enc2.conv2",
    "encoder.bottleneck.conv1", "encoder.bottleneck.conv2",
    "decoder.dec2.up", "decoder.dec2.block.conv1", "decoder.dec2.block.conv2",
    "decoder.dec1.up", "decoder.dec1.block.conv1", "decoder.dec1.block.conv2",
    "head",
]  # fmt: skip


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_checkpoint_keys_and_monitor_layers_are_the_2d_ones(spatial_dims):
    net = UNet(1, 3, features=(4, 8, 16), spatial_dims=spatial_dims)
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == unet_keys(spatial_dims)
    assert [layer.name for layer in parameter_layers(net)] == UNET_LAYERS
    assert all(layer.conv for layer in parameter_layers(net))


def test_unet_run_names_add_3d_to_the_arch_and_keep_the_2d_names():
    knobs = {"use_skips": False, "act": "sigmoid", "norm": "none", "init": "default"}
    assert variant_name(UNet(**knobs)) == "unet-noskip-sigmoid-default-nonorm"
    assert variant_name(UNet(**knobs, spatial_dims=3)) == "unet3d-noskip-sigmoid-default-nonorm"
    residual = UNet(features=(4, 8, 16), block="residual", spatial_dims=3, strides=[(1, 2, 2), 2])
    assert variant_name(residual) == "unet3d-residual-relu-kaiming-d3"  # strides are no knob
    assert UNet(spatial_dims=3).knobs == {
        "arch": "unet", "dims": 3, "skips": True, "block": "plain", "act": "relu",
        "init": "kaiming", "norm": "batch", "depth": 5, "deep_supervision": False,
    }  # fmt: skip
    assert variant_name(ResNetUNet(encoder_name="resnet18", spatial_dims=3)) == (
        "resnet_unet3d-resnet18-relu-kaiming"
    )


def test_unet3d_rebuilds_from_its_spec_with_identical_outputs():
    net = UNet(
        1, 2, features=(4, 8, 16), spatial_dims=3, strides=[(1, 2, 2), 2], kernel_sizes=[(1, 3, 3), 3, 3]
    )
    net.eval()
    assert net_spec(net)["init_args"]["strides"] == [[1, 2, 2], 2]  # plain types for the checkpoint
    clone = build_net(net_spec(net)).eval()
    clone.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 6, 20, 18)
    assert torch.equal(net(x), clone(x))


MODEL_CONFIGS_3D = {
    "unet3d": "unet",
    "unet3d_noskip": "unet_noskip",
    "unet3d_residual": "unet_residual",
    "unet3d_residual_noskip": "unet_residual_noskip",
    "resnet_unet3d": "resnet_unet",
}


@pytest.mark.parametrize("name", list(MODEL_CONFIGS_3D))
def test_3d_model_configs_are_their_2d_twins_in_3d(name):
    def net_config(config: str) -> dict:
        return yaml.safe_load((CONFIGS / "model" / f"{config}.yaml").read_text())["model"]["net"]

    config, twin = net_config(name), net_config(MODEL_CONFIGS_3D[name])
    args, twin_args = dict(config["init_args"]), twin["init_args"]
    assert config["class_path"] == twin["class_path"]
    assert (
        args.pop("spatial_dims") == 3
        and args.pop("strides") is None
        and args.pop("kernel_sizes", None) is None
    )
    widths = {"encoder_name", "decoder_channels"}  # the 3D ResNet-UNet is narrower; the UNets are not
    assert {k: v for k, v in args.items() if k not in widths} == {
        k: v for k, v in twin_args.items() if k not in widths
    }
    text = (CONFIGS / "model" / f"{name}.yaml").read_text()
    assert f"make train MODEL={name} DATA=msd" in text
    net = build_net(config)
    assert variant_name(net).startswith(("unet3d", "resnet_unet3d"))
    if name.startswith("unet3d"):
        with torch.no_grad():
            assert net.eval()(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


@pytest.fixture(scope="module")
def resnet18_2d_file(tmp_path_factory):
    """A torchvision-format resnet18 state dict with random weights and batch-norm statistics."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    generator = torch.Generator().manual_seed(2)
    for key, value in state.items():
        if key.endswith(("running_var", "bn1.weight", "bn2.weight", "downsample.1.weight")):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif key.endswith(("running_mean", "bn1.bias", "bn2.bias", "downsample.1.bias")):
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
    path = tmp_path_factory.mktemp("weights") / "resnet18_2d.pth"
    torch.save(state, path)
    return path, state


# Depth radius of each encoder feature's receptive field in resnet18 at depth stride 1: the stem's
# 7 (3 a side), the max pool (1), then 2 blocks of two 3x3x3 convs per layer (4 a side per layer).
RADII = (3, 8, 12, 16, 20)


def test_resnet_unet3d_inflated_weights_see_identical_slices_as_the_2d_encoder_sees_one(resnet18_2d_file):
    path, state = resnet18_2d_file
    net2 = ResNetUNet(1, 2, "resnet18", encoder_weights=str(path), decoder_channels=SMALL_DECODER).eval()
    net3 = ResNetUNet(
        1,
        2,
        "resnet18",
        encoder_weights=str(path),
        decoder_channels=SMALL_DECODER,
        spatial_dims=3,
        strides=[(1, 2, 2)] * 5,  # depth stride 1 keeps the interior slices at every level
    ).eval()
    # I3D: (O, I, k, k) -> (O, I, k, k, k) / k; the gray first conv is the RGB kernels summed
    gray = state["conv1.weight"].sum(1, keepdim=True)
    assert torch.allclose(net3.encoder.conv1.weight, gray[:, :, None].expand(-1, -1, 7, -1, -1) / 7)
    assert torch.equal(net3.encoder.bn1.running_var, state["bn1.running_var"])
    assert [k for k in net3.encoder.state_dict()] == [k for k in state if not k.startswith("fc.")]
    depth = 44
    image = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    volume = image[:, :, None].expand(-1, -1, depth, -1, -1).contiguous()
    with torch.no_grad():
        features2, features3 = net2.encoder(image), net3.encoder(volume)
    for radius, f2, f3 in zip(RADII, features2, features3, strict=True):
        assert f3.shape == (*f2.shape[:2], depth, *f2.shape[2:])
        interior = f3[:, :, radius : depth - radius]
        torch.testing.assert_close(interior, f2[:, :, None].expand_as(interior), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(features3[0][:, :, 0], features2[0], atol=1e-2)  # the border sees padding


def test_resnet_unet3d_loads_3d_weights_as_they_are_and_inflates_imagenet(
    resnet18_2d_file, tmp_path, monkeypatch
):
    path, state = resnet18_2d_file
    source = ResNetUNet(3, 2, "resnet18", encoder_weights=str(path), spatial_dims=3)
    file_3d = tmp_path / "resnet18_3d.pth"
    torch.save(source.encoder.state_dict(), file_3d)
    loaded = ResNetUNet(3, 2, "resnet18", encoder_weights=str(file_3d), spatial_dims=3)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key
    assert variant_name(loaded) == "resnet_unet3d-resnet18-file-relu-kaiming"

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *args, **kwargs: state)
    imagenet = ResNetUNet(1, 2, "resnet18", encoder_weights="imagenet", spatial_dims=3)
    layer4 = state["layer4.1.conv2.weight"]
    assert torch.allclose(
        imagenet.encoder.layer4[1].conv2.weight, layer4[:, :, None].expand(-1, -1, 3, -1, -1) / 3
    )
    assert variant_name(imagenet) == "resnet_unet3d-resnet18-imagenet-relu-kaiming"


def test_resnet_unet3d_has_the_2d_checkpoint_keys_and_monitor_layers():
    net2, net3 = (
        ResNetUNet(1, 2, "resnet50", decoder_channels=SMALL_DECODER, spatial_dims=d) for d in (2, 3)
    )
    state2, state3 = net2.state_dict(), net3.state_dict()
    assert list(state2) == list(state3)
    for key, value in state2.items():
        expected = (*value.shape[:2], value.shape[-1], *value.shape[2:]) if value.ndim == 4 else value.shape
        assert state3[key].shape == expected, key  # every 2D kernel k x k is k x k x k in 3D
    layers2, layers3 = parameter_layers(net2), parameter_layers(net3)
    assert [(layer.name, layer.conv) for layer in layers2] == [(layer.name, layer.conv) for layer in layers3]
    assert [layer.name for layer in layers3][:3] == ["encoder.conv1", "encoder.bn1", "encoder.layer1.0.conv1"]
    # the 2D network is torchvision's, as before: its encoder keys are torchvision's, minus fc
    assert list(net2.encoder.state_dict()) == [
        k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")
    ]
    assert net2.encoder.maxpool.kernel_size == 3 and isinstance(net3.encoder.maxpool, nn.MaxPool3d)


class RandomVolumes(Dataset):
    """Random volumes and masks in the data module's batch format."""

    def __init__(self, count: int, shape: tuple[int, int, int], classes: int = 2, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 1, *shape, generator=generator)
        self.masks = torch.randint(0, classes, (count, *shape), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i], "case_id": f"vol{i}"}


def tiny_fit(
    net: nn.Module,
    tmp_path,
    callbacks: list,
    max_epochs: int,
    shape=(16, 16, 16),
    volumes: int = 4,
    val: bool = False,
) -> pl.Trainer:
    """``max_epochs`` epochs of ``volumes`` random volumes, 2 a batch, and one validation batch if ``val``."""
    module = SegmentationModule(net, hd95=False, weight_decay=0.1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_val_batches=1 if val else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )
    train, validation = RandomVolumes(volumes, shape), RandomVolumes(2, shape, seed=1)
    trainer.fit(module, DataLoader(train, batch_size=2), DataLoader(validation, batch_size=2))
    return trainer


def test_resnet_unet3d_frozen_encoder_is_unchanged_until_it_thaws(tmp_path):
    torch.manual_seed(0)
    net = ResNetUNet(
        1, 2, "resnet18", freeze_encoder_epochs=1, decoder_channels=SMALL_DECODER, spatial_dims=3
    )
    snapshots = EncoderSnapshots()
    head_before = net.head.weight.detach().clone()
    tiny_fit(net, tmp_path, [snapshots], max_epochs=2, shape=(8, 32, 32), volumes=2)  # a step an epoch
    start, after_frozen, after_thawed = snapshots.states
    for key, value in start.items():  # weights, running means/vars and num_batches_tracked
        assert torch.equal(value, after_frozen[key]), key
    assert not torch.equal(start["layer1.0.conv1.weight"], after_thawed["layer1.0.conv1.weight"])
    assert not torch.equal(start["bn1.running_mean"], after_thawed["bn1.running_mean"])
    assert not torch.equal(net.head.weight, head_before)
    assert not net.encoder_frozen and net.encoder.training


VARIANTS_3D = {  # use_skips, act, norm, init, vanishes
    "noskip-sigmoid": (False, "sigmoid", "none", "default", True),
    "reference": (True, "relu", "batch", "kaiming", False),
}


@pytest.mark.parametrize("variant", list(VARIANTS_3D))
def test_monitors_on_a_3d_fit_flag_vanishing_gradients_only_in_the_noskip_sigmoid_unet(variant, tmp_path):
    use_skips, act, norm, init, vanishes = VARIANTS_3D[variant]
    torch.manual_seed(0)
    net = UNet(1, 2, (4, 8, 16, 32, 64), use_skips, act=act, norm=norm, init=init, spatial_dims=3)
    grads = GradientFlowMonitor(log_every_n_steps=1, vanishing_patience=2, plot_every_n_epochs=0)
    updates, activations = WeightUpdateMonitor(), ActivationMonitor(num_samples=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_fit(net, tmp_path, [grads, updates, activations], max_epochs=2, val=True)
    messages = [str(w.message) for w in caught if "vanishing gradients" in str(w.message)]
    summary = grads.summary()
    assert summary["logs"] == 4 and summary["first_conv_layer"] == "encoder.enc1.conv1"
    assert summary["last_conv_layer"] == "head"
    # the monitors name the layers of a 3D network as those of its 2D twin
    twin = UNet(1, 2, (4, 8, 16, 32, 64), use_skips, act=act, norm=norm, init=init)
    names = [layer.name for layer in parameter_layers(twin)]
    assert [layer.name for layer in grads.layers] == names
    assert set(updates.summary()["last"]) == set(names)
    kind = "saturated" if act == "sigmoid" else "dead_relu"
    assert activations.summary() and all(key.startswith(f"{kind}/") for key in activations.summary())
    assert f"{kind}/encoder.enc1.conv1" in activations.summary()
    if vanishes:
        (message,) = messages
        assert "encoder.enc1.conv1 / head" in message
        assert summary["vanishing"]["detected"] and summary["first_last_ratio"]["end"] < 1e-6
    else:
        assert not messages and not summary["vanishing"]["detected"]
        assert summary["first_last_ratio"]["min"] > 1e-3


def test_unet3d_noskip_sigmoid_gradient_is_tiny_but_not_cut():
    """In float64 the first layer's gradient is positive: the monitor's 0 ratio is float32 underflow."""

    def ratio(**knobs) -> float:
        torch.manual_seed(0)
        net = UNet(1, 2, (4, 8, 16, 32, 64), spatial_dims=3, **knobs).double()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 1, 16, 16, 16, generator=generator, dtype=torch.float64)
        target = torch.randint(0, 2, (2, 16, 16, 16), generator=generator)
        nn.functional.cross_entropy(net(x), target).backward()
        return (net.encoder.enc1.conv1.conv.weight.grad.norm() / net.head.weight.grad.norm()).item()

    vanishing = ratio(use_skips=False, act="sigmoid", norm="none", init="default")
    healthy = ratio(use_skips=True, act="relu", norm="batch", init="kaiming")
    assert 0 < vanishing < 1e-12 and healthy > 1e-2, (vanishing, healthy)
