"""In-place compaction: evict tokens from a paged KV cache by moving the kept tail into the holes.

Layout (DESIGN.md §4): ``k_pages, v_pages: [num_pages, page_size, head_dim]``, one page per row, a
row being one (layer, sequence, kv-head). ``page_table: [..., max_pages]`` and ``lengths: [...]``
share their leading dims (e.g. ``[batch, kv_heads]`` or ``[layers, batch, kv_heads]``);
``kept_idx: [..., K]`` lists, per row, the slots to keep in strictly ascending order, then ``-1``
padding.

The plan of a row (``a_0 < a_1 < ...`` its kept slots, ``n`` of them):

- the new length is ``n``;
- *holes* are the slots ``< n`` that are not kept, ascending;
- *sources* are the kept slots ``>= n``, ascending (there are exactly as many as holes);
- the ``i``-th source moves into the ``i``-th hole, K, V and the position side pool together;
- ``lengths[r] = n``.

Sources lie at or beyond ``n`` and holes before it, so no slot is both read and written: every move
is independent, the op needs no scratch buffer, and it moves the fewest bytes possible (a kept
token already below ``n`` never moves). The slot order afterwards is not position order — RoPE is
already in the keys and attention is order-free; ``pos_pages`` keeps the original positions.
Pages are not freed here; ``PagedKVCache.compact`` returns the tail pages to its pool.

Triton kernel (one program per (row, tile of ``kept_idx``), no host sync, no scratch):
``n`` is found by a binary search for the ``-1`` boundary (valid entries form a prefix),
``c = #{m : a_m < n}`` by a second binary search. The program's entries ``m`` with ``c <= m < n``
are sources of rank ``i = m - c``. The number of holes before kept slot ``a_m`` is ``a_m - m``, a
non-decreasing sequence in ``m``, so hole ``i`` sits at slot ``i + #{m < c : a_m - m <= i}``,
another (vectorised) binary search. Rows are then copied as raw bits (floats viewed as the widest
integer type their layout allows), which is bit-exact in every backend, the interpreter included.
The program of tile 0 writes the row's new length; no program reads ``lengths``, so there is no race.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _validate as V
from .._backend import resolve_backend, wants_data_checks

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - Triton missing (e.g. macOS): reference only
    triton = None


def compaction_plan_ref(kept_idx: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The moves compaction makes, as flat lists (for tests and debugging).

    Parameters
    ----------
    kept_idx : Tensor ``[..., K]``, int32/int64
        Kept slots per row, strictly ascending, then ``-1`` padding.
    lengths : Tensor ``[...]``
        Current lengths (only the row count is used; the plan depends on ``kept_idx`` alone).

    Returns
    -------
    src, dst, row : Tensor ``[M]``, int64
        Move ``j`` copies row ``row[j]``'s slot ``src[j]`` (a row-local slot) into its slot
        ``dst[j]``; ordered by row, then by source rank. ``M`` depends on the data, so this reads
        the device (a sync on CUDA).
    """
    rows = lengths.numel()
    K = kept_idx.shape[-1]
    kept = kept_idx.reshape(rows, K).long()
    dev = kept.device
    valid = kept >= 0
    new_len = valid.sum(1)                                            # [R]
    below = valid & (kept < new_len.unsqueeze(1))                     # kept slots that stay put
    c = below.sum(1)                                                  # [R]
    m = torch.arange(K, device=dev).unsqueeze(0)                      # [1, K]
    is_src = valid & ~below                                           # entries c <= m < new_len
    # Holes: hole i = i + #{m < c : a_m - m <= i}; the sequence a_m - m is non-decreasing on m < c.
    big = torch.iinfo(torch.int64).max
    holes_before = torch.where(below, kept - m, torch.full_like(kept, big))
    rank = (m - c.unsqueeze(1)).clamp_min(0)                          # source rank i = m - c
    dst_all = rank + torch.searchsorted(holes_before.contiguous(), rank.contiguous(), right=True)
    row_all = torch.arange(rows, device=dev).unsqueeze(1).expand(rows, K)
    return kept[is_src], dst_all[is_src], row_all[is_src]


