"""Numeric precision of inference: ``auto``, ``fp32``, ``bf16`` or ``fp16``.

Under ``bf16``/``fp16`` the convolutions and linear layers of the backbone, FPN, RCNN head and
mask head run in that dtype through ``torch.autocast``. The RPN head stays float32
(``MaskRCNN.detect`` leaves the autocast for it: in bfloat16 its proposals shift enough to move
the DSB2018 score of a small trained model by 0.005), and so do box coding, scores, NMS and mask
pasting (the stages cast the head outputs back before decoding). ``auto`` picks bfloat16 on CPUs that
compute it natively (AVX512-BF16 or AMX: detected at run time), float16 (bfloat16 where the GPU
supports it) on CUDA, and float32 elsewhere, where low precision would be emulated and slower.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from ..errors import UserError
from .distributed import cpu_has_fast_bfloat16

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device``; None for float32."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return _DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bfloat16() else None


def training_amp(amp: bool | None, device: torch.device | str) -> bool:
    """Whether training runs under autocast: ``amp`` when given (``train --amp on|off``); by default
    (None) on CPUs that compute bfloat16 natively, where benchmarks/amp_check.py found bfloat16
    training to learn as float32 does (held-out AP50 and DSB2018 score within 0.01 over 18 runs) in
    0.7-0.8x of its step time; off elsewhere: emulated bfloat16 is slower than float32, and CUDA's
    float16 was not measured by that check."""
    if amp is not None:
        return amp
    return torch.device(device).type == "cpu" and cpu_has_fast_bfloat16()


def autocast(precision: str, device: torch.device | str):
    """A context in which inference runs at ``precision`` (a no-op for float32)."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextmanager
def float32_inside(device_type: str):
    """Leave an enclosing autocast, if any: what runs inside computes in float32. (No autocast
    context at all otherwise, so that a trace of the model records none.)"""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield
