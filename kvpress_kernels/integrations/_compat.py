"""Shims for what changed within transformers 5.x that the integration and the SmolLM2 loader meet.

The integration (:mod:`.transformers`) is written once against the interfaces every 5.x has
(``Cache``/``CacheLayerMixin``, ``AttentionInterface``, ``AttentionMaskInterface``, the SDPA attention
function). Where 5.x renamed or re-typed a hook that a ``Cache`` must implement, or changed how a GGUF
file loads, the difference is absorbed here, one shim per change, each saying which releases need
which side (read from the sources of the last patch of every 5.x minor release, 5.0.0 to 5.24.0).
Tested: CI runs both ends (5.2.0, what kvpress pins, and the newest release); the integration and
model-family tests also passed by hand on 5.0.0 and 5.13.1.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Union

import torch


def mask_query_length(query: Union[int, torch.Tensor]) -> int:
    """Number of new query positions from the first argument transformers passes to ``get_mask_sizes``.

    transformers 5.0 - 5.3 pass ``cache_position`` (a 1-D tensor of the new positions) to
    ``Cache.get_mask_sizes`` and ``CacheLayerMixin.get_mask_sizes``; 5.4 and later pass
    ``query_length`` (an int). Both mean "this many new tokens"."""
    if isinstance(query, torch.Tensor):
        return int(query.shape[0])
    return int(query)


class MaxLengthCompat:
    """Both names of the "longest sequence this cache holds" hook, answering -1 (no maximum: pages
    are allocated as the cache grows).

    ``get_max_cache_shape``: the hook in transformers 5.0 - 5.12 (abstract on ``CacheLayerMixin``);
    5.13 - 5.19 keep it as an alias, 5.20 removed it. ``get_max_length``: 5.13 and later (abstract on
    ``CacheLayerMixin``, so a layer class without it cannot be instantiated there). Put this class
    first among the bases so that its concrete methods satisfy either abstract one."""

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1


def cache_kwarg(model) -> str:
    """The keyword under which ``model.generate`` / ``model.forward`` take the cache.

    ``past_key_values`` in transformers 5.0 - 5.23; 5.24 renamed it ``cache`` (``past_key_values``
    still accepted, with a FutureWarning, until 6.0). Read from the model's own ``forward`` signature,
    so a model class that has not been migrated keeps working."""
    import inspect

    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - forward without a signature
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


@contextlib.contextmanager
def saveable_gguf_model(model) -> Iterator[None]:
    """Let ``model.save_pretrained`` write a GGUF-loaded model whose weights are all dense.

    transformers 5.20 and later load a GGUF file through ``GgufHfQuantizer``, which stays attached to
    the model (``model.hf_quantizer``, ``config.quantization_config``) and makes ``save_pretrained``
    refuse ("quantized with gguf and is not serializable") even when every weight was de-quantized
    (the legacy path, ``dequantize=True``, or no ``kernels`` package: ``packed_modules`` empty). Such a
    model is an ordinary dense checkpoint: the quantizer and its config are detached for the save, so
    the copy also reloads without a GGUF file. Models that keep packed GGUF blocks are left alone (the
    save still refuses). 5.0 - 5.19 attach no quantizer: nothing to do."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf" or getattr(quantizer, "packed_modules", None):
        yield
        return
    had_qc = "quantization_config" in model.config.__dict__
    qc = model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_qc:
            model.config.quantization_config = qc


def gguf_tokenizer_bos_first(tokenizer) -> None:
    """Make a tokenizer read from a GGUF file prepend its BOS token, on every transformers version.

    transformers 5.0 - 5.5 build the tokenizer of a GGUF file with a post-processor that prepends BOS
    (SmolLM2's file says ``tokenizer.ggml.add_bos_token = False``; they ignore it); 5.6 and later follow
    the file and prepend nothing. The same prompt then gives different token ids (one token fewer), a
    different attention sink, and different compressed results. Every recorded result of this package
    was made with BOS first (and SmolLM2-Instruct's chat template starts with that same token,
    ``<|im_start|>``), so we keep BOS first everywhere. A tokenizer without a BOS token is left alone;
    one that prepends it already is unchanged (no second BOS)."""
    if getattr(tokenizer, "bos_token_id", None) is None:
        return
    tokenizer.add_bos_token = True
