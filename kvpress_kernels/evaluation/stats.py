"""Small statistics and output helpers shared by the quality harness and the eval scripts in
``benchmarks/`` (``eval_full_table.py``, ``ablation_shot_scoring.py``, ``eval_kvzip.py``), so that every
table computes a mean, a standard error, a paired difference and a kept-KV fraction the same way.

Pure Python (no torch import): the scripts' ``merge`` / ``render`` steps run without a model.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple


def mean_se(xs: Sequence[float]) -> Tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)) of ``xs``.

    ``(nan, nan)`` for no value, ``(x, nan)`` for one (a standard error needs two)."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    if n < 2:
        return m, math.nan
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def paired_diff(a: Sequence[float], b: Sequence[float]) -> Dict[str, object]:
    """Paired comparison of two score lists over the same examples (``a[i]`` and ``b[i]`` are one example):
    ``n``, ``mean_diff`` and its paired standard error ``se`` (:func:`mean_se` of ``a - b``), ``wins``
    (examples where ``a`` scored higher) and ``losses``."""
    if len(a) != len(b):
        raise ValueError(f"a and b must pair up example by example, got {len(a)} and {len(b)} scores")
    diffs = [x - y for x, y in zip(a, b)]
    m, se = mean_se(diffs)
    return {"n": len(diffs), "mean_diff": m, "se": se, "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs)}


def nan_to_none(x):
    """``x`` with every float NaN (in nested dicts and lists) replaced by ``None``: JSON has no NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x


def fmt(x: Optional[float], nd: int = 2) -> str:
    """A table cell: ``x`` with ``nd`` decimals, ``-`` for ``None`` or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def kv_rows(model) -> int:
    """Rows of the KV cache, ``num_hidden_layers x num_key_value_heads`` of the model's text config:
    what a prefilled token costs in cached (layer, kv head) entries."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return cfg.num_hidden_layers * (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def kept_after_prefill(stats: Dict[str, object], n_rows: int) -> float:
    """Fraction of the prefilled KV entries still cached once prefill compression is done, from a run's
    cache ``stats`` (``kv_tokens_after_prefill`` / (``n_rows`` x first prompt length)); NaN when the stats
    lack either."""
    prefilled = n_rows * (stats.get("prompt_lengths") or [math.nan])[0]
    return (stats.get("kv_tokens_after_prefill") or math.nan) / prefilled


def kept_final(stats: Dict[str, object]) -> float:
    """Fraction of the full cache's KV entries held at the end of the generation (``kv_tokens_final`` /
    ``kv_tokens_full``); NaN when the stats lack either."""
    return (stats.get("kv_tokens_final") or math.nan) / (stats.get("kv_tokens_full") or math.nan)


__all__ = ["mean_se", "paired_diff", "nan_to_none", "fmt", "kv_rows", "kept_after_prefill", "kept_final"]
