import pytest
import torch

from pipeline.models import UNet, build_net, net_spec


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
    with pytest.raises(ValueError, match="not a pipeline.models network"):
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
