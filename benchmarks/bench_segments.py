"""Benchmark: segment reduction of token scores (DESIGN.md §5.2) — fixed chunks (ChunkKV) and shot
spans of varying length (ShotKV).

Shape: the rows of one layer at batch 4 (``R = 32`` rows of fp32 scores); chunks of 10 tokens
(ChunkKV's default), or spans of 17..80 tokens shared by every row (few-shot exemplars). Byte
floor: scores read once plus the segment scores written, ``R · N · 4 + R · S · 4``.

Peer ``torch``: chunks: ``scores.view(R, S, c).mean(-1)`` (after padding to a multiple of c);
spans: ``torch.segment_reduce`` over the span lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import BenchContext, compile_size, free_memory, main_for, op_providers, pick_sizes


def _spans(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts, s = [], 0
    while s < n:
        e = min(n, s + int(torch.randint(17, 81, (1,), generator=g)))
        starts.append((s, e))
        s = e
    return torch.tensor(starts, dtype=torch.int32)


def run(ctx: BenchContext) -> list[dict]:
    from kvpress_kernels.ops.segments import segment_reduce, segment_reduce_ref

    R, chunk = 32, 10
    sizes = pick_sizes(ctx, gpu=(4096, 32768, 131072), gpu_quick=(32768,), cpu=(1024, 4096, 16384), cpu_quick=(2048,))
    csize = compile_size(ctx, sizes)
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        scores = torch.rand(R, n, generator=g).to(ctx.device)
        # chunks
        S = -(-n // chunk)
        providers = op_providers(ctx, segment_reduce_ref, segment_reduce, (scores,),
                                 kwargs={"chunk_size": chunk, "reduce": "mean"}, backends=("triton",), compile=n == csize)

        count = torch.full((S,), float(chunk), device=ctx.device)
        count[-1] = float(n - (S - 1) * chunk)

        def torch_chunks():
            return F.pad(scores, (0, S * chunk - n)).view(R, S, chunk).sum(-1) / count

        providers["torch"] = torch_chunks
        rows += ctx.measure("segments_chunk", {"tokens": n, "rows": R, "segments": S}, providers,
                            floor_bytes=R * n * 4 + R * S * 4, floor_note="scores read + segment scores written")
        # spans
        spans = _spans(n, n).to(ctx.device)
        S = spans.shape[0]
        seg_len = (spans[:, 1] - spans[:, 0]).long()
        providers = op_providers(ctx, segment_reduce_ref, segment_reduce, (scores,),
                                 kwargs={"spans": spans, "reduce": "mean"}, backends=("triton",), compile=n == csize)
        lens_rows = seg_len.repeat(R)
        providers["torch"] = lambda: torch.segment_reduce(scores.reshape(-1), "mean", lengths=lens_rows).view(R, S)
        rows += ctx.measure("segments_spans", {"tokens": n, "rows": R, "segments": S}, providers,
                            floor_bytes=R * n * 4 + R * S * 4, floor_note="scores read + segment scores written")
        del scores
        free_memory(ctx)
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for("segments", run))
