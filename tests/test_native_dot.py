"""The GPU's native fp16 ``tl.dot`` paths, executed in the interpreter (issue 13, item 3).

On CPU tensors the launchers cast every tile to fp32 before ``tl.dot`` (the interpreter's bf16 is wrong),
so without these tests the operand path a GPU takes for fp16/bf16 (``UPCAST=False`` in scoring,
``NATIVE_DOT=True`` in decode attention: fp16 tiles into the dot, fp32 accumulation, probabilities rounded
to fp16 before ``p @ V``) would only ever be compiled, never run. The interpreter computes fp16 dots
correctly (numpy matmul with an fp32 result), so fp16 runs here; bf16 stays GPU-only.
"""

import pytest
import torch
from conftest import devices_for_triton

from kvpress_kernels.ops import decode_attention as DA
from kvpress_kernels.ops import scoring as S

from test_decode_attention import PROBS_ATOL, assert_probs_sane, make_case

pytestmark = pytest.mark.triton

# Tolerances are the ones of the compiled fp16 path (tests/test_decode_attention.py OUT_TOL for CUDA fp16):
# p is rounded to fp16 before p @ V, an error <= 2**-11 * max|v| (~4 for randn) per output, plus one ulp.
DECODE_FP16_TOL = dict(atol=4e-3, rtol=4e-3)
# Scoring: fp16 x fp16 products are exact in the fp32 accumulator, so the native dot differs from the
# fp32 reference by the summation order only (as the upcast path does): tests/test_scoring.py TRITON_TOL.
SCORING_TOL = dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("G,T,D,page_size,causal,num_splits", [
    (4, 1, 64, 16, True, 3),      # decode step, GQA 4, split-K
    (3, 3, 40, 17, True, 2),      # padded head dim, page size not a power of two
    (8, 3, 128, 16, False, 1),    # 24 query rows, D = 128
])
def test_decode_native_fp16_dot(device, monkeypatch, G, T, D, page_size, causal, num_splits):
    lengths = [37, 0, 5, 61]
    q, kp, vp, table, lens = make_case(2, 2, G, T, D, page_size, lengths, dtype=torch.float16, device=device)
    ref_out, ref_probs = DA.paged_decode_attention_ref(q, kp, vp, table, lens, causal=causal, return_probs=True)
    upcast_out, _ = DA.paged_decode_attention(q, kp, vp, table, lens, causal=causal, return_probs=True,
                                              num_splits=num_splits, backend="triton")
    monkeypatch.setitem(DA._OVERRIDES, "native_dot", True)
    out, probs = DA.paged_decode_attention(q, kp, vp, table, lens, causal=causal, return_probs=True,
                                           num_splits=num_splits, backend="triton")
    torch.testing.assert_close(out.float(), ref_out.float(), **DECODE_FP16_TOL)
    torch.testing.assert_close(probs, ref_probs, atol=PROBS_ATOL, rtol=0)
    assert_probs_sane(probs, lens, G, T, causal, atol=1e-4)
    # The native path really ran: rounding p to fp16 before p @ V changes some output bits.
    assert not torch.equal(out, upcast_out)


@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("causal,head_reduce,paged", [
    (False, "none", False), (True, "group_max", False), (False, "group_sum", True), (True, "all_mean", True),
])
def test_scoring_native_fp16_dot(device, monkeypatch, causal, head_reduce, paged):
    B, Hq, Hkv, W, N, D = 2, 8, 2, 19, 97, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, W, D, generator=g).to(device=device, dtype=torch.float16)
    k = torch.randn(B, Hkv, N, D, generator=g).to(device=device, dtype=torch.float16)
    lengths = torch.tensor([N, 60], device=device)
    monkeypatch.setitem(S._OVERRIDES, "native_dot", True)
    assert S._kernel_flags(q)["UPCAST"] is False
    if not paged:
        kw = dict(lengths=lengths, causal=causal, head_reduce=head_reduce)
        got = S.attention_mass(q, k, backend="triton", **kw)
        want = S.attention_mass(q, k, backend="reference", **kw)
        lse = S.attention_lse(q, k, lengths=lengths, causal=causal, backend="triton")
        torch.testing.assert_close(lse, S.attention_lse(q, k, lengths=lengths, causal=causal, backend="reference"),
                                   **SCORING_TOL)
    else:
        page_size, max_pages = 16, -(-N // 16)
        perm = torch.randperm(B * Hkv * max_pages, generator=g).to(device)
        table = perm.view(B, Hkv, max_pages).to(torch.int32)
        k_pages = torch.zeros(B * Hkv * max_pages, page_size, D, dtype=torch.float16, device=device)
        pad = torch.zeros(B, Hkv, max_pages * page_size, D, dtype=torch.float16, device=device)
        pad[:, :, :N] = k
        k_pages[table.long().reshape(-1)] = pad.reshape(-1, page_size, D)
        lens2 = lengths.view(B, 1).expand(B, Hkv).to(torch.int32).contiguous()
        kw = dict(max_len=N, causal=causal, head_reduce=head_reduce)
        got = S.attention_mass_paged(q, k_pages, table, lens2, backend="triton", **kw)
        want = S.attention_mass_paged(q, k_pages, table, lens2, backend="reference", **kw)
    torch.testing.assert_close(got, want, **SCORING_TOL)
