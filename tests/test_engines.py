"""Block-layout ops (kvpress_kernels.ops.block_compaction) and the vLLM engine call
(kvpress_kernels.engines.vllm) on tensors allocated exactly the way vLLM allocates them."""

import math

import numpy as np
import pytest
import torch

from conftest import devices_for_triton
from kvpress_kernels import ChunkKV, H2O, KNorm, PyramidKV, ShotKV, SnapKV, StreamingLLM, TOVA
from kvpress_kernels.engines import compress_request, kv_cache_views, query_window_tokens
from kvpress_kernels.methods.base import GenerationInfo, PrefillInputs
from kvpress_kernels.ops.block_compaction import (block_attention_mass, block_compact_, block_compact_launch_config,
                                                  block_gather_, freed_block_range, gather_block_tokens, raw_bits)
from kvpress_kernels.ops.compaction import compact_
from kvpress_kernels.ops.scoring import attention_mass
from kvpress_kernels.ops.selection import select_topk

TRITON_DEV = devices_for_triton()[0]

# vLLM's logical shapes per backend and the stride orders it permutes them by (NHD, HND).
SHAPES = {"flash_attn": lambda nb, bs, h, d: (2, nb, bs, h, d),
          "flashinfer": lambda nb, bs, h, d: (nb, 2, bs, h, d)}
STRIDE_ORDERS = {"NHD": (0, 1, 2, 3, 4), "HND": (0, 1, 3, 2, 4)}


def vllm_alloc(layout, nb, bs, h, d, dtype, order="NHD", device="cpu"):
    """One layer's cache the way vllm/v1/worker/gpu/attn_utils.py::_reshape_kv_cache builds it: a raw
    buffer viewed in the stride order's shape, then permuted back to the backend's logical shape."""
    shape = SHAPES[layout](nb, bs, h, d)
    so = STRIDE_ORDERS[order]
    raw = torch.randn(math.prod(shape), device=device).to(dtype)
    inv = [so.index(i) for i in range(len(so))]
    return raw.view(tuple(shape[i] for i in so)).permute(*inv)


def cross_layer_alloc(L, nb, bs, h, d, dtype, device="cpu"):
    """vLLM's cross-layer allocation (FlashAttention ``include_num_layers_dimension``, NHD):
    physical ``[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]``, each layer a
    ``[2, num_blocks, ...]`` view."""
    buf = torch.randn(nb, L, 2, bs, h, d, device=device).to(dtype)
    return [buf[:, i].transpose(0, 1) for i in range(L)], buf


