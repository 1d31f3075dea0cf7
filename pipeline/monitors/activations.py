"""ActivationMonitor: dead ReLU units and saturated sigmoid/tanh units on fixed validation images.

Keys (each measured epoch, to W&B and ``metrics.csv``): ``dead_relu/<layer>``, the fraction of a
ReLU's channels that output zero at every position of every fixed validation image, and
``saturated/<layer>``, the fraction of a sigmoid's or tanh's inputs beyond its saturation range
(where its slope is below about 7% of its peak). Layers are named as the gradient monitor names
them: an activation inside a conv-norm-act unit takes the unit's name.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from pipeline.monitors.layers import monitored_net, unit_name
from pipeline.monitors.outputs import log_scalars
from pipeline.monitors.samples import FixedSampleCallback


class ActivationMonitor(FixedSampleCallback):
    """Per activation layer, the dead-ReLU or saturated-sigmoid/tanh fraction, once an epoch.

    Forward hooks are registered on the network's ``nn.ReLU``, ``nn.Sigmoid`` and ``nn.Tanh``
    modules for one pass over the fixed validation images (in eval mode, through the module's
    ``predict_logits`` when it has one) and removed right after. A module used several times
    (torchvision's ResNet blocks reuse their ReLU) is measured over all its calls. A compiled
    network (``model.compile``) runs this pass eagerly: its compiled graph would skip hooks added
    after compilation (Dynamo does not guard on module hooks), and the monitor would see nothing.

    Args:
        every_n_epochs: measure after every this many validation epochs; 0 turns it off.
        num_samples: fixed validation images per measurement.
        sigmoid_range: a sigmoid input x with |x| above this is saturated (slope < 0.018 at 4).
        tanh_range: a tanh input x with |x| above this is saturated (slope < 0.071 at 2).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 2,
        sigmoid_range: float = 4.0,
        tanh_range: float = 2.0,
    ) -> None:
        if not sigmoid_range > 0 or not tanh_range > 0:
            raise ValueError(f"sigmoid_range and tanh_range must be > 0, got {sigmoid_range}, {tanh_range}")
        super().__init__(every_n_epochs, num_samples)
        self.ranges = {nn.Sigmoid: sigmoid_range, nn.Tanh: tanh_range}
        self.last: dict[str, float] = {}

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = monitored_net(pl_module)
        tally = Tally()
        handles = [
            module.register_forward_hook(hook)
            for name, module in net.named_modules()
            if (hook := self._hook(unit_name(name, net), module, tally)) is not None
        ]
        try:
            predict = self.predictor(pl_module)
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                for image in self.samples.batches(pl_module.device):
                    tally.new_pass()
                    predict(image)
        finally:
            for handle in handles:
                handle.remove()
        self.last = tally.fractions()
        log_scalars(trainer, self.last)

    def _hook(self, layer: str, module: nn.Module, tally: Tally) -> Callable | None:
        """A forward hook feeding ``module``'s outputs (ReLU) or inputs (sigmoid, tanh) to ``tally``."""
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            return lambda _, inputs, output: tally.relu(f"dead_relu/{layer}", output)
        limit = next((r for kind, r in self.ranges.items() if isinstance(module, kind)), None)
        if limit is None:
            return None
        return lambda _, inputs, output: tally.saturation(f"saturated/{layer}", inputs[0], limit)

    def summary(self) -> dict:
        """The last measured fractions, for ``summary.json``."""
        return dict(self.last)


class Tally:
    """Activation statistics of one measurement, kept on the device until ``fractions``.

    A dead-ReLU unit is a (call, channel) pair: the k-th call of a module in a forward pass is the
    same place in the network for every image, while different calls (a reused module) are not.
    """

    def __init__(self) -> None:
        self.fired: dict[tuple[str, int], Tensor] = {}  # (key, call) -> (C,) bool: fired anywhere
        self.saturated: dict[str, Tensor] = {}  # key -> (2,) float: saturated count, total count
        self._calls: dict[str, int] = {}

    def new_pass(self) -> None:
        """Call before each forward pass."""
        self._calls.clear()

    def relu(self, key: str, output: Tensor) -> None:
        """Record which channels (dim 1 of ``output`` (B, C, ...)) are positive anywhere."""
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        fired = (output > 0).transpose(0, 1).flatten(1).any(1)
        previous = self.fired.get((key, call))
        self.fired[(key, call)] = fired if previous is None else previous | fired

    def saturation(self, key: str, x: Tensor, limit: float) -> None:
        """Count the elements of ``x`` with |x| > ``limit``."""
        counts = torch.stack([(x.abs() > limit).sum(), torch.tensor(x.numel(), device=x.device)]).float()
        self.saturated[key] = self.saturated[key] + counts if key in self.saturated else counts

    def fractions(self) -> dict[str, float]:
        """``{key: fraction}``: dead channels over all channels, or saturated over all elements."""
        dead: dict[str, list[Tensor]] = {}
        for (key, _), fired in self.fired.items():
            dead.setdefault(key, []).append(~fired)
        values = [torch.cat(parts).float().mean() for parts in dead.values()]
        values += [counts[0] / counts[1] for counts in self.saturated.values()]
        if not values:
            return {}
        return dict(zip([*dead, *self.saturated], torch.stack(values).tolist(), strict=True))  # one sync
