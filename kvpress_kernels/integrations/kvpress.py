"""kvpress presses that are adapters over :mod:`kvpress_kernels.methods` (DESIGN.md §7, "one method layer").

Drop-in replacements for NVIDIA kvpress's presses: they plug into kvpress's
``pipeline("kv-press-text-generation")`` and its ``with press(model):`` context manager, take
kvpress's ``compression_ratio`` (the fraction of tokens REMOVED, not our ``keep_ratio``), and keep
exactly the tokens kvpress's own press keeps on the same model and input. This module is hook
plumbing only: each press builds the layer's :class:`~kvpress_kernels.methods.PrefillInputs` from
kvpress's forward hook and runs the :class:`~kvpress_kernels.methods.CompressionMethod` that
:func:`kvpress_kernels.compress` runs too, configured by the method's ``kvpress(compression_ratio)``
constructor (kvpress's budget rounding, window padding, chunk counting, ... as explicit options);
then it gathers the kept tokens. No selection or budget rule lives here.

===========================  ==============================  =========================================
press                        kvpress equivalent              method it runs
===========================  ==============================  =========================================
:class:`SnapKVPress`         ``kvpress.SnapKVPress``         ``SnapKV.kvpress``
:class:`PyramidKVPress`      ``kvpress.PyramidKVPress``      ``PyramidKV.kvpress``
:class:`StreamingLLMPress`   ``kvpress.StreamingLLMPress``   ``StreamingLLM.kvpress``
:class:`KnormPress`          ``kvpress.KnormPress``          ``KNorm.kvpress``
:class:`ObservedAttentionPress`  ``kvpress.ObservedAttentionPress`` (no eager attention needed)  ``H2O.kvpress``
:class:`ChunkKVPress`        ``kvpress.ChunkKVPress``        ``ChunkKV.kvpress(scorer=<inner method>)``
:class:`ShotKVPress`         none                            ``ShotKV`` (its own defaults)
===========================  ==============================  =========================================

Order of the cache: kvpress gathers ``scores.topk(n).indices``, i.e. in score order; these presses
keep the kept tokens in their original POSITION order (``select_topk``'s ``kept_idx``). The set of
cached (key, value) pairs is the same; attention does not depend on their order (RoPE is already
applied to cached keys).

Question-aware scoring: kvpress's pipeline compresses the context before the question is seen, so
window scoring (SnapKV, PyramidKV, ChunkKV over SnapKV, ShotKV) only sees the end of the context.
Give ``question_ids`` (see :func:`pipeline_question_ids`) and the prefill forward runs on
``context + question``: the last ``window_size`` queries of that sequence score the context, then the
question's keys and values are dropped from the cache, so the pipeline can ask the question as usual.

kvpress's conventions (the method options and their kvpress values), and where results may
legitimately differ, are listed in ``docs/KVPRESS.md``.

kvpress is an optional dependency: ``pip install kvpress-kernels[kvpress]``.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
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
from ..methods import H2O, ChunkKV, KNorm, PyramidKV, ShotKV, SnapKV, StreamingLLM
from ..methods.base import CompressionMethod, Eviction, GenerationInfo, PrefillInputs, budget_tokens
from ..methods.simple import ScorerTopK

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
    """Tokens kept per row by kvpress's ScorerPress: ``max(1, int(n_tokens * (1 - compression_ratio)))``
    (``kvpress.utils.compute_n_kept``) — the methods' ``budget_rounding="floor"`` rule
    (:func:`kvpress_kernels.methods.budget_tokens`), which the presses use."""
    return budget_tokens(1.0 - compression_ratio, n_tokens, "floor")


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


class _MethodPress(_PrefillAware):
    """Hook plumbing shared by the presses: build the :class:`~kvpress_kernels.methods.PrefillInputs`
    of one layer from kvpress's forward hook, run the press's :class:`CompressionMethod` (the same
    object type, with the kvpress-compatible options, that :func:`kvpress_kernels.compress` runs) and
    apply its :class:`~kvpress_kernels.methods.Eviction` to the rectangular kvpress cache.

    The method is built (and :meth:`CompressionMethod.begin` called) once per prefill forward when the
    model-level hook runs (every press installs it), so per-generation host data (ShotKV's shot table,
    budgets) is computed once, not per layer; a call without it (kvpress's own wrappers calling
    :meth:`score`) builds it on the spot."""

    #: Logit scale handed to the method: ``"module"`` (the attention module's ``scaling``, what eager
    #: attention uses) or ``"head_dim"`` (``1 / sqrt(head_dim)``, what kvpress's SnapKV divides by).
    _scale_from = "module"

    def _needs_model_hook(self) -> bool:
        return True

    def _build_method(self) -> CompressionMethod:
        # abstract hook: every concrete press returns its CompressionMethod (with the kvpress options)
        raise NotImplementedError(f"{type(self).__name__} must define _build_method() returning its CompressionMethod")

    def _shots(self, B: int, n_ctx: int):
        return None

    def _layer_inputs(self, module, hidden_states, keys, values, kwargs) -> PrefillInputs:
        B, Hkv, N, D = keys.shape
        if hidden_states.shape[1] != N:
            raise ValueError(f"{type(self).__name__} compresses a prefill into an empty cache: the layer holds "
                             f"{N} keys for {hidden_states.shape[1]} prompt tokens")
        n_ctx = self._context_length(keys)
        st = self._prefill_state
        key = (B, N, n_ctx, str(keys.device))
        if st is not None and st.get("method_key") == key:
            method, info = st["method"], st["info"]
        else:
            method = self._build_method()
            cfg = module.config
            info = GenerationInfo(num_layers=cfg.num_hidden_layers, batch_size=B,
                                  num_heads=cfg.num_attention_heads, num_kv_heads=Hkv, head_dim=D,
                                  prompt_lengths=(N,) * B, shots=self._shots(B, n_ctx), device=keys.device,
                                  backend=getattr(self, "backend", None),
                                  context_lengths=None if n_ctx == N else (n_ctx,) * B)
            method.begin(info)
            if st is not None:
                st.update(method_key=key, method=method, info=info)
        q = _queries(module, hidden_states, kwargs["position_embeddings"], N)
        scale = (1.0 / math.sqrt(D) if self._scale_from == "head_dim"
                 else float(getattr(module, "scaling", 1.0 / math.sqrt(D))))
        lengths = torch.full((B,), N, dtype=torch.int64, device=keys.device)
        inputs = PrefillInputs(layer=module.layer_idx, queries=q, keys=keys, values=values, lengths=lengths,
                               scale=scale, info=info)
        inputs._method = method  # the method that goes with these inputs (same object for every layer)
        return inputs

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        cr = _check_ratio("compression_ratio", self.compression_ratio)
        n_ctx = self._context_length(keys)
        if cr == 0:
            return keys[:, :, :n_ctx], values[:, :, :n_ctx]
        self._check_prompt(hidden_states.shape[1], n_ctx)
        inputs = self._layer_inputs(module, hidden_states, keys, values, kwargs)
        ev = inputs._method.prefill(inputs)
        if ev is None:
            return keys[:, :, :n_ctx], values[:, :, :n_ctx]
        return _apply_eviction(ev, keys, values, type(self).__name__)

    def _check_prompt(self, n_prompt: int, n_ctx: int) -> None:
        """kvpress's own preconditions on the prompt (it asserts; we raise ValueError)."""


