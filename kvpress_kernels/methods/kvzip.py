"""KVzip: query-agnostic scores from context reconstruction, one budget shared by every layer and kv head.

KVzip (Kim et al. 2025, arXiv 2505.23416) scores a cached context key by the most attention it receives
while the model *reconstructs the context*: after the context is prefilled, the model reads a repeat
prompt followed by the context again, attending to the cached context, and key ``j`` of layer ``l``,
kv head ``h`` scores

    s[l, h, j] = max over the reconstruction queries q and the query heads g of h of softmax_j(q . K^T)

(:func:`~kvpress_kernels.ops.scoring.attention_mass_paged` with ``query_reduce="max"`` and
``head_reduce="group_max"``: fused, no ``[queries, keys]`` matrix on the GPU, chunked on the CPU). The
scores do not depend on any question, so the cache is compressed once and then answers many (fork it,
:meth:`~kvpress_kernels.integrations.transformers.PagedCache.fork`).

What runs (:meth:`KVzip.compress_prefilled`, after the context was prefilled whole into a
:class:`~kvpress_kernels.integrations.transformers.PagedCache`):

1. the context (minus a leading BOS) is cut into chunks of ``chunk_size`` tokens; chunk ``i`` is
   reconstructed from ``"\\n\\nRepeat the previous context exactly."`` (``i = 0``) or ``"\\n\\nRepeat the
   part of the previous context exactly, starting with"`` + the previous chunk's last 8 tokens, then the
   chat template's assistant header (``"\\n"`` without a chat template), then the chunk — kvpress 0.5.5's
   ``KVzipPress`` inputs, token for token;
2. each chunk goes through the decoder without its LM head, on a :meth:`fork` of the cache: the
   reconstruction tokens are appended to the fork only (copy on write), the fork is released after the
   chunk, so the cache never stores them; every layer's scores come from the fork's paged keys
   (context + reconstruction tokens, causal) right after that layer's attention;
3. ``select="global"`` (KVzip): sinks (the first ``n_sink`` tokens) protected, then exactly
   ``ceil(keep_ratio * n * layers * kv_heads)`` tokens per sequence over all layers and kv heads together
   (:func:`~kvpress_kernels.ops.head_budget.select_head_budget` over the ``layers * kv_heads`` rows, with an
   optional per-head floor ``head_floor * ceil(keep_ratio * n)``), and each (layer, sequence, kv head)
   is compacted to its own length (:meth:`PagedCache.evict`): the memory is really freed, where kvpress's
   ``KVzipPress`` masks the dropped keys in attention and keeps them stored.

Differences from kvpress's ``KVzipPress`` (by design): the softmax of a score is the model's own
attention distribution over the whole cached context plus the reconstruction tokens (kvpress
renormalises over the sinks, the chunk and the reconstruction tokens only — the same thing with one
chunk, apart from the tokens kvpress takes for the chat template's prefix); a key's score is the max
over every chunk's reconstruction (kvpress: its own chunk's); every context token is scored (kvpress
scores nothing in the chat-template prefix it assumes the context starts with, so those tokens score
0 and go first). Budgets: we keep ``ceil(keep_ratio * n * layers * kv_heads)``, kvpress evicts
``int(n * layers * kv_heads * compression_ratio)``: the same count up to one token of rounding.

Scorer for the per-layer methods (``select=``): ``"per_head"`` is SnapKV's rule (per (layer, kv head)
top ``ceil(keep_ratio * n)``, :class:`~kvpress_kernels.methods.ScorerTopK`); ``"shots"`` is ShotKV's
prefill phase ranking shots by their mean KVzip score summed over kv heads (ShotKV's decoding phase
follows when ``decode_keep_ratio < 1``); ``"chunks"`` is :class:`~kvpress_kernels.methods.ChunkKV` over
the KVzip scores (``chunk_size`` tokens per chunk, ``select_chunk_size`` here). Each is the method
itself, run once per layer on the filled cache with the KVzip scores in place of its own.

Cost: one decoder pass over ``n + ~15`` tokens per ``chunk_size`` chunk (no LM head) plus the two
scoring passes per layer; measured against the plain prefill in ``benchmarks/bench_kvzip.py``.
Batch: every sequence of the batch must hold the same number of context tokens (no padding).
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import _validate as V
from ..ops.decode_attention import paged_decode_attention
from ..ops.head_budget import select_head_budget
from ..ops.scoring import attention_mass, attention_mass_paged
from .base import CompressionMethod, DecodeInputs, Eviction, PrefillInputs, budget_tokens, to_device
from .chunkkv import ChunkKV
from .shotkv import ShotKV
from .simple import ScorerTopK

#: kvpress 0.5.5's reconstruction prompts (``KVzipPress.prepare``).
REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
REPEAT_PROMPT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with"
SELECTS = ("global", "per_head", "shots", "chunks")


def template_suffix(tokenizer) -> str:
    """The text between a user message and the assistant's reply in ``tokenizer``'s chat template (``"\\n"``
    without one): what kvpress's ``KVzipPress`` puts between the repeat prompt and the context."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n"
    dummy = "dummy context"
    sep = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + sep}], add_generation_prompt=True,
                                         tokenize=False, enable_thinking=False)
    return text.split(sep)[1]


