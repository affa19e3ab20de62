"""Task generators of the quality harness: deterministic, answers where they should be, depth balanced;
scoring; the harness's metric helpers. No model is loaded here (tests/test_cli.py runs the model)."""

import math
import re

import pytest
import torch

from kvpress_kernels.evaluation import harness
from kvpress_kernels.evaluation.tasks import TASK_NAMES, answer_line, generate_task, score


@pytest.mark.parametrize("task", TASK_NAMES)
def test_deterministic_for_a_seed(task):
    a = generate_task(task, 7, seed=3)
    b = generate_task(task, 7, seed=3)
    c = generate_task(task, 7, seed=4)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert [e.answer for e in a] == [e.answer for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in c]
    # examples of one call differ from each other
    assert len({e.prompt for e in a}) == len(a)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_structure(task):
    for ex in generate_task(task, 6, seed=0, n_shots=10):
        assert ex.prompt == ex.context + ex.question
        assert ex.question.startswith("Q: ")
        assert ex.question.endswith("\nA:" if task != "passkey" else "\nA: The pass key is")
        assert ex.context.endswith("\n\n")
        # shot spans: in range, increasing, disjoint; each is a whole "Q:/A:" block (or paragraph)
        prev = 0
        for s, e in ex.shot_spans:
            assert prev <= s < e <= len(ex.context)
            prev = e
        assert len(ex.shot_spans) >= 10
        assert ex.max_new_tokens >= 3
        # the question is never inside a shot
        assert ex.shot_spans[-1][1] <= len(ex.context)


@pytest.mark.parametrize("task", ["lookup", "passkey", "multi_answer"])
def test_answer_sits_in_exactly_the_answer_shot(task):
    for ex in generate_task(task, 8, seed=1, n_shots=12):
        s, e = ex.shot_spans[ex.answer_shot]
        items = ex.items or [ex.answer]
        # the first-listed balanced item, or the single answer, is in its shot
        shot_text = ex.context[s:e]
        assert any(re.search(rf"\b{it}\b", shot_text) for it in items)
        if task != "multi_answer":
            # and in no other shot
            others = [ex.context[a:b] for k, (a, b) in enumerate(ex.shot_spans) if k != ex.answer_shot]
            assert not any(re.search(rf"\b{ex.answer}\b", o) for o in others)
        else:
            # every turn asks about a distinct shot, whose code is the turn's gold answer
            assert ex.answer == items[0] and len(ex.turns) == len(items) - 1 >= 2
            words = [re.match(r"Q: What is the code of (\w+)\?", q).group(1) for q in [ex.question] +
                     [q for q, _ in ex.turns]]
            assert len(set(words)) == len(words)
            for w, it in zip(words, items):
                assert f"Q: What is the code of {w}?\nA: {it}\n" in ex.context


def test_lookup_question_asks_the_answer_shot_word():
    for ex in generate_task("lookup", 5, seed=2, n_shots=9):
        word = re.match(r"Q: What is the code of (\w+)\?", ex.question).group(1)
        s, e = ex.shot_spans[ex.answer_shot]
        assert ex.context[s:e].startswith(f"Q: What is the code of {word}?\nA: {ex.answer}")


@pytest.mark.parametrize("task", ["arithmetic", "pattern"])
def test_rule_tasks_gold_answers(task):
    for ex in generate_task(task, 10, seed=0):
        q = ex.question[3:-3]
        if task == "arithmetic":
            a, b = re.match(r"What is (\d+) plus (\d+)\?", q).groups()
            assert ex.answer == str(int(a) + int(b))
            for s, e in ex.shot_spans:
                a, b, c = re.match(r"Q: What is (\d+) plus (\d+)\?\nA: (\d+)\n\n$", ex.context[s:e]).groups()
                assert int(a) + int(b) == int(c)
        else:
            w1, w2 = q.split()
            assert ex.answer == f"{w2} {w1}"


