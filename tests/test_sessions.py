"""Sessions over a compressed cache: forks that share pages (prompt reuse), prompt extension, chat turns."""

import copy

import numpy as np
import pytest
import torch

from kvpress_kernels.cache import PagedKVCache


def _filled(seed=0, L=2, B=2, H=2, D=8, P=4, n=11):
    g = torch.Generator().manual_seed(seed)
    c = PagedKVCache(L, B, H, D, page_size=P, dtype=torch.float32)
    for layer in range(L):
        c.append(layer, torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g))
    return c, g


def _evict_every_third(c, layer):
    lens = c.seq_lengths(layer)
    B, H = lens.shape
    K = int(lens.max())
    kept = torch.full((B, H, K), -1, dtype=torch.int32)
    new = np.zeros((B, H), dtype=np.int64)
    for b in range(B):
        for h in range(H):
            keep = [i for i in range(int(lens[b, h])) if (i + b + h) % 3 != 1]
            kept[b, h, :len(keep)] = torch.tensor(keep, dtype=torch.int32)
            new[b, h] = len(keep)
    c.compact(layer, kept, new_lengths=new)


def _snapshot(c):
    return [tuple(t.clone() if t is not None else None for t in c.gather(layer)) for layer in range(c.num_layers)]


def _same(a, b):
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert torch.equal(x, y)


@pytest.mark.parametrize("use_deepcopy", [False, True])
def test_fork_shares_pages_and_copies_on_write(use_deepcopy, monkeypatch):
    monkeypatch.setenv("KVPRESS_KERNELS_DEBUG", "1")
    parent, g = _filled()
    for layer in range(parent.num_layers):
        _evict_every_third(parent, layer)          # a compressed context: rows end mid-page
    twin, _ = _filled()                            # the same operations, never forked: the oracle
    for layer in range(twin.num_layers):
        _evict_every_third(twin, layer)
    before = _snapshot(parent)
    used = parent.pool_bytes_in_use()
    child = copy.deepcopy(parent) if use_deepcopy else parent.fork()
    assert child.pool_bytes_in_use() == used == parent.bytes_in_use() == child.bytes_in_use()
    assert child.shared_pages() == parent.pages_in_use()
    # the child appends (into the shared, partially filled last pages) and compacts (filling holes)
    for layer in range(child.num_layers):
        k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
        child.append(layer, k, v)
        twin.append(layer, k, v)
        _evict_every_third(child, layer)
        _evict_every_third(twin, layer)
    _same(_snapshot(child), _snapshot(twin))
    _same(_snapshot(parent), before)               # never written through the child
    # the parent can still grow independently
    k, v = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    parent.append(0, k, v)
    _same(_snapshot(child), _snapshot(twin))
    parent.check_invariants()
    child.check_invariants()
    # releasing the child returns only its own pages
    own = child.pages_in_use() - child.shared_pages()
    free_before = parent.num_free_pages()
    child.release()
    assert parent.num_free_pages() == free_before + own
    assert child.pages_in_use() == 0 and parent.shared_pages() == 0
    parent.check_invariants()
    _same(_snapshot(parent)[1:], before[1:])


def test_dropped_fork_pages_come_back_before_the_pool_grows():
    parent, g = _filled()
    child = parent.fork()
    child.append(0, torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g))
    own = child.pages_in_use() - child.shared_pages()
    assert own > 0
    pages, free = parent.num_pages, parent.num_free_pages()
    del child                                      # never released
    # ask for exactly the free pages plus the dropped fork's: a sweep finds them, the pool does not grow
    assert (parent.seq_lengths(1) == 11).all() and parent.page_size == 4   # 3 pages, 1 free slot per row
    n = free + own
    extra = np.zeros((2, 2), dtype=np.int64)
    extra[0, 0] = 4 * n - 1                        # ceil((11 + 4n - 1) / 4) = n + 3 pages
    parent.reserve(1, extra)
    assert parent.num_pages == pages and parent.num_free_pages() == 0
    parent.check_invariants()
