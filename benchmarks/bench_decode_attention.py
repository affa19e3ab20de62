"""Benchmark: paged decode attention (DESIGN.md §5.6, target: >= 75 % of the bandwidth of reading
K+V once; the per-key score output costs <= 10 % extra).

Shape: one decode step (T = 1) of one layer of a Llama-3.1-8B-shaped model (batch 1, 32 query
heads, 8 kv heads, head dim 128, bf16 on GPU; fp32 on CPU) over ``tokens`` cached tokens.
Byte floor: K and V read once, ``2 · B · Hkv · N · D · itemsize``.

Providers: ``triton`` (output only) and ``triton+probs`` (also each key's attention probability,
summed over the GQA group — what H2O and ShotKV's decoding phase consume). Peer ``torch``: stock
``scaled_dot_product_attention`` (GQA) on a dense ``[B, H, N, D]`` cache, what a transformers
model without our cache runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import BenchContext, compile_size, free_memory, main_for, make_paged_cache, op_providers, pick_sizes


def run(ctx: BenchContext) -> list[dict]:
    from kvpress_kernels.ops.decode_attention import paged_decode_attention, paged_decode_attention_ref

    B, Hq, H, D, T = 1, 32, 8, 128, 1
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    sizes = pick_sizes(ctx, gpu=(4096, 32768, 131072), gpu_quick=(32768,), cpu=(1024, 4096, 16384), cpu_quick=(2048,))
    csize = compile_size(ctx, sizes)
    rows = []
    for n in sizes:
        k_pages, v_pages, table, lengths = make_paged_cache(ctx, layers=1, batch=B, kv_heads=H, tokens=n,
                                                            head_dim=D, dtype=dtype)
        table, lengths = table[0], lengths[0]
        q = torch.randn(B, Hq, T, D, dtype=dtype, device=ctx.device)
        args = (q, k_pages, v_pages, table, lengths)
        providers = op_providers(ctx, paged_decode_attention_ref, paged_decode_attention, args, compile=n == csize)
        ok, why = ctx.triton_ok()
        providers["triton+probs"] = (lambda: paged_decode_attention(*args, return_probs=True, backend="triton")) \
            if ok else why
        kd = torch.randn(B, H, n, D, dtype=dtype, device=ctx.device)
        vd = torch.randn_like(kd)
        providers["torch"] = lambda: F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)
        floor = 2 * B * H * n * D * k_pages.element_size()
        rows += ctx.measure("decode_attention", {"tokens": n, "q_heads": Hq, "kv_heads": H, "head_dim": D,
                                                 "dtype": str(dtype)[6:]}, providers, floor_bytes=floor,
                            floor_note="K+V read once")
        del k_pages, v_pages, kd, vd
        free_memory(ctx)
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for("decode_attention", run))
