"""The torch-free CUDA extension ``kvpress_kernels._C`` and its wrappers (``kvpress_kernels._cuda``).

CPU (always): the extension is importable wherever nvcc exists (CI builds it); its status codes
and messages; the wrappers' input errors; and the kernels' index math - compaction plan, 32-ary warp
search, order-preserving keys, radix select with early exit and tie rule - run on the host from the
same C++ source as the kernels (csrc/host_checks.cpp) and compared with the PyTorch references and
with independent naive formulas.

GPU (``@pytest.mark.gpu``): compact_cuda and select_topk_cuda equal the references exactly on random
ragged inputs, across vector widths, dtypes, index widths, strides and both selection paths.
"""

from __future__ import annotations

import math
import random
import shutil
import struct

import pytest
import torch

from kvpress_kernels import _cuda
from kvpress_kernels._backend import cuda_ext_status

NVCC = shutil.which("nvcc")


@pytest.fixture(scope="module")
def ext():
    """The built extension. Missing is a failure wherever nvcc exists (the package then builds it);
    only a machine without nvcc, where no build is possible, skips with the recorded reason."""
    mod, why = cuda_ext_status()
    if mod is None:
        if NVCC is None:
            pytest.skip(f"no nvcc on this machine, so no extension to test: {why}")
        pytest.fail(f"nvcc is at {NVCC} but the extension is not importable: {why}")
    return mod


# --------------------------------------------------------------------------------------------------
# Build, import, status codes
# --------------------------------------------------------------------------------------------------

def test_extension_importable_when_nvcc_present():
    mod, why = cuda_ext_status()
    if NVCC is None:
        # A pure-Python install: the reason must say what to do.
        assert mod is not None or "nvcc" in why, why
        return
    assert mod is not None, f"nvcc at {NVCC} but kvpress_kernels._C is not built: {why}"
    assert mod.ABI_VERSION == 2
    assert "built" in why


def test_device_count_matches_torch(ext):
    # 0 on a machine without a GPU: importing and querying must not raise there.
    assert ext.device_count() == torch.cuda.device_count()


def test_status_strings(ext):
    assert ext.status_string(ext.STATUS_OK) == "success"
    assert "invalid argument" in ext.status_string(ext.STATUS_INVALID_ARGUMENT)
    assert "unsupported dtype" in ext.status_string(ext.STATUS_UNSUPPORTED_DTYPE)
    assert "no CUDA device" in ext.status_string(ext.STATUS_NO_DEVICE)
    # CUDA runtime errors travel as base + cudaError_t; the message names the error (2 = out of memory).
    msg = ext.status_string(ext.STATUS_CUDA_ERROR_BASE + 2)
    assert "cudaErrorMemoryAllocation" in msg and "out of memory" in msg
    assert ext.status_string(999) == "unknown status code"


def test_check_status_raises_runtime_error_naming_op_and_cause(ext):
    _cuda._check_status("compact_cuda", ext.STATUS_OK, ext)  # no error
    with pytest.raises(RuntimeError, match=r"compact_cuda failed .*no CUDA device"):
        _cuda._check_status("compact_cuda", ext.STATUS_NO_DEVICE, ext)
    with pytest.raises(RuntimeError, match=r"select_topk_cuda failed .*cudaErrorMemoryAllocation"):
        _cuda._check_status("select_topk_cuda", ext.STATUS_CUDA_ERROR_BASE + 2, ext)


_FAKE = 1 << 12  # an aligned address that is never dereferenced (host checks fail first, or no device)


def _compact_raw(ext, *, elem_bytes=2, table_bytes=4, lengths_bytes=4, kept_bytes=4, rows=1, max_kept=4,
                 page_size=16, head_dim=8, lengths=_FAKE):
    return ext.compact_paged(_FAKE, 128, 8, head_dim, _FAKE, 128, 8, head_dim, elem_bytes, page_size,
                             0, 0, 0, 4, _FAKE, 2, 1, table_bytes, lengths, 1, lengths_bytes,
                             _FAKE, 4, 1, kept_bytes, rows, max_kept, 0)


