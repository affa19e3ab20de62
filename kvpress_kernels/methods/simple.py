"""StreamingLLM and KNorm: attention-free methods (DESIGN.md §6)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import _validate as V
from ..ops.scoring import token_norm
from .base import (HEAD_BUDGETS, CompressionMethod, Eviction, PrefillInputs, check_head_alpha, head_budget_eviction,
                   to_device)
from .snapkv import topk_per_head


class StreamingLLM(CompressionMethod):
    """StreamingLLM (Xiao et al. 2024): keep the first ``n_sink`` tokens (attention sinks) and the most
    recent ones, ``ceil(keep_ratio * n)`` in all (only sinks, the first ones, when the budget is
    smaller than ``n_sink``). Same tokens for every kv head; computed on the host, no scoring.

    kvpress-compatible (:meth:`kvpress`): ``budget_rounding="floor"`` (``int(n * keep_ratio)``), the
    only difference from kvpress 0.5.5's ``StreamingLLMPress``."""

    def __init__(self, keep_ratio: float = 0.5, *, n_sink: int = 4, budget_rounding: str = "ceil"):
        super().__init__(keep_ratio, budget_rounding=budget_rounding)
        self.n_sink = V.integer("n_sink", n_sink, low=0)

    @classmethod
    def kvpress(cls, compression_ratio: float, **kwargs) -> "StreamingLLM":
        """The options that reproduce kvpress 0.5.5 (``compression_ratio`` = fraction REMOVED)."""
        kwargs.setdefault("budget_rounding", "floor")
        return cls(1.0 - compression_ratio, **kwargs)

    def _repr_args(self):
        return {**super()._repr_args(), "n_sink": self.n_sink}

    def token_scores(self, inputs: PrefillInputs) -> torch.Tensor:
        """kvpress's StreamingLLM scores ``[B, Hkv, N]``: 1 for the kept tokens, 0 for the evicted ones
        (what a chunk-level wrapper such as :class:`~kvpress_kernels.methods.ChunkKV` averages)."""
        B, Hkv, N = inputs.keys.shape[0], inputs.keys.shape[1], inputs.keys.shape[2]
        out = torch.zeros(B, N, dtype=torch.float32)
        for b, n in enumerate(inputs.info.prompt_lengths):
            n = int(n)
            k = self.budget(n)
            sink = min(self.n_sink, k)
            out[b, :sink] = 1.0
            out[b, n - (k - sink):n] = 1.0
        return to_device(out.numpy(), inputs.keys.device).unsqueeze(1).expand(B, Hkv, N)

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        lengths = [int(n) for n in inputs.info.prompt_lengths]
        budgets = [self.budget(n) for n in lengths]
        if all(b >= n for b, n in zip(budgets, lengths)):
            return None
        B, Hkv = inputs.keys.shape[0], inputs.keys.shape[1]
        K = max(budgets)
        kept = np.full((B, K), -1, dtype=np.int32)
        for b, (n, k) in enumerate(zip(lengths, budgets)):
            sink = min(self.n_sink, k)
            idx = np.concatenate([np.arange(sink), np.arange(n - (k - sink), n)])
            kept[b, :k] = idx
        kept_t = to_device(kept, inputs.keys.device)
        return Eviction(kept_t.unsqueeze(1).expand(B, Hkv, K).contiguous(),
                        np.repeat(np.asarray(budgets, dtype=np.int64)[:, None], Hkv, axis=1))


class KNorm(CompressionMethod):
    """KNorm (Devoto et al. 2024): keys with a small L2 norm draw the most attention, so each
    (sequence, kv head) keeps its ``ceil(keep_ratio * n)`` lowest-norm keys (score ``-||k_j||``, fp32).

    kvpress-compatible (:meth:`kvpress`): ``budget_rounding="floor"``, the only difference from kvpress
    0.5.5's ``KnormPress``.

    ``head_budget="adakv"`` (``head_alpha``: the per-head floor): the layer's ``Hkv * budget`` lowest-norm
    keys over all its kv heads together (AdaKV's selection, see :class:`~kvpress_kernels.methods.SnapKV`).
    Key norms are not normalised per head: a head whose keys are shorter overall keeps more of them."""

    def __init__(self, keep_ratio: float = 0.5, *, budget_rounding: str = "ceil", head_budget: str = "uniform",
                 head_alpha: float = 0.2):
        super().__init__(keep_ratio, budget_rounding=budget_rounding)
        self.head_budget = V.choice("head_budget", head_budget, HEAD_BUDGETS)
        self.head_alpha = check_head_alpha("head_alpha", head_alpha)

    def _repr_args(self):
        out = super()._repr_args()
        if self.head_budget != "uniform":
            out.update(head_budget=self.head_budget, head_alpha=self.head_alpha)
        return out

    @classmethod
    def kvpress(cls, compression_ratio: float, **kwargs) -> "KNorm":
        """The options that reproduce kvpress 0.5.5 (``compression_ratio`` = fraction REMOVED)."""
        kwargs.setdefault("budget_rounding", "floor")
        return cls(1.0 - compression_ratio, **kwargs)

    def token_scores(self, inputs: PrefillInputs) -> torch.Tensor:
        """``-||k_j||`` per (sequence, kv head) ``[B, Hkv, N]`` (0 beyond each length)."""
        return -token_norm(inputs.keys, lengths=inputs.lengths)

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        lengths = [int(n) for n in inputs.info.prompt_lengths]
        budgets = [self.budget(n) for n in lengths]
        if all(b >= n for b, n in zip(budgets, lengths)):
            return None
        if self.head_budget == "adakv":
            return head_budget_eviction(self.token_scores(inputs), budgets, inputs.lengths, alpha=self.head_alpha,
                                        backend=inputs.info.backend)
        return topk_per_head(self.token_scores(inputs), budgets, inputs.lengths, backend=inputs.info.backend)


class ScorerTopK(CompressionMethod):
    """Per-(sequence, kv head) top-``budget`` of token scores supplied by the host: kvpress's
    ``ScorerPress`` rule, for a host scorer this package has no method of (a kvpress press that is not
    ours, wrapped by :class:`~kvpress_kernels.integrations.kvpress.ChunkKVPress`).

    ``scores(inputs) -> [B, Hkv, N]`` (higher = keep) is called once per layer."""

    def __init__(self, keep_ratio: float = 0.5, *, scores, budget_rounding: str = "ceil"):
        super().__init__(keep_ratio, budget_rounding=budget_rounding)
        if not callable(scores):
            raise TypeError(f"scores must be callable(inputs) -> [B, Hkv, N], got {type(scores).__name__}")
        self._scores = scores

    def token_scores(self, inputs: PrefillInputs) -> torch.Tensor:
        return self._scores(inputs).float()

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        lengths = [int(n) for n in inputs.info.prompt_lengths]
        budgets = [self.budget(n) for n in lengths]
        if all(b >= n for b, n in zip(budgets, lengths)):
            return None
        return topk_per_head(self.token_scores(inputs), budgets, inputs.lengths, backend=inputs.info.backend)
