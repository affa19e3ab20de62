"""The resumable full-table driver (benchmarks/eval_full_table.py): work items, spread order, claims,
merging of partial records, and that its records are the harness's records."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("eval_full_table", ROOT / "benchmarks" / "eval_full_table.py")
ft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ft)


@pytest.mark.parametrize("n", [1, 2, 6, 10, 24, 30, 31])
def test_spread_order_is_a_spread_permutation(n):
    order = ft.spread_order(n)
    assert sorted(order) == list(range(n))
    if n >= 4:
        half = order[: n // 2]
        # a prefix of half the examples has examples in both halves of [0, n) and both quarters' ends
        assert min(half) < n / 4 and max(half) >= n / 2


@pytest.mark.parametrize("pace", [1.0, 3.0])
def test_work_items_cover_every_run_once_in_priority_order(pace):
    tasks = ft.DISCRIMINATING + ft.CONTROLS
    items = ft.work_items(30, 10, 24, 6, tasks, ft.SETTINGS, ft.RATIOS, control_pace=pace)
    runs = [(t, s, e, r) for t, s, e, rs in items for r in rs]
    want = {(t, s, e, r) for t in tasks for s in ft.SETTINGS
            for e in range(30 if t in ft.DISCRIMINATING else 10) for r in ft.RATIOS}
    assert len(runs) == len(set(runs)) and set(runs) == want
    # tiers: discriminating core + control core w/o 0.5, then discriminating rest, then 0.5 on the control
    # core, then the controls' rest -- the reverse of the order the sweep is cut in
    tier = []
    core = {t: set(ft.spread_order(30 if t in ft.DISCRIMINATING else 10)[: 24 if t in ft.DISCRIMINATING else 6])
            for t in tasks}
    for t, s, e, rs in items:
        if t in ft.DISCRIMINATING:
            tier.append(0 if e in core[t] else 1)
        else:
            tier.append(3 if e not in core[t] else (2 if rs == (0.5,) else 0))
    assert tier == sorted(tier)
    assert all(rs == (0.1, 0.3) for (t, s, e, rs), k in zip(items, tier) if k == 0 and t in ft.CONTROLS)
    # pace: when the controls' r-th example comes, the discriminating tasks have about pace * r + 1 examples
    disc_order = ft.spread_order(30)
    for r in range(6):
        e = ft.spread_order(10)[r]
        first = next(i for i, (t, s, x, rs) in enumerate(items) if t == "arithmetic" and x == e and 0.1 in rs)
        seen = {x for t, s, x, rs in items[:first] if t == "lookup"}
        assert len(seen) == int(pace * r + (pace - 1) / 2) + 1 and seen == set(disc_order[:len(seen)])


def _rec(task, setting, e, method, r, score=1.0):
    return {"task": task, "setting": setting, "example": e, "method": method, "keep_ratio": r, "score": score,
            "agree": 1.0, "kl": 0.0, "kv_kept": r, "depth": 0.5, "answer_shot": 1}


def test_complete_records_keeps_whole_ratio_columns_only():
    methods, ratios = ["a", "b"], [0.1, 0.5]
    recs = [_rec("lookup", "query_aware", 0, "full", 1.0), _rec("lookup", "query_aware", 0, "a", 0.1),
            _rec("lookup", "query_aware", 0, "b", 0.1), _rec("lookup", "query_aware", 0, "a", 0.5),  # b@0.5 missing
            _rec("lookup", "query_aware", 1, "a", 0.1), _rec("lookup", "query_aware", 1, "b", 0.1),  # no full
            _rec("lookup", "query_aware", 0, "a", 0.1)]                                             # a duplicate
    got = ft.complete_records(recs, methods, ratios)
    assert sorted((r["example"], r["method"], r["keep_ratio"]) for r in got) == [(0, "a", 0.1), (0, "b", 0.1),
                                                                                  (0, "full", 1.0)]


def test_claims_exclusive_and_dead_owner_taken_over(tmp_path):
    p = tmp_path / "item"
    assert ft.claim(p) and ft.claim(p)                      # ours, claiming again is a no-op
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    q = tmp_path / "other"
    q.write_text(str(dead))
    assert ft.claim(q) and q.read_text() == str(__import__("os").getpid())
    r = tmp_path / "live"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        r.write_text(str(live.pid))
        assert not ft.claim(r)
    finally:
        live.kill()
        live.wait()


def test_read_records_skips_a_line_cut_by_a_kill(tmp_path):
    good = {"records": [_rec("lookup", "query_aware", 0, "full", 1.0)]}
    (tmp_path / "records_w0.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good)[:20])
    assert len(ft.read_records(tmp_path)) == 1


@pytest.mark.slow
def test_run_item_records_equal_run_eval_records():
    from kvpress_kernels.evaluation import harness
    from kvpress_kernels.evaluation.model import load_smollm2
    from kvpress_kernels.evaluation.tasks import generate_task

    model, tok = load_smollm2()
    cfg = harness.EvalConfig(tasks=["lookup"], methods=["tova", "knorm"], keep_ratios=[0.3],
                             settings=["query_agnostic"], n_examples=1, n_shots=8)
    want = harness.run_eval(cfg, progress=False, model=model, tok=tok).records
    prep = harness.prepare(generate_task("lookup", 1, n_shots=8)[0], tok)
    cfg_t = model.config
    got = ft.run_item(model, tok, prep, "query_agnostic", [("tova", 0.3), ("knorm", 0.3)],
                      cfg_t.num_hidden_layers * cfg_t.num_key_value_heads)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(got) == strip(want)
    assert [r["method"] for r in got] == ["full", "tova", "knorm"]
    assert all(0 < r["kv_kept"] < 0.5 for r in got[1:])
