"""The arithmetic of matrix products and convolutions on CUDA, set by a run's dtype.

float32 (and float64) runs get IEEE FP32 products throughout. PyTorch's own defaults differ
by library: cuBLAS matrix products in full FP32, but cuDNN convolutions in TF32, which would
round the ConvNet's float32 runs to a 10-bit mantissa unasked. dtype tf32 is the named
option for the faster arithmetic: float32 tensors whose products and convolutions run on the
tensor cores of an Ampere or newer GPU in TF32 (inputs rounded to 10 mantissa bits, sums in
FP32). The CPU has no TF32 here, so a tf32 run there is refused rather than run as float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

TF32_CAPABILITY = (8, 0)  # Ampere: the first GPUs whose tensor cores compute in TF32


def tf32_problem(device: torch.device) -> str | None:
    """Why TF32 arithmetic cannot run on device ("needs ..."), or None where it can."""
    if device.type != "cuda":
        return f"needs a CUDA GPU (this run trains on the {device.type})"
    capability = torch.cuda.get_device_capability(device)
    if capability < TF32_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"needs a GPU of compute capability 8.0 (Ampere) or newer; {name} has "
                f"{capability[0]}.{capability[1]}")
    return None


@contextmanager
def cuda_precision(dtype: str, device: torch.device) -> Iterator[None]:
    """Inside, CUDA matrix products and convolutions use TF32 exactly when dtype is tf32;
    the process's settings are restored on the way out. Nothing changes off CUDA."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = dtype == "tf32"
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before