def _select_raw(ext, *, score_dtype=0, budgets_bytes=4, kept_bytes=4, rows=1, cols=8, max_kept=4, sink=0):
    return ext.select_topk(_FAKE, cols, 1, score_dtype, _FAKE, 1, budgets_bytes, _FAKE, 1, 4, 0, 0, 0, sink, 0,
                           _FAKE, cols, 1, _FAKE, max_kept, 1, kept_bytes, rows, cols, max_kept, 0, 0)


def test_launchers_reject_bad_arguments_before_touching_the_device(ext):
    # Host-side checks run first, so these are safe on any machine.
    assert _compact_raw(ext, elem_bytes=8) == ext.STATUS_UNSUPPORTED_DTYPE
    assert _compact_raw(ext, elem_bytes=1) == ext.STATUS_UNSUPPORTED_DTYPE
    assert _compact_raw(ext, table_bytes=2) == ext.STATUS_UNSUPPORTED_DTYPE
    assert _compact_raw(ext, lengths_bytes=1) == ext.STATUS_UNSUPPORTED_DTYPE
    assert _compact_raw(ext, kept_bytes=16) == ext.STATUS_UNSUPPORTED_DTYPE
    assert _compact_raw(ext, rows=-1) == ext.STATUS_INVALID_ARGUMENT
    assert _compact_raw(ext, max_kept=-1) == ext.STATUS_INVALID_ARGUMENT
    assert _compact_raw(ext, page_size=0) == ext.STATUS_INVALID_ARGUMENT
    assert _compact_raw(ext, lengths=0) == ext.STATUS_INVALID_ARGUMENT
    assert _compact_raw(ext, rows=0) == ext.STATUS_OK  # nothing to launch
    assert _select_raw(ext, score_dtype=7) == ext.STATUS_UNSUPPORTED_DTYPE
    assert _select_raw(ext, budgets_bytes=2) == ext.STATUS_UNSUPPORTED_DTYPE
    assert _select_raw(ext, kept_bytes=1) == ext.STATUS_UNSUPPORTED_DTYPE
    assert _select_raw(ext, cols=-1) == ext.STATUS_INVALID_ARGUMENT
    assert _select_raw(ext, sink=-1) == ext.STATUS_INVALID_ARGUMENT
    assert _select_raw(ext, rows=0) == ext.STATUS_OK


def test_launchers_report_no_device_without_a_gpu(ext):
    if ext.device_count() > 0:
        # With a GPU the fake pointers would be dereferenced: check the no-work path instead.
        assert _compact_raw(ext, rows=0) == ext.STATUS_OK
        return
    assert _compact_raw(ext) == ext.STATUS_NO_DEVICE
    assert _select_raw(ext) == ext.STATUS_NO_DEVICE


# --------------------------------------------------------------------------------------------------
# Wrapper input errors (TypeError / ValueError naming the argument)
# --------------------------------------------------------------------------------------------------

def _compact_args(device="cpu", dtype=torch.float16, idx=torch.int32):
    k = torch.zeros(6, 4, 8, dtype=dtype, device=device)
    v = torch.zeros(6, 4, 8, dtype=dtype, device=device)
    table = torch.arange(6, dtype=idx, device=device).reshape(2, 3)
    lengths = torch.tensor([5, 9], dtype=idx, device=device)
    kept = torch.tensor([[0, 3, -1], [1, 2, 8]], dtype=idx, device=device)
    return [k, v, table, lengths, kept, None]


def test_compact_cuda_on_cpu_tensors_names_the_device():
    with pytest.raises(ValueError, match=r"k_pages must be a CUDA tensor .*device cpu"):
        _cuda.compact_cuda(*_compact_args())


