"""Tests of the attention-mass scoring op (kvpress_kernels/ops/scoring.py).

Oracles, in order of trust:
1. a naive float64 formula below that materialises every softmax row, one (sequence, head) at a
   time, with explicit per-row masks and an explicit loop-based pooling;
2. kvpress's own SnapKV scoring code (``SnapKVPress.score``) and the formula of the brief;
3. the reference (``*_ref``), which the Triton kernels are compared with.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import devices_for_triton
from kvpress_kernels.ops import scoring as S

HEAD_REDUCES = S.HEAD_REDUCES

# fp32 reference vs float64 naive: logits of size |s| <~ 10 carry a relative error of a few fp32 ulps
# (~1e-6 after D-term dot products), exp turns that into the same relative error of p, and sums of
# <= W*G probabilities keep it relative: 1e-5 relative plus 1e-6 absolute (for near-zero masses)
# leaves ~10x margin.
REF_TOL = dict(rtol=1e-5, atol=1e-6)
# Triton vs reference (both fp32 arithmetic on identical inputs: fp16 inputs are exactly widened to
# fp32 in both, and products of fp16 values are exact in the fp32 accumulator): only the summation
# order of the D-term dot, exp2(x*log2 e) vs exp(x), and the order of the sums over queries differ,
# each a few ulps relative; 2e-5 relative and 2e-6 absolute is ~10x that.
TRITON_TOL = dict(rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Naive float64 oracle
# ---------------------------------------------------------------------------------------------

def naive_mass_lse(q, k, lens, scale, causal):
    """Per-head mass [B, Hq, N] and lse [B, Hq, W] in float64; ``lens``: nested list [B][Hkv]."""
    B, Hq, W, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    mass = torch.zeros(B, Hq, N, dtype=torch.float64)
    lse = torch.zeros(B, Hq, W, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            L = int(lens[b][h // G])
            logits = (q[b, h].double() @ k[b, h // G, :L].double().T) * scale    # [W, L]
            for w in range(W):
                row = logits[w].clone()
                if causal:
                    row[L - W + w + 1:] = float("-inf")
                lse[b, h, w] = torch.logsumexp(row, 0)
                mass[b, h, :L] += torch.softmax(row, 0)
    return mass, lse


def naive_reduce(mass, Hkv, head_reduce):
    B, Hq, N = mass.shape
    G = Hq // Hkv
    if head_reduce == "none":
        return mass
    if head_reduce.startswith("group"):
        groups = [mass[:, h * G:(h + 1) * G] for h in range(Hkv)]
        op = head_reduce.split("_")[1]
        red = {"sum": lambda x: x.sum(1), "mean": lambda x: x.sum(1) / G, "max": lambda x: x.max(1).values}[op]
        return torch.stack([red(x) for x in groups], dim=1)
    op = head_reduce.split("_")[1]
    return {"sum": mass.sum(1), "mean": mass.sum(1) / Hq, "max": mass.max(1).values}[op]


def naive_pool(s, lens, kind, size, pool_end):
    """Loop pooling of rows ``s: [R, N]`` float64 with per-row ``lens`` (list)."""
    out = s.clone()
    R, N = s.shape
    half = size // 2
    for r in range(R):
        L = int(lens[r])
        E = L if pool_end is None else min(pool_end, L)
        for j in range(E):
            vals = [s[r, j + o].item() for o in range(-half, half + 1) if 0 <= j + o < E]
            out[r, j] = sum(vals) / size if kind == "avg" else max(vals)
        out[r, L:] = 0
    return out


def naive_scores(q, k, lens, scale, causal, head_reduce, pool, pool_size, pool_end):
    mass, _ = naive_mass_lse(q, k, lens, scale, causal)
    Hkv = k.shape[1]
    G = q.shape[1] // Hkv
    red = naive_reduce(mass, Hkv, head_reduce)
    if pool is None or pool_size == 1:
        return red
    B = q.shape[0]
    if head_reduce == "none":
        row_lens = [lens[b][h // G] for b in range(B) for h in range(q.shape[1])]
    elif head_reduce.startswith("group"):
        row_lens = [lens[b][h] for b in range(B) for h in range(Hkv)]
    else:
        row_lens = [max(lens[b]) for b in range(B)]
    return naive_pool(red.reshape(-1, red.shape[-1]), row_lens, pool, pool_size, pool_end).view(red.shape)


def make_inputs(B, Hq, Hkv, W, N, D, dtype=torch.float32, device="cpu", spread=2.0):
    # spread > 1 sharpens the softmax so that scores are far from uniform (rankings mean something).
    q = (torch.randn(B, Hq, W, D) * spread).to(dtype).to(device)
    k = torch.randn(B, Hkv, N, D).to(dtype).to(device)
    return q, k


def ragged_lengths(B, W, N):
    lens = torch.randint(W, N + 1, (B,))
    lens[0] = N
    return lens


def make_paged(k, lens, page_size, *, spare_pages=3, poison_unused=True):
    """Scatter dense keys ``k [B, Hkv, N, D]`` with per-row ``lens [B, Hkv]`` into a shuffled page pool.

    Slots past a row's length hold noise; table entries past the pages a row uses are -1 (a kernel
    that dereferenced them would read out of bounds or fail the checks)."""
    B, Hkv, N, D = k.shape
    max_pages = -(-N // page_size) + 1                       # one spare column: max_len < capacity
    total = B * Hkv * max_pages + spare_pages
    perm = torch.randperm(total)
    table = perm[:B * Hkv * max_pages].view(B, Hkv, max_pages).clone()
    k_pages = torch.randn(total, page_size, D).to(k.dtype)
    for b in range(B):
        for h in range(Hkv):
            L = int(lens[b, h])
            for j in range(L):
                k_pages[table[b, h, j // page_size], j % page_size] = k[b, h, j]
            if poison_unused:
                table[b, h, -(-L // page_size):] = -1
    return k_pages, table.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Reference vs naive float64
# ---------------------------------------------------------------------------------------------

POOL_CASES = [(None, 1, None), ("avg", 5, None), ("max", 3, None), ("avg", 3, "N-W"), ("max", 5, "N-W")]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (3, 1), (8, 2)])
@pytest.mark.parametrize("pool,pool_size,pool_end", POOL_CASES)
def test_reference_matches_naive(causal, Hq, Hkv, pool, pool_size, pool_end):
    B, W, N, D = 2, 5, 23, 8
    q, k = make_inputs(B, Hq, Hkv, W, N, D)
    lengths = torch.tensor([N, 13])
    pe = N - W if pool_end == "N-W" else None
    lens = [[int(lengths[b])] * Hkv for b in range(B)]
    scale = 0.3
    for hr in HEAD_REDUCES:
        got = S.attention_mass(q, k, lengths=lengths, scale=scale, causal=causal, head_reduce=hr, pool=pool,
                               pool_size=pool_size, pool_end=pe)
        want = naive_scores(q, k, lens, scale, causal, hr, pool, pool_size, pe)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, **REF_TOL, msg=f"head_reduce={hr}")


@pytest.mark.parametrize("causal", [True, False])
def test_reference_lse_and_given_lse(causal):
    B, Hq, Hkv, W, N, D = 2, 4, 2, 6, 19, 16
    q, k = make_inputs(B, Hq, Hkv, W, N, D)
    lengths = torch.tensor([11, 19], dtype=torch.int32)
    lens = [[int(lengths[b])] * Hkv for b in range(B)]
    scale = 1 / math.sqrt(D)
    mass, lse = naive_mass_lse(q, k, lens, scale, causal)
    got_lse = S.attention_lse(q, k, lengths=lengths, causal=causal)
    assert got_lse.shape == (B, Hq, W) and got_lse.dtype == torch.float32
    torch.testing.assert_close(got_lse.double(), lse, **REF_TOL)
    # Given lse skips pass 1: a deliberately shifted lse scales every mass by exp(-shift), which
    # proves the argument is really used.
    for shift in (0.0, 0.5):
        got = S.attention_mass(q, k, lengths=lengths, causal=causal, head_reduce="none",
                               lse=(lse + shift).float())
        torch.testing.assert_close(got.double(), mass * math.exp(-shift), **REF_TOL)


def test_reference_h2o_all_queries_chunked(monkeypatch):
    # H2O: W = N, every query, causal. A tiny chunk budget forces the reference through many query
    # chunks (the memory bound); the result must not depend on the chunking.
    B, Hq, Hkv, N, D = 2, 4, 1, 29, 8
    q, k = make_inputs(B, Hq, Hkv, N, N, D)
    full = S.attention_mass(q, k, head_reduce="all_sum")
    monkeypatch.setattr(S, "_REF_CHUNK_ELEMS", B * Hq * N * 3)       # 3 queries per chunk
    chunked = S.attention_mass(q, k, head_reduce="all_sum")
    mass, _ = naive_mass_lse(q, k, [[N]] * B, 1 / math.sqrt(D), True)
    torch.testing.assert_close(chunked.double(), mass.sum(1), **REF_TOL)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-7)
    # Every causal query distributes exactly one unit of attention: total mass = Hq * N per sequence.
    torch.testing.assert_close(chunked.sum(-1).double(), torch.full((B,), float(Hq * N), dtype=torch.float64),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("W", [29, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_chunked_ragged_and_uniform(monkeypatch, W, causal):
    # The reference's chunk loop has two mask paths (every row full: only the causal triangle is
    # masked; ragged rows: a mask per chunk) and skips the keys no query of a chunk sees. Both, with
    # chunks of 2 queries, against the naive oracle: per head, lse, and a given lse.
    B, Hq, Hkv, N, D = 3, 6, 2, 29, 8
    q, k = make_inputs(B, Hq, Hkv, W, N, D)
    # an outlier key the reference's per-row shift (the larger of the logits with key 0 and with the
    # query's own key) does not cover: later queries' sums pass its threshold and it redoes those
    # chunks with the exact row max
    k[0, 0, 3] = q[0, 0].mean(0) * 40
    monkeypatch.setattr(S, "_REF_CHUNK_ELEMS", B * Hq * N * 2)
    scale = 0.4
    # (the op wants lengths >= W: at W = N every row is full)
    for lengths in (None, torch.tensor([N, max(W, 17), W])):
        lens = [[N if lengths is None else int(lengths[b])] * Hkv for b in range(B)]
        mass, lse = naive_mass_lse(q, k, lens, scale, causal)
        got = S.attention_mass(q, k, lengths=lengths, scale=scale, causal=causal, head_reduce="none")
        torch.testing.assert_close(got.double(), mass, **REF_TOL)
        got_lse = S.attention_lse(q, k, lengths=lengths, scale=scale, causal=causal)
        torch.testing.assert_close(got_lse.double(), lse, **REF_TOL)
        given = S.attention_mass(q, k, lengths=lengths, scale=scale, causal=causal, head_reduce="none",
                                 lse=lse.float())
        torch.testing.assert_close(given.double(), mass, **REF_TOL)


def test_reference_strided_inputs():
    # k as a transposed view of a [B, N, Hkv, D] buffer (an engine's layout), q a slice of a longer window.
    B, Hq, Hkv, W, N, D = 2, 4, 2, 3, 17, 8
    kbuf = torch.randn(B, N, Hkv, D)
    qbuf = torch.randn(B, Hq, W + 4, D) * 2
    k, q = kbuf.transpose(1, 2), qbuf[:, :, 2:2 + W]
    assert not k.is_contiguous() and not q.is_contiguous()
    got = S.attention_mass(q, k, head_reduce="none")
    want, _ = naive_mass_lse(q, k, [[N] * Hkv] * B, 1 / math.sqrt(D), True)
    torch.testing.assert_close(got.double(), want, **REF_TOL)


@pytest.mark.parametrize("page_size", [1, 16, 17])
def test_paged_reference_equals_dense_and_naive(page_size):
    B, Hq, Hkv, W, N, D = 2, 6, 2, 4, 37, 8
    q, k = make_inputs(B, Hq, Hkv, W, N, D)
    # Same length for every head of a sequence: paged must equal the dense op.
    lengths = torch.tensor([N, 21])
    row_lens = lengths.view(B, 1).expand(B, Hkv).contiguous()
    k_pages, table = make_paged(k, row_lens, page_size)
    for hr, pool, ps, pe in [("group_sum", None, 1, None), ("none", "avg", 5, N - W), ("all_max", "max", 3, None)]:
        dense = S.attention_mass(q, k, lengths=lengths, head_reduce=hr, pool=pool, pool_size=ps, pool_end=pe)
        paged = S.attention_mass_paged(q, k_pages, table, row_lens, max_len=N, head_reduce=hr, pool=pool,
                                       pool_size=ps, pool_end=pe)
        torch.testing.assert_close(paged, dense, rtol=1e-6, atol=1e-7)
    # Ragged per-head lengths and an output longer than every row: against the naive formula.
    row_lens = torch.tensor([[37, 9], [4, 30]])
    k_pages, table = make_paged(k, row_lens, page_size)
    lens = row_lens.tolist()
    for hr in ("none", "group_max", "all_mean"):
        got = S.attention_mass_paged(q, k_pages, table, row_lens, max_len=N + 1, head_reduce=hr,
                                     pool="avg", pool_size=3)
        want = naive_scores(q, torch.cat([k, torch.zeros(B, Hkv, 1, D)], 2), lens, 1 / math.sqrt(D), True, hr,
                            "avg", 3, None)
        torch.testing.assert_close(got.double(), want, **REF_TOL, msg=f"head_reduce={hr}")


def test_pool_scores_matches_naive():
    R, N = 6, 31
    s = torch.randn(3, 2, N)                                   # negative values: max must ignore padding
    lengths = torch.tensor([31, 12, 0])                        # a prefix-shaped [3] for scores [3, 2, N]
    for kind in ("avg", "max"):
        for size in (1, 3, 7):
            for pe in (None, 9, 25):
                got = S.pool_scores(s, kind, size, lengths=lengths, pool_end=pe)
                rl = lengths.repeat_interleave(2).tolist()
                want = naive_pool(s.double().view(R, N), rl, kind, size, pe).view(3, 2, N)
                if size == 1:
                    want = s.double() * (torch.arange(N).view(1, 1, N) < lengths.view(3, 1, 1))
                torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6,
                                           msg=f"{kind} {size} {pe}")
    # Equals torch's avg_pool1d (count_include_pad, zero padding) on the full row when nothing is cut.
    ref = torch.nn.functional.avg_pool1d(s.view(R, 1, N), 5, stride=1, padding=2).view(3, 2, N)
    torch.testing.assert_close(S.pool_scores(s, "avg", 5), ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(S.pool_scores(s, None, 5), s)


def test_token_norm():
    x = torch.randn(2, 3, 11, 8, dtype=torch.float16)
    lengths = torch.tensor([11, 4])
    want = x.double().pow(2).sum(-1).sqrt() * (torch.arange(11).view(1, 1, -1) < lengths.view(2, 1, 1))
    got = S.token_norm(x, lengths=lengths)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 11)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(S.token_norm(x).double(), x.double().norm(dim=-1), rtol=1e-6, atol=1e-6)
    per_row = torch.tensor([[11, 0, 5], [1, 2, 3]])
    got = S.token_norm(x, lengths=per_row)
    assert torch.equal(got[0, 1], torch.zeros(11)) and torch.equal(got[1, 2, 3:], torch.zeros(8))
    assert (got[1, 2, :3] > 0).all()


# ---------------------------------------------------------------------------------------------
# kvpress's SnapKV scoring
# ---------------------------------------------------------------------------------------------

def _same_ranking(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    """Every pair of keys that ``theirs`` separates by more than ``tol`` is ordered alike by ``ours``."""
    ours, theirs = ours.reshape(-1, ours.shape[-1]), theirs.reshape(-1, theirs.shape[-1])
    for o, t in zip(ours, theirs):
        dt = t.view(-1, 1) - t.view(1, -1)
        do = o.view(-1, 1) - o.view(1, -1)
        decided = dt.abs() > tol
        assert decided.any()
        bad = (torch.sign(dt) != torch.sign(do)) & decided
        assert not bad.any(), f"{int(bad.sum())} key pairs ranked differently"


def snapkv_formula(q, k, window, kernel):
    """kvpress SnapKV's scoring, written out: softmax over all keys (causal inside the window),
    keep keys [:N-W], mean over the window, avg_pool1d, mean over each query group."""
    B, Hq, W, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kr = k[:, :, None].expand(B, Hkv, G, N, D).reshape(B, Hq, N, D)        # repeat_kv
    attn = q.float() @ kr.float().transpose(2, 3) / math.sqrt(D)
    mask = torch.triu(torch.full((W, N), float("-inf")), diagonal=N - W + 1)
    attn = torch.softmax(attn + mask, dim=-1)[..., :-window]
    scores = torch.nn.functional.avg_pool1d(attn.mean(-2), kernel_size=kernel, padding=kernel // 2, stride=1)
    return scores.view(B, Hkv, G, N - window).mean(2)


def kvpress_snapkv_scores(q_hidden_dim_model, B, Hq, Hkv, W, N, D, kernel):
    """Runs kvpress's own ``SnapKVPress.score`` on a Llama-like toy attention module; returns
    (our window queries after RoPE, keys, kvpress's scores [B, Hkv, N])."""
    from kvpress import SnapKVPress
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hidden = q_hidden_dim_model
    module = torch.nn.Module()
    module.q_proj = torch.nn.Linear(hidden, Hq * D, bias=False)
    module.config = SimpleNamespace(num_attention_heads=Hq, num_key_value_heads=Hkv)
    module.head_dim = D
    hs = torch.randn(B, N, hidden)
    keys = torch.randn(B, Hkv, N, D)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(N).float().view(-1, 1) * inv_freq.view(1, -1)
    emb = torch.cat([ang, ang], -1).unsqueeze(0).expand(B, N, D)
    cos, sin = emb.cos(), emb.sin()
    press = SnapKVPress(window_size=W, kernel_size=kernel)
    with torch.no_grad():
        theirs = press.score(module, hs, keys, keys, None, {"position_embeddings": (cos, sin)})
        q = module.q_proj(hs[:, -W:]).view(B, W, Hq, D).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -W:], sin[:, -W:])
    return q.contiguous(), keys, theirs