def _apply_eviction(ev: Eviction, keys: torch.Tensor, values: torch.Tensor, who: str):
    """Keep ``ev.kept_idx`` (position order) of every row. kvpress caches are rectangular: every
    (sequence, kv head) row must keep the same number of tokens."""
    kept = ev.kept_idx
    if ev.new_lengths is not None:
        counts = np.asarray(ev.new_lengths)
        if (counts != counts.flat[0]).any():
            raise ValueError(f"{who}: the sequences of this batch keep different numbers of tokens "
                             f"({sorted(set(counts.ravel().tolist()))}), which a kvpress (rectangular) cache "
                             "cannot hold; run batch 1, or use kvpress_kernels.compress (paged cache)")
        K = int(counts.flat[0])
    else:
        c = (kept >= 0).sum(-1)
        K = int(c.max())
        if int(c.min()) != K:
            raise ValueError(f"{who}: the sequences of this batch keep different numbers of tokens, which a kvpress "
                             "(rectangular) cache cannot hold; run batch 1, or use kvpress_kernels.compress "
                             "(paged cache)")
    return _gather(keys, values, kept[..., :K])


class _KernelScorerPress(_MethodPress, ScorerPress):
    """Base of the token-level presses. Subclasses of kvpress's ``ScorerPress`` whose ``score`` is the
    method's ``token_scores`` (kvpress's contract, ``[B, Hkv, N]``, higher = keep), so kvpress's own
    wrappers (ChunkKV, AdaKV, ...) can use them too."""

    def __post_init__(self):
        _check_ratio("compression_ratio", self.compression_ratio)
        _check_backend(getattr(self, "backend", None))
        _check_question_ids(getattr(self, "question_ids", None))

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        _check_ratio("compression_ratio", self.compression_ratio)
        self._check_prompt(hidden_states.shape[1], keys.shape[2])
        inputs = self._layer_inputs(module, hidden_states, keys, values, kwargs)
        return inputs._method.token_scores(inputs)


