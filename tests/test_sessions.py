"""Sessions over a compressed cache: forks that share pages (prompt reuse), prompt extension, chat turns."""

import copy

import numpy as np
import pytest
import torch

import _fixtures

from kvpress_kernels.cache import PagedKVCache


def _filled(seed=0, L=2, B=2, H=2, D=8, P=4, n=11):
    g = torch.Generator().manual_seed(seed)
    c = PagedKVCache(L, B, H, D, page_size=P, dtype=torch.float32)
    for layer in range(L):
        c.append(layer, torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g))
    return c, g


def _evict_every_third(c, layer):
    lens = c.seq_lengths(layer)
    B, H = lens.shape
    K = int(lens.max())
    kept = torch.full((B, H, K), -1, dtype=torch.int32)
    new = np.zeros((B, H), dtype=np.int64)
    for b in range(B):
        for h in range(H):
            keep = [i for i in range(int(lens[b, h])) if (i + b + h) % 3 != 1]
            kept[b, h, :len(keep)] = torch.tensor(keep, dtype=torch.int32)
            new[b, h] = len(keep)
    c.compact(layer, kept, new_lengths=new)


def _snapshot(c):
    return [tuple(t.clone() if t is not None else None for t in c.gather(layer)) for layer in range(c.num_layers)]


def _same(a, b):
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert torch.equal(x, y)


@pytest.mark.parametrize("use_deepcopy", [False, True])
def test_fork_shares_pages_and_copies_on_write(use_deepcopy, monkeypatch):
    monkeypatch.setenv("KVPRESS_KERNELS_DEBUG", "1")
    parent, g = _filled()
    for layer in range(parent.num_layers):
        _evict_every_third(parent, layer)          # a compressed context: rows end mid-page
    twin, _ = _filled()                            # the same operations, never forked: the oracle
    for layer in range(twin.num_layers):
        _evict_every_third(twin, layer)
    before = _snapshot(parent)
    used = parent.pool_bytes_in_use()
    child = copy.deepcopy(parent) if use_deepcopy else parent.fork()
    assert child.pool_bytes_in_use() == used == parent.bytes_in_use() == child.bytes_in_use()
    assert child.shared_pages() == parent.pages_in_use()
    # the child appends (into the shared, partially filled last pages) and compacts (filling holes)
    for layer in range(child.num_layers):
        k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
        child.append(layer, k, v)
        twin.append(layer, k, v)
        _evict_every_third(child, layer)
        _evict_every_third(twin, layer)
    _same(_snapshot(child), _snapshot(twin))
    _same(_snapshot(parent), before)               # never written through the child
    # the parent can still grow independently
    k, v = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    parent.append(0, k, v)
    _same(_snapshot(child), _snapshot(twin))
    parent.check_invariants()
    child.check_invariants()
    # releasing the child returns only its own pages
    own = child.pages_in_use() - child.shared_pages()
    free_before = parent.num_free_pages()
    child.release()
    assert parent.num_free_pages() == free_before + own
    assert child.pages_in_use() == 0 and parent.shared_pages() == 0
    parent.check_invariants()
    _same(_snapshot(parent)[1:], before[1:])


def test_dropped_fork_pages_come_back_before_the_pool_grows():
    parent, g = _filled()
    child = parent.fork()
    child.append(0, torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g))
    own = child.pages_in_use() - child.shared_pages()
    assert own > 0
    pages, free = parent.num_pages, parent.num_free_pages()
    del child                                      # never released
    # ask for exactly the free pages plus the dropped fork's: a sweep finds them, the pool does not grow
    assert (parent.seq_lengths(1) == 11).all() and parent.page_size == 4   # 3 pages, 1 free slot per row
    n = free + own
    extra = np.zeros((2, 2), dtype=np.int64)
    extra[0, 0] = 4 * n - 1                        # ceil((11 + 4n - 1) / 4) = n + 3 pages
    parent.reserve(1, extra)
    assert parent.num_pages == pages and parent.num_free_pages() == 0
    parent.check_invariants()


# ------------------------------------------------------------------ prompt reuse on a model
import kvpress_kernels as kk  # noqa: E402
from kvpress_kernels.integrations._compat import cache_kwarg  # noqa: E402

NEW = 6


def tiny_llama(seed=0):
    return _fixtures.tiny_llama(4, 2, 16, 2, seed)


