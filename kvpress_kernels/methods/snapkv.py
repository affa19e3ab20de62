"""SnapKV and PyramidKV: observation-window scoring, per-head top-k (DESIGN.md §6)."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from .. import _validate as V
from ..ops.scoring import attention_mass
from ..ops.selection import select_topk
from .base import CompressionMethod, Eviction, PrefillInputs, budget_tokens, scores_by_group, to_device

POOLINGS = ("avg", "max", "none")


class SnapKV(CompressionMethod):
    """SnapKV (Li et al. 2024): score each prompt key by the attention the last ``window_size`` prompt
    queries (the *observation window*) pay it, smooth the scores with a 1-D pooling, keep the top
    ``budget`` keys per (sequence, kv head); the window itself is always kept.

    Score of key ``j`` for kv head ``h`` (``G`` query heads per kv head, ``W`` window queries):
    ``s_j = pool( (1/G) Σ_{g} Σ_{w<W} softmax(q_w · K^T · scale)_j )`` over keys before the window
    (pooling stops at the window, as kvpress's SnapKVPress does). Budget per sequence of ``n`` prompt
    tokens: ``ceil(keep_ratio * n)`` (see :func:`~kvpress_kernels.methods.base.budget_tokens`); the
    window counts against it first (clipped to the budget when the budget is smaller).

    Parameters
    ----------
    keep_ratio : float in (0, 1]
        Fraction of prompt tokens kept.
    window_size : int
        Observation window (clipped to the prompt length).
    kernel_size : int, odd
        Pooling kernel (1 = no pooling).
    pooling : {"avg", "max", "none"}
    """

    def __init__(self, keep_ratio: float = 0.5, *, window_size: int = 64, kernel_size: int = 5,
                 pooling: str = "avg"):
        super().__init__(keep_ratio)
        self.window_size = V.integer("window_size", window_size, low=1)
        self.kernel_size = V.integer("kernel_size", kernel_size, low=1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a centred pooling window), got {kernel_size}")
        self.pooling = V.choice("pooling", pooling, POOLINGS)

    def _repr_args(self) -> Dict[str, object]:
        return {"keep_ratio": self.keep_ratio, "window_size": self.window_size,
                "kernel_size": self.kernel_size, "pooling": self.pooling}

    # -------------------------------------------------------------- pieces reused by subclasses
    def windows(self, lengths) -> List[int]:
        return [min(self.window_size, int(n)) for n in lengths]

    def window_scores(self, inputs: PrefillInputs, head_reduce: str = "group_mean") -> torch.Tensor:
        """SnapKV scores ``[B, Hkv, N]`` (or ``[B, N]`` for an ``all_*`` head reduction), 0 beyond lengths."""
        lengths = inputs.info.prompt_lengths
        pool = None if self.pooling == "none" else self.pooling
        backend = inputs.info.backend

        def score(idx, n, w):
            sel = to_device(idx, inputs.keys.device, torch.long)
            q = inputs.query_rows(sel, n - w, n)
            k = inputs.keys.index_select(0, sel)[:, :, :n]
            return attention_mass(q, k, scale=inputs.scale, causal=True, head_reduce=head_reduce, pool=pool,
                                  pool_size=self.kernel_size, pool_end=n - w, backend=backend)

        return scores_by_group(lengths, self.windows(lengths), inputs.keys.shape[2], score)

    def layer_budgets(self, inputs: PrefillInputs) -> List[int]:
        """Tokens kept per sequence in this layer."""
        return [budget_tokens(self.keep_ratio, int(n)) for n in inputs.info.prompt_lengths]

    # -------------------------------------------------------------- the policy
    def prefill(self, inputs: PrefillInputs) -> Eviction:
        info = inputs.info
        lengths = [int(n) for n in info.prompt_lengths]
        budgets = self.layer_budgets(inputs)
        if all(b >= n for b, n in zip(budgets, lengths)):
            return None  # keeps everything: skip the scoring
        B, Hkv, N = inputs.keys.shape[0], inputs.keys.shape[1], inputs.keys.shape[2]
        scores = self.window_scores(inputs)                                   # [B, Hkv, N]
        windows = self.windows(lengths)
        dev = inputs.keys.device
        # the window counts against the budget first; a budget smaller than the window keeps its tail
        protect_from = to_device([n - min(w, b) for n, w, b in zip(lengths, windows, budgets)], dev)
        j = torch.arange(N, device=dev)
        protect = (j.view(1, 1, N) >= protect_from.view(B, 1, 1)).expand(B, Hkv, N).reshape(B * Hkv, N)
        return topk_per_head(scores, budgets, inputs.lengths, protect=protect, backend=info.backend)


class PyramidKV(SnapKV):
    """PyramidKV (Cai et al. 2024): SnapKV scoring with layer budgets that shrink linearly with depth and
    the same total as SnapKV at ``keep_ratio``.

    Budget of layer ``l`` (of ``L``) for a prompt of ``n`` tokens, kvpress's ``PyramidKVPress`` formula
    (from KVCache-Factory) with ``compression_ratio = 1 - keep_ratio`` and ``W = window_size``:
    ``cap = W + n * keep_ratio``, ``min = (cap - W) / beta``, ``max = 2 (cap - W) - min``; if
    ``max >= n - W`` then ``max = n - W``, ``min = 2 (cap - W) - max``; if not ``n >= max >= min >= W``
    every layer falls back to ``max(1, round(n * keep_ratio))`` (plain SnapKV); otherwise layer ``l``
    keeps ``round(max - l * (max - min) / (L - 1))`` tokens. The window is protected as in SnapKV.

    Parameters
    ----------
    keep_ratio, window_size, kernel_size, pooling
        As :class:`SnapKV`.
    beta : int >= 1
        Steepness of the pyramid (larger: bigger difference between the first and last layer).
    """

    def __init__(self, keep_ratio: float = 0.5, *, window_size: int = 64, kernel_size: int = 5,
                 pooling: str = "avg", beta: int = 20):
        super().__init__(keep_ratio, window_size=window_size, kernel_size=kernel_size, pooling=pooling)
        self.beta = V.integer("beta", beta, low=1)

    def _repr_args(self) -> Dict[str, object]:
        return {**super()._repr_args(), "beta": self.beta}

    def layer_budget(self, layer: int, num_layers: int, n: int) -> int:
        """Tokens kept by ``layer`` for an ``n``-token prompt (formula in the class docstring)."""
        W = self.window_size
        cap = W + n * self.keep_ratio
        min_num = (cap - W) / self.beta
        max_num = (cap - W) * 2 - min_num
        if max_num >= n - W:
            max_num = n - W
            min_num = (cap - W) * 2 - max_num
        if not (n >= max_num >= min_num >= W):
            return min(n, max(1, round(n * self.keep_ratio)))
        steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
        return min(n, max(1, round(max_num - layer * steps)))

    def layer_budgets(self, inputs: PrefillInputs) -> List[int]:
        L = inputs.info.num_layers
        return [self.layer_budget(inputs.layer, L, int(n)) for n in inputs.info.prompt_lengths]


def topk_per_head(scores: torch.Tensor, budgets: List[int], lengths: torch.Tensor, *, protect=None,
                  backend=None) -> Eviction:
    """Per-(sequence, kv head) top-``budgets[b]`` of ``scores [B, Hkv, N]`` (valid keys ``< lengths[b]``),
    ``protect [B*Hkv, N]`` kept first. New lengths are the budgets (known on the host)."""
    B, Hkv, N = scores.shape
    dev = scores.device
    bud_host = np.repeat(np.asarray(budgets, dtype=np.int64)[:, None], Hkv, axis=1)
    bud = to_device(bud_host.reshape(-1), dev)
    rows = lengths.to(torch.int64).repeat_interleave(Hkv)
    _, kept = select_topk(scores.reshape(B * Hkv, N), bud, lengths=rows, protect=protect,
                          max_budget=int(bud_host.max()), backend=backend)
    return Eviction(kept.view(B, Hkv, -1), bud_host)
