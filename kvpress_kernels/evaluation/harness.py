"""The quality harness: compression methods x keep ratios on SmolLM2-135M, on CPU, in two settings.

Settings (reported apart):

- ``query_aware``: the prompt is context + question and is compressed as a whole at prefill (the
  question is in the observation window), as in the ShotKV study's few-shot prompts.
- ``query_agnostic``: the context alone is prefilled and compressed; then the question is fed through
  the compressed cache (as one multi-token step) and the answer generated — what kvpress's pipeline
  does when the question arrives later. The question's tokens are prompt (an extension of the
  compressed prefill), so a decoding phase (ShotKV's, H2O's) never evicts them.
- ``multi_turn`` (not in the default sweep; the ``multi_turn`` task only): a chat over the tokenizer's
  chat template (:class:`~kvpress_kernels.sessions.ChatSession`): fact turns, each acknowledged, the
  cache re-compressed to the keep ratio of the conversation so far after every turn (ShotKV keeps or
  drops whole past exchanges; SnapKV / StreamingLLM re-select tokens by their own rules; the latest turn
  is protected and is the observation window), then a turn asking for one fact. ``kv_kept`` is the
  fraction of the conversation held when the question is answered. ``multi_turn_at_question``: the same
  conversation with the budget enforced only when the question is asked (history kept whole until then:
  query-aware re-compression of the whole chat).
- ``multi_question`` (not in the default sweep): the context alone is prefilled and compressed once;
  every question of the example (the main one, then ``multi_answer``'s follow-ups) is answered from
  its own copy of that cache (:meth:`PagedCache.fork`: the copies share the context's pages), which
  is released afterwards. ``kv_bytes_pool_peak`` records the most memory the context and one copy held.

Every run goes through the transformers integration (:func:`kvpress_kernels.compress`); the baseline
is the same paged path with ``method=None`` (the full cache), so that differences come from eviction
alone. Decoding is greedy, one token per forward call, stopping at the end of the answer line; for
``multi_answer`` each follow-up question is then fed (after a blank line) through the same cache and
answered in turn, so the cache grows while decoding.

Cost: about one second per run for a 24-shot prompt (~450 tokens) on an idle 2-core CPU, so the
default sweep (5 tasks x 20 examples x 2 settings x (1 + 7 methods x 3 ratios) = 4400 runs) takes
over an hour; ``--quick`` (36 runs) well under a minute after the model is loaded.

Metrics per (task, setting, method, keep ratio), each with its standard error over examples:

- ``accuracy``: the task's score (:func:`kvpress_kernels.evaluation.tasks.score`);
- ``agreement``: the answer line equals the full cache's;
- ``kl``: next-token KL divergence ``KL(p_full || p_method)`` (nats) at the first answer token whose
  distribution the compression can change, with the same prefix in both runs — the first answer token
  in ``query_agnostic``, the second in ``query_aware`` (the first comes from the prefill pass, which
  attends to the whole prompt before the cache is compressed);
- ``delta_vs_full``: paired accuracy difference to the full cache (method - full), mean and paired SE;
- ``kv_kept``: cached tokens once prefill compression is done / prefilled tokens (all layers and kv
  heads; in ``query_agnostic`` the prefill is the context). The memory this frees is in
  ``kv_bytes_after_prefill`` of each record (page granularity). ``kv_kept_final``: the same at the end of
  the generation (decoding-phase compression included). Every record carries both (1.0 for the full
  cache), so methods are compared at the memory they really held.

Paired comparisons between methods at the same keep ratio (same examples) are in ``pairs``, each with
both methods' mean ``kv_kept`` (``kv_kept_a``, ``kv_kept_b``): a comparison is at equal memory only when
those agree.
"""

from __future__ import annotations

import json
import math

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .stats import fmt, kept_after_prefill, kept_final, kv_rows, mean_se, nan_to_none, paired_diff
from .tasks import TASK_NAMES, Example, answer_line, generate_task, score

