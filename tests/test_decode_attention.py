"""Paged decode attention (DESIGN.md §5.6): the reference against an independent float64 formula, the
Triton kernels against the reference, and input validation."""

import math

import pytest
import torch
from conftest import HAS_CUDA, devices_for_triton

from kvpress_kernels.ops.decode_attention import (
    default_num_splits, paged_decode_attention, paged_decode_attention_ref)

# ----------------------------------------------------------------------------------------------- helpers


def make_case(B, Hkv, G, T, D, page_size, lengths, *, dtype=torch.float32, device="cpu", table_dtype=torch.int32,
              spare_pages=3, seed=0):
    """A paged cache with shuffled page ownership. Everything the op must never read is poisoned: slots
    that hold no token are NaN, and page-table entries past a row's last used page are out of range."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.int32).reshape(B, Hkv)
    cap = int(lens.max()) if lens.numel() else 0
    max_pages = -(-cap // page_size) + 1                     # one column more than any row needs
    num_pages = B * Hkv * max_pages + spare_pages
    k_pages = torch.randn(num_pages, page_size, D, generator=gen)
    v_pages = torch.randn(num_pages, page_size, D, generator=gen)
    table = torch.randperm(num_pages, generator=gen)[:B * Hkv * max_pages].reshape(B, Hkv, max_pages)
    holds = torch.zeros(num_pages, page_size, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            j = torch.arange(int(lens[b, h]))
            holds[table[b, h, j // page_size], j % page_size] = True
    used = -(-lens.long() // page_size)
    table = torch.where(torch.arange(max_pages) < used.unsqueeze(-1), table, num_pages + 7)
    k_pages[~holds] = float("nan")
    v_pages[~holds] = float("nan")
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    cast = dict(dtype=dtype, device=device)
    return (q.to(**cast), k_pages.to(**cast), v_pages.to(**cast), table.to(dtype=table_dtype, device=device),
            lens.to(device))


def naive_attention(q, k_pages, v_pages, page_table, lengths, scale, causal):
    """float64, one (batch, query head, query) at a time, from the definition."""
    B, Hq, T, D = q.shape
    Hkv, max_pages = page_table.shape[1:]
    G, ps = Hq // Hkv, k_pages.shape[1]
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    probs = torch.zeros(B, Hkv, max_pages * ps, dtype=torch.float64)
    kp, vp, tab = k_pages.double().cpu(), v_pages.double().cpu(), page_table.long().cpu()
    for b in range(B):
        for h in range(Hq):
            kvh = h // G
            n = int(lengths[b, kvh])
            for t in range(T):
                visible = n - (T - 1 - t) if causal else n
                if visible <= 0:
                    continue
                j = torch.arange(visible)
                keys = kp[tab[b, kvh, j // ps], j % ps]
                vals = vp[tab[b, kvh, j // ps], j % ps]
                logit = keys @ q[b, h, t].double().cpu() * scale
                p = torch.exp(logit - logit.max())
                p = p / p.sum()
                out[b, h, t] = p @ vals
                probs[b, kvh, :visible] += p
    return out, probs


def queries_with_keys(lengths, T, causal):
    """Per row, how many of the T queries see at least one key."""
    lens = lengths.long().cpu()
    if not causal:
        return torch.where(lens > 0, T, 0)
    return sum((lens - (T - 1 - t) > 0).long() for t in range(T))


def assert_probs_sane(probs, lengths, G, T, causal, atol):
    probs = probs.double().cpu()
    lens = lengths.long().cpu()
    assert (probs >= 0).all()
    dead = torch.arange(probs.shape[-1]) >= lens.unsqueeze(-1)
    assert torch.equal(probs[dead], torch.zeros_like(probs[dead])), "probs must be exactly 0 past each row's length"
    want = (G * queries_with_keys(lens, T, causal)).double()
    torch.testing.assert_close(probs.sum(-1), want, atol=atol, rtol=0)


# lengths of a [2, 2] grid of rows: an empty row, a one-token row, and two ragged ones (per-head lengths)
LENGTHS = [0, 1, 37, 97]

# ------------------------------------------------------------------------------------- reference vs naive


@pytest.mark.parametrize("page_size", [1, 16, 17])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_reference_matches_naive(G, T, causal, page_size):
    D = {1: 16, 3: 40, 4: 64, 8: 80}[G]
    table_dtype = torch.int64 if page_size == 17 else torch.int32
    q, kp, vp, table, lens = make_case(2, 2, G, T, D, page_size, LENGTHS, table_dtype=table_dtype, seed=G * 10 + T)
    scale = 0.3 if page_size == 16 else 1 / math.sqrt(D)
    out, probs = paged_decode_attention(q, kp, vp, table, lens, scale=None if page_size != 16 else scale,
                                        causal=causal, return_probs=True, backend="reference")
    want_out, want_probs = naive_attention(q, kp, vp, table, lens, scale, causal)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert probs.dtype == torch.float32 and probs.shape == (2, 2, table.shape[-1] * page_size)
    # fp32 math over <= 97 keys of O(1) values: rounding stays well below 1e-5
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.double(), want_probs, atol=1e-6, rtol=1e-5)
    assert_probs_sane(probs, lens, G, T, causal, atol=1e-5)
    # the empty row gives zeros, not NaN
    assert torch.equal(out[0, :G], torch.zeros_like(out[0, :G]))


@pytest.mark.parametrize("D", [16, 64, 40])
def test_reference_head_dims_and_no_probs(D):
    q, kp, vp, table, lens = make_case(2, 2, 4, 1, D, 16, [5, 0, 33, 16])
    out, probs = paged_decode_attention(q, kp, vp, table, lens, backend="reference")
    assert probs is None
    want_out, _ = naive_attention(q, kp, vp, table, lens, D ** -0.5, True)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)


def test_reference_is_order_invariant_except_new_tokens():
    # compaction permutes cached tokens inside a row: the output must not change, and probs follow the tokens
    T, ps = 3, 4
    q, kp, vp, table, lens = make_case(1, 1, 2, T, 16, ps, [23])
    out, probs = paged_decode_attention(q, kp, vp, table, lens, return_probs=True, backend="reference")
    n = 23 - T
    perm = torch.randperm(n)
    j = torch.arange(n)
    src = (table[0, 0, perm // ps].long(), perm % ps)
    dst = (table[0, 0, j // ps].long(), j % ps)
    kp2, vp2 = kp.clone(), vp.clone()
    kp2[dst], vp2[dst] = kp[src], vp[src]
    out2, probs2 = paged_decode_attention(q, kp2, vp2, table, lens, return_probs=True, backend="reference")
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(probs2[0, 0, :n], probs[0, 0, perm], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(probs2[0, 0, n:], probs[0, 0, n:], atol=1e-7, rtol=1e-6)


def test_reference_causal_differs_from_full_only_for_early_queries():
    q, kp, vp, table, lens = make_case(1, 1, 1, 3, 16, 16, [10])
    causal, _ = paged_decode_attention(q, kp, vp, table, lens, causal=True, backend="reference")
    full, _ = paged_decode_attention(q, kp, vp, table, lens, causal=False, backend="reference")
    assert torch.equal(causal[:, :, 2], full[:, :, 2])        # the last query sees everything either way
    assert not torch.allclose(causal[:, :, 0], full[:, :, 0])  # the first one does not see the two after it


def test_no_pages_at_all():
    q = torch.randn(2, 4, 1, 16)
    kp = torch.empty(0, 16, 16)
    table = torch.empty(2, 2, 0, dtype=torch.int32)
    lens = torch.zeros(2, 2, dtype=torch.int32)
    out, probs = paged_decode_attention(q, kp, kp, table, lens, return_probs=True, backend="reference")
    assert torch.equal(out, torch.zeros_like(q)) and probs.shape == (2, 2, 0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_no_queries(backend):
    device = devices_for_triton()[0] if backend == "triton" else "cpu"
    q, kp, vp, table, lens = make_case(2, 2, 2, 1, 16, 16, [3, 9, 0, 16], device=device)
    out, probs = paged_decode_attention(q[:, :, :0], kp, vp, table, lens, return_probs=True, backend=backend)
    assert out.shape == (2, 4, 0, 16)
    assert torch.equal(probs, torch.zeros(2, 2, table.shape[-1] * 16, device=device))


def test_default_num_splits_uses_capacity_only():
    assert default_num_splits(64, 8, torch.device("cpu")) == 1
    assert default_num_splits(0, 8, torch.device("cpu")) == 1
    # each split keeps at least four 64-slot tiles
    assert default_num_splits(32768, 1, torch.device("cpu"), 64) <= 32768 // 256


# --------------------------------------------------------------------------------------- Triton vs reference

# (device type, dtype) -> (atol, rtol) of out against the fp32 reference. Both paths accumulate in fp32 in the
# interpreter and for fp32 on CUDA (IEEE dot, no TF32): only the summation order differs (online softmax,
# split merge), a few fp32 ulps of O(1) values -> 1e-5. For fp16 in the interpreter both paths compute in
# fp32 from the same fp16 inputs and round the output to fp16 once: at most one fp16 ulp of |out| < 2
# (2**-10 ~ 9.8e-4) apart -> 1e-3. On CUDA fp16/bf16 the kernel rounds p to the input dtype before p @ V
# (as flash attention does): error <= eps * max|v| (~4 for randn) plus one output ulp -> fp16 4e-3, bf16 3e-2.
OUT_TOL = {
    ("cpu", torch.float32): (1e-5, 1e-5), ("cuda", torch.float32): (1e-5, 1e-5),
    ("cpu", torch.float16): (1e-3, 1e-3), ("cuda", torch.float16): (4e-3, 4e-3),
    ("cuda", torch.bfloat16): (3e-2, 3e-2),
}
# Logits come from the same inputs with fp32 accumulation on both paths (fp16/bf16 products are exact in
# fp32), so probabilities differ by fp32 rounding only; per slot the sum over G*T <= 24 rows -> 2e-5.
PROBS_ATOL = 2e-5

TRITON_CASES = [  # G, T, D, page_size, causal, num_splits, table dtype
    (1, 1, 16, 16, True, 1, torch.int32),
    (4, 1, 64, 16, True, 3, torch.int32),
    (3, 3, 40, 17, True, 2, torch.int64),
    (8, 3, 16, 1, False, 4, torch.int32),
    (4, 3, 64, 17, False, None, torch.int32),
    (1, 3, 80, 1, True, 5, torch.int64),
]


def check_triton_vs_reference(device, dtype, G, T, D, page_size, causal, num_splits, table_dtype,
                              lengths=LENGTHS, B=2, Hkv=2, seed=0):
    q, kp, vp, table, lens = make_case(B, Hkv, G, T, D, page_size, lengths, dtype=dtype, device=device,
                                       table_dtype=table_dtype, seed=seed)
    out, probs = paged_decode_attention(q, kp, vp, table, lens, causal=causal, return_probs=True,
                                        num_splits=num_splits, backend="triton")
    ref_out, ref_probs = paged_decode_attention_ref(q, kp, vp, table, lens, causal=causal, return_probs=True)
    atol, rtol = OUT_TOL[(torch.device(device).type, dtype)]
    assert out.dtype == dtype and out.shape == q.shape and probs.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(probs, ref_probs, atol=PROBS_ATOL, rtol=0)
    assert_probs_sane(probs, lens, G, T, causal, atol=1e-4)
    # the score side-output must not change the attention output, bit for bit
    out_only, none = paged_decode_attention(q, kp, vp, table, lens, causal=causal, num_splits=num_splits,
                                            backend="triton")
    assert none is None and torch.equal(out_only, out)
    return out


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("G,T,D,page_size,causal,num_splits,table_dtype", TRITON_CASES)
def test_triton_matches_reference(device, dtype, G, T, D, page_size, causal, num_splits, table_dtype):
    check_triton_vs_reference(device, dtype, G, T, D, page_size, causal, num_splits, table_dtype)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_split_count_does_not_matter(device):
    # more splits than tiles (clamped), and splits that start past the short rows' lengths
    q, kp, vp, table, lens = make_case(2, 2, 4, 1, 16, 16, [3, 130, 0, 64], device=device)
    ref_out, ref_probs = paged_decode_attention_ref(q, kp, vp, table, lens, return_probs=True)
    for splits in (1, 2, 3, 50):
        out, probs = paged_decode_attention(q, kp, vp, table, lens, return_probs=True, num_splits=splits,
                                            backend="triton")
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)  # fp32 reordering only (see OUT_TOL)
        torch.testing.assert_close(probs, ref_probs, atol=PROBS_ATOL, rtol=0)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_many_query_rows(device):
    # G*T = 72 query rows per kv head: more than one BLOCK_M block of rows (and of probs rows)
    check_triton_vs_reference(device, torch.float32, 8, 9, 16, 16, True, 2, torch.int32)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_strided_inputs(device):
    G, T, D, ps = 2, 3, 32, 16
    q, kp, vp, table, lens = make_case(2, 2, G, T, D, ps, [40, 7, 19, 2], device=device, table_dtype=torch.int64)
    # pools embedded in wider storage (page and slot strides differ from a dense pool), q with permuted
    # strides, page table and lengths as non-contiguous views
    kp_wide = torch.full((kp.shape[0], ps, 3 * D), float("nan"), device=device)
    vp_wide = torch.full((kp.shape[0], ps + 2, D), float("nan"), device=device)
    kp_wide[..., D:2 * D] = kp
    vp_wide[:, 1:ps + 1] = vp
    kp_s, vp_s = kp_wide[..., D:2 * D], vp_wide[:, 1:ps + 1]
    q_s = q.transpose(1, 2).contiguous().transpose(1, 2)
    table_s = table.transpose(0, 1).contiguous().transpose(0, 1)
    lens_s = lens.t().contiguous().t()
    assert not (q_s.is_contiguous() or kp_s.is_contiguous() or vp_s.is_contiguous() or table_s.is_contiguous()
                or lens_s.is_contiguous())
    out, probs = paged_decode_attention(q_s, kp_s, vp_s, table_s, lens_s, return_probs=True, num_splits=2,
                                        backend="triton")
    ref_out, ref_probs = paged_decode_attention_ref(q, kp, vp, table, lens, return_probs=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)  # fp32 reordering only (see OUT_TOL)
    torch.testing.assert_close(probs, ref_probs, atol=PROBS_ATOL, rtol=0)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_rows_without_keys(device):
    # every row empty, or too short for the early causal queries: zeros, never NaN
    for lengths in ([0, 0, 0, 0], [1, 2, 0, 1]):
        q, kp, vp, table, lens = make_case(2, 2, 3, 3, 16, 16, lengths, device=device)
        out, probs = paged_decode_attention(q, kp, vp, table, lens, return_probs=True, num_splits=2,
                                            backend="triton")
        ref_out, ref_probs = paged_decode_attention_ref(q, kp, vp, table, lens, return_probs=True)
        assert not out.isnan().any() and not probs.isnan().any()
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs, ref_probs, atol=PROBS_ATOL, rtol=0)
        assert_probs_sane(probs, lens, 3, 3, True, atol=1e-4)


# ------------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("G,T,D,page_size,causal,num_splits,table_dtype", TRITON_CASES)
def test_triton_bf16_gpu(G, T, D, page_size, causal, num_splits, table_dtype):
    check_triton_vs_reference("cuda", torch.bfloat16, G, T, D, page_size, causal, num_splits, table_dtype)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_long_cache_default_splits_gpu(dtype):
    # thousands of slots: the default split count is > 1 on a GPU
    lengths = [4099, 17, 2500, 3]
    check_triton_vs_reference("cuda", dtype, 4, 1, 128, 16, True, None, torch.int32, lengths=lengths)


@pytest.mark.gpu
@pytest.mark.triton
def test_triton_never_syncs_gpu():
    q, kp, vp, table, lens = make_case(2, 2, 4, 1, 64, 16, LENGTHS, dtype=torch.float16, device="cuda")
    paged_decode_attention(q, kp, vp, table, lens, return_probs=True)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, probs = paged_decode_attention(q, kp, vp, table, lens, return_probs=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == q.shape and probs.shape == (2, 2, table.shape[-1] * 16)


# --------------------------------------------------------------------------------------- registration


def _op_args(backend, device="cpu"):
    q, kp, vp, table, lens = make_case(1, 2, 2, 3, 16, 16, [5, 20], device=device)
    kp, vp = kp.nan_to_num(), vp.nan_to_num()  # opcheck compares outputs with NaN-sensitive checks
    return (q, kp, vp, table, lens, 0.25, True, True, 2, backend)


def test_opcheck_reference():
    torch.library.opcheck(torch.ops.kvpress_kernels.paged_decode_attention.default, _op_args("reference"))


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_opcheck_triton(device):
    torch.library.opcheck(torch.ops.kvpress_kernels.paged_decode_attention.default, _op_args("triton", device))


def test_torch_compile_fullgraph():
    q, kp, vp, table, lens = make_case(2, 2, 2, 1, 16, 16, [5, 20, 0, 9])

    def step(q, kp, vp, table, lens):
        out, probs = paged_decode_attention(q, kp, vp, table, lens, return_probs=True, backend="reference")
        return out * 2, probs.sum(-1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    want = step(q, kp, vp, table, lens)
    got = compiled(q, kp, vp, table, lens)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------ bad inputs


def _good():
    return make_case(2, 2, 2, 1, 16, 16, [3, 9, 0, 16])


def _call(q, kp, vp, table, lens, **kw):
    kw.setdefault("backend", "reference")
    return paged_decode_attention(q, kp, vp, table, lens, **kw)


def test_bad_rank():
    q, kp, vp, table, lens = _good()
    with pytest.raises(ValueError, match="q"):
        _call(q[0], kp, vp, table, lens)
    with pytest.raises(ValueError, match="k_pages"):
        _call(q, kp[0], vp, table, lens)
    with pytest.raises(ValueError, match="page_table"):
        _call(q, kp, vp, table[0], lens)
    with pytest.raises(ValueError, match="lengths"):
        _call(q, kp, vp, table, lens[0])


def test_bad_dtype():
    q, kp, vp, table, lens = _good()
    with pytest.raises(TypeError, match="q"):
        _call(q.to(torch.float64), kp, vp, table, lens)
    with pytest.raises(TypeError, match="k_pages"):
        _call(q, kp.half(), vp, table, lens)
    with pytest.raises(TypeError, match="v_pages"):
        _call(q, kp, vp.half(), table, lens)
    with pytest.raises(TypeError, match="page_table"):
        _call(q, kp, vp, table.float(), lens)
    with pytest.raises(TypeError, match="lengths"):
        _call(q, kp, vp, table, lens.float())


def test_bad_device():
    q, kp, vp, table, lens = _good()
    with pytest.raises(ValueError, match="k_pages"):
        _call(q, kp.to("meta"), vp, table, lens)
    with pytest.raises(ValueError, match="page_table"):
        _call(q, kp, vp, table.to("meta"), lens)
    with pytest.raises(ValueError, match="lengths"):
        _call(q, kp, vp, table, lens.to("meta"))


def test_bad_shape():
    q, kp, vp, table, lens = _good()
    with pytest.raises(ValueError, match="k_pages"):
        _call(q, kp[..., :8], vp, table, lens)                        # head_dim differs from q's
    with pytest.raises(ValueError, match="v_pages"):
        _call(q, kp, vp[:, :8], table, lens)
    with pytest.raises(ValueError, match="page_table"):
        _call(q, kp, vp, table[:1], lens)                             # batch differs from q's
    with pytest.raises(ValueError, match="kv heads of page_table"):
        _call(q[:, :3], kp, vp, table, lens)                          # 3 query heads over 2 kv heads
    with pytest.raises(ValueError, match="lengths"):
        _call(q, kp, vp, table, lens[:, :1])
    with pytest.raises(ValueError, match="q"):
        _call(torch.randn(2, 4, 1, 32)[..., ::2], kp, vp, table, lens)   # head_dim not unit-strided
    with pytest.raises(ValueError, match="q"):
        _call(q[..., :0], kp[..., :0], vp[..., :0], table, lens)     # head_dim 0


def test_bad_values():
    q, kp, vp, table, lens = _good()
    bad = lens.clone()
    bad[0, 0] = table.shape[-1] * 16 + 1                           # more tokens than the row's pages hold
    with pytest.raises(ValueError, match="lengths"):
        _call(q, kp, vp, table, bad)
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="lengths"):
        _call(q, kp, vp, table, bad)
    bad_table = table.clone()
    bad_table[1, 1, 0] = kp.shape[0]                               # a page that holds tokens, out of range
    with pytest.raises(ValueError, match="page_table"):
        _call(q, kp, vp, bad_table, lens)


def test_bad_options():
    q, kp, vp, table, lens = _good()
    with pytest.raises(ValueError, match="num_splits"):
        _call(q, kp, vp, table, lens, num_splits=0)
    with pytest.raises(TypeError, match="num_splits"):
        _call(q, kp, vp, table, lens, num_splits=1.5)
    with pytest.raises(TypeError, match="scale"):
        _call(q, kp, vp, table, lens, scale="0.1")
    with pytest.raises(ValueError, match="scale"):
        _call(q, kp, vp, table, lens, scale=float("inf"))
    with pytest.raises(TypeError, match="causal"):
        _call(q, kp, vp, table, lens, causal=1)
    with pytest.raises(TypeError, match="return_probs"):
        _call(q, kp, vp, table, lens, return_probs="yes")
    with pytest.raises(ValueError, match="backend"):
        _call(q, kp, vp, table, lens, backend="bogus")


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_rejects_huge_head_dim(device):
    q, kp, vp, table, lens = make_case(1, 1, 1, 1, 264, 4, [3], device=device)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(q, kp, vp, table, lens, backend="triton")
