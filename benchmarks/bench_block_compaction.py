"""Benchmark: in-place compaction of one layer of a vLLM-layout cache (ops/block_compaction.py;
DESIGN.md §9 compaction target: >= 85 % of copy bandwidth on the moved bytes, zero scratch memory).

Shape: one layer of a Llama-3.1-8B-shaped cache in vLLM's FlashAttention layout
``[2, num_blocks, 16, 8, 128]`` (bf16 on GPU, fp32 on CPU), one request, blocks in random order, every
kv head keeping 50 % of its tokens (a different random subset per head, the last 32 always kept).
Byte floor: the moved tokens (kept slots at or beyond the new length), read and written, K and V:
``4 · moved · D · itemsize``.

Peer ``torch``: what the working vLLM compressors do (vllm-ascend-kvcompress's
``materialize_token_slots``): gather every kept token of every head into a workspace, then scatter
it back densely — every kept token moves, through a ``[kv_heads, K, D]`` scratch buffer per K and V.

Standalone: ``python benchmarks/bench_block_compaction.py [--quick] [--device cpu|cuda]``.
"""

from __future__ import annotations

import torch

from _common import BenchContext, free_memory, main_for, moved_tokens, op_providers, pick_sizes, random_kept_idx


def run(ctx: BenchContext) -> list[dict]:
    from kvpress_kernels.engines import kv_cache_views
    from kvpress_kernels.ops.block_compaction import block_compact_, block_compact_ref

    H, D, bs = 8, 128, 16
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    sizes = pick_sizes(ctx, gpu=(4096, 32768, 131072), gpu_quick=(32768,), cpu=(1024, 4096, 16384), cpu_quick=(2048,))
    rows = []
    for n in sizes:
        keep = n // 2
        nb = -(-n // bs) + 8
        kv = torch.randn(2, nb, bs, H, D, device=ctx.device).to(dtype)
        k, v = kv_cache_views(kv, "flash_attn")
        g = torch.Generator().manual_seed(0)
        table = torch.randperm(nb, generator=g)[:-(-n // bs)].to(torch.int32).to(ctx.device)
        kept = random_kept_idx(H, n, keep, device=ctx.device, protect_recent=32)
        floor = 4 * moved_tokens(kept) * D * k.element_size()
        providers = op_providers(ctx, block_compact_ref, block_compact_, (k, v, table, kept, n), backends=("triton",),
                                 compile=False)
        # peer: gather every kept token through a workspace, scatter back densely (precomputed indices)
        src_b = table.long()[kept.long() // bs]
        src_o = kept.long() % bs
        j = torch.arange(keep, device=ctx.device)
        dst_b = table.long()[j // bs].expand(H, keep)
        dst_o = (j % bs).expand(H, keep)
        head = torch.arange(H, device=ctx.device).view(H, 1).expand(H, keep)

        def torch_gather_scatter():
            wk = k[src_b, src_o, head]
            wv = v[src_b, src_o, head]
            k[dst_b, dst_o, head] = wk
            v[dst_b, dst_o, head] = wv

        providers["torch"] = torch_gather_scatter
        rows += ctx.measure("block_compaction", {"tokens": n, "kv_heads": H, "head_dim": D, "dtype": str(dtype)[6:],
                                                 "keep": keep, "block_size": bs}, providers, floor_bytes=floor,
                            floor_note="K+V of the moved tokens, read + write")
        del kv, k, v
        free_memory(ctx)
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for("block_compaction", run))