@pytest.mark.parametrize("task", ["lookup", "passkey", "multi_answer"])
@pytest.mark.parametrize("n,n_shots", [(5, 10), (20, 24), (7, 30)])
def test_depth_balanced(task, n, n_shots):
    exs = generate_task(task, n, seed=0, n_shots=n_shots)
    depths = [ex.depth for ex in exs]
    assert all(0.0 <= d < 1.0 for d in depths)
    # evenly spread: example i's answer shot sits in the i-th n-quantile of the shots
    shots = [ex.answer_shot for ex in exs]
    for i, j in enumerate(shots):
        assert math.floor(i * n_shots / n) <= j <= math.ceil((i + 1) * n_shots / n)
    assert shots == sorted(shots)
    assert min(depths) < 0.25 and max(depths) > 0.6
    # mean depth near the middle of the context
    assert abs(sum(shots) / n / n_shots - 0.5) < 0.5 / n + 1 / n_shots


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        generate_task("nope", 3)
    with pytest.raises(ValueError, match="n must"):
        generate_task("lookup", 0)


def test_scoring():
    ex = generate_task("lookup", 1, seed=0)[0]
    assert score(ex, f" {ex.answer}\nQ: more") == 1.0
    assert score(ex, f" {ex.answer}.") == 1.0
    assert score(ex, f" {ex.answer[:-1]}") == 0.0
    assert score(ex, "") == 0.0
    pk = generate_task("passkey", 1, seed=0)[0]
    assert score(pk, f" The pass key is {pk.answer}.") == 1.0
    assert score(pk, f" {pk.answer}") == 1.0
    assert score(pk, " 12") == 0.0
    ma = generate_task("multi_answer", 1, seed=0)[0]
    k = len(ma.items)
    assert score(ma, [f" {it}\n" for it in ma.items]) == 1.0
    assert score(ma, [f" {it}" for it in ma.items[:2]] + [" 000"] * (k - 2)) == pytest.approx(2 / k)
    assert score(ma, [f" {it}" for it in ma.items[:1]]) == pytest.approx(1 / k)   # missing turns count wrong
    assert score(ma, f" {ma.items[0]}") == pytest.approx(1 / k)
    assert answer_line("\n  42 \nfoo") == "42"


def test_kl_and_stats_helpers():
    p = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0]), -1)
    q = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), -1)
    assert harness.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-7)
    want = float(sum(math.exp(a) * (a - b) for a, b in zip(p.tolist(), q.tolist())))
    assert harness.kl_divergence(p, q) == pytest.approx(want, rel=1e-5)
    m, se = harness._mean_se([1.0, 0.0, 1.0, 0.0])
    assert m == 0.5 and se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))


def test_shared_stats_helpers():
    """kvpress_kernels/evaluation/stats.py: what the harness and the eval scripts in benchmarks/ share."""
    from kvpress_kernels.evaluation import stats

    assert all(math.isnan(v) for v in stats.mean_se([]))
    m, se = stats.mean_se([3.0])
    assert m == 3.0 and math.isnan(se)
    p = stats.paired_diff([1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0])          # diffs +1, 0, -1, +1
    assert (p["n"], p["wins"], p["losses"]) == (4, 2, 1)
    assert p["mean_diff"] == pytest.approx(0.25)
    assert p["se"] == pytest.approx(math.sqrt(sum((d - 0.25) ** 2 for d in (1, 0, -1, 1)) / 3 / 4))
    with pytest.raises(ValueError, match="pair up"):
        stats.paired_diff([1.0], [1.0, 0.0])
    assert stats.nan_to_none({"a": [1.0, math.nan, {"b": math.nan}], "c": "x", "d": 0}) == \
        {"a": [1.0, None, {"b": None}], "c": "x", "d": 0}
    assert stats.fmt(None) == stats.fmt(math.nan) == "-" and stats.fmt(0.12345, 3) == "0.123"
    st = {"prompt_lengths": [10, 99], "kv_tokens_after_prefill": 12, "kv_tokens_final": 30, "kv_tokens_full": 40}
    assert stats.kept_after_prefill(st, 4) == pytest.approx(12 / 40)
    assert stats.kept_final(st) == pytest.approx(0.75)
    assert math.isnan(stats.kept_after_prefill({}, 4)) and math.isnan(stats.kept_final({}))
    assert harness._mean_se is stats.mean_se and harness._f is stats.fmt     # one implementation


