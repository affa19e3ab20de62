"""select_topk / select_segments: reference vs naive Python (float64), Triton == reference exactly."""

import math

import pytest
import torch
from _fixtures import greedy_fill
from conftest import devices_for_triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpress_kernels.ops import selection as sel
from kvpress_kernels.ops.segments import segments_to_token_mask
from kvpress_kernels.ops.selection import (select_segments, select_segments_ref, select_topk, select_topk_ref)

SIZES = (1, 7, 97, 111, 1025)


# ------------------------------------------------------------------------------------------------
# Naive oracles: Python lists, float64, no tensor tricks.
# ------------------------------------------------------------------------------------------------

def _rank_key(v: float, j: int):
    # Score descending, lower position first, NaN after every number; -0.0 == 0.0 compares equal.
    return (1, 0.0, j) if math.isnan(v) else (0, -v, j)


def naive_topk_row(scores, budget, length, sink=0, recent=0, protect=None):
    prot = {j for j in range(length) if j < sink or j >= length - recent or (protect is not None and protect[j])}
    cands = sorted((j for j in range(length) if j not in prot), key=lambda j: _rank_key(scores[j], j))
    need = max(min(budget, length) - len(prot), 0)
    return sorted(prot | set(cands[:need]))


def naive_topk(scores, budgets, lengths, sink=0, recent=0, protect=None):
    x = scores.double().tolist()
    out = []
    for r in range(len(x)):
        p = protect[r].tolist() if protect is not None else None
        out.append(naive_topk_row(x[r], int(budgets[r]), int(lengths[r]), sink, recent, p))
    return out


def naive_segments_row(scores, sizes, budget, policy, protect):
    rem = budget - sum(s for s, p in zip(sizes, protect) if p)
    order = sorted((s for s in range(len(scores)) if not protect[s]), key=lambda s: _rank_key(scores[s], s))
    taken = greedy_fill(order, sizes, rem, policy)
    return [bool(p) or s in taken for s, p in enumerate(protect)]


def naive_segments(scores, sizes, budgets, policy, protect=None):
    R, S = scores.shape
    sz = sizes.expand(R, S).tolist()
    pr = protect.tolist() if protect is not None else [[False] * S] * R
    x = scores.double().tolist()
    return torch.tensor([naive_segments_row(x[r], sz[r], int(budgets[r]), policy, pr[r]) for r in range(R)],
                        dtype=torch.bool).reshape(R, S)


def _as_mask_and_idx(rows, R, N, K):
    mask = torch.zeros((R, N), dtype=torch.bool)
    idx = torch.full((R, K), -1, dtype=torch.int32)
    for r, kept in enumerate(rows):
        mask[r, kept] = True
        idx[r, :len(kept)] = torch.tensor(kept, dtype=torch.int32)
    return mask, idx


def _report(a, b):
    bad = (a != b).nonzero()
    return f"{bad.shape[0]} mismatches, first at {bad[:5].tolist()}"


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def _scores(R, N, kind, gen, dtype=torch.float32):
    if kind == "randn":
        x = torch.randn(R, N, generator=gen)
    elif kind == "ties":  # heavy ties: a tiny integer set, so the threshold digit is shared widely
        x = torch.randint(0, 3, (R, N), generator=gen).float()
    else:  # "special": NaN, ±inf, ±0 and ties mixed in
        pool = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 1.0, 1e-42])
        x = pool[torch.randint(0, len(pool), (R, N), generator=gen)]
    return x.to(dtype)


def _case(R, N, kind, seed, *, sink=0, recent=0, with_protect=False, ragged=True):
    gen = torch.Generator().manual_seed(seed)
    x = _scores(R, N, kind, gen)
    lens = torch.randint(0, N + 1, (R,), generator=gen) if ragged else torch.full((R,), N)
    lens[0] = N
    protect = (torch.rand(R, N, generator=gen) < 0.1) if with_protect else None
    n_prot = sel._protected(lens, N, sink, recent, protect).sum(1)
    # Budgets anywhere in the feasible range [protected, length], per row.
    frac = torch.rand(R, generator=gen)
    budgets = (n_prot + (frac * (lens - n_prot + 1).float()).floor().long()).clamp(max=lens)
    return x, lens, budgets, protect


