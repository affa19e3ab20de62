"""Ablation of ShotKV's shot scoring (issue 15 item 2): every scoring option of :class:`ShotKV` against the
paper's rule (``shotkv``, the default options) on the SAME examples, paired, through the eval harness
(SmolLM2-135M, CPU, greedy, the transformers integration).

Every run (harness.run_once: the same prompts, greedy decoding and scoring as ``kvpress-kernels eval``) is one
JSON line appended to ``--jsonl`` as soon as it ends, examples in a depth-balanced strided order, so a run
cut short keeps every finished example and a rerun resumes; the table is rendered from the lines present,
on the examples every method finished (paired)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/ablation_shot_scoring.py \\
        --tasks lookup --n 50 --ratios 0.3 0.2 --settings query_aware
    PYTHONPATH=$PWD python benchmarks/ablation_shot_scoring.py --render docs/results/ablation_shot_scoring.jsonl

Any harness method name works as a variant (``snapkv[head_budget=adakv]``: the per-head rows); each is
paired with the same method without options (``shotkv``, the paper's rule, for every ``shotkv[...]``).
Table columns: n, accuracy ± SE, paired Δ vs that reference ± paired SE (same examples), wins/losses,
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

from kvpress_kernels.evaluation.stats import fmt, kept_after_prefill, kv_rows, mean_se  # noqa: E402

PAPER = "shotkv"
#: The variants: one option changed at a time from the paper's rule (docs/METHODS.md).
VARIANTS = [
    PAPER,
    "shotkv[shot_score=max]",
    "shotkv[shot_score=topk_mean,shot_topk=4]",
    "shotkv[layer_ranking=cumulative]",
    "shotkv[window_size=1]",
]


def example_order(n: int, stride: int = 5) -> List[int]:
    """Examples in a strided order (0, 5, 10, ..., 1, 6, ...): the harness spreads answer depths evenly
    over the example indices, so a run cut short still covers every depth."""
    return [i for s in range(stride) for i in range(s, n, stride)]


def run_examples(args) -> None:
    """Per example: the full cache once, then every (keep ratio, variant); one JSON line per run, appended
    and flushed at once (a run cut short keeps every finished example; a rerun resumes)."""
    import torch

    from kvpress_kernels.evaluation.harness import build_method, prepare, run_once
    from kvpress_kernels.evaluation.model import load_smollm2
    from kvpress_kernels.evaluation.tasks import generate_task, score

    for v in args.variants:
        build_method(v, 0.5)                                     # fail fast on a bad name or option
    out = Path(args.jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)

    def finished():
        # the runs already in --jsonl and in the --shared files of another worker (re-read per example)
        keys = set()
        for r in load_records([out] + list(args.shared)):
            keys.add((r["task"], r["setting"], r["example"], r["method"], r["keep_ratio"]))
        return keys

    model, tok = load_smollm2()
    torch.set_grad_enabled(False)
    n_rows = kv_rows(model)
    t0 = time.perf_counter()
    with out.open("a") as f:
        for task in args.tasks:
            n = args.n if task == args.tasks[0] or args.n_controls is None else args.n_controls
            examples = generate_task(task, n, seed=args.seed)
            order = example_order(n)
            for count, i in enumerate(order[::-1] if args.reverse else order):
                ex = examples[i]
                prep = None
                done = finished()
                for setting in args.settings:
                    todo = [("full", 1.0)] + [(v, r) for r in args.ratios for v in args.variants]
                    for name, ratio in todo:
                        if (task, setting, i, name, ratio) in done:
                            continue
                        prep = prep or prepare(ex, tok)
                        method = None if name == "full" else build_method(name, ratio)
                        o = run_once(model, tok, prep, method, setting)
                        kept = 1.0 if name == "full" else kept_after_prefill(o.stats, n_rows)
                        rec = {"task": task, "setting": setting, "example": i, "depth": ex.depth, "method": name,
                               "keep_ratio": ratio, "score": score(ex, o.texts if ex.turns else o.text),
                               "kv_kept": kept, "answer": o.text.strip(), "gold": ex.answer,
                               "seconds": round(o.seconds, 2)}
                        f.write(json.dumps(rec) + "\n")
                        f.flush()
                print(f"{task} example {i} ({count + 1}/{n}) done, {time.perf_counter() - t0:.0f} s", flush=True)


def load_records(paths) -> List[dict]:
    out = []
    for p in paths:
        p = Path(p)
        if p.exists():
            out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out


def reference_of(name: str) -> str:
    """The paired reference of a variant: the same method without options (``shotkv`` for every
    ``shotkv[...]``: the paper's rule; ``snapkv`` for ``snapkv[head_budget=adakv]``)."""
    return name.split("[", 1)[0]


def rows_of(recs: List[dict], task: str, setting: str, ratio: float) -> List[Dict[str, object]]:
    """One row per method at this (task, setting, ratio). A variant's row (accuracy, paired Δ) is on the
    examples where it, its reference and the full cache all finished; the full cache's row on the
    examples its reference methods finished."""
    full = {r["example"]: r for r in recs if r["task"] == task and r["setting"] == setting and r["method"] == "full"}
    here = [r for r in recs if r["task"] == task and r["setting"] == setting and r["keep_ratio"] == ratio
            and r["method"] != "full"]
    methods = list(dict.fromkeys(r["method"] for r in here))
    by = {(r["method"], r["example"]): r for r in here}
    refs = [m for m in methods if reference_of(m) == m] or methods
    base = sorted(e for e in full if all((m, e) in by for m in refs))
    out = [{"method": "full", "n": len(base), "acc": mean_se([full[e]["score"] for e in base]),
            "d": (math.nan, math.nan), "wl": "", "kept": 1.0, "ref": ""}]
    for m in methods:
        ref = reference_of(m)
        paired = ref != m and ref in methods
        examples = sorted(e for e in full if (m, e) in by and (not paired or (ref, e) in by))
        xs = [by[(m, e)]["score"] for e in examples]
        if paired:
            d = [by[(m, e)]["score"] - by[(ref, e)]["score"] for e in examples]
            dm, wl = mean_se(d), f"{sum(x > 0 for x in d)}/{sum(x < 0 for x in d)}"
        else:
            dm, wl = (math.nan, math.nan), ""
        kept = [by[(m, e)]["kv_kept"] for e in examples if by[(m, e)]["kv_kept"] is not None]
        out.append({"method": m, "n": len(examples), "acc": mean_se(xs), "d": dm, "wl": wl,
                    "ref": ref if paired else "", "kept": sum(kept) / len(kept) if kept else math.nan})
    return out


def render(paths) -> str:
    recs = load_records(paths)
    order = {"lookup": 0, "pattern": 1, "arithmetic": 2, "passkey": 3}
    keys = sorted({(r["task"], r["setting"], r["keep_ratio"]) for r in recs if r["method"] != "full"},
                  key=lambda k: (k[1] != "query_aware", order.get(k[0], 9), -k[2]))
    lines = ["| task | setting | keep | method | n | accuracy ± SE | Δ vs reference (paired) ± SE | wins/losses | KV kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, setting, ratio in keys:
        for r in rows_of(recs, task, setting, ratio):
            acc, se = r["acc"]
            dm, dse = r["d"]
            delta = ""
            if not math.isnan(dm):
                sig = " **(> 2 SE)**" if not math.isnan(dse) and dse > 0 and abs(dm) > 2 * dse else ""
                delta = f"{fmt(dm, 3)} ± {fmt(dse, 3)} vs `{r['ref']}`{sig}"
            lines.append(f"| {task} | {setting} | {ratio if r['method'] != 'full' else '1.0'} | `{r['method']}` | "
                         f"{r['n']} | {fmt(acc)} ± {fmt(se)} | {delta} | {r['wl']} | {fmt(r['kept'], 3)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["lookup"], help="the first is the main task (--n examples)")
    ap.add_argument("--settings", nargs="+", default=["query_aware"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.2])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--n-controls", type=int, default=None, help="examples of the tasks after the first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--jsonl", default=str(ROOT / "docs" / "results" / "ablation_shot_scoring.jsonl"))
    ap.add_argument("--reverse", action="store_true",
                    help="a second worker: examples in the reverse order, skipping runs in --shared files")
    ap.add_argument("--shared", nargs="*", default=[], help="other workers' record files (runs to skip)")
    ap.add_argument("--render", nargs="*", default=None, metavar="JSONL",
                    help="only print the table of these record files (default: --jsonl)")
    args = ap.parse_args(argv)
    if args.render is None:
        run_examples(args)
    print(render(args.render or [args.jsonl]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
