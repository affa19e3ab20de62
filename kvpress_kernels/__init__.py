"""kvpress-kernels: fused Triton and CUDA kernels for KV-cache compression in a paged KV cache."""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers the torch.library ops)
from ._backend import info  # noqa: E402,F401