CONFIGS = [dict(), dict(sink=2, recent=3), dict(sink=4), dict(recent=5), dict(with_protect=True),
           dict(sink=1, recent=2, with_protect=True)]


# ------------------------------------------------------------------------------------------------
# select_topk: reference vs naive
# ------------------------------------------------------------------------------------------------

def test_order_keys_is_the_score_order():
    x = torch.tensor([float("nan"), float("-inf"), -3.0, -1e-42, -0.0, 0.0, 1e-42, 2.0, float("inf")])
    k = sel.order_keys(x).tolist()
    assert k[0] < k[1] < k[2] < k[3] < k[4] <= k[5] < k[6] < k[7] < k[8]
    assert k[4] == k[5]  # -0.0 and +0.0 tie (then position decides)
    assert sel.order_keys(torch.tensor([float("nan"), -float("nan")])).tolist() == [-2 ** 31] * 2


@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_select_topk_ref_vs_naive(N, kind, cfg):
    kw = dict(CONFIGS[cfg])
    x, lens, budgets, protect = _case(3, N, kind, seed=N * 31 + cfg, **kw)
    kw.pop("with_protect", None)
    keep, idx = select_topk(x, budgets, lengths=lens, protect=protect, **kw)
    K = int(budgets.max())
    want_mask, want_idx = _as_mask_and_idx(naive_topk(x, budgets, lens, protect=protect, **kw), 3, N, K)
    assert torch.equal(keep, want_mask), _report(keep, want_mask)
    assert torch.equal(idx, want_idx), _report(idx, want_idx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_select_topk_ref_half_inputs(dtype):
    gen = torch.Generator().manual_seed(3)
    x = _scores(2, 97, "randn", gen, dtype)
    keep, idx = select_topk(x, 20, sink=2, recent=4)
    want_mask, want_idx = _as_mask_and_idx(naive_topk(x, [20, 20], [97, 97], 2, 4), 2, 97, 20)
    assert torch.equal(keep, want_mask) and torch.equal(idx, want_idx)


def test_select_topk_int_budget_and_defaults():
    x = torch.tensor([[0.5, 3.0, 3.0, -1.0, 2.0, 3.0]])
    keep, idx = select_topk(x, 3)
    assert idx.tolist() == [[1, 2, 5]] and keep.tolist() == [[False, True, True, False, False, True]]
    # ties at the threshold go to the lower positions
    keep, idx = select_topk(x, 2)
    assert idx.tolist() == [[1, 2]]
    # sink counts against the budget first: 0 is kept, then the best other one (position 1)
    keep, idx = select_topk(x, 2, sink=1)
    assert idx.tolist() == [[0, 1]]
    keep, idx = select_topk(x, 0)
    assert idx.shape == (1, 0) and not keep.any()
    keep, idx = select_topk(x, 2, max_budget=4)
    assert idx.tolist() == [[1, 2, -1, -1]]


def test_select_topk_ref_unchecked_behaviour():
    """What CUDA does without debug checks: budgets clipped, protected never lost, kept_idx cut at K."""
    x = torch.arange(10.0).flip(0).unsqueeze(0).repeat(3, 1)        # best tokens are the first ones
    lens = torch.tensor([10, 4, 10])
    budgets = torch.tensor([-2, 9, 2])
    protect = torch.zeros(3, 10, dtype=torch.bool)
    protect[2, 5:9] = True                                           # 4 protected > budget 2
    keep, idx = select_topk_ref(x, budgets, lengths=lens, protect=protect, max_budget=3)
    assert keep.sum(1).tolist() == [0, 4, 4]
    assert idx.tolist() == [[-1, -1, -1], [0, 1, 2], [5, 6, 7]]
    assert keep[2].nonzero().flatten().tolist() == [5, 6, 7, 8]


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_select_topk_properties_ref(data):
    _check_properties(data, "reference")


def _check_properties(data, backend, device="cpu"):
    R = data.draw(st.integers(1, 3))
    N = data.draw(st.integers(1, 70))
    seed = data.draw(st.integers(0, 2 ** 16))
    kind = data.draw(st.sampled_from(["randn", "ties", "special"]))
    sink = data.draw(st.integers(0, 5))
    recent = data.draw(st.integers(0, 5))
    with_protect = data.draw(st.booleans())
    x, lens, budgets, protect = _case(R, N, kind, seed, sink=sink, recent=recent, with_protect=with_protect)
    keep, idx = select_topk(x.to(device), budgets.to(device), lengths=lens.to(device), sink=sink, recent=recent,
                            protect=protect.to(device) if protect is not None else None, backend=backend)
    keep, idx = keep.cpu(), idx.cpu()
    prot = sel._protected(lens, N, sink, recent, protect)
    j = torch.arange(N)
    for r in range(R):
        L = int(lens[r])
        assert int(keep[r].sum()) == int(budgets[r])                  # exactly min(budget, length)
        assert not keep[r, L:].any()
        assert keep[r][prot[r]].all()                                 # every protected token kept
        k = sel.order_keys(x[r]).long()
        cand = (j < L) & ~prot[r]
        kept_k, dropped_k = k[cand & keep[r]], k[cand & ~keep[r]]
        if kept_k.numel() and dropped_k.numel():                      # kept ≥ dropped in the order
            assert int(kept_k.min()) >= int(dropped_k.max())
            # at the boundary key, kept tokens sit before dropped ones (lower position wins)
            thr = int(kept_k.min())
            if int(dropped_k.max()) == thr:
                assert int(j[cand & keep[r] & (k == thr)].max()) < int(j[cand & ~keep[r] & (k == thr)].min())
        n = int(keep[r].sum())
        assert idx[r, :n].tolist() == keep[r].nonzero().flatten().tolist()  # sorted, matching the mask
        assert (idx[r, n:] == -1).all()


# ------------------------------------------------------------------------------------------------
# select_topk: Triton == reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
def test_select_topk_triton_matches_reference(device, N, kind):
    for cfg in (0, 1, 5) if N < 1025 else (1, 5):
        kw = dict(CONFIGS[cfg])
        x, lens, budgets, protect = _case(3, N, kind, seed=N * 7 + cfg, **kw)
        kw.pop("with_protect", None)
        pr = protect.to(device) if protect is not None else None
        want = select_topk(x, budgets, lengths=lens, protect=protect, **kw, backend="reference")
        got = select_topk(x.to(device), budgets.to(device), lengths=lens.to(device), protect=pr, **kw,
                          max_budget=int(budgets.max()), backend="triton")
        assert torch.equal(got[0].cpu(), want[0]), f"cfg {cfg}: " + _report(got[0].cpu(), want[0])
        assert torch.equal(got[1].cpu(), want[1]), f"cfg {cfg}: " + _report(got[1].cpu(), want[1])


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("kind", ["ties", "special", "randn"])
def test_select_topk_triton_many_tiles(device, kind, monkeypatch):
    """16-token tiles over 111 tokens: running tie ranks and compaction slots cross tile edges."""
    monkeypatch.setattr(sel, "_MAX_BLOCK", 16)
    x, lens, budgets, protect = _case(4, 111, kind, seed=5, sink=3, recent=2, with_protect=True)
    want = select_topk(x, budgets, lengths=lens, sink=3, recent=2, protect=protect, backend="reference")
    got = select_topk(x.to(device), budgets.to(device), lengths=lens.to(device), sink=3, recent=2,
                      protect=protect.to(device), max_budget=int(budgets.max()), backend="triton")
    assert torch.equal(got[0].cpu(), want[0]), _report(got[0].cpu(), want[0])
    assert torch.equal(got[1].cpu(), want[1]), _report(got[1].cpu(), want[1])


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_select_topk_triton_all_digits_matter(device):
    """Scores that share their top 1, 2 and 3 key bytes, so every radix pass decides something."""
    base = torch.tensor(1.0).view(torch.int32)
    bits = base + torch.tensor([0, 1, 2, 255, 256, 257, 65535, 65536, 65537, 1 << 20, 3, 3, 0, 256] * 5,
                               dtype=torch.int32)
    x = bits.view(torch.float32)[torch.randperm(70, generator=torch.Generator().manual_seed(1))].reshape(2, 35)
    for b in (1, 2, 5, 13, 20, 34, 35):
        want = select_topk(x, b, backend="reference")
        got = select_topk(x.to(device), b, backend="triton")
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), f"budget {b}"


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_select_topk_triton_unchecked_behaviour(device):
    """Through the op itself (the public function would reject these inputs on CPU)."""
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(2))
    lens = torch.tensor([20, 5, 20, 0])
    budgets = torch.tensor([-3, 9, 3, 4])
    protect = torch.zeros(4, 20, dtype=torch.bool)
    protect[2, 2:10] = True
    for K in (2, 6, 9):
        want = torch.ops.kvpress_kernels.select_topk(x, budgets, lens, 1, 1, protect, K, "reference")
        got = torch.ops.kvpress_kernels.select_topk(x.to(device), budgets.to(device), lens.to(device), 1, 1,
                                                    protect.to(device), K, "triton")
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), f"K={K}"
        assert want[0].sum(1).tolist() == [2, 5, 10, 0]  # sink+recent kept at budget -3; protected never lost


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_select_topk_triton_strided_and_half(device):
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(3, 150, generator=gen).to(device)
    x = big[:, 10:107]                                                # row stride 150, unit last stride
    for src in (x, x.half()):
        want = select_topk(src.cpu(), 30, sink=1, recent=2, backend="reference")
        got = select_topk(src, 30, sink=1, recent=2, backend="triton")
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_select_topk_properties_triton(device, data):
    _check_properties(data, "triton", device)


