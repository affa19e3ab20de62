"""Segment reduction: per-segment sum / mean / max of token scores (DESIGN.md §5.2).

A row is one ``[N]`` vector of token scores (row = (seq, head) or (seq, layer); callers flatten any
leading layout into ``R`` rows). Row ``r`` holds ``lengths[r]`` valid tokens (default ``N``). Segments
are either

- *chunks* of a fixed length ``c`` (ChunkKV): segment ``s = [s·c, min((s+1)·c, N))``, ``S = ceil(N / c)``;
- *spans* of any length (ShotKV shots): an int tensor ``[S, 2]`` shared by every row, or ``[R, S, 2]``,
  of half-open ``[start, end)`` with ``0 <= start <= end <= N``, sorted and non-overlapping.

Every segment is clipped to its row's valid length, so the number of tokens a segment reduces over
is ``n_s = max(0, min(end, L) - min(start, L))``. Reductions (fp32 accumulation, fp32 output):

- ``sum``:  ``Σ x_j``          (0 for an empty segment)
- ``mean``: ``Σ x_j / n_s``    (0 for an empty segment)
- ``max``:  ``max x_j``        (-inf for an empty segment)

NaN propagates in all three: a segment that holds a NaN reduces to NaN (sums do that by themselves;
for ``max`` it is tracked explicitly because GPU ``max`` instructions drop NaN).

:func:`segments_to_token_mask` expands a per-segment keep decision back to tokens (the ``protect``
mask that tops a segment selection up with the best single tokens, see :mod:`.selection`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .._backend import resolve_backend, wants_data_checks

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - Triton missing (e.g. macOS): reference only
    triton = None

REDUCTIONS = ("sum", "mean", "max")


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------

def _row_lengths(lengths: Optional[torch.Tensor], R: int, N: int, device: torch.device) -> torch.Tensor:
    """int64 ``[R]`` valid lengths clamped to ``[0, N]`` (the unchecked-input behaviour of every backend)."""
    if lengths is None:
        return torch.full((R,), N, dtype=torch.int64, device=device)
    return lengths.reshape(R).to(device=device, dtype=torch.int64).clamp(0, N)


def _segment_bounds(R: int, N: int, chunk_size: Optional[int], spans: Optional[torch.Tensor],
                    lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped ``[R, S]`` int64 (start, end) of every segment; ``end >= start``."""
    dev = lens.device
    if spans is None:
        S = -(-N // chunk_size)
        st = (torch.arange(S, device=dev, dtype=torch.int64) * chunk_size).expand(R, S)
        en = (st + chunk_size).clamp(max=N)
    else:
        sp = spans.to(device=dev, dtype=torch.int64)
        if sp.dim() == 2:
            sp = sp.unsqueeze(0).expand(R, -1, -1)
        st, en = sp[..., 0], sp[..., 1]
    L = lens.unsqueeze(1)
    st = torch.minimum(st, L)
    en = torch.maximum(torch.minimum(en, L), st)
    return st, en


def segment_reduce_ref(scores: torch.Tensor, *, chunk_size: Optional[int] = None,
                       spans: Optional[torch.Tensor] = None, reduce: str = "mean",
                       lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference segment reduction (plain PyTorch, any device). Same contract as
    :func:`segment_reduce`, no checks. Returns ``[R, S]`` float32."""
    R, N = scores.shape
    dev = scores.device
    x = scores.float()
    lens = _row_lengths(lengths, R, N, dev)
    st, en = _segment_bounds(R, N, chunk_size, spans, lens)
    S = st.shape[1]
    if R == 0 or S == 0:
        return torch.zeros((R, S), dtype=torch.float32, device=dev)
    j = torch.arange(N, device=dev, dtype=torch.int64).expand(R, N)
    # The segment holding token j is the last one starting at or before j (segments are sorted and
    # disjoint); it holds j only if j < its end. Tokens outside every segment go to a dump column S.
    seg = torch.searchsorted(st.contiguous(), j.contiguous(), right=True) - 1
    inside = seg >= 0
    seg_c = seg.clamp(min=0)
    inside &= j < en.gather(1, seg_c)
    seg = torch.where(inside, seg_c, torch.full_like(seg_c, S))
    count = (en - st).to(torch.float32)
    if reduce == "max":
        isnan = torch.isnan(x)
        vals = torch.where(isnan, torch.full_like(x, float("-inf")), x)
        out = torch.full((R, S + 1), float("-inf"), dtype=torch.float32, device=dev)
        out.scatter_reduce_(1, seg, vals, reduce="amax", include_self=True)
        nans = torch.zeros((R, S + 1), dtype=torch.int64, device=dev)
        nans.scatter_add_(1, seg, isnan.to(torch.int64))
        out = torch.where(nans > 0, torch.full_like(out, float("nan")), out)
        return out[:, :S].contiguous()
    out = torch.zeros((R, S + 1), dtype=torch.float32, device=dev)
    out.scatter_add_(1, seg, x)
    out = out[:, :S]
    if reduce == "mean":
        out = torch.where(count > 0, out / count.clamp(min=1), torch.zeros_like(out))
    return out.contiguous()


def segments_to_token_mask(seg_keep: torch.Tensor, *, n_tokens: int, chunk_size: Optional[int] = None,
                           spans: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Expand a per-segment decision to tokens: ``mask[r, j] = seg_keep[r, s]`` for the segment ``s``
    holding token ``j``; ``False`` for tokens outside every segment.

    Parameters
    ----------
    seg_keep : Tensor ``[R, S]``, bool
    n_tokens : int
        ``N``, the row length of the output.
    chunk_size, spans
        The segmentation, exactly as given to :func:`segment_reduce` (``S`` must match it).

    Returns
    -------
    Tensor ``[R, n_tokens]``, bool. Plain PyTorch on any device; no host sync.
    """
    V.tensor("seg_keep", seg_keep, ndim=2, dtypes=(torch.bool,))
    R, S = seg_keep.shape
    N = V.integer("n_tokens", n_tokens, low=0)
    chunk_size, spans = _check_segmentation(chunk_size, spans, R, N, seg_keep.device)
    S_expected = -(-N // chunk_size) if spans is None else spans.shape[-2]
    if S != S_expected:
        raise ValueError(f"seg_keep must have shape [{R}, {S_expected}] (one column per segment), "
                         f"got {list(seg_keep.shape)}")
    dev = seg_keep.device
    if R == 0 or N == 0 or S == 0:
        return torch.zeros((R, N), dtype=torch.bool, device=dev)
    if spans is None:
        seg = torch.arange(N, device=dev) // chunk_size
        return seg_keep[:, seg]
    lens = torch.full((R,), N, dtype=torch.int64, device=dev)
    st, en = _segment_bounds(R, N, None, spans, lens)
    j = torch.arange(N, device=dev, dtype=torch.int64).expand(R, N)
    seg = (torch.searchsorted(st.contiguous(), j.contiguous(), right=True) - 1).clamp(min=0)
    inside = (j >= st.gather(1, seg)) & (j < en.gather(1, seg))
    return inside & seg_keep.gather(1, seg)


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

_REDUCE_CODE = {"sum": 0, "mean": 1, "max": 2}

if triton is not None:

    @triton.jit
    def _segment_reduce_kernel(scores, spans, lengths, out, N, S, chunk,
                               stride_x_row, stride_sp_row, stride_sp_seg, stride_sp_end, stride_o_row,
                               HAS_SPANS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REDUCE: tl.constexpr,
                               BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
        # One program per (row, block of BLOCK_S segments); it walks its segments' tokens in
        # [BLOCK_S, BLOCK_T] tiles, so short chunks share a program and long shots loop.
        row = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        sm = s < S
        if HAS_LENGTHS:
            L = tl.minimum(tl.maximum(tl.load(lengths + row).to(tl.int64), 0), N)
        else:
            L = tl.zeros((), tl.int64) + N
        if HAS_SPANS:
            sp = spans + row * stride_sp_row + s.to(tl.int64) * stride_sp_seg
            st = tl.load(sp, mask=sm, other=0).to(tl.int64)
            en = tl.load(sp + stride_sp_end, mask=sm, other=0).to(tl.int64)
        else:
            st = s.to(tl.int64) * chunk
            en = tl.minimum(st + chunk, N)
        st = tl.minimum(st, L)
        en = tl.maximum(tl.minimum(en, L), st)
        cnt = tl.where(sm, en - st, 0)
        longest = tl.max(cnt, 0)
        t = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_S,), tl.float32)
        mx = tl.full((BLOCK_S,), float("-inf"), tl.float32)
        nan = tl.zeros((BLOCK_S,), tl.int32)
        base = scores + row * stride_x_row
        for t0 in range(0, longest, BLOCK_T):
            tt = t0 + t
            m = tt[None, :] < cnt[:, None]
            # Loads widen to fp32 first: every accumulation is fp32 whatever the input dtype.
            x = tl.load(base + st[:, None] + tt[None, :], mask=m, other=0.0).to(tl.float32)
            if REDUCE == 2:
                isnan = m & (x != x)
                nan += tl.sum(isnan.to(tl.int32), 1)
                mx = tl.maximum(mx, tl.max(tl.where(m & (x == x), x, float("-inf")), 1))
            else:
                acc += tl.sum(x, 1)
        if REDUCE == 2:
            res = tl.where(nan > 0, float("nan"), mx)
        elif REDUCE == 1:
            res = tl.where(cnt > 0, acc / tl.maximum(cnt, 1).to(tl.float32), 0.0)
        else:
            res = acc
        tl.store(out + row * stride_o_row + s, res, mask=sm)


def _segment_reduce_triton(scores: torch.Tensor, spans: Optional[torch.Tensor], chunk_size: int, n_segments: int,
                           reduce: str, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    R, N = scores.shape
    S = n_segments
    out = torch.empty((R, S), dtype=torch.float32, device=scores.device)
    if R == 0 or S == 0:
        return out
    x = scores if scores.stride(-1) == 1 or N <= 1 else scores.contiguous()
    if spans is not None:
        sp = spans
        sp_strides = (sp.stride(0) if sp.dim() == 3 else 0, sp.stride(-2), sp.stride(-1))
        block_t = 128
        block_s = 8
        seg_len = 1
    else:
        sp = out  # placeholder pointer, never read (HAS_SPANS=False)
        sp_strides = (0, 0, 0)
        block_t = min(triton.next_power_of_2(chunk_size), 256)
        block_s = max(2048 // block_t, 1)
        seg_len = chunk_size
    block_s = min(block_s, triton.next_power_of_2(S))
    lens = lengths.reshape(R).contiguous() if lengths is not None else out  # read with unit stride
    grid = (R, triton.cdiv(S, block_s))
    _segment_reduce_kernel[grid](
        x, sp, lens, out, N, S, seg_len,
        x.stride(0), *sp_strides, out.stride(0),
        HAS_SPANS=spans is not None, HAS_LENGTHS=lengths is not None, REDUCE=_REDUCE_CODE[reduce],
        BLOCK_S=block_s, BLOCK_T=block_t)
    return out


# --------------------------------------------------------------------------------------------------
# Registration and public entry point
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("kvpress_kernels::segment_reduce", mutates_args=())
def _segment_reduce_op(scores: torch.Tensor, spans: Optional[torch.Tensor], chunk_size: int, n_segments: int,
                       reduce: str, lengths: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "triton":
        return _segment_reduce_triton(scores, spans, chunk_size, n_segments, reduce, lengths)
    return segment_reduce_ref(scores, chunk_size=chunk_size if spans is None else None, spans=spans,
                              reduce=reduce, lengths=lengths)


@_segment_reduce_op.register_fake
def _(scores, spans, chunk_size, n_segments, reduce, lengths, backend):
    return scores.new_empty((scores.shape[0], n_segments), dtype=torch.float32)


def _check_segmentation(chunk_size, spans, R: int, N: int, device: torch.device):
    """Shared checks of ``chunk_size`` / ``spans``; returns them (chunk_size as int or None)."""
    if (chunk_size is None) == (spans is None):
        raise ValueError("exactly one of chunk_size and spans must be given "
                         f"(got chunk_size={chunk_size!r}, spans={'None' if spans is None else 'a tensor'})")
    if chunk_size is not None:
        return V.integer("chunk_size", chunk_size, low=1), None
    V.tensor("spans", spans, ndim=(2, 3), dtypes=V.INDEX_DTYPES, device=device)
    if spans.dim() == 2:
        V.shape("spans", spans, [None, 2], "([S, 2] of [start, end))")
    else:
        V.shape("spans", spans, [R, None, 2], "([R, S, 2] of [start, end), R the rows of the scores)")
    if wants_data_checks(spans) and spans.numel():
        st, en = spans[..., 0].long(), spans[..., 1].long()
        if int(st.min()) < 0:
            raise ValueError(f"spans must have start >= 0, got min start {int(st.min())}")
        if int(en.max()) > N:
            raise ValueError(f"spans must have end <= N = {N}, got max end {int(en.max())}")
        if bool((en < st).any()):
            bad = (en < st).nonzero()[0].tolist()
            raise ValueError(f"spans must have start <= end, got a span with end < start at index {bad}")
        if spans.shape[-2] > 1 and bool((en[..., :-1] > st[..., 1:]).any()):
            bad = (en[..., :-1] > st[..., 1:]).nonzero()[0].tolist()
            raise ValueError(f"spans must be sorted and non-overlapping (end[s] <= start[s+1]), "
                             f"got an overlap after index {bad}")
    return None, spans


def segment_reduce(scores: torch.Tensor, *, chunk_size: Optional[int] = None, spans: Optional[torch.Tensor] = None,
                   reduce: str = "mean", lengths: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Reduce token scores over segments (fixed-length chunks or arbitrary spans).

    ``out[r, s] = reduce_{j in seg_s ∩ [0, lengths[r])} scores[r, j]`` with ``reduce`` one of
    ``sum`` (``Σ x_j``, 0 when empty), ``mean`` (``Σ x_j / n_s``, 0 when empty) or ``max`` (-inf when
    empty); NaN propagates. Accumulation in fp32.

    Parameters
    ----------
    scores : Tensor ``[R, N]``, float32/float16/bfloat16
        Token scores, one row per (seq, head) or (seq, layer). Any row stride; the last dimension
        is made contiguous if it is not.
    chunk_size : int, optional
        Segment ``s = [s·c, min((s+1)·c, N))``, ``S = ceil(N / c)``. Exactly one of ``chunk_size``/``spans``.
    spans : Tensor ``[S, 2]`` or ``[R, S, 2]``, int32/int64, optional
        Half-open ``[start, end)`` per segment, ``0 <= start <= end <= N``, sorted and
        non-overlapping (checked where data checks run: always on CPU, on CUDA with
        ``KVPRESS_KERNELS_DEBUG=1``). ``[S, 2]`` is shared by every row.
    reduce : {"sum", "mean", "max"}
    lengths : Tensor ``[R]``, int32/int64, optional
        Valid tokens per row, ``0 <= lengths <= N`` (default ``N``); segments are clipped to it.
    backend : {"reference", "triton"}, optional
        Force an implementation (see :mod:`kvpress_kernels._backend`).

    Returns
    -------
    Tensor ``[R, S]``, float32.
    """
    V.tensor("scores", scores, ndim=2, dtypes=V.FLOAT_DTYPES)
    dev = scores.device
    R, N = scores.shape
    V.choice("reduce", reduce, REDUCTIONS)
    chunk_size, spans = _check_segmentation(chunk_size, spans, R, N, dev)
    if lengths is not None:
        V.tensor("lengths", lengths, ndim=1, dtypes=V.INDEX_DTYPES, device=dev)
        V.shape("lengths", lengths, [R], "(one per row of scores)")
        if wants_data_checks(lengths) and R and (int(lengths.min()) < 0 or int(lengths.max()) > N):
            raise ValueError(f"lengths must be in [0, N={N}], got min {int(lengths.min())}, max {int(lengths.max())}")
    S = -(-N // chunk_size) if spans is None else spans.shape[-2]
    b = resolve_backend("segment_reduce", backend, dev, has=("reference", "triton"))
    return torch.ops.kvpress_kernels.segment_reduce(scores, spans, chunk_size or 0, S, reduce, lengths, b)


__all__ = ["segment_reduce", "segment_reduce_ref", "segments_to_token_mask", "REDUCTIONS"]