SETTINGS = ("query_aware", "query_agnostic", "multi_question", "multi_turn", "multi_turn_at_question")


@dataclass
class EvalConfig:
    tasks: List[str] = field(default_factory=lambda: [t for t in TASK_NAMES if t != "multi_turn"])
    methods: List[str] = field(default_factory=lambda: ["shotkv", "shotkv_decode", "snapkv", "pyramidkv", "chunkkv",
                                                        "streamingllm", "h2o"])
    keep_ratios: List[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])
    settings: List[str] = field(default_factory=lambda: ["query_aware", "query_agnostic"])
    n_examples: int = 20
    n_shots: Optional[int] = None
    seed: int = 0
    backend: Optional[str] = None
    quick: bool = False

    @classmethod
    def defaults(cls, quick: bool = False) -> "EvalConfig":
        if quick:
            return cls(tasks=["lookup", "passkey"], methods=["shotkv", "snapkv"], keep_ratios=[0.3],
                       n_examples=3, n_shots=12, quick=True)
        return cls()


def build_method(name: str, keep_ratio: float):
    """A method instance by CLI name (``keep_ratio`` = fraction KEPT); ``full`` -> ``None``.

    ``shotkv`` is ShotKV's prefill phase alone (``decode_keep_ratio=1``), comparable with the other
    prefill-time methods; ``shotkv_decode`` adds its decoding phase at the same ratio. Caveat of the
    decoding phase here: tokens fed after prefill — the question in ``query_agnostic``, the follow-up
    questions of ``multi_answer`` — are prompt tokens (multi-token forwards extend the prompt, see
    docs/METHODS.md "Sessions"), so the decoding phase compresses only the generated answers.
    Options in brackets go to the constructor (:func:`parse_method_name`): ``shotkv[shot_score=max]``.
    """
    from .. import methods as M

    base, options = parse_method_name(name)
    builders = {
        "full": lambda r, **kw: None,
        "shotkv": lambda r, **kw: M.ShotKV(prefill_keep_ratio=r, decode_keep_ratio=1.0, **kw),
        "shotkv_decode": lambda r, **kw: M.ShotKV(prefill_keep_ratio=r, decode_keep_ratio=r, **kw),
        "snapkv": lambda r, **kw: M.SnapKV(keep_ratio=r, **kw),
        "adakv": lambda r, **kw: M.AdaKV(keep_ratio=r, **kw),
        "pyramidkv": lambda r, **kw: M.PyramidKV(keep_ratio=r, **kw),
        "chunkkv": lambda r, **kw: M.ChunkKV(keep_ratio=r, **kw),
        "streamingllm": lambda r, **kw: M.StreamingLLM(keep_ratio=r, **kw),
        "h2o": lambda r, **kw: M.H2O(keep_ratio=r, **kw),
        "knorm": lambda r, **kw: M.KNorm(keep_ratio=r, **kw),
        "tova": lambda r, **kw: M.TOVA(keep_ratio=r, **kw),
        # KVzip: reconstruction scores after the prefill (run_once passes the tokenizer), one budget over all
        # layers and kv heads; kvzip_shotkv: ShotKV's prefill phase ranking shots by KVzip scores
        "kvzip": lambda r, **kw: M.KVzip(keep_ratio=r, **kw),
        "kvzip_shotkv": lambda r, **kw: M.KVzip(keep_ratio=r, select="shots", **kw),
    }
    if base not in builders:
        raise ValueError(f"method must be one of {sorted(builders)}, got {name!r}")
    if base == "full" and options:
        raise ValueError(f"the full cache takes no options, got {name!r}")
    return builders[base](keep_ratio, **options)