@pytest.mark.gpu
def test_select_topk_gpu_bf16_and_device_budgets():
    x, lens, budgets, protect = _case(8, 5000, "ties", seed=6, sink=4, recent=16, with_protect=True)
    for dtype in (torch.float32, torch.bfloat16):
        xs = x.to(dtype)
        want = select_topk(xs, budgets, lengths=lens, sink=4, recent=16, protect=protect)
        got = select_topk(xs.cuda(), budgets.cuda(), lengths=lens.cuda(), sink=4, recent=16, protect=protect.cuda(),
                          max_budget=5000)
        assert torch.equal(got[0].cpu(), want[0])
        assert torch.equal(got[1].cpu()[:, :want[1].shape[1]], want[1])
    with pytest.raises(ValueError, match="max_budget"):
        select_topk(x.cuda(), budgets.cuda())


# ------------------------------------------------------------------------------------------------
# select_topk: bad inputs
# ------------------------------------------------------------------------------------------------

def test_select_topk_bad_inputs():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="scores"):
        select_topk(torch.randn(10), 3)
    with pytest.raises(TypeError, match="scores"):
        select_topk(torch.randint(0, 3, (2, 10)), 3)
    with pytest.raises(TypeError, match="scores"):
        select_topk(x.tolist(), 3)
    with pytest.raises(ValueError, match="budget"):
        select_topk(x, -1)
    with pytest.raises(ValueError, match="budget"):
        select_topk(x, 11)                                       # larger than the row
    with pytest.raises(ValueError, match="budget"):
        select_topk(x, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="budget"):
        select_topk(x, torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="budget"):
        select_topk(x, 5, lengths=torch.tensor([10, 4]))         # larger than row 1's length
    with pytest.raises(ValueError, match="budget"):
        select_topk(x, torch.tensor([3, 3, 3]))                  # wrong shape
    with pytest.raises(TypeError, match="budget"):
        select_topk(x, 2.5)
    with pytest.raises(TypeError, match="budget"):
        select_topk(x, torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="impossible budget"):
        select_topk(x, 3, sink=2, recent=2)
    prot = torch.zeros(2, 10, dtype=torch.bool)
    prot[1, :4] = True
    with pytest.raises(ValueError, match="budget"):
        select_topk(x, 3, protect=prot)
    with pytest.raises(ValueError, match="sink"):
        select_topk(x, 3, sink=-1)
    with pytest.raises(TypeError, match="recent"):
        select_topk(x, 3, recent=1.5)
    with pytest.raises(ValueError, match="protect"):
        select_topk(x, 3, protect=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="protect"):
        select_topk(x, 3, protect=torch.zeros(2, 10))
    with pytest.raises(ValueError, match="lengths"):
        select_topk(x, 3, lengths=torch.tensor([10, 11]))
    with pytest.raises(ValueError, match="lengths"):
        select_topk(x, 3, lengths=torch.tensor([10]))
    with pytest.raises(TypeError, match="lengths"):
        select_topk(x, 3, lengths=torch.tensor([10.0, 10.0]))
    with pytest.raises(ValueError, match="max_budget"):
        select_topk(x, 3, max_budget=2)
    with pytest.raises(ValueError, match="max_budget"):
        select_topk(x, torch.tensor([3, 5]), max_budget=4)
    with pytest.raises(ValueError, match="backend"):
        select_topk(x, 3, backend="cuda")                        # CPU tensors have no cuda backend
    with pytest.raises(ValueError, match="backend"):
        select_topk(x, 3, backend="nope")


