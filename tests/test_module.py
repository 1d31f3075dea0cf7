"""SegmentationModule settings of the GPU fast path."""

from __future__ import annotations

import torch

from pipeline.models import UNet
from pipeline.training.module import SegmentationModule


def test_module_compile_keeps_checkpoint_keys() -> None:
    torch.manual_seed(0)
    compiled = SegmentationModule(UNet(1, 3, features=(4, 8)), compile=True)
    plain = SegmentationModule(UNet(1, 3, features=(4, 8)))
    assert compiled.net._compiled_call_impl is not None  # compiled in place, on first call
    assert plain.net._compiled_call_impl is None  # off by default
    keys = list(compiled.state_dict())
    assert keys == list(plain.state_dict())
    assert not any("_orig_mod" in key for key in keys)
    plain.load_state_dict(compiled.state_dict())  # strict: a compiled run's checkpoint loads as is
    assert compiled.hparams.compile is True


def test_module_sliding_window_batches_the_configured_number_of_windows() -> None:
    torch.manual_seed(0)
    module = SegmentationModule(UNet(1, 3, features=(4, 8)), patch_size=(16, 16), sw_batch_size=3).eval()
    seen: list[int] = []
    module.net.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        logits = module.predict_logits(torch.rand(1, 1, 32, 32))
    assert logits.shape == (1, 3, 32, 32)
    assert max(seen) == 3 and sum(seen) == 9  # 3x3 windows at overlap 0.5, three per forward


def test_module_window_progress_counts_monais_windows() -> None:
    from pipeline.training.prediction import count_windows, window_logits

    calls: list[int] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return torch.zeros(len(x), 2, *x.shape[2:])

    for size, patch in (((23, 50, 41), (16, 32, 32)), ((40, 40), (32, 32)), ((100, 7), (32, 8))):
        calls.clear()
        told: list[float] = []
        window_logits(net, torch.zeros(1, 1, *size), patch, 3, 0.5, told.append)
        assert sum(calls) == count_windows(size, patch, 0.5) and told[-1] == 1.0 and told == sorted(told)


def test_module_volume_logits_fill_one_array_chunk_by_chunk_and_softmax_in_place():
    # a whole case's logits were a list of chunks concatenated (twice the memory) and softmaxed into
    # a second array; the chunked fill and the in-place softmax give the same numbers
    from pipeline.training.prediction import softmax_, volume_logits

    net = torch.nn.Conv2d(2, 3, 3, padding=1)
    image = torch.randn(2, 11, 16, 12)  # (C, S, H, W): 11 slices in chunks of 4
    told = []
    with torch.no_grad():
        logits = volume_logits(net, image, 2, chunk=4, progress=told.append)
        expected = net(image.movedim(1, 0)).movedim(0, 1)
    assert torch.allclose(logits, expected, atol=1e-6) and told == [4 / 11, 8 / 11, 1.0]
    reference = torch.softmax(logits, 0)
    assert softmax_(logits) is logits and torch.allclose(logits, reference, atol=1e-6)
    big = torch.tensor([[1000.0, -1000.0], [0.0, 0.0]])  # stable for large logits, as torch's
    assert torch.allclose(softmax_(big.clone()), torch.softmax(big, 0))
