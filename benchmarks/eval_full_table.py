"""The full methods x keep ratios x settings table of the quality harness, run in resumable pieces.

The harness's :func:`~kvpress_kernels.evaluation.harness.run_eval` writes its results once the whole
sweep is done; the full table takes hours on 2 shared cores, so this driver runs the same runs
(:func:`harness.run_once` on :func:`harness.prepare`-d examples, the same record fields as
``run_eval``) one *work item* = (task, setting, example) at a time, and appends the item's records
(the full cache + every method x ratio) to a JSONL file as soon as the item is done. Whatever finished
when the sweep is stopped is usable, and a restarted worker skips the items already on disk.

Examples are generated with the task's full ``n`` (the depth balance of
:func:`~kvpress_kernels.evaluation.tasks.generate_task` depends on it) and run in a spread order (a
van der Corput sequence over the indices), so a stopped sweep's examples still cover all depths.
Items are run by priority tiers (:func:`work_items`), the reverse of the order a sweep too long for its
time is cut in: the discriminating tasks' (lookup, passkey) first ``--core-n`` examples and the
controls' first ``--control-core-n`` at keep 0.1 / 0.3; then the rest of the discriminating examples;
then keep 0.5 on the controls' core; then the rest of the controls. Several workers share one output
folder: each claims the next free item (a claim file holding its pid; a dead worker's claim is taken
over), so a restart resumes where the sweep stopped.

Usage::

    # two workers, each one thread; each claims the next unclaimed item in priority order
    OMP_NUM_THREADS=1 python benchmarks/eval_full_table.py work --worker 0 --out results/full_table &
    OMP_NUM_THREADS=1 python benchmarks/eval_full_table.py work --worker 1 --out results/full_table &
    # the table, plot and merged records from whatever finished
    python benchmarks/eval_full_table.py merge --out results/full_table --doc docs/results/eval_full_table.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvpress_kernels.evaluation import harness  # noqa: E402
from kvpress_kernels.evaluation.stats import fmt, kv_rows, nan_to_none, paired_diff  # noqa: E402
from kvpress_kernels.evaluation.tasks import generate_task  # noqa: E402

METHODS = ["shotkv", "shotkv_decode", "snapkv", "adakv", "pyramidkv", "chunkkv", "streamingllm", "h2o", "tova",
           "knorm"]
RATIOS = [0.1, 0.3, 0.5]
SETTINGS = ["query_aware", "query_agnostic"]
DISCRIMINATING = ["lookup", "passkey"]
CONTROLS = ["arithmetic", "pattern", "multi_answer"]
#: Record fields kept in the committed merged JSON (the answers themselves stay in the JSONL files).
KEEP_FIELDS = ("task", "setting", "example", "method", "keep_ratio", "score", "agree", "kl", "kv_kept",
               "kv_kept_final", "kv_bytes_after_prefill", "depth", "answer_shot", "prompt_tokens", "seconds")


def spread_order(n: int) -> List[int]:
    """The indices ``0..n-1`` in van der Corput order: every prefix is spread over ``[0, n)``."""
    def vdc(k: int) -> float:
        x, denom = 0.0, 1.0
        while k:
            denom *= 2
            k, bit = divmod(k, 2)
            x += bit / denom
        return x
    seen, out, k = set(), [], 0
    while len(out) < n:
        i = min(n - 1, int(vdc(k) * n))
        if i not in seen:
            seen.add(i)
            out.append(i)
        k += 1
        if k > 64 * n:                      # cannot happen for n >= 1; keeps the loop finite regardless
            out += [i for i in range(n) if i not in seen]
            break
    return out


def work_items(n_disc: int, n_ctrl: int, core_disc: int, core_ctrl: int, tasks: Sequence[str],
               settings: Sequence[str], ratios: Sequence[float],
               late_ratios: Sequence[float] = (0.5,), control_pace: float = 1.0,
               ) -> List[Tuple[str, str, int, Tuple[float, ...]]]:
    """(task, setting, example, keep ratios) in priority order, the reverse of the order to cut in:

    0. the discriminating tasks' first ``core_disc`` examples (every ratio) and the controls' first
       ``core_ctrl`` examples (the ratios but ``late_ratios``);
    1. the rest of the discriminating tasks' examples;
    2. ``late_ratios`` on the controls' first ``core_ctrl`` examples;
    3. the rest of the controls' examples (every ratio).

    Within a tier, examples are interleaved by rank in their spread order; in tier 0 a control's
    ``r``-th example comes with the discriminating tasks' ``control_pace * r + (control_pace - 1) / 2``-th
    (pace 3: one control example per three discriminating ones, so a sweep stopped early has ~3x more
    examples of the tasks that tell methods apart).
    """
    early = tuple(r for r in ratios if r not in late_ratios)
    late = tuple(r for r in ratios if r in late_ratios)
    tiers: List[list] = [[], [], [], []]
    for task in tasks:
        disc = task in DISCRIMINATING
        n, core = (n_disc, core_disc) if disc else (n_ctrl, core_ctrl)
        for rank, e in enumerate(spread_order(n)):
            for setting in settings:
                if disc:
                    tiers[0 if rank < core else 1].append((rank, task, setting, e, tuple(ratios)))
                elif rank < core:
                    if early:
                        tiers[0].append((control_pace * rank + (control_pace - 1) / 2, task, setting, e, early))
                    if late:
                        tiers[2].append((rank, task, setting, e, late))
                else:
                    tiers[3].append((rank, task, setting, e, tuple(ratios)))
    out = []
    for t in tiers:
        t.sort(key=lambda x: (x[0], tasks.index(x[1]), settings.index(x[2])))
        out += [(task, setting, e, rs) for _, task, setting, e, rs in t]
    return out


def read_records(out_dir: Path) -> List[Dict[str, object]]:
    recs = []
    for p in sorted(Path(out_dir).glob("records_w*.jsonl")):
        for line in p.read_text().splitlines():
            if line.strip():
                try:
                    recs.extend(json.loads(line)["records"])
                except (json.JSONDecodeError, KeyError):
                    pass                     # a line cut by a kill: that item is simply not done
    return recs


def run_item(model, tok, prep, setting: str, variants, n_rows: int, backend=None) -> List[Dict[str, object]]:
    """The records of one (example, setting): the full cache, then every (method, ratio) — the records of
    :func:`harness.run_eval`, from the same :func:`harness.example_records`."""
    return harness.example_records(model, tok, prep, setting, variants, n_rows, backend=backend)


def claim(path: Path) -> bool:
    """Claim a work item by creating ``path`` (holding our pid); a claim of a dead process is taken over."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text() or "0")
            os.kill(pid, 0)
            return pid == os.getpid()
        except (ValueError, ProcessLookupError):
            path.write_text(str(os.getpid()))         # its owner died (killed sweep): take it over
            return True
        except PermissionError:
            return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def cmd_work(args) -> int:
    import torch

    from kvpress_kernels.evaluation.model import load_smollm2

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for m in args.methods:
        harness.build_method(m, 0.5)                       # fail fast on an unknown name
    items = work_items(args.n, args.control_n, args.core_n, args.control_core_n, args.tasks, SETTINGS,
                       args.keep_ratios, control_pace=args.control_pace)

    def done_set():
        return {(r["task"], r["setting"], r["example"], r["method"], r["keep_ratio"]) for r in read_records(out_dir)}

    def is_done(item, have) -> bool:
        task, setting, e, rs = item
        return all((task, setting, e, m, r) in have for m in ["full"] + list(args.methods)
                   for r in (rs if m != "full" else [1.0]))
    have = done_set()
    todo = [it for it in items if not is_done(it, have)]
    print(f"worker {args.worker}: {len(items)} items, {len(items) - len(todo)} already done", flush=True)
    model, tok = load_smollm2()
    torch.set_grad_enabled(False)
    n_rows = kv_rows(model)
    examples: Dict[str, list] = {}
    path = out_dir / f"records_w{args.worker}.jsonl"
    t0 = time.time()
    claims = out_dir / "claims"
    claims.mkdir(exist_ok=True)
    for k, (task, setting, e, rs) in enumerate(todo):
        if not claim(claims / f"{task}_{setting}_{e}_{'-'.join(f'{r:g}' for r in rs)}"):
            continue                                       # another live worker has it
        if is_done((task, setting, e, rs), done_set()):
            continue                                       # finished by a worker since we started
        if task not in examples:
            n = args.n if task in DISCRIMINATING else args.control_n
            examples[task] = generate_task(task, n, seed=args.seed)
        prep = harness.prepare(examples[task][e], tok)
        t = time.time()
        recs = run_item(model, tok, prep, setting, [(m, r) for m in args.methods for r in rs], n_rows)
        with path.open("a") as f:
            f.write(json.dumps({"task": task, "setting": setting, "example": e, "n": len(examples[task]),
                                "seconds": round(time.time() - t, 1), "records": recs}) + "\n")
        print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {k + 1}/{len(todo)} {task} {setting} ex {e}: "
              f"{time.time() - t:.1f} s ({len(recs)} runs); elapsed {time.time() - t0:.0f} s", flush=True)
    return 0


