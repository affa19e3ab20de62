"""PagedKVCache (kvpress_kernels.cache).

The oracle is a plain Python model of the cache: per (layer, seq, head) row, the list of tokens
(position, k row, v row) in slot order, with compaction done the naive way (holes and sources by
list comprehension). Hypothesis drives random sequences of append / reserve / compact / compact_all
/ free_sequence; after every step the cache's dense copy must equal the model bit for bit, its
invariants must hold, and its page accounting must equal the model's.
"""

import math

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA, devices_for_triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpress_kernels.cache import CacheFullError, PagedKVCache


# --------------------------------------------------------------------------- the model
class Model:
    def __init__(self, L, B, H, page_size, num_pages, grow):
        self.L, self.B, self.H, self.P = L, B, H, page_size
        self.rows = {(l, b, h): [] for l in range(L) for b in range(B) for h in range(H)}
        self.seen = {r: 0 for r in self.rows}
        self.owned = {r: 0 for r in self.rows}   # pages a row owns (reserve may run ahead of length)
        self.num_pages, self.grow = num_pages, grow

    def free_pages(self):
        return self.num_pages - sum(self.owned.values())

    def would_fail(self, layer, extra):
        """True when reserving ``extra[b][h]`` more tokens in ``layer`` exceeds a fixed pool."""
        need = sum(max(0, -(-(len(self.rows[(layer, b, h)]) + extra[b][h]) // self.P) - self.owned[(layer, b, h)])
                   for b in range(self.B) for h in range(self.H))
        if need > self.free_pages():
            if not self.grow:
                return True
            self.num_pages = max(2 * self.num_pages, self.num_pages + need - self.free_pages())
        return False

    def reserve(self, layer, extra):
        for b in range(self.B):
            for h in range(self.H):
                r = (layer, b, h)
                self.owned[r] = max(self.owned[r], -(-(len(self.rows[r]) + extra[b][h]) // self.P))

    def append(self, layer, k, v, counts, positions):
        for b in range(self.B):
            for h in range(self.H):
                r = (layer, b, h)
                for t in range(counts[b][h]):
                    pos = self.seen[r] + t if positions is None else positions(b, h, t)
                    self.rows[r].append((pos, k[b, h, t].clone(), v[b, h, t].clone()))
                self.seen[r] += counts[b][h]

    def compact(self, layer, kept):
        for b in range(self.B):
            for h in range(self.H):
                r = (layer, b, h)
                a = kept[b][h]
                n = len(a)
                holes = [s for s in range(n) if s not in set(a)]
                sources = [s for s in a if s >= n]
                new = self.rows[r][:n]
                for hole, src in zip(holes, sources):
                    new[hole] = self.rows[r][src]
                self.rows[r] = new
                self.owned[r] = -(-n // self.P)

    def free_sequence(self, b):
        for r in self.rows:
            if r[1] == b:
                self.rows[r], self.seen[r], self.owned[r] = [], 0, 0


def assert_matches(cache: PagedKVCache, model: Model):
    cache.check_invariants()
    assert cache.pages_in_use() == sum(model.owned.values())
    assert cache.num_pages == model.num_pages
    assert cache.num_free_pages() == model.free_pages()
    assert cache.bytes_in_use() == sum(model.owned.values()) * cache.page_bytes
    for l in range(model.L):
        k, v, lengths, pos = cache.gather(l)
        assert lengths.dtype == torch.int32
        for b in range(model.B):
            for h in range(model.H):
                row = model.rows[(l, b, h)]
                n = len(row)
                assert int(lengths[b, h]) == n and int(cache.seq_lengths(l)[b, h]) == n
                assert int(cache.seen_tokens(l)[b, h]) == model.seen[(l, b, h)]
                if n:
                    want_k = torch.stack([t[1] for t in row])
                    want_v = torch.stack([t[2] for t in row])
                    assert torch.equal(k[b, h, :n].cpu().view(torch.uint8), want_k.view(torch.uint8)), (l, b, h)
                    assert torch.equal(v[b, h, :n].cpu().view(torch.uint8), want_v.view(torch.uint8)), (l, b, h)
                    if pos is not None:
                        assert pos[b, h, :n].tolist() == [t[0] for t in row], (l, b, h)
                assert not bool(k[b, h, n:].ne(0).any()) and not bool(v[b, h, n:].ne(0).any())
                if pos is not None:
                    assert bool((pos[b, h, n:] == -1).all())


# --------------------------------------------------------------------------- the property test
def _random_kept(n, g, mode):
    if n == 0 or mode == 0:
        return []
    if mode == 1:
        return list(range(n))                                  # nothing evicted
    if mode == 2:
        return [int(torch.randint(n, (1,), generator=g))]     # one survivor
    if mode == 3:
        return list(range(n - max(1, n // 2), n))              # recent window: everything moves
    p = float(torch.rand((), generator=g))
    return [s for s in range(n) if float(torch.rand((), generator=g)) < p]


def _drive(data, backend, device, max_steps):
    L = data.draw(st.integers(1, 2), label="layers")
    B = data.draw(st.integers(1, 3), label="batch")
    H = data.draw(st.integers(1, 2), label="kv_heads")
    D = data.draw(st.sampled_from([1, 4, 6]), label="head_dim")
    P = data.draw(st.sampled_from([1, 2, 3, 16]), label="page_size")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="dtype")
    fixed = data.draw(st.booleans(), label="fixed_pool")
    track = data.draw(st.booleans(), label="track_positions")
    num_pages = data.draw(st.integers(1, 3 * L * B * H), label="num_pages") if fixed else None
    cache = PagedKVCache(L, B, H, D, num_pages=num_pages, page_size=P, dtype=dtype, device=device,
                         track_positions=track, backend=backend)
    model = Model(L, B, H, P, cache.num_pages, grow=not fixed)
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    n_steps = data.draw(st.integers(1, max_steps), label="steps")
    for _ in range(n_steps):
        op = data.draw(st.sampled_from(["append", "append", "append", "compact", "compact_all", "reserve", "free"]))
        layer = data.draw(st.integers(0, L - 1))
        if op in ("append", "reserve"):
            T = data.draw(st.integers(0, 9))
            kind = data.draw(st.sampled_from(["none", "per_seq", "per_row"]))
            if kind == "none":
                counts, extra = None, [[T] * H for _ in range(B)]
            else:
                per = torch.randint(0, T + 1, (B, H) if kind == "per_row" else (B,), generator=g)
                counts = per.numpy() if kind == "per_row" else per.tolist()
                extra = [[int(per[b, h]) if kind == "per_row" else int(per[b]) for h in range(H)] for b in range(B)]
            if op == "reserve":
                if model.would_fail(layer, extra):
                    with pytest.raises(CacheFullError, match="num_pages"):
                        cache.reserve(layer, np.array(extra))
                else:
                    cache.reserve(layer, np.array(extra))
                    model.reserve(layer, extra)
            else:
                k = torch.randn((B, H, T, D), generator=g).to(dtype)
                v = torch.randn((B, H, T, D), generator=g).to(dtype)
                explicit = data.draw(st.booleans())
                positions = fn = None
                if explicit:
                    positions = torch.randint(0, 1 << 20, (B, T), generator=g)
                    fn = (lambda b, h, t, p=positions: int(p[b, t]))
                if model.would_fail(layer, extra):
                    with pytest.raises(CacheFullError, match="num_pages"):
                        cache.append(layer, k.to(device), v.to(device), counts=counts,
                                     positions=positions.to(device) if explicit else None)
                else:
                    cache.append(layer, k.to(device), v.to(device), counts=counts,
                                 positions=positions.to(device) if explicit else None)
                    model.reserve(layer, extra)
                    model.append(layer, k, v, extra, fn if track else None)
        elif op in ("compact", "compact_all"):
            layers = [layer] if op == "compact" else list(range(L))
            kept = {l: [[_random_kept(len(model.rows[(l, b, h)]), g, data.draw(st.integers(0, 4)))
                         for h in range(H)] for b in range(B)] for l in layers}
            K = max([len(s) for l in layers for row in kept[l] for s in row] + [0]) + data.draw(st.integers(0, 2))
            idx_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
            kept_idx = torch.full((len(layers), B, H, K), -1, dtype=idx_dtype)
            for i, l in enumerate(layers):
                for b in range(B):
                    for h in range(H):
                        kept_idx[i, b, h, : len(kept[l][b][h])] = torch.tensor(kept[l][b][h], dtype=idx_dtype)
            give_lengths = data.draw(st.booleans())
            new_len = (kept_idx >= 0).sum(-1).numpy()
            if op == "compact":
                cache.compact(layer, kept_idx[0].to(device), new_lengths=new_len[0] if give_lengths else None)
            else:
                cache.compact_all(kept_idx.to(device), new_lengths=new_len if give_lengths else None)
            for l in layers:
                model.compact(l, kept[l])
        else:
            b = data.draw(st.integers(0, B - 1))
            cache.free_sequence(b)
            model.free_sequence(b)
        assert_matches(cache, model)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_cache_matches_model_reference(data):
    _drive(data, "reference", "cpu", max_steps=12)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_cache_matches_model_triton(device):
    # Few examples: every step runs the interpreter; the reference variant explores more.
    @settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def run(data):
        _drive(data, "triton", device, max_steps=8)

    run()


# --------------------------------------------------------------------------- deterministic tests
def _filled(backend="reference", device="cpu", **kw):
    args = dict(num_layers=2, batch_size=2, num_kv_heads=3, head_dim=8, page_size=4, backend=backend, device=device)
    args.update(kw)
    cache = PagedKVCache(**args)
    g = torch.Generator().manual_seed(1)
    for layer in range(cache.num_layers):
        k = torch.randn((2, 3, 23, 8), generator=g).to(cache.dtype).to(device)
        v = torch.randn((2, 3, 23, 8), generator=g).to(cache.dtype).to(device)
        cache.append(layer, k, v, counts=[23, 11])
    return cache


def _kept(cache, layer, keep):
    """kept_idx keeping ``keep(n)`` slots of each row of ``layer``."""
    lens = cache.seq_lengths(layer)
    rows = [[keep(int(n)) for n in row] for row in lens]
    K = max(len(s) for row in rows for s in row) + 1
    kept = torch.full((cache.batch_size, cache.num_kv_heads, K), -1, dtype=torch.int64)
    for b, row in enumerate(rows):
        for h, s in enumerate(row):
            kept[b, h, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return kept.to(cache.device)


def test_memory_accounting_after_compaction():
    cache = _filled()
    before_bytes, before_free = cache.bytes_in_use(), cache.num_free_pages()
    owned_before = sum(len(cache.owned_pages(0, b, h)) for b in range(2) for h in range(3))
    kept = _kept(cache, 0, lambda n: list(range(0, n, 3)))     # keep every third token
    cache.compact(0, kept)
    new = cache.seq_lengths(0)
    freed = owned_before - int(sum(-(-int(n) // 4) for n in new.flatten()))
    assert freed > 0
    assert cache.bytes_in_use() == before_bytes - freed * cache.page_bytes
    assert cache.num_free_pages() == before_free + freed
    assert cache.page_bytes == 2 * 4 * 8 * 2   # K+V, page_size 4, head_dim 8, fp16
    assert cache.bytes_reserved() == cache.num_pages * cache.page_bytes
    cache.check_invariants()


def test_freed_pages_are_reused_by_other_layers():
    """One pool for all layers: pages freed by layer 0 serve layer 1 in a pool with no other room."""
    cache = PagedKVCache(2, 1, 1, 4, num_pages=4, page_size=2, grow=False)
    kv = torch.randn(1, 1, 8, 4, dtype=torch.float16)
    cache.append(0, kv, kv)                       # 4 pages: the whole pool
    with pytest.raises(CacheFullError, match="num_pages=4"):
        cache.append(1, kv[:, :, :1], kv[:, :, :1])
    cache.check_invariants()                      # the failed append changed nothing
    assert cache.seq_lengths(1).sum() == 0 and cache.pages_in_use() == 4
    cache.compact(0, torch.tensor([[[1, 6, -1]]]))   # keeps 2 tokens: 1 page, 3 freed
    assert cache.num_free_pages() == 3
    cache.append(1, kv[:, :, :6], kv[:, :, :6])
    assert cache.num_free_pages() == 0
    cache.check_invariants()
    k1, _, _, _ = cache.gather(1)
    assert torch.equal(k1[0, 0], kv[0, 0, :6])
    k0, _, _, pos0 = cache.gather(0)
    # Token 6 fills the hole at slot 0, token 1 stays at slot 1: slot order is not position order.
    assert torch.equal(k0[0, 0], kv[0, 0, [6, 1]]) and pos0[0, 0].tolist() == [6, 1]


def test_growth_keeps_contents():
    cache = PagedKVCache(1, 2, 2, 4, page_size=2)          # growable, 4 pages, max_pages 128
    kv = torch.randn(2, 2, 3, 4, dtype=torch.float16)
    cache.append(0, kv, kv)
    k0, v0, _, p0 = cache.gather(0)
    n0, m0 = cache.num_pages, cache.max_pages
    big = torch.randn(2, 2, 300, 4, dtype=torch.float16)
    cache.append(0, big, big)                               # grows the pool and the page table
    assert cache.num_pages > n0 and cache.max_pages > m0
    k, v, lengths, pos = cache.gather(0)
    assert torch.equal(k[:, :, :3], k0) and torch.equal(v[:, :, 3:], big) and torch.equal(pos[:, :, :3], p0)
    assert lengths.tolist() == [[303, 303], [303, 303]]
    cache.check_invariants()


def test_max_tokens_sizes_a_fixed_pool():
    cache = PagedKVCache(2, 2, 2, 4, max_tokens=10, page_size=4, grow=False)
    assert cache.num_pages == 2 * 2 * 2 * 3 and cache.max_pages == 3
    kv = torch.randn(2, 2, 10, 4, dtype=torch.float16)
    cache.append(0, kv, kv)
    cache.append(1, kv, kv)
    assert cache.num_free_pages() == 0
    with pytest.raises(CacheFullError, match="max_tokens=10"):
        cache.append(0, kv[:, :, :3], kv[:, :, :3])


def test_compact_all_equals_per_layer_compact():
    a, b = _filled(), _filled()
    kept = torch.stack([_kept(a, l, lambda n: [s for s in range(n) if s % 4 != 1]) for l in range(2)])
    a.compact_all(kept)
    for l in range(2):
        b.compact(l, kept[l])
    for l in range(2):
        for x, y in zip(a.gather(l), b.gather(l)):
            assert torch.equal(x, y)
    assert torch.equal(a.page_table, b.page_table) and a.num_free_pages() == b.num_free_pages()


def test_layer_view_and_reset():
    cache = _filled()
    table, lengths = cache.layer_view(1)
    assert table.shape == (2, 3, cache.max_pages) and lengths.tolist() == [[23] * 3, [11] * 3]
    assert table.data_ptr() == cache.page_table[1].data_ptr()   # a view, not a copy
    cache.reset()
    assert cache.pages_in_use() == 0 and cache.num_free_pages() == cache.num_pages
    assert cache.max_length(0) == 0 and int(cache.lengths.abs().sum()) == 0
    cache.check_invariants()


def test_check_invariants_catches_corruption():
    def broken(mutate, match):
        cache = _filled(num_pages=64)   # 54 pages used, 10 free
        mutate(cache)
        with pytest.raises(RuntimeError, match=match):
            cache.check_invariants()

    broken(lambda c: setattr(c, "_nfree", c._nfree - 1), "leaked")
    def own_twice(c):
        c._table_h[1, 0, 0, 0] = c._table_h[0, 0, 0, 0]
        c.page_table[1, 0, 0, 0] = c.page_table[0, 0, 0, 0]
    broken(own_twice, "owned twice")
    broken(lambda c: c.lengths.__setitem__((0, 0, 0), 5), "device lengths")
    broken(lambda c: c.page_table.__setitem__((0, 1, 1, 0), 0), "device page_table")
    def over(c):
        c._len_h[0, 1, 0] += 4
        c.lengths[0, 1, 0] += 4
    broken(over, "capacity")
    def dup_free(c):
        c._free[c._nfree - 1] = c._free[c._nfree - 2]
    broken(dup_free, "free list")


def test_debug_mode_checks_after_every_call(monkeypatch):
    cache = _filled(num_pages=64)
    cache._nfree -= 1                                        # leak a page behind the cache's back
    cache.reserve(0, 0)                                      # no debug: not noticed
    monkeypatch.setenv("KVPRESS_KERNELS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="leaked"):
        cache.reserve(0, 0)


# --------------------------------------------------------------------------- bad inputs
def test_bad_constructor_args():
    with pytest.raises(ValueError, match="num_layers"):
        PagedKVCache(0, 1, 1, 4)
    with pytest.raises(TypeError, match="batch_size"):
        PagedKVCache(1, 1.5, 1, 4)
    with pytest.raises(TypeError, match="num_kv_heads"):
        PagedKVCache(1, 1, True, 4)
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(1, 1, 1, 4, page_size=0)
    with pytest.raises(ValueError, match="num_pages"):
        PagedKVCache(1, 1, 1, 4, num_pages=0)
    with pytest.raises(ValueError, match="max_tokens"):
        PagedKVCache(1, 1, 1, 4, max_tokens=0)
    with pytest.raises(TypeError, match="dtype"):
        PagedKVCache(1, 1, 1, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="device"):
        PagedKVCache(1, 1, 1, 4, device="nonsense")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="device"):
            PagedKVCache(1, 1, 1, 4, device="cuda")
    with pytest.raises(ValueError, match="backend"):
        PagedKVCache(1, 1, 1, 4, backend="fast")


def test_bad_append_args():
    cache = _filled()
    kv = torch.zeros(2, 3, 5, 8, dtype=torch.float16)
    for layer, err in ((2, ValueError), (-1, ValueError), ("0", TypeError), (True, TypeError)):
        with pytest.raises(err, match="layer"):
            cache.append(layer, kv, kv)
    with pytest.raises(ValueError, match="k"):
        cache.append(0, kv[0], kv)
    with pytest.raises(ValueError, match="k must have shape"):
        cache.append(0, kv[:1], kv)
    with pytest.raises(ValueError, match="k must have shape"):
        cache.append(0, kv[:, :2], kv)
    with pytest.raises(ValueError, match="k must have shape"):
        cache.append(0, kv[..., :4], kv)
    with pytest.raises(TypeError, match="k must have dtype"):
        cache.append(0, kv.float(), kv)
    with pytest.raises(ValueError, match="k must be on device"):
        cache.append(0, kv.to("meta"), kv)
    with pytest.raises(ValueError, match="v must have shape"):
        cache.append(0, kv, kv[:, :, :4])
    with pytest.raises(ValueError, match="counts"):
        cache.append(0, kv, kv, counts=[6, 1])
    with pytest.raises(ValueError, match="counts"):
        cache.append(0, kv, kv, counts=[1, 1, 1])
    with pytest.raises(TypeError, match="counts"):
        cache.append(0, kv, kv, counts=[1.0, 2.0])
    with pytest.raises(ValueError, match="positions"):
        cache.append(0, kv, kv, positions=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="positions"):
        cache.append(0, kv, kv, positions=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="extra_tokens"):
        cache.reserve(0, -1)
    cache.check_invariants()
    assert cache.seq_lengths(0).tolist() == [[23] * 3, [11] * 3]   # nothing was appended


def test_bad_compact_args():
    cache = _filled()
    kept = _kept(cache, 0, lambda n: list(range(n // 2)))
    with pytest.raises(ValueError, match="kept_idx"):
        cache.compact(0, kept[0])
    with pytest.raises(ValueError, match="kept_idx"):
        cache.compact(0, kept[:1])
    with pytest.raises(TypeError, match="kept_idx"):
        cache.compact(0, kept.float())
    with pytest.raises(ValueError, match="new_lengths"):
        cache.compact(0, kept, new_lengths=np.zeros((2,), dtype=np.int64))
    wrong = (kept >= 0).sum(-1).numpy()
    wrong[1, 2] -= 1
    with pytest.raises(ValueError, match="new_lengths disagrees"):
        cache.compact(0, kept, new_lengths=wrong)
    with pytest.raises(ValueError, match="new_lengths"):
        cache.compact(0, kept, new_lengths=np.full((2, 3), 50))
    bad = kept.clone()
    bad[0, 0, 0] = 30                                     # beyond the row's 23 tokens, not ascending
    with pytest.raises(ValueError, match="kept_idx"):
        cache.compact(0, bad)
    with pytest.raises(ValueError, match="kept_idx"):
        cache.compact_all(kept)
    with pytest.raises(ValueError, match="seq"):
        cache.free_sequence(2)
    cache.check_invariants()
    assert cache.seq_lengths(0).tolist() == [[23] * 3, [11] * 3]   # nothing was compacted


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", None])
def test_gpu_cache_matches_cpu_reference(backend):
    gpu = _filled(backend=backend, device="cuda", dtype=torch.bfloat16)
    cpu = _filled(backend="reference", device="cpu", dtype=torch.bfloat16)
    for c in (gpu, cpu):
        kept = _kept(c, 1, lambda n: [s for s in range(n) if s % 3 != 0])
        c.compact(1, kept, new_lengths=(kept >= 0).sum(-1).cpu().numpy())
        c.free_sequence(0)
        c.check_invariants()
    for l in range(2):
        for x, y in zip(gpu.gather(l), cpu.gather(l)):
            assert torch.equal(x.cpu(), y)
    assert HAS_CUDA