def context(seed=0):
    """Left-padded batch of two contexts (96 and 80 tokens) and two 5-token questions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(2, 96, dtype=torch.long)
    mask = torch.zeros(2, 96, dtype=torch.long)
    for b, n in enumerate([96, 80]):
        ids[b, 96 - n:] = torch.randint(3, 97, (n,), generator=g)
        mask[b, 96 - n:] = 1
    questions = [torch.randint(3, 97, (2, 5), generator=g) for _ in range(2)]
    return ids, mask, questions


def full(ids, mask, q):
    return torch.cat([ids, q], 1), torch.cat([mask, torch.ones_like(q)], 1)


def prefill(model, session, ids, mask):
    cache = session.new_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, **{cache_kwarg(model): cache})
    return cache


def answer(model, cache, ids, mask, q, **kw):
    f_ids, f_mask = full(ids, mask, q)
    kw.setdefault("do_sample", False)
    kw.setdefault("max_new_tokens", NEW)
    out = model.generate(f_ids, attention_mask=f_mask, past_key_values=cache, **kw)
    return out[:, f_ids.shape[1]:]


METHODS = [lambda: kk.SnapKV(0.5, window_size=4), lambda: kk.H2O(0.5),
           lambda: kk.ShotKV(0.5, decode_keep_ratio=0.5, decode_recent=1)]


@pytest.mark.parametrize("make", METHODS, ids=["snapkv", "h2o_decode", "shotkv_decode"])
def test_copies_answer_like_a_fresh_prefill_and_share_the_context(make):
    model = tiny_llama()
    ids, mask, questions = context()
    shots = [[(1, 20), (20, 40), (40, 60), (60, 80)], [(0, 16), (16, 32), (32, 48), (48, 64)]]
    fresh = []
    with kk.compress(model, make(), shots=shots, page_size=4) as session:   # the oracle: one prefill per question
        for q in questions:
            fresh.append(answer(model, prefill(model, session, ids, mask), ids, mask, q))
    with kk.compress(model, make(), shots=shots, page_size=4) as session:
        base = prefill(model, session, ids, mask)
        kv = base.kv
        context_bytes = kv.pool_bytes_in_use()
        assert context_bytes == kv.bytes_in_use()
        copies = [copy.deepcopy(base), base.fork()]
        assert kv.pool_bytes_in_use() == context_bytes          # stored once
        outs = [answer(model, c, ids, mask, q) for c, q in zip(copies, questions)]
        for got, want in zip(outs, fresh):
            assert torch.equal(got, want)
        own = [c.kv.pages_in_use() - c.kv.shared_pages() for c in copies]
        assert all(o > 0 for o in own)
        assert kv.pool_bytes_in_use() == context_bytes + sum(own) * kv.page_bytes
        if not isinstance(session.method, kk.H2O):
            # only the last, partially filled page of each row is copied, plus the new tokens' pages
            assert sum(own) < kv.pages_in_use()
        # (H2O's decoding phase evicts context tokens too: compaction then rewrites a copy's rows from
        # the first evicted slot on, and those pages become the copy's own)
        copies[0].release()                                      # returns only its own pages
        assert kv.pool_bytes_in_use() == context_bytes + own[1] * kv.page_bytes
        assert copies[1].stats()["extended_prompt_tokens"] == 5
        kv.check_invariants()
        # the context itself answers a third question unchanged by its copies
        assert torch.equal(answer(model, base, ids, mask, questions[0]), fresh[0])


def test_copies_sample_and_stop_at_eos_like_fresh_prefills():
    model = tiny_llama()
    ids, mask, questions = context(1)
    q = questions[0]
    with kk.compress(model, kk.H2O(0.5)) as session:
        greedy = answer(model, prefill(model, session, ids, mask), ids, mask, q)
        eos = int(greedy[0, 2])
        torch.manual_seed(3)
        sampled = answer(model, prefill(model, session, ids, mask), ids, mask, q, do_sample=True, top_k=5)
        stopped = answer(model, prefill(model, session, ids, mask), ids, mask, q, eos_token_id=eos)
    with kk.compress(model, kk.H2O(0.5)) as session:
        base = prefill(model, session, ids, mask)
        torch.manual_seed(3)
        assert torch.equal(answer(model, copy.deepcopy(base), ids, mask, q, do_sample=True, top_k=5), sampled)
        got = answer(model, base.fork(), ids, mask, q, eos_token_id=eos)
        assert torch.equal(got, stopped)
        assert got.shape[1] < NEW or (got[0, 3:] == 0).all()


def test_extension_with_padding_is_rejected():
    model = tiny_llama()
    ids, mask, questions = context()
    with kk.compress(model, kk.SnapKV(0.5, window_size=4)) as session:
        cache = prefill(model, session, ids, mask)
        f_ids, f_mask = full(ids, mask, questions[0])
        f_mask[1, -1] = 0
        with pytest.raises(ValueError, match="pads some of the new tokens"):
            model.generate(f_ids, attention_mask=f_mask, past_key_values=cache, max_new_tokens=2)
        with pytest.raises(ValueError, match="already holds"):
            model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2)


# ------------------------------------------------------------------ prompt extension is prompt
@pytest.mark.parametrize("make", [lambda: kk.ShotKV(0.5, decode_keep_ratio=0.3, decode_recent=1),
                                  lambda: kk.H2O(0.5, recent_ratio=0.05), lambda: kk.TOVA(0.5)], ids=["shotkv", "h2o", "tova"])
def test_decoding_phase_never_evicts_extended_prompt_tokens(make):
    model = tiny_llama()
    ids, mask, _ = context(2)
    g = torch.Generator().manual_seed(5)
    question = torch.randint(3, 97, (2, 12), generator=g)
    shots = [[(1, 20), (20, 40), (40, 60), (60, 80)], [(0, 16), (16, 32), (32, 48), (48, 64)]]
    new = 10
    with kk.compress(model, make(), shots=shots, page_size=4) as session:
        cache = prefill(model, session, ids, mask)
        a1 = answer(model, cache, ids, mask, question, max_new_tokens=new)
        stats = cache.stats()
        assert stats["extended_prompt_tokens"] == 12 and stats["generated_tokens"] == new - 1  # last one never fed
        # a second round on the same cache: the last answer token and the next question are prompt
        ids2, mask2 = full(ids, mask, torch.cat([question, a1], 1))
        answer(model, cache, ids2, mask2, question[:, :7], max_new_tokens=new)
        stats = cache.stats()
    assert stats["extended_prompt_tokens"] == 12 + 8 and stats["generated_tokens"] == 2 * (new - 1)
    assert cache._ext_ranges == [(0, 12), (12 + new - 1, 12 + new - 1 + 8)]
    prompt = np.asarray(stats["prompt_lengths"])
    evicted_generated = 0
    for layer in range(cache.kv.num_layers):
        _, _, lengths, pos = cache.kv.gather(layer)
        for b in range(2):
            for h in range(cache.kv.num_kv_heads):
                held = set(pos[b, h, :int(lengths[b, h])].tolist())
                ext = {int(prompt[b]) + i for s, e in cache._ext_ranges for i in range(s, e)}
                assert ext <= held, f"layer {layer} seq {b} head {h} lost prompt tokens {sorted(ext - held)}"
                gen = set(range(int(prompt[b]), int(prompt[b]) + stats["extended_prompt_tokens"]
                                + stats["generated_tokens"])) - ext
                evicted_generated += len(gen - held)
    # the decoding phase did run (ShotKV evicts generated tokens; H2O/TOVA evict context or generated ones)
    assert stats["kv_tokens_final"] < stats["kv_tokens_full"]
    if isinstance(session.method, kk.ShotKV):
        assert evicted_generated > 0


# ------------------------------------------------------------------ chat turns and paragraphs
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<a>{% endif %}")


def char_tokenizer():
    """A fast tokenizer with one token per character (ids below the tiny model's vocabulary of 97),
    built locally: no download."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "\n <>/" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456789.,?!:;'-"
    vocab = {"[PAD]": 0, "[BOS]": 1, "[UNK]": 2}
    for i, c in enumerate(chars):
        vocab[c] = 3 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    return fast


CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a red fruit."}, {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "And a yellow one?"}, {"role": "assistant", "content": "Banana, often."},
        {"role": "user", "content": "A green vegetable, please."}, {"role": "assistant", "content": "Kale."},
        {"role": "user", "content": "Which of them was yellow?"}]


