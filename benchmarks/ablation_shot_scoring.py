"""Ablation of ShotKV's shot scoring (issue 15 item 2): every scoring option of :class:`ShotKV` against the
paper's rule (``shotkv``, the default options) on the SAME examples, paired, through the eval harness
(SmolLM2-135M, CPU, greedy, the transformers integration).

One harness run per (task, setting, keep ratio) is saved as JSON under ``--raw`` as soon as it ends (a run
cut short loses only its own chunk); the table is rendered from every chunk present::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/ablation_shot_scoring.py \\
        --tasks lookup --n 50 --ratios 0.3 0.2 --settings query_aware
    PYTHONPATH=$PWD python benchmarks/ablation_shot_scoring.py --render   # table only

Table columns: n, accuracy ± SE, paired Δ vs the paper's rule ± paired SE (same examples), wins/losses,
KV kept (cached tokens after prefill / prompt tokens, all layers and kv heads: equal memory check).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAPER = "shotkv"
#: The variants: one option changed at a time from the paper's rule (docs/METHODS.md).
VARIANTS = [
    PAPER,
    "shotkv[shot_score=max]",
    "shotkv[shot_score=topk_mean,shot_topk=4]",
    "shotkv[shot_score=max,pool_size=5]",
    "shotkv[head_reduce=max]",
    "shotkv[layer_ranking=cumulative]",
    "shotkv[layer_ranking=reuse,reuse_every=2]",
    "shotkv[window_size=1]",
]


def _mean_se(xs):
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    if n < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def run_chunks(args) -> None:
    from kvpress_kernels.evaluation.harness import EvalConfig, run_eval
    from kvpress_kernels.evaluation.model import load_smollm2

    raw = Path(args.raw)
    raw.mkdir(parents=True, exist_ok=True)
    model, tok = load_smollm2()
    for task in args.tasks:
        for setting in args.settings:
            for ratio in args.ratios:
                path = raw / f"{task}_{setting}_{ratio}_n{args.n}.json"
                if path.exists() and not args.overwrite:
                    print(f"skip {path} (exists)", flush=True)
                    continue
                cfg = EvalConfig(tasks=[task], methods=list(args.variants), keep_ratios=[ratio], settings=[setting],
                                 n_examples=args.n, seed=args.seed)
                t0 = time.perf_counter()
                res = run_eval(cfg, progress=args.progress, model=model, tok=tok)
                recs = [{k: r[k] for k in ("task", "setting", "example", "method", "keep_ratio", "score", "kv_kept",
                                           "answer", "gold", "depth")} for r in res.records]
                path.write_text(json.dumps({"task": task, "setting": setting, "keep_ratio": ratio, "n": args.n,
                                            "seed": args.seed, "variants": list(args.variants), "meta": res.meta,
                                            "records": recs}, indent=0))
                print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)", flush=True)


def load_chunks(raw: Path) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(raw).glob("*.json"))]


def rows_of(chunk: dict) -> List[Dict[str, object]]:
    recs = chunk["records"]
    score = {(r["method"], r["example"]): r["score"] for r in recs}
    examples = sorted({r["example"] for r in recs})
    out = []
    methods = ["full"] + [m for m in chunk["variants"]]
    for m in methods:
        xs = [score[(m, e)] for e in examples if (m, e) in score]
        acc, se = _mean_se(xs)
        d = [score[(m, e)] - score[(PAPER, e)] for e in examples if (m, e) in score and (PAPER, e) in score]
        dm, dse = _mean_se(d) if m != PAPER else (math.nan, math.nan)
        kept = [r["kv_kept"] for r in recs if r["method"] == m and r["kv_kept"] is not None]
        out.append({"method": m, "n": len(xs), "acc": acc, "se": se, "d": dm, "dse": dse,
                    "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d),
                    "kept": sum(kept) / len(kept) if kept else math.nan})
    return out


def _f(x, nd=2):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def render(raw: Path) -> str:
    chunks = load_chunks(raw)
    order = {"lookup": 0, "pattern": 1, "arithmetic": 2, "passkey": 3}
    chunks.sort(key=lambda c: (c["setting"] != "query_aware", order.get(c["task"], 9), -c["keep_ratio"]))
    lines = ["| task | setting | keep | variant | n | accuracy | Δ vs paper (paired) | wins/losses | KV kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in chunks:
        for r in rows_of(c):
            sig = ""
            if r["method"] not in ("full", PAPER) and not math.isnan(r["dse"]) and r["dse"] > 0:
                sig = " **(>2 SE)**" if abs(r["d"]) > 2 * r["dse"] else ""
            delta = "" if r["method"] in ("full", PAPER) else f"{_f(r['d'], 3)} ± {_f(r['dse'], 3)}{sig}"
            wl = "" if r["method"] in ("full", PAPER) else f"{r['wins']}/{r['losses']}"
            kept = "1.00" if r["method"] == "full" else _f(r["kept"], 3)
            lines.append(f"| {c['task']} | {c['setting']} | {c['keep_ratio']} | `{r['method']}` | {r['n']} | "
                         f"{_f(r['acc'])} ± {_f(r['se'])} | {delta} | {wl} | {kept} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["lookup"])
    ap.add_argument("--settings", nargs="+", default=["query_aware"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.2])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--raw", default=str(ROOT / "docs" / "results" / "ablation_shot_scoring"))
    ap.add_argument("--render", action="store_true", help="only print the table of the chunks present")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if PAPER not in args.variants:
        ap.error(f"the variants must include the paper's rule {PAPER!r} (the paired reference)")
    if not args.render:
        run_chunks(args)
    print(render(Path(args.raw)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