def compact_ref(k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
                kept_idx: torch.Tensor, pos_pages: Optional[torch.Tensor] = None) -> None:
    """Reference compaction (plain PyTorch, any device). Same contract as :func:`compact_`, no
    checks. It builds the move list with :func:`compaction_plan_ref`, whose size depends on the
    data, so on CUDA it syncs the host (the Triton and CUDA backends do not)."""
    rows = lengths.numel()
    page_size = k_pages.shape[1]
    K = kept_idx.shape[-1]
    src, dst, row = compaction_plan_ref(kept_idx, lengths)
    table = page_table.reshape(rows, page_table.shape[-1]).long()
    sp, so = table[row, src // page_size], src % page_size
    dp, do = table[row, dst // page_size], dst % page_size
    # Sources and destinations are disjoint, so gathering before scattering is all the ordering
    # needed.
    k_pages[dp, do] = k_pages[sp, so]
    v_pages[dp, do] = v_pages[sp, so]
    if pos_pages is not None:
        pos_pages[dp, do] = pos_pages[sp, so]
    new_len = (kept_idx.reshape(rows, K) >= 0).sum(1)
    lengths.reshape(rows).copy_(new_len.to(lengths.dtype))


def wide_bits(t: torch.Tensor, max_width: int = 8) -> torch.Tensor:
    """View a float tensor as an integer type at least as wide as its own, at most ``max_width`` bytes.

    Moving raw bits keeps the copy bit-exact in every backend (the interpreter mishandles bf16
    arithmetic, integer moves are exact); wider elements mean fewer, wider memory transactions.
    ``Tensor.view(dtype)`` itself checks what makes a wider view legal (unit last stride, sizes,
    strides and storage offset divisible by the ratio). Among the legal views, the widest one whose
    outer strides are multiples of 16 elements is preferred: Triton's JIT marks such strides as
    divisible by 16, which is what lets the compiler prove 16-byte alignment of every row and emit
    16-byte vectors (fp16 at D = 96: an int64 view has 24-element rows and gets 8-byte moves, the
    int32 view has 48-element rows and gets 16-byte moves).
    """
    es = t.element_size()
    legal = []
    for width, dt in ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.int8)):
        if width < es:
            break
        if width > max_width and width != es:
            continue
        try:
            legal.append(t.view(dt))
        except RuntimeError:
            continue
    if not legal:  # pragma: no cover - a same-width integer view always exists
        raise AssertionError("unreachable: a same-width integer view always exists")
    for v in legal:
        if all(st % 16 == 0 or sz == 1 for st, sz in zip(v.stride()[:-1], v.shape[:-1])):
            return v
    return legal[0]


#: Bytes of K (or V) one program moves per copy tile: 8 KiB over 4 warps is four 16-byte vectors per
#: thread in flight, and keeps the tile's addresses and data within ~64 registers (the compile check
#: holds copy kernels to <= 128 registers; 32 KiB tiles took 165-227).
COPY_TILE_BYTES = 8192


