"""The monitors' arithmetic and detection on small networks, with a stand-in trainer (no fit)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

from pipeline.models import UNet
from pipeline.monitors.activations import ActivationMonitor
from pipeline.monitors.gradients import GradientFlowMonitor
from pipeline.monitors.layers import parameter_layers
from pipeline.monitors.updates import WeightUpdateMonitor


class Recorder:
    """A logger stand-in keeping every ``log_metrics`` call."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))


def stand_in_trainer(tmp_path: Path, step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=step,
        current_epoch=0,
        log_every_n_steps=1,
        is_global_zero=True,
        sanity_checking=False,
        loggers=[Recorder()],
        precision_plugin=SimpleNamespace(),
        default_root_dir=str(tmp_path),
        max_epochs=1,
    )


def small_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(1, 3, features=(4, 8, 16), **kwargs)


def backward(net: nn.Module) -> None:
    net.zero_grad()
    net(torch.randn(2, 1, 16, 16)).square().mean().backward()


def test_layers_group_conv_norm_act_units_in_depth_order():
    net = small_unet()
    layers = parameter_layers(net)
    assert [layer.name for layer in layers] == [
        "encoder.enc1.conv1",
        "encoder.enc1.conv2",
        "encoder.enc2.conv1",
        "encoder.enc2.conv2",
        "encoder.bottleneck.conv1",
        "encoder.bottleneck.conv2",
        "decoder.dec2.up",
        "decoder.dec2.block.conv1",
        "decoder.dec2.block.conv2",
        "decoder.dec1.up",
        "decoder.dec1.block.conv1",
        "decoder.dec1.block.conv2",
        "head",
    ]
    assert len(layers[0].params) == 3  # conv weight + batch-norm weight and bias
    grouped = [p for layer in layers for p in layer.params]
    assert len(grouped) == len(list(net.parameters())) and len({id(p) for p in grouped}) == len(grouped)


def test_layers_of_any_module_take_leaf_names_in_registration_order():
    net = nn.Module()
    net.encoder = torchvision.models.resnet18(weights=None)
    net.head = nn.Conv2d(512, 2, 1)
    layers = parameter_layers(net)
    names = [layer.name for layer in layers]
    assert names[:4] == ["encoder.conv1", "encoder.bn1", "encoder.layer1.0.conv1", "encoder.layer1.0.bn1"]
    assert names[-1] == "head" and "encoder.layer2.0.downsample.0" in names
    convs = [layer.name for layer in layers if layer.conv]
    assert convs[0] == "encoder.conv1" and convs[-1] == "head"


def test_gradient_monitor_logs_each_layer_norm_the_global_norm_and_the_ratio(tmp_path):
    net = small_unet()
    net.encoder.enc2.requires_grad_(False)  # frozen: no gradient, no key
    trainer, module = stand_in_trainer(tmp_path), SimpleNamespace(net=net)
    monitor = GradientFlowMonitor(log_every_n_steps=1)
    monitor.on_fit_start(trainer, module)
    backward(net)
    monitor.on_before_optimizer_step(trainer, module, None)
    ((step, logged),) = trainer.loggers[0].logged
    assert step == 0
    for layer in parameter_layers(net):
        grads = [p.grad.flatten() for p in layer.params if p.grad is not None]
        key = f"grad/{layer.name}"
        if layer.name.startswith("encoder.enc2"):
            assert key not in logged
        else:
            assert logged[key] == pytest.approx(torch.cat(grads).norm().item(), rel=1e-5)
    every = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    assert logged["grad/global"] == pytest.approx(every.norm().item(), rel=1e-5)
    ratio = logged["grad/encoder.enc1.conv1"] / logged["grad/head"]
    assert logged["grad/first_last_ratio"] == pytest.approx(ratio)