# --------------------------------------------------------------------------- merge
def _cell(r: Optional[Dict[str, object]]) -> str:
    if r is None:
        return "—"
    return f"{fmt(r['accuracy'])} ± {fmt(r['accuracy_se'])} ({fmt(r['kv_kept'])})"


def full_table(summary: List[Dict[str, object]], tasks, methods, ratios, settings) -> str:
    """Per task: rows = methods, columns = setting x keep ratio, cell ``acc ± SE (kv kept)``."""
    idx = {(r["task"], r["setting"], r["method"], r["keep_ratio"]): r for r in summary}
    cols = [(s, k) for s in settings for k in ratios]
    out = []
    for task in tasks:
        ns = sorted({r["n"] for r in summary if r["task"] == task})
        if not ns:
            continue
        out += [f"### {task} (n = {', '.join(map(str, ns))} per cell)", "",
                "| method | " + " | ".join(f"{s.replace('query_', 'q-')} {k:g}" for s, k in cols) + " |",
                "|---|" + "---|" * len(cols)]
        out.append("| full | " + " | ".join(_cell(idx.get((task, s, "full", 1.0))) for s, _ in cols) + " |")
        for m in methods:
            out.append(f"| {m} | " + " | ".join(_cell(idx.get((task, s, m, k))) for s, k in cols) + " |")
        out.append("")
    return "\n".join(out)


