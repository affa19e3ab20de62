"""Regression tests for bugs the hardening sweep (issue 7) found: strided per-row vectors misread by
Triton launchers (silent wrong kept sets), empty shapes raising bare RuntimeErrors, head_dim 0, meta
tensors reaching value checks. Each test is a minimal reproduction; all failed before the fix."""


import pytest
import torch

from kvpress_kernels.ops import (append_, attention_lse, attention_mass, attention_mass_paged, compact_,
                                 pool_scores, segment_reduce, select_segments, select_topk)

BACKENDS = ["reference", "triton"]


# ---- 1. Triton kernels read 1-D int vectors with unit stride: a strided budget / lengths / counts is
#         read at the wrong offsets -> wrong kept sets / wrong appends, silently.
def strided1d(values):
    return torch.tensor([v for x in values for v in (x, 0)])[::2]


def test_select_topk_triton_strided_budget():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    bud = strided1d([1, 2, 3])
    assert not bud.is_contiguous()
    want = select_topk(x, bud, backend="reference")[1]
    assert torch.equal(select_topk(x, bud, backend="triton")[1], want)


def test_select_topk_triton_strided_lengths():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    lens = strided1d([5, 10, 3])
    want = select_topk(x, 2, lengths=lens, backend="reference")[1]
    assert torch.equal(select_topk(x, 2, lengths=lens, backend="triton")[1], want)


def test_select_segments_triton_strided_budget():
    sc = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([2, 3, 1, 4])
    bud = strided1d([3, 5, 9])
    want = select_segments(sc, sizes, bud, backend="reference")
    assert torch.equal(select_segments(sc, sizes, bud, backend="triton"), want)


def test_segment_reduce_triton_strided_lengths():
    s = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    lens = strided1d([5, 12, 3])
    want = segment_reduce(s, chunk_size=4, lengths=lens, backend="reference")
    torch.testing.assert_close(segment_reduce(s, chunk_size=4, lengths=lens, backend="triton"), want)


def test_append_triton_strided_counts():
    def run(counts, backend):
        kp, vp = torch.zeros(8, 4, 8), torch.zeros(8, 4, 8)
        table = torch.arange(8, dtype=torch.int32).view(2, 1, 4)
        lengths = torch.zeros(2, 1, dtype=torch.int32)
        g = torch.Generator().manual_seed(0)
        append_(kp, vp, table, lengths, torch.randn(2, 1, 5, 8, generator=g), torch.randn(2, 1, 5, 8, generator=g),
                counts=counts, backend=backend)
        return kp, vp, lengths
    counts = torch.tensor([[3, 0], [5, 0]], dtype=torch.int32)[:, :1]     # [2, 1], strides (2, 1)
    want = run(counts.contiguous(), "reference")
    got = run(counts, "triton")
    assert all(torch.equal(a, b) for a, b in zip(want, got)), (want[2].tolist(), got[2].tolist())


# ---- 2. Empty shapes crash the reference backend (and one data check): reshape(-1) of an empty tensor.
@pytest.mark.parametrize("backend", BACKENDS)
def test_append_zero_new_tokens(backend):
    kp, vp = torch.zeros(8, 4, 8), torch.zeros(8, 4, 8)
    table = torch.arange(8, dtype=torch.int32).view(2, 2, 2)
    lengths = torch.zeros(2, 2, dtype=torch.int32)
    append_(kp, vp, table, lengths, torch.zeros(2, 2, 0, 8), torch.zeros(2, 2, 0, 8), backend=backend)
    assert not lengths.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_and_compact_empty_batch(backend):
    kp, vp = torch.zeros(8, 4, 8), torch.zeros(8, 4, 8)
    table = torch.zeros(0, 2, 2, dtype=torch.int32)
    lengths = torch.zeros(0, 2, dtype=torch.int32)
    append_(kp, vp, table, lengths, torch.zeros(0, 2, 3, 8), torch.zeros(0, 2, 3, 8), backend=backend)
    compact_(kp, vp, table, lengths, torch.zeros(0, 2, 4, dtype=torch.int32), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_page_table_without_columns(backend):
    kp, vp = torch.zeros(8, 4, 8), torch.zeros(8, 4, 8)
    lengths = torch.zeros(2, 2, dtype=torch.int32)
    compact_(kp, vp, torch.zeros(2, 2, 0, dtype=torch.int32), lengths, torch.zeros(2, 2, 0, dtype=torch.int32),
             backend=backend)


def test_pool_scores_zero_length_rows():
    assert pool_scores(torch.zeros(2, 0), "avg", 3).shape == (2, 0)


# ---- 3. head_dim 0: ZeroDivisionError (default scale 1/sqrt(0)) instead of a ValueError naming q.
@pytest.mark.parametrize("fn", [attention_mass, attention_lse])
def test_scoring_head_dim_zero_names_q(fn):
    with pytest.raises(ValueError, match=r"\bq\b"):
        fn(torch.zeros(1, 2, 1, 0), torch.zeros(1, 1, 4, 0))


def test_paged_scoring_head_dim_zero_names_q():
    with pytest.raises(ValueError, match=r"\bq\b"):
        attention_mass_paged(torch.zeros(1, 2, 1, 0), torch.zeros(4, 4, 0), torch.zeros(1, 1, 1, dtype=torch.int32),
                             torch.ones(1, 1, dtype=torch.int32), max_len=4)


# ---- 4. meta tensors: value checks run on them (wants_data_checks is true off CUDA) and .item() fails.
def test_select_topk_all_meta_is_shape_inference_or_a_clear_error():
    try:
        keep, kept = select_topk(torch.zeros(3, 10, device="meta"), 4)
    except (TypeError, ValueError):
        return
    assert keep.shape == (3, 10) and kept.shape == (3, 4)