def test_gradient_monitor_warns_once_when_the_ratio_stays_below_threshold(tmp_path):
    net = small_unet()
    trainer, module = stand_in_trainer(tmp_path), SimpleNamespace(net=net)
    monitor = GradientFlowMonitor(log_every_n_steps=2, vanishing_ratio=1e-3, vanishing_patience=3)
    monitor.on_fit_start(trainer, module)
    with pytest.warns(UserWarning, match="vanishing gradients in the early layers") as caught:
        for step in range(7):
            trainer.global_step = step
            backward(net)
            for p in net.encoder.enc1.conv1.parameters():
                p.grad.mul_(1e-6)  # first layer gets a millionth of its gradient
            monitor.on_before_optimizer_step(trainer, module, None)
    assert sum("vanishing" in str(w.message) for w in caught) == 1
    assert [s for s, _ in trainer.loggers[0].logged] == [0, 2, 4, 6]
    summary = monitor.summary()
    assert summary["vanishing"]["detected"] and summary["vanishing"]["since_step"] == 0
    assert summary["vanishing"]["step"] == 4 and summary["first_last_ratio"]["end"] < 1e-3


def test_gradient_monitor_reports_exploding_norms_with_their_step(tmp_path):
    net = small_unet()
    trainer, module = stand_in_trainer(tmp_path), SimpleNamespace(net=net)
    monitor = GradientFlowMonitor(log_every_n_steps=1, exploding_norm=100.0)
    monitor.on_fit_start(trainer, module)
    with pytest.warns(UserWarning, match="exploding gradients at step 3"):
        for step, scale in enumerate([1.0, 1.0, 1.0, 1e6, math.inf]):
            trainer.global_step = step
            backward(net)
            net.head.weight.grad.mul_(scale)
            monitor.on_before_optimizer_step(trainer, module, None)
    exploding = monitor.summary()["exploding"]
    assert exploding["detected"] and exploding["count"] == 2
    assert exploding["steps"][0]["step"] == 3 and exploding["steps"][1] == {"step": 4, "norm": "inf"}


def test_weight_update_monitor_flags_layers_whose_weights_stay_constant(tmp_path):
    net = small_unet()
    trainer, module = stand_in_trainer(tmp_path), SimpleNamespace(net=net)
    monitor = WeightUpdateMonitor(min_update=1e-6)
    monitor.on_fit_start(trainer, module)
    monitor.on_train_epoch_start(trainer, module)
    before = net.head.weight.detach().clone()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.startswith("encoder.enc1"):
                p.add_(0.01 * torch.randn_like(p))
    with pytest.warns(UserWarning, match="not learning"):
        monitor.on_train_epoch_end(trainer, module)
    ((_, logged),) = trainer.loggers[0].logged
    head = torch.cat([net.head.weight.flatten(), net.head.bias.flatten()])
    start = torch.cat([before.flatten(), torch.zeros_like(net.head.bias)])  # He init zeroes biases
    assert logged["update/head"] == pytest.approx(((head - start).norm() / start.norm()).item(), rel=1e-5)
    assert monitor.summary()["not_learning"] == ["encoder.enc1.conv1", "encoder.enc1.conv2"]


