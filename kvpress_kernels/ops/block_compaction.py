"""Scoring and in-place compaction on a serving engine's block layout (DESIGN.md §4 stride-generic
mode, §7 serving engines).

The engine layout (vLLM and every engine modelled on it): per layer, a K cache and a V cache that
are (views) ``[num_blocks, block_size, kv_heads, head_dim]`` with any strides and a unit last stride;
a block holds ``block_size`` consecutive tokens of **every** kv head; one block-table row
``block_table: [max_blocks]`` per request, shared by every kv head (and every layer of a KV-cache
group). Slot ``j`` of the request is ``(block_table[j // block_size], j % block_size)``.
:mod:`kvpress_kernels.engines.vllm` turns vLLM's per-layer tensors (``[2, num_blocks, ...]``,
``[num_blocks, 2, ...]``, NHD or HND strides, cross-layer allocations) into these views.

Mode (what keeps the engine's own attention kernels working): every kv head of a layer keeps the
same number ``K`` of tokens, so the request still has one length. Heads may keep *different* tokens.

Compaction (:func:`block_compact_`): ``kept_idx [kv_heads, K]`` (or ``[1, K]``, one kept set shared
by every head) lists per head the kept slots, strictly ascending, all ``< num_tokens``. Per head the
plan of :mod:`kvpress_kernels.ops.compaction`: kept slots ``>= K`` (sources, ascending) move into
the non-kept slots ``< K`` (holes, ascending); a kept slot below ``K`` never moves. Sources and
holes are disjoint, so the moves are independent: in place, no scratch, the fewest bytes moved.
Afterwards slots ``[0, K)`` of every head hold exactly its kept tokens (not in position order; RoPE
is already in the keys and attention is order-free), and the blocks
``block_table[ceil(K / block_size) : ceil(num_tokens / block_size)]`` hold no live token of the
layer: :func:`freed_block_range` names them; freeing them is the engine's job (and only valid when
every layer of the block table's group kept ``<= K`` tokens).

Triton kernel ``_block_compact_kernel``: one program per (kv head, tile of ``BLOCK_K`` kept
entries). ``c = #{m : a_m < K}`` by a binary search (the kept slots are ascending, ``K`` is known on
the host, so no search for the length); entries ``c <= m < K`` are sources of rank ``i = m - c``;
hole ``i`` is ``i + #{j < c : a_j - j <= i}`` (``a_j - j`` is non-decreasing), a vectorised binary
search. K and V rows are moved as raw bits (the widest integer view the strides allow), bit-exact
in every backend. No program reads what another writes, no host sync.

Gather into fresh blocks (:func:`block_gather_`, the "private destination" mode of engine plugins such
as vllm-ascend-kvcompress): slot ``j < K`` of the destination row receives kept slot ``a_j`` of the
source row, per head, in position order; the source blocks are not written (the engine releases them
afterwards). Destination blocks must be disjoint from the source blocks in use, so the copies are
independent: one program per (kv head, tile of ``BLOCK_K`` kept entries), kernel
``_block_gather_kernel``.

Scoring (:func:`block_attention_mass`): the paged scoring kernels of
:mod:`kvpress_kernels.ops.scoring` read the engine's K cache in place through a *virtual page
pool*. Token ``(block b, slot s, head h)`` sits at element offset ``b*S_b + s*S_s + h*S_h``. With
``g = gcd(S_b, S_h)`` the pair ``(b, h)`` is the virtual page ``v = b*S_b/g + h*S_h/g`` of the
strided view ``[P, block_size, head_dim]`` with strides ``(g, S_s, 1)``: page ``v`` slot ``s`` is
exactly that token. The per-(request, head) page table ``[1, kv_heads, max_blocks]`` is
``block_table * S_b/g + h * S_h/g``: a few integer ops, no copy of K, no host sync.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _validate as V
from .._backend import resolve_backend, wants_data_checks
from .compaction import compaction_plan_ref, copy_tile, wide_bits
from .scoring import attention_mass_paged

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - Triton missing (e.g. macOS): reference only
    triton = None


# ---------------------------------------------------------------------------------------------
# Block-table helpers (host arithmetic only)
# ---------------------------------------------------------------------------------------------

def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``."""
    return -(-int(num_tokens) // int(block_size))


def freed_block_range(old_tokens: int, new_tokens: int, block_size: int) -> Tuple[int, int]:
    """``(start, end)``: the entries ``block_table[start:end]`` that hold no token once a request
    shrinks from ``old_tokens`` to ``new_tokens`` slots (empty when ``new_tokens >= old_tokens``)."""
    start = blocks_for(new_tokens, block_size)
    return start, max(start, blocks_for(old_tokens, block_size))


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------

def _move_slots(k_cache, v_cache, src_table, dst_table, src, dst, head) -> None:
    """The references' copy: slot ``src[j]`` of ``src_table``'s row into slot ``dst[j]`` of ``dst_table``'s
    row, kv head ``head[j]``, K and V. Sources and destinations are disjoint (compaction: sources are
    kept slots >= K, destinations holes < K; gather: distinct blocks), so gathering everything before
    scattering is all the ordering needed."""
    bs = k_cache.shape[1]
    sb, so = src_table.long()[src // bs], src % bs
    db, do = dst_table.long()[dst // bs], dst % bs
    k_cache[db, do, head] = k_cache[sb, so, head]
    v_cache[db, do, head] = v_cache[sb, so, head]


def block_compact_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      kept_idx: torch.Tensor, num_tokens: int) -> None:
    """Reference of :func:`block_compact_` (plain PyTorch, any device, no checks). The move list
    comes from :func:`~kvpress_kernels.ops.compaction.compaction_plan_ref` (its size depends on the
    data: a host sync on CUDA, which the Triton path does not have)."""
    H = k_cache.shape[2]
    kept = kept_idx.expand(H, kept_idx.shape[1])
    src, dst, head = compaction_plan_ref(kept, torch.empty(H, dtype=torch.int64, device=kept.device))
    _move_slots(k_cache, v_cache, block_table, block_table, src, dst, head)


def block_gather_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, src_table: torch.Tensor, dst_table: torch.Tensor,
                     kept_idx: torch.Tensor) -> None:
    """Reference of :func:`block_gather_` (plain PyTorch, any device, no checks)."""
    H, K = k_cache.shape[2], kept_idx.shape[1]
    src = kept_idx.expand(H, K).long()                                   # [H, K]
    dst = torch.arange(K, device=kept_idx.device).expand(H, K)
    head = torch.arange(H, device=kept_idx.device).view(H, 1).expand(H, K)
    _move_slots(k_cache, v_cache, src_table, dst_table, src, dst, head)


def gather_block_tokens(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Dense copy ``[kv_heads, num_tokens, head_dim]`` of a request's tokens from a block-layout
    cache ``[num_blocks, block_size, kv_heads, head_dim]``: ``out[h, j] = cache[bt[j // bs], j % bs, h]``.
    O(num_tokens) memory (the test oracle, and the dense keys the methods take)."""
    bs = cache.shape[1]
    j = torch.arange(int(num_tokens), device=cache.device)
    return cache[block_table.long()[j // bs], j % bs].transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of a float cache to move raw bits: :func:`~kvpress_kernels.ops.compaction.wide_bits`
    (at least its own width, at most 8 bytes; among the legal views the widest whose outer strides are
    multiples of 16 elements, so that Triton can prove 16-byte alignment of every row)."""
    return wide_bits(t)


if triton is not None:

    @triton.jit
    def _block_compact_kernel(k_cache, v_cache, table, kept,
                              sk_blk, sk_slot, sk_head, sv_blk, sv_slot, sv_head, s_table,
                              s_kept_row, s_kept_col, K, DK, DV,
                              BLOCK_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                              LOG_K: tl.constexpr, EVEN_D: tl.constexpr):
        head = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        kept_row = kept + head * s_kept_row  # s_kept_row = 0: one kept set shared by every head

        # c: kept slots below K stay put; they are a prefix of the ascending kept list.
        lo = tl.zeros([], dtype=tl.int32)
        hi = tl.zeros([], dtype=tl.int32) + K
        for _ in range(LOG_K):
            mid = (lo + hi) // 2
            act = mid < hi
            a = tl.load(kept_row + mid.to(tl.int64) * s_kept_col, mask=act, other=0)
            lo = tl.where(act & (a < K), mid + 1, lo)
            hi = tl.where(act & (a >= K), mid, hi)
        c = lo

        t0 = tile * BLOCK_K
        if t0 + BLOCK_K > c:
            m = t0 + tl.arange(0, BLOCK_K)
            is_src = (m >= c) & (m < K)
            rank = m - c
            # Hole of source rank i: i + #{j < c : a_j - j <= i}, a_j - j non-decreasing.
            blo = tl.zeros([BLOCK_K], dtype=tl.int32)
            bhi = tl.zeros([BLOCK_K], dtype=tl.int32) + c
            for _ in range(LOG_K):
                mid = (blo + bhi) // 2
                act = is_src & (mid < bhi)
                a = tl.load(kept_row + mid.to(tl.int64) * s_kept_col, mask=act, other=0).to(tl.int32)
                ok = (a - mid) <= rank
                blo = tl.where(act & ok, mid + 1, blo)
                bhi = tl.where(act & (~ok), mid, bhi)
            dst = (rank + blo).to(tl.int64)
            src = tl.load(kept_row + m.to(tl.int64) * s_kept_col, mask=is_src, other=0).to(tl.int64)

            sb = tl.load(table + (src // BLOCK_SIZE) * s_table, mask=is_src, other=0).to(tl.int64)
            db = tl.load(table + (dst // BLOCK_SIZE) * s_table, mask=is_src, other=0).to(tl.int64)
            so = src % BLOCK_SIZE
            do = dst % BLOCK_SIZE

            d = tl.arange(0, BLOCK_D)
            k_src = (sb * sk_blk + so * sk_slot + head * sk_head)[:, None]
            k_dst = (db * sk_blk + do * sk_slot + head * sk_head)[:, None]
            for d0 in range(0, DK, BLOCK_D):
                if EVEN_D:  # a mask constant along d lets the compiler emit 16-byte vector moves
                    md = is_src[:, None] & (d < BLOCK_D)[None, :]
                else:
                    md = is_src[:, None] & ((d0 + d) < DK)[None, :]
                x = tl.load(k_cache + k_src + (d0 + d)[None, :], mask=md)
                tl.store(k_cache + k_dst + (d0 + d)[None, :], x, mask=md)
            v_src = (sb * sv_blk + so * sv_slot + head * sv_head)[:, None]
            v_dst = (db * sv_blk + do * sv_slot + head * sv_head)[:, None]
            for d0 in range(0, DV, BLOCK_D):
                if EVEN_D:
                    md = is_src[:, None] & (d < BLOCK_D)[None, :]
                else:
                    md = is_src[:, None] & ((d0 + d) < DV)[None, :]
                x = tl.load(v_cache + v_src + (d0 + d)[None, :], mask=md)
                tl.store(v_cache + v_dst + (d0 + d)[None, :], x, mask=md)


if triton is not None:

    @triton.jit
    def _block_gather_kernel(k_cache, v_cache, src_table, dst_table, kept,
                             sk_blk, sk_slot, sk_head, sv_blk, sv_slot, sv_head, s_src, s_dst,
                             s_kept_row, s_kept_col, K, DK, DV,
                             BLOCK_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                             EVEN_D: tl.constexpr):
        head = tl.program_id(0).to(tl.int64)
        m = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        live = m < K
        mm = m.to(tl.int64)
        src = tl.load(kept + head * s_kept_row + mm * s_kept_col, mask=live, other=0).to(tl.int64)
        sb = tl.load(src_table + (src // BLOCK_SIZE) * s_src, mask=live, other=0).to(tl.int64)
        db = tl.load(dst_table + (mm // BLOCK_SIZE) * s_dst, mask=live, other=0).to(tl.int64)
        so = src % BLOCK_SIZE
        do = mm % BLOCK_SIZE
        d = tl.arange(0, BLOCK_D)
        k_src = (sb * sk_blk + so * sk_slot + head * sk_head)[:, None]
        k_dst = (db * sk_blk + do * sk_slot + head * sk_head)[:, None]
        for d0 in range(0, DK, BLOCK_D):
            if EVEN_D:  # a mask constant along d lets the compiler emit 16-byte vector moves
                md = live[:, None] & (d < BLOCK_D)[None, :]
            else:
                md = live[:, None] & ((d0 + d) < DK)[None, :]
            x = tl.load(k_cache + k_src + (d0 + d)[None, :], mask=md)
            tl.store(k_cache + k_dst + (d0 + d)[None, :], x, mask=md)
        v_src = (sb * sv_blk + so * sv_slot + head * sv_head)[:, None]
        v_dst = (db * sv_blk + do * sv_slot + head * sv_head)[:, None]
        for d0 in range(0, DV, BLOCK_D):
            if EVEN_D:
                md = live[:, None] & (d < BLOCK_D)[None, :]
            else:
                md = live[:, None] & ((d0 + d) < DV)[None, :]
            x = tl.load(v_cache + v_src + (d0 + d)[None, :], mask=md)
            tl.store(v_cache + v_dst + (d0 + d)[None, :], x, mask=md)


def block_compact_launch_config(block_size: int, head_dim_k: int, head_dim_v: int, K: int, elem_size: int) -> dict:
    """Launch parameters of ``_block_compact_kernel`` / ``_block_gather_kernel`` (the gather ignores
    ``LOG_K``): ``head_dim_*`` and ``elem_size`` are those of the raw-bits views (128 bf16 dims = 32 int64
    elements of 8 bytes). The same rule on CPU and GPU; exposed for the compile check.

    ``BLOCK_D`` covers a row in one step up to 256 bytes (``EVEN_D``: a mask constant along d, so the
    compiler keeps 16-byte vectors); ``BLOCK_K`` tokens make an 8 KiB tile; a tile under 2 KiB (16
    bytes per thread of 4 warps) gets one warp, so that threads still hold whole 16-byte vectors."""
    block_k, block_d, even, num_warps = copy_tile(K, head_dim_k, head_dim_v, elem_size)
    return dict(BLOCK_SIZE=int(block_size), BLOCK_K=block_k, BLOCK_D=block_d, LOG_K=int(K).bit_length(),
                EVEN_D=even, num_warps=num_warps)


def _launch_views(k_cache, v_cache, kept_idx):
    """What both block kernels are launched with: the raw-bits views of K and V, their row lengths in
    those elements, the launch config and the kept row stride (0: one kept set shared by every head)."""
    kb, vb = raw_bits(k_cache), raw_bits(v_cache)
    dk, dv = kb.shape[-1], vb.shape[-1]
    cfg = block_compact_launch_config(k_cache.shape[1], dk, dv, kept_idx.shape[1],
                                      max(kb.element_size(), vb.element_size()))
    s_row = 0 if kept_idx.shape[0] == 1 else kept_idx.stride(0)
    return kb, vb, dk, dv, cfg, s_row


def _block_compact_triton(k_cache, v_cache, block_table, kept_idx, num_tokens: int) -> None:
    H, K = k_cache.shape[2], kept_idx.shape[1]
    if K == 0 or H == 0:
        return
    kb, vb, dk, dv, cfg, s_row = _launch_views(k_cache, v_cache, kept_idx)
    _block_compact_kernel[(H, triton.cdiv(K, cfg["BLOCK_K"]))](
        kb, vb, block_table, kept_idx,
        kb.stride(0), kb.stride(1), kb.stride(2), vb.stride(0), vb.stride(1), vb.stride(2), block_table.stride(0),
        s_row, kept_idx.stride(1), K, dk, dv, **cfg)


def _block_gather_triton(k_cache, v_cache, src_table, dst_table, kept_idx) -> None:
    H, K = k_cache.shape[2], kept_idx.shape[1]
    if K == 0 or H == 0:
        return
    kb, vb, dk, dv, cfg, s_row = _launch_views(k_cache, v_cache, kept_idx)
    del cfg["LOG_K"]  # no search in the gather
    _block_gather_kernel[(H, triton.cdiv(K, cfg["BLOCK_K"]))](
        kb, vb, src_table, dst_table, kept_idx,
        kb.stride(0), kb.stride(1), kb.stride(2), vb.stride(0), vb.stride(1), vb.stride(2),
        src_table.stride(0), dst_table.stride(0), s_row, kept_idx.stride(1), K, dk, dv, **cfg)


@torch.library.custom_op("kvpress_kernels::block_gather_", mutates_args=("k_cache", "v_cache"))
def _block_gather_op(k_cache: torch.Tensor, v_cache: torch.Tensor, src_table: torch.Tensor, dst_table: torch.Tensor,
                     kept_idx: torch.Tensor, backend: str) -> None:
    if backend == "triton":
        _block_gather_triton(k_cache, v_cache, src_table, dst_table, kept_idx)
    else:
        block_gather_ref(k_cache, v_cache, src_table, dst_table, kept_idx)


@_block_gather_op.register_fake
def _(k_cache, v_cache, src_table, dst_table, kept_idx, backend) -> None:
    return None


@torch.library.custom_op("kvpress_kernels::block_compact_", mutates_args=("k_cache", "v_cache"))
def _block_compact_op(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      kept_idx: torch.Tensor, num_tokens: int, backend: str) -> None:
    if backend == "triton":
        _block_compact_triton(k_cache, v_cache, block_table, kept_idx, num_tokens)
    else:
        block_compact_ref(k_cache, v_cache, block_table, kept_idx, num_tokens)


@_block_compact_op.register_fake
def _(k_cache, v_cache, block_table, kept_idx, num_tokens, backend) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def check_block_layout(k_cache, v_cache, block_table, num_tokens) -> Tuple[torch.device, int, int, int, int]:
    """Shape/dtype checks of one layer's block-layout caches and a request's block-table row.
    Returns ``(device, num_blocks, block_size, kv_heads, num_tokens)``."""
    V.tensor("k_cache", k_cache, ndim=4, dtypes=V.FLOAT_DTYPES, last_contiguous=True)
    dev = k_cache.device
    V.tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=dev, last_contiguous=True)
    nb, bs, H, _ = k_cache.shape
    V.shape("v_cache", v_cache, [nb, bs, H, None], "([num_blocks, block_size, kv_heads, head_dim], as k_cache)")
    if bs < 1 or H < 1:
        raise ValueError(f"k_cache must have block_size >= 1 and kv_heads >= 1, got shape {list(k_cache.shape)}")
    V.tensor("block_table", block_table, ndim=1, dtypes=V.INDEX_DTYPES, device=dev)
    max_blocks = block_table.shape[0]
    num_tokens = V.integer("num_tokens", num_tokens, low=0, high=max_blocks * bs)
    if wants_data_checks(block_table):
        live = block_table[:blocks_for(num_tokens, bs)].long()
        if live.numel() and (int(live.min()) < 0 or int(live.max()) >= nb):
            raise ValueError(f"block_table holds block ids outside [0, {nb}) for the {num_tokens} tokens in use: "
                             f"min {int(live.min())}, max {int(live.max())}")
        if live.numel() and torch.unique(live).numel() != live.numel():
            raise ValueError("block_table lists one block twice among the blocks in use; a request's blocks "
                             "must be distinct (two slots in one place would race)")
    return dev, nb, bs, H, num_tokens


def _check_kept(kept_idx, H: int, num_tokens: int, dev) -> None:
    V.tensor("kept_idx", kept_idx, ndim=2, dtypes=V.INDEX_DTYPES, device=dev)
    if kept_idx.shape[0] not in (1, H):
        raise ValueError(f"kept_idx must be [kv_heads={H}, K] or [1, K] (shared by every head), "
                         f"got shape {list(kept_idx.shape)}")
    K = kept_idx.shape[1]
    if K > num_tokens:
        raise ValueError(f"kept_idx keeps K={K} tokens per head, more than num_tokens={num_tokens}")
    if wants_data_checks(kept_idx) and K:
        kept = kept_idx.long()
        if int(kept.min()) < 0 or int(kept.max()) >= num_tokens:
            raise ValueError(f"kept_idx must hold slots in [0, num_tokens={num_tokens}) (every head keeps "
                             f"exactly K tokens: no -1 padding), got min {int(kept.min())}, max {int(kept.max())}")
        bad = kept[:, 1:] <= kept[:, :-1]
        if bool(bad.any()):
            r = int(bad.any(1).nonzero()[0])
            raise ValueError(f"kept_idx must be strictly ascending per head; row {r} is not: "
                             f"{kept[r].tolist()[:16]}")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def block_compact_(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   kept_idx: torch.Tensor, num_tokens: int, *, backend: Optional[str] = None) -> Tuple[int, int]:
    """Keep, per kv head, exactly the slots in ``kept_idx``, in place, in an engine's block layout.

    Per head with kept slots ``a_0 < ... < a_{K-1}``: the kept slots ``>= K`` move, ascending, into the
    non-kept slots ``< K``, ascending, K and V together, bit for bit (module docstring).

    Parameters
    ----------
    k_cache, v_cache : Tensor ``[num_blocks, block_size, kv_heads, head_dim]``, float32/float16/bfloat16
        One layer's caches (mutated), any strides with a unit last stride (vLLM's NHD or HND views).
        ``head_dim`` of V may differ from K's.
    block_table : Tensor ``[max_blocks]``, int32/int64
        The request's block-table row, shared by every kv head. Not modified.
    kept_idx : Tensor ``[kv_heads, K]`` or ``[1, K]``, int32/int64
        Per head (or once for every head) the kept slots, strictly ascending, each ``< num_tokens``;
        every head keeps the same number ``K`` (no padding).
    num_tokens : int
        Slots in use before compaction.
    backend : {"reference", "triton"}, optional

    Returns
    -------
    (start, end) : the entries ``block_table[start:end]`` that no longer hold a token of this layer
    (:func:`freed_block_range` of ``num_tokens -> K``).

    Raises ``TypeError``/``ValueError`` naming the argument on malformed input; nothing is written
    then. Value checks (block ids, kept slots) read the device, so on CUDA they run only with
    ``KVPRESS_KERNELS_DEBUG=1``; the Triton path never syncs the host.
    """
    dev, _, bs, H, num_tokens = check_block_layout(k_cache, v_cache, block_table, num_tokens)
    _check_kept(kept_idx, H, num_tokens, dev)
    b = resolve_backend("block_compact", backend, dev, has=("reference", "triton"))
    torch.ops.kvpress_kernels.block_compact_(k_cache, v_cache, block_table, kept_idx, num_tokens, b)
    return freed_block_range(num_tokens, kept_idx.shape[1], bs)


def check_gather_destination(dst_block_table, block_table, num_tokens: int, K: int, num_blocks: int,
                             block_size: int) -> None:
    """Checks of a private destination row for :func:`block_gather_` of ``K`` tokens per head."""
    dev, nb, bs = block_table.device, num_blocks, block_size
    V.tensor("dst_block_table", dst_block_table, ndim=1, dtypes=V.INDEX_DTYPES, device=dev)
    need = blocks_for(K, bs)
    if dst_block_table.shape[0] < need:
        raise ValueError(f"dst_block_table must hold at least ceil(K / block_size) = {need} blocks for K={K}, "
                         f"got {dst_block_table.shape[0]}")
    if wants_data_checks(dst_block_table) and need:
        dst = dst_block_table[:need].long()
        if int(dst.min()) < 0 or int(dst.max()) >= nb:
            raise ValueError(f"dst_block_table holds block ids outside [0, {nb}): min {int(dst.min())}, "
                             f"max {int(dst.max())}")
        if torch.unique(dst).numel() != need:
            raise ValueError("dst_block_table lists one block twice among the blocks it needs")
        src = block_table[:blocks_for(num_tokens, bs)].long()
        if bool(torch.isin(dst, src).any()):
            raise ValueError("dst_block_table shares blocks with the source blocks in use (block_table); a private "
                             "destination must be disjoint from them (compact in place with block_compact_ instead)")


def block_gather_(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, kept_idx: torch.Tensor,
                  num_tokens: int, dst_block_table: torch.Tensor, *, backend: Optional[str] = None) -> None:
    """Copy, per kv head, the kept slots of a request into fresh destination blocks, densely and in
    position order: destination slot ``j`` of head ``h`` receives source slot ``kept_idx[h, j]``.
    The source blocks are read only; the engine releases them afterwards.

    Parameters
    ----------
    k_cache, v_cache, block_table, kept_idx, num_tokens, backend
        As in :func:`block_compact_` (``block_table`` is the source row).
    dst_block_table : Tensor ``[max_dst_blocks]``, int32/int64
        The destination row: at least ``ceil(K / block_size)`` distinct blocks, none of them among the
        source blocks in use (``block_table[:ceil(num_tokens / block_size)]``).

    Raises ``TypeError``/``ValueError`` naming the argument; nothing is written then.
    """
    dev, nb, bs, H, num_tokens = check_block_layout(k_cache, v_cache, block_table, num_tokens)
    _check_kept(kept_idx, H, num_tokens, dev)
    check_gather_destination(dst_block_table, block_table, num_tokens, kept_idx.shape[1], nb, bs)
    b = resolve_backend("block_gather", backend, dev, has=("reference", "triton"))
    torch.ops.kvpress_kernels.block_gather_(k_cache, v_cache, block_table, dst_block_table, kept_idx, b)


def block_virtual_pages(k_cache: torch.Tensor, block_table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The paged-cache view of a block-layout cache (module docstring): ``(pages, page_table)`` with
    ``pages [P, block_size, head_dim]`` a strided view of ``k_cache`` (no copy) and
    ``page_table [1, kv_heads, max_blocks]`` such that ``pages[page_table[0, h, j // bs], j % bs]`` is
    ``k_cache[block_table[j // bs], j % bs, h]``. Entries of unused blocks map to arbitrary pages and
    are never read below a row's length."""
    nb, bs, H, D = k_cache.shape
    s_b, s_s, s_h = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
    g = math.gcd(s_b if nb > 1 else 0, s_h if H > 1 else 0) or 1
    mb, mh = (s_b // g if nb > 1 else 0), (s_h // g if H > 1 else 0)
    num_pages = (nb - 1) * mb + (H - 1) * mh + 1
    pages = k_cache.as_strided((num_pages, bs, D), (g, s_s, 1))
    dtype = torch.int32 if num_pages < 2 ** 31 else torch.int64
    heads = torch.arange(H, device=k_cache.device, dtype=torch.int64) * mh
    table = (block_table.to(torch.int64).clamp(0, max(nb - 1, 0)).view(1, 1, -1) * mb + heads.view(1, H, 1))
    return pages, table.to(dtype)


def block_attention_mass(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int, *,
                         scale: Optional[float] = None, lse: Optional[torch.Tensor] = None, causal: bool = True,
                         head_reduce: str = "group_sum", pool: Optional[str] = None, pool_size: int = 1,
                         pool_end: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """:func:`~kvpress_kernels.ops.scoring.attention_mass` of one request's observation-window queries
    over its keys in an engine's block layout, read in place (no copy of K).

    Parameters
    ----------
    q : Tensor ``[1, Hq, W, D]``
        The request's last ``W`` queries (RoPE applied), ``W <= num_tokens``; ``Hq % kv_heads == 0``.
    k_cache : Tensor ``[num_blocks, block_size, kv_heads, D]``, dtype of q, unit last stride
    block_table : Tensor ``[max_blocks]``, int32/int64
    num_tokens : int
        Keys of the request (every head the same).
    scale, lse, causal, head_reduce, pool, pool_size, pool_end, backend
        As in :func:`~kvpress_kernels.ops.scoring.attention_mass_paged`.

    Returns
    -------
    Tensor float32 ``[1, Hq | kv_heads, num_tokens]`` or ``[1, num_tokens]`` (by ``head_reduce``).
    """
    V.tensor("k_cache", k_cache, ndim=4, dtypes=V.FLOAT_DTYPES, last_contiguous=True)
    dev, _, _, H, num_tokens = check_block_layout(k_cache, k_cache, block_table, num_tokens)
    V.tensor("q", q, ndim=4, dtypes=(k_cache.dtype,), device=dev, last_contiguous=True)
    if q.shape[0] != 1:
        raise ValueError(f"q must be one request's queries [1, Hq, W, D], got shape {list(q.shape)}")
    pages, table = block_virtual_pages(k_cache, block_table)
    lengths = torch.full((1, H), num_tokens, dtype=torch.int32, device=dev)
    return attention_mass_paged(q, pages, table, lengths, max_len=num_tokens, scale=scale, lse=lse, causal=causal,
                                head_reduce=head_reduce, pool=pool, pool_size=pool_size, pool_end=pool_end,
                                backend=backend)


__all__ = ["block_compact_", "block_compact_ref", "block_gather_", "block_gather_ref", "block_attention_mass",
           "block_virtual_pages", "gather_block_tokens", "freed_block_range", "blocks_for", "check_block_layout",
           "block_compact_launch_config", "raw_bits"]
