"""AdaKV: select_head_budget (reference vs a naive Python oracle, Triton == reference exactly, parity with
kvpress's AdaKVPress selection) and the AdaKV method (parity with kvpress's AdaKVPress(SnapKVPress) on a
tiny model, generation on our paged cache equal to attention over each head's kept tokens, memory
really freed per head)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import _fixtures
from _fixtures import kept_lists as _kept_lists
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


# ------------------------------------------------------------------------------------------------
# The AdaKV method
# ------------------------------------------------------------------------------------------------

def tiny_llama(Hq=4, Hkv=2, D=16, layers=2, seed=0, vocab=120):
    return _fixtures.tiny_llama(Hq, Hkv, D, layers, seed, vocab=vocab)


def distinct_ids(batch, n, vocab=120, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab - 3, generator=g)[:n] + 3 for _ in range(batch)])


def test_method_parameters():
    m = kk.AdaKV(0.3, alpha=0.25, window_size=8)
    assert m.floor_tokens(40) == 10 and m.floor_tokens(3) == 1 and kk.AdaKV(0.3, alpha=0).floor_tokens(40) == 0
    assert "alpha=0.25" in repr(m)
    with pytest.raises(ValueError, match="alpha"):
        kk.AdaKV(0.3, alpha=1.5)
    with pytest.raises(TypeError, match="alpha"):
        kk.AdaKV(0.3, alpha="0.2")
    with pytest.raises(ValueError, match="keep_ratio"):
        kk.AdaKV(0.0)


@pytest.mark.parametrize("cfg", [(4, 2, 3), (4, 4, 2), (8, 2, 2)], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("ratio,alpha", [(0.5, 0.2), (0.7, 0.2), (0.25, 0.5), (0.7, 0.0)])
def test_parity_with_kvpress_adakv_snapkv(cfg, ratio, alpha):
    """Layer by layer on the same inputs: kvpress's AdaKVPress(SnapKVPress) leaves unmasked exactly the
    tokens our AdaKV keeps (kvpress only masks them; we compact them away)."""
    import kvpress
    from kvpress.utils import compute_n_kept
    from kvpress_kernels.integrations.kvpress import _queries
    from kvpress_kernels.methods import GenerationInfo, PrefillInputs

    Hq, Hkv, layers = cfg
    model = tiny_llama(Hq, Hkv, 16, layers=layers, seed=1)
    B, N, W = 2, 60, 8
    keep_ratio = 1 - ratio
    assert compute_n_kept(N, ratio) == kk.methods.budget_tokens(keep_ratio, N)  # the same budget
    ours = kk.AdaKV(keep_ratio, alpha=alpha, window_size=W, kernel_size=5)
    ours.begin(GenerationInfo(layers, B, Hq, Hkv, 16, (N,) * B))
    theirs = kvpress.AdaKVPress(kvpress.SnapKVPress(ratio, window_size=W, kernel_size=5), alpha_safeguard=alpha)
    seen = []

    def hook(module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        keys, values, hs = layer.keys, layer.values, kwargs["hidden_states"]
        theirs.compress(module, hs, keys, values, None, kwargs)
        want = torch.ones(B, Hkv, N, dtype=torch.bool)
        want[module.masked_key_indices] = False
        module.masked_key_indices = None
        q = _queries(module, hs, kwargs["position_embeddings"], N)
        ev = ours.prefill(PrefillInputs(module.layer_idx, q, keys, values, torch.full((B,), N), module.scaling,
                                        ours.info))
        idx = ev.kept_idx.long()
        # the -1 padding goes to a dump column N
        got = torch.zeros(B, Hkv, N + 1, dtype=torch.bool).scatter_(2, torch.where(idx >= 0, idx, N), True)[..., :N]
        seen.append((got, want))

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        from transformers import DynamicCache
        with torch.no_grad():
            model(distinct_ids(B, N), past_key_values=DynamicCache())
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == layers
    n = compute_n_kept(N, ratio)
    spread = False
    for layer, (got, want) in enumerate(seen):
        assert torch.equal(got, want), f"layer {layer}: {int((got != want).sum())} tokens differ from kvpress"
        per_head = got.sum(-1)
        assert (per_head.sum(-1) == Hkv * n).all()
        spread |= len(set(per_head.flatten().tolist())) > 1
    assert spread, "heads all kept the same count: the test would not tell AdaKV from SnapKV"


def test_alpha_one_is_snapkv():
    """alpha = 1: every head's floor is the average, nothing is shared: SnapKV's kept sets."""
    model = tiny_llama(4, 2, 16, layers=2, seed=2)
    ids = distinct_ids(1, 40)
    kept = []
    for method in (kk.AdaKV(0.4, alpha=1.0, window_size=4), kk.SnapKV(0.4, window_size=4)):
        with kk.compress(model, method, page_size=4) as s:
            model.generate(ids, max_new_tokens=1, do_sample=False)
        kept.append([s.cache.kv.gather(layer)[3] for layer in range(2)])
    for a, b in zip(*kept):
        assert torch.equal(a, b)


_KEEP = {}


def _kept_only_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Oracle attention: prefill is plain SDPA; a decoding step attends, in every kv head, only to the prompt
    tokens that head kept (``_KEEP[layer]``: ``[B, Hkv, n]`` bool) and to every generated token."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    keep = _KEEP.get(module.layer_idx)
    if keep is None or query.shape[2] == key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, Hq, T, D = query.shape
    Hkv, n, S = key.shape[1], keep.shape[2], key.shape[2]
    allow = torch.ones(B, Hkv, S, dtype=torch.bool)
    allow[..., :n] = keep
    G = Hq // Hkv
    allow = allow.repeat_interleave(G, 1).unsqueeze(2).expand(B, Hq, T, S)
    out = torch.nn.functional.scaled_dot_product_attention(query, key.repeat_interleave(G, 1),
                                                           value.repeat_interleave(G, 1), attn_mask=allow,
                                                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _assert_equals_kept_only_attention(model, ids, cache, out, n: int, new: int) -> None:
    """``out`` (greedy generation with scores, on our paged ``cache``) equals stock generation under
    :func:`_kept_only_attention`, with every kv head of every layer seeing exactly the prompt tokens it
    kept in ``cache`` (whose count must be its after-prefill length)."""
    from transformers import AttentionInterface
    kv = cache.kv
    lengths = cache.lengths_after_prefill                                   # [L, B, Hkv]
    L, B, Hkv = lengths.shape
    for layer in range(L):
        _, _, lens, pos = kv.gather(layer)
        keep = torch.zeros(B, Hkv, n, dtype=torch.bool)
        for b in range(B):
            for h in range(Hkv):
                p = pos[b, h, :lens[b, h]]
                keep[b, h, p[p < n].long()] = True
        assert torch.equal(keep.sum(-1), torch.as_tensor(lengths[layer]))   # prompt slots = after-prefill length
        _KEEP[layer] = keep
    AttentionInterface.register("adakv_kept_only", _kept_only_attention)
    prev = model.config._attn_implementation
    model.config._attn_implementation = "adakv_kept_only"
    try:
        want = model.generate(ids, max_new_tokens=new, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)
    finally:
        model.config._attn_implementation = prev
        _KEEP.clear()
    assert torch.equal(out.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(out.scores, want.scores)):
        # the first token comes from the uncompressed prefill; later ones from the per-head cache.
        # fp32 attention summed in another order (paged reference vs SDPA): O(1) logits agree to ~1e-6
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("cfg", [(4, 2, 16), (8, 4, 8)], ids=lambda c: "x".join(map(str, c)))
def test_generation_equals_attention_over_each_heads_kept_tokens(cfg):
    """Per-head lengths on our paged cache: greedy generation and every step's logits equal stock
    attention in which each kv head sees only its own kept prompt tokens (plus the generated ones)."""
    Hq, Hkv, D = cfg
    model = tiny_llama(Hq, Hkv, D, layers=3, seed=3)
    B, n, new = 2, 37, 4
    ids = distinct_ids(B, n, seed=11)
    with kk.compress(model, kk.AdaKV(0.3, alpha=0.2, window_size=4), page_size=4) as s:
        out = model.generate(ids, max_new_tokens=new, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    lengths = s.cache.lengths_after_prefill                                  # [L, B, Hkv]
    budget = kk.methods.budget_tokens(0.3, n)
    assert (lengths.sum(-1) == Hkv * budget).all()                            # the layer's shared budget
    assert len(np.unique(lengths)) > 1                                        # heads really differ
    _assert_equals_kept_only_attention(model, ids, s.cache, out, n, new)


@pytest.mark.parametrize("batch", [1, 2])
def test_per_head_lengths_free_pages(batch):
    """Bytes after prefill are exactly the pages of each (sequence, head)'s own length: a head that gave
    up slots gave up pages, the pool took them back, and the total equals SnapKV's at the same budget
    within a page per row."""
    model = tiny_llama(4, 2, 16, layers=2, seed=4)
    n, ps = 53, 4
    ids = distinct_ids(batch, n, seed=5)
    stats = {}
    for name, method in (("adakv", kk.AdaKV(0.4, alpha=0.1, window_size=4)), ("snapkv", kk.SnapKV(0.4, window_size=4))):
        with kk.compress(model, method, page_size=ps) as s:
            model.generate(ids, max_new_tokens=2, do_sample=False)
        kv = s.cache.kv
        kv.check_invariants()
        after = s.cache.lengths_after_prefill
        assert s.stats["kv_bytes_after_prefill"] == int((-(-after // ps)).sum()) * kv.page_bytes
        assert kv.pages_in_use() + kv.num_free_pages() == kv.num_pages
        stats[name] = (after, s.stats)
    a, sn = stats["adakv"][0], stats["snapkv"][0]
    assert (a.sum(-1) == sn.sum(-1)).all() and (a != sn).any()
    rows = a.size
    diff = abs(stats["adakv"][1]["kv_bytes_after_prefill"] - stats["snapkv"][1]["kv_bytes_after_prefill"])
    assert diff <= rows * kv.page_bytes
    assert stats["adakv"][1]["kv_bytes_after_prefill"] < stats["adakv"][1]["kv_bytes_full"]


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_method_triton_backend_equals_reference(device):
    from kvpress_kernels.methods import GenerationInfo, PrefillInputs
    g = torch.Generator().manual_seed(6)
    B, Hq, Hkv, N, D = 2, 4, 2, 45, 16
    q, k = torch.randn(B, Hq, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    lengths = (45, 31)
    k[1, :, 31:] = 0
    kept = []
    for backend in ("reference", "triton"):
        m = kk.AdaKV(0.3, alpha=0.2, window_size=6)
        m.begin(GenerationInfo(1, B, Hq, Hkv, D, lengths, backend=backend, device=torch.device(device)))
        ev = m.prefill(PrefillInputs(0, q.to(device), k.to(device), k.to(device), torch.tensor(lengths, device=device),
                                     D ** -0.5, m.info))
        kept.append(ev.kept_idx.cpu())
    assert torch.equal(kept[0], kept[1])
    counts = (kept[0] >= 0).sum(-1)
    assert counts.sum(-1).tolist() == [Hkv * kk.methods.budget_tokens(0.3, n) for n in lengths]


# ------------------------------------------------------------------------------------------------
# head_budget="adakv" on the other per-head methods (SnapKV, PyramidKV, KNorm, H2O)
# ------------------------------------------------------------------------------------------------

def _prefill_inputs(lengths, Hq=4, Hkv=2, D=8, layer=0, layers=4, seed=0, key_scale=None):
    from kvpress_kernels.methods import GenerationInfo, PrefillInputs
    g = torch.Generator().manual_seed(seed)
    B, N = len(lengths), max(lengths)
    q, k = torch.randn(B, Hq, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    if key_scale is not None:                       # per-head key norms: crafted KNorm scores
        k = k * torch.tensor(key_scale).view(1, Hkv, 1, 1)
    for b, n in enumerate(lengths):
        q[b, :, n:] = 0
        k[b, :, n:] = 0
    info = GenerationInfo(layers, B, Hq, Hkv, D, tuple(lengths))
    return PrefillInputs(layer, q, k, k.clone(), torch.tensor(lengths), D ** -0.5, info)


def _oracle(scores, budgets, alpha, lengths, protect):
    """AdaKV over the method's own per-head scores: naive_row (above) per sequence."""
    B, H, _ = scores.shape
    x = scores.double().tolist()
    floor = [0 if alpha == 0 or b <= 0 else max(1, int(b * alpha)) for b in budgets]
    return [naive_row(x[b], H * budgets[b], floor[b], [int(lengths[b])] * H,
                      protect=None if protect is None else protect[b].tolist()) for b in range(B)]


