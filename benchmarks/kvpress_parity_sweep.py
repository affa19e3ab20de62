"""Parity sweep against kvpress 0.5.5 on configurations the tests do not use (issue 12).

216 configurations: GQA 9:3 / head_dim 64 (SmolLM2's shape) and GQA 8:2 / head_dim 80; 97, 333 and 1001
tokens; compression ratios 0.13, 0.5, 0.77; batch 1 and 2; six methods at kvpress's default options
(SnapKV / PyramidKV window 64 kernel 5, StreamingLLM 4 sinks, KNorm, ObservedAttention, ChunkKV over SnapKV
with 20-token chunks). For each, the kept positions per layer and kv head of

- kvpress's own press (``kvpress.*Press``, eager attention for ObservedAttention),
- our press (``kvpress_kernels.integrations.kvpress``), and
- our method with its ``kvpress()`` options run by ``kvpress_kernels.generate`` (the product path),

are compared; a configuration matches when every layer and head keeps exactly the same set. Configurations
where kvpress cuts inside a tie of equal window scores (:func:`window_tie`: its choice is then
``torch.topk``'s unspecified order) are counted apart. Also reported:
our DEFAULT options (``ceil`` budget, protected window, H2O's unnormalised sum, ChunkKV per sequence in
tokens) against kvpress, with the smallest Jaccard similarity of the kept sets.

Random-weight 2-layer Llama models (fp32, ``initializer_range = 0.2 * sqrt(64 / hidden)``, the parity
tests' logit spread, other seeds); token ids without repeats. CPU, a few minutes::

    PYTHONPATH=. python benchmarks/kvpress_parity_sweep.py [--out results/kvpress_parity_sweep.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpress
import kvpress_kernels
from kvpress_kernels.integrations import kvpress as kk
from kvpress_kernels.methods import H2O, ChunkKV, KNorm, PyramidKV, SnapKV, StreamingLLM

SHAPES = {"gqa9:3-d64": (9, 3, 576), "gqa8:2-d80": (8, 2, 640)}
LENGTHS = (97, 333, 1001)
RATIOS = (0.13, 0.5, 0.77)
BATCHES = (1, 2)
VOCAB = 1200

# name: (kvpress press(r), our press(r), our method with kvpress options(r), our default method(r), eager)
METHODS = {
    "snapkv": (lambda r: kvpress.SnapKVPress(r), lambda r: kk.SnapKVPress(r), lambda r: SnapKV.kvpress(r),
               lambda r: SnapKV(1 - r), False),
    "pyramidkv": (lambda r: kvpress.PyramidKVPress(r), lambda r: kk.PyramidKVPress(r), lambda r: PyramidKV.kvpress(r),
                  lambda r: PyramidKV(1 - r), False),
    "streamingllm": (lambda r: kvpress.StreamingLLMPress(r), lambda r: kk.StreamingLLMPress(r),
                     lambda r: StreamingLLM.kvpress(r), lambda r: StreamingLLM(1 - r), False),
    "knorm": (lambda r: kvpress.KnormPress(r), lambda r: kk.KnormPress(r), lambda r: KNorm.kvpress(r),
              lambda r: KNorm(1 - r), False),
    "observed_attention": (lambda r: kvpress.ObservedAttentionPress(r), lambda r: kk.ObservedAttentionPress(r),
                           lambda r: H2O.kvpress(r), lambda r: H2O(1 - r, compress_decode=False), True),
    "chunkkv": (lambda r: kvpress.ChunkKVPress(kvpress.SnapKVPress(r), chunk_length=20),
                lambda r: kk.ChunkKVPress(kk.SnapKVPress(r), chunk_length=20),
                lambda r: ChunkKV.kvpress(r, chunk_size=20), lambda r: ChunkKV(1 - r, chunk_size=20), False),
}


def make_models(heads, kv, hidden, seed, layers=2):
    """A random Llama (SDPA) and its eager twin with the same weights (kvpress's ObservedAttention needs eager
    attention); ``tests/test_kvpress_parity.py`` builds its large-shape models here too."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2 * (64 / hidden) ** 0.5)
    m = LlamaForCausalLM(cfg).eval()
    cfg_e = copy.deepcopy(cfg)
    cfg_e._attn_implementation = "eager"
    me = LlamaForCausalLM(cfg_e).eval()
    me.load_state_dict(m.state_dict())
    return m, me


