"""AdaKV: select_head_budget (reference vs a naive Python oracle, Triton == reference exactly, parity with
kvpress's AdaKVPress selection) and the AdaKV method (parity with kvpress's AdaKVPress(SnapKVPress) on a
tiny model, generation on our paged cache equal to attention over each head's kept tokens, memory
really freed per head)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import devices_for_triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpress_kernels as kk
from kvpress_kernels.ops import head_budget as hb
from kvpress_kernels.ops.head_budget import select_head_budget, select_head_budget_ref

# ------------------------------------------------------------------------------------------------
# Naive oracle: Python lists, float64, the three tiers written out.
# ------------------------------------------------------------------------------------------------


def _rank(v: float, *tie):
    # score descending, NaN after every number; -0.0 == 0.0 compares equal; then the tie-break fields
    return (1, 0.0, *tie) if math.isnan(v) else (0, -v, *tie)


def naive_row(x, budget, floor, lens, sink=0, recent=0, protect=None):
    """x: H lists of N floats. Returns the kept positions of every head (sorted lists)."""
    H = len(x)
    kept, rest = [], []
    for h in range(H):
        L = lens[h]
        prot = {j for j in range(L) if j < sink or j >= L - recent or (protect is not None and protect[h][j])}
        cands = sorted((j for j in range(L) if j not in prot), key=lambda j: _rank(x[h][j], j))
        need = max(min(floor, L) - len(prot), 0)
        kept.append(prot | set(cands[:need]))
        rest += [(h, j) for j in cands[need:]]
    rest.sort(key=lambda hj: _rank(x[hj[0]][hj[1]], hj[0], hj[1]))  # across heads: lower head, then position
    n_union = max(min(budget, sum(lens)) - sum(len(k) for k in kept), 0)
    for h, j in rest[:n_union]:
        kept[h].add(j)
    return [sorted(k) for k in kept]


def naive(scores, budgets, floors, lengths, sink=0, recent=0, protect=None):
    B = scores.shape[0]
    x = scores.double().tolist()
    return [naive_row(x[b], int(budgets[b]), int(floors[b]), [int(v) for v in lengths[b]], sink, recent,
                      protect[b].tolist() if protect is not None else None) for b in range(B)]


def as_outputs(rows, B, H, N, K):
    mask = torch.zeros((B, H, N), dtype=torch.bool)
    idx = torch.full((B, H, K), -1, dtype=torch.int32)
    lens = torch.zeros((B, H), dtype=torch.int32)
    for b, heads in enumerate(rows):
        for h, kept in enumerate(heads):
            mask[b, h, kept] = True
            idx[b, h, :min(len(kept), K)] = torch.tensor(kept[:K], dtype=torch.int32)
            lens[b, h] = len(kept)
    return mask, idx, lens


def assert_same(got, want, what=""):
    for name, g, w in zip(("keep_mask", "kept_idx", "kept_len"), got, want):
        assert g.shape == w.shape, f"{what} {name}: shape {list(g.shape)} vs {list(w.shape)}"
        bad = (g.cpu() != w.cpu()).nonzero()
        assert bad.shape[0] == 0, f"{what} {name}: {bad.shape[0]} mismatches, first at {bad[:5].tolist()}"


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def _scores(shape, kind, gen, dtype=torch.float32):
    if kind == "randn":
        x = torch.randn(shape, generator=gen)
    elif kind == "ties":  # a tiny integer set: ties inside heads and across heads decide
        x = torch.randint(0, 3, shape, generator=gen).float()
    else:  # NaN, +-inf, +-0 and ties mixed in
        pool = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 1.0, 1e-42])
        x = pool[torch.randint(0, len(pool), shape, generator=gen)]
    return x.to(dtype)


def make_case(B, H, N, kind, seed, *, sink=0, recent=0, with_protect=False, ragged=True):
    gen = torch.Generator().manual_seed(seed)
    x = _scores((B, H, N), kind, gen)
    lens = torch.randint(0, N + 1, (B, H), generator=gen) if ragged else torch.full((B, H), N)
    lens[0, 0] = N
    protect = (torch.rand(B, H, N, generator=gen) < 0.1) if with_protect else None
    floors = torch.randint(0, N + 2, (B,), generator=gen)
    n_prot = hb._protected(lens, N, sink, recent, protect).sum(-1)
    need = n_prot.maximum(floors.unsqueeze(1).minimum(lens)).sum(1)
    # budgets anywhere in the feasible range [protected + floors, every valid token]
    frac = torch.rand(B, generator=gen)
    budgets = (need + (frac * (lens.sum(1) - need + 1).float()).floor().long()).clamp(max=lens.sum(1))
    return x, lens, budgets, floors, protect


CONFIGS = [dict(), dict(sink=2, recent=3), dict(recent=4), dict(with_protect=True),
           dict(sink=1, recent=2, with_protect=True)]


def run_case(case, cfg, backend, device="cpu", K=None):
    x, lens, budgets, floors, protect = case
    kw = {k: v for k, v in cfg.items() if k != "with_protect"}
    to = (lambda t: t.to(device) if t is not None else None)
    got = select_head_budget(to(x), to(budgets), floor=to(floors), lengths=to(lens), protect=to(protect),
                             max_budget=K, backend=backend, **kw)
    return got, kw


# ------------------------------------------------------------------------------------------------
# reference vs naive
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N", [1, 7, 97, 1025])
@pytest.mark.parametrize("H", [1, 3, 8])
@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_reference_vs_naive(N, H, kind, cfg):
    case = make_case(3, H, N, kind, seed=N * 131 + H * 7 + cfg, **CONFIGS[cfg])
    got, kw = run_case(case, CONFIGS[cfg], "reference")
    x, lens, budgets, floors, protect = case
    K = min(N, int(budgets.max()))
    want = as_outputs(naive(x, budgets, floors, lens, protect=protect, **kw), 3, H, N, K)
    assert_same(got, want)


def test_hand_example_floor_then_union():
    # head 0 holds the three best scores of the layer, head 1 none of them
    x = torch.tensor([[[9.0, 8.0, 7.0, 0.5], [0.1, 0.3, 0.2, 0.0]]])
    _, idx, n = select_head_budget(x, 4)                      # no floor: head 1 gives everything up
    assert n.tolist() == [[4, 0]] and idx[0, 0].tolist() == [0, 1, 2, 3]
    _, idx, n = select_head_budget(x, 4, floor=1)             # floor 1: head 1 keeps its best, position 1
    assert n.tolist() == [[3, 1]] and idx[0, 1].tolist() == [1, -1, -1, -1]
    _, idx, n = select_head_budget(x, 4, floor=2, recent=1)   # the recent token counts against the floor
    assert n.tolist() == [[2, 2]] and idx[0, 0].tolist() == [0, 3, -1, -1] and idx[0, 1].tolist() == [1, 3, -1, -1]
    # ties across heads go to the lower head, ties inside a head to the lower position
    t = torch.ones(1, 2, 3)
    _, idx, n = select_head_budget(t, 4)
    assert n.tolist() == [[3, 1]] and idx[0, 1].tolist() == [0, -1, -1]
    _, _, n = select_head_budget(x, 0)
    assert n.tolist() == [[0, 0]]
    _, idx, _ = select_head_budget(x, 2, max_budget=3)
    assert idx.shape == (1, 2, 3)


def test_floor_equal_to_the_average_is_per_head_topk():
    """floor = budget / H leaves nothing to share: per-head select_topk (AdaKV's alpha = 1)."""
    from kvpress_kernels.ops.selection import select_topk
    x, lens, _, _, _ = make_case(2, 4, 50, "randn", seed=5, ragged=False)
    keep, idx, n = select_head_budget(x, 4 * 12, floor=12, recent=3)
    k2, i2 = select_topk(x.reshape(8, 50), 12, recent=3)
    assert torch.equal(keep.reshape(8, 50), k2) and torch.equal(idx.reshape(8, -1)[:, :12], i2)
    assert (n == 12).all()


def test_reference_unchecked_behaviour():
    """What CUDA does without debug checks: budget and floor clipped, protected and floor tokens never lost."""
    x = torch.arange(12.0).flip(0).view(1, 2, 6).repeat(2, 1, 1)   # lower positions score higher
    lens = torch.tensor([[6, 3], [6, 6]])
    budgets = torch.tensor([100, 2])                                 # above the row / below the floors
    floors = torch.tensor([-5, 2])
    keep, idx, n = select_head_budget_ref(x, budgets, floor=floors, lengths=lens, max_budget=3)
    assert n.tolist() == [[6, 3], [2, 2]]
    assert idx[0].tolist() == [[0, 1, 2], [0, 1, 2]]                # cut at K; keep_mask is complete
    assert keep[0, 0].all()


def test_half_inputs_reference():
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float16, torch.bfloat16):
        x = _scores((2, 3, 41), "randn", gen, dtype)
        lens = torch.full((2, 3), 41)
        got = select_head_budget(x, 50, floor=3, sink=1, recent=2)
        want = as_outputs(naive(x, [50, 50], [3, 3], lens, 1, 2), 2, 3, 41, 41)
        assert_same(got, want, str(dtype))


