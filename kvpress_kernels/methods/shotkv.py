"""ShotKV: shot-level prefill compression plus a separate compression of generated tokens
(Liu et al. 2025, "Can LLMs Maintain Fundamental Abilities under KV Cache Compression?"; DESIGN.md §6).
The choices the paper leaves open are listed in docs/METHODS.md."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import _validate as V
from ..ops.scoring import pool_scores
from ..ops.segments import segment_reduce, segments_to_token_mask
from ..ops.selection import POLICIES, select_segments, select_topk
from .base import (CompressionMethod, DecodeInputs, Eviction, PrefillInputs, budget_tokens, kept_from_mask,
                   to_device, window_mass)


#: How a shot's score is formed from its tokens' scores (docs/METHODS.md "ShotKV scoring options").
SHOT_SCORES = ("mean", "max", "topk_mean")
#: Which query heads' attention a token's score sums: ``"sum"`` over all heads (the paper), or the ``"max"``
#: over the heads (a token one head looks at hard is not drowned by the heads that ignore it).
HEAD_REDUCES = ("sum", "max")
#: ``"per_layer"``: each layer ranks the shots by its own scores (the paper); ``"cumulative"``: layer ``l``
#: ranks by the shot scores summed over layers ``0..l`` (the deepest layers decide with all the evidence
#: seen so far); ``"reuse"``: layer ``l`` reuses the selection of layer ``l - l % reuse_every`` (ChunkKV's
#: layer-wise index reuse).
LAYER_RANKINGS = ("per_layer", "cumulative", "reuse")


class ShotKV(CompressionMethod):
    """ShotKV: keep or drop whole few-shot exemplars (*shots*) at prefill, then compress the generated
    tokens on their own while decoding.

    Prefill, per layer, per sequence of ``n`` prompt tokens split into shots (caller-given token spans,
    see :mod:`kvpress_kernels.shots`) and non-shot spans (everything else: instruction, separators,
    the final question):

    1. token score ``s_j`` = attention mass key ``j`` receives from the observation-window queries,
       summed over **all** query heads of the layer (``attention_mass(..., head_reduce="all_sum")``);
    2. shot score = mean of ``s_j`` over the shot's tokens;
    3. non-shot spans and any shot that overlaps the observation window are protected: kept, and
       counted INSIDE the budget ``ceil(prefill_keep_ratio * n)`` — so ShotKV at keep 0.3 holds no
       more cache than SnapKV at keep 0.3;
    4. the other shots, ranked by score, are kept whole, greedily, while the kept tokens stay within
       the budget. ``policy="stop"`` (default, the paper's "in descending order until the budget is
       reached"): the first shot that does not fit ends the selection — also when it is the top-ranked
       one, which then keeps no shot at all (the budget's remainder stays unused, reported in
       :attr:`stats`); ``"skip"``: smaller, lower-ranked shots may still fill the remainder.

    When the protected tokens alone exceed the budget, they are all kept (the cache then holds more
    than the budget): never silently — :attr:`stats` records it (``"over_budget"``: per layer the
    sequences concerned; ``"protected_tokens"`` / ``"budget_tokens"`` per sequence) and a
    ``UserWarning`` is issued once per generation.

    Scoring options (the ablation is docs/results/ablation_shot_scoring.md; the defaults are the paper's
    rule above): ``shot_score`` = how step 2 reduces a shot's token scores — ``"mean"`` (the paper),
    ``"max"``, ``"topk_mean"`` (mean of the shot's ``shot_topk`` best tokens, all of them in a shorter
    shot); ``head_reduce`` = step 1's reduction over the query heads (``"sum"``, the paper, or ``"max"``);
    ``pool_size`` (odd, 1 = none) = SnapKV's centred average pooling of the token scores before step 2
    (:func:`~kvpress_kernels.ops.scoring.pool_scores`, zero padded, within each prompt; below ``2 n - 1``
    for the longest prompt ``n``: a window that wide covers the whole prompt from every token, every
    pooled score is the prompt's sum / ``pool_size`` and no shot can be told from another); ``layer_ranking``
    = which scores rank the shots of layer ``l`` (``"per_layer"``, the paper; ``"cumulative"``: the
    shot scores summed over layers ``0..l``; ``"reuse"``: the selection of layer ``l - l % reuse_every``,
    which skips the scoring of the other layers). A ranking shared by *all* layers from all layers'
    scores is not offered: the integration evicts each layer right after its prefill attention, so the
    first layers would have to hold the full prompt until the last one is scored (or the prompt be
    prefilled twice); ``"cumulative"`` is its causal version. The observation window (``window_size``
    ``None``) is already question-conditioned: it is the question (the tokens after the last shot).

    Every kv head keeps the same tokens. The compressed prefill cache is then frozen: decoding never
    evicts a prompt token. The segmentation, windows, protected masks and budgets are built once per
    generation (:meth:`begin`), not per layer; each layer runs one scoring launch for the whole batch
    (:func:`~kvpress_kernels.methods.base.window_mass`).

    Decoding (when ``decode_keep_ratio < 1``), per layer, after each step: a generated token's score is
    the attention it receives from the current query, summed over all heads; of the ``g`` tokens
    generated so far the top ``ceil(decode_keep_ratio * g)`` stay, the ``decode_recent`` most recent
    always among them (clipped to that budget). So after every step each row holds exactly
    ``prefill_kept + ceil(decode_keep_ratio * g)`` tokens.

    Parameters
    ----------
    prefill_keep_ratio : float in (0, 1]
        Prefill budget as a fraction of the prompt (also accepted as ``keep_ratio``). Default 0.5.
    decode_keep_ratio : float in (0, 1], optional
        Budget of generated tokens; default: equal to ``prefill_keep_ratio``. ``1.0`` disables decoding
        compression.
    window_size : int, optional
        Observation window. Default ``None``: the question, i.e. the tokens after the last shot
        (``min(fallback_window, n)`` last tokens when the prompt ends with a shot).
    fallback_window : int
        See ``window_size``.
    policy : {"stop", "skip"}
        Greedy fill rule (step 4).
    decode_recent : int
        Most recent generated tokens always kept while decoding.
    budget_rounding : {"ceil", "floor"}
        ``floor``: ``max(1, int(prefill_keep_ratio * n))``, kvpress's rounding.
    shot_score : {"mean", "max", "topk_mean"}
        Reduction of a shot's token scores (default ``"mean"``, the paper).
    shot_topk : int >= 1
        Tokens averaged by ``shot_score="topk_mean"``.
    head_reduce : {"sum", "max"}
        Reduction of the attention mass over the query heads (default ``"sum"``, the paper).
    pool_size : int, odd
        Average pooling of the token scores before the shot reduction (default 1: none). A pooling
        ``pool_size >= 2 n - 1``, with ``n`` the longest prompt of a generation, makes every token score
        equal (the window spans the whole prompt from every position): :meth:`begin` rejects it with a
        ``ValueError`` before any state changes.
    layer_ranking : {"per_layer", "cumulative", "reuse"}
        Which scores rank the shots of a layer (default ``"per_layer"``, the paper).
    reuse_every : int >= 1
        Period of ``layer_ranking="reuse"``.
    """

    supports_context_lengths = True

    def __init__(self, prefill_keep_ratio: Optional[float] = None, decode_keep_ratio: Optional[float] = None, *,
                 keep_ratio: Optional[float] = None, window_size: Optional[int] = None, fallback_window: int = 8,
                 policy: str = "stop", decode_recent: int = 4, budget_rounding: str = "ceil",
                 shot_score: str = "mean", shot_topk: int = 4, head_reduce: str = "sum", pool_size: int = 1,
                 layer_ranking: str = "per_layer", reuse_every: int = 2):
        if prefill_keep_ratio is not None and keep_ratio is not None:
            raise ValueError("keep_ratio is another name for prefill_keep_ratio: give only one of them")
        ratio = prefill_keep_ratio if prefill_keep_ratio is not None else keep_ratio
        super().__init__(0.5 if ratio is None else V.ratio(
            "prefill_keep_ratio" if prefill_keep_ratio is not None else "keep_ratio", ratio),
            budget_rounding=budget_rounding)
        self.decode_keep_ratio = (self.keep_ratio if decode_keep_ratio is None
                                  else V.ratio("decode_keep_ratio", decode_keep_ratio))
        self.window_size = None if window_size is None else V.integer("window_size", window_size, low=1)
        self.fallback_window = V.integer("fallback_window", fallback_window, low=1)
        self.policy = V.choice("policy", policy, POLICIES)
        self.decode_recent = V.integer("decode_recent", decode_recent, low=0)
        self.shot_score = V.choice("shot_score", shot_score, SHOT_SCORES)
        self.shot_topk = V.integer("shot_topk", shot_topk, low=1)
        self.head_reduce = V.choice("head_reduce", head_reduce, HEAD_REDUCES)
        self.pool_size = V.integer("pool_size", pool_size, low=1)
        if self.pool_size % 2 == 0:
            raise ValueError(f"pool_size must be odd (a centred pooling window), got {pool_size}")
        self.layer_ranking = V.choice("layer_ranking", layer_ranking, LAYER_RANKINGS)
        self.reuse_every = V.integer("reuse_every", reuse_every, low=1)
        self._ranking: Optional[torch.Tensor] = None   # running shot scores ("cumulative") or last selection
        self._ranking_layer = -1
        self._prefill_kept: Dict[int, np.ndarray] = {}
        self._plan: Optional[dict] = None

    @property
    def prefill_keep_ratio(self) -> float:
        return self.keep_ratio

    @property
    def needs_decode_probs(self) -> bool:  # type: ignore[override]
        return self.decode_keep_ratio < 1.0

    def _repr_args(self) -> Dict[str, object]:
        out = {"prefill_keep_ratio": self.keep_ratio, "decode_keep_ratio": self.decode_keep_ratio,
               "window_size": self.window_size, "policy": self.policy, "decode_recent": self.decode_recent}
        if self.budget_rounding != "ceil":
            out["budget_rounding"] = self.budget_rounding
        # the scoring options only when they differ from the paper's rule
        for name, default in (("shot_score", "mean"), ("head_reduce", "sum"), ("pool_size", 1),
                              ("layer_ranking", "per_layer")):
            if getattr(self, name) != default:
                out[name] = getattr(self, name)
        if self.shot_score == "topk_mean":
            out["shot_topk"] = self.shot_topk
        if self.layer_ranking == "reuse":
            out["reuse_every"] = self.reuse_every
        return out

    def begin(self, info) -> None:
        n = max(info.prompt_lengths, default=0)
        if self.pool_size > 1 and self.pool_size >= 2 * n - 1:
            raise ValueError(f"pool_size must be below 2 * n - 1 = {2 * n - 1} for the longest prompt (n = {n} "
                             f"tokens): a pooling window of {self.pool_size} covers the whole prompt from every "
                             "token, so every token score would be the same")
        super().begin(info)
        if info.shots is None:
            raise ValueError("shots must be given for ShotKV: pass shots=[(start, end), ...] (token spans of the "
                             "few-shot exemplars, see kvpress_kernels.find_shots) to compress() or generate()")
        self._prefill_kept = {}
        self._ranking = None
        self._ranking_layer = -1
        self._plan = self._make_plan(info)
        plan = self._plan
        self.stats = {"budget_tokens": plan["budgets"].tolist(), "protected_tokens": plan["protected"].tolist(),
                      "over_budget": {}, "kept_tokens": {}, "unused_budget": {}}
        over = [b for b in range(info.batch_size) if plan["protected"][b] > plan["budgets"][b]]
        if over and not plan["keep_all"]:
            warnings.warn(
                f"ShotKV: the protected tokens (non-shot spans and shots reaching into the observation window) "
                f"alone exceed the budget ceil({self.keep_ratio} * n) for sequence(s) {over} "
                f"(protected {[int(plan['protected'][b]) for b in over]} > budget "
                f"{[int(plan['budgets'][b]) for b in over]}): they are all kept, so the cache holds more than the "
                "budget; see ShotKV.stats['over_budget']", UserWarning, stacklevel=2)

    # -------------------------------------------------------------- segmentation of one prompt
    def segments(self, spans: List[Tuple[int, int]], n: int) -> List[Tuple[int, int, bool]]:
        """The prompt cut into consecutive ``(start, end, is_shot)`` segments covering ``[0, n)``."""
        out: List[Tuple[int, int, bool]] = []
        cur = 0
        for s, e in spans:
            if s > cur:
                out.append((cur, s, False))
            out.append((s, e, True))
            cur = e
        if cur < n:
            out.append((cur, n, False))
        return out

    def window(self, spans: List[Tuple[int, int]], n: int) -> int:
        if self.window_size is not None:
            return min(self.window_size, n)
        tail = n - (spans[-1][1] if spans else 0)
        return tail if tail > 0 else min(self.fallback_window, n)

    def _make_plan(self, info) -> dict:
        """Host data of one generation, shared by every layer: segments (of the keepable context),
        protected segments, budgets, and their device copies."""
        lengths = [int(n) for n in info.prompt_lengths]
        keep_len = [int(n) for n in info.keep_lengths()]
        B = len(lengths)
        shots = info.shots
        windows = [self.window(sp, n) for sp, n in zip(shots, lengths)]
        segs = [self.segments(sp, k) for sp, k in zip(shots, keep_len)]
        S = max(1, max(len(s) for s in segs))
        spans = np.zeros((B, S, 2), dtype=np.int64)
        protect = np.ones((B, S), dtype=bool)          # padding segments are empty: protecting them is free
        for b, k in enumerate(keep_len):
            spans[b, :, :] = k                         # empty padding segments at the row's end
            w0 = lengths[b] - windows[b]
            for i, (s, e, shot) in enumerate(segs[b]):
                spans[b, i] = (s, e)
                protect[b, i] = (not shot) or e > w0
        sizes = spans[..., 1] - spans[..., 0]
        budgets = np.asarray([self.budget(k) for k in keep_len], dtype=np.int64)
        protected = (sizes * protect).sum(1)
        keep_all = bool((budgets >= np.asarray(lengths)).all())
        dev = info.device
        return {"windows": windows, "budgets": budgets, "protected": protected, "keep_all": keep_all,
                "keep_len": keep_len, "sizes_host": sizes, "protect_host": protect,
                "spans": to_device(spans, dev), "sizes": to_device(sizes, dev), "protect": to_device(protect, dev),
                # the op checks protected <= budget: an overrun (reported) fills with the protected tokens only
                "budgets_dev": to_device(np.maximum(budgets, protected), dev),
                "rows": None if keep_len == lengths else to_device(keep_len, dev, torch.int64)}

    # -------------------------------------------------------------- prefill
    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        info = inputs.info
        plan = self._plan
        if plan is None or self.info is not info:
            self.begin(info)
            plan = self._plan
        lengths = [int(n) for n in info.prompt_lengths]
        B, Hkv, N = inputs.keys.shape[0], inputs.keys.shape[1], inputs.keys.shape[2]
        dev = inputs.keys.device
        if plan["keep_all"]:
            self._prefill_kept[inputs.layer] = np.asarray(lengths, dtype=np.int64)
            return None
        rows = inputs.lengths if plan["rows"] is None else plan["rows"]
        layer = int(inputs.layer)
        reused = (self.layer_ranking == "reuse" and layer % self.reuse_every != 0 and self._ranking is not None
                  and self._ranking_layer == layer - layer % self.reuse_every)
        if reused:
            seg_keep = self._ranking
        else:
            seg_scores = self.shot_scores(inputs, rows)                                  # [B, S]
            if self.layer_ranking == "cumulative":
                if self._ranking is not None and self._ranking_layer < layer:
                    seg_scores = seg_scores + self._ranking
                self._ranking, self._ranking_layer = seg_scores, layer
            # protected segments are kept first; where they alone exceed the budget (reported in begin())
            # the op's budget is theirs, so nothing else is kept
            seg_keep = select_segments(seg_scores, plan["sizes"], plan["budgets_dev"], policy=self.policy,
                                       protect=plan["protect"], backend=info.backend)
            if self.layer_ranking == "reuse":
                self._ranking, self._ranking_layer = seg_keep, layer
        mask = segments_to_token_mask(seg_keep, n_tokens=N, spans=plan["spans"])
        kept, counts = kept_from_mask(mask)
        self._prefill_kept[inputs.layer] = counts
        over = [b for b in range(B) if counts[b] > plan["budgets"][b]]
        if over:
            self.stats["over_budget"][inputs.layer] = over
        self.stats["kept_tokens"][inputs.layer] = counts.tolist()
        self.stats["unused_budget"][inputs.layer] = np.maximum(plan["budgets"] - counts, 0).tolist()
        return Eviction(kept.unsqueeze(1).expand(B, Hkv, kept.shape[1]).contiguous(),
                        np.repeat(counts[:, None], Hkv, axis=1))

    def shot_token_scores(self, inputs: PrefillInputs) -> torch.Tensor:
        """Token scores ``[B, N]`` the shots are ranked by (step 1): the observation-window mass reduced over
        all query heads (``head_reduce``). A subclass may rank by other scores (KVzip's reconstruction
        scores); the shot-scoring options (pooling, ``shot_score``, ``layer_ranking``) then apply to them."""
        return window_mass(inputs, self._plan["windows"], "all_" + self.head_reduce)

    def shot_scores(self, inputs: PrefillInputs, rows: torch.Tensor) -> torch.Tensor:
        """Score of every segment ``[B, S]`` (float32) of this layer under the scoring options (the
        protected segments get scores too; the selection ignores them)."""
        plan = self._plan
        backend = inputs.info.backend
        scores = self.shot_token_scores(inputs)                                            # [B, N]
        if self.pool_size > 1:
            scores = pool_scores(scores, "avg", self.pool_size, lengths=rows)
        if self.shot_score == "topk_mean":
            return segment_topk_mean(scores, plan["spans"], plan["sizes_host"], self.shot_topk, rows)
        return segment_reduce(scores, spans=plan["spans"], reduce=self.shot_score, lengths=rows, backend=backend)

    def rebased(self, lengths: np.ndarray, extended: int) -> None:
        # the decoding phase freezes "what the prefill kept" per layer: after a re-compression that is each
        # row's new length minus the extension (its decode step adds the extension back)
        for layer in range(lengths.shape[0]):
            self._prefill_kept[layer] = lengths[layer, :, 0].astype(np.int64) - int(extended)

    # -------------------------------------------------------------- decoding
    def decode(self, inputs: DecodeInputs) -> Optional[Eviction]:
        if self.decode_keep_ratio >= 1.0 or inputs.probs is None:
            return None
        info = inputs.info
        g = int(inputs.generated)
        budget_gen = budget_tokens(self.decode_keep_ratio, g)
        # the compressed prefill plus any prompt extension (prompt reuse) is frozen: never evicted here
        pre = self._prefill_kept[inputs.layer] + inputs.extended_count()
        held_gen = inputs.lengths_host - pre[:, None]                                     # [B, Hkv]
        if (held_gen <= budget_gen).all():
            return None
        B, Hkv, S = inputs.probs.shape
        dev = inputs.probs.device
        scores = shared_scores_by_position(inputs.probs, inputs.positions, int(inputs.seen_host.max()))
        recent = min(self.decode_recent, budget_gen)
        bounds = to_device(np.stack([np.asarray(info.prompt_lengths, dtype=np.int64),
                                     inputs.seen_host.astype(np.int64) - recent]), dev).view(2, B, 1, 1)
        pos = inputs.positions.long()
        # the frozen prefill cache and the most recent generated tokens
        protect = (pos >= 0) & ((pos < bounds[0]) | (pos >= bounds[1]))
        if inputs.extended_host is not None:
            protect |= inputs.extended_mask()
        new_len = pre[:, None] + np.minimum(held_gen, budget_gen)                         # [B, Hkv]
        bud = to_device(new_len.reshape(-1), dev)
        _, kept = select_topk(scores.reshape(B * Hkv, S), bud, lengths=inputs.lengths.reshape(-1).to(torch.int64),
                              protect=protect.reshape(B * Hkv, S), max_budget=int(new_len.max()),
                              backend=info.backend)
        return Eviction(kept.view(B, Hkv, -1), new_len.astype(np.int64))


def segment_topk_mean(scores: torch.Tensor, spans: torch.Tensor, sizes_host: np.ndarray, k: int,
                      lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of the ``k`` largest token scores of each segment (all of them in a segment of fewer tokens):
    ``out[b, s] = mean(top_k(scores[b, spans[b, s, 0] : spans[b, s, 1]]))``, tokens at or beyond
    ``lengths[b]`` excluded; 0 for an empty segment. ``scores: [B, N]``, ``spans: [B, S, 2]`` (device),
    ``sizes_host``: the segment sizes on the host (``[B, S]``, sizes the gather without a sync).
    Returns float32 ``[B, S]``. Plain PyTorch: one gather of ``[B, S, max size]`` and a ``topk``."""
    B, N = scores.shape
    S = spans.shape[1]
    L = max(1, int(np.asarray(sizes_host).max()) if np.asarray(sizes_host).size else 1)
    dev = scores.device
    x = scores.float()
    end = spans[..., 1]
    if lengths is not None:
        end = torch.minimum(end, lengths.to(end.dtype).view(B, 1))
    idx = spans[..., 0].unsqueeze(-1) + torch.arange(L, device=dev)                       # [B, S, L]
    valid = idx < end.unsqueeze(-1)
    vals = x.gather(1, idx.clamp(max=max(N - 1, 0)).reshape(B, S * L)).view(B, S, L)
    vals = torch.where(valid, vals, torch.full_like(vals, float("-inf")))
    kk = min(k, L)
    top = vals.topk(kk, dim=-1).values                                                   # [B, S, kk]
    count = valid.sum(-1).clamp(max=kk)                                                  # [B, S]
    rank = torch.arange(kk, device=dev)
    total = torch.where(rank < count.unsqueeze(-1), top, torch.zeros_like(top)).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1).to(total.dtype), torch.zeros_like(total))


def shared_scores_by_position(probs: torch.Tensor, positions: torch.Tensor, max_pos: int) -> torch.Tensor:
    """Per-slot score shared by every kv head of a sequence: ``out[b, h, s] = Σ_{h'} probs[b, h', s']``
    over the slots ``s'`` of every head that hold the same original position as ``(b, h, s)``.

    Going through positions keeps this right even if heads' slot orders differ; 0 for empty slots
    (``positions < 0``). ``probs, positions: [B, Hkv, S]``; returns float32 ``[B, Hkv, S]``."""
    B, H, S = probs.shape
    pos = positions.long()
    valid = pos >= 0
    idx = pos.clamp(min=0).reshape(B, H * S)
    buf = torch.zeros(B, max_pos + 1, dtype=torch.float32, device=probs.device)
    buf.scatter_add_(1, idx, torch.where(valid, probs.float(), 0.0).reshape(B, H * S))
    return torch.where(valid, buf.gather(1, idx).view(B, H, S), 0.0)
