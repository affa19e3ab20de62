"""The ops of DESIGN.md §5. Each module holds the PyTorch reference ``<op>_ref``, the Triton
kernel(s), the ``torch.library`` registration (namespace ``kvpress_kernels``) and the public,
validating function that dispatches between backends."""

from .append import append_, append_ref

__all__ = ["append_", "append_ref"]
