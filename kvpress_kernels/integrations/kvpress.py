"""kvpress presses whose scores and selections are computed by kvpress-kernels' ops.

Drop-in replacements for NVIDIA kvpress's presses (DESIGN.md §7): they plug into kvpress's
``pipeline("kv-press-text-generation")`` and its ``with press(model):`` context manager, take
kvpress's ``compression_ratio`` (the fraction of tokens REMOVED, not our ``keep_ratio``), and keep
exactly the tokens kvpress's own press keeps on the same model and input. Scoring runs through
:func:`~kvpress_kernels.ops.scoring.attention_mass` / :func:`~kvpress_kernels.ops.scoring.token_norm`,
chunk and shot scores through :func:`~kvpress_kernels.ops.segments.segment_reduce`, and every
choice of kept tokens or segments through :func:`~kvpress_kernels.ops.selection.select_topk` /
:func:`~kvpress_kernels.ops.selection.select_segments`.

===========================  =====================================================================
press                        kvpress equivalent (same kept tokens, same cache contents)
===========================  =====================================================================
:class:`SnapKVPress`         ``kvpress.SnapKVPress``
:class:`PyramidKVPress`      ``kvpress.PyramidKVPress``
:class:`StreamingLLMPress`   ``kvpress.StreamingLLMPress``
:class:`KnormPress`          ``kvpress.KnormPress``
:class:`ObservedAttentionPress`  ``kvpress.ObservedAttentionPress`` (needs no eager attention here)
:class:`ChunkKVPress`        ``kvpress.ChunkKVPress``
:class:`ShotKVPress`         none: ShotKV (Liu et al. 2025), shot-level selection
===========================  =====================================================================

Order of the cache: kvpress gathers ``scores.topk(n).indices``, i.e. in score order; these presses
keep the kept tokens in their original POSITION order (``select_topk``'s ``kept_idx``). The set of
cached (key, value) pairs is the same; attention does not depend on their order (RoPE is already
applied to cached keys).

Question-aware scoring: kvpress's pipeline compresses the context before the question is seen, so
window scoring (SnapKV, PyramidKV, ChunkKV over SnapKV, ShotKV) only sees the end of the context.
Give ``question_ids`` (see :func:`pipeline_question_ids`) and the prefill forward runs on
``context + question``: the last ``window_size`` queries of that sequence score the context, then the
question's keys and values are dropped from the cache, so the pipeline can ask the question as usual.

Quirks of kvpress that are reproduced on purpose, and where results may legitimately differ, are
listed in ``docs/KVPRESS.md``.

kvpress is an optional dependency: ``pip install kvpress-kernels[kvpress]``.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

try:
    from kvpress.presses.base_press import BasePress
    from kvpress.presses.scorer_press import ScorerPress
    from kvpress.utils import get_prerope_query_states
except ImportError as exc:  # kvpress is optional
    raise ImportError(
        "kvpress_kernels.integrations.kvpress needs the optional dependency kvpress; install it with "
        "`pip install kvpress-kernels[kvpress]` (or `pip install kvpress`)"
    ) from exc

from .. import shots as _shots
from .._backend import BACKENDS
from ..ops.scoring import attention_mass, token_norm
from ..ops.segments import segment_reduce, segments_to_token_mask
from ..ops.selection import select_segments, select_topk

logger = logging.getLogger(__name__)

__all__ = [
    "SnapKVPress",
    "PyramidKVPress",
    "StreamingLLMPress",
    "KnormPress",
    "ObservedAttentionPress",
    "ChunkKVPress",
    "ShotKVPress",
    "pipeline_question_ids",
    "n_kept",
]


# --------------------------------------------------------------------------------------------------
# Small shared pieces
# --------------------------------------------------------------------------------------------------

def n_kept(n_tokens: int, compression_ratio: float) -> int:
    """Tokens kept per row by kvpress's ScorerPress: ``max(1, int(n_tokens * (1 - compression_ratio)))``.

    Truncation (not rounding) and the floor of 1 are kvpress's (``kvpress.utils.compute_n_kept``).
    """
    return max(1, int(n_tokens * (1 - compression_ratio)))


def _check_ratio(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1) (the fraction of tokens REMOVED), got {type(v).__name__}")
    v = float(v)
    if not (0.0 <= v < 1.0):
        raise ValueError(f"{name} must be in [0, 1) (kvpress convention: the fraction of tokens REMOVED), got {v}")
    return v


def _check_int(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def _check_backend(v) -> None:
    if v is not None and v not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {v!r}")


def _check_question_ids(v) -> None:
    if v is None:
        return
    if isinstance(v, torch.Tensor):
        if v.dtype.is_floating_point or v.dtype == torch.bool or v.dim() not in (1, 2) or v.shape[-1] == 0:
            raise ValueError("question_ids must be a non-empty integer tensor [Nq] or [B, Nq] (token ids), "
                             f"got dtype {v.dtype} and shape {list(v.shape)}")
        return
    if isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return
    raise TypeError("question_ids must be a list of token ids or an integer tensor [Nq] / [B, Nq], "
                    f"got {type(v).__name__}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _queries(module: nn.Module, hidden_states: torch.Tensor, position_embeddings, last: int) -> torch.Tensor:
    """Post-RoPE queries ``[B, Hq, last, D]`` of the last ``last`` tokens of ``hidden_states``.

    Same projection (kvpress's ``get_prerope_query_states``, which knows Phi3's fused qkv and
    Qwen3/Gemma3's q-norm) and the same RoPE expression as kvpress's SnapKV, so that the scores match
    kvpress's to the last bit wherever the reduction order allows."""
    q = get_prerope_query_states(module, hidden_states[:, -last:])
    cos, sin = position_embeddings
    cos = cos[:, -last:].unsqueeze(1)
    sin = sin[:, -last:].unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin)