# ------------------------------------------------------------------------------------------------
# Triton == reference, exactly
# ------------------------------------------------------------------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("N,H", [(1, 1), (7, 3), (97, 2), (300, 4)])
@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
@pytest.mark.parametrize("cfg", [0, 1, 4])
def test_triton_equals_reference(device, N, H, kind, cfg):
    case = make_case(2, H, N, kind, seed=N * 17 + H + cfg, **CONFIGS[cfg])
    want, _ = run_case(case, CONFIGS[cfg], "reference")
    got, _ = run_case(case, CONFIGS[cfg], "triton", device)
    assert_same(got, want, f"N={N} H={H} {kind}")


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_many_tiles(device, monkeypatch):
    """Running counts across tiles (protected, floor ties, union ties, kept slots) with 16-token tiles."""
    monkeypatch.setattr(hb, "_MAX_BLOCK", 16)
    for kind, cfg in (("ties", 1), ("special", 4), ("randn", 3)):
        case = make_case(2, 3, 83, kind, seed=11 + cfg, **CONFIGS[cfg])
        want, _ = run_case(case, CONFIGS[cfg], "reference")
        got, _ = run_case(case, CONFIGS[cfg], "triton", device)
        assert_same(got, want, kind)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_strided_and_half_inputs(device):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 6, 50, generator=gen)
    x = base[:, ::2]                                       # head stride 100, unit last stride
    xt = torch.randn(2, 50, 3, generator=gen).transpose(1, 2)   # last stride 3: the launcher copies
    lens = torch.tensor([[50, 20, 33], [5, 50, 0]]).t().contiguous().t()  # non-contiguous lengths
    for s in (x, xt, x.half()):
        want = select_head_budget(s, 50, floor=4, lengths=lens, recent=2, backend="reference")
        got = select_head_budget(s.to(device), 50, floor=4, lengths=lens.to(device), recent=2, backend="triton")
        assert_same(got, want)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_triton_unchecked_behaviour_matches_reference(device):
    x = torch.arange(12.0).flip(0).view(1, 2, 6).repeat(2, 1, 1)
    lens = torch.tensor([[6, 3], [6, 6]])
    budgets, floors = torch.tensor([100, 2]), torch.tensor([-5, 2])
    want = select_head_budget_ref(x, budgets, floor=floors, lengths=lens, max_budget=3)
    got = torch.ops.kvpress_kernels.select_head_budget(x.to(device), budgets.to(device), floors.to(device),
                                                       lens.to(device), 0, 0, None, 3, "triton")
    assert_same(got, want)


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------