def _window_protect(lengths, N, H, windows, budgets):
    start = torch.tensor([n - min(w, b) for n, w, b in zip(lengths, windows, budgets)])
    return (torch.arange(N).view(1, 1, N) >= start.view(-1, 1, 1)).expand(len(lengths), H, N)


PER_HEAD = {
    "snapkv": lambda r, a: kk.SnapKV(r, window_size=5, head_budget="adakv", head_alpha=a),
    "pyramidkv": lambda r, a: kk.PyramidKV(r, window_size=3, beta=4, head_budget="adakv", head_alpha=a),
    "knorm": lambda r, a: kk.KNorm(r, head_budget="adakv", head_alpha=a),
    "h2o": lambda r, a: kk.H2O(r, recent_ratio=0.25, compress_decode=False, head_budget="adakv", head_alpha=a),
}


@pytest.mark.parametrize("name", sorted(PER_HEAD))
@pytest.mark.parametrize("ratio,alpha", [(0.3, 0.2), (0.5, 0.0), (0.25, 1.0)])
@pytest.mark.parametrize("layer", [0, 3])
def test_head_budget_option_matches_the_oracle(name, ratio, alpha, layer):
    """The kept sets equal AdaKV's naive oracle over the method's own per-head scores (its protected tokens
    first); the layer keeps exactly Hkv x the method's per-head budget; alpha = 1 is the uniform method."""
    lengths = [57, 40]
    B, H, N = 2, 2, 57
    inp = _prefill_inputs(lengths, layer=layer, seed=layer + 3, key_scale=[0.5, 2.0] if name == "knorm" else None)
    m = PER_HEAD[name](ratio, alpha)
    m.begin(inp.info)
    budgets = m.layer_budgets(inp) if hasattr(m, "layer_budgets") else [m.budget(n) for n in lengths]
    if name in ("snapkv", "pyramidkv"):
        scores = m.window_scores(inp)
        protect = _window_protect(lengths, N, H, m.windows(lengths), budgets)
    elif name == "knorm":
        scores, protect = m.token_scores(inp), None
    else:
        scores = m.token_scores(inp)
        start = torch.tensor([n - m._recent(b) for n, b in zip(lengths, budgets)])
        protect = (torch.arange(N).view(1, 1, N) >= start.view(B, 1, 1)).expand(B, H, N)
    got = _kept_lists(m.prefill(inp), B, H)
    assert got == _oracle(scores, budgets, alpha, lengths, protect)
    for b in range(B):
        assert sum(len(r) for r in got[b]) == H * budgets[b]
    uniform = {"snapkv": lambda: kk.SnapKV(ratio, window_size=5),
               "pyramidkv": lambda: kk.PyramidKV(ratio, window_size=3, beta=4),
               "knorm": lambda: kk.KNorm(ratio),
               "h2o": lambda: kk.H2O(ratio, recent_ratio=0.25, compress_decode=False)}[name]()
    uniform.begin(inp.info)
    same = _kept_lists(uniform.prefill(inp), B, H) == got
    assert same == (alpha == 1.0) or (alpha != 1.0 and not same), "alpha = 1 must give the uniform method"


