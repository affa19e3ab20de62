"""Selection: which tokens (or whole segments) a row keeps (DESIGN.md §5.3).

Order used everywhere: scores descending, ties broken by position (the LOWER position wins), NaN
below every number (-inf included), NaNs among themselves by position; ``-0.0`` equals ``+0.0``.
Every backend ranks through the same order-preserving map of fp32 scores onto int32 keys
(:func:`order_keys`), so the reference, Triton and CUDA agree bit for bit, ties included.

Token level, :func:`select_topk`: row ``r`` keeps its protected tokens (``j < sink``,
``j >= lengths[r] - recent``, ``protect[r, j]``; only valid ``j < lengths[r]``) plus the
``budget[r] - |protected_r|`` best unprotected valid tokens. Protected tokens count against the
budget first. The Triton kernel radix-selects the threshold key (four 8-bit digit histograms, one
program per row, no sort) and then keeps, in one stable pass, the keys above the threshold, the
first ``need`` keys equal to it in position order and the protected tokens, writing ``kept_idx``
through a prefix-sum compaction.

Segment level, :func:`select_segments`: protected segments first, then the others greedily in
score order; a segment that does not fit in what remains of the budget is skipped (``policy="skip"``)
or ends the selection (``policy="stop"``). Topping the remainder up with the best single tokens is
``select_topk(..., protect=segments_to_token_mask(seg_keep, ...))``.

No op here syncs the host on CUDA: outputs have caller-known sizes and per-row budgets are read
on the device. Data-dependent checks (budgets against lengths, impossible budgets) run where
``wants_data_checks`` allows (always on CPU; on CUDA only with ``KVPRESS_KERNELS_DEBUG=1``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _validate as V
from .._backend import resolve_backend, wants_data_checks

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - Triton missing (e.g. macOS): reference only
    triton = None

POLICIES = ("skip", "stop")
# Largest tile of the Triton kernels (tokens or segments per loop step). Tests lower it to walk
# many tiles on small rows, which is where running counts across tiles could go wrong.
_MAX_BLOCK = 1024
_I32_MIN = -(2 ** 31)


# --------------------------------------------------------------------------------------------------
# Order keys and references
# --------------------------------------------------------------------------------------------------

def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed integer order is the score order (NaN lowest, -0.0 == +0.0).

    The fp32 bit pattern ``b`` of a non-negative float already orders as a signed int; for a
    negative float, flipping the 31 low bits reverses its order below zero. Integer work only, so
    no backend can flush denormals or fold ``-0.0`` differently.
    """
    b = scores.float().contiguous().view(torch.int32)
    b = torch.where(b == _I32_MIN, torch.zeros_like(b), b)
    k = b ^ ((b >> 31) & 0x7FFFFFFF)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    return torch.where(nan, torch.full_like(k, _I32_MIN), k)


def _budget_tensor(budget, R: int, device: torch.device) -> torch.Tensor:
    if isinstance(budget, torch.Tensor):
        return budget.reshape(R).to(device=device, dtype=torch.int64)
    return torch.full((R,), int(budget), dtype=torch.int64, device=device)


def _protected(lens: torch.Tensor, N: int, sink: int, recent: int, protect: Optional[torch.Tensor]) -> torch.Tensor:
    """``[..., N]`` bool: the protected valid tokens of every row of lengths ``lens [...]`` (the first
    ``sink``, the last ``recent`` and the ``protect``-ed ones, below the row's length); selection's rows
    ``[R]`` and head_budget's ``[B, H]`` alike."""
    j = torch.arange(N, device=lens.device, dtype=torch.int64)
    L = lens.unsqueeze(-1)
    prot = (j < sink) | (j >= L - recent)
    if protect is not None:
        prot = prot | protect.to(torch.bool)
    return prot & (j < L)


def _lengths64(lengths: Optional[torch.Tensor], R: int, N: int, device: torch.device) -> torch.Tensor:
    if lengths is None:
        return torch.full((R,), N, dtype=torch.int64, device=device)
    return lengths.reshape(R).to(device=device, dtype=torch.int64).clamp(0, N)


