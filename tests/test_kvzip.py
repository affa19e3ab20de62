"""KVzip (kvpress_kernels.methods.kvzip): reconstruction scores, the global budget, the per-layer selections.

The oracle of the scores is transformers' own eager attention: the context followed by a reconstruction
chunk run as one sequence with ``output_attentions=True``; a context key's score is the max, over the
chunk's queries and the query heads of its kv head, of the attention probability it gets, and the max
over the chunks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kvpress_kernels as kk
from kvpress_kernels.methods import KVzip
from kvpress_kernels.methods.kvzip import reconstruction_chunks, reconstruction_prompts
from test_sessions import tiny_llama


class FakeTokenizer:
    """Enough of a tokenizer for the repeat prompt: deterministic ids, a BOS, no chat template."""
    bos_token_id = 1
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [3 + (sum(map(ord, w)) % 90) for w in text.split(" ")]


TOK = FakeTokenizer()


def context(n=60, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, n), generator=g)
    ids[:, 0] = 1                                         # a BOS: not repeated by the reconstruction
    return ids


def eager_scores(model, ctx, chunk_size):
    """Oracle ``[layers, B, Hkv, n]`` float64 from eager attention over ``ctx + chunk`` per chunk."""
    cfg = model.config
    L, Hq, Hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    G = Hq // Hkv
    B, n = ctx.shape
    out = torch.zeros(L, B, Hkv, n, dtype=torch.float64)
    prev = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        for rec in reconstruction_chunks(ctx, reconstruction_prompts(TOK), chunk_size):
            with torch.no_grad():
                att = model(torch.cat([ctx, rec], 1), output_attentions=True).attentions
            for layer, a in enumerate(att):                               # [B, Hq, T, T]
                p = a[:, :, n:, :n].double().amax(dim=2)                  # max over the chunk's queries
                p = p.view(B, Hkv, G, n).amax(dim=2)                      # and over the group
                out[layer] = torch.maximum(out[layer], p)
    finally:
        cfg._attn_implementation = prev
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def prefilled(model, method, ctx, shots=None):
    with kk.compress(model, method, shots=shots) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(ctx, past_key_values=cache, use_cache=True)
    return cache


# ------------------------------------------------------------------ inputs of the reconstruction
def test_reconstruction_chunks_are_kvpress_inputs():
    ctx = context(25)
    p = {"first": [5, 6], "next": [7], "suffix": [9], "bos": [1]}
    chunks = reconstruction_chunks(ctx, p, 10, prev_postfix=3)
    body = ctx[0, 1:]
    assert [c.shape[1] for c in chunks] == [2 + 1 + 10, 1 + 3 + 1 + 10, 1 + 3 + 1 + 4]
    assert chunks[0][0].tolist() == [5, 6, 9] + body[:10].tolist()
    assert chunks[1][0].tolist() == [7] + body[7:10].tolist() + [9] + body[10:20].tolist()
    assert chunks[2][0].tolist() == [7] + body[17:20].tolist() + [9] + body[20:].tolist()
    # no BOS at the front: every token is repeated
    assert reconstruction_chunks(ctx[:, 1:], p, 100)[0][0, 3:].tolist() == body.tolist()


# ------------------------------------------------------------------ scores
@pytest.mark.parametrize("chunk_size", [2048, 23])
def test_scores_match_eager_attention(model, chunk_size):
    ctx = context(60, batch=2)
    m = KVzip(0.3, tokenizer=TOK, chunk_size=chunk_size)
    cache = prefilled(model, m, ctx)
    before = [cache.kv.gather(layer) for layer in range(2)]
    pool_before = cache.kv.pool_bytes_in_use()
    with kk.compress(model, m):
        got = m.reconstruction_scores(model, cache, ctx)
    want = eager_scores(model, ctx, chunk_size)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # the reconstruction tokens were never stored: the cache holds exactly what it held
    assert cache.kv.pool_bytes_in_use() == pool_before and (cache.kv.seq_lengths() == 60).all()
    for layer in range(2):
        for a, b in zip(before[layer], cache.kv.gather(layer)):
            assert torch.equal(a, b)
    assert cache.get_seq_length() == 60


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_scores_device_path(model, monkeypatch, backend):
    # the path a GPU takes (paged decode attention, then the paged scoring op with its own LSE pass), on CPU
    import kvpress_kernels.methods.kvzip as KZ
    monkeypatch.setattr(KZ, "_CPU_FUSED", False)
    ctx = context(40)
    m = KVzip(0.3, tokenizer=TOK, chunk_size=30)
    with kk.compress(model, m, backend=backend) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(ctx, past_key_values=cache, use_cache=True)
        got = m.reconstruction_scores(model, cache, ctx)
    torch.testing.assert_close(got.double(), eager_scores(model, ctx, 30), rtol=1e-4, atol=1e-6)
    assert (cache.kv.seq_lengths() == 40).all()


@pytest.mark.parametrize("n, T", [(37, 11), (7, 16), (1, 3)])
def test_cpu_reconstruction_attention_is_the_split_softmax(n, T):
    # the CPU path's attention (two flash calls joined by LSE) and scores (the op's max pass, query blocks of
    # at most n) against a dense float64 softmax over [context, chunk] with the chunk causal, GQA 3:1
    import kvpress_kernels.methods.kvzip as KZ
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, D = 2, 2, 3, 16
    q = torch.randn(B, Hkv * G, T, D, generator=g)
    k = torch.randn(B, Hkv, n + T, D, generator=g)
    v = torch.randn(B, Hkv, n + T, D, generator=g)
    logits = torch.einsum("bhtd,bhnd->bhtn", q.double(), k.repeat_interleave(G, 1).double()) * 0.3
    hidden = torch.arange(n + T).view(1, -1) > (n + torch.arange(T)).view(-1, 1)
    p = logits.masked_fill(hidden, float("-inf")).softmax(-1)
    want_out = torch.einsum("bhtn,bhnd->bhtd", p, v.repeat_interleave(G, 1).double())
    want_score = p[..., :n].amax(dim=2).view(B, Hkv, G, n).amax(dim=2)
    out, score = KZ._reconstruction_attention_cpu(q, k, v, n, 0.3)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score.double(), want_score, rtol=1e-5, atol=1e-7)
    assert out.dtype == q.dtype and score.dtype == torch.float32 and score.shape == (B, Hkv, n)


def test_reduced_precision_reconstruction(model):
    # recon_dtype=bf16: the linear layers of the reconstruction under autocast, the cache and the scores' keys
    # in fp32; the scores stay close to the exact ones, the cache is left as it was, the selection is KVzip's
    ctx = context(60, batch=2)
    exact = KVzip(0.3, tokenizer=TOK)
    cache = prefilled(model, exact, ctx)
    with kk.compress(model, exact):
        want = exact.reconstruction_scores(model, cache, ctx)
    m = KVzip(0.3, tokenizer=TOK, recon_dtype="bfloat16")
    assert m.recon_dtype is torch.bfloat16 and "recon_dtype='bfloat16'" in repr(m)
    before = [cache.kv.gather(layer) for layer in range(2)]
    with kk.compress(model, m):
        got = m.reconstruction_scores(model, cache, ctx)
    assert got.dtype == torch.float32 and cache.kv.dtype == torch.float32
    assert not torch.equal(got, want)                                     # the pass really ran in bf16
    # bf16 activations (8 mantissa bits): per-score error of a few percent of the score scale
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.02 * float(want.max()))
    for layer in range(2):
        for a, b in zip(before[layer], cache.kv.gather(layer)):
            assert torch.equal(a, b)
    with kk.compress(model, m) as session:
        c2 = session.prefill(ctx, tokenizer=TOK)
    assert int(c2.kv.seq_lengths().sum()) == 2 * math.ceil(0.3 * 60 * 2 * 2)
    c2.kv.check_invariants()


# ------------------------------------------------------------------ the global selection
def test_global_budget_across_layers_and_heads(model):
    n, keep = 60, 0.3
    ctx = context(n)
    m = KVzip(keep, tokenizer=TOK)
    with kk.compress(model, m) as session:
        cache = session.prefill(ctx)
    full = prefilled(model, None, ctx)
    L, H = 2, 2
    lens = cache.kv.seq_lengths()                                        # [L, B, H]
    assert int(lens.sum()) == math.ceil(keep * n * L * H)
    assert cache.stats()["kv_tokens_after_prefill"] == int(lens.sum())
    assert cache.kv.bytes_in_use() < full.kv.bytes_in_use()
    # exactly the sinks plus the best other (layer, head, token) scores of the sequence, globally
    s = m.scores[:, 0].clone()                                           # [L, H, n]
    s[..., :m.n_sink] = float("inf")
    order = sorted(range(s.numel()), key=lambda i: (-float(s.view(-1)[i]), i))
    chosen = set(order[:int(lens.sum())])
    for layer in range(L):
        k, v, ln, pos = cache.kv.gather(layer)
        kf, vf, _, _ = full.kv.gather(layer)
        for h in range(H):
            kept = sorted(int(p) for p in pos[0, h, :int(ln[0, h])])
            assert kept == [j for j in range(n) if (layer * H + h) * n + j in chosen]
            # data movement is exact: each kept slot holds the full cache's token bit for bit
            idx = pos[0, h, :int(ln[0, h])].long()
            assert torch.equal(k[0, h, :len(idx)], kf[0, h, idx]) and torch.equal(v[0, h, :len(idx)], vf[0, h, idx])
    assert len(set(lens.reshape(-1).tolist())) > 1                       # heads really hold their own lengths
    cache.kv.check_invariants()


def test_head_floor_and_keep_all(model):
    n = 60
    ctx = context(n)
    m = KVzip(0.2, tokenizer=TOK, head_floor=1.0)
    with kk.compress(model, m) as session:
        cache = session.prefill(ctx)
    assert (cache.kv.seq_lengths() == math.ceil(0.2 * n)).all()         # floor = budget: every head equal
    # keep_ratio 1: nothing evicted, the next-token logits equal the full cache's
    q = torch.randint(3, 97, (1, 5))
    logits = []
    for method in (KVzip(1.0, tokenizer=TOK), None):
        with kk.compress(model, method) as session, torch.no_grad():
            c = session.prefill(ctx)
            logits.append(model(q, past_key_values=c, use_cache=True).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_forks_answer_many_questions(model):
    ctx = context(60)
    m = KVzip(0.3, tokenizer=TOK)
    with kk.compress(model, m) as session:
        cache = session.prefill(ctx)
        held = cache.kv.pool_bytes_in_use()
        outs = []
        for seed in range(2):
            q = torch.randint(3, 97, (1, 4), generator=torch.Generator().manual_seed(seed))
            fork = cache.fork()
            out = model.generate(torch.cat([ctx, q], 1), past_key_values=fork, max_new_tokens=3, do_sample=False)
            outs.append(out[0, -3:])
            # a fresh copy of the same compressed cache answers token for token alike
            again = model.generate(torch.cat([ctx, q], 1), past_key_values=cache.fork(), max_new_tokens=3,
                                   do_sample=False)
            assert torch.equal(out, again)
            fork.release()
        assert cache.kv.pool_bytes_in_use() <= held + 2 * cache.kv.page_bytes * 2 * 2
    assert all(o.shape == (3,) for o in outs)


# ------------------------------------------------------------------ KVzip scores in the per-layer methods
def test_per_head_topk_over_kvzip_scores(model):
    n, keep = 60, 0.25
    ctx = context(n)
    m = KVzip(keep, tokenizer=TOK, select="per_head")
    with kk.compress(model, m) as session:
        cache = session.prefill(ctx)
    b = math.ceil(keep * n)
    assert (cache.kv.seq_lengths() == b).all()
    for layer in range(2):
        _, _, ln, pos = cache.kv.gather(layer)
        for h in range(2):
            s = m.scores[layer, 0, h]
            want = sorted(sorted(range(n), key=lambda j: (-float(s[j]), j))[:b])
            assert sorted(int(p) for p in pos[0, h]) == want


def test_shots_ranked_by_kvzip_scores(model):
    n, keep = 60, 0.5
    ctx = context(n)
    shots = [(5, 15), (15, 25), (25, 35), (35, 45), (45, 55)]
    m = KVzip(keep, tokenizer=TOK, select="shots")
    with kk.compress(model, m, shots=shots) as session:
        cache = session.prefill(ctx)
    budget = math.ceil(keep * n)
    protected = list(range(0, 5)) + list(range(55, 60))                  # non-shot spans (the tail is the window)
    for layer in range(2):
        _, _, ln, pos = cache.kv.gather(layer)
        kept = sorted(int(p) for p in pos[0, 0, :int(ln[0, 0])])
        assert kept == sorted(int(p) for p in pos[0, 1, :int(ln[0, 1])])   # same tokens for every kv head
        s = m.scores[layer, 0].sum(0)                                    # [n], summed over kv heads
        rank = sorted(shots, key=lambda sp: -float(s[sp[0]:sp[1]].mean()))
        want, used = set(protected), len(protected)
        for a, e in rank:                                                # ShotKV's "stop" policy
            if used + (e - a) > budget:
                break
            want |= set(range(a, e))
            used += e - a
        assert kept == sorted(want)


def test_shotkv_decoding_phase_over_kvzip(model):
    ctx = context(60)
    shots = [(5, 15), (15, 25), (25, 35), (35, 45), (45, 55)]
    m = KVzip(0.5, tokenizer=TOK, select="shots", decode_keep_ratio=0.5)
    with kk.compress(model, m, shots=shots) as session:
        cache = session.prefill(ctx)
        after = cache.kv.seq_lengths().copy()
        q = torch.randint(3, 97, (1, 4))
        model.generate(torch.cat([ctx, q], 1), past_key_values=cache, max_new_tokens=8, do_sample=False)
    # question tokens (prompt) kept, generated ones compressed to ceil(0.5 * g) (+ the newest being fed)
    lens = cache.kv.seq_lengths()
    assert (lens <= after + 4 + math.ceil(0.5 * 8) + 1).all() and (lens >= after + 4).all()


def test_chunks_over_kvzip_scores(model):
    n = 60
    ctx = context(n)
    m = KVzip(0.3, tokenizer=TOK, select="chunks", select_chunk_size=10)
    with kk.compress(model, m) as session:
        cache = session.prefill(ctx)
    for layer in range(2):
        _, _, ln, pos = cache.kv.gather(layer)
        kept = sorted(int(p) for p in pos[0, 0, :int(ln[0, 0])])
        chunks = sorted({p // 10 for p in kept})
        assert kept == [j for c in chunks for j in range(c * 10, c * 10 + 10)]   # whole chunks
        assert len(kept) <= math.ceil(0.3 * n)


# ------------------------------------------------------------------ bad input
def test_bad_input(model):
    ctx = context(30)
    with pytest.raises(ValueError, match="select"):
        KVzip(0.3, select="layer")
    with pytest.raises(ValueError, match="head_floor"):
        KVzip(0.3, head_floor=2)
    with pytest.raises(TypeError, match="recon_dtype"):
        KVzip(0.3, recon_dtype="int8")
    with pytest.raises(TypeError, match="recon_dtype"):
        KVzip(0.3, recon_dtype=torch.int32)
    m = KVzip(0.3)
    cache = prefilled(model, m, ctx)
    with kk.compress(model, m):
        with pytest.raises(ValueError, match="tokenizer"):
            m.compress_prefilled(model, cache, ctx)
        with pytest.raises(ValueError, match="context_ids"):
            m.compress_prefilled(model, cache, ctx[:, :20], tokenizer=TOK)
        with torch.no_grad():
            model(torch.tensor([[5, 6]]), past_key_values=cache, use_cache=True)   # an extension: too late
        with pytest.raises(ValueError, match="right after the prefill"):
            m.compress_prefilled(model, cache, ctx, tokenizer=TOK)
        with pytest.raises(TypeError, match="cache"):
            m.compress_prefilled(model, object(), ctx, tokenizer=TOK)
    assert (cache.kv.seq_lengths() == 32).all()                          # the rejected calls changed nothing


def test_paged_cache_evict_checks(model):
    ctx = context(30)
    with kk.compress(model, None) as session:
        empty = session.new_cache()
        with pytest.raises(RuntimeError, match="prefill"):
            empty.evict([])
        cache = session.prefill(ctx)
    with pytest.raises(ValueError, match="one tensor per layer"):
        cache.evict([torch.arange(5, dtype=torch.int32).expand(1, 2, 5)])
    with pytest.raises(ValueError, match="kept_idx"):
        cache.evict(torch.zeros(2, 1, 3, 5, dtype=torch.int32))          # 3 kv heads: the cache has 2
    first = torch.arange(10, dtype=torch.int32).expand(1, 2, 10).contiguous()
    with pytest.raises(ValueError, match="beyond its length"):          # layer 1 is bad: layer 0 must not move
        cache.evict([first, torch.full((1, 2, 10), 99, dtype=torch.int32).cumsum(-1).to(torch.int32)])
    with pytest.raises(ValueError, match="new_lengths"):
        cache.evict([first, first], new_lengths=[np.full((1, 2), 10), np.full((1, 2), 9)])
    assert (cache.kv.seq_lengths() == 30).all()                          # the rejected calls changed nothing
    keep = [torch.arange(10, dtype=torch.int32).expand(1, 2, 10).contiguous()] * 2
    cache.evict(keep)
    assert (cache.kv.seq_lengths() == 10).all() and cache.stats()["kv_tokens_after_prefill"] == 40
