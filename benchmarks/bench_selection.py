"""Benchmark: token selection — exactly ``budget`` keepers per row, protected ranges, position order
(DESIGN.md §5.3, target: <= 2x the time to read the scores once, faster than top-k-based selection).

Shape: the rows of one layer of a Llama-3.1-8B-shaped cache at batch 4 (``R = 4 · 8 = 32`` rows of
fp32 scores), keeping 50 % with 4 sink tokens and a 32-token recent window protected. Byte floor:
scores read once plus the kept indices (int32) and keep mask (bool) written:
``R · N · 4 + R · K · 4 + R · N``.

Peer ``torch``: ``torch.topk`` + ``sort`` of the indices (kvpress's ``ScorerPress`` does the top-k;
the sort gives the same position-ordered answer), with protected tokens forced by a score of +inf.
"""

from __future__ import annotations

import torch

from _common import BenchContext, compile_size, free_memory, main_for, op_providers, pick_sizes


def run(ctx: BenchContext) -> list[dict]:
    from kvpress_kernels.ops.selection import select_topk, select_topk_ref

    R, sink, recent = 32, 4, 32
    sizes = pick_sizes(ctx, gpu=(4096, 32768, 131072), gpu_quick=(32768,), cpu=(1024, 4096, 16384), cpu_quick=(2048,))
    csize = compile_size(ctx, sizes)
    rows = []
    for n in sizes:
        keep = n // 2
        g = torch.Generator().manual_seed(n)
        scores = torch.rand(R, n, generator=g).to(ctx.device)
        providers = op_providers(ctx, select_topk_ref, select_topk, (scores, keep),
                                 kwargs={"sink": sink, "recent": recent}, compile=n == csize)

        def torch_topk():
            s = scores.clone()
            s[:, :sink] = float("inf")
            s[:, n - recent:] = float("inf")
            return s.topk(keep, dim=1).indices.sort(dim=1).values

        providers["torch"] = torch_topk
        floor = R * n * 4 + R * keep * 4 + R * n
        rows += ctx.measure("selection", {"tokens": n, "rows": R, "keep": keep}, providers, floor_bytes=floor,
                            floor_note="scores read once + kept_idx and keep_mask written")
        del scores
        free_memory(ctx)
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for("selection", run))