def parse_method_name(name: str) -> Tuple[str, Dict[str, object]]:
    """``"shotkv[shot_score=max,shot_topk=4]"`` -> ``("shotkv", {"shot_score": "max", "shot_topk": 4})``:
    a CLI name with constructor options (values parsed as int, then float, else kept as strings)."""
    if "[" not in name:
        return name, {}
    if not name.endswith("]"):
        raise ValueError(f"method options go in brackets at the end, e.g. 'shotkv[shot_score=max]', got {name!r}")
    base, body = name[:-1].split("[", 1)
    options: Dict[str, object] = {}
    for item in filter(None, body.split(",")):
        if "=" not in item:
            raise ValueError(f"method option {item!r} of {name!r} must be key=value")
        key, raw = (t.strip() for t in item.split("=", 1))
        value: object = raw
        for conv in (int, float):
            try:
                value = conv(raw)
                break
            except ValueError:
                pass
        options[key] = value
    return base, options


# --------------------------------------------------------------------------- one run
@dataclass
class Prepared:
    example: Example
    ctx_ids: "object"          # torch.LongTensor [1, Nc] (BOS + context)
    q_ids: "object"            # torch.LongTensor [1, Nq] (question, no BOS)
    shots: List[Tuple[int, int]]  # token spans of the shots inside ctx_ids (also valid for ctx + question)


def prepare(example: Example, tok) -> Prepared:
    import torch

    enc = tok(example.context, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offs, special = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
    spans = []
    for s, e in example.shot_spans:
        toks = [t for t, ((a, _b), sp) in enumerate(zip(offs, special)) if not sp and s <= a < e]
        if toks:
            spans.append((toks[0], toks[-1] + 1))
    q = tok(example.question, add_special_tokens=False)["input_ids"]
    return Prepared(example, torch.tensor([ids]), torch.tensor([q]), spans)


@dataclass
class RunOutput:
    texts: List[str]           # generated text of each turn (one turn except for multi_answer)
    n_new: int
    logprobs: "object"         # torch.FloatTensor [vocab]: log-softmax at the first affected step
    stats: Dict[str, object]
    seconds: float

    @property
    def text(self) -> str:
        return self.texts[0]

    def lines(self) -> List[str]:
        return [answer_line(t) for t in self.texts]


def _stop(tok, new_ids: List[int], eos: set) -> bool:
    if new_ids and new_ids[-1] in eos:
        return True
    text = tok.decode(new_ids, skip_special_tokens=True)
    return "\n" in text.lstrip()


def _turn(model, tok, cache, logits, max_new: int, eos: set, min_steps: int):
    """Greedy answer line from ``logits`` on; returns (new ids, ids fed to the model, step logits).
    The stop token (the one holding the newline) is not fed unless ``min_steps`` needs its logits."""
    import torch

    step_logits = [logits]
    new: List[int] = []
    while True:
        nxt = int(logits.argmax())
        new.append(nxt)
        done = len(new) >= max_new or _stop(tok, new, eos)
        if done and len(step_logits) >= min_steps:
            break
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1].float()
        step_logits.append(logits)
        if done:
            break
    return new, new[:len(step_logits) - 1], step_logits


def _prefill(model, tok, cache, method, ids):
    """Prefill ``ids`` into ``cache``; a method that compresses after the whole prefill (KVzip) then runs."""
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    if hasattr(method, "compress_prefilled"):
        method.compress_prefilled(model, cache, ids, tokenizer=tok)
    return out


