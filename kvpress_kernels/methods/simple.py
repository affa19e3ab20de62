"""StreamingLLM and KNorm: attention-free methods (DESIGN.md §6)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .. import _validate as V
from ..ops.scoring import token_norm
from .base import CompressionMethod, Eviction, PrefillInputs, budget_tokens, to_device
from .snapkv import topk_per_head


class StreamingLLM(CompressionMethod):
    """StreamingLLM (Xiao et al. 2024): keep the first ``n_sink`` tokens (attention sinks) and the most
    recent ones, ``ceil(keep_ratio * n)`` in all (only sinks, the first ones, when the budget is
    smaller than ``n_sink``). Same tokens for every kv head; computed on the host, no scoring."""

    def __init__(self, keep_ratio: float = 0.5, *, n_sink: int = 4):
        super().__init__(keep_ratio)
        self.n_sink = V.integer("n_sink", n_sink, low=0)

    def _repr_args(self):
        return {"keep_ratio": self.keep_ratio, "n_sink": self.n_sink}

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        lengths = [int(n) for n in inputs.info.prompt_lengths]
        budgets = [budget_tokens(self.keep_ratio, n) for n in lengths]
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
    (sequence, kv head) keeps its ``ceil(keep_ratio * n)`` lowest-norm keys (score ``-||k_j||``)."""

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        lengths = [int(n) for n in inputs.info.prompt_lengths]
        budgets = [budget_tokens(self.keep_ratio, n) for n in lengths]
        if all(b >= n for b, n in zip(budgets, lengths)):
            return None
        scores = -token_norm(inputs.keys, lengths=inputs.lengths)
        return topk_per_head(scores, budgets, inputs.lengths, backend=inputs.info.backend)