# --------------------------------------------------------------------------------------------------
# Token-level presses
# --------------------------------------------------------------------------------------------------

@dataclass
class SnapKVPress(_KernelScorerPress):
    """SnapKV (Li et al. 2024): :class:`kvpress_kernels.methods.SnapKV` with kvpress's options
    (``SnapKV.kvpress``: ``budget_rounding="floor"``, ``window_score="max_plus_one"``).

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

    _scale_from = "head_dim"  # kvpress's SnapKV divides the logits by sqrt(head_dim)

    def __post_init__(self):
        super().__post_init__()
        _check_int("window_size", self.window_size, 1)
        _check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            # kvpress's avg_pool1d(padding=k//2) then returns N - W + 1 scores and fails to reshape
            raise ValueError(f"kernel_size must be odd (a centred pooling window), got {self.kernel_size}")

    def _check_prompt(self, n_prompt, n_ctx):
        if n_prompt <= self.window_size:
            raise ValueError(f"window_size ({self.window_size}) must be smaller than the number of prompt tokens "
                             f"({n_prompt}), as in kvpress's SnapKV")

    def _build_method(self):
        return SnapKV.kvpress(self.compression_ratio, window_size=self.window_size, kernel_size=self.kernel_size)


@dataclass
class PyramidKVPress(SnapKVPress):
    """PyramidKV (Cai et al. 2024): :class:`kvpress_kernels.methods.PyramidKV` (``PyramidKV.kvpress``):
    SnapKV scores, per-layer budgets shrinking linearly with depth — kvpress's rule, see
    :meth:`PyramidKV.layer_budget <kvpress_kernels.methods.PyramidKV.layer_budget>`.

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

    def _build_method(self):
        return PyramidKV.kvpress(self.compression_ratio, window_size=self.window_size,
                                 kernel_size=self.kernel_size, beta=self.beta)

    def layer_budget(self, layer_idx: int, num_layers: int, n_context: int) -> int:
        """Tokens kept by layer ``layer_idx`` (the method's rule)."""
        return self._build_method().layer_budget(layer_idx, num_layers, n_context)