def test_knorm_head_budget_gives_the_short_keys_head_more_slots():
    """Crafted norms: head 0's keys are 4x shorter, so the union selection gives it most of the slots."""
    inp = _prefill_inputs([64], key_scale=[0.25, 1.0], seed=9)
    m = kk.KNorm(0.25, head_budget="adakv", head_alpha=0.25)
    m.begin(inp.info)
    rows = _kept_lists(m.prefill(inp), 1, 2)[0]
    assert len(rows[0]) + len(rows[1]) == 2 * 16
    assert len(rows[1]) == 4 and len(rows[0]) == 28            # head 1 is held at its floor int(0.25 * 16)


def test_h2o_head_budget_decode_matches_the_oracle():
    """Decoding with per-head rows: Hkv * (ext + budget) tokens over the heads of each sequence, the recent
    window and the extended prompt protected, floor per head; accumulated scores by position."""
    from kvpress_kernels.methods import DecodeInputs, GenerationInfo
    g = torch.Generator().manual_seed(12)
    B, H, S, prompt = 1, 2, 24, 16
    info = GenerationInfo(1, B, 4, H, 8, (prompt,))
    m = kk.H2O(0.5, recent_ratio=0.25, head_budget="adakv", head_alpha=0.2)
    m.begin(info)
    lens = [20, 14]                                  # per-head rows after an AdaKV prefill and 4 decode steps
    positions = torch.full((B, H, S), -1, dtype=torch.int32)
    pos_rows = [list(range(0, 16)) + [16, 17, 18, 19], [1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 16, 17, 18, 19]]
    for h in range(H):
        positions[0, h, :lens[h]] = torch.tensor(pos_rows[h], dtype=torch.int32)
    m._acc[0] = torch.rand(B, H, 32, generator=g)
    acc0 = m._acc[0].clone()
    probs = torch.zeros(B, H, S)
    for h in range(H):
        probs[0, h, :lens[h]] = torch.rand(lens[h], generator=g)
    inputs = DecodeInputs(layer=0, generated=4, probs=probs, positions=positions,
                          lengths=torch.tensor([lens], dtype=torch.int32), lengths_host=np.array([lens]),
                          seen_host=np.array([20]), info=info)
    ev = m.decode(inputs)
    assert ev.new_lengths is None
    budget = kk.methods.budget_tokens(0.5, 20)      # 10 per head on average: 20 over both heads
    acc = acc0.clone()
    score = torch.zeros(B, H, S)
    for h in range(H):
        for s in range(lens[h]):
            acc[0, h, pos_rows[h][s]] += probs[0, h, s]
    for h in range(H):
        for s in range(lens[h]):
            score[0, h, s] = acc[0, h, pos_rows[h][s]]
    recent_from = 20 - max(1, min(budget, int(0.25 * budget)))
    protect = torch.zeros(B, H, S, dtype=torch.bool)
    for h in range(H):
        for s in range(lens[h]):
            protect[0, h, s] = pos_rows[h][s] >= recent_from
    want = naive_row(score[0].double().tolist(), H * budget, max(1, int(0.2 * budget)), lens,
                     protect=protect[0].tolist())
    assert _kept_lists(ev, B, H)[0] == want
    assert sum(len(r) for r in want) == H * budget


