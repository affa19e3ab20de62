"""Benchmark: in-place compaction of one layer of a paged cache (DESIGN.md §5.4, target: >= 85 % of
copy bandwidth on the moved bytes, zero scratch memory).

Shape: one layer of a Llama-3.1-8B-shaped cache (batch 1, 8 kv heads, head dim 128, bf16 on GPU;
fp32 on CPU), keeping 50 % of the tokens (a random subset that always holds the last 32, SnapKV's
window). Byte floor: the moved tokens (kept slots at or beyond the new length) read and written,
K and V: ``4 · moved · D · itemsize``.

The timed call also restores ``lengths`` (one tiny copy).

Peer ``kvpress``: what kvpress's ``ScorerPress`` does after top-k — ``keys.gather`` / ``values.gather``
on a dense ``[B, H, N, D]`` cache into new tensors (so it copies every kept token and allocates them).
"""

from __future__ import annotations

import torch

from _common import (BenchContext, compile_size, free_memory, main_for, make_paged_cache, moved_tokens, op_providers, pick_sizes,
                     random_kept_idx)


def run(ctx: BenchContext) -> list[dict]:
    from kvpress_kernels.ops.compaction import compact_, compact_ref

    B, H, D = 1, 8, 128
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    sizes = pick_sizes(ctx, gpu=(4096, 32768, 131072), gpu_quick=(32768,), cpu=(1024, 4096, 16384), cpu_quick=(2048,))
    csize = compile_size(ctx, sizes)
    rows = []
    for n in sizes:
        keep = n // 2
        k_pages, v_pages, table, lengths = make_paged_cache(ctx, layers=1, batch=B, kv_heads=H, tokens=n,
                                                            head_dim=D, dtype=dtype)
        table, lengths = table[0], lengths[0]
        kept = random_kept_idx(B * H, n, keep, device=ctx.device, protect_recent=32).view(B, H, keep)
        floor = 4 * moved_tokens(kept) * D * k_pages.element_size()
        # The plan depends on kept_idx alone, so repeated calls move the same bytes; lengths (which the
        # op shortens, and which input checks compare kept_idx with) are restored by one tiny copy.
        lengths0 = lengths.clone()
        providers = op_providers(ctx, compact_ref, compact_, (k_pages, v_pages, table, lengths, kept),
                                 before=lambda: lengths.copy_(lengths0), compile=n == csize)
        kd = torch.randn(B, H, n, D, dtype=dtype, device=ctx.device)
        vd = torch.randn_like(kd)
        gidx = kept.long().unsqueeze(-1).expand(-1, -1, -1, D)

        def kvpress_gather():
            return kd.gather(2, gidx).contiguous(), vd.gather(2, gidx).contiguous()

        ok, why = ctx.kvpress_ok()
        providers["kvpress"] = kvpress_gather if ok else why
        rows += ctx.measure("compaction", {"tokens": n, "kv_heads": H, "head_dim": D, "dtype": str(dtype)[6:],
                                           "keep": keep}, providers, floor_bytes=floor,
                            floor_note="K+V of the moved tokens, read + write")
        del k_pages, v_pages, kd, vd
        free_memory(ctx)
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for("compaction", run))
