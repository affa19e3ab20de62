"""Head-budget selection: one exactly-``budget`` choice over the union of a layer's kv heads (AdaKV).

AdaKV (Feng et al. 2024, arXiv 2407.11550) gives the heads of a layer one shared budget instead of
``budget / H`` each: the best ``budget`` tokens over *all* heads' scores are kept, so a head whose
attention is concentrated gives up slots to a head whose attention is spread. A per-head floor
(AdaKV's safeguard, ``alpha * budget / H`` tokens) keeps any head from being emptied.

Row ``b`` (one (sequence, layer)) has ``H`` heads of ``N`` scores; head ``h`` has ``L_bh = lengths[b, h]``
valid tokens. What row ``b`` keeps, in three tiers:

1. the protected tokens of every head (``j < sink``, ``j >= L_bh - recent``, ``protect[b, h, j]``; valid
   ``j`` only);
2. the floor: in every head, the best ``min(floor[b], L_bh) - |protected_bh|`` unprotected tokens (none
   when the protected tokens already reach the floor) — protected tokens count against the floor first;
3. the union: the best ``budget[b] - |tiers 1 and 2|`` of all remaining valid tokens of all heads
   together.

"Best" is the order of :mod:`~kvpress_kernels.ops.selection`: score descending, NaN below every number,
``-0.0 == +0.0``, through the same int32 order keys (:func:`~kvpress_kernels.ops.selection.order_keys`).
Ties: inside a head (tier 2) the lower position wins; across heads (tier 3) the lower head wins, then
the lower position — the head-major order of the flattened ``[H * N]`` row, as kvpress flattens it.

kvpress's ``AdaKVPress`` does the same choice by setting the ``n_safe`` best scores of every head to
the largest float and taking one ``topk`` over the flattened heads; with its window padded to
``max + 1`` the window tokens are each head's best, so they fill the floor first exactly as our
protected tokens do. kvpress then only masks the other keys; here the caller compacts each
(sequence, head) to its own length (``kept_len``) in the paged cache, which frees its pages.

Triton kernel ``_head_budget_kernel``: one program per row, no sort. Per head a radix select of the
floor threshold (four 8-bit digit histograms, as ``select_topk``), kept in registers as one threshold
and one tie count per head; then the same radix select over the union, whose candidates are recomputed
from the per-head thresholds on every pass (the floor tie ranks are running counts in position order);
then one stable pass per head writes the keep mask, the kept positions (prefix-sum compaction, position
order) and the head's new length. At most ``1 + 3 + 4 + 1`` reads of the scores, none of them on the
host: the outputs have caller-known sizes and budgets are read on the device.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _validate as V
from .._backend import resolve_backend, wants_data_checks
from .selection import _budget_tensor, _check_budget, _protected, order_keys

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - Triton missing (e.g. macOS): reference only
    triton = None

# Largest tile (tokens per loop step). Tests lower it to walk many tiles on small rows.
_MAX_BLOCK = 1024
_I32_MIN = -(2 ** 31)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------

def _head_lengths(lengths: Optional[torch.Tensor], B: int, H: int, N: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.full((B, H), N, dtype=torch.int64, device=device)
    return lengths.reshape(B, H).to(device=device, dtype=torch.int64).clamp(0, N)


def _topk_ranks(key: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """``[R, M]`` bool: the first ``need[r]`` entries of each row in (key descending, index ascending)."""
    R, M = key.shape
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank_ok = torch.arange(M, device=key.device).unsqueeze(0) < need.unsqueeze(1)
    return torch.zeros((R, M), dtype=torch.bool, device=key.device).scatter(1, order, rank_ok)


def select_head_budget_ref(scores: torch.Tensor, budget: Union[int, torch.Tensor], *,
                           floor: Union[int, torch.Tensor] = 0, lengths: Optional[torch.Tensor] = None,
                           sink: int = 0, recent: int = 0, protect: Optional[torch.Tensor] = None,
                           max_budget: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference head-budget selection (plain PyTorch, any device): stable sorts of the order keys.
    Same contract as :func:`select_head_budget` without checks, i.e. with its unchecked behaviour
    (budget clipped to ``[0, sum_h lengths]``, floor to ``[0, L_bh]``, every protected and floor token
    kept even beyond the budget, ``kept_idx`` truncated to ``K``)."""
    B, H, N = scores.shape
    dev = scores.device
    bud = _budget_tensor(budget, B, dev)
    flo = _budget_tensor(floor, B, dev).clamp(min=0)
    if max_budget is not None:
        K = int(max_budget)
    elif isinstance(budget, torch.Tensor):
        K = min(N, max(int(bud.max()), 0)) if B else 0
    else:
        K = min(N, max(int(budget), 0))
    lens = _head_lengths(lengths, B, H, N, dev).contiguous()
    prot = _protected(lens, N, sink, recent, protect)
    j = torch.arange(N, device=dev, dtype=torch.int64).view(1, 1, N)
    cand = (j < lens.unsqueeze(-1)) & ~prot
    key = order_keys(scores.reshape(B * H, N)).to(torch.int64).view(B, H, N)
    low = torch.full_like(key, _I32_MIN - 1)  # below every int32 key: non-candidates sort last
    # tier 2: per head, the best unprotected tokens up to the floor
    need_f = (flo.unsqueeze(1).minimum(lens) - prot.sum(-1)).clamp(min=0)
    fl = _topk_ranks(torch.where(cand, key, low).reshape(B * H, N), need_f.reshape(-1)).view(B, H, N) & cand
    # tier 3: the rest of the budget over the union of the heads, head-major
    cand_u = cand & ~fl
    need_u = bud.clamp(min=0).minimum(lens.sum(1)) - (prot | fl).sum((1, 2))
    un = _topk_ranks(torch.where(cand_u, key, low).reshape(B, H * N), need_u).view(B, H, N) & cand_u
    keep = prot | fl | un
    kept_len = keep.sum(-1).to(torch.int32)
    slot = keep.to(torch.int64).cumsum(-1) - 1
    kept_idx = torch.full((B, H, K + 1), -1, dtype=torch.int32, device=dev)
    # kept positions past slot K - 1 (unchecked overflows only) land in the dump column K, cut off
    dest = torch.where(keep & (slot < K), slot, torch.full_like(slot, K))
    kept_idx.scatter_(2, dest, torch.where(keep, j, -1).to(torch.int32).expand(B, H, N).contiguous())
    kept_idx[..., K] = -1
    return keep, kept_idx[..., :K].contiguous(), kept_len


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

