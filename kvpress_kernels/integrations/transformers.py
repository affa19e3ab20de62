"""Hugging Face transformers integration: ``model.generate`` on a compressed paged KV cache (DESIGN.md §7).

Two pieces plug into transformers (>= 5):

- :class:`PagedCache`, a ``transformers.Cache`` backed by :class:`~kvpress_kernels.cache.PagedKVCache`;
- the attention function ``"kvpress_paged"``, registered with transformers' ``AttentionInterface``
  (and, for mask creation, ``AttentionMaskInterface`` with the SDPA mask).

How a generation runs, per layer (``with compress(model, method) as session: model.generate(...)``):

1. *Prefill* (the layer's first call): ``PagedCache.update`` hands the dense prompt K/V back unchanged
   and the attention function computes attention with torch SDPA, exactly as transformers' ``sdpa``
   implementation does. Then the method picks what each (sequence, kv head) keeps from the layer's
   queries, keys and values (views of transformers' tensors, padding removed, see below), and only the
   kept tokens are appended to the paged cache (:meth:`PagedKVCache.append_kept`, one gather and one
   append per layer) — the full prompt is never stored, so no compaction runs and no layer ever
   holds more pages than it keeps. Without a method every real token is appended.
2. *Decoding*: ``update`` appends the new token's K/V to the paged cache; the attention function runs
   :func:`~kvpress_kernels.ops.decode_attention.paged_decode_attention` over each row's own length and
   over the pages in use only (with the per-slot probabilities when the method wants them); a method
   that overrides ``decode`` then gets each slot's position and may evict (compaction). On the
   reference backend outside debug mode the step calls the reference directly: the cache built the
   page table and lengths, so re-checking their values every layer and step would cost more than
   the attention (``KVPRESS_KERNELS_DEBUG=1`` restores the checks, and the cache's invariant checks).

Padding: pads are never stored. At prefill the valid keys of each sequence are read from the 4-D
attention mask transformers built (key ``j`` is real iff token ``j`` may attend to itself), the valid
tokens are packed to the front, and only they are appended; decoding needs no mask at all since every
stored token is real. Left padding (what ``generate`` wants for decoder-only models) and right padding
both work; positions (RoPE) are whatever transformers gave the tokens.

Not supported (clear errors): beam search and other generation modes that reorder, crop or repeat the
cache; models whose attention does not go through ``AttentionInterface``, that have sliding-window
layers or attention logit soft-capping; one cache shared by two models. Supported families (tested on
tiny configs in tests/test_model_families.py): see the README. Works on transformers 5.0 to the newest
5.x; the few Cache-API changes within 5.x are absorbed by the shims in :mod:`._compat`.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from .. import _validate as V
from .._backend import debug_checks, resolve_backend
from ..cache import PagedKVCache
from ..methods.base import CompressionMethod, DecodeInputs, GenerationInfo, PrefillInputs
from ..ops.decode_attention import paged_decode_attention, paged_decode_attention_ref
from ..shots import normalize_batch_shots
from ._compat import MaxLengthCompat, cache_kwarg, mask_query_length

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface, PreTrainedModel
except Exception as exc:  # pragma: no cover - transformers missing or too old
    raise ImportError(f"kvpress_kernels.integrations.transformers needs transformers >= 5 ({exc})") from exc

ATTN_IMPLEMENTATION = "kvpress_paged"

# The cache whose update() ran last and whose attention call is due: update() and the attention call of
# a layer follow each other in the same thread, and transformers does not pass the cache to attention.
_STATE = threading.local()


def _timer_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Span:
    """Time one region: CUDA events on a GPU (read at the end of the generation, so timing never
    syncs the host mid-run), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> "_Span":
        if self.cuda:
            self.end.record()
        else:
            self.seconds = time.perf_counter() - self.t0
        return self

    def elapsed(self) -> float:
        return self.start.elapsed_time(self.end) / 1000.0 if self.cuda else self.seconds


# ------------------------------------------------------------------------------------------------
# Model inspection
# ------------------------------------------------------------------------------------------------

