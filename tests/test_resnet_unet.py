import itertools
import urllib.error

import pytest
import pytorch_lightning as pl
import torch
import torchvision

from pipeline.data.datamodule import SegmentationDataModule
from pipeline.errors import DataError
from pipeline.models import ResNetUNet, build_net, net_spec
from pipeline.models.blocks import expected_std
from pipeline.run.naming import variant_name
from pipeline.training.module import SegmentationModule

SMALL_DECODER = (32, 16, 16, 8, 8)


@pytest.mark.parametrize(
    ("encoder", "in_channels"), itertools.product(("resnet18", "resnet34", "resnet50"), (1, 3))
)
def test_resnet_unet_trains_at_any_size_and_channel_count(encoder, in_channels):
    for size, use_skips in (((64, 64), True), ((65, 47), False)):
        net = ResNetUNet(in_channels, 3, encoder, use_skips=use_skips, decoder_channels=SMALL_DECODER)
        y = net(torch.randn(2, in_channels, *size))
        assert y.shape == (2, 3, *size)
        y.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_resnet_unet_residual_decoder_without_skips_ignores_the_shallow_features():
    def scramble(module, args, features):
        return [torch.randn_like(f) for f in features[:-1]] + [features[-1]]

    x = torch.randn(1, 1, 64, 64)
    for use_skips in (True, False):
        net = ResNetUNet(
            1, 2, "resnet18", use_skips=use_skips, block="residual", decoder_channels=SMALL_DECODER
        )
        net.eval()
        clean = net(x)
        net.encoder.register_forward_hook(scramble)
        assert (not torch.allclose(net(x), clean)) == use_skips
    assert all(stage.skip_channels == 0 for stage in net.decoder.values())


def test_resnet_unet_init_applies_to_a_random_encoder():
    torch.manual_seed(0)
    net = ResNetUNet(1, 2, "resnet18", init="xavier")
    weight = net.encoder.layer4[0].conv2.weight  # 512 x 512 x 3 x 3
    assert abs(weight.std().item() / expected_std(tuple(weight.shape), "xavier") - 1) < 0.1


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision-format state dict of a randomly initialised resnet18."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_resnet_unet_loads_a_local_torchvision_state_dict(resnet18_file):
    path, state = resnet18_file
    rgb = ResNetUNet(3, 2, "resnet18", encoder_weights=str(path), init="xavier")
    for key, value in rgb.encoder.state_dict().items():
        assert torch.equal(value, state[key]), key  # loaded, and not re-initialised afterwards
    gray = ResNetUNet(1, 2, "resnet18", encoder_weights=str(path))
    assert torch.allclose(gray.encoder.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert variant_name(gray) == "resnet_unet-resnet18-file-relu-kaiming"


def test_resnet_unet_rebuilds_from_its_spec_without_the_weights_file(resnet18_file, tmp_path):
    path = tmp_path / "copy.pth"
    path.write_bytes(resnet18_file[0].read_bytes())
    net = ResNetUNet(1, 2, "resnet18", encoder_weights=str(path), decoder_channels=SMALL_DECODER).eval()
    path.unlink()  # a checkpoint holds the weights; inference elsewhere must not need the file
    clone = build_net(net_spec(net)).eval()
    clone.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(net(x), clone(x))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "encoder weights file not found"),
        (b"not a checkpoint", "not a file written by torch.save"),
        (torch.zeros(3), "not a state dict of tensors"),
        ("resnet34", "not a torchvision resnet18 state dict \\(unexpected: layer1.2"),
        ("resnet18-2ch", "wrong shape: conv1.weight \\(64, 2, 7, 7\\)"),
    ],
)
def test_resnet_unet_rejects_a_wrong_weights_file_naming_it(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, torch.Tensor):
        torch.save(content, path)
    elif content == "resnet34":
        torch.save(torchvision.models.resnet34().state_dict(), path)
    elif content == "resnet18-2ch":
        state = torchvision.models.resnet18().state_dict()
        state["conv1.weight"] = state["conv1.weight"][:, :2]
        torch.save(state, path)
    with pytest.raises(DataError, match=message) as err:
        ResNetUNet(1, 2, "resnet18", encoder_weights=str(path))
    assert err.value.path == str(path)


def test_resnet_unet_imagenet_uses_torchvision_weights(monkeypatch, resnet18_file):
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return resnet18_file[1]

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    net = ResNetUNet(3, 2, "resnet18", encoder_weights="imagenet")
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.equal(net.encoder.conv1.weight, resnet18_file[1]["conv1.weight"])
    assert variant_name(net) == "resnet_unet-resnet18-imagenet-relu-kaiming"


def test_resnet_unet_imagenet_offline_says_how_to_use_a_local_file(monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(DataError, match="could not download the ImageNet weights of resnet34") as err:
        ResNetUNet(1, 2, "resnet34", encoder_weights="imagenet")
    assert "--model.net.init_args.encoder_weights" in str(err.value)
    assert "resnet34-b627a593.pth" in str(err.value)  # the file to fetch, and where the cache wants it


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"encoder_name": "resnet101"},
            "unknown encoder_name 'resnet101'; valid: resnet18, resnet34, resnet50",
        ),
        ({"decoder_channels": (64, 32, 16, 8)}, "decoder_channels needs 5 stages"),
        ({"freeze_encoder_epochs": -1}, "freeze_encoder_epochs must be >= 0"),
        ({"act": "swish"}, "unknown activation 'swish'"),
    ],
)
def test_resnet_unet_rejects_bad_settings_with_the_valid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNetUNet(**kwargs)


class EncoderSnapshots(pl.Callback):
    """Copies of the encoder's state (weights and batch-norm statistics) before and after each epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def _snapshot(self, pl_module: pl.LightningModule) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.net.encoder.state_dict().items()})

    def on_fit_start(self, trainer, pl_module) -> None:
        self._snapshot(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._snapshot(pl_module)


def test_resnet_unet_frozen_encoder_is_unchanged_until_it_thaws(phantom_dir):
    torch.manual_seed(0)
    data = SegmentationDataModule(root=phantom_dir, batch_size=4, num_workers=0)
    net = ResNetUNet(
        data.in_channels,
        data.num_classes,
        "resnet18",
        freeze_encoder_epochs=1,
        decoder_channels=SMALL_DECODER,
    )
    module = SegmentationModule(net, class_names=data.class_names, hd95=False, weight_decay=0.1)
    snapshots = EncoderSnapshots()
    head_before = net.head.weight.detach().clone()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[snapshots],
    )
    trainer.fit(module, datamodule=data)
    start, after_frozen, after_thawed = snapshots.states
    for key, value in start.items():  # weights, running means/vars and num_batches_tracked
        assert torch.equal(value, after_frozen[key]), key
    assert not torch.equal(start["layer1.0.conv1.weight"], after_thawed["layer1.0.conv1.weight"])
    assert not torch.equal(start["bn1.running_mean"], after_thawed["bn1.running_mean"])
    assert not torch.equal(net.head.weight, head_before)  # the decoder and head trained all along
    assert not net.encoder_frozen and net.encoder.training
