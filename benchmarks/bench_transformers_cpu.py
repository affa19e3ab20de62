"""Benchmark: the transformers path on the real small model (SmolLM2-135M, 30 layers, 9 query / 3 kv
heads, D 64, fp32) on CPU — what the prefill costs with each method, what share of it the compression
step takes, its peak memory, H2O next to kvpress's ObservedAttention, and the decode step of the paged
path next to stock ``generate``.

Not part of ``kvpress-kernels bench`` (that suite times ops on synthetic caches); run it alone::

    python benchmarks/bench_transformers_cpu.py --tokens 1024 4096 --out results/transformers_cpu
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_transformers_cpu.py ...   # "before" rows

Every configuration runs in a fresh process (``--one``), so that peak memory is that configuration's
own: the peak resident set size (``VmHWM``) during the measured call minus the resident size just
before it (the model loaded, and up to 1k tokens one warm-up call done), reset with ``/proc/self/clear_refs`` first.
Time is the best of ``--repeat`` calls, wall clock (``seconds``) and this process's CPU time
(``cpu_seconds``, ``time.process_time``: with one torch thread it is the wall time of an idle machine
and, unlike wall time, barely moves with other processes' load; compare rows by it). Rows:

- ``prefill``: ``stock`` = the model's forward with transformers' SDPA attention and a DynamicCache (what
  ``generate`` does first); ``paged`` = the same prompt through ``kvpress_kernels.generate`` with no
  method, then one row per method (keep ratio 0.3, ``max_new_tokens=1``: the prefill and one sampled
  token), with ``compress_s`` (scoring + selection + storing what is kept, summed over layers) and its
  share of the prefill; ``kvpress_observed_attention`` = kvpress's ``ObservedAttentionPress`` (the
  eager-attention H2O) on the same prompt.
- ``pair`` (``--pairs``): the plain paged prefill and one method's, alternated in one process, best of
  ``--repeat`` each, and their ratio (``ratio_cpu``, ``ratio_wall``): the method's cost over the plain
  prefill under one and the same machine load.
- ``decode``: per decode token, ``(t(new = 1 + D) - t(new = 1)) / D`` for stock ``generate`` and for the
  paged path without a method, ``D = --decode-tokens``; with ``--decode-pair`` both in one process,
  alternated, with the paged/stock ratios of the prefill (``new = 1``) and of the decode token.

The prompt is a many-shot lookup (``Q: What is the code of <word><i>?\\nA: <code>``), its shots given to
ShotKV, truncated to the requested length on a shot boundary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("snapkv", "pyramidkv", "chunkkv", "streamingllm", "h2o", "tova", "knorm", "shotkv")
KEEP = 0.3


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _prompt(tok, n_tokens: int):
    import torch
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "lemon", "ocean", "candle",
             "forest", "silver", "rocket", "garden", "violet", "hammer", "island", "pepper", "window", "copper"]
    text, spans = "", []
    i = 0
    while True:
        shot = f"Q: What is the code of {rng.choice(words)}{i}?\nA: {rng.randint(100, 999)}\n\n"
        spans.append((len(text), len(text) + len(shot)))
        text += shot
        i += 1
        if len(tok(text)["input_ids"]) > n_tokens:
            break
    question = "Q: What is the code of " + text[spans[len(spans) // 2][0]:].split("of ", 1)[1].split("?", 1)[0] + "?\nA:"
    q_ids = tok(question, add_special_tokens=False)["input_ids"]
    enc = tok(text, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    budget = n_tokens - len(q_ids)
    tok_spans = []
    for s, e in spans:
        toks = [t for t, (a, _b) in enumerate(offs) if s <= a < e and a != _b]
        if toks and toks[-1] < budget:
            tok_spans.append((toks[0], toks[-1] + 1))
    end = tok_spans[-1][1]
    input_ids = torch.tensor([ids[:end] + q_ids])
    return input_ids, tok_spans


def _method(name: str):
    from kvpress_kernels import KNorm, TOVA
    from kvpress_kernels.evaluation.harness import build_method
    extra = {"tova": TOVA, "knorm": KNorm}          # not eval methods, so not in build_method
    return extra[name](KEEP) if name in extra else build_method(name, KEEP)


def run_one(kind: str, name: str, n_tokens: int, repeat: int, decode_tokens: int, threads: int,
            warmup_max: int = 1024) -> dict:
    import torch
    torch.set_num_threads(threads)
    import kvpress_kernels
    from kvpress_kernels.evaluation.model import load_smollm2

    model, tok = load_smollm2()
    ids, shots = _prompt(tok, n_tokens)
    mask = torch.ones_like(ids)
    n = ids.shape[1]
    row = {"kind": kind, "config": name, "tokens": n, "threads": threads,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "code": os.environ.get("BENCH_CODE_LABEL", "")}

    def paged(method, new, **kw):
        return kvpress_kernels.generate(model, ids, method, attention_mask=mask, max_new_tokens=new,
                                        min_new_tokens=new, shots=[shots], pad_token_id=tok.eos_token_id, **kw)

    def stock_generate(new, **kw):
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=tok.eos_token_id, **kw)

    if kind == "prefill":
        if name == "stock":
            def call():
                from transformers import DynamicCache
                model(ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
                return {}
        elif name == "kvpress_observed_attention":
            from kvpress import ObservedAttentionPress
            from transformers import DynamicCache
            press = ObservedAttentionPress(compression_ratio=1 - KEEP)
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("eager")
            else:
                model.config._attn_implementation = "eager"

            def call():
                with press(model):
                    model(ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
                return {}
        else:
            method_name = None if name == "paged" else name

            def call():
                _, st = paged(None if method_name is None else _method(method_name), 1)
                return st
        with torch.no_grad():
            if n <= warmup_max:
                call()                    # warm-up (at 4k tokens a call is long enough to need none)
            best, best_st, peak, best_cpu = None, {}, 0, float("inf")
            for _ in range(repeat):
                base = _rss_kib("VmRSS")
                reset = _reset_peak()
                c0, t0 = time.process_time(), time.perf_counter()
                st = call()
                dt = time.perf_counter() - t0
                best_cpu = min(best_cpu, time.process_time() - c0)
                peak = max(peak, (_rss_kib("VmHWM") - base) if reset else -1)
                if best is None or dt < best:
                    best, best_st = dt, st
        row.update({"seconds": best, "cpu_seconds": best_cpu, "peak_extra_mib": peak / 1024})
        if best_st:
            row.update({"prefill_s": best_st.get("prefill_s"), "compress_s": best_st.get("compress_s"),
                        "compress_share": (best_st.get("compress_s") or 0.0) / best_st["prefill_s"]
                        if best_st.get("prefill_s") else None,
                        "kv_kept": (best_st.get("kv_tokens_after_prefill") or 0) /
                        max(1, best_st.get("kv_tokens_full") or 1)})
    elif kind == "pair":
        # the plain paged prefill and the method's, alternated in one process: their ratio sees one load
        calls = {"paged": lambda: paged(None, 1)[1], name: lambda: paged(_method(name), 1)[1]}
        best = {k: [float("inf"), float("inf")] for k in calls}
        with torch.no_grad():
            for k in calls:
                calls[k]()                             # warm-up
            for _ in range(repeat):
                for k, fn in calls.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    st = fn()
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    if dc < best[k][1]:
                        row[f"{k}_compress_s"] = st.get("compress_s")
                    best[k] = [min(best[k][0], dt), min(best[k][1], dc)]
        row.update({"paged_seconds": best["paged"][0], "paged_cpu_seconds": best["paged"][1],
                    "method_seconds": best[name][0], "method_cpu_seconds": best[name][1],
                    "ratio_cpu": best[name][1] / best["paged"][1], "ratio_wall": best[name][0] / best["paged"][0]})
    elif kind == "decode_pair":
        # Stock generate and the paged path without a method, alternated in one process. Each decode step is
        # timed on its own (a streamer's put() per new token: wall and CPU clock at each), and a row reports
        # the median step: one descheduled step on a shared machine moves a median by nothing, where it
        # moves a difference of two totals by its whole length.
        class _Steps:
            def __init__(self):
                self.marks = []

            def put(self, value):
                self.marks.append((time.perf_counter(), time.process_time()))

            def end(self):
                pass

        D = decode_tokens
        fns = {"stock": stock_generate, "paged": lambda new, **kw: paged(None, new, **kw)}
        steps = {k: {"wall": [], "cpu": []} for k in fns}
        pre = {k: {"wall": [], "cpu": []} for k in fns}
        with torch.no_grad():
            for fn in fns.values():
                fn(2)                                  # warm-up
            for r in range(repeat):
                for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    st = _Steps()
                    t0, c0 = time.perf_counter(), time.process_time()
                    fns[k](1 + D, streamer=st)
                    # marks: [prompt, token 1 (prefill done), token 2, ..., token 1 + D]
                    w = [b[0] - a[0] for a, b in zip(st.marks[1:], st.marks[2:])]
                    c = [b[1] - a[1] for a, b in zip(st.marks[1:], st.marks[2:])]
                    steps[k]["wall"] += w
                    steps[k]["cpu"] += c
                    pre[k]["wall"].append(st.marks[1][0] - t0)
                    pre[k]["cpu"].append(st.marks[1][1] - c0)
        med = statistics.median
        for k in fns:
            row.update({f"{k}_prefill_seconds": med(pre[k]["wall"]), f"{k}_prefill_cpu_seconds": med(pre[k]["cpu"]),
                        f"{k}_ms_per_decode_token": med(steps[k]["wall"]) * 1e3,
                        f"{k}_cpu_ms_per_decode_token": med(steps[k]["cpu"]) * 1e3,
                        f"{k}_decode_steps": len(steps[k]["wall"])})
        # per repeat, the ratio of the two paths' median steps (the spread of the ratio across repeats)
        per = []
        for r in range(repeat):
            a = med(steps["paged"]["cpu"][r * D:(r + 1) * D])
            b = med(steps["stock"]["cpu"][r * D:(r + 1) * D])
            per.append(a / b)
        row.update({"decode_tokens": D, "repeat": repeat,
                    "prefill_ratio_cpu": row["paged_prefill_cpu_seconds"] / row["stock_prefill_cpu_seconds"],
                    "decode_ratio_cpu": row["paged_cpu_ms_per_decode_token"] / row["stock_cpu_ms_per_decode_token"],
                    "prefill_ratio_wall": row["paged_prefill_seconds"] / row["stock_prefill_seconds"],
                    "decode_ratio_wall": row["paged_ms_per_decode_token"] / row["stock_ms_per_decode_token"],
                    "decode_ratio_cpu_per_repeat": per})
    else:
        fn = stock_generate if name == "stock" else (lambda new: paged(None, new))
        with torch.no_grad():
            if warmup_max:
                fn(1)
            t1 = t2 = c1 = c2 = float("inf")
            for _ in range(repeat):                   # interleaved, best of each
                c0, t0 = time.process_time(), time.perf_counter(); fn(1)
                t1, c1 = min(t1, time.perf_counter() - t0), min(c1, time.process_time() - c0)
                c0, t0 = time.process_time(), time.perf_counter(); fn(1 + decode_tokens)
                t2, c2 = min(t2, time.perf_counter() - t0), min(c2, time.process_time() - c0)
        row.update({"seconds_new1": t1, "seconds_new": t2, "decode_tokens": decode_tokens,
                    "ms_per_decode_token": (t2 - t1) / decode_tokens * 1e3,
                    "cpu_seconds_new1": c1, "cpu_seconds_new": c2,
                    "cpu_ms_per_decode_token": (c2 - c1) / decode_tokens * 1e3})
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--methods-long", nargs="+", default=["snapkv", "shotkv", "h2o"],
                    help="methods measured at lengths > 1024 (each 4k prefill is tens of seconds on 2 cores)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--decode-prompt", type=int, default=786)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-kvpress", action="store_true")
    ap.add_argument("--pairs", nargs="*", default=[], metavar="METHOD",
                    help="also, per length, one process per method alternating the plain paged prefill and the "
                         "method's (best of --repeat each): their time ratio under one load")
    ap.add_argument("--decode-pair", action="store_true",
                    help="the decode rows as one process alternating stock generate and the paged path")
    ap.add_argument("--no-prefill", action="store_true", help="skip the one-configuration-per-process prefill rows")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--warmup-max", type=int, default=1024,
                    help="one untimed warm-up call up to this many tokens (0: none)")
    ap.add_argument("--codes", nargs="+", metavar="LABEL=PATH",
                    help="run every configuration once per checkout (PYTHONPATH=PATH), interleaved, so that "
                         "before/after rows see the same machine load; default: the importable package")
    ap.add_argument("--out", default="results/transformers_cpu")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "NAME", "TOKENS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], int(a.one[2]), a.repeat, a.decode_tokens, a.threads,
                                 a.warmup_max)))
        return 0
    jobs = []
    for n in a.tokens:
        names = ["stock", "paged"] + (a.methods if n <= 1024 else a.methods_long)
        if not a.no_kvpress:
            names.append("kvpress_observed_attention")
        if not a.no_prefill:
            jobs += [("prefill", name, n) for name in names]
        jobs += [("pair", name, n) for name in a.pairs]
    if not a.no_decode:
        jobs += ([("decode_pair", "stock_vs_paged", a.decode_prompt)] if a.decode_pair else
                 [("decode", "stock", a.decode_prompt), ("decode", "paged", a.decode_prompt)])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    codes = [c.split("=", 1) for c in a.codes] if a.codes else [[os.environ.get("BENCH_CODE_LABEL", ""), None]]
    path = out / "transformers_cpu.json"
    rows = []
    with open("/proc/loadavg") as f:
        load0 = f.read().split()[:3]
    for kind, name, n in jobs:
        for label, code_path in codes:
            env = dict(os.environ, BENCH_CODE_LABEL=label)
            if code_path is not None:
                env["PYTHONPATH"] = code_path
            cmd = [sys.executable, __file__, "--one", kind, name, str(n), "--repeat", str(a.repeat),
                   "--decode-tokens", str(a.decode_tokens), "--threads", str(a.threads),
                   "--warmup-max", str(a.warmup_max)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                row = {"kind": kind, "config": name, "tokens": n, "code": label,
                       "error": res.stderr.strip().splitlines()[-1:]}
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
            with open("/proc/loadavg") as f:
                row["load_average"] = float(f.read().split()[0])
            rows.append(row)
            print(json.dumps(row), flush=True)
            path.write_text(json.dumps({"load_average_at_start": load0, "rows": rows}, indent=1))
    with open("/proc/loadavg") as f:
        load1 = f.read().split()[:3]
    path.write_text(json.dumps({"load_average_at_start": load0, "load_average_at_end": load1, "rows": rows}, indent=1))
    print(f"load average {load0} -> {load1}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
