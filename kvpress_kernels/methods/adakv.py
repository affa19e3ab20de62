"""AdaKV: SnapKV scores with one budget shared by the kv heads of a layer (DESIGN.md §6, extras).

AdaKV (Feng et al. 2024, arXiv 2407.11550) keeps the best ``Hkv * n`` tokens of a layer over all its
kv heads together instead of ``n`` per head, with a per-head safeguard. Here the choice is the op
:func:`~kvpress_kernels.ops.head_budget.select_head_budget`, and the paged cache then compacts every
(sequence, kv head) to its own length, so the heads that gave up slots really free their pages —
kvpress's ``AdaKVPress`` masks the dropped keys in attention and frees nothing.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..ops.head_budget import select_head_budget
from .base import Eviction, PrefillInputs, to_device
from .snapkv import SnapKV


class AdaKV(SnapKV):
    """AdaKV over SnapKV scores: one exactly-``Hkv * n`` selection over the union of a layer's kv heads.

    Per sequence of ``N`` prompt tokens, with ``n = ceil(keep_ratio * N)`` (SnapKV's budget, see
    :func:`~kvpress_kernels.methods.base.budget_tokens`):

    - scores: SnapKV's observation-window scores (``window_size``, ``kernel_size``, ``pooling``), one
      row per kv head — their scale is the same for every head of a layer, so the rows can be ranked
      together;
    - protected: the observation window of every head (its last ``min(window, n)`` tokens), as SnapKV;
    - floor: every head keeps at least ``floor = max(1, int(alpha * n))`` tokens (``0`` when ``alpha = 0``;
      kvpress's ``n_safe``), its protected tokens counting first;
    - the layer keeps exactly ``Hkv * n`` tokens: the protected and floor tokens, then the best of all
      heads' remaining tokens together (ties: lower head, then lower position).

    So the average head keeps SnapKV's ``n``; heads range from ``floor`` (window aside) to ``Hkv * n``.
    kvpress's ``AdaKVPress(SnapKVPress(compression_ratio=1 - keep_ratio), alpha_safeguard=alpha)``
    leaves the same tokens unmasked whenever both budgets agree (kvpress truncates ``N (1 - r)``, we
    round ``keep_ratio * N`` up) and ``n >= window_size``. The new per-head lengths are known only on
    the device: the cache reads them once per layer (as for ShotKV and ChunkKV).

    Parameters
    ----------
    keep_ratio : float in (0, 1]
        Fraction of prompt tokens kept, averaged over the kv heads of each layer.
    alpha : float in [0, 1]
        Safeguard: the fraction of the average head budget every head keeps at least.
    window_size, kernel_size, pooling
        As :class:`~kvpress_kernels.methods.snapkv.SnapKV`.
    """

    def __init__(self, keep_ratio: float = 0.5, *, alpha: float = 0.2, window_size: int = 64, kernel_size: int = 5,
                 pooling: str = "avg"):
        super().__init__(keep_ratio, window_size=window_size, kernel_size=kernel_size, pooling=pooling)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a float in [0, 1], got {type(alpha).__name__}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (the per-head floor as a fraction of the average head "
                             f"budget), got {alpha}")
        self.alpha = float(alpha)

    def _repr_args(self) -> Dict[str, object]:
        return {**super()._repr_args(), "alpha": self.alpha}

    def floor_tokens(self, n: int) -> int:
        """Per-head floor for an average head budget of ``n`` tokens (kvpress's ``n_safe``)."""
        if self.alpha == 0 or n <= 0:
            return 0
        return max(1, int(n * self.alpha))

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        info = inputs.info
        lengths = [int(n) for n in info.prompt_lengths]
        budgets = self.layer_budgets(inputs)
        if all(b >= n for b, n in zip(budgets, lengths)):
            return None  # keeps everything: skip the scoring
        B, Hkv, N = inputs.keys.shape[0], inputs.keys.shape[1], inputs.keys.shape[2]
        scores = self.window_scores(inputs)                                   # [B, Hkv, N]
        windows = self.windows(lengths)
        dev = inputs.keys.device
        protect_from = to_device([n - min(w, b) for n, w, b in zip(lengths, windows, budgets)], dev)
        j = torch.arange(N, device=dev)
        protect = (j.view(1, 1, N) >= protect_from.view(B, 1, 1)).expand(B, Hkv, N)
        totals = [Hkv * b for b in budgets]
        # a head keeps at most min(its length, the layer's total): the width of kept_idx
        K = min(N, max(totals))
        _, kept_idx, _ = select_head_budget(
            scores, to_device(totals, dev, torch.int64), floor=to_device([self.floor_tokens(b) for b in budgets], dev,
                                                                         torch.int64),
            lengths=inputs.lengths.to(torch.int64).view(B, 1).expand(B, Hkv), protect=protect, max_budget=K,
            backend=info.backend)
        return Eviction(kept_idx, None)


__all__ = ["AdaKV"]