def test_chat_turns_are_found_from_the_template():
    tok = char_tokenizer()
    seg = kk.find_chat_turns(CHAT, tok)
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert seg.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    pieces = [text[s:e] for s, e in seg.turns]                 # one char per token
    assert pieces == ["<u>Name a red fruit.\n<a>Apple.\n", "<u>And a yellow one?\n<a>Banana, often.\n",
                      "<u>A green vegetable, please.\n<a>Kale.\n"]
    assert text[slice(*seg.system)] == "<s>You are terse.\n"
    assert text[slice(*seg.current)] == "<u>Which of them was yellow?\n<a>"
    per_message = kk.find_chat_turns(CHAT, tok, unit="message")
    assert [text[s:e] for s, e in per_message.turns[:2]] == ["<u>Name a red fruit.\n", "<a>Apple.\n"]
    assert len(per_message.turns) == 6
    with pytest.raises(ValueError, match="current user turn"):
        kk.find_chat_turns(CHAT[:-1], tok)
    with pytest.raises(ValueError, match="unit"):
        kk.find_chat_turns(CHAT, tok, unit="turn")


def test_paragraphs_are_found():
    tok = char_tokenizer()
    text = "First part, one.\n\n  Second part\nstill second.\n \nThird.\n\n\n"
    spans = kk.find_paragraphs(text, tok, add_special_tokens=False)
    assert [text[s:e] for s, e in spans] == ["First part, one.", "Second part\nstill second.", "Third."]
    with pytest.raises(ValueError, match="empty string"):
        kk.find_paragraphs(text, tok, separator=r"\s*")


def test_shotkv_keeps_or_drops_past_turns_whole():
    tok = char_tokenizer()
    model = tiny_llama()
    seg = kk.find_chat_turns(CHAT, tok)
    ids = torch.tensor([seg.input_ids])
    n = ids.shape[1]
    with kk.compress(model, kk.ShotKV(0.6, decode_keep_ratio=1.0, policy="skip"), shots=seg.turns,
                     page_size=4) as session:
        model.generate(ids, max_new_tokens=2, do_sample=False)
        cache = session.cache
    dropped_any = False
    for layer in range(cache.kv.num_layers):
        _, _, lengths, pos = cache.kv.gather(layer)
        for h in range(cache.kv.num_kv_heads):
            held = set(pos[0, h, :int(lengths[0, h])].tolist())
            for s, e in seg.turns:
                inside = held & set(range(s, e))
                assert inside in (set(), set(range(s, e))), f"turn {(s, e)} split in layer {layer}"
                dropped_any |= not inside
            assert set(range(*seg.system)) <= held and set(range(*seg.current)) <= held
            assert len(held & set(range(n))) <= kk.methods.budget_tokens(0.6, n)
    assert dropped_any