def _check_properties(data, backend, device="cpu"):
    B = data.draw(st.integers(1, 2))
    H = data.draw(st.integers(1, 5))
    N = data.draw(st.integers(1, 60))
    kind = data.draw(st.sampled_from(["randn", "ties", "special"]))
    sink, recent = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4))
    cfg = dict(sink=sink, recent=recent, with_protect=data.draw(st.booleans()))
    case = make_case(B, H, N, kind, data.draw(st.integers(0, 2 ** 16)), **cfg)
    (keep, idx, n), _ = run_case(case, cfg, backend, device)
    keep, idx, n = keep.cpu(), idx.cpu(), n.cpu()
    x, lens, budgets, floors, protect = case
    prot = hb._protected(lens, N, sink, recent, protect)
    assert torch.equal(n.long().sum(1), budgets)                              # exactly the budget
    assert torch.equal(n, keep.sum(-1).int())
    assert (n.long() >= floors.unsqueeze(1).minimum(lens)).all()              # the floor holds
    assert keep[prot].all()                                                   # protected kept
    j = torch.arange(N)
    assert not (keep & (j >= lens.unsqueeze(-1))).any()                       # nothing invalid
    for b in range(B):
        for h in range(H):
            k = keep[b, h].nonzero().flatten()
            assert idx[b, h, :len(k)].tolist() == k.tolist() and (idx[b, h, len(k):] == -1).all()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_properties_reference(data):
    _check_properties(data, "reference")


@pytest.mark.triton
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_properties_triton(data):
    _check_properties(data, "triton", devices_for_triton()[0])


# ------------------------------------------------------------------------------------------------
# Parity with kvpress's AdaKVPress selection (same scores in)
# ------------------------------------------------------------------------------------------------

