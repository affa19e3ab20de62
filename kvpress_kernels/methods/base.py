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
at least 1 and at most ``n``, so ``keep_ratio = 1`` keeps everything. ``budget_rounding="floor"``
(a method option) gives kvpress's ``max(1, int(n * keep_ratio))`` instead; with ``keep_ratio =
1 - compression_ratio`` computed in float that is bit for bit kvpress's ``int(n * (1 - compression_ratio))``.

Host conventions (kvpress's budgets, window padding, chunk counting, ...) are method options, never a
second implementation: each method's ``kvpress(compression_ratio, ...)`` constructor returns the method
with the options that reproduce kvpress 0.5.5 (docs/KVPRESS.md), and the kvpress presses run exactly
those objects.

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
    context_lengths : tuple of int, optional
        Question-aware prefill (the kvpress presses' ``question_ids``): only the first
        ``context_lengths[b]`` prompt tokens may be kept; the rest (a question appended to score the
        context with) takes part in the scoring and is then dropped. Budgets count context tokens.
        ``None`` (the default): every prompt token is a candidate. Methods that do not score with
        queries (or do not support it) raise in :meth:`CompressionMethod.begin`.
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
    context_lengths: Optional[Tuple[int, ...]] = None

    def keep_lengths(self) -> Tuple[int, ...]:
        """Tokens per sequence that may be kept (``context_lengths``, default ``prompt_lengths``)."""
        return self.prompt_lengths if self.context_lengths is None else self.context_lengths


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
    #: ``[B, Hq, N]`` fp32 or None: log-sum-exp of each query's causal attention logits (``scale`` applied),
    #: when the host's attention produced it for free (the transformers path on CPU, no padding). A method
    #: that scores with every query (H2O) passes it to the scoring op, which then skips its own LSE pass.
    lse: Optional[torch.Tensor] = None

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
        Tokens of each sequence so far (``prompt_len + extended + generated``).
    extended_host : ndarray ``[B]`` or None
        Prompt tokens fed after the compressed prefill (a later question, the next chat turn: prompt
        reuse), at positions ``prompt_len .. prompt_len + extended - 1``. They are prompt, not
        generated tokens: a decoding-phase policy never evicts them. ``None``: none.
    extended_ranges : ndarray ``[R, 2]`` or None
        Where they sit: position ranges ``[prompt_len + start, prompt_len + end)`` of each sequence, one
        per extension (a multi-turn session interleaves them with generated answers). ``None``: one
        range right after the prompt, ``extended_host`` long.
    """

    layer: int
    generated: int
    probs: Optional[torch.Tensor]
    positions: torch.Tensor
    lengths: torch.Tensor
    lengths_host: np.ndarray
    seen_host: np.ndarray
    info: GenerationInfo
    extended_host: Optional[np.ndarray] = None
    extended_ranges: Optional[np.ndarray] = None

    def prompt_host(self) -> np.ndarray:
        """``[B]`` prompt tokens per sequence, the extension included: positions below it are prompt."""
        base = np.asarray(self.info.prompt_lengths, dtype=np.int64)
        return base if self.extended_host is None else base + np.asarray(self.extended_host, dtype=np.int64)

    def extended_count(self) -> np.ndarray:
        """``[B]`` extended prompt tokens per sequence (0 without prompt reuse)."""
        return self.prompt_host() - np.asarray(self.info.prompt_lengths, dtype=np.int64)

    def extended_mask(self) -> torch.Tensor:
        """``[B, Hkv, S]`` bool: the slots holding extended prompt tokens (never evicted while decoding)."""
        pos = self.positions.long()
        base = np.asarray(self.info.prompt_lengths, dtype=np.int64)
        ranges = self.extended_ranges
        if ranges is None:
            ext = self.extended_count()
            ranges = np.asarray([[0, int(ext.max())]] if ext.size and ext.max() > 0 else [], dtype=np.int64)
        out = torch.zeros(pos.shape, dtype=torch.bool, device=pos.device)
        if len(ranges) == 0:
            return out
        rel = pos - to_device(base, pos.device).view(-1, 1, 1)
        for s, e in np.asarray(ranges).reshape(-1, 2):
            out |= (rel >= int(s)) & (rel < int(e)) & (pos >= 0)
        return out


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
    #: Whether the method supports :attr:`GenerationInfo.context_lengths` (question-aware prefill).
    supports_context_lengths: bool = False

    def __init__(self, keep_ratio: float = 0.5, *, budget_rounding: str = "ceil"):
        self.keep_ratio = V.ratio("keep_ratio", keep_ratio)
        self.budget_rounding = V.choice("budget_rounding", budget_rounding, BUDGET_ROUNDINGS)
        self.info: Optional[GenerationInfo] = None
        #: Per-generation facts the method reports (e.g. ShotKV's budget overruns); reset by :meth:`begin`.
        self.stats: Dict[str, object] = {}

    # -------------------------------------------------------------- the interface
    def begin(self, info: GenerationInfo) -> None:
        """Start a generation: remember ``info`` and drop any state of a previous one."""
        if info.context_lengths is not None and not self.supports_context_lengths:
            if tuple(info.context_lengths) != tuple(info.prompt_lengths):
                raise ValueError(f"{type(self).__name__} does not support context_lengths (question-aware "
                                 "prefill): it does not score with the question's queries")
        self.info = info
        self.stats = {}

    def budget(self, n: int, keep_ratio: Optional[float] = None) -> int:
        """Tokens kept out of ``n`` under this method's ``budget_rounding`` (:func:`budget_tokens`)."""
        return budget_tokens(self.keep_ratio if keep_ratio is None else keep_ratio, n, self.budget_rounding)

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        """Decide what each row of ``inputs.layer`` keeps after prefill; ``None`` keeps everything."""
        raise NotImplementedError

    def decode(self, inputs: DecodeInputs) -> Optional[Eviction]:
        """Decide what to evict after a decoding step; ``None`` (the default) evicts nothing."""
        return None

    def rebased(self, lengths: np.ndarray, extended: int) -> None:
        """The cache was re-compressed mid-session (:func:`kvpress_kernels.sessions.recompress`): its rows
        now hold ``lengths`` ``[layers, batch, kv_heads]`` tokens, everything so far counts as prompt, of
        which the last ``extended`` per row are prompt extension (the decoding phase's ``generated``
        restarts at 0). A method with per-layer state about what its prefill kept updates it here; the
        default has none."""
        return None

    def expected_keep_fraction(self) -> float:
        """Rough fraction of the prompt kept, used only to size the page pool up front (it grows
        if the guess is short)."""
        return self.keep_ratio

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self) -> Dict[str, object]:
        out: Dict[str, object] = {"keep_ratio": self.keep_ratio}
        if self.budget_rounding != "ceil":
            out["budget_rounding"] = self.budget_rounding
        return out


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


#: How a layer's budget is split over its kv heads: ``"uniform"`` (every head keeps the per-head budget ``n``)
#: or ``"adakv"`` (AdaKV, Feng et al. 2024: one exactly-``Hkv * n`` selection over the union of the layer's kv
#: heads' scores, every head keeping at least ``max(1, int(head_alpha * n))``; docs/METHODS.md "Per-head budgets").
HEAD_BUDGETS = ("uniform", "adakv")


def check_head_alpha(name: str, alpha) -> float:
    """The per-head floor fraction of ``head_budget="adakv"``: a float in ``[0, 1]``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(alpha).__name__}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (the per-head floor as a fraction of the average head "
                         f"budget), got {alpha}")
    return float(alpha)


def head_floor_tokens(n: int, alpha: float) -> int:
    """Per-head floor for an average head budget of ``n`` tokens: ``max(1, int(alpha * n))``, ``0`` when
    ``alpha = 0`` or ``n = 0`` (kvpress's ``n_safe``)."""
    if alpha == 0 or n <= 0:
        return 0
    return max(1, int(n * alpha))


def head_budget_eviction(scores: torch.Tensor, budgets: Sequence[int], lengths: torch.Tensor, *, alpha: float,
                         protect: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> Eviction:
    """AdaKV's selection for a layer whose rows keep ``budgets[b]`` tokens per kv head on average:
    ``Hkv * budgets[b]`` tokens over the union of the heads of sequence ``b`` (scores ``[B, Hkv, N]``, valid
    below ``lengths[b]``, ``protect [B, Hkv, N]`` or ``[B*Hkv, N]`` kept first), each head keeping at least
    :func:`head_floor_tokens` (:func:`~kvpress_kernels.ops.head_budget.select_head_budget`). The per-head
    lengths are known only on the device: ``new_lengths=None`` (the cache reads them once per layer)."""
    from ..ops.head_budget import select_head_budget

    B, Hkv, N = scores.shape
    dev = scores.device
    totals = [Hkv * int(b) for b in budgets]
    K = min(N, max(totals)) if totals else 0
    if protect is not None:
        protect = protect.reshape(B, Hkv, N)
    _, kept_idx, _ = select_head_budget(
        scores, to_device(totals, dev, torch.int64),
        floor=to_device([head_floor_tokens(int(b), alpha) for b in budgets], dev, torch.int64),
        lengths=lengths.to(torch.int64).view(B, 1).expand(B, Hkv), protect=protect, max_budget=K, backend=backend)
    return Eviction(kept_idx, None)


#: ``"ceil"``: ``ceil(keep_ratio * n)`` (ours: never below the asked fraction); ``"floor"``: kvpress's
#: ``int(n * keep_ratio)`` (truncation).
BUDGET_ROUNDINGS = ("ceil", "floor")


def budget_tokens(keep_ratio: float, n: int, rounding: str = "ceil") -> int:
    """Tokens kept out of ``n``, clipped to ``[min(1, n), n]``.

    ``rounding="ceil"``: ``ceil(keep_ratio * n)``, the product rounded to 9 decimals first so that float
    noise (``0.3 * 10 = 3.0000000000000004``) does not add a token. ``rounding="floor"``: kvpress's
    ``max(1, int(n * keep_ratio))`` exactly as kvpress computes it (no noise correction, so that a
    ``keep_ratio`` of ``1 - compression_ratio`` gives kvpress's count bit for bit).
    """
    if n <= 0:
        return 0
    if rounding == "floor":
        return min(n, max(1, int(n * keep_ratio)))
    return min(n, max(1, math.ceil(round(keep_ratio * n, 9))))


def window_queries(q: torch.Tensor, lengths: Sequence[int], window: int, offset: int = 0) -> torch.Tensor:
    """The last ``window`` valid queries of each sequence: ``out[b, :, w] = q[b, :, lengths[b] - window + w - offset]``.

    ``q: [B, Hq, N - offset, D]`` left-aligned, ``q[:, :, i]`` being prompt token ``offset + i`` (a serving
    engine keeps only the last queries: :attr:`PrefillInputs.query_offset`); every
    ``lengths[b] - window >= offset``. Returns ``[B, Hq, window, D]`` (contiguous), the layout
    :func:`~kvpress_kernels.ops.scoring.attention_mass` expects.
    """
    B, _, Nq, _ = q.shape
    if min(int(n) for n in lengths) - window < offset:
        raise ValueError(f"this method needs the last {window} queries of each prompt, but only those from token "
                         f"{offset} on were given: save a longer query window")
    if all(int(n) - offset == Nq for n in lengths):
        return q[:, :, Nq - window:].contiguous()
    idx = to_device([[int(n) - window + w - offset for w in range(window)] for n in lengths], q.device, torch.long)
    return torch.gather(q, 2, idx.view(B, 1, window, 1).expand(B, q.shape[1], window, q.shape[3])).contiguous()


#: LSE given to the window queries a row does not use: ``exp(logit - 1e30)`` is exactly 0, so they add
#: nothing to the mass (a finite value: the ops treat a non-finite LSE as "row sees no key").
_MASKED_LSE = 1e30


def window_mass(inputs: "PrefillInputs", windows: Sequence[int], head_reduce: str) -> torch.Tensor:
    """Attention mass each prompt key receives from the last ``windows[b]`` queries of its sequence,
    head-reduced, unpooled: ``[B, Hkv, N]`` (``group_*``) or ``[B, N]`` (``all_*``), 0 beyond lengths.

    One scoring launch for the whole (ragged) batch: the ops take per-row lengths, and rows whose window
    is shorter than the longest ``W`` get the LSE ``1e30`` on their first ``W - windows[b]`` queries, so
    those queries add exactly nothing (then the LSE pass and the mass pass are two op calls). Only a
    batch with a prompt shorter than ``W`` falls back to one call per (length, window) group."""
    from ..ops.scoring import attention_lse, attention_mass

    info = inputs.info
    lengths = [int(n) for n in info.prompt_lengths]
    B, N = inputs.keys.shape[0], inputs.keys.shape[2]
    W = max(int(w) for w in windows)
    backend = info.backend
    if min(lengths) >= W:
        q = window_queries(inputs.queries, lengths, W, inputs.query_offset)
        full = all(n == N for n in lengths)
        rows = None if full else inputs.lengths
        lse = None
        if any(int(w) != W for w in windows):
            lse = attention_lse(q, inputs.keys, lengths=rows, scale=inputs.scale, causal=True, backend=backend)
            unused = to_device([[w_ < W - int(w) for w_ in range(W)] for w in windows], q.device)  # [B, W]
            lse = lse.masked_fill(unused.view(B, 1, W), _MASKED_LSE)
        return attention_mass(q, inputs.keys, lengths=rows, scale=inputs.scale, lse=lse, causal=True,
                              head_reduce=head_reduce, backend=backend)

    def score(idx, n, w):
        sel = to_device(idx, inputs.keys.device, torch.long)
        q = inputs.query_rows(sel, n - w, n)
        k = inputs.keys.index_select(0, sel)[:, :, :n]
        return attention_mass(q, k, scale=inputs.scale, causal=True, head_reduce=head_reduce, backend=backend)

    return scores_by_group(lengths, windows, N, score)


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