def plot(summary, tasks, methods, ratios, settings, path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    tasks = [t for t in tasks if any(r["task"] == t for r in summary)]
    fig, axes = plt.subplots(len(settings), len(tasks), figsize=(3.2 * len(tasks), 2.8 * len(settings) + 1.0),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i, setting in enumerate(settings):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            rs = [r for r in summary if r["task"] == task and r["setting"] == setting]
            full = [r for r in rs if r["method"] == "full"]
            if full:
                ax.axhline(full[0]["accuracy"], color="k", ls="--", lw=1, label="full cache")
            for c, m in enumerate(methods):
                pts = sorted((r["keep_ratio"], r["accuracy"], r["accuracy_se"]) for r in rs if r["method"] == m)
                dx = 0.01 * (c - (len(methods) - 1) / 2)          # a small offset per method: ties stay visible
                if pts:
                    ax.errorbar([x + dx for x, _, _ in pts], [y for _, y, _ in pts],
                                yerr=[0 if e is None or math.isnan(e) else e for _, _, e in pts],
                                marker="os^vDP*Xhp"[c % 10], ms=3.5, capsize=1.5, lw=1, elinewidth=0.6,
                                ls="-" if c < 5 else "--", color=cmap(c % 10), label=m)
            n = sorted({r["n"] for r in rs})
            ax.set_title(f"{task} / {setting.replace('query_', 'q-')} (n={','.join(map(str, n))})", fontsize=9)
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlim(0.0, 0.6)
            ax.set_xticks(ratios)
            ax.set_xlabel("keep ratio", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[i][0].set_ylabel("accuracy", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def complete_records(recs: List[Dict[str, object]], methods, ratios) -> List[Dict[str, object]]:
    """One copy of each record, keeping a (task, setting, example, ratio) only when every method ran at
    that ratio (so every cell of a ratio column holds the same examples), and the full cache of every
    example that has at least one such ratio."""
    by: Dict[tuple, Dict[tuple, dict]] = {}
    for r in recs:
        by.setdefault((r["task"], r["setting"], r["example"]), {})[(r["method"], r["keep_ratio"])] = r
    out = []
    for item in sorted(by, key=str):
        got = by[item]
        ok = [k for k in ratios if all((m, k) in got for m in methods)]
        if ("full", 1.0) not in got or not ok:
            continue
        out.append(got[("full", 1.0)])
        out += [got[(m, k)] for k in ok for m in methods]
    return out


def cmd_merge(args) -> int:
    out_dir = Path(args.out)
    recs = complete_records(read_records(out_dir), args.methods, args.keep_ratios)
    if not recs:
        print("no finished items yet", file=sys.stderr)
        return 1
    tasks = [t for t in args.tasks if any(r["task"] == t for r in recs)]
    summary = harness.summarize(recs)
    n_max = max(r["example"] for r in recs) + 1
    cfg = harness.EvalConfig(tasks=tasks, methods=list(args.methods), keep_ratios=list(args.keep_ratios),
                             settings=list(SETTINGS), n_examples=n_max, seed=args.seed)
    pairs = harness.paired(recs, cfg)
    lines = [ln for p in sorted(out_dir.glob("records_w*.jsonl")) for ln in p.read_text().splitlines() if ln.strip()]
    item_s = []
    for ln in lines:
        try:
            item_s.append(json.loads(ln)["seconds"])
        except (json.JSONDecodeError, KeyError):
            pass
    n_items = len({(r["task"], r["setting"], r["example"]) for r in recs})
    counts = {t: {s: len({r["example"] for r in recs if r["task"] == t and r["setting"] == s}) for s in SETTINGS}
              for t in tasks}
    merged = {"methods": args.methods, "keep_ratios": args.keep_ratios, "settings": SETTINGS, "seed": args.seed,
              "items": n_items, "runs": len(recs), "item_seconds_sum": round(sum(item_s), 1),
              "n_per_task_setting": counts, "summary": summary, "pairs": [p for p in pairs if p["task"] == "all"],
              "records": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                           if k in KEEP_FIELDS} for r in recs]}

    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    (doc.with_suffix(".json")).write_text(json.dumps(nan_to_none(merged), separators=(",", ":")))
    png = plot(summary, tasks, args.methods, args.keep_ratios, SETTINGS, doc.with_suffix(".png"),
               "SmolLM2-135M, CPU: accuracy vs keep ratio (± 1 SE); full cache dashed")
    table = full_table(summary, tasks, args.methods, args.keep_ratios, SETTINGS)
    pooled = [p for p in pairs if p["task"] == "all"]
    ptab = ["| shotkv vs | keep | n | shotkv - other ± paired SE | wins | losses | kept shotkv | kept other |",
            "|---|---|---|---|---|---|---|---|"]
    for p in pooled:
        ptab.append(f"| {p['b']} | {p['keep_ratio']:g} | {p['n']} | {fmt(p['mean_diff'], 3)} ± "
                    f"{fmt(p['se'], 3)} | {p['wins']} | {p['losses']} | {fmt(p['kv_kept_a'])} | "
                    f"{fmt(p['kv_kept_b'])} |")
    ntab = ["| task | setting | " + " | ".join(f"n at keep {k:g}" for k in args.keep_ratios) + " |",
            "|---|---|" + "---|" * len(args.keep_ratios)]
    for t in tasks:
        for s in SETTINGS:
            ns = [len({r["example"] for r in recs if r["task"] == t and r["setting"] == s and r["keep_ratio"] == k})
                  for k in args.keep_ratios]
            ntab.append(f"| {t} | {s} | " + " | ".join(map(str, ns)) + " |")
    (out_dir / "generated_sizes.md").write_text("\n".join(ntab) + "\n")
    # ShotKV vs each method on the discriminating tasks, pooled over lookup + passkey, per setting
    idx = {(r["task"], r["setting"], r["example"], r["method"], r["keep_ratio"]): r["score"] for r in recs}
    dtab = ["| setting | shotkv vs | keep | n | shotkv - other ± paired SE | wins | losses |",
            "|---|---|---|---|---|---|---|"]
    for s in SETTINGS:
        for other in [m for m in args.methods if m != "shotkv"]:
            for k in args.keep_ratios:
                both = [((t, s, e, "shotkv", k), (t, s, e, other, k))
                        for (t, s2, e, m, kk) in idx if m == "shotkv" and kk == k and s2 == s
                        and t in DISCRIMINATING and (t, s, e, other, k) in idx]
                if both:
                    pr = paired_diff([idx[a] for a, _ in both], [idx[b] for _, b in both])
                    dtab.append(f"| {s} | {other} | {k:g} | {pr['n']} | {fmt(pr['mean_diff'], 3)} ± "
                                f"{fmt(pr['se'], 3)} | {pr['wins']} | {pr['losses']} |")
    generated = out_dir / "generated_table.md"
    generated.write_text(table + "\n\nPaired on the discriminating tasks (lookup + passkey pooled, same examples), "
                         "per setting:\n\n" + "\n".join(dtab)
                         + "\n\nPaired, pooled over every task and both settings (same examples):\n\n" + "\n".join(ptab)
                         + "\n\nn per (task, setting): " + json.dumps(counts) + "\n")
    print(generated.read_text())
    print(f"items {n_items}, runs {len(recs)}, item seconds summed {sum(item_s):.0f}; plot: {png}")
    if args.insert:
        text = doc.read_text()
        a, b = "<!-- table:begin -->", "<!-- table:end -->"
        if a in text and b in text:
            head, rest = text.split(a, 1)
            _, tail = rest.split(b, 1)
            text = head + a + "\n" + generated.read_text() + b + tail
        a, b = "<!-- sizes:begin -->", "<!-- sizes:end -->"
        if a in text and b in text:
            head, rest = text.split(a, 1)
            _, tail = rest.split(b, 1)
            text = head + a + "\n" + "\n".join(ntab) + "\n" + b + tail
        doc.write_text(text)
        print(f"tables inserted into {doc}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("work", "merge"):
        q = sub.add_parser(name)
        q.add_argument("--out", default="results/full_table", help="folder of the JSONL records")
        q.add_argument("--methods", nargs="+", default=METHODS)
        q.add_argument("--keep-ratios", nargs="+", type=float, default=RATIOS)
        q.add_argument("--tasks", nargs="+", default=DISCRIMINATING + CONTROLS)
        q.add_argument("--seed", type=int, default=0)
    w = sub.choices["work"]
    w.add_argument("--worker", type=int, default=0, help="worker id (names its records file)")
    w.add_argument("--n", type=int, default=30, help="examples of each discriminating task (lookup, passkey)")
    w.add_argument("--control-n", type=int, default=10, help="examples of each control task")
    w.add_argument("--core-n", type=int, default=24, help="discriminating examples in the first priority tier")
    w.add_argument("--control-core-n", type=int, default=6, help="control examples in the first priority tier")
    w.add_argument("--control-pace", type=float, default=3.0,
                   help="discriminating examples per control example in the first tier (default 3)")
    m = sub.choices["merge"]
    m.add_argument("--doc", default="docs/results/eval_full_table.md")
    m.add_argument("--insert", action="store_true", help="replace the table between the doc's table markers")
    args = p.parse_args(argv)
    if args.cmd == "work" and args.worker < 0:
        p.error(f"--worker must be >= 0, got {args.worker}")
    return cmd_work(args) if args.cmd == "work" else cmd_merge(args)


if __name__ == "__main__":
    sys.exit(main())
