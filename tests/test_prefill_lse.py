"""The transformers path on CPU takes each prompt query's LSE from SDPA's own flash kernel and hands it to
H2O (PrefillInputs.lse), which then scores with one pass over the logits: the attention output stays
bit for bit stock SDPA's, the LSE is the reference's, and H2O keeps what it keeps without it."""

import pytest
import torch

import kvpress_kernels as kk
import kvpress_kernels.integrations.transformers as tf
from kvpress_kernels.ops.scoring import attention_lse_ref, attention_mass_ref
from test_transformers_integration import tiny_llama

CONFIGS = [(4, 2, 16), (3, 1, 8), (8, 1, 16), (4, 4, 8)]


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (1, n), generator=g)


class Spy:
    """Wraps ``_sdpa_with_lse``: records what it returned per call (and can switch it off)."""

    def __init__(self, monkeypatch, off=False):
        self.calls, self.off, self._real = [], off, tf._sdpa_with_lse
        monkeypatch.setattr(tf, "_sdpa_with_lse", self)

    def __call__(self, module, query, key, value, *args):
        out, lse = (None, None) if self.off else self._real(module, query, key, value, *args)
        self.calls.append((query.detach().clone(), key.detach().clone(), lse))
        return out, lse


@pytest.mark.parametrize("cfg", CONFIGS)
def test_sdpa_with_lse_is_stock_sdpa_bit_for_bit(cfg):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    model = tiny_llama(*cfg)
    attn = model.model.layers[0].self_attn
    Hq, Hkv, D = cfg
    g = torch.Generator().manual_seed(1)
    # transformers' layout: [B, H, N, D] views of [B, N, H, D] projections (non-contiguous)
    q = torch.randn(1, 41, Hq, D, generator=g).transpose(1, 2)
    k = torch.randn(1, 41, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(1, 41, Hkv, D, generator=g).transpose(1, 2)
    want, _ = sdpa_attention_forward(attn, q, k, v, None, dropout=0.0, scaling=D ** -0.5, is_causal=None)
    out, lse = tf._sdpa_with_lse(attn, q, k, v, None, 0.0, D ** -0.5, None)
    assert lse is not None, "torch's SDPA on CPU should pick its flash kernel here"
    assert torch.equal(out, want)
    ref = attention_lse_ref(q, k, scale=D ** -0.5, causal=True)
    torch.testing.assert_close(lse, ref, atol=2e-6, rtol=1e-6)
    # with a mask, dropout or a single query the plain path runs
    assert tf._sdpa_with_lse(attn, q, k, v, torch.ones(1, 1, 41, 41, dtype=torch.bool), 0.0, None, None) == (None, None)
    assert tf._sdpa_with_lse(attn, q, k, v, None, 0.1, None, None) == (None, None)
    assert tf._sdpa_with_lse(attn, q[:, :, :1], k[:, :, :1], v[:, :, :1], None, 0.0, None, None) == (None, None)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_h2o_prefill_with_the_sdpa_lse(cfg, monkeypatch):
    model = tiny_llama(*cfg, layers=3)
    ids = _ids(53)
    with torch.no_grad():
        want_logits = model(ids).logits
    kept = {}
    for off in (False, True):
        spy = Spy(monkeypatch, off=off)
        with kk.compress(model, kk.H2O(0.4, compress_decode=False), page_size=4) as s:
            cache = s.new_cache()
            with torch.no_grad():
                logits = model(ids, past_key_values=cache, use_cache=True).logits
        assert torch.equal(logits, want_logits)                   # the prefill attention is stock SDPA's
        assert len(spy.calls) == 3 and all((lse is None) == off for _, _, lse in spy.calls)
        kept[off] = [_kept_positions(cache, l) for l in range(3)]
        if not off:
            # the LSE handed over is the reference's, and so is the mass computed from it
            for (q, k, lse) in spy.calls:
                scale = cfg[2] ** -0.5
                torch.testing.assert_close(lse, attention_lse_ref(q, k, scale=scale), atol=2e-6, rtol=1e-6)
                torch.testing.assert_close(attention_mass_ref(q, k, scale=scale, lse=lse),
                                           attention_mass_ref(q, k, scale=scale), atol=2e-6, rtol=1e-5)
    assert kept[False] == kept[True]


def _kept_positions(cache, layer):
    kv = cache.kv
    table, lengths = kv.layer_view(layer)
    out = []
    for h in range(table.shape[1]):
        n = int(lengths[0, h])
        pages = table[0, h].long()
        slots = torch.arange(n)
        pos = kv.pos_pages[pages[slots // kv.page_size], slots % kv.page_size]
        out.append(sorted(pos.tolist()))
    return out


def test_padded_batch_scores_without_the_sdpa_lse(monkeypatch):
    """With padding transformers passes a mask: SDPA runs as usual and H2O computes its own LSE."""
    model = tiny_llama(4, 2, 16)
    ids = torch.cat([_ids(37), _ids(37, seed=1)])
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    spy = Spy(monkeypatch)
    got, stats = kk.generate(model, ids, kk.H2O(0.5), attention_mask=mask, max_new_tokens=3)
    assert spy.calls and all(lse is None for _, _, lse in spy.calls)
    assert stats["kv_tokens_after_prefill"] < stats["kv_tokens_full"]


def _dense_mass64(q, k, lengths, scale, causal):
    """fp64 softmax mass per query head ``[B, Hq, N]``: the last W tokens of each row are the queries."""
    B, Hq, W, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    kq = k.double().repeat_interleave(Hq // Hkv, 1)
    logits = torch.einsum("bhwd,bhnd->bhwn", q.double(), kq) * scale
    j = torch.arange(N).view(1, 1, 1, N)
    L = lengths.view(B, 1, 1, 1)
    vis = j < L
    if causal:
        vis = vis & (j <= L - W + torch.arange(W).view(1, 1, W, 1))
    p = torch.softmax(logits.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    return p.sum(2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("W, lengths", [(1, [97, 97]), (7, [97, 97]), (97, [97, 97]), (1, [97, 61]),
                                        (7, [97, 61]), (61, [97, 61])])
def test_mass_given_lse_tiles_the_keys(monkeypatch, causal, W, lengths):
    """With a given LSE the reference scores tiles of keys (here 32-key tiles, chunks of 3 queries):
    the same mass as one pass over whole rows and as an fp64 softmax."""
    import kvpress_kernels.ops.scoring as S
    g = torch.Generator().manual_seed(W + len(set(lengths)))
    B, Hq, Hkv, N, D = 2, 6, 2, 97, 16
    q = torch.randn(B, Hq, W, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g) * 1.5
    lens = torch.tensor(lengths)
    lse = S.attention_lse_ref(q, k, lengths=lens, causal=causal)
    whole = S.attention_mass_ref(q, k, lengths=lens, lse=lse, causal=causal, head_reduce="none")
    monkeypatch.setattr(S, "_REF_TILE_ELEMS", 1)
    monkeypatch.setattr(S, "_REF_CHUNK_ELEMS", B * Hq * N * 3)
    tiled = S.attention_mass_ref(q, k, lengths=lens, lse=lse, causal=causal, head_reduce="none")
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=1e-5)
    want = _dense_mass64(q, k, lens, D ** -0.5, causal).float()
    torch.testing.assert_close(tiled, want, atol=2e-5, rtol=1e-4)
    assert (tiled[1, :, lengths[1]:] == 0).all()
