"""Builders shared by several test modules: tiny random Llama models, prompts, the synthetic prefill
inputs of the method tests, and the pieces of the segment-greedy oracles (ShotKV, ChunkKV).

Plain functions (not pytest fixtures) so that a test can build several variants; imported as
``from _fixtures import ...`` (the tests folder is on ``sys.path``, as for ``conftest``).
"""

import torch

from kvpress_kernels.methods import GenerationInfo, PrefillInputs


# ------------------------------------------------------------------------------------------------
# models and prompts
# ------------------------------------------------------------------------------------------------

def tiny_llama(Hq=4, Hkv=2, D=16, layers=2, seed=0, *, vocab=97, max_positions=256, initializer_range=0.2):
    """A random ``LlamaForCausalLM`` in eval mode, seeded (``torch.manual_seed(seed)`` before it is built),
    hidden size ``Hq * D``, no EOS (generation runs its full length). ``initializer_range=0.2`` (10x the
    default) gives well-separated attention scores and peaked logits: greedy choices are not near-ties
    that fp32 rounding in another summation order could flip."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=Hq * D, intermediate_size=2 * Hq * D, num_hidden_layers=layers,
                      num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D, max_position_embeddings=max_positions,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None, initializer_range=initializer_range)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def left_padded_prompts(batch=2, seed=0, vocab=97):
    """Token ids and attention mask, left padded: lengths 37 (and 29); ids drawn from ``[3, vocab)``."""
    g = torch.Generator().manual_seed(seed)
    lengths = [37, 29][:batch]
    N = max(lengths)
    ids = torch.zeros(batch, N, dtype=torch.long)
    mask = torch.zeros(batch, N, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, N - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, N - n:] = 1
    return ids, mask, lengths


# ------------------------------------------------------------------------------------------------
# synthetic prefill inputs of the method tests
# ------------------------------------------------------------------------------------------------

def make_inputs(lengths, Hq=4, Hkv=2, D=8, *, layer=0, num_layers=2, shots=None, seed=0, random_values=True):
    """:class:`PrefillInputs` of a ragged batch: random queries and keys (values random too, or zeros with
    ``random_values=False``), zero beyond each sequence's length."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(lengths), max(lengths)
    q = torch.randn(B, Hq, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g) if random_values else torch.zeros_like(k)
    for b, n in enumerate(lengths):
        q[b, :, n:] = 0
        k[b, :, n:] = 0
        v[b, :, n:] = 0
    info = GenerationInfo(num_layers=num_layers, batch_size=B, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                          prompt_lengths=tuple(lengths), shots=shots)
    return PrefillInputs(layer=layer, queries=q, keys=k, values=v, lengths=torch.tensor(lengths),
                         scale=D ** -0.5, info=info)


def kept_lists(ev, B, Hkv):
    """``[b][h]``: the kept positions of an :class:`~kvpress_kernels.methods.base.Eviction`, after checking its
    contract per row: int32 ``kept_idx``, strictly ascending positions, then ``-1`` padding, and
    ``new_lengths`` (when given) equal to the count."""
    kept = ev.kept_idx
    assert kept.dtype == torch.int32
    out = []
    for b in range(B):
        rows = []
        for h in range(Hkv):
            row = kept[b, h]
            valid = row[row >= 0].tolist()
            assert valid == sorted(valid) and len(set(valid)) == len(valid), "kept_idx must ascend"
            assert (row[len(valid):] == -1).all(), "kept_idx padding must be -1 after the kept slots"
            if ev.new_lengths is not None:
                assert ev.new_lengths[b, h] == len(valid)
            rows.append(valid)
        out.append(rows)
    return out


# ------------------------------------------------------------------------------------------------
# segment-greedy oracle pieces (Python, independent of the implementation)
# ------------------------------------------------------------------------------------------------

def shot_segments(spans, n):
    """The prompt ``[0, n)`` cut at the shot ``spans``: ``(start, end, is_shot)`` in order, the gaps between
    shots (and before / after them) as non-shot segments."""
    segs, cur = [], 0
    for a, e in spans:
        if a > cur:
            segs.append((cur, a, False))
        segs.append((a, e, True))
        cur = e
    if cur < n:
        segs.append((cur, n, False))
    return segs


def greedy_fill(order, sizes, rem, policy):
    """Segments taken whole in ``order`` while they fit in ``rem`` tokens: ``skip`` passes over one that
    does not fit, ``stop`` ends there. Returns the taken indices."""
    taken = set()
    for i in order:
        if sizes[i] <= rem:
            taken.add(i)
            rem -= sizes[i]
        elif policy == "stop":
            break
    return taken


def shotkv_greedy(values, spans, n, ratio, window, policy="stop"):
    """ShotKV's prefill rule on one sequence, given a value per :func:`shot_segments` segment: non-shot
    segments and shots reaching into the observation window (the last ``window`` tokens) are protected
    and count against the budget first; the other shots are taken whole, best value first (ties to the
    earlier shot), by :func:`greedy_fill`. Returns the kept token positions."""
    from kvpress_kernels.methods import budget_tokens

    segs = shot_segments(spans, n)
    w0 = n - window
    prot = [not shot or e > w0 for a, e, shot in segs]
    need = sum(e - a for (a, e, _), p in zip(segs, prot) if p)
    rem = max(budget_tokens(ratio, n), need) - need
    keep = {i for i, p in enumerate(prot) if p}
    order = sorted((i for i in range(len(segs)) if not prot[i]), key=lambda i: (-values[i], i))
    keep |= greedy_fill(order, [e - a for a, e, _ in segs], rem, policy)
    return {j for i in keep for j in range(segs[i][0], segs[i][1])}


# ------------------------------------------------------------------------------------------------
# bad inputs of the paged-layout ops
# ------------------------------------------------------------------------------------------------

def assert_rejects_bad_paged_layout(call, case, int_dtype=torch.int32):
    """The checks every op on the paged layout shares (``_validate.paged_layout`` and the backend name), each a
    named error: ``call(case, name=value)`` runs the op on ``case`` with that one argument replaced."""
    import pytest

    k = case["k_pages"]
    for exc, name, bad in [(ValueError, "k_pages", k[0]),                                  # rank
                           (TypeError, "k_pages", k.to(int_dtype)),                         # not a float
                           (TypeError, "v_pages", case["v_pages"].float()),                 # dtype of k_pages
                           (TypeError, "page_table", case["page_table"].float()),
                           (ValueError, "lengths", case["lengths"][:1]),                    # leading dims
                           (ValueError, "lengths", case["lengths"].t().contiguous().t()),  # not contiguous
                           (ValueError, "backend", "fast")]:
        with pytest.raises(exc, match=name):
            call(case, **{name: bad})