def test_summary_pairs_and_depth_from_records():
    cfg = harness.EvalConfig(tasks=["lookup"], methods=["shotkv", "snapkv"], keep_ratios=[0.3],
                             settings=["query_aware"], n_examples=4)
    recs = []
    full_scores, shot_scores, snap_scores = [1, 1, 0, 1], [1, 1, 0, 0], [0, 1, 0, 0]
    for e in range(4):
        base = {"task": "lookup", "setting": "query_aware", "example": e, "depth": e / 4, "answer_shot": e}
        recs.append({**base, "method": "full", "keep_ratio": 1.0, "score": full_scores[e], "agree": 1.0,
                     "kl": 0.0, "kv_kept": 1.0})
        recs.append({**base, "method": "shotkv", "keep_ratio": 0.3, "score": shot_scores[e],
                     "agree": float(shot_scores[e] == full_scores[e]), "kl": 0.1, "kv_kept": 0.25})
        recs.append({**base, "method": "snapkv", "keep_ratio": 0.3, "score": snap_scores[e],
                     "agree": float(snap_scores[e] == full_scores[e]), "kl": 0.2, "kv_kept": 0.3})
    summ = {r["method"]: r for r in harness.summarize(recs)}
    assert summ["full"]["accuracy"] == 0.75
    assert summ["shotkv"]["accuracy"] == 0.5 and summ["shotkv"]["delta_vs_full"] == -0.25
    assert summ["snapkv"]["agreement"] == 0.5
    assert summ["snapkv"]["kl"] == pytest.approx(0.2)
    pooled = [p for p in harness.paired(recs, cfg) if p["task"] == "all"]
    assert len(pooled) == 1 and pooled[0]["a"] == "shotkv" and pooled[0]["b"] == "snapkv"
    assert pooled[0]["mean_diff"] == 0.25 and pooled[0]["wins"] == 1 and pooled[0]["losses"] == 0
    assert pooled[0]["kv_kept_a"] == 0.25 and pooled[0]["kv_kept_b"] == 0.3   # compared at what memory
    res = harness.EvalResult(cfg, {}, recs, harness.summarize(recs), harness.paired(recs, cfg), [])
    assert "| 0.25 | 0.30 |" in harness.format_table(res)
    table = harness.format_depth_table(res, bins=4)
    rows = [ln for ln in table.splitlines() if ln.startswith("| query_aware")]
    assert [ln.split(" | ")[1] for ln in rows] == ["full", "shotkv", "snapkv"]
    assert rows[1].endswith("| 1.00 (1) | 1.00 (1) | 0.00 (1) | 0.00 (1) |")
    depth = harness.by_depth(recs, bins=4)
    assert {d["depth_bin"] for d in depth} == {"0.0-0.2", "0.2-0.5", "0.5-0.8", "0.8-1.0"}
    assert all(d["n"] == 1 for d in depth)


def test_build_method_names_and_ratios():
    from kvpress_kernels.cli import METHOD_NAMES
    for name in METHOD_NAMES:
        m = harness.build_method(name, 0.25)
        if name == "full":
            assert m is None
        else:
            assert m.keep_ratio == pytest.approx(0.25)
    with pytest.raises(ValueError, match="method"):
        harness.build_method("magic", 0.5)


def test_multi_turn_task_chat_holds_the_facts_and_scoring_finds_the_code():
    exs = generate_task("multi_turn", 8, seed=2, n_shots=6)
    for ex in exs:
        assert len(ex.chat) == 6 and ex.chat_question.startswith("What is the code of the ")
        word = re.match(r"What is the code of the (\w+)\?", ex.chat_question).group(1)
        facts = [u for u, _ in ex.chat if f" {word} " in u]
        assert facts == [ex.chat[ex.answer_shot][0]] == [f"The code of the {word} is {ex.answer}."]
        assert all(ex.answer not in u for k, (u, _) in enumerate(ex.chat) if k != ex.answer_shot)
        assert ex.answer in ex.chat[ex.answer_shot][1]                 # the acknowledgement restates it
    ex = exs[0]
    assert score(ex, f"Noted: the code of the x is {ex.answer}.") == 1.0
    assert score(ex, f"It is {ex.answer}") == 1.0
    assert score(ex, f"It is 1{ex.answer}") == 0.0 and score(ex, "OK.") == 0.0 and score(ex, "") == 0.0
    assert {e.answer_shot for e in exs} == set(range(6))               # depth balanced over the fact turns