def run_once(model, tok, prep: Prepared, method, setting: str, *, backend: Optional[str] = None) -> RunOutput:
    """Generate the answer(s) of one prepared example under ``method`` (``None`` = full cache)."""
    import torch

    from ..integrations.transformers import compress

    ex = prep.example
    if setting in ("multi_turn", "multi_turn_at_question"):
        return _run_multi_turn(model, tok, ex, method, backend,
                               "every_turn" if setting == "multi_turn" else "at_question")
    eos = {i for i in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if isinstance(i, int)}
    min_steps = 2 if setting == "query_aware" else 1      # the step whose logits the KL compares
    extra = sum(len(tok(q)["input_ids"]) + 2 + ex.max_new_tokens for q, _ in ex.turns)
    t0 = time.perf_counter()
    with torch.no_grad(), compress(model, method, shots=[prep.shots], backend=backend) as session:
        cache = session.new_cache(max_new_tokens=ex.max_new_tokens + prep.q_ids.shape[1] + extra)
        if setting == "multi_question":
            _prefill(model, tok, cache, method, prep.ctx_ids)
            texts, n_new, lp, peak, stats = [], 0, None, 0, {}
            for question in [ex.question] + [q for q, _ in ex.turns]:
                copy = cache.fork()                      # shares the compressed context's pages
                ids = torch.tensor([tok(question, add_special_tokens=False)["input_ids"]])
                out = model(input_ids=ids, past_key_values=copy, use_cache=True, logits_to_keep=1)
                new, _, step_logits = _turn(model, tok, copy, out.logits[0, -1].float(), ex.max_new_tokens, eos, 1)
                if lp is None:
                    lp = torch.log_softmax(step_logits[0], -1)
                    copy.finish()
                    stats = copy.stats()
                peak = max(peak, copy.kv.pool_bytes_in_use())
                texts.append(tok.decode(new, skip_special_tokens=True))
                n_new += len(new)
                copy.release()
            stats["kv_bytes_pool_peak"] = peak
            return RunOutput(texts, n_new, lp, stats, time.perf_counter() - t0)
        if setting == "query_aware":
            out = _prefill(model, tok, cache, method, torch.cat([prep.ctx_ids, prep.q_ids], 1))
        else:
            _prefill(model, tok, cache, method, prep.ctx_ids)
            out = model(input_ids=prep.q_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        new, fed, step_logits = _turn(model, tok, cache, out.logits[0, -1].float(), ex.max_new_tokens, eos, min_steps)
        lp = torch.log_softmax(step_logits[min_steps - 1], -1)
        texts, n_new = [tok.decode(new, skip_special_tokens=True)], len(new)
        for question, _ in ex.turns:
            # a blank line between the answer and the next question, whatever part of it was fed
            fed_text = tok.decode(fed, skip_special_tokens=True)
            sep = "\n" * max(0, 2 - (len(fed_text) - len(fed_text.rstrip("\n"))))
            ids = torch.tensor([tok(sep + question, add_special_tokens=False)["input_ids"]])
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            new, fed, _ = _turn(model, tok, cache, out.logits[0, -1].float(), ex.max_new_tokens, eos, 1)
            texts.append(tok.decode(new, skip_special_tokens=True))
            n_new += len(new)
        cache.finish()
        stats = cache.stats()
    return RunOutput(texts, n_new, lp, stats, time.perf_counter() - t0)


def _run_multi_turn(model, tok, ex: Example, method, backend: Optional[str], budget: str) -> RunOutput:
    """The ``multi_turn`` setting: the example's chat through a :class:`~kvpress_kernels.sessions.ChatSession`
    — fact turns appended with their given acknowledgement, the budget enforced after each (past exchanges
    are segments for ShotKV, the latest turn protected and the observation window), then the question asked
    and the answer generated greedily. ``kv_tokens_after_prefill`` / ``prompt_lengths`` describe the cache
    when the question is answered (after its re-compression), so ``kv_kept`` is the fraction of the
    conversation held then."""
    import torch

    from ..sessions import ChatSession
    from .tasks import CHAT_SYSTEM

    if not ex.chat:
        raise ValueError(f"the multi_turn setting needs a task with chat turns (multi_turn), got task {ex.task!r}")
    t0 = time.perf_counter()
    chat = ChatSession(model, tok, method, system=CHAT_SYSTEM, window=128, budget=budget, backend=backend)
    for user, assistant in ex.chat:
        chat.add_exchange(user, assistant)
    text = chat.ask(ex.chat_question, max_new_tokens=ex.max_new_tokens, do_sample=False)
    lp = torch.log_softmax(chat.last_scores[0][0].float(), -1)
    h = chat.history[-1]
    st = chat.cache.stats()
    kv = chat.cache.kv
    rows = kv.num_layers * kv.num_kv_heads
    at_q = h["prompt_len"] - 1                                   # tokens when the question's budget is enforced
    held_q = rows * at_q if h["recompress"] is None else int(sum(map(sum, (map(sum, r) for r in h["recompress"]["kept"]))))
    st.update({"prompt_lengths": [at_q], "kv_tokens_after_prefill": held_q, "turns": len(chat.history),
               "conversation_tokens": h["seen"]})
    chat.close()
    return RunOutput([text], h["answer_tokens"], lp, st, time.perf_counter() - t0)


def kl_divergence(lp_ref, lp) -> float:
    """``KL(p_ref || p)`` in nats from two log-probability vectors."""
    import torch
    return float(torch.sum(lp_ref.exp() * (lp_ref - lp)).clamp_min(0.0))


# --------------------------------------------------------------------------- the sweep
@dataclass
class EvalResult:
    config: EvalConfig
    meta: Dict[str, object]
    records: List[Dict[str, object]]      # one per (task, example, setting, method, ratio); method "full" too
    summary: List[Dict[str, object]]      # one per (task, setting, method, ratio)
    pairs: List[Dict[str, object]]        # paired method-vs-method comparisons
    depth: List[Dict[str, object]]        # accuracy per depth bin (tasks with an answer-bearing shot)


_mean_se = mean_se          # the name the harness's callers (and tests) have used


def example_records(model, tok, prep: Prepared, setting: str, variants: Sequence[Tuple[str, float]], n_rows: int,
                    *, backend: Optional[str] = None, on_run=None) -> List[Dict[str, object]]:
    """The records of one prepared example in one setting: the full cache, then every ``(method name, keep
    ratio)`` of ``variants``, each compared with the full cache (``agree``, ``kl``); ``n_rows``
    = layers x kv heads (:func:`~kvpress_kernels.evaluation.stats.kv_rows`) for ``kv_kept``. ``on_run()``
    is called after every run (a progress bar)."""
    ex = prep.example
    full = run_once(model, tok, prep, None, setting, backend=backend)
    if on_run is not None:
        on_run()
    full_lines = full.lines()
    base = {"task": ex.task, "example": ex.index, "setting": setting, "depth": ex.depth,
            "answer_shot": ex.answer_shot, "gold": ex.answer,
            "prompt_tokens": int(prep.ctx_ids.shape[1] + prep.q_ids.shape[1]), "n_shots": len(prep.shots)}
    recs = [{**base, "method": "full", "keep_ratio": 1.0, "answer": " | ".join(full_lines),
             "score": score(ex, full.texts if ex.turns else full.text), "agree": 1.0, "kl": 0.0,
             "kv_kept": 1.0, "kv_kept_final": 1.0, "kv_bytes_after_prefill": full.stats.get("kv_bytes_after_prefill"),
             "seconds": full.seconds}]
    for name, ratio in variants:
        out = run_once(model, tok, prep, build_method(name, ratio), setting, backend=backend)
        if on_run is not None:
            on_run()
        st = out.stats
        lines = out.lines()
        recs.append({**base, "method": name, "keep_ratio": ratio, "answer": " | ".join(lines),
                     "score": score(ex, out.texts if ex.turns else out.text), "agree": float(lines == full_lines),
                     "kl": kl_divergence(full.logprobs, out.logprobs), "kv_kept": kept_after_prefill(st, n_rows),
                     "kv_kept_final": kept_final(st), "kv_bytes_after_prefill": st.get("kv_bytes_after_prefill"),
                     "seconds": out.seconds})
    return recs


def run_eval(cfg: EvalConfig, *, progress: bool = True, model=None, tok=None) -> EvalResult:
    """Run the sweep of ``cfg``; loads SmolLM2 unless ``model``/``tok`` are given."""
    import torch
    from tqdm.auto import tqdm

    from .model import load_smollm2, model_name

    for name in cfg.methods:
        build_method(name, 0.5)                     # fail fast on an unknown name
    for r in cfg.keep_ratios:
        if not (0.0 < r <= 1.0):
            raise ValueError(f"keep ratio must be in (0, 1], got {r}")
    for s in cfg.settings:
        if s not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {s!r}")
    t_start = time.perf_counter()
    if model is None:
        model, tok = load_smollm2()
    torch.set_grad_enabled(False)
    examples = {t: generate_task(t, cfg.n_examples, seed=cfg.seed, n_shots=cfg.n_shots) for t in cfg.tasks}
    prepared = {t: [prepare(ex, tok) for ex in exs] for t, exs in examples.items()}
    variants = [(m, r) for m in cfg.methods for r in cfg.keep_ratios]
    n_rows = kv_rows(model)
    total = sum(len(v) for v in prepared.values()) * len(cfg.settings) * (1 + len(variants))
    records: List[Dict[str, object]] = []
    bar = tqdm(total=total, desc="eval", unit="run", disable=not progress)
    for task, preps in prepared.items():
        for prep in preps:
            for setting in cfg.settings:
                bar.set_postfix_str(f"{task} {setting}")
                records += example_records(model, tok, prep, setting, variants, n_rows, backend=cfg.backend,
                                           on_run=lambda: bar.update(1))
    bar.close()
    meta = {"model": model_name(), "torch": torch.__version__, "device": "cpu",
            "wall_s": round(time.perf_counter() - t_start, 1), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        from .._backend import info
        meta["backend"] = cfg.backend or "by device (reference on CPU)"
        meta["torch_info"] = info().get("torch")
    except Exception:
        pass
    return EvalResult(cfg, meta, records, summarize(records), paired(records, cfg), by_depth(records))


def summarize(records: List[Dict[str, object]]) -> List[Dict[str, object]]:
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["setting"], r["method"], r["keep_ratio"]), []).append(r)
    full = {(r["task"], r["setting"], r["example"]): r["score"] for r in records if r["method"] == "full"}
    out = []
    for (task, setting, method, ratio), rs in groups.items():
        acc, acc_se = _mean_se([r["score"] for r in rs])
        agr, agr_se = _mean_se([r["agree"] for r in rs])
        kl, kl_se = _mean_se([r["kl"] for r in rs])
        d, d_se = _mean_se([r["score"] - full[(task, setting, r["example"])] for r in rs])
        kept, _ = _mean_se([r["kv_kept"] for r in rs])
        out.append({"task": task, "setting": setting, "method": method, "keep_ratio": ratio, "n": len(rs),
                    "accuracy": acc, "accuracy_se": acc_se, "agreement": agr, "agreement_se": agr_se,
                    "kl": kl, "kl_se": kl_se, "delta_vs_full": d, "delta_vs_full_se": d_se, "kv_kept": kept})
    order = {m: i for i, m in enumerate(["full", "shotkv", "shotkv_decode", "snapkv", "pyramidkv", "chunkkv",
                                         "streamingllm", "h2o", "adakv", "tova", "knorm", "kvzip", "kvzip_shotkv"])}
    out.sort(key=lambda r: (r["task"], r["setting"], r["keep_ratio"] if r["method"] != "full" else -1,
                            order.get(r["method"], 99)))
    return out


