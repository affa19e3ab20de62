"""H2O and TOVA: attention-accumulation methods that also evict while decoding (DESIGN.md §6)."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .. import _validate as V
from ..ops.scoring import attention_mass
from ..ops.head_budget import select_head_budget
from ..ops.selection import select_topk
from .base import (HEAD_BUDGETS, CompressionMethod, DecodeInputs, Eviction, PrefillInputs, budget_tokens,
                   check_head_alpha, head_budget_eviction, head_floor_tokens, scores_by_group, to_device, window_mass)

NORMALIZE = ("none", "queries")
from .shotkv import shared_scores_by_position
from .snapkv import topk_per_head


class H2O(CompressionMethod):
    """H2O, heavy-hitter oracle (Zhang et al. 2023): keep the tokens with the largest *accumulated*
    attention plus a window of recent tokens, per (sequence, kv head).

    Prefill: accumulated attention of key ``j`` = Σ over every prompt query (causal) and over the query
    heads of the kv head of its softmax probability (``attention_mass`` with ``W = n``,
    ``head_reduce="group_sum"``). Each row keeps ``budget = ceil(keep_ratio * n)`` tokens: the
    ``floor(recent_ratio * budget)`` most recent, then the heaviest hitters.

    Decoding (``compress_decode``): every step adds the step's attention probabilities (from the paged
    decode attention kernel, summed over the group) to each cached token's accumulated score; when a row
    holds more than ``ceil(keep_ratio * t)`` tokens (``t`` = tokens of the sequence so far) the lowest
    accumulated scores outside the recent window are evicted. ``keep_ratio = 1`` never evicts.

    ``normalize="queries"`` divides each key's prefill score by the ``n - j`` queries that see it and
    averages (instead of sums) over the group: kvpress's ``ObservedAttentionPress`` (while decoding, the
    accumulated score is divided by the ``t - j`` queries that have seen the token so far). The two rankings
    differ a lot (the unnormalised sum favours early keys, seen by more queries): on random-weight
    models the kept sets' Jaccard similarity goes down to ~0.4. :meth:`kvpress` gives kvpress 0.5.5's
    options: ``normalize="queries"``, ``recent_ratio=0``, ``budget_rounding="floor"``, prefill only.

    Parameters
    ----------
    keep_ratio : float in (0, 1]
    recent_ratio : float in [0, 1]
        Share of the budget reserved for the most recent tokens (the H2O paper splits half and half).
    compress_decode : bool
        Also evict while decoding.
    normalize : {"none", "queries"}
    budget_rounding : {"ceil", "floor"}
    head_budget : {"uniform", "adakv"}
        ``"adakv"``: at prefill and at every decoding eviction a sequence keeps ``Hkv * budget`` tokens over
        all its kv heads together (each head's recent window first, then at least
        ``max(1, int(head_alpha * budget))`` per head, then the heaviest hitters of every head) — AdaKV's
        selection, real per-head lengths in the paged cache.
    head_alpha : float in [0, 1]
    """

    def __init__(self, keep_ratio: float = 0.5, *, recent_ratio: float = 0.5, compress_decode: bool = True,
                 normalize: str = "none", budget_rounding: str = "ceil", head_budget: str = "uniform",
                 head_alpha: float = 0.2):
        super().__init__(keep_ratio, budget_rounding=budget_rounding)
        self.head_budget = V.choice("head_budget", head_budget, HEAD_BUDGETS)
        self.head_alpha = check_head_alpha("head_alpha", head_alpha)
        self.recent_ratio = V.ratio("recent_ratio", recent_ratio, allow_zero=True)
        self.compress_decode = bool(compress_decode)
        self.normalize = V.choice("normalize", normalize, NORMALIZE)
        self._acc: Dict[int, torch.Tensor] = {}

    @classmethod
    def kvpress(cls, compression_ratio: float, **kwargs) -> "H2O":
        """kvpress 0.5.5's ``ObservedAttentionPress`` (``compression_ratio`` = fraction REMOVED)."""
        for k, v in (("normalize", "queries"), ("recent_ratio", 0.0), ("compress_decode", False),
                     ("budget_rounding", "floor")):
            kwargs.setdefault(k, v)
        return cls(1.0 - compression_ratio, **kwargs)

    @property
    def needs_decode_probs(self) -> bool:  # type: ignore[override]
        return self.compress_decode and self.keep_ratio < 1.0

    def _repr_args(self):
        out = {**super()._repr_args(), "recent_ratio": self.recent_ratio, "compress_decode": self.compress_decode}
        if self.normalize != "none":
            out["normalize"] = self.normalize
        if self.head_budget != "uniform":
            out.update(head_budget=self.head_budget, head_alpha=self.head_alpha)
        return out

    def begin(self, info) -> None:
        super().begin(info)
        self._acc = {}

    def _recent(self, budget: int) -> int:
        return min(budget, int(self.recent_ratio * budget))

    def token_scores(self, inputs: PrefillInputs) -> torch.Tensor:
        """Accumulated attention ``[B, Hkv, N]`` over every prompt query (causal), 0 beyond lengths:
        the group sum, or with ``normalize="queries"`` kvpress's group mean of ``mass_j / (n - j)``.

        A ragged batch is one op call: the queries are the left-aligned prompt (``W = N``), which the
        op reads with per-row lengths (row ``b``'s query ``i`` is padding, and sees no key, for
        ``i >= lengths[b]`` only when ``lengths[b] < N``, so those rows are scored per length group).
        When the host gives each query's LSE (``inputs.lse``: the transformers path on CPU takes it from
        SDPA's flash kernel) the op uses it and makes one pass over the logits instead of two."""
        info = inputs.info
        lengths = [int(n) for n in info.prompt_lengths]
        N = inputs.keys.shape[2]
        dev = inputs.keys.device
        reduce = "group_mean" if self.normalize == "queries" else "group_sum"

        if inputs.query_offset:
            inputs.query_rows(to_device([0], dev, torch.long), 0, 1)      # raises: H2O needs every query

        def score(idx, n, w):
            if len(idx) == len(lengths) and n == N and inputs.lse is not None:
                # the host's attention gave each query's LSE: one mass pass, exp(logit - lse), no LSE pass
                return attention_mass(inputs.queries, inputs.keys, scale=inputs.scale, lse=inputs.lse,
                                      causal=True, head_reduce=reduce, backend=info.backend)
            if len(idx) == len(lengths):
                q, k = inputs.queries[:, :, :n], inputs.keys[:, :, :n]
            else:
                sel = to_device(idx, dev, torch.long)
                q = inputs.queries.index_select(0, sel)[:, :, :n]
                k = inputs.keys.index_select(0, sel)[:, :, :n]
            return attention_mass(q, k, scale=inputs.scale, causal=True, head_reduce=reduce, backend=info.backend)

        self._raw = scores_by_group(lengths, lengths, N, score)                           # [B, Hkv, N]
        if self.normalize != "queries":
            return self._raw
        j = torch.arange(N, device=dev, dtype=torch.float32).view(1, 1, N)
        seen_by = (inputs.lengths.view(-1, 1, 1).to(torch.float32) - j).clamp(min=1.0)
        return self._raw / seen_by

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        info = inputs.info
        lengths = [int(n) for n in info.prompt_lengths]
        N = inputs.keys.shape[2]
        dev = inputs.keys.device
        budgets = [self.budget(n) for n in lengths]
        need_scores = any(b < n for b, n in zip(budgets, lengths)) or self.needs_decode_probs
        if not need_scores:
            return None
        scores = self.token_scores(inputs)                                                # [B, Hkv, N]
        if self.needs_decode_probs:
            # accumulated (unnormalised) mass, indexed by position; normalize="queries" divides at use
            self._acc[inputs.layer] = self._raw.clone()
        if all(b >= n for b, n in zip(budgets, lengths)):
            return None
        B, Hkv = scores.shape[0], scores.shape[1]
        start = to_device([n - self._recent(b) for n, b in zip(lengths, budgets)], dev)
        protect = (torch.arange(N, device=dev).view(1, 1, N) >= start.view(B, 1, 1)).expand(B, Hkv, N)
        if self.head_budget == "adakv":
            return head_budget_eviction(scores, budgets, inputs.lengths, alpha=self.head_alpha, protect=protect,
                                        backend=info.backend)
        return topk_per_head(scores, budgets, inputs.lengths, protect=protect.reshape(B * Hkv, N),
                             backend=info.backend)

    def decode(self, inputs: DecodeInputs) -> Optional[Eviction]:
        if not self.needs_decode_probs or inputs.probs is None:
            return None
        info = inputs.info
        acc = self._acc[inputs.layer]
        B, Hkv, S = inputs.probs.shape
        dev = inputs.probs.device
        max_pos = int(inputs.seen_host.max())
        if acc.shape[-1] < max_pos:
            grown = acc.new_zeros(B, Hkv, max(2 * acc.shape[-1], max_pos))
            grown[..., :acc.shape[-1]] = acc
            acc = self._acc[inputs.layer] = grown
        pos = inputs.positions.long()
        valid = pos >= 0
        idx = pos.clamp(min=0)
        step = inputs.probs
        if self.normalize == "queries":  # the prefill scores are group means: add the step's group mean too
            step = step / (info.num_heads // info.num_kv_heads)
        acc.scatter_add_(2, idx, torch.where(valid, step, 0.0))
        # prompt tokens fed after the compressed prefill (prompt reuse) are kept outside the budget
        ext = inputs.extended_count()
        budgets = [self.budget(int(t - e)) for t, e in zip(inputs.seen_host, ext)]
        own = [int(e) + b for e, b in zip(ext, budgets)]
        if self.head_budget == "adakv":
            return self._decode_head_budget(inputs, acc, budgets, own)
        new_len = np.minimum(inputs.lengths_host, np.asarray(own, dtype=np.int64)[:, None])
        if (new_len == inputs.lengths_host).all():
            return None
        scores = torch.where(valid, acc.gather(2, idx), 0.0)
        if self.normalize == "queries":  # mean attention per query that has seen the token so far
            seen_by = (to_device(inputs.seen_host, dev, torch.float32).view(B, 1, 1) - pos.float()).clamp(min=1.0)
            scores = scores / seen_by
        start = to_device([int(t) - max(1, self._recent(b)) for t, b in zip(inputs.seen_host, budgets)], dev)
        protect = valid & ((pos >= start.view(B, 1, 1)) | inputs.extended_mask())
        bud = to_device(new_len.reshape(-1), dev)
        _, kept = select_topk(scores.reshape(B * Hkv, S), bud, lengths=inputs.lengths.reshape(-1).to(torch.int64),
                              protect=protect.reshape(B * Hkv, S), max_budget=int(new_len.max()),
                              backend=info.backend)
        return Eviction(kept.view(B, Hkv, -1), new_len.astype(np.int64))


    def _scores_and_protect(self, inputs: DecodeInputs, acc: torch.Tensor, budgets):
        B = inputs.probs.shape[0]
        dev = inputs.probs.device
        pos = inputs.positions.long()
        valid = pos >= 0
        scores = torch.where(valid, acc.gather(2, pos.clamp(min=0)), 0.0)
        if self.normalize == "queries":
            seen_by = (to_device(inputs.seen_host, dev, torch.float32).view(B, 1, 1) - pos.float()).clamp(min=1.0)
            scores = scores / seen_by
        start = to_device([int(t) - max(1, self._recent(b)) for t, b in zip(inputs.seen_host, budgets)], dev)
        protect = valid & ((pos >= start.view(B, 1, 1)) | inputs.extended_mask())
        return scores, protect

    def _decode_head_budget(self, inputs: DecodeInputs, acc: torch.Tensor, budgets, own) -> Optional[Eviction]:
        """``head_budget="adakv"`` while decoding: ``Hkv * own[b]`` tokens over the heads of sequence ``b``
        (the rows' lengths differ since the prefill), floor ``head_floor_tokens(budget)`` per head."""
        B, Hkv, S = inputs.probs.shape
        held = inputs.lengths_host.astype(np.int64).sum(1)                                  # [B]
        totals = np.minimum(held, Hkv * np.asarray(own, dtype=np.int64))
        if (totals == held).all():
            return None
        dev = inputs.probs.device
        scores, protect = self._scores_and_protect(inputs, acc, budgets)
        _, kept, _ = select_head_budget(
            scores, to_device(totals, dev, torch.int64),
            floor=to_device([head_floor_tokens(int(b), self.head_alpha) for b in budgets], dev, torch.int64),
            lengths=inputs.lengths.to(torch.int64), protect=protect, max_budget=min(S, int(totals.max())),
            backend=inputs.info.backend)
        return Eviction(kept, None)


class TOVA(CompressionMethod):
    """TOVA, token omission via attention (Oren et al. 2024): keep the tokens the *current* query attends
    to most, averaged over all heads of the layer; every kv head keeps the same tokens.

    Prefill: score = attention from the last prompt query summed over all query heads; keep
    ``ceil(keep_ratio * n)`` tokens (the last token always). Decoding (``compress_decode``): after each
    step, score = that step's attention probabilities summed over all heads; rows above
    ``ceil(keep_ratio * t)`` tokens drop their lowest-scored tokens (the newest token is always kept).
    """

    def __init__(self, keep_ratio: float = 0.5, *, compress_decode: bool = True):
        super().__init__(keep_ratio)
        self.compress_decode = bool(compress_decode)

    @property
    def needs_decode_probs(self) -> bool:  # type: ignore[override]
        return self.compress_decode and self.keep_ratio < 1.0

    def _repr_args(self):
        return {"keep_ratio": self.keep_ratio, "compress_decode": self.compress_decode}

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        info = inputs.info
        lengths = [int(n) for n in info.prompt_lengths]
        budgets = [self.budget(n) for n in lengths]
        if all(b >= n for b, n in zip(budgets, lengths)):
            return None
        B, Hkv, N = inputs.keys.shape[0], inputs.keys.shape[1], inputs.keys.shape[2]
        dev = inputs.keys.device

        scores = window_mass(inputs, [1] * B, "all_sum")                                  # [B, N], one launch
        shared = scores.unsqueeze(1).expand(B, Hkv, N)
        last = to_device([n - 1 for n in lengths], dev)
        protect = (torch.arange(N, device=dev).view(1, 1, N) == last.view(B, 1, 1)).expand(B, Hkv, N)
        return topk_per_head(shared, budgets, inputs.lengths, protect=protect.reshape(B * Hkv, N),
                             backend=info.backend)

    def decode(self, inputs: DecodeInputs) -> Optional[Eviction]:
        if not self.needs_decode_probs or inputs.probs is None:
            return None
        ext = inputs.extended_count()        # prompt extension (prompt reuse): kept outside the budget
        budgets = [self.budget(int(t - e)) + int(e) for t, e in zip(inputs.seen_host, ext)]
        new_len = np.minimum(inputs.lengths_host, np.asarray(budgets, dtype=np.int64)[:, None])
        if (new_len == inputs.lengths_host).all():
            return None
        B, Hkv, S = inputs.probs.shape
        dev = inputs.probs.device
        scores = shared_scores_by_position(inputs.probs, inputs.positions, int(inputs.seen_host.max()))
        newest = to_device(inputs.seen_host.astype(np.int64) - 1, dev).view(B, 1, 1)
        protect = (inputs.positions.long() == newest) | inputs.extended_mask()
        bud = to_device(new_len.reshape(-1), dev)
        _, kept = select_topk(scores.reshape(B * Hkv, S), bud, lengths=inputs.lengths.reshape(-1).to(torch.int64),
                              protect=protect.reshape(B * Hkv, S), max_budget=int(new_len.max()),
                              backend=inputs.info.backend)
        return Eviction(kept.view(B, Hkv, -1), new_len.astype(np.int64))