class _ModelSpec:
    def __init__(self, model):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a transformers PreTrainedModel (a causal LM), got {type(model).__name__}")
        cfg = model.config
        name = type(model).__name__
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(f"model {name} is an encoder-decoder model; only decoder-only Llama-like models "
                             "are supported")
        if not getattr(type(model), "_supports_attention_backend", False):
            raise ValueError(f"model {name} does not route its attention through transformers' AttentionInterface, "
                             "so the paged attention cannot be plugged in; supported: Llama-like models "
                             "(Llama, SmolLM2, Qwen2/3, Mistral and Phi-3 without sliding window, Gemma-2/3 "
                             "with full attention layers only; see the README)")
        text_cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        attn = [m for m in model.modules()
                if all(hasattr(m, a) for a in ("layer_idx", "num_key_value_groups", "head_dim", "scaling"))]
        L = getattr(text_cfg, "num_hidden_layers", None)
        if not attn or L is None or sorted(m.layer_idx for m in attn) != list(range(L)):
            raise ValueError(f"model {name} is not Llama-like: expected one attention module with layer_idx, "
                             f"num_key_value_groups, head_dim and scaling per layer ({L} layers), found {len(attn)}")
        layer_types = getattr(text_cfg, "layer_types", None)
        # Where a config lists layer_types (Qwen2/3, Gemma-2/3, ...) they decide which layers slide (a
        # sliding_window value alone is then unused); where it does not (Mistral, Phi-3) sliding_window does.
        if layer_types is not None:
            sliding = any(t != "full_attention" for t in layer_types) or \
                any(getattr(m, "sliding_window", None) for m in attn)
        else:
            sliding = bool(getattr(text_cfg, "sliding_window", None))
        if sliding:
            raise ValueError(f"model {name} has sliding-window or chunked attention layers, which the paged "
                             "cache does not support (it keeps every layer's whole context)")
        softcap = getattr(text_cfg, "attn_logit_softcapping", None)
        if softcap:
            raise ValueError(f"model {name} uses attention logit soft-capping (attn_logit_softcapping={softcap}), "
                             "which the paged decode attention does not apply")
        Hq = int(text_cfg.num_attention_heads)
        Hkv = int(getattr(text_cfg, "num_key_value_heads", None) or Hq)
        if Hq % Hkv != 0:
            raise ValueError(f"model {name} has {Hq} query heads, not a multiple of its {Hkv} kv heads")
        self.model_name = name
        self.config = cfg
        self.num_layers = L
        self.num_heads = Hq
        self.num_kv_heads = Hkv
        self.head_dim = int(attn[0].head_dim)
        self.module_ids = frozenset(id(m) for m in attn)


def _register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# ------------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------------

class _LayerView(MaxLengthCompat, CacheLayerMixin):
    """What transformers may ask one layer of the cache; the data lives in the shared PagedKVCache."""

    is_sliding = False
    is_compileable = False

    def __init__(self, parent: "PagedCache", layer: int):
        super().__init__()
        self.parent = parent
        self.layer = layer

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - never lazy
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return self.parent.update(key_states, value_states, self.layer)

    def get_mask_sizes(self, query) -> tuple[int, int]:
        return self.parent.get_seq_length() + mask_query_length(query), 0

    def get_seq_length(self) -> int:
        return self.parent.get_seq_length()

    def reset(self) -> None:
        self.parent.reset()


