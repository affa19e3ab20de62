"""ShotKV's scoring options (shot_score, head_reduce, pool_size, layer_ranking): the kept tokens of every
layer equal an independent Python greedy over float64 shot scores computed from the same token scores —
crafted token scores (the window mass replaced) for the shot reductions and layer rankings, real window
attention for the head reduction. The defaults stay the paper's rule (test_methods.py's naive_shotkv)."""

import math

import numpy as np
import pytest
import torch

from _fixtures import kept_lists
from _fixtures import make_inputs as _make_inputs
from _fixtures import shot_segments
from _fixtures import shotkv_greedy as greedy

from kvpress_kernels.methods import PrefillInputs, ShotKV
from kvpress_kernels.methods import shotkv as shotkv_mod
from kvpress_kernels.methods.shotkv import segment_topk_mean


def make_inputs(lengths, Hq=4, Hkv=2, D=8, *, layer=0, num_layers=4, shots=None, seed=0):
    return _make_inputs(lengths, Hq, Hkv, D, layer=layer, num_layers=num_layers, shots=shots, seed=seed,
                        random_values=False)


def at_layer(inp, layer):
    return PrefillInputs(layer=layer, queries=inp.queries, keys=inp.keys, values=inp.values, lengths=inp.lengths,
                         scale=inp.scale, info=inp.info)


def kept_rows(ev, B, Hkv):
    """Per sequence the kept positions, the same in every kv head (ShotKV keeps whole segments for all)."""
    out = []
    for rows in kept_lists(ev, B, Hkv):
        assert all(r == rows[0] for r in rows), "every kv head keeps the same tokens"
        out.append(set(rows[0]))
    return out


# ------------------------------------------------------------------------------------------------
# the oracle, written independently: Python floats
# ------------------------------------------------------------------------------------------------

def pooled(s, k):
    r = k // 2
    return [sum(s[j + o] for o in range(-r, r + 1) if 0 <= j + o < len(s)) / k for j in range(len(s))]


def shot_value(tok, a, e, rule, topk):
    vals = tok[a:e]
    if rule == "mean":
        return sum(vals) / len(vals)
    if rule == "max":
        return max(vals)
    top = sorted(vals, reverse=True)[:topk]
    return sum(top) / len(top)


def seg_values(tok, spans, n, rule="mean", topk=4, pool=1):
    tok = pooled(tok, pool) if pool > 1 else list(tok)
    return [shot_value(tok, a, e, rule, topk) for a, e, _ in shot_segments(spans, n)]


LENGTHS = [60, 47]
SHOTS = [[(1, 9), (9, 20), (20, 26), (30, 44), (44, 51)], [(0, 7), (7, 19), (22, 30), (30, 38)]]


def crafted_scores(layer, seed=0):
    """Token scores [B, N] per layer, with ties and spikes: shots whose mean, max and top-k order differ."""
    g = torch.Generator().manual_seed(100 + 7 * layer + seed)
    B, N = len(LENGTHS), max(LENGTHS)
    s = torch.rand(B, N, generator=g).double()
    s = torch.round(s * 8) / 8                      # coarse values: ties between shots happen
    spikes = torch.rand(B, N, generator=g) < 0.08
    s = torch.where(spikes, s + 3.0, s)             # single hot tokens: max and top-k rank shots differently
    for b, n in enumerate(LENGTHS):
        s[b, n:] = 0
    return s.float()


@pytest.fixture
def crafted(monkeypatch):
    """Replace the window mass by crafted_scores(layer); record the head reduction asked for."""
    asked = []

    def fake(inputs, windows, head_reduce):
        asked.append(head_reduce)
        return crafted_scores(inputs.layer).to(inputs.keys.device)

    monkeypatch.setattr(shotkv_mod, "window_mass", fake)
    return asked


