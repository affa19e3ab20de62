"""One engine-side call that compresses a vLLM request's KV cache in place: :func:`compress_request`.

What vLLM allocates (read in vllm-project/vllm, 2026; docs/ENGINES.md cites the lines):

- ``vllm/v1/worker/gpu/attn_utils.py::_reshape_kv_cache`` (and ``GPUModelRunner._reshape_kv_cache_tensors``):
  one raw int8 buffer per ``KVCacheTensor`` (possibly shared by layers of different KV-cache groups),
  viewed as ``backend.get_kv_cache_shape(...)`` permuted by ``backend.get_kv_cache_stride_order()``
  and permuted back: every layer gets a tensor of the backend's *logical* shape whose strides carry
  the physical order (NHD, HND, or a cross-layer buffer ``[num_blocks, num_layers, 2, ...]``).
- ``vllm/v1/attention/backends/flash_attn.py``: ``(2, num_blocks, block_size, num_kv_heads, head_size)``
  (layout ``"flash_attn"``); stride order NHD ``(0, 1, 2, 3, 4)`` or HND ``(0, 1, 3, 2, 4)``; with
  ``include_num_layers_dimension`` the cross-layer order ``(num_blocks, num_layers, 2, ...)``.
- ``vllm/v1/attention/backends/flashinfer.py`` and ``triton_attn.py``:
  ``(num_blocks, 2, block_size, num_kv_heads, head_size)`` (layout ``"flashinfer"``), NHD or HND.
- separate K and V tensors ``[num_blocks, block_size, num_kv_heads, head_size]`` (vllm-ascend's
  ``LayerCache.k_cache / v_cache``): layout ``"kv_pair"``.

Every one of these is a strided view ``[num_blocks, block_size, kv_heads, head_dim]`` per K and V
(:func:`kv_cache_views`), which is what :mod:`kvpress_kernels.ops.block_compaction` takes.

Positions stay decoupled from slots: cached keys carry RoPE already, so after compaction the request
simply has fewer slots; the engine keeps the *logical* position counter (the next token's RoPE
position is still ``num_tokens_before``) and a separate *physical* slot count (the returned
``num_tokens``), as vllm-ascend-kvcompress does with its semantic / physical token counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import _validate as V
from ..methods.base import CompressionMethod, GenerationInfo, PrefillInputs
from ..ops.block_compaction import (block_compact_, block_gather_, blocks_for, check_block_layout,
                                    check_gather_destination, freed_block_range, gather_block_tokens)

#: Accepted ``layout`` names: the engine tensor of one layer and how K and V sit in it.
KV_LAYOUTS = {
    "flash_attn": "[2, num_blocks, block_size, kv_heads, head_dim] (vLLM FlashAttention; NHD or HND strides)",
    "flashinfer": "[num_blocks, 2, block_size, kv_heads, head_dim] (vLLM FlashInfer / Triton attention)",
    "kv_pair": "(k_cache, v_cache), each [num_blocks, block_size, kv_heads, head_dim] (vllm-ascend, split caches)",
}


def kv_cache_views(kv_cache, layout: str = "flash_attn", *, name: str = "kv_cache") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(k_cache, v_cache)`` views ``[num_blocks, block_size, kv_heads, head_dim]`` of one layer's
    engine tensor in ``layout`` (see :data:`KV_LAYOUTS`); no copy, strides kept."""
    V.choice("layout", layout, list(KV_LAYOUTS))
    if layout == "kv_pair":
        if not (isinstance(kv_cache, (tuple, list)) and len(kv_cache) == 2):
            raise TypeError(f"{name} must be a (k_cache, v_cache) pair for layout='kv_pair', got "
                            f"{type(kv_cache).__name__}")
        k, v = kv_cache
        V.tensor(f"{name}[0] (k_cache)", k, ndim=4)
        V.tensor(f"{name}[1] (v_cache)", v, ndim=4)
        return k, v
    V.tensor(name, kv_cache, ndim=5, dtypes=V.FLOAT_DTYPES, last_contiguous=True)
    if layout == "flash_attn":
        if kv_cache.shape[0] != 2:
            raise ValueError(f"{name} must be [2, num_blocks, block_size, kv_heads, head_dim] for layout='flash_attn', "
                             f"got shape {list(kv_cache.shape)}")
        return kv_cache[0], kv_cache[1]
    if kv_cache.shape[1] != 2:
        raise ValueError(f"{name} must be [num_blocks, 2, block_size, kv_heads, head_dim] for layout='flashinfer', "
                         f"got shape {list(kv_cache.shape)}")
    return kv_cache[:, 0], kv_cache[:, 1]