class PagedCache(MaxLengthCompat, Cache):
    """A ``transformers.Cache`` whose K/V live in a :class:`~kvpress_kernels.cache.PagedKVCache` and that
    compresses with ``method`` (``None``: no compression, the same paged path).

    Build it for one model; use it with that model's ``generate`` while the model runs the
    ``"kvpress_paged"`` attention (what :func:`compress` sets up, and creates this cache for you).

    Parameters
    ----------
    model : transformers PreTrainedModel (Llama-like, GQA or not)
    method : CompressionMethod or None
    shots : spans, optional
        ShotKV's shot spans (see :func:`kvpress_kernels.shots.normalize_batch_shots`).
    page_size : int
    backend : {"reference", "triton", "cuda"}, optional
        Forced on every op (default: by device).
    max_new_tokens : int, optional
        Only sizes the page pool up front (it grows when needed).

    Attributes
    ----------
    kv : PagedKVCache or None
        The paged storage, created at the first prefill call.
    lengths_after_prefill : ndarray ``[layers, batch, kv_heads]`` or None
        Tokens held per row once prefill compression finished.
    """

    def __init__(self, model, method: Optional[CompressionMethod] = None, *, shots=None, page_size: int = 16,
                 backend: Optional[str] = None, max_new_tokens: Optional[int] = None):
        self.spec = _ModelSpec(model)
        if method is not None and not isinstance(method, CompressionMethod):
            hint = " (pass an instance, e.g. ShotKV(0.3), not the class)" if isinstance(method, type) else ""
            raise TypeError(f"method must be a kvpress_kernels CompressionMethod or None, got "
                            f"{type(method).__name__}{hint}")
        self.method = method
        self.shots = shots
        self.page_size = V.integer("page_size", page_size, low=1)
        if backend is not None:
            V.choice("backend", backend, ("reference", "triton", "cuda"))
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        super().__init__(layers=[_LayerView(self, i) for i in range(self.spec.num_layers)])
        self.kv: Optional[PagedKVCache] = None
        self.info: Optional[GenerationInfo] = None
        self._seen = 0                # positions processed, padding included (what transformers counts)
        self._generated = 0           # decoding tokens appended per sequence
        self._extended = 0            # prompt tokens fed after the compressed prefill, per sequence
        self._ext_ranges: List[tuple] = []   # their (start, end) offsets past each prompt (one per extension)
        self._next_is_prompt = False  # the next forward continues the prompt (the first of a generate call)
        self._prefilled = [False] * self.spec.num_layers
        self._pack_idx: Optional[torch.Tensor] = None
        self._prompt_lengths: Optional[np.ndarray] = None
        self._compress_spans: List[_Span] = []
        self._t_prefill0: Optional[float] = None
        self._t_decode0: Optional[float] = None
        self._bytes_after_prefill: Optional[int] = None
        self._tokens_after_prefill: Optional[int] = None
        self.lengths_after_prefill: Optional[np.ndarray] = None
        #: Optional :class:`kvpress_kernels.sessions.QueryWindow`: records the last queries fed per layer
        #: (what :func:`kvpress_kernels.sessions.recompress` scores with); ``None``: nothing recorded.
        self.query_window = None
        #: ``fn(layer, query [B, Hq, T, D], scale) -> out [B, Hq, T, D] or None``, called in place of the paged
        #: attention of every forward after the prefill (the new K/V are already appended); returning ``None``
        #: runs the paged attention. KVzip computes its reconstruction attention and scores there, on a fork.
        self.attention_hook = None

    # -------------------------------------------------------------- transformers' Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs):
        # the extra arguments (``cache_kwargs`` up to transformers 5.3, ``kwargs=`` from 5.24) are not needed
        pending = getattr(_STATE, "pending", None)
        if pending is not None and pending[0] is self:
            _STATE.pending = None
            raise RuntimeError(
                "PagedCache.update was called but the previous layer's attention did not run the "
                f"'{ATTN_IMPLEMENTATION}' attention: use the cache inside kvpress_kernels.compress(model, ...) "
                "(or set model.config._attn_implementation to it)")
        spec = self.spec
        if key_states.dim() != 4 or key_states.shape[1] != spec.num_kv_heads or key_states.shape[3] != spec.head_dim:
            raise ValueError(
                f"PagedCache was built for {spec.model_name} with {spec.num_kv_heads} kv heads of dim {spec.head_dim}, "
                f"got key_states of shape {list(key_states.shape)}: a cache cannot be used across models")
        layer = V.integer("layer_idx", layer_idx, low=0, high=spec.num_layers - 1)
        T = key_states.shape[2]
        if layer == 0:
            if not self._prefilled[0]:
                self._t_prefill0 = time.perf_counter()
            elif self._t_decode0 is None:
                _timer_sync(key_states.device)
                self._t_decode0 = time.perf_counter()
        if not self._prefilled[layer]:
            phase = "prefill"
        else:
            if self.kv is None or key_states.shape[0] != self.kv.batch_size:
                raise ValueError(f"key_states has batch {key_states.shape[0]}, the cache holds "
                                 f"{None if self.kv is None else self.kv.batch_size} sequences")
            dt = self.kv.dtype
            if (key_states.dtype != dt or value_states.dtype != dt) and torch.is_autocast_enabled(key_states.device.type):
                # under autocast the projections come out in the autocast dtype (KVzip's reduced-precision
                # reconstruction): the cache stores its own dtype (outside autocast a mismatch stays an error)
                key_states, value_states = key_states.to(dt), value_states.to(dt)
            self.kv.append(layer, key_states, value_states)      # strided views: the op takes strides
            if layer == 0:
                # Prompt extension (a later question, the next chat turn) is prompt, not generated tokens:
                # the first forward of a generate() call on a prefilled cache, and any multi-token forward.
                if T > 1 or self._next_is_prompt:
                    start = self._extended + self._generated
                    if self._ext_ranges and self._ext_ranges[-1][1] == start:
                        self._ext_ranges[-1] = (self._ext_ranges[-1][0], start + T)
                    else:
                        self._ext_ranges.append((start, start + T))
                    self._extended += T
                else:
                    self._generated += T
            phase = "decode"
        if layer == 0:
            self._seen += T
            self._next_is_prompt = False
        _STATE.pending = (self, layer, phase)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen

    def get_mask_sizes(self, query, layer_idx: int = 0) -> tuple[int, int]:
        return self._seen + mask_query_length(query), 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.kv is not None

    def reset(self) -> None:
        """Forget everything (a fresh generation can start): pages back to the pool."""
        if self.kv is not None:
            self.kv.reset()
        self.kv = None
        self._seen = 0
        self._generated = 0
        self._extended = 0
        self._ext_ranges = []
        self._next_is_prompt = False
        self._prefilled = [False] * self.spec.num_layers
        if self.query_window is not None:
            self.query_window.clear()

    # -------------------------------------------------------------- prompt reuse
    def fork(self) -> "PagedCache":
        """A copy of this (prefilled, compressed) cache that shares its pages: the transformers way of
        prompt reuse (``copy.deepcopy(cache)`` is the same call). The copy continues with
        ``model.generate(full_ids, past_key_values=copy, ...)`` where ``full_ids`` is the context
        followed by the new tokens, which are prompt tokens (never evicted by a decoding phase). The
        context is stored once (:meth:`PagedKVCache.pool_bytes_in_use`); a copy's own pages (its new
        tokens, and the pages it had to copy before writing into them) go back with :meth:`release`.
        The method's per-generation state (e.g. H2O's accumulated scores) is copied too."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        memo: Dict[int, Any] = {id(self.spec): self.spec}
        new.method = copy.deepcopy(self.method, memo)
        new.info = copy.deepcopy(self.info, memo)
        new.layers = [_LayerView(new, i) for i in range(self.spec.num_layers)]
        new._prefilled = list(self._prefilled)
        new._ext_ranges = list(self._ext_ranges)
        new._compress_spans = list(self._compress_spans)
        for name in ("_prompt_lengths", "lengths_after_prefill"):
            if getattr(self, name) is not None:
                setattr(new, name, getattr(self, name).copy())
        new.kv = None if self.kv is None else self.kv.fork()
        new.query_window = None if self.query_window is None else self.query_window.fork()
        return new

    def __deepcopy__(self, memo) -> "PagedCache":
        return self.fork()

    def evict(self, kept_idx, new_lengths=None) -> Dict[str, int]:
        """Evict from the filled cache: per (layer, sequence, kv head) keep only the slots listed.

        ``kept_idx``: ``[layers, batch, kv_heads, K]`` or a list with one ``[batch, kv_heads, K_l]`` per
        layer, slots strictly ascending then ``-1`` (as in :class:`~kvpress_kernels.methods.Eviction`);
        ``new_lengths``: the kept counts (host ints of the same leading shape), optional — when given they
        must equal the number of listed slots of each row. Each row then holds its own length and the
        freed pages go back to the pool (shared pages copy on write first). This is
        :func:`kvpress_kernels.sessions.evict` on this cache's pages: every layer is checked before
        anything moves (a rejected call changes nothing), then one compaction. Compression that needs every
        layer's scores before it evicts (KVzip's budget shared across layers) and re-compression of a
        filled cache (:func:`~kvpress_kernels.sessions.recompress`) run through it; the ``*_after_prefill``
        statistics then describe the evicted cache. Returns :func:`~kvpress_kernels.sessions.evict`'s
        summary (tokens and pages before/after, pages returned to the pool)."""
        from ..sessions import evict as _evict_slots

        if self.kv is None:
            raise RuntimeError("PagedCache.evict: the cache holds nothing yet (prefill it first)")
        L = self.spec.num_layers
        if isinstance(kept_idx, torch.Tensor):
            kept = kept_idx
        else:
            if not isinstance(kept_idx, (list, tuple)) or len(kept_idx) != L:
                n = len(kept_idx) if isinstance(kept_idx, (list, tuple)) else type(kept_idx).__name__
                raise ValueError(f"kept_idx must hold one tensor per layer ({L}), got {n}")
            for i, t in enumerate(kept_idx):
                V.tensor(f"kept_idx[{i}]", t, ndim=3, dtypes=V.INDEX_DTYPES, device=self.kv.device)
                V.shape(f"kept_idx[{i}]", t, [self.kv.batch_size, self.spec.num_kv_heads, None],
                        "([batch, kv_heads, K])")
            K = max(1, max(int(t.shape[-1]) for t in kept_idx))
            kept = torch.stack([torch.nn.functional.pad(t.to(torch.int64), (0, K - t.shape[-1]), value=-1)
                                for t in kept_idx])
        V.tensor("kept_idx", kept, ndim=4, dtypes=V.INDEX_DTYPES, device=self.kv.device)
        V.shape("kept_idx", kept, [L, self.kv.batch_size, self.spec.num_kv_heads, None],
                "([layers, batch, kv_heads, K])")
        if new_lengths is not None:
            want = np.stack([np.asarray(x, dtype=np.int64) for x in new_lengths]) \
                if isinstance(new_lengths, (list, tuple)) else np.asarray(new_lengths, dtype=np.int64)
            have = (kept >= 0).sum(-1).cpu().numpy()
            if want.shape != have.shape or (want != have).any():
                raise ValueError(f"new_lengths must equal the number of slots kept_idx lists per row "
                                 f"(shape {list(have.shape)}), got shape {list(want.shape)} with other counts")
        summary = _evict_slots(self.kv, kept)
        if self._extended == 0 and self._generated == 0:
            self._bytes_after_prefill = self.kv.bytes_in_use()
            self.lengths_after_prefill = self.kv.seq_lengths()
            self._tokens_after_prefill = int(self.lengths_after_prefill.sum())
        return summary

    def release(self) -> None:
        """Give this cache's pages back (pages a fork still owns stay with it) and forget everything."""
        if self.kv is not None:
            self.kv.release()
        self.reset()

    def _unsupported(self, what: str):
        raise NotImplementedError(f"PagedCache does not support {what} (beam search, assisted or contrastive "
                                  "generation); use greedy decoding or sampling")

    def reorder_cache(self, beam_idx):
        self._unsupported("reorder_cache")

    def crop(self, max_length):
        self._unsupported("crop")

    def batch_repeat_interleave(self, repeats):
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")

    # -------------------------------------------------------------- prefill
    def _begin(self, key: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> None:
        """First prefill call (layer 0): find the real tokens, build the paged cache, start the method."""
        spec = self.spec
        B, _, N, _ = key.shape
        dev = key.device
        valid = _valid_keys(attention_mask, B, N, dev)                      # [B, N] bool
        lengths = valid.sum(1).cpu().numpy().astype(np.int64)               # one read, once per generation
        if (lengths == 0).any():
            raise ValueError(f"attention_mask leaves sequence {int(np.argmin(lengths))} with no token")
        self._prompt_lengths = lengths
        self._lengths_dev = torch.from_numpy(lengths).to(dev)
        n_max = int(lengths.max())
        if (lengths == N).all():
            self._pack_idx = None
        else:
            # stable sort of "is padding": real tokens first, in order
            self._pack_idx = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :n_max]
        shots = normalize_batch_shots(self.shots, lengths.tolist())
        frac = 1.0 if self.method is None else self.method.expected_keep_fraction()   # > 1: scratch (KVzip)
        # prefill stores only the kept tokens (scored first), so no layer ever holds the full prompt
        pages_kept = -(-int(np.ceil(frac * n_max)) // self.page_size)
        pages_new = -(-(self.max_new_tokens or 0) // self.page_size)
        rows = B * spec.num_kv_heads
        num_pages = rows * spec.num_layers * (pages_kept + pages_new + 1)
        self.kv = PagedKVCache(spec.num_layers, B, spec.num_kv_heads, spec.head_dim, num_pages=num_pages,
                               page_size=self.page_size, dtype=key.dtype, device=dev, track_positions=True,
                               backend=self.backend, grow=True)
        self.info = GenerationInfo(num_layers=spec.num_layers, batch_size=B, num_heads=spec.num_heads,
                                   num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                                   prompt_lengths=tuple(int(n) for n in lengths), shots=shots, device=dev,
                                   backend=self.backend)
        if self.method is not None:
            self.method.begin(self.info)
        # Decode-step choices made once per generation, not per layer per step.
        self._attn_backend = resolve_backend("paged_decode_attention", self.backend, dev, has=("reference", "triton"))
        m = self.method
        self._decode_hook = m is not None and type(m).decode is not CompressionMethod.decode
        self._want_probs = m is not None and bool(m.needs_decode_probs)

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, D]`` with padding -> ``[B, H, n_max, D]`` real tokens first, zeros after each length.
        Without padding ``x`` itself (a strided view: the ops need only a unit last stride)."""
        if self._pack_idx is None:
            return x
        B, H, _, D = x.shape
        n_max = self._pack_idx.shape[1]
        out = torch.gather(x, 2, self._pack_idx.view(B, 1, n_max, 1).expand(B, H, n_max, D))
        live = torch.arange(n_max, device=x.device).view(1, n_max) < self._lengths_dev.view(B, 1)
        return torch.where(live.view(B, 1, n_max, 1), out, torch.zeros((), dtype=x.dtype, device=x.device))

    def _prefill(self, layer: int, query, key, value, attention_mask, scale: float,
                 lse: Optional[torch.Tensor] = None) -> None:
        """Score first, then store only what the method keeps: one append of the kept tokens (gathered
        from the layer's dense K/V) instead of appending the whole prompt and compacting it."""
        if layer == 0:
            self._begin(key, attention_mask)
        elif self.kv is None:
            raise RuntimeError("PagedCache: layer 0 must be prefilled first")
        kv = self.kv
        k_p, v_p = self._pack(key), self._pack(value)
        self._prefilled[layer] = True
        if self.query_window is not None:
            self.query_window.record_prefill(layer, self._pack(query), self._prompt_lengths, float(scale))
        ev = None
        if self.method is not None:
            span = _Span(key.device)
            inputs = PrefillInputs(layer=layer, queries=self._pack(query), keys=k_p, values=v_p,
                                   lengths=self._lengths_dev, scale=float(scale), info=self.info,
                                   lse=lse if self._pack_idx is None else None)
            ev = self.method.prefill(inputs)
            if ev is not None:
                kv.append_kept(layer, k_p, v_p, ev.kept_idx, new_lengths=ev.new_lengths, seen=self._prompt_lengths)
            self._compress_spans.append(span.stop())
        if ev is None:
            kv.append(layer, k_p, v_p, counts=self._prompt_lengths)
        if layer == self.spec.num_layers - 1:
            self._bytes_after_prefill = kv.bytes_in_use()
            self.lengths_after_prefill = kv.seq_lengths()
            self._tokens_after_prefill = int(self.lengths_after_prefill.sum())

    # -------------------------------------------------------------- decoding
    def _decode(self, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        kv = self.kv
        if self.query_window is not None:
            self.query_window.record(layer, query, float(scale))
        if self.attention_hook is not None:
            out = self.attention_hook(layer, query, float(scale))
            if out is not None:
                return out
        table, lengths = kv.layer_view(layer)
        # Only the pages that hold tokens (the host knows the longest row): the attention, its
        # probabilities and the positions then span S = used pages * page_size slots, not the capacity.
        used = max(1, -(-kv.max_length(layer) // kv.page_size))
        table = table[..., :used]
        want_probs = self._want_probs
        if self._attn_backend == "reference" and not debug_checks():
            # The cache built this table and these lengths (its invariants are checked in debug mode),
            # so the launcher's value checks, which read them back every call, are skipped here.
            out, probs = paged_decode_attention_ref(query, kv.k_pages, kv.v_pages, table, lengths,
                                                    scale=float(scale), causal=True, return_probs=want_probs)
        else:
            out, probs = paged_decode_attention(query, kv.k_pages, kv.v_pages, table, lengths, scale=float(scale),
                                                causal=True, return_probs=want_probs, backend=self._attn_backend)
        if self._decode_hook:
            B, H = table.shape[0], table.shape[1]
            S = used * kv.page_size
            pos = kv.pos_pages.index_select(0, table.reshape(-1).long().clamp(min=0)).view(B, H, S)
            live = torch.arange(S, device=pos.device).view(1, 1, S) < lengths.unsqueeze(-1)
            positions = torch.where(live, pos, -1)
            seen = self._prompt_lengths + self._extended + self._generated
            inputs = DecodeInputs(layer=layer, generated=self._generated, probs=probs, positions=positions,
                                  lengths=lengths, lengths_host=kv.seq_lengths(layer), seen_host=seen, info=self.info,
                                  extended_host=np.full_like(self._prompt_lengths, self._extended),
                                  extended_ranges=np.asarray(self._ext_ranges, dtype=np.int64).reshape(-1, 2))
            ev = self.method.decode(inputs)
            if ev is not None:
                kv.compact(layer, ev.kept_idx, new_lengths=ev.new_lengths)
        return out

    # -------------------------------------------------------------- statistics
    def finish(self) -> None:
        """Mark the end of a generation (for the timings in :meth:`stats`)."""
        dev = self.kv.device if self.kv is not None else torch.device("cpu")
        _timer_sync(dev)
        self._t_end = time.perf_counter()

    def stats(self) -> Dict[str, Any]:
        """Memory and time of the last generation.

        ``kv_bytes_full``: K+V bytes the same paged cache would hold now without compression (every
        prompt and generated token, padding excluded, at page granularity); ``kv_bytes_after_prefill``:
        bytes in use once every layer's prefill compression ran; ``kv_bytes_final``: bytes in use at the
        end; ``kv_bytes_reserved``: the page pool's size; ``kv_tokens_*``: the same in tokens (summed over
        layers and kv heads). ``prefill_s``: the prefill forward pass (compression included, up to the
        first decoding step); ``compress_s``: the prefill compression itself (scoring, selection,
        compaction); ``decode_s``: the decoding steps. ``backend``: the decode-attention backend used.
        """
        kv = self.kv
        end = getattr(self, "_t_end", time.perf_counter())
        out: Dict[str, Any] = {"method": repr(self.method), "page_size": self.page_size}
        if kv is None:
            return out
        L, H = self.spec.num_layers, self.spec.num_kv_heads
        full_tokens = self._prompt_lengths + self._extended + self._generated                                # per sequence
        pages_full = L * H * int((-(-full_tokens // kv.page_size)).sum())
        out.update({
            "kv_bytes_full": pages_full * kv.page_bytes,
            "kv_bytes_after_prefill": self._bytes_after_prefill,
            "kv_bytes_final": kv.bytes_in_use(),
            "kv_bytes_reserved": kv.bytes_reserved(),
            "kv_tokens_full": L * H * int(full_tokens.sum()),
            "kv_tokens_after_prefill": self._tokens_after_prefill,
            "kv_tokens_final": int(kv.seq_lengths().sum()),
            "prompt_lengths": [int(n) for n in self._prompt_lengths],
            "generated_tokens": self._generated,
            "extended_prompt_tokens": self._extended,
            "kv_bytes_pool": kv.pool_bytes_in_use(),
            "prefill_s": ((self._t_decode0 or end) - self._t_prefill0) if self._t_prefill0 else 0.0,
            "compress_s": sum(sp.elapsed() for sp in self._compress_spans),
            "decode_s": (end - self._t_decode0) if self._t_decode0 else 0.0,
            "backend": self.backend or resolve_backend("paged_decode_attention", None, kv.device,
                                                       has=("reference", "triton")),
        })
        return out


def _valid_keys(mask: Optional[torch.Tensor], B: int, N: int, dev) -> torch.Tensor:
    """``[B, N]`` bool: which prompt keys are real tokens, from the 4-D mask transformers built
    (``[B or 1, 1, N, N]``, bool or additive float) — key ``j`` is real iff query ``j`` may attend to it
    (its diagonal entry). ``None`` (transformers skips the mask when nothing is padded): all real."""
    if mask is None:
        return torch.ones(B, N, dtype=torch.bool, device=dev)
    if mask.dim() != 4 or mask.shape[-1] != N or mask.shape[-2] != N:
        raise ValueError(f"prefill attention_mask must be [batch, 1, {N}, {N}], got {list(mask.shape)}")
    diag = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    if diag.dtype != torch.bool:
        diag = diag > torch.finfo(diag.dtype).min / 2
    return diag.expand(B, N)


# ------------------------------------------------------------------------------------------------
# The attention function
# ------------------------------------------------------------------------------------------------

def _sdpa_with_lse(module, query, key, value, attention_mask, dropout, scaling, is_causal):
    """``(out [B, N, Hq, D], lse [B, Hq, N])`` from the very kernel ``sdpa_attention_forward`` would run, or
    ``(None, None)`` when that is not sure.

    On CPU, torch's SDPA runs its flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``),
    which computes each query's log-sum-exp and returns it; ``F.scaled_dot_product_attention`` drops it.
    Calling that kernel directly when SDPA's own dispatch (``torch._fused_sdp_choice``) picks it gives
    the same output bit for bit and the LSE for free, so H2O's all-queries scoring needs one pass over
    the logits instead of two. Only the case transformers passes no mask in (no padding, causal, GQA
    native, no dropout)."""
    if (attention_mask is not None or dropout or query.device.type != "cpu" or query.shape[2] <= 1
            or not hasattr(module, "num_key_value_groups") or torch.jit.is_tracing()
            or torch.compiler.is_compiling() or query.requires_grad):
        return None, None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return None, None
    try:
        choice = torch._fused_sdp_choice(query, key, value, None, 0.0, True, scale=scaling, enable_gqa=True)
        flash = torch.nn.attention.SDPBackend.FLASH_ATTENTION
        if choice != int(flash):
            return None, None
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True,
                                                                               scale=scaling)
    except (AttributeError, RuntimeError, TypeError):      # another torch: the plain path
        return None, None
    return out.transpose(1, 2).contiguous(), lse


def paged_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function ``"kvpress_paged"``.

    With a :class:`PagedCache` whose ``update`` just ran for this layer: prefill runs SDPA on the dense
    prompt (as ``"sdpa"`` does) and then compresses the layer into the paged cache; decoding runs paged
    decode attention. Without one (``use_cache=False``, or another cache) it is plain SDPA.
    Returns ``(out [B, T, Hq, D], None)``.
    """
    pending = getattr(_STATE, "pending", None)
    if pending is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    _STATE.pending = None
    cache, layer, phase = pending
    if kwargs.get("softcap") or kwargs.get("sliding_window"):   # a model whose config did not say so
        raise ValueError(f"{cache.spec.model_name} layer {layer} asks for attention logit soft-capping or a sliding "
                         "window, which the paged cache and decode attention do not support")
    if id(module) not in cache.spec.module_ids:
        raise ValueError(f"this PagedCache was built for another model ({cache.spec.model_name}): a cache cannot be "
                         "used across models; create one per model (compress() does)")
    if getattr(module, "layer_idx", layer) != layer:
        raise RuntimeError(f"PagedCache: attention of layer {module.layer_idx} ran after the update of layer {layer}")
    scale = scaling if scaling is not None else module.head_dim ** -0.5
    if phase == "prefill":
        lse = None
        if cache.method is not None:
            out, lse = _sdpa_with_lse(module, query, key, value, attention_mask, dropout, scaling, is_causal)
        if lse is None:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, is_causal=is_causal, **kwargs)
        cache._prefill(layer, query, key, value, attention_mask, scale, lse=lse)
        return out, None
    out = cache._decode(layer, query, scale)
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------

class CompressionSession:
    """What :func:`compress` yields. ``stats`` holds :meth:`PagedCache.stats` of the last ``generate``
    call; ``cache`` the last :class:`PagedCache` (its ``kv`` is the paged storage); ``shots`` the spans
    used by the next call (a ``shots=`` keyword of ``model.generate`` overrides them for that call)."""

    def __init__(self, model, method, *, shots, page_size: int, backend: Optional[str]):
        self.model = model
        self.method = method
        self.shots = shots
        self.page_size = page_size
        self.backend = backend
        self.stats: Dict[str, Any] = {}
        self.cache: Optional[PagedCache] = None

    def new_cache(self, shots=None, max_new_tokens: Optional[int] = None) -> PagedCache:
        return PagedCache(self.model, self.method, shots=self.shots if shots is None else shots,
                          page_size=self.page_size, backend=self.backend, max_new_tokens=max_new_tokens)

    def prefill(self, input_ids: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None, tokenizer=None,
                max_new_tokens: Optional[int] = None) -> PagedCache:
        """Prefill a context once and compress it, for prompt reuse: ``model(input_ids, past_key_values=cache)``
        on a new cache, then, for a method that compresses after the whole prefill (``compress_prefilled``:
        :class:`~kvpress_kernels.methods.KVzip`, which needs ``tokenizer`` for its repeat prompt), that step.
        Returns the cache; fork it per question (``model.generate(context + question, past_key_values=
        cache.fork(), ...)``)."""
        cache = self.new_cache(max_new_tokens=max_new_tokens)
        with torch.no_grad():
            self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                       logits_to_keep=1)
            hook = getattr(self.method, "compress_prefilled", None)
            if hook is not None:
                hook(self.model, cache, input_ids, tokenizer=tokenizer)
        self.cache = cache
        return cache

    def generate(self, *args, **kwargs):
        model = self.model
        shots = kwargs.pop("shots", None)
        gen_cfg = kwargs.get("generation_config") or model.generation_config
        if int(kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1) > 1:
            raise ValueError("num_beams > 1 (beam search) is not supported with a compressed paged cache")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
            raise ValueError("assisted generation is not supported with a compressed paged cache")
        cache, renamed = kwargs.pop("past_key_values", None), kwargs.pop("cache", None)   # renamed in 5.24
        cache = renamed if cache is None else cache
        input_ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        if input_ids is not None:  # (inputs_embeds callers pass none)
            V.generation_inputs(model, input_ids, kwargs.get("attention_mask"), shots if shots is not None
                                else self.shots, check_shots=cache is None)
        if cache is None:
            cache = self.new_cache(shots, kwargs.get("max_new_tokens") or getattr(gen_cfg, "max_new_tokens", None))
        elif not isinstance(cache, PagedCache):
            raise ValueError(f"past_key_values must be a kvpress_kernels PagedCache inside compress(), "
                             f"got {type(cache).__name__}")
        elif cache.spec.module_ids != _ModelSpec(model).module_ids:
            raise ValueError("past_key_values is a PagedCache built for another model: a cache cannot be used "
                             "across models")
        if cache.kv is not None:   # a prefilled cache (prompt reuse): the new tokens are prompt
            _check_extension(cache, input_ids, kwargs.get("attention_mask"))
            cache._next_is_prompt = True
        self.cache = cache
        try:
            out = type(model).generate(model, *args, **{cache_kwarg(model): cache}, **kwargs)
        finally:
            _STATE.pending = None
        cache.finish()
        self.stats = cache.stats()
        return out


def _check_extension(cache: PagedCache, input_ids, attention_mask) -> None:
    """Prompt reuse: ``input_ids`` must be the cached context (``cache.get_seq_length()`` positions,
    padding included) followed by new tokens, none of them padding (a ragged extension would need
    padding inside the sequence, which the paged cache does not store)."""
    seen = cache.get_seq_length()
    if input_ids is not None and input_ids.shape[1] <= seen:
        raise ValueError(f"input_ids has {input_ids.shape[1]} positions but the cache already holds {seen}: pass "
                         "the context followed by the new tokens")
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, seen:].all()):
        raise ValueError("attention_mask pads some of the new tokens after the cached context: every sequence "
                         "must continue with the same number of real tokens")


@contextlib.contextmanager
def compress(model, method: Optional[CompressionMethod], *, shots=None, page_size: int = 16,
             backend: Optional[str] = None) -> Iterator[CompressionSession]:
    """Run ``model.generate`` on a paged KV cache compressed by ``method`` while the context is open.

    ``method=None`` runs the same paged path without compression (the baseline). Inside the context
    ``model.config._attn_implementation`` is ``"kvpress_paged"`` and ``model.generate`` builds a fresh
    :class:`PagedCache` per call; both are restored on exit.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A Llama-like decoder (GQA fine): SmolLM2, Llama, Qwen2, tiny random ``LlamaConfig`` models, ...
    method : CompressionMethod or None
    shots : list of (start, end), or one such list per sequence, optional
        Shot spans for :class:`~kvpress_kernels.methods.ShotKV` (token indices into each unpadded prompt);
        ``model.generate(..., shots=...)`` overrides them per call.
    page_size : int
    backend : {"reference", "triton", "cuda"}, optional

    Yields
    ------
    CompressionSession
        ``session.stats`` after each ``generate``: see :meth:`PagedCache.stats`.

    Example
    -------
    >>> with kvpress_kernels.compress(model, ShotKV(0.3), shots=spans) as session:   # doctest: +SKIP
    ...     out = model.generate(input_ids, max_new_tokens=16, do_sample=False)
    >>> session.stats["kv_bytes_after_prefill"] / session.stats["kv_bytes_full"]      # doctest: +SKIP
    """
    _ModelSpec(model)
    if method is not None and not isinstance(method, CompressionMethod):
        hint = " (pass an instance, e.g. ShotKV(0.3), not the class)" if isinstance(method, type) else ""
        raise TypeError(f"method must be a kvpress_kernels CompressionMethod or None, "
                        f"got {type(method).__name__}{hint}")
    page_size = V.integer("page_size", page_size, low=1)
    if backend is not None:
        V.choice("backend", backend, ("reference", "triton", "cuda"))
    if getattr(model, "_kvpress_session", None) is not None:
        raise RuntimeError("compress() is already active on this model (contexts do not nest)")
    _register()
    session = CompressionSession(model, method, shots=shots, page_size=page_size, backend=backend)
    prev_attn = model.config._attn_implementation
    had_generate = "generate" in model.__dict__
    prev_generate = model.__dict__.get("generate")
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    model.generate = session.generate
    model._kvpress_session = session
    try:
        yield session
    finally:
        model.config._attn_implementation = prev_attn
        if had_generate:
            model.generate = prev_generate
        else:
            del model.generate
        model._kvpress_session = None
        _STATE.pending = None


def generate(model, input_ids: torch.Tensor, method: Optional[CompressionMethod], *,
             attention_mask: Optional[torch.Tensor] = None, max_new_tokens: int = 32, shots=None,
             do_sample: bool = False, page_size: int = 16, backend: Optional[str] = None, **gen_kwargs):
    """One call: ``model.generate`` under :func:`compress`. Returns ``(sequences, stats)``.

    ``sequences``: ``[batch, prompt + new]`` token ids (as ``model.generate`` returns them); ``stats``:
    see :meth:`PagedCache.stats`. Other keywords go to ``model.generate``.
    """
    V.generation_inputs(model, input_ids, attention_mask, shots)
    with compress(model, method, shots=shots, page_size=page_size, backend=backend) as session:
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=do_sample, **gen_kwargs)
    seqs = out.sequences if hasattr(out, "sequences") else out
    return seqs, session.stats
