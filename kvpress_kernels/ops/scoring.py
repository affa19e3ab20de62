"""Attention-mass scoring (DESIGN.md §5.1): how much attention each cached key receives.

For queries ``q: [B, Hq, W, D]`` and keys ``k: [B, Hkv, N, D]`` (GQA: query head ``h`` reads kv head
``h // G``, ``G = Hq // Hkv``, transformers' ``repeat_kv`` convention), query ``w`` of a row whose
cache holds ``L`` keys sits at position ``L - W + w`` (the W queries are the *last* W tokens), and

    p[b, h, w, j] = softmax_j(scale * q[b, h, w] . k[b, h // G, j])   over the keys it sees,
    m[b, h, j]    = sum_w p[b, h, w, j]                                  (the attention mass),
    or, with ``query_reduce="max"``, m[b, h, j] = max_w p[b, h, w, j]   (KVzip's reconstruction score).

``causal=True``: query ``w`` sees keys ``j <= L - W + w``; ``causal=False``: all keys ``j < L``. The
SnapKV observation window (W last prompt queries) and H2O's accumulated attention (W = N, every
prompt query, causal) are therefore the same op. Then, in this order: a head reduction
(``head_reduce``: ``none`` / ``group_{sum,mean,max}`` over the G query heads of each kv head /
``all_{sum,mean,max}`` over every query head) and a 1-D pooling along the keys (avg / max, centred
odd window, zero padding, :func:`pool_scores`).

Log-sum-exp convention: every ``lse`` here (argument or result) is the NATURAL-log log-sum-exp of
the scaled, masked logits, ``lse[b, h, w] = log sum_j exp(scale * q.k_j)``. Flash-attention's
``softmax_lse`` is natural log too; a base-2 LSE (Triton tutorial kernels) must be multiplied by
``ln 2`` first. Inside the Triton kernels we work in base 2 (``exp2`` is the fast instruction) and
convert at the boundary.

Implementations
---------------
``reference`` (:func:`attention_mass_ref`): plain PyTorch, fp32, processes the W queries in chunks
sized so that no temporary exceeds ``_REF_CHUNK_ELEMS`` fp32 values: H2O-style all-queries scoring
never materialises ``[W * Hq, N]``.

``triton``: two passes, never materialising ``[W * G, N]``:

1. ``_lse_partial_kernel``: row log-sum-exp with an online max/sum over key tiles. The rows of one
   program are the G*W queries of one kv-head group (so a K tile is read once for all of them) and
   the keys are split into ``num_splits`` ranges (flash-decoding style) so that short, wide problems
   still fill the GPU; the partial LSEs ``[B*Hkv, splits, G*W]`` are merged with one
   ``torch.logsumexp`` (a tensor of ``splits * G * W`` floats per head, negligible traffic).
   Skipped when the caller passes ``lse`` (e.g. from the prefill attention call).
2. ``_mass_kernel``: K-tile-stationary. A program owns one kv head and one tile of ``BLOCK_N``
   keys, loads that tile once, then loops over the G query heads of the group and, for each, over
   its W queries in blocks of ``BLOCK_M`` (``tl.dot`` with fp32 accumulation), recomputing
   ``exp(scale*q.k - lse)`` under the causal/length mask and summing over the queries. Per-head sums
   are kept one head at a time, which is what ``none`` (store each head) and ``group_max`` (running
   max) need; the sum/mean reductions just add them. Under the causal mask a tile skips the query
   rows that precede it, so H2O (W = N) does half the work and needs O(N) extra memory (the output).
   ``query_reduce="max"`` (a ``QUERY_MAX`` compile-time flag) keeps a running max over the query blocks
   instead of the sum; everything else (LSE pass, masks, head reductions, pooling) is shared.

   ``all_*`` reductions: the kernel writes the per-kv-head group sum (or group max) ``[B, Hkv, N]``
   and a torch ``sum``/``amax`` over the kv heads finishes it. Atomics across kv heads would save
   that small pass (4 bytes per key per kv head, against ``2 * D`` bytes per key of K read by the
   kernel) but make the sum order, hence the bits, nondeterministic.

Pooling is a separate light kernel (``_pool_kernel``) over the fp32 scores, not fused into pass 2:
a centred window needs a halo of ``pool_size // 2`` keys from the neighbouring tiles, which are
owned by other programs, and Triton has no register shifts along a tile to build the window from
one's own tile. The separate pass reads and writes 4 bytes per key per output row, against the
``2 * D`` bytes per key (256 at D = 128 in bf16) of K that pass 2 reads, so it costs a few percent.

Paged variant (:func:`attention_mass_paged`): keys come from ``k_pages: [num_pages, page_size, D]``
through ``page_table: [B, Hkv, max_pages]`` with per-row ``lengths: [B, Hkv]`` (DESIGN.md §4);
slot ``j`` of row ``(b, h)`` is ``page_table[b, h, j // page_size]`` at offset ``j % page_size``.
The same two kernels read K through the table (a ``PAGED`` compile-time flag).

Key norms (:func:`token_norm`, the KNorm scorer) are a plain PyTorch reduction (reference only):
one memory-bound ``vector_norm`` is already at bandwidth and needs no kernel of ours.
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

HEAD_REDUCES = ("none", "group_sum", "group_mean", "group_max", "all_sum", "all_mean", "all_max")
POOLS = ("avg", "max")
#: How the W queries' probabilities of one key combine: ``sum`` (the attention mass, SnapKV/H2O) or ``max``
#: (the most attention any query gives the key: KVzip's reconstruction score).
QUERY_REDUCES = ("sum", "max")

# Largest fp32 temporary (logits of one chunk of queries) the reference builds, in elements (16 MiB).
_REF_CHUNK_ELEMS = 1 << 22
# With a given LSE the reference also tiles the keys: logit tiles of about this many elements (1 MiB)
# stay in a core's L2 through matmul, exp and sum (at 4k tokens: 1.3x -> ~1.0x one causal SDPA, CPU).
_REF_TILE_ELEMS = 1 << 18

# Launch-configuration overrides, for tests that want several tiles / splits on tiny inputs.
# Keys: "block_n", "block_m", "split_n", and "native_dot" (True: fp16/bf16 operands go to tl.dot as on a
# GPU, even in the interpreter, where fp16 is computed correctly; only bf16 is not).
_OVERRIDES: dict = {}

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------
# Reference (plain PyTorch, any device, fp32)
# ---------------------------------------------------------------------------------------------

def _default_scale(scale: Optional[float], d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def _dense_row_lengths(lengths: Optional[torch.Tensor], b: int, hkv: int, n: int, device) -> torch.Tensor:
    """Lengths per (sequence, kv head) ``[B, Hkv]``, int64 (a broadcast view where possible)."""
    if lengths is None:
        return torch.full((b, hkv), n, dtype=torch.int64, device=device)
    return lengths.to(torch.int64).reshape(b, 1).expand(b, hkv)


def _ref_chunk_rows(rows: int, W: int, N: int, causal: bool) -> int:
    """Queries per chunk of :func:`_mass_rows_ref`: as many as fit ``_REF_CHUNK_ELEMS`` logits of the
    ``rows = B * Hq`` heads; causal, also at most ``ceil(W / 16)`` (but at least 32), because a chunk
    computes every logit up to its last query's key, so few large chunks redo up to half the triangle
    (3 chunks at 1k tokens: 1.4x the causal work, 2.2x the time of one causal SDPA; 16 chunks: 1.2x)."""
    c = max(1, min(W, _REF_CHUNK_ELEMS // max(1, rows * N)))
    if causal:
        c = min(c, max(32, -(-W // 16)))
    return c


def _mass_rows_ref(q: torch.Tensor, kd: torch.Tensor, lens: torch.Tensor, scale: float,
                   lse: Optional[torch.Tensor], causal: bool, want_mass: bool):
    """Core of the reference. ``kd: [B, Hkv, N, D]`` dense keys, ``lens: [B, Hkv]`` int64.

    Returns ``(mass [B, Hq, N] fp32 or None, lse [B, Hq, W] fp32)``. The W queries are processed in
    chunks of ``c`` whose logits ``[B, Hkv, G*c, n_vis]`` fill one preallocated buffer of at most
    ``_REF_CHUNK_ELEMS`` fp32 values, so H2O-style all-queries scoring (W = N) never builds
    ``[W * Hq, N]`` and its extra memory is that buffer. Under the causal mask a chunk of early queries
    reads only the keys before it (``n_vis``): half the work at W = N.

    Per chunk the buffer receives ``scale * q.k - m`` straight from one ``baddbmm`` (matmul and shift
    fused), is exponentiated in place, and the mass is the row-weighted sum ``(1 / l) @ exp(...)``, one
    more matrix product (``l`` the row sums): no normalised copy, no separate max and subtraction
    passes. The per-row shift ``m`` is not the row max but the larger of two logits every query sees,
    key 0 (the attention sink) and its own (last visible) key: ``m <= max``, so ``l >= 1`` never
    underflows, and a rounded ``logit - m`` is as accurate as the logit itself. A chunk where some row's
    max exceeds ``m`` by so much that ``l > 1e6`` (an outlier key), or that meets a NaN / inf, or a given
    NaN / +inf ``lse``, is recomputed the plain way (:func:`_mass_chunk_exact`, row max + logsumexp, with
    the NaN rules), so ``exp`` never overflows and never works on large arguments. ``lse = m + log l``. A given ``lse``
    is the shift itself (``exp(logit - lse)`` is the probability); then no row sum is needed before a
    probability is known, so the keys are tiled too (``_REF_TILE_ELEMS`` logits per tile, cache-resident)
    and each tile's probabilities are summed over its queries straight away.
    """
    B, Hq, W, D = q.shape
    Hkv, N = kd.shape[1], kd.shape[2]
    G = Hq // Hkv
    dev = q.device
    kf = kd.float()
    mass = torch.zeros(B, Hkv, G, N, dtype=torch.float32, device=dev) if want_mass else None
    lse_out = None if (want_mass and lse is not None) else torch.empty(B, Hkv, G, W, dtype=torch.float32, device=dev)
    lse_in = lse.float().reshape(B, Hkv, G, W) if lse is not None else None
    if W == 0 or N == 0 or B * Hq == 0:
        if lse_out is not None:
            lse_out.fill_(float("-inf"))
        return (mass.view(B, Hq, N) if want_mass else None), (None if lse_out is None else lse_out.view(B, Hq, W))
    # On CPU the lengths are read on the host (free there) to skip keys nobody sees and, when every
    # row is full (lengths == N), to mask only the causal triangle instead of building a mask per chunk.
    host = dev.type == "cpu" and not torch.compiler.is_compiling()
    l_min, l_max = (int(lens.min()), int(lens.max())) if host else (0, N)
    uniform = host and l_min == l_max
    j = torch.arange(N, device=dev)
    valid_key = j.view(1, 1, N) < lens.view(B, Hkv, 1)                                  # [B, Hkv, N]
    c = _ref_chunk_rows(B * Hq, W, N, causal)
    # given an LSE, a query's probabilities need no row sum first: tiles of ck keys, in cache
    ck = N if lse_in is None else max(32, _REF_TILE_ELEMS // max(1, B * Hq * c))
    buf = torch.empty(B * Hq * c * min(N, ck), dtype=torch.float32, device=dev)
    for w0 in range(0, W, c):
        w1 = min(W, w0 + c)
        cw = w1 - w0
        # key j may be seen by a query of this chunk only if j < lens and (causal) j <= lens - W + w1 - 1
        n_vis = max(0, min(N, l_max - W + w1) if causal else l_max)
        qc = q[:, :, w0:w1].float().mul(scale).reshape(B, Hkv, G, cw, D)
        # the query's last visible key: position lens - W + w (causal) or lens - 1
        last = (lens.view(B, Hkv, 1) - W + torch.arange(w0, w1, device=dev).view(1, 1, cw) if causal
                else (lens.view(B, Hkv, 1) - 1).expand(B, Hkv, cw))
        seen_none = last < 0                                                            # [B, Hkv, cw]
        if lse_in is not None:
            use = lse_in[..., w0:w1]
            if bool(((use != use) | (use == float("inf"))).any()):                     # NaN / +inf lse: rare
                _mass_chunk_exact(q, kf, lens, scale, lse_in, causal, w0, w1, mass, lse_out)
                continue
            shift = torch.where(torch.isfinite(use), use, torch.zeros((), device=dev))  # -inf: sees nothing
        else:
            # logits with key 0 and with the last visible key: both seen by the query, both <= its max
            k_last = kf.gather(2, last.clamp(0, N - 1).unsqueeze(-1).expand(B, Hkv, cw, D))   # [B, Hkv, cw, D]
            lb = torch.maximum((qc * k_last.unsqueeze(2)).sum(-1), (qc * kf[:, :, :1].unsqueeze(2)).sum(-1))
            shift = lb.masked_fill_(seen_none.unsqueeze(2), 0.0)                             # [B, Hkv, G, cw]
        def logits(sh, j0, j1):
            """``scale * q.k - sh`` of keys ``[j0, j1)`` into the buffer, -inf where not seen."""
            nk = j1 - j0
            s = buf[: B * Hkv * G * cw * nk].view(B, Hkv, G, cw, nk)
            torch.baddbmm(sh.neg().reshape(B * Hkv, G * cw, 1), qc.reshape(B * Hkv, G * cw, D),
                          kf[:, :, j0:j1].reshape(B * Hkv, nk, D).transpose(1, 2),
                          out=s.view(B * Hkv, G * cw, nk))
            jv = j[j0:j1]
            if uniform:
                # every row holds L = l_max keys: query w (position L - W + w) sees j <= L - W + w
                first = max(j0, l_max - W + w0 + 1) if causal else j1
                if first < j1:
                    pos = l_max - W + torch.arange(w0, w1, device=dev)
                    s[..., first - j0:].masked_fill_(jv[first - j0:].view(1, -1) > pos.view(-1, 1), float("-inf"))
            else:
                vis = valid_key[..., j0:j1].unsqueeze(2)                                # [B, Hkv, 1, nk]
                if causal:
                    vis = vis & (jv.view(1, 1, 1, nk) <= last.unsqueeze(-1))           # [B, Hkv, cw, nk]
                s.masked_fill_(~vis.unsqueeze(2), float("-inf"))
            return s

        if lse_in is not None:
            for j0 in range(0, n_vis, ck):
                j1 = min(n_vis, j0 + ck)
                mass[..., j0:j1] += logits(shift, j0, j1).exp_().sum(dim=3)
            continue
        s = logits(shift, 0, n_vis)
        s.exp_()
        l = s.sum(dim=-1)                                                               # [B, Hkv, G, cw]
        off = ~((l > 0) & (l <= 1e6)) & ~seen_none.unsqueeze(2)                         # nan included
        if bool(off.any()):
            # rare (a far-off max, NaN or inf): the chunk again, exactly, with the NaN rules below
            _mass_chunk_exact(q, kf, lens, scale, None, causal, w0, w1, mass, lse_out)
            continue
        lse_out[..., w0:w1] = shift + l.log()                                           # log 0 = -inf: sees no key
        if want_mass:
            r = l.reciprocal_().masked_fill_(seen_none.unsqueeze(2), 0.0)               # 1/0 -> 0: contributes nothing
            mass[..., :n_vis] += torch.matmul(r.unsqueeze(-2), s).squeeze(-2)
    return (mass.view(B, Hq, N) if want_mass else None), (None if lse_out is None else lse_out.view(B, Hq, W))


def _mass_chunk_exact(q, kf, lens, scale, lse_in, causal, w0, w1, mass, lse_out):
    """Queries ``[w0, w1)`` of :func:`_mass_rows_ref`, the plain way (row max, logsumexp), with the
    documented NaN rules (docs/RELIABILITY.md) the kernels follow: a query that sees a NaN or +inf logit
    has no defined softmax, so its LSE is NaN and it puts NaN mass on every key it sees (and only those);
    a query that sees no key has LSE ``-inf`` and adds nothing. Adds into ``mass [B, Hkv, G, N]`` (when
    given) and writes ``lse_out[..., w0:w1]`` (when given)."""
    B, Hq, W, D = q.shape
    Hkv, N = kf.shape[1], kf.shape[2]
    G = Hq // Hkv
    dev = q.device
    j = torch.arange(N, device=dev)
    qc = q[:, :, w0:w1].float().reshape(B, Hkv, G * (w1 - w0), D)
    logits = torch.matmul(qc, kf.transpose(-1, -2)).mul_(scale).view(B, Hkv, G, w1 - w0, N)
    vis = j.view(1, 1, 1, N) < lens.view(B, Hkv, 1, 1)                            # [B, Hkv, 1, N]
    if causal:
        pos = lens.view(B, Hkv, 1) - W + torch.arange(w0, w1, device=dev).view(1, 1, -1)  # [B, Hkv, c]
        vis = vis & (j.view(1, 1, 1, N) <= pos.unsqueeze(-1))                    # [B, Hkv, c, N]
    vis = vis.unsqueeze(2)                                                        # [B, Hkv, 1, c|1, N]
    logits.masked_fill_(~vis, float("-inf"))
    row_lse = torch.logsumexp(logits, dim=-1)                                     # [B, Hkv, G, c]
    # logsumexp alone would say +inf for a visible +inf logit: the softmax is undefined (inf - inf)
    row_lse = row_lse.masked_fill(row_lse == float("inf"), float("nan"))
    if lse_out is not None:
        lse_out[..., w0:w1] = row_lse
    if mass is not None:
        use = lse_in[..., w0:w1] if lse_in is not None else row_lse
        use = torch.where(use == float("-inf"), torch.zeros((), device=dev), use)   # sees no key: exp(-inf) = 0
        p = logits.sub_(use.unsqueeze(-1)).exp_()
        p.masked_fill_(~vis, 0.0)                                                 # -inf - NaN is NaN
        mass += p.sum(dim=3)


def _max_rows_ref(q: torch.Tensor, kd: torch.Tensor, lens: torch.Tensor, scale: float,
                  lse: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
    """``query_reduce="max"`` core of the reference: ``[B, Hq, N]`` fp32, per query head and key the max over
    the W queries of ``softmax_j`` (0 where no query sees the key). The LSE comes from the sum core (its
    ``want_mass=False`` pass) unless given; then the queries are processed in chunks whose probabilities
    ``[B, Hkv, G, c, n_vis]`` stay below ``_REF_CHUNK_ELEMS`` fp32 values, so W = N never builds
    ``[W * Hq, N]``. A query with LSE ``-inf`` (it sees no key) is shifted by 0 and contributes 0."""
    B, Hq, W, D = q.shape
    Hkv, N = kd.shape[1], kd.shape[2]
    G = Hq // Hkv
    dev = q.device
    out = torch.zeros(B, Hkv, G, N, dtype=torch.float32, device=dev)
    if W == 0 or N == 0 or B * Hq == 0:
        return out.view(B, Hq, N)
    if lse is None:
        lse = _mass_rows_ref(q, kd, lens, scale, None, causal, want_mass=False)[1]
    shift = lse.float().reshape(B, Hkv, G, W)
    shift = torch.where(shift == float("-inf"), torch.zeros((), device=dev), shift)
    kf = kd.float()
    # as in _mass_rows_ref: on CPU the lengths are read on the host, and when every row is full only the
    # causal triangle (the last W - 1 keys) needs a mask
    host = dev.type == "cpu" and not torch.compiler.is_compiling()
    l_min, l_max = (int(lens.min()), int(lens.max())) if host else (0, N)
    uniform = host and l_min == l_max
    j = torch.arange(N, device=dev)
    valid_key = j.view(1, 1, N) < lens.view(B, Hkv, 1)                                  # [B, Hkv, N]
    c = max(1, min(W, _REF_CHUNK_ELEMS // max(1, B * Hq * N)))
    buf = torch.empty(B * Hq * c * N, dtype=torch.float32, device=dev)
    for w0 in range(0, W, c):
        w1 = min(W, w0 + c)
        cw = w1 - w0
        n_vis = max(0, min(N, l_max - W + w1) if causal else l_max)
        if n_vis == 0:
            continue
        qc = q[:, :, w0:w1].float().mul(scale).reshape(B * Hkv, G * cw, D)
        s = buf[: B * Hq * cw * n_vis].view(B, Hkv, G, cw, n_vis)
        # logits minus the LSE straight from one baddbmm, exponentiated in place: the probabilities
        torch.baddbmm(shift[..., w0:w1].neg().reshape(B * Hkv, G * cw, 1), qc,
                      kf[:, :, :n_vis].reshape(B * Hkv, n_vis, D).transpose(1, 2), out=s.view(B * Hkv, G * cw, n_vis))
        s.exp_()
        if uniform:
            first = max(0, l_max - W + w0 + 1) if causal else n_vis
            if first < n_vis:
                pos = l_max - W + torch.arange(w0, w1, device=dev)
                s[..., first:].masked_fill_(j[first:n_vis].view(1, -1) > pos.view(-1, 1), 0.0)
        else:
            vis = valid_key[..., :n_vis].unsqueeze(2)                                   # [B, Hkv, 1, n_vis]
            if causal:
                last = lens.view(B, Hkv, 1) - W + torch.arange(w0, w1, device=dev).view(1, 1, cw)
                vis = vis & (j[:n_vis].view(1, 1, 1, n_vis) <= last.unsqueeze(-1))      # [B, Hkv, cw, n_vis]
            s.masked_fill_(~vis.unsqueeze(2), 0.0)
        torch.maximum(out[..., :n_vis], s.amax(dim=3), out=out[..., :n_vis])
    return out.view(B, Hq, N)


def _rows_ref(q, kd, lens, scale, lse, causal, query_reduce: str) -> torch.Tensor:
    """Per-query-head scores ``[B, Hq, N]`` of the reference: the summed mass or the max probability."""
    if query_reduce == "max":
        return _max_rows_ref(q, kd, lens, scale, lse, causal)
    return _mass_rows_ref(q, kd, lens, scale, lse, causal, want_mass=True)[0]


def _gather_pages(k_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Dense copy ``[B, Hkv, max_len, D]`` of the paged keys (slots beyond a row's length read page 0)."""
    ps = k_pages.shape[1]
    B, Hkv = page_table.shape[0], page_table.shape[1]
    if k_pages.shape[0] == 0:  # no pages: every row is empty
        return k_pages.new_zeros(B, Hkv, max_len, k_pages.shape[2])
    j = torch.arange(max_len, device=k_pages.device)
    pages = page_table.long()[:, :, j // ps]                                       # [B, Hkv, max_len]
    live = j.view(1, 1, -1) < lengths.long().unsqueeze(-1)
    pages = torch.where(live, pages, torch.zeros_like(pages))
    return k_pages[pages, (j % ps).view(1, 1, -1).expand_as(pages)]


def _pool_lengths(lens: torch.Tensor, head_reduce: str, G: int) -> torch.Tensor:
    """Row lengths of the reduced score tensor: ``[B, Hq]``, ``[B, Hkv]`` or ``[B]``."""
    if head_reduce == "none":
        return lens.repeat_interleave(G, dim=1)
    if head_reduce.startswith("group"):
        return lens
    return lens.amax(dim=1)


def _reduce_heads_ref(mass: torch.Tensor, Hkv: int, head_reduce: str) -> torch.Tensor:
    B, Hq, N = mass.shape
    if head_reduce == "none":
        return mass
    if head_reduce.startswith("group"):
        grouped = mass.view(B, Hkv, Hq // Hkv, N)
        dim = 2
    else:
        grouped, dim = mass, 1
    kind = head_reduce.split("_")[1]
    if kind == "sum":
        return grouped.sum(dim)
    if kind == "mean":
        return grouped.mean(dim)
    return grouped.amax(dim)


def pool_scores(scores: torch.Tensor, pool: Optional[str], pool_size: int, *,
                lengths: Optional[torch.Tensor] = None, pool_end: Optional[int] = None) -> torch.Tensor:
    """Centred 1-D pooling of scores along the last dimension (reference implementation, any device).

    ``end`` of a row is ``min(pool_end, lengths[row])`` (each argument optional; default the full
    length). For positions ``j < end``, with ``k = pool_size`` (odd) and offsets
    ``o in [-k//2, k//2]``:

    - ``"avg"``: ``out[j] = (1/k) * sum_o s[j+o]``, positions outside ``[0, end)`` counting as 0
      (``F.avg_pool1d(kernel_size=k, padding=k//2, stride=1, count_include_pad=True)`` applied to
      the first ``end`` scores, as kvpress's SnapKV does);
    - ``"max"``: ``out[j] = max_o s[j+o]`` over the offsets that land inside ``[0, end)``.

    Positions ``end <= j < lengths[row]`` keep their unpooled value; positions ``j >= lengths[row]``
    are 0. ``pool=None`` or ``pool_size=1`` pools nothing (but still zeroes beyond ``lengths``).

    Parameters
    ----------
    scores : Tensor ``[..., N]``, floating point
    pool : {"avg", "max"} or None
    pool_size : int, odd, >= 1
    lengths : Tensor, int, optional
        Valid length of each row; its shape is a prefix of ``scores.shape[:-1]`` (e.g. ``[B]`` for
        scores ``[B, H, N]``) and is broadcast over the remaining leading dims.
    pool_end : int, optional
        Pool only the first ``pool_end`` positions of every row (SnapKV's ``N - W``).

    Returns
    -------
    Tensor, same shape as ``scores``, float32.
    """
    V.tensor("scores", scores, dtypes=V.FLOAT_DTYPES)
    if scores.dim() < 1:
        raise ValueError(f"scores must have at least 1 dimension [..., N], got shape {list(scores.shape)}")
    N = scores.shape[-1]
    pool_size = _check_pool(pool, pool_size, pool_end, N)
    if lengths is not None:
        V.tensor("lengths", lengths, dtypes=V.INDEX_DTYPES, device=scores.device)
        if tuple(lengths.shape) != tuple(scores.shape[:lengths.dim()]) or lengths.dim() >= scores.dim():
            raise ValueError(f"lengths must have a shape that is a prefix of scores.shape[:-1] = "
                             f"{list(scores.shape[:-1])}, got {list(lengths.shape)}")
        if wants_data_checks(lengths) and lengths.numel() and (
                int(lengths.min()) < 0 or int(lengths.max()) > N):
            raise ValueError(f"lengths must be in [0, {N}] (the last dim of scores), got min "
                             f"{int(lengths.min())}, max {int(lengths.max())}")
    return _pool_ref(scores, pool, pool_size, lengths, pool_end)


def _pool_ref(scores: torch.Tensor, pool: Optional[str], pool_size: int, lengths: Optional[torch.Tensor],
              pool_end: Optional[int]) -> torch.Tensor:
    lead, N = scores.shape[:-1], scores.shape[-1]
    if N == 0 or scores.numel() == 0:
        return scores.float().clone()
    s = scores.float().reshape(-1, N)
    R = s.shape[0]
    dev = s.device
    if lengths is None:
        lens = torch.full((R,), N, dtype=torch.int64, device=dev)
    else:
        extra = scores.dim() - 1 - lengths.dim()
        lens = lengths.long().reshape(list(lengths.shape) + [1] * extra).expand(lead).reshape(R)
    j = torch.arange(N, device=dev).view(1, N)
    in_len = j < lens.view(R, 1)
    if pool is None or pool_size == 1 or R == 0 or N == 0:
        return torch.where(in_len, s, torch.zeros((), device=dev)).view(lead + (N,))
    end = lens if pool_end is None else lens.clamp(max=pool_end)
    in_end = j < end.view(R, 1)
    if pool == "avg":
        src = torch.where(in_end, s, torch.zeros((), device=dev))
        pooled = F.avg_pool1d(src.unsqueeze(1), kernel_size=pool_size, stride=1, padding=pool_size // 2,
                              count_include_pad=True).squeeze(1)
    else:
        src = torch.where(in_end, s, torch.full((), float("-inf"), device=dev))
        pooled = F.max_pool1d(src.unsqueeze(1), kernel_size=pool_size, stride=1, padding=pool_size // 2).squeeze(1)
    out = torch.where(in_end, pooled, s)
    out = torch.where(in_len, out, torch.zeros((), device=dev))
    return out.view(lead + (N,))


def _finish_ref(mass: torch.Tensor, lens: torch.Tensor, Hkv: int, head_reduce: str, pool: Optional[str],
                pool_size: int, pool_end: Optional[int]) -> torch.Tensor:
    G = mass.shape[1] // Hkv
    red = _reduce_heads_ref(mass, Hkv, head_reduce)
    if pool is None or pool_size == 1:
        return red
    return _pool_ref(red, pool, pool_size, _pool_lengths(lens, head_reduce, G), pool_end)


def attention_lse_ref(q: torch.Tensor, k: torch.Tensor, *, lengths: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None, causal: bool = True) -> torch.Tensor:
    """Reference of :func:`attention_lse` (plain PyTorch, fp32, no input checks)."""
    B, Hq, W, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    lens = _dense_row_lengths(lengths, B, Hkv, N, q.device)
    return _mass_rows_ref(q, k, lens, _default_scale(scale, D), None, causal, want_mass=False)[1]


def attention_mass_ref(q: torch.Tensor, k: torch.Tensor, *, lengths: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None, lse: Optional[torch.Tensor] = None, causal: bool = True,
                       head_reduce: str = "group_sum", pool: Optional[str] = None, pool_size: int = 1,
                       pool_end: Optional[int] = None, query_reduce: str = "sum") -> torch.Tensor:
    """Reference of :func:`attention_mass` (plain PyTorch, fp32, no input checks)."""
    B, Hq, W, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    lens = _dense_row_lengths(lengths, B, Hkv, N, q.device)
    mass = _rows_ref(q, k, lens, _default_scale(scale, D), lse, causal, query_reduce)
    return _finish_ref(mass, lens, Hkv, head_reduce, pool, pool_size, pool_end)


def attention_mass_paged_ref(q: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor,
                             lengths: torch.Tensor, *, max_len: int, scale: Optional[float] = None,
                             lse: Optional[torch.Tensor] = None, causal: bool = True,
                             head_reduce: str = "group_sum", pool: Optional[str] = None, pool_size: int = 1,
                             pool_end: Optional[int] = None, query_reduce: str = "sum") -> torch.Tensor:
    """Reference of :func:`attention_mass_paged`: gathers the pages into a dense ``[B, Hkv, max_len, D]``
    copy (O(cache) memory, never O(N^2)) and scores it like the dense reference."""
    kd = _gather_pages(k_pages, page_table, lengths, max_len)
    lens = lengths.long()
    mass = _rows_ref(q, kd, lens, _default_scale(scale, q.shape[-1]), lse, causal, query_reduce)
    return _finish_ref(mass, lens, page_table.shape[1], head_reduce, pool, pool_size, pool_end)


def token_norm(x: torch.Tensor, *, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L2 norm of every token vector, ``out[b, h, n] = ||x[b, h, n, :]||_2`` (fp32), 0 beyond lengths.

    The KNorm scorer ranks keys by ``-token_norm(keys)``. Plain PyTorch on every backend: a single
    memory-bound reduction with fp32 accumulation.

    Parameters
    ----------
    x : Tensor ``[B, H, N, D]``, float32/float16/bfloat16
    lengths : Tensor ``[B]`` or ``[B, H]``, int, optional
        Valid tokens per sequence (or per row); positions ``n >= lengths`` give 0.

    Returns
    -------
    Tensor ``[B, H, N]``, float32.
    """
    V.tensor("x", x, ndim=4, dtypes=V.FLOAT_DTYPES)
    B, H, N, _ = x.shape
    out = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    if lengths is None:
        return out
    V.tensor("lengths", lengths, ndim=(1, 2), dtypes=V.INDEX_DTYPES, device=x.device)
    V.shape("lengths", lengths, [B] if lengths.dim() == 1 else [B, H], "([B] or [B, H])")
    if wants_data_checks(lengths) and lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > N):
        raise ValueError(f"lengths must be in [0, {N}], got min {int(lengths.min())}, max {int(lengths.max())}")
    lens = lengths.long().reshape(B, lengths.shape[1] if lengths.dim() == 2 else 1, 1)  # no -1: B may be 0
    live = torch.arange(N, device=x.device).view(1, 1, N) < lens
    return torch.where(live, out, torch.zeros((), device=x.device))


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_k_tile(k_ptr, table, b, h, j, d, jmask, dmask, sk_0, sk_1, sk_n, st_b, st_h, st_p,
                     PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
        # Dense: k[b, h, j, d] with strides (sk_0, sk_1, sk_n). Paged: k_pages[page, slot, d] with
        # strides (sk_0, -, sk_n), page = page_table[b, h, j // PAGE_SIZE]. Masked slots load 0 and
        # never touch the table, so stale entries past a row's length are never dereferenced.
        jj = j.to(tl.int64)
        if PAGED:
            page = tl.load(table + b * st_b + h * st_h + (jj // PAGE_SIZE) * st_p, mask=jmask, other=0)
            base = page.to(tl.int64) * sk_0 + (jj % PAGE_SIZE) * sk_n
        else:
            base = b * sk_0 + h * sk_1 + jj * sk_n
        return tl.load(k_ptr + base[:, None] + d[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0)

    @triton.jit
    def _lse_partial_kernel(q, k_ptr, table, lengths, part,
                            sq_b, sq_h, sq_w, sk_0, sk_1, sk_n, st_b, st_h, st_p, sl_b, sl_h,
                            Hkv, G, W, D, split_n, num_splits, scale_log2,
                            PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr,
                            UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (row block, key split, b*Hkv + h). Rows are the G*W queries of one kv-head group,
        # flattened r = g*W + w, so one K tile serves every query head of the group.
        rb = tl.program_id(0)
        sp = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        b = bh // Hkv
        h = bh % Hkv
        length = tl.load(lengths + b * sl_b + h * sl_h).to(tl.int32)
        r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = r < G * W
        g = r // W
        w = r % W
        pos = length - W + w
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q_off = b * sq_b + (h * G + g).to(tl.int64) * sq_h + w.to(tl.int64) * sq_w
        qb = tl.load(q + q_off[:, None] + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            qb = qb.to(tl.float32)
        j_lo = sp * split_n
        j_hi = tl.minimum(j_lo + split_n, length)
        if CAUSAL:
            j_hi = tl.minimum(j_hi, tl.max(tl.where(rmask, pos, -1), axis=0) + 1)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for j0 in range(j_lo, j_hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            jmask = j < j_hi
            kt = _load_k_tile(k_ptr, table, b, h, j, d, jmask, dmask, sk_0, sk_1, sk_n, st_b, st_h, st_p,
                              PAGED, PAGE_SIZE)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(qb, tl.trans(kt), input_precision=DOT_PREC) * scale_log2
            vis = rmask[:, None] & jmask[None, :]
            if CAUSAL:
                vis = vis & (j[None, :] <= pos[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # Rows with nothing visible yet keep m = -inf; shift by 0 instead so no (-inf) - (-inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            m_i = m_new
        # Natural-log partial LSE of this split; -inf where the split held no visible key. A NaN l_i (a
        # NaN or +inf logit: inf - inf) must stay NaN, as in the reference, so the test is != 0, not > 0.
        out = tl.where(l_i != 0, (m_i + tl.log2(tl.where(l_i != 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(part + (bh * num_splits + sp) * (G * W) + r, out, mask=rmask)

    @triton.jit
    def _mass_kernel(q, k_ptr, table, lengths, lse, out,
                     sq_b, sq_h, sq_w, sk_0, sk_1, sk_n, st_b, st_h, st_p, sl_b, sl_h,
                     se_b, se_h, se_w, so_b, so_h,
                     Hkv, G, W, D, n_out, scale_log2, out_scale,
                     PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr,
                     REDUCE: tl.constexpr, QUERY_MAX: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (key tile, b*Hkv + h): K tile stationary, loop over the group's query rows.
        # REDUCE: 0 = per query head (store each), 1 = sum over the group, 2 = max over the group.
        # QUERY_MAX: each head's score is the max over its queries (KVzip) instead of their sum; the
        # probabilities are >= 0 and masked ones are 0, so a zero start is the identity of that max.
        t = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // Hkv
        h = bh % Hkv
        length = tl.load(lengths + b * sl_b + h * sl_h).to(tl.int32)
        tile_start = t * BLOCK_N
        j = tile_start + tl.arange(0, BLOCK_N)
        jmask = j < n_out
        kmask = j < length
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        kt = _load_k_tile(k_ptr, table, b, h, j, d, kmask, dmask, sk_0, sk_1, sk_n, st_b, st_h, st_p,
                          PAGED, PAGE_SIZE)
        if UPCAST:
            kt = kt.to(tl.float32)
        ktt = tl.trans(kt)
        # A tile past the row's end has no visible key: empty query loop, zeros stored.
        w_end = tl.where(tile_start < length, W, 0)
        w_start = 0
        if CAUSAL:
            # Query w sits at length - W + w and sees j <= that: rows before the tile see none of it.
            w_start = tl.maximum(tile_start - length + W, 0)
        acc = tl.zeros([BLOCK_N], tl.float32)
        o_base = out + b * so_b + j
        for g in range(G):
            hq = h * G + g
            acc_g = tl.zeros([BLOCK_N], tl.float32)
            for w0 in range(w_start, w_end, BLOCK_M):
                w = w0 + tl.arange(0, BLOCK_M)
                wmask = w < W
                q_off = b * sq_b + hq * sq_h + w.to(tl.int64) * sq_w
                qb = tl.load(q + q_off[:, None] + d[None, :], mask=wmask[:, None] & dmask[None, :], other=0.0)
                if UPCAST:
                    qb = qb.to(tl.float32)
                row_lse = tl.load(lse + b * se_b + hq * se_h + w.to(tl.int64) * se_w, mask=wmask, other=0.0)
                s = tl.dot(qb, ktt, input_precision=DOT_PREC) * scale_log2
                vis = wmask[:, None] & kmask[None, :]
                if CAUSAL:
                    vis = vis & (j[None, :] <= (length - W + w)[:, None])
                p = tl.where(vis, tl.exp2(s - (row_lse * 1.4426950408889634)[:, None]), 0.0)
                if QUERY_MAX:
                    acc_g = tl.maximum(acc_g, tl.max(p, axis=0))
                else:
                    acc_g += tl.sum(p, axis=0)
            if REDUCE == 0:
                tl.store(o_base + hq * so_h, acc_g * out_scale, mask=jmask)
            elif REDUCE == 1:
                acc += acc_g
            else:
                acc = tl.maximum(acc, acc_g, propagate_nan=tl.PropagateNan.ALL)  # NaN like torch.amax
        if REDUCE != 0:
            tl.store(o_base + h * so_h, acc * out_scale, mask=jmask)

    @triton.jit
    def _pool_kernel(src, dst, lengths, n, pool_end, pool_size,
                     IS_MAX: tl.constexpr, HAS_END: tl.constexpr, BLOCK: tl.constexpr):
        # One program per (block of positions, row) of a contiguous [R, n] fp32 score tensor. The
        # window's neighbours are re-read from global memory (L1/L2-resident): no halo bookkeeping.
        row = tl.program_id(1).to(tl.int64)
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        jmask = j < n
        length = tl.load(lengths + row).to(tl.int32)
        end = length
        if HAS_END:
            end = tl.minimum(end, pool_end)
        half = pool_size // 2
        base = src + row * n
        if IS_MAX:
            acc = tl.full([BLOCK], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK], tl.float32)
        for o in range(0, pool_size):
            idx = j + o - half
            m = (idx >= 0) & (idx < end) & jmask
            if IS_MAX:
                acc = tl.maximum(acc, tl.load(base + idx, mask=m, other=float("-inf")),
                                 propagate_nan=tl.PropagateNan.ALL)  # NaN like F.max_pool1d
            else:
                acc += tl.load(base + idx, mask=m, other=0.0)
        if not IS_MAX:
            acc = acc / pool_size
        orig = tl.load(base + j, mask=jmask, other=0.0)
        res = tl.where(j < end, acc, orig)
        res = tl.where(j < length, res, 0.0)
        tl.store(dst + row * n + j, res, mask=jmask)


def _blocks(q: torch.Tensor, W: int, G: int, D: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M for pass 2, BLOCK_M for pass 1, BLOCK_N, BLOCK_D, num_warps). tl.dot needs every dim >= 16."""
    block_d = max(16, triton.next_power_of_2(D))
    if gpu_tiles(q.device) and q.dtype == torch.float32:
        # fp32 runs the IEEE dot on the FMA units, whose operand layouts replicate each tile across
        # threads: the compile check found 5-13 KB of spills at 64 x 32 (D = 128) and, on sm_90, still
        # some in pass 1 at 16 x 32; 16 x 16 tiles compile without spills up to D = 256.
        cap_m, block_n = 16, 16
    elif gpu_tiles(q.device):
        # A 64-key tile of 128 fp16 dims is 16 KiB of registers per program; halve it for wider rows
        # (D > 128) so tiles + logits stay in registers without spilling.
        cap_m, block_n = 64, (64 if D * q.element_size() <= 256 else 32)
    else:  # interpreter: small tiles so that awkward sizes span several of them
        cap_m, block_n = 32, 32
    block_m = _OVERRIDES.get("block_m") or max(16, min(cap_m, triton.next_power_of_2(max(W, 1))))
    block_m1 = _OVERRIDES.get("block_m") or max(16, min(cap_m, triton.next_power_of_2(max(G * W, 1))))
    block_n = _OVERRIDES.get("block_n") or block_n
    # fp32: 8 warps (with 4, pass 2 spilled 4-8 bytes in some variants on sm_80 / sm_90, D = 64-256).
    warps = 8 if gpu_tiles(q.device) and q.dtype == torch.float32 else 4
    return block_m, block_m1, block_n, block_d, warps


def _kernel_flags(q: torch.Tensor) -> dict:
    # In the interpreter bf16/fp16 arithmetic is emulated wrongly: compute in fp32 there. On a GPU,
    # fp16/bf16 operands go to tl.dot as they are (products exact in the fp32 accumulator); fp32
    # operands use "ieee" so that TF32 truncation does not perturb the logits.
    native = _OVERRIDES.get("native_dot")  # tests run the GPU's native fp16 dot in the interpreter
    upcast = (not gpu_tiles(q.device) or triton_interpret()) if native is None else not native
    fp32_dot = upcast or q.dtype == torch.float32
    return dict(UPCAST=upcast, DOT_PREC="ieee" if fp32_dot else "tf32")


def _k_args(k: torch.Tensor, page_table: Optional[torch.Tensor]):
    """(k tensor, table, sk_0, sk_1, sk_n, st_b, st_h, st_p, PAGED, PAGE_SIZE)."""
    if page_table is None:
        return (k, k, k.stride(0), k.stride(1), k.stride(2), 0, 0, 0, False, 1)
    return (k, page_table, k.stride(0), 0, k.stride(1),
            page_table.stride(0), page_table.stride(1), page_table.stride(2), True, k.shape[1])


def _lse_triton(q, k, page_table, lens, n_keys: int, scale: float, causal: bool) -> torch.Tensor:
    """Pass 1. ``lens``: ``[B, Hkv]`` (any strides, possibly a broadcast view). Returns ``[B, Hq, W]``."""
    B, Hq, W, D = q.shape
    Hkv = lens.shape[1]
    G = Hq // Hkv
    if B * Hq * W == 0:
        return torch.empty(B, Hq, W, dtype=torch.float32, device=q.device)
    block_m, block_m1, block_n, block_d, num_warps = _blocks(q, W, G, D)
    row_blocks = triton.cdiv(G * W, block_m1)
    n_tiles = max(1, triton.cdiv(n_keys, block_n))
    split_n = _OVERRIDES.get("split_n")
    if split_n is None:
        splits = 1
        if gpu_tiles(q.device):
            # Enough programs for ~4 waves over the SMs, each split at least 4 tiles long.
            want = triton.cdiv(4 * sm_count(q.device), B * Hkv * row_blocks)
            splits = max(1, min(want, triton.cdiv(n_tiles, 4)))
        split_n = triton.cdiv(n_tiles, splits) * block_n
    splits = max(1, triton.cdiv(n_keys, split_n))
    part = torch.empty(B * Hkv, splits, G * W, dtype=torch.float32, device=q.device)
    kk, table, sk_0, sk_1, sk_n, st_b, st_h, st_p, paged, page_size = _k_args(k, page_table)
    _lse_partial_kernel[(row_blocks, splits, B * Hkv)](
        q, kk, table, lens, part,
        q.stride(0), q.stride(1), q.stride(2), sk_0, sk_1, sk_n, st_b, st_h, st_p, lens.stride(0), lens.stride(1),
        Hkv, G, W, D, split_n, splits, scale * _LOG2E,
        PAGED=paged, PAGE_SIZE=page_size, CAUSAL=causal, BLOCK_M=block_m1, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, **_kernel_flags(q))
    lse = part[:, 0] if splits == 1 else torch.logsumexp(part, dim=1)
    return lse.view(B, Hq, W)


def _mass_triton(q, k, page_table, lens, n_out: int, scale: float, lse: Optional[torch.Tensor], causal: bool,
                 head_reduce: str, pool: Optional[str], pool_size: int, pool_end: Optional[int],
                 query_reduce: str = "sum") -> torch.Tensor:
    B, Hq, W, D = q.shape
    Hkv = lens.shape[1]
    G = Hq // Hkv
    dev = q.device
    if lse is None:
        lse = _lse_triton(q, k, page_table, lens, n_out, scale, causal)
    else:
        lse = lse.to(torch.float32)
    # lse = -inf: the row sees no key with a finite logit (none at all, or only -inf logits from an inf
    # in q/k). The reference shifts such rows by 0, so do we: exp(-inf - 0) = 0, where exp(-inf + inf)
    # would be NaN. Rows that see no key at all are masked in the kernel anyway.
    lse = torch.where(lse == float("-inf"), torch.zeros((), device=dev), lse)
    if head_reduce == "none":
        reduce_code, h_out, out_scale = 0, Hq, 1.0
    else:
        reduce_code = 2 if head_reduce.endswith("max") else 1
        h_out = Hkv
        out_scale = 1.0 / G if head_reduce == "group_mean" else 1.0
    out = torch.empty(B, h_out, n_out, dtype=torch.float32, device=dev)
    if out.numel():
        block_m, _, block_n, block_d, num_warps = _blocks(q, W, G, D)
        kk, table, sk_0, sk_1, sk_n, st_b, st_h, st_p, paged, page_size = _k_args(k, page_table)
        _mass_kernel[(triton.cdiv(n_out, block_n), B * Hkv)](
            q, kk, table, lens, lse, out,
            q.stride(0), q.stride(1), q.stride(2), sk_0, sk_1, sk_n, st_b, st_h, st_p,
            lens.stride(0), lens.stride(1), lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0), out.stride(1),
            Hkv, G, W, D, n_out, scale * _LOG2E, out_scale,
            PAGED=paged, PAGE_SIZE=page_size, CAUSAL=causal, REDUCE=reduce_code, QUERY_MAX=query_reduce == "max",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
            # fp32: no software pipelining of the query loads (its buffers spilled 4 B at D = 256, sm_90)
            num_stages=1 if q.dtype == torch.float32 and gpu_tiles(q.device) else 3, **_kernel_flags(q))
    if head_reduce.startswith("all"):
        out = out.amax(dim=1) if head_reduce == "all_max" else out.sum(dim=1)
        if head_reduce == "all_mean":
            out = out / Hq
    if pool is None or pool_size == 1:
        return out
    row_lens = _pool_lengths(lens, head_reduce, G).contiguous()
    return _pool_triton(out, row_lens, pool, pool_size, pool_end)


def _pool_triton(scores: torch.Tensor, row_lens: torch.Tensor, pool: str, pool_size: int,
                 pool_end: Optional[int]) -> torch.Tensor:
    """Pooling pass over contiguous fp32 ``scores [..., n]``; ``row_lens``: ``scores.shape[:-1]``."""
    n = scores.shape[-1]
    src = scores.reshape(-1, n)
    dst = torch.empty_like(src)
    if src.numel():
        # 512 positions over 4 warps: four fp32 per thread, so the stores (and the unshifted load) are
        # 16-byte vectors (128 over 4 warps gave one 4-byte store per thread).
        block, warps = (512, 4) if gpu_tiles(scores.device) else (64, 1)
        _pool_kernel[(triton.cdiv(n, block), src.shape[0])](
            src, dst, row_lens.reshape(-1), n, -1 if pool_end is None else pool_end, pool_size,
            IS_MAX=pool == "max", HAS_END=pool_end is not None, BLOCK=block, num_warps=warps)
    return dst.view(scores.shape)


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------

def _out_shape(B: int, Hq: int, Hkv: int, n: int, head_reduce: str) -> tuple[int, ...]:
    if head_reduce == "none":
        return (B, Hq, n)
    if head_reduce.startswith("group"):
        return (B, Hkv, n)
    return (B, n)


@torch.library.custom_op("kvpress_kernels::attention_lse", mutates_args=())
def _attention_lse_op(q: torch.Tensor, k: torch.Tensor, lengths: Optional[torch.Tensor], scale: float,
                      causal: bool, backend: str) -> torch.Tensor:
    B, Hkv, N = k.shape[0], k.shape[1], k.shape[2]
    if backend == "triton":
        lens = _dense_row_lengths(lengths, B, Hkv, N, q.device)
        return _lse_triton(q, k, None, lens, N, scale, causal)
    return attention_lse_ref(q, k, lengths=lengths, scale=scale, causal=causal)


@_attention_lse_op.register_fake
def _(q, k, lengths, scale, causal, backend):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("kvpress_kernels::attention_mass", mutates_args=())
def _attention_mass_op(q: torch.Tensor, k: torch.Tensor, lengths: Optional[torch.Tensor], scale: float,
                       lse: Optional[torch.Tensor], causal: bool, head_reduce: str, pool: Optional[str],
                       pool_size: int, pool_end: Optional[int], backend: str,
                       query_reduce: str = "sum") -> torch.Tensor:
    B, Hkv, N = k.shape[0], k.shape[1], k.shape[2]
    if backend == "triton":
        lens = _dense_row_lengths(lengths, B, Hkv, N, q.device)
        return _mass_triton(q, k, None, lens, N, scale, lse, causal, head_reduce, pool, pool_size, pool_end,
                            query_reduce)
    return attention_mass_ref(q, k, lengths=lengths, scale=scale, lse=lse, causal=causal, head_reduce=head_reduce,
                              pool=pool, pool_size=pool_size, pool_end=pool_end, query_reduce=query_reduce)


@_attention_mass_op.register_fake
def _(q, k, lengths, scale, lse, causal, head_reduce, pool, pool_size, pool_end, backend, query_reduce="sum"):
    return q.new_empty(_out_shape(q.shape[0], q.shape[1], k.shape[1], k.shape[2], head_reduce), dtype=torch.float32)


@torch.library.custom_op("kvpress_kernels::attention_mass_paged", mutates_args=())
def _attention_mass_paged_op(q: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor,
                             lengths: torch.Tensor, max_len: int, scale: float, lse: Optional[torch.Tensor],
                             causal: bool, head_reduce: str, pool: Optional[str], pool_size: int,
                             pool_end: Optional[int], backend: str, query_reduce: str = "sum") -> torch.Tensor:
    if backend == "triton":
        return _mass_triton(q, k_pages, page_table, lengths, max_len, scale, lse, causal, head_reduce, pool,
                            pool_size, pool_end, query_reduce)
    return attention_mass_paged_ref(q, k_pages, page_table, lengths, max_len=max_len, scale=scale, lse=lse,
                                    causal=causal, head_reduce=head_reduce, pool=pool, pool_size=pool_size,
                                    pool_end=pool_end, query_reduce=query_reduce)


@_attention_mass_paged_op.register_fake
def _(q, k_pages, page_table, lengths, max_len, scale, lse, causal, head_reduce, pool, pool_size, pool_end, backend,
      query_reduce="sum"):
    return q.new_empty(_out_shape(q.shape[0], q.shape[1], page_table.shape[1], max_len, head_reduce),
                       dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Public, validating API
# ---------------------------------------------------------------------------------------------

def _check_pool(pool, pool_size, pool_end, n: int) -> int:
    if pool is not None:
        V.choice("pool", pool, POOLS)
    pool_size = V.integer("pool_size", pool_size, low=1)
    if pool_size % 2 == 0:
        raise ValueError(f"pool_size must be odd (a centred window), got {pool_size}")
    if pool_end is not None:
        V.integer("pool_end", pool_end, low=0, high=n)
    return pool_size


def _check_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _check_q(q) -> None:
    V.tensor("q", q, ndim=4, dtypes=V.FLOAT_DTYPES, last_contiguous=True)
    if q.shape[-1] < 1:
        raise ValueError(f"q must have a head_dim >= 1, got shape {list(q.shape)}")


def _check_common(q, n_keys: int, Hkv: int, lse, head_reduce, pool, pool_size, pool_end, query_reduce="sum"):
    """Checks shared by the dense and paged entry points; returns the validated pool_size."""
    V.choice("query_reduce", query_reduce, QUERY_REDUCES)
    B, Hq, W, D = q.shape
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} query heads, which must be a positive multiple of the {Hkv} kv heads")
    if W > n_keys:
        raise ValueError(f"q holds W={W} queries, more than the {n_keys} keys: the W queries are the last "
                         "W tokens of each sequence, so W <= lengths is required")
    if lse is not None:
        V.tensor("lse", lse, dtypes=V.FLOAT_DTYPES, device=q.device)
        V.shape("lse", lse, [B, Hq, W], "([B, Hq, W], as returned by attention_lse)")
    V.choice("head_reduce", head_reduce, HEAD_REDUCES)
    return _check_pool(pool, pool_size, pool_end, n_keys)


def _check_lengths_values(lengths: torch.Tensor, W: int, n_keys: int, what: str) -> None:
    if wants_data_checks(lengths) and lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < W or hi > n_keys:
            raise ValueError(f"lengths must be in [W={W}, {what}={n_keys}] (the W queries are the last W "
                             f"tokens of each row), got min {lo}, max {hi}")


def _validate_dense(q, k, lengths):
    _check_q(q)
    dev = q.device
    V.tensor("k", k, ndim=4, dtypes=(q.dtype,), device=dev, last_contiguous=True)
    B, Hq, W, D = q.shape
    V.shape("k", k, [B, None, None, D], "([B, Hkv, N, D], batch and head_dim as q)")
    if lengths is not None:
        V.tensor("lengths", lengths, ndim=1, dtypes=V.INDEX_DTYPES, device=dev)
        V.shape("lengths", lengths, [B], "([B])")
        _check_lengths_values(lengths, W, k.shape[2], "N")


def attention_lse(q: torch.Tensor, k: torch.Tensor, *, lengths: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None, causal: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """Natural-log log-sum-exp of each query's scaled, masked attention logits.

    ``lse[b, h, w] = log sum_j exp(scale * q[b, h, w] . k[b, h // G, j])`` over the keys query ``w``
    sees (``j < lengths[b]``, and ``j <= lengths[b] - W + w`` when ``causal``).

    Parameters
    ----------
    q : Tensor ``[B, Hq, W, D]``, float32/float16/bfloat16, unit last stride
    k : Tensor ``[B, Hkv, N, D]``, dtype of q, unit last stride; ``Hq % Hkv == 0``
    lengths : Tensor ``[B]``, int32/int64, optional
        Valid keys per sequence, ``W <= lengths <= N`` (default ``N``).
    scale : float, optional
        Logit scale, default ``1 / sqrt(D)``.
    causal : bool
    backend : {"reference", "triton"}, optional

    Returns
    -------
    Tensor ``[B, Hq, W]``, float32 (natural log).
    """
    _validate_dense(q, k, lengths)
    _check_common(q, k.shape[2], k.shape[1], None, "none", None, 1, None)
    scale = _check_scale(scale, q.shape[-1])
    b = resolve_backend("attention_lse", backend, q.device, has=("reference", "triton"))
    return torch.ops.kvpress_kernels.attention_lse(q, k, lengths, scale, bool(causal), b)


def attention_mass(q: torch.Tensor, k: torch.Tensor, *, lengths: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None, lse: Optional[torch.Tensor] = None, causal: bool = True,
                   head_reduce: str = "group_sum", pool: Optional[str] = None, pool_size: int = 1,
                   pool_end: Optional[int] = None, backend: Optional[str] = None,
                   query_reduce: str = "sum") -> torch.Tensor:
    """Attention mass each key receives from the W queries, head-reduced and pooled.

    ``m[b, h, j] = sum_w softmax_j(scale * q[b, h, w] . k[b, h // G, j])`` with query ``w`` at
    position ``lengths[b] - W + w`` (it sees ``j <= `` that position when ``causal``, and
    ``j < lengths[b]`` always); then ``head_reduce``, then :func:`pool_scores` along the keys.
    ``attention_mass(q, k, head_reduce="group_mean", pool="avg", pool_size=k, pool_end=N - W) / W``
    is kvpress's SnapKV score on the keys before the window.

    ``query_reduce="max"`` replaces the sum over the queries by a max: ``m[b, h, j] = max_w
    softmax_j(...)``, the most attention any of the queries gives key ``j`` (KVzip's score, with the
    reconstruction queries and ``head_reduce="group_max"``); the same two fused passes, no ``[W * G, N]``.

    Parameters
    ----------
    q : Tensor ``[B, Hq, W, D]``, float32/float16/bfloat16, unit last stride
        The scoring queries: SnapKV's observation window, or every prompt query (H2O, W = N).
    k : Tensor ``[B, Hkv, N, D]``, dtype of q, any strides with a unit last stride
    lengths : Tensor ``[B]``, int32/int64, optional
        Valid keys per sequence, ``W <= lengths <= N`` (default ``N``).
    scale : float, optional
        Logit scale, default ``1 / sqrt(D)``.
    lse : Tensor ``[B, Hq, W]``, optional
        Natural-log LSE of the same logits (:func:`attention_lse`, or flash-attention's
        ``softmax_lse``); skips pass 1.
    causal : bool
    head_reduce : {"none", "group_sum", "group_mean", "group_max", "all_sum", "all_mean", "all_max"}
        ``none`` -> ``[B, Hq, N]``; ``group_*`` over the G query heads of each kv head ->
        ``[B, Hkv, N]``; ``all_*`` over all Hq query heads -> ``[B, N]``.
    pool : {"avg", "max"} or None
    pool_size : int, odd
    pool_end : int, optional
        Pool only keys ``[0, pool_end)`` (zero padding at ``pool_end``); later keys keep their
        unpooled value. Default: each row's length.
    backend : {"reference", "triton"}, optional
    query_reduce : {"sum", "max"}
        How the queries' probabilities of a key combine (before ``head_reduce``): their sum (the
        attention mass, default) or their max.

    Returns
    -------
    Tensor, float32, shape set by ``head_reduce``; 0 at keys ``j >= lengths[b]``.
    """
    _validate_dense(q, k, lengths)
    pool_size = _check_common(q, k.shape[2], k.shape[1], lse, head_reduce, pool, pool_size, pool_end, query_reduce)
    scale = _check_scale(scale, q.shape[-1])
    b = resolve_backend("attention_mass", backend, q.device, has=("reference", "triton"))
    return torch.ops.kvpress_kernels.attention_mass(q, k, lengths, scale, lse, bool(causal), head_reduce, pool,
                                                    pool_size, pool_end, b, query_reduce)


def attention_mass_paged(q: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
                         *, max_len: int, scale: Optional[float] = None, lse: Optional[torch.Tensor] = None,
                         causal: bool = True, head_reduce: str = "group_sum", pool: Optional[str] = None,
                         pool_size: int = 1, pool_end: Optional[int] = None,
                         backend: Optional[str] = None, query_reduce: str = "sum") -> torch.Tensor:
    """:func:`attention_mass` over a paged KV cache (DESIGN.md §4).

    Row ``(b, h)`` holds ``lengths[b, h]`` keys; its slot ``j`` is
    ``k_pages[page_table[b, h, j // page_size], j % page_size]``. Query ``w`` of query head ``hq``
    sits at position ``lengths[b, hq // G] - W + w``.

    Parameters
    ----------
    q : Tensor ``[B, Hq, W, D]``, float32/float16/bfloat16, unit last stride
    k_pages : Tensor ``[num_pages, page_size, D]``, dtype of q, unit last stride
    page_table : Tensor ``[B, Hkv, max_pages]``, int32/int64, any strides
    lengths : Tensor ``[B, Hkv]``, int32/int64; ``W <= lengths <= max_len``
    max_len : int
        Length of the output score rows, ``<= max_pages * page_size``.
    scale, lse, causal, head_reduce, pool, pool_size, pool_end, backend, query_reduce
        As in :func:`attention_mass` (``pool_end <= max_len``; for ``all_*`` the pooled row's
        length is the longest of its kv heads).

    Returns
    -------
    Tensor, float32: ``[B, Hq, max_len]`` / ``[B, Hkv, max_len]`` / ``[B, max_len]``; 0 at slots
    ``j >= lengths`` of the row.
    """
    _check_q(q)
    dev = q.device
    B, Hq, W, D = q.shape
    V.tensor("k_pages", k_pages, ndim=3, dtypes=(q.dtype,), device=dev, last_contiguous=True)
    V.shape("k_pages", k_pages, [None, None, D], "([num_pages, page_size, D], head_dim as q)")
    num_pages, page_size = k_pages.shape[0], k_pages.shape[1]
    V.tensor("page_table", page_table, ndim=3, dtypes=V.INDEX_DTYPES, device=dev)
    V.shape("page_table", page_table, [B, None, None], "([B, Hkv, max_pages])")
    Hkv, max_pages = page_table.shape[1], page_table.shape[2]
    V.tensor("lengths", lengths, ndim=2, dtypes=V.INDEX_DTYPES, device=dev)
    V.shape("lengths", lengths, [B, Hkv], "([B, Hkv], like page_table's leading dims)")
    max_len = V.integer("max_len", max_len, low=0, high=max_pages * page_size)
    pool_size = _check_common(q, max_len, Hkv, lse, head_reduce, pool, pool_size, pool_end, query_reduce)
    scale = _check_scale(scale, D)
    _check_lengths_values(lengths, W, max_len, "max_len")
    if wants_data_checks(page_table):
        V.page_table("page_table", page_table, num_pages, lengths, page_size)
    b = resolve_backend("attention_mass_paged", backend, dev, has=("reference", "triton"))
    return torch.ops.kvpress_kernels.attention_mass_paged(q, k_pages, page_table, lengths, max_len, scale, lse,
                                                          bool(causal), head_reduce, pool, pool_size, pool_end, b,
                                                          query_reduce)


__all__ = ["attention_lse", "attention_lse_ref", "attention_mass", "attention_mass_ref", "attention_mass_paged",
           "attention_mass_paged_ref", "pool_scores", "token_norm", "HEAD_REDUCES", "POOLS", "QUERY_REDUCES"]