def random_table(nb, n_tokens, bs, extra=2, gen=None):
    need = -(-n_tokens // bs)
    ids = torch.randperm(nb, generator=gen)[:need].to(torch.int32)
    return torch.cat([ids, torch.full((extra,), -1, dtype=torch.int32)])  # stale tail entries are never read


def random_kept(H, n, K, shared, gen=None):
    rows = 1 if shared else H
    return torch.stack([torch.randperm(n, generator=gen)[:K].sort().values for _ in range(rows)]).to(torch.int32)


def naive_expected(k, v, table, kept, n):
    """Expected caches after compaction, built move by move in Python (independent of the plan code)."""
    k, v = k.clone(), v.clone()
    H, bs = k.shape[2], k.shape[1]
    for h in range(H):
        a = kept[min(h, kept.shape[0] - 1)].tolist()
        K = len(a)
        holes = [j for j in range(K) if j not in set(a)]
        sources = [s for s in a if s >= K]
        assert len(holes) == len(sources)
        for s, dst in zip(sources, holes):
            sb, so = int(table[s // bs]), s % bs
            db, do = int(table[dst // bs]), dst % bs
            k[db, do, h] = k[sb, so, h]
            v[db, do, h] = v[sb, so, h]
    return k, v


def bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_bits_equal(a, b, what):
    ba, bb = bits(a), bits(b)
    bad = (ba != bb)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} elements differ, first at {bad.nonzero()[0].tolist()}"


# ------------------------------------------------------------------------------------------------ compaction

CASES = [  # (layout, order, nb, bs, H, D, n_tokens, K, shared, dtype)
    ("flash_attn", "NHD", 9, 16, 2, 16, 97, 41, False, torch.float16),
    ("flash_attn", "HND", 9, 16, 4, 8, 111, 60, False, torch.float32),
    ("flashinfer", "NHD", 12, 16, 1, 32, 130, 7, True, torch.float16),
    ("flashinfer", "HND", 7, 32, 3, 16, 200, 100, False, torch.float16),
    ("flash_attn", "NHD", 4, 16, 2, 24, 17, 17, False, torch.float32),  # keeps everything: nothing moves
    ("flash_attn", "NHD", 4, 16, 2, 16, 33, 1, True, torch.float32),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-H{c[4]}-n{c[6]}-K{c[7]}-{'shared' if c[8] else 'heads'}")
def test_block_compact_bit_exact(case, backend):
    layout, order, nb, bs, H, D, n, K, shared, dtype = case
    dev = TRITON_DEV if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(1)
    kv = vllm_alloc(layout, nb, bs, H, D, dtype, order, device=dev)
    k, v = kv_cache_views(kv, layout)
    # a strided view of the engine's buffer, as vLLM hands it over (only FlashAttention NHD is dense)
    assert k.is_contiguous() == (layout == "flash_attn" and order == "NHD")
    table = random_table(nb, n, bs, gen=gen).to(dev)
    kept = random_kept(H, n, K, shared, gen=gen).to(dev)
    want_k, want_v = naive_expected(k.cpu(), v.cpu(), table.cpu(), kept.cpu(), n)
    gather_before = [gather_block_tokens(c, table, n).cpu() for c in (k, v)]
    rng = block_compact_(k, v, table, kept, n, backend=backend)
    assert rng == freed_block_range(n, K, bs)
    # every element of both caches (other blocks, other heads, the slots that did not move) as expected
    assert_bits_equal(k.cpu(), want_k, "k_cache")
    assert_bits_equal(v.cpu(), want_v, "v_cache")
    # slots [0, K) of each head hold exactly the gather of its kept tokens (as a set of tokens)
    for c, before in zip((k, v), gather_before):
        after = gather_block_tokens(c, table, K).cpu()
        for h in range(H):
            idx = kept[min(h, kept.shape[0] - 1)].long().cpu()
            got = sorted(map(tuple, bits(after[h]).tolist()))
            exp = sorted(map(tuple, bits(before[h, idx]).tolist()))
            assert got == exp, f"head {h}: slots [0, K) are not the kept tokens"


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_freed_blocks_are_unreferenced(backend):
    dev = TRITON_DEV if backend == "triton" else "cpu"
    nb, bs, H, D, n, K = 10, 16, 2, 16, 150, 37
    kv = vllm_alloc("flash_attn", nb, bs, H, D, torch.float16, device=dev)
    k, v = kv_cache_views(kv, "flash_attn")
    table = random_table(nb, n, bs).to(dev)
    kept = random_kept(H, n, K, False).to(dev)
    start, end = block_compact_(k, v, table, kept, n, backend=backend)
    assert (start, end) == (3, 10)
    survivors = [gather_block_tokens(c, table, K).clone() for c in (k, v)]
    # poison every freed block: nothing the request still holds may change
    for b in table[start:end].tolist():
        k[b] = float("nan")
        v[b] = float("nan")
    for c, s in zip((k, v), survivors):
        assert_bits_equal(gather_block_tokens(c, table, K), s, "survivors after poisoning the freed blocks")
    assert not bool(torch.isnan(survivors[0]).any())


def test_cross_layer_allocation_compacts_only_its_layer():
    L, nb, bs, H, D, n, K = 3, 6, 16, 2, 16, 70, 30
    layers, buf = cross_layer_alloc(L, nb, bs, H, D, torch.float32)
    before = buf.clone()
    table = random_table(nb, n, bs)
    kept = random_kept(H, n, K, False)
    k, v = kv_cache_views(layers[1], "flash_attn")
    want_k, want_v = naive_expected(k, v, table, kept, n)
    block_compact_(k, v, table, kept, n, backend="reference")
    assert_bits_equal(k, want_k, "layer 1 K")
    assert_bits_equal(v, want_v, "layer 1 V")
    assert_bits_equal(buf[:, 0], before[:, 0], "layer 0 untouched")
    assert_bits_equal(buf[:, 2], before[:, 2], "layer 2 untouched")


@pytest.mark.triton
def test_triton_matches_reference_cross_layer():
    L, nb, bs, H, D, n, K = 2, 8, 16, 4, 32, 120, 50
    a, _ = cross_layer_alloc(L, nb, bs, H, D, torch.float16, device=TRITON_DEV)
    b = [t.clone() for t in a]
    table = random_table(nb, n, bs).to(TRITON_DEV)
    kept = random_kept(H, n, K, False).to(TRITON_DEV)
    for layers, be in ((a, "reference"), (b, "triton")):
        k, v = kv_cache_views(layers[0], "flash_attn")
        block_compact_(k, v, table, kept, n, backend=be)
    assert_bits_equal(a[0], b[0], "triton vs reference")


# ------------------------------------------------------------------------ parity with our own paged cache

@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_same_kept_sets_and_contents_as_paged_cache(backend):
    """Same scores -> same selection -> the engine layout and our paged cache hold the same tokens per
    head in the same slots."""
    dev = TRITON_DEV if backend == "triton" else "cpu"
    nb, bs, H, G, D, n, W = 12, 16, 2, 2, 16, 90, 8
    kv = vllm_alloc("flashinfer", nb, bs, H, D, torch.float32, "HND", device=dev)
    k, v = kv_cache_views(kv, "flashinfer")
    table = random_table(nb, n, bs).to(dev)
    q = torch.randn(1, H * G, W, D, device=dev)
    scores = block_attention_mass(q, k, table, n, head_reduce="group_mean", backend=backend)  # [1, H, n]
    K = 40
    _, kept = select_topk(scores.reshape(H, n), torch.full((H,), K, device=dev), backend=backend)
    kept = kept.to(torch.int32)
    # our paged cache: one page per (head, block), page_size = bs
    dense_k = gather_block_tokens(k, table, n)            # [H, n, D]
    dense_v = gather_block_tokens(v, table, n)
    P = H * (-(-n // bs))
    k_pages = torch.zeros(P, bs, D, device=dev)
    v_pages = torch.zeros(P, bs, D, device=dev)
    pt = torch.randperm(P).view(1, H, -1).to(torch.int32).to(dev)
    for h in range(H):
        for j in range(n):
            k_pages[pt[0, h, j // bs], j % bs] = dense_k[h, j]
            v_pages[pt[0, h, j // bs], j % bs] = dense_v[h, j]
    lengths = torch.full((1, H), n, dtype=torch.int32, device=dev)
    compact_(k_pages, v_pages, pt, lengths, kept.view(1, H, K), backend=backend)
    block_compact_(k, v, table, kept, n, backend=backend)
    for h in range(H):
        for c_blk, c_pg in ((k, k_pages), (v, v_pages)):
            eng = gather_block_tokens(c_blk, table, K)[h]
            j = torch.arange(K, device=dev)
            ours = c_pg[pt[0, h, (j // bs).long()].long(), j % bs]
            assert_bits_equal(eng, ours, f"head {h}: engine layout vs paged cache")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_block_scoring_matches_dense(backend, order):
    dev = TRITON_DEV if backend == "triton" else "cpu"
    nb, bs, H, G, D, n, W = 9, 16, 2, 4, 16, 97, 7
    kv = vllm_alloc("flash_attn", nb, bs, H, D, torch.float32, order, device=dev)
    k, _ = kv_cache_views(kv, "flash_attn")
    table = random_table(nb, n, bs).to(dev)
    q = torch.randn(1, H * G, W, D, device=dev)
    dense = gather_block_tokens(k, table, n).unsqueeze(0)
    for kw in (dict(head_reduce="none"), dict(head_reduce="group_mean", pool="avg", pool_size=5, pool_end=n - W),
               dict(head_reduce="all_sum", causal=False)):
        got = block_attention_mass(q, k, table, n, backend=backend, **kw)
        want = attention_mass(q, dense, backend="reference", **kw)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------- the engine-side call

def dense_eviction(method, keys_l, values_l, queries_l, n, shots=None, scale=None):
    """The method run the ordinary way (every prompt query, dense keys): kept sets per layer."""
    L = len(keys_l)
    H, D = keys_l[0].shape[0], keys_l[0].shape[-1]
    Hq = queries_l[0].shape[1]
    info = GenerationInfo(num_layers=L, batch_size=1, num_heads=Hq, num_kv_heads=H, head_dim=D, prompt_lengths=(n,),
                          shots=None if shots is None else [list(shots)], device=keys_l[0].device)
    method.begin(info)
    out = []
    for i in range(L):
        ev = method.prefill(PrefillInputs(layer=i, queries=queries_l[i].permute(1, 0, 2).unsqueeze(0),
                                          keys=keys_l[i].unsqueeze(0), values=values_l[i].unsqueeze(0),
                                          lengths=torch.tensor([n]), scale=scale or D ** -0.5, info=info))
        if ev is None:
            out.append(None)
        else:
            cnt = int((ev.kept_idx[0, 0] >= 0).sum())
            out.append(ev.kept_idx[0, :, :cnt])
    return out


METHODS = [
    ("snapkv", lambda: SnapKV(0.4, window_size=8, kernel_size=3)),
    ("chunkkv", lambda: ChunkKV(0.4, window_size=8, chunk_size=10)),
    ("shotkv", lambda: ShotKV(prefill_keep_ratio=0.5, window_size=8)),
    ("streamingllm", lambda: StreamingLLM(0.3, n_sink=4)),
    ("knorm", lambda: KNorm(0.5)),
    ("tova", lambda: TOVA(0.5, compress_decode=False)),
    ("h2o", lambda: H2O(0.5, compress_decode=False)),
    ("keep_all", lambda: SnapKV(1.0, window_size=8)),
]


# every method on the reference path; the Triton path (the same block_compact_ call) on two of them,
# to keep interpreter time down
ENGINE_CASES = [pytest.param(m, "reference", id=f"{m[0]}-reference") for m in METHODS] + [
    pytest.param(m, "triton", id=f"{m[0]}-triton", marks=pytest.mark.triton) for m in METHODS[:3:2]]


@pytest.mark.parametrize("method_case,backend", ENGINE_CASES)
def test_compress_request_equals_method_on_dense_inputs(method_case, backend):
    name, make = method_case
    dev = TRITON_DEV if backend == "triton" else "cpu"
    L, nb, bs, H, G, D, n = 2, 10, 16, 2, 2, 16, 83
    shots = [(5, 25), (25, 47), (47, 70)] if name == "shotkv" else None
    caches = [vllm_alloc("flash_attn", nb, bs, H, D, torch.float32, "NHD", device=dev) for _ in range(L)]
    table = random_table(nb, n, bs).to(dev)
    views = [kv_cache_views(c, "flash_attn") for c in caches]
    keys = [gather_block_tokens(k, table, n) for k, _ in views]
    values = [gather_block_tokens(v, table, n) for _, v in views]
    all_q = [torch.randn(n, H * G, D, device=dev) for _ in range(L)]       # vLLM's token-major queries
    want = dense_eviction(make(), keys, values, all_q, n, shots=shots)
    W = query_window_tokens(make(), n, shots)
    window = None if W == 0 else torch.stack([q[n - W:] for q in all_q])   # what the engine saved
    res = compress_request(caches, table, n, make(), queries=window, layout="flash_attn", shots=shots,
                           num_heads=H * G, layer_lengths="pad", backend=backend)
    K = res.num_tokens
    for i in range(L):
        if want[i] is None:
            assert res.kept_tokens[i] is None
            continue
        got = res.kept_tokens[i].cpu()
        if want[i].shape[1] == K:
            assert torch.equal(got, want[i].cpu()), f"layer {i}: kept sets differ"
        else:  # "pad": the method's tokens plus the most recent evicted ones
            for h in range(H):
                chosen = set(want[i][h].tolist())
                extra = [j for j in range(n - 1, -1, -1) if j not in chosen][:K - len(chosen)]
                assert got[h].tolist() == sorted(chosen | set(extra)), f"layer {i} head {h}: padded set"
            want[i] = got
    assert res.per_layer_num_tokens == (K,) * L
    assert res.freed_block_range == freed_block_range(n, K, bs)
    s, e = res.freed_block_range
    assert torch.equal(res.freed_block_ids, table[s:e])
    for i, (k, v) in enumerate(views):
        kept = want[i] if want[i] is not None else torch.arange(n).expand(H, n)
        for c, dense in ((k, keys[i]), (v, values[i])):
            after = gather_block_tokens(c, table, K).cpu()
            for h in range(H):
                got = sorted(map(tuple, bits(after[h]).tolist()))
                exp = sorted(map(tuple, bits(dense[h, kept[h].long().cpu()].cpu()).tolist()))
                assert got == exp, f"layer {i} head {h}: cache slots are not the kept tokens"


def test_compress_request_kv_pair_layout_and_pyramid_per_layer():
    L, nb, bs, H, D, n, W = 4, 12, 16, 2, 16, 150, 8
    caches = [tuple(kv_cache_views(vllm_alloc("flashinfer", nb, bs, H, D, torch.float32), "flashinfer"))
              for _ in range(L)]
    table = random_table(nb, n, bs)
    q = torch.randn(L, W, H, D)
    method = PyramidKV(0.3, window_size=W, kernel_size=3, beta=2)
    before = [(k.clone(), v.clone()) for k, v in caches]
    with pytest.raises(ValueError, match="different number of tokens per layer"):
        compress_request(caches, table, n, method, queries=q, layout="kv_pair")
    for (k, v), (k0, v0) in zip(caches, before):  # rejected: nothing moved
        assert_bits_equal(k, k0, "k after a rejected call")
        assert_bits_equal(v, v0, "v after a rejected call")
    res = compress_request(caches, table, n, method, queries=q, layout="kv_pair", layer_lengths="per_layer")
    counts = res.per_layer_num_tokens
    assert len(set(counts)) > 1 and res.num_tokens == max(counts)
    assert res.freed_block_range == freed_block_range(n, max(counts), bs)


def test_query_window_tokens():
    assert query_window_tokens(SnapKV(0.5, window_size=16), 100) == 16
    assert query_window_tokens(ChunkKV(0.5, window_size=16), 10) == 10
    assert query_window_tokens(ShotKV(prefill_keep_ratio=0.5), 100, [(0, 40), (40, 80)]) == 20
    assert query_window_tokens(TOVA(0.5), 100) == 1
    assert query_window_tokens(H2O(0.5), 100) == 100
    assert query_window_tokens(StreamingLLM(0.5), 100) == 0


def test_short_query_window_is_a_named_error_and_changes_nothing():
    nb, bs, H, D, n = 8, 16, 2, 16, 100
    cache = vllm_alloc("flash_attn", nb, bs, H, D, torch.float32)
    before = cache.clone()
    table = random_table(nb, n, bs)
    with pytest.raises(ValueError, match="longer query window"):
        compress_request([cache], table, n, H2O(0.5, compress_decode=False), queries=torch.randn(1, 8, H, D))
    assert_bits_equal(cache, before, "cache after a rejected call")


# ------------------------------------------------------------------------------------------- bad inputs

def _good(dev="cpu"):
    nb, bs, H, D, n, K = 6, 16, 2, 16, 70, 30
    kv = vllm_alloc("flash_attn", nb, bs, H, D, torch.float32, device=dev)
    k, v = kv_cache_views(kv, "flash_attn")
    return kv, k, v, random_table(nb, n, bs), random_kept(H, n, K, False), n


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(table=a["table"].float()), TypeError, "block_table"),
    (lambda a: a.update(table=a["table"].view(1, -1)), ValueError, "block_table"),
    (lambda a: a["table"].__setitem__(0, 99), ValueError, "block_table holds block ids outside"),
    (lambda a: a["table"].__setitem__(1, a["table"][0]), ValueError, "lists one block twice"),
    (lambda a: a.update(n=10 ** 6), ValueError, "num_tokens"),
    (lambda a: a.update(kept=a["kept"].flip(-1).contiguous()), ValueError, "strictly ascending"),
    (lambda a: a.update(kept=a["kept"][:, :1].repeat(3, 1)), ValueError, "kept_idx must be"),
    (lambda a: a["kept"].__setitem__((0, -1), 70), ValueError, r"\[0, num_tokens=70\)"),
    (lambda a: a.update(kept=a["kept"].float()), TypeError, "kept_idx"),
    (lambda a: a.update(v=a["v"].half()), TypeError, "v_cache"),
    (lambda a: a.update(v=a["v"][:, :8]), ValueError, "v_cache"),
    (lambda a: a.update(k=a["k"][0]), ValueError, "k_cache"),
])
def test_block_compact_rejects_bad_inputs(mutate, exc, match):
    kv, k, v, table, kept, n = _good()
    before = kv.clone()
    args = dict(k=k, v=v, table=table, kept=kept, n=n)
    mutate(args)
    with pytest.raises(exc, match=match):
        block_compact_(args["k"], args["v"], args["table"], args["kept"], args["n"])
    assert_bits_equal(kv, before, "cache after a rejected call")


def test_engine_layouts_rejected_with_named_errors():
    fa = vllm_alloc("flash_attn", 6, 16, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="layout='flashinfer'"):
        kv_cache_views(fa, "flashinfer")
    with pytest.raises(ValueError, match="layout='flash_attn'"):
        kv_cache_views(vllm_alloc("flashinfer", 6, 16, 2, 16, torch.float32), "flash_attn")
    with pytest.raises(ValueError, match="layout must be one of"):
        kv_cache_views(fa, "paged")
    with pytest.raises(ValueError, match="kv_caches\\[0\\] must have 5 dimensions"):
        kv_cache_views(fa[0], "flash_attn", name="kv_caches[0]")
    with pytest.raises(TypeError, match="pair"):
        kv_cache_views(fa, "kv_pair")
    table = random_table(6, 40, 16)
    with pytest.raises(ValueError, match=r"kv_caches\[1\] \(K\)"):
        compress_request([fa, vllm_alloc("flash_attn", 6, 16, 4, 16, torch.float32)], table, 40, SnapKV(0.5),
                         queries=torch.randn(2, 8, 2, 16))
    with pytest.raises(ValueError, match="queries must be"):
        compress_request([fa], table, 40, SnapKV(0.5), queries=torch.randn(2, 8, 2, 16))
    with pytest.raises(ValueError, match="more than num_tokens"):
        compress_request([fa], table, 40, SnapKV(0.5), queries=torch.randn(1, 41, 2, 16))
    with pytest.raises(TypeError, match="CompressionMethod"):
        compress_request([fa], table, 40, "snapkv")


def test_opcheck_and_launch_config():
    _, k, v, table, kept, n = _good()
    torch.library.opcheck(torch.ops.kvpress_kernels.block_compact_.default, (k, v, table, kept, n, "reference"),
                          test_utils=("test_schema", "test_faketensor"))
    # bf16 D=128 as int64 bits: 256-byte rows, 32 tokens = one 8 KiB tile, 4 warps
    assert block_compact_launch_config(16, 32, 32, 16384, 8) == dict(BLOCK_SIZE=16, BLOCK_K=32, BLOCK_D=32, LOG_K=15,
                                                                     EVEN_D=True, num_warps=4)
    # one kept token: a one-warp tile still gives every thread a whole 16-byte vector
    cfg = block_compact_launch_config(16, 32, 32, 1, 8)
    assert cfg["num_warps"] == 1 and cfg["BLOCK_K"] * 256 >= 32 * 16
    # D=96 fp16 as int32 (48 elements): a power-of-two block covering 16 bytes, no masked tail
    cfg = block_compact_launch_config(16, 48, 48, 1000, 4)
    assert cfg["EVEN_D"] and 48 % cfg["BLOCK_D"] == 0 and cfg["BLOCK_D"] * 4 >= 16
    k96, _ = kv_cache_views(vllm_alloc("flash_attn", 4, 16, 2, 96, torch.float16), "flash_attn")
    assert raw_bits(k96).dtype == torch.int32  # int64 rows (24 elements) would not be 16-divisible
    k128, _ = kv_cache_views(vllm_alloc("flashinfer", 4, 16, 2, 128, torch.bfloat16, "HND"), "flashinfer")
    assert raw_bits(k128).dtype == torch.int64


def test_compile_fullgraph():
    """torch.compile sees one opaque mutating op (no graph break); results unchanged."""
    kv, k, v, table, kept, n = _good()
    want_k, want_v = naive_expected(k, v, table, kept, n)

    def f(k, v, t, kept):
        block_compact_(k, v, t, kept, n, backend="reference")

    torch.compile(f, fullgraph=True, backend="aot_eager")(k, v, table, kept)
    assert_bits_equal(k, want_k, "compiled k")
    assert_bits_equal(v, want_v, "compiled v")


# ----------------------------------------------------- the layouts docs/ENGINES.md maps to other engines

def test_tensorrt_llm_packed_pool_layout():
    """TensorRT-LLM's primary pool packs every layer in a block; get_buffers(layer) is
    [num_blocks, 2, tokens_per_block, kv_heads, head_dim], a strided view ("flashinfer" layout)."""
    L, nb, tpb, H, D, n, K = 3, 6, 16, 2, 16, 80, 33
    pool = torch.randn(nb, L, 2, tpb, H, D)
    before = pool.clone()
    table = random_table(nb, n, tpb)
    kept = random_kept(H, n, K, False)
    k, v = kv_cache_views(pool[:, 1], "flashinfer")
    want_k, want_v = naive_expected(k, v, table, kept, n)
    block_compact_(k, v, table, kept, n)
    assert_bits_equal(k, want_k, "K")
    assert_bits_equal(v, want_v, "V")
    assert_bits_equal(pool[:, 0], before[:, 0], "layer 0 untouched")
    assert_bits_equal(pool[:, 2], before[:, 2], "layer 2 untouched")


def test_sglang_paged_token_pool_mapping():
    """SGLang: k_buffer [num_slots, kv_heads, head_dim] per layer, req_to_token maps token -> slot; with
    a paged allocator the block table is req_to_token[::page_size] // page_size."""
    ps, pages, H, D, n, K = 8, 12, 2, 16, 70, 21
    k_buf, v_buf = torch.randn(pages * ps, H, D), torch.randn(pages * ps, H, D)
    page_ids = torch.randperm(pages)[:-(-n // ps)]
    req_to_token = (page_ids.repeat_interleave(ps) * ps + torch.arange(ps).repeat(len(page_ids)))[:n]
    kept = random_kept(H, n, K, False)
    k, v = k_buf.view(pages, ps, H, D), v_buf.view(pages, ps, H, D)
    table = (req_to_token[::ps] // ps).to(torch.int32)
    dense_k = k_buf[req_to_token].transpose(0, 1).clone()  # [H, n, D] in token order
    block_compact_(k, v, table, kept, n)
    after = k_buf[req_to_token[:K]].transpose(0, 1)
    for h in range(H):
        got = sorted(map(tuple, bits(after[h]).tolist()))
        exp = sorted(map(tuple, bits(dense_k[h, kept[h].long()]).tolist()))
        assert got == exp, f"head {h}"


# ------------------------------------------------------------------- private destination (block_gather_)

def split_tables(nb, n, K, bs, gen=None):
    """A source row for n tokens and a disjoint destination row for K tokens."""
    need_s, need_d = -(-n // bs), -(-K // bs)
    ids = torch.randperm(nb, generator=gen).to(torch.int32)
    return ids[:need_s], ids[need_s:need_s + need_d]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("layout,order,shared,dtype", [("flash_attn", "HND", False, torch.float16),
                                                       ("flashinfer", "NHD", True, torch.float32)])
def test_block_gather_bit_exact(layout, order, shared, dtype, backend):
    dev = TRITON_DEV if backend == "triton" else "cpu"
    nb, bs, H, D, n, K = 14, 16, 3, 16, 101, 45
    gen = torch.Generator().manual_seed(3)
    kv = vllm_alloc(layout, nb, bs, H, D, dtype, order, device=dev)
    k, v = kv_cache_views(kv, layout)
    src, dst = (t.to(dev) for t in split_tables(nb, n, K, bs, gen))
    kept = random_kept(H, n, K, shared, gen=gen).to(dev)
    want = [c.clone().cpu() for c in (k, v)]
    for w in want:  # expected: destination slot j of head h = source slot kept[h, j]; nothing else changes
        for h in range(H):
            for j, a in enumerate(kept[min(h, kept.shape[0] - 1)].tolist()):
                w[int(dst[j // bs]), j % bs, h] = w[int(src[a // bs]), a % bs, h]
    block_gather_(k, v, src, kept, n, dst, backend=backend)
    assert_bits_equal(k.cpu(), want[0], "k_cache")
    assert_bits_equal(v.cpu(), want[1], "v_cache")


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(dst=a["dst"][:1]), "at least"),
    (lambda a: a["dst"].__setitem__(0, a["src"][2]), "shares blocks"),
    (lambda a: a["dst"].__setitem__(1, a["dst"][0]), "twice"),
    (lambda a: a["dst"].__setitem__(0, 99), "outside"),
])
def test_block_gather_rejects_bad_destinations(mutate, match):
    nb, bs, H, D, n, K = 12, 16, 2, 16, 70, 40
    kv = vllm_alloc("flash_attn", nb, bs, H, D, torch.float32)
    k, v = kv_cache_views(kv, "flash_attn")
    src, dst = split_tables(nb, n, K, bs)
    args = dict(src=src, dst=dst.clone())
    mutate(args)
    before = kv.clone()
    with pytest.raises(ValueError, match=match):
        block_gather_(k, v, args["src"], random_kept(H, n, K, False), n, args["dst"])
    assert_bits_equal(kv, before, "cache after a rejected call")


def test_compress_request_private_destination():
    L, nb, bs, H, D, n, W = 2, 16, 16, 2, 16, 90, 8
    caches = [vllm_alloc("flash_attn", nb, bs, H, D, torch.float32, "HND") for _ in range(L)]
    src, dst = split_tables(nb, n, n, bs)
    q = torch.randn(L, W, H, D)
    dense = [[gather_block_tokens(c, src, n) for c in kv_cache_views(t, "flash_attn")] for t in caches]
    res = compress_request(caches, src, n, SnapKV(0.4, window_size=W), queries=q, destination_block_table=dst)
    K = res.num_tokens
    assert res.freed_block_range == (0, -(-n // bs)) and torch.equal(res.freed_block_ids, src)
    for i, t in enumerate(caches):
        for c, d in zip(kv_cache_views(t, "flash_attn"), dense[i]):
            got = gather_block_tokens(c, dst, K)
            for h in range(H):  # in position order
                assert_bits_equal(got[h], d[h, res.kept_tokens[i][h].long()], f"layer {i} head {h}")
            assert_bits_equal(gather_block_tokens(c, src, n), d, f"layer {i}: sources untouched")


def test_opcheck_block_gather():
    nb, bs, H, D, n, K = 12, 16, 2, 16, 70, 40
    k, v = kv_cache_views(vllm_alloc("flash_attn", nb, bs, H, D, torch.float32), "flash_attn")
    src, dst = split_tables(nb, n, K, bs)
    torch.library.opcheck(torch.ops.kvpress_kernels.block_gather_.default,
                          (k, v, src, dst, random_kept(H, n, K, False), "reference"),
                          test_utils=("test_schema", "test_faketensor"))