def paired(records: List[Dict[str, object]], cfg: EvalConfig) -> List[Dict[str, object]]:
    """ShotKV (or the first method) against every other method, same examples and keep ratio:
    mean score difference, its paired standard error, wins / losses; per (task, setting) and pooled."""
    if not cfg.methods:
        return []
    anchor = "shotkv" if "shotkv" in cfg.methods else cfg.methods[0]        # ShotKV (prefill) vs each
    idx = {(r["task"], r["setting"], r["example"], r["method"], r["keep_ratio"]): r["score"] for r in records}
    kept = {(r["task"], r["setting"], r["example"], r["method"], r["keep_ratio"]): r.get("kv_kept", math.nan)
            for r in records}
    out = []
    for other in [m for m in cfg.methods if m != anchor]:
        for ratio in cfg.keep_ratios:
            pooled_a: List[float] = []
            pooled_b: List[float] = []
            pooled_ka: List[float] = []
            pooled_kb: List[float] = []
            for task in cfg.tasks:
                for setting in cfg.settings:
                    keys = [(e, (task, setting, e, anchor, ratio), (task, setting, e, other, ratio))
                            for e in range(cfg.n_examples)]
                    keys = [(e, a, b) for e, a, b in keys if a in idx and b in idx]
                    sa, sb = [idx[a] for _, a, _ in keys], [idx[b] for _, _, b in keys]
                    ka, kb = [kept[a] for _, a, _ in keys], [kept[b] for _, _, b in keys]
                    pooled_a += sa
                    pooled_b += sb
                    pooled_ka += ka
                    pooled_kb += kb
                    out.append({"a": anchor, "b": other, "keep_ratio": ratio, "task": task, "setting": setting,
                                **paired_diff(sa, sb), "kv_kept_a": _mean_se(ka)[0], "kv_kept_b": _mean_se(kb)[0]})
            out.append({"a": anchor, "b": other, "keep_ratio": ratio, "task": "all", "setting": "all",
                        **paired_diff(pooled_a, pooled_b), "kv_kept_a": _mean_se(pooled_ka)[0],
                        "kv_kept_b": _mean_se(pooled_kb)[0]})
    return out