def _kvpress_adakv_kept(scores, ratio, alpha):
    """The keep mask kvpress's AdaKVPress.compress leaves unmasked for these scores."""
    import kvpress
    from kvpress.presses.scorer_press import ScorerPress

    class Fixed(ScorerPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            return scores.clone()

    B, H, N = scores.shape
    module = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    press = kvpress.AdaKVPress(Fixed(compression_ratio=ratio), alpha_safeguard=alpha)
    press.compress(module, None, torch.zeros(B, H, N, 4), torch.zeros(B, H, N, 4), None, {})
    keep = torch.ones(B, H, N, dtype=torch.bool)
    keep[module.masked_key_indices] = False
    return keep


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("window", [0, 6])
def test_parity_with_kvpress_adakv_selection(ratio, alpha, window):
    from kvpress.utils import compute_n_kept
    B, H, N = 2, 4, 57
    gen = torch.Generator().manual_seed(int(ratio * 100 + alpha * 10 + window))
    s = torch.rand(B, H, N, generator=gen)  # distinct with probability 1: no tie decides
    protect = None
    if window:  # SnapKV-style: the window padded to max + 1 in kvpress, protected here
        s[..., -window:] = s.max() + 1
        protect = torch.zeros(B, H, N, dtype=torch.bool)
        protect[..., -window:] = True
    n = compute_n_kept(N, ratio)
    floor = (max(1, int(n * alpha)) if n > 0 else 0) if alpha > 0 else 0
    want = _kvpress_adakv_kept(s, ratio, alpha)
    for backend in ("reference", "triton"):
        keep, _, n_h = select_head_budget(s, H * n, floor=floor, protect=protect, backend=backend)
        assert torch.equal(keep, want), f"{backend}: {int((keep != want).sum())} tokens differ from kvpress"
    if alpha < 1:  # the test is one of *shared* budgets: heads really differ
        assert len(set(n_h.flatten().tolist())) > 1


# ------------------------------------------------------------------------------------------------
# Bad inputs, torch.library
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,err,match", [
    (lambda x: select_head_budget(x[0], 3), ValueError, "scores"),
    (lambda x: select_head_budget(x.int(), 3), TypeError, "scores"),
    (lambda x: select_head_budget(x, -1), ValueError, "budget"),
    (lambda x: select_head_budget(x, 2.5), TypeError, "budget"),
    (lambda x: select_head_budget(x, torch.tensor([3, 3, 3])), ValueError, "budget"),
    (lambda x: select_head_budget(x, 3, floor=-1), ValueError, "floor"),
    (lambda x: select_head_budget(x, 100), ValueError, "budget"),
    (lambda x: select_head_budget(x, 4, floor=3), ValueError, "impossible budget"),
    (lambda x: select_head_budget(x, 4, recent=3), ValueError, "impossible budget"),
    (lambda x: select_head_budget(x, 8, max_budget=5), ValueError, "max_budget"),
    (lambda x: select_head_budget(x, torch.tensor([8, 3]), max_budget=5), ValueError, "max_budget"),
    (lambda x: select_head_budget(x, 3, lengths=torch.tensor([5, 5])), ValueError, "lengths"),
    (lambda x: select_head_budget(x, 3, lengths=torch.tensor([[9, 5], [5, 5]])), ValueError, "lengths"),
    (lambda x: select_head_budget(x, 9, lengths=torch.tensor([[4, 4], [6, 6]])), ValueError, "budget larger"),
    (lambda x: select_head_budget(x, 3, protect=torch.ones(2, 2, 6, dtype=torch.bool)), ValueError, "protect"),
    (lambda x: select_head_budget(x, 3, protect=torch.ones(2, 2, 8)), TypeError, "protect"),
    (lambda x: select_head_budget(x, 3, sink=-1), ValueError, "sink"),
    (lambda x: select_head_budget(x, 3, backend="cuda"), ValueError, "backend"),
])
def test_bad_inputs(call, err, match):
    x = torch.randn(2, 2, 8)
    with pytest.raises(err, match=match):
        call(x)


def test_opcheck():
    x, lens, budgets, floors, protect = make_case(2, 3, 19, "ties", seed=9, sink=1, recent=1, with_protect=True)
    torch.library.opcheck(torch.ops.kvpress_kernels.select_head_budget.default,
                          (x, budgets, floors, lens, 1, 1, protect, 19, "reference"))


def test_compile_fullgraph():
    x, lens, budgets, floors, protect = make_case(2, 3, 33, "randn", seed=10, with_protect=True)

    def f(x, b, fl, lens, p):
        return torch.ops.kvpress_kernels.select_head_budget(x, b, fl, lens, 2, 2, p, 33, "reference")

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, budgets, floors, lens, protect)
    assert_same(got, f(x, budgets, floors, lens, protect))