def select_topk_ref(scores: torch.Tensor, budget: Union[int, torch.Tensor], *, lengths: Optional[torch.Tensor] = None,
                    sink: int = 0, recent: int = 0, protect: Optional[torch.Tensor] = None,
                    max_budget: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference token selection (plain PyTorch, any device): a stable sort of the order keys.
    Same contract as :func:`select_topk` without checks, i.e. with its unchecked behaviour (budget
    clipped to ``[0, lengths[r]]``, every protected token kept, ``kept_idx`` truncated to ``K``)."""
    R, N = scores.shape
    dev = scores.device
    bud = _budget_tensor(budget, R, dev)
    if max_budget is not None:
        K = int(max_budget)
    elif isinstance(budget, torch.Tensor):
        K = max(int(bud.max()), 0) if R else 0
    else:
        K = max(int(budget), 0)
    lens = _lengths64(lengths, R, N, dev)
    prot = _protected(lens, N, sink, recent, protect)
    j = torch.arange(N, device=dev, dtype=torch.int64).unsqueeze(0)
    cand = (j < lens.unsqueeze(1)) & ~prot
    need = bud.clamp(min=0).minimum(lens) - prot.sum(1)
    # Non-candidates get a key below every int32 key, so they sort after all candidates.
    key = torch.where(cand, order_keys(scores).to(torch.int64), torch.full((R, N), _I32_MIN - 1, device=dev))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank_ok = torch.arange(N, device=dev).unsqueeze(0) < need.unsqueeze(1)
    chosen = torch.zeros((R, N), dtype=torch.bool, device=dev).scatter(1, order, rank_ok)
    keep = prot | (chosen & cand)
    slot = keep.to(torch.int64).cumsum(1) - 1
    kept_idx = torch.full((R, K + 1), -1, dtype=torch.int32, device=dev)
    # Tokens past slot K - 1 (possible only when protected tokens overflow the budget unchecked)
    # land in the dump column K, which is cut off.
    dest = torch.where(keep & (slot < K), slot, torch.full_like(slot, K))
    kept_idx.scatter_(1, dest, torch.where(keep, j, -1).to(torch.int32).expand(R, N).contiguous())
    kept_idx[:, K] = -1
    return keep, kept_idx[:, :K].contiguous()


def select_segments_ref(seg_scores: torch.Tensor, seg_sizes: torch.Tensor, budget: Union[int, torch.Tensor], *,
                        policy: str = "skip", protect: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference greedy segment selection (plain PyTorch, any device; a Python loop over the ``S``
    segments with every step vectorised over rows, so it never syncs the host). Same contract as
    :func:`select_segments` without checks (negative sizes count as 0)."""
    R, S = seg_scores.shape
    dev = seg_scores.device
    sizes = seg_sizes.to(device=dev, dtype=torch.int64).clamp(min=0).expand(R, S)
    prot = protect.to(torch.bool) if protect is not None else torch.zeros((R, S), dtype=torch.bool, device=dev)
    rem = _budget_tensor(budget, R, dev) - torch.where(prot, sizes, 0).sum(1)
    key = torch.where(prot, torch.full((R, S), _I32_MIN - 1, device=dev), order_keys(seg_scores).to(torch.int64))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    keep = prot.clone()
    active = torch.ones(R, dtype=torch.bool, device=dev)
    for i in range(S):
        s = order[:, i:i + 1]
        sz = sizes.gather(1, s).squeeze(1)
        cand = ~prot.gather(1, s).squeeze(1)
        fits = cand & active & (sz <= rem)
        keep.scatter_(1, s, keep.gather(1, s) | fits.unsqueeze(1))
        rem = rem - torch.where(fits, sz, 0)
        if policy == "stop":
            active = active & ~(cand & ~fits)
    return keep


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _order_key(x):
        # Same map as order_keys(): int32 whose signed order is the fp32 order, NaN lowest.
        b = x.to(tl.int32, bitcast=True)
        b = tl.where(b == -2147483647 - 1, 0, b)
        k = b ^ ((b >> 31) & 0x7FFFFFFF)
        return tl.where((b & 0x7FFFFFFF) > 0x7F800000, -2147483647 - 1, k)

    @triton.jit
    def _row_tile(scores, protect, row, j, L, N, sink, recent, stride_x_row, stride_p_row,
                  HAS_PROTECT: tl.constexpr):
        valid = j < L
        prot = valid & ((j < sink) | (j >= L - recent))
        # Loads are masked by the row's capacity N, not its length L: a per-row length mask breaks the
        # 16-byte vectors (the H2O path passes lengths); what lies in [L, N) is read and ignored.
        inb = j < N
        if HAS_PROTECT:
            p = tl.load(protect + row * stride_p_row + j, mask=inb, other=0)
            prot = prot | (valid & (p != 0))
        cand = valid & ~prot
        x = tl.load(scores + row * stride_x_row + j, mask=inb, other=0.0).to(tl.float32)
        return prot, cand, _order_key(x)

    @triton.jit
    def _pick_digit(hist, bins, k_rem, prefix, SHIFT: tl.constexpr):
        # Bin b holds digit 255 - b, so the running sum counts keys from the top: the wanted digit
        # is the first bin where it reaches k_rem; keys in earlier bins are all kept.
        run = tl.cumsum(hist, 0)
        b = tl.sum((run < k_rem).to(tl.int32), 0)
        above = tl.sum(tl.where(bins < b, hist, 0), 0)
        prefix = prefix | ((255 - b).to(tl.int64) << SHIFT)
        return k_rem - above, prefix

    @triton.jit
    def _select_topk_kernel(scores, budgets, lengths, protect, keep_mask, kept_idx,
                            N, K, sink, recent, stride_x_row, stride_p_row, stride_m_row, stride_i_row,
                            HAS_LENGTHS: tl.constexpr, HAS_PROTECT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if HAS_LENGTHS:
            L = tl.minimum(tl.maximum(tl.load(lengths + row).to(tl.int64), 0), N).to(tl.int32)
        else:
            L = tl.zeros((), tl.int32) + N
        bud = tl.minimum(tl.maximum(tl.load(budgets + row).to(tl.int64), 0), L).to(tl.int32)
        offs = tl.arange(0, BLOCK)
        bins = tl.arange(0, 256)

        # Pass 1: count protected tokens and histogram the top digit of the candidates' keys.
        # Non-candidates are binned at 0 and subtracted again (tl.histogram's mask argument is
        # newer than the Triton we must also compile with).
        hist = tl.zeros((256,), tl.int32)
        n_prot = tl.zeros((), tl.int32)
        for j0 in range(0, L, BLOCK):
            j = j0 + offs
            prot, cand, key = _row_tile(scores, protect, row, j, L, N, sink, recent, stride_x_row, stride_p_row,
                                        HAS_PROTECT)
            digit = 255 - (((key >> 24) & 0xFF) ^ 0x80)
            n_c = tl.sum(cand.to(tl.int32), 0)
            hist += tl.histogram(tl.where(cand, digit, 0), 256) - tl.where(bins == 0, BLOCK - n_c, 0)
            n_prot += tl.sum(prot.to(tl.int32), 0)
        n_cand = L - n_prot
        need = bud - n_prot
        k_rem, prefix = _pick_digit(hist, bins, need, tl.zeros((), tl.int64), 24)
        # Radix-select the rest of the threshold only when it is a real cut; keep-nothing and
        # keep-every-candidate need no threshold (and cost one pass less).
        selecting = (need > 0) & (need < n_cand)
        if selecting:
            for p in tl.static_range(1, 4):
                top = (prefix - 2147483648).to(tl.int32)  # the fixed high digits, in key space
                hist = tl.zeros((256,), tl.int32)
                for j0 in range(0, L, BLOCK):
                    j = j0 + offs
                    prot, cand, key = _row_tile(scores, protect, row, j, L, N, sink, recent, stride_x_row,
                                                stride_p_row, HAS_PROTECT)
                    cand = cand & ((key & (-(1 << (32 - 8 * p)))) == top)
                    digit = 255 - ((key >> (24 - 8 * p)) & 0xFF)
                    n_c = tl.sum(cand.to(tl.int32), 0)
                    hist += tl.histogram(tl.where(cand, digit, 0), 256) - tl.where(bins == 0, BLOCK - n_c, 0)
                k_rem, prefix = _pick_digit(hist, bins, k_rem, prefix, 24 - 8 * p)
        thr = (prefix - 2147483648).to(tl.int32)
        # need <= 0: nothing beats INT32_MAX and no tie may be taken; need >= n_cand: every key >= INT32_MIN.
        thr = tl.where(selecting, thr, tl.where(need <= 0, 2147483647, -2147483647 - 1))
        k_rem = tl.where(selecting, k_rem, tl.where(need <= 0, 0, L))

        # Pass 2: stable keep decision and compaction, in position order.
        n_eq = tl.zeros((), tl.int32)
        n_keep = tl.zeros((), tl.int32)
        for j0 in range(0, N, BLOCK):
            j = j0 + offs
            prot, cand, key = _row_tile(scores, protect, row, j, L, N, sink, recent, stride_x_row, stride_p_row,
                                        HAS_PROTECT)
            eq = (cand & (key == thr)).to(tl.int32)
            eq_rank = n_eq + tl.cumsum(eq, 0) - eq
            keep = prot | (cand & (key > thr)) | ((eq != 0) & (eq_rank < k_rem))
            kp = keep.to(tl.int32)
            slot = n_keep + tl.cumsum(kp, 0) - kp
            tl.store(keep_mask + row * stride_m_row + j, kp.to(tl.int8), mask=j < N)
            tl.store(kept_idx + row * stride_i_row + slot, j, mask=keep & (slot < K))
            n_eq += tl.sum(eq, 0)
            n_keep += tl.sum(kp, 0)
        for i0 in range(0, K, BLOCK):
            i = i0 + offs
            tl.store(kept_idx + row * stride_i_row + i, tl.full((BLOCK,), -1, tl.int32),
                     mask=(i >= n_keep) & (i < K))

    @triton.jit
    def _select_segments_kernel(order, sizes, protect, budgets, seg_keep, S,
                                stride_o_row, stride_sz_row, stride_p_row, stride_k_row,
                                HAS_PROTECT: tl.constexpr, STOP: tl.constexpr, BLOCK: tl.constexpr):
        # One program per row. The segments arrive sorted by score (torch.sort on device); the
        # greedy walk over them is sequential in principle, but inside a tile it reduces to
        # rounds of "drop what can no longer fit, keep the longest prefix that fits", each round
        # keeping at least one segment, so a tile costs a few vector rounds, not S scalar steps.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        rem = tl.load(budgets + row).to(tl.int64)
        if HAS_PROTECT:
            for s0 in range(0, S, BLOCK):
                s = s0 + offs
                m = s < S
                p = tl.load(protect + row * stride_p_row + s, mask=m, other=0) != 0
                sz = tl.maximum(tl.load(sizes + row * stride_sz_row + s, mask=m, other=0).to(tl.int64), 0)
                rem -= tl.sum(tl.where(p, sz, 0), 0)
                tl.store(seg_keep + row * stride_k_row + s, tl.full((BLOCK,), 1, tl.int8), mask=m & p)
        stopped = tl.zeros((), tl.int32)
        for i0 in range(0, S, BLOCK):
            i = i0 + offs
            m = i < S
            idx = tl.load(order + row * stride_o_row + i, mask=m, other=0).to(tl.int64)
            sz = tl.maximum(tl.load(sizes + row * stride_sz_row + idx, mask=m, other=0).to(tl.int64), 0)
            cand = m
            if HAS_PROTECT:
                cand = cand & (tl.load(protect + row * stride_p_row + idx, mask=m, other=0) == 0)
            keep = cand & (offs < 0)
            if STOP:
                # Sizes are >= 0, so the running sum only grows: what fits is a prefix, and the
                # first segment past it ends the selection for every later tile too.
                live = cand & (stopped == 0)
                run = tl.cumsum(tl.where(live, sz, 0), 0)
                keep = live & (run <= rem)
                stopped = stopped | tl.max((live & (run > rem)).to(tl.int32), 0)
                rem -= tl.sum(tl.where(keep, sz, 0), 0)
            else:
                und = cand
                n_und = tl.sum(und.to(tl.int32), 0)
                while n_und > 0:
                    und = und & (sz <= rem)
                    run = tl.cumsum(tl.where(und, sz, 0), 0)
                    take = und & (run <= rem)
                    keep = keep | take
                    rem -= tl.sum(tl.where(take, sz, 0), 0)
                    und = und & (take == 0)
                    n_und = tl.sum(und.to(tl.int32), 0)
            tl.store(seg_keep + row * stride_k_row + idx, keep.to(tl.int8), mask=cand)


def _topk_warps(block: int, elem_size: int) -> int:
    """Warps for a BLOCK-wide row tile. Fewer warps would give each thread 16 bytes of scores (wider
    loads), but the compile check found spills with 2 warps at BLOCK = 256 and with 4 at BLOCK = 512
    (sm_80, Triton 3.6)."""
    return 4 if block <= 256 else 8


def _select_topk_triton(scores, budgets, lengths, sink, recent, protect, K):
    R, N = scores.shape
    dev = scores.device
    keep = torch.empty((R, N), dtype=torch.bool, device=dev)
    kept_idx = torch.empty((R, K), dtype=torch.int32, device=dev)
    if R == 0:
        return keep, kept_idx
    x = scores if scores.stride(-1) == 1 or N <= 1 else scores.contiguous()
    prot = protect
    if prot is not None and prot.stride(-1) != 1 and N > 1:
        prot = prot.contiguous()
    # At least the 256 histogram bins per tile on real runs (tests lower _MAX_BLOCK below that).
    block = min(max(triton.next_power_of_2(max(N, K)), 256), _MAX_BLOCK)
    # The kernel indexes per-row vectors with unit stride: a strided view would be read wrongly.
    budgets = budgets.contiguous()
    lengths = lengths.contiguous() if lengths is not None else None
    _select_topk_kernel[(R,)](
        x, budgets, lengths if lengths is not None else budgets,
        prot.view(torch.int8) if prot is not None else keep.view(torch.int8),
        keep.view(torch.int8), kept_idx, N, K, min(sink, N), min(recent, N + 1),
        x.stride(0), prot.stride(0) if prot is not None else 0, keep.stride(0), kept_idx.stride(0),
        HAS_LENGTHS=lengths is not None, HAS_PROTECT=prot is not None, BLOCK=block,
        num_warps=_topk_warps(block, x.element_size()))
    return keep, kept_idx


def _select_segments_triton(seg_scores, seg_sizes, budgets, policy, protect):
    R, S = seg_scores.shape
    dev = seg_scores.device
    seg_keep = torch.empty((R, S), dtype=torch.bool, device=dev)
    if R == 0 or S == 0:
        return seg_keep
    key = order_keys(seg_scores).to(torch.int64)
    if protect is not None:
        # Protected segments sort last so the candidates form a prefix of the order.
        key = torch.where(protect, torch.full_like(key, _I32_MIN - 1), key)
    # torch.where / sort keep the layout of their inputs (a column-major protect gives a column-major
    # order): the kernel reads a row of the order with unit stride.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices.to(torch.int32).contiguous()
    sizes = seg_sizes if seg_sizes.dim() == 2 else seg_sizes.unsqueeze(0).expand(R, S)
    if sizes.stride(-1) != 1 and S > 1:
        sizes = sizes.contiguous()
    prot = protect.contiguous().view(torch.int8) if protect is not None else seg_keep.view(torch.int8)
    block = min(max(triton.next_power_of_2(S), 16), _MAX_BLOCK)
    budgets = budgets.contiguous()  # read with unit stride by the kernel
    _select_segments_kernel[(R,)](
        order, sizes, prot, budgets, seg_keep.view(torch.int8), S,
        order.stride(0), sizes.stride(0), prot.stride(0), seg_keep.stride(0),
        HAS_PROTECT=protect is not None, STOP=policy == "stop", BLOCK=block)
    return seg_keep


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("kvpress_kernels::select_topk", mutates_args=())
def _select_topk_op(scores: torch.Tensor, budgets: torch.Tensor, lengths: Optional[torch.Tensor], sink: int,
                    recent: int, protect: Optional[torch.Tensor], max_budget: int,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _select_topk_triton(scores, budgets, lengths, sink, recent, protect, max_budget)
    if backend == "cuda":
        from .._cuda import select_topk_cuda

        R, N = scores.shape
        dev = scores.device
        keep = torch.empty((R, N), dtype=torch.bool, device=dev)
        kept_idx = torch.empty((R, max_budget), dtype=torch.int32, device=dev)
        lens = lengths if lengths is not None else torch.full((R,), N, dtype=torch.int32, device=dev)
        # The CUDA kernel reads fp32/fp16/bf16 itself: no widening copy of the scores here.
        select_topk_cuda(scores.contiguous(), budgets.to(torch.int32).contiguous(),
                         lens.to(torch.int32).contiguous(), sink, recent,
                         protect.contiguous() if protect is not None else None, keep, kept_idx)
        return keep, kept_idx
    return select_topk_ref(scores, budgets, lengths=lengths, sink=sink, recent=recent, protect=protect,
                           max_budget=max_budget)


@_select_topk_op.register_fake
def _(scores, budgets, lengths, sink, recent, protect, max_budget, backend):
    R, N = scores.shape
    return (scores.new_empty((R, N), dtype=torch.bool), scores.new_empty((R, max_budget), dtype=torch.int32))


@torch.library.custom_op("kvpress_kernels::select_segments", mutates_args=())
def _select_segments_op(seg_scores: torch.Tensor, seg_sizes: torch.Tensor, budgets: torch.Tensor, policy: str,
                        protect: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "triton":
        return _select_segments_triton(seg_scores, seg_sizes, budgets, policy, protect)
    return select_segments_ref(seg_scores, seg_sizes, budgets, policy=policy, protect=protect)


@_select_segments_op.register_fake
def _(seg_scores, seg_sizes, budgets, policy, protect, backend):
    return seg_scores.new_empty(seg_scores.shape, dtype=torch.bool)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------

def _check_budget(budget, R: int, dev: torch.device, name: str = "budget",
                  what: str = "(one budget per row)") -> Union[int, torch.Tensor]:
    """A per-row count argument (``budget``; head_budget's ``floor`` too): a non-negative int, or a ``[R]``
    int tensor on ``dev`` (its values are checked by the caller). ``what`` ends the shape error."""
    if isinstance(budget, torch.Tensor) and budget.dim() == 1:
        V.tensor(name, budget, ndim=1, dtypes=V.INDEX_DTYPES, device=dev)
        V.shape(name, budget, [R], what)
        return budget
    if isinstance(budget, torch.Tensor) and budget.dim() != 0:
        raise ValueError(f"{name} must be an int or a [{R}] int tensor, got shape {list(budget.shape)}")
    try:
        return V.integer(name, budget, low=0)
    except TypeError:
        raise TypeError(f"{name} must be an int or a [{R}] int tensor, got {type(budget).__name__}") from None


def select_topk(scores: torch.Tensor, budget: Union[int, torch.Tensor], *, lengths: Optional[torch.Tensor] = None,
                sink: int = 0, recent: int = 0, protect: Optional[torch.Tensor] = None,
                max_budget: Optional[int] = None, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep exactly ``budget[r]`` tokens per row: the protected ones, then the best-scoring others.

    Protected tokens of row ``r`` (valid ``j < L_r = lengths[r]`` only): ``j < sink``,
    ``j >= L_r - recent`` and ``protect[r, j]``. They count against the budget first; the remaining
    ``budget[r] - |protected_r|`` slots go to the best unprotected valid tokens in the order:
    score descending, ties to the lower position, NaN below everything (``-0.0 == +0.0``).

    Parameters
    ----------
    scores : Tensor ``[R, N]``, float32/float16/bfloat16
        One row per (seq, head) or (seq, layer); callers flatten other layouts.
    budget : int or Tensor ``[R]`` (int32/int64)
        Tokens to keep per row (per-row for PyramidKV layer budgets, AdaKV head budgets).
    lengths : Tensor ``[R]``, int32/int64, optional
        Valid tokens per row (default ``N``); tokens ``j >= lengths[r]`` are never kept.
    sink, recent : int
        Leading / trailing valid tokens always kept.
    protect : Tensor ``[R, N]``, bool, optional
        More tokens always kept (e.g. a question suffix, or whole kept segments from
        :func:`select_segments` expanded by ``segments_to_token_mask``).
    max_budget : int, optional
        ``K``, the width of ``kept_idx``; must be ``>=`` every budget. Required when ``budget`` is a
        CUDA tensor (reading its maximum would sync the host); defaults to the int budget, or
        ``budget.max()`` for a CPU tensor.
    backend : {"reference", "triton", "cuda"}, optional
        Force an implementation (see :mod:`kvpress_kernels._backend`).

    Returns
    -------
    keep_mask : Tensor ``[R, N]``, bool
        ``True`` for kept tokens.
    kept_idx : Tensor ``[R, K]``, int32
        The kept positions of each row in ascending order, then ``-1`` padding.

    Raises
    ------
    ValueError naming ``budget`` for a negative budget, a budget larger than its row
    (``budget[r] > lengths[r]``) or an impossible one (``|protected_r| > budget[r]``), and naming
    ``max_budget`` when ``K`` is smaller than a budget. These read tensor values, so on CUDA they run
    only with ``KVPRESS_KERNELS_DEBUG=1``; unchecked, a budget is clipped to ``[0, lengths[r]]``,
    every protected token is kept even beyond the budget (nothing protected is ever lost), and
    ``kept_idx`` lists the first ``K`` kept positions (``keep_mask`` is then the complete answer).
    """
    V.tensor("scores", scores, ndim=2, dtypes=V.FLOAT_DTYPES)
    dev = scores.device
    R, N = scores.shape
    budget = _check_budget(budget, R, dev)
    if lengths is not None:
        V.tensor("lengths", lengths, ndim=1, dtypes=V.INDEX_DTYPES, device=dev)
        V.shape("lengths", lengths, [R], "(one per row of scores)")
    sink = V.integer("sink", sink, low=0)
    recent = V.integer("recent", recent, low=0)
    if protect is not None:
        V.tensor("protect", protect, ndim=2, dtypes=(torch.bool,), device=dev)
        V.shape("protect", protect, [R, N], "(like scores)")
    if max_budget is not None:
        K = V.integer("max_budget", max_budget, low=0)
        if isinstance(budget, int) and budget > K:
            raise ValueError(f"max_budget must be >= budget, got max_budget={K} < budget={budget}")
    elif isinstance(budget, int):
        K = budget
    elif budget.device.type == "cuda":
        raise ValueError("max_budget is required when budget is a CUDA tensor (reading budget.max() "
                         "would sync the host): pass an upper bound of the per-row budgets")
    else:
        K = max(int(budget.max()), 0) if R else 0
    if isinstance(budget, int) and lengths is None and budget > N:
        raise ValueError(f"budget must be <= the row length N = {N}, got budget={budget}")
    if wants_data_checks(scores) and R:
        lens = _lengths64(None, R, N, dev) if lengths is None else lengths.to(torch.int64)
        if lengths is not None and (int(lens.min()) < 0 or int(lens.max()) > N):
            raise ValueError(f"lengths must be in [0, N={N}], got min {int(lens.min())}, max {int(lens.max())}")
        bud = _budget_tensor(budget, R, dev)
        if int(bud.min()) < 0:
            r = int((bud < 0).nonzero()[0])
            raise ValueError(f"budget must be >= 0, got budget[{r}] = {int(bud[r])}")
        if int(bud.max()) > K:
            raise ValueError(f"max_budget must be >= every budget, got max_budget={K} < max budget {int(bud.max())}")
        over = bud > lens
        if bool(over.any()):
            r = int(over.nonzero()[0])
            raise ValueError(f"budget larger than the row: budget[{r}] = {int(bud[r])} > lengths[{r}] = {int(lens[r])}")
        n_prot = _protected(lens, N, sink, recent, protect).sum(1)
        bad = n_prot > bud
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            raise ValueError(f"impossible budget: row {r} has {int(n_prot[r])} protected tokens (sink, recent, "
                             f"protect) but budget[{r}] = {int(bud[r])}; protected tokens count against the budget")
    b = resolve_backend("select_topk", backend, dev, has=("reference", "triton", "cuda"))
    budgets = budget if isinstance(budget, torch.Tensor) else torch.full((R,), budget, dtype=torch.int32, device=dev)
    return torch.ops.kvpress_kernels.select_topk(scores, budgets, lengths, sink, recent, protect, K, b)


def select_segments(seg_scores: torch.Tensor, seg_sizes: torch.Tensor, budget: Union[int, torch.Tensor], *,
                    policy: str = "skip", protect: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Keep whole segments greedily by score until the token budget is filled.

    Protected segments are kept first and their sizes count against the budget. The others are
    visited by score (descending; ties to the lower index; NaN last) and kept while their size fits
    in what remains: a segment that does not fit is passed over (``policy="skip"``, smaller ones
    later may still fit) or ends the selection (``policy="stop"``).

    Parameters
    ----------
    seg_scores : Tensor ``[R, S]``, float32/float16/bfloat16
        E.g. :func:`~kvpress_kernels.ops.segments.segment_reduce` output.
    seg_sizes : Tensor ``[S]`` or ``[R, S]``, int32/int64
        Tokens per segment (``0 <= size < 2**31``).
    budget : int or Tensor ``[R]`` (int32/int64)
        Tokens to fill per row (``>= 0``). A budget larger than every segment together keeps all.
    policy : {"skip", "stop"}
    protect : Tensor ``[R, S]``, bool, optional
        Segments always kept.
    backend : {"reference", "triton"}, optional
        ``triton``: the order comes from ``torch.sort`` on the device and one Triton program per row
        walks it; ``reference``: a Python loop over segments of row-vectorised tensor ops. Neither
        syncs the host on CUDA.

    Returns
    -------
    seg_keep : Tensor ``[R, S]``, bool

    Raises
    ------
    ValueError naming ``budget`` for a negative budget or one smaller than the protected segments
    (impossible budget), naming ``seg_sizes`` for a size outside ``[0, 2**31)``; these read values, so on CUDA
    they run only with ``KVPRESS_KERNELS_DEBUG=1`` (unchecked: protected segments are all kept,
    negative sizes count as 0).
    """
    V.tensor("seg_scores", seg_scores, ndim=2, dtypes=V.FLOAT_DTYPES)
    dev = seg_scores.device
    R, S = seg_scores.shape
    V.tensor("seg_sizes", seg_sizes, ndim=(1, 2), dtypes=V.INDEX_DTYPES, device=dev)
    V.shape("seg_sizes", seg_sizes, [S] if seg_sizes.dim() == 1 else [R, S], "(one size per segment)")
    budget = _check_budget(budget, R, dev)
    V.choice("policy", policy, POLICIES)
    if protect is not None:
        V.tensor("protect", protect, ndim=2, dtypes=(torch.bool,), device=dev)
        V.shape("protect", protect, [R, S], "(like seg_scores)")
    if wants_data_checks(seg_scores) and R:
        # sizes are token counts of one row (< 2**31), so sums over segments cannot overflow int64
        V.values_in("seg_sizes", seg_sizes, low=0, high=2 ** 31 - 1, what="(tokens per segment)")
        bud = _budget_tensor(budget, R, dev)
        if int(bud.min()) < 0:
            r = int((bud < 0).nonzero()[0])
            raise ValueError(f"budget must be >= 0, got budget[{r}] = {int(bud[r])}")
        if protect is not None:
            need = torch.where(protect, seg_sizes.to(torch.int64).expand(R, S), 0).sum(1)
            bad = need > bud
            if bool(bad.any()):
                r = int(bad.nonzero()[0])
                raise ValueError(f"impossible budget: row {r} has {int(need[r])} tokens in protected segments "
                                 f"but budget[{r}] = {int(bud[r])}; protected segments count against the budget")
    b = resolve_backend("select_segments", backend, dev, has=("reference", "triton"))
    budgets = budget if isinstance(budget, torch.Tensor) else torch.full((R,), budget, dtype=torch.int64, device=dev)
    return torch.ops.kvpress_kernels.select_segments(seg_scores, seg_sizes, budgets, policy, protect, b)


__all__ = ["select_topk", "select_topk_ref", "select_segments", "select_segments_ref", "order_keys", "POLICIES"]