def test_matches_kvpress_snapkv_press():
    B, Hq, Hkv, W, N, D, kernel = 2, 8, 2, 6, 41, 16, 5
    q, k, theirs = kvpress_snapkv_scores(64, B, Hq, Hkv, W, N, D, kernel)
    ours = S.attention_mass(q, k, head_reduce="group_mean", pool="avg", pool_size=kernel, pool_end=N - W) / W
    # Both fp32 over the same math: elementwise within fp32 rounding, and the same ranking.
    torch.testing.assert_close(ours[..., :N - W], theirs[..., :N - W], rtol=1e-5, atol=1e-7)
    _same_ranking(ours[..., :N - W], theirs[..., :N - W], tol=1e-6)


@pytest.mark.parametrize("Hq,Hkv,W,N,kernel", [(4, 2, 8, 40, 5), (3, 1, 16, 97, 7), (8, 8, 1, 7, 3)])
def test_matches_snapkv_formula(Hq, Hkv, W, N, kernel):
    q, k = make_inputs(2, Hq, Hkv, W, N, 16)
    want = snapkv_formula(q, k, W, kernel)
    ours = S.attention_mass(q, k, head_reduce="group_mean", pool="avg", pool_size=kernel, pool_end=N - W) / W
    torch.testing.assert_close(ours[..., :N - W], want, rtol=1e-5, atol=1e-7)
    _same_ranking(ours[..., :N - W], want, tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Triton vs reference
# ---------------------------------------------------------------------------------------------

# (N, W) with W <= N, and one GQA shape, one head reduction, one pooling per case: the cartesian
# product would take minutes in the interpreter; the cycle still visits every value of each axis.
_GQA = [(2, 2), (3, 1), (8, 2), (8, 1)]
_NW = [(1, 1), (7, 1), (7, 4), (97, 1), (97, 4), (97, 16), (111, 1), (111, 4), (111, 16)]
_TRITON_CASES = []
for _i, (_n, _w) in enumerate(_NW):
    for _j, _dt in enumerate((torch.float32, torch.float16)):
        _c = _i * 2 + _j
        _TRITON_CASES.append(pytest.param(_n, _w, *_GQA[_c % 4], _dt, HEAD_REDUCES[_c % 7], _c % 3 == 0, _c % 2 == 0,
                                          POOL_CASES[_c % 5], id=f"N{_n}-W{_w}-{_dt}-{_c}"))


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("N,W,Hq,Hkv,dtype,head_reduce,give_lse,causal,pool_case", _TRITON_CASES)
def test_triton_dense_matches_reference(device, N, W, Hq, Hkv, dtype, head_reduce, give_lse, causal, pool_case):
    B, D = 2, 16
    q, k = make_inputs(B, Hq, Hkv, W, N, D, dtype, device)
    lengths = ragged_lengths(B, W, N).to(device)
    pool, ps, pe = pool_case
    pe = max(N - W, 0) if pe == "N-W" else None
    lse = None
    if give_lse:
        lse = S.attention_lse(q, k, lengths=lengths, causal=causal, backend="triton")
        torch.testing.assert_close(lse, S.attention_lse(q, k, lengths=lengths, causal=causal, backend="reference"),
                                   **TRITON_TOL)
    kw = dict(lengths=lengths, causal=causal, head_reduce=head_reduce, pool=pool, pool_size=ps, pool_end=pe, lse=lse)
    got = S.attention_mass(q, k, backend="triton", **kw)
    want = S.attention_mass(q, k, backend="reference", **kw)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TRITON_TOL)
    # Keys past each sequence's length get exactly 0.
    for b in range(B):
        assert not got[b, ..., int(lengths[b]):].any()


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("causal", [True, False])
def test_triton_all_queries_h2o(device, causal):
    # W = N (H2O accumulated attention): the causal tile skip and several query blocks per tile.
    B, Hq, Hkv, N, D = 1, 4, 2, 75, 16
    q, k = make_inputs(B, Hq, Hkv, N, N, D, device=device)
    for hr in ("group_sum", "none"):
        got = S.attention_mass(q, k, causal=causal, head_reduce=hr, backend="triton")
        want = S.attention_mass(q, k, causal=causal, head_reduce=hr, backend="reference")
        torch.testing.assert_close(got, want, **TRITON_TOL)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_key_splits_and_small_tiles(device, monkeypatch):
    # Force pass 1 to split the keys (partial LSEs merged by logsumexp) and pass 2 to use 16-key tiles.
    B, Hq, Hkv, W, N, D = 2, 6, 2, 16, 111, 24               # D = 24: padded head_dim block
    q, k = make_inputs(B, Hq, Hkv, W, N, D, device=device)
    lengths = torch.tensor([111, 40], device=device)
    want_lse = S.attention_lse(q, k, lengths=lengths, backend="reference")
    want = S.attention_mass(q, k, lengths=lengths, head_reduce="group_max", backend="reference")
    for split_n in (16, 48):
        monkeypatch.setitem(S._OVERRIDES, "split_n", split_n)
        monkeypatch.setitem(S._OVERRIDES, "block_n", 16)
        monkeypatch.setitem(S._OVERRIDES, "block_m", 16)
        torch.testing.assert_close(S.attention_lse(q, k, lengths=lengths, backend="triton"), want_lse, **TRITON_TOL)
        got = S.attention_mass(q, k, lengths=lengths, head_reduce="group_max", backend="triton")
        torch.testing.assert_close(got, want, **TRITON_TOL)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_strided_inputs(device):
    B, Hq, Hkv, W, N, D = 2, 4, 2, 4, 33, 16
    k = torch.randn(B, N, Hkv, D, device=device).transpose(1, 2)
    q = (torch.randn(B, Hq, W + 3, D, device=device) * 2)[:, :, 3:]
    lse = torch.randn(B, W, Hq, device=device).transpose(1, 2)        # a strided lse
    for kw in (dict(), dict(lse=S.attention_lse(q, k).transpose(1, 2).contiguous().transpose(1, 2))):
        got = S.attention_mass(q, k, head_reduce="none", backend="triton", **kw)
        want = S.attention_mass(q, k, head_reduce="none", backend="reference", **kw)
        torch.testing.assert_close(got, want, **TRITON_TOL)
    got = S.attention_mass(q, k, head_reduce="all_sum", lse=lse, backend="triton")
    torch.testing.assert_close(got, S.attention_mass(q, k, head_reduce="all_sum", lse=lse, backend="reference"),
                               rtol=2e-5, atol=1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("page_size,dtype,Hq,Hkv,W,give_lse", [
    (1, torch.float32, 4, 2, 4, False), (16, torch.float16, 8, 1, 16, True), (17, torch.float32, 3, 3, 1, False),
    (17, torch.float16, 8, 2, 4, False)])
def test_triton_paged_matches_reference(device, page_size, dtype, Hq, Hkv, W, give_lse):
    B, N, D = 2, 97, 16
    q, k = make_inputs(B, Hq, Hkv, W, N, D, dtype)
    row_lens = torch.randint(W, N + 1, (B, Hkv))
    row_lens[0, 0] = N
    k_pages, table = make_paged(k, row_lens, page_size)
    q, k_pages, table, row_lens = (t.to(device) for t in (q, k_pages, table, row_lens))
    hrs = [("none", None, 1, None), ("group_mean", "max", 5, N - W), ("all_sum", "avg", 3, None)]
    for causal, (hr, pool, ps, pe) in zip((True, False, True), hrs):
        lse = None
        if give_lse:  # the natural-log lse of the same logits with per-row lengths, from the reference core
            lse = S._mass_rows_ref(q, k.to(device), row_lens.long(), 1 / math.sqrt(D), None, causal, False)[1]
        kw = dict(max_len=N + 1, causal=causal, head_reduce=hr, pool=pool, pool_size=ps, pool_end=pe, lse=lse)
        got = S.attention_mass_paged(q, k_pages, table, row_lens, backend="triton", **kw)
        want = S.attention_mass_paged(q, k_pages, table, row_lens, backend="reference", **kw)
        torch.testing.assert_close(got, want, **TRITON_TOL, msg=f"{hr} page_size={page_size}")


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_paged_given_lse(device):
    # lse from pass 1 run separately (dense, same rows) fed to the paged op: equals computing it inside.
    B, Hq, Hkv, W, N, D = 1, 4, 2, 8, 45, 16
    q, k = make_inputs(B, Hq, Hkv, W, N, D, torch.float16)
    row_lens = torch.full((B, Hkv), N)
    k_pages, table = make_paged(k, row_lens, 16)
    q, k, k_pages, table, row_lens = (t.to(device) for t in (q, k, k_pages, table, row_lens))
    lse = S.attention_lse(q, k, backend="triton")
    got = S.attention_mass_paged(q, k_pages, table, row_lens, max_len=N, lse=lse, head_reduce="group_sum",
                                 backend="triton")
    want = S.attention_mass_paged(q, k_pages, table, row_lens, max_len=N, head_reduce="group_sum",
                                  backend="reference")
    torch.testing.assert_close(got, want, **TRITON_TOL)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_pool_kernel(device):
    # The pooling pass alone on arbitrary (negative too) scores: max is a selection, so exact; avg
    # sums the same <= 7 values in another order, so within a few ulps.
    R, N = 5, 97
    s = torch.randn(R, N, device=device)
    lens = torch.tensor([97, 50, 3, 0, 96], device=device)
    for kind in ("avg", "max"):
        for size in (3, 7):
            for pe in (None, 40, 97):
                got = S._pool_triton(s, lens, kind, size, pe)
                want = S._pool_ref(s, kind, size, lens, pe)
                if kind == "max":
                    assert torch.equal(got, want), f"{kind} {size} {pe}"
                else:
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_matches_snapkv_formula(device):
    B, Hq, Hkv, W, N, D, kernel = 2, 8, 2, 8, 111, 16, 7
    q, k = make_inputs(B, Hq, Hkv, W, N, D)
    want = snapkv_formula(q, k, W, kernel)
    ours = S.attention_mass(q.to(device), k.to(device), head_reduce="group_mean", pool="avg", pool_size=kernel,
                            pool_end=N - W, backend="triton").cpu() / W
    torch.testing.assert_close(ours[..., :N - W], want, rtol=2e-5, atol=1e-7)
    _same_ranking(ours[..., :N - W], want, tol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_and_large(dtype):
    # bf16 is only trustworthy compiled (the interpreter's bf16 is wrong). Larger shapes than the
    # interpreter allows, both passes, all-query causal mode.
    B, Hq, Hkv, W, N, D = 2, 32, 8, 64, 3001, 128
    q, k = make_inputs(B, Hq, Hkv, W, N, D, dtype, "cuda")
    lengths = torch.tensor([3001, 1777], device="cuda")
    for hr in ("group_sum", "none", "all_max"):
        kw = dict(lengths=lengths, head_reduce=hr, pool="avg", pool_size=5, pool_end=N - W)
        got = S.attention_mass(q, k, backend="triton", **kw)
        want = S.attention_mass(q, k, backend="reference", **kw)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    qa, ka = make_inputs(1, 8, 2, 1024, 1024, 128, dtype, "cuda")
    got = S.attention_mass(qa, ka, head_reduce="all_sum", backend="triton")
    torch.testing.assert_close(got, S.attention_mass(qa, ka, head_reduce="all_sum", backend="reference"),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.sum(), torch.tensor(8.0 * 1024, device="cuda"), rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------
# Registration and bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck(backend):
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k = make_inputs(1, 4, 2, 3, 9, 16, device=dev)
    lengths = torch.tensor([7], device=dev)
    ops = torch.ops.kvpress_kernels
    torch.library.opcheck(ops.attention_lse.default, (q, k, lengths, 0.25, True, backend))
    torch.library.opcheck(ops.attention_mass.default,
                          (q, k, lengths, 0.25, None, True, "group_mean", "avg", 3, 6, backend))
    k_pages, table = make_paged(k.cpu(), torch.tensor([[7, 9]]), 4, poison_unused=False)
    torch.library.opcheck(ops.attention_mass_paged.default,
                          (q, k_pages.to(dev), table.to(dev), torch.tensor([[7, 9]], device=dev), 10, 0.25, None,
                           False, "all_max", "max", 3, None, backend))


def test_torch_compile_graph_of_registered_op():
    q, k = make_inputs(1, 4, 2, 3, 9, 16)

    def f(q, k):
        return torch.ops.kvpress_kernels.attention_mass(q, k, None, 0.25, None, True, "none", None, 1, None,
                                                        "reference") * 2

    got = torch.compile(f, fullgraph=True, backend="eager")(q, k)
    torch.testing.assert_close(got, 2 * S.attention_mass(q, k, scale=0.25, head_reduce="none"))


def _bad_cases():
    q, k = make_inputs(2, 4, 2, 3, 9, 8)
    kp, table = make_paged(k, torch.full((2, 2), 9), 4, poison_unused=False)
    lens2 = torch.full((2, 2), 9)
    out_of_range = table.clone()
    out_of_range[1, 0, 0] = kp.shape[0]
    P = S.attention_mass_paged
    return [
        # wrong rank / type / dtype
        (lambda: S.attention_mass(q[0], k), ValueError, "q"),
        (lambda: S.attention_mass(q.tolist(), k), TypeError, "q"),
        (lambda: S.attention_mass(q.long(), k), TypeError, "q"),
        (lambda: S.attention_mass(q, k.half()), TypeError, "k"),
        (lambda: S.attention_mass(q, k[0]), ValueError, "k"),
        (lambda: S.attention_mass(q, k, lengths=torch.tensor([9.0, 9.0])), TypeError, "lengths"),
        (lambda: S.attention_lse(q, k, lengths=torch.tensor([[9, 9]])), ValueError, "lengths"),
        # wrong shape
        (lambda: S.attention_mass(q, k[..., :4]), ValueError, "k"),
        (lambda: S.attention_mass(q[:, :3], k), ValueError, "q"),
        (lambda: S.attention_mass(q, k, lengths=torch.tensor([9, 9, 9])), ValueError, "lengths"),
        (lambda: S.attention_mass(q, k, lse=torch.zeros(2, 4, 2)), ValueError, "lse"),
        (lambda: S.attention_mass(q.transpose(-1, -2).contiguous().transpose(-1, -2), k), ValueError, "q"),
        # device
        (lambda: S.attention_mass(q, k, lengths=torch.tensor([9, 9], device="meta")), ValueError, "lengths"),
        (lambda: S.attention_mass(q, k.to("meta")), ValueError, "k"),
        # impossible window / out-of-range lengths
        (lambda: S.attention_mass(torch.randn(2, 4, 10, 8), k), ValueError, "q"),
        (lambda: S.attention_mass(q, k, lengths=torch.tensor([9, 2])), ValueError, "lengths"),
        (lambda: S.attention_mass(q, k, lengths=torch.tensor([10, 9])), ValueError, "lengths"),
        # options
        (lambda: S.attention_mass(q, k, head_reduce="sum"), ValueError, "head_reduce"),
        (lambda: S.attention_mass(q, k, pool="mean", pool_size=3), ValueError, "pool"),
        (lambda: S.attention_mass(q, k, pool="avg", pool_size=4), ValueError, "pool_size"),
        (lambda: S.attention_mass(q, k, pool="avg", pool_size=0), ValueError, "pool_size"),
        (lambda: S.attention_mass(q, k, pool="avg", pool_size=3.0), TypeError, "pool_size"),
        (lambda: S.attention_mass(q, k, pool="avg", pool_size=3, pool_end=10), ValueError, "pool_end"),
        (lambda: S.attention_mass(q, k, scale=float("nan")), ValueError, "scale"),
        (lambda: S.attention_mass(q, k, scale="0.1"), TypeError, "scale"),
        (lambda: S.attention_mass(q, k, backend="fast"), ValueError, "backend"),
        # paged
        (lambda: P(q, kp, table, lens2, max_len=9), None, None),
        (lambda: P(q, kp[0], table, lens2, max_len=9), ValueError, "k_pages"),
        (lambda: P(q, kp.half(), table, lens2, max_len=9), TypeError, "k_pages"),
        (lambda: P(q, kp, table.float(), lens2, max_len=9), TypeError, "page_table"),
        (lambda: P(q, kp, table[:1], lens2, max_len=9), ValueError, "page_table"),
        (lambda: P(q, kp, table, lens2[:, :1], max_len=9), ValueError, "lengths"),
        (lambda: P(q, kp, table, lens2, max_len=table.shape[2] * 4 + 1), ValueError, "max_len"),
        (lambda: P(q, kp, table, lens2, max_len=9.0), TypeError, "max_len"),
        (lambda: P(q, kp, table, lens2, max_len=8), ValueError, "lengths"),
        (lambda: P(q, kp, table, torch.full((2, 2), 2), max_len=9), ValueError, "lengths"),
        (lambda: P(q, kp, out_of_range, lens2, max_len=9), ValueError, "page_table"),
        # pooling alone and norms
        (lambda: S.pool_scores(torch.zeros(3, 5), "avg", 3, lengths=torch.tensor([5, 5])), ValueError, "lengths"),
        (lambda: S.pool_scores(torch.zeros(3, 5), "avg", 3, lengths=torch.tensor([5, 5, 6])), ValueError, "lengths"),
        (lambda: S.pool_scores(torch.zeros(3, 5, dtype=torch.int32), "avg", 3), TypeError, "scores"),
        (lambda: S.pool_scores(torch.zeros(3, 5), "avg", 2), ValueError, "pool_size"),
        (lambda: S.token_norm(torch.zeros(3, 5)), ValueError, "x"),
        (lambda: S.token_norm(torch.zeros(1, 2, 5, 4), lengths=torch.tensor([6])), ValueError, "lengths"),
        (lambda: S.token_norm(torch.zeros(1, 2, 5, 4), lengths=torch.tensor([[5, 5, 5]])), ValueError, "lengths"),
        (lambda: S.attention_mass(q, k, query_reduce="mean"), ValueError, "query_reduce"),
        (lambda: P(q, kp, table, lens2, max_len=9, query_reduce=None), ValueError, "query_reduce"),
        (lambda: P(q, kp, table, lens2, max_len=9, query_reduce="max"), None, None),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    fn, exc, name = _bad_cases()[case]
    if exc is None:          # the control: the same inputs, well formed, are accepted
        fn()
        return
    with pytest.raises(exc, match=name):
        fn()


# ---------------------------------------------------------------------------------------------
# query_reduce="max": per key, the max over the queries of the softmax probability (KVzip)
# ---------------------------------------------------------------------------------------------

def naive_max(q, k, lens, scale, causal):
    """Per-head max probability [B, Hq, N] in float64; ``lens``: nested list [B][Hkv]."""
    B, Hq, W, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, N, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            L = int(lens[b][h // G])
            logits = (q[b, h].double() @ k[b, h // G, :L].double().T) * scale
            for w in range(W):
                row = logits[w].clone()
                if causal:
                    row[L - W + w + 1:] = float("-inf")
                out[b, h, :L] = torch.maximum(out[b, h, :L], torch.softmax(row, 0))
    return out


def naive_max_scores(q, k, lens, scale, causal, head_reduce):
    return naive_reduce(naive_max(q, k, lens, scale, causal), k.shape[1], head_reduce)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (3, 1), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_query_max_reference_matches_naive(causal, Hq, Hkv, dtype):
    B, W, N, D = 2, 6, 29, 8
    q, k = make_inputs(B, Hq, Hkv, W, N, D, dtype)
    lengths = torch.tensor([N, 13])
    lens = [[int(lengths[b])] * Hkv for b in range(B)]
    scale = 1 / math.sqrt(D)
    for hr in HEAD_REDUCES:
        want = naive_max_scores(q, k, lens, scale, causal, hr)
        got = S.attention_mass(q, k, lengths=lengths, causal=causal, head_reduce=hr, query_reduce="max")
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, **REF_TOL, msg=f"head_reduce={hr}")
    # the max is not the sum: the two reductions differ whenever W > 1 (a test that could not tell them apart
    # would pass a kernel that ignored the flag)
    mass = S.attention_mass(q, k, lengths=lengths, causal=causal, head_reduce="none")
    mx = S.attention_mass(q, k, lengths=lengths, causal=causal, head_reduce="none", query_reduce="max")
    assert (mass - mx).abs().max() > 1e-3 and bool((mx <= mass + 1e-6).all())


def test_query_max_reference_given_lse_pooled_and_chunked(monkeypatch):
    # given LSE = computed LSE; pooling applies after the reduction; tiny chunks (W = N, H2O-sized) agree.
    B, Hq, Hkv, N, D = 2, 4, 2, 37, 8
    q, k = make_inputs(B, Hq, Hkv, N, N, D)
    lengths = torch.tensor([N, 30])
    lse = S.attention_lse(q[:1], k[:1])
    base = S.attention_mass(q[:1], k[:1], head_reduce="group_max", query_reduce="max")
    torch.testing.assert_close(S.attention_mass(q[:1], k[:1], lse=lse, head_reduce="group_max", query_reduce="max"),
                               base, **REF_TOL)
    pooled = S.attention_mass(q[:1], k[:1], head_reduce="group_max", query_reduce="max", pool="max", pool_size=3)
    torch.testing.assert_close(pooled, S.pool_scores(base, "max", 3), **REF_TOL)
    want = naive_max_scores(q[:, :, 7:], k, [[N] * Hkv, [30] * Hkv], 1 / math.sqrt(D), True, "group_max")
    monkeypatch.setattr(S, "_REF_CHUNK_ELEMS", 64)
    got = S.attention_mass(q[:, :, 7:].contiguous(), k, lengths=lengths, head_reduce="group_max",
                           query_reduce="max")
    torch.testing.assert_close(got.double(), want, **REF_TOL)


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_query_max_paged_reference_matches_naive(page_size):
    B, Hq, Hkv, W, N, D = 2, 6, 3, 4, 41, 8
    q, k = make_inputs(B, Hq, Hkv, W, N, D)
    row_lens = torch.randint(W, N + 1, (B, Hkv))
    row_lens[0, 0] = N
    k_pages, table = make_paged(k, row_lens, page_size)
    for causal, hr in ((True, "group_max"), (False, "none"), (True, "all_max")):
        want = naive_max_scores(q, k, row_lens.tolist(), 1 / math.sqrt(D), causal, hr)
        got = S.attention_mass_paged(q, k_pages, table, row_lens, max_len=N, causal=causal, head_reduce=hr,
                                     query_reduce="max")
        torch.testing.assert_close(got.double(), want, **REF_TOL, msg=f"{hr} causal={causal}")


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("dtype,Hq,Hkv,W,N,causal,give_lse", [
    (torch.float32, 4, 2, 5, 70, True, False), (torch.float16, 8, 2, 16, 45, False, True),
    (torch.float32, 3, 1, 40, 40, True, False), (torch.float16, 4, 4, 33, 97, True, True)])
def test_query_max_triton_dense_matches_reference(device, dtype, Hq, Hkv, W, N, causal, give_lse, monkeypatch):
    # 16-key tiles and 16-query blocks so that several tiles and query blocks (and the causal skip) run.
    monkeypatch.setitem(S._OVERRIDES, "block_n", 16)
    monkeypatch.setitem(S._OVERRIDES, "block_m", 16)
    B, D = 2, 16
    q, k = make_inputs(B, Hq, Hkv, W, N, D, dtype, device)
    lengths = ragged_lengths(B, W, N).to(device)
    lse = S.attention_lse(q, k, lengths=lengths, causal=causal, backend="triton") if give_lse else None
    for hr in ("none", "group_max", "group_sum", "all_max"):
        kw = dict(lengths=lengths, causal=causal, head_reduce=hr, lse=lse, query_reduce="max")
        got = S.attention_mass(q, k, backend="triton", **kw)
        want = S.attention_mass(q, k, backend="reference", **kw)
        torch.testing.assert_close(got, want, **TRITON_TOL, msg=hr)
        for b in range(B):
            assert not got[b, ..., int(lengths[b]):].any()


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("page_size,dtype", [(16, torch.float16), (7, torch.float32)])
def test_query_max_triton_paged_matches_reference(device, page_size, dtype):
    B, Hq, Hkv, W, N, D = 2, 6, 2, 9, 53, 16
    q, k = make_inputs(B, Hq, Hkv, W, N, D, dtype)
    row_lens = torch.randint(W, N + 1, (B, Hkv))
    row_lens[1, 1] = N
    k_pages, table = make_paged(k, row_lens, page_size)
    q, k_pages, table, row_lens = (t.to(device) for t in (q, k_pages, table, row_lens))
    for causal, hr in ((True, "group_max"), (False, "none")):
        kw = dict(max_len=N + 1, causal=causal, head_reduce=hr, query_reduce="max")
        got = S.attention_mass_paged(q, k_pages, table, row_lens, backend="triton", **kw)
        want = S.attention_mass_paged(q, k_pages, table, row_lens, backend="reference", **kw)
        torch.testing.assert_close(got, want, **TRITON_TOL, msg=f"{hr} causal={causal}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_query_max_opcheck(backend):
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k = make_inputs(1, 4, 2, 3, 9, 16, device=dev)
    ops = torch.ops.kvpress_kernels
    torch.library.opcheck(ops.attention_mass.default,
                          (q, k, torch.tensor([7], device=dev), 0.25, None, True, "group_max", None, 1, None, backend,
                           "max"))
    k_pages, table = make_paged(k.cpu(), torch.tensor([[7, 9]]), 4, poison_unused=False)
    torch.library.opcheck(ops.attention_mass_paged.default,
                          (q, k_pages.to(dev), table.to(dev), torch.tensor([[7, 9]], device=dev), 10, 0.25, None,
                           True, "group_max", None, 1, None, backend, "max"))
