"""Whether a launcher sizes its launch for a GPU, in one place.

Launchers choose tiles, warps and split counts differently on a GPU (compiled kernels) and on CPU
tensors (the Triton interpreter, where small tiles make awkward sizes span several of them). The
compile check (:mod:`kvpress_kernels.compile_check`) must see exactly the GPU choices while it
drives the launchers with CPU tensors on a machine without a GPU, so every such decision goes
through :func:`gpu_tiles` / :func:`sm_count`, which :func:`force_gpu_tiles` can switch to "GPU".
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_FORCED: dict = {}  # {"sms": int} while force_gpu_tiles() is active


def gpu_tiles(device: torch.device) -> bool:
    """True when launches on ``device`` are sized for a GPU (a CUDA tensor, or a forced compile check)."""
    return device.type == "cuda" or bool(_FORCED)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the forced figure during a compile check)."""
    if _FORCED:
        return _FORCED["sms"]
    return torch.cuda.get_device_properties(device).multi_processor_count


@contextmanager
def force_gpu_tiles(sms: int = 132):
    """Make every launcher size its launch as on a GPU with ``sms`` SMs (H100/H200: 132)."""
    prev = dict(_FORCED)
    _FORCED.clear()
    _FORCED["sms"] = int(sms)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(prev)