# ------------------------------------------------------------------ the harness's multi-question setting
def test_harness_multi_question_answers_each_question_from_a_copy():
    import dataclasses

    from kvpress_kernels.evaluation.harness import build_method, prepare, run_once
    from kvpress_kernels.evaluation.tasks import generate_task

    tok = char_tokenizer()
    model = tiny_llama()
    ex = generate_task("multi_answer", 1, seed=0, n_shots=6)[0]
    prep = prepare(ex, tok)
    multi = run_once(model, tok, prep, build_method("shotkv_decode", 0.5), "multi_question")
    assert len(multi.texts) == 1 + len(ex.turns)
    st = multi.stats
    assert st["extended_prompt_tokens"] == prep.q_ids.shape[1]
    # the context and one copy at a time: far less than two contexts
    assert st["kv_bytes_after_prefill"] < st["kv_bytes_pool_peak"] < 2 * st["kv_bytes_after_prefill"]
    # each answer equals the query-agnostic answer to that question alone
    for i, (question, _) in enumerate([(ex.question, ex.answer)] + list(ex.turns)):
        alone = dataclasses.replace(ex, question=question, turns=[])
        single = run_once(model, tok, prepare(alone, tok), build_method("shotkv_decode", 0.5), "query_agnostic")
        assert single.texts[0] == multi.texts[i]


# ------------------------------------------------------------------ re-compressing a filled cache (past turns as segments)
from kvpress_kernels import sessions as S  # noqa: E402

SHOTS = [[(1, 20), (20, 40), (40, 60), (60, 80)], [(0, 16), (16, 32), (32, 48), (48, 64)]]


def _extended_cache(model, session, seed=3, n_ext=12, window=64):
    """Context (prefill-compressed by the session's method), then ``n_ext`` tokens fed as prompt."""
    ids, mask, _ = context()
    cache = session.new_cache()
    S.record_queries(cache, window)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(ids, attention_mask=mask, **{cache_kwarg(model): cache})
        model(torch.randint(3, 97, (2, n_ext), generator=g), **{cache_kwarg(model): cache})
    return cache


def _by_position(c, layer):
    """{(b, h): {position: (k, v)}} of one layer."""
    k, v, lengths, pos = c.gather(layer)
    out = {}
    for b in range(c.batch_size):
        for h in range(c.num_kv_heads):
            out[b, h] = {int(pos[b, h, i]): (k[b, h, i].clone(), v[b, h, i].clone()) for i in range(int(lengths[b, h]))}
    return out


def _shotkv_reference(before, cache, segments, keep_ratio, policy):
    """Positions each (layer, seq) keeps: ShotKV over the held tokens in plain fp64 PyTorch. Token score =
    attention mass from the window (the held tokens after the last segment, their recorded queries), summed
    over all query heads; segment score = mean over its held tokens; non-segment tokens protected; greedy
    by score (``policy``) under ceil(keep_ratio * conversation length)."""
    import math
    qw = cache.query_window
    seen = S.conversation_lengths(cache)
    G = cache.spec.num_heads // cache.spec.num_kv_heads
    out = {}
    for layer, rows in enumerate(before):
        for b in range(cache.kv.batch_size):
            held = sorted(rows[b, 0])
            budget = min(len(held), math.ceil(round(keep_ratio * int(seen[b]), 9)))
            if budget >= len(held):
                out[layer, b] = set(held)
                continue
            segs = [[p for p in held if s <= p < e] for s, e in segments[b]]
            segs = [sg for sg in segs if sg]
            tail = [p for p in held if p >= (segs[-1][-1] + 1 if segs else 0)]
            W = len(tail)
            q = qw.last(layer, W)[b].double()                                        # [Hq, W, D]
            keys = torch.stack([torch.stack([rows[b, h][p][0] for p in held]) for h in range(cache.kv.num_kv_heads)])
            keys = keys.double().repeat_interleave(G, 0)                             # [Hq, n, D]
            logits = torch.einsum("hwd,hnd->hwn", q, keys) * qw.scale[layer]
            causal = torch.tensor(held).view(1, 1, -1) <= torch.tensor(tail).view(1, -1, 1)
            p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
            tok = dict(zip(held, p.sum((0, 1)).tolist()))
            in_seg = {x for sg in segs for x in sg}
            kept = {x for x in held if x not in in_seg}
            room = budget - len(kept)
            for sg in sorted(segs, key=lambda sg: -sum(tok[x] for x in sg) / len(sg)):
                if len(sg) <= room:
                    kept |= set(sg)
                    room -= len(sg)
                elif policy == "stop":
                    break
            out[layer, b] = kept
    return out


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_recompress_keeps_whole_segments_like_the_reference_and_frees_pages(policy, monkeypatch):
    monkeypatch.setenv("KVPRESS_KERNELS_DEBUG", "1")
    model = tiny_llama()
    with kk.compress(model, kk.ShotKV(0.8, decode_keep_ratio=1.0, policy=policy), shots=SHOTS, page_size=4) as session:
        cache = _extended_cache(model, session)
    kv = cache.kv
    before = [_by_position(kv, layer) for layer in range(kv.num_layers)]
    segments = SHOTS                                  # positions over the whole cached sequence
    want = _shotkv_reference(before, cache, segments, 0.5, policy)
    pool_before = kv.pool_bytes_in_use()
    rep = S.recompress(cache, keep_ratio=0.5, segments=segments)
    kv.check_invariants()
    assert rep["pool_pages_freed"] > 0 and kv.pool_bytes_in_use() == pool_before - rep["pool_pages_freed"] * kv.page_bytes
    dropped = 0
    for layer in range(kv.num_layers):
        after = _by_position(kv, layer)
        for (b, h), toks in after.items():
            assert set(toks) == want[layer, b], f"layer {layer} seq {b} head {h}"
            for p, (k, v) in toks.items():                     # data movement exact
                assert torch.equal(k, before[layer][b, h][p][0]) and torch.equal(v, before[layer][b, h][p][1])
            held_before = set(before[layer][b, h])
            for s, e in segments[b]:
                seg = held_before & set(range(s, e))
                assert seg & set(toks) in (set(), seg), f"segment {(s, e)} split"
                dropped += bool(seg) and not (seg & set(toks))
            in_seg = {x for s, e in segments[b] for x in range(s, e)}
            assert {x for x in held_before if x not in in_seg} <= set(toks)    # protected: never evicted
    assert dropped > 0


