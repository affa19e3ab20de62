"""The compression methods as policies, on synthetic prefill/decode inputs (no model), each compared with
an independent naive float64 formula of its rule; shot finding; bad inputs."""

import math

import numpy as np
import pytest
import torch

from _fixtures import greedy_fill, kept_lists, make_inputs, shot_segments, shotkv_greedy

from kvpress_kernels.methods import (H2O, TOVA, ChunkKV, DecodeInputs, GenerationInfo, KNorm,
                                     PyramidKV, ShotKV, SnapKV, StreamingLLM, budget_tokens)
from kvpress_kernels.shots import find_shots, normalize_batch_shots, validate_spans


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def naive_mass(inp, b, window, *, causal=True):
    """float64 ``[Hq, n]``: attention each key of sequence b gets from its last ``window`` queries."""
    n = inp.info.prompt_lengths[b]
    Hq, Hkv = inp.queries.shape[1], inp.keys.shape[1]
    G = Hq // Hkv
    out = torch.zeros(Hq, n, dtype=torch.float64)
    for h in range(Hq):
        qs = inp.queries[b, h, n - window:n].double()
        ks = inp.keys[b, h // G, :n].double()
        logits = qs @ ks.T * inp.scale
        for w in range(window):
            pos = n - window + w
            row = logits[w].clone()
            if causal:
                row[pos + 1:] = -math.inf
            out[h] += torch.softmax(row, 0)
    return out


def naive_pool(s, kernel, end, kind):
    """Centred pooling of the first ``end`` entries (zero padding for avg, ignored for max)."""
    out = s.clone()
    r = kernel // 2
    for j in range(end):
        vals = [s[j + o] for o in range(-r, r + 1) if 0 <= j + o < end]
        out[j] = sum(vals) / kernel if kind == "avg" else max(vals)
    return out


def naive_topk(scores, budget, protected):
    """Protected first, then best scores (ties to the lower position)."""
    keep = set(protected)
    rest = sorted((j for j in range(len(scores)) if j not in keep), key=lambda j: (-float(scores[j]), j))
    keep.update(rest[: budget - len(keep)])
    return keep


def kept_sets(ev, B, Hkv):
    """``{(b, h): kept positions}`` of an Eviction (its contract checked by :func:`_fixtures.kept_lists`)."""
    return {(b, h): set(row) for b, rows in enumerate(kept_lists(ev, B, Hkv)) for h, row in enumerate(rows)}


# ------------------------------------------------------------------------------------------------
# budgets
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,n,expected", [(0.3, 10, 3), (0.5, 7, 4), (1.0, 5, 5), (0.01, 5, 1), (0.7, 0, 0),
                                              (0.1, 30, 3), (0.29, 100, 29)])
def test_budget_tokens(ratio, n, expected):
    assert budget_tokens(ratio, n) == expected


# ------------------------------------------------------------------------------------------------
# SnapKV / PyramidKV
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths,Hq,Hkv,window,kernel,pooling,ratio", [
    ([23, 17], 4, 2, 5, 3, "avg", 0.4),
    ([31], 3, 1, 4, 5, "max", 0.3),
    ([19, 19], 8, 8, 3, 1, "none", 0.5),
    ([7, 12], 4, 1, 6, 3, "avg", 0.2),       # budget smaller than the window for the short prompt
])
def test_snapkv_matches_naive(lengths, Hq, Hkv, window, kernel, pooling, ratio):
    inp = make_inputs(lengths, Hq, Hkv)
    ev = SnapKV(ratio, window_size=window, kernel_size=kernel, pooling=pooling).prefill(inp)
    got = kept_sets(ev, len(lengths), Hkv)
    G = Hq // Hkv
    for b, n in enumerate(lengths):
        W = min(window, n)
        budget = budget_tokens(ratio, n)
        mass = naive_mass(inp, b, W)
        for h in range(Hkv):
            s = mass[h * G:(h + 1) * G].mean(0)
            if pooling != "none":
                s = naive_pool(s, kernel, n - W, pooling)
            prot = range(n - min(W, budget), n)
            assert got[b, h] == naive_topk(s, budget, prot), (b, h)


def test_pyramidkv_prefill_uses_layer_budget():
    lengths = [120, 97]
    for layer in (0, 3):
        inp = make_inputs(lengths, 4, 2, layer=layer, num_layers=4)
        m = PyramidKV(0.4, window_size=8, beta=2)
        ev = m.prefill(inp)
        for b, n in enumerate(lengths):
            assert (ev.new_lengths[b] == m.layer_budget(layer, 4, n)).all()
    inp0 = make_inputs(lengths, 4, 2, layer=0, num_layers=4)
    inp3 = make_inputs(lengths, 4, 2, layer=3, num_layers=4)
    assert PyramidKV(0.4, window_size=8, beta=2).prefill(inp0).new_lengths.sum() > \
        PyramidKV(0.4, window_size=8, beta=2).prefill(inp3).new_lengths.sum()


