"""Benchmark: AdaKV — head-budget selection, and the memory that per-head budgets free (DESIGN.md §5.3, §6).

Two parts.

``adakv_select`` (time): one exactly-``budget`` selection over the union of a layer's kv heads
(:func:`~kvpress_kernels.ops.head_budget.select_head_budget`) for ``B = 4`` sequences of a
Llama-3.1-8B-shaped layer (8 kv heads, fp32 scores), keeping 50 % on average with a floor of
``alpha = 0.2`` of the average per head and a 32-token window protected. Byte floor: scores read once
plus kept indices (int32), keep mask (bool) and per-head lengths written. Peer ``kvpress``: what
``kvpress.AdaKVPress.compress`` does after scoring — per-head ``topk`` of the floor, ``scatter`` of the
largest float, ``topk`` of the pruned over the flattened heads — producing only masked indices.

``adakv_memory`` (bytes): a tiny random Llama (4 layers, 8 query / 4 kv heads, head dim 64, fp32;
random weights, nothing downloaded) prefills one prompt under AdaKV at keep 0.3 and 0.5 on both
sides: ours through :func:`kvpress_kernels.generate` (``kv_bytes``: pages in use after prefill
compression — each (sequence, kv head) its own pages), kvpress's ``AdaKVPress(SnapKVPress)`` on its
``DynamicCache`` (``kv_bytes``: the cache it leaves, which AdaKV does not shrink, plus the masked
indices it stores). Same kept sets (tests/test_adakv.py checks parity); only where they live differs.
"""

from __future__ import annotations


import torch

from _common import BenchContext, fmt_bytes, free_memory, main_for, op_providers, pick_sizes

B, H, WINDOW, KEEP, ALPHA = 4, 8, 32, 0.5, 0.2


def _kvpress_selection(scores: torch.Tensor, n_kept: int, n_safe: int):
    """kvpress AdaKVPress.compress after ``score``: the masked (batch, head, position) indices."""
    bsz, heads, k_len = scores.shape
    s = scores.clone()  # kvpress scatters into the scores in place
    top = torch.topk(s, n_safe, dim=-1).indices
    s.scatter_(-1, top, torch.finfo(s.dtype).max)
    n_pruned = heads * (k_len - n_kept)
    idx = torch.topk(-s.reshape(bsz, -1), n_pruned, dim=1).indices.flatten()
    return torch.arange(bsz, device=s.device).repeat_interleave(n_pruned), idx // k_len, idx % k_len


def _selection_rows(ctx: BenchContext) -> list[dict]:
    from kvpress_kernels.ops.head_budget import select_head_budget, select_head_budget_ref

    sizes = pick_sizes(ctx, gpu=(4096, 32768, 131072), gpu_quick=(32768,), cpu=(1024, 4096), cpu_quick=(1024,))
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        scores = torch.rand(B, H, n, generator=g).to(ctx.device)
        n_kept = int(n * KEEP)
        n_safe = max(1, int(n_kept * ALPHA))
        scores_kv = scores.clone()
        scores_kv[..., -WINDOW:] = 2.0  # kvpress's SnapKV pads its window above every score
        protect = torch.zeros(B, H, n, dtype=torch.bool, device=ctx.device)
        protect[..., -WINDOW:] = True
        kw = {"floor": n_safe, "protect": protect, "max_budget": n}
        providers = op_providers(ctx, select_head_budget_ref, select_head_budget, (scores, H * n_kept), kwargs=kw,
                                 backends=("triton",), compile=False)
        providers["kvpress"] = (lambda: _kvpress_selection(scores_kv, n_kept, n_safe)) if ctx.kvpress_ok()[0] \
            else ctx.kvpress_ok()[1]
        floor = B * H * n * 4 + B * H * n * 4 + B * H * n + B * H * 4
        rows += ctx.measure("adakv_select", {"tokens": n, "kv_heads": H, "batch": B}, providers, floor_bytes=floor,
                            floor_note="scores read once + kept_idx, keep_mask and kept_len written")
        del scores, scores_kv, protect
        free_memory(ctx)
    return rows


def _tiny_llama(device):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval().to(device)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def _memory_rows(ctx: BenchContext) -> list[dict]:
    import kvpress_kernels as kk
    sizes = pick_sizes(ctx, gpu=(2048, 8192), gpu_quick=(2048,), cpu=(512, 2048), cpu_quick=(512,))
    model = _tiny_llama(ctx.device)
    have_kvpress, why = ctx.kvpress_ok()
    rows = []
    for n in sizes:
        ids = torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(n)).to(ctx.device)
        for keep in (0.3, 0.5):
            case = {"prompt_tokens": n, "keep": keep, "layers": 4, "kv_heads": 4}
            base = {"op": "adakv_memory", **case, "case": f"prompt_tokens={n} keep={keep}",
                    "case_keys": ",".join(case), "status": "ok", "note": "", "kind": "memory"}
            _, st = kk.generate(model, ids, kk.AdaKV(keep, alpha=ALPHA, window_size=WINDOW), max_new_tokens=1,
                                page_size=16)
            rows.append({**base, "provider": "ours", "kv_bytes": st["kv_bytes_after_prefill"],
                         "kv_bytes_full": st["kv_bytes_full"],
                         "note": "pages in use after prefill compression (page 16)"})
            if not have_kvpress:
                rows.append({**base, "provider": "kvpress", "status": "skipped", "note": why})
                continue
            import kvpress
            from transformers import DynamicCache
            press = kvpress.AdaKVPress(kvpress.SnapKVPress(1 - keep, window_size=WINDOW), alpha_safeguard=ALPHA)
            cache = DynamicCache()
            with torch.no_grad(), press(model):
                model(ids, past_key_values=cache)
            kv = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                     for l in cache.layers)
            masks = sum(t.numel() * t.element_size() for layer in model.model.layers
                        for t in (layer.self_attn.masked_key_indices or ()))
            for layer in model.model.layers:
                layer.self_attn.masked_key_indices = None
            rows.append({**base, "provider": "kvpress", "kv_bytes": kv + masks, "kv_bytes_full": kv,
                         "note": f"dense cache kept whole + {fmt_bytes(masks)} of masked indices"})
    for r in rows:
        if r["status"] == "ok":
            r["kv_fraction_of_full"] = r["kv_bytes"] / r["kv_bytes_full"]
    return rows


def run(ctx: BenchContext) -> list[dict]:
    rows = _selection_rows(ctx)
    rows += _memory_rows(ctx)
    if ctx.verbose:
        print(f"{'prompt':>7} {'keep':>5} {'provider':<8} {'bytes in use':>13} {'of full':>8}  note")
        for r in rows:
            if r["op"] == "adakv_memory" and r["status"] == "ok":
                print(f"{r['prompt_tokens']:>7} {r['keep']:>5} {r['provider']:<8} {fmt_bytes(r['kv_bytes']):>13} "
                      f"{r['kv_fraction_of_full']:>8.3f}  {r['note']}")
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for("adakv", run))