if triton is not None:

    # the radix-select building blocks of select_topk: its order key (NaN lowest) and digit pick
    from .selection import _order_key, _pick_digit

    @triton.jit
    def _hb_tile(x_row, p_row, j, L, sink, recent, HAS_PROTECT: tl.constexpr):
        valid = j < L
        prot = valid & ((j < sink) | (j >= L - recent))
        if HAS_PROTECT:
            p = tl.load(p_row + j, mask=valid, other=0)
            prot = prot | (valid & (p != 0))
        cand = valid & ~prot
        x = tl.load(x_row + j, mask=valid, other=0.0).to(tl.float32)
        return prot, cand, _order_key(x)

    @triton.jit
    def _hb_floor(cand, key, thr, k_rem, n_eq):
        # Tier-2 decision of a tile: above the head's threshold, or one of its first k_rem ties
        # (running count n_eq in position order).
        eq = (cand & (key == thr)).to(tl.int32)
        rank = n_eq + tl.cumsum(eq, 0) - eq
        fl = cand & ((key > thr) | ((eq != 0) & (rank < k_rem)))
        return fl, n_eq + tl.sum(eq, 0)

    @triton.jit
    def _hb_digit(key, top, P: tl.constexpr):
        # Digit P (0 = top byte) of a key as a histogram bin, and whether the key's higher digits equal
        # the ones fixed so far (always true for P = 0).
        # (one return after a constexpr if/else: the compiler would also build code after an early return)
        if P == 0:
            digit = 255 - (((key >> 24) & 0xFF) ^ 0x80)
            same = key == key
        else:
            digit = 255 - ((key >> (24 - 8 * P)) & 0xFF)
            same = (key & (-(1 << (32 - 8 * P)))) == top
        return digit, same

    @triton.jit
    def _head_budget_kernel(scores, budgets, floors, lengths, protect, keep_mask, kept_idx, kept_len,
                            H, N, K, sink, recent,
                            stride_x_b, stride_x_h, stride_l_b, stride_l_h, stride_p_b, stride_p_h,
                            stride_m_b, stride_m_h, stride_i_b, stride_i_h,
                            HAS_LENGTHS: tl.constexpr, HAS_PROTECT: tl.constexpr, BLOCK: tl.constexpr,
                            HB: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        bins = tl.arange(0, 256)
        hs = tl.arange(0, HB)
        if HAS_LENGTHS:
            Lv = tl.load(lengths + row * stride_l_b + hs * stride_l_h, mask=hs < H, other=0).to(tl.int64)
            Lv = tl.minimum(tl.maximum(Lv, 0), N).to(tl.int32)
        else:
            Lv = tl.where(hs < H, N, 0).to(tl.int32)
        total = tl.sum(Lv, 0)
        bud = tl.minimum(tl.maximum(tl.load(budgets + row).to(tl.int64), 0), total.to(tl.int64)).to(tl.int32)
        flo = tl.maximum(tl.load(floors + row).to(tl.int64), 0)
        zero = row * 0  # an int64 zero: head offsets below are computed in int64

        # Tier 2: per head, radix-select the floor threshold; keep (threshold, ties taken) per head.
        thr_v = tl.zeros((HB,), tl.int32)
        krem_v = tl.zeros((HB,), tl.int32)
        base_v = tl.zeros((HB,), tl.int32)  # protected + floor tokens of each head
        for h in range(H):
            hh = zero + h
            L = tl.sum(tl.where(hs == h, Lv, 0), 0)
            x_row = scores + row * stride_x_b + hh * stride_x_h
            p_row = protect + row * stride_p_b + hh * stride_p_h
            hist = tl.zeros((256,), tl.int32)
            n_prot = tl.zeros((), tl.int32)
            for j0 in range(0, L, BLOCK):
                j = j0 + offs
                prot, cand, key = _hb_tile(x_row, p_row, j, L, sink, recent, HAS_PROTECT)
                digit, _ = _hb_digit(key, 0, 0)
                n_c = tl.sum(cand.to(tl.int32), 0)
                # non-candidates are binned at 0 and taken out again (tl.histogram's mask argument is
                # newer than the oldest Triton we compile with)
                hist += tl.histogram(tl.where(cand, digit, 0), 256) - tl.where(bins == 0, BLOCK - n_c, 0)
                n_prot += tl.sum(prot.to(tl.int32), 0)
            n_cand = L - n_prot
            need = tl.minimum(flo, L.to(tl.int64)).to(tl.int32) - n_prot
            k_rem, prefix = _pick_digit(hist, bins, need, tl.zeros((), tl.int64), 24)
            selecting = (need > 0) & (need < n_cand)
            if selecting:
                for p in tl.static_range(1, 4):
                    top = (prefix - 2147483648).to(tl.int32)
                    hist = tl.zeros((256,), tl.int32)
                    for j0 in range(0, L, BLOCK):
                        j = j0 + offs
                        prot, cand, key = _hb_tile(x_row, p_row, j, L, sink, recent, HAS_PROTECT)
                        digit, same = _hb_digit(key, top, p)
                        cand = cand & same
                        n_c = tl.sum(cand.to(tl.int32), 0)
                        hist += tl.histogram(tl.where(cand, digit, 0), 256) - tl.where(bins == 0, BLOCK - n_c, 0)
                    k_rem, prefix = _pick_digit(hist, bins, k_rem, prefix, 24 - 8 * p)
            thr = (prefix - 2147483648).to(tl.int32)
            # need <= 0: no key beats INT32_MAX and no tie is taken; need >= n_cand: every key counts
            thr = tl.where(selecting, thr, tl.where(need <= 0, 2147483647, -2147483647 - 1))
            k_rem = tl.where(selecting, k_rem, tl.where(need <= 0, 0, L))
            thr_v = tl.where(hs == h, thr, thr_v)
            krem_v = tl.where(hs == h, k_rem, krem_v)
            base_v = tl.where(hs == h, n_prot + tl.minimum(tl.maximum(need, 0), n_cand), base_v)

        # Tier 3: radix-select the union threshold over every head's remaining candidates.
        base = tl.sum(base_v, 0)
        need_u = bud - base
        n_cand_u = total - base
        selecting_u = (need_u > 0) & (need_u < n_cand_u)
        k_rem_u = need_u
        prefix_u = tl.zeros((), tl.int64)
        if selecting_u:
            for p in tl.static_range(0, 4):
                top = (prefix_u - 2147483648).to(tl.int32)
                hist = tl.zeros((256,), tl.int32)
                for h in range(H):
                    hh = zero + h
                    L = tl.sum(tl.where(hs == h, Lv, 0), 0)
                    thr_h = tl.sum(tl.where(hs == h, thr_v, 0), 0)
                    krem_h = tl.sum(tl.where(hs == h, krem_v, 0), 0)
                    x_row = scores + row * stride_x_b + hh * stride_x_h
                    p_row = protect + row * stride_p_b + hh * stride_p_h
                    n_eq = tl.zeros((), tl.int32)
                    for j0 in range(0, L, BLOCK):
                        j = j0 + offs
                        prot, cand, key = _hb_tile(x_row, p_row, j, L, sink, recent, HAS_PROTECT)
                        fl, n_eq = _hb_floor(cand, key, thr_h, krem_h, n_eq)
                        digit, same = _hb_digit(key, top, p)
                        cu = cand & ~fl & same
                        n_c = tl.sum(cu.to(tl.int32), 0)
                        hist += tl.histogram(tl.where(cu, digit, 0), 256) - tl.where(bins == 0, BLOCK - n_c, 0)
                k_rem_u, prefix_u = _pick_digit(hist, bins, k_rem_u, prefix_u, 24 - 8 * p)
        thr_u = (prefix_u - 2147483648).to(tl.int32)
        thr_u = tl.where(selecting_u, thr_u, tl.where(need_u <= 0, 2147483647, -2147483647 - 1))
        k_rem_u = tl.where(selecting_u, k_rem_u, tl.where(need_u <= 0, 0, total))

        # Final pass, head-major: stable keep decisions, compaction per head, new lengths.
        n_eq_u = tl.zeros((), tl.int32)
        for h in range(H):
            hh = zero + h
            L = tl.sum(tl.where(hs == h, Lv, 0), 0)
            thr_h = tl.sum(tl.where(hs == h, thr_v, 0), 0)
            krem_h = tl.sum(tl.where(hs == h, krem_v, 0), 0)
            x_row = scores + row * stride_x_b + hh * stride_x_h
            p_row = protect + row * stride_p_b + hh * stride_p_h
            m_row = keep_mask + row * stride_m_b + hh * stride_m_h
            i_row = kept_idx + row * stride_i_b + hh * stride_i_h
            n_eq = tl.zeros((), tl.int32)
            n_keep = tl.zeros((), tl.int32)
            for j0 in range(0, N, BLOCK):
                j = j0 + offs
                prot, cand, key = _hb_tile(x_row, p_row, j, L, sink, recent, HAS_PROTECT)
                fl, n_eq = _hb_floor(cand, key, thr_h, krem_h, n_eq)
                cu = cand & ~fl
                eq = (cu & (key == thr_u)).to(tl.int32)
                rank = n_eq_u + tl.cumsum(eq, 0) - eq
                keep = prot | fl | (cu & (key > thr_u)) | ((eq != 0) & (rank < k_rem_u))
                kp = keep.to(tl.int32)
                slot = n_keep + tl.cumsum(kp, 0) - kp
                tl.store(m_row + j, kp.to(tl.int8), mask=j < N)
                tl.store(i_row + slot, j, mask=keep & (slot < K))
                n_eq_u += tl.sum(eq, 0)
                n_keep += tl.sum(kp, 0)
            for i0 in range(0, K, BLOCK):
                i = i0 + offs
                tl.store(i_row + i, tl.full((BLOCK,), -1, tl.int32), mask=(i >= n_keep) & (i < K))
            tl.store(kept_len + row * H + hh, n_keep)


def launch_config(N: int, K: int, H: int) -> dict:
    """Constexpr parameters and warps the launcher picks for ``_head_budget_kernel``."""
    block = min(max(triton.next_power_of_2(max(N, K, 1)), 256), _MAX_BLOCK)
    # warps per tile size, from the compile check under both Triton versions (sm_80/sm_90): Triton 3.9
    # spills a few bytes at BLOCK 256 with 4 or 8 warps and at BLOCK 512 with 2; Triton 3.6 (the GPU
    # machine's) also at BLOCK 256 with 2 and BLOCK 512 with 4. These compile without spills under both
    # (48-128 registers).
    warps = 1 if block <= 256 else 8
    return dict(BLOCK=block, HB=max(triton.next_power_of_2(max(H, 1)), 16), num_warps=warps)


def _select_head_budget_triton(scores, budgets, floors, lengths, sink, recent, protect, K):
    B, H, N = scores.shape
    dev = scores.device
    keep = torch.empty((B, H, N), dtype=torch.bool, device=dev)
    kept_idx = torch.empty((B, H, K), dtype=torch.int32, device=dev)
    kept_len = torch.empty((B, H), dtype=torch.int32, device=dev)
    if B == 0 or H == 0:
        return keep, kept_idx, kept_len
    # the kernel reads each head's row with unit stride
    x = scores if scores.stride(-1) == 1 or N <= 1 else scores.contiguous()
    prot = protect
    if prot is not None and prot.stride(-1) != 1 and N > 1:
        prot = prot.contiguous()
    budgets = budgets.contiguous()
    floors = floors.contiguous()
    cfg = launch_config(N, K, H)
    _head_budget_kernel[(B,)](
        x, budgets, floors, lengths if lengths is not None else budgets,
        prot.view(torch.int8) if prot is not None else keep.view(torch.int8),
        keep.view(torch.int8), kept_idx, kept_len, H, N, K, min(sink, N), min(recent, N + 1),
        x.stride(0), x.stride(1),
        lengths.stride(0) if lengths is not None else 0, lengths.stride(1) if lengths is not None else 0,
        prot.stride(0) if prot is not None else 0, prot.stride(1) if prot is not None else 0,
        keep.stride(0), keep.stride(1), kept_idx.stride(0), kept_idx.stride(1),
        HAS_LENGTHS=lengths is not None, HAS_PROTECT=prot is not None, **cfg)
    return keep, kept_idx, kept_len


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("kvpress_kernels::select_head_budget", mutates_args=())
def _select_head_budget_op(scores: torch.Tensor, budgets: torch.Tensor, floors: torch.Tensor,
                           lengths: Optional[torch.Tensor], sink: int, recent: int, protect: Optional[torch.Tensor],
                           max_budget: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _select_head_budget_triton(scores, budgets, floors, lengths, sink, recent, protect, max_budget)
    return select_head_budget_ref(scores, budgets, floor=floors, lengths=lengths, sink=sink, recent=recent,
                                  protect=protect, max_budget=max_budget)


@_select_head_budget_op.register_fake
def _(scores, budgets, floors, lengths, sink, recent, protect, max_budget, backend):
    B, H, N = scores.shape
    return (scores.new_empty((B, H, N), dtype=torch.bool), scores.new_empty((B, H, max_budget), dtype=torch.int32),
            scores.new_empty((B, H), dtype=torch.int32))


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------

def select_head_budget(scores: torch.Tensor, budget: Union[int, torch.Tensor], *,
                       floor: Union[int, torch.Tensor] = 0, lengths: Optional[torch.Tensor] = None,
                       sink: int = 0, recent: int = 0, protect: Optional[torch.Tensor] = None,
                       max_budget: Optional[int] = None, backend: Optional[str] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep exactly ``budget[b]`` tokens over all heads of row ``b`` together, at least ``floor[b]`` per head.

    Tiers (module docstring): every head's protected tokens, then per head its best unprotected tokens
    up to ``floor`` (protected ones count first), then the best remaining tokens of all heads together
    up to ``budget``. Order: score descending, NaN below everything, ``-0.0 == +0.0``; ties to the lower
    position inside a head, to the lower head (then position) across heads.

    Parameters
    ----------
    scores : Tensor ``[B, H, N]``, float32/float16/bfloat16
        One row per (sequence, layer), one score row per kv head; callers flatten other layouts.
    budget : int or Tensor ``[B]`` (int32/int64)
        Tokens kept per row, summed over its ``H`` heads (AdaKV at ``n`` tokens per head: ``H * n``).
    floor : int or Tensor ``[B]`` (int32/int64)
        Tokens every head keeps at least (clipped to the head's length); AdaKV's ``alpha * budget / H``.
    lengths : Tensor ``[B, H]``, int32/int64, optional
        Valid tokens per head (default ``N``); tokens ``j >= lengths[b, h]`` are never kept.
    sink, recent : int
        Leading / trailing valid tokens of every head always kept.
    protect : Tensor ``[B, H, N]``, bool, optional
        More tokens always kept (e.g. the observation window, a question suffix).
    max_budget : int, optional
        ``K``, the width of ``kept_idx``: at least ``min(N, budget[b])`` for every row (the most one head
        can keep). Required when ``budget`` is a CUDA tensor (reading it would sync the host);
        defaults to ``min(N, budget)``, or ``min(N, budget.max())`` for a CPU tensor.
    backend : {"reference", "triton"}, optional
        Force an implementation (see :mod:`kvpress_kernels._backend`).

    Returns
    -------
    keep_mask : Tensor ``[B, H, N]``, bool
    kept_idx : Tensor ``[B, H, K]``, int32
        Each head's kept positions in ascending order, then ``-1`` padding.
    kept_len : Tensor ``[B, H]``, int32
        Tokens kept per head (``keep_mask.sum(-1)``); they sum to ``budget[b]`` over the heads.

    Raises
    ------
    ValueError naming ``budget`` for a negative budget, one larger than the row (``budget[b] >
    sum_h lengths[b, h]``) or an impossible one (protected and floor tokens together above it), naming
    ``floor`` for a negative floor and ``max_budget`` when ``K`` is below ``min(N, budget[b])``. The
    value checks read tensors, so on CUDA they run only with ``KVPRESS_KERNELS_DEBUG=1``; unchecked, the
    budget is clipped to ``[0, sum_h lengths]``, the floor to ``[0, lengths]``, protected and floor tokens
    are all kept even beyond the budget, and ``kept_idx`` lists each head's first ``K`` kept positions.
    """
    V.tensor("scores", scores, ndim=3, dtypes=V.FLOAT_DTYPES)
    dev = scores.device
    B, H, N = scores.shape
    budget = _check_budget(budget, B, dev, "budget", "(one per row of scores)")
    floor = _check_budget(floor, B, dev, "floor", "(one per row of scores)")
    if lengths is not None:
        V.tensor("lengths", lengths, ndim=2, dtypes=V.INDEX_DTYPES, device=dev)
        V.shape("lengths", lengths, [B, H], "(one per head of scores)")
    sink = V.integer("sink", sink, low=0)
    recent = V.integer("recent", recent, low=0)
    if protect is not None:
        V.tensor("protect", protect, ndim=3, dtypes=(torch.bool,), device=dev)
        V.shape("protect", protect, [B, H, N], "(like scores)")
    if max_budget is not None:
        K = V.integer("max_budget", max_budget, low=0)
        if isinstance(budget, int) and min(N, budget) > K:
            raise ValueError(f"max_budget must be >= min(N, budget) = {min(N, budget)} (the most one head can "
                             f"keep), got {K}")
    elif isinstance(budget, int):
        K = min(N, budget)
    elif budget.device.type == "cuda":
        raise ValueError("max_budget is required when budget is a CUDA tensor (reading budget.max() would sync "
                         "the host): pass min(N, an upper bound of the budgets)")
    else:
        K = min(N, max(int(budget.max()), 0)) if B else 0
    if isinstance(budget, int) and lengths is None and budget > H * N:
        raise ValueError(f"budget must be <= H * N = {H * N} (every token of every head), got budget={budget}")
    if wants_data_checks(scores) and B:
        if lengths is not None and lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > N):
            raise ValueError(f"lengths must be in [0, N={N}], got min {int(lengths.min())}, max {int(lengths.max())}")
        lens = _head_lengths(lengths, B, H, N, dev)
        bud = _budget_tensor(budget, B, dev)
        flo = _budget_tensor(floor, B, dev)
        if int(bud.min()) < 0:
            b = int((bud < 0).nonzero()[0])
            raise ValueError(f"budget must be >= 0, got budget[{b}] = {int(bud[b])}")
        if int(flo.min()) < 0:
            b = int((flo < 0).nonzero()[0])
            raise ValueError(f"floor must be >= 0, got floor[{b}] = {int(flo[b])}")
        if int(bud.clamp(max=N).max()) > K:
            raise ValueError(f"max_budget must be >= min(N, budget[b]) for every row, got max_budget={K} < "
                             f"{int(bud.clamp(max=N).max())}")
        over = bud > lens.sum(1)
        if bool(over.any()):
            b = int(over.nonzero()[0])
            raise ValueError(f"budget larger than the row: budget[{b}] = {int(bud[b])} > {int(lens[b].sum())} "
                             f"valid tokens over its {H} heads")
        n_prot = _protected(lens, N, sink, recent, protect).sum(-1)
        need = n_prot.maximum(flo.unsqueeze(1).minimum(lens)).sum(1)
        bad = need > bud
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"impossible budget: row {b} needs {int(need[b])} tokens for its protected tokens and "
                             f"per-head floor ({int(flo[b])}) but budget[{b}] = {int(bud[b])}; both count against "
                             "the budget")
    b = resolve_backend("select_head_budget", backend, dev, has=("reference", "triton"))
    budgets = budget if isinstance(budget, torch.Tensor) else torch.full((B,), budget, dtype=torch.int64, device=dev)
    floors = floor if isinstance(floor, torch.Tensor) else torch.full((B,), floor, dtype=torch.int64, device=dev)
    return torch.ops.kvpress_kernels.select_head_budget(scores, budgets, floors, lengths, sink, recent, protect, K, b)


__all__ = ["select_head_budget", "select_head_budget_ref", "launch_config"]