# ------------------------------------------------------------------------------------------------
# ChunkKV
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_chunkkv_matches_naive(policy):
    lengths, Hq, Hkv, C, W, ratio = [37, 26], 4, 2, 5, 4, 0.4
    inp = make_inputs(lengths, Hq, Hkv, seed=3)
    ev = ChunkKV(ratio, chunk_size=C, window_size=W, kernel_size=3, policy=policy).prefill(inp)
    got = kept_sets(ev, 2, Hkv)
    for b, n in enumerate(lengths):
        s = naive_pool(naive_mass(inp, b, W).sum(0), 3, n - W, "avg")
        chunks = [(c, min(c + C, n)) for c in range(0, n, C)]
        score = [float(s[a:e].mean()) for a, e in chunks]
        prot = [e > n - W for a, e in chunks]
        keep = {i for i, p in enumerate(prot) if p}
        rem = max(budget_tokens(ratio, n), sum(e - a for (a, e), p in zip(chunks, prot) if p)) - \
            sum(e - a for (a, e), p in zip(chunks, prot) if p)
        keep |= greedy_fill(sorted((i for i in range(len(chunks)) if not prot[i]), key=lambda i: (-score[i], i)),
                            [e - a for a, e in chunks], rem, policy)
        want = {j for i in keep for j in range(*chunks[i])}
        for h in range(Hkv):
            assert got[b, h] == want, (b, h)


def test_chunkkv_layer_reuse():
    m = ChunkKV(0.5, chunk_size=4, window_size=4, reuse_every=2)
    info_inp = make_inputs([30], 4, 2, layer=0, num_layers=4, seed=1)
    m.begin(info_inp.info)
    ev0 = m.prefill(info_inp)
    ev1 = m.prefill(make_inputs([30], 4, 2, layer=1, num_layers=4, seed=2))
    ev2 = m.prefill(make_inputs([30], 4, 2, layer=2, num_layers=4, seed=2))
    assert torch.equal(ev0.kept_idx, ev1.kept_idx)          # layer 1 reuses layer 0
    fresh = ChunkKV(0.5, chunk_size=4, window_size=4).prefill(make_inputs([30], 4, 2, layer=2, num_layers=4, seed=2))
    assert torch.equal(ev2.kept_idx, fresh.kept_idx)        # layer 2 selects again
    assert not torch.equal(ev0.kept_idx, ev2.kept_idx)


# ------------------------------------------------------------------------------------------------
# ShotKV
# ------------------------------------------------------------------------------------------------

def test_shotkv_keeps_the_most_attended_shot_whole_and_drops_the_others_whole():
    torch.manual_seed(0)
    B, Hq, Hkv, D = 1, 4, 2, 16
    # prompt: [0, 2) instruction | 4 shots of 10 tokens | [42, 50) question
    shots = [(2, 12), (12, 22), (22, 32), (32, 42)]
    n = 50
    inp = make_inputs([n], Hq, Hkv, D, shots=[shots])
    u = torch.zeros(D)
    u[0] = 1.0
    q = inp.queries
    k = inp.keys
    q[:, :, 42:] = 4.0 * u                       # the question asks about direction u ...
    k[:, :, :] = 0.1 * torch.randn(B, Hkv, n, D)
    k[:, :, 22:32] += 3.0 * u                    # ... which only shot 2 holds
    m = ShotKV(0.5, policy="skip")
    m.begin(inp.info)
    ev = m.prefill(inp)
    kept = kept_sets(ev, B, Hkv)
    for h in range(Hkv):
        s = kept[0, h]
        assert set(range(22, 32)) <= s, "the most attended shot must be kept whole"
        assert set(range(0, 2)) <= s and set(range(42, 50)) <= s, "non-shot spans are protected"
        for a, e in shots:
            part = set(range(a, e)) & s
            assert part in (set(), set(range(a, e))), f"shot {(a, e)} split"
        # budget ceil(0.5 * 50) = 25: protected 10 + one 10-token shot; the others dropped whole
        assert len(s) == 20


def naive_shotkv(inp, b, ratio, policy, window):
    n = inp.info.prompt_lengths[b]
    spans = inp.info.shots[b]
    s = naive_mass(inp, b, window).sum(0)
    values = [float(s[a:e].mean()) for a, e, _ in shot_segments(spans, n)]
    return shotkv_greedy(values, spans, n, ratio, window, policy)


