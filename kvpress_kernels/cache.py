"""PagedKVCache: a paged KV cache whose pages belong to one (layer, sequence, kv-head) each.

Layout (DESIGN.md §4, with one deliberate change):

- **One page pool shared by all layers**: ``k_pages, v_pages: [num_pages, page_size, head_dim]``
  and, when positions are tracked, ``pos_pages: [num_pages, page_size]`` (int32, original token
  positions). DESIGN.md sketches a pool per layer; a shared pool lets a page freed by one layer's
  compaction serve any other layer (PyramidKV-style budgets free much more in deep layers than in
  shallow ones), and makes ``bytes_in_use`` the real footprint of the whole cache. The ops take a
  pool plus a page table, so nothing else changes.
- ``page_table: [num_layers, batch, kv_heads, max_pages]`` (int32, device): the pages each row owns,
  in slot order; entries past a row's owned pages are ``-1``. ``lengths: [num_layers, batch,
  kv_heads]`` (int32, device): tokens held per row. ``layer_view(l)`` gives the ``[batch, kv_heads,
  ...]`` slices the ops take.
- Host mirrors (numpy) of the page table, lengths, owned-page counts and the free list, so that
  page allocation and freeing never read the device. The device tables are written from the host
  mirrors (on CUDA through pinned memory, asynchronously).

Growth: when the pool runs out of pages it grows (a bigger pool is allocated and the old pages are
copied, page ids unchanged) if ``grow`` is true — the default when ``num_pages`` is not given —
otherwise :class:`CacheFullError` is raised naming ``num_pages``/``max_tokens``. The page table's
``max_pages`` grows likewise (always: it is index memory only). Growth reallocates ``k_pages``,
``v_pages``, ``pos_pages`` or ``page_table``, so fetch them (or ``layer_view``) again after any call
that may allocate (``reserve``, ``append``); do not capture them in a CUDA graph across such calls
unless the pool is fixed and ``max_tokens`` covers every sequence.

Compaction moves tokens with :func:`kvpress_kernels.ops.compaction.compact_` and then returns each
row's tail pages (beyond ``ceil(new_length / page_size)``) to the pool. After compaction a slot's
token is not in position order (see the op); ``pos_pages`` keeps each token's original position.

Storing only what a prefill keeps: :meth:`PagedKVCache.append_kept` appends the tokens an eviction
selects from dense K/V (a method scored them first), with their token index as position — cheaper
than appending the whole prompt and compacting it, and the pool never holds the full prompt.

The cache owns its page table and lengths, so it calls the append op without the launcher's value
checks (which read both back on every call) except in debug mode (``KVPRESS_KERNELS_DEBUG=1``),
where :meth:`check_invariants` also runs after every change.

Positions: by default, tokens appended to a row get consecutive positions counting every token ever
appended to that row (``seen_tokens``), evicted or not — the RoPE position of the token.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence, Union

import numpy as np
import torch

from . import _validate as V
from ._backend import debug_checks, resolve_backend, wants_data_checks
from .ops.append import append_, append_ref
from .ops.compaction import compact_

IntsLike = Union[int, Sequence[int], np.ndarray, torch.Tensor]


#: int ranges the host-int checks use (``np.iinfo`` builds an object per call: the decode step calls them)
_I32 = np.iinfo(np.int32)
_I64 = np.iinfo(np.int64)

class CacheFullError(RuntimeError):
    """The page pool of a fixed-size :class:`PagedKVCache` has no free page left."""


class _PagePool:
    """The page pool one or more :class:`PagedKVCache` copies share (:meth:`PagedKVCache.fork`): the K/V
    (and position) pages, the free list and a reference count per page (how many rows, over every live
    cache of the pool, own it). ``caches`` holds the live caches weakly, so that the pages of a cache
    that was dropped without :meth:`PagedKVCache.release` can be taken back (:meth:`sweep`)."""

    def __init__(self):
        self.k_pages: Optional[torch.Tensor] = None
        self.v_pages: Optional[torch.Tensor] = None
        self.pos_pages: Optional[torch.Tensor] = None
        self.free = np.zeros(0, dtype=np.int64)
        self.nfree = 0
        self.ref = np.zeros(0, dtype=np.int64)
        self.caches: "weakref.WeakSet[PagedKVCache]" = weakref.WeakSet()
        self.shared = False           # ever forked: ownership is then checked over every cache of the pool

    def owners(self) -> np.ndarray:
        """Rows owning each page, counted over the live caches (host)."""
        uses = np.zeros(int(self.k_pages.shape[0]), dtype=np.int64)
        for c in list(self.caches):
            held = c._table_h[np.arange(c.max_pages) < c._owned_h[..., None]].astype(np.int64)
            uses += np.bincount(held, minlength=uses.size)
        return uses

    def sweep(self) -> int:
        """Return to the free list the pages only dropped caches owned; the number of pages freed."""
        if not self.shared:
            return 0
        uses = self.owners()
        is_free = np.zeros(uses.size, dtype=bool)
        is_free[self.free[: self.nfree]] = True
        lost = np.nonzero((uses == 0) & ~is_free)[0]
        self.ref[:] = uses
        if lost.size:
            self.free[self.nfree: self.nfree + lost.size] = lost[::-1]
            self.nfree += lost.size
        return int(lost.size)


def _pool_attr(name: str):
    return property(lambda self: getattr(self._pool, name), lambda self, value: setattr(self._pool, name, value))


class PagedKVCache:
    """Paged KV cache for ``num_layers`` layers, ``batch_size`` sequences and ``num_kv_heads`` heads.

    Parameters
    ----------
    num_layers, batch_size, num_kv_heads, head_dim : int
        Cache geometry; a *row* is one (layer, sequence, kv-head).
    num_pages : int, optional
        Pages in the shared pool. Default: enough for every row to hold ``max_tokens`` tokens, or
        one page per row when ``max_tokens`` is not given either (the pool then grows on demand).
    max_tokens : int, optional
        Expected longest sequence; sizes the pool (when ``num_pages`` is not given) and the page
        table's ``max_pages = ceil(max_tokens / page_size)``.
    page_size : int
        Tokens per page (any size >= 1).
    dtype : torch.float32 / float16 / bfloat16
        Storage dtype of K and V.
    device : str or torch.device
    track_positions : bool
        Keep each cached token's original position in ``pos_pages`` (int32).
    backend : {"reference", "triton", "cuda"}, optional
        Passed to the ops (default: chosen by device, see :mod:`kvpress_kernels._backend`).
    grow : bool, optional
        Grow the pool when it runs out instead of raising :class:`CacheFullError`. Default: true
        when ``num_pages`` is not given.
    """

    # The pool lives in a _PagePool that forks share; these names keep reading it as before.
    k_pages = _pool_attr("k_pages")
    v_pages = _pool_attr("v_pages")
    pos_pages = _pool_attr("pos_pages")
    _free = _pool_attr("free")
    _nfree = _pool_attr("nfree")

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, *,
                 num_pages: Optional[int] = None, max_tokens: Optional[int] = None, page_size: int = 16,
                 dtype: torch.dtype = torch.float16, device: Union[str, torch.device] = "cpu",
                 track_positions: bool = True, backend: Optional[str] = None, grow: Optional[bool] = None):
        self.num_layers = V.integer("num_layers", num_layers, low=1)
        self.batch_size = V.integer("batch_size", batch_size, low=1)
        self.num_kv_heads = V.integer("num_kv_heads", num_kv_heads, low=1)
        self.head_dim = V.integer("head_dim", head_dim, low=1)
        self.page_size = V.integer("page_size", page_size, low=1)
        if not isinstance(dtype, torch.dtype) or dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in V.FLOAT_DTYPES]}, got {dtype}")
        self.dtype = dtype
        try:
            # Through a tensor so that "cuda" becomes "cuda:0": tensors compare their full device.
            self.device = torch.empty(0, device=device).device
        except (RuntimeError, TypeError, AssertionError) as exc:  # AssertionError: torch built without CUDA
            raise ValueError(f"device must name an available torch device, got {device!r} ({exc})") from exc
        if max_tokens is not None:
            max_tokens = V.integer("max_tokens", max_tokens, low=1)
        self.max_tokens = max_tokens
        self.track_positions = bool(track_positions)
        if backend is not None:
            V.choice("backend", backend, ("reference", "triton", "cuda"))
        self.backend = backend
        L, B, H = self.num_layers, self.batch_size, self.num_kv_heads
        pages_per_row = -(-max_tokens // self.page_size) if max_tokens is not None else 1
        self.grow = (num_pages is None) if grow is None else bool(grow)
        if num_pages is None:
            num_pages = L * B * H * pages_per_row
        else:
            num_pages = V.integer("num_pages", num_pages, low=1)
        # max_pages grows on demand; without max_tokens start with room for 256 tokens per row.
        max_pages = pages_per_row if max_tokens is not None else -(-256 // self.page_size)

        self._table_h = np.full((L, B, H, max_pages), -1, dtype=np.int32)
        self._owned_h = np.zeros((L, B, H), dtype=np.int64)   # pages owned per row
        self._len_h = np.zeros((L, B, H), dtype=np.int64)     # tokens held per row
        self._seen_h = np.zeros((L, B, H), dtype=np.int64)    # tokens ever appended per row
        self._pool = _PagePool()
        self._pool.caches.add(self)
        self._alloc_pools(num_pages)
        self._reset_free_list()
        self.page_table = torch.full((L, B, H, max_pages), -1, dtype=torch.int32, device=self.device)
        self.lengths = torch.zeros((L, B, H), dtype=torch.int32, device=self.device)

    # ------------------------------------------------------------------ geometry and accounting
    @property
    def num_pages(self) -> int:
        return int(self.k_pages.shape[0])

    @property
    def max_pages(self) -> int:
        return int(self._table_h.shape[-1])

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of K plus one page of V (the position side pool is not counted)."""
        return 2 * self.page_size * self.head_dim * self.k_pages.element_size()

    def pages_in_use(self) -> int:
        return int(self._owned_h.sum())

    def num_free_pages(self) -> int:
        return int(self._nfree)

    def bytes_in_use(self) -> int:
        """K+V bytes of the pages owned by some row (``pages_in_use() * page_bytes``)."""
        return self.pages_in_use() * self.page_bytes

    def bytes_reserved(self) -> int:
        """K+V bytes of the whole pool, free pages included."""
        return self.num_pages * self.page_bytes

    def seq_lengths(self, layer: Optional[int] = None) -> np.ndarray:
        """Tokens held per row (host copy): ``[batch, kv_heads]`` for ``layer``, else ``[layers, batch, kv_heads]``."""
        return (self._len_h if layer is None else self._len_h[self._check_layer(layer)]).copy()

    def seen_tokens(self, layer: Optional[int] = None) -> np.ndarray:
        """Tokens ever appended per row, evicted ones included (host copy; the next default position)."""
        return (self._seen_h if layer is None else self._seen_h[self._check_layer(layer)]).copy()

    def max_length(self, layer: int) -> int:
        """Longest row of ``layer`` (host)."""
        return int(self._len_h[self._check_layer(layer)].max())

    def owned_pages(self, layer: int, seq: int, head: int) -> list[int]:
        """Pages owned by one row, in slot order (host)."""
        layer = self._check_layer(layer)
        seq = V.integer("seq", seq, low=0, high=self.batch_size - 1)
        head = V.integer("head", head, low=0, high=self.num_kv_heads - 1)
        return self._table_h[layer, seq, head, : self._owned_h[layer, seq, head]].tolist()

    def layer_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(page_table[layer], lengths[layer])``: the ``[batch, kv_heads, max_pages]`` and
        ``[batch, kv_heads]`` views the ops take, together with ``k_pages``/``v_pages``/``pos_pages``."""
        layer = self._check_layer(layer)
        return self.page_table[layer], self.lengths[layer]

    def __repr__(self) -> str:
        return (f"PagedKVCache(layers={self.num_layers}, batch={self.batch_size}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, page_size={self.page_size}, dtype={self.dtype}, device={self.device}, "
                f"pages {self.pages_in_use()}/{self.num_pages} in use, grow={self.grow})")

    # ------------------------------------------------------------------ allocation
    def reserve(self, layer: int, extra_tokens: IntsLike) -> None:
        """Make every row of ``layer`` own pages for ``lengths + extra_tokens`` tokens.

        ``extra_tokens``: an int, or host ints ``[batch]`` or ``[batch, kv_heads]`` (a tensor is read
        on the host: a sync on CUDA). Allocation reads only host mirrors; the new page-table entries
        are written to the device asynchronously. May grow the pool or the page table (see the module
        docstring) or raise :class:`CacheFullError`.
        """
        layer = self._check_layer(layer)
        extra = self._row_ints("extra_tokens", extra_tokens)
        if (extra < 0).any():
            raise ValueError(f"extra_tokens must be >= 0, got min {int(extra.min())}")
        self._reserve(layer, extra)
        self._debug_check()

    def _reserve(self, layer: int, extra: np.ndarray) -> None:
        need = -(-(self._len_h[layer] + extra) // self.page_size)
        add = np.maximum(need - self._owned_h[layer], 0)
        total = int(add.sum())
        if total == 0:
            return
        if total > self._nfree:  # first: it may raise, and nothing must have changed then
            self._grow_pool(total - self._nfree)
        grew_table = int(need.max()) > self.max_pages
        if grew_table:
            self._grow_table(int(need.max()))
        pages = self._pop(total)
        flat_add = add.reshape(-1)
        rows = np.nonzero(flat_add)[0]
        per_row = flat_add[rows]
        row_rep = np.repeat(rows, per_row)
        within = np.arange(total) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        table = self._table_h[layer].reshape(-1, self.max_pages)  # a view: writes land in _table_h
        table[row_rep, self._owned_h[layer].reshape(-1)[row_rep] + within] = pages
        self._owned_h[layer] += add
        if grew_table:
            self._upload(self.page_table, self._table_h)
        else:
            self._upload(self.page_table[layer], self._table_h[layer])

    def _pop(self, n: int) -> np.ndarray:
        pages = self._free[self._nfree - n: self._nfree][::-1].copy()
        self._nfree -= n
        self._pool.ref[pages] = 1
        return pages

    def _push(self, pages: np.ndarray) -> None:
        n = pages.size
        self._free[self._nfree: self._nfree + n] = pages[::-1]
        self._nfree += n

    def _reset_free_list(self) -> None:
        # A stack popped from the end: lowest page ids first, so fresh caches fill the pool in order.
        self._free = np.arange(self.num_pages - 1, -1, -1, dtype=np.int64)
        self._nfree = self.num_pages
        self._pool.ref = np.zeros(self.num_pages, dtype=np.int64)

    def _alloc_pools(self, num_pages: int) -> None:
        shape = (num_pages, self.page_size, self.head_dim)
        self.k_pages = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_pages = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.pos_pages = (torch.full(shape[:2], -1, dtype=torch.int32, device=self.device)
                          if self.track_positions else None)

    def _grow_pool(self, deficit: int) -> None:
        deficit -= self._pool.sweep()      # pages of forks dropped without release() come back first
        if deficit <= 0:
            return
        old = self.num_pages
        if not self.grow:
            raise CacheFullError(
                f"PagedKVCache is out of pages: {deficit + self._nfree} more needed, {self._nfree} free of "
                f"num_pages={old} (max_tokens={self.max_tokens}); build the cache with a larger num_pages or "
                "max_tokens, or with grow=True")
        new = max(2 * old, old + deficit)
        k_old, v_old, p_old = self.k_pages, self.v_pages, self.pos_pages
        self._alloc_pools(new)
        self.k_pages[:old].copy_(k_old)
        self.v_pages[:old].copy_(v_old)
        if p_old is not None:
            self.pos_pages[:old].copy_(p_old)
        # New ids go to the bottom of the stack: pages freed earlier are reused first.
        free = np.empty(new, dtype=np.int64)  # capacity: every page may be free at once
        free[: new - old] = np.arange(new - 1, old - 1, -1)
        free[new - old: new - old + self._nfree] = self._free[: self._nfree]
        self._free = free
        self._nfree += new - old
        self._pool.ref = np.concatenate([self._pool.ref, np.zeros(new - old, dtype=np.int64)])

    def _grow_table(self, min_pages: int) -> None:
        new = max(2 * self.max_pages, min_pages)
        table = np.full(self._table_h.shape[:-1] + (new,), -1, dtype=np.int32)
        table[..., : self.max_pages] = self._table_h
        self._table_h = table
        self.page_table = torch.full(table.shape, -1, dtype=torch.int32, device=self.device)

    def _release_tail(self, sel) -> None:
        """Return the pages of the rows in ``sel`` beyond ``ceil(length / page_size)`` to the pool."""
        table = self._table_h[sel]                       # basic indexing: a view
        owned = self._owned_h[sel]
        need = -(-self._len_h[sel] // self.page_size)
        cols = np.arange(self.max_pages)
        tail = (cols >= need[..., None]) & (cols < owned[..., None])
        freed = table[tail]
        if freed.size:
            table[tail] = -1
            self._owned_h[sel] = np.minimum(owned, need)
            self._unref(freed.astype(np.int64))

    def _unref(self, pages: np.ndarray) -> None:
        """Drop one owner of each page; pages nobody owns any more return to the pool."""
        ref = self._pool.ref
        np.subtract.at(ref, pages, 1)
        gone = pages[ref[pages] == 0]
        if gone.size:
            self._push(np.unique(gone))

    def _upload(self, dst: torch.Tensor, arr: np.ndarray) -> None:
        """Write a host mirror to its device tensor without waiting for the device: on CUDA through
        a fresh pinned buffer (the caching host allocator keeps it alive until the copy ran)."""
        src = torch.from_numpy(np.ascontiguousarray(arr))
        if dst.device.type == "cuda":
            dst.copy_(src.pin_memory(), non_blocking=True)
        else:
            dst.copy_(src)

    def _int32_to_device(self, name: str, arr: np.ndarray) -> torch.Tensor:
        """``arr`` as an int32 device tensor; ``ValueError`` naming ``name`` for a value outside int32 (the
        cast would wrap it). Callers convert before they change anything."""
        if arr.size and (int(arr.min()) < _I32.min or int(arr.max()) > _I32.max):
            raise ValueError(f"{name} must fit in int32 [{_I32.min}, {_I32.max}] on the device, got min "
                             f"{int(arr.min())}, max {int(arr.max())}")
        out = torch.empty(arr.shape, dtype=torch.int32, device=self.device)
        self._upload(out, arr.astype(np.int32))
        return out

    def _position_starts(self, layer: int, T: int) -> torch.Tensor:
        """Default positions of ``T`` new tokens start at each row's ``seen_tokens``: those starts as int32
        device ints, once the last new position ``seen_tokens + T - 1`` is known to fit int32 too."""
        seen = self._seen_h[layer]
        last = int(seen.max()) + T - 1 if seen.size else 0
        if last > _I32.max:
            raise ValueError(f"seen_tokens + T - 1 = {last} (the last new position) must fit in int32 "
                             f"[{_I32.min}, {_I32.max}], the dtype of the stored positions")
        return self._int32_to_device("seen_tokens", seen)

    # ------------------------------------------------------------------ the cache operations
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, positions: Optional[torch.Tensor] = None,
               counts: Optional[IntsLike] = None) -> None:
        """Append ``T`` new tokens per row of ``layer`` (allocating pages as needed).

        Parameters
        ----------
        k, v : Tensor ``[batch, kv_heads, T, head_dim]``, the cache's dtype and device
            New keys (RoPE applied) and values; last dimension contiguous.
        positions : Tensor ``[batch, T]`` or ``[batch, kv_heads, T]``, int32/int64, optional
            Original positions stored in ``pos_pages``. Default: each row's running count of
            appended tokens (``seen_tokens``) plus ``0..T-1``. Ignored when positions are not tracked.
        counts : int or host ints ``[batch]`` / ``[batch, kv_heads]``, optional
            Append only the first ``counts`` of the ``T`` tokens (ragged batches); default ``T``.
            A tensor is read on the host (a sync on CUDA); pass numpy/lists to avoid it.
        """
        layer = self._check_layer(layer)
        T = self._check_new(k, v)
        B, H = self.batch_size, self.num_kv_heads
        if counts is None:
            cnt = np.full((B, H), T, dtype=np.int64)
        else:
            cnt = self._row_ints("counts", counts)
            if cnt.size and (int(cnt.min()) < 0 or int(cnt.max()) > T):
                raise ValueError(f"counts must be in [0, T={T}], got min {int(cnt.min())}, max {int(cnt.max())}")
        if positions is not None:
            V.tensor("positions", positions, ndim=(2, 3), dtypes=V.INDEX_DTYPES, device=self.device)
            V.shape("positions", positions, [B, T] if positions.dim() == 2 else [B, H, T],
                    "([batch, T] or [batch, kv_heads, T])")
        if T == 0 or (counts is not None and not cnt.any()):
            return
        pos_new = None
        if self.pos_pages is not None:
            if positions is None:
                start = self._position_starts(layer, T)
                pos_new = start.unsqueeze(-1) + torch.arange(T, dtype=torch.int32, device=self.device)
            else:
                pos_new = positions.unsqueeze(1).expand(B, H, T) if positions.dim() == 2 else positions
        self._append(layer, k, v, cnt, pos_new, cnt)

    def append_kept(self, layer: int, k: torch.Tensor, v: torch.Tensor, kept_idx: torch.Tensor, *,
                    new_lengths: Optional[IntsLike] = None, seen: Optional[IntsLike] = None) -> None:
        """Append only the tokens ``kept_idx`` selects from ``k, v`` (what a prefill that scores first stores,
        instead of appending every token and compacting afterwards).

        Row ``(b, h)`` stores tokens ``kept_idx[b, h, :new_lengths[b, h]]`` of ``k[b, h]`` / ``v[b, h]``, in that
        order, at positions ``seen_tokens + index`` (an index is the token's offset in the ``T`` appended
        tokens), and ``seen_tokens`` advances by ``seen`` — all ``T`` tokens were seen, kept or not, so the
        next append's default positions continue after them.

        Parameters
        ----------
        k, v : Tensor ``[batch, kv_heads, T, head_dim]``, as for :meth:`append` (strided views are fine)
        kept_idx : Tensor ``[batch, kv_heads, K]``, int32/int64, on the cache's device
            Kept token indices ``< T`` per row, then ``-1`` padding (an :class:`~kvpress_kernels.methods.base.Eviction`).
        new_lengths : host ints ``[batch, kv_heads]``, optional
            Kept tokens per row; default read from ``kept_idx`` (a device read: a sync on CUDA).
        seen : int or host ints ``[batch]`` / ``[batch, kv_heads]``, optional
            Tokens the rows saw (default ``T``; a ragged batch passes each sequence's length).
        """
        layer = self._check_layer(layer)
        T = self._check_new(k, v)
        B, H, D = self.batch_size, self.num_kv_heads, self.head_dim
        V.tensor("kept_idx", kept_idx, ndim=3, dtypes=V.INDEX_DTYPES, device=self.device)
        V.shape("kept_idx", kept_idx, [B, H, None], "([batch, kv_heads, K])")
        K = int(kept_idx.shape[-1])
        seen_cnt = self._row_ints("seen", seen) if seen is not None else np.full((B, H), T, dtype=np.int64)
        if seen_cnt.size and (int(seen_cnt.min()) < 0 or int(seen_cnt.max()) > T):
            raise ValueError(f"seen must be in [0, T={T}], got min {int(seen_cnt.min())}, max {int(seen_cnt.max())}")
        if new_lengths is None:
            cnt = (kept_idx >= 0).sum(-1).cpu().numpy().astype(np.int64)
        else:
            cnt = self._ints("new_lengths", new_lengths)
            if cnt.shape != (B, H):
                raise ValueError(f"new_lengths must have shape [{B}, {H}], got {list(cnt.shape)}")
            if cnt.size and (int(cnt.min()) < 0 or int(cnt.max()) > K or (cnt > seen_cnt).any()):
                raise ValueError(f"new_lengths must be in [0, min(K={K}, seen)] per row, got min {int(cnt.min())}, "
                                 f"max {int(cnt.max())}")
        if wants_data_checks(kept_idx) and K:
            self._check_kept(kept_idx, cnt, seen_cnt)
        idx = kept_idx.long().clamp(min=0)                                   # -1 padding reads token 0, not stored
        if K:
            kk = torch.gather(k, 2, idx.unsqueeze(-1).expand(B, H, K, D))
            vv = torch.gather(v, 2, idx.unsqueeze(-1).expand(B, H, K, D))
        pos_new = None
        if self.pos_pages is not None and K:
            pos_new = (self._position_starts(layer, T).unsqueeze(-1) + idx).to(torch.int32)
        if K and cnt.any():
            self._append(layer, kk, vv, cnt, pos_new, seen_cnt)
        else:
            self._seen_h[layer] += seen_cnt

    def _check_new(self, k: torch.Tensor, v: torch.Tensor) -> int:
        B, H, D = self.batch_size, self.num_kv_heads, self.head_dim
        V.tensor("k", k, ndim=4, dtypes=(self.dtype,), device=self.device, last_contiguous=True)
        V.shape("k", k, [B, H, None, D], "([batch, kv_heads, T, head_dim] of the cache)")
        T = int(k.shape[2])
        V.tensor("v", v, ndim=4, dtypes=(self.dtype,), device=self.device, last_contiguous=True)
        V.shape("v", v, [B, H, T, D], "(same as k)")
        return T

    def _check_kept(self, kept_idx: torch.Tensor, cnt: np.ndarray, seen: np.ndarray) -> None:
        """kept_idx lists ``cnt`` strictly ascending indices below ``seen`` per row, then -1 (a data check)."""
        K = kept_idx.shape[-1]
        ki = kept_idx.long()
        rank = torch.arange(K, device=ki.device)
        live = rank < torch.from_numpy(cnt).to(ki.device).unsqueeze(-1)
        bad = (live & ((ki < 0) | (ki >= torch.from_numpy(seen).to(ki.device).unsqueeze(-1)))) | (~live & (ki != -1))
        if K > 1:
            bad[..., 1:] |= live[..., 1:] & (ki[..., 1:] <= ki[..., :-1])
        if bool(bad.any()):
            row = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"kept_idx must list new_lengths strictly ascending token indices below seen per row, "
                             f"then -1; row {row[:2]} breaks it at column {row[2]}")

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor, cnt: np.ndarray,
                pos_new: Optional[torch.Tensor], seen_cnt: np.ndarray) -> None:
        """Allocate and write (inputs checked by the caller). The cache owns its page table and lengths,
        so the op's value checks (which read them back) run only in debug mode, where
        :meth:`check_invariants` runs after every call too; otherwise the registered op is called directly."""
        T = int(k.shape[2])
        if self._pool.shared:
            # copy-on-write: the partly filled last page of a row may be another cache's too
            self._make_private(layer, self._len_h[layer], np.where(cnt > 0, self._len_h[layer] + cnt, 0))
        self._reserve(layer, cnt)
        counts_dev = None if bool((cnt == T).all()) else self._int32_to_device("counts", cnt)
        table, lengths = self.page_table[layer], self.lengths[layer]
        if debug_checks():
            append_(self.k_pages, self.v_pages, table, lengths, k, v, counts=counts_dev,
                    pos_pages=self.pos_pages, pos_new=pos_new, backend=self.backend)
        else:
            b = resolve_backend("append", self.backend, self.device, has=("reference", "triton"))
            if b == "reference":    # the custom-op dispatch costs more than a decode step's copy on CPU
                append_ref(self.k_pages, self.v_pages, table, lengths, k, v, counts_dev, self.pos_pages, pos_new)
            else:
                torch.ops.kvpress_kernels.append_(self.k_pages, self.v_pages, table, lengths, k, v, counts_dev,
                                                  self.pos_pages, pos_new, b)
        self._len_h[layer] += cnt
        self._seen_h[layer] += seen_cnt
        self._debug_check()

    def compact(self, layer: int, kept_idx: torch.Tensor, *, new_lengths: Optional[IntsLike] = None) -> None:
        """Keep only the slots listed in ``kept_idx`` in each row of ``layer``, then free tail pages.

        Parameters
        ----------
        kept_idx : Tensor ``[batch, kv_heads, K]``, int32/int64, on the cache's device
            Per row, the kept slots (``< length``), strictly ascending, then ``-1`` padding.
        new_lengths : host ints ``[batch, kv_heads]``, optional
            Number of kept slots per row, known to the caller from its budgets. Without it the
            count is read from ``kept_idx`` (a device read: a sync on CUDA). Checked against
            ``kept_idx`` wherever data checks run (CPU, or ``KVPRESS_KERNELS_DEBUG=1``).

        Tokens move with :func:`kvpress_kernels.ops.compaction.compact_`; afterwards every row owns
        exactly ``ceil(new_length / page_size)`` pages and the rest return to the pool.
        """
        layer = self._check_layer(layer)
        B, H = self.batch_size, self.num_kv_heads
        V.tensor("kept_idx", kept_idx, ndim=3, dtypes=V.INDEX_DTYPES, device=self.device)
        V.shape("kept_idx", kept_idx, [B, H, None], "([batch, kv_heads, K])")
        new_len = self._new_lengths(kept_idx, new_lengths, self._len_h[layer])
        self._cow_for_compaction(layer, kept_idx, new_len)
        table, lengths = self.page_table[layer], self.lengths[layer]
        compact_(self.k_pages, self.v_pages, table, lengths, kept_idx, pos_pages=self.pos_pages, backend=self.backend)
        self._len_h[layer] = new_len
        self._release_tail(layer)
        self._upload(self.page_table[layer], self._table_h[layer])
        self._debug_check()

    def compact_all(self, kept_idx: torch.Tensor, *, new_lengths: Optional[IntsLike] = None) -> None:
        """:meth:`compact` for every layer at once, in one op call over ``layers * batch * kv_heads`` rows.

        ``kept_idx``: ``[layers, batch, kv_heads, K]``; ``new_lengths``: host ints ``[layers, batch, kv_heads]``.
        """
        L, B, H = self.num_layers, self.batch_size, self.num_kv_heads
        V.tensor("kept_idx", kept_idx, ndim=4, dtypes=V.INDEX_DTYPES, device=self.device)
        V.shape("kept_idx", kept_idx, [L, B, H, None], "([layers, batch, kv_heads, K])")
        new_len = self._new_lengths(kept_idx, new_lengths, self._len_h)
        self._cow_for_compaction(slice(None), kept_idx, new_len)
        compact_(self.k_pages, self.v_pages, self.page_table, self.lengths, kept_idx, pos_pages=self.pos_pages,
                 backend=self.backend)
        self._len_h[...] = new_len
        self._release_tail(slice(None))
        self._upload(self.page_table, self._table_h)
        self._debug_check()

    def _new_lengths(self, kept_idx: torch.Tensor, new_lengths, current: np.ndarray) -> np.ndarray:
        shape = current.shape
        if new_lengths is None:
            return (kept_idx >= 0).sum(-1).cpu().numpy().astype(np.int64)
        new = self._ints("new_lengths", new_lengths)
        if new.shape != shape:
            raise ValueError(f"new_lengths must have shape {list(shape)}, got {list(new.shape)}")
        if new.size and (int(new.min()) < 0 or (new > current).any() or int(new.max()) > kept_idx.shape[-1]):
            raise ValueError("new_lengths must be in [0, min(current length, K)] per row, got "
                             f"min {int(new.min())}, max {int(new.max())}")
        if wants_data_checks(kept_idx):
            actual = (kept_idx >= 0).sum(-1).cpu().numpy()
            if not np.array_equal(actual, new):
                bad = np.argwhere(actual != new)[0].tolist()
                raise ValueError(f"new_lengths disagrees with kept_idx at row {bad}: "
                                 f"{int(new[tuple(bad)])} given, {int(actual[tuple(bad)])} kept slots listed")
        return new

    def free_sequence(self, seq: int) -> None:
        """Drop sequence ``seq`` from every layer: its pages return to the pool, its lengths and
        position counters restart at 0."""
        seq = V.integer("seq", seq, low=0, high=self.batch_size - 1)
        self._len_h[:, seq] = 0
        self._seen_h[:, seq] = 0
        self._release_tail((slice(None), seq))
        self.lengths[:, seq] = 0
        self._upload(self.page_table, self._table_h)
        self._debug_check()

    def reset(self) -> None:
        """Empty the cache: every page free, every length 0 (pool size and contents untouched). A cache
        that shares its pool with forks returns only its own pages (:meth:`release`)."""
        if self._pool.shared:
            self.release()
            return
        self._table_h.fill(-1)
        self._owned_h.fill(0)
        self._len_h.fill(0)
        self._seen_h.fill(0)
        self._reset_free_list()
        self.page_table.fill_(-1)
        self.lengths.zero_()

    # ------------------------------------------------------------------ sharing (prompt reuse)
    def fork(self) -> "PagedKVCache":
        """A copy that shares this cache's pages: prompt reuse without storing the context twice.

        The copy has its own page table, lengths and position counters and owns the same pages as
        this cache (each page's reference count goes up by one). Either cache may then append, compact
        or release independently: a write into a page another cache still owns (the partially filled
        last page of a row, or the slots a compaction fills) first copies that page (copy on write),
        so no cache ever sees another's writes. :meth:`pool_bytes_in_use` counts shared pages once;
        :meth:`bytes_in_use` is this cache's own view (shared pages included). ``copy.deepcopy`` of a
        cache is a fork. Pages a row owns beyond ``ceil(length / page_size)`` (reserved, empty) are not
        shared. Free a copy with :meth:`release` (a dropped copy's pages come back when the pool would
        otherwise grow).
        """
        child = object.__new__(PagedKVCache)
        child.__dict__.update({k: v for k, v in self.__dict__.items()
                               if k not in ("_table_h", "_owned_h", "_len_h", "_seen_h", "page_table", "lengths")})
        need = -(-self._len_h // self.page_size)
        child._owned_h = np.minimum(self._owned_h, need)
        child._table_h = np.where(np.arange(self.max_pages) < child._owned_h[..., None], self._table_h, -1
                                  ).astype(np.int32)
        child._len_h = self._len_h.copy()
        child._seen_h = self._seen_h.copy()
        held = child._table_h[child._table_h >= 0].astype(np.int64)
        np.add.at(self._pool.ref, held, 1)
        self._pool.shared = True
        self._pool.caches.add(child)
        child.page_table = torch.full_like(self.page_table, -1)
        child._upload(child.page_table, child._table_h)
        child.lengths = self.lengths.clone()
        child._debug_check()
        return child

    def __deepcopy__(self, memo) -> "PagedKVCache":
        return self.fork()

    def release(self) -> None:
        """Give back every page this cache owns (pages other forks still own stay theirs) and empty it."""
        self._len_h.fill(0)
        self._seen_h.fill(0)
        self._release_tail(slice(None))
        self.lengths.zero_()
        self._upload(self.page_table, self._table_h)
        self._debug_check()

    def pool_bytes_in_use(self) -> int:
        """K+V bytes of the pool's pages owned by this cache or any fork sharing its pool, each page
        counted once (pages of forks dropped without :meth:`release` count until the pool sweeps them)."""
        return (self.num_pages - self.num_free_pages()) * self.page_bytes

    def shared_pages(self) -> int:
        """Pages this cache owns that another cache (a fork) owns too."""
        held = self._table_h[np.arange(self.max_pages) < self._owned_h[..., None]].astype(np.int64)
        return int((self._pool.ref[held] > 1).sum())

    def _make_private(self, layer, first_slot: np.ndarray, end_slot: np.ndarray) -> None:
        """Copy on write: every page of ``layer``'s rows holding slots ``[first_slot, end_slot)`` that
        another cache owns too is replaced by a private copy before this cache writes into it.
        ``layer``: an int (``first_slot``/``end_slot`` ``[batch, kv_heads]``) or ``slice(None)`` (all layers)."""
        P = self.page_size
        table, owned = self._table_h[layer], self._owned_h[layer]
        cols = np.arange(self.max_pages)
        span = (cols >= (first_slot // P)[..., None]) & (cols < (-(-end_slot // P))[..., None]) & \
            (cols < owned[..., None]) & (end_slot > first_slot)[..., None]
        if not span.any():
            return
        where = np.nonzero(span)
        old = table[where].astype(np.int64)
        shared = self._pool.ref[old] > 1
        if not shared.any():
            return
        where = tuple(w[shared] for w in where)
        old = old[shared]
        if old.size > self._nfree:
            self._grow_pool(old.size - self._nfree)
        new = self._pop(old.size)
        src, dst = torch.from_numpy(old).to(self.device), torch.from_numpy(new).to(self.device)
        self.k_pages[dst] = self.k_pages[src]
        self.v_pages[dst] = self.v_pages[src]
        if self.pos_pages is not None:
            self.pos_pages[dst] = self.pos_pages[src]
        table[where] = new.astype(np.int32)
        self._pool.ref[old] -= 1        # still >= 1: another cache owns them
        self._upload(self.page_table, self._table_h)

    def _cow_for_compaction(self, layer, kept_idx: torch.Tensor, new_len: np.ndarray) -> None:
        """Before a compaction on a shared pool: the op writes the slots from each row's first hole
        (first ``i`` with ``kept_idx[i] != i``) to its new length; make those pages private. Reads
        ``kept_idx`` on the host (a sync on CUDA) only when this cache shares pages."""
        if not self._pool.shared or self.shared_pages() == 0:
            return
        kept = kept_idx.cpu().numpy().astype(np.int64)
        ident = kept == np.arange(kept.shape[-1])
        first = np.where(ident.all(-1), kept.shape[-1], np.argmin(ident, axis=-1))
        self._make_private(layer, np.minimum(first, new_len), new_len)

    # ------------------------------------------------------------------ inspection
    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Dense copy of one layer (tests and debugging).

        Returns ``k, v: [batch, kv_heads, Nmax, head_dim]`` in slot order (zeros beyond each row's
        length), ``lengths: [batch, kv_heads]`` (int32) and ``positions: [batch, kv_heads, Nmax]``
        (int32, ``-1`` beyond the length; ``None`` when positions are not tracked), where
        ``Nmax = max_length(layer)``.
        """
        layer = self._check_layer(layer)
        n = self.max_length(layer)
        table, lengths = self.page_table[layer].long(), self.lengths[layer]
        slots = torch.arange(n, device=self.device)
        valid = slots < lengths.unsqueeze(-1)                              # [B, H, n]
        pages = torch.where(valid, table[:, :, slots // self.page_size], 0)
        offs = (slots % self.page_size).expand_as(pages)
        k = torch.where(valid.unsqueeze(-1), self.k_pages[pages, offs], 0)
        v = torch.where(valid.unsqueeze(-1), self.v_pages[pages, offs], 0)
        pos = None
        if self.pos_pages is not None:
            pos = torch.where(valid, self.pos_pages[pages, offs], -1)
        return k, v, lengths.clone(), pos

    def check_invariants(self) -> None:
        """Raise ``RuntimeError`` listing every broken invariant (DESIGN.md §4): each page free or
        owned by exactly one (layer, seq, head); lengths within owned capacity; host mirrors equal
        the device tensors; no duplicate in the free list. Reads the device (a sync on CUDA)."""
        problems = []
        P, N = self.page_size, self.num_pages
        table, owned = self._table_h, self._owned_h
        owned_mask = np.arange(self.max_pages) < owned[..., None]
        held = table[owned_mask].astype(np.int64)
        if held.size and (held.min() < 0 or held.max() >= N):
            problems.append(f"owned page ids outside [0, {N}): min {held.min()}, max {held.max()}")
        if (table[~owned_mask] != -1).any():
            problems.append("page-table entries past the owned pages are not -1")
        free = self._free[: self._nfree]
        if np.unique(free).size != free.size:
            problems.append("the free list holds a page twice")
        every = np.concatenate([held, free])
        every = every[(every >= 0) & (every < N)]
        uses = np.bincount(every, minlength=N)
        if self._pool.shared:
            # forks share pages: each page is free (no owner) or owned, at most once per cache, by as many
            # rows as its reference count says (more: a dropped fork's pages, until the pool sweeps them)
            ref = self._pool.ref
            owners = self._pool.owners()
            is_free = np.bincount(free[(free >= 0) & (free < N)], minlength=N) > 0
            mine = np.bincount(held[(held >= 0) & (held < N)], minlength=N)
            if ref.size != N or (owners > ref).any():
                problems.append("a page has more owners than its reference count")
            if (is_free & (ref > 0)).any() or (~is_free & (ref == 0)).any():
                problems.append("a page is free with owners, or neither free nor owned")
            if (mine > 1).any():
                problems.append(f"{int((mine > 1).sum())} page(s) owned twice in one cache")
            uses = np.ones(N, dtype=np.int64)     # the exclusive-ownership checks below do not apply
        if (uses == 0).any():
            problems.append(f"{int((uses == 0).sum())} page(s) leaked (neither free nor owned), e.g. "
                            f"{np.nonzero(uses == 0)[0][:8].tolist()}")
        if (uses > 1).any():
            problems.append(f"{int((uses > 1).sum())} page(s) owned twice or owned and free, e.g. "
                            f"{np.nonzero(uses > 1)[0][:8].tolist()}")
        if (self._len_h < 0).any() or (self._len_h > owned * P).any():
            problems.append("a row's length is negative or exceeds its owned capacity (owned pages * page_size)")
        if (self._len_h > self._seen_h).any():
            problems.append("a row holds more tokens than were ever appended to it")
        if tuple(self.page_table.shape) != table.shape or not np.array_equal(self.page_table.cpu().numpy(), table):
            problems.append("device page_table differs from its host mirror")
        if not np.array_equal(self.lengths.cpu().numpy(), self._len_h):
            problems.append("device lengths differ from their host mirror")
        if self.v_pages.shape != self.k_pages.shape or (
                self.pos_pages is not None and tuple(self.pos_pages.shape) != (N, P)):
            problems.append("pool shapes disagree")
        if problems:
            raise RuntimeError("PagedKVCache invariant broken: " + "; ".join(problems))

    # ------------------------------------------------------------------ argument helpers
    def _check_layer(self, layer) -> int:
        return V.integer("layer", layer, low=0, high=self.num_layers - 1)

    def _ints(self, name: str, x) -> np.ndarray:
        """Host ints (an int, a list, numpy or a tensor) as int64 numpy; ``TypeError`` for non-integers,
        ``ValueError`` for a value outside int64 (casting would wrap ``2**63`` to ``-2**63``), naming ``name``."""
        i64 = _I64
        if isinstance(x, torch.Tensor):
            if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
                raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
            arr = x.detach().cpu().numpy()
        else:
            if isinstance(x, (bool, np.bool_)):
                raise TypeError(f"{name} must hold integers, got {type(x).__name__}")
            todo = [x]
            while todo:                # Python ints beyond int64: numpy would overflow, wrap or go float
                v = todo.pop()
                if isinstance(v, (list, tuple)):
                    todo.extend(v)
                elif isinstance(v, int) and not isinstance(v, bool) and not i64.min <= v <= i64.max:
                    raise ValueError(f"{name} must hold values in the int64 range [-2**63, 2**63), got {v}")
            arr = np.asarray(x)
            if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"{name} must hold integers, got {arr.dtype}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > i64.max:
            raise ValueError(f"{name} must hold values in the int64 range [-2**63, 2**63), got {int(arr.max())}")
        return arr.astype(np.int64)

    def _row_ints(self, name: str, x) -> np.ndarray:
        """An int, ``[batch]`` or ``[batch, kv_heads]`` host ints, as ``[batch, kv_heads]`` int64."""
        B, H = self.batch_size, self.num_kv_heads
        arr = self._ints(name, x)
        if arr.ndim == 0:
            return np.full((B, H), int(arr), dtype=np.int64)
        if arr.shape == (B,):
            return np.repeat(arr[:, None], H, axis=1)
        if arr.shape == (B, H):
            return arr.copy()
        raise ValueError(f"{name} must be an int, [batch={B}] or [batch={B}, kv_heads={H}], got shape {list(arr.shape)}")

    def _debug_check(self) -> None:
        if debug_checks():
            self.check_invariants()
