"""segment_reduce / segments_to_token_mask: reference vs naive float64, Triton vs reference."""

import math

import pytest
import torch
from conftest import devices_for_triton

from kvpress_kernels.ops.segments import segment_reduce, segment_reduce_ref, segments_to_token_mask

U32 = 2.0 ** -24  # unit roundoff of fp32


# ------------------------------------------------------------------------------------------------
# Naive oracle: Python float64 (math.fsum is exact), explicit segment lists.
# ------------------------------------------------------------------------------------------------

def naive_segments(R, N, chunk_size=None, spans=None):
    """Per row, the list of (start, end) before clipping."""
    if chunk_size is not None:
        segs = [(s, min(s + chunk_size, N)) for s in range(0, N, chunk_size)]
        return [segs] * R
    sp = spans.tolist()
    return [sp] * R if spans.dim() == 2 else sp


def naive_reduce(scores, reduce, lengths=None, **seg):
    R, N = scores.shape
    x = scores.double().tolist()
    lens = [N] * R if lengths is None else lengths.tolist()
    out, abs_sum, count = [], [], []
    for r, segs in enumerate(naive_segments(R, N, **seg)):
        row, row_abs, row_n = [], [], []
        for a, b in segs:
            vals = x[r][min(a, lens[r]):min(b, lens[r])]
            if reduce == "max":
                v = float("nan") if any(math.isnan(t) for t in vals) else max(vals, default=float("-inf"))
            else:
                v = math.fsum(vals) if not any(math.isnan(t) for t in vals) else float("nan")
                if reduce == "mean":
                    v = v / len(vals) if vals else 0.0
            row.append(v)
            row_abs.append(math.fsum(abs(t) for t in vals if not math.isnan(t)))
            row_n.append(len(vals))
        out.append(row), abs_sum.append(row_abs), count.append(row_n)
    S = len(out[0]) if R else 0
    def t(v):
        return torch.tensor(v, dtype=torch.float64).reshape(R, S)

    return t(out), t(abs_sum), t(count)


def assert_close_to_exact(got, reduce, exact, abs_sum, count, what=""):
    """fp32 summation in ANY order (sequential, pairwise, tiled) of n terms errs by at most
    (n-1)·u·Σ|x| to first order; mean adds one rounding of the division. Max is exact."""
    got = got.double().cpu()
    assert got.shape == exact.shape
    nan_got, nan_want = torch.isnan(got), torch.isnan(exact)
    where = (nan_got != nan_want).nonzero()[:5].tolist()
    assert torch.equal(nan_got, nan_want), f"{what}: NaN pattern differs at {where}"
    g, e = got[~nan_got], exact[~nan_want]
    if reduce == "max":
        assert torch.equal(g, e), f"{what}: max differs at {(g != e).nonzero()[:5].tolist()}"
        return
    bound = (count - 1).clamp(min=0) * U32 * abs_sum * 1.01 + 1e-30
    if reduce == "mean":
        bound = bound / count.clamp(min=1) + U32 * exact.abs()
    bound = bound[~nan_want]
    err = (g - e).abs()
    bad = err > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} values off, worst err {float((err - bound).max())} over bound"


