"""Property tests of the paged KV cache's whole life cycle (DESIGN.md §4), for every backend here.

Hypothesis drives random interleavings, across several layers and sequences, of

- **append**: ragged new tokens per (sequence, kv head) through ``PagedKVCache.append``;
- **compress**: score (``attention_mass_paged`` with one query per sequence) -> select
  (``select_topk`` with per-row budgets, sinks, recent windows, ties) -> compact
  (``PagedKVCache.compact``), the compression step of every token-level method;
- **decode**: ``paged_decode_attention`` with probabilities over each row's own length, before or
  after appending the step's new token;
- **free**: ``PagedKVCache.free_sequence``.

The oracle is a plain Python model of the cache: per (layer, sequence, head) row, the list of its
tokens ``(position, k, v)`` in slot order, compacted the naive way (holes filled from the tail,
exactly the contract of the compaction op). After every step:

- ``check_invariants()`` holds, and an independent recount from ``owned_pages`` agrees: every page
  is owned by exactly one row or free, never both, none leaked; each row owns exactly
  ``ceil(length / page_size)`` pages (no reserve is ever made here, so nothing is over-allocated);
- every row's tokens equal the model's **bit for bit** (K, V compared as integers) with their
  original positions, and the host and device lengths equal the model's;
- selection kept exactly what a naive sort-based oracle keeps (protected tokens first, then score
  descending, ties to the lower slot, NaN lowest) - so no selected token is ever lost;
- scores and decode outputs/probabilities equal a float64 dense attention over the model's contents.

Fixed pools (``grow=False``) must raise ``CacheFullError`` exactly when the model says the free pages
do not suffice - which is only true if freed pages really are reusable - and leave everything
unchanged when they do.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import devices_for_triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpress_kernels.cache import CacheFullError, PagedKVCache
from kvpress_kernels.ops import (append_, attention_mass_paged, compact_, paged_decode_attention, segment_reduce,
                                 select_segments, select_topk)

NAN = float("nan")


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

class CacheModel:
    """Plain Python model: ``rows[(layer, seq, head)]`` is the list of ``(position, k, v)`` in slot
    order; ``seen`` counts every token ever appended to a row (the next default position)."""

    def __init__(self, L, B, H, page_size, num_pages, grow):
        self.L, self.B, self.H, self.P = L, B, H, page_size
        self.rows = {(l, b, h): [] for l in range(L) for b in range(B) for h in range(H)}
        self.seen = {r: 0 for r in self.rows}
        self.num_pages, self.grow = num_pages, grow

    def pages(self, n: int) -> int:
        return -(-n // self.P)

    def pages_in_use(self) -> int:
        return sum(self.pages(len(t)) for t in self.rows.values())

    def append_fails(self, layer, counts) -> bool:
        """Whether a fixed pool lacks the pages for ``counts[b][h]`` more tokens in ``layer`` (and,
        for a growing pool, track its new size: it doubles, or grows by the deficit if more)."""
        lens = {(b, h): len(self.rows[(layer, b, h)]) for b in range(self.B) for h in range(self.H)}
        need = sum(self.pages(n + int(counts[b][h])) - self.pages(n) for (b, h), n in lens.items())
        free = self.num_pages - self.pages_in_use()
        if need > free:
            if not self.grow:
                return True
            self.num_pages = max(2 * self.num_pages, self.num_pages + need - free)
        return False

    def append(self, layer, k, v, counts):
        for b in range(self.B):
            for h in range(self.H):
                r = (layer, b, h)
                for t in range(int(counts[b][h])):
                    self.rows[r].append((self.seen[r] + t, k[b, h, t].clone(), v[b, h, t].clone()))
                self.seen[r] += int(counts[b][h])

    def compact(self, layer, kept):
        """``kept[(b, h)]``: ascending kept slots. The i-th kept slot at or beyond the new length
        moves into the i-th hole below it."""
        for (b, h), slots in kept.items():
            r = (layer, b, h)
            n = len(slots)
            keep = set(slots)
            holes = [s for s in range(n) if s not in keep]
            sources = [s for s in slots if s >= n]
            new = self.rows[r][:n]
            for hole, src in zip(holes, sources):
                new[hole] = self.rows[r][src]
            self.rows[r] = new

    def free(self, seq):
        for r in self.rows:
            if r[1] == seq:
                self.rows[r], self.seen[r] = [], 0


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_matches(cache: PagedKVCache, model: CacheModel):
    cache.check_invariants()
    # independent page accounting from the public host view
    owned = []
    for (l, b, h), toks in model.rows.items():
        pages = cache.owned_pages(l, b, h)
        assert len(pages) == model.pages(len(toks)), f"row {(l, b, h)} owns {len(pages)} pages for {len(toks)} tokens"
        assert cache.page_table[l, b, h, :len(pages)].tolist() == pages
        owned += pages
    assert len(set(owned)) == len(owned), "a page is owned twice"
    assert all(0 <= p < cache.num_pages for p in owned)
    assert cache.pages_in_use() == len(owned) == model.pages_in_use()
    assert cache.num_free_pages() == cache.num_pages - len(owned), "pages leaked"
    assert cache.num_pages == model.num_pages
    lens = np.array([[[len(model.rows[(l, b, h)]) for h in range(model.H)] for b in range(model.B)]
                     for l in range(model.L)])
    assert np.array_equal(cache.seq_lengths(), lens)
    assert np.array_equal(cache.lengths.cpu().numpy(), lens)
    assert np.array_equal(cache.seen_tokens(), np.array(
        [[[model.seen[(l, b, h)] for h in range(model.H)] for b in range(model.B)] for l in range(model.L)]))
    for l in range(model.L):
        k, v, _, pos = cache.gather(l)
        pos = pos.cpu()
        for b in range(model.B):
            for h in range(model.H):
                toks = model.rows[(l, b, h)]
                n = len(toks)
                if n == 0:
                    continue
                assert pos[b, h, :n].tolist() == [t[0] for t in toks], f"positions of row {(l, b, h)}"
                want_k, want_v = torch.stack([t[1] for t in toks]), torch.stack([t[2] for t in toks])
                assert torch.equal(bits(k[b, h, :n].cpu()), bits(want_k)), f"K of row {(l, b, h)}"
                assert torch.equal(bits(v[b, h, :n].cpu()), bits(want_v)), f"V of row {(l, b, h)}"


# ------------------------------------------------------------------------------------------------
# Oracles
# ------------------------------------------------------------------------------------------------

def naive_keep(scores: list, L: int, budget: int, sink: int, recent: int) -> list:
    """Slots a row keeps: the protected ones (``j < sink`` or ``j >= L - recent``), then the best
    others by (score descending, NaN lowest, slot ascending) until ``budget``."""
    prot = [j for j in range(L) if j < sink or j >= L - recent]
    others = [j for j in range(L) if j not in set(prot)]
    others.sort(key=lambda j: (0, -scores[j], j) if scores[j] == scores[j] else (1, 0.0, j))
    return sorted(prot + others[:budget - len(prot)])


def dense_decode(model: CacheModel, layer: int, q: torch.Tensor, scale: float):
    """float64 attention of ``q [B, Hq, 1, D]`` over each row's tokens in slot order: ``out`` and the
    group-summed probabilities ``[B, Hkv, Lmax]``; a row without tokens gives zeros."""
    B, Hq, _, D = q.shape
    H = model.H
    G = Hq // H
    out = torch.zeros(B, Hq, 1, D, dtype=torch.float64)
    probs = {}
    for b in range(B):
        for h in range(H):
            toks = model.rows[(layer, b, h)]
            acc = torch.zeros(len(toks), dtype=torch.float64)
            if toks:
                K = torch.stack([t[1] for t in toks]).double()
                V = torch.stack([t[2] for t in toks]).double()
                for g in range(G):
                    p = torch.softmax(q[b, h * G + g, 0].double() @ K.T * scale, dim=0)
                    out[b, h * G + g, 0] = p @ V
                    acc += p
            probs[(b, h)] = acc
    return out, probs


def malformed_call(data, cache: PagedKVCache, layer: int, backend: str, rand) -> None:
    """A raw op (append_, compact_, paged_decode_attention) on the cache's own pools and layer view with
    ONE per-row integer corrupted: a length, a count, a kept slot or a page-table entry in use, set to a
    negative value or past its range. It must raise a ValueError naming that input and write nothing:
    the pools and lengths stay bit for bit (the caller then checks the whole cache against the model)."""
    table, lengths = (t.clone() for t in cache.layer_view(layer))
    B, H, max_pages = table.shape
    P, D = cache.page_size, cache.head_dim
    b, h = data.draw(st.integers(0, B - 1), label="bad_seq"), data.draw(st.integers(0, H - 1), label="bad_head")
    target = data.draw(st.sampled_from(["append_lengths", "append_counts", "compact_lengths", "compact_kept",
                                        "decode_lengths", "page_table"]), label="bad_input")
    M = int(lengths.max())
    if target == "compact_kept" and M == 0 or target == "page_table" and int(lengths[b, h]) == 0:
        target = "append_lengths"          # nothing to corrupt there: a row without slots / pages in use
    kind = data.draw(st.sampled_from(["negative", "beyond"]), label="bad_kind")
    low = data.draw(st.sampled_from([-1, -2, -(2 ** 31)]), label="negative_value")
    cap = max_pages * P
    counts = torch.full((B, H), 2, dtype=torch.int32, device=lengths.device)
    kept = torch.arange(M, dtype=torch.int32, device=lengths.device).expand(B, H, M).clone()
    kept[kept >= lengths.unsqueeze(-1)] = -1
    if target.endswith("lengths"):
        lengths[b, h] = low if kind == "negative" else data.draw(st.sampled_from([cap + 1, 2 ** 31 - 1]), label="hi")
        name = "lengths"
    elif target == "append_counts":
        counts[b, h] = low if kind == "negative" else data.draw(st.sampled_from([3, 2 ** 31 - 1]), label="hi")
        name = "counts"
    elif target == "compact_kept":
        kept[b, h, 0] = min(low, -2) if kind == "negative" else int(lengths[b, h]) + (M if M > 1 else 0)
        name = "kept_idx"                  # -2: bad padding; beyond: past the row's length or out of order
    else:
        table[b, h, 0] = low if kind == "negative" else cache.k_pages.shape[0]
        counts.zero_()                     # (an append that writes nothing still checks the pages in use)
        name = "page_table"
    before = [bits(cache.k_pages).clone(), bits(cache.v_pages).clone(), cache.pos_pages.clone(),
              cache.lengths.clone(), cache.page_table.clone()]
    debug = os.environ.get("KVPRESS_KERNELS_DEBUG")
    os.environ["KVPRESS_KERNELS_DEBUG"] = "1"      # on CUDA the value checks run in debug mode only
    try:
        _malformed_raises(name, target, kind, cache, table, lengths, counts, kept, backend, rand, B, H, D)
    finally:
        if debug is None:
            del os.environ["KVPRESS_KERNELS_DEBUG"]
        else:
            os.environ["KVPRESS_KERNELS_DEBUG"] = debug
    after = [bits(cache.k_pages), bits(cache.v_pages), cache.pos_pages, cache.lengths, cache.page_table]
    assert all(torch.equal(x, y) for x, y in zip(before, after)), f"a rejected call ({target}, {kind}) wrote"


def _malformed_raises(name, target, kind, cache, table, lengths, counts, kept, backend, rand, B, H, D):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        if target.startswith("append") or target == "page_table" and kind == "negative":
            k = rand((B, H, 2, D)).to(cache.k_pages.device)
            append_(cache.k_pages, cache.v_pages, table, lengths, k, k, counts=counts, backend=backend)
        elif target.startswith("compact"):
            compact_(cache.k_pages, cache.v_pages, table, lengths, kept, pos_pages=cache.pos_pages, backend=backend)
        else:
            q = rand((B, H, 1, D)).to(cache.k_pages.device)
            paged_decode_attention(q, cache.k_pages, cache.v_pages, table, lengths, backend=backend)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def run_interleaving(data, backend: str, max_steps: int, device: str = "cpu"):
    """One random life of a cache: geometry, dtype and pool drawn, then up to ``max_steps`` steps, each
    checked against the model (about 8 steps per example on average)."""
    L = data.draw(st.integers(1, 3), label="layers")
    B = data.draw(st.integers(1, 3), label="batch")
    H = data.draw(st.integers(1, 2), label="kv_heads")
    G = data.draw(st.sampled_from([1, 2, 3]), label="group")
    D = data.draw(st.sampled_from([4, 8]), label="head_dim")
    P = data.draw(st.sampled_from([1, 2, 3, 5]), label="page_size")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    grow = data.draw(st.booleans(), label="grow")
    rows = L * B * H
    num_pages = rows * data.draw(st.integers(1, 4), label="pages_per_row")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    cache = PagedKVCache(L, B, H, D, num_pages=num_pages, max_tokens=8, page_size=P, dtype=dtype,
                         device=device, backend=backend, grow=grow)

    def rand(shape):  # drawn on the CPU (the model's copy), then moved
        return torch.randn(shape, generator=gen).to(dtype)

    model = CacheModel(L, B, H, P, num_pages, grow)
    scale = D ** -0.5
    Hq = H * G
    # fp16 decode output is rounded to fp16 (relative 2^-11 of |out| <= max|v| ~ 5); fp32 differs from
    # float64 by accumulation order only
    atol = 1e-2 if dtype == torch.float16 else 1e-5

    def do_append(layer, counts, T):
        k = rand((B, H, T, D))
        v = rand((B, H, T, D))
        if model.append_fails(layer, counts):
            before = (cache.k_pages.clone(), cache.page_table.clone(), cache.lengths.clone(), cache.num_free_pages())
            with pytest.raises(CacheFullError, match="num_pages"):
                cache.append(layer, k.to(device), v.to(device), counts=counts)
            assert torch.equal(bits(before[0]), bits(cache.k_pages)) and torch.equal(before[1], cache.page_table)
            assert torch.equal(before[2], cache.lengths) and before[3] == cache.num_free_pages()
            return
        cache.append(layer, k.to(device), v.to(device), counts=counts)
        model.append(layer, k, v, counts)

    for _ in range(data.draw(st.integers(1, max_steps), label="steps")):
        op = data.draw(st.sampled_from(["append", "append", "compress", "decode", "free", "malformed"]), label="op")
        layer = data.draw(st.integers(0, L - 1), label="layer")
        if op == "append":
            T = data.draw(st.integers(0, 7), label="T")
            ragged = data.draw(st.booleans(), label="ragged")
            counts = (np.array(data.draw(st.lists(st.lists(st.integers(0, T), min_size=H, max_size=H),
                                                  min_size=B, max_size=B), label="counts")) if ragged
                      else np.full((B, H), T))
            do_append(layer, counts, T)
        elif op == "malformed":
            malformed_call(data, cache, layer, backend, rand)
        elif op == "free":
            seq = data.draw(st.integers(0, B - 1), label="seq")
            cache.free_sequence(seq)
            model.free(seq)
        elif op == "decode":
            append_first = data.draw(st.booleans(), label="append_first")
            q = rand((B, Hq, 1, D))
            if append_first:
                do_append(layer, np.ones((B, H), dtype=np.int64), 1)
            table, lengths = cache.layer_view(layer)
            out, probs = paged_decode_attention(q.to(device), cache.k_pages, cache.v_pages, table, lengths,
                                                scale=scale, return_probs=True, backend=backend)
            out, probs = out.cpu(), probs.cpu()
            want_out, want_probs = dense_decode(model, layer, q, scale)
            torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=0)
            for (b, h), p in want_probs.items():
                n = len(p)
                torch.testing.assert_close(probs[b, h, :n].double(), p, atol=1e-5 * G, rtol=0)
                assert not probs[b, h, n:].any(), "probabilities beyond a row's length"
            if not append_first:
                do_append(layer, np.ones((B, H), dtype=np.int64), 1)
        else:  # compress
            lens_h = cache.seq_lengths(layer)
            table, lengths = cache.layer_view(layer)
            M = int(lens_h.max())
            scores = torch.zeros(B, H, M, dtype=torch.float32)
            live = [b for b in range(B) if lens_h[b].min() >= 1]
            if live and M > 0:
                sel = torch.tensor(live, device=device)
                q = rand((len(live), Hq, 1, D))
                s = attention_mass_paged(q.to(device), cache.k_pages, table[sel], lengths[sel], max_len=M,
                                         scale=scale, head_reduce="group_sum", backend=backend).cpu()
                # oracle: the query is the row's last token, so it sees every slot
                for i, b in enumerate(live):
                    for h in range(H):
                        toks = model.rows[(layer, b, h)]
                        K = torch.stack([t[1] for t in toks]).double()
                        want = sum(torch.softmax(q[i, h * G + g, 0].double() @ K.T * scale, dim=0) for g in range(G))
                        torch.testing.assert_close(s[i, h, :len(toks)].double(), want, atol=1e-5 * G, rtol=0)
                scores[torch.tensor(live)] = s
            mode = data.draw(st.sampled_from(["raw", "ties", "nan"]), label="score_mode")
            if mode == "ties":   # a few distinct values: ties decided by slot
                scores = (scores * 2).round() / 2
            elif mode == "nan":  # NaN ranks below every number
                scores = torch.where(torch.rand(scores.shape, generator=gen) < 0.3, NAN, scores)
            sink = data.draw(st.integers(0, 2), label="sink")
            recent = data.draw(st.integers(0, 2), label="recent")
            budgets = []
            for b in range(B):
                for h in range(H):
                    n = int(lens_h[b, h])
                    prot = sum(1 for j in range(n) if j < sink or j >= n - recent)
                    budgets.append(data.draw(st.integers(prot, n), label="budget"))
            R = B * H
            keep, kept = select_topk(scores.view(R, M).to(device),
                                     torch.tensor(budgets, dtype=torch.int64, device=device),
                                     lengths=lengths.reshape(R), sink=sink, recent=recent,
                                     max_budget=max(budgets), backend=backend)
            keep, kept = keep.cpu(), kept.cpu()
            want = {}
            for b in range(B):
                for h in range(H):
                    r = b * H + h
                    n = int(lens_h[b, h])
                    want[(b, h)] = naive_keep(scores[b, h].tolist(), n, budgets[r], sink, recent)
                    got = [j for j in kept[r].tolist() if j >= 0]
                    assert got == want[(b, h)], f"row {(b, h)} kept {got}, oracle {want[(b, h)]}"
                    assert keep[r].nonzero().flatten().tolist() == got
            cache.compact(layer, kept.view(B, H, -1).to(device), new_lengths=np.array(budgets).reshape(B, H))
            model.compact(layer, want)
        assert_matches(cache, model)


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_interleavings_reference(data):
    run_interleaving(data, "reference", max_steps=14)


@pytest.mark.triton
@pytest.mark.parametrize("device", devices_for_triton())
def test_interleavings_triton(device):
    @settings(max_examples=50, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def run(data):
        run_interleaving(data, "triton", max_steps=10, device=device)

    run()


# ------------------------------------------------------------------------------------------------
# Any memory layout, any values: Triton selection and segment ops equal the reference (issue 11)
# ------------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def laid_out(data, t: torch.Tensor, label: str, layouts=LAYOUTS) -> torch.Tensor:
    """``t`` in a drawn memory layout: contiguous, transposed storage (2-D and up), every stride doubled
    with a storage offset, or rows broadcast from row 0 with stride 0 (this one changes the values, so
    callers draw what depends on ``t`` after laying it out)."""
    kind = data.draw(st.sampled_from(layouts), label=label)
    if kind == "transposed" and t.dim() >= 2:
        perm = list(reversed(range(t.dim())))
        return t.permute(perm).contiguous().permute(perm)
    if kind == "sliced" and t.numel():
        big = torch.zeros([2 * n + 1 for n in t.shape], dtype=t.dtype, device=t.device)
        v = big[tuple(slice(1, None, 2) for _ in t.shape)]
        v.copy_(t)
        return v
    if kind == "expanded" and t.shape[0] > 1:
        return t[:1].expand(t.shape)
    return t


def drawn_scores(data, R: int, N: int, gen) -> torch.Tensor:
    scores = torch.randn(R, N, generator=gen)
    mode = data.draw(st.sampled_from(["raw", "ties", "non_finite"]), label="values")
    if mode == "ties":
        scores = (scores * 2).round() / 2
    elif mode == "non_finite":
        special = torch.tensor([NAN, float("inf"), float("-inf")])[torch.randint(0, 3, (R, N), generator=gen)]
        scores = torch.where(torch.rand(R, N, generator=gen) < 0.3, special, scores)
    return scores


def drawn_spans(data, N: int) -> torch.Tensor:
    cuts = sorted(data.draw(st.lists(st.integers(0, N), min_size=2, max_size=8), label="cuts"))
    pairs = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    return torch.tensor(pairs, dtype=torch.int64).view(-1, 2)


def run_layouts(data, device: str) -> None:
    R = data.draw(st.integers(1, 4), label="rows")
    N = data.draw(st.integers(1, 12), label="tokens")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    op = data.draw(st.sampled_from(["select_topk", "select_segments", "segment_reduce"]), label="op")
    scores = laid_out(data, drawn_scores(data, R, N, gen).to(device), "scores_layout")
    if op == "select_topk":
        lengths = laid_out(data, torch.tensor(data.draw(st.lists(st.integers(0, N), min_size=R, max_size=R),
                                                        label="lengths")).to(device), "lengths_layout")
        protect = laid_out(data, (torch.rand(R, N, generator=gen) < 0.2).to(device), "protect_layout")
        sink, recent = data.draw(st.integers(0, 2), label="sink"), data.draw(st.integers(0, 2), label="recent")
        j = torch.arange(N, device=device)
        L = lengths.unsqueeze(1)
        n_prot = (((j < sink) | (j >= L - recent) | protect) & (j < L)).sum(1).tolist()
        budget = torch.tensor([data.draw(st.integers(p, int(n)), label="budget")
                               for p, n in zip(n_prot, lengths.tolist())]).to(device)
        budget = laid_out(data, budget, "budget_layout") if len(set(budget.tolist())) == 1 else budget
        kw = dict(lengths=lengths, sink=sink, recent=recent, protect=protect, max_budget=N)
        want = select_topk(scores.contiguous(), budget.contiguous(), backend="reference",
                           **{k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        got = select_topk(scores, budget, backend="triton", **kw)
        assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, want)), (got, want)
        return
    spans = drawn_spans(data, N)
    if op == "segment_reduce":
        lengths = laid_out(data, torch.tensor(data.draw(st.lists(st.integers(0, N), min_size=R, max_size=R),
                                                        label="lengths")).to(device), "lengths_layout")
        seg = dict(spans=laid_out(data, spans.to(device), "spans_layout", LAYOUTS[:3])) if data.draw(st.booleans(), label="by_spans") \
            else dict(chunk_size=data.draw(st.integers(1, 5), label="chunk"))
        reduce = data.draw(st.sampled_from(["sum", "mean", "max"]), label="reduce")
        want = segment_reduce(scores.contiguous(), lengths=lengths.contiguous(), reduce=reduce, backend="reference",
                              **{k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in seg.items()})
        got = segment_reduce(scores, lengths=lengths, reduce=reduce, backend="triton", **seg)
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-6, atol=1e-6, equal_nan=True)
        return
    S = spans.shape[0]
    seg_scores = laid_out(data, drawn_scores(data, R, S, gen).to(device), "seg_scores_layout")
    sizes = torch.randint(0, 5, (R, S) if data.draw(st.booleans(), label="sizes_2d") else (S,), generator=gen)
    sizes = laid_out(data, sizes.to(device), "sizes_layout")
    protect = laid_out(data, (torch.rand(R, S, generator=gen) < 0.3).to(device), "protect_layout")
    need = torch.where(protect, sizes.expand(R, S), 0).sum(1)
    budget = need + torch.randint(0, 10, (R,), generator=gen).to(device)
    policy = data.draw(st.sampled_from(["skip", "stop"]), label="policy")
    want = select_segments(seg_scores.contiguous(), sizes.contiguous(), budget, policy=policy,
                           protect=protect.contiguous(), backend="reference")
    got = select_segments(seg_scores, sizes, budget, policy=policy, protect=protect, backend="triton")
    assert torch.equal(got.cpu(), want.cpu()), (got, want)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("device", devices_for_triton())
def test_any_layout_any_values_triton_equals_reference(device):
    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def run(data):
        run_layouts(data, device)

    run()