# ------------------------------------------------------------------------------------------------
# select_segments
# ------------------------------------------------------------------------------------------------

def _both_backends():
    return [("reference", "cpu")] + [("triton", d) for d in devices_for_triton()]


@pytest.mark.parametrize("backend,device", _both_backends())
def test_select_segments_skip_vs_stop_by_hand(backend, device):
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]], device=device)
    sizes = torch.tensor([4, 8, 3, 2, 1], device=device)
    # budget 10: take 4 (rem 6); 8 does not fit -> skip goes on to 3 (rem 3), then 2 (rem 1), then 1.
    skip = select_segments(scores, sizes, 10, policy="skip", backend=backend).cpu()
    stop = select_segments(scores, sizes, 10, policy="stop", backend=backend).cpu()
    assert skip.tolist() == [[True, False, True, True, True]]
    assert stop.tolist() == [[True, False, False, False, False]]
    # protected segment 1 (size 8) first: rem 2 -> only sizes 2 and 1 ... then 1 no longer fits.
    prot = torch.tensor([[False, True, False, False, False]], device=device)
    got = select_segments(scores, sizes, 10, policy="skip", protect=prot, backend=backend).cpu()
    assert got.tolist() == [[False, True, False, True, False]]
    got = select_segments(scores, sizes, 10, policy="stop", protect=prot, backend=backend).cpu()
    assert got.tolist() == [[False, True, False, False, False]]
    # ties go to the lower index; NaN comes last; zero-size segments always fit
    scores = torch.tensor([[1.0, float("nan"), 1.0, 1.0, 0.0]], device=device)
    sizes = torch.tensor([3, 1, 3, 3, 0], device=device)
    got = select_segments(scores, sizes, 7, backend=backend).cpu()
    assert got.tolist() == [[True, True, True, False, True]]
    got = select_segments(scores, sizes, 7, policy="stop", backend=backend).cpu()
    assert got.tolist() == [[True, False, True, False, False]]