def test_recompress_a_fork_copies_on_write_and_leaves_the_parent_alone(monkeypatch):
    monkeypatch.setenv("KVPRESS_KERNELS_DEBUG", "1")
    model = tiny_llama()
    with kk.compress(model, kk.ShotKV(0.8, decode_keep_ratio=1.0, policy="skip"), shots=SHOTS, page_size=4) as session:
        parent = _extended_cache(model, session)
        twin = _extended_cache(model, session)         # the same, never forked: the oracle
    snap = _snapshot(parent.kv)
    child = copy.deepcopy(parent)
    pool = parent.kv.pool_bytes_in_use()
    S.recompress(child, keep_ratio=0.5, segments=SHOTS)
    S.recompress(twin, keep_ratio=0.5, segments=SHOTS)
    _same(_snapshot(parent.kv), snap)                  # never written through the fork
    _same(_snapshot(child.kv), _snapshot(twin.kv))
    assert child.kv.bytes_in_use() < parent.kv.bytes_in_use()
    assert parent.kv.pool_bytes_in_use() <= pool + child.kv.pages_in_use() * parent.kv.page_bytes
    parent.kv.check_invariants()
    child.release()
    assert parent.kv.pool_bytes_in_use() == parent.kv.bytes_in_use()
    _same(_snapshot(parent.kv), snap)


def test_rejected_recompress_changes_nothing():
    model = tiny_llama()
    with kk.compress(model, kk.ShotKV(0.8, decode_keep_ratio=1.0), shots=SHOTS, page_size=4) as session:
        cache = _extended_cache(model, session, window=8)
    kv = cache.kv
    snap, pool, state = _snapshot(kv), kv.pool_bytes_in_use(), (cache._extended, cache._generated, list(cache._ext_ranges))
    bad = [
        (dict(segments=[[(0, 10), (5, 20)], [(0, 4)]]), ValueError, "overlap"),
        (dict(segments=[[(0, 500)], [(0, 4)]]), ValueError, "out of range"),
        (dict(segments=SHOTS[0]), ValueError, "one per sequence"),
        (dict(segments=SHOTS, keep_ratio=1.5), ValueError, "keep_ratio"),
        (dict(segments=SHOTS), ValueError, "longer query window"),        # ShotKV's window: 28 > 8 recorded
        (dict(segments=None), ValueError, "shots must be given"),
        (dict(method=kk.H2O(0.3)), ValueError, "longer query window"),    # H2O needs every query
        (dict(method=kk.ShotKV), TypeError, "CompressionMethod"),
    ]
    for kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            S.recompress(cache, **{"keep_ratio": 0.5, **kw})
        _same(_snapshot(kv), snap)
        assert kv.pool_bytes_in_use() == pool
        assert (cache._extended, cache._generated, cache._ext_ranges) == state
    # a query-free method needs no window
    S.recompress(cache, kk.StreamingLLM(0.5, n_sink=2))
    assert kv.pool_bytes_in_use() < pool


def test_evict_primitive_exact_and_checked():
    c, _ = _filled(L=2, B=2, H=2, n=11)
    _evict_every_third(c, 0)                           # row lengths differ, slots out of position order later
    before = [_by_position(c, layer) for layer in range(2)]
    lengths = c.seq_lengths()
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 2, 2, 12, generator=g) < 0.5
    mask &= torch.arange(12).view(1, 1, 1, 12) < torch.from_numpy(lengths).unsqueeze(-1)
    snap, pool = _snapshot(c), c.pool_bytes_in_use()
    kept_idx = S.kept_from_keep_mask(mask)
    for keep, match in [(kept_idx.flip(-1), "first|ascending"), (mask.int() * 20, "ascending|beyond|first"),
                        (torch.ones(2, 2, 2, 12, dtype=torch.bool), "holds only"), (kept_idx[0], "dimensions"),
                        (kept_idx.float(), "dtype")]:
        with pytest.raises((ValueError, TypeError), match=match):
            S.evict(c, keep)
        _same(_snapshot(c), snap)
        assert c.pool_bytes_in_use() == pool
    twin = copy.deepcopy(c)
    rep = S.evict(c, mask)
    S.evict(twin, kept_idx)
    _same(_snapshot(c), _snapshot(twin))
    assert rep["tokens_after"] == int(mask.sum())
    for layer in range(2):
        after = _by_position(c, layer)
        p0 = snap[layer][3]
        for (b, h), toks in after.items():
            want = {int(p0[b, h, s]) for s in mask[layer, b, h].nonzero().flatten().tolist()}
            assert set(toks) == want
            for p, (k, v) in toks.items():
                assert torch.equal(k, before[layer][b, h][p][0]) and torch.equal(v, before[layer][b, h][p][1])
    c.check_invariants()