@dataclass
class StreamingLLMPress(_KernelScorerPress):
    """StreamingLLM (Xiao et al. 2023): :class:`kvpress_kernels.methods.StreamingLLM`
    (``StreamingLLM.kvpress``): keep ``[0, n_sink)`` and the last ``n - n_sink`` of
    ``n = max(1, int(N * (1 - compression_ratio)))`` tokens. ``score`` returns kvpress's 0/1 scores so
    that wrappers (ChunkKV) see the same numbers.

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

    def _check_prompt(self, n_prompt, n_ctx):
        if n_ctx <= self.n_sink:
            raise ValueError(f"n_sink ({self.n_sink}) must be smaller than the number of context tokens ({n_ctx}), "
                             "as in kvpress's StreamingLLM")

    def _build_method(self):
        return StreamingLLM.kvpress(self.compression_ratio, n_sink=self.n_sink)


@dataclass
class KnormPress(_KernelScorerPress):
    """KNorm (Devoto et al. 2024): :class:`kvpress_kernels.methods.KNorm` (``KNorm.kvpress``): keep the
    keys of smallest L2 norm, ``score = -token_norm(keys)`` (fp32, like kvpress)."""

    compression_ratio: float = 0.0
    backend: Optional[str] = None

    def _build_method(self):
        return KNorm.kvpress(self.compression_ratio)


@dataclass
class ObservedAttentionPress(_KernelScorerPress):
    """kvpress's ObservedAttentionPress = :class:`kvpress_kernels.methods.H2O` with
    ``H2O.kvpress`` (``normalize="queries"``, no recent window, floor budget, prefill only), WITHOUT
    eager attention.

    kvpress needs ``attn_implementation="eager"`` to get the full ``[B, Hq, N, N]`` attention matrix;
    here the same score comes from :func:`attention_mass` with every prompt query under the causal
    mask, which never materialises that matrix, so any attention implementation works::

        s[b, h, j] = mean_{g in group(h)} (1 / (N - j)) sum_{i >= j} softmax_j(q_i . k_j * scaling)

    (``N - j`` queries see key ``j``; ``scaling`` is the attention module's own, as in eager attention).
    """

    compression_ratio: float = 0.0
    backend: Optional[str] = None

    def _build_method(self):
        return H2O.kvpress(self.compression_ratio)


class _ForeignScorer(ScorerTopK):
    """A kvpress ``ScorerPress`` that is not ours, as a method's scorer: its ``score`` called with the
    hook's arguments of the current layer (set by :class:`ChunkKVPress` before each call)."""

    def __init__(self, press):
        super().__init__(1.0 - press.compression_ratio, scores=self._scores, budget_rounding="floor")
        self.press = press
        self.hook_args = None

    def _scores(self, inputs):
        module, hidden_states, keys, values, attentions, kwargs = self.hook_args
        return self.press.score(module, hidden_states, keys, values, attentions, kwargs)


# --------------------------------------------------------------------------------------------------
# Segment-level presses
# --------------------------------------------------------------------------------------------------

@dataclass
class ChunkKVPress(_MethodPress, BasePress):
    """ChunkKV (Liu et al. 2025): :class:`kvpress_kernels.methods.ChunkKV` with ``ChunkKV.kvpress``,
    whose scorer is the inner press's method (or, for a kvpress press that is not ours, its ``score``).

    kvpress's rule: token scores ``press.score(...)`` summed over kv heads, averaged per chunk of
    ``chunk_length`` (the last, partial chunk averaged over its own tokens); the
    ``max(1, int(n_chunks * (1 - compression_ratio)))`` best chunks are kept, in position order, for
    every head. Reproduced kvpress quirks (method options): the chunks chosen for batch item 0 are
    applied to the whole batch (``batch_choice="first"``), and a context shorter than one chunk falls
    back to the inner press's own token-level compression.

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

    def _check_prompt(self, n_prompt, n_ctx):
        if isinstance(self.press, _MethodPress):
            self.press._check_prompt(n_prompt, n_ctx)

    @property
    def _scale_from(self):  # the scorer's convention (kvpress's SnapKV: 1/sqrt(head_dim))
        return self.press._scale_from if isinstance(self.press, _MethodPress) else "module"

    def _build_method(self):
        cr = _check_ratio("compression_ratio", self.press.compression_ratio)
        scorer = self.press._build_method() if isinstance(self.press, _MethodPress) else _ForeignScorer(self.press)
        return ChunkKV.kvpress(cr, chunk_size=self.chunk_length, scorer=scorer)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if not isinstance(self.press, _MethodPress):
            cr = _check_ratio("compression_ratio", self.press.compression_ratio)
            n_ctx = self._context_length(keys)
            if cr == 0:
                return keys[:, :, :n_ctx], values[:, :, :n_ctx]
            inputs = self._layer_inputs(module, hidden_states, keys, values, kwargs)
            inputs._method.scorer.hook_args = (module, hidden_states, keys, values, attentions, kwargs)
            ev = inputs._method.prefill(inputs)
            return _apply_eviction(ev, keys, values, type(self).__name__)
        return super().compress(module, hidden_states, keys, values, attentions, kwargs)


@dataclass
class ShotKVPress(_MethodPress, BasePress):
    """ShotKV (Liu et al. 2025, "Can LLMs Maintain Fundamental Abilities under KV Cache Compression?")
    through kvpress's hooks: exactly :class:`kvpress_kernels.methods.ShotKV` (same rules, same defaults;
    shots kept or dropped whole, protected tokens inside ``ceil((1 - compression_ratio) * N)``, an
    overrun reported in the method's ``stats`` and by a warning).

    Batches: kvpress caches are rectangular, so every sequence must keep the same number of tokens;
    whole-shot selection makes the counts differ in general, and such a batch raises ``ValueError``
    (no single-token top-ups: they would break whole shots). Use batch 1 or
    :func:`kvpress_kernels.compress`, whose paged cache holds any count per sequence.

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
    window_size : int, optional
        Observation window, as :class:`~kvpress_kernels.methods.ShotKV` (default: the tokens after the
        last shot).
    policy : {"stop", "skip"}
        Greedy fill rule, as :class:`~kvpress_kernels.methods.ShotKV` (default ``"stop"``).
    shots, shot_pattern, tokenizer : see above; exactly one of ``shots`` / ``shot_pattern``.
    question_ids : optional, question-aware scoring as in :class:`SnapKVPress` (recommended: ShotKV
        ranks shots by how much the question attends to them).
    backend : optional, as :class:`SnapKVPress`.
    """

    compression_ratio: float = 0.0
    window_size: Optional[int] = None
    shots: Any = None
    shot_pattern: Any = None
    tokenizer: Any = None
    question_ids: Any = None
    backend: Optional[str] = None
    policy: str = "stop"

    def __post_init__(self):
        _check_ratio("compression_ratio", self.compression_ratio)
        if self.window_size is not None:
            _check_int("window_size", self.window_size, 1)
        _check_backend(self.backend)
        _check_question_ids(self.question_ids)
        self._build_method()  # validates policy
        if (self.shots is None) == (self.shot_pattern is None):
            raise ValueError("ShotKVPress needs exactly one of shots (token spans) and shot_pattern (a regex), "
                             f"got shots={'None' if self.shots is None else 'given'}, shot_pattern={self.shot_pattern!r}")
        if self.shot_pattern is not None and self.tokenizer is None:
            raise ValueError("shot_pattern needs tokenizer (a fast Hugging Face tokenizer) to map the text to tokens")
        if self.shots is not None and (isinstance(self.shots, (str, bytes)) or not hasattr(self.shots, "__len__")):
            raise TypeError(f"shots must be a list of (start, end) token spans or one such list per sequence, "
                            f"got {type(self.shots).__name__}")

    def _build_method(self):
        return ShotKV(1.0 - _check_ratio("compression_ratio", self.compression_ratio), window_size=self.window_size,
                      policy=self.policy)

    @property
    def method(self) -> Optional[ShotKV]:
        """The ShotKV object of the last prefill (its ``stats`` say what was kept and any overrun)."""
        return self._last_method

    _last_method = None  # (not a dataclass field)

    def _check_prompt(self, n_prompt, n_ctx):
        if self.window_size is not None and n_prompt <= self.window_size:
            raise ValueError(f"window_size ({self.window_size}) must be smaller than the number of prompt tokens "
                             f"({n_prompt})")

    def _layer_inputs(self, module, hidden_states, keys, values, kwargs):
        inputs = super()._layer_inputs(module, hidden_states, keys, values, kwargs)
        self._last_method = inputs._method
        return inputs

    def _shots(self, B: int, n_ctx: int) -> list:
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