@pytest.mark.parametrize("policy", ["stop", "skip"])
@pytest.mark.parametrize("window_size", [None, 3])
def test_shotkv_matches_naive(policy, window_size):
    lengths = [60, 45]
    shots = [[(1, 9), (9, 20), (20, 26), (30, 44), (44, 51)], [(0, 7), (7, 19), (22, 30), (30, 38)]]
    inp = make_inputs(lengths, 6, 2, shots=shots, seed=5)
    m = ShotKV(0.45, window_size=window_size, policy=policy)
    m.begin(inp.info)
    got = kept_sets(m.prefill(inp), 2, 2)
    for b, n in enumerate(lengths):
        w = m.window(shots[b], n)
        assert w == (n - shots[b][-1][1] if window_size is None else window_size)
        want = naive_shotkv(inp, b, 0.45, policy, w)
        assert got[b, 0] == want and got[b, 1] == want


def test_shotkv_window_protects_an_overlapping_shot_and_fallback_window():
    m = ShotKV(0.3, window_size=12)
    spans = [(0, 10), (10, 20), (20, 30)]
    inp = make_inputs([34], 2, 1, shots=[spans])
    m.begin(inp.info)
    kept = kept_sets(m.prefill(inp), 1, 1)[0, 0]
    assert set(range(20, 34)) <= kept            # the window [22, 34) overlaps shot (20, 30): protected whole
    assert ShotKV(0.3).window([(0, 10), (10, 30)], 30) == 8      # prompt ends with a shot: fallback window


def test_shotkv_decode_keeps_top_generated_and_recent_by_shared_score():
    """One decoding step: the frozen prefill tokens stay, the generated tokens keep
    ceil(ratio * g) = top scores summed over heads (matched by position, heads' slot orders differ)
    plus the most recent ones."""
    prompt = 10
    info = GenerationInfo(num_layers=1, batch_size=1, num_heads=4, num_kv_heads=2, head_dim=8,
                          prompt_lengths=(prompt,), shots=[[(0, 5)]])
    m = ShotKV(0.6, decode_keep_ratio=0.5, decode_recent=2)
    m.begin(info)
    m._prefill_kept[0] = np.array([6])
    pre_pos = [0, 2, 4, 6, 8, 9]
    gen_pos = list(range(10, 17))                                  # g = 7 generated tokens
    order0 = pre_pos + gen_pos
    order1 = pre_pos[::-1] + gen_pos[3:] + gen_pos[:3]             # another slot order in head 1
    S = 16
    positions = torch.full((1, 2, S), -1, dtype=torch.int32)
    positions[0, 0, :13] = torch.tensor(order0, dtype=torch.int32)
    positions[0, 1, :13] = torch.tensor(order1, dtype=torch.int32)
    per_pos = {p: 0.01 * p for p in pre_pos}
    per_pos.update({10: 0.05, 11: 0.30, 12: 0.02, 13: 0.20, 14: 0.01, 15: 0.0, 16: 0.03})
    probs = torch.zeros(1, 2, S)
    for h, order in enumerate((order0, order1)):
        for s, p in enumerate(order):
            probs[0, h, s] = per_pos[p] * (1.0 if h == 0 else 0.5)
    ev = m.decode(DecodeInputs(layer=0, generated=7, probs=probs, positions=positions,
                               lengths=torch.tensor([[13, 13]], dtype=torch.int32),
                               lengths_host=np.array([[13, 13]]), seen_host=np.array([17]), info=info))
    budget = math.ceil(0.5 * 7)                                    # 4 generated tokens
    want = set(pre_pos) | {15, 16} | {11, 13}                      # recent 2 + best 2 of the rest
    for h, order in enumerate((order0, order1)):
        kept = ev.kept_idx[0, h]
        kept_pos = {order[s] for s in kept[kept >= 0].tolist()}
        assert kept_pos == want
        assert ev.new_lengths[0, h] == 6 + budget
    # nothing to evict while within budget
    assert m.decode(DecodeInputs(layer=0, generated=7, probs=probs, positions=positions,
                                 lengths=torch.tensor([[10, 10]], dtype=torch.int32),
                                 lengths_host=np.array([[10, 10]]), seen_host=np.array([17]), info=info)) is None


def test_shotkv_no_compression_when_budget_covers_prompt():
    inp = make_inputs([20], 2, 1, shots=[[(0, 5), (5, 10)]])
    m = ShotKV(1.0)
    m.begin(inp.info)
    assert m.prefill(inp) is None
    assert not m.needs_decode_probs