@pytest.mark.parametrize("which,bad,exc,match", [
    (0, lambda a: a[0][0], ValueError, "k_pages must have 3 dimensions"),
    (0, lambda a: a[0].to(torch.float64), TypeError, "k_pages must have dtype"),
    (0, lambda a: a[0].transpose(1, 2), ValueError, "k_pages must have a unit stride"),
    (1, lambda a: a[1].to(torch.float32), TypeError, "v_pages must have dtype"),
    (1, lambda a: a[1][:, :2], ValueError, r"v_pages must have shape \[6, 4, \*\]"),
    (2, lambda a: a[2].reshape(-1), ValueError, "page_table must have 2 dimensions"),
    (2, lambda a: a[2].float(), TypeError, "page_table must have dtype"),
    (3, lambda a: a[3][:1], ValueError, r"lengths must have shape \[2\]"),
    (3, lambda a: a[3].to(torch.int16), TypeError, "lengths must have dtype"),
    (4, lambda a: a[4][:1], ValueError, r"kept_idx must have shape \[2, \*\]"),
    (4, lambda a: a[4].reshape(-1), ValueError, "kept_idx must have 2 dimensions"),
    (5, lambda a: torch.zeros(6, 5, dtype=torch.int32), ValueError, r"pos_pages must have shape \[6, 4\]"),
    (5, lambda a: torch.zeros(6, 4, dtype=torch.float32), TypeError, "pos_pages must have dtype"),
    (0, lambda a: "not a tensor", TypeError, "k_pages must be a torch.Tensor"),
])
def test_compact_cuda_bad_inputs(which, bad, exc, match):
    args = _compact_args()
    args[which] = bad(args)
    with pytest.raises(exc, match=match):
        _cuda.compact_cuda(*args)


def _select_args(device="cpu"):
    scores = torch.randn(3, 10, device=device)
    budgets = torch.tensor([2, 4, 6], dtype=torch.int32, device=device)
    lengths = torch.tensor([10, 7, 0], dtype=torch.int32, device=device)
    keep = torch.empty(3, 10, dtype=torch.bool, device=device)
    kept = torch.empty(3, 6, dtype=torch.int32, device=device)
    return [scores, budgets, lengths, 1, 2, None, keep, kept]


def test_select_topk_cuda_on_cpu_tensors_names_the_device():
    with pytest.raises(ValueError, match=r"scores must be a CUDA tensor .*device cpu"):
        _cuda.select_topk_cuda(*_select_args())


@pytest.mark.parametrize("which,bad,exc,match", [
    (0, lambda a: a[0][0], ValueError, "scores must have 2 dimensions"),
    (0, lambda a: a[0].double(), TypeError, "scores must have dtype"),
    (1, lambda a: a[1][:2], ValueError, r"budgets must have shape \[3\]"),
    (1, lambda a: a[1].float(), TypeError, "budgets must have dtype"),
    (2, lambda a: a[2].reshape(3, 1), ValueError, "lengths must have 1 dimensions"),
    (3, lambda a: -1, ValueError, "sink must be >= 0"),
    (4, lambda a: 2.5, TypeError, "recent must be an int"),
    (5, lambda a: torch.zeros(3, 10), TypeError, "protect must have dtype"),
    (5, lambda a: torch.zeros(3, 9, dtype=torch.bool), ValueError, r"protect must have shape \[3, 10\]"),
    (6, lambda a: a[6].int(), TypeError, "keep_mask_out must have dtype"),
    (7, lambda a: a[7][:2], ValueError, r"kept_idx_out must have shape \[3, \*\]"),
    (7, lambda a: a[7].float(), TypeError, "kept_idx_out must have dtype"),
])
def test_select_topk_cuda_bad_inputs(which, bad, exc, match):
    args = _select_args()
    args[which] = bad(args)
    with pytest.raises(exc, match=match):
        _cuda.select_topk_cuda(*args)


