"""Benchmark: the whole compression step — score + select + compact over every layer (DESIGN.md §9,
target at 32k tokens on a Llama-3.1-8B-shaped cache: <= 1.5 ms on an H200, floor ~1.35 ms at 50 %
eviction).

Shape: a Llama-3.1-8B-shaped cache — 32 layers, 8 kv heads, 32 query heads, head dim 128, bf16 —
holding ``tokens`` tokens per row (GPU: 4k–128k). On CPU much smaller (``--quick``: 4 layers,
2 kv heads, 8 query heads, head dim 64, fp32). SnapKV-style step per layer: the last W = 32 prompt
queries score every cached key (group mean, avg-pool 5), each (sequence, kv head) keeps 50 %
(the window protected), and the cache is compacted in place.

Byte floor: every key read once (scoring) plus the moved tokens' K and V read and written
(compaction), ``L·B·H·N·D·s + 4·moved·D·s`` — ``moved`` counted from the kept indices of an untimed
run. The timed call also restores ``lengths`` of all layers (one tiny copy), since compaction
shortens them.

Providers: ``reference`` (the ``_ref`` functions), ``compiled`` (``torch.compile`` of the reference
per-layer step), ``triton`` (every op forced to Triton), ``cuda`` (the CUDA kernel where an op has
one, Triton otherwise), and ``kvpress`` — kvpress's own ``SnapKVPress.compress`` per layer on a
dense ``DynamicCache``-shaped ``[B, H, N, D]`` cache (window attention, top-k, gather into new
tensors).
"""

from __future__ import annotations

import torch
from torch import nn

from _common import BenchContext, compile_size, free_memory, main_for, make_paged_cache, moved_tokens, pick_sizes

WINDOW, POOL, KEEP = 32, 5, 0.5


