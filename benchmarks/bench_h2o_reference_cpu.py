"""H2O's all-queries scoring reference on one SmolLM2-shaped layer (9 query / 3 kv heads, D 64, fp32, CPU)
next to one causal SDPA call on the same layer: time (best of 3 after a warm-up) and peak extra resident
memory (``VmHWM`` after ``/proc/self/clear_refs``), one torch thread.

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
    best, peak = float("inf"), 0.0
    for _ in range(n):
        base = _rss_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        peak = max(peak, _rss_mib("VmHWM") - base)
    return best, peak


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
        kq, vq = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        ts, ms = _measure(lambda: F.scaled_dot_product_attention(q, kq, vq, is_causal=True))
        th, mh = _measure(lambda: attention_mass_ref(q, k, causal=True, head_reduce="group_sum"))
        print(f"{a.label} N={N}: causal SDPA {ts:.3f} s (+{ms:.0f} MiB), H2O scoring reference {th:.3f} s "
              f"(+{mh:.0f} MiB), ratio {th / ts:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
