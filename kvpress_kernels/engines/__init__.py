"""Serving-engine adapters (DESIGN.md §7): our ops and methods on an engine's own KV tensors.

We do not build an engine and ship no plugin here: :func:`vllm.compress_request` is the one call an
engine plugin makes per request (docs/ENGINES.md says how vLLM, SGLang and TensorRT-LLM would call it).
"""

from .vllm import (KV_LAYOUTS, RequestCompression, compress_request, kv_cache_views,  # noqa: F401
                   query_window_tokens)

__all__ = ["KV_LAYOUTS", "RequestCompression", "compress_request", "kv_cache_views", "query_window_tokens"]