def by_depth(records: List[Dict[str, object]], bins: int = 5) -> List[Dict[str, object]]:
    groups: Dict[tuple, List[float]] = {}
    for r in records:
        if r["answer_shot"] is None:
            continue
        b = min(bins - 1, int(r["depth"] * bins))
        groups.setdefault((r["task"], r["setting"], r["method"], r["keep_ratio"], b), []).append(r["score"])
    return [{"task": t, "setting": s, "method": m, "keep_ratio": k, "depth_bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}",
             "n": len(v), "accuracy": sum(v) / len(v)} for (t, s, m, k, b), v in sorted(groups.items(), key=str)]


# --------------------------------------------------------------------------- output
_f = fmt                    # the table-cell formatter, by the name the eval scripts have used


def format_table(result: EvalResult) -> str:
    """Markdown table of the summary (what the CLI prints and ``table.md`` holds)."""
    lines = ["| task | setting | method | keep | n | accuracy | agreement | next-token KL | Δ vs full | KV kept |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.summary:
        lines.append(f"| {r['task']} | {r['setting']} | {r['method']} | {_f(r['keep_ratio'])} | {r['n']} | "
                     f"{_f(r['accuracy'])} ± {_f(r['accuracy_se'])} | {_f(r['agreement'])} ± {_f(r['agreement_se'])} | "
                     f"{_f(r['kl'], 3)} ± {_f(r['kl_se'], 3)} | {_f(r['delta_vs_full'])} ± {_f(r['delta_vs_full_se'])} | "
                     f"{_f(r['kv_kept'])} |")
    pooled = [p for p in result.pairs if p["task"] == "all"]
    if pooled:
        lines += ["", "Paired (same examples): mean score difference a - b ± paired SE, wins/losses, and the KV "
                  "fraction each really kept after prefill", "",
                  "| a | b | keep | n | a - b | wins | losses | KV kept a | KV kept b |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in pooled:
            lines.append(f"| {p['a']} | {p['b']} | {_f(p['keep_ratio'])} | {p['n']} | {_f(p['mean_diff'], 3)} ± "
                         f"{_f(p['se'], 3)} | {p['wins']} | {p['losses']} | {_f(p.get('kv_kept_a'))} | "
                         f"{_f(p.get('kv_kept_b'))} |")
    return "\n".join(lines)


def format_depth_table(result: EvalResult, bins: int = 5) -> str:
    """Accuracy by depth of the answer-bearing shot (tasks that have one, pooled), per setting, method
    and keep ratio: does a method lose answers at the start, middle or end of the context?"""
    groups: Dict[tuple, Dict[int, List[float]]] = {}
    for r in result.records:
        if r["answer_shot"] is None:
            continue
        b = min(bins - 1, int(r["depth"] * bins))
        groups.setdefault((r["setting"], r["method"], r["keep_ratio"]), {}).setdefault(b, []).append(r["score"])
    if not groups:
        return ""
    heads = [f"{b / bins:.1f}-{(b + 1) / bins:.1f}" for b in range(bins)]
    lines = ["Accuracy by answer depth (tasks with an answer-bearing shot, pooled; n per cell in brackets)", "",
             "| setting | method | keep | " + " | ".join(heads) + " |", "|---|---|---|" + "---|" * bins]
    for (setting, method, ratio), by in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "full",
                                                                                   kv[0][2], kv[0][1])):
        cells = [f"{sum(by[b]) / len(by[b]):.2f} ({len(by[b])})" if b in by else "-" for b in range(bins)]
        lines.append(f"| {setting} | {method} | {ratio:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(result: EvalResult, out_dir: Path) -> List[Path]:
    """``eval_results.json`` (config, meta, every record, summary, pairs, depth), ``eval_summary.csv``,
    ``eval_table.md`` and ``eval_accuracy.png`` (when matplotlib is installed)."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    p = out_dir / "eval_results.json"

    p.write_text(json.dumps(nan_to_none({"config": asdict(result.config), "meta": result.meta, "summary": result.summary,
                                   "pairs": result.pairs, "depth": result.depth, "records": result.records}), indent=1))
    paths.append(p)
    p = out_dir / "eval_summary.csv"
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result.summary[0].keys()) if result.summary else ["task"])
        w.writeheader()
        for r in result.summary:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    paths.append(p)
    p = out_dir / "eval_table.md"
    p.write_text(format_table(result) + "\n\n" + format_depth_table(result) + "\n")
    paths.append(p)
    png = plot(result, out_dir / "eval_accuracy.png")
    if png:
        paths.append(png)
    return paths


def plot(result: EvalResult, path: Path) -> Optional[Path]:
    """Accuracy against keep ratio, one panel per (task, setting), one line per method, the full cache
    dashed; error bars = one standard error."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    cfg = result.config
    panels = [(t, s) for s in cfg.settings for t in cfg.tasks]       # a row per setting, a column per task
    cols, rows = len(cfg.tasks), len(cfg.settings)
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.0 * cols, 4.5), 2.7 * rows + 0.8), squeeze=False)
    for ax, (task, setting) in zip(axes.flat, panels):
        rs = [r for r in result.summary if r["task"] == task and r["setting"] == setting]
        full = [r for r in rs if r["method"] == "full"]
        if full:
            ax.axhline(full[0]["accuracy"], color="k", ls="--", lw=1, label="full cache")
        for m in cfg.methods:
            pts = sorted((r["keep_ratio"], r["accuracy"], r["accuracy_se"]) for r in rs if r["method"] == m)
            if pts:
                ax.errorbar([x for x, _, _ in pts], [y for _, y, _ in pts],
                            yerr=[0 if math.isnan(e) else e for _, _, e in pts], marker="o", ms=3, capsize=2, label=m)
        ax.set_title(f"{task} / {setting.replace('query_', 'q-')}", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("keep ratio", fontsize=8)
        ax.tick_params(labelsize=7)
    for r in range(rows):
        axes[r][0].set_ylabel("accuracy", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"SmolLM2-135M: accuracy vs keep ratio, n={cfg.n_examples} per point, ± 1 SE", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["EvalConfig", "EvalResult", "run_eval", "run_once", "example_records", "prepare", "build_method", "format_table",
           "write_outputs", "summarize", "parse_method_name", "paired", "by_depth", "kl_divergence", "SETTINGS"]