# ------------------------------------------------------------------------------------------------
# H2O, TOVA, KNorm, StreamingLLM
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["none", "queries"])
def test_h2o_prefill_and_decode_match_naive(normalize):
    lengths, Hq, Hkv = [21, 14], 4, 2
    inp = make_inputs(lengths, Hq, Hkv, seed=7)
    m = H2O(0.5, recent_ratio=0.25, normalize=normalize)
    norm = normalize == "queries"
    m.begin(inp.info)
    ev = m.prefill(inp)
    got = kept_sets(ev, 2, Hkv)
    G = Hq // Hkv
    acc = {}
    for b, n in enumerate(lengths):
        mass = naive_mass(inp, b, n)                                   # all queries, causal
        budget = budget_tokens(0.5, n)
        recent = int(0.25 * budget)
        for h in range(Hkv):
            s = mass[h * G:(h + 1) * G].sum(0) / (G if norm else 1)
            acc[b, h] = s
            if norm:
                s = s / torch.arange(n, 0, -1, dtype=torch.float64)
            assert got[b, h] == naive_topk(s, budget, range(n - recent, n)), (b, h)
    # one decoding step on a cache laid out in kept order plus one new token per row
    S = 16
    positions = torch.full((2, Hkv, S), -1, dtype=torch.int32)
    probs = torch.zeros(2, Hkv, S)
    lengths_host = np.zeros((2, Hkv), dtype=np.int64)
    g = torch.Generator().manual_seed(1)
    for b, n in enumerate(lengths):
        for h in range(Hkv):
            pos = sorted(got[b, h]) + [n]
            positions[b, h, :len(pos)] = torch.tensor(pos, dtype=torch.int32)
            probs[b, h, :len(pos)] = torch.rand(len(pos), generator=g)
            lengths_host[b, h] = len(pos)
    seen = np.array([n + 1 for n in lengths])
    ev2 = m.decode(DecodeInputs(layer=0, generated=1, probs=probs, positions=positions,
                                lengths=torch.from_numpy(lengths_host).int(), lengths_host=lengths_host,
                                seen_host=seen, info=inp.info))
    for b, n in enumerate(lengths):
        budget = budget_tokens(0.5, n + 1)
        recent = max(1, int(0.25 * budget))
        for h in range(Hkv):
            pos = positions[b, h, :lengths_host[b, h]].tolist()
            total = [float(acc[b, h][p]) if p < n else 0.0 for p in pos]
            total = [t + float(probs[b, h, s]) / (G if norm else 1) for s, t in enumerate(total)]
            if norm:  # mean per query that has seen the token: n + 1 - p of them
                total = [t / (n + 1 - p) for t, p in zip(total, pos)]
            prot = [s for s, p in enumerate(pos) if p >= n + 1 - recent]
            want = naive_topk(total, min(budget, len(pos)), prot)
            kept = ev2.kept_idx[b, h]
            assert set(kept[kept >= 0].tolist()) == want, (b, h)


def test_tova_prefill_matches_naive():
    lengths = [18, 25]
    inp = make_inputs(lengths, 4, 2, seed=11)
    got = kept_sets(TOVA(0.4).prefill(inp), 2, 2)
    for b, n in enumerate(lengths):
        s = naive_mass(inp, b, 1).sum(0)
        want = naive_topk(s, budget_tokens(0.4, n), [n - 1])
        assert got[b, 0] == want and got[b, 1] == want


def test_knorm_keeps_lowest_norms():
    lengths = [15, 9]
    inp = make_inputs(lengths, 2, 2, seed=2)
    got = kept_sets(KNorm(0.5).prefill(inp), 2, 2)
    for b, n in enumerate(lengths):
        for h in range(2):
            norms = inp.keys[b, h, :n].double().norm(dim=-1)
            assert got[b, h] == naive_topk(-norms, budget_tokens(0.5, n), [])


def test_streaming_llm_keeps_sinks_and_recent():
    lengths = [20, 11]
    inp = make_inputs(lengths, 2, 1)
    got = kept_sets(StreamingLLM(0.5, n_sink=3).prefill(inp), 2, 1)
    assert got[0, 0] == set(range(3)) | set(range(20 - 7, 20))
    assert got[1, 0] == set(range(3)) | set(range(11 - 3, 11))
    tiny = kept_sets(StreamingLLM(0.1, n_sink=4).prefill(make_inputs([20], 2, 1)), 1, 1)
    assert tiny[0, 0] == {0, 1}


@pytest.mark.parametrize("method", [SnapKV(1.0), PyramidKV(1.0), ChunkKV(1.0), H2O(1.0), TOVA(1.0), KNorm(1.0),
                                    StreamingLLM(1.0)])
def test_keep_ratio_one_keeps_everything(method):
    inp = make_inputs([13, 9], 4, 2)
    method.begin(inp.info)
    assert method.prefill(inp) is None


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [SnapKV, PyramidKV, ChunkKV, H2O, TOVA, KNorm, StreamingLLM])
@pytest.mark.parametrize("bad,err", [(0.0, ValueError), (1.5, ValueError), (-0.1, ValueError),
                                     (float("nan"), ValueError), ("0.5", TypeError), (True, TypeError)])
def test_keep_ratio_outside_unit_interval(cls, bad, err):
    with pytest.raises(err, match="keep_ratio"):
        cls(bad)


