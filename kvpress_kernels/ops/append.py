"""Append: write new tokens' K/V (and their original positions) into the paged KV cache.

Layout (DESIGN.md §4): ``k_pages, v_pages: [num_pages, page_size, head_dim]``; a page belongs to one
row, a row being one (layer, sequence, kv-head). ``page_table: [..., max_pages]`` (int32) and
``lengths: [...]`` (int32) share their leading dims (e.g. ``[batch, kv_heads]``); ``k_new, v_new:
[..., T, head_dim]``.

Token ``t`` of row ``r`` goes to slot ``s = lengths[r] + t``, i.e. page ``page_table[r, s // page_size]``
at offset ``s % page_size``; then ``lengths[r] += counts[r]`` (``counts`` defaults to ``T``; only the
first ``counts[r]`` tokens of a row are written, which is how ragged / padded batches append).
Pages must already be owned by the row (``PagedKVCache`` allocates them); the op never allocates,
so it never syncs the host and is CUDA-graph safe.

The copy is bit-exact: kernels move the raw bits (viewed as integers), whatever the float dtype. The
Triton kernel copies [tokens x D] tiles in the widest integer view the layout allows, so that a GPU
moves K/V in 16-byte vectors (``kvpress-kernels compile-check`` verifies it in the PTX).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .._backend import resolve_backend, wants_data_checks
from .compaction import copy_tile, wide_bits

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - Triton missing (e.g. macOS): reference only
    triton = None


def append_ref(k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
               k_new: torch.Tensor, v_new: torch.Tensor, counts: Optional[torch.Tensor] = None,
               pos_pages: Optional[torch.Tensor] = None, pos_new: Optional[torch.Tensor] = None) -> None:
    """Reference append (plain PyTorch, any device). Same contract as :func:`append_`, no checks."""
    page_size = k_pages.shape[1]
    rows = lengths.numel()
    T = k_new.shape[-2]
    table = page_table.reshape(rows, page_table.shape[-1]).long()
    lens = lengths.reshape(rows)
    kn = k_new.reshape(rows, T, k_new.shape[-1])
    vn = v_new.reshape(rows, T, v_new.shape[-1])
    t = torch.arange(T, device=lens.device)
    if counts is None:  # every row writes its T tokens: no mask to compact (the decode step's case)
        slot = lens.long().unsqueeze(1) + t                          # [rows, T]
        flat = (table.gather(1, slot // page_size) * page_size + slot % page_size).reshape(-1)
        for pool, new in ((k_pages, kn), (v_pages, vn)):
            src = new.reshape(rows * T, new.shape[-1])
            if pool.is_contiguous():    # one index_copy_ over the flat slots: cheaper than a 2-index put
                pool.view(-1, pool.shape[-1]).index_copy_(0, flat, src)
            else:
                pool[flat // page_size, flat % page_size] = src
        if pos_pages is not None:
            pos_pages.view(-1).index_copy_(0, flat, pos_new.reshape(rows * T).to(pos_pages.dtype))
        lens += T
        return
    cnt = counts.reshape(rows).long()
    write = t.unsqueeze(0) < cnt.unsqueeze(1)                       # [rows, T]
    slot = lens.long().unsqueeze(1) + t.unsqueeze(0)                # [rows, T]
    r_idx, t_idx = write.nonzero(as_tuple=True)
    s = slot[r_idx, t_idx]
    page = table[r_idx, s // page_size]
    off = s % page_size
    k_pages[page, off] = kn[r_idx, t_idx]
    v_pages[page, off] = vn[r_idx, t_idx]
    if pos_pages is not None:
        pos_pages[page, off] = pos_new.reshape(rows, T)[r_idx, t_idx].to(pos_pages.dtype)
    lens += cnt.to(lens.dtype)


if triton is not None:

    @triton.jit
    def _append_kernel(k_pages, v_pages, pos_pages, table, lengths, counts, k_new, v_new, pos_new,
                       stride_kp_page, stride_kp_slot, stride_vp_page, stride_vp_slot,
                       stride_table_row, stride_table_col, stride_kn_row, stride_kn_t, stride_vn_row, stride_vn_t,
                       stride_pn_row, T, DK, DV, PAGE_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_COUNTS: tl.constexpr,
                       HAS_POS: tl.constexpr):
        # A program copies [BLOCK_T tokens, BLOCK_D] tiles of raw bits (like compaction): one page
        # lookup per token, then 16-byte vectors along D. Programs of axis 1 stride over the row's
        # token tiles (CUDA caps grid axis 1 at 65,535). Lengths are advanced by a second tiny
        # launch so that no program reads a length another program has already advanced.
        row = tl.program_id(0).to(tl.int64)
        if HAS_COUNTS:
            n = tl.load(counts + row)
        else:
            n = T
        base = tl.load(lengths + row).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        for t0 in range(tl.program_id(1) * BLOCK_T, n, tl.num_programs(1) * BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tm = t < n
            slot = base + t
            page = tl.load(table + row * stride_table_row + (slot // PAGE_SIZE) * stride_table_col,
                           mask=tm, other=0).to(tl.int64)
            off = slot % PAGE_SIZE
            tt = t.to(tl.int64)[:, None]
            k_dst = (page * stride_kp_page + off * stride_kp_slot)[:, None]
            for d0 in range(0, DK, BLOCK_D):
                if EVEN_D:  # a mask constant along d keeps the 16-byte vectors
                    m = tm[:, None] & (d < BLOCK_D)[None, :]
                else:
                    m = tm[:, None] & ((d0 + d) < DK)[None, :]
                x = tl.load(k_new + row * stride_kn_row + tt * stride_kn_t + (d0 + d)[None, :], mask=m)
                tl.store(k_pages + k_dst + (d0 + d)[None, :], x, mask=m)
            v_dst = (page * stride_vp_page + off * stride_vp_slot)[:, None]
            for d0 in range(0, DV, BLOCK_D):
                if EVEN_D:
                    m = tm[:, None] & (d < BLOCK_D)[None, :]
                else:
                    m = tm[:, None] & ((d0 + d) < DV)[None, :]
                x = tl.load(v_new + row * stride_vn_row + tt * stride_vn_t + (d0 + d)[None, :], mask=m)
                tl.store(v_pages + v_dst + (d0 + d)[None, :], x, mask=m)
            if HAS_POS:
                p = tl.load(pos_new + row * stride_pn_row + t, mask=tm)
                tl.store(pos_pages + page * PAGE_SIZE + off, p, mask=tm)

    @triton.jit
    def _advance_lengths_kernel(lengths, counts, rows, T, HAS_COUNTS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = r < rows
        cur = tl.load(lengths + r, mask=m)
        if HAS_COUNTS:
            inc = tl.load(counts + r, mask=m).to(cur.dtype)
        else:
            inc = T
        tl.store(lengths + r, cur + inc, mask=m)


_MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1


def _append_triton(k_pages, v_pages, page_table, lengths, k_new, v_new, counts, pos_pages, pos_new) -> None:
    rows = lengths.numel()
    T, D = k_new.shape[-2], k_new.shape[-1]
    if rows == 0 or T == 0:
        return
    page_size = k_pages.shape[1]
    table = page_table.reshape(rows, page_table.shape[-1])
    # Raw bits in the widest integer view all four tensors allow (one width for the pair of each copy).
    kn, kp = _copy_views(k_new.reshape(rows, T, D), k_pages)
    vn, vp = _copy_views(v_new.reshape(rows, T, D), v_pages)
    lens = lengths.reshape(rows)
    cnt = counts.reshape(rows).contiguous() if counts is not None else lens  # read with unit stride
    # the kernel reads a row's positions with unit stride
    pn = pos_new.reshape(rows, T).to(pos_pages.dtype).contiguous() if pos_pages is not None else lens
    pp = pos_pages if pos_pages is not None else lens
    dk, dv = kp.shape[-1], vp.shape[-1]
    block_t, block_d, even_d, num_warps = copy_tile(T, dk, dv, kp.element_size())
    _append_kernel[(rows, min(triton.cdiv(T, block_t), _MAX_GRID_Y))](
        kp, vp, pp, table, lens, cnt, kn, vn, pn,
        kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
        table.stride(0), table.stride(1), kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1),
        pn.stride(0) if pos_pages is not None else 0, T, dk, dv,
        PAGE_SIZE=page_size, BLOCK_T=block_t, BLOCK_D=block_d, EVEN_D=even_d,
        HAS_COUNTS=counts is not None, HAS_POS=pos_pages is not None, num_warps=num_warps)
    _advance_lengths_kernel[(triton.cdiv(rows, 256),)](lens, cnt, rows, T, HAS_COUNTS=counts is not None, BLOCK=256)


def _copy_views(new: torch.Tensor, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(new, pages) viewed as the same integer type, the widest both allow (see compaction)."""
    a, b = wide_bits(new), wide_bits(pages)
    width = min(a.element_size(), b.element_size())
    return wide_bits(new, max_width=width), wide_bits(pages, max_width=width)


