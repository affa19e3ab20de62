"""Benchmark: attention-mass scoring (DESIGN.md §5.1; target: >= 85 % of copy bandwidth on the bytes
of K for W·G <= 128, far faster than kvpress's SnapKV scoring and without its ``[W·Hq, N]``
temporaries).

Cases (GPU: one Llama-3.1-8B-shaped layer — batch 1, 8 kv heads, 32 query heads, head dim 128,
bf16; CPU: 2 kv heads, 8 query heads, head dim 64, fp32):

- ``window``: SnapKV scoring of a paged cache holding ``tokens`` keys per row by the last W = 32
  queries (W·G = 128), group mean, avg-pool 5 over the keys before the window. Two rows per size:
  ``lse=computed`` (both passes) and ``lse=given`` (pass 2 only: the LSE comes from the prefill
  attention call, as with flash-attention's ``softmax_lse``).
- ``all_queries``: H2O's accumulated attention, every query of a dense ``tokens``-long prompt,
  causal, group sum. Compute-bound (O(N²·D) flops); the byte floor is still K read once.

Byte floor: K read once plus the fp32 scores written, ``B·Hkv·N·(D·s + 4)``.

Peer ``kvpress``: kvpress's own ``SnapKVPress.score`` on a dense ``[B, Hkv, N, D]`` cache (a toy
attention module whose ``q_proj`` is the identity, so the "hidden states" are the window queries and
RoPE is the identity): ``repeat_kv``, a ``[B, Hq, W, N]`` softmax, mean, avg-pool, group mean.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from _common import BenchContext, compile_size, free_memory, main_for, make_paged_cache, pick_sizes

WINDOW, POOL = 32, 5


class _QIdentityAttention(nn.Module):
    """What kvpress's SnapKV reads from an attention module, ``q_proj`` the identity."""

    def __init__(self, q_heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.config = type("Cfg", (), {"num_attention_heads": q_heads, "num_key_value_heads": kv_heads})()
        self.head_dim = head_dim
        self.q_proj = nn.Identity()


def _check_close(want: torch.Tensor, n_cmp: int):
    """A wrong answer must fail the run, not produce a fast number."""
    def check(name, out):
        tol = dict(rtol=2e-3, atol=1e-3)
        if name == "kvpress":      # kvpress rounds the probabilities to the model dtype (bf16: 3 digits)
            out, tol = out * WINDOW, dict(rtol=3e-2, atol=1e-2)
        torch.testing.assert_close(out[..., :n_cmp].float(), want[..., :n_cmp].float(), **tol)
    return check


def run(ctx: BenchContext) -> list[dict]:
    from kvpress_kernels.ops.scoring import (attention_lse, attention_mass, attention_mass_paged,
                                             attention_mass_paged_ref, attention_mass_ref)

    if ctx.is_gpu:
        B, H, Hq, D, dtype = 1, 8, 32, 128, torch.bfloat16
    else:
        B, H, Hq, D, dtype = 1, 2, 8, 64, torch.float32
    sizes = pick_sizes(ctx, gpu=(4096, 32768, 131072), gpu_quick=(32768,), cpu=(1024, 4096), cpu_quick=(1024,))
    csize = compile_size(ctx, sizes)
    triton_ok, triton_why = ctx.triton_ok()
    kv_ok, kv_why = ctx.kvpress_ok()
    rows: list[dict] = []
    for n in sizes:
        k_pages, _, table, lengths = make_paged_cache(ctx, layers=1, batch=B, kv_heads=H, tokens=n, head_dim=D,
                                                      dtype=dtype)
        table, lengths = table[0], lengths[0]
        g = torch.Generator().manual_seed(n)
        q = (torch.randn(B, Hq, WINDOW, D, generator=g) * 2).to(dtype).to(ctx.device)
        kw = dict(max_len=n, head_reduce="group_mean", pool="avg", pool_size=POOL, pool_end=n - WINDOW)
        floor = B * H * n * (D * k_pages.element_size() + 4)
        # Dense copy of the same keys, for the LSE pass and kvpress.
        pages = table.long()
        j = torch.arange(n, device=ctx.device)
        kd = k_pages[pages[:, :, j // k_pages.shape[1]], (j % k_pages.shape[1]).view(1, 1, -1).expand(B, H, n)]
        lse = attention_lse(q, kd, backend="triton" if triton_ok else "reference")
        want = attention_mass_paged_ref(q, k_pages, table, lengths, **kw)

        for lse_mode in ("computed", "given"):
            extra = {} if lse_mode == "computed" else {"lse": lse}
            providers: dict[str, object] = {}
            if ctx.is_gpu and n > 32768:
                providers["reference"] = "the reference gathers an fp32 copy of every row; measured up to 32k"
            else:
                providers["reference"] = lambda e=extra: attention_mass_paged_ref(q, k_pages, table, lengths, **kw, **e)
            cref = ctx.compiled(attention_mass_paged_ref) if n == csize and lse_mode == "computed" else None
            providers["compiled"] = (lambda c=cref: c(q, k_pages, table, lengths, **kw)) if cref is not None else (
                "torch.compile is measured at one size, lse computed (compiling costs more than the run)")
            providers["triton"] = (lambda e=extra: attention_mass_paged(q, k_pages, table, lengths, backend="triton",
                                                                        **kw, **e)) if triton_ok else triton_why
            providers["cuda"] = "scoring has no CUDA kernel (Triton is the GPU path)"
            if lse_mode == "given":
                providers["kvpress"] = "kvpress computes its softmax itself: compared in the lse=computed row"
            elif kv_ok:
                from kvpress.presses.snapkv_press import SnapKVPress
                press = SnapKVPress(window_size=WINDOW, kernel_size=POOL)
                module = _QIdentityAttention(Hq, H, D)
                hs = torch.zeros(B, WINDOW + 1, Hq * D, dtype=dtype, device=ctx.device)
                hs[:, 1:] = q.transpose(1, 2).reshape(B, WINDOW, Hq * D)
                cos = torch.ones(B, WINDOW, D, dtype=dtype, device=ctx.device)
                sin = torch.zeros_like(cos)
                providers["kvpress"] = lambda: press.score(module, hs, kd, kd, None,
                                                           {"position_embeddings": (cos, sin)})
            else:
                providers["kvpress"] = kv_why
            rows += ctx.measure("scoring", {"tokens": n, "mode": "window", "lse": lse_mode, "kv_heads": H,
                                            "q_heads": Hq, "head_dim": D, "window": WINDOW, "dtype": str(dtype)[6:]},
                                providers, floor_bytes=floor, floor_note="K read once + fp32 scores written",
                                check=_check_close(want, n - WINDOW))
        del k_pages, kd
        free_memory(ctx)

    # H2O: every query of the prompt, causal (compute-bound: N^2 D flops per query head).
    n = 4096 if ctx.is_gpu else 512
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, n, D, generator=g).to(dtype).to(ctx.device)
    k = torch.randn(B, H, n, D, generator=g).to(dtype).to(ctx.device)
    want = attention_mass_ref(q, k, head_reduce="group_sum")
    providers = {
        "reference": lambda: attention_mass_ref(q, k, head_reduce="group_sum"),
        "compiled": "torch.compile is measured on the window case only",
        "triton": (lambda: attention_mass(q, k, head_reduce="group_sum", backend="triton")) if triton_ok
        else triton_why,
        "cuda": "scoring has no CUDA kernel (Triton is the GPU path)",
        "kvpress": "kvpress's H2O-style scoring needs the model's full attention matrix (not a kernel)",
    }
    rows += ctx.measure("scoring", {"tokens": n, "mode": "all_queries", "lse": "computed", "kv_heads": H,
                                    "q_heads": Hq, "head_dim": D, "window": n, "dtype": str(dtype)[6:],
                                    "gflop": 2 * 2 * B * Hq * n * n * D / 2 / 1e9},
                        providers, floor_bytes=B * H * n * (D * k.element_size() + 4),
                        floor_note="K read once + fp32 scores written (compute-bound case)",
                        check=_check_close(want, n))
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for("scoring", run))
