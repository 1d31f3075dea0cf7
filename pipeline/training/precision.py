"""The training and inference precision medseg picks for the machine when none is configured."""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["bf16-mixed", "16-mixed", "32-true"]  # Lightning's names of what medseg picks


def default_precision(accelerator: str | None) -> Precision:
    """bf16 mixed precision on a CUDA GPU that supports it, fp16 mixed on older GPUs, fp32 on CPU."""
    if accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of a Lightning precision setting (None: no autocast)."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
