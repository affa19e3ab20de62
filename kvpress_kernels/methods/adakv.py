"""AdaKV: SnapKV scores with one budget shared by the kv heads of a layer (DESIGN.md §6, extras).

AdaKV (Feng et al. 2024, arXiv 2407.11550) keeps the best ``Hkv * n`` tokens of a layer over all its
kv heads together instead of ``n`` per head, with a per-head safeguard. Here the choice is the op
:func:`~kvpress_kernels.ops.head_budget.select_head_budget`, and the paged cache then compacts every
(sequence, kv head) to its own length, so the heads that gave up slots really free their pages —
kvpress's ``AdaKVPress`` masks the dropped keys in attention and frees nothing.
"""

from __future__ import annotations

from typing import Dict

from .base import check_head_alpha, head_floor_tokens
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

    This is ``SnapKV(..., head_budget="adakv", head_alpha=alpha)``; the same option exists on PyramidKV,
    KNorm and H2O (docs/METHODS.md "Per-head budgets"). So the average head keeps SnapKV's ``n``; heads range from ``floor`` (window aside) to ``Hkv * n``.
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
        super().__init__(keep_ratio, window_size=window_size, kernel_size=kernel_size, pooling=pooling,
                         head_budget="adakv", head_alpha=check_head_alpha("alpha", alpha))

    @property
    def alpha(self) -> float:
        return self.head_alpha

    def _repr_args(self) -> Dict[str, object]:
        out = {k: v for k, v in super()._repr_args().items() if k not in ("head_budget", "head_alpha")}
        return {**out, "alpha": self.alpha}

    def floor_tokens(self, n: int) -> int:
        """Per-head floor for an average head budget of ``n`` tokens (kvpress's ``n_safe``)."""
        return head_floor_tokens(n, self.alpha)

    # prefill: SnapKV's, with head_budget="adakv" (base.head_budget_eviction)


__all__ = ["AdaKV"]
