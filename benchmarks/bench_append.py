"""Benchmark: append new tokens' K/V into a paged cache (DESIGN.md §5.5).

Shape: one layer (batch 1, 8 kv heads, head dim 128, bf16 on GPU / fp32 on CPU) holding 4096
tokens; ``tokens`` new ones are appended (1 = a decode step, more = a prefill chunk). Byte floor:
the new K and V read once and written once, ``4 · rows · T · D · itemsize``. The timed call also
restores ``lengths`` (one tiny copy) so that every call appends at the same place.

Peer ``torch``: a dense ``DynamicCache``-style append, ``torch.cat`` of K and V onto ``[B, H, N, D]``
tensors, which copies the whole cache each time (what transformers and kvpress do).
"""

from __future__ import annotations

import torch

from _common import BenchContext, compile_size, free_memory, main_for, make_paged_cache, op_providers, pick_sizes


def run(ctx: BenchContext) -> list[dict]:
    from kvpress_kernels.ops.append import append_, append_ref

    B, H, D, N0 = 1, 8, 128, 4096
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    sizes = pick_sizes(ctx, gpu=(1, 64, 4096, 32768), gpu_quick=(1, 4096), cpu=(1, 64, 1024, 4096), cpu_quick=(1, 256))
    csize = compile_size(ctx, sizes)
    rows = []
    for t in sizes:
        k_pages, v_pages, table, lengths = make_paged_cache(ctx, layers=1, batch=B, kv_heads=H, tokens=N0,
                                                            head_dim=D, dtype=dtype, extra_tokens=t)
        table, lengths = table[0], lengths[0].clone()
        lengths0 = lengths.clone()
        k_new = torch.randn(B, H, t, D, dtype=dtype, device=ctx.device)
        v_new = torch.randn_like(k_new)
        providers = op_providers(ctx, append_ref, append_, (k_pages, v_pages, table, lengths, k_new, v_new),
                                 before=lambda: lengths.copy_(lengths0), compile=t == csize)
        kd = torch.randn(B, H, N0, D, dtype=dtype, device=ctx.device)
        vd = torch.randn_like(kd)
        providers["torch"] = lambda: (torch.cat([kd, k_new], dim=2), torch.cat([vd, v_new], dim=2))
        floor = 4 * B * H * t * D * k_pages.element_size()
        rows += ctx.measure("append", {"tokens": t, "cache_tokens": N0, "kv_heads": H, "head_dim": D,
                                       "dtype": str(dtype)[6:]}, providers, floor_bytes=floor,
                            floor_note="new K+V read + written")
        del k_pages, v_pages, kd, vd
        free_memory(ctx)
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for("append", run))