@pytest.mark.parametrize("rule,topk,pool", [("mean", 4, 1), ("max", 4, 1), ("topk_mean", 4, 1), ("topk_mean", 1, 1),
                                            ("topk_mean", 100, 1), ("mean", 4, 5), ("max", 4, 3)])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_shot_score_rules_match_the_oracle(crafted, rule, topk, pool, policy):
    ratio = 0.45
    inp = make_inputs(LENGTHS, shots=SHOTS)
    m = ShotKV(ratio, shot_score=rule, shot_topk=topk, pool_size=pool, policy=policy)
    m.begin(inp.info)
    for layer in range(3):
        got = kept_rows(m.prefill(at_layer(inp, layer)), 2, 2)
        for b, n in enumerate(LENGTHS):
            tok = crafted_scores(layer)[b, :n].double().tolist()
            want = greedy(seg_values(tok, SHOTS[b], n, rule, topk, pool), SHOTS[b], n, ratio, m.window(SHOTS[b], n),
                          policy)
            assert got[b] == want, (rule, topk, pool, layer, b)


def test_rules_actually_choose_differently(crafted):
    """The crafted scores make the options disagree (else the tests above could not tell them apart)."""
    inp = make_inputs(LENGTHS, shots=SHOTS)
    picks = {}
    for rule in ("mean", "max", "topk_mean"):
        m = ShotKV(0.45, shot_score=rule, shot_topk=2, policy="skip")
        m.begin(inp.info)
        picks[rule] = tuple(frozenset(s) for L in range(3) for s in kept_rows(m.prefill(at_layer(inp, L)), 2, 2))
    assert len(set(picks.values())) == 3


def test_cumulative_ranking_sums_shot_scores_over_the_layers_so_far(crafted):
    ratio = 0.4
    inp = make_inputs(LENGTHS, shots=SHOTS)
    m = ShotKV(ratio, layer_ranking="cumulative", shot_score="max")
    m.begin(inp.info)
    differs = False
    for layer in range(4):
        got = kept_rows(m.prefill(at_layer(inp, layer)), 2, 2)
        for b, n in enumerate(LENGTHS):
            per_layer = [seg_values(crafted_scores(L)[b, :n].double().tolist(), SHOTS[b], n, "max")
                         for L in range(layer + 1)]
            total = [sum(v) for v in zip(*per_layer)]
            w = m.window(SHOTS[b], n)
            assert got[b] == greedy(total, SHOTS[b], n, ratio, w), (layer, b)
            differs |= got[b] != greedy(per_layer[-1], SHOTS[b], n, ratio, w)
    assert differs, "the crafted scores must make the cumulative ranking differ from the per-layer one"
    # a new generation starts from scratch
    m.begin(inp.info)
    got = kept_rows(m.prefill(at_layer(inp, 2)), 2, 2)
    for b, n in enumerate(LENGTHS):
        want = greedy(seg_values(crafted_scores(2)[b, :n].double().tolist(), SHOTS[b], n, "max"), SHOTS[b], n, ratio,
                      m.window(SHOTS[b], n))
        assert got[b] == want


def test_reuse_ranking_repeats_the_selection_of_the_period_start(crafted):
    ratio = 0.4
    inp = make_inputs(LENGTHS, shots=SHOTS)
    m = ShotKV(ratio, layer_ranking="reuse", reuse_every=3)
    m.begin(inp.info)
    scored = []
    orig = m.shot_scores

    def spy(inputs, rows):
        scored.append(inputs.layer)
        return orig(inputs, rows)

    m.shot_scores = spy
    for layer in range(7):
        got = kept_rows(m.prefill(at_layer(inp, layer)), 2, 2)
        src = layer - layer % 3
        for b, n in enumerate(LENGTHS):
            want = greedy(seg_values(crafted_scores(src)[b, :n].double().tolist(), SHOTS[b], n, "mean"), SHOTS[b], n,
                          ratio, m.window(SHOTS[b], n))
            assert got[b] == want, (layer, b)
        assert m.stats["kept_tokens"][layer] == [len(s) for s in got]
    assert scored == [0, 3, 6], "the reusing layers skip the scoring"


