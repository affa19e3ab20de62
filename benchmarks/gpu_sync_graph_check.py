"""GPU-side reliability checks (issue 7, run by benchmarks/gpu_check.sh):

1. the compression step (score + select + compact, all rows of a layer) and a decode step
   (append + paged decode attention with probabilities) run under
   ``torch.cuda.set_sync_debug_mode("error")``: any host sync raises;
2. both are captured in a CUDA graph and replayed with new data, and the replay equals an eager
   run on the same data;
3. a soak of many compress/decode cycles shows no growth in pages in use or device memory.

``--device cpu`` runs the same flow eagerly (no sync mode, no graph) so the script itself is
checked on CPU machines. Writes ``sync_graph.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def build(device, dtype, B=2, Hkv=4, G=4, D=128, N=2048, page_size=16, seed=0):
    from kvpress_kernels.ops.append import append_

    g = torch.Generator(device="cpu").manual_seed(seed)
    max_pages = (N + 64 + page_size - 1) // page_size + 1
    rows = B * Hkv
    num_pages = rows * max_pages
    k_pages = torch.zeros(num_pages, page_size, D, dtype=dtype, device=device)
    v_pages = torch.zeros_like(k_pages)
    perm = torch.randperm(num_pages, generator=g).to(device=device, dtype=torch.int32)
    page_table = perm.view(B, Hkv, max_pages).contiguous()
    lengths = torch.zeros(B, Hkv, dtype=torch.int32, device=device)
    k = torch.randn(B, Hkv, N, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(device=device, dtype=dtype)
    append_(k_pages, v_pages, page_table, lengths, k, v)
    q = torch.randn(B, Hkv * G, 32, D, generator=g).to(device=device, dtype=dtype)
    return dict(k_pages=k_pages, v_pages=v_pages, page_table=page_table, lengths=lengths, q=q,
                N=N, page_size=page_size, max_pages=max_pages, B=B, Hkv=Hkv, G=G, D=D)


def compress_step(st, budget):
    """Score with the window queries, keep `budget` tokens per (seq, head), compact in place."""
    from kvpress_kernels.ops.compaction import compact_
    from kvpress_kernels.ops.scoring import attention_mass_paged
    from kvpress_kernels.ops.selection import select_topk

    scores = attention_mass_paged(st["q"], st["k_pages"], st["page_table"], st["lengths"], max_len=st["N"],
                                  head_reduce="group_sum", pool="avg", pool_size=5)
    rows = st["B"] * st["Hkv"]
    _, kept_idx = select_topk(scores.view(rows, -1), budget, lengths=st["lengths"].view(rows), sink=4, recent=32)
    compact_(st["k_pages"], st["v_pages"], st["page_table"], st["lengths"], kept_idx.view(st["B"], st["Hkv"], -1))
    return kept_idx


def decode_step(st, q1):
    from kvpress_kernels.ops.decode_attention import paged_decode_attention

    return paged_decode_attention(q1, st["k_pages"], st["v_pages"], st["page_table"], st["lengths"], return_probs=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="results")
    ap.add_argument("--soak", type=int, default=200)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    report = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "checks": {}}
    ok = True

    # 1. No host sync (CUDA only: the sync debug mode exists there).
    st = build(dev, dtype, N=512 if dev.type == "cpu" else 2048)
    budget = st["N"] // 2
    compress_step(st, budget)  # warm-up: Triton compiles outside the checked region
    st = build(dev, dtype, N=st["N"])
    q1 = torch.randn(st["B"], st["Hkv"] * st["G"], 1, st["D"], device=dev, dtype=dtype)
    decode_step(st, q1)
    try:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        compress_step(st, budget)
        decode_step(st, q1)
        report["checks"]["no_host_sync"] = "pass" if dev.type == "cuda" else "n/a on cpu (flow ran)"
    except Exception as exc:  # a sync raises here
        report["checks"]["no_host_sync"] = f"FAIL: {exc.__class__.__name__}: {exc}"
        ok = False
    finally:
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)

    # 2. CUDA-graph capture + replay with new data equals an eager run.
    if dev.type == "cuda":
        try:
            st = build(dev, dtype, N=2048, seed=1)
            st_eager = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            snapshot = {k: st[k].clone() for k in ("k_pages", "v_pages", "lengths")}
            with torch.cuda.stream(s):
                compress_step(st, budget)  # warm-up on the side stream
            torch.cuda.current_stream().wait_stream(s)
            for k_, v_ in snapshot.items():
                st[k_].copy_(v_)
            with torch.cuda.graph(graph):
                kept_graph = compress_step(st, budget)
            # New data: fresh queries and keys in the same buffers, then replay.
            fresh = build(dev, dtype, N=2048, seed=2)
            for k_ in ("k_pages", "v_pages", "page_table", "lengths", "q"):
                st[k_].copy_(fresh[k_])
                st_eager[k_].copy_(fresh[k_])
            graph.replay()
            kept_eager = compress_step(st_eager, budget)
            torch.cuda.synchronize()
            same = (torch.equal(kept_graph, kept_eager) and torch.equal(st["k_pages"], st_eager["k_pages"])
                    and torch.equal(st["lengths"], st_eager["lengths"]))
            report["checks"]["cuda_graph_compress_replay"] = "pass" if same else "FAIL: replay differs from eager"
            ok &= same
        except Exception as exc:
            report["checks"]["cuda_graph_compress_replay"] = f"FAIL: {exc.__class__.__name__}: {exc}"
            ok = False

        # The decode step (paged attention with per-key probabilities) captured and replayed with
        # a new query and a new cache content.
        try:
            st = build(dev, dtype, N=2048, seed=3)
            q1 = torch.randn(st["B"], st["Hkv"] * st["G"], 1, st["D"], device=dev, dtype=dtype)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                decode_step(st, q1)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_g, probs_g = decode_step(st, q1)
            fresh = build(dev, dtype, N=2048, seed=4)
            for k_ in ("k_pages", "v_pages", "page_table", "lengths"):
                st[k_].copy_(fresh[k_])
            q1.copy_(torch.randn_like(q1))
            graph.replay()
            out_e, probs_e = decode_step(st, q1)
            torch.cuda.synchronize()
            same = torch.equal(out_g, out_e) and torch.equal(probs_g, probs_e)
            report["checks"]["cuda_graph_decode_replay"] = "pass" if same else "FAIL: replay differs from eager"
            ok &= same
        except Exception as exc:
            report["checks"]["cuda_graph_decode_replay"] = f"FAIL: {exc.__class__.__name__}: {exc}"
            ok = False

    # 3. Soak: many prefill/compress/decode cycles through PagedKVCache, pages and memory flat.
    from kvpress_kernels.cache import PagedKVCache

    cycles = args.soak if dev.type == "cuda" else 10
    cache = PagedKVCache(2, 2, 4, 64, max_tokens=1200, page_size=16, dtype=dtype, device=dev)
    mem0 = pages0 = None
    t0 = time.perf_counter()
    for i in range(cycles):
        cache.reset()
        for layer in range(2):
            k = torch.randn(2, 4, 1000, 64, device=dev, dtype=dtype)
            cache.append(layer, k, k)
            _, kept = __import__("kvpress_kernels.ops.selection", fromlist=["x"]).select_topk(
                torch.rand(8, 1000, device=dev), 300)
            cache.compact(layer, kept.view(2, 4, -1), new_lengths=[[300] * 4] * 2)
            cache.append(layer, k[:, :, :1], k[:, :, :1])
        if i == 1:
            mem0 = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
            pages0 = cache.pages_in_use()
    mem1 = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    pages1 = cache.pages_in_use()
    cache.check_invariants()
    flat = pages1 == pages0 and mem1 <= mem0
    report["checks"]["soak"] = {"cycles": cycles, "pages_in_use": [pages0, pages1], "device_bytes": [mem0, mem1],
                                "seconds": round(time.perf_counter() - t0, 2), "result": "pass" if flat else "FAIL"}
    ok &= flat
    with open(os.path.join(args.out, "sync_graph.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