def reconstruction_prompts(tokenizer) -> Dict[str, List[int]]:
    """Token ids of the repeat prompts and the template suffix (``first``, ``next``, ``suffix``, ``bos``)."""
    enc = lambda t: list(tokenizer.encode(t, add_special_tokens=False))  # noqa: E731
    bos = getattr(tokenizer, "bos_token_id", None)
    return {"first": enc(REPEAT_PROMPT), "next": enc(REPEAT_PROMPT_NEXT), "suffix": enc(template_suffix(tokenizer)),
            "bos": [] if bos is None else [int(bos)]}


def reconstruction_chunks(context_ids: torch.Tensor, prompts: Dict[str, List[int]], chunk_size: int,
                          prev_postfix: int = 8) -> List[torch.Tensor]:
    """The reconstruction inputs ``[B, R_i]`` of each chunk of ``context_ids [B, n]`` (module docstring,
    step 1). A leading BOS (``prompts["bos"]``) is not repeated."""
    start = 1 if prompts.get("bos") and bool((context_ids[:, 0] == prompts["bos"][0]).all()) else 0
    body = context_ids[:, start:]
    B = body.shape[0]
    chunks = [body[:, i:i + chunk_size] for i in range(0, body.shape[1], chunk_size)]
    out = []
    for i, c in enumerate(chunks):
        head = prompts["first"] if i == 0 else prompts["next"]
        parts = [torch.tensor([head], dtype=body.dtype, device=body.device).expand(B, -1)]
        if i > 0:
            parts.append(chunks[i - 1][:, -prev_postfix:])
        parts += [torch.tensor([prompts["suffix"]], dtype=body.dtype, device=body.device).expand(B, -1), c]
        out.append(torch.cat(parts, dim=1))
    return out


#: CPU: the reconstruction attention as two unmasked flash calls joined by their LSEs, then the scoring op's
#: max pass given that LSE (:func:`_reconstruction_attention_cpu`). Elsewhere (and with this off, which the
#: tests use to run the device path on CPU): the paged decode attention, then the paged scoring op with its
#: own LSE pass.
_CPU_FUSED = True


class _Done(Exception):
    """Raised from the last layer's attention hook: the reconstruction pass has every score it needs."""