def query_window_tokens(method: CompressionMethod, num_tokens: int, shots: Optional[Sequence[Tuple[int, int]]] = None
                        ) -> int:
    """How many trailing prompt queries per layer the engine must save for ``method`` on a
    ``num_tokens`` prompt (vllm-ascend's ``query_window_tokens``): the observation window for
    SnapKV / PyramidKV / ChunkKV / ShotKV, 1 for TOVA, every query for H2O, 0 for StreamingLLM and
    KNorm. Unknown methods: every query (safe; :class:`PrefillInputs.query_rows` names a shortfall)."""
    from ..methods import H2O, TOVA, KNorm, ShotKV, SnapKV, StreamingLLM

    n = V.integer("num_tokens", num_tokens, low=0)
    if isinstance(method, ShotKV):
        return method.window(list(shots or []), n)
    if isinstance(method, SnapKV):  # PyramidKV and ChunkKV are SnapKVs
        return min(method.window_size, n)
    if isinstance(method, TOVA):
        return min(1, n)
    if isinstance(method, (StreamingLLM, KNorm)):
        return 0
    if isinstance(method, H2O):
        return n
    return n


@dataclass
class RequestCompression:
    """What :func:`compress_request` did to one request.

    Attributes
    ----------
    num_tokens : int
        Slots the request holds now (the largest over layers; the block table keeps
        ``ceil(num_tokens / block_size)`` blocks). The engine's *logical* position counter does not change.
    per_layer_num_tokens : tuple of int
        Slots per layer (all equal unless ``layer_lengths="per_layer"``).
    freed_block_range : (start, end)
        ``block_table[start:end]`` no longer holds a token of any layer: return those blocks to the pool
        (with a ``destination_block_table``: every source block in use).
    freed_block_ids : Tensor ``[end - start]``
        Those block ids (a copy, on the block table's device; no host sync).
    kept_tokens : list of Tensor ``[kv_heads, K_l]`` int32 or None
        Per layer, the token indices (logical positions) each head kept, ascending; ``None``: kept all.
        After compaction slot ``j < K_l`` holds one of them, not in position order (in position order
        with a ``destination_block_table``).
    """

    num_tokens: int
    per_layer_num_tokens: Tuple[int, ...]
    freed_block_range: Tuple[int, int]
    freed_block_ids: torch.Tensor
    kept_tokens: List[Optional[torch.Tensor]]


def pad_recent(kept: torch.Tensor, num_tokens: int, target: int) -> torch.Tensor:
    """``kept [H, K]`` (ascending) topped up to ``target`` tokens per head with the most recent tokens it
    does not keep; ascending. Device ops only (``target`` is a host int), no sync."""
    H, K = kept.shape
    mask = torch.zeros(H, num_tokens, dtype=torch.bool, device=kept.device)
    mask.scatter_(1, kept.long(), True)
    # rank of each evicted token counted from the end: 1 for the latest one
    from_end = torch.flip(torch.cumsum(torch.flip((~mask).to(torch.int32), [1]), 1), [1])
    mask |= (~mask) & (from_end <= target - K)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :target]
    return order.to(torch.int32)


def _layer_queries(queries, layer: int, L: int):
    if queries is None:
        return None
    if isinstance(queries, torch.Tensor):
        V.tensor("queries", queries, ndim=4)
        if queries.shape[0] != L:
            raise ValueError(f"queries must be [num_layers={L}, W, num_heads, head_dim], got {list(queries.shape)}")
        return queries[layer]
    if len(queries) != L:
        raise ValueError(f"queries must hold one [W, num_heads, head_dim] tensor per layer ({L}), got {len(queries)}")
    return queries[layer]


