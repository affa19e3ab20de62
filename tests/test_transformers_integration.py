"""transformers integration on tiny random Llama models (CPU, reference backend): the paged path equals
stock transformers generation, every method runs and frees the memory its keep ratio says, ShotKV keeps
whole shots and its decoding budget, and bad uses fail clearly."""

import math

import numpy as np
import pytest
import torch

import kvpress_kernels as kk
from _fixtures import left_padded_prompts as prompts
from _fixtures import tiny_llama
from conftest import devices_for_triton
from kvpress_kernels.integrations.transformers import ATTN_IMPLEMENTATION, PagedCache
from kvpress_kernels.methods import budget_tokens

# (query heads, kv heads, head dim): GQA ratios 2, 3, 1 (MHA) and 8
CONFIGS = [(4, 2, 16), (3, 1, 8), (4, 4, 8), (8, 1, 16)]
NEW = 6

SHOTS = {1: [[(1, 9), (9, 17), (17, 25), (25, 31)]],
         2: [[(1, 9), (9, 17), (17, 25), (25, 31)], [(0, 6), (6, 14), (14, 22)]]}


def stock(model, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **kw)


def all_methods(ratio, shots_ok=True):
    out = [kk.SnapKV(ratio, window_size=4, kernel_size=3), kk.PyramidKV(ratio, window_size=4, beta=2),
           kk.ChunkKV(ratio, chunk_size=4, window_size=4), kk.StreamingLLM(ratio, n_sink=2),
           kk.H2O(ratio), kk.TOVA(ratio), kk.KNorm(ratio)]
    if shots_ok:
        out.append(kk.ShotKV(ratio))
    return out


# ------------------------------------------------------------------------------------------------
# exactness against stock transformers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("batch", [1, 2])
def test_paged_path_equals_stock_generate(cfg, batch):
    model = tiny_llama(*cfg)
    ids, mask, _ = prompts(batch)
    want = stock(model, ids, mask)
    got, stats = kk.generate(model, ids, None, attention_mask=mask, max_new_tokens=NEW, page_size=4)
    assert torch.equal(got, want)
    assert stats["kv_bytes_final"] == stats["kv_bytes_full"]
    assert model.config._attn_implementation != ATTN_IMPLEMENTATION      # restored


@pytest.mark.parametrize("method", [None, kk.SnapKV(1.0, window_size=4)], ids=["baseline", "SnapKV"])
def test_right_padding_equals_stock_generate(method):
    """Pads are found from the mask wherever they are: a right-padded batch (which transformers
    warns about) gives what stock generate gives."""
    model = tiny_llama(4, 2, 16)
    ids, mask, lengths = prompts(2)
    rids, rmask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b, n in enumerate(lengths):
        rids[b, :n], rmask[b, :n] = ids[b, ids.shape[1] - n:], 1
    want = stock(model, rids, rmask)
    got, stats = kk.generate(model, rids, method, attention_mask=rmask, max_new_tokens=NEW)
    assert torch.equal(got, want)
    assert stats["prompt_lengths"] == lengths


@pytest.mark.parametrize("method", all_methods(1.0), ids=lambda m: type(m).__name__)
def test_keep_ratio_one_equals_stock_generate(method):
    model = tiny_llama(4, 2, 16)
    ids, mask, _ = prompts(2)
    want = stock(model, ids, mask)
    got, stats = kk.generate(model, ids, method, attention_mask=mask, max_new_tokens=NEW, shots=SHOTS[2],
                             page_size=4)
    assert torch.equal(got, want)
    assert stats["kv_tokens_final"] == stats["kv_tokens_full"]


def test_sampling_equals_stock_sampling_with_the_same_seed():
    model = tiny_llama(4, 2, 16)
    ids, mask, _ = prompts(2)
    torch.manual_seed(123)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=20, temperature=1.5)
    torch.manual_seed(123)
    got, _ = kk.generate(model, ids, None, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=20,
                         temperature=1.5)
    assert torch.equal(got, want)
    torch.manual_seed(123)
    got, stats = kk.generate(model, ids, kk.SnapKV(0.5, window_size=4), attention_mask=mask, max_new_tokens=NEW,
                             do_sample=True, top_k=20)
    assert got.shape == want.shape and stats["kv_tokens_after_prefill"] < stats["kv_tokens_full"]