# --------------------------------------------------------------------------------------------------
# The kernels' index math, run on the host from the same source
# --------------------------------------------------------------------------------------------------

def _naive_plan(kept: list[int]) -> tuple[int, list[int], list[int]]:
    """Straight from the definition: holes = non-kept slots < n, sources = kept slots >= n."""
    valid = [a for a in kept if a >= 0]
    n = len(valid)
    kept_set = set(valid)
    holes = [s for s in range(n) if s not in kept_set]
    sources = [a for a in valid if a >= n]
    assert len(holes) == len(sources)
    return n, sources, holes


def _random_kept(rng: random.Random, length: int, K: int) -> list[int]:
    n = rng.randint(0, min(length, K))
    mode = rng.random()
    if mode < 0.2:
        chosen = list(range(length - n, length))  # keep the tail: every kept slot moves
    elif mode < 0.3:
        chosen = list(range(n))  # keep the head: nothing moves
    else:
        chosen = sorted(rng.sample(range(length), n))
    return chosen + [-1] * (K - n)


@pytest.mark.parametrize("K", [0, 1, 2, 31, 32, 33, 97, 1024, 1025, 3000])
def test_host_compaction_plan_matches_naive_plan(ext, K):
    rng = random.Random(K)
    for trial in range(40):
        length = rng.randint(0, 2 * K + 5)
        kept = _random_kept(rng, length, K)
        n, src, dst = ext.host_compaction_plan(kept)
        assert (n, src, dst) == _naive_plan(kept), f"K={K} trial={trial} kept={kept[:40]}"


def test_host_compaction_plan_matches_reference_plan(ext):
    from kvpress_kernels.ops.compaction import compaction_plan_ref

    rng = random.Random(7)
    rows, K = 64, 111
    kept_rows = [_random_kept(rng, rng.randint(0, 300), K) for _ in range(rows)]
    kept = torch.tensor(kept_rows, dtype=torch.int32)
    src_ref, dst_ref, row_ref = compaction_plan_ref(kept, torch.zeros(rows, dtype=torch.int32))
    src, dst, row = [], [], []
    for r, kr in enumerate(kept_rows):
        _, s, d = ext.host_compaction_plan(kr)
        src += s
        dst += d
        row += [r] * len(s)
    assert src_ref.tolist() == src and dst_ref.tolist() == dst and row_ref.tolist() == row


