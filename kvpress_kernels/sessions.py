"""Sessions over a compressed cache: compress an extension later (past chat turns as new segments), and
multi-turn chat.

Three pieces (docs/METHODS.md "Sessions"):

- :func:`evict` — the general primitive: evict from an already-filled :class:`~kvpress_kernels.PagedKVCache`
  by per-(layer, sequence, kv head) kept slot indices (or a keep mask over slots). It checks everything
  first (a rejected call changes nothing), then runs one :meth:`PagedKVCache.compact_all`, which copies on
  write any page another fork still reads and returns the freed tail pages to the pool. Whoever decides
  what to keep (a method re-run over the cache, a global KVzip-style budget over layers and heads) ends
  with this call.
- :func:`recompress` — re-compress an already-filled :class:`~kvpress_kernels.PagedCache` (a context plus
  extensions fed later: past chat turns, questions and answers) with a compression method over the tokens
  it holds, under a budget that is a fraction of the whole conversation so far. ShotKV with ``segments``
  (token spans over the whole cached sequence, e.g. past chat turns) keeps or drops whole segments; every
  token outside a segment (system prompt, the current turn) is protected. Scores come from the method,
  i.e. from the scoring op, with the queries :class:`QueryWindow` recorded.
- :class:`ChatSession` — multi-turn chat over the chat template: turns are segments the way shots are.

Which queries score a re-compression (the observation window). The scoring op needs the queries of the
window (the most recent turn), RoPE applied, as the model computed them. We *record* them when the tokens
are fed (:class:`QueryWindow`, attached as ``cache.query_window``): a ring buffer of the last ``size``
queries per layer, written by the attention call of every forward (prefill, extensions and decoding
steps). Recording is exact (they are the queries the model produced, at their real positions) and costs
one small copy per layer per forward, ``layers x batch x query heads x size x head_dim`` elements of
memory (about 2 MB for SmolLM2-135M at ``size = 64``), against re-running the window through the model
(a forward of ``size`` tokens over the whole cache, which would also append them again unless cropped).

How :func:`recompress` runs the method (one method layer, DESIGN.md §7): per layer and sequence the held
tokens are gathered into a dense, position-ordered pseudo-prompt (slot order after a compaction is not
position order), the recorded window becomes the last queries of that pseudo-prompt
(``PrefillInputs.query_offset``), segments given in positions are mapped to indices into it, and the
method's own :meth:`~kvpress_kernels.methods.CompressionMethod.prefill` decides what to keep, with its
keep ratio set so that its budget is ``budget(keep_ratio, tokens of the conversation so far)`` (a budget
over what was ever fed, not over what is left, so repeated re-compressions do not compound). The kept
pseudo-prompt indices map back to slots and one :func:`evict` applies every layer at once.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import _validate as V
from .cache import PagedKVCache
from .methods.base import CompressionMethod, GenerationInfo, PrefillInputs, budget_tokens
from .shots import normalize_batch_shots


# ------------------------------------------------------------------------------------------------
# Recording the observation window
# ------------------------------------------------------------------------------------------------

class QueryWindow:
    """The last ``size`` queries fed through each layer (RoPE applied), per sequence: a ring buffer
    ``[batch, query heads, size, head_dim]`` per layer, in the model's dtype.

    Attach one to a :class:`~kvpress_kernels.PagedCache` before feeding (``cache.query_window =
    QueryWindow(64)``, or :func:`record_queries`); the cache's attention call writes every forward's
    queries into it (prefill: the last ``size`` real queries of each prompt; extensions and decoding steps:
    all of theirs). Every sequence of a batch advances by the same tokens after the prefill, so the ring's
    newest entry is each sequence's newest token; ``available(layer)`` says how many are recorded per
    sequence (fewer than ``size`` for a short prompt). Forks get their own copy.
    """

    def __init__(self, size: int):
        self.size = V.integer("size", size, low=1)
        self.clear()

    def clear(self) -> None:
        self._ring: Dict[int, torch.Tensor] = {}
        self._head: Dict[int, int] = {}
        self._count: Dict[int, np.ndarray] = {}
        self.scale: Dict[int, float] = {}

    def fork(self) -> "QueryWindow":
        new = QueryWindow(self.size)
        new._ring = {k: v.clone() for k, v in self._ring.items()}
        new._head = dict(self._head)
        new._count = {k: v.copy() for k, v in self._count.items()}
        new.scale = dict(self.scale)
        return new

    def __deepcopy__(self, memo) -> "QueryWindow":
        return self.fork()

    def record_prefill(self, layer: int, queries: torch.Tensor, lengths: np.ndarray, scale: float) -> None:
        """``queries [B, Hq, N, D]`` left-aligned (token ``i`` at index ``i``, valid below ``lengths[b]``)."""
        B, Hq, N, D = queries.shape
        W = min(self.size, N)
        lengths = np.asarray(lengths, dtype=np.int64)
        idx = np.clip(lengths[:, None] - W + np.arange(W)[None, :], 0, max(N - 1, 0))        # [B, W]
        idx_t = torch.from_numpy(idx).to(queries.device)
        ring = queries.new_zeros(B, Hq, self.size, D)
        ring[:, :, :W] = torch.gather(queries, 2, idx_t.view(B, 1, W, 1).expand(B, Hq, W, D))
        self._ring[layer] = ring
        self._head[layer] = W
        self._count[layer] = np.minimum(lengths, W)
        self.scale[layer] = float(scale)

    def record(self, layer: int, queries: torch.Tensor, scale: float) -> None:
        """``queries [B, Hq, T, D]``: the newest ``T`` tokens of every sequence."""
        B, Hq, T, D = queries.shape
        ring = self._ring.get(layer)
        if ring is None or ring.shape[0] != B:
            ring = self._ring[layer] = queries.new_zeros(B, Hq, self.size, D)
            self._head[layer], self._count[layer] = 0, np.zeros(B, dtype=np.int64)
        if T >= self.size:
            ring.copy_(queries[:, :, T - self.size:])
            self._head[layer] = self.size
        else:
            slots = (self._head[layer] + torch.arange(T, device=ring.device)) % self.size
            ring.index_copy_(2, slots, queries.to(ring.dtype))
            self._head[layer] += T
        self._count[layer] = np.minimum(self._count[layer] + T, self.size)
        self.scale[layer] = float(scale)

    def available(self, layer: int, batch_size: int) -> np.ndarray:
        """``[B]`` queries recorded for each sequence (0 when nothing was recorded for ``layer``)."""
        c = self._count.get(layer)
        return np.zeros(batch_size, dtype=np.int64) if c is None else c.copy()

    def last(self, layer: int, window: int) -> torch.Tensor:
        """The newest ``window`` queries of every sequence, oldest first: ``[B, Hq, window, D]``."""
        ring = self._ring[layer]
        slots = (self._head[layer] - window + torch.arange(window, device=ring.device)) % self.size
        return ring.index_select(2, slots)


def record_queries(cache, size: int = 64) -> QueryWindow:
    """Attach a :class:`QueryWindow` of ``size`` to ``cache`` (a :class:`~kvpress_kernels.PagedCache`, before
    it is fed) and return it."""
    if cache.kv is not None:
        raise ValueError("record_queries: attach the window before the cache is prefilled (the queries fed so far "
                         "are gone)")
    cache.query_window = QueryWindow(size)
    return cache.query_window


# ------------------------------------------------------------------------------------------------
# The primitive: evict from a filled paged cache by kept slots
# ------------------------------------------------------------------------------------------------

def evict(kv: PagedKVCache, keep: torch.Tensor) -> Dict[str, int]:
    """Keep, in every (layer, sequence, kv head) row of ``kv``, only the slots ``keep`` lists, and free
    the pages that empties — the general "evict from an existing cache" primitive.

    Parameters
    ----------
    kv : PagedKVCache
        A filled cache, possibly a fork sharing pages with other caches (copy on write: a page another
        cache still owns is copied before this cache writes into it, never written through).
    keep : Tensor on ``kv.device``
        Either kept slot indices ``[layers, batch, kv_heads, K]`` (int32/int64; per row strictly
        ascending slots ``< length``, then ``-1`` padding), or a keep mask ``[layers, batch, kv_heads, S]``
        (bool, ``S >= max length``; ``False`` at and beyond each row's length). Slots, not positions: a
        slot's original position is in ``kv.gather(layer)[3]``.

    Returns
    -------
    dict
        ``tokens_before`` / ``tokens_after`` (summed over rows), ``pages_before`` / ``pages_after`` (this
        cache's pages), ``pool_pages_freed`` (pages that went back to the pool: a page a fork still owns
        stays in use), ``bytes_in_use`` (this cache's view afterwards).

    Raises
    ------
    TypeError, ValueError
        Naming ``keep``; checked on the host before anything changes (one device read: this is not a
        per-step op), so a rejected call changes nothing.
    """
    if not isinstance(kv, PagedKVCache):
        raise TypeError(f"kv must be a PagedKVCache, got {type(kv).__name__}")
    L, B, H = kv.num_layers, kv.batch_size, kv.num_kv_heads
    V.tensor("keep", keep, ndim=4, dtypes=V.INDEX_DTYPES + (torch.bool,), device=kv.device)
    V.shape("keep", keep, [L, B, H, None], "([layers, batch, kv_heads, K or S])")
    lengths = kv.seq_lengths()                                                   # [L, B, H] host
    if keep.dtype == torch.bool:
        if keep.shape[-1] < int(lengths.max(initial=0)):
            raise ValueError(f"keep (a mask) must cover every slot: its last dimension {keep.shape[-1]} is shorter "
                             f"than the longest row ({int(lengths.max())} slots)")
        m = keep.cpu().numpy()
        beyond = np.arange(m.shape[-1]) >= lengths[..., None]
        if (m & beyond).any():
            bad = np.argwhere(m & beyond)[0].tolist()
            raise ValueError(f"keep marks slot {bad[3]} of row (layer, seq, head) = {tuple(bad[:3])}, which holds "
                             f"only {int(lengths[tuple(bad[:3])])} tokens")
        counts = m.sum(-1).astype(np.int64)
        K = int(counts.max(initial=0))
        order = np.argsort(~m, axis=-1, kind="stable")[..., :K]
        kept = np.where(np.arange(K) < counts[..., None], order, -1).astype(np.int32)
    else:
        kept = keep.cpu().numpy().astype(np.int64)
        valid = kept >= 0
        counts = valid.sum(-1).astype(np.int64)
        K = kept.shape[-1]
        prefix = np.arange(K) < counts[..., None]
        if (valid != prefix).any() or ((kept < -1) & ~valid).any():
            bad = np.argwhere((valid != prefix) | (kept < -1))[0].tolist()
            raise ValueError(f"keep: row (layer, seq, head) = {tuple(bad[:3])} must list its kept slots first, then "
                             f"only -1 padding; got {kept[tuple(bad[:3])].tolist()}")
        if K > 1 and (np.diff(kept, axis=-1)[prefix[..., 1:]] <= 0).any():
            bad = np.argwhere((np.diff(kept, axis=-1) <= 0) & prefix[..., 1:])[0].tolist()
            raise ValueError(f"keep: the kept slots of row (layer, seq, head) = {tuple(bad[:3])} must be strictly "
                             f"ascending, got {kept[tuple(bad[:3])].tolist()}")
        over = np.where(valid, kept, -1) >= lengths[..., None]
        if over.any():
            bad = np.argwhere(over)[0].tolist()
            raise ValueError(f"keep: slot {int(kept[tuple(bad)])} of row (layer, seq, head) = {tuple(bad[:3])} is "
                             f"beyond its length {int(lengths[tuple(bad[:3])])}")
        kept = kept.astype(np.int32)
    before = {"tokens_before": int(lengths.sum()), "pages_before": kv.pages_in_use()}
    free_before = kv.num_free_pages()
    kept_t = torch.from_numpy(np.ascontiguousarray(kept)).to(kv.device)
    if kept_t.shape[-1] == 0:           # nothing kept anywhere: the op still wants one column
        kept_t = torch.full((L, B, H, 1), -1, dtype=torch.int32, device=kv.device)
    kv.compact_all(kept_t, new_lengths=counts)
    return {**before, "tokens_after": int(counts.sum()), "pages_after": kv.pages_in_use(),
            "pool_pages_freed": kv.num_free_pages() - free_before, "bytes_in_use": kv.bytes_in_use()}


def kept_from_keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """Kept slot indices ``[..., K]`` (ascending, ``-1`` padded, ``K`` = the most kept in a row) of a keep
    mask ``[..., S]`` (bool): the other form :func:`evict` takes."""
    V.tensor("mask", mask, dtypes=(torch.bool,))
    counts = mask.sum(-1, keepdim=True)
    K = int(counts.max()) if mask.numel() else 0
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :K]
    return torch.where(torch.arange(K, device=mask.device) < counts, order, -1).to(torch.int32)


# ------------------------------------------------------------------------------------------------
# Re-compression of a filled PagedCache with a method
# ------------------------------------------------------------------------------------------------

def conversation_lengths(cache) -> np.ndarray:
    """``[B]`` tokens of each sequence fed or generated so far (padding excluded): the positions of the
    cached sequence, and what :func:`recompress`'s budget is a fraction of."""
    return (cache._prompt_lengths + cache._extended + cache._generated).astype(np.int64)


def recompress(cache, method: Optional[CompressionMethod] = None, *, keep_ratio: Optional[float] = None,
               segments=None) -> Dict[str, Any]:
    """Re-compress an already-filled :class:`~kvpress_kernels.PagedCache` with ``method`` over the tokens
    it holds: e.g. ShotKV keeping or dropping whole past chat turns (``segments``) under a budget.

    Parameters
    ----------
    cache : PagedCache
        Prefilled (and usually extended: later questions, chat turns, answers). It may be a fork: pages
        it shares are copied before being written, never written through, and its parent is untouched.
    method : CompressionMethod, optional
        What decides; default ``cache.method``. It is deep-copied per (layer, sequence) and run on the
        position-ordered held tokens as a prefill (see the module docstring); ``cache.method``'s own state
        is only rebased (below). Methods that score with queries use the recorded window
        (``cache.query_window``, :func:`record_queries`): its newest queries whose tokens are still the
        newest held tokens; a method needing more (H2O needs every query) raises ``ValueError``.
    keep_ratio : float in (0, 1], optional
        Budget per (layer, sequence) row: ``budget(keep_ratio, n)`` tokens, ``n`` the tokens of the
        conversation so far (:func:`conversation_lengths`), in the method's rounding; default the
        method's ``keep_ratio``. Rows already within it are left alone. As in ShotKV's prefill, protected
        tokens count inside the budget and are all kept when they alone exceed it (reported).
    segments : list of (start, end), or one such list per sequence, optional
        Token spans over the whole cached sequence (positions ``0 .. n - 1``: the first prompt's tokens
        first, then every token fed or generated since), the units a segment method (ShotKV) keeps or
        drops whole; every token outside them is protected (never evicted). Tokens of a segment already
        evicted (an earlier re-compression, a decoding phase) are simply absent: the rest of it counts.

    Returns
    -------
    dict
        :func:`evict`'s report plus ``budgets`` (per sequence), ``kept`` (``[layers, batch, kv_heads]``
        tokens held afterwards, a list), ``window`` (recorded queries used per sequence, a list) and
        ``over_budget`` (the (layer, sequence) rows whose protected tokens alone exceeded the budget).

    After the eviction the cache's bookkeeping is rebased: every token fed or generated so far becomes
    prompt (``DecodeInputs.extended_ranges`` covers them, ``generated`` restarts at 0), so a decoding
    phase (ShotKV's) applies to the next answer's generated tokens only and never evicts what this call
    kept; ShotKV's frozen prefill count becomes the rows' new lengths.

    Raises
    ------
    TypeError, ValueError
        A bad argument, a cache that is not prefilled, rows of one (layer, sequence) holding different
        numbers of tokens in different kv heads (per-head budgets, e.g. AdaKV: not supported), segments
        with kv heads holding different tokens, or too few recorded queries. A rejected call changes
        nothing: every decision is made before the one :func:`evict`.
    """
    from .integrations.transformers import PagedCache

    if not isinstance(cache, PagedCache):
        raise TypeError(f"cache must be a kvpress_kernels PagedCache, got {type(cache).__name__}")
    if cache.kv is None:
        raise ValueError("cache is not prefilled: feed the context first (model(ids, past_key_values=cache))")
    method = cache.method if method is None else method
    if not isinstance(method, CompressionMethod):
        raise TypeError(f"method must be a kvpress_kernels CompressionMethod (the cache has none), got "
                        f"{type(method).__name__}")
    ratio = method.keep_ratio if keep_ratio is None else V.ratio("keep_ratio", keep_ratio)
    kv, spec = cache.kv, cache.spec
    L, B, H = kv.num_layers, kv.batch_size, kv.num_kv_heads
    seen = conversation_lengths(cache)
    segs = normalize_batch_shots(segments, seen.tolist(), name="segments")
    budgets = np.asarray([budget_tokens(ratio, int(n), method.budget_rounding) for n in seen], dtype=np.int64)
    qw = cache.query_window
    kept_rows: List[List[List[np.ndarray]]] = []
    used_window = np.zeros(B, dtype=np.int64)
    for layer in range(L):
        k, v, lengths, pos = kv.gather(layer)
        lengths = lengths.cpu().numpy().astype(np.int64)
        if pos is None:
            raise ValueError("recompress needs the cache's token positions (track_positions=True)")
        avail = qw.available(layer, B) if qw is not None else np.zeros(B, dtype=np.int64)
        rows: List[List[np.ndarray]] = []
        for b in range(B):
            n = int(lengths[b, 0])
            if (lengths[b] != n).any():
                raise ValueError(f"recompress: layer {layer} sequence {b} holds {lengths[b].tolist()} tokens in its kv "
                                 "heads; a method re-run over the cache needs the same count in every head")
            if budgets[b] >= n:
                rows.append([np.arange(n)] * H)
                continue
            big = torch.iinfo(torch.int32).max
            order = torch.sort(torch.where(pos[b] >= 0, pos[b], big), dim=-1, stable=True).indices[:, :n]   # [H, n]
            pos_s = torch.gather(pos[b], 1, order)
            keys = torch.gather(k[b], 1, order.unsqueeze(-1).expand(H, n, k.shape[-1])).unsqueeze(0)
            vals = torch.gather(v[b], 1, order.unsqueeze(-1).expand(H, n, v.shape[-1])).unsqueeze(0)
            ps = pos_s.cpu().numpy().astype(np.int64)
            # the recorded queries usable as the window: the newest tokens, still held as the newest ones
            W = 0
            top = int(seen[b])
            while W < min(int(avail[b]), n) and (ps[:, n - 1 - W] == top - 1 - W).all():
                W += 1
            used_window[b] = W
            q = qw.last(layer, W)[b:b + 1] if W else keys.new_zeros(1, spec.num_heads, 0, keys.shape[-1])
            shots = None
            if segs is not None:
                if not (ps == ps[:1]).all():
                    raise ValueError(f"recompress with segments: layer {layer} sequence {b} holds different tokens in "
                                     "different kv heads; segments are kept or dropped for every head alike")
                shots = []
                for s, e in segs[b]:
                    i0, i1 = int(np.searchsorted(ps[0], s)), int(np.searchsorted(ps[0], e))
                    if i1 > i0:
                        shots.append((i0, i1))
            info = GenerationInfo(num_layers=L, batch_size=1, num_heads=spec.num_heads, num_kv_heads=H,
                                  head_dim=spec.head_dim, prompt_lengths=(n,), shots=None if shots is None else [shots],
                                  device=kv.device, backend=cache.backend)
            m = copy.deepcopy(method)
            m.keep_ratio = float(budgets[b]) / n         # its budget over the n held tokens = budgets[b]
            m.budget_rounding = "ceil"
            m.begin(info)
            scale = qw.scale.get(layer, spec.head_dim ** -0.5) if qw is not None else spec.head_dim ** -0.5
            ev = m.prefill(PrefillInputs(layer=layer, queries=q, keys=keys, values=vals,
                                         lengths=torch.tensor([n], device=kv.device), scale=float(scale), info=info,
                                         query_offset=n - W))
            if ev is None:
                rows.append([np.arange(n)] * H)
                continue
            idx = ev.kept_idx[0].cpu().numpy().astype(np.int64)                    # [H, K] into the order
            ordr = order.cpu().numpy().astype(np.int64)
            rows.append([np.sort(ordr[h, idx[h][idx[h] >= 0]]) for h in range(H)])
        kept_rows.append(rows)
    K = max(1, max(len(r) for rows in kept_rows for hs in rows for r in hs))
    kept = np.full((L, B, H, K), -1, dtype=np.int32)
    for layer, rows in enumerate(kept_rows):
        for b, hs in enumerate(rows):
            for h, r in enumerate(hs):
                kept[layer, b, h, :len(r)] = r
    report = evict(kv, torch.from_numpy(kept).to(kv.device))
    _rebase(cache)
    after = kv.seq_lengths()
    over = [(layer, b) for layer in range(L) for b in range(B) if int(after[layer, b].max()) > int(budgets[b])]
    report.update({"budgets": budgets.tolist(), "kept": after.tolist(), "window": used_window.tolist(),
                   "over_budget": over})
    return report


def _rebase(cache) -> None:
    """After a re-compression: everything so far is prompt for the decoding phase (one extension range
    covering every token past the first prompt; ``generated`` restarts), and the method hears of it
    (:meth:`~kvpress_kernels.methods.base.CompressionMethod.rebased`: ShotKV's frozen prefill count per layer
    becomes the rows' new length minus that extension)."""
    total = int(cache._extended + cache._generated)
    cache._extended, cache._generated = total, 0
    cache._ext_ranges = [(0, total)] if total else []
    if cache.method is not None:
        cache.method.rebased(cache.kv.seq_lengths(), total)                       # lengths [L, B, H]


# ------------------------------------------------------------------------------------------------
# Multi-turn chat
# ------------------------------------------------------------------------------------------------

#: When :class:`ChatSession` enforces the budget: ``"every_turn"`` (after each turn is fed, the method
#: also compressing the first prefill and running its decoding phase) or ``"at_question"`` (only when
#: :meth:`ChatSession.ask` is called, before the answer: the cache is full until then, and no decoding
#: phase runs).
BUDGET_MODES = ("every_turn", "at_question")


class ChatSession:
    """A multi-turn chat over one compressed paged cache, rendered with the tokenizer's chat template.

    Turns are segments the way shots are: before each answer (from the second turn on) the cache is
    re-compressed (:func:`recompress`) to ``method.keep_ratio`` of the conversation so far, with the past
    exchanges (a user message and the assistant answer after it, ``unit="exchange"``, or every past
    message, ``unit="message"``) as the segments; the system prompt and the current turn are protected
    (never evicted), and the current turn's queries (recorded as it is fed, :class:`QueryWindow`) are the
    observation window. The method's decoding phase (ShotKV's ``decode_keep_ratio``) then compresses that
    answer's generated tokens only. With ShotKV, past turns are kept or dropped whole; a token-level method
    (SnapKV, StreamingLLM, ...) re-selects tokens over the whole held conversation the same way (its own
    rules; ``segments`` are passed and ignored). ``method=None``: the full cache, never compressed.

    The first turn (system prompt + first user message) is an ordinary compressed prefill by the method
    (ShotKV finds no segment in it and keeps it all). Every turn is fed as exactly the tokens the session
    records in :attr:`ids`: the template's text after the previous answer is tokenized on its own and
    appended to the generated tokens, never re-tokenized with them (what serving stacks do), so the
    cached sequence and the segment spans always agree.

    Parameters
    ----------
    model : transformers PreTrainedModel (Llama-like)
    tokenizer : a fast tokenizer with a chat template
    method : CompressionMethod or None
    system : str or None
        System prompt (protected). ``None``: none (a template may then insert its own default, which is
        part of the first exchange).
    unit : {"exchange", "message"}
    budget : {"every_turn", "at_question"}
        :data:`BUDGET_MODES`. ``"every_turn"`` (default): a chat under a memory budget at all times;
        ``"at_question"``: history replayed with :meth:`add_exchange` stays whole and the budget is enforced
        when a question is asked (query-aware over the whole conversation; no decoding phase).
    window : int
        Queries recorded per layer (the observation window must fit: the current turn for ShotKV, the last
        ``window_size`` tokens for SnapKV).
    page_size : int
    backend : str, optional
    template_kwargs : dict, optional
        Other keywords of ``apply_chat_template``.

    Attributes
    ----------
    messages : list of dict
        The conversation so far (answers as the decoded text of the generated tokens).
    ids : list of int
        Every token of the conversation so far, as fed or generated (the cached sequence's positions).
    turn_spans : list of (start, end)
        Position spans of the exchanges (or messages) so far; ``system_span`` the system prompt's.
    history : list of dict
        Per turn: ``seen`` (tokens so far), ``held`` (tokens held, summed over layers and kv heads),
        ``kept_fraction`` (held / (seen x layers x kv heads)), ``bytes_in_use``, ``recompress`` (its report or
        ``None``).
    cache : PagedCache
    """

    def __init__(self, model, tokenizer, method: Optional[CompressionMethod] = None, *,
                 system: Optional[str] = "You are a helpful assistant.", unit: str = "exchange", window: int = 256,
                 budget: str = "every_turn", page_size: int = 16, backend: Optional[str] = None,
                 template_kwargs: Optional[dict] = None):
        from .integrations.transformers import PagedCache
        from .shots import _need_fast

        if method is not None and not isinstance(method, CompressionMethod):
            raise TypeError(f"method must be a kvpress_kernels CompressionMethod or None, got {type(method).__name__}")
        if unit not in ("exchange", "message"):
            raise ValueError(f"unit must be 'exchange' or 'message', got {unit!r}")
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a str or None, got {type(system).__name__}")
        _need_fast(tokenizer)
        if not getattr(tokenizer, "chat_template", None) and not (template_kwargs or {}).get("chat_template"):
            raise ValueError("tokenizer has no chat template (pass template_kwargs={'chat_template': ...})")
        if budget not in BUDGET_MODES:
            raise ValueError(f"budget must be one of {BUDGET_MODES}, got {budget!r}")
        self.model, self.tokenizer, self.method, self.unit = model, tokenizer, method, unit
        self.budget = budget
        self.page_size, self.backend = page_size, backend
        self.template_kwargs = dict(template_kwargs or {})
        # at_question: the cache itself never compresses (no prefill compression, no decoding phase); ask()
        # re-compresses with the method
        cache_method = method if budget == "every_turn" else None
        self.cache = PagedCache(model, cache_method, shots=[[]], page_size=page_size, backend=backend)
        record_queries(self.cache, window)
        self.messages: List[dict] = [] if system is None else [{"role": "system", "content": system}]
        self.ids: List[int] = []
        self.turn_spans: List[tuple] = []
        self.system_span: Optional[tuple] = None
        self.history: List[Dict[str, Any]] = []
        self._pending: Optional[int] = None           # the last answer token: generated, not fed yet
        self._starts: List[tuple] = []                # (role, start position) of each message after the system
        self._prefix = ""                             # rendered text the cache holds (up to the last answer)

    def _render(self, msgs, gen: bool) -> str:
        return self.tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen,
                                                  **self.template_kwargs)

    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _piece(self, before: str, after: str) -> str:
        if not after.startswith(before):
            raise ValueError("the chat template does not render the conversation so far as a prefix of the "
                             "conversation with one more message, so turns cannot be appended to the cache")
        return after[len(before):]

    def segments(self, before: Optional[int] = None) -> List[tuple]:
        """Position spans of the past turns that start before position ``before`` (default: the current
        user message's start): what a re-compression may drop. Exchanges run from a user message's start
        to the next one's; with ``unit="message"`` every message is its own span."""
        if before is None:
            before = self._starts[-1][1] if self._starts else 0
        msgs = [(r, st) for r, st in self._starts if st < before]
        spans: List[tuple] = []
        for i, (role, st) in enumerate(msgs):
            end = msgs[i + 1][1] if i + 1 < len(msgs) else before
            if self.unit == "message" or role == "user" or not spans:
                spans.append((st, end))
            else:
                spans[-1] = (spans[-1][0], end)
        return [sp for sp in spans if sp[1] > sp[0]]

    def _append_user(self, text: str) -> List[int]:
        """Tokens that end the previous answer and add the user message ``text`` with the generation
        prompt; records where the message starts. Updates ``messages`` and ``_prefix``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        msgs = self.messages + [{"role": "user", "content": text}]
        full = self._render(msgs, True)
        if not self.ids:
            sys_text = self._render(self.messages, False) if self.messages else ""
            sys_ids = self._encode(sys_text)
            self.system_span = (0, len(sys_ids)) if sys_ids else None
            delta = sys_ids + self._encode(self._piece(sys_text, full))
            start = len(sys_ids)
        else:
            closed = self._render(self.messages, False)
            pending = [] if self._pending is None else [self._pending]
            closing = self._encode(self._piece(self._prefix, closed))
            delta = pending + closing + self._encode(self._piece(closed, full))
            start = len(self.ids) + len(pending) + len(closing)
        self._pending = None
        self._starts.append(("user", start))
        self.messages, self._prefix = msgs, full
        return delta

    def _feed(self, delta: List[int], protect_from: int, question: bool) -> Optional[Dict[str, Any]]:
        """Feed ``delta`` (prompt tokens) and re-compress with everything from ``protect_from`` on
        protected (the current turn, also the observation window). Returns the re-compression report."""
        import torch

        first = self.cache.kv is None
        self.ids += delta
        if not delta:
            return None
        with warnings.catch_warnings():
            # ShotKV on the first turn finds no segment: everything is protected, by design
            warnings.filterwarnings("ignore", message="ShotKV: the protected tokens")
            self.model(torch.tensor([delta]), past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            if self.method is None:
                return None
            if self.budget == "every_turn" and first:      # the method compressed the prefill itself
                return None
            if self.budget == "at_question" and not question:
                return None
            segs = self.segments(protect_from)
            from .methods.shotkv import ShotKV
            return recompress(self.cache, self.method, segments=segs if isinstance(self.method, ShotKV) else None)

    def _record(self, report, n_new: int, prompt_len: int, current: tuple) -> None:
        kv = self.cache.kv
        L, H = kv.num_layers, kv.num_kv_heads
        seen = int(conversation_lengths(self.cache)[0])
        held = int(kv.seq_lengths().sum())
        kept_q = None if report is None else float(np.sum(report["kept"])) / (L * H * (prompt_len - 1))
        self.history.append({"turn": len(self.history) + 1, "seen": seen, "held": held,
                             "kept_fraction": held / (seen * L * H), "kept_fraction_at_question": kept_q,
                             "bytes_in_use": kv.bytes_in_use(), "answer_tokens": n_new, "prompt_len": prompt_len,
                             "segments": self.segments(current[0]), "current": current, "recompress": report})

    def add_exchange(self, user: str, assistant: str) -> None:
        """Append a whole past exchange (a user message and its given answer) without generating —
        replaying a conversation, or teacher-forced answers — then enforce the budget as after any turn
        (this exchange is the current turn: protected, and the observation window)."""
        from .integrations.transformers import compress

        if not isinstance(assistant, str):
            raise TypeError(f"assistant must be a str, got {type(assistant).__name__}")
        delta = self._append_user(user)
        user_start = self._starts[-1][1]
        self._starts.append(("assistant", len(self.ids) + len(delta)))
        delta = delta + self._encode(assistant)
        self.messages = self.messages + [{"role": "assistant", "content": assistant}]
        self._prefix = self._prefix + assistant
        with compress(self.model, self.method, page_size=self.page_size, backend=self.backend):
            import torch
            with torch.no_grad():
                report = self._feed(delta, user_start, question=False)
        self._record(report, 0, len(self.ids) + 1, (user_start, len(self.ids)))

    def ask(self, text: str, *, max_new_tokens: int = 64, **gen_kwargs) -> str:
        """Add the user message ``text``, re-compress, generate the answer; return its text."""
        import torch

        from .integrations.transformers import compress

        delta = self._append_user(text)
        user_start = self._starts[-1][1]
        eos = gen_kwargs.pop("eos_token_id", None)
        if eos is None:
            eos = self.model.generation_config.eos_token_id
            if eos is None:
                eos = self.tokenizer.eos_token_id
        eos_set = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        with torch.no_grad(), compress(self.model, self.method, page_size=self.page_size, backend=self.backend):
            # all but the last token: the re-compression sees the turn, then generate feeds the last one
            report = self._feed(delta[:-1], user_start, question=True)
            self.ids.append(delta[-1])
            prompt_len = len(self.ids)
            out = self.model.generate(torch.tensor([self.ids]), attention_mask=torch.ones(1, prompt_len, dtype=torch.long),
                                      past_key_values=self.cache, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                      return_dict_in_generate=True, output_scores=True, **gen_kwargs)
        self.last_scores = out.scores          # per generated token: [1, vocab] processed logits
        new = out.sequences[0, prompt_len:].tolist()
        content_ids = new[:-1] if new and new[-1] in eos_set else new
        answer = self.tokenizer.decode(content_ids, skip_special_tokens=True)
        # generate never feeds its last token: it starts the next turn (an eos is replaced by the
        # template's own end of message)
        self._starts.append(("assistant", prompt_len))
        self.ids += new[:-1]
        self._pending = None if not new or new[-1] in eos_set else new[-1]
        self._prefix += answer
        self.messages = self.messages + [{"role": "assistant", "content": answer}]
        self._record(report, len(new), prompt_len, (user_start, prompt_len))
        return answer

    def close(self) -> None:
        """Give the cache's pages back."""
        self.cache.release()


__all__ = ["ChatSession", "QueryWindow", "record_queries", "evict", "kept_from_keep_mask", "recompress", "conversation_lengths"]