@torch.library.custom_op("kvpress_kernels::append_", mutates_args=("k_pages", "v_pages", "lengths", "pos_pages"))
def _append_op(k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
               k_new: torch.Tensor, v_new: torch.Tensor, counts: Optional[torch.Tensor],
               pos_pages: Optional[torch.Tensor], pos_new: Optional[torch.Tensor], backend: str) -> None:
    if backend == "triton":
        _append_triton(k_pages, v_pages, page_table, lengths, k_new, v_new, counts, pos_pages, pos_new)
    else:
        append_ref(k_pages, v_pages, page_table, lengths, k_new, v_new, counts, pos_pages, pos_new)


@_append_op.register_fake
def _(k_pages, v_pages, page_table, lengths, k_new, v_new, counts, pos_pages, pos_new, backend) -> None:
    return None


def append_(k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
            k_new: torch.Tensor, v_new: torch.Tensor, *, counts: Optional[torch.Tensor] = None,
            pos_pages: Optional[torch.Tensor] = None, pos_new: Optional[torch.Tensor] = None,
            backend: Optional[str] = None) -> None:
    """Append new tokens to a paged KV cache, in place.

    Parameters
    ----------
    k_pages, v_pages : Tensor ``[num_pages, page_size, head_dim]``, float32/float16/bfloat16
        Page pools (mutated). Last dimension contiguous; other strides free.
    page_table : Tensor ``[..., max_pages]``, int32/int64
        Pages owned by each row, in order. Leading dims ``...`` (e.g. ``[batch, kv_heads]``) are the rows.
    lengths : Tensor ``[...]``, int32/int64, contiguous
        Tokens held per row (mutated: ``lengths += counts``).
    k_new, v_new : Tensor ``[..., T, head_dim]``, same dtype as the pools
        New keys (RoPE already applied) and values.
    counts : Tensor ``[...]``, optional
        Number of leading tokens of each row's ``T`` to write (``0 <= counts <= T``); default ``T``.
    pos_pages : Tensor ``[num_pages, page_size]``, int32/int64, optional
        Side pool of original token positions, written alongside (``pos_new: [..., T]`` required then).
    backend : {"reference", "triton"}, optional
        Force an implementation (see :mod:`kvpress_kernels._backend`).

    Raises ``TypeError``/``ValueError`` naming the argument on malformed input, including a row whose
    new length would exceed its owned pages. Data-dependent checks (page indices, capacity) read the
    device, so on CUDA they run only with ``KVPRESS_KERNELS_DEBUG=1``.
    """
    dev, num_pages, page_size, D, lead = V.paged_layout(k_pages, v_pages, page_table, lengths)
    V.tensor("k_new", k_new, dtypes=(k_pages.dtype,), device=dev, last_contiguous=True)
    if k_new.dim() != len(lead) + 2:
        raise ValueError(f"k_new must be [{', '.join(map(str, lead))}, T, {D}], got shape {list(k_new.shape)}")
    T = k_new.shape[-2]
    V.shape("k_new", k_new, lead + [T, D], "([*page_table.shape[:-1], T, head_dim])")
    V.tensor("v_new", v_new, dtypes=(k_pages.dtype,), device=dev, last_contiguous=True)
    V.shape("v_new", v_new, lead + [T, D], "(same as k_new)")
    if counts is not None:
        V.tensor("counts", counts, dtypes=V.INDEX_DTYPES, device=dev)
        V.shape("counts", counts, lead, "(the leading dims of page_table)")
    if (pos_pages is None) != (pos_new is None):
        raise ValueError("pos_pages and pos_new must be given together")
    if pos_pages is not None:
        V.tensor("pos_pages", pos_pages, dtypes=V.INDEX_DTYPES, device=dev)
        V.shape("pos_pages", pos_pages, [num_pages, page_size], "([num_pages, page_size])")
        if not pos_pages.is_contiguous():
            raise ValueError("pos_pages must be contiguous")
        V.tensor("pos_new", pos_new, dtypes=V.INDEX_DTYPES, device=dev)
        V.shape("pos_new", pos_new, lead + [T], "([*page_table.shape[:-1], T])")
    if wants_data_checks(lengths):
        max_pages = page_table.shape[-1]
        # lengths on their own first: a negative length plus counts can look in range while its slots
        # (-1, ...) resolve through page_table[r, -1] into another row's page.
        V.values_in("lengths", lengths, low=0, high=max_pages * page_size, what="(tokens a row holds)")
        cnt = counts.reshape(-1).long() if counts is not None else torch.full((lengths.numel(),), T, device=dev)
        if counts is not None and cnt.numel() and (int(cnt.min()) < 0 or int(cnt.max()) > T):
            raise ValueError(f"counts must be in [0, T={T}], got min {int(cnt.min())}, max {int(cnt.max())}")
        new_len = lengths.reshape(-1).long() + cnt
        if new_len.numel() and int(new_len.max()) > max_pages * page_size:
            raise ValueError(
                f"lengths + counts exceeds the pages owned by a row (max_pages * page_size = "
                f"{max_pages * page_size}); allocate pages first (PagedKVCache.reserve)")
        V.page_table("page_table", page_table, num_pages, new_len, page_size)
        V.distinct_pages(page_table, new_len, page_size)
    b = resolve_backend("append", backend, dev, has=("reference", "triton"))
    torch.ops.kvpress_kernels.append_(k_pages, v_pages, page_table, lengths, k_new, v_new, counts,
                                      pos_pages, pos_new, b)