def _gather(keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep positions ``idx`` (``[B, H or 1, K]``, int) of every row of the cache, in the given order."""
    B, H = keys.shape[:2]
    idx = idx.long().expand(B, H, idx.shape[-1])
    k = keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])).contiguous()
    v = values.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1])).contiguous()
    return k, v


def _language_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None:
        raise ValueError(f"model must be a transformers *ForCausalLM with a .model attribute, got {type(model).__name__}")
    return inner.language_model if hasattr(inner, "language_model") else inner


class _PrefillAware:
    """Mixin: question-aware prefill (``question_ids``) and per-forward state of the prefill.

    When the press needs it (``question_ids`` given, or ShotKV finding shots from the text), entering
    ``press(model)`` also hooks the language model itself: a forward pre-hook sees the prefill's
    ``input_ids`` (it appends the question to them when ``question_ids`` is set) and records the
    context length; the attention-layer hooks then score with every token and keep only context
    tokens. The state lives only for the duration of one prefill forward."""

    _prefill_state: Optional[dict] = None

    # presses with a ``question_ids`` field override nothing; wrappers redirect to their inner press
    def _question_ids_source(self):
        return getattr(self, "question_ids", None)

    def _needs_model_hook(self) -> bool:
        return self._question_ids_source() is not None

    def _share_prefill_state(self, state: Optional[dict]) -> None:
        self._prefill_state = state

    def _context_length(self, keys: torch.Tensor) -> int:
        """Tokens of the cache that belong to the context (the rest is the appended question)."""
        st = self._prefill_state
        if st is None or st["n_question"] == 0:
            return keys.shape[2]
        if keys.shape[2] != st["n_context"] + st["n_question"]:
            raise RuntimeError(
                f"question-aware prefill expected {st['n_context']} context + {st['n_question']} question tokens "
                f"in the cache, found {keys.shape[2]}: the cache must be empty when the prefill starts")
        return st["n_context"]

    def _question_tensor(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        q = self._question_ids_source()
        if q is None:
            return None
        q = torch.as_tensor(q, dtype=torch.long, device=device)
        if q.dim() == 1:
            q = q.unsqueeze(0)
        if q.shape[0] == 1:
            q = q.expand(batch, -1)
        elif q.shape[0] != batch:
            raise ValueError(f"question_ids must have 1 or {batch} rows (the batch size), got {q.shape[0]}")
        return q

    def _before_prefill(self, module: nn.Module, args: tuple, kwargs: dict):
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            self._share_prefill_state(None)  # a decoding step: kvpress compresses only the prefill
            return None
        args = list(args)
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            return None
        B, n_ctx = x.shape[0], x.shape[1]
        state = {"n_context": n_ctx, "n_question": 0, "input_ids": ids}
        qids = self._question_tensor(B, x.device)
        if qids is not None:
            if len(args) > 1:
                raise ValueError("question_ids: pass the model's inputs as keyword arguments "
                                 "(only input_ids may be positional)")
            nq = qids.shape[1]
            state["n_question"] = nq
            if ids is not None:
                full = torch.cat([ids, qids.to(ids.dtype)], dim=1)
                if "input_ids" in kwargs or not args:
                    kwargs["input_ids"] = full
                else:
                    args[0] = full
            else:
                kwargs["inputs_embeds"] = torch.cat([embeds, module.embed_tokens(qids).to(embeds.dtype)], dim=1)
            mask = kwargs.get("attention_mask")
            if mask is not None:
                if mask.dim() != 2:
                    raise ValueError("question_ids supports a 2-D attention_mask [B, N] only, "
                                     f"got shape {list(mask.shape)}")
                kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(B, nq)], dim=1)
            for key in ("position_ids", "cache_position"):
                pos = kwargs.get(key)
                if pos is not None:
                    step = torch.arange(1, nq + 1, device=pos.device, dtype=pos.dtype)
                    kwargs[key] = torch.cat([pos, pos[..., -1:] + step], dim=-1)
        self._share_prefill_state(state)
        return tuple(args), kwargs

    def _after_prefill(self, module, args, kwargs, output):
        self._share_prefill_state(None)
        return None

    @contextmanager
    def __call__(self, model):
        handles = []
        if self._needs_model_hook():
            lm = _language_model(model)
            handles.append(lm.register_forward_pre_hook(self._before_prefill, with_kwargs=True))
            handles.append(lm.register_forward_hook(self._after_prefill, with_kwargs=True))
        try:
            with super().__call__(model):
                yield
        finally:
            for h in handles:
                h.remove()
            self._share_prefill_state(None)


class _KernelScorerPress(_PrefillAware, ScorerPress):
    """Base of the token-level presses: ``score`` (kvpress's contract, ``[B, Hkv, N]``, higher = keep)
    computed by our ops, then per-(sequence, kv-head) top-k with :func:`select_topk`, kept in
    position order. Subclasses of kvpress's ``ScorerPress``, so kvpress's own wrappers (ChunkKV,
    AdaKV, ...) can use their ``score`` too."""

    def __post_init__(self):
        _check_ratio("compression_ratio", self.compression_ratio)
        _check_backend(getattr(self, "backend", None))
        _check_question_ids(getattr(self, "question_ids", None))

    def _budget(self, module: nn.Module, n_context: int) -> int:
        return n_kept(n_context, self.compression_ratio)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        cr = _check_ratio("compression_ratio", self.compression_ratio)
        n_ctx = self._context_length(keys)
        if cr == 0:
            return keys[:, :, :n_ctx], values[:, :, :n_ctx]
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        B, H = scores.shape[:2]
        budget = self._budget(module, n_ctx)
        _, kept_idx = select_topk(scores[..., :n_ctx].reshape(B * H, n_ctx), budget, backend=self.backend)
        return _gather(keys, values, kept_idx.view(B, H, -1))


# --------------------------------------------------------------------------------------------------
# Token-level presses
# --------------------------------------------------------------------------------------------------

@dataclass
class SnapKVPress(_KernelScorerPress):
    """SnapKV (Li et al. 2024) with kvpress's scoring, computed by :func:`attention_mass`.

    Score of key ``j < N - W`` for kv head ``h`` (kvpress's formula)::

        s[b, h, j] = avgpool_k( mean_{g in group(h)} (1/W) sum_w softmax_j(q_w . k_j / sqrt(D)) )

    with the last ``W = window_size`` queries (causal), average pooling over the keys before the
    window (``F.avg_pool1d`` semantics, zero padding), and the window's own keys scored
    ``max(s) + 1`` (the max over the whole batch, as kvpress does) so that they are kept whenever
    the budget allows. Keeps ``max(1, int(N * (1 - compression_ratio)))`` keys per (sequence, kv head).

    Parameters
    ----------
    compression_ratio : float in [0, 1)
        Fraction of the context's tokens REMOVED (kvpress's convention).
    window_size : int
        Observation-window queries (kvpress default 64); the prompt must be longer.
    kernel_size : int, odd
        Average-pooling width (kvpress default 5).
    question_ids : list of int or int tensor ``[Nq]`` / ``[B, Nq]``, optional
        Question-aware mode (module docstring): score with the question appended to the context.
    backend : {"reference", "triton", "cuda"}, optional
        Force the ops' implementation (default: by device, see :mod:`kvpress_kernels._backend`).
    """

    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5
    question_ids: Any = None
    backend: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        _check_int("window_size", self.window_size, 1)
        _check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            # kvpress's avg_pool1d(padding=k//2) then returns N - W + 1 scores and fails to reshape
            raise ValueError(f"kernel_size must be odd (a centred pooling window), got {self.kernel_size}")

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        B, Hkv, N, D = keys.shape
        W = self.window_size
        if hidden_states.shape[1] <= W:
            raise ValueError(f"window_size ({W}) must be smaller than the number of prompt tokens "
                             f"({hidden_states.shape[1]}), as in kvpress's SnapKV")
        q = _queries(module, hidden_states, kwargs["position_embeddings"], W)
        # kvpress divides the logits by sqrt(head_dim) (not the module's own scaling)
        mass = attention_mass(q, keys, scale=1.0 / math.sqrt(D), causal=True, head_reduce="group_mean",
                              pool="avg", pool_size=self.kernel_size, pool_end=N - W, backend=self.backend)
        scores = mass[..., : N - W] / W
        # kvpress pads the window with scores.max() + 1 over the whole batch; amax keeps it on the
        # device (no .item() sync) and fp32 max + 1 rounds exactly as kvpress's float max + 1 does.
        pad = (scores.amax() + 1).expand(B, Hkv, W)
        return torch.cat([scores, pad], dim=-1)


@dataclass
class PyramidKVPress(SnapKVPress):
    """PyramidKV (Cai et al. 2024): SnapKV scores, per-layer budgets shrinking linearly with depth.

    Budget of layer ``l`` of ``L`` for ``N`` context tokens and ``r = compression_ratio`` (kvpress's
    rule, same total as SnapKV on average): with ``kept = N (1 - r)``, ``lo = kept / beta`` and
    ``hi = 2 kept - lo`` (if ``hi >= N - W``: ``hi = N - W``, ``lo = 2 kept - hi``), the budget is
    ``round(hi - l (hi - lo) / (L - 1))``; when not ``N >= hi >= lo >= W`` it falls back to SnapKV's
    ``max(1, round(kept))``.

    Parameters
    ----------
    beta : int >= 1
        Steepness of the pyramid (kvpress default 20). Others as :class:`SnapKVPress`.
    """

    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5
    question_ids: Any = None
    backend: Optional[str] = None
    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        _check_int("beta", self.beta, 1)

    def layer_budget(self, layer_idx: int, num_layers: int, n_context: int) -> int:
        """Tokens kept by layer ``layer_idx`` (see the class docstring)."""
        W, r = self.window_size, self.compression_ratio
        # The float operations follow kvpress's order exactly (window added then subtracted again),
        # because ``round`` of a value at .5 could otherwise go the other way.
        capacity = W + n_context * (1 - r)
        lo = (capacity - W) / self.beta
        hi = (capacity - W) * 2 - lo
        if hi >= n_context - W:
            hi = n_context - W
            lo = (capacity - W) * 2 - hi
        if not (n_context >= hi >= lo >= W):
            return max(1, round(n_context * (1 - r)))
        step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
        return round(hi - layer_idx * step)

    def _budget(self, module, n_context):
        return self.layer_budget(module.layer_idx, module.config.num_hidden_layers, n_context)


@dataclass
class StreamingLLMPress(_KernelScorerPress):
    """StreamingLLM (Xiao et al. 2023): keep the first ``n_sink`` tokens and the most recent ones.

    Keeps ``n = max(1, int(N * (1 - compression_ratio)))`` tokens: ``[0, n_sink)`` and the last
    ``n - n_sink`` (kvpress's choice), selected by :func:`select_topk` with ``sink`` / ``recent``.
    ``score`` returns kvpress's 0/1 scores so that wrappers (ChunkKV) see the same numbers.

    Parameters
    ----------
    n_sink : int >= 0
        Attention-sink tokens always kept (kvpress default 4); the context must be longer.
    """

    compression_ratio: float = 0.0
    n_sink: int = 4
    backend: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        _check_int("n_sink", self.n_sink, 0)

    def _check_len(self, n: int) -> None:
        if n <= self.n_sink:
            raise ValueError(f"n_sink ({self.n_sink}) must be smaller than the number of context tokens ({n}), "
                             "as in kvpress's StreamingLLM")

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        N = keys.shape[2]
        self._check_len(N)
        n_pruned = N - int(N * (1 - self.compression_ratio))
        pos = torch.arange(N, device=keys.device)
        pruned = (pos >= self.n_sink) & (pos < self.n_sink + n_pruned)
        return (~pruned).to(keys.dtype).expand(keys.shape[0], keys.shape[1], N)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        cr = _check_ratio("compression_ratio", self.compression_ratio)
        N = self._context_length(keys)
        if cr == 0:
            return keys, values
        self._check_len(N)
        B, H = keys.shape[:2]
        n = n_kept(N, cr)
        sink = min(self.n_sink, n)
        zeros = keys.new_zeros((B * H, N), dtype=torch.float32)
        _, kept_idx = select_topk(zeros, n, sink=sink, recent=n - sink, backend=self.backend)
        return _gather(keys, values, kept_idx.view(B, H, -1))


@dataclass
class KnormPress(_KernelScorerPress):
    """KNorm (Devoto et al. 2024): keep the keys of smallest L2 norm, ``score = -token_norm(keys)``
    (fp32, like kvpress)."""

    compression_ratio: float = 0.0
    backend: Optional[str] = None

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return -token_norm(keys)


@dataclass
class ObservedAttentionPress(_KernelScorerPress):
    """H2O-style accumulated attention (kvpress's ObservedAttentionPress) WITHOUT eager attention.

    kvpress needs ``attn_implementation="eager"`` to get the full ``[B, Hq, N, N]`` attention matrix;
    here the same score comes from :func:`attention_mass` with every prompt query under the causal
    mask, which never materialises that matrix, so any attention implementation works::

        s[b, h, j] = mean_{g in group(h)} (1 / (N - j)) sum_{i >= j} softmax_j(q_i . k_j * scaling)

    (``N - j`` queries see key ``j``; ``scaling`` is the attention module's own, as in eager attention).
    """

    compression_ratio: float = 0.0
    backend: Optional[str] = None

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        N = keys.shape[2]
        q = _queries(module, hidden_states, kwargs["position_embeddings"], N)
        scale = getattr(module, "scaling", 1.0 / math.sqrt(keys.shape[-1]))
        mass = attention_mass(q, keys, scale=scale, causal=True, head_reduce="group_mean", backend=self.backend)
        seen_by = torch.arange(N, 0, -1, device=keys.device, dtype=mass.dtype)
        return mass / seen_by


# --------------------------------------------------------------------------------------------------
# Segment-level presses
# --------------------------------------------------------------------------------------------------

@dataclass
class ChunkKVPress(_PrefillAware, BasePress):
    """ChunkKV (Liu et al. 2025): keep whole fixed-length chunks, chosen by the inner press's scores.

    kvpress's rule: token scores ``press.score(...)`` summed over kv heads, averaged per chunk of
    ``chunk_length`` (the last, partial chunk averaged over its own tokens); the
    ``max(1, int(n_chunks * (1 - compression_ratio)))`` best chunks are kept (top-k by
    :func:`select_topk`, chunks by :func:`segment_reduce`), in position order, for every head.
    Reproduced kvpress quirks: the chunks chosen for batch item 0 are applied to the whole batch, and
    a context shorter than one chunk falls back to the inner press's own token-level compression.

    Parameters
    ----------
    press : kvpress ``ScorerPress``
        The scorer, typically :class:`SnapKVPress` (or any kvpress scorer). Its ``compression_ratio``
        is the ratio used; its ``question_ids`` (if any) make the chunk selection question-aware.
    chunk_length : int
        Tokens per chunk (kvpress default 20).
    backend : optional, as :class:`SnapKVPress` (for the chunk reduction and selection).
    """

    press: Any = None
    chunk_length: int = 20
    backend: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.press, ScorerPress):
            raise TypeError(f"press must be a kvpress ScorerPress (e.g. SnapKVPress), got {type(self.press).__name__}")
        _check_int("chunk_length", self.chunk_length, 1)
        _check_backend(self.backend)

    def post_init_from_model(self, model):
        self.press.post_init_from_model(model)

    @property
    def compression_ratio(self):
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value):
        self.press.compression_ratio = value

    def _question_ids_source(self):
        return getattr(self.press, "question_ids", None)

    def _share_prefill_state(self, state):
        self._prefill_state = state
        if isinstance(self.press, _PrefillAware):
            self.press._share_prefill_state(state)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        cr = _check_ratio("compression_ratio", self.press.compression_ratio)
        n_ctx = self._context_length(keys)
        if cr == 0:
            return keys[:, :, :n_ctx], values[:, :, :n_ctx]
        L = self.chunk_length
        n_full, rest = divmod(n_ctx, L)
        if n_full == 0:
            return self.press.compress(module, hidden_states, keys, values, attentions, kwargs)
        scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs)[..., :n_ctx]
        per_token = scores.sum(dim=1)                                    # [B, n_ctx], over kv heads
        chunk_scores = segment_reduce(per_token, chunk_size=L, reduce="mean", backend=self.backend)
        n_chunks = n_full + (rest > 0)
        keep_n = max(1, int(n_chunks * (1 - cr)))
        # kvpress quirk: batch item 0 chooses for everyone
        keep_chunks, _ = select_topk(chunk_scores[:1], keep_n, backend=self.backend)
        keep_tokens = segments_to_token_mask(keep_chunks, n_tokens=n_ctx, chunk_size=L)
        # The kept count depends on whether the partial chunk is chosen, so the cache's new shape is
        # data-dependent: one host sync here, as in kvpress.
        idx = keep_tokens[0].nonzero().view(1, 1, -1)
        return _gather(keys, values, idx)


@dataclass
class ShotKVPress(_PrefillAware, BasePress):
    """ShotKV prefill compression (Liu et al. 2025, "Can LLMs Maintain Fundamental Abilities under
    KV Cache Compression?"): keep or drop whole few-shot exemplars ("shots").

    Per layer: token score ``t[b, j] = sum_h sum_w softmax_j(q_w . k_j * scaling)`` over the last
    ``window_size`` queries and ALL query heads (:func:`attention_mass`, ``head_reduce="all_sum"``);
    shot score = mean of ``t`` over the shot's tokens (:func:`segment_reduce`); budget
    ``n_kept(N_context, compression_ratio)`` = ``max(1, int(N (1 - compression_ratio)))`` tokens.
    Protected tokens count first: every token outside the shots (instruction, separators, question),
    and every shot that reaches into the observation window (kept whole). The other shots are then
    kept whole, best score first, while they fit (a shot that does not fit is skipped and smaller
    ones may still fit; :func:`select_segments` ``policy="skip"``). One kept set per sequence, the
    same for all heads of the layer. When protected tokens alone exceed the budget, only they are kept.

    Batches: kvpress caches are rectangular, so every sequence must keep the same number of tokens;
    sequences that kept fewer than the largest are topped up with their best-scoring remaining
    tokens (:func:`select_topk` with the kept shots protected).

    Shots are given either as token spans ``shots=[(start, end), ...]`` (half-open, into the context
    the model sees; one list shared by every sequence, or one list per sequence) or found at prefill
    time with ``shot_pattern`` (a regex matching one whole shot, :func:`kvpress_kernels.shots.find_shots`)
    and ``tokenizer``: the context ids are decoded, the text is re-tokenized with offsets (which must
    reproduce the ids) and each match becomes a span. The pattern mode is what works through
    kvpress's pipeline, whose chat template shifts token positions.

    Parameters
    ----------
    compression_ratio : float in [0, 1)
        Fraction of the context REMOVED (kvpress convention; ShotKV's keep ratio is ``1 - this``).
    window_size : int
        Observation-window queries (default 64); the prompt (plus question) must be longer.
    shots, shot_pattern, tokenizer : see above; exactly one of ``shots`` / ``shot_pattern``.
    question_ids : optional, question-aware scoring as in :class:`SnapKVPress` (recommended: ShotKV
        ranks shots by how much the question attends to them).
    backend : optional, as :class:`SnapKVPress`.
    """

    compression_ratio: float = 0.0
    window_size: int = 64
    shots: Any = None
    shot_pattern: Any = None
    tokenizer: Any = None
    question_ids: Any = None
    backend: Optional[str] = None

    def __post_init__(self):
        _check_ratio("compression_ratio", self.compression_ratio)
        _check_int("window_size", self.window_size, 1)
        _check_backend(self.backend)
        _check_question_ids(self.question_ids)
        if (self.shots is None) == (self.shot_pattern is None):
            raise ValueError("ShotKVPress needs exactly one of shots (token spans) and shot_pattern (a regex), "
                             f"got shots={'None' if self.shots is None else 'given'}, shot_pattern={self.shot_pattern!r}")
        if self.shot_pattern is not None and self.tokenizer is None:
            raise ValueError("shot_pattern needs tokenizer (a fast Hugging Face tokenizer) to map the text to tokens")
        if self.shots is not None and (isinstance(self.shots, (str, bytes)) or not hasattr(self.shots, "__len__")):
            raise TypeError(f"shots must be a list of (start, end) token spans or one such list per sequence, "
                            f"got {type(self.shots).__name__}")

    def _needs_model_hook(self) -> bool:
        return True  # the pre-hook records the context ids (pattern mode) and length (question mode)

    def _spans(self, B: int, n_ctx: int) -> list:
        """Validated shot spans per sequence (computed once per prefill, shared by the layers)."""
        st = self._prefill_state
        if st is not None and "spans" in st:
            return st["spans"]
        if self.shots is not None:
            shots = self.shots.tolist() if hasattr(self.shots, "tolist") else self.shots
            flat = len(shots) == 0 or _shots._is_span(shots[0])
            if flat and B > 1:
                shots = [shots] * B  # kvpress batches are unpadded: shared spans index every sequence
            spans = _shots.normalize_batch_shots(shots, [n_ctx] * B)
        else:
            ids = None if st is None else st.get("input_ids")
            if ids is None:
                raise ValueError("shot_pattern needs the prefill's input_ids (not inputs_embeds) to find the shots")
            spans = [self._find_spans(ids[b, :n_ctx]) for b in range(B)]
            if not any(spans):
                logger.warning("ShotKVPress: shot_pattern %r matched no shot in the context; nothing is "
                               "compressed (every token is protected)", self.shot_pattern)
        if st is not None:
            st["spans"] = spans
        return spans

    def _find_spans(self, ids: torch.Tensor) -> list:
        tok = self.tokenizer
        ids_list = ids.tolist()
        text = tok.decode(ids_list, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        again = tok(text, add_special_tokens=False)["input_ids"]
        if again != ids_list:
            raise ValueError("shot_pattern: re-tokenizing the decoded context does not reproduce its token ids "
                             "(this tokenizer does not round-trip), so token offsets are unreliable; "
                             "give the shots as token spans instead")
        return _shots.find_shots(text, tok, self.shot_pattern, add_special_tokens=False)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        cr = _check_ratio("compression_ratio", self.compression_ratio)
        n_ctx = self._context_length(keys)
        if cr == 0:
            return keys[:, :, :n_ctx], values[:, :, :n_ctx]
        B, _, N, D = keys.shape
        W = self.window_size
        if hidden_states.shape[1] <= W:
            raise ValueError(f"window_size ({W}) must be smaller than the number of prompt tokens "
                             f"({hidden_states.shape[1]})")
        spans = self._spans(B, n_ctx)
        dev = keys.device

        q = _queries(module, hidden_states, kwargs["position_embeddings"], W)
        scale = getattr(module, "scaling", 1.0 / math.sqrt(D))
        tok = attention_mass(q, keys, scale=scale, causal=True, head_reduce="all_sum",
                             backend=self.backend)[:, :n_ctx].contiguous()       # [B, n_ctx]
        budget = n_kept(n_ctx, cr)

        S = max(len(s) for s in spans)
        if S == 0:
            keep = torch.ones((B, n_ctx), dtype=torch.bool, device=dev)  # nothing is a shot: all protected
        else:
            # pad with empty spans at the end (sorted, size 0: they change nothing)
            table = torch.full((B, S, 2), n_ctx, dtype=torch.int64)
            for b, sp in enumerate(spans):
                if sp:
                    table[b, : len(sp)] = torch.tensor(sp, dtype=torch.int64)
            table = table.to(dev)
            sizes = table[..., 1] - table[..., 0]
            window_start = N - W                                          # first window position
            protect_shot = (table[..., 1] > window_start) & (sizes > 0)   # reaches into the window
            shot_scores = segment_reduce(tok, spans=table, reduce="mean", backend=self.backend)
            all_shots = torch.ones((B, S), dtype=torch.bool, device=dev)
            in_shot = segments_to_token_mask(all_shots, n_tokens=n_ctx, spans=table)
            n_outside = n_ctx - in_shot.sum(1)
            protected = torch.where(protect_shot, sizes, 0).sum(1) + n_outside
            # protected tokens count first; if they alone exceed the budget they are all kept anyway
            seg_budget = torch.clamp(budget - n_outside, min=0)
            seg_budget = torch.maximum(seg_budget, protected - n_outside)
            seg_keep = select_segments(shot_scores, sizes, seg_budget, policy="skip", protect=protect_shot,
                                       backend=self.backend)
            keep = ~in_shot | segments_to_token_mask(seg_keep, n_tokens=n_ctx, spans=table)
        # one rectangular cache: top every sequence up to the largest kept count with its best tokens
        K = int(keep.sum(1).max())
        _, kept_idx = select_topk(tok, K, protect=keep, backend=self.backend)
        return _gather(keys, values, kept_idx.view(B, 1, K))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def pipeline_question_ids(pipe, question: str, *, answer_prefix: str = "", enable_thinking: bool = False) -> torch.Tensor:
    """Token ids ``[1, Nq]`` that kvpress's ``kv-press-text-generation`` pipeline ``pipe`` will feed
    after the context for ``question`` (chat-template suffix and ``answer_prefix`` included), for the
    ``question_ids`` option of the question-aware presses::

        q = "What is the capital of France?"
        press = SnapKVPress(compression_ratio=0.5, question_ids=pipeline_question_ids(pipe, q))
        pipe(context, question=q, press=press)
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    out = pipe.preprocess(context="", questions=[question], answer_prefix=answer_prefix,
                          max_context_length=int(1e10), enable_thinking=enable_thinking)
    return out["questions_ids"][0]