def test_head_reduce_max_uses_the_max_over_all_query_heads():
    """Real window attention: token score = max over the query heads of its attention mass (float64 oracle)."""
    lengths = [40]
    shots = [[(1, 8), (8, 16), (16, 24), (24, 31)]]
    inp = make_inputs(lengths, Hq=6, Hkv=2, D=8, shots=shots, seed=3)
    n = 40
    for hr in ("sum", "max"):
        m = ShotKV(0.5, head_reduce=hr, policy="skip")
        m.begin(inp.info)
        got = kept_rows(m.prefill(inp), 1, 2)[0]
        w = m.window(shots[0], n)
        mass = torch.zeros(6, n, dtype=torch.float64)
        for h in range(6):
            logits = inp.queries[0, h, n - w:n].double() @ inp.keys[0, h // 3, :n].double().T * inp.scale
            for r in range(w):
                row = logits[r].clone()
                row[n - w + r + 1:] = -math.inf
                mass[h] += torch.softmax(row, 0)
        tok = (mass.sum(0) if hr == "sum" else mass.max(0).values).tolist()
        assert got == greedy(seg_values(tok, shots[0], n), shots[0], n, 0.5, w, "skip"), hr


def test_default_options_are_the_papers_rule(crafted):
    m = ShotKV(0.3)
    assert (m.shot_score, m.head_reduce, m.pool_size, m.layer_ranking) == ("mean", "sum", 1, "per_layer")
    assert "shot_score" not in repr(m) and "layer_ranking" not in repr(m)
    inp = make_inputs(LENGTHS, shots=SHOTS)
    m.begin(inp.info)
    m.prefill(inp)
    assert crafted == ["all_sum"]                  # attention summed over all heads, as the paper
    r = repr(ShotKV(0.3, shot_score="topk_mean", shot_topk=3, layer_ranking="reuse", reuse_every=4))
    assert "shot_score='topk_mean'" in r and "shot_topk=3" in r and "reuse_every=4" in r


def test_segment_topk_mean_edge_cases():
    s = torch.tensor([[5.0, 1.0, 3.0, 2.0, 9.0, 0.5, 7.0, 4.0]])
    spans = torch.tensor([[[0, 3], [3, 3], [3, 8]]])
    sizes = np.array([[3, 0, 5]])
    out = segment_topk_mean(s, spans, sizes, 2, lengths=torch.tensor([7]))
    # [5, 1, 3] -> (5 + 3) / 2; empty -> 0; [2, 9, 0.5, 7] (token 7 beyond the length) -> (9 + 7) / 2
    assert out.tolist() == [[4.0, 0.0, 8.0]]
    out = segment_topk_mean(s, spans, sizes, 10)
    assert torch.allclose(out, torch.tensor([[3.0, 0.0, 22.5 / 5]]))


@pytest.mark.parametrize("kwargs,match", [
    ({"shot_score": "median"}, "shot_score"), ({"shot_topk": 0}, "shot_topk"), ({"head_reduce": "mean"}, "head_reduce"),
    ({"pool_size": 4}, "pool_size"), ({"pool_size": 0}, "pool_size"), ({"layer_ranking": "global"}, "layer_ranking"),
    ({"reuse_every": 0}, "reuse_every")])
def test_bad_scoring_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShotKV(0.5, **kwargs)


def test_pool_size_as_wide_as_the_whole_prompt_is_rejected_when_the_generation_begins():
    """The bound of pool_size: at 2 n - 1 (n the longest prompt) the window covers the whole prompt from every
    token, so every pooled token score is the same and the shot ranking carries nothing; below it, it does."""
    from kvpress_kernels.ops.scoring import pool_scores

    n = max(LENGTHS)                                                           # 60: the bound is 119
    tok = crafted_scores(0)
    flat = pool_scores(tok, "avg", 2 * n - 1, lengths=torch.tensor(LENGTHS))
    assert torch.allclose(flat[0, :n], flat[0, :n].mean().expand(n))          # uniform: nothing to rank by
    assert flat[0, :n].std() < 1e-6 < pool_scores(tok, "avg", 2 * n - 3, lengths=torch.tensor(LENGTHS))[0, :n].std()
    inp = make_inputs(LENGTHS, shots=SHOTS)
    for pool in (2 * n - 1, 2 * n + 1, 10 ** 9 + 1):
        m = ShotKV(0.45, pool_size=pool)                                       # the prompt is unknown here
        with pytest.raises(ValueError, match=f"pool_size must be below 2 \\* n - 1 = {2 * n - 1}"):
            m.begin(inp.info)
        assert m.info is None and m._plan is None                              # nothing changed
    m = ShotKV(0.45, pool_size=2 * n - 3)
    m.begin(inp.info)
    assert kept_rows(m.prefill(inp), 2, 2)                                     # the widest sensible window runs


def test_harness_names_carry_the_options():
    from kvpress_kernels.evaluation.harness import build_method, parse_method_name
    m = build_method("shotkv[shot_score=topk_mean,shot_topk=3,layer_ranking=cumulative]", 0.2)
    assert isinstance(m, ShotKV) and m.keep_ratio == 0.2 and m.decode_keep_ratio == 1.0
    assert (m.shot_score, m.shot_topk, m.layer_ranking) == ("topk_mean", 3, "cumulative")
    assert parse_method_name("snapkv") == ("snapkv", {})
    for bad in ("shotkv[shot_score=max", "shotkv[max]", "full[x=1]", "nope[x=1]"):
        with pytest.raises(ValueError):
            build_method(bad, 0.3)
    with pytest.raises(ValueError, match="shot_score"):
        build_method("shotkv[shot_score=median]", 0.3)


def test_ablation_table_pairs_each_variant_with_its_reference_on_common_examples(tmp_path):
    """benchmarks/ablation_shot_scoring.py: paired Δ on the examples every method finished, vs the same
    method without options; depth-balanced strided order."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation_shot_scoring.py"
    spec = importlib.util.spec_from_file_location("ablation_shot_scoring", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.example_order(7, 3) == [0, 3, 6, 1, 4, 2, 5]
    assert mod.reference_of("shotkv[shot_score=max]") == "shotkv" and mod.reference_of("snapkv") == "snapkv"
    recs = []
    for e, (full, paper, var) in enumerate([(1, 0, 1), (1, 1, 1), (0, 1, 0), (1, 0, 1)]):
        base = {"task": "lookup", "setting": "query_aware", "example": e, "kv_kept": 0.3}
        recs.append({**base, "method": "full", "keep_ratio": 1.0, "score": full})
        recs.append({**base, "method": "shotkv", "keep_ratio": 0.3, "score": paper})
        if e < 3:                                   # example 3 unfinished for the variant: left out of its row
            recs.append({**base, "method": "shotkv[shot_score=max]", "keep_ratio": 0.3, "score": var})
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    rows = {r["method"]: r for r in mod.rows_of(mod.load_records([f]), "lookup", "query_aware", 0.3)}
    assert rows["full"]["n"] == rows["shotkv"]["n"] == 4 and rows["shotkv[shot_score=max]"]["n"] == 3
    assert rows["shotkv"]["acc"][0] == pytest.approx(2 / 4) and rows["full"]["acc"][0] == pytest.approx(3 / 4)
    assert rows["shotkv[shot_score=max]"]["acc"][0] == pytest.approx(2 / 3)
    d, se = rows["shotkv[shot_score=max]"]["d"]
    assert d == pytest.approx(0.0) and se == pytest.approx(math.sqrt(1 / 3))   # diffs +1, 0, -1
    assert rows["shotkv[shot_score=max]"]["wl"] == "1/1"
    table = mod.render([f])
    assert "`shotkv[shot_score=max]`" in table and "vs `shotkv`" in table