@pytest.mark.parametrize("method", [kk.SnapKV(0.4, window_size=4), kk.StreamingLLM(0.3, n_sink=2),
                                    kk.ShotKV(0.5, decode_keep_ratio=1.0)], ids=lambda m: type(m).__name__)
def test_compressed_decoding_equals_attention_over_the_kept_tokens(method):
    """The step after prefill compression computes exactly what stock transformers computes from a
    DynamicCache holding only the kept tokens (gathered from its own full prefill cache by position)."""
    from transformers import DynamicCache
    model = tiny_llama(4, 2, 16, layers=3)
    ids, mask, (n,) = prompts(1)
    with kk.compress(model, method, shots=SHOTS[1], page_size=4) as s:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True)
    first = full.logits[0, -1].argmax()
    assert first == out.sequences[0, n]
    kv = s.cache.kv
    kept = DynamicCache()
    for layer in range(3):
        _, _, lens, pos = kv.gather(layer)
        idx = [sorted(p for p in pos[0, h, :lens[0, h]].tolist() if p < n) for h in range(2)]
        assert len(idx[0]) < n
        gather = torch.tensor(idx).view(1, 2, -1, 1).expand(1, 2, len(idx[0]), 16)
        kept.update(full.past_key_values.layers[layer].keys.gather(2, gather),
                    full.past_key_values.layers[layer].values.gather(2, gather), layer)
    with torch.no_grad():
        want = model(first.view(1, 1), past_key_values=kept, position_ids=torch.tensor([[n]]),
                     cache_position=torch.tensor([n]), use_cache=True).logits[0, -1]
    # fp32 attention summed in another order (paged reference vs SDPA): logits of O(1) agree to ~1e-6
    torch.testing.assert_close(out.scores[1][0], want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# every method: runs, frees memory per its keep ratio
# ------------------------------------------------------------------------------------------------

def expected_prefill_lengths(method, L, lengths):
    """Host-known kept tokens per (layer, sequence) for the methods whose budgets are exact."""
    if isinstance(method, kk.PyramidKV):
        return [[method.layer_budget(layer, L, n) for n in lengths] for layer in range(L)]
    if isinstance(method, (kk.SnapKV, kk.StreamingLLM, kk.H2O, kk.TOVA, kk.KNorm)) and \
            not isinstance(method, kk.ChunkKV):
        return [[budget_tokens(method.keep_ratio, n) for n in lengths] for _ in range(L)]
    return None


# every method with one of the configs (cycled, so each config serves two methods), batch 1 and 2
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("method,cfg", [(m, CONFIGS[i % len(CONFIGS)]) for i, m in enumerate(all_methods(0.4))],
                         ids=lambda x: type(x).__name__ if not isinstance(x, tuple) else "x".join(map(str, x)))
def test_every_method_generates_and_frees_memory(method, cfg, batch):
    model = tiny_llama(*cfg)
    ids, mask, lengths = prompts(batch)
    ps = 4
    with kk.compress(model, method, shots=SHOTS[batch], page_size=ps) as session:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert out.shape == (batch, ids.shape[1] + NEW)
    st, cache = session.stats, session.cache
    kv = cache.kv
    kv.check_invariants()
    L, Hkv = 2, cfg[1]
    after = cache.lengths_after_prefill                                  # [L, B, Hkv]
    # bytes after prefill are exactly the pages the kept tokens need
    assert st["kv_bytes_after_prefill"] == int((-(-after // ps)).sum()) * kv.page_bytes
    # ... which matches the keep ratio within a page per row
    rows = L * batch * Hkv
    prompt_bytes = L * Hkv * sum(lengths) * 2 * kv.head_dim * kv.k_pages.element_size()
    want = expected_prefill_lengths(method, L, lengths)
    if want is not None:
        assert (after == np.asarray(want)[:, :, None]).all()
        assert abs(st["kv_bytes_after_prefill"] - method.keep_ratio * prompt_bytes) <= \
            rows * kv.page_bytes + L * batch * Hkv * 2 * kv.head_dim * kv.k_pages.element_size()
    else:  # whole segments: never above the budget (protected tokens aside), never empty
        assert (after > 0).all()
    assert st["kv_bytes_after_prefill"] < st["kv_bytes_full"]
    # freed pages went back to the pool: in use + free = the pool
    assert kv.pages_in_use() + kv.num_free_pages() == kv.num_pages
    assert st["kv_bytes_final"] == kv.bytes_in_use() and st["kv_bytes_reserved"] == kv.bytes_reserved()
    for key in ("kv_bytes_full", "kv_bytes_after_prefill", "kv_bytes_final", "kv_bytes_reserved", "prefill_s",
                "compress_s", "decode_s", "backend"):
        assert key in st
    assert st["backend"] == "reference"


def test_whole_segment_methods_respect_their_budgets():
    model = tiny_llama(4, 2, 16)
    ids, mask, lengths = prompts(2)
    m = kk.ChunkKV(0.4, chunk_size=4, window_size=4)
    with kk.compress(model, m, page_size=4) as s:
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    after = s.cache.lengths_after_prefill
    for b, n in enumerate(lengths):
        protected = sum(min(c + 4, n) - c for c in range(0, n, 4) if c + 4 > n - 4)   # chunks meeting the window
        budget = max(budget_tokens(0.4, n), protected)
        assert (after[:, b] <= budget).all()
        assert (after[:, b] >= budget - 4 + 1).all()       # "skip" fills the budget to within a chunk


# ------------------------------------------------------------------------------------------------
# ShotKV end to end
# ------------------------------------------------------------------------------------------------

class RecordingShotKV(kk.ShotKV):
    """ShotKV that records, after every decoding step and layer, how many generated tokens each row holds."""

    def begin(self, info):
        super().begin(info)
        self.steps = []

    def decode(self, inputs):
        ev = super().decode(inputs)
        held = ev.new_lengths if ev is not None else inputs.lengths_host
        self.steps.append((inputs.layer, inputs.generated, held - self._prefill_kept[inputs.layer][:, None]))
        return ev


@pytest.mark.parametrize("batch", [1, 2])
def test_shotkv_keeps_whole_shots_and_the_decoding_budget_every_step(batch):
    model = tiny_llama(4, 2, 16)
    ids, mask, lengths = prompts(batch)
    m = RecordingShotKV(0.5, decode_keep_ratio=0.5, decode_recent=1)
    new = 9
    with kk.compress(model, m, shots=SHOTS[batch], page_size=4) as s:
        model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    # decoding: after every step, every layer and row holds exactly ceil(0.5 * g) generated tokens
    assert len(m.steps) == 2 * (new - 1)
    for layer, g, held in m.steps:
        assert (held == math.ceil(0.5 * g)).all(), (layer, g, held)
    kv = s.cache.kv
    for layer in range(2):
        _, _, lens, pos = kv.gather(layer)
        for b, n in enumerate(lengths):
            for h in range(2):
                p = set(pos[b, h, :lens[b, h]].tolist())
                prompt = {x for x in p if x < n}
                gen = {x for x in p if x >= n}
                assert len(gen) == math.ceil(0.5 * (new - 1))
                assert n + new - 2 in gen                                 # the most recent is kept
                spans = SHOTS[batch][b]
                for a, e in spans:                                        # shots whole or gone
                    assert prompt & set(range(a, e)) in (set(), set(range(a, e)))
                covered = {x for a, e in spans for x in range(a, e)}
                assert set(range(n)) - covered <= prompt                  # non-shot tokens all kept
                assert len(prompt) <= max(budget_tokens(0.5, n), n - len(covered))


def test_shotkv_shots_per_call_override_the_session():
    model = tiny_llama(4, 2, 16)
    ids, mask, lengths = prompts(1)
    with kk.compress(model, kk.ShotKV(0.3), shots=[(0, 1000)]) as s:   # out of range: would fail
        model.generate(ids, attention_mask=mask, max_new_tokens=2, shots=[(1, 20)])
        assert s.stats["kv_tokens_after_prefill"] < s.stats["kv_tokens_full"]


# ------------------------------------------------------------------------------------------------
# the Triton backend through the integration (interpreter on CPU)
# ------------------------------------------------------------------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
@pytest.mark.parametrize("method", [None, kk.H2O(0.5)], ids=["baseline", "H2O"])
def test_triton_backend_matches_reference_backend(device, method):
    model = tiny_llama(4, 2, 16).to(device)
    ids, mask, _ = prompts(2)
    ids, mask = ids.to(device), mask.to(device)
    ref, st_ref = kk.generate(model, ids, method, attention_mask=mask, max_new_tokens=3, backend="reference")
    got, st = kk.generate(model, ids, method, attention_mask=mask, max_new_tokens=3, backend="triton")
    assert torch.equal(got, ref)
    assert st["backend"] == "triton"
    assert st["kv_tokens_final"] == st_ref["kv_tokens_final"]


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------

def test_unsupported_models():
    with pytest.raises(TypeError, match="model"):
        with kk.compress(torch.nn.Linear(3, 3), None):
            pass
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="model"):
        with kk.compress(gpt2, kk.SnapKV(0.5)):
            pass
    mistral = MistralForCausalLM(MistralConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               hidden_size=16, intermediate_size=32, vocab_size=50,
                                               sliding_window=8))
    with pytest.raises(ValueError, match="sliding"):
        kk.generate(mistral, torch.ones(1, 4, dtype=torch.long), None)


@pytest.mark.parametrize("shots,match", [([(0, 100)], "out of range"), ([(0, 10), (5, 12)], "overlap"),
                                         ([[(0, 3)], [(0, 3)]], "one span list per sequence"),
                                         (None, "shots must be given")])
def test_bad_shots(shots, match):
    model = tiny_llama(4, 2, 16)
    ids, mask, _ = prompts(1)
    with pytest.raises(ValueError, match=match):
        kk.generate(model, ids, kk.ShotKV(0.5), attention_mask=mask, max_new_tokens=2, shots=shots)
    # the context was left clean
    assert model.config._attn_implementation != ATTN_IMPLEMENTATION and "generate" not in model.__dict__


def test_bad_method_and_arguments():
    model = tiny_llama(4, 2, 16)
    ids, mask, _ = prompts(1)
    with pytest.raises(TypeError, match="instance"):
        kk.generate(model, ids, kk.SnapKV, attention_mask=mask)
    with pytest.raises(TypeError, match="method"):
        kk.generate(model, ids, "snapkv", attention_mask=mask)
    with pytest.raises(ValueError, match="keep_ratio"):
        kk.generate(model, ids, kk.SnapKV(1.5), attention_mask=mask)
    with pytest.raises(ValueError, match="page_size"):
        kk.generate(model, ids, None, attention_mask=mask, page_size=0)
    with pytest.raises(ValueError, match="backend"):
        kk.generate(model, ids, None, attention_mask=mask, backend="cudnn")
    with pytest.raises(ValueError, match="num_beams"):
        kk.generate(model, ids, None, attention_mask=mask, num_beams=2)
    with kk.compress(model, None):
        with pytest.raises(RuntimeError, match="already active"):
            with kk.compress(model, None):
                pass


def test_cache_used_across_models():
    a, b = tiny_llama(4, 2, 16, seed=0), tiny_llama(4, 2, 16, seed=1)     # same shapes, different models
    ids, mask, _ = prompts(1)
    cache_a = PagedCache(a, None)
    with kk.compress(b, None):
        with pytest.raises(ValueError, match="another model"):
            b.generate(ids, attention_mask=mask, past_key_values=cache_a, max_new_tokens=2)
        with pytest.raises(ValueError, match="another model"):
            b(ids, attention_mask=mask, past_key_values=PagedCache(a, None), use_cache=True)
    other = tiny_llama(3, 1, 8)
    with pytest.raises(ValueError, match="across models"):
        with kk.compress(other, None):
            other(ids, past_key_values=PagedCache(a, None), use_cache=True)


def test_paged_cache_without_the_paged_attention_is_an_error():
    model = tiny_llama(4, 2, 16)
    ids, mask, _ = prompts(1)
    with pytest.raises(RuntimeError, match=ATTN_IMPLEMENTATION):
        model.generate(ids, attention_mask=mask, past_key_values=PagedCache(model, None), max_new_tokens=2)


def test_forward_without_cache_inside_the_context_is_plain_sdpa():
    model = tiny_llama(4, 2, 16)
    ids, mask, _ = prompts(2)
    want = model(ids, attention_mask=mask, use_cache=False).logits
    with kk.compress(model, kk.SnapKV(0.5)):
        got = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# the transformers-version shims (integrations/_compat.py), each on both of its sides
# ------------------------------------------------------------------------------------------------

def test_compat_mask_sizes_take_cache_position_or_query_length():
    """transformers 5.0-5.3 pass a cache_position tensor to get_mask_sizes, 5.4+ an int: same answer."""
    from kvpress_kernels.integrations._compat import mask_query_length
    model = tiny_llama(4, 2, 16)
    cache = PagedCache(model, None)
    assert mask_query_length(torch.arange(3, 8)) == 5 and mask_query_length(5) == 5
    assert cache.get_mask_sizes(torch.arange(0, 7), 0) == cache.get_mask_sizes(7, 0) == (7, 0)
    assert cache.layers[1].get_mask_sizes(torch.arange(0, 7)) == cache.layers[1].get_mask_sizes(7) == (7, 0)
    ids, mask, _ = prompts(1)
    with kk.compress(model, None) as s:
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    n = ids.shape[1] + 1                                          # prompt + the one decoded token fed back
    assert s.cache.get_mask_sizes(torch.arange(n, n + 1), 0) == s.cache.get_mask_sizes(1, 0) == (n + 1, 0)


def test_compat_max_length_under_both_names():
    """get_max_cache_shape (5.0-5.19) and get_max_length (5.13+): both say "no maximum", on the cache and
    on every layer (a layer class missing the abstract one of the installed version cannot be built)."""
    cache = PagedCache(tiny_llama(4, 2, 16), None)
    assert cache.get_max_length() == cache.get_max_cache_shape() == -1
    for layer in cache.layers:
        assert layer.get_max_length() == layer.get_max_cache_shape() == -1


def test_compat_cache_keyword_follows_the_model_signature():
    """The cache goes to generate under the name the model's forward takes: `cache` (5.24+) or
    `past_key_values` (5.0-5.23); a user may pass either to the session's generate."""
    import inspect
    from kvpress_kernels.integrations._compat import cache_kwarg
    model = tiny_llama(4, 2, 16)
    params = inspect.signature(type(model).forward).parameters
    assert cache_kwarg(model) == ("past_key_values" if "past_key_values" in params else "cache")
    assert cache_kwarg(model) in params

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            pass

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            pass

    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"
    ids, mask, _ = prompts(1)
    want = stock(model, ids, mask)
    for name in ("past_key_values", "cache"):
        with kk.compress(model, None) as s:
            mine = s.new_cache()
            got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **{name: mine})
        assert s.cache is mine and torch.equal(got, want)


def test_compat_saveable_gguf_model_detaches_only_a_dense_gguf_quantizer():
    """transformers 5.20+ keep a GGUF quantizer on a GGUF-loaded model, which blocks save_pretrained
    even when every weight is dense; the shim detaches it (and its config) for the save only."""
    from types import SimpleNamespace
    from kvpress_kernels.integrations._compat import saveable_gguf_model
    model = tiny_llama(4, 2, 16)
    with saveable_gguf_model(model):                               # 5.0-5.19: no quantizer, nothing to do
        assert getattr(model, "hf_quantizer", None) is None
    qc = SimpleNamespace(quant_method=SimpleNamespace(value="gguf"))
    dense = SimpleNamespace(quantization_config=qc, packed_modules={})
    model.hf_quantizer, model.config.quantization_config = dense, qc
    with saveable_gguf_model(model):
        assert model.hf_quantizer is None and "quantization_config" not in model.config.__dict__
    assert model.hf_quantizer is dense and model.config.quantization_config is qc
    packed = SimpleNamespace(quantization_config=qc, packed_modules={"lm_head": object()})
    model.hf_quantizer = packed
    with saveable_gguf_model(model):                               # packed blocks: left alone
        assert model.hf_quantizer is packed and model.config.quantization_config is qc
    model.hf_quantizer = None
    del model.config.quantization_config


@pytest.mark.parametrize("adds_bos", [False, True], ids=["like-5.6+", "like-5.0-5.5"])
def test_compat_gguf_tokenizer_bos_first(adds_bos):
    """GGUF tokenizers prepend BOS up to transformers 5.5 and not from 5.6: after the shim, exactly one
    BOS first either way (offsets of the text tokens unchanged)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from kvpress_kernels.integrations._compat import gguf_tokenizer_bos_first
    vocab = {"<unk>": 0, "<s>": 1, "Q": 2, ":": 3, "hi": 4}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    single = "<s> $A" if adds_bos else "$A"
    raw.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>")
    assert tok("Q: hi").input_ids == ([1, 2, 3, 4] if adds_bos else [2, 3, 4])
    gguf_tokenizer_bos_first(tok)
    enc = tok("Q: hi", return_offsets_mapping=True)
    assert enc.input_ids == [1, 2, 3, 4]
    assert enc.offset_mapping[1:] == [(0, 1), (1, 2), (3, 5)]
    assert tok("Q: hi", add_special_tokens=False).input_ids == [2, 3, 4]