def test_query_window_records_the_queries_the_model_computes():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny_llama()
    ids, mask, questions = context()
    mask = torch.ones_like(mask)          # no padding: the plain forward below then sees the same positions
    seen_q = {}

    def capture(module, query, *args, **kwargs):
        seen_q[module.layer_idx] = query.detach().clone()
        return sdpa_attention_forward(module, query, *args, **kwargs)

    AttentionInterface.register("i14m_capture", capture)
    # the full cache: with eviction, later layers' queries would differ from a plain forward's
    with kk.compress(model, None, page_size=4) as session:
        cache = session.new_cache()
        S.record_queries(cache, 10)
        with torch.no_grad():
            model(ids, attention_mask=mask, **{cache_kwarg(model): cache})
        a = answer(model, cache, ids, mask, questions[0], max_new_tokens=4)   # 5-token extension, 3 steps
    # the fed tokens: context, question, the 3 generated tokens fed back (the last answer token is not fed)
    seqs = torch.cat([ids, questions[0], a[:, :-1]], 1)
    prev = model.config._attn_implementation
    model.config._attn_implementation = "i14m_capture"
    try:
        with torch.no_grad():
            model(seqs, attention_mask=torch.cat([mask, torch.ones(2, seqs.shape[1] - 96, dtype=torch.long)], 1))
    finally:
        model.config._attn_implementation = prev
    qw = cache.query_window
    for layer in range(2):
        assert qw.available(layer, 2).tolist() == [10, 10]
        got, want = qw.last(layer, 10), seen_q[layer][:, :, -10:]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a fork has its own copy
    f = cache.fork()
    f.query_window.record(0, torch.ones(2, 4, 1, 16), 0.25)
    torch.testing.assert_close(qw.last(0, 10), seen_q[0][:, :, -10:], rtol=1e-5, atol=1e-5)


def test_decoding_phase_after_recompress_compresses_only_the_next_answer():
    model = tiny_llama()
    method = kk.ShotKV(0.8, decode_keep_ratio=0.3, decode_recent=1, policy="skip")
    ids, mask, _ = context()
    with kk.compress(model, method, shots=SHOTS, page_size=4) as session:
        cache = session.new_cache()
        S.record_queries(cache, 64)
        with torch.no_grad():
            model(ids, attention_mask=mask, **{cache_kwarg(model): cache})
        q1 = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(7))
        a1 = answer(model, cache, ids, mask, q1, max_new_tokens=8)             # answer 1: decoding phase runs
        q2 = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(8))
        ids2, mask2 = full(ids, mask, torch.cat([q1, a1, q2], 1))
        with torch.no_grad():                                                 # feed turn 2 (all but its last token)
            model(ids2[:, 96 + 12 + 7:-1], **{cache_kwarg(model): cache})
        segs = [SHOTS[0] + [(96, 96 + 12 + 8)], SHOTS[1] + [(80, 80 + 12 + 8)]]
        S.recompress(cache, keep_ratio=0.5, segments=segs)
        held = [_by_position(cache.kv, layer) for layer in range(2)]
        a2 = answer(model, cache, ids2[:, :-1], mask2[:, :-1], ids2[:, -1:], max_new_tokens=10)
    stats = cache.stats()
    assert stats["generated_tokens"] == 9                                       # this answer's only
    prompt = np.asarray(stats["prompt_lengths"])
    for layer in range(2):
        after = _by_position(cache.kv, layer)
        for (b, h), toks in after.items():
            assert set(held[layer][b, h]) <= set(toks)                          # nothing kept is evicted later
            start = int(prompt[b]) + 12 + 8 + 9                                 # this answer's first position
            gen = {p for p in toks if p >= start}
            assert len(gen) == kk.methods.budget_tokens(0.3, 9)


# ------------------------------------------------------------------ multi-turn chat
USER_TURNS = ["Name a red fruit.", "And a yellow one?", "A green vegetable, please.", "Which of them was yellow?"]


def _held(cache, layer):
    _, _, lengths, pos = cache.kv.gather(layer)
    return {(b, h): set(pos[b, h, :int(lengths[b, h])].tolist())
            for b in range(cache.kv.batch_size) for h in range(cache.kv.num_kv_heads)}