def test_activation_monitor_measures_dead_relus_and_saturation_then_removes_its_hooks(tmp_path):
    relu_net = small_unet()
    with torch.no_grad():  # two of the four first-layer channels can never fire: dead
        conv = relu_net.encoder.enc1.conv1
        conv.conv.weight[:2] = 0
        conv.norm.bias[:2] = -1.0
    sigmoid_net = small_unet(act="sigmoid", norm="none", init="default")
    batch = {
        "image": torch.randn(3, 1, 16, 16),
        "mask": torch.zeros(3, 16, 16, dtype=torch.long),
        "case_id": ["a", "b", "c"],
    }
    trainer = stand_in_trainer(tmp_path)
    results = []
    for net in (relu_net.eval(), sigmoid_net.eval()):
        module = SimpleNamespace(net=net, device=torch.device("cpu"), spatial_dims=2, patch_size=None)
        module.predict_logits = net
        monitor = ActivationMonitor(num_samples=2)
        monitor.on_validation_batch_end(trainer, module, None, batch, 0)
        monitor.on_validation_epoch_end(trainer, module)
        assert all(not m._forward_hooks for m in net.modules())
        results.append(monitor.summary())
    dead, saturated = results
    assert dead["dead_relu/encoder.enc1.conv1"] == 0.5
    assert set(dead) == {
        f"dead_relu/{layer.name}"
        for layer in parameter_layers(relu_net)
        if layer.name.endswith(("conv1", "conv2"))
    }
    with torch.no_grad():
        x = sigmoid_net.encoder.enc1.conv1.conv(batch["image"][:2])
    assert saturated["saturated/encoder.enc1.conv1"] == pytest.approx((x.abs() > 4).float().mean().item())


def test_activation_monitor_sees_a_compiled_network_like_an_eager_one(tmp_path):
    # model.compile: validation compiles the network's eval graph before the monitor adds its hooks,
    # and a compiled graph skips hooks added later (Dynamo does not guard on module hooks).
    batch = {"image": torch.randn(2, 1, 16, 16), "mask": torch.zeros(2, 16, 16, dtype=torch.long)}
    results = []
    for compiled in (False, True):
        net = small_unet().eval()
        with torch.no_grad():  # two of the four first-layer channels can never fire: dead
            net.encoder.enc1.conv1.conv.weight[:2] = 0
            net.encoder.enc1.conv1.norm.bias[:2] = -1.0
        if compiled:
            net.compile(backend="eager")  # Dynamo alone: its hook handling, without a minute of codegen
            with torch.no_grad():
                net(batch["image"])  # the validation pass
        module = SimpleNamespace(
            net=net, device=torch.device("cpu"), predict_logits=net, spatial_dims=2, patch_size=None
        )
        monitor = ActivationMonitor(num_samples=2)
        monitor.on_validation_batch_end(stand_in_trainer(tmp_path), module, None, batch, 0)
        monitor.on_validation_epoch_end(stand_in_trainer(tmp_path), module)
        results.append(monitor.summary())
    eager, compiled = results
    assert compiled["dead_relu/encoder.enc1.conv1"] == 0.5
    assert compiled == pytest.approx(eager)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (GradientFlowMonitor, {"log_every_n_steps": -1}),
        (GradientFlowMonitor, {"vanishing_ratio": 0.0}),
        (WeightUpdateMonitor, {"every_n_epochs": -1}),
        (ActivationMonitor, {"num_samples": 0}),
    ],
)
def test_monitors_reject_bad_settings(cls, kwargs):
    with pytest.raises(ValueError, match="must be"):
        cls(**kwargs)


def test_fixed_samples_of_a_volume_show_the_slice_with_the_largest_foreground_area():
    from pipeline.monitors.samples import FixedSamples

    mask = torch.zeros(9, 12, 10, dtype=torch.long)
    mask[2, :2, :2], mask[6, :5, :5] = 1, 2  # slice 6 holds the most foreground
    case = {"image": torch.arange(9.0).view(1, 9, 1, 1).expand(1, 9, 12, 10), "mask": mask, "target": mask}
    case |= {"case_id": "ct", "index": 0}
    flat = FixedSamples(2)
    flat.capture(case)  # a 2D network: the slice
    assert flat.names == ["ct slice 6"] and flat.images[0].shape == (1, 12, 10) and flat.images[0].max() == 6
    block = FixedSamples(2)
    block.capture(case, spatial_dims=3, depth=4)  # a 3D network: a block around it, that slice shown
    shown = block.display[0]
    assert block.images[0].shape == (1, 4, 12, 10) and block.images[0][0, shown].max() == 6
    assert torch.equal(block.masks[0][shown], mask[6])