def copy_tile(n_tokens: int, dk: int, dv: int, elem_size: int) -> tuple[int, int, bool, int]:
    """(tokens per tile, BLOCK_D, EVEN_D, num_warps) of a [tokens x D] raw-bits copy (compaction, append).

    ``BLOCK_D`` covers a row in one step up to 256 bytes; when it does not divide the row, the largest
    power of two dividing both row lengths is used instead if it still spans 16 bytes (``EVEN_D``: a
    mask constant along d, so the compiler keeps 16-byte vectors), else the tail is masked. Triton
    gives a thread fewer elements than a 16-byte vector when the tile has fewer than 16 bytes per
    thread, so a small copy (a decode step's single token) gets one warp and a tile of at least
    512 bytes (the extra tokens are masked off)."""
    dmax = max(dk, dv, 1)
    block_d = min(triton.next_power_of_2(dmax), max(1, 256 // elem_size))
    even = dk % block_d == 0 and dv % block_d == 0
    if not even:
        g = math.gcd(dk, dv)
        p = g & -g
        if p * elem_size >= 16:
            block_d, even = min(p, block_d), True
    row_bytes = block_d * elem_size
    block_t = max(1, min(triton.next_power_of_2(max(n_tokens, 1)), COPY_TILE_BYTES // row_bytes))
    num_warps = 4 if block_t * row_bytes >= 4 * 32 * 16 else 1
    block_t = max(block_t, triton.cdiv(num_warps * 32 * 16, row_bytes))
    return block_t, block_d, even, num_warps


if triton is not None:

    @triton.jit
    def _compact_kernel(k_pages, v_pages, pos_pages, table, lengths, kept,
                        stride_kp_page, stride_kp_slot, stride_vp_page, stride_vp_slot,
                        stride_pp_page, stride_pp_slot, stride_table_row, stride_table_col,
                        stride_kept_row, stride_kept_col, K, DK, DV,
                        PAGE_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        LOG_K: tl.constexpr, HAS_POS: tl.constexpr, EVEN_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        kept_row = kept + row * stride_kept_row

        # new_len: valid entries (>= 0) form a prefix of kept_idx; LOG_K = bit_length(K) halvings
        # shrink [0, K] to one point.
        lo = tl.zeros([], dtype=tl.int32)
        hi = tl.zeros([], dtype=tl.int32) + K
        for _ in range(LOG_K):
            mid = (lo + hi) // 2
            act = mid < hi
            a = tl.load(kept_row + mid.to(tl.int64) * stride_kept_col, mask=act, other=-1)
            lo = tl.where(act & (a >= 0), mid + 1, lo)
            hi = tl.where(act & (a < 0), mid, hi)
        new_len = lo

        # c: kept slots below new_len (they stay put) form a prefix of the valid entries.
        lo = tl.zeros([], dtype=tl.int32)
        hi = new_len
        for _ in range(LOG_K):
            mid = (lo + hi) // 2
            act = mid < hi
            a = tl.load(kept_row + mid.to(tl.int64) * stride_kept_col, mask=act, other=0)
            lo = tl.where(act & (a < new_len), mid + 1, lo)
            hi = tl.where(act & (a >= new_len), mid, hi)
        c = lo

        if tile == 0:
            # No program reads lengths, so writing it here cannot race with the moves.
            tl.store(lengths + row, new_len.to(lengths.dtype.element_ty))

        t0 = tile * BLOCK_K
        if (t0 + BLOCK_K > c) & (t0 < new_len):
            m = t0 + tl.arange(0, BLOCK_K)
            is_src = (m >= c) & (m < new_len)
            rank = m - c
            # Hole of source rank i: i + #{j < c : a_j - j <= i} (a_j - j = holes before a_j,
            # non-decreasing), found by a vectorised binary search over j in [0, c).
            blo = tl.zeros([BLOCK_K], dtype=tl.int32)
            bhi = tl.zeros([BLOCK_K], dtype=tl.int32) + c
            for _ in range(LOG_K):
                mid = (blo + bhi) // 2
                act = is_src & (mid < bhi)
                a = tl.load(kept_row + mid.to(tl.int64) * stride_kept_col, mask=act, other=0).to(tl.int32)
                ok = (a - mid) <= rank
                blo = tl.where(act & ok, mid + 1, blo)
                bhi = tl.where(act & (~ok), mid, bhi)
            dst = (rank + blo).to(tl.int64)
            src = tl.load(kept_row + m.to(tl.int64) * stride_kept_col, mask=is_src, other=0).to(tl.int64)

            trow = table + row * stride_table_row
            sp = tl.load(trow + (src // PAGE_SIZE) * stride_table_col, mask=is_src, other=0).to(tl.int64)
            dp = tl.load(trow + (dst // PAGE_SIZE) * stride_table_col, mask=is_src, other=0).to(tl.int64)
            so = src % PAGE_SIZE
            do = dst % PAGE_SIZE

            d = tl.arange(0, BLOCK_D)
            k_src = (sp * stride_kp_page + so * stride_kp_slot)[:, None]
            k_dst = (dp * stride_kp_page + do * stride_kp_slot)[:, None]
            for d0 in range(0, DK, BLOCK_D):
                if EVEN_D:  # a mask constant along d lets the compiler emit 16-byte vector moves
                    md = is_src[:, None] & (d < BLOCK_D)[None, :]
                else:
                    md = is_src[:, None] & ((d0 + d) < DK)[None, :]
                x = tl.load(k_pages + k_src + (d0 + d)[None, :], mask=md)
                tl.store(k_pages + k_dst + (d0 + d)[None, :], x, mask=md)
            v_src = (sp * stride_vp_page + so * stride_vp_slot)[:, None]
            v_dst = (dp * stride_vp_page + do * stride_vp_slot)[:, None]
            for d0 in range(0, DV, BLOCK_D):
                if EVEN_D:  # a mask constant along d lets the compiler emit 16-byte vector moves
                    md = is_src[:, None] & (d < BLOCK_D)[None, :]
                else:
                    md = is_src[:, None] & ((d0 + d) < DV)[None, :]
                x = tl.load(v_pages + v_src + (d0 + d)[None, :], mask=md)
                tl.store(v_pages + v_dst + (d0 + d)[None, :], x, mask=md)
            if HAS_POS:
                p = tl.load(pos_pages + sp * stride_pp_page + so * stride_pp_slot, mask=is_src)
                tl.store(pos_pages + dp * stride_pp_page + do * stride_pp_slot, p, mask=is_src)


def _compact_triton(k_pages, v_pages, page_table, lengths, kept_idx, pos_pages) -> None:
    rows = lengths.numel()
    if rows == 0:
        return
    K = kept_idx.shape[-1]
    page_size = k_pages.shape[1]
    table = page_table.reshape(rows, page_table.shape[-1])
    kept = kept_idx.reshape(rows, K)
    lens = lengths.reshape(rows)
    kp, vp = wide_bits(k_pages), wide_bits(v_pages)
    dk, dv = kp.shape[-1], vp.shape[-1]
    pp = pos_pages if pos_pages is not None else lens
    spp = (pos_pages.stride(0), pos_pages.stride(1)) if pos_pages is not None else (0, 0)
    block_k, block_d, even_d, num_warps = copy_tile(K, dk, dv, max(kp.element_size(), vp.element_size()))
    n_tiles = max(1, triton.cdiv(K, block_k))  # >= 1 so that tile 0 always writes the new length
    _compact_kernel[(rows, n_tiles)](
        kp, vp, pp, table, lens, kept,
        kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1), spp[0], spp[1],
        table.stride(0), table.stride(1), kept.stride(0), kept.stride(1), K, dk, dv,
        PAGE_SIZE=page_size, BLOCK_K=block_k, BLOCK_D=block_d, LOG_K=int(K).bit_length(),
        HAS_POS=pos_pages is not None, EVEN_D=even_d, num_warps=num_warps)


@torch.library.custom_op("kvpress_kernels::compact_", mutates_args=("k_pages", "v_pages", "lengths", "pos_pages"))
def _compact_op(k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
                kept_idx: torch.Tensor, pos_pages: Optional[torch.Tensor], backend: str) -> None:
    if backend == "triton":
        _compact_triton(k_pages, v_pages, page_table, lengths, kept_idx, pos_pages)
    elif backend == "cuda":
        from .._cuda import compact_cuda

        rows = lengths.numel()
        compact_cuda(k_pages, v_pages, page_table.reshape(rows, page_table.shape[-1]), lengths.reshape(rows),
                     kept_idx.reshape(rows, kept_idx.shape[-1]), pos_pages)
    else:
        compact_ref(k_pages, v_pages, page_table, lengths, kept_idx, pos_pages)


@_compact_op.register_fake
def _(k_pages, v_pages, page_table, lengths, kept_idx, pos_pages, backend) -> None:
    return None


def _check_kept_data(kept_idx: torch.Tensor, lengths: torch.Tensor) -> None:
    """Data checks of ``kept_idx`` against ``lengths`` (reads values)."""
    rows, K = lengths.numel(), kept_idx.shape[-1]
    if rows == 0 or K == 0:
        return
    kept = kept_idx.reshape(rows, K).long()
    lens = lengths.reshape(rows).long().to(kept.device)
    if bool((kept < -1).any()):
        raise ValueError(f"kept_idx padding must be -1, got min {int(kept.min())}")
    valid = kept >= 0
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        r = int((valid[:, 1:] & ~valid[:, :-1]).any(1).nonzero()[0])
        raise ValueError(f"kept_idx must put its -1 padding after the kept slots; row {r} has a kept slot after a -1")
    bad = valid[:, 1:] & (kept[:, 1:] <= kept[:, :-1])
    if bool(bad.any()):
        r = int(bad.any(1).nonzero()[0])
        raise ValueError(f"kept_idx must be strictly ascending per row; row {r} is not: {kept[r][valid[r]].tolist()[:16]}")
    over = valid & (kept >= lens.unsqueeze(1))
    if bool(over.any()):
        r = int(over.any(1).nonzero()[0])
        raise ValueError(f"kept_idx holds slot {int(kept[r][over[r]][0])} in row {r}, beyond lengths[{r}] = {int(lens[r])}")


def compact_(k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
             kept_idx: torch.Tensor, *, pos_pages: Optional[torch.Tensor] = None,
             backend: Optional[str] = None) -> None:
    """Evict every token not listed in ``kept_idx``, in place, moving the kept tail into the holes.

    Per row with kept slots ``a_0 < ... < a_{n-1}``: the kept slots ``>= n`` move, in ascending
    order, into the non-kept slots ``< n``, in ascending order; then ``lengths[r] = n``. K, V and
    ``pos_pages`` move together, bit for bit. See the module docstring for why this is race-free
    without scratch memory.

    Parameters
    ----------
    k_pages, v_pages : Tensor ``[num_pages, page_size, head_dim]``, float32/float16/bfloat16
        Page pools (mutated). Last dimension contiguous; other strides free.
    page_table : Tensor ``[..., max_pages]``, int32/int64
        Pages owned by each row, in order. Leading dims ``...`` (e.g. ``[batch, kv_heads]`` or
        ``[layers, batch, kv_heads]``) are the rows. Not modified: pages are freed by the caller.
    lengths : Tensor ``[...]``, int32/int64, contiguous
        Tokens held per row (mutated: set to the number of kept slots).
    kept_idx : Tensor ``[..., K]``, int32/int64
        Per row, the kept slots in strictly ascending order, each ``< lengths[r]``, then ``-1``
        padding. ``K`` is any width (``K = 0`` empties every row).
    pos_pages : Tensor ``[num_pages, page_size]``, int32/int64, optional
        Side pool of original positions, moved with K and V.
    backend : {"reference", "triton", "cuda"}, optional
        Force an implementation (see :mod:`kvpress_kernels._backend`).

    Raises ``TypeError``/``ValueError`` naming the argument on malformed input. Data-dependent checks
    (ordering and range of ``kept_idx``, page indices) read the device, so on CUDA they run only with
    ``KVPRESS_KERNELS_DEBUG=1``; the Triton and CUDA paths never sync the host.
    """
    dev, num_pages, page_size, _, lead = V.paged_layout(k_pages, v_pages, page_table, lengths)
    V.tensor("kept_idx", kept_idx, dtypes=V.INDEX_DTYPES, device=dev)
    if kept_idx.dim() != len(lead) + 1:
        raise ValueError(f"kept_idx must be [{', '.join(map(str, lead + ['K']))}], got shape {list(kept_idx.shape)}")
    V.shape("kept_idx", kept_idx, lead + [None], "([*page_table.shape[:-1], K])")
    if pos_pages is not None:
        V.tensor("pos_pages", pos_pages, ndim=2, dtypes=V.INDEX_DTYPES, device=dev)
        V.shape("pos_pages", pos_pages, [num_pages, page_size], "([num_pages, page_size])")
        V.writable("pos_pages", pos_pages)
    if wants_data_checks(kept_idx):
        V.page_table("page_table", page_table, num_pages, lengths, page_size)
        _check_kept_data(kept_idx, lengths)
        V.distinct_pages(page_table, lengths, page_size)
    b = resolve_backend("compact", backend, dev, has=("reference", "triton", "cuda"))
    torch.ops.kvpress_kernels.compact_(k_pages, v_pages, page_table, lengths, kept_idx, pos_pages, b)
