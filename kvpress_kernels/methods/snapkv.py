"""SnapKV and PyramidKV: observation-window scoring, per-head top-k (DESIGN.md §6)."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from .. import _validate as V
from ..ops.scoring import attention_mass, pool_scores
from ..ops.selection import select_topk
from .base import (HEAD_BUDGETS, CompressionMethod, Eviction, PrefillInputs, check_head_alpha, head_budget_eviction,
                   to_device, window_mass, window_queries)

POOLINGS = ("avg", "max", "none")

#: ``"protect"`` (ours): the window's tokens are kept and count against the budget first (its last
#: tokens when the budget is smaller); ``"max_plus_one"`` (kvpress): the window's keys are scored
#: ``1 + max`` of every other score of the batch, which keeps them whenever the budget allows and is the
#: value kvpress's ChunkKV adds into its chunk means.
WINDOW_SCORES = ("protect", "max_plus_one")


class SnapKV(CompressionMethod):
    """SnapKV (Li et al. 2024): score each prompt key by the attention the last ``window_size`` prompt
    queries (the *observation window*) pay it, smooth the scores with a 1-D pooling, keep the top
    ``budget`` keys per (sequence, kv head); the window itself is always kept.

    Score of key ``j`` for kv head ``h`` (``G`` query heads per kv head, ``W`` window queries):
    ``s_j = pool( (1/G) Σ_{g} Σ_{w<W} softmax(q_w · K^T · scale)_j )`` over keys before the window
    (pooling stops at the window, as kvpress's SnapKVPress does). Budget per sequence of ``n`` prompt
    tokens: ``ceil(keep_ratio * n)`` (see :func:`~kvpress_kernels.methods.base.budget_tokens`); the
    window counts against it first (clipped to the budget when the budget is smaller).

    kvpress-compatible options (:meth:`kvpress`): ``budget_rounding="floor"`` (``int(n * keep_ratio)``)
    and ``window_score="max_plus_one"`` (scores are the mean over the window queries, and the window's
    keys score ``1 + max`` over the batch instead of being protected). With them the kept tokens are
    kvpress 0.5.5's ``SnapKVPress``'s, up to ties (docs/KVPRESS.md).

    Parameters
    ----------
    keep_ratio : float in (0, 1]
        Fraction of prompt tokens kept.
    window_size : int
        Observation window (clipped to the prompt length).
    kernel_size : int, odd
        Pooling kernel (1 = no pooling).
    pooling : {"avg", "max", "none"}
    budget_rounding : {"ceil", "floor"}
    window_score : {"protect", "max_plus_one"}
    head_budget : {"uniform", "adakv"}
        ``"adakv"``: the layer's ``Hkv * budget`` tokens are chosen over all its kv heads together, each head
        keeping at least ``max(1, int(head_alpha * budget))`` (its window counting first) — real per-head
        lengths in the paged cache (:class:`~kvpress_kernels.methods.AdaKV` is SnapKV with this option).
    head_alpha : float in [0, 1]
        The per-head floor of ``head_budget="adakv"``, as a fraction of the average head budget.
    """

    supports_context_lengths = True

    def __init__(self, keep_ratio: float = 0.5, *, window_size: int = 64, kernel_size: int = 5,
                 pooling: str = "avg", budget_rounding: str = "ceil", window_score: str = "protect",
                 head_budget: str = "uniform", head_alpha: float = 0.2):
        super().__init__(keep_ratio, budget_rounding=budget_rounding)
        self.head_budget = V.choice("head_budget", head_budget, HEAD_BUDGETS)
        self.head_alpha = check_head_alpha("head_alpha", head_alpha)
        self.window_size = V.integer("window_size", window_size, low=1)
        self.kernel_size = V.integer("kernel_size", kernel_size, low=1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a centred pooling window), got {kernel_size}")
        self.pooling = V.choice("pooling", pooling, POOLINGS)
        self.window_score = V.choice("window_score", window_score, WINDOW_SCORES)

    @classmethod
    def kvpress(cls, compression_ratio: float, **kwargs) -> "SnapKV":
        """The options that reproduce kvpress 0.5.5 (``compression_ratio`` = fraction REMOVED)."""
        kwargs.setdefault("budget_rounding", "floor")
        kwargs.setdefault("window_score", "max_plus_one")
        return cls(1.0 - compression_ratio, **kwargs)

    def _repr_args(self) -> Dict[str, object]:
        out = {**super()._repr_args(), "window_size": self.window_size, "kernel_size": self.kernel_size,
               "pooling": self.pooling}
        if self.window_score != "protect":
            out["window_score"] = self.window_score
        if self.head_budget != "uniform":
            out.update(head_budget=self.head_budget, head_alpha=self.head_alpha)
        return out

    # -------------------------------------------------------------- pieces reused by subclasses
    def windows(self, lengths) -> List[int]:
        return [min(self.window_size, int(n)) for n in lengths]

    def window_scores(self, inputs: PrefillInputs, head_reduce: str = "group_mean") -> torch.Tensor:
        """SnapKV scores ``[B, Hkv, N]`` (or ``[B, N]`` for an ``all_*`` head reduction), 0 beyond lengths.

        Keys before each row's window are pooled; the window's keys keep their unpooled mass. A ragged
        batch is scored by one scoring launch (:func:`~kvpress_kernels.methods.base.window_mass`) and
        pooled with per-row ends (:func:`~kvpress_kernels.ops.scoring.pool_scores`)."""
        lengths = [int(n) for n in inputs.info.prompt_lengths]
        pool = None if self.pooling == "none" else self.pooling
        windows = self.windows(lengths)
        N = inputs.keys.shape[2]
        if all(w == windows[0] for w in windows) and all(n == N for n in lengths):
            W = windows[0]
            q = window_queries(inputs.queries, lengths, W, inputs.query_offset)
            return attention_mass(q, inputs.keys, scale=inputs.scale,
                                  causal=True, head_reduce=head_reduce, pool=pool, pool_size=self.kernel_size,
                                  pool_end=N - W, backend=inputs.info.backend)
        mass = window_mass(inputs, windows, head_reduce)
        if pool is None or self.kernel_size == 1:
            return mass
        ends = to_device([n - w for n, w in zip(lengths, windows)], mass.device)
        pooled = pool_scores(mass, pool, self.kernel_size, lengths=ends)
        j = torch.arange(N, device=mass.device)
        return torch.where(j >= ends.view([-1] + [1] * (mass.dim() - 1)), mass, pooled)

    def token_scores(self, inputs: PrefillInputs) -> torch.Tensor:
        """Per-(sequence, kv head) token scores ``[B, Hkv, N]``, higher = keep (kvpress's ``score``
        contract). With ``window_score="max_plus_one"`` these are kvpress's SnapKV scores: pooled mean over
        the window queries before the window, ``1 + max`` (over the whole batch) on the window."""
        scores = self.window_scores(inputs)
        if self.window_score != "max_plus_one":
            return scores
        lengths = inputs.info.prompt_lengths
        windows = self.windows(lengths)
        B, Hkv, N = scores.shape
        dev = scores.device
        j = torch.arange(N, device=dev).view(1, 1, N)
        w_start = to_device([int(n) - w for n, w in zip(lengths, windows)], dev).view(B, 1, 1)
        w_div = to_device([float(w) for w in windows], dev, torch.float32).view(B, 1, 1)
        before = j < w_start
        scores = scores / w_div                       # kvpress averages over the window queries
        # kvpress: F.pad(value=scores.max().item() + 1); amax keeps it on the device (no host sync)
        pad = torch.where(before, scores, float("-inf")).amax() + 1
        in_len = j < inputs.lengths.view(B, 1, 1)
        return torch.where(before, scores, torch.where(in_len, pad, torch.zeros((), device=dev)))

    def layer_budgets(self, inputs: PrefillInputs) -> List[int]:
        """Tokens kept per sequence in this layer (of its ``keep_lengths`` candidates)."""
        return [self.budget(int(n)) for n in inputs.info.keep_lengths()]

    # -------------------------------------------------------------- the policy
    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        info = inputs.info
        lengths = [int(n) for n in info.prompt_lengths]
        keep_len = [int(n) for n in info.keep_lengths()]
        budgets = self.layer_budgets(inputs)
        if all(b >= n for b, n in zip(budgets, lengths)):
            return None  # keeps everything: skip the scoring
        B, Hkv, N = inputs.keys.shape[0], inputs.keys.shape[1], inputs.keys.shape[2]
        rows, protect = self._host_plan(inputs, tuple(budgets))
        scores = self.token_scores(inputs) if self.window_score == "max_plus_one" else self.window_scores(inputs)
        if self.head_budget == "adakv":
            # group-mean window mass: every head's scores sum to its window size, so heads rank together
            return head_budget_eviction(scores, budgets, rows, alpha=self.head_alpha, protect=protect,
                                        backend=info.backend)
        return topk_per_head(scores, budgets, rows, protect=protect, backend=info.backend)

    def _host_plan(self, inputs: PrefillInputs, budgets: tuple):
        """Row lengths and the protected-window mask for these budgets, built once per generation (per
        distinct budget vector: one for SnapKV, one per layer for PyramidKV) and reused by the layers."""
        info = inputs.info
        memo = getattr(self, "_memo", None)
        if memo is None or memo[0] is not info:
            memo = self._memo = (info, {})
        key = (budgets, inputs.keys.shape[2], inputs.keys.shape[1])
        if key in memo[1]:
            return memo[1][key]
        lengths = [int(n) for n in info.prompt_lengths]
        keep_len = [int(n) for n in info.keep_lengths()]
        B, Hkv, N = inputs.keys.shape[0], inputs.keys.shape[1], inputs.keys.shape[2]
        dev = inputs.keys.device
        rows = inputs.lengths if keep_len == lengths else to_device(keep_len, dev)
        protect = None
        if self.window_score == "protect":
            windows = self.windows(lengths)
            # the window counts against the budget first; a budget smaller than the window keeps its tail
            # (of the keepable tokens: with context_lengths the window may reach into the dropped question)
            protect_len = [max(0, k - max(n - w, 0)) for n, w, k in zip(lengths, windows, keep_len)]
            protect_from = to_device([k - min(p, b) for k, p, b in zip(keep_len, protect_len, budgets)], dev)
            j = torch.arange(N, device=dev)
            protect = (j.view(1, 1, N) >= protect_from.view(B, 1, 1)).expand(B, Hkv, N).reshape(B * Hkv, N)
        memo[1][key] = (rows, protect)
        return rows, protect


class PyramidKV(SnapKV):
    """PyramidKV (Cai et al. 2024): SnapKV scoring with layer budgets that shrink linearly with depth and
    the same total as SnapKV at ``keep_ratio``.

    Budget of layer ``l`` (of ``L``) for a prompt of ``n`` tokens, kvpress's ``PyramidKVPress`` formula
    (from KVCache-Factory) with ``compression_ratio = 1 - keep_ratio`` and ``W = window_size``:
    ``cap = W + n * keep_ratio``, ``min = (cap - W) / beta``, ``max = 2 (cap - W) - min``; if
    ``max >= n - W`` then ``max = n - W``, ``min = 2 (cap - W) - max``; if not ``n >= max >= min >= W``
    every layer falls back to ``max(1, round(n * keep_ratio))`` (plain SnapKV); otherwise layer ``l``
    keeps ``round(max - l * (max - min) / (L - 1))`` tokens. The float operations follow kvpress's
    order (window added, then subtracted again), because ``round`` of a value at .5 could otherwise go
    the other way. ``budget_rounding`` does not apply (the formula rounds). The window is protected as
    in SnapKV (``window_score="protect"``) or scored ``max + 1`` (kvpress, :meth:`kvpress`).

    Parameters
    ----------
    keep_ratio, window_size, kernel_size, pooling, window_score, head_budget, head_alpha
        As :class:`SnapKV` (``head_budget="adakv"``: each layer's pyramid budget shared by its kv heads).
    beta : int >= 1
        Steepness of the pyramid (larger: bigger difference between the first and last layer).
    """

    def __init__(self, keep_ratio: float = 0.5, *, window_size: int = 64, kernel_size: int = 5,
                 pooling: str = "avg", beta: int = 20, budget_rounding: str = "ceil",
                 window_score: str = "protect", head_budget: str = "uniform", head_alpha: float = 0.2):
        super().__init__(keep_ratio, window_size=window_size, kernel_size=kernel_size, pooling=pooling,
                         budget_rounding=budget_rounding, window_score=window_score, head_budget=head_budget,
                         head_alpha=head_alpha)
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
        return [self.layer_budget(inputs.layer, L, int(n)) for n in inputs.info.keep_lengths()]


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
