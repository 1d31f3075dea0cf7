"""Memory layout of the weights: channels-last convolutions, set once, before anything wraps them.

Channels-last (NHWC, NDHWC for 3D) lets cuDNN run convolutions without transposing, which bf16
tensor cores need. The weights must take it before Lightning wraps the network in DDP (DDP lays
out its gradient buckets by the parameters' strides when it is built; weights converted later
send every step through its slow mismatched-strides path) and before the optimiser state exists.
"""

from __future__ import annotations

import torch
from torch import nn


def channels_last_format(net: nn.Module) -> torch.memory_format:
    """``torch.channels_last`` for a 2D network (4-d convolution weights), ``channels_last_3d``
    for a 3D one (5-d weights)."""
    rank = max((p.ndim for p in net.parameters()), default=4)
    return torch.channels_last_3d if rank == 5 else torch.channels_last


def match_state_layout(optimizer: torch.optim.Optimizer) -> int:
    """Give every optimiser state tensor shaped like its parameter the parameter's strides.

    A resumed optimiser state keeps the layout it was saved with (a run started on a CPU and
    resumed on a GPU has contiguous moments beside channels-last weights), and fused optimiser
    kernels fall back to a slow path on mixed layouts. Returns the number of tensors re-laid.
    """
    changed = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
                    changed += 1
    return changed
