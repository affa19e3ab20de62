"""kvpress-kernels: fused Triton and CUDA kernels for KV-cache compression in a paged KV cache."""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers the torch.library ops)
from ._backend import info  # noqa: E402,F401

# Methods, the paged cache and the transformers entry points (issue 4). The transformers integration is
# imported on first use, so that `import kvpress_kernels` does not pay for importing transformers.
from .cache import PagedKVCache  # noqa: E402,F401
from .methods import (H2O, AdaKV, TOVA, ChunkKV, CompressionMethod, KNorm, KVzip, PyramidKV, ShotKV,  # noqa: E402,F401
                      SnapKV, StreamingLLM)
from .shots import ChatSegments, find_chat_turns, find_paragraphs, find_shots  # noqa: E402,F401
from .sessions import ChatSession, QueryWindow, evict, recompress, record_queries  # noqa: E402,F401

_TRANSFORMERS_EXPORTS = ("compress", "generate", "PagedCache", "CompressionSession")


def __getattr__(name):
    if name in _TRANSFORMERS_EXPORTS:
        from .integrations import transformers as _tf
        return getattr(_tf, name)
    raise AttributeError(f"module 'kvpress_kernels' has no attribute {name!r}")
