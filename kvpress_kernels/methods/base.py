"""The interface between a compression method and the cache integration (DESIGN.md §6).

A method is a *policy*: it decides which cached tokens each (sequence, kv head) row keeps, using only
the ops (scoring, segments, selection). Moving the tokens and freeing pages is the integration's job
(:class:`kvpress_kernels.PagedKVCache.compact`). The integration calls, per generation:

1. :meth:`CompressionMethod.begin` once, with the :class:`GenerationInfo` (geometry, prompt lengths,
   shots);
2. :meth:`CompressionMethod.prefill` once per layer, right after that layer's prefill attention, with
   the layer's queries, keys and values (RoPE applied) of every prompt token — padding removed, each
   sequence's tokens left-aligned (token ``i`` of sequence ``b`` at index ``i``, valid for
   ``i < lengths[b]``) — and gets back an :class:`Eviction` (or ``None``: keep everything);
3. :meth:`CompressionMethod.decode` once per layer per decoding step, after the step's attention,
   with the paged-attention probabilities of every cached slot (when :attr:`needs_decode_probs`) and
   each slot's original position, and gets back an :class:`Eviction` or ``None``.

Slots and positions: at prefill, slot ``i`` of a row holds prompt token ``i``, so kept indices are
token indices. After any compaction the slot order is no longer position order (the compaction op
fills holes from the tail); :attr:`DecodeInputs.positions` maps slots back to positions.

Ratios: ``keep_ratio`` is the fraction of tokens KEPT (the ShotKV paper's convention), in ``(0, 1]``.
A budget of ``keep_ratio`` over ``n`` tokens is :func:`budget_tokens`: ``ceil(keep_ratio * n)``,
at least 1 and at most ``n``, so ``keep_ratio = 1`` keeps everything.

Host syncs: budgets are computed on the host from host-known lengths, and :class:`Eviction` carries
the new per-row lengths whenever the method knows them without reading the device; the segment-level
methods (ShotKV, ChunkKV), whose kept count depends on which segments won, read one small count per
layer instead (``new_lengths=None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import _validate as V

Span = Tuple[int, int]


@dataclass
class GenerationInfo:
    """What a method learns once per generation (:meth:`CompressionMethod.begin`).

    Attributes
    ----------
    num_layers, batch_size, num_heads, num_kv_heads, head_dim : int
        Model geometry (``num_heads`` query heads, ``num_kv_heads`` kv heads).
    prompt_lengths : tuple of int
        Prompt tokens per sequence, padding excluded.
    shots : list (one per sequence) of lists of (start, end), or None
        Validated shot spans (indices into each unpadded prompt), see :mod:`kvpress_kernels.shots`.
    device : torch.device
    backend : str or None
        Backend forced on the ops (``None``: chosen by device).
    """

    num_layers: int
    batch_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    prompt_lengths: Tuple[int, ...]
    shots: Optional[List[List[Span]]] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None


@dataclass
class PrefillInputs:
    """One layer's prefill tensors, padding removed (see the module docstring).

    ``queries: [B, Hq, N, D]``, ``keys, values: [B, Hkv, N, D]`` (``N = max(prompt_lengths)``; entries at
    ``i >= lengths[b]`` are zeros), ``lengths: [B]`` int64 on the device (its host copy is
    ``info.prompt_lengths``), ``scale`` the attention logit scale of the layer.
    """

    layer: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    scale: float
    info: GenerationInfo
    #: ``queries[:, :, i]`` is prompt token ``query_offset + i``: a host that keeps only the last prompt
    #: queries (a serving engine saves the observation window) passes them with ``N - W`` here.
    query_offset: int = 0

    def query_rows(self, sel: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Queries of prompt tokens ``[start, end)`` of the sequences ``sel``: ``[len(sel), Hq, end - start, D]``,
        contiguous. A ``ValueError`` when the host did not keep them (``start < query_offset``)."""
        if start < self.query_offset:
            raise ValueError(f"this method needs the queries of prompt tokens {start}..{end - 1}, but only those "
                             f"from token {self.query_offset} on were given: save a longer query window")
        off = self.query_offset
        return self.queries.index_select(0, sel)[:, :, start - off:end - off].contiguous()


@dataclass
class DecodeInputs:
    """One layer's state after a decoding step (its new tokens are appended and attended).

    Attributes
    ----------
    layer : int
    generated : int
        Tokens generated so far per sequence, the ones of this step included.
    probs : Tensor ``[B, Hkv, S]`` float32 or None
        Attention probability of every slot from this step's queries, summed over the query heads of
        the kv head (and over the step's tokens); 0 beyond a row's length. Present only when the
        method sets :attr:`CompressionMethod.needs_decode_probs`.
    positions : Tensor ``[B, Hkv, S]`` int32
        Original position of each slot's token (prompt tokens ``0 .. prompt_len - 1``, then generated
        ones), ``-1`` beyond a row's length.
    lengths : Tensor ``[B, Hkv]`` int32 (device) and lengths_host : ndarray ``[B, Hkv]`` (host)
        Tokens held per row.
    seen_host : ndarray ``[B]``
        Tokens of each sequence so far (``prompt_len + generated``).
    """

    layer: int
    generated: int
    probs: Optional[torch.Tensor]
    positions: torch.Tensor
    lengths: torch.Tensor
    lengths_host: np.ndarray
    seen_host: np.ndarray
    info: GenerationInfo