def test_chat_session_keeps_or_drops_past_turns_whole_under_the_budget():
    tok, model = char_tokenizer(), tiny_llama()
    chat = S.ChatSession(model, tok, kk.ShotKV(0.5, decode_keep_ratio=1.0, policy="skip"), system="You are terse.",
                         window=64, page_size=4)
    dropped = 0
    for t, text in enumerate(USER_TURNS):
        chat.ask(text, max_new_tokens=6, do_sample=False)
        h = chat.history[-1]
        assert h["seen"] == len(chat.ids) == S.conversation_lengths(chat.cache)[0]
        sys_span, (c0, c1) = chat.system_span, h["current"]
        assert tok.decode(chat.ids[c0:c1]).replace(" ", "") == f"<u>{text}\n<a>".replace(" ", "")
        if t == 0:
            assert h["recompress"] is None and h["segments"] == []
            continue
        rep = h["recompress"]
        segs = h["segments"]
        assert len(segs) == t and segs[0][0] == sys_span[1] and segs[-1][1] == c0
        in_seg = sum(e - s for s, e in segs)
        for layer in range(chat.cache.kv.num_layers):
            for (b, hh), held in _held(chat.cache, layer).items():
                assert set(range(*sys_span)) <= held and set(range(c0, c1)) <= held     # protected
                for s, e in segs:
                    inside = held & set(range(s, e))
                    assert inside in (set(), set(range(s, e))), f"turn {(s, e)} split in layer {layer}"
                    dropped += not inside
                # the budget once the turn is fed (all but its last token, which generate feeds): 0.5 of the
                # conversation so far, the protected tokens counted inside
                kept, protected = rep["kept"][layer][b][hh], c1 - 1 - in_seg
                assert rep["budgets"][b] == kk.methods.budget_tokens(0.5, c1 - 1)
                assert protected <= kept <= max(rep["budgets"][b], protected)
    assert dropped > 0
    assert chat.history[-1]["kept_fraction"] < 0.8
    chat.close()
    assert chat.cache.kv is None


def test_chat_session_decoding_phase_compresses_each_answer_only():
    tok, model = char_tokenizer(), tiny_llama()
    chat = S.ChatSession(model, tok, kk.ShotKV(0.5, decode_keep_ratio=0.5, decode_recent=1, policy="skip"),
                         window=64, page_size=4)
    for text in USER_TURNS[:3]:
        chat.ask(text, max_new_tokens=8, do_sample=False)
        h = chat.history[-1]
        p, g = h["prompt_len"], h["answer_tokens"] - 1               # generated tokens fed (the last is not)
        for layer in range(chat.cache.kv.num_layers):
            for (b, hh), held in _held(chat.cache, layer).items():
                if h["recompress"] is not None:   # nothing kept before the answer is evicted by its decoding
                    # phase (+ 1: the turn's last token, fed by generate after the re-compression)
                    assert len({x for x in held if x < p}) == h["recompress"]["kept"][layer][b][hh] + 1
                assert len({x for x in held if x >= p}) == kk.methods.budget_tokens(0.5, g)


def test_chat_session_full_cache_answers_like_plain_generate():
    tok, model = char_tokenizer(), tiny_llama()
    chat = S.ChatSession(model, tok, None, window=8, page_size=4)
    for text in USER_TURNS[:3]:
        chat.ask(text, max_new_tokens=5, do_sample=False)
    for h in chat.history:
        p, n = h["prompt_len"], h["answer_tokens"]
        want = model.generate(torch.tensor([chat.ids[:p]]), max_new_tokens=n, do_sample=False)[0, p:].tolist()
        assert chat.ids[p:p + n - 1] == want[:n - 1]
    assert chat.history[-1]["kept_fraction"] == 1.0


def test_chat_session_add_exchange_feeds_given_turns_and_enforces_the_budget():
    tok, model = char_tokenizer(), tiny_llama()
    chat = S.ChatSession(model, tok, kk.ShotKV(0.4, decode_keep_ratio=1.0, policy="skip"), system="Be brief.",
                         window=64, page_size=4)
    given = [("Red: apple.", "Noted, apple."), ("Yellow: banana.", "Noted, banana."), ("Green: kale.", "Noted, kale.")]
    for t, (user, assistant) in enumerate(given):
        chat.add_exchange(user, assistant)
        h = chat.history[-1]
        assert h["seen"] == len(chat.ids) and h["answer_tokens"] == 0
        c0, c1 = h["current"]
        text = tok.decode(chat.ids[c0:c1]).replace(" ", "")
        assert text == f"<u>{user}\n<a>{assistant}".replace(" ", "")        # the closing comes with the next turn
        assert h["segments"] == chat.segments(c0) and len(h["segments"]) == t
        for layer in range(chat.cache.kv.num_layers):
            for held in _held(chat.cache, layer).values():
                assert set(range(c0, c1)) <= held and set(range(*chat.system_span)) <= held
                for s, e in h["segments"]:
                    assert held & set(range(s, e)) in (set(), set(range(s, e)))
    answer = chat.ask("Which was green?", max_new_tokens=4, do_sample=False)
    assert isinstance(answer, str) and chat.history[-1]["recompress"]["budgets"] == [
        kk.methods.budget_tokens(0.4, chat.history[-1]["prompt_len"] - 1)]
    assert chat.history[-1]["kept_fraction_at_question"] <= 0.5
    assert [m["role"] for m in chat.messages] == ["system"] + ["user", "assistant"] * 4