def test_host_compaction_plan_leaves_exactly_the_kept_tokens(ext):
    rng = random.Random(3)
    for _ in range(200):
        length = rng.randint(0, 200)
        kept = _random_kept(rng, length, rng.randint(length // 2, length + 3) if length else 3)
        n, src, dst = ext.host_compaction_plan(kept)
        slots = list(range(length))  # slot s holds token s
        assert not set(src) & set(dst)  # sources and holes are disjoint: no ordering needed
        for s, d in zip(src, dst):
            slots[d] = slots[s]
        assert sorted(slots[:n]) == [a for a in kept if a >= 0]


def _naive_order_key(x: float) -> int:
    """uint32 key from the definition: NaN lowest, -0 == +0, bits flipped below zero."""
    if math.isnan(x):
        return 0
    if x == 0.0:
        x = 0.0
    (u,) = struct.unpack("<I", struct.pack("<f", x))
    return (~u & 0xFFFFFFFF) if u >> 31 else (u | 0x80000000)


def test_host_order_key_orders_floats(ext):
    f32 = lambda x: struct.unpack("<f", struct.pack("<f", x))[0]  # noqa: E731
    tiny = struct.unpack("<f", struct.pack("<I", 1))[0]  # smallest denormal
    ordered = [-math.inf, -3.4028234663852886e38, -1.5, -1.0, -tiny, 0.0, tiny, 1e-30, 1.0, f32(1.0000001),
               3.4028234663852886e38, math.inf]
    keys = [ext.host_order_key(x) for x in ordered]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert ext.host_order_key(-0.0) == ext.host_order_key(0.0) == 0x80000000
    nans = [struct.unpack("<f", struct.pack("<I", b))[0] for b in (0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF)]
    assert [ext.host_order_key(x) for x in nans] == [0, 0, 0, 0]
    assert ext.host_order_key(-math.inf) > 0  # NaN is strictly below -inf


def test_host_order_key_matches_reference_keys(ext):
    from kvpress_kernels.ops.selection import order_keys

    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-2 ** 31, 2 ** 31, (4000,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0]).view(torch.int32)
    x = torch.cat([bits, special]).view(torch.float32)
    ours = [ext.host_order_key(v) for v in x.tolist()]
    assert ours == [_naive_order_key(v) for v in x.tolist()]
    # The reference's int32 keys order as signed ints; ours are the same keys with the sign bit
    # flipped (the usual bias to unsigned).
    ref = ((order_keys(x).to(torch.int64) + 2 ** 31)).tolist()
    assert ours == ref


def _naive_select_row(scores, budget, length, sink, recent, protect, K):
    """Selection from the definition: sort candidates by (score desc, NaN last, position asc)."""
    N = len(scores)
    length = max(0, min(length, N))
    budget = max(0, min(budget, length))
    prot = [j < length and (j < sink or j >= length - recent or bool(protect and protect[j])) for j in range(N)]
    cands = [j for j in range(length) if not prot[j]]
    cands.sort(key=lambda j: (math.isnan(scores[j]), -scores[j] if not math.isnan(scores[j]) else 0.0, j))
    need = max(budget - sum(prot), 0)
    keep = [p for p in prot]
    for j in cands[:need]:
        keep[j] = True
    kept = [j for j in range(N) if keep[j]]
    return keep, (kept + [-1] * K)[:K]


_TIE_VALUES = [0.5, 0.25, 0.0, -0.0, -1.0, math.nan, -math.inf, math.inf, 1e-40]


def _random_row(rng: random.Random, N: int):
    style = rng.random()
    if style < 0.3:  # heavy ties, specials: all four radix passes and the tie rule
        scores = [rng.choice(_TIE_VALUES) for _ in range(N)]
    elif style < 0.5:  # ties in the low digits only
        base = rng.random()
        scores = [struct.unpack("<f", struct.pack("<I", (struct.unpack("<I", struct.pack("<f", base))[0] & ~0xF)
                                                  | rng.randint(0, 3)))[0] for _ in range(N)]
    else:  # distinct values: early exit in an upper digit
        scores = [struct.unpack("<f", struct.pack("<f", rng.gauss(0, 1)))[0] for _ in range(N)]
    length = rng.choice([N, rng.randint(0, N)])
    budget = rng.choice([0, length, length + 3, rng.randint(0, max(length, 1)), -2])
    sink = rng.choice([0, 0, 1, 4])
    recent = rng.choice([0, 0, 2, 7])
    protect = [rng.random() < 0.1 for _ in range(N)] if rng.random() < 0.5 else []
    return scores, budget, length, sink, recent, protect


@pytest.mark.parametrize("N", [1, 7, 17, 97, 111, 1025])
def test_host_select_row_matches_naive_and_reference(ext, N):
    from kvpress_kernels.ops.selection import select_topk_ref

    rng = random.Random(N)
    for trial in range(30 if N < 1000 else 8):
        scores, budget, length, sink, recent, protect = _random_row(rng, N)
        K = rng.choice([max(budget, 0), N, max(budget // 2, 0)])  # also K below the kept count
        total, keep, kept = ext.host_select_row(scores, budget, length, sink, recent, protect, K)
        want_keep, want_kept = _naive_select_row(scores, budget, length, sink, recent, protect, K)
        ctx = f"N={N} trial={trial} budget={budget} length={length} sink={sink} recent={recent}"
        assert keep == want_keep, ctx
        assert kept == want_kept, ctx
        assert total == sum(want_keep), ctx
        ref_keep, ref_kept = select_topk_ref(
            torch.tensor([scores], dtype=torch.float32), torch.tensor([budget]), lengths=torch.tensor([length]),
            sink=sink, recent=recent, protect=torch.tensor([protect]) if protect else None, max_budget=K)
        assert ref_keep[0].tolist() == keep, ctx
        assert ref_kept[0].tolist() == kept, ctx


def test_host_select_row_threshold_inside_nan_and_inf_region(ext):
    # The threshold lands among NaNs (key 1) and -inf: the lowest digits of the key space.
    scores = [math.nan, -math.inf, math.nan, 1.0, -math.inf, math.nan]
    for budget in range(7):
        total, keep, kept = ext.host_select_row(scores, budget, 6, 0, 0, [], 6)
        want_keep, want_kept = _naive_select_row(scores, budget, 6, 0, 0, [], 6)
        assert (keep, kept, total) == (want_keep, want_kept, budget)


# --------------------------------------------------------------------------------------------------
# GPU: the kernels against the references, exactly
# --------------------------------------------------------------------------------------------------

def _make_cache(R, page_size, dk, dv, dtype, idx, *, pad_k=0, gen):
    """Random ragged paged cache: every row owns distinct pages (a random permutation of the pool)."""
    max_pages = 5
    num_pages = R * max_pages + 3
    perm = torch.randperm(num_pages, generator=gen)[: R * max_pages].reshape(R, max_pages)
    lengths = torch.randint(0, max_pages * page_size + 1, (R,), generator=gen)
    k = torch.randn(num_pages, page_size, dk + pad_k, generator=gen).to(dtype)[..., :dk]  # strided when padded
    v = torch.randn(num_pages, page_size, dv, generator=gen).to(dtype)
    pos = torch.randint(0, 10 ** 6, (num_pages, page_size), generator=gen).to(idx)
    return k, v, perm.to(idx), lengths.to(idx), pos


def _random_kept_tensor(lengths, K, idx, gen):
    rows = []
    rng = random.Random(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    for L in lengths.tolist():
        rows.append(_random_kept(rng, L, K))
    return torch.tensor(rows, dtype=idx).reshape(len(rows), K)


# (dtype, dk, dv, pad_k, index dtype): every copy width the launcher can pick (noted per line),
# strided pools (pad_k > 0 slices a wider pool), different K and V head dims, both index widths.
_COMPACT_CASES = [
    (torch.bfloat16, 128, 128, 0, torch.int32),  # 16-byte chunks
    (torch.bfloat16, 64, 64, 8, torch.int64),    # 16, strided (slot stride 72)
    (torch.bfloat16, 4, 4, 0, torch.int32),      # 8
    (torch.bfloat16, 3, 3, 0, torch.int64),      # 2
    (torch.bfloat16, 96, 32, 1, torch.int32),    # 2 (slot stride 97), Dk != Dv
    (torch.float16, 128, 128, 0, torch.int64),   # 16
    (torch.float32, 128, 128, 0, torch.int32),   # 16
    (torch.float32, 64, 64, 8, torch.int64),     # 16, strided
    (torch.float32, 2, 2, 0, torch.int32),       # 8
    (torch.float32, 3, 3, 0, torch.int32),       # 4
    (torch.float32, 1, 1, 0, torch.int64),       # 4
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,dk,dv,pad_k,idx", _COMPACT_CASES)
def test_compact_cuda_matches_reference(ext, dtype, dk, dv, pad_k, idx):
    from kvpress_kernels.ops.compaction import compact_ref

    gen = torch.Generator().manual_seed(dk * 7 + dv + pad_k)
    for R, page_size, K in [(1, 16, 80), (7, 16, 97), (33, 4, 20), (5, 1, 5)]:
        k, v, table, lengths, pos = _make_cache(R, page_size, dk, dv, dtype, idx, pad_k=pad_k, gen=gen)
        kept = _random_kept_tensor(lengths, K, idx, gen)
        ref = [t.clone() for t in (k, v, lengths, pos)]
        compact_ref(ref[0], ref[1], table, ref[2], kept, ref[3])
        got = [t.cuda() for t in (k, v, lengths, pos)]
        if pad_k:  # keep the padded (strided) layout on the device
            full = torch.zeros(k.shape[0], page_size, dk + pad_k, dtype=dtype, device="cuda")
            full[..., :dk] = got[0]
            got[0] = full[..., :dk]
        _cuda.compact_cuda(got[0], got[1], table.cuda(), got[2], kept.cuda(), got[3])
        torch.cuda.synchronize()
        for name, r, g in zip(("k_pages", "v_pages", "lengths", "pos_pages"), ref, got):
            bad = (r.view(torch.int16 if r.element_size() == 2 else r.dtype) !=
                   g.cpu().view(torch.int16 if r.element_size() == 2 else r.dtype))
            assert not bad.any(), f"{name}: {int(bad.sum())} mismatches, first at {bad.nonzero()[0].tolist()}"


@pytest.mark.gpu
def test_compact_cuda_without_pos_and_with_empty_kept(ext):
    from kvpress_kernels.ops.compaction import compact_ref

    gen = torch.Generator().manual_seed(5)
    k, v, table, lengths, _ = _make_cache(9, 8, 128, 128, torch.bfloat16, torch.int32, gen=gen)
    kept = _random_kept_tensor(lengths, 40, torch.int32, gen)
    rk, rv, rl = k.clone(), v.clone(), lengths.clone()
    compact_ref(rk, rv, table, rl, kept)
    gk, gv, gl = k.cuda(), v.cuda(), lengths.cuda()
    _cuda.compact_cuda(gk, gv, table.cuda(), gl, kept.cuda())
    assert torch.equal(gk.cpu(), rk) and torch.equal(gv.cpu(), rv) and torch.equal(gl.cpu(), rl)
    # K = 0 empties every row and moves nothing.
    gk2 = gk.clone()
    _cuda.compact_cuda(gk, gv, table.cuda(), gl, torch.empty(9, 0, dtype=torch.int32, device="cuda"))
    assert gl.cpu().tolist() == [0] * 9 and torch.equal(gk, gk2)


@pytest.mark.gpu
def test_compact_cuda_rejects_mixed_devices(ext):
    args = _compact_args(device="cuda")
    args[3] = args[3].cpu()
    with pytest.raises(ValueError, match="lengths must be on device cuda"):
        _cuda.compact_cuda(*args)


def _random_scores(R, N, gen):
    """Scores with many ties, NaNs, infinities and signed zeros in some rows, distinct in others."""
    x = torch.randn(R, N, generator=gen)
    special = torch.tensor([0.5, 0.25, 0.0, -0.0, -1.0, math.nan, -math.inf, math.inf])
    tied = special[torch.randint(0, len(special), (R, N), generator=gen)]
    use_tied = torch.rand(R, 1, generator=gen) < 0.4
    return torch.where(use_tied, tied, x)


@pytest.mark.gpu
@pytest.mark.parametrize("N,dtype", [(1, torch.float32), (7, torch.float32), (97, torch.float32),
                                     (1025, torch.float32), (9001, torch.float32),  # 9001: three tiles
                                     (5000, torch.bfloat16), (4096, torch.float16)])
@pytest.mark.parametrize("smem_cache", [True, False])
def test_select_topk_cuda_matches_reference(ext, N, dtype, smem_cache):
    from kvpress_kernels.ops.selection import select_topk_ref

    gen = torch.Generator().manual_seed(N)
    R = 13
    scores = _random_scores(R, N, gen).to(dtype)
    lengths = torch.where(torch.rand(R, generator=gen) < 0.5, torch.full((R,), N),
                          torch.randint(0, N + 1, (R,), generator=gen)).to(torch.int32)
    budgets = (torch.rand(R, generator=gen) * (lengths.float() + 4)).to(torch.int32) - 1  # some < 0, some > len
    protect = torch.rand(R, N, generator=gen) < 0.05
    for sink, recent, prot, K in [(0, 0, None, N), (3, 5, protect, N), (1, 0, protect, max(N // 3, 1)), (0, 2, None, 0)]:
        ref_keep, ref_kept = select_topk_ref(scores.float(), budgets, lengths=lengths, sink=sink, recent=recent,
                                             protect=prot, max_budget=K)
        keep = torch.empty(R, N, dtype=torch.bool, device="cuda")
        kept = torch.full((R, K), 12345, dtype=torch.int32, device="cuda")
        _cuda.select_topk_cuda(scores.cuda(), budgets.cuda(), lengths.cuda(), sink, recent,
                               prot.cuda() if prot is not None else None, keep, kept, smem_cache=smem_cache)
        ctx = f"N={N} sink={sink} recent={recent} K={K}"
        bad = keep.cpu() != ref_keep
        assert not bad.any(), f"{ctx}: keep_mask differs at {int(bad.sum())} places, first {bad.nonzero()[0].tolist()}"
        bad = kept.cpu() != ref_kept
        assert not bad.any(), f"{ctx}: kept_idx differs at {int(bad.sum())} places, first {bad.nonzero()[0].tolist()}"


@pytest.mark.gpu
def test_select_topk_cuda_strided_inputs_and_int64_outputs(ext):
    from kvpress_kernels.ops.selection import select_topk_ref

    gen = torch.Generator().manual_seed(11)
    R, N, K = 6, 300, 120
    big = _random_scores(R, 2 * N, gen).cuda()
    scores = big[:, ::2]  # column stride 2
    budgets = torch.randint(0, N, (R,), generator=gen).to(torch.int64)
    lengths = torch.randint(0, N + 1, (R,), generator=gen).to(torch.int64)
    keep_full = torch.zeros(R, N + 5, dtype=torch.bool, device="cuda")
    keep = keep_full[:, :N]  # row stride N + 5
    kept = torch.empty(R, K, dtype=torch.int64, device="cuda")
    _cuda.select_topk_cuda(scores, budgets.cuda(), lengths.cuda(), 2, 3, None, keep, kept)
    ref_keep, ref_kept = select_topk_ref(scores.cpu(), budgets, lengths=lengths, sink=2, recent=3, max_budget=K)
    assert torch.equal(keep.cpu(), ref_keep)
    assert torch.equal(kept.cpu(), ref_kept.to(torch.int64))
    assert not keep_full[:, N:].any()  # nothing written outside the view


@pytest.mark.gpu
def test_cuda_launches_do_not_sync_and_capture_in_a_graph(ext):
    gen = torch.Generator().manual_seed(2)
    R, N, K = 4, 500, 100
    scores = torch.randn(R, N, generator=gen).cuda()
    budgets = torch.full((R,), K, dtype=torch.int32, device="cuda")
    lengths = torch.full((R,), N, dtype=torch.int32, device="cuda")
    keep = torch.empty(R, N, dtype=torch.bool, device="cuda")
    kept = torch.empty(R, K, dtype=torch.int32, device="cuda")
    _cuda.select_topk_cuda(scores, budgets, lengths, 0, 0, None, keep, kept)  # warm-up (sets attributes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _cuda.select_topk_cuda(scores, budgets, lengths, 0, 0, None, keep, kept)
    keep.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(kept.cpu(), torch.topk(scores.cpu(), K, dim=1).indices.sort(dim=1).values.to(torch.int32))
    assert int(keep.sum()) == R * K