@dataclass
class Eviction:
    """What a row keeps: ``kept_idx [B, Hkv, K]`` int32, per row the kept slots strictly ascending then
    ``-1``; ``new_lengths`` host ints ``[B, Hkv]`` (the number of kept slots) or ``None`` when only the
    device knows it (the cache then reads it)."""

    kept_idx: torch.Tensor
    new_lengths: Optional[np.ndarray] = None


class CompressionMethod:
    """Base class of the compression methods.

    Parameters
    ----------
    keep_ratio : float in (0, 1]
        Fraction of the prompt's tokens kept after prefill compression.

    Subclasses implement :meth:`prefill` and, if they compress while decoding, :meth:`decode`
    (setting :attr:`needs_decode_probs` when they want the decode attention probabilities).
    """

    #: Whether :meth:`decode` needs the decode-attention probabilities (costs ~10% of decode attention).
    needs_decode_probs: bool = False

    def __init__(self, keep_ratio: float = 0.5):
        self.keep_ratio = V.ratio("keep_ratio", keep_ratio)
        self.info: Optional[GenerationInfo] = None

    # -------------------------------------------------------------- the interface
    def begin(self, info: GenerationInfo) -> None:
        """Start a generation: remember ``info`` and drop any state of a previous one."""
        self.info = info

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        """Decide what each row of ``inputs.layer`` keeps after prefill; ``None`` keeps everything."""
        raise NotImplementedError

    def decode(self, inputs: DecodeInputs) -> Optional[Eviction]:
        """Decide what to evict after a decoding step; ``None`` (the default) evicts nothing."""
        return None

    def expected_keep_fraction(self) -> float:
        """Rough fraction of the prompt kept, used only to size the page pool up front (it grows
        if the guess is short)."""
        return self.keep_ratio

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self) -> Dict[str, object]:
        return {"keep_ratio": self.keep_ratio}


# ------------------------------------------------------------------------------------------------
# Helpers shared by the methods
# ------------------------------------------------------------------------------------------------

def to_device(x, device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Host data (list / ndarray) as a tensor on ``device``. On CUDA the copy goes through pinned memory
    and does not block: methods build small index/budget tensors every step, and a pageable copy would
    make the host wait for the device each time."""
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    if dtype is not None:
        t = t.to(dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def budget_tokens(keep_ratio: float, n: int) -> int:
    """``ceil(keep_ratio * n)`` clipped to ``[min(1, n), n]``.

    The product is rounded to 9 decimals first so that float noise (``0.3 * 10 = 3.0000000000000004``)
    does not add a token.
    """
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(round(keep_ratio * n, 9))))


def window_queries(q: torch.Tensor, lengths: Sequence[int], window: int) -> torch.Tensor:
    """The last ``window`` valid queries of each sequence: ``out[b, :, w] = q[b, :, lengths[b] - window + w]``.

    ``q: [B, Hq, N, D]`` left-aligned; every ``lengths[b] >= window``. Returns ``[B, Hq, window, D]``
    (contiguous), the layout :func:`~kvpress_kernels.ops.scoring.attention_mass` expects.
    """
    B, _, N, _ = q.shape
    if all(int(n) == N for n in lengths):
        return q[:, :, N - window:].contiguous()
    idx = to_device([[int(n) - window + w for w in range(window)] for n in lengths], q.device, torch.long)
    return torch.gather(q, 2, idx.view(B, 1, window, 1).expand(B, q.shape[1], window, q.shape[3])).contiguous()


def grouped_by_length(lengths: Sequence[int], extra: Optional[Sequence[int]] = None
                      ) -> List[Tuple[List[int], int, Optional[int]]]:
    """Group sequence indices by ``(length, extra)`` so that each group can be scored in one op call
    with every row fully valid (the scoring op takes one window size and one pooling end per call)."""
    groups: Dict[Tuple[int, Optional[int]], List[int]] = {}
    for b, n in enumerate(lengths):
        key = (int(n), None if extra is None else int(extra[b]))
        groups.setdefault(key, []).append(b)
    return [(idx, n, e) for (n, e), idx in groups.items()]


def scores_by_group(lengths: Sequence[int], windows: Sequence[int], n_out: int,
                    fn: Callable[[List[int], int, int], torch.Tensor]) -> torch.Tensor:
    """Run ``fn(batch_indices, length, window) -> [b_sub, ..., length]`` per group of sequences sharing
    (length, window) and scatter the results into a zero-initialised ``[B, ..., n_out]`` tensor."""
    out: Optional[torch.Tensor] = None
    for idx, n, w in grouped_by_length(lengths, windows):
        s = fn(idx, n, w)
        if out is None:
            out = s.new_zeros((len(lengths),) + tuple(s.shape[1:-1]) + (n_out,))
        index = to_device(idx, s.device, torch.long)
        out[index, ..., :n] = s
    assert out is not None
    return out


def kept_from_mask(mask: torch.Tensor, counts: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, np.ndarray]:
    """``kept_idx [R, K]`` (ascending, ``-1`` padded, ``K = max count``) of a keep mask ``[R, N]``.

    ``counts`` (host, ``[R]``) are the number of True per row when the caller knows them; otherwise
    they are read from the device (one small sync)."""
    R, N = mask.shape
    if counts is None:
        counts = mask.sum(-1).cpu().numpy().astype(np.int64)
    K = int(counts.max()) if R else 0
    # a stable sort of "not kept" puts the kept positions first, in ascending order
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :K]
    rank = torch.arange(K, device=mask.device).unsqueeze(0)
    cnt = to_device(counts, mask.device).unsqueeze(1)
    return torch.where(rank < cnt, order, -1).to(torch.int32), counts