@pytest.mark.parametrize("name", ["pyramidkv", "knorm", "h2o"])
def test_head_budget_generation_equals_attention_over_each_heads_kept_tokens(name):
    """End to end on the paged cache for the other methods with head_budget="adakv": per-head lengths after
    prefill, and greedy generation / every step's logits equal stock attention in which each kv head sees
    only its own kept prompt tokens."""
    model = tiny_llama(4, 2, 16, layers=3, seed=3)
    B, n, new = 2, 37, 4
    ids = distinct_ids(B, n, seed=11)
    method = {"pyramidkv": lambda: kk.PyramidKV(0.4, window_size=4, beta=4, head_budget="adakv"),
              "knorm": lambda: kk.KNorm(0.3, head_budget="adakv"),
              "h2o": lambda: kk.H2O(0.3, compress_decode=False, head_budget="adakv")}[name]()
    with kk.compress(model, method, page_size=4) as s:
        out = model.generate(ids, max_new_tokens=new, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    s.cache.kv.check_invariants()
    lengths = s.cache.lengths_after_prefill                                  # [L, B, Hkv]
    assert len(np.unique(lengths)) > 1                                        # heads really differ
    _assert_equals_kept_only_attention(model, ids, s.cache, out, n, new)


def test_h2o_head_budget_decoding_keeps_the_shared_budget_on_the_paged_cache():
    """H2O evicting while decoding with per-head rows: every step each sequence holds exactly
    Hkv * budget(t) tokens over its heads (rows of different lengths), the pool stays consistent."""
    model = tiny_llama(4, 2, 16, layers=2, seed=5)
    ids = distinct_ids(1, 30, seed=2)
    with kk.compress(model, kk.H2O(0.4, head_budget="adakv"), page_size=4) as s:
        model.generate(ids, max_new_tokens=6, do_sample=False)
    kv = s.cache.kv
    kv.check_invariants()
    for layer in range(2):
        lens = kv.gather(layer)[2]
        assert int(lens.sum()) == 2 * kk.methods.budget_tokens(0.4, 30 + 6 - 1) or int(lens.sum()) == \
            2 * kk.methods.budget_tokens(0.4, 30 + 6)
        assert len(set(lens.flatten().tolist())) > 1


def test_head_budget_bad_options():
    for cls in (kk.SnapKV, kk.PyramidKV, kk.KNorm, kk.H2O):
        with pytest.raises(ValueError, match="head_budget"):
            cls(0.3, head_budget="per_layer")
        with pytest.raises(ValueError, match="head_alpha"):
            cls(0.3, head_budget="adakv", head_alpha=-0.1)
        with pytest.raises(TypeError, match="head_alpha"):
            cls(0.3, head_alpha="0.2")
        assert "head_budget='adakv'" in repr(cls(0.3, head_budget="adakv")) and "head_budget" not in repr(cls(0.3))
    a = kk.AdaKV(0.3, alpha=0.3)
    assert a.head_budget == "adakv" and a.alpha == 0.3 and "head_budget" not in repr(a)
