"""Sessions over a compressed cache: forks that share pages (prompt reuse), prompt extension, chat turns."""

import copy

import numpy as np
import pytest
import torch

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
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from kvpress_kernels.integrations._compat import cache_kwarg  # noqa: E402

NEW = 6


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


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
