import itertools

import pytest
import torch
from torch import nn

from pipeline.models import UNet, build_net, net_spec
from pipeline.models.blocks import ACTIVATIONS, NORMS, expected_std


@pytest.mark.parametrize("size", [(64, 64), (97, 120), (33, 17), (128, 80)])
def test_unet_forward_backward_keeps_spatial_shape(size):
    net = UNet(in_channels=1, out_channels=4, features=(8, 16, 32, 64, 128))
    x = torch.randn(2, 1, *size)
    y = net(x)
    assert y.shape == (2, 4, *size)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_unet_rebuilds_from_its_spec_with_identical_outputs():
    net = UNet(in_channels=3, out_channels=2, features=(8, 16, 32), use_skips=False).eval()
    clone = build_net(net_spec(net)).eval()
    clone.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 40, 40)
    assert torch.equal(net(x), clone(x))


def test_build_net_refuses_classes_outside_the_package():
    with pytest.raises(ValueError, match="refusing to build .os.system."):
        build_net({"class_path": "os.system", "init_args": {}})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"act": "swish"}, "unknown activation 'swish'; valid: relu"),
        ({"norm": "layer"}, "unknown norm 'layer'; valid: batch"),
        ({"init": "orthogonal"}, "unknown init 'orthogonal'; valid: kaiming"),
        ({"features": (16,)}, "at least 2 levels"),
    ],
)
def test_unet_rejects_bad_settings_with_the_valid_names(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**kwargs)


VARIANTS = list(itertools.product(("plain", "residual"), (True, False), NORMS, ACTIVATIONS))


@pytest.mark.parametrize(("block", "use_skips", "norm", "act"), VARIANTS)
def test_unet_every_variant_trains_at_any_size_and_channel_count(block, use_skips, norm, act):
    for in_channels, size in itertools.product((1, 3), ((33, 17), (24, 40), (13, 31))):
        net = UNet(in_channels, 3, features=(4, 8, 16), use_skips=use_skips, block=block, norm=norm, act=act)
        y = net(torch.randn(2, in_channels, *size))
        assert y.shape == (2, 3, *size)
        y.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("scheme", ["kaiming", "xavier"])
def test_unet_init_matches_the_he_and_glorot_formulas(scheme):
    torch.manual_seed(0)
    net = UNet(1, 2, features=(8, 16, 32, 64, 128), init=scheme)
    big = [
        m
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() >= 10_000
    ]
    assert len(big) >= 5
    for m in big:
        target = expected_std(tuple(m.weight.shape), scheme)
        assert abs(m.weight.std().item() / target - 1) < 0.1, (m, m.weight.std().item(), target)


def test_unet_default_init_is_pytorchs_and_differs_from_he():
    torch.manual_seed(0)
    conv = UNet(1, 2, features=(8, 16, 32, 64, 128), init="default").encoder.bottleneck.conv1.conv
    he = expected_std(tuple(conv.weight.shape), "kaiming")
    # PyTorch's default: kaiming_uniform(a=sqrt(5)), i.e. std = 1 / sqrt(3 * fan_in) = He / sqrt(6)
    assert abs(conv.weight.std().item() / (he / 6**0.5) - 1) < 0.1


def test_unet_without_skips_has_no_skip_channels_in_the_decoder():
    features = (8, 16, 32, 64)
    with_skips, without = UNet(1, 2, features=features), UNet(1, 2, features=features, use_skips=False)
    for stage, plain in zip(with_skips.decoder.values(), without.decoder.values(), strict=True):
        up = stage.up.out_channels
        assert plain.block.conv1.conv.in_channels == up
        assert stage.block.conv1.conv.in_channels == 2 * up  # the skip from the level of the same width


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_unet_without_skips_ignores_the_shallow_encoder_features(block):
    """Replacing every encoder feature but the bottleneck with noise changes only the skip UNet."""

    def scramble(module, args, features):
        return [torch.randn_like(f) for f in features[:-1]] + [features[-1]]

    x = torch.randn(2, 1, 48, 40)
    for use_skips in (True, False):
        torch.manual_seed(0)
        net = UNet(1, 2, features=(8, 16, 32, 64), use_skips=use_skips, block=block).eval()
        clean = net(x)
        net.encoder.register_forward_hook(scramble)
        changed = not torch.allclose(net(x), clean)
        assert changed == use_skips


def _first_last_gradient_ratio(**knobs) -> float:
    """||grad first conv|| / ||grad last conv (head)|| at initialisation on a fixed batch and seed."""
    torch.manual_seed(0)
    net = UNet(1, 2, features=(8, 16, 32, 64, 128), **knobs)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 64, 64, generator=generator)
    target = torch.randint(0, 2, (4, 64, 64), generator=generator)
    nn.functional.cross_entropy(net(x), target).backward()
    return (net.encoder.enc1.conv1.conv.weight.grad.norm() / net.head.weight.grad.norm()).item()


def test_unet_noskip_sigmoid_gradients_vanish_at_init():
    healthy = _first_last_gradient_ratio(use_skips=True, act="relu", norm="batch", init="kaiming")
    vanishing = _first_last_gradient_ratio(use_skips=False, act="sigmoid", norm="none", init="default")
    assert vanishing > 0 and healthy >= 100 * vanishing, (healthy, vanishing)
