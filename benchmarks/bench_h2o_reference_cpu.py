"""H2O's all-queries scoring reference on one SmolLM2-shaped layer (9 query / 3 kv heads, D 64, fp32, CPU)
next to one causal SDPA call on the same layer: time (best of 3 after a warm-up; wall clock and this
process's CPU time, which under other processes' load moves much less) and peak extra resident memory
(``VmHWM`` after ``/proc/self/clear_refs``), one torch thread. Two scoring rows: the reference computing
its own LSE (``attention_mass_ref(q, k, causal=True)``), and given the LSE that SDPA's CPU flash kernel
returns with its output (what the transformers path does: PrefillInputs.lse).

    python benchmarks/bench_h2o_reference_cpu.py 1024 4096 [--label after]
    PYTHONPATH=/other/checkout python benchmarks/bench_h2o_reference_cpu.py 4096 --label before
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _measure(fn, n: int = 3):
    fn()
    best, best_cpu, peak = float("inf"), float("inf"), 0.0
    for _ in range(n):
        base = _rss_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        peak = max(peak, _rss_mib("VmHWM") - base)
    return best, best_cpu, peak


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokens", type=int, nargs="+")
    ap.add_argument("--label", default="")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from kvpress_kernels.ops.scoring import attention_mass_ref
    B, Hq, Hkv, D = 1, 9, 3, 64
    for N in a.tokens:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (Hq, Hkv, Hkv))
        rows = [("causal SDPA", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
                ("H2O scoring reference", lambda: attention_mass_ref(q, k, causal=True, head_reduce="group_sum"))]
        flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if flash is not None:
            _, lse = flash(q, k, v, 0.0, True)
            rows.append(("H2O scoring given SDPA's LSE",
                         lambda: attention_mass_ref(q, k, causal=True, head_reduce="group_sum", lse=lse)))
        res = [(name, *_measure(fn)) for name, fn in rows]
        base_wall, base_cpu = res[0][1], res[0][2]
        print(f"{a.label} N={N}: " + "; ".join(
            f"{name} {w:.3f} s wall / {c:.3f} s CPU (+{m:.0f} MiB)" + (
                "" if i == 0 else f", {c / base_cpu:.2f}x SDPA (CPU), {w / base_wall:.2f}x (wall)")
            for i, (name, w, c, m) in enumerate(res)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