def test_harness_multi_turn_setting_runs_a_chat_session():
    from kvpress_kernels.evaluation.harness import build_method, prepare, run_once
    from kvpress_kernels.evaluation.tasks import generate_task

    tok, model = char_tokenizer(), tiny_llama()
    ex = generate_task("multi_turn", 1, seed=0, n_shots=4)[0]
    prep = prepare(ex, tok)
    full = run_once(model, tok, prep, None, "multi_turn")
    out = run_once(model, tok, prep, build_method("shotkv", 0.3), "multi_turn")
    rows = model.config.num_hidden_layers * model.config.num_key_value_heads
    for run in (full, out):
        assert len(run.texts) == 1 and run.logprobs.shape == (model.config.vocab_size,)
        assert run.stats["turns"] == 5
    assert full.stats["kv_tokens_after_prefill"] == rows * full.stats["prompt_lengths"][0]
    kept = out.stats["kv_tokens_after_prefill"] / (rows * out.stats["prompt_lengths"][0])
    assert kept < 0.6 and out.stats["kv_bytes_final"] < full.stats["kv_bytes_final"]
    with pytest.raises(ValueError, match="multi_turn"):
        run_once(model, tok, prepare(generate_task("lookup", 1, n_shots=4)[0], tok), None, "multi_turn")


def test_chat_session_budget_at_question_keeps_history_whole_until_asked():
    tok, model = char_tokenizer(), tiny_llama()
    chat = S.ChatSession(model, tok, kk.ShotKV(0.4, policy="skip"), system="Be brief.", window=64, page_size=4,
                         budget="at_question")
    for user, assistant in [("Red: apple.", "Noted, apple."), ("Yellow: banana.", "Noted, banana."),
                            ("Green: kale.", "Noted, kale.")]:
        chat.add_exchange(user, assistant)
        assert chat.history[-1]["recompress"] is None and chat.history[-1]["kept_fraction"] == 1.0
    chat.ask("Which was green?", max_new_tokens=4, do_sample=False)
    h = chat.history[-1]
    c0 = h["current"][0]
    assert h["kept_fraction_at_question"] <= 0.45 and len(h["segments"]) == 3
    for layer in range(chat.cache.kv.num_layers):
        for held in _held(chat.cache, layer).values():
            assert set(range(c0, h["prompt_len"])) <= held
            for s, e in h["segments"]:
                assert held & set(range(s, e)) in (set(), set(range(s, e)))
    with pytest.raises(ValueError, match="budget"):
        S.ChatSession(model, tok, None, budget="sometimes")


@pytest.mark.slow
def test_chat_session_on_smollm2(smollm2):
    """SmolLM2-135M-Instruct with its own chat template: a multi_turn eval conversation (8 fact turns, then
    a question) under ShotKV at 30 % of the conversation after every turn: past exchanges kept or dropped
    whole in every layer, system prompt and the current turn held, the memory really freed, and on this
    example (one the full cache answers) the answer still right."""
    from kvpress_kernels.evaluation.tasks import CHAT_SYSTEM, generate_task

    model, tok = smollm2
    ex = generate_task("multi_turn", 30, seed=0)[27]
    answers, chats = {}, {}
    for name, method in [("full", None), ("shotkv", kk.ShotKV(0.3, decode_keep_ratio=1.0))]:
        chat = S.ChatSession(model, tok, method, system=CHAT_SYSTEM, window=128)
        for user, assistant in ex.chat:
            chat.add_exchange(user, assistant)
            c0, c1 = chat.history[-1]["current"]
            assert tok.decode(chat.ids[c0:c1]) == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}"
        answers[name] = chat.ask(ex.chat_question, max_new_tokens=ex.max_new_tokens, do_sample=False)
        chats[name] = chat
    assert ex.answer in answers["full"] and ex.answer in answers["shotkv"]
    chat = chats["shotkv"]
    h = chat.history[-1]
    assert tok.decode(chat.ids[slice(*chat.system_span)]) == f"<|im_start|>system\n{CHAT_SYSTEM}<|im_end|>\n"
    assert all(tok.decode(chat.ids[s:e]).startswith("<|im_start|>user\n") for s, e in h["segments"])
    assert h["kept_fraction_at_question"] <= 0.3
    dropped = 0
    for layer in range(chat.cache.kv.num_layers):
        for held in _held(chat.cache, layer).values():
            assert set(range(*chat.system_span)) | set(range(h["current"][0], h["prompt_len"])) <= held
            for s, e in h["segments"]:
                inside = held & set(range(s, e))
                assert inside in (set(), set(range(s, e)))
                dropped += not inside
    assert dropped > 0
    assert chat.cache.kv.bytes_in_use() < 0.5 * chats["full"].cache.kv.bytes_in_use()


def test_recompress_tells_the_method_through_rebased():
    # the public hook: recompress hands the method the new lengths and the extension; ShotKV's decoding
    # phase then counts its frozen prefill from them (no private state read from outside)
    model = tiny_llama()
    seen = []

    class Recording(kk.ShotKV):
        def rebased(self, lengths, extended):
            seen.append((lengths.copy(), extended))
            super().rebased(lengths, extended)

    method = Recording(0.8, decode_keep_ratio=1.0, policy="skip")
    with kk.compress(model, method, shots=SHOTS, page_size=4) as session:
        cache = _extended_cache(model, session)
    S.recompress(cache, keep_ratio=0.5, segments=SHOTS)
    assert len(seen) == 1
    lengths, extended = seen[0]
    assert np.array_equal(lengths, cache.kv.seq_lengths()) and extended == cache._extended
    for layer in range(cache.kv.num_layers):
        assert np.array_equal(method._prefill_kept[layer], lengths[layer, :, 0] - extended)