@pytest.mark.parametrize("make,match", [
    (lambda: SnapKV(0.5, window_size=0), "window_size"),
    (lambda: SnapKV(0.5, kernel_size=4), "kernel_size"),
    (lambda: SnapKV(0.5, pooling="mean"), "pooling"),
    (lambda: PyramidKV(0.5, beta=0), "beta"),
    (lambda: ChunkKV(0.5, chunk_size=0), "chunk_size"),
    (lambda: ChunkKV(0.5, policy="greedy"), "policy"),
    (lambda: ChunkKV(0.5, reuse_every=0), "reuse_every"),
    (lambda: ShotKV(0.5, keep_ratio=0.5), "keep_ratio"),
    (lambda: ShotKV(0.0), "prefill_keep_ratio"),
    (lambda: ShotKV(keep_ratio=2.0), "keep_ratio"),
    (lambda: ShotKV(0.5, 0.0), "decode_keep_ratio"),
    (lambda: ShotKV(0.5, policy="best"), "policy"),
    (lambda: ShotKV(0.5, window_size=0), "window_size"),
    (lambda: H2O(0.5, recent_ratio=1.5), "recent_ratio"),
    (lambda: StreamingLLM(0.5, n_sink=-1), "n_sink"),
    (lambda: SnapKV(0.5, budget_rounding="round"), "budget_rounding"),
    (lambda: KNorm(0.5, budget_rounding=1), "budget_rounding"),
    (lambda: ShotKV(0.5, budget_rounding="up"), "budget_rounding"),
    (lambda: SnapKV(0.5, window_score="pad"), "window_score"),
    (lambda: H2O(0.5, normalize="keys"), "normalize"),
    (lambda: ChunkKV(0.5, chunk_budget="segments"), "chunk_budget"),
    (lambda: ChunkKV(0.5, batch_choice="last"), "batch_choice"),
    (lambda: ChunkKV(0.5, scorer=object()), "scorer"),
    (lambda: SnapKV.kvpress(1.0), "keep_ratio"),
])
def test_bad_method_parameters(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_shotkv_without_shots_is_an_error():
    inp = make_inputs([10], 2, 1, shots=None)
    with pytest.raises(ValueError, match="shots"):
        ShotKV(0.5).begin(inp.info)


# ------------------------------------------------------------------------------------------------
# shots
# ------------------------------------------------------------------------------------------------

def test_validate_spans_sorts_and_accepts_touching_spans():
    assert validate_spans([(5, 9), (0, 5)], 9) == [(0, 5), (5, 9)]
    assert validate_spans(torch.tensor([[1, 3]]), 3) == [(1, 3)]


@pytest.mark.parametrize("spans,n,err,match", [
    ([(0, 5), (4, 8)], 10, ValueError, "overlap"),
    ([(5, 12)], 10, ValueError, "out of range"),
    ([(-1, 3)], 10, ValueError, "out of range"),
    ([(3, 3)], 10, ValueError, "empty"),
    ([(0, 2, 4)], 10, TypeError, "pairs"),
    ([(0.0, 2)], 10, TypeError, "pairs"),
    ("0-5", 10, TypeError, "shots"),
])
def test_validate_spans_errors(spans, n, err, match):
    with pytest.raises(err, match=match):
        validate_spans(spans, n)


def test_normalize_batch_shots():
    assert normalize_batch_shots(None, [5, 6]) is None
    assert normalize_batch_shots([(0, 2)], [5]) == [[(0, 2)]]
    assert normalize_batch_shots([[(0, 2)], []], [5, 6]) == [[(0, 2)], []]
    with pytest.raises(ValueError, match="one per sequence"):
        normalize_batch_shots([(0, 2)], [5, 6])
    with pytest.raises(ValueError, match="one span list per sequence"):
        normalize_batch_shots([[(0, 2)]], [5, 6])
    with pytest.raises(ValueError, match=r"shots\[1\]"):
        normalize_batch_shots([[(0, 2)], [(4, 9)]], [5, 6])


@pytest.fixture(scope="module")
def word_tokenizer():
    """A tiny fast tokenizer built offline: words, digits and punctuation, each a token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["Q", "A", ":", "?", "What", "is", "the", "number", "of", "Alice", "Bob", "Carol", "Solve", "these",
             ".", "\n"] + [str(i) for i in range(10)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_find_shots_maps_regex_matches_to_token_spans(word_tokenizer):
    text = ("Solve these.\nQ: What is the number of Alice?\nA: 42\n\nQ: What is the number of Bob?\nA: 7\n\n"
            "Q: What is the number of Carol?\nA:")
    spans = find_shots(text, word_tokenizer)
    ids = word_tokenizer(text)["input_ids"]
    assert len(spans) == 2                      # the final question has no answer: not a shot
    toks = [word_tokenizer.convert_ids_to_tokens(ids[a:e]) for a, e in spans]
    assert toks[0] == ["Q", ":", "What", "is", "the", "number", "of", "Alice", "?", "A", ":", "4", "2"]
    assert toks[1] == ["Q", ":", "What", "is", "the", "number", "of", "Bob", "?", "A", ":", "7"]
    assert validate_spans(spans, len(ids)) == spans
    custom = find_shots(text, word_tokenizer, pattern=r"Q:[^\n]*")
    assert len(custom) == 3 and custom[0][0] == spans[0][0]


def test_find_shots_bad_inputs(word_tokenizer):
    with pytest.raises(TypeError, match="text"):
        find_shots(b"Q: x", word_tokenizer)
    with pytest.raises(ValueError, match="pattern"):
        find_shots("Q: x", word_tokenizer, pattern=r"x*")
    with pytest.raises(TypeError, match="pattern"):
        find_shots("Q: x", word_tokenizer, pattern=3)

    class Slow:
        is_fast = False
    with pytest.raises(ValueError, match="tokenizer"):
        find_shots("Q: x\nA: 1", Slow())


# ------------------------------------------------------------------------------------------------
# ShotKV's honest budget (issue 12)
# ------------------------------------------------------------------------------------------------

def _random_spans(rng, n):
    """Random non-overlapping shot spans in [0, n), with gaps (non-shot spans) of random sizes."""
    spans, cur = [], int(rng.integers(0, 4))
    while cur < n - 2:
        size = int(rng.integers(2, 12))
        if cur + size > n:
            break
        spans.append((cur, cur + size))
        cur += size + int(rng.integers(0, 3))
    return spans


@pytest.mark.parametrize("seed", range(12))
def test_shotkv_never_exceeds_its_budget_unless_protected_tokens_do_and_then_says_so(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(rng.integers(20, 70)) for _ in range(int(rng.integers(1, 4)))]
    shots = [_random_spans(rng, n) for n in lengths]
    ratio = float(rng.choice([0.1, 0.25, 0.3, 0.5, 0.8]))
    policy = ["stop", "skip"][seed % 2]
    window = [None, 4, 16][seed % 3]
    inp = make_inputs(lengths, 6, 2, shots=shots, seed=seed)
    m = ShotKV(ratio, window_size=window, policy=policy)
    # the protected tokens, computed here independently: outside every shot, or in a shot reaching the window
    protected = []
    for b, n in enumerate(lengths):
        w = m.window(shots[b], n)
        in_shot = np.zeros(n, bool)
        prot = np.ones(n, bool)
        for a, e in shots[b]:
            in_shot[a:e] = True
            prot[a:e] = e > n - w
        protected.append(int(prot.sum()))
    budgets = [math.ceil(round(ratio * n, 9)) for n in lengths]
    over = [b for b in range(len(lengths)) if protected[b] > budgets[b]]
    import warnings as _w
    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        m.begin(inp.info)
    warned = [w for w in caught if issubclass(w.category, UserWarning) and "exceed the budget" in str(w.message)]
    assert len(warned) == (1 if over and any(b < n for b, n in zip(budgets, lengths)) else 0)
    assert m.stats["budget_tokens"] == budgets and m.stats["protected_tokens"] == protected
    ev = m.prefill(inp)
    if ev is None:
        assert all(b >= n for b, n in zip(budgets, lengths))
        return
    kept = kept_sets(ev, len(lengths), 2)
    for b in range(len(lengths)):
        n_kept = len(kept[b, 0])
        if b in over:
            assert n_kept == protected[b]              # exactly the protected tokens, nothing else
        else:
            assert protected[b] <= n_kept <= budgets[b]
    assert m.stats["over_budget"].get(0, []) == over
    assert m.stats["kept_tokens"][0] == [len(kept[b, 0]) for b in range(len(lengths))]


def test_shotkv_at_keep_ratio_holds_no_more_than_snapkv():
    """Protected tokens count inside ceil(keep * n): ShotKV and SnapKV at keep 0.3 hold the same budget."""
    n = 80
    spans = [(4, 14), (14, 24), (24, 34), (34, 44), (44, 54), (54, 64), (64, 70)]
    inp = make_inputs([n], 4, 2, shots=[spans], seed=3)
    shot, snap = ShotKV(0.3, policy="skip"), SnapKV(0.3, window_size=10)
    shot.begin(inp.info)
    snap.begin(inp.info)
    n_shot = int(shot.prefill(inp).new_lengths.max())
    n_snap = int(snap.prefill(inp).new_lengths.max())
    assert n_shot <= n_snap == math.ceil(0.3 * n)


def test_shotkv_stop_policy_degenerate_case_keeps_no_shot():
    """Decision (docs/METHODS.md): ``policy="stop"`` is the paper's greedy fill, "in descending order until
    the budget is reached" — the first shot that does not fit ends it, also when it is the top-ranked one.
    Then no shot is kept and the unused budget is reported; ``"skip"`` keeps the smaller shots instead."""
    n = 50
    spans = [(2, 22), (22, 27), (27, 32), (32, 37)]    # one big shot and three small ones; question [37, 50)
    inp = make_inputs([n], 4, 2, shots=[spans], seed=1)
    u = torch.zeros(8)
    u[0] = 1.0
    inp.queries[:, :, 37:] = 4.0 * u
    inp.keys[:, :, 2:22] += 3.0 * u                       # the big shot is the most attended
    # budget ceil(0.5 * 50) = 25; protected [0, 2) + [37, 50) = 15 -> 10 left: the 20-token shot cannot fit
    stop, skip = ShotKV(0.5, policy="stop"), ShotKV(0.5, policy="skip")
    for m in (stop, skip):
        m.begin(inp.info)
    k_stop = kept_sets(stop.prefill(inp), 1, 2)[0, 0]
    k_skip = kept_sets(skip.prefill(inp), 1, 2)[0, 0]
    assert k_stop == set(range(0, 2)) | set(range(37, 50))
    assert stop.stats["unused_budget"][0] == [10]
    assert len(k_skip) == 25 and not (k_skip & set(range(2, 22)))
    assert skip.stats["unused_budget"][0] == [0]


def test_shotkv_plan_is_built_once_per_generation(monkeypatch):
    """Host data (segments, protected masks, budgets) is made in begin(), not per layer."""
    calls = []
    orig = ShotKV._make_plan
    monkeypatch.setattr(ShotKV, "_make_plan", lambda self, info: calls.append(1) or orig(self, info))
    spans = [[(2, 12), (12, 22), (22, 32)], [(0, 9), (9, 20)]]
    m = ShotKV(0.4)
    for layer in range(4):
        inp = make_inputs([40, 31], 4, 2, shots=spans, layer=layer, num_layers=4, seed=layer)
        if layer == 0:
            info = inp.info
            m.begin(info)
        inp.info = info
        m.prefill(inp)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------
# kvpress conventions as options (issue 12); parity with kvpress itself: tests/test_kvpress_parity.py
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,n", [(0.5, 97), (0.3, 10), (0.77, 333), (0.13, 1001), (0.999, 5)])
def test_budget_rounding_ceil_default(ratio, n):
    # the "floor" rounding against kvpress's own compute_n_kept: tests/test_kvpress_parity.py (kvpress is
    # not installed in the newest-transformers CI env, which runs this file)
    assert budget_tokens(1 - ratio, n) == min(n, max(1, math.ceil(round((1 - ratio) * n, 9))))


def test_kvpress_constructors_set_the_documented_options():
    s = SnapKV.kvpress(0.25, window_size=8)
    assert (s.keep_ratio, s.budget_rounding, s.window_score, s.window_size) == (0.75, "floor", "max_plus_one", 8)
    h = H2O.kvpress(0.4)
    assert (h.normalize, h.recent_ratio, h.compress_decode, h.budget_rounding) == ("queries", 0.0, False, "floor")
    c = ChunkKV.kvpress(0.5)
    assert (c.chunk_size, c.chunk_budget, c.batch_choice, c.protect_window) == (20, "chunks", "first", False)
    assert isinstance(c.scorer, SnapKV) and c.scorer.window_score == "max_plus_one"
    assert StreamingLLM.kvpress(0.5).budget_rounding == KNorm.kvpress(0.5).budget_rounding == "floor"
    assert "budget_rounding='floor'" in repr(s)


def test_snapkv_max_plus_one_scores_are_kvpress_formula():
    """window_score="max_plus_one": pooled mean over the window before it, 1 + batch max on the window."""
    lengths = [30, 30]
    inp = make_inputs(lengths, 4, 2, seed=2)
    m = SnapKV.kvpress(0.5, window_size=6, kernel_size=3)
    m.begin(inp.info)
    got = m.token_scores(inp)
    want = torch.zeros(2, 2, 30, dtype=torch.float64)
    for b in range(2):
        mass = naive_mass(inp, b, 6)                                      # [Hq, n]
        for h in range(2):
            s = mass[2 * h:2 * h + 2].mean(0) / 6
            want[b, h, :24] = naive_pool(s, 3, 24, "avg")[:24]
    want[..., 24:] = want[..., :24].max() + 1
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("normalize", ["none", "queries"])
def test_h2o_normalize_matches_naive(normalize):
    lengths = [23, 17]
    inp = make_inputs(lengths, 4, 2, seed=4)
    m = H2O(0.5, recent_ratio=0.0, compress_decode=False, normalize=normalize, budget_rounding="floor")
    m.begin(inp.info)
    got = kept_sets(m.prefill(inp), 2, 2)
    for b, n in enumerate(lengths):
        mass = naive_mass(inp, b, n)
        for h in range(2):
            g = mass[2 * h:2 * h + 2]
            s = g.mean(0) / torch.arange(n, 0, -1, dtype=torch.float64) if normalize == "queries" else g.sum(0)
            assert got[b, h] == naive_topk(s, int(n * 0.5), []), (b, h)


def test_chunkkv_chunks_budget_and_batch_item_0_choice():
    """chunk_budget="chunks": the int(n_chunks * keep) best chunks whatever their size; batch_choice="first":
    sequence 0's chunks for everyone (kvpress's ChunkKVPress)."""
    lengths = [47, 47]
    inp = make_inputs(lengths, 4, 2, seed=6)
    inp.keys[0, :, 10:30] *= 0.3       # small norms: sequence 0 favours chunks 1, 2; sequence 1 chunks 3, 4
    inp.keys[1, :, 30:47] *= 0.3
    C, ratio = 10, 0.5
    scorer = KNorm.kvpress(1 - ratio)
    for choice in ("first", "per_sequence"):
        m = ChunkKV(ratio, chunk_size=C, scorer=scorer, chunk_budget="chunks", batch_choice=choice,
                    budget_rounding="floor")
        m.begin(inp.info)
        kept = kept_sets(m.prefill(inp), 2, 2)
        wants = []
        for b, n in enumerate(lengths):
            tok = -inp.keys[b, :, :n].double().norm(dim=-1).sum(0)                # summed over kv heads
            chunks = [(a, min(a + C, n)) for a in range(0, n, C)]
            cs = torch.tensor([float(tok[a:e].mean()) for a, e in chunks])
            best = naive_topk(cs, max(1, int(len(chunks) * ratio)), [])
            wants.append({j for i in best for j in range(*chunks[i])})
        for b in range(2):
            want = wants[0] if choice == "first" else wants[b]
            assert kept[b, 0] == kept[b, 1] == want
    assert wants[0] != wants[1], "the sequences must choose differently for the test to see batch_choice"


def test_chunkkv_shorter_than_a_chunk_falls_back_to_the_scorer():
    inp = make_inputs([12], 4, 2, seed=7)
    m = ChunkKV.kvpress(0.5, chunk_size=20, scorer=KNorm.kvpress(0.5))
    ref = KNorm.kvpress(0.5)
    for x in (m, ref):
        x.begin(inp.info)
    assert kept_sets(m.prefill(inp), 1, 2) == kept_sets(ref.prefill(inp), 1, 2)


def _with_context(inp, n_ctx):
    inp.info.context_lengths = tuple(n_ctx)
    return inp


def test_context_lengths_score_with_the_question_and_keep_only_context():
    """Question-aware prefill: the question's queries score, its tokens are never kept, the budget counts
    context tokens."""
    lengths, n_ctx = [40, 40], [33, 33]
    inp = _with_context(make_inputs(lengths, 4, 2, seed=8), n_ctx)
    m = SnapKV(0.5, window_size=10)
    m.begin(inp.info)
    kept = kept_sets(m.prefill(inp), 2, 2)
    for b in range(2):
        mass = naive_mass(inp, b, 10)
        for h in range(2):
            s = naive_pool(mass[2 * h:2 * h + 2].mean(0), 5, 30, "avg")[:33]
            prot = range(30, 33)                                      # the context's part of the window
            assert kept[b, h] == naive_topk(s, math.ceil(0.5 * 33), prot)
    with pytest.raises(ValueError, match="context_lengths"):
        KNorm(0.5).begin(inp.info)


def test_window_mass_one_launch_equals_grouped_scoring(monkeypatch):
    """A ragged batch with different windows is scored by one lse + one mass call, equal to the per-group
    calls it replaces."""
    import kvpress_kernels.ops.scoring as S
    from kvpress_kernels.methods.base import window_mass
    calls = []
    orig = S.attention_mass
    monkeypatch.setattr(S, "attention_mass", lambda *a, **k: calls.append(1) or orig(*a, **k))
    lengths, windows = [37, 29, 33], [5, 9, 3]
    inp = make_inputs(lengths, 6, 2, seed=9)
    got = window_mass(inp, windows, "group_sum")
    assert len(calls) == 1
    for b, (n, w) in enumerate(zip(lengths, windows)):
        want = naive_mass(inp, b, w)
        want = torch.stack([want[3 * h:3 * h + 3].sum(0) for h in range(2)])
        torch.testing.assert_close(got[b, :, :n].double(), want, rtol=1e-5, atol=1e-6)
        assert (got[b, :, n:] == 0).all()
