"""Paged decode attention: attention of the newest queries over a paged KV cache whose rows (one per
(sequence, kv head)) have their own lengths, with grouped-query attention (DESIGN.md §5.6), and,
optionally, each cached key's attention probability summed over the query group — the scores H2O and
ShotKV's decoding phase accumulate.

Contract
--------
``q: [B, Hq, T, D]`` holds the queries of the last ``T`` tokens of each sequence, which are already
appended to the cache, in order. Query head ``h`` reads kv head ``h // G`` (``G = Hq // Hkv``). Row
``(b, kvh)`` holds ``L = lengths[b, kvh]`` tokens in slots ``0 .. L-1``: slot ``j`` lives in page
``page_table[b, kvh, j // page_size]`` at offset ``j % page_size``. Compaction permutes tokens inside a
row, and attention over a set of keys does not care about their order; only the last ``T`` slots are
pinned (they are the new tokens, in order). So query ``t`` of row ``(b, kvh)`` sees

- ``causal=True``:  the slots ``j < L - (T - 1 - t)`` (itself and everything cached before it);
- ``causal=False``: the slots ``j < L``.

    out[b, h, t] = Σ_j p[b, h, t, j] · V[j],   p = softmax_j(scale · q[b, h, t] · K[j]) over the visible j

A query that sees no key (``L = 0``, or ``L < T`` under the causal rule) gets zeros — not NaN — so
padded or emptied rows are harmless. With ``return_probs=True`` the op also returns

    probs[b, kvh, j] = Σ_{g < G} Σ_{t < T} p[b, kvh·G + g, t, j]    (0 for j >= L)

as ``[B, Hkv, max_pages * page_size]`` float32, so ``Σ_j probs[b, kvh, j] = G · (number of queries of
the row that see a key)``.

Triton design (split-K "flash-decoding" with GQA packing)
--------------------------------------------------------
Pass 1, grid ``(B·Hkv, num_splits, ceil(G·T / BLOCK_M))``: a program owns the ``G·T`` query rows of one
kv head (packed as the M dimension of ``tl.dot``, so K and V are read once per kv head, not once per
query head) and one contiguous range of slots. It walks that range a ``BLOCK_N``-slot tile at a time,
gathering each slot's page through the page table (any page size works, 1 and 17 included), computes
scores with ``tl.dot`` in fp32 accumulation, and keeps an online softmax (base-2 exponentials, so the
stored maxima / log-sum-exps are in log2 units). It writes its partial ``(m, l, acc)``; pass 2 merges the
splits of each row, divides, writes ``out`` in q's dtype. The number of splits is a host-side choice
from ``max_pages * page_size`` and the batch (never from ``lengths``, which would sync the host): a
split that starts beyond its row's length finds an empty loop and writes an empty partial.

Scores (``return_probs``): pass 1 also writes its rows' scaled logits into an fp32 scratch
``[B·Hkv, G·T, max_len]``; pass 2 writes each row's log-sum-exp; pass 3 reads the logits back, turns
them into probabilities with the final LSE and sums them over the group and T. Extra traffic per key:
``8·G·T + 4`` bytes, against ``2·D·elem_size`` bytes of K+V (D=128 bf16, G=4, T=1: 36 vs 512 B, 7%).
Recomputing ``q·K`` in a second pass instead would re-read all of K (+50%).

Precision: fp32 inputs use an IEEE fp32 ``tl.dot`` (no TF32: decode is memory-bound, so exact products
are free). fp16/bf16 on CUDA feed ``tl.dot`` natively (fp32 accumulation) and round the probabilities
to the input dtype before ``p @ V``, as flash attention does; in the Triton interpreter every tile is
cast to fp32 first (the interpreter's bf16 arithmetic is wrong). Softmax statistics are always fp32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _validate as V
from .._backend import resolve_backend, triton_interpret, wants_data_checks
from ._tiles import gpu_tiles, sm_count

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - Triton missing (e.g. macOS): reference only
    triton = None

_LOG2E = 1.4426950408889634
_MAX_TRITON_HEAD_DIM = 256

# Launch overrides for tests. "native_dot": True feeds fp16/bf16 tiles to tl.dot natively (the GPU path)
# even in the interpreter, which computes fp16 correctly (bf16 it does not).
_OVERRIDES: dict = {}


def paged_decode_attention_ref(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                               page_table: torch.Tensor, lengths: torch.Tensor, *, scale: Optional[float] = None,
                               causal: bool = True, return_probs: bool = False,
                               num_splits: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Reference paged decode attention (plain PyTorch, any device, fp32 math). Same contract as
    :func:`paged_decode_attention`, no input checks; ``num_splits`` is accepted and ignored (the
    reference does not split).

    It gathers each row's pages whole (one ``index_select`` of ``page_size * D`` blocks per pool, not a
    per-slot gather) into a dense ``[B, Hkv, S, D]`` copy, ``S`` = the pages that hold tokens times
    ``page_size``: on CPU ``S`` comes from ``lengths`` (reading it costs nothing there), elsewhere it is
    the whole table (no host sync). Without ``return_probs``, on CPU, when every query sees a key, the
    attention itself is torch's fused ``scaled_dot_product_attention`` (masked only where rows are
    shorter than ``S``); otherwise an explicit softmax, in place on one ``[B, Hkv, G*T, S]`` buffer.
    This is the decode step of the CPU path (once per layer per token), hence the care.
    """
    B, Hq, T, D = q.shape
    Hkv, max_pages = page_table.shape[1], page_table.shape[2]
    G = Hq // Hkv
    num_pages, page_size = k_pages.shape[0], k_pages.shape[1]
    max_len = max_pages * page_size
    scale = D ** -0.5 if scale is None else float(scale)
    dev = q.device
    if num_pages == 0 or max_len == 0 or q.numel() == 0:
        # lengths must be 0 then (nothing can be stored): every query sees no key
        probs = torch.zeros(B, Hkv, max_len, dtype=torch.float32, device=dev) if return_probs else None
        return torch.zeros_like(q), probs
    lens = lengths.to(device=dev, dtype=torch.long)
    n_pages = max_pages
    on_host = dev.type == "cpu" and not torch.compiler.is_compiling() and lens.numel() > 0
    l_min = l_max = 0
    if on_host:    # the lengths are host memory here: one read of their range serves every use below
        l_min, l_max = (int(x) for x in torch.aminmax(lens))
        n_pages = max(1, min(max_pages, -(-l_max // page_size)))
    S = n_pages * page_size
    # entries past a row's used pages may be anything (-1, stale ids): clamp them to a valid page, the
    # slots they give are masked below
    pages = page_table[:, :, :n_pages].reshape(-1).long().clamp_(0, num_pages - 1)
    k = k_pages.index_select(0, pages).view(B, Hkv, S, D)
    v = v_pages.index_select(0, pages).view(B, Hkv, S, D)
    if on_host and not return_probs and T == 1:
        # The decode step of the CPU path (one query per row) with every row holding the same L > 0 tokens
        # (no eviction, or a uniform one): the first L slots are exactly the live keys, so the attention is
        # one fused SDPA call over that view, the query heads of a kv head as its rows (no mask, no copy of
        # K/V beyond the page gather, no repeat of the kv heads).
        if 0 < l_min == l_max:
            qf = q.float().reshape(B, Hkv, G * T, D)
            out = F.scaled_dot_product_attention(qf, k[:, :, :l_max].float(), v[:, :, :l_max].float(), scale=scale)
            return out.reshape(B, Hq, T, D).to(q.dtype), None
    k, v = k.float(), v.float()
    j = torch.arange(S, device=dev)
    live = j < lens.unsqueeze(-1)                                              # [B, Hkv, S]
    # Zero the dead slots of K and V: they may hold anything (inf/NaN from a freed page) and
    # 0 * NaN = NaN. Before the shortest row's length every slot is live, so only the tail is touched.
    l_min = min(S, l_min)
    dead = ~live[:, :, l_min:].unsqueeze(-1)
    k[:, :, l_min:].masked_fill_(dead, 0.0)
    v[:, :, l_min:].masked_fill_(dead, 0.0)
    qf = q.float().reshape(B, Hkv, G * T, D)                                   # row r = g*T + t
    if causal and T > 1:
        t = torch.arange(T, device=dev).repeat(G)
        vis = j < (lens.unsqueeze(-1) - (T - 1 - t)).unsqueeze(-1)             # [B, Hkv, G*T, S]
    else:
        vis = live.unsqueeze(2)                                                # [B, Hkv, 1, S]
    if not return_probs and on_host and l_min > 0 and (T == 1 or not causal or l_min >= T):
        # Every query sees a key: torch's fused CPU attention (one kernel) is exact enough for the
        # reference and much cheaper than the ten ops below at decode sizes. No mask when every row
        # holds exactly S tokens.
        mask = None if l_min == S and (T == 1 or not causal) else vis
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)
        return out.reshape(B, Hq, T, D).to(q.dtype), None
    s = torch.matmul(qf * scale, k.transpose(-1, -2))                          # [B, Hkv, G*T, S]
    s.masked_fill_(~vis, float("-inf"))
    # A query that sees a NaN or +inf logit has no defined softmax (inf - inf): NaN weights on every key
    # it sees (and 0 on the others), hence a NaN output, as the kernels' online softmax gives.
    undefined = (torch.isnan(s) | (s == float("inf"))).any(-1, keepdim=True)
    m = s.amax(-1, keepdim=True)
    m.clamp_(min=-3e38)                                           # empty row (-inf): exp(-inf + 3e38) = 0
    p = s.sub_(m).exp_()
    denom = p.sum(-1, keepdim=True)
    p.div_(denom.masked_fill_(denom == 0, 1.0))
    p = torch.where(undefined, torch.where(vis, torch.full((), float("nan"), device=dev), 0.0), p)
    out = torch.matmul(p, v).reshape(B, Hq, T, D).to(q.dtype)
    probs = None
    if return_probs:
        probs = torch.zeros(B, Hkv, max_len, dtype=torch.float32, device=dev)
        probs[:, :, :S] = p.sum(-2)
    return out, probs


if triton is not None:

    @triton.jit
    def _decode_split_kernel(q, k_pages, v_pages, table, lengths, mid_m, mid_l, mid_acc, logits,
                             stride_q_b, stride_q_h, stride_q_t, stride_kp_page, stride_kp_slot,
                             stride_vp_page, stride_vp_slot, stride_table_b, stride_table_h, stride_table_p,
                             stride_len_b, stride_len_h, Hkv, G, T, D, max_len, split_len, num_splits, qk_scale,
                             PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WRITE_LOGITS: tl.constexpr,
                             NATIVE_DOT: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        mblk = tl.program_id(2)
        b = bh // Hkv
        kvh = bh % Hkv
        GT = G * T
        r = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = r < GT
        g = r // T
        t = r % T
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        n = tl.arange(0, BLOCK_N)

        L = tl.load(lengths + b * stride_len_b + kvh * stride_len_h).to(tl.int32)
        if CAUSAL:
            lim = L - (T - 1 - t)
        else:
            lim = L + 0 * t
        lim = tl.where(r_ok, lim, 0)   # padding rows see nothing and are never stored

        q_ptrs = q + b * stride_q_b + (kvh * G + g).to(tl.int64)[:, None] * stride_q_h \
            + t[:, None] * stride_q_t + d[None, :]
        qt = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        if not NATIVE_DOT:
            qt = qt.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table_row = table + b * stride_table_b + kvh * stride_table_h
        start = split * split_len
        stop = tl.minimum(start + split_len, L)
        for j0 in range(start, stop, BLOCK_N):
            j = j0 + n
            j_ok = j < stop
            page = tl.load(table_row + (j // PAGE_SIZE) * stride_table_p, mask=j_ok, other=0).to(tl.int64)
            off = (j % PAGE_SIZE).to(tl.int64)
            kt = tl.load(k_pages + (page * stride_kp_page + off * stride_kp_slot)[None, :] + d[:, None],
                         mask=j_ok[None, :] & d_ok[:, None], other=0.0)             # [BLOCK_D, BLOCK_N]
            vt = tl.load(v_pages + (page * stride_vp_page + off * stride_vp_slot)[:, None] + d[None, :],
                         mask=j_ok[:, None] & d_ok[None, :], other=0.0)             # [BLOCK_N, BLOCK_D]
            if NATIVE_DOT:
                s = tl.dot(qt, kt)
            else:
                s = tl.dot(qt, kt.to(tl.float32), input_precision="ieee")
            s = s * qk_scale
            s = tl.where(j[None, :] < lim[:, None], s, float("-inf"))
            if WRITE_LOGITS:
                # Slots up to the tile's end belong to this split (splits are whole tiles): writing
                # the masked -inf there races with nobody, and a mask constant over 16 slots (max_len
                # is a multiple of 16 for 16-token pages) keeps the stores 16 bytes wide.
                tl.store(logits + (bh * GT + r)[:, None] * max_len + j[None, :], s,
                         mask=r_ok[:, None] & (j < max_len)[None, :])
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with nothing visible yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if NATIVE_DOT:
                pv = tl.dot(p.to(vt.dtype), vt)
            else:
                pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        part = (bh * num_splits + split) * GT + r
        tl.store(mid_m + part, m_i, mask=r_ok)
        tl.store(mid_l + part, l_i, mask=r_ok)
        tl.store(mid_acc + part[:, None] * D + d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _decode_reduce_kernel(mid_m, mid_l, mid_acc, out, lse, stride_o_b, stride_o_h, stride_o_t,
                              Hkv, G, T, D, num_splits,
                              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        mblk = tl.program_id(1)
        b = bh // Hkv
        kvh = bh % Hkv
        GT = G * T
        r = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = r < GT
        g = r // T
        t = r % T
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        base = bh * num_splits * GT + r
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for s in range(0, num_splits):
            m = tl.maximum(m, tl.load(mid_m + base + s * GT, mask=r_ok, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)   # empty splits / rows weigh exp2(-inf) = 0
        l_tot = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for s in range(0, num_splits):
            w = tl.exp2(tl.load(mid_m + base + s * GT, mask=r_ok, other=float("-inf")) - m_safe)
            l_tot += tl.load(mid_l + base + s * GT, mask=r_ok, other=0.0) * w
            a = tl.load(mid_acc + (base + s * GT)[:, None] * D + d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc += a * w[:, None]
        has_keys = l_tot != 0.0   # NaN (a NaN or +inf logit) is not "no keys": it must stay NaN
        o = acc / tl.where(has_keys, l_tot, 1.0)[:, None]
        o_ptrs = out + b * stride_o_b + (kvh * G + g).to(tl.int64)[:, None] * stride_o_h \
            + t[:, None] * stride_o_t + d[None, :]
        tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
        if WRITE_LSE:
            tl.store(lse + bh * GT + r, tl.where(has_keys, m_safe + tl.log2(tl.where(has_keys, l_tot, 1.0)),
                                                 float("-inf")), mask=r_ok)

    @triton.jit
    def _decode_probs_kernel(logits, lse, lengths, probs, stride_len_b, stride_len_h, Hkv, G, T, max_len,
                             CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        nblk = tl.program_id(1)
        b = bh // Hkv
        kvh = bh % Hkv
        GT = G * T
        L = tl.load(lengths + b * stride_len_b + kvh * stride_len_h).to(tl.int32)
        j = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
        total = tl.zeros([BLOCK_N], tl.float32)
        for r0 in range(0, GT, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M)
            r_ok = r < GT
            t = r % T
            if CAUSAL:
                lim = L - (T - 1 - t)
            else:
                lim = L + 0 * t
            lim = tl.where(r_ok, lim, 0)
            vis = j[None, :] < lim[:, None]
            lse_r = tl.load(lse + bh * GT + r, mask=r_ok, other=0.0)
            lse_r = tl.where(lse_r == float("-inf"), 0.0, lse_r)   # rows without keys: no -inf - -inf
            # The load is masked by the row and the capacity only (16-byte vectors: a per-row length
            # mask broke them into 4-byte loads); slots no split wrote hold stale bits, and the
            # visibility test below discards them (tl.where, so even a stale NaN never propagates).
            s = tl.load(logits + (bh * GT + r)[:, None] * max_len + j[None, :],
                        mask=r_ok[:, None] & (j < max_len)[None, :], other=float("-inf"))
            total += tl.sum(tl.where(vis, tl.exp2(s - lse_r[:, None]), 0.0), 0)
        tl.store(probs + bh * max_len + j, total, mask=j < max_len)


def _blocks(G: int, T: int, D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) of the split kernel; tl.dot wants every dimension >= 16.

    Sized by the compile check (``kvpress-kernels compile-check``: no spills on sm_80 / sm_90). fp16/bf16
    go to the tensor cores: up to 64 query rows x 64 keys at D <= 128 (8 warps once the fp32 accumulator
    tile reaches 64 x 128, which spilled on sm_80 with 4), 32 x 32 at D = 256. fp32 runs the IEEE dot on
    the FMA units, whose operand layouts replicate each tile across threads: 16 x 16 tiles (150-210
    registers at D = 128-256), where the fp16 tiles spilled 12-60 KB. More than BLOCK_M query rows take
    more programs."""
    block_d = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        return 16, 16, block_d, 4
    block_m = min(64 if block_d <= 128 else 32, max(16, triton.next_power_of_2(G * T)))
    block_n = 64 if block_d <= 128 else 32
    return block_m, block_n, block_d, (8 if block_m * block_d >= 64 * 128 else 4)


def default_num_splits(max_len: int, rows: int, device: torch.device, block_n: int = 64) -> int:
    """Splits of the slot range per row, chosen on the host from the *capacity* ``max_len`` (no read of
    ``lengths``): enough ``(row, split)`` programs for about two waves on the GPU, but at least four
    ``block_n`` tiles per split so the partial-result traffic stays small next to K and V."""
    tiles = max(1, -(-max_len // block_n))
    if gpu_tiles(device):
        sms = sm_count(device)
    else:
        sms = 1  # the interpreter runs programs one after another: splitting only costs
    want = max(1, -(-2 * sms // max(1, rows)))
    return max(1, min(want, -(-tiles // 4)))


def _paged_decode_attention_triton(q, k_pages, v_pages, page_table, lengths, scale, causal, return_probs,
                                   num_splits) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, T, D = q.shape
    Hkv, max_pages = page_table.shape[1], page_table.shape[2]
    G = Hq // Hkv
    page_size = k_pages.shape[1]
    max_len = max_pages * page_size
    dev = q.device
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=dev)
    probs = torch.empty(B, Hkv, max_len if return_probs else 0, dtype=torch.float32, device=dev)
    if not return_probs:
        probs = probs.reshape(0)
    if q.numel() == 0 or max_len == 0 or k_pages.shape[0] == 0:
        # nothing to attend to (or nobody asking): fixed-size zero outputs, no launch
        return out.zero_(), probs.zero_()
    rows, GT = B * Hkv, G * T
    block_m, block_n, block_d, num_warps = _blocks(G, T, D, q.dtype)
    tiles = triton.cdiv(max_len, block_n)
    splits = min(max(1, num_splits), tiles)
    split_len = triton.cdiv(tiles, splits) * block_n   # whole tiles, so no tile straddles two splits
    splits = triton.cdiv(max_len, split_len)
    m_blocks = triton.cdiv(GT, block_m)
    mid_m = torch.empty(rows, splits, GT, dtype=torch.float32, device=dev)
    mid_l = torch.empty_like(mid_m)
    mid_acc = torch.empty(rows, splits, GT, D, dtype=torch.float32, device=dev)
    logits = torch.empty(rows, GT, max_len, dtype=torch.float32, device=dev) if return_probs else mid_m
    lse = torch.empty(rows, GT, dtype=torch.float32, device=dev) if return_probs else mid_m
    native = _OVERRIDES.get("native_dot", gpu_tiles(dev) and not triton_interpret()) and q.dtype != torch.float32
    _decode_split_kernel[(rows, splits, m_blocks)](
        q, k_pages, v_pages, page_table, lengths, mid_m, mid_l, mid_acc, logits,
        q.stride(0), q.stride(1), q.stride(2), k_pages.stride(0), k_pages.stride(1),
        v_pages.stride(0), v_pages.stride(1), page_table.stride(0), page_table.stride(1), page_table.stride(2),
        lengths.stride(0), lengths.stride(1), Hkv, G, T, D, max_len, split_len, splits, scale * _LOG2E,
        PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal,
        WRITE_LOGITS=return_probs, NATIVE_DOT=native, num_warps=num_warps)
    _decode_reduce_kernel[(rows, m_blocks)](
        mid_m, mid_l, mid_acc, out, lse, out.stride(0), out.stride(1), out.stride(2), Hkv, G, T, D, splits,
        BLOCK_M=block_m, BLOCK_D=block_d, WRITE_LSE=return_probs)
    if return_probs:
        _decode_probs_kernel[(rows, triton.cdiv(max_len, 128))](
            logits, lse, lengths, probs, lengths.stride(0), lengths.stride(1), Hkv, G, T, max_len,
            CAUSAL=causal, BLOCK_M=min(block_m, 32), BLOCK_N=128, num_warps=4)
    return out, probs


@torch.library.custom_op("kvpress_kernels::paged_decode_attention", mutates_args=())
def _paged_decode_attention_op(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                               page_table: torch.Tensor, lengths: torch.Tensor, scale: float, causal: bool,
                               return_probs: bool, num_splits: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    # custom ops cannot return None: without probs the second output is an empty fp32 tensor
    if backend == "triton":
        return _paged_decode_attention_triton(q, k_pages, v_pages, page_table, lengths, scale, causal,
                                              return_probs, num_splits)
    out, probs = paged_decode_attention_ref(q, k_pages, v_pages, page_table, lengths, scale=scale, causal=causal,
                                            return_probs=return_probs)
    return out, probs if probs is not None else q.new_empty(0, dtype=torch.float32)


@_paged_decode_attention_op.register_fake
def _(q, k_pages, v_pages, page_table, lengths, scale, causal, return_probs, num_splits, backend):
    B, Hkv, max_pages = page_table.shape
    max_len = max_pages * k_pages.shape[1]
    probs = q.new_empty(B, Hkv, max_len, dtype=torch.float32) if return_probs else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), probs


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                           lengths: torch.Tensor, *, scale: Optional[float] = None, causal: bool = True,
                           return_probs: bool = False, num_splits: Optional[int] = None,
                           backend: Optional[str] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of the newest ``T`` queries over a paged KV cache with per-(sequence, kv head) lengths.

    ``out[b, h, t] = Σ_j softmax_j(scale · q[b, h, t] · K[j]) · V[j]`` over the slots ``j`` visible to
    query ``t`` of row ``(b, h // G)``: ``j < lengths - (T - 1 - t)`` when ``causal`` (the ``T`` queries are
    the last ``T`` tokens already in the cache, in order), ``j < lengths`` otherwise. See the module
    docstring for the slot layout and the kernel design.

    Parameters
    ----------
    q : Tensor ``[B, Hq, T, D]``, float32/float16/bfloat16
        Queries (RoPE applied). Last dimension contiguous; other strides free.
    k_pages, v_pages : Tensor ``[num_pages, page_size, D]``, q's dtype
        Page pools. Last dimension contiguous; other strides free.
    page_table : Tensor ``[B, Hkv, max_pages]``, int32/int64
        Pages of each row, in slot order. ``Hq`` must be a multiple of ``Hkv``. Entries past a row's
        last used page are never read.
    lengths : Tensor ``[B, Hkv]``, int32/int64
        Tokens per row, ``0 <= lengths <= max_pages * page_size``; they may differ per kv head.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    causal : bool
        Causal visibility among the ``T`` new queries (no effect when ``T == 1``).
    return_probs : bool
        Also return ``probs[b, kvh, j] = Σ_{g, t} p[b, kvh·G + g, t, j]``, ``[B, Hkv, max_pages*page_size]``
        float32, 0 past each row's length.
    num_splits : int, optional
        Slot-range splits per row for the Triton kernel (split-K); default :func:`default_num_splits`.
        Ignored by the reference.
    backend : {"reference", "triton"}, optional
        Force an implementation (see :mod:`kvpress_kernels._backend`).

    Returns
    -------
    out : Tensor ``[B, Hq, T, D]`` in q's dtype (fp32 accumulation); zeros for a query that sees no key.
    probs : Tensor ``[B, Hkv, max_pages * page_size]`` float32, or ``None`` unless ``return_probs``.

    Raises ``TypeError``/``ValueError`` naming the argument on malformed input. Checks that read values
    (lengths within capacity, page indices in range) would sync the host, so on CUDA they run only with
    ``KVPRESS_KERNELS_DEBUG=1``. The Triton backend supports ``D <= 256``.
    """
    V.tensor("q", q, ndim=4, dtypes=V.FLOAT_DTYPES, last_contiguous=True)
    dev = q.device
    B, Hq, T, D = q.shape
    V.tensor("k_pages", k_pages, ndim=3, dtypes=(q.dtype,), device=dev, last_contiguous=True)
    V.shape("k_pages", k_pages, [None, None, D], "([num_pages, page_size, head_dim] with q's head_dim)")
    V.tensor("v_pages", v_pages, ndim=3, dtypes=(q.dtype,), device=dev, last_contiguous=True)
    V.shape("v_pages", v_pages, list(k_pages.shape), "(same as k_pages)")
    if D < 1:
        raise ValueError(f"q must have head_dim >= 1, got shape {list(q.shape)}")
    num_pages, page_size = k_pages.shape[0], k_pages.shape[1]
    if page_size < 1:
        raise ValueError(f"k_pages must have page_size >= 1, got shape {list(k_pages.shape)}")
    V.tensor("page_table", page_table, ndim=3, dtypes=V.INDEX_DTYPES, device=dev)
    V.shape("page_table", page_table, [B, None, None], "([batch, kv_heads, max_pages] with q's batch)")
    Hkv = page_table.shape[1]
    if Hkv < 1 or Hq < 1 or Hq % Hkv != 0:
        raise ValueError(f"q's {Hq} query heads must be a positive multiple of the {Hkv} kv heads of page_table "
                         f"(shape {list(page_table.shape)})")
    V.tensor("lengths", lengths, ndim=2, dtypes=V.INDEX_DTYPES, device=dev)
    V.shape("lengths", lengths, [B, Hkv], "([batch, kv_heads], like page_table's leading dims)")
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_probs, bool):
        raise TypeError(f"return_probs must be a bool, got {type(return_probs).__name__}")
    max_len = page_table.shape[2] * page_size
    b = resolve_backend("paged_decode_attention", backend, dev, has=("reference", "triton"))
    if b == "triton" and D > _MAX_TRITON_HEAD_DIM:
        raise ValueError(f"q's head_dim {D} exceeds the Triton kernel's limit {_MAX_TRITON_HEAD_DIM}; "
                         "use backend='reference'")
    if num_splits is None:
        block_n = _blocks(Hq // Hkv, T, D, q.dtype)[1] if triton is not None else 64
        num_splits = default_num_splits(max_len, B * Hkv, dev, block_n)
    else:
        num_splits = V.integer("num_splits", num_splits, low=1)
    # under torch.compile the values are symbolic: reading them would break the graph
    if wants_data_checks(lengths) and not torch.compiler.is_compiling():
        if max_len == 0:  # V.page_table cannot reshape a table without columns; no page can be read anyway
            if lengths.numel() and (int(lengths.min()) != 0 or int(lengths.max()) != 0):
                raise ValueError("lengths must be 0 when page_table has no columns (max_pages = 0), got "
                                 f"min {int(lengths.min())}, max {int(lengths.max())}")
        else:
            V.page_table("page_table", page_table, num_pages, lengths, page_size)
    out, probs = torch.ops.kvpress_kernels.paged_decode_attention(
        q, k_pages, v_pages, page_table, lengths, scale, causal, return_probs, num_splits, b)
    return out, (probs if return_probs else None)