def _dense_rows(kv, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V ``[B, Hkv, N, D]`` of a layer whose rows all hold ``N`` tokens (whole pages, one gather each)."""
    table, _ = kv.layer_view(layer)
    N = kv.max_length(layer)
    P = -(-N // kv.page_size)
    B, H = table.shape[0], table.shape[1]
    pages = table[:, :, :P].reshape(-1).long()
    k = kv.k_pages.index_select(0, pages).view(B, H, P * kv.page_size, -1)[:, :, :N]
    v = kv.v_pages.index_select(0, pages).view(B, H, P * kv.page_size, -1)[:, :, :N]
    return k, v


def _reconstruction_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int,
                                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One reconstruction layer on CPU: the causal attention output of the ``T`` chunk queries
    ``q [B, Hq, T, D]`` over ``k, v [B, Hkv, n + T, D]`` (``n`` context keys every query sees, then the
    chunk's own keys, causal), and each context key's KVzip score ``[B, Hkv, n]`` fp32: the max over the
    queries and the query heads of its kv head of its probability in that whole softmax.

    The attention is split where the mask is, so that torch's CPU flash kernel runs twice without a mask
    tensor: over the context keys (non-causal; the query heads of a kv head as its rows, no repeat of K/V)
    and over the chunk's own keys (causal, top-left aligned: its block skipping), joined through their
    log-sum-exps. The scores are then the scoring op's max pass over the context keys alone, given the joint
    LSE (probabilities of the whole causal softmax; the op's ``W <= keys`` rule: query blocks of at most
    ``n``)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kc, vc, ks, vs = k[:, :, :n], v[:, :, :n], k[:, :, n:], v[:, :, n:]
    qg = q.reshape(B, Hkv, G * T, D)                               # row g * T + t of kv head h
    try:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_c, lse_c = flash(qg, kc, vc, 0.0, False, scale=scale)[:2]
        out_s, lse_s = flash(q, ks.repeat_interleave(G, 1), vs.repeat_interleave(G, 1), 0.0, True, scale=scale)[:2]
    except Exception:  # pragma: no cover - an older torch without the op
        def _attn(qq, kk, vv, causal):
            logits = torch.matmul(qq.float() * scale, kk.float().transpose(-1, -2))
            if causal:
                logits.masked_fill_(torch.ones(logits.shape[-2:], dtype=torch.bool).triu_(1), float("-inf"))
            lse = torch.logsumexp(logits, dim=-1)
            return torch.matmul((logits - lse.unsqueeze(-1)).exp_(), vv.float()).to(qq.dtype), lse
        out_c, lse_c = _attn(qg, kc, vc, False)
        out_s, lse_s = _attn(q, ks.repeat_interleave(G, 1), vs.repeat_interleave(G, 1), True)
    lse_s, out_s = lse_s.reshape(B, Hkv, G * T), out_s.reshape(B, Hkv, G * T, D)
    lse = torch.logaddexp(lse_c, lse_s)
    out = out_c * (lse_c - lse).exp_().unsqueeze(-1).to(out_c.dtype) \
        + out_s * (lse_s - lse).exp_().unsqueeze(-1).to(out_s.dtype)
    lse = lse.reshape(B, Hq, T)
    score = None
    for w0 in range(0, T, max(1, n)):
        part = attention_mass(q[:, :, w0:w0 + n], kc, scale=scale, lse=lse[:, :, w0:w0 + n], causal=False,
                              head_reduce="group_max", query_reduce="max", backend="reference")
        score = part if score is None else torch.maximum(score, part)
    return out.reshape(B, Hq, T, D).to(q.dtype), score


class _LayerScores:
    """A scorer over precomputed per-layer scores ``[layers, B, Hkv, n]`` (the ``scorer`` / ``scores``
    argument the per-layer methods take)."""

    def __init__(self, scores: torch.Tensor):
        self.scores = scores

    def begin(self, info) -> None:
        return None

    def token_scores(self, inputs: PrefillInputs) -> torch.Tensor:
        return self.scores[inputs.layer]

    __call__ = token_scores


class _ShotKVOverScores(ShotKV):
    """ShotKV ranking shots by given token scores (summed over kv heads) instead of its window mass."""

    scorer: Optional[_LayerScores] = None

    def shot_token_scores(self, inputs: PrefillInputs) -> torch.Tensor:
        return self.scorer.token_scores(inputs).sum(dim=1)


class KVzip(CompressionMethod):
    """KVzip's query-agnostic compression (module docstring): reconstruction scores, then one selection.

    Use: prefill the context into a :class:`~kvpress_kernels.integrations.transformers.PagedCache` built
    with this method (its prefill stores every token), then :meth:`compress_prefilled` — or in one call,
    ``session.prefill(context_ids, tokenizer=tok)`` inside ``kvpress_kernels.compress(model, KVzip(...))``.
    Then fork the cache for each question.

    Parameters
    ----------
    keep_ratio : float in (0, 1]
        Fraction of the context's tokens kept, over all layers and kv heads together (``"global"``) or per
        (layer, kv head) (the per-layer selections).
    select : {"global", "per_head", "shots", "chunks"}
        The selection over the KVzip scores (module docstring).
    n_sink : int
        First tokens always kept (``"global"``, ``"per_head"``).
    chunk_size : int
        Context tokens reconstructed per pass (kvpress's default 2048; one pass for shorter contexts).
    head_floor : float in [0, 1]
        ``"global"``: every (layer, kv head) keeps at least ``head_floor * ceil(keep_ratio * n)`` tokens
        (sinks counted first); 0 (KVzip's choice) leaves the sinks as the only floor.
    decode_keep_ratio : float in (0, 1]
        ``"shots"``: ShotKV's decoding phase budget (1 = none).
    select_chunk_size : int
        ``"chunks"``: ChunkKV's chunk length.
    recon_dtype : torch.dtype or its name, optional
        Run the reconstruction pass's linear layers under ``torch.autocast`` in this dtype (``torch.bfloat16``:
        the reconstruction queries are approximate, the context keys, the attention and the scores stay in
        the cache's dtype). ``None`` (default): the model's own dtype, the exact KVzip scores. For fp32
        models on CPUs with bf16 matrix units (AVX512-BF16 / AMX), where it makes the pass several times
        cheaper (``benchmarks/bench_kvzip.py``); a bf16 model on a GPU gains nothing from it.
    tokenizer : transformers tokenizer, optional
        Builds the reconstruction prompts once (only their token ids are kept); else pass one to
        :meth:`compress_prefilled`.
    """

    def __init__(self, keep_ratio: float = 0.3, *, select: str = "global", n_sink: int = 4, chunk_size: int = 2048,
                 head_floor: float = 0.0, decode_keep_ratio: float = 1.0, select_chunk_size: int = 10,
                 recon_dtype: Optional[torch.dtype] = None, tokenizer=None):
        super().__init__(keep_ratio)
        self.select = V.choice("select", select, SELECTS)
        self.n_sink = V.integer("n_sink", n_sink, low=0)
        self.chunk_size = V.integer("chunk_size", chunk_size, low=1)
        if isinstance(head_floor, bool) or not isinstance(head_floor, (int, float)) or not 0 <= head_floor <= 1:
            raise ValueError(f"head_floor must be a float in [0, 1], got {head_floor!r}")
        self.head_floor = float(head_floor)
        self.decode_keep_ratio = V.ratio("decode_keep_ratio", decode_keep_ratio)
        self.select_chunk_size = V.integer("select_chunk_size", select_chunk_size, low=1)
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        if isinstance(recon_dtype, str) and recon_dtype in dtypes:
            recon_dtype = dtypes[recon_dtype]
        if recon_dtype is not None and recon_dtype not in dtypes.values():
            raise TypeError("recon_dtype must be None, torch.bfloat16, torch.float16 or torch.float32 (or their "
                            f"names), got {recon_dtype!r}")
        self.recon_dtype: Optional[torch.dtype] = recon_dtype
        self.prompts = None if tokenizer is None else reconstruction_prompts(tokenizer)
        self._selector: Optional[CompressionMethod] = None
        #: the last scores ``[layers, B, Hkv, n]`` (fp32), kept for inspection
        self.scores: Optional[torch.Tensor] = None

    def _repr_args(self) -> Dict[str, object]:
        out: Dict[str, object] = {"keep_ratio": self.keep_ratio, "select": self.select, "n_sink": self.n_sink,
                                  "chunk_size": self.chunk_size}
        if self.head_floor:
            out["head_floor"] = self.head_floor
        if self.select == "shots":
            out["decode_keep_ratio"] = self.decode_keep_ratio
        if self.recon_dtype is not None:
            out["recon_dtype"] = str(self.recon_dtype).replace("torch.", "")
        return out

    # -------------------------------------------------------------- the per-layer hooks
    def begin(self, info) -> None:
        super().begin(info)
        self._selector = None
        self.scores = None

    def expected_keep_fraction(self) -> float:
        # The prefill stores the whole context (compress_prefilled evicts afterwards), and the reconstruction
        # appends one layer's chunk at a time to a fork sharing the pool: 1/8 headroom holds that for models
        # of >= ~10 layers, where a pool that had to grow would double (old and new pools alive at once).
        return 1.125

    def prefill(self, inputs: PrefillInputs) -> Optional[Eviction]:
        return None       # scores need the reconstruction pass, after every layer is prefilled

    @property
    def needs_decode_probs(self) -> bool:  # type: ignore[override]
        return self._selector is not None and bool(self._selector.needs_decode_probs)

    def rebased(self, lengths: np.ndarray, extended: int) -> None:
        if self._selector is not None:          # ShotKV's decoding phase ("shots") keeps per-layer state
            self._selector.rebased(lengths, extended)

    def decode(self, inputs: DecodeInputs) -> Optional[Eviction]:
        # only ShotKV's decoding phase ("shots" with decode_keep_ratio < 1) compresses while decoding
        return None if self._selector is None else self._selector.decode(inputs)

    # -------------------------------------------------------------- scoring
    def reconstruction_scores(self, model, cache, context_ids: torch.Tensor, *, tokenizer=None) -> torch.Tensor:
        """KVzip scores ``[layers, B, Hkv, n]`` (fp32) of the ``n`` context tokens ``cache`` holds (module
        docstring, steps 1-2). ``cache`` is left as it was."""
        from ..integrations.transformers import ATTN_IMPLEMENTATION, PagedCache, _register

        if not isinstance(cache, PagedCache):
            raise TypeError(f"cache must be a kvpress_kernels PagedCache, got {type(cache).__name__}")
        if cache.kv is None:
            raise ValueError("cache holds nothing: prefill the context into it first")
        V.tensor("context_ids", context_ids, ndim=2, dtypes=V.INDEX_DTYPES)
        lengths = np.asarray(cache._prompt_lengths)
        B, n = int(context_ids.shape[0]), int(context_ids.shape[1])
        if cache._extended or cache._generated or (cache.kv.seq_lengths() != n).any() or (lengths != n).any() \
                or B != cache.kv.batch_size:
            raise ValueError(f"KVzip needs the cache right after the prefill of context_ids {list(context_ids.shape)} "
                             "(every sequence holding all its n tokens, nothing fed or evicted since, no padding)")
        prompts = self.prompts if tokenizer is None else reconstruction_prompts(tokenizer)
        if prompts is None:
            raise ValueError("KVzip needs a tokenizer for its repeat prompt: KVzip(..., tokenizer=tok) or "
                             "compress_prefilled(..., tokenizer=tok)")
        spec = cache.spec
        scores = torch.zeros(spec.num_layers, B, spec.num_kv_heads, n, dtype=torch.float32, device=cache.kv.device)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        backend = None if cache.backend == "cuda" else cache.backend     # the scoring op has no CUDA kernel
        last_layer = spec.num_layers - 1
        keep_context = torch.arange(n, dtype=torch.int32, device=scores.device).expand(B, spec.num_kv_heads, n)
        context_lengths = np.full((B, spec.num_kv_heads), n, dtype=np.int64)

        def hook(layer: int, query: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
            # the attention and the scores run in the cache's dtype, also under a reduced-precision reconstruction
            with torch.autocast(query.device.type, enabled=False):
                return layer_scores(layer, query.to(cache.kv.dtype), scale)

        def layer_scores(layer: int, query: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
            # the fork's rows all hold n + T tokens (nothing evicted yet): context, then this chunk's tokens
            kv = fork.kv
            table, lens = kv.layer_view(layer)
            query = query.contiguous()
            if query.device.type == "cpu" and _CPU_FUSED:
                # CPU: two unmasked flash calls joined by their LSEs, then the op's max pass (no [T, N] mask)
                k, v = _dense_rows(kv, layer)
                out, s = _reconstruction_attention_cpu(query, k, v, n, scale)
            else:
                used = -(-kv.max_length(layer) // kv.page_size)
                out, _ = paged_decode_attention(query, kv.k_pages, kv.v_pages, table[..., :used], lens, scale=scale,
                                                causal=True, backend=fork._attn_backend)
                s = attention_mass_paged(query, kv.k_pages, table, lens, max_len=kv.max_length(layer), scale=scale,
                                         causal=True, head_reduce="group_max", query_reduce="max", backend=backend)
            torch.maximum(scores[layer], s[..., :n], out=scores[layer])
            # this layer is done with the chunk's tokens: give their pages back now (the next layer appends
            # into them), so the reconstruction holds one layer's worth of extra pages, not every layer's
            kv.compact(layer, keep_context, new_lengths=context_lengths)
            if layer == last_layer:
                raise _Done       # the last layer's MLP, the final norm and the LM head are not needed
            return out

        _register()
        prev = model.config._attn_implementation
        model.config._attn_implementation = ATTN_IMPLEMENTATION
        try:
            dev = scores.device
            reduced = self.recon_dtype is not None and self.recon_dtype != cache.kv.dtype
            with torch.no_grad(), torch.autocast(dev.type, dtype=self.recon_dtype or torch.bfloat16, enabled=reduced):
                for ids in reconstruction_chunks(context_ids, prompts, self.chunk_size):
                    fork = cache.fork()
                    fork.attention_hook = hook
                    try:
                        decoder(input_ids=ids.to(scores.device), past_key_values=fork, use_cache=True)
                    except _Done:
                        pass
                    finally:
                        fork.release()
        finally:
            model.config._attn_implementation = prev
        return scores

    # -------------------------------------------------------------- selection
    def global_selection(self, scores: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """KVzip's selection over ``scores [layers, B, Hkv, n]``: ``(kept_idx [layers, B, Hkv, K], kept counts
        [layers, B, Hkv])`` holding exactly ``ceil(keep_ratio * n * layers * Hkv)`` tokens per sequence."""
        L, B, H, n = scores.shape
        total = budget_tokens(self.keep_ratio, n * L * H)
        floor = int(self.head_floor * budget_tokens(self.keep_ratio, n)) if self.head_floor else 0
        flat = scores.permute(1, 0, 2, 3).reshape(B, L * H, n).contiguous()
        dev = scores.device
        _, kept, counts = select_head_budget(flat, to_device([total] * B, dev, torch.int64), floor=floor,
                                             sink=min(self.n_sink, n), max_budget=min(n, total),
                                             backend=self.info.backend if self.info is not None else None)
        kept = kept.view(B, L, H, -1).permute(1, 0, 2, 3).contiguous()
        return kept, counts.view(B, L, H).permute(1, 0, 2).cpu().numpy().astype(np.int64)

    def _per_layer_selector(self, scores: torch.Tensor) -> CompressionMethod:
        scorer = _LayerScores(scores)
        if self.select == "per_head":
            return ScorerTopK(self.keep_ratio, scores=scorer)
        if self.select == "chunks":
            return ChunkKV(self.keep_ratio, chunk_size=self.select_chunk_size, scorer=scorer)
        sel = _ShotKVOverScores(prefill_keep_ratio=self.keep_ratio, decode_keep_ratio=self.decode_keep_ratio)
        sel.scorer = scorer
        return sel

    def compress_prefilled(self, model, cache, context_ids: torch.Tensor, *, tokenizer=None) -> Dict[str, object]:
        """Score ``cache``'s context by reconstruction and evict (module docstring). ``cache``: a
        :class:`PagedCache` built with this method, right after ``model(context_ids, past_key_values=cache)``.
        Returns (and merges into :attr:`stats`) the kept tokens and the time of each step."""
        t0 = time.perf_counter()
        scores = self.reconstruction_scores(model, cache, context_ids, tokenizer=tokenizer)
        t1 = time.perf_counter()
        self.scores = scores
        info = cache.info
        if self.select == "global":
            kept, counts = self.global_selection(scores)
            cache.evict(kept, new_lengths=counts)
        else:
            if self.select == "shots" and self.decode_keep_ratio < 1 and cache.method is not self:
                raise ValueError("KVzip(select='shots', decode_keep_ratio < 1) runs ShotKV's decoding phase through the "
                                 "cache's method: build the cache with this KVzip instance")
            sel = self._per_layer_selector(scores)
            sel.begin(info)
            kv = cache.kv
            lengths = to_device(cache._prompt_lengths, kv.device, torch.int64)
            kept_list, count_list = [], []
            for layer in range(cache.spec.num_layers):
                k, v, _, _ = kv.gather(layer)        # slot order is position order: nothing was evicted yet
                ev = sel.prefill(PrefillInputs(layer=layer, queries=k.new_zeros(0), keys=k, values=v, lengths=lengths,
                                               scale=1.0, info=info))
                if ev is None:                       # keeps everything
                    K = k.shape[2]
                    ev = Eviction(torch.arange(K, dtype=torch.int32, device=kv.device).expand(k.shape[0], k.shape[1], K)
                                  .contiguous(), kv.seq_lengths(layer))
                kept_list.append(ev.kept_idx)
                count_list.append(ev.new_lengths)
            cache.evict(kept_list, new_lengths=count_list)
            self._selector = sel
            # the decoding phase (ShotKV's) wants the decode-attention probabilities from now on
            cache._want_probs = bool(sel.needs_decode_probs)
        t2 = time.perf_counter()
        st = {"kvzip_score_s": t1 - t0, "kvzip_select_s": t2 - t1,
              "kvzip_kept_fraction": float(cache.kv.seq_lengths().sum()) / float(
                  cache.spec.num_layers * cache.spec.num_kv_heads * scores.shape[1] * scores.shape[3])}
        self.stats.update(st)
        return st


__all__ = ["KVzip", "REPEAT_PROMPT", "REPEAT_PROMPT_NEXT", "reconstruction_chunks", "reconstruction_prompts",
           "template_suffix"]
