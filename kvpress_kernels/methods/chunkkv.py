"""ChunkKV: whole fixed-length chunks kept by window score, shared across heads (DESIGN.md §6)."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .. import _validate as V
from ..ops.segments import segment_reduce, segments_to_token_mask
from ..ops.selection import POLICIES, select_segments
from .base import Eviction, PrefillInputs, budget_tokens, kept_from_mask, to_device
from .snapkv import SnapKV


class ChunkKV(SnapKV):
    """ChunkKV (Liu et al. 2025): keep whole chunks of ``chunk_size`` consecutive tokens, chosen by their
    mean SnapKV-style window score summed over every head of the layer; every kv head keeps the same
    tokens.

    Token score: attention mass from the last ``window_size`` prompt queries summed over all query heads
    (pooled like :class:`SnapKV`). Chunk score: the mean over the chunk's tokens (the last chunk of a
    prompt may be shorter). Chunks are taken greedily by score until ``ceil(keep_ratio * n)`` tokens
    (``policy="skip"`` passes over a chunk that does not fit — only the short last chunk can then still
    fit; ``"stop"`` ends there). The chunks that overlap the observation window are protected (they
    count against the budget first) when ``protect_window`` is true.

    Layer-wise index reuse (``reuse_every = N > 1``): layer ``l`` reuses the selection made by layer
    ``N * floor(l / N)`` instead of scoring (ChunkKV's observation that adjacent layers keep similar
    chunks); ``reuse_every = 1`` selects in every layer.

    The kept count depends on which chunks won (the short last chunk), so each selecting layer reads
    one count per sequence from the device.
    """

    def __init__(self, keep_ratio: float = 0.5, *, chunk_size: int = 10, window_size: int = 64,
                 kernel_size: int = 5, pooling: str = "avg", policy: str = "skip", reuse_every: int = 1,
                 protect_window: bool = True):
        super().__init__(keep_ratio, window_size=window_size, kernel_size=kernel_size, pooling=pooling)
        self.chunk_size = V.integer("chunk_size", chunk_size, low=1)
        self.policy = V.choice("policy", policy, POLICIES)
        self.reuse_every = V.integer("reuse_every", reuse_every, low=1)
        self.protect_window = bool(protect_window)
        self._last: Optional[Eviction] = None

    def _repr_args(self) -> Dict[str, object]:
        return {**super()._repr_args(), "chunk_size": self.chunk_size, "policy": self.policy,
                "reuse_every": self.reuse_every, "protect_window": self.protect_window}

    def begin(self, info) -> None:
        super().begin(info)
        self._last = None

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        info = inputs.info
        Hkv = inputs.keys.shape[1]
        if inputs.layer % self.reuse_every != 0 and self._last is not None:
            return self._last
        lengths = [int(n) for n in info.prompt_lengths]
        budgets = [budget_tokens(self.keep_ratio, n) for n in lengths]
        if all(b >= n for b, n in zip(budgets, lengths)):
            self._last = None
            return None
        dev = inputs.keys.device
        B, N = inputs.keys.shape[0], inputs.keys.shape[2]
        C = self.chunk_size
        S = -(-N // C)
        scores = self.window_scores(inputs, head_reduce="all_sum")                        # [B, N]
        seg_scores = segment_reduce(scores, chunk_size=C, reduce="mean", lengths=inputs.lengths,
                                    backend=info.backend)                                 # [B, S]
        starts = np.arange(S) * C
        lens = np.asarray(lengths)[:, None]
        sizes = np.clip(np.minimum(starts + C, lens) - starts, 0, None)                   # [B, S]
        protect = np.zeros((B, S), dtype=bool)
        if self.protect_window:
            w_start = np.asarray([n - w for n, w in zip(lengths, self.windows(lengths))])[:, None]
            protect = (starts + C > w_start) & (starts < lens)
        need = (sizes * protect).sum(1)
        bud = np.maximum(np.asarray(budgets), need)
        seg_keep = select_segments(seg_scores, to_device(sizes, dev), to_device(bud, dev), policy=self.policy,
                                   protect=to_device(protect, dev), backend=info.backend)
        mask = segments_to_token_mask(seg_keep, n_tokens=N, chunk_size=C)
        mask &= torch.arange(N, device=dev).unsqueeze(0) < inputs.lengths.unsqueeze(1)
        kept, counts = kept_from_mask(mask)
        ev = Eviction(kept.unsqueeze(1).expand(B, Hkv, kept.shape[1]).contiguous(),
                      np.repeat(counts[:, None], Hkv, axis=1))
        self._last = ev
        return ev
