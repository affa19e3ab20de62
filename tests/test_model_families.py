"""The transformers drop-in on every model family the README claims, with tiny random configs (no
downloads): uncompressed paged generation equals stock ``generate`` token for token; compressed
generation runs and frees memory; families the paged cache cannot serve are refused with an error
naming why.

What each family adds over Llama: Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm before RoPE), Mistral
(``sliding_window=None``), Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``), Gemma-2 (attention scale
from ``query_pre_attn_scalar`` rather than ``head_dim``, final-logit soft-capping, (1 + w) norms,
scaled embeddings) and Gemma-3 (Gemma-2's scale plus q/k norm and a second RoPE base), the Gemma
ones configured with full attention on every layer and no attention soft-capping. Checked under the
transformers kvpress pins and under the newest release (``.ci/run`` runs this file in both).
"""

import numpy as np
import pytest
import torch
import transformers

from _fixtures import left_padded_prompts

import kvpress_kernels as kk
from kvpress_kernels.integrations.transformers import ATTN_IMPLEMENTATION
from kvpress_kernels.methods import budget_tokens

V, HQ, HKV, D, LAYERS, NEW = 97, 4, 2, 16, 2, 6
COMMON = dict(vocab_size=V, hidden_size=HQ * D, intermediate_size=2 * HQ * D, num_hidden_layers=LAYERS,
              num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=None,
              # peaked logits: greedy choices are not near-ties that fp32 rounding could flip
              initializer_range=0.2)
FULL = ["full_attention"] * LAYERS

# family -> (config class, model class, extra config keywords)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=D)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=D, use_sliding_window=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=D, sliding_window=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=None)),
    # query_pre_attn_scalar != head_dim: the attention scale must come from the module, not from D
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=D, query_pre_attn_scalar=24, attn_logit_softcapping=None, final_logit_softcapping=30.0,
                    layer_types=FULL)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=D, query_pre_attn_scalar=24, layer_types=FULL)),
}


def build(family, seed=0, **overrides):
    cfg_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_name)(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def prompts(batch=2, seed=0):
    """Token ids and attention mask, left padded: lengths 37 and 29."""
    return left_padded_prompts(batch, seed, vocab=V)


def stock(model, ids, mask):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_what_it_claims(family):
    """The tiny configs exercise what makes the family different (so the tests below are not Llama
    tests under another name)."""
    model = build(family)
    attn = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    assert len(attn) == LAYERS
    names = {n.split(".")[-1] for n, _ in attn[0].named_modules()}
    if family == "phi3":
        assert "qkv_proj" in names and "q_proj" not in names
    if family in ("qwen3", "gemma3"):
        assert {"q_norm", "k_norm"} <= names
    if family == "qwen2":
        assert attn[0].q_proj.bias is not None
    if family.startswith("gemma"):
        assert attn[0].scaling == pytest.approx(24 ** -0.5) and attn[0].scaling != D ** -0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_uncompressed_paged_generation_equals_stock_generate(family):
    model = build(family)
    ids, mask, lengths = prompts(2)
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    want = model.generate(ids, **kw)
    with kk.compress(model, None, page_size=4) as session:
        got = model.generate(ids, **kw)
    stats = session.stats
    assert torch.equal(got.sequences, want.sequences), (got.sequences[:, -NEW:], want.sequences[:, -NEW:])
    # tokens alone are coarse (peaked logits survive small attention errors, e.g. a wrong scale): the
    # logits of every step agree too. fp32 attention summed in another order (paged decode vs SDPA):
    # logits of O(1) agree to ~1e-6
    for step, (g, w) in enumerate(zip(got.scores, want.scores)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")
    assert stats["prompt_lengths"] == lengths
    assert stats["kv_bytes_final"] == stats["kv_bytes_full"]
    assert model.config._attn_implementation != ATTN_IMPLEMENTATION          # restored


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_ratio_one_equals_stock_generate(family):
    """The compression path itself (scoring from this family's queries, selection, compaction) with
    nothing to evict changes no token."""
    model = build(family)
    ids, mask, _ = prompts(2)
    want = stock(model, ids, mask)
    got, stats = kk.generate(model, ids, kk.SnapKV(1.0, window_size=4), attention_mask=mask, max_new_tokens=NEW,
                             page_size=4)
    assert torch.equal(got, want)
    assert stats["kv_tokens_final"] == stats["kv_tokens_full"]


@pytest.mark.parametrize("method", [kk.SnapKV(0.4, window_size=4), kk.H2O(0.4)], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_generation_runs_and_frees_memory(family, method):
    model = build(family)
    ids, mask, lengths = prompts(2)
    ps = 4
    with kk.compress(model, method, page_size=ps) as session:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert out.shape == (2, ids.shape[1] + NEW)
    assert ((out[:, -NEW:] >= 0) & (out[:, -NEW:] < V)).all()
    st, kv = session.stats, session.cache.kv
    kv.check_invariants()
    after = session.cache.lengths_after_prefill                          # [layers, batch, kv heads]
    want = np.array([budget_tokens(0.4, n) for n in lengths])
    assert (after == want[None, :, None]).all()
    # the memory is really freed: pages in use are exactly what the kept tokens need, the rest is back
    # in the pool, and it is less than the uncompressed cache holds
    assert st["kv_bytes_after_prefill"] == int((-(-after // ps)).sum()) * kv.page_bytes
    assert st["kv_bytes_after_prefill"] < st["kv_bytes_full"]
    assert st["kv_bytes_final"] < st["kv_bytes_full"]
    assert kv.pages_in_use() + kv.num_free_pages() == kv.num_pages


# family, config overrides, what the error must name
REFUSED = [
    ("gemma2", dict(attn_logit_softcapping=50.0), "soft-capping"),
    ("gemma2", dict(layer_types=None, attn_logit_softcapping=None, sliding_window=8), "sliding"),   # alternating
    ("gemma2", dict(layer_types=None, attn_logit_softcapping=50.0, sliding_window=8), "sliding|soft-capping"),
    ("gemma3", dict(layer_types=None, sliding_window=8), "sliding"),                               # 5 local : 1 global
    ("mistral", dict(sliding_window=8), "sliding"),
    ("phi3", dict(sliding_window=8), "sliding"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "sliding"),
]


@pytest.mark.parametrize("family,overrides,match", REFUSED,
                         ids=[f"{f}-{'-'.join(sorted(o))}" for f, o, _ in REFUSED])
def test_unsupported_variants_are_refused_clearly(family, overrides, match):
    model = build(family, **overrides)
    ids, mask, _ = prompts(1)
    with pytest.raises(ValueError, match=match) as err:
        kk.generate(model, ids, kk.SnapKV(0.5), attention_mask=mask, max_new_tokens=2)
    assert type(model).__name__ in str(err.value)
    with pytest.raises(ValueError, match=match):
        kk.PagedCache(model, None)
    # refused before anything was changed
    assert model.config._attn_implementation != ATTN_IMPLEMENTATION and "generate" not in model.__dict__
    # stock generation still works on the model
    assert stock(model, ids, mask).shape == (1, ids.shape[1] + NEW)


def test_softcap_passed_at_run_time_is_refused():
    """A model that applies soft-capping without saying so in its config is caught at its first attention
    call instead of silently computing attention without the cap."""
    model = build("gemma2")
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 50.0
    ids, mask, _ = prompts(1)
    with pytest.raises(ValueError, match="soft-capping"):
        kk.generate(model, ids, None, attention_mask=mask, max_new_tokens=2)
    assert model.config._attn_implementation != ATTN_IMPLEMENTATION
