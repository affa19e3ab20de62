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


# ==================================================================================================
# Issue 11 (second hardening pass). Each test is the minimal reproduction of one class; the generated
# classes in tests/test_bad_inputs.py and tests/test_properties.py are what would find the next member.
# ==================================================================================================

# ---- 5. append_ accepted a negative length: slot -1 resolved through page_table[r, -1] (= -1) into the
#         pool's last page, owned by another row (a silent cross-row write).
@pytest.mark.parametrize("backend", BACKENDS)
def test_append_negative_length_is_rejected_before_any_write(backend):
    kp, vp = torch.zeros(3, 2, 1), torch.zeros(3, 2, 1)
    table = torch.tensor([[0, -1], [1, 2]], dtype=torch.int32)
    lengths = torch.tensor([-1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\blengths\b"):
        append_(kp, vp, table, lengths, torch.ones(2, 1, 1), torch.ones(2, 1, 1), backend=backend)
    assert not kp.any() and not vp.any() and lengths.tolist() == [-1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_pages_shared_between_rows_are_rejected(backend):
    kp, vp = torch.zeros(4, 2, 1), torch.zeros(4, 2, 1)
    table = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)      # page 1 in both rows
    lengths = torch.tensor([1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"page_table gives one page to two rows"):
        append_(kp, vp, table, lengths, torch.ones(2, 2, 1), torch.ones(2, 2, 1), backend=backend)
    assert not kp.any() and lengths.tolist() == [1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_expanded_pool_is_a_value_error(backend):
    kp = torch.zeros(1, 2, 4).expand(3, 2, 4)
    with pytest.raises(ValueError, match=r"\bk_pages\b.*expanded"):
        append_(kp, torch.zeros(3, 2, 4), torch.tensor([[0]], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                torch.ones(1, 1, 4), torch.ones(1, 1, 4), backend=backend)


# ---- 6. Triton select_segments on a column-major protect: torch.where(protect, ...) and the sort kept
#         protect's layout, and the kernel read the order as rows with unit stride.
def test_select_segments_triton_column_major_protect():
    sc = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([1, 2, 3, 1, 2, 1])
    protect = torch.zeros(6, 3, dtype=torch.bool).t()
    protect[0, 1] = protect[2, 4] = True
    want = select_segments(sc, sizes, 5, protect=protect.contiguous(), backend="reference")
    assert torch.equal(select_segments(sc, sizes, 5, protect=protect, backend="triton"), want)


def test_append_triton_strided_positions():
    def run(pos_new, backend):
        kp, vp, pos = torch.zeros(4, 2, 2), torch.zeros(4, 2, 2), torch.full((4, 2), -7, dtype=torch.int32)
        append_(kp, vp, torch.arange(4, dtype=torch.int32).view(2, 2), torch.zeros(2, dtype=torch.int32),
                torch.ones(2, 3, 2), torch.ones(2, 3, 2), pos_pages=pos, pos_new=pos_new, backend=backend)
        return pos
    pos_new = torch.tensor([[10, 11, 12], [20, 21, 22]], dtype=torch.int32).t().contiguous().t()   # column-major
    assert torch.equal(run(pos_new, "triton"), run(pos_new.contiguous(), "reference"))


# ---- 7. NaN parity: Triton's LSE tested l > 0, false for NaN, so a query row holding a NaN got -inf
#         (the reference NaN); a +inf logit gave NaN in Triton, +inf in the reference.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_attention_lse_non_finite_query_is_nan_on_both_backends(value):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 2, 8, generator=g), torch.randn(1, 1, 6, 8, generator=g).abs()
    q[0, 0, 1, 3] = value                                   # k > 0: that query's logits are all +inf (or NaN)
    for backend in BACKENDS:
        lse = attention_lse(q, k, backend=backend)
        assert torch.isnan(lse[0, 0, 1]) and torch.isfinite(lse).sum() == 3, (backend, lse)
        mass = attention_mass(q, k, head_reduce="none", backend=backend)
        assert torch.isnan(mass[0, 0]).all() and torch.isfinite(mass[0, 1]).all(), backend


# ---- 8. Wrong error types.
def test_select_segments_budget_beyond_int64_names_budget():
    with pytest.raises(ValueError, match=r"\bbudget\b"):
        select_segments(torch.zeros(2, 3), torch.ones(3, dtype=torch.long), 2 ** 63)


def test_token_norm_empty_batch_with_lengths():
    from kvpress_kernels.ops import token_norm
    assert token_norm(torch.zeros(0, 2, 5, 4), lengths=torch.zeros(0, dtype=torch.long)).shape == (0, 2, 5)
    assert token_norm(torch.zeros(0, 2, 5, 4), lengths=torch.zeros(0, 2, dtype=torch.long)).shape == (0, 2, 5)


def test_find_shots_non_int_flags_names_flags():
    from kvpress_kernels.shots import find_shots
    with pytest.raises(TypeError, match=r"\bflags\b"):
        find_shots("Q: a\nA: b", None, flags="DOTALL")


def test_generate_rejects_1d_and_float_input_ids():
    from transformers import LlamaConfig, LlamaForCausalLM

    import kvpress_kernels as kk
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)).eval()
    ids = torch.arange(1, 9)
    with pytest.raises(ValueError, match=r"\binput_ids\b"):
        kk.generate(model, ids, None, max_new_tokens=1)
    with pytest.raises(TypeError, match=r"\binput_ids\b"):
        kk.generate(model, ids[None].float(), None, max_new_tokens=1)