def compress_request(kv_caches: Sequence, block_table: torch.Tensor, num_tokens: int, method: CompressionMethod, *,
                     queries: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None, layout: str = "flash_attn",
                     num_heads: Optional[int] = None, scale: Optional[float] = None,
                     shots: Optional[Sequence[Tuple[int, int]]] = None, layer_lengths: str = "equal",
                     destination_block_table: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> RequestCompression:
    """Compress one request's prefilled KV cache in the engine's own tensors, in place.

    Runs ``method``'s prefill policy on every layer (the one method layer, DESIGN.md §7), then moves each
    layer's kept tokens into the holes with :func:`~kvpress_kernels.ops.block_compaction.block_compact_`
    and reports the tail blocks that no longer hold any token.

    Parameters
    ----------
    kv_caches : sequence (one per layer) of engine tensors in ``layout``
        The per-layer KV caches exactly as the engine allocated them (see :data:`KV_LAYOUTS`); every
        layer shares ``block_table`` (one KV-cache group).
    block_table : Tensor ``[max_blocks]``, int32/int64
        The request's block-table row (vLLM's ``block_table[req_index]``), shared by every kv head.
    num_tokens : int
        Tokens the request holds (vLLM's ``num_computed_tokens`` right after prefill).
    method : CompressionMethod
        ShotKV, SnapKV, PyramidKV (``require_uniform=False``), ChunkKV, StreamingLLM, TOVA, KNorm, or H2O
        (with every prompt query). ``keep_ratio`` is the fraction KEPT.
    queries : Tensor ``[num_layers, W, num_heads, head_dim]`` or a sequence of ``[W, num_heads, head_dim]``
        The last ``W`` prompt queries of each layer, RoPE applied, in vLLM's token-major query layout
        (what a query-capture hook copies out). ``W >= query_window_tokens(method, num_tokens)``;
        ``None`` for methods that need none.
    layout : {"flash_attn", "flashinfer", "kv_pair"}
    num_heads : int, optional
        Query heads (needed only when ``queries`` is ``None``; default: kv heads).
    scale : float, optional
        Attention logit scale (default ``1 / sqrt(head_dim)``).
    shots : list of (start, end), optional
        Few-shot spans for ShotKV (token indices of the prompt).
    layer_lengths : {"equal", "pad", "per_layer"}
        What to do when the method keeps a different number of tokens per layer (PyramidKV by design;
        ShotKV and ChunkKV because they keep whole segments). vLLM's attention metadata has one length
        per request, so: ``"equal"`` raises; ``"pad"`` tops every layer up to the largest count with its
        most recent evicted tokens (every token the method chose is kept; the extra ones are the latest
        positions); ``"per_layer"`` keeps the method's counts (for engines with per-layer lengths, e.g.
        vllm-ascend's ``per_layer_physical_num_tokens``); blocks are freed beyond the longest layer.
    destination_block_table : Tensor ``[max_dst_blocks]``, optional
        Private-destination mode (vllm-ascend's ``requires_private_destination``): instead of compacting
        in place, copy each layer's kept tokens, in position order, into these fresh blocks (disjoint from
        the request's blocks in use) with :func:`~kvpress_kernels.ops.block_compaction.block_gather_`;
        the source blocks are only read. The request's new row is
        ``destination_block_table[:ceil(num_tokens / block_size)]`` and every source block in use is
        reported freed.
    backend : {"reference", "triton"}, optional

    Returns
    -------
    RequestCompression

    Raises ``TypeError``/``ValueError`` naming the argument for a bad layout, block table, queries, or a
    method result the layout cannot hold (different counts per head, or per layer with
    ``layer_lengths="equal"``). All decisions are made before the first byte moves: a rejected call changes
    nothing. Host syncs: a method whose kept count is data-dependent (ShotKV, ChunkKV) reads one count
    per layer, as everywhere else; compaction itself never syncs.
    """
    V.choice("layer_lengths", layer_lengths, ("equal", "pad", "per_layer"))
    if not isinstance(method, CompressionMethod):
        raise TypeError(f"method must be a kvpress_kernels CompressionMethod, got {type(method).__name__}")
    if isinstance(kv_caches, torch.Tensor) or not isinstance(kv_caches, (list, tuple)) or len(kv_caches) == 0:
        raise TypeError("kv_caches must be a non-empty list (one engine tensor per layer)")
    L = len(kv_caches)
    views = [kv_cache_views(t, layout, name=f"kv_caches[{i}]") for i, t in enumerate(kv_caches)]
    k0 = views[0][0]
    dev, nb, bs, H, N = check_block_layout(k0, views[0][1], block_table, num_tokens)
    for i, (k, v) in enumerate(views[1:], 1):
        V.tensor(f"kv_caches[{i}]", k, dtypes=(k0.dtype,), device=dev)
        V.shape(f"kv_caches[{i}] (K)", k, list(k0.shape), "(every layer of one KV-cache group has the same shape)")
        V.shape(f"kv_caches[{i}] (V)", v, list(views[0][1].shape), "(as layer 0)")
    D = k0.shape[-1]
    layer_q = [_layer_queries(queries, i, L) for i in range(L)]
    if layer_q[0] is not None:
        for i, q in enumerate(layer_q):
            V.tensor(f"queries[{i}]", q, ndim=3, dtypes=(k0.dtype,), device=dev)
            V.shape(f"queries[{i}]", q, [layer_q[0].shape[0], None, D], "([W, num_heads, head_dim], W and head_dim "
                                                                          "as every layer and the cache)")
        W, Hq = layer_q[0].shape[0], layer_q[0].shape[1]
        if W > N:
            raise ValueError(f"queries hold W={W} tokens per layer, more than num_tokens={N}")
        if Hq % H:
            raise ValueError(f"queries have {Hq} heads, which must be a multiple of the {H} kv heads")
    else:
        W, Hq = 0, V.integer("num_heads", num_heads if num_heads is not None else H, low=1)
        if Hq % H:
            raise ValueError(f"num_heads={Hq} must be a multiple of the {H} kv heads")
    if scale is None:
        scale = D ** -0.5
    spans = None
    if shots is not None:
        from ..shots import validate_spans

        spans = [validate_spans(shots, N)]
    info = GenerationInfo(num_layers=L, batch_size=1, num_heads=Hq, num_kv_heads=H, head_dim=D, prompt_lengths=(N,),
                          shots=spans, device=dev, backend=backend)
    method.begin(info)
    lengths = torch.tensor([N], dtype=torch.int64, device=dev)

    # Pass 1: decide every layer (nothing written yet).
    kept: List[Optional[torch.Tensor]] = []
    counts: List[int] = []
    for layer, (k, v) in enumerate(views):
        q = layer_q[layer]
        qd = (q.permute(1, 0, 2).unsqueeze(0) if q is not None else k.new_zeros(1, Hq, 0, D))
        inputs = PrefillInputs(layer=layer, queries=qd, keys=gather_block_tokens(k, block_table, N).unsqueeze(0),
                               values=gather_block_tokens(v, block_table, N).unsqueeze(0), lengths=lengths,
                               scale=float(scale), info=info, query_offset=N - W)
        ev = method.prefill(inputs)
        if ev is None:
            kept.append(None)
            counts.append(N)
            continue
        per_head = (np.asarray(ev.new_lengths).reshape(-1) if ev.new_lengths is not None
                    else (ev.kept_idx[0] >= 0).sum(-1).cpu().numpy())
        if np.any(per_head != per_head[0]):
            raise ValueError(f"{type(method).__name__} keeps a different number of tokens per kv head in layer {layer} "
                             f"({per_head.tolist()}); a block layout shared by every head needs one count per layer "
                             "(use a method whose heads keep equal budgets)")
        n = int(per_head[0])
        kept.append(ev.kept_idx[0, :, :n])
        counts.append(n)
    if len(set(counts)) > 1:
        if layer_lengths == "equal":
            raise ValueError(f"{type(method).__name__} keeps a different number of tokens per layer ({counts}); the "
                             "engine's attention takes one length per request: pass layer_lengths='pad' (top up with "
                             "the most recent tokens) or 'per_layer' (only if the engine keeps per-layer lengths)")
        if layer_lengths == "pad":
            target = max(counts)
            kept = [pad_recent(kt, N, target) if kt is not None and n < target else kt for kt, n in zip(kept, counts)]
            counts = [target] * L

    new_tokens = max(counts)
    if destination_block_table is not None:
        # Pass 2 (private destination): gather every layer's kept tokens into the fresh blocks.
        check_gather_destination(destination_block_table, block_table, N, new_tokens, nb, bs)  # before any write
        every = torch.arange(N, device=dev, dtype=torch.int32).view(1, N)
        for (k, v), kt in zip(views, kept):
            block_gather_(k, v, block_table, every if kt is None else kt, N, destination_block_table,
                          backend=backend)
        start, end = 0, blocks_for(N, bs)
    else:
        # Pass 2: move the kept tokens into the holes, layer by layer.
        for (k, v), kt in zip(views, kept):
            if kt is not None:
                block_compact_(k, v, block_table, kt, N, backend=backend)
        start, end = freed_block_range(N, new_tokens, bs)
    return RequestCompression(num_tokens=new_tokens, per_layer_num_tokens=tuple(counts),
                              freed_block_range=(start, end), freed_block_ids=block_table[start:end].clone(),
                              kept_tokens=kept)


__all__ = ["KV_LAYOUTS", "RequestCompression", "compress_request", "kv_cache_views", "query_window_tokens"]
