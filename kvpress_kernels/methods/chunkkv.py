"""ChunkKV: whole fixed-length chunks kept by window score, shared across heads (DESIGN.md §6)."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .. import _validate as V
from ..ops.segments import segment_reduce, segments_to_token_mask
from ..ops.selection import POLICIES, select_segments, select_topk
from .base import Eviction, PrefillInputs, budget_tokens, kept_from_mask, to_device
from .snapkv import SnapKV

#: ``"tokens"`` (ours): chunks fill ``budget(n)`` TOKENS greedily; ``"chunks"`` (kvpress): the best
#: ``budget(ceil(n / chunk_size))`` CHUNKS are kept, whatever their sizes.
CHUNK_BUDGETS = ("tokens", "chunks")
#: ``"per_sequence"`` (ours): each sequence chooses its chunks; ``"first"`` (kvpress): the chunks chosen
#: for batch item 0 are kept by every sequence.
BATCH_CHOICES = ("per_sequence", "first")


class ChunkKV(SnapKV):
    """ChunkKV (Liu et al. 2025): keep whole chunks of ``chunk_size`` consecutive tokens, chosen by their
    mean SnapKV-style window score summed over every head of the layer; every kv head keeps the same
    tokens.

    Token score: attention mass from the last ``window_size`` prompt queries summed over all query heads
    (pooled like :class:`SnapKV`), or, when ``scorer`` is given, that method's ``token_scores`` (a
    ``[B, Hkv, N]`` tensor, e.g. :class:`SnapKV` or :class:`KNorm`) summed over the kv heads. Chunk score:
    the mean over the chunk's tokens (the last chunk of a prompt may be shorter). Chunks are taken
    greedily by score until ``ceil(keep_ratio * n)`` tokens (``policy="skip"`` passes over a chunk that
    does not fit — only the short last chunk can then still fit; ``"stop"`` ends there). The chunks that
    overlap the observation window are protected (they count against the budget first) when
    ``protect_window`` is true (own window scoring only: with a ``scorer`` the scorer's scores decide).

    kvpress-compatible options (:meth:`kvpress`, kvpress 0.5.5's ``ChunkKVPress``):
    ``chunk_budget="chunks"`` (keep the ``max(1, int(n_chunks * keep_ratio))`` best chunks, counted in
    chunks), ``batch_choice="first"`` (batch item 0 chooses for the whole batch),
    ``protect_window=False``, a kvpress-compatible ``scorer`` (default ``SnapKV.kvpress``), and a prompt
    shorter than one chunk falls back to the scorer's own token-level compression.

    Layer-wise index reuse (``reuse_every = N > 1``): layer ``l`` reuses the selection made by layer
    ``N * floor(l / N)`` instead of scoring (ChunkKV's observation that adjacent layers keep similar
    chunks); ``reuse_every = 1`` selects in every layer.

    The kept count depends on which chunks won (the short last chunk), so each selecting layer reads
    one count per sequence from the device.
    """

    def __init__(self, keep_ratio: float = 0.5, *, chunk_size: int = 10, window_size: int = 64,
                 kernel_size: int = 5, pooling: str = "avg", policy: str = "skip", reuse_every: int = 1,
                 protect_window: bool = True, budget_rounding: str = "ceil", window_score: str = "protect",
                 chunk_budget: str = "tokens", batch_choice: str = "per_sequence", scorer=None):
        super().__init__(keep_ratio, window_size=window_size, kernel_size=kernel_size, pooling=pooling,
                         budget_rounding=budget_rounding, window_score=window_score)
        self.chunk_size = V.integer("chunk_size", chunk_size, low=1)
        self.policy = V.choice("policy", policy, POLICIES)
        self.reuse_every = V.integer("reuse_every", reuse_every, low=1)
        self.protect_window = bool(protect_window)
        self.chunk_budget = V.choice("chunk_budget", chunk_budget, CHUNK_BUDGETS)
        self.batch_choice = V.choice("batch_choice", batch_choice, BATCH_CHOICES)
        if scorer is not None and not callable(getattr(scorer, "token_scores", None)):
            raise TypeError(f"scorer must be a method with token_scores(inputs) (e.g. SnapKV, KNorm), "
                            f"got {type(scorer).__name__}")
        self.scorer = scorer
        self._last: Optional[Eviction] = None

    @classmethod
    def kvpress(cls, compression_ratio: float, *, chunk_size: int = 20, scorer=None, **kwargs) -> "ChunkKV":
        """kvpress 0.5.5's ``ChunkKVPress(press=scorer, chunk_length=chunk_size)`` (``compression_ratio`` =
        fraction REMOVED; ``scorer`` default ``SnapKV.kvpress(compression_ratio)``)."""
        if scorer is None:
            scorer = SnapKV.kvpress(compression_ratio)
        for k, v in (("chunk_budget", "chunks"), ("batch_choice", "first"), ("protect_window", False),
                     ("budget_rounding", "floor"), ("window_score", "max_plus_one")):
            kwargs.setdefault(k, v)
        return cls(1.0 - compression_ratio, chunk_size=chunk_size, scorer=scorer, **kwargs)

    @property
    def supports_context_lengths(self) -> bool:  # type: ignore[override]
        return self.scorer is None or bool(getattr(self.scorer, "supports_context_lengths", False))

    def _repr_args(self) -> Dict[str, object]:
        out = {**super()._repr_args(), "chunk_size": self.chunk_size, "policy": self.policy,
               "reuse_every": self.reuse_every, "protect_window": self.protect_window}
        if self.chunk_budget != "tokens":
            out["chunk_budget"] = self.chunk_budget
        if self.batch_choice != "per_sequence":
            out["batch_choice"] = self.batch_choice
        if self.scorer is not None:
            out["scorer"] = self.scorer
        return out

    def begin(self, info) -> None:
        super().begin(info)
        if self.scorer is not None:
            self.scorer.begin(info)
        self._last = None

    def _token_scores(self, inputs: PrefillInputs) -> torch.Tensor:
        """Per-token scores ``[B, N]`` the chunks are ranked by."""
        if self.scorer is not None:
            return self.scorer.token_scores(inputs).sum(dim=1)
        if self.window_score == "max_plus_one":
            return self.token_scores(inputs).sum(dim=1)
        return self.window_scores(inputs, head_reduce="all_sum")

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        info = inputs.info
        Hkv = inputs.keys.shape[1]
        if inputs.layer % self.reuse_every != 0 and self._last is not None:
            return self._last
        lengths = [int(n) for n in info.prompt_lengths]
        keep_len = [int(n) for n in info.keep_lengths()]
        C = self.chunk_size
        if self.chunk_budget == "chunks" and self.scorer is not None and any(n < C for n in keep_len):
            if not all(n < C for n in keep_len):
                raise ValueError("ChunkKV(chunk_budget='chunks'): a batch mixing prompts shorter and longer than "
                                 f"chunk_size ({C}) has no kvpress equivalent")
            # kvpress: no complete chunk -> the scorer's own token-level compression
            self._last = self.scorer.prefill(inputs)
            return self._last
        budgets = [self.budget(n) for n in keep_len]
        if all(b >= n for b, n in zip(budgets, keep_len)) and keep_len == lengths:
            self._last = None
            return None
        dev = inputs.keys.device
        B, N = inputs.keys.shape[0], inputs.keys.shape[2]
        S = -(-N // C)
        rows = inputs.lengths if keep_len == lengths else to_device(keep_len, dev)
        scores = self._token_scores(inputs)                                               # [B, N]
        seg_scores = segment_reduce(scores, chunk_size=C, reduce="mean", lengths=rows,
                                    backend=info.backend)                                 # [B, S]
        starts = np.arange(S) * C
        lens = np.asarray(keep_len)[:, None]
        sizes = np.clip(np.minimum(starts + C, lens) - starts, 0, None)                   # [B, S]
        if self.chunk_budget == "chunks":
            n_chunks = -(-np.asarray(keep_len) // C)
            keep_chunks = [budget_tokens(self.keep_ratio, int(c), self.budget_rounding) for c in n_chunks]
            if self.batch_choice == "first":
                seg_keep, _ = select_topk(seg_scores[:1], keep_chunks[0], lengths=to_device(n_chunks[:1], dev),
                                          backend=info.backend)
                seg_keep = seg_keep.expand(B, S)
            else:
                seg_keep, _ = select_topk(seg_scores, to_device(np.asarray(keep_chunks, np.int64), dev),
                                          lengths=to_device(n_chunks, dev), max_budget=max(keep_chunks),
                                          backend=info.backend)
        else:
            protect = np.zeros((B, S), dtype=bool)
            if self.protect_window and self.scorer is None:
                w_start = np.asarray([n - w for n, w in zip(lengths, self.windows(lengths))])[:, None]
                protect = (starts + C > w_start) & (starts < lens)
            need = (sizes * protect).sum(1)
            bud = np.maximum(np.asarray(budgets), need)
            if self.batch_choice == "first":
                seg_scores, sizes, bud, protect = (seg_scores[:1].expand(B, S), np.repeat(sizes[:1], B, 0),
                                                   np.repeat(bud[:1], B), np.repeat(protect[:1], B, 0))
            seg_keep = select_segments(seg_scores.contiguous(), to_device(sizes, dev), to_device(bud, dev),
                                       policy=self.policy, protect=to_device(protect, dev), backend=info.backend)
        mask = segments_to_token_mask(seg_keep.contiguous(), n_tokens=N, chunk_size=C)
        mask &= torch.arange(N, device=dev).unsqueeze(0) < rows.unsqueeze(1)
        kept, counts = kept_from_mask(mask)
        ev = Eviction(kept.unsqueeze(1).expand(B, Hkv, kept.shape[1]).contiguous(),
                      np.repeat(counts[:, None], Hkv, axis=1))
        self._last = ev
        return ev