def _inputs(R, N, seed, dtype=torch.float32, nan=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(R, N, generator=gen) * 3 + 1).to(dtype)
    if nan and N > 4:
        x[R - 1, N // 2] = float("nan")
    lens = torch.randint(0, N + 1, (R,), generator=gen)
    lens[0] = N
    return x, lens


def _random_spans(N, S, gen):
    """Sorted, non-overlapping spans with gaps and empty ones."""
    cuts = torch.sort(torch.randint(0, N + 1, (2 * S,), generator=gen)).values
    return cuts.reshape(S, 2)


SEGMENTATIONS = [
    ("chunk", 1), ("chunk", 3), ("chunk", 10), ("chunk", 128), ("chunk", 300), ("chunk", 5000),
    ("spans", 1), ("spans", 6), ("rowspans", 5),
]


def _seg_kwargs(kind, arg, R, N, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "chunk":
        return dict(chunk_size=arg)
    if kind == "spans":
        return dict(spans=_random_spans(N, arg, gen))
    return dict(spans=torch.stack([_random_spans(N, arg, gen) for _ in range(R)]).int())


@pytest.mark.parametrize("N", [1, 7, 97, 1025])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("seg", range(len(SEGMENTATIONS)))
def test_segment_reduce_ref_vs_naive(N, reduce, seg):
    R = 3
    x, lens = _inputs(R, N, seed=N + seg, nan=seg % 3 == 0)
    kw = _seg_kwargs(*SEGMENTATIONS[seg], R, N, seed=N * 3 + seg)
    for lengths in (None, lens):
        got = segment_reduce(x, reduce=reduce, lengths=lengths, **kw)
        assert got.dtype == torch.float32
        exact, abs_sum, count = naive_reduce(x, reduce, lengths, **kw)
        assert_close_to_exact(got, reduce, exact, abs_sum, count, f"lengths={lengths is not None}")


def test_segment_reduce_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    assert segment_reduce(x, chunk_size=3, reduce="sum").tolist() == [[6.0, 15.0, 7.0]]
    assert segment_reduce(x, chunk_size=3, reduce="mean").tolist() == [[2.0, 5.0, 7.0]]
    lens = torch.tensor([4])
    assert segment_reduce(x, chunk_size=3, reduce="mean", lengths=lens).tolist() == [[2.0, 4.0, 0.0]]
    assert segment_reduce(x, chunk_size=3, reduce="max", lengths=lens).tolist() == [[3.0, 4.0, float("-inf")]]
    spans = torch.tensor([[0, 0], [1, 3], [5, 7]])
    assert segment_reduce(x, spans=spans, reduce="sum").tolist() == [[0.0, 5.0, 13.0]]
    assert segment_reduce(x, spans=spans, reduce="max", lengths=torch.tensor([6])).tolist() == [
        [float("-inf"), 3.0, 6.0]]
    assert segment_reduce(x, spans=torch.zeros(0, 2, dtype=torch.long)).shape == (1, 0)


def test_segment_reduce_half_inputs_accumulate_in_fp32():
    # 4096 fp16 ones and a 2048: an fp16 accumulator would stall at 2048 (ulp 2 there).
    x = torch.ones(1, 4097, dtype=torch.float16)
    x[0, 0] = 2048
    assert segment_reduce(x, chunk_size=4097, reduce="sum").item() == 2048 + 4096


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("N", [1, 7, 111, 1025])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_segment_reduce_triton_matches_reference(device, N, reduce):
    R = 3
    for seg in range(len(SEGMENTATIONS)):
        x, lens = _inputs(R, N, seed=N + 7 * seg, nan=seg % 4 == 1)
        kw = _seg_kwargs(*SEGMENTATIONS[seg], R, N, seed=N * 5 + seg)
        kw_dev = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
        for lengths in (None, lens):
            want = segment_reduce(x, reduce=reduce, lengths=lengths, **kw, backend="reference")
            lens_dev = lengths.to(device) if lengths is not None else None
            got = segment_reduce(x.to(device), reduce=reduce, lengths=lens_dev, **kw_dev, backend="triton")
            exact, abs_sum, count = naive_reduce(x, reduce, lengths, **kw)
            what = f"{SEGMENTATIONS[seg]} lengths={lengths is not None}"
            assert_close_to_exact(got, reduce, exact, abs_sum, count, what)
            if reduce == "max":
                assert torch.equal(got.cpu().nan_to_num(), want.nan_to_num()), what
            else:
                # Both are within the summation bound of the exact value, hence of each other within twice it.
                bound = 2 * ((count - 1).clamp(min=0) * U32 * abs_sum * 1.01 + U32 * exact.abs().nan_to_num())
                diff = (got.cpu().double() - want.double()).abs().nan_to_num()
                assert (diff <= bound).all(), what


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_segment_reduce_triton_strided_and_half(device):
    big = torch.randn(4, 300, generator=torch.Generator().manual_seed(8)).to(device)
    x = big[::2, 50:247]                                     # row stride 600, unit last stride
    spans = torch.tensor([[0, 40], [40, 41], [60, 197]], device=device)
    for src in (x, x.half()):
        for kw in (dict(chunk_size=13), dict(spans=spans)):
            for reduce in ("sum", "max"):
                got = segment_reduce(src, reduce=reduce, **kw, backend="triton").cpu()
                want = segment_reduce(src.cpu(), reduce=reduce, **{k: (v.cpu() if torch.is_tensor(v) else v)
                                                                  for k, v in kw.items()}, backend="reference")
                # same fp32 inputs; only the summation order differs: each side is within
                # (n-1)·u·Σ|x| of the exact sum (n <= 197 terms), so within twice that of each other
                atol = 2 * 197 * U32 * float(src.float().abs().sum(1).max()) if reduce == "sum" else 0.0
                torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.gpu
def test_segment_reduce_gpu_bf16():
    x, lens = _inputs(4, 4000, seed=11, dtype=torch.bfloat16)
    for kw in (dict(chunk_size=10), dict(spans=torch.tensor([[0, 1000], [1500, 3999]]))):
        for reduce in ("sum", "mean", "max"):
            got = segment_reduce(x.cuda(), reduce=reduce, lengths=lens.cuda(),
                                 **{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()})
            exact, abs_sum, count = naive_reduce(x, reduce, lens, **kw)
            assert_close_to_exact(got, reduce, exact, abs_sum, count)


# ------------------------------------------------------------------------------------------------
# segments_to_token_mask
# ------------------------------------------------------------------------------------------------

def naive_token_mask(seg_keep, N, **seg):
    R = seg_keep.shape[0]
    mask = torch.zeros((R, N), dtype=torch.bool)
    for r, segs in enumerate(naive_segments(R, N, **seg)):
        for s, (a, b) in enumerate(segs):
            mask[r, a:b] = bool(seg_keep[r, s])
    return mask


@pytest.mark.parametrize("N", [1, 7, 97])
@pytest.mark.parametrize("seg", range(len(SEGMENTATIONS)))
def test_segments_to_token_mask_vs_naive(N, seg):
    R = 3
    kw = _seg_kwargs(*SEGMENTATIONS[seg], R, N, seed=N + seg)
    S = -(-N // kw["chunk_size"]) if "chunk_size" in kw else kw["spans"].shape[-2]
    seg_keep = torch.rand(R, S, generator=torch.Generator().manual_seed(seg)) < 0.5
    got = segments_to_token_mask(seg_keep, n_tokens=N, **kw)
    assert torch.equal(got, naive_token_mask(seg_keep, N, **kw))


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------

def test_segment_reduce_bad_inputs():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="scores"):
        segment_reduce(torch.randn(10), chunk_size=2)
    with pytest.raises(TypeError, match="scores"):
        segment_reduce(torch.ones(2, 10, dtype=torch.int64), chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        segment_reduce(x)
    with pytest.raises(ValueError, match="chunk_size"):
        segment_reduce(x, chunk_size=2, spans=torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="chunk_size"):
        segment_reduce(x, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        segment_reduce(x, chunk_size=2.0)
    with pytest.raises(TypeError, match="spans"):
        segment_reduce(x, spans=torch.tensor([[0.0, 2.0]]))
    with pytest.raises(ValueError, match="spans"):
        segment_reduce(x, spans=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="spans"):
        segment_reduce(x, spans=torch.tensor([[0, 2, 3]]))
    with pytest.raises(ValueError, match="spans"):
        segment_reduce(x, spans=torch.zeros(3, 1, 2, dtype=torch.long))   # [R, S, 2] with the wrong R
    with pytest.raises(ValueError, match="spans"):
        segment_reduce(x, spans=torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="spans"):
        segment_reduce(x, spans=torch.tensor([[0, 11]]))
    with pytest.raises(ValueError, match="spans"):
        segment_reduce(x, spans=torch.tensor([[3, 2]]))
    with pytest.raises(ValueError, match="spans"):
        segment_reduce(x, spans=torch.tensor([[0, 4], [3, 6]]))           # overlapping
    with pytest.raises(ValueError, match="spans"):
        segment_reduce(x, spans=torch.tensor([[5, 6], [0, 2]]))           # not sorted
    with pytest.raises(ValueError, match="reduce"):
        segment_reduce(x, chunk_size=2, reduce="min")
    with pytest.raises(ValueError, match="lengths"):
        segment_reduce(x, chunk_size=2, lengths=torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="lengths"):
        segment_reduce(x, chunk_size=2, lengths=torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="lengths"):
        segment_reduce(x, chunk_size=2, lengths=torch.tensor([3]))
    with pytest.raises(TypeError, match="lengths"):
        segment_reduce(x, chunk_size=2, lengths=torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="backend"):
        segment_reduce(x, chunk_size=2, backend="cuda")


def test_segments_to_token_mask_bad_inputs():
    keep = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="seg_keep"):
        segments_to_token_mask(keep.int(), n_tokens=10, chunk_size=3)
    with pytest.raises(ValueError, match="seg_keep"):
        segments_to_token_mask(keep, n_tokens=10, chunk_size=2)          # 5 chunks, not 4
    with pytest.raises(ValueError, match="n_tokens"):
        segments_to_token_mask(keep, n_tokens=-1, chunk_size=3)
    with pytest.raises(ValueError, match="spans"):
        segments_to_token_mask(keep, n_tokens=5, spans=torch.tensor([[0, 1], [1, 2], [2, 3], [4, 6]]))
    with pytest.raises(ValueError, match="chunk_size"):
        segments_to_token_mask(keep, n_tokens=10)


# ------------------------------------------------------------------------------------------------
# torch.library
# ------------------------------------------------------------------------------------------------

def test_opcheck_segment_reduce():
    x, lens = _inputs(3, 23, seed=12)
    spans = torch.tensor([[0, 5], [7, 7], [9, 23]])
    torch.library.opcheck(torch.ops.kvpress_kernels.segment_reduce.default,
                          (x, spans, 0, 3, "mean", lens, "reference"))
    torch.library.opcheck(torch.ops.kvpress_kernels.segment_reduce.default,
                          (x, None, 4, 6, "max", None, "reference"))


def test_reference_matches_public_function():
    x, lens = _inputs(2, 50, seed=13)
    want = segment_reduce_ref(x, chunk_size=7, reduce="mean", lengths=lens)
    assert torch.equal(segment_reduce(x, chunk_size=7, reduce="mean", lengths=lens, backend="reference"), want)