def press_positions(model, press, ids):
    """{layer: [B, H, K] sorted kept positions} of a press, from the cache contents."""
    store = {}

    def hook(module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        store.setdefault(module.layer_idx, layer.keys.clone())

    hs = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    cache = DynamicCache()
    try:
        with torch.no_grad(), press(model):
            model(ids, past_key_values=cache)
    finally:
        for h in hs:
            h.remove()
    out = {}
    for layer, full in store.items():
        keys = cache.layers[layer].keys
        eq = (keys.unsqueeze(3) == full.unsqueeze(2)).all(-1)
        assert bool((eq.sum(-1) == 1).all()), "a cached row matches no (or several) original rows"
        out[layer] = eq.to(torch.int8).argmax(-1).sort(-1).values
    return out


def record_evictions(method):
    """Wrap ``method.prefill`` so that every layer's Eviction is kept: ``{layer: Eviction}`` (filled as the
    layers are prefilled; ``tests/test_kvpress_parity.py`` uses it too)."""
    store = {}
    orig = method.prefill

    def prefill(inputs):
        ev = orig(inputs)
        store[inputs.layer] = ev
        return ev

    method.prefill = prefill
    return store


def method_positions(model, method, ids):
    store = record_evictions(method)
    with torch.no_grad():
        kvpress_kernels.generate(model, ids, method, max_new_tokens=1, do_sample=False)
    return {layer: (None if ev is None else ev.kept_idx.long()) for layer, ev in store.items()}


def compare(theirs, ours):
    """(exact match, smallest Jaccard over layers / sequences / heads)."""
    exact, jac = True, 1.0
    for layer, t in theirs.items():
        o = ours[layer]
        for b in range(t.shape[0]):
            for h in range(t.shape[1]):
                ts = set(t[b, h].tolist())
                os_ = set(range(ids_len)) if o is None else set(x for x in o[b, h].tolist() if x >= 0)
                exact &= ts == os_
                jac = min(jac, len(ts & os_) / len(ts | os_))
    return exact, jac


def window_tie(method: str, n: int, ratio: float) -> bool:
    """Whether kvpress's selection cuts inside a tie of equal ``max + 1`` window scores, where its choice is
    ``torch.topk``'s unspecified order among equal values (docs/KVPRESS.md, "Ties"): a SnapKV/PyramidKV budget
    below the 64-token window, or fewer ChunkKV chunks kept than chunks lying wholly inside the window."""
    W = 64
    if method == "snapkv":
        return SnapKV.kvpress(ratio).budget(n) < W
    if method == "pyramidkv":
        m = PyramidKV.kvpress(ratio)
        return any(m.layer_budget(layer, 2, n) < W for layer in range(2))
    if method == "chunkkv":
        n_chunks = -(-n // 20)
        inside = sum(1 for c in range(n_chunks) if c * 20 >= n - W)
        return max(1, int(n_chunks * (1 - ratio))) < inside
    return False


def summarize(rows):
    free = [r for r in rows if not window_tie(r["method"], r["n"], r["ratio"])]
    return {"configurations": len(rows), "tie_free": len(free),
            "press_exact": sum(bool(r["press_exact"]) for r in rows),
            "method_exact": sum(bool(r["method_exact"]) for r in rows),
            "press_exact_tie_free": sum(bool(r["press_exact"]) for r in free),
            "method_exact_tie_free": sum(bool(r["method_exact"]) for r in free),
            "default_exact": sum(bool(r["default_exact"]) for r in rows),
            "default_min_jaccard_by_method": {m: min((r["default_jaccard"] for r in rows if r["method"] == m),
                                                     default=float("nan")) for m in METHODS}}


def rows_from_log(path):
    """Rows of an interrupted run, from its printed lines."""
    rows = []
    for line in open(path):
        p = line.split()
        if len(p) < 12 or not p[1].startswith("n="):
            continue
        rows.append({"shape": p[0], "n": int(p[1][2:]), "ratio": float(p[2][2:]), "batch": int(p[3][2:]),
                     "method": p[4], "press_exact": p[6] == "True", "method_exact": p[8] == "True",
                     "default_exact": p[10] == "True", "default_jaccard": float(p[12].rstrip(")"))})
    return rows


def main():
    global ids_len
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/kvpress_parity_sweep.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--no-defaults", action="store_true", help="skip the comparison of our default options")
    ap.add_argument("--summarize-log", default=None, help="only summarize the printed lines of an earlier run")
    args = ap.parse_args()
    if args.summarize_log:
        print(json.dumps(summarize(rows_from_log(args.summarize_log)), indent=1))
        return
    torch.set_grad_enabled(False)
    rows = []
    t0 = time.perf_counter()
    for si, (shape, (heads, kv, hidden)) in enumerate(SHAPES.items()):
        if shape not in args.shapes:
            continue
        m_sdpa, m_eager = make_models(heads, kv, hidden, 900 + si)
        for n, ratio, batch in itertools.product(args.lengths, RATIOS, args.batches):
            g = torch.Generator().manual_seed(n * 10 + batch)
            ids = torch.stack([torch.randperm(VOCAB - 3, generator=g)[:n] + 3 for _ in range(batch)])
            ids_len = n
            for name, (theirs_f, press_f, method_f, default_f, eager) in METHODS.items():
                theirs = press_positions(m_eager if eager else m_sdpa, theirs_f(ratio), ids)
                ours_press = press_positions(m_sdpa, press_f(ratio), ids)
                ours_method = method_positions(m_sdpa, method_f(ratio), ids)
                row = {"shape": shape, "n": n, "ratio": ratio, "batch": batch, "method": name}
                row["press_exact"], row["press_jaccard"] = compare(theirs, ours_press)
                row["method_exact"], row["method_jaccard"] = compare(theirs, ours_method)
                if args.no_defaults:
                    row["default_exact"], row["default_jaccard"] = None, float("nan")
                else:
                    ours_default = method_positions(m_sdpa, default_f(ratio), ids)
                    row["default_exact"], row["default_jaccard"] = compare(theirs, ours_default)
                rows.append(row)
                print(f"{shape} n={n} r={ratio} b={batch} {name:18s} press {row['press_exact']!s:5} "
                      f"method {row['method_exact']!s:5} default {row['default_exact']!s:5} "
                      f"(J {row['default_jaccard']:.2f})", flush=True)
    summary = {**summarize(rows), "wall_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
               "args": vars(args)}
    print(json.dumps(summary, indent=1))
    import os
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)


ids_len = 0

if __name__ == "__main__":
    main()