@pytest.mark.parametrize("policy", ["skip", "stop"])
@pytest.mark.parametrize("S", [1, 7, 40, 111])
@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
def test_select_segments_ref_vs_naive(policy, S, kind):
    gen = torch.Generator().manual_seed(S + len(kind))
    R = 3
    scores = _scores(R, S, kind, gen)
    sizes = torch.randint(0, 12, (R, S), generator=gen) if S % 2 else torch.randint(0, 12, (S,), generator=gen)
    protect = torch.rand(R, S, generator=gen) < 0.15
    need = torch.where(protect, sizes.expand(R, S), 0).sum(1)
    budgets = need + torch.randint(0, int(sizes.sum()) // 2 + 2, (R,), generator=gen)
    for p in (None, protect):
        b = budgets if p is not None else budgets - need
        got = select_segments(scores, sizes, b, policy=policy, protect=p)
        want = naive_segments(scores, sizes, b, policy, p)
        assert torch.equal(got, want), _report(got, want)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("policy", ["skip", "stop"])
@pytest.mark.parametrize("max_block", [1024, 16])
def test_select_segments_triton_matches_reference(device, policy, max_block, monkeypatch):
    monkeypatch.setattr(sel, "_MAX_BLOCK", max_block)
    for S, kind in ((1, "randn"), (7, "ties"), (111, "special"), (300, "ties")):
        gen = torch.Generator().manual_seed(S)
        R = 3
        scores = _scores(R, S, kind, gen)
        sizes = torch.randint(0, 12, (R, S), generator=gen) if S % 2 else torch.randint(0, 12, (S,), generator=gen)
        sizes[..., :2] = 10                                      # uniform chunks plus some small ones
        protect = torch.rand(R, S, generator=gen) < 0.1
        need = torch.where(protect, sizes.expand(R, S), 0).sum(1)
        budgets = need + torch.randint(0, int(sizes.sum()) + 2, (R,), generator=gen)
        for p in (None, protect):
            want = select_segments(scores, sizes, budgets, policy=policy, protect=p, backend="reference")
            got = select_segments(scores.to(device), sizes.to(device), budgets.to(device), policy=policy,
                                  protect=p.to(device) if p is not None else None, backend="triton")
            assert torch.equal(got.cpu(), want), f"S={S}: " + _report(got.cpu(), want)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_select_segments_triton_unchecked(device):
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    sizes = torch.tensor([[2, 0, 1], [5, 5, 5], [2, -4, 1]])
    budgets = torch.tensor([-1, 4, 0])
    protect = torch.tensor([[False, False, False], [False, False, True], [False, False, False]])
    want = torch.ops.kvpress_kernels.select_segments(scores, sizes, budgets, "skip", protect, "reference")
    got = torch.ops.kvpress_kernels.select_segments(scores.to(device), sizes.to(device), budgets.to(device),
                                                    "skip", protect.to(device), "triton")
    # row 0: a negative budget keeps nothing, not even a zero-size segment; row 1: the protected
    # segment is kept beyond the budget; row 2: a negative size counts as 0, so it fits budget 0
    assert want.tolist() == [[False, False, False], [False, False, True], [False, True, False]]
    assert torch.equal(got.cpu(), want)


def test_select_segments_topped_up_with_tokens():
    """The documented composition: whole segments, then the best single tokens fill the remainder."""
    scores = torch.tensor([[1.0, 1.0, 9.0, 0.0, 0.0, 5.0, 5.0, 5.0, 0.0, 2.0]])
    seg = torch.tensor([[2.0, 0.0, 5.0]])                        # chunk scores of chunks [0,3), [3,6), [6,9), [9,10)
    seg_keep = select_segments(torch.cat([seg, torch.zeros(1, 1)], 1), torch.tensor([3, 3, 3, 1]), 5)
    assert seg_keep.tolist() == [[False, False, True, True]]
    prot = segments_to_token_mask(seg_keep, n_tokens=10, chunk_size=3)
    keep, idx = select_topk(scores, 5, protect=prot)
    assert idx.tolist() == [[2, 6, 7, 8, 9]]


def test_select_segments_bad_inputs():
    s = torch.randn(2, 4)
    sz = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="seg_scores"):
        select_segments(torch.randn(4), sz, 3)
    with pytest.raises(TypeError, match="seg_scores"):
        select_segments(torch.ones(2, 4, dtype=torch.int32), sz, 3)
    with pytest.raises(ValueError, match="seg_sizes"):
        select_segments(s, torch.tensor([1, 2, 3]), 3)
    with pytest.raises(TypeError, match="seg_sizes"):
        select_segments(s, sz.float(), 3)
    with pytest.raises(ValueError, match="seg_sizes"):
        select_segments(s, torch.tensor([1, -2, 3, 4]), 3)
    with pytest.raises(ValueError, match="budget"):
        select_segments(s, sz, -1)
    with pytest.raises(ValueError, match="budget"):
        select_segments(s, sz, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="budget"):
        select_segments(s, sz, "3")
    with pytest.raises(ValueError, match="impossible budget"):
        select_segments(s, sz, 3, protect=torch.tensor([[False, False, False, True]] * 2))
    with pytest.raises(ValueError, match="protect"):
        select_segments(s, sz, 3, protect=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="policy"):
        select_segments(s, sz, 3, policy="fill")


# ------------------------------------------------------------------------------------------------
# torch.library
# ------------------------------------------------------------------------------------------------

def test_opcheck_select_topk():
    x, lens, budgets, protect = _case(3, 17, "ties", seed=9, sink=1, recent=1, with_protect=True)
    torch.library.opcheck(torch.ops.kvpress_kernels.select_topk.default,
                          (x, budgets, lens, 1, 1, protect, int(budgets.max()), "reference"))


def test_opcheck_select_segments():
    s = torch.randn(2, 6)
    torch.library.opcheck(torch.ops.kvpress_kernels.select_segments.default,
                          (s, torch.tensor([1, 2, 3, 1, 2, 3]), torch.tensor([4, 7]), "skip", None, "reference"))


def test_compile_fullgraph_select_topk():
    x, lens, budgets, protect = _case(2, 33, "randn", seed=10, with_protect=True)

    def f(x, b, lens, p):
        return torch.ops.kvpress_kernels.select_topk(x, b, lens, 2, 2, p, 33, "reference")

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, budgets, lens, protect)
    want = f(x, budgets, lens, protect)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
