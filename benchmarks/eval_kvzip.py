"""Query-agnostic lookup with KVzip-style scoring: ours vs kvpress 0.5.5's KVzipPress vs SnapKV vs the full cache.

Every row runs on the same prepared examples (:func:`kvpress_kernels.evaluation.harness.prepare`) with the
same greedy decode and scoring (:func:`~kvpress_kernels.evaluation.harness._turn`,
:func:`~kvpress_kernels.evaluation.tasks.score`), in the harness's ``query_agnostic`` setting: the
context is prefilled and compressed BEFORE the question is fed.

- ``full``, ``snapkv``, ``kvzip``, ``kvzip_shotkv``: the harness's :func:`run_once` (paged cache, memory
  really freed; ``kv_kept`` = tokens held after compression / context tokens, all layers and kv heads);
- ``kvpress_kvzip``: kvpress's own ``KVzipPress(compression_ratio=1 - keep)`` on a transformers
  ``DynamicCache``: ``with press(model): model(context)`` (the press scores by reconstruction when the
  context manager exits), then the question and the greedy answer through the same cache. kvpress masks
  the evicted keys in attention (``attention_patch``): every key stays stored (memory kept 1.0), the
  unmasked fraction is reported beside it. ``KVzipPress`` loads the tokenizer by
  ``model.config.name_or_path``; SmolLM2 here comes from a GGUF file, so that lookup is pointed at the
  loaded tokenizer (nothing else of kvpress is touched).

Usage (about 10 minutes at n = 40 on a loaded 2-core CPU)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/eval_kvzip.py --n 40 --seed 1 --keep 0.3 \\
        --out docs/results/eval_kvzip_lookup_keep0.3.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from kvpress_kernels.evaluation.harness import _turn, build_method, prepare, run_once
from kvpress_kernels.evaluation.model import load_smollm2, model_name
from kvpress_kernels.evaluation.stats import fmt, mean_se, paired_diff
from kvpress_kernels.evaluation.tasks import answer_line, generate_task, score

OURS = ("full", "snapkv", "kvzip", "kvzip_shotkv")


def run_kvpress_kvzip(model, tok, prep, keep: float):
    """kvpress's KVzipPress on one prepared example; returns (text, seconds, unmasked fraction, compress seconds)."""
    import kvpress.presses.kvzip_press as kz
    from transformers import DynamicCache

    class _Tok:  # KVzipPress calls AutoTokenizer.from_pretrained(model.config.name_or_path)
        @staticmethod
        def from_pretrained(*_a, **_k):
            return tok

    kz.AutoTokenizer = _Tok
    ex = prep.example
    eos = {i for i in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if isinstance(i, int)}
    press = kz.KVzipPress(compression_ratio=1.0 - keep)
    t0 = time.perf_counter()
    cache = DynamicCache()
    with torch.no_grad():
        with press(model):
            model(input_ids=prep.ctx_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        t_c = time.perf_counter() - t0
        n = prep.ctx_ids.shape[1]
        L = model.config.num_hidden_layers
        H = model.config.num_key_value_heads
        masked = sum(len(getattr(layer.self_attn, "masked_key_indices", None)[0])
                     for layer in model.model.layers
                     if getattr(layer.self_attn, "masked_key_indices", None) is not None)
        out = model(input_ids=prep.q_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        new, _, _ = _turn(model, tok, cache, out.logits[0, -1].float(), ex.max_new_tokens, eos, 1)
    for layer in model.model.layers:                    # the next example starts clean
        layer.self_attn.masked_key_indices = None
    return tok.decode(new, skip_special_tokens=True), time.perf_counter() - t0, 1.0 - masked / (n * L * H), t_c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1, help="task seed (1: held out; the tests and tuning use 0)")
    ap.add_argument("--keep", type=float, default=0.3)
    ap.add_argument("--task", default="lookup")
    ap.add_argument("--methods", default=",".join(OURS + ("kvpress_kvzip",)))
    ap.add_argument("--out", default="docs/results/eval_kvzip_lookup_keep0.3.md")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    t_start = time.perf_counter()
    model, tok = load_smollm2()
    torch.set_grad_enabled(False)
    preps = [prepare(ex, tok) for ex in generate_task(args.task, args.n, seed=args.seed)]
    L = model.config.num_hidden_layers
    H = model.config.num_key_value_heads
    rec = {m: [] for m in methods}
    for i, prep in enumerate(preps):
        ex = prep.example
        n_ctx = prep.ctx_ids.shape[1]
        for m in methods:
            if m == "kvpress_kvzip":
                text, sec, unmasked, t_c = run_kvpress_kvzip(model, tok, prep, args.keep)
                rec[m].append({"score": score(ex, text), "answer": answer_line(text), "seconds": sec,
                               "memory_kept": 1.0, "unmasked": unmasked, "compress_s": t_c})
                continue
            method = build_method(m, args.keep if m != "full" else 1.0)
            out = run_once(model, tok, prep, method, "query_agnostic")
            st = out.stats
            kept = (st.get("kv_tokens_after_prefill") or 0) / (L * H * n_ctx)
            rec[m].append({"score": score(ex, out.text), "answer": out.lines()[0], "seconds": out.seconds,
                           "memory_kept": kept, "unmasked": kept,
                           "kv_bytes_after_prefill": st.get("kv_bytes_after_prefill"),
                           "kvzip_score_s": (method.stats.get("kvzip_score_s") if method is not None else None)})
        line = " ".join(f"{m}={rec[m][-1]['score']:.0f}" for m in methods)
        print(f"[{i + 1}/{len(preps)}] ctx={n_ctx} {line}", flush=True)
    wall = time.perf_counter() - t_start
    base = [r["score"] for r in rec["full"]] if "full" in rec else None
    rows = []
    for m in methods:
        acc, se = mean_se([r["score"] for r in rec[m]])
        d, d_se = (mean_se([a["score"] - b for a, b in zip(rec[m], base)]) if base else (math.nan, math.nan))
        rows.append({"method": m, "n": len(rec[m]), "accuracy": acc, "se": se, "delta_vs_full": d, "delta_se": d_se,
                     "memory_kept": mean_se([r["memory_kept"] for r in rec[m]])[0],
                     "unmasked": mean_se([r["unmasked"] for r in rec[m]])[0],
                     "seconds": mean_se([r["seconds"] for r in rec[m]])[0]})
    pairs = []
    for a, b in (("kvzip", "kvpress_kvzip"), ("kvzip", "snapkv"), ("kvzip_shotkv", "kvpress_kvzip"),
                 ("kvzip", "kvzip_shotkv")):
        if a in rec and b in rec:
            pd = paired_diff([x["score"] for x in rec[a]], [y["score"] for y in rec[b]])
            pairs.append({"a": a, "b": b, **{k: pd[k] for k in ("mean_diff", "se", "wins", "losses")}})
    cmd = "OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/eval_kvzip.py " + " ".join(sys.argv[1:] if argv is None
                                                                                       else argv)
    md = [f"# Query-agnostic {args.task}, keep {args.keep}: KVzip-style scoring", "",
          f"{model_name()}, CPU, torch {torch.__version__}, n = {args.n} examples (task seed {args.seed}, held out), "
          f"context compressed before the question (the harness's `query_agnostic` setting), greedy decoding; "
          f"wall {wall / 60:.1f} min, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
          f"Command: `{cmd}`", "",
          "| method | n | accuracy ± SE | Δ vs full ± paired SE | memory kept | keys attended | s / example |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['n']} | {fmt(r['accuracy'])} ± {fmt(r['se'])} | {fmt(r['delta_vs_full'])} ± "
                  f"{fmt(r['delta_se'])} | {fmt(r['memory_kept'])} | {fmt(r['unmasked'])} | {fmt(r['seconds'])} |")
    md += ["", "Paired differences (same examples):", "", "| a | b | mean(a - b) ± paired SE | a wins | b wins |",
           "|---|---|---|---|---|"]
    for p in pairs:
        md.append(f"| {p['a']} | {p['b']} | {fmt(p['mean_diff'])} ± {fmt(p['se'])} | {p['wins']} | {p['losses']} |")
    md += ["", "*memory kept*: K/V tokens stored after compression / context tokens, over all layers and kv heads "
           "(ours: the paged cache really holds only these; kvpress masks, so it stores everything: 1.0). *keys "
           "attended*: the fraction not masked. *s / example*: prefill + compression + question + answer."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows, "pairs": pairs,
                                                    "records": rec, "wall_s": wall}, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