class _QIdentityAttention(nn.Module):
    """The attributes kvpress's SnapKV reads from an attention module, with ``q_proj`` the identity so
    that the "hidden states" we pass are the (pre-RoPE) window queries themselves."""

    def __init__(self, q_heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.config = type("Cfg", (), {"num_attention_heads": q_heads, "num_key_value_heads": kv_heads})()
        self.head_dim = head_dim
        self.q_proj = nn.Identity()


def _step_fns(backend_of):
    """One layer's step with the public ops, each forced to ``backend_of[op]``."""
    from kvpress_kernels.ops.compaction import compact_
    from kvpress_kernels.ops.scoring import attention_mass_paged
    from kvpress_kernels.ops.selection import select_topk

    def step(q, k_pages, v_pages, table, lengths, n, keep):
        B, H = table.shape[:2]
        s = attention_mass_paged(q, k_pages, table, lengths, max_len=n, head_reduce="group_mean", pool="avg",
                                 pool_size=POOL, backend=backend_of["scoring"])
        _, kept = select_topk(s.view(B * H, n), keep, recent=WINDOW, backend=backend_of["selection"])
        compact_(k_pages, v_pages, table, lengths, kept.view(B, H, keep), backend=backend_of["compaction"])
        return kept

    return step


def _ref_step(q, k_pages, v_pages, table, lengths, n, keep):
    from kvpress_kernels.ops.compaction import compact_ref
    from kvpress_kernels.ops.scoring import attention_mass_paged_ref
    from kvpress_kernels.ops.selection import select_topk_ref

    B, H = table.shape[:2]
    s = attention_mass_paged_ref(q, k_pages, table, lengths, max_len=n, head_reduce="group_mean", pool="avg",
                                 pool_size=POOL)
    _, kept = select_topk_ref(s.view(B * H, n), keep, recent=WINDOW)
    compact_ref(k_pages, v_pages, table, lengths, kept.view(B, H, keep))
    return kept


def _has_backend(fn, backend: str) -> bool:
    import inspect
    src = inspect.getsource(fn)
    return f'"{backend}"' in src[src.find("resolve_backend("):]


def run(ctx: BenchContext) -> list[dict]:
    from kvpress_kernels.ops import compaction, scoring, selection

    if ctx.is_gpu:
        L, B, H, Hq, D, dtype = 32, 1, 8, 32, 128, torch.bfloat16
    elif ctx.quick:
        L, B, H, Hq, D, dtype = 4, 1, 2, 8, 64, torch.float32
    else:
        L, B, H, Hq, D, dtype = 8, 1, 8, 32, 128, torch.float32
    sizes = pick_sizes(ctx, gpu=(4096, 32768, 131072), gpu_quick=(32768,), cpu=(1024, 4096), cpu_quick=(1024,))
    csize = compile_size(ctx, sizes)
    triton_ok, triton_why = ctx.triton_ok()
    cuda_ok, cuda_why = ctx.cuda_ok()
    kv_ok, kv_why = ctx.kvpress_ok()
    rows = []
    for n in sizes:
        keep = int(n * KEEP)
        k_pages, v_pages, table, lengths = make_paged_cache(ctx, layers=L, batch=B, kv_heads=H, tokens=n,
                                                            head_dim=D, dtype=dtype)
        lengths0 = lengths.clone()
        g = torch.Generator().manual_seed(n)
        q = (torch.randn(L, B, Hq, WINDOW, D, generator=g) * 2).to(dtype).to(ctx.device)

        def pipeline(step):
            def f():
                lengths.copy_(lengths0)
                return [step(q[l], k_pages, v_pages, table[l], lengths[l], n, keep) for l in range(L)]
            return f

        providers: dict[str, object] = {}
        if ctx.is_gpu and n > 32768:
            providers["reference"] = "the reference materialises fp32 copies of every row; measured up to 32k tokens"
        else:
            providers["reference"] = pipeline(_ref_step)
        cstep = ctx.compiled(_ref_step) if n == csize else None
        providers["compiled"] = pipeline(cstep) if cstep is not None else (
            "torch.compile is measured at one size (compiling costs more than the run)" if n != csize else
            "torch.compile runs only in full runs (not --quick)")
        providers["triton"] = pipeline(_step_fns({"scoring": "triton", "selection": "triton",
                                                  "compaction": "triton"})) if triton_ok else triton_why
        if cuda_ok and triton_ok:
            pick = {op: ("cuda" if _has_backend(fn, "cuda") else "triton") for op, fn in
                    (("scoring", scoring.attention_mass_paged), ("selection", selection.select_topk),
                     ("compaction", compaction.compact_))}
            providers["cuda"] = pipeline(_step_fns(pick)) if "cuda" in pick.values() else "no op has a CUDA kernel"
        else:
            providers["cuda"] = cuda_why if not cuda_ok else triton_why

        if kv_ok:
            from kvpress.presses.snapkv_press import SnapKVPress
            press = SnapKVPress(compression_ratio=1 - KEEP, window_size=WINDOW, kernel_size=POOL)
            module = _QIdentityAttention(Hq, H, D)
            kd = torch.randn(L, B, H, n, D, dtype=dtype, device=ctx.device)
            vd = torch.randn_like(kd)
            hs = torch.zeros(L, B, WINDOW + 1, Hq * D, dtype=dtype, device=ctx.device)
            hs[:, :, 1:] = q.transpose(2, 3).reshape(L, B, WINDOW, Hq * D)
            cos = torch.ones(B, WINDOW, D, dtype=dtype, device=ctx.device)
            sin = torch.zeros_like(cos)

            def kvpress_step():
                return [press.compress(module, hs[l], kd[l], vd[l], None, {"position_embeddings": (cos, sin)})
                        for l in range(L)]

            providers["kvpress"] = kvpress_step
        else:
            providers["kvpress"] = kv_why

        # Untimed run for the exact byte floor (and a check that our step runs at all).
        first = next((p for p in ("cuda", "triton", "reference") if callable(providers.get(p))), None)
        if first is None:
            kept = [_ref_step(q[l], k_pages, v_pages, table[l], lengths[l], n, keep) for l in range(L)]
        else:
            kept = providers[first]()
        moved = sum(moved_tokens(k) for k in kept)
        floor = L * B * H * n * D * k_pages.element_size() + 4 * moved * D * k_pages.element_size()
        rows += ctx.measure("end_to_end", {"tokens": n, "layers": L, "kv_heads": H, "q_heads": Hq, "head_dim": D,
                                           "dtype": str(dtype)[6:], "keep_ratio": KEEP, "window": WINDOW},
                            providers, floor_bytes=floor,
                            floor_note="K read once + moved K/V read and written")
        del k_pages, v_pages, providers
        if kv_ok:
            del kd, vd
        free_memory(ctx)
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for("end_to_end", run))
